"""How the trainer optimises: which parameters train (``select_trainable``), AdamW's parameter
groups (weight decay, ``lr_scales``) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch

from moe_gen.model.model import NEW_HEADS, GeneralistModel
from moe_gen.moe import MoE
from moe_gen.registry import did_you_mean


class WarmupCosine:
    """Learning-rate factor: linear warm-up over ``warmup`` steps (step i at (i + 1) / warmup), then
    cosine decay from 1 at step ``warmup`` to ``min_ratio`` at step ``total`` (one past the last
    step of a run of ``total`` steps). A plain object so ``LambdaLR.state_dict`` saves it."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def select_trainable(model: GeneralistModel, what: str, new_adapters: Sequence[str] = ()) -> int:
    """Freezes everything except ``what`` (``all``, ``experts``, ``routers``, ``adapters``,
    ``new_adapters``); returns the number of trainable parameters."""
    if what == "all":  # every parameter but the frozen image tokenizers' (they never train)
        trained = [p for name, p in model.named_parameters() if not name.startswith("image_tokenizers.")]
        for p in trained:
            p.requires_grad_(True)
        return sum(p.numel() for p in trained)
    for p in model.parameters():
        p.requires_grad_(False)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if what == "experts":
        modules = [m.experts for m in moes] + [m.shared for m in moes if m.shared is not None]
        modules += [m.shared_gate for m in moes if m.shared_gate is not None]
    elif what == "routers":  # learned gates only: a fixed (hash) gate's router gets no gradient
        modules = [m.router for m in moes if m.router.gate.learned]
    elif what == "adapters":  # with their frame and stop heads (a new task's heads start random)
        modules = [*model.adapters.values(), *model.frame_heads.values(), *model.stop_heads.values()]
    elif what == "new_adapters":
        heads = [n.removesuffix(NEW_HEADS) for n in new_adapters]  # a new adapter's heads are new too
        modules = [model.adapters[n] for n in new_adapters if not n.endswith(NEW_HEADS)]
        modules += [model.frame_heads[n] for n in heads if n in model.frame_heads]
        modules += [model.stop_heads[n] for n in heads if n in model.stop_heads]
    else:
        raise ValueError(f"trainable must be all, experts, routers, adapters or new_adapters; got {what!r}")
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count == 0:
        hint = " (the model is dense)" if what in ("experts", "routers") and not moes else ""
        hint = hint or (" (no task needed a new adapter)" if what == "new_adapters" else "")
        hint = hint or (" (every router's gate is fixed: hash)" if what == "routers" else "")
        raise ValueError(f"trainable={what!r} leaves nothing to train{hint}")
    return count


def _param_groups(model: GeneralistModel, weight_decay: float, lr: Optional[float] = None,
                  lr_scales: Optional[dict] = None) -> list[dict]:
    """AdamW groups: decay on matrices and expert weight stacks, not on biases (expert bias stacks
    included), norms, embedding tables (every ``nn.Embedding``, adapters' position and cell tables
    too), scales; each split by learning rate (``lr`` times the longest matching prefix's
    ``lr_scales`` entry). Groups at ``lr`` itself come first (the logged learning rate is the first
    group's)."""
    lr_scales = lr_scales or {}
    names = [name for name, _ in model.named_parameters()]
    unmatched = [prefix for prefix in lr_scales if not any(name.startswith(prefix) for name in names)]
    if unmatched:  # a typo would train everything at lr without a word
        heads = sorted({".".join(name.split(".")[:depth]) + "." for name in names for depth in (1, 2)})
        raise ValueError(f"TrainConfig.lr_scales: no parameter name starts with {', '.join(map(repr, unmatched))}"
                         f"{did_you_mean(unmatched, heads)}; names start with e.g. "
                         f"{', '.join(sorted({name.split('.')[0] + '.' for name in names}))}")
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    frozen = [prefix for prefix in lr_scales if not any(name.startswith(prefix) for name in trained)]
    if frozen:  # (scaled nothing without a word before the twenty-seventh session's audit)
        warnings.warn(f"TrainConfig.lr_scales: {', '.join(map(repr, frozen))} names only frozen parameters "
                      "(TrainConfig.trainable leaves them out): it scales nothing", stacklevel=3)
    groups: dict[tuple[float, bool], list] = {}
    seen: set[int] = set()  # a parameter shared by two modules joins one group
    for module_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{leaf}" if module_name else leaf
            decays = p.dim() >= 2 and not _never_decayed(module_name, module, leaf)
            matches = [prefix for prefix in lr_scales if name.startswith(prefix)]
            scale = float(lr_scales[max(matches, key=len)]) if matches else 1.0
            groups.setdefault((scale, decays), []).append(p)
    order = sorted(groups, key=lambda key: (key[0] != 1.0, not key[1], key[0]))
    return [{"params": groups[key], "weight_decay": weight_decay if key[1] else 0.0,
             **({} if lr is None else {"lr": lr * key[0]})} for key in order]


_BIASES = ("bias", "b_in", "b_out")  # names of bias parameters, stacked per expert or not


def _never_decayed(module_name: str, module: torch.nn.Module, leaf: str) -> bool:
    """Whether parameter ``leaf`` of ``module`` is a bias or an embedding table (never decayed)."""
    return (leaf in _BIASES or isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            or "embedding" in module_name)


def _fusable(groups: list[dict]) -> bool:
    """Whether AdamW's fused kernel can update every parameter: plain (not sharded ``DTensor``)
    floating-point tensors on the CPU or a CUDA device. It is ~5x faster than the default
    per-tensor loop on the CPU (12 ms → 2 ms a step for the debug flavour's 117 tensors) and agrees
    with it to rounding."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda")
                                and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
