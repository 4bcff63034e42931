"""Checkpoints that never lose finished work and resume exactly.

Layout of ``<output_dir>/checkpoints``::

    step-0000200/
        model-dense.safetensors, model-experts-*.safetensors   weights (expert shards per rank)
        average-dense.safetensors, average-experts-*            the weight average (``ema_decay``), if kept
        optimizer-*.safetensors                                 AdamW moments by parameter name
        optimizer.json                                          param-group hyper-parameters
        rank-00000.json                                         sampler cursors, RNG states of a rank
        trainer.json                                            step, scheduler, counters, config,
                                                                the tokenizer's fingerprint
    latest                                                      name of the newest complete one

A checkpoint is written into ``step-N.partial`` and renamed when every file is in place; ``latest``
is replaced atomically after that. A failed write (on any process) removes what it wrote, leaves
the previous checkpoint as it was and raises ``CheckpointError`` on every process; what a run does
then is the trainer's policy (``Trainer.save_checkpoint``). Only safetensors and JSON are read
back: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch

from moe_gen import distributed
from moe_gen.durable import atomic_open, fsync_dir
from moe_gen.fsdp import full_tensors, like_model, shard_like

logger = logging.getLogger("moe_gen")

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "read_json_object", "read_trainer_state",
           "rank_state_file", "write_json_atomic", "CheckpointError"]

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint was not written (or, from the trainer, the run stops because checkpoints are not
    being written); the message says why and what is saved."""


def write_json_atomic(path: str, data: Any) -> None:
    """Writes JSON to a temporary file beside ``path``, then renames it over ``path``
    (``durable.atomic_open``)."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=1)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint directory under ``root`` (None if there is none): the one
    ``latest`` names, or without that file (a run stopped between a checkpoint's rename and the
    pointer's write, folders copied without it) the highest ``step-N`` holding ``trainer.json``. The
    folder ``latest`` names, if a process killed while saving its step again left it as
    ``<name>.old``, is renamed back first (with a warning)."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        complete = sorted((name for name in (os.listdir(root) if os.path.isdir(root) else ())
                           if _is_checkpoint_name(name) and os.path.isfile(os.path.join(root, name, "trainer.json"))),
                          key=lambda name: int(name[5:]))
        if not complete:
            return None
        logger.warning("%s has no %r file; taking the highest complete checkpoint, %s", root, LATEST, complete[-1])
        return os.path.join(root, complete[-1])
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "trainer.json")):
        _restore_earlier_copy(path)
    if not os.path.isfile(os.path.join(path, "trainer.json")):
        raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint (no trainer.json)")
    return path


def _restore_earlier_copy(path: str) -> None:
    """Renames ``<path>.old`` back to ``path`` when it is complete: a process killed while saving the
    same step again (``_publish``) left the earlier copy there, and ``latest`` still names ``path``.
    Several processes may try at once: the first renames, the others find ``path`` in place."""
    old = path + ".old"
    if os.path.exists(path) or not os.path.isfile(os.path.join(old, "trainer.json")):
        return
    try:
        os.replace(old, path)
        fsync_dir(os.path.dirname(path))
    except OSError:
        return  # another process renamed it first (the caller checks ``path`` again)
    logger.warning("%s was missing (a process stopped while saving that step again): its complete earlier copy, "
                   "%s, is renamed back", path, os.path.basename(old))


def read_trainer_state(path: str) -> dict:
    """A checkpoint's ``trainer.json`` (step, tasks, scheduler, counters, config), read without
    touching its weights: what a resume checks before it changes anything."""
    return read_json_object(os.path.join(path, "trainer.json"), ("step", "scheduler"))


def read_json_object(path: str, keys=(), what: str = "checkpoint file") -> dict:
    """The JSON object in ``path``, which must hold ``keys``; ``ValueError`` naming the file (and
    ``what`` it should be) when it cannot be read, is not JSON or lacks them (torn or edited)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{path}: not a readable {what} (no {', '.join(missing)})")
    return data


