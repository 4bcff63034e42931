"""Sparse upcycling: dense FFNs become mixture-of-experts layers whose experts start as copies.

Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
(arXiv 2212.05055): each chosen dense FFN is replaced by an MoE layer of E experts, every one a
copy of the FFN, behind a freshly initialised router. The router's top-k gate weights sum to 1 per
token (renormalised top-k, or the hash gate's 1/k), so with identical experts the layer computes
Σ_k w_k·FFN(x) = FFN(x): the sparse model starts exactly where the dense one was, and training
makes the experts diverge as the router sends them different tokens.

    model, summary = upcycle(model, num_experts=8, top_k=2, router="attribute", layers="every_other")
    summary.layers            # ("encoder.blocks.1", "encoder.blocks.3", "decoder.blocks.1")
    model.save_pretrained(d)  # model.config.moe now says every=2, num_experts=8, top_k=2, ...

Two options break the experts' symmetry from the first step instead of waiting for the router:

- ``noise``: every expert parameter times (1 + noise·ε), ε ~ N(0, 1) drawn per expert;
- ``reinit_fraction``: Drop-Upcycling (Nakamura et al., ICLR 2025): each expert re-draws that
  fraction of its hidden units (a different random subset per expert) from a normal distribution
  with the mean and std of the dense weight matrix they belong to, and keeps the others.

Both make the upcycled layer differ from the dense FFN (that is their purpose).

Shape legend: E experts, D model width, H hidden width, X = H (2H for gated experts, ``[gate | up]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from moe_gen.config import ExpertsConfig, MoEConfig, RouterConfig
from moe_gen.experts.experts import DenseFFN
from moe_gen.model.config import ModelConfig
from moe_gen.moe import MoE
from moe_gen.registry import ROUTERS

__all__ = ["UpcycleSummary", "upcycle"]

PLACEMENTS = ("all", "every_other")
# Gates whose weights sum to 1 over a token's k experts: renormalised top-k, and the hash gate
# (1/k each). Expert choice gives a token 0..E experts weighted by raw probabilities, and BASE
# weighs its one expert by that expert's probability: neither reproduces the dense FFN.
EXACT_GATES = ("topk", "hash")


@dataclasses.dataclass(frozen=True)
class UpcycleSummary:
    """What ``upcycle`` did.

    Attributes:
        layers: qualified names of the upcycled FFNs (``"encoder.blocks.1"``), in model order.
        num_experts, top_k: E and k of every new MoE layer.
        router: the router settings the new layers use (vocabulary sizes and ``normalize`` as set).
        parameters_before, parameters_after: parameter counts of the whole model.
        active_parameters_before, active_parameters_after: parameters one token uses (each MoE
            layer counting k of its E experts).
    """

    layers: tuple[str, ...]
    num_experts: int
    top_k: int
    router: RouterConfig
    parameters_before: int
    parameters_after: int
    active_parameters_before: int
    active_parameters_after: int


def upcycle(
    model: nn.Module,
    *,
    num_experts: int,
    top_k: int = 2,
    router: Union[RouterConfig, str, None] = None,
    layers: Union[str, Sequence[str]] = "all",
    noise: float = 0.0,
    reinit_fraction: float = 0.0,
    seed: Optional[int] = None,
    expert_hidden: Optional[int] = None,
    router_std: float = 0.01,
) -> tuple[nn.Module, UpcycleSummary]:
    """Replaces chosen dense FFNs of ``model`` by MoE layers whose experts copy them (in place).

    Works on a ``GeneralistModel`` (the FFNs of ``model.encoder.blocks`` and ``model.decoder.blocks``;
    ``model.config`` is updated so that ``save_pretrained`` / ``from_pretrained`` rebuild the upcycled model) and on
    any other module tree (every ``DenseFFN`` outside an MoE layer; the caller's forward must then call the new
    ``MoE``, which takes ``tags`` and returns an ``MoEOutput``). Nothing changes when an argument is rejected.

    Args:
        model: the model; its dense FFNs are replaced in place.
        num_experts: E copies per FFN.
        top_k: experts per token (1 <= k <= E).
        router: a ``RouterConfig`` or a strategy name (``token``, ``context``, ``modality``, ``task``, ``attribute``,
            ``hybrid``, ``instruction``); a name keeps the model's other router settings. ``None``: the model's
            router settings (``RouterConfig()`` for a bare module tree). For a model with ``config.moe.router``, the
            tag vocabulary sizes (``num_tasks``, ``num_modalities``, ``num_roles``, ``num_passes``) and the tasks'
            prompt words (``task_words``) are always the model's. The gate must be ``topk`` or ``hash``, without a
            ``weight_scale``; with ``topk`` and k = 1, ``normalize=None`` is set to True (the one weight is then
            the constant 1, so the router learns from its auxiliary losses only, the price of starting at the dense
            function), and an explicit ``normalize=False`` is an error.
        layers: ``"all"``, ``"every_other"`` (blocks 1, 3, 5... of each stack: where ``ModelConfig.moe.every=2`` puts
            MoE layers; in a bare tree, FFNs whose last numeric name component is odd) or a list of names as
            ``upcycle`` reports them (``"encoder.blocks.1"``; ``"encoder.blocks.1.ffn"`` is accepted too).
        noise: relative std of the multiplicative noise on each expert's parameters (0: exact copies).
        reinit_fraction: fraction of each expert's hidden units to re-draw (Drop-Upcycling; 0: none).
        seed: seeds every random draw (router initialisation, noise, re-drawn units) without touching the global RNG;
            ``None`` draws from the global RNG.
        expert_hidden: H of each expert; must be the dense FFN's hidden width (``None``: that width). Fine-grained
            upcycling (splitting the dense hidden units among experts) is not offered.
        router_std: std of the new router's projection. Small weights make every gate start near uniform; 0 makes it
            exactly uniform, and then top-k breaks the ties alike for every token (the same k experts) until the
            router learns.

    Returns:
        ``(model, summary)``: the same model object, and an ``UpcycleSummary``.

    Raises:
        ValueError: a bad argument, an unknown layer name (the message lists the valid ones), a router that would not
            reproduce the dense FFN, or (for a ``GeneralistModel``) a placement ``ModelConfig`` cannot express.
    """
    _check_numbers(num_experts, top_k, noise, reinit_fraction, router_std)
    plan = _plan(model, num_experts, top_k, router, layers, expert_hidden, reinit_fraction)
    before, active_before = _parameter_counts(model)
    _swap_in(model, plan, noise, reinit_fraction, router_std, seed)
    after, active_after = _parameter_counts(model)
    return model, UpcycleSummary(layers=tuple(plan.ffns), num_experts=num_experts, top_k=top_k, router=plan.router,
                                 parameters_before=before, parameters_after=after,
                                 active_parameters_before=active_before, active_parameters_after=active_after)


# ---- the plan, then the swap --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``upcycle`` will do, settled (every argument checked) before the model changes."""

    ffns: dict[str, tuple[nn.Module, str, DenseFFN]]  # the chosen FFNs, in model order: name → (parent, attribute, FFN)
    router: RouterConfig  # the new layers' router settings
    layer_configs: dict[str, MoEConfig]  # name → configuration of its MoE layer
    model_config: Optional[ModelConfig]  # the model's config after upcycling; None for a bare module tree


