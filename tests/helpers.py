"""Helpers shared by the tests: random tags with several tag groups, backend comparison, scripts
loaded as modules."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import threading

import torch

from moe_gen import MoE, TokenTags
from moe_gen.model import GeneralistModel, MoELayers, flavour
from moe_gen.trainer import TrainConfig

_MOE_FIELDS = {f.name for f in dataclasses.fields(MoELayers)}


def random_tags(shape, num_tasks=3, generator=None) -> TokenTags:
    """Tags with a few distinct tag groups (modality, task, role, causal vary by token)."""
    g = generator or torch.Generator().manual_seed(1)
    task = torch.randint(0, num_tasks, shape, generator=g)
    modality = torch.randint(0, 3, shape, generator=g)  # TEXT, IMAGE, AUDIO
    role = torch.randint(0, 2, shape, generator=g)
    task_modalities = torch.zeros(*shape, 9, dtype=torch.bool)
    # Task i uses TEXT plus modality i: a deterministic function of the task, as in real tasks.
    task_modalities[..., 0] = True
    task_modalities.scatter_(-1, task.unsqueeze(-1), True)
    return TokenTags(
        task=task,
        modality=modality,
        role=role,
        task_modalities=task_modalities,
        causal=role == 1,
        pass_id=torch.zeros(shape, dtype=torch.long),
    )



@contextlib.contextmanager
def balance_bias_kept(moe: torch.nn.Module):
    """Puts back the selection biases of tag-balanced layers, which every training forward nudges
    (``moe_gen.routing.balance``), so that a layer run twice, or copied after a run, routes alike."""
    saved = [(b, b.clone()) for name, b in moe.named_buffers() if name.endswith("balance_bias")]
    try:
        yield
    finally:
        with torch.no_grad():
            for bias, value in saved:
                bias.copy_(value)


def run_with_grads(moe: MoE, x: torch.Tensor, tags, padding_mask=None, seed: int = 0):
    """Forward + backward of a fixed random projection of the output plus the aux loss (the
    layer's state, selection biases included, is left as it was).

    Returns (output, aux losses dict, grad of x, {param name: grad}).
    """
    x = x.detach().clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    with balance_bias_kept(moe):
        out = moe(x, tags=tags, padding_mask=padding_mask)
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(out.output.shape, generator=g, dtype=out.output.dtype)
    ((out.output * probe).sum() + out.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in moe.named_parameters() if p.grad is not None}
    return out.output.detach(), {k: v.detach() for k, v in out.aux_losses.items()}, x.grad, grads


def routing_moe(d_model: int = 16, num_experts: int = 8, **kwargs) -> MoE:
    """A small MoE layer for router tests: d_hidden 12, top-2, ``router`` a strategy name or a
    ``RouterConfig`` (default token routing); other ``MoEConfig`` fields as given."""
    from moe_gen import MoEConfig, RouterConfig

    router = kwargs.pop("router", "token")
    if isinstance(router, str):
        router = RouterConfig(strategy=router)
    defaults = dict(d_model=d_model, d_hidden=12, num_experts=num_experts, top_k=2, router=router)
    defaults.update(kwargs)
    return MoE(MoEConfig(**defaults))


def with_backend(moe: MoE, backend: str) -> MoE:
    """A deep copy of ``moe`` (same weights) using another dispatch backend."""
    other = copy.deepcopy(moe)
    other.set_backend(backend)
    return other


def flavour_with(name: str, **overrides):
    """``flavour(name)`` with overrides given flat: ``MoELayers`` fields (``router``, ``every``,
    ``num_experts``...) go to ``moe``, the rest to ``ModelConfig``."""
    moe = {k: overrides.pop(k) for k in list(overrides) if k in _MOE_FIELDS}
    return flavour(name, **overrides, moe=moe)


MIXED = ["digit_classification", "speech_recognition", "motion_classification", "visual_grounding",
         "text_to_speech", "video_classification", "table_to_text"]


def mixed_tasks(tok):
    """(tasks, samples): three training rows of each of seven presets over many modalities."""
    from moe_gen.tasks import load_preset

    tasks = [load_preset(n, "train", limit=3) for n in MIXED]
    return tasks, [s for t in tasks for s in t.samples(tok)]


def build(tasks, tok, **overrides) -> GeneralistModel:
    """A debug-flavour model for ``tasks`` (``flavour_with`` overrides), seeded."""
    torch.manual_seed(0)
    return GeneralistModel.build(flavour_with("debug", **overrides), tasks, tok)


def build_attribute(tasks, tok, **overrides) -> GeneralistModel:
    """``build`` with attribute routing unless ``router`` is given."""
    from moe_gen.config import RouterConfig

    overrides.setdefault("router", RouterConfig(strategy="attribute"))
    return build(tasks, tok, **overrides)


def quiet(**kwargs) -> TrainConfig:
    """A ``TrainConfig`` without a progress bar or TensorBoard (``kwargs`` as given)."""
    kwargs.setdefault("progress", False)
    kwargs.setdefault("tensorboard", False)
    return TrainConfig(**kwargs)


def end_first_while_second_runs(block, inside_second):
    """Enters ``block()`` here and ``block()`` again in another thread, ends the first while the second
    still runs, then calls ``inside_second()`` in the second; returns what it returned (blocks that
    may overlap must leave the second one's state alone)."""
    first = block()
    first.__enter__()
    entered, leave, seen = threading.Event(), threading.Event(), []

    def second():
        with block():
            entered.set()
            leave.wait(10)
            seen.append(inside_second())

    thread = threading.Thread(target=second)
    thread.start()
    assert entered.wait(10)
    first.__exit__(None, None, None)
    leave.set()
    thread.join()
    assert len(seen) == 1, "the second block did not finish"
    return seen[0]


def train_steps(model, task, tok, steps: int = 30, rows: int = 4, lr: float = 3e-3) -> None:
    """``steps`` AdamW steps of the generative objective on ``task``'s first ``rows`` rows (each
    step encodes them with its own seed, so augmentation differs)."""
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks import collate

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    objective = GenerativeObjective(model)
    for step in range(steps):
        batch = collate([task.encode(i, tok, seed=step) for i in range(rows)], tok, model.task_ids)
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def load_script(name: str, monkeypatch):
    """``scripts/<name>.py`` as a module, registered as ``name`` in ``sys.modules`` for the test."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def spoken_words_and_a_new_speaking_task(tok):
    """(spoken_word_classification's first 4 rows, a seeded debug model built for them, a new task
    that says those rows' words as audio through the model's input adapter, ``adaptor=audio_conv``:
    that adapter needs new frame and stop heads for it)."""
    from moe_gen.tasks import Task, load_preset

    old = load_preset("spoken_word_classification", "train", limit=4)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug"), [old], tok)
    new = Task("say_word", "[TEXT:text] say it -> [AUDIO:audio,adaptor=audio_conv]",
               [{"text": r["text"], "audio": r["audio"]} for r in old.data[:4]])
    return old, model, new


def mount_command(directory: str, size: str) -> list[str] | None:
    """A command prefix running its argument in a private mount namespace with a tmpfs of ``size`` on
    ``directory``, or None when this machine does not allow it."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {directory}"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def wordlevel_tokenizers(size: int = 64):
    """A whitespace WordLevel tokenizer of ``size`` ids (``[PAD] [UNK] [CLS] [SEP] w4 …``) for tiny
    random checkpoints: (transformers' ``PreTrainedTokenizerFast``, to save into a checkpoint folder;
    moe_gen's ``HFTokenizer`` of it, few added tokens)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moe_gen.tasks import HFTokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i for i in range(4, size)}}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                 cls_token="[CLS]", sep_token="[SEP]")
    return hf, HFTokenizer.from_pretrained(backend, num_bins=4, num_sentinels=2, extra_symbols=())
