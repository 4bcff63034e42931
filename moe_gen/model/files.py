"""A model's files: what ``GeneralistModel.save_pretrained`` writes and ``from_pretrained`` reads.

``config.json`` (the ``ModelConfig``), ``model.safetensors`` (the weights: no pickles) and the
tokenizer's files. Saving is atomic where it can be; loading names the file at fault.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import warnings

import torch

from moe_gen.durable import fsync_dir, fsync_file, shareable
from moe_gen.model.config import ModelConfig
from moe_gen.tasks.tokenizer import Tokenizer

__all__ = ["MODEL_FILES", "load_model", "save_model"]

# Every file save_pretrained may write: configuration, weights and the tokenizer's files (``Tokenizer``:
# tokenizer.model + tokenizer.json; ``HFTokenizer``: tokenizer.json + moe_gen_tokenizer.json).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "moe_gen_tokenizer.json")


def save_model(model, directory: str) -> None:
    """``GeneralistModel.save_pretrained``: writes ``config.json``, ``model.safetensors`` and the
    files the tokenizer saves.

    Atomic where it can be: the files are written (and synced) into ``<directory>.tmp-<pid>``,
    which then replaces ``directory`` whole, so a failed save (full disk, Ctrl-C) leaves
    ``directory`` as it was and raises. A ``directory`` holding other files too keeps them; there
    (and where ``directory`` is or holds the working directory, which a whole-folder swap would
    leave deleted, or is a mount point, which cannot be renamed) the model's files are replaced
    one by one: the old weights are removed first and the new ones put in last, so a save stopped
    in between leaves a folder that is refused when loaded (no weights) rather than one that mixes
    two models; the files of a tokenizer of another kind saved there before are removed
    (``MODEL_FILES``). A symbolic link is followed: the folder it points to receives the model.
    Weight files get the permissions the umask gives other files."""
    _check_whole(model)
    directory = _model_dir(directory, "save_pretrained")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_pretrained: {directory} is a file, not a folder to write the model into")
    directory = os.path.realpath(directory)
    in_place = os.path.ismount(directory)  # (a mount point cannot be renamed, nor written across)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}") if in_place else f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = _write_files(model, tmp)
        if not os.path.exists(directory):
            os.replace(tmp, directory)
        elif (not in_place and set(os.listdir(directory)) <= {*MODEL_FILES, *written}
              and not _holds_cwd(directory)):
            _swap_folders(directory, tmp)
        else:
            _replace_files(directory, tmp, written)
        fsync_dir(os.path.dirname(directory))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_files(model, tmp: str) -> list[str]:
    """Writes the model's files into the new folder ``tmp`` and flushes them to disk; returns their
    names, the weights last."""
    from safetensors.torch import save_file

    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    others = ["config.json", *model.tokenizer.save(tmp)]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = os.path.join(tmp, "model.safetensors")
    save_file(state, weights)
    shareable(weights)  # (safetensors creates it owner-only: others could read the config but not load the model)
    written = [*others, "model.safetensors"]
    for name in written:  # on disk before any rename makes them the model
        fsync_file(os.path.join(tmp, name))
    return written


def _swap_folders(directory: str, tmp: str) -> None:
    """Replaces the folder ``directory`` by ``tmp`` with two renames. Stopped between them, it puts
    the earlier folder back (killed there, ``load_model`` does)."""
    old = f"{directory}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        if not os.path.exists(directory):
            os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _replace_files(directory: str, tmp: str, written: list[str]) -> None:
    """Moves the files of ``tmp`` into ``directory`` one at a time (each rename atomic), removes
    model files no longer written, then ``tmp``. The old weights go first and the new ones (last in
    ``written``) come last: until the save is complete the folder holds no weights to load."""
    if os.path.exists(weights := os.path.join(directory, "model.safetensors")):
        os.remove(weights)
    for name in written:
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    for name in set(MODEL_FILES) - set(written):
        if os.path.exists(stale := os.path.join(directory, name)):
            os.remove(stale)
    os.rmdir(tmp)


def _recover_swap(directory: str) -> None:
    """Renames a complete ``<directory>.old-<pid>`` back to ``directory`` when ``directory`` is
    missing: a save killed between its two renames (``_swap_folders``) left the earlier model
    there."""
    if os.path.exists(directory):
        return
    olds = sorted(glob.glob(glob.escape(directory) + ".old-*"), key=os.path.getmtime)
    complete = [old for old in olds if os.path.isfile(os.path.join(old, "model.safetensors"))]
    if not complete:
        return
    os.replace(complete[-1], directory)
    warnings.warn(f"{directory} was missing (a save stopped between its renames): its earlier copy, "
                  f"{os.path.basename(complete[-1])}, is renamed back", UserWarning, stacklevel=3)


def _check_whole(model) -> None:
    """Raises unless this process holds every weight of ``model``: with experts spread over processes
    (``shard_experts``) or parameters sharded by FSDP its ``state_dict`` holds one process's slices,
    written under a config naming every expert (a folder that failed only when loaded)."""
    from torch.distributed.tensor import DTensor

    split = sorted({name for name, m in model.named_modules() if getattr(m, "expert_parallel", None) is not None})
    if split:
        raise ValueError(f"the model's experts are spread over processes (shard_experts; layers {', '.join(split[:3])}"
                         f"{', ...' if len(split) > 3 else ''}): this process holds some of them only; save with "
                         "Trainer.save_model, or moe_gen.distributed.save_shards and load_shards into an unsharded "
                         "model, then save_pretrained")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("the model's parameters are FSDP shards: this process holds a part of each; save with "
                         "Trainer.save_model, or save_pretrained an unsharded copy (moe_gen.fsdp.unsharded_copy, on "
                         "every process)")


def _model_dir(directory, caller: str) -> str:
    """``directory`` as a path, or a ``ValueError`` naming ``caller`` (None or a number raised a bare
    TypeError from ``os`` before the twenty-sixth session's audit)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"{caller} takes a folder's path, got {type(directory).__name__}")
    return os.fspath(directory)


def load_model(cls, directory: str):
    """``GeneralistModel.from_pretrained``: builds ``cls`` from a model written by
    ``save_pretrained`` (safetensors: no pickles). Raises ``ValueError`` naming the file that is
    missing, unreadable or does not fit."""
    from safetensors.torch import load_file

    directory = _model_dir(directory, "from_pretrained")
    _recover_swap(os.path.realpath(directory))
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a model directory (save_pretrained writes one)")
    config_path = os.path.join(directory, "config.json")
    weights_path = os.path.join(directory, "model.safetensors")
    try:
        with open(config_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:  # missing, unreadable, not JSON, not UTF-8
        inner = os.path.join(directory, "model")
        hint = (f"; {directory} looks like a run directory: its model is {inner}"
                if os.path.isfile(os.path.join(inner, "config.json")) else "")
        raise ValueError(f"{config_path}: cannot read the model configuration ({exc}){hint}") from None
    try:
        config = ModelConfig.from_dict(data)
    except (ValueError, TypeError, ArithmeticError) as exc:
        if isinstance(data, dict) and "model_type" in data:  # (a transformers checkpoint)
            raise ValueError(f"{directory} is a transformers checkpoint ({data['model_type']}): load it with "
                             "moe_gen.pretrained.from_hf (model.init: hf:PATH on the command line)") from None
        raise ValueError(f"{config_path}: not a valid model configuration ({exc})") from None
    try:
        tokenizer = Tokenizer.load(directory)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{directory}: cannot load the tokenizer: "
                         f"{type(exc).__name__}: {exc}") from None
    config = _runnable_backend(config, config_path)
    try:
        model = cls(config, tokenizer)
    except (ValueError, TypeError, ArithmeticError, RuntimeError) as exc:
        raise ValueError(f"{config_path}: the model it describes cannot be built ({exc})") from None
    try:
        weights = load_file(weights_path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a torn file
        raise ValueError(f"{weights_path}: cannot read the weights ({type(exc).__name__}: {exc})") from None
    _as_saved(model, weights)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"{weights_path} does not fit the model of {config_path}: {exc}") from None
    return model


def _as_saved(model, weights: dict) -> None:
    """``model`` in the dtypes its weights were saved in: a bf16 (fp64) model comes back as saved,
    not upcast (rounded) to fp32, and a mixed one (bf16 with fp32 routers) as well: the model in
    the dtype most of its weights have, then each parameter saved otherwise in its own."""
    sizes: dict = {}
    for name, param in model.named_parameters():
        # (image tokenizers stay fp32 by design, ImageVQ._apply: they do not say the model's dtype)
        if name in weights and weights[name].is_floating_point() and not name.startswith("image_tokenizers."):
            sizes[weights[name].dtype] = sizes.get(weights[name].dtype, 0) + param.numel()
    if sizes and (dtype := max(sizes, key=sizes.get)) != torch.float32:
        model.to(dtype)
    for name, param in model.named_parameters():
        if name in weights and weights[name].is_floating_point() and weights[name].dtype != param.dtype:
            param.data = param.data.to(weights[name].dtype)


def _holds_cwd(directory: str) -> bool:
    """Whether the process's working directory is ``directory`` or inside it."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except FileNotFoundError:
        return False
    directory = os.path.realpath(directory)
    return cwd == directory or cwd.startswith(directory.rstrip(os.sep) + os.sep)


def _runnable_backend(config: ModelConfig, config_path: str) -> ModelConfig:
    """``config`` with its saved dispatch backend, or ``auto`` (with a warning) when that backend
    cannot run here (a model saved with ``triton`` read on a machine without CUDA): every backend
    computes the same function, so the weights load either way. An unknown name stays, refused
    when the model is built."""
    from moe_gen.experts.dispatch import BACKENDS, make_backend

    name = config.moe.backend
    if name in ("auto", "merged") or name not in BACKENDS:
        return config
    try:
        make_backend(name)
    except ValueError as exc:
        warnings.warn(f"{config_path}: saved with dispatch backend {name!r}, which cannot run here ({exc}); "
                      "loading with 'auto'", UserWarning, stacklevel=3)
        return config.with_moe(backend="auto")
    return config