def rank_state_file(path: str, rank: int) -> str:
    """The file of process ``rank``'s sampler and RNG state in checkpoint ``path``; ``ValueError``
    when the checkpoint was written by fewer processes."""
    file = os.path.join(path, f"rank-{rank:05d}.json")
    if not os.path.exists(file):
        raise ValueError(f"checkpoint {path} has no state for process {rank} (it was written by fewer processes); "
                         "resume with the same number of processes, or load only the weights")
    return file


def _read_shards(path: str, prefix: str, target) -> dict:
    """``distributed.load_shards`` with a torn or foreign file reported as ``ValueError`` naming it."""
    try:
        return distributed.load_shards(path, prefix, target)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a torn file
        raise ValueError(f"checkpoint {path}: cannot read its {prefix} files ({type(exc).__name__}: {exc})") from None


def _optimizer_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state keyed ``"<parameter name>::<key>"`` (so expert moments shard like the experts)
    and the JSON-able rest (param-group hyper-parameters, scalar state)."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in full_tensors(entry).items():  # FSDP moments gathered (same order everywhere)
            if torch.is_tensor(value):
                tensors[f"{order[index]}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{order[index]}::{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "group_params": [[names[id(p)] for p in g["params"]]
                                                              for g in optimizer.param_groups], "scalars": scalars}