def _plan(model: nn.Module, num_experts: int, top_k: int, router: Union[RouterConfig, str, None],
          layers: Union[str, Sequence[str]], expert_hidden: Optional[int], reinit_fraction: float) -> _Plan:
    """Chooses the FFNs and configures their MoE layers; raises, touching nothing, where an argument is wrong."""
    config = getattr(model, "config", None)
    config = config if isinstance(config, ModelConfig) else None
    candidates = _dense_ffns(model, config is not None)
    chosen = _select(candidates, layers, model)
    router_config = _router_config(router, config.moe.router if config is not None else None, top_k)
    backend = config.moe.backend if config is not None else "torch"
    layer_configs = {name: _layer_config(candidates[name][2], num_experts, top_k, router_config, backend,
                                         expert_hidden, name, reinit_fraction)
                     for name in chosen}
    new_config = None if config is None else _upcycled_config(model, config, chosen, layer_configs)
    return _Plan(ffns={name: candidates[name] for name in chosen}, router=router_config,
                 layer_configs=layer_configs, model_config=new_config)


def _swap_in(model: nn.Module, plan: _Plan, noise: float, reinit_fraction: float, router_std: float,
             seed: Optional[int]) -> None:
    """Builds the planned MoE layers, then puts them in place of their FFNs and updates the model's config."""
    with _random_state(seed):  # every layer is built before any is swapped in
        new_layers = {name: _upcycled_layer(dense, plan.layer_configs[name], noise, reinit_fraction, router_std)
                      for name, (_, _, dense) in plan.ffns.items()}
    for name, moe in new_layers.items():
        parent, attribute, _ = plan.ffns[name]
        setattr(parent, attribute, moe)
    if plan.model_config is not None:
        model.config = plan.model_config


# ---- choosing the FFNs --------------------------------------------------------------------------


def _dense_ffns(model: nn.Module, stacked: bool) -> dict[str, tuple[nn.Module, str, DenseFFN]]:
    """Name → (parent module, attribute, DenseFFN) of every FFN that can be upcycled, in model order.

    A model with a ``ModelConfig`` offers its blocks' FFNs, named by block (``"decoder.blocks.0"``).
    Any other tree offers every DenseFFN outside an MoE (a shared expert is part of its layer),
    named by the module holding it when it sits in an ``ffn`` attribute, else by its own name.
    """
    found: dict[str, tuple[nn.Module, str, DenseFFN]] = {}
    if stacked:
        for name, block in _blocks(model):
            if isinstance(block.ffn, DenseFFN):
                found[name] = (block, "ffn", block.ffn)
        return found
    modules = dict(model.named_modules())
    inside_moe = [name for name, module in modules.items() if isinstance(module, MoE)]
    for name, module in modules.items():
        if not isinstance(module, DenseFFN) or not name:
            continue
        if any(name.startswith(f"{moe}.") or not moe for moe in inside_moe):
            continue
        parent_name, _, attribute = name.rpartition(".")
        key = parent_name if attribute == "ffn" and parent_name else name
        found[key] = (modules[parent_name], attribute, module)
    return found


def _blocks(model: nn.Module):
    """(name, block) of the encoder's blocks, then the decoder's (a stack may have none)."""
    for stack in ("encoder", "decoder"):
        for i, block in enumerate(getattr(getattr(model, stack, None), "blocks", ())):
            yield f"{stack}.blocks.{i}", block


def _block_index(name: str) -> Optional[int]:
    """The last numeric component of a qualified name (``"decoder.blocks.3"`` → 3), if any."""
    numbers = [part for part in name.split(".") if part.isdigit()]
    return int(numbers[-1]) if numbers else None


def _select(candidates: dict, layers: Union[str, Sequence[str]], model: nn.Module) -> list[str]:
    """The names ``layers`` chooses among ``candidates``, in model order."""
    if isinstance(layers, str) and layers in PLACEMENTS:
        chosen = [name for name in candidates
                  if layers == "all" or (_block_index(name) is not None and _block_index(name) % 2 == 1)]
        if not chosen:
            raise ValueError(f"layers={layers!r} selects no dense FFN; upcyclable: "
                             f"{', '.join(candidates) or '(none)'}")
        return chosen
    names = [layers] if isinstance(layers, str) else layers
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"layers must be {' or '.join(map(repr, PLACEMENTS))} or a non-empty list of "
                         f"layer names, got {layers!r}")
    wanted = set()
    for name in names:
        key = name[:-len(".ffn")] if name.endswith(".ffn") and name not in candidates else name
        if key not in candidates:
            moe = any(isinstance(m, MoE) for n, m in model.named_modules() if n in (key, f"{key}.ffn"))
            why = "is already an MoE layer" if moe else "is not an upcyclable FFN"
            raise ValueError(f"layer {name!r} {why}; layers takes {' or '.join(map(repr, PLACEMENTS))} or "
                             f"names among: {', '.join(candidates) or '(none)'}")
        wanted.add(key)
    return [name for name in candidates if name in wanted]


# ---- settings of the new layers -----------------------------------------------------------------


def _check_numbers(num_experts, top_k, noise, reinit_fraction, router_std) -> None:
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if not 0 <= reinit_fraction <= 1:
        raise ValueError(f"reinit_fraction must be in [0, 1], got {reinit_fraction}")
    if not router_std >= 0:
        raise ValueError(f"router_std must be >= 0, got {router_std}")