def _load_optimizer(model, optimizer, tensors: dict, meta: dict, rescaled: bool = False) -> None:
    """Loads the saved AdamW moments and hyper-parameters into ``optimizer``. ``rescaled``: this run
    has the checkpoint's ``lr_scales`` prefixes with other values, so its groups may split, merge or
    reorder; the moments then load by parameter name (each parameter trains at its new multiplier)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    # frozen image tokenizers sat in the optimizer (without state) before 2026-12-05: not a difference
    saved = [[n for n in group if not n.startswith("image_tokenizers.")] for group in meta["group_params"]]
    regrouped = current != saved
    if regrouped:
        _check_regrouping(current, saved, optimizer.param_groups, meta["param_groups"], rescaled)
    order = [n for group in current for n in group]
    state: dict[int, dict] = {}
    for index, name in enumerate(order):
        # moments of FSDP-sharded parameters are sharded like them again
        entry = {key.split("::", 1)[1]: shard_like(params[name], value) for key, value in tensors.items()
                 if key.split("::", 1)[0] == name}
        entry.update({key.split("::", 1)[1]: value for key, value in meta["scalars"].items()
                      if key.split("::", 1)[0] == name})
        if entry:
            state[index] = entry
    saved_group = {n: hyper for group, hyper in zip(saved, meta["param_groups"]) for n in group}
    groups, changed = [], set()
    for group, names_in_group in zip(optimizer.param_groups, current):
        # the saved hyper-parameters of the group that held this group's first parameter (its own,
        # unless regrouped); the update's implementation (fused kernel or not) and AdamW's settings as
        # this run has them, like its learning rates (``_load_schedule``)
        hyper = saved_group[names_in_group[0]]
        kept = {key: group[key] for key in ("fused", "foreach") + RUN_SETTINGS if key in group}
        changed.update(f"{key} {hyper[key]} → {group[key]}" for key in RUN_SETTINGS
                       if key in hyper and key in group and _plain(hyper[key]) != _plain(group[key])
                       and not (regrouped and key == "weight_decay"))
        groups.append({**hyper, **kept, "params": [order.index(names[id(p)]) for p in group["params"]]})
    if changed:
        logger.warning("the checkpoint's AdamW settings differ from this run's (%s): training continues with "
                       "this run's", ", ".join(sorted(changed)))
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _check_regrouping(current: list, saved: list, groups: list, saved_groups: list, rescaled: bool) -> None:
    """Accepts the same parameters grouped otherwise by other ``lr_scales`` values (``rescaled``) or
    by the older weight-decay rule (the same groups at the same multipliers); refuses the rest."""
    if sorted(n for g in current for n in g) != sorted(n for g in saved for n in g):
        raise ValueError("the checkpoint's optimizer trains a different set of parameters than this run "
                         "(did `trainable` or the model change?); resume with the same settings")
    if rescaled:
        logger.warning("this run's `lr_scales` values group the parameters otherwise than the checkpoint's; its "
                       "AdamW moments are loaded by parameter name and each parameter trains at its new multiplier")
        return
    if len(current) != len(saved):
        raise ValueError(f"the checkpoint's optimizer has {len(saved)} parameter groups and this run "
                         f"{len(current)} (did `lr_scales` change?); resume with the same settings")
    _check_same_scales(current, saved, groups, saved_groups)
    # the same parameters grouped otherwise (weight decay left expert bias stacks and adapters'
    # embedding tables before 2026-12-05): moments load by name, each group's decay is this run's
    logger.warning("the checkpoint groups the same parameters otherwise (an older weight-decay rule); its AdamW "
                   "moments are loaded by parameter name and this run's weight decay per group applies")


def _check_same_scales(current: list, saved: list, groups: list, saved_groups: list) -> None:
    """Refuses a regrouping that moves a parameter to another learning-rate multiplier (new
    ``lr_scales`` prefixes giving as many groups: taken for an older weight-decay rule, the encoder
    trained at another rate with only that warning)."""
    def scales(names, hypers):
        rates = [float(h.get("initial_lr", h["lr"])) for h in hypers]
        top = max(rates) or 1.0
        return {n: rate / top for group, rate in zip(names, rates) for n in group}

    before, now = scales(saved, saved_groups), scales(current, groups)
    moved = [n for n in now if abs(now[n] - before.get(n, now[n])) > 1e-9 * max(1.0, now[n])]
    if moved:
        raise ValueError(f"the checkpoint trained {moved[0]!r} (and {len(moved) - 1} more) at ×{before[moved[0]]:g} "
                         f"of the learning rate, this run at ×{now[moved[0]]:g} (did `lr_scales` change?); resume "
                         "with the same settings")


# AdamW settings a resumed run takes from its own config (a warning names those that differ)
RUN_SETTINGS = ("weight_decay", "betas", "eps")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _load_schedule(optimizer, scheduler, saved: dict) -> None:
    """Continues at the checkpoint's step on this run's schedule and learning rates (the config's
    ``steps``, ``warmup_steps``, ``min_lr_ratio``, ``lr`` and the values of ``lr_scales``, which may
    regroup the parameters; new ``lr_scales`` prefixes are refused by ``_load_optimizer``): a run
    resumed with more ``steps`` decays over the longer run instead of staying at the floor its
    first length reached. With the same settings the rates are the saved ones, bit for bit."""
    current = scheduler.state_dict()
    if saved.get("lr_lambdas") != current["lr_lambdas"] or saved.get("base_lrs") != current["base_lrs"]:
        logger.warning("the checkpoint's learning-rate schedule differs from this run's (%s, base rates %s; now "
                       "%s, %s): training continues at step %d on this run's", saved.get("lr_lambdas"),
                       saved.get("base_lrs"), current["lr_lambdas"], current["base_lrs"], saved["last_epoch"])
    rates = [base * factor(saved["last_epoch"]) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**saved, "lr_lambdas": current["lr_lambdas"], "base_lrs": current["base_lrs"],
                               "_last_lr": rates})  # one rate per group of this run (lr_scales may regroup)
    for group, base, rate in zip(optimizer.param_groups, scheduler.base_lrs, rates):
        group["initial_lr"], group["lr"] = base, rate


def _rng_state() -> dict:
    python = random.getstate()
    numpy_state = np.random.get_state()
    return {
        "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "torch": torch.get_rng_state().tolist(),
        "python": [python[0], list(python[1]), python[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        # one state per GPU the saving process saw; this one may see fewer (another machine, fewer
        # visible devices), and torch.cuda.set_rng_state_all indexes past them (IndexError)
        count = torch.cuda.device_count()
        if len(state["cuda"]) > count:
            logger.warning("the checkpoint holds the CUDA random states of %d devices and this process sees %d: "
                           "those of the first %d are restored", len(state["cuda"]), count, count)
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"][:count]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(root: str, step: int, *, model, optimizer, scheduler, sampler, trainer_state: dict,
                    plan=None, keep: int = 2, average=None) -> str:
    """Writes checkpoint ``step`` atomically and returns its path. Every process must call it.
    ``average``: the run's ``AveragedModel`` of the weights, if it keeps one.

    Raises:
        CheckpointError: on every process when writing failed on any; what was written is removed,
            and the previous checkpoint and ``latest`` are as they were.
    """
    rank = distributed.world_info().rank
    name = f"step-{step:07d}"
    final, partial = os.path.join(root, name), os.path.join(root, name + ".partial")
    error = None
    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
    except OSError as exc:
        error = exc
    distributed.barrier()
    error = _gather_and_write(partial, model, optimizer, average, plan if plan is not None else model, sampler,
                              error)
    if average is not None:
        trainer_state = {**trainer_state, "averaged_steps": int(average.n_averaged)}
    if not distributed.any_true(error is not None) and rank == 0:
        try:
            write_json_atomic(os.path.join(partial, "trainer.json"),
                              {**trainer_state, "step": step, "scheduler": scheduler.state_dict()})
            _publish(root, name)
        except Exception as exc:  # noqa: BLE001 - as above (a value JSON cannot write raised TypeError)
            error = exc
    if distributed.any_true(error is not None):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"the checkpoint of step {step} was not written "
                              f"({error or 'it failed on another process'})")
    if rank == 0:
        # by step number (as text, step-10000000 sorted before step-9999500 and was removed as the oldest);
        # only those up to this one: a later step's folder is left by a run stopped after renaming it but
        # before pointing ``latest`` at it, and this run (resumed before it) replaces it when it gets there.
        # Counted in, it was kept as the newest and the checkpoint just written was removed, with
        # ``latest`` naming it (before the twenty-sixth session's audit)
        done = sorted((d for d in os.listdir(root) if _is_checkpoint_name(d) and int(d[5:]) <= step),
                      key=lambda d: int(d[5:]))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
            shutil.rmtree(os.path.join(root, old + ".old"), ignore_errors=True)
    distributed.barrier()
    return final


def _gather_and_write(partial: str, model, optimizer, average, layout, sampler,
                      error: Optional[BaseException]) -> Optional[BaseException]:
    """Gathers each part of a checkpoint (``model``, ``optimizer``, ``average`` when kept: whole and
    on the CPU) and writes this process's shards of it into ``partial`` (``layout``: the plan or the
    model; the average is a whole model on every process), then the optimizer's hyper-parameters
    (rank 0) and this process's sampler and RNG state; returns the first error, ``error`` if given.
    FSDP's gathers are collectives: every process runs every one of them, in the same order, even
    after a write failed on it (one that skipped them left the others waiting until the process
    group's timeout, before the fourteenth audit), and stops writing instead. One part is held whole
    at a time."""
    rank = distributed.world_info().rank
    gathers = [("model", lambda: (_cpu(full_tensors(model.state_dict())), None)),
               ("optimizer", lambda: _optimizer_tensors(model, optimizer))]
    if average is not None:
        gathers.append(("average", lambda: (_cpu(full_tensors(average.module.state_dict())), None)))
    meta = None
    for prefix, gather in gathers:
        tensors, extra = gather()
        meta = extra if extra is not None else meta
        if error is None:
            try:
                distributed.save_shards(partial, prefix, tensors, model if prefix == "average" else layout)
            except Exception as exc:  # noqa: BLE001 - any failure must leave the old checkpoint usable
                error = exc
        del tensors
    if error is None:
        try:
            if rank == 0:
                write_json_atomic(os.path.join(partial, "optimizer.json"), meta)
            write_json_atomic(os.path.join(partial, f"rank-{rank:05d}.json"),
                              {"sampler": sampler.state_dict(), "rng": _rng_state()})
        except Exception as exc:  # noqa: BLE001 - as above
            error = exc
    return error


def _cpu(tensors: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _publish(root: str, name: str) -> None:
    """Renames ``<name>.partial`` to ``<name>`` and points ``latest`` at it. On failure everything is as
    it was (``latest`` names the previous checkpoint, which is intact) and the error is raised."""
    final, partial = os.path.join(root, name), os.path.join(root, name + ".partial")
    pointer, tmp = os.path.join(root, LATEST), os.path.join(root, f"{LATEST}.tmp-{os.getpid()}")
    # The same step again (a model assembled after the last checkpoint): keep the old copy until the new is in
    # (killed between the two renames, ``latest`` names a missing folder: ``latest_checkpoint`` renames it back)
    old = final + ".old" if os.path.exists(final) else None
    shutil.rmtree(final + ".old", ignore_errors=True)  # a stale copy of an earlier kill, if any
    if old is not None:
        os.replace(final, old)
    try:
        fsync_dir(partial)  # its files' names, then its own, on disk before latest names it
        os.replace(partial, final)
        fsync_dir(root)
        with open(tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, pointer)
        fsync_dir(root)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if os.path.exists(final) and not os.path.exists(partial):
            shutil.rmtree(final, ignore_errors=True)
        if old is not None:
            os.replace(old, final)
        raise
    shutil.rmtree(final + ".old", ignore_errors=True)


def _check_fits(model, weights: dict, path: str) -> None:
    """Raises ``ValueError`` unless ``weights`` have exactly the model's keys, each of its shape
    (checked before anything loads)."""
    current = model.state_dict()
    missing = [k for k in current if k not in weights]
    unexpected = [k for k in weights if k not in current]
    if missing or unexpected:
        hint = ("; a run started before location features were in the flavours resumes with "
                "--model.location_frequencies 0" if "location_embedding.weight" in missing else "")
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}{hint}")
    shapes = [f"{k}: {tuple(weights[k].shape)} against {tuple(v.shape)}" for k, v in current.items()
              if tuple(weights[k].shape) != tuple(v.shape)]
    if shapes:
        raise ValueError(f"checkpoint {path} does not fit this model: tensors of another shape "
                         f"({'; '.join(shapes[:3])})")


def _is_checkpoint_name(name: str) -> bool:
    return name.startswith("step-") and name[5:].isdigit()


def load_checkpoint(path: str, *, model, optimizer, scheduler, sampler, plan=None, average=None,
                    lr_scales: Optional[dict] = None) -> dict:
    """Restores weights, optimizer, scheduler, sampler cursors and RNG states (and the weight
    ``average``, when given and kept; from a checkpoint without one it starts again from the
    resumed weights); returns the trainer state dict (with ``step``, the last completed step).
    ``lr_scales``: this run's ``TrainConfig.lr_scales``; with the checkpoint's prefixes and other
    values, AdamW's groups may split, merge or reorder (the moments load by parameter name)."""
    rank = distributed.world_info().rank
    trainer_state = read_trainer_state(path)
    weights = like_model(model, _read_shards(path, "model", plan if plan is not None else model))
    _check_fits(model, weights, path)
    # what may still be refused (the optimizer's groups, the sampler's data) before the caller's model
    # changes: a refused resume left the checkpoint's weights in it before the fourteenth session
    meta = read_json_object(os.path.join(path, "optimizer.json"), ("group_params", "param_groups", "scalars"))
    saved_scales = (trainer_state.get("config") or {}).get("lr_scales")
    rescaled = (lr_scales is not None and isinstance(saved_scales, dict) and saved_scales.keys() == lr_scales.keys()
                and saved_scales != lr_scales)
    _load_optimizer(model, optimizer, _read_shards(path, "optimizer", plan if plan is not None else model), meta,
                    rescaled)
    _load_schedule(optimizer, scheduler, trainer_state["scheduler"])
    rank_state = read_json_object(rank_state_file(path, rank), ("sampler", "rng"))
    sampler.load_state_dict(rank_state["sampler"])
    model.load_state_dict(weights)
    _set_rng_state(rank_state["rng"])
    if average is not None and "averaged_steps" in trainer_state:
        average.module.load_state_dict(_read_shards(path, "average", model))
        average.n_averaged.fill_(int(trainer_state["averaged_steps"]))
    return trainer_state