def _router_config(router, model_router: Optional[RouterConfig], top_k: int) -> RouterConfig:
    """The router settings of the new layers, checked to reproduce the dense FFN (weights sum to 1)."""
    base = model_router if model_router is not None else RouterConfig()
    if router is None:
        config = base
    elif isinstance(router, str):
        if router not in ROUTERS:
            raise ValueError(f"unknown router strategy {router!r}; known: {', '.join(ROUTERS.list())}")
        config = base.replace(strategy=router)
    elif isinstance(router, RouterConfig):
        config = router
    else:
        raise ValueError(f"router must be a RouterConfig or a strategy name, got {type(router).__name__}")
    if config.strategy not in ROUTERS:
        raise ValueError(f"unknown router strategy {config.strategy!r}; known: {', '.join(ROUTERS.list())}")
    if model_router is not None:  # tag embeddings must cover the model's tag vocabularies (and know its tasks' words)
        config = config.replace(num_modalities=model_router.num_modalities, num_roles=model_router.num_roles,
                                num_passes=model_router.num_passes, num_tasks=model_router.num_tasks,
                                task_words=model_router.task_words)
    if config.gate not in EXACT_GATES:
        raise ValueError(f"gate {config.gate!r} does not give every token gate weights summing to 1, so the "
                         f"upcycled layer would not equal the dense FFN; use gate 'topk' (renormalised) or "
                         f"'hash'")
    # DeepSeek-V3's routed_scaling_factor multiplies the renormalised weights (their sum is then not 1).
    scale = getattr(config, "weight_scale", 1.0)
    if scale != 1.0:
        raise ValueError(f"router weight_scale={scale} scales the gate weights to sum to {scale}, so the "
                         "upcycled layer would not equal the dense FFN; use weight_scale=1")
    if config.gate == "topk":
        if config.normalize is False:
            raise ValueError("router normalize=False leaves the top-k gate weights summing to less than 1, "
                             "so the upcycled layer would not equal the dense FFN; use normalize=None or True")
        if config.normalize is None and top_k == 1:  # None means "when k > 1"
            config = config.replace(normalize=True)
    return config


def _hidden_width(dense: DenseFFN) -> int:
    """H of a dense FFN (the output width of a linear one)."""
    width = dense.fc_in.out_features
    return width // 2 if dense.kind == "glu" else width


def _layer_config(dense: DenseFFN, num_experts: int, top_k: int, router: RouterConfig, backend: str,
                  expert_hidden: Optional[int], name: str, reinit_fraction: float) -> MoEConfig:
    """The MoE layer replacing ``dense``: E experts of the dense FFN's kind and width, dropless."""
    hidden = _hidden_width(dense)
    if expert_hidden is not None and expert_hidden != hidden:
        raise ValueError(f"expert_hidden={expert_hidden} but {name}'s FFN has hidden width {hidden}; experts "
                         "copy the FFN whole (splitting its hidden units among experts is not supported), so "
                         f"pass expert_hidden=None or {hidden}")
    if dense.kind == "linear" and reinit_fraction > 0:
        raise ValueError(f"{name} is a linear FFN: it has no hidden units for reinit_fraction to re-draw")
    experts = ExpertsConfig(kind=dense.kind, activation=dense.activation, bias=dense.fc_in.bias is not None)
    # Dropless (capacity_factor None): a capacity limit would drop tokens the dense FFN computes.
    return MoEConfig(d_model=dense.fc_in.in_features, d_hidden=hidden, num_experts=num_experts, top_k=top_k,
                     router=router, experts=experts, capacity_factor=None, backend=backend)


def _upcycled_config(model: nn.Module, config: ModelConfig, chosen: list[str],
                     layer_configs: dict[str, MoEConfig]) -> ModelConfig:
    """``config`` describing the model after upcycling ``chosen``, so that ``from_pretrained`` builds
    the same layers; raises where ``ModelConfig`` cannot say it."""
    blocks = dict(_blocks(model))
    already = [name for name, block in blocks.items() if isinstance(block.ffn, MoE)]
    moe_after = set(chosen) | set(already)
    moe_layers: tuple[str, ...] = ()
    if moe_after == set(blocks):
        moe_every = 1
    elif moe_after == {name for name in blocks if _block_index(name) % 2 == 1}:
        moe_every = 2
    else:  # any other placement is named block by block
        moe_every, moe_layers = 1, tuple(sorted(moe_after))
    first = layer_configs[chosen[0]]
    # The experts copy the dense FFN whole: no shared expert (it would add to the dense output).
    experts = dataclasses.replace(config.moe.experts, kind=first.experts.kind, activation=first.experts.activation,
                                  bias=first.experts.bias, shared_expert=False, shared_hidden=None,
                                  shared_gate=False)
    new = config.with_moe(every=moe_every, layers=moe_layers, num_experts=first.num_experts, top_k=first.top_k,
                          expert_hidden=first.d_hidden, router=first.router, experts=experts,
                          capacity_factor=None, attention=False,
                          decoder_router={})  # every upcycled layer routes as `router` says
    rebuilt = new.moe_config()
    for name in chosen:
        if layer_configs[name] != rebuilt:
            raise ValueError(f"{name}'s FFN differs from the model's other dense FFNs ({layer_configs[name]} vs "
                             f"{rebuilt}); ModelConfig holds one MoE configuration for every layer")
    if config.moe.decoder_router and any(name.startswith("decoder.") for name in already):
        raise ValueError("the model's decoder MoE layers route by decoder_router; upcycling writes one router "
                         "configuration for every layer, so upcycle a model without decoder_router")
    if already:
        existing = blocks[already[0]].ffn.config
        if config.moe.attention or existing.replace(backend=rebuilt.backend) != rebuilt:
            raise ValueError(
                f"the model already has MoE layers ({', '.join(already)}) configured as {existing}"
                f"{' with MoE attention' if config.moe.attention else ''}; ModelConfig holds one MoE "
                f"configuration for every layer, and upcycling would add layers configured as {rebuilt}"
            )
    return new


# ---- building one layer -------------------------------------------------------------------------


@torch.no_grad()
def _upcycled_layer(dense: DenseFFN, config: MoEConfig, noise: float, reinit_fraction: float,
                    router_std: float) -> MoE:
    """The MoE layer for ``dense``: E copies (then re-drawn units, then noise), a small router, in the
    dense FFN's dtype, device and train/eval mode. Random draws are made on the CPU in fp32."""
    reference = dense.fc_in.weight
    moe = MoE(config)
    if moe.router.gate.learned:  # the hash gate's projection is a fixed buffer
        moe.router.weight.normal_(0.0, router_std)
    experts, E = moe.experts, config.num_experts
    if dense.kind == "linear":
        copies = {"weight": dense.fc_in.weight.t(), "bias": dense.fc_in.bias}
    else:  # nn.Linear keeps [out, in]; the experts keep [in, out] (glu: [gate | up] in both)
        copies = {"w_in": dense.fc_in.weight.t(), "b_in": dense.fc_in.bias,
                  "w_out": dense.fc_out.weight.t(), "b_out": dense.fc_out.bias}
    stacked = {name: value.detach().float().cpu().unsqueeze(0).repeat(E, *[1] * value.dim())
               for name, value in copies.items() if value is not None}
    if reinit_fraction > 0:
        _redraw_units(stacked, dense.kind == "glu", reinit_fraction)
    if noise > 0:
        for value in stacked.values():
            value.mul_(1.0 + noise * torch.randn(value.shape))
    for name, value in stacked.items():
        getattr(experts, name).copy_(value)
    return moe.to(device=reference.device, dtype=reference.dtype).train(dense.training)


def _redraw_units(stacked: dict[str, torch.Tensor], gated: bool, fraction: float) -> None:
    """Drop-Upcycling: each expert re-draws round(fraction·H) hidden units, its own random subset.

    A hidden unit is a column of ``w_in`` (two for gated experts: its gate and its up column), its
    entry of ``b_in`` and a row of ``w_out``; each is drawn from N(mean, std) of the dense matrix
    (or gate/up half) it belongs to, as the paper does. ``b_out`` belongs to no unit and stays.
    """
    w_in_EDX, w_out_EHD = stacked["w_in"], stacked["w_out"]
    E, H = w_out_EHD.shape[:2]
    count = round(fraction * H)
    halves = 2 if gated else 1
    # Statistics of the dense matrices: expert 0 is still an exact copy.
    dense_in = [w_in_EDX[0][:, h * H:(h + 1) * H] for h in range(halves)]
    b_in_EX = stacked.get("b_in")
    dense_bias = None if b_in_EX is None else [b_in_EX[0][h * H:(h + 1) * H] for h in range(halves)]
    in_stats = [(w.mean(), w.std(correction=0)) for w in dense_in]
    bias_stats = None if dense_bias is None else [(b.mean(), b.std(correction=0)) for b in dense_bias]
    out_mean, out_std = w_out_EHD[0].mean(), w_out_EHD[0].std(correction=0)
    for e in range(E):
        units = torch.randperm(H)[:count]
        for h, (mean, std) in enumerate(in_stats):
            columns = units + h * H
            w_in_EDX[e][:, columns] = torch.randn(w_in_EDX.shape[1], count) * std + mean
            if bias_stats is not None:
                b_mean, b_std = bias_stats[h]
                b_in_EX[e][columns] = torch.randn(count) * b_std + b_mean
        w_out_EHD[e][units] = torch.randn(count, w_out_EHD.shape[2]) * out_std + out_mean


@contextlib.contextmanager
def _random_state(seed: Optional[int]):
    """Draws within come from ``seed`` (the global CPU RNG is restored after), or from the global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, parameters one token uses: k of each MoE layer's E experts)."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    for module in model.modules():
        if isinstance(module, MoE):
            expert_params = sum(p.numel() for p in module.experts.parameters())
            active -= expert_params - expert_params * module.config.top_k // module.config.num_experts
    return total, active
