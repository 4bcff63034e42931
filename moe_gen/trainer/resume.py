"""Whether a checkpoint continues *this* run: its saved training and model configurations against
the run's own (``trainer.json`` holds both).

A resumed run that draws other batches than the run it continues (another seed, batch size,
mixing...) or trains another model (other routing, width, tasks' statistics) would be a new run
that says it is the old one: refused. Settings a user changes on purpose when extending a run
(steps, learning rates, logging, checkpoint cadence, threads, device, layout across processes)
pass, as do those the optimizer and schedule loads check and warn about themselves; any other
change is named in a warning.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional

from moe_gen.tasks.modalities.base import brief

__all__ = ["check_resumable", "check_same_training", "check_same_model", "check_same_tokenizer", "check_same_teachers"]

logger = logging.getLogger("moe_gen")

# TrainConfig fields that decide which rows each step draws.
FIXED = ("seed", "batch_size", "accumulate", "mixing", "temperature", "batch_tasks", "task_weights",
         "modality_budget", "max_tokens")
# Fields a run may change when it resumes without a word here: bookkeeping, placement and speed;
# the schedule and AdamW settings (the loads warn of them); trainable parameters, lr_scales and
# layouts across processes (the loads refuse what they cannot continue).
FREE = ("steps", "lr", "warmup_steps", "min_lr_ratio", "lr_scales", "weight_decay", "betas", "eps",
        "checkpoint_every", "keep_checkpoints", "max_failed_checkpoints", "log_every", "progress", "tensorboard",
        "eval_limit", "eval_batch_size", "eval_every", "patience", "num_threads", "device",
        "activation_checkpointing", "fsdp_unit", "expert_parallel", "sharding", "shard_size", "trainable",
        "max_bad_steps")
# ModelConfig fields (dotted) that change how the model is run, not what it is.
MODEL_FREE = ("moe.backend",)
MODEL_WARNED = ("dropout", "label_smoothing")


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples as lists, as trainer.json holds them


# ModelConfig's nested configurations (typed sections, whose fields are compared one by one; other
# mappings, such as loss_weights or adapters, are values compared whole)
SECTIONS = ("moe", "moe.router", "moe.experts")


def _flat(config: Mapping, sections: tuple = (), prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and f"{prefix}{key}" in sections:
            out.update(_flat(value, sections, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _described(changed: dict, keys) -> str:
    return ", ".join(f"{k} {brief(changed[k][0])} → {brief(changed[k][1])}" for k in keys)


def _changes(saved: Mapping, current: Mapping, sections: tuple = ()) -> dict:
    """Settings both configurations hold whose values differ: a field one of them lacks (added to
    the package after the checkpoint was written, or since removed) is no change."""
    saved, current = _flat(_json(saved), sections), _flat(_json(current), sections)
    return {k: (saved[k], current[k]) for k in sorted(set(saved) & set(current)) if saved[k] != current[k]}


def check_resumable(path: str, state: Mapping, *, tasks: list, config: Mapping, tokenizer: str,
                    teachers: Mapping) -> None:
    """Raises unless the checkpoint at ``path``, whose trainer state is ``state``, can continue a
    run of ``tasks`` (names, in order) with ``config`` (``TrainConfig.to_dict()``), the tokenizer
    of fingerprint ``tokenizer`` and the teachers of ``teachers`` (``teacher_fingerprints``): the
    same tasks, draws, vocabulary and teachers, and a step within ``steps``."""
    saved_tasks, step = state.get("tasks"), int(state["step"])
    if saved_tasks is not None and saved_tasks != tasks:
        raise ValueError(f"checkpoint {path} was trained on tasks {saved_tasks}; this run has {tasks}")
    if state.get("config") is not None:
        check_same_training(path, state["config"], config)
    check_same_tokenizer(path, state.get("tokenizer"), tokenizer)
    check_same_teachers(path, state.get("teachers"), teachers, state.get("config") or {}, config)
    if step > config["steps"]:
        raise ValueError(f"checkpoint {path} is at step {step}, past this run's steps = {config['steps']}; "
                         "set steps (--train.steps) to at least that to train further, or start over "
                         "(overwrite=True, --overwrite)")


def check_same_training(path: str, saved: Mapping, current: Mapping) -> None:
    """Raises if the checkpoint at ``path`` was trained with other ``FIXED`` settings than
    ``current`` (``TrainConfig.to_dict()``); warns of other changes outside ``FREE``."""
    changed = _changes(saved, current)
    fixed = [k for k in changed if k in FIXED]
    if fixed:
        raise ValueError(f"checkpoint {path} was trained with other settings than this run "
                         f"({_described(changed, fixed)}): the "
                         "resumed run would draw other batches than the run it continues; resume with the same "
                         "settings, or start over (overwrite=True, --overwrite)")
    warned = [k for k in changed if k not in FREE]
    if warned:
        logger.warning("resuming %s with settings that differ from its run's (%s): training continues with this "
                       "run's", path, _described(changed, warned))


def check_same_model(path: str, saved: Mapping, current: Mapping) -> None:
    """Raises if the checkpoint's model (``ModelConfig.to_dict()``, as saved) is another model than
    ``current``: other routing, sizes, tasks or the statistics its inputs are encoded with (a
    task's rows changed); warns of ``MODEL_WARNED`` changes; the dispatch backend may differ."""
    changed = {k: v for k, v in _changes(saved, current, SECTIONS).items() if k not in MODEL_FREE}
    refused = [k for k in changed if k not in MODEL_WARNED]
    if refused:
        shown = _described(changed, refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        flags = [f"--model.{k} {json.dumps(changed[k][0])}" for k in refused
                 if isinstance(changed[k][0], (int, float, str, bool))]
        how = f"the checkpoint resumes with {' '.join(flags)}" if len(flags) == len(refused) else \
            "resume with the model and data it was trained with"
        raise ValueError(f"checkpoint {path} trained another model than this run's ({shown}{more}): {how}, or "
                         "fine-tune from its saved model instead")
    if changed:
        logger.warning("resuming %s with %s: training continues with this run's", path, _described(changed, changed))


def check_same_tokenizer(path: str, saved: Optional[str], current: str) -> None:
    """Raises if the checkpoint at ``path`` was trained with another tokenizer than this run's
    (``saved`` and ``current``: their ``fingerprint()``): its embedding and output rows would be
    read under other texts' ids. A checkpoint written before the fourteenth audit records none, and
    resumes unchecked (as it did: then another vocabulary of the same size resumed silently)."""
    if saved is not None and saved != current:
        raise ValueError(f"checkpoint {path} was trained with another tokenizer than this run's (fingerprint "
                         f"{saved} → {current}): its token rows belong to other texts; resume with the tokenizer "
                         "the run was trained with (Tokenizer.default() is trained on this Python's pydoc "
                         "topics, which change between releases: resume under the same Python), or start over "
                         "(overwrite=True, --overwrite)")


def check_same_teachers(path: str, saved: Optional[Mapping], current: Mapping, saved_config: Mapping,
                        current_config: Mapping) -> None:
    """Raises if the checkpoint at ``path`` learned a task from another teacher than the one its
    ``distill_from`` folder holds now (``saved`` and ``current``: task → ``folder_fingerprint``; a
    folder rewritten since the run began), or if an annealed run resumes with other ``steps``
    (the teachers' weight falls over the steps: it would jump at the resumed step). A checkpoint
    written before teachers were recorded resumes unchecked."""
    changed = sorted(t for t in set(saved or {}) & set(current) if saved[t] != current[t])
    if changed:
        raise ValueError(f"checkpoint {path} learned {', '.join(map(repr, changed))} from other teachers than "
                         f"distill_from's folders hold now (their files changed since the run began): resume with "
                         "the teachers it began with, or start over (overwrite=True, --overwrite)")
    if saved_config.get("distill_anneal") and current_config.get("distill_anneal") and current_config.get(
            "distill_from") and saved_config.get("steps") != current_config.get("steps"):
        raise ValueError(f"checkpoint {path} anneals its teachers' weight to 0 over steps = "
                         f"{saved_config.get('steps')}; resumed with steps = {current_config.get('steps')} the weight "
                         "would jump back: resume with the same steps, or start over (overwrite=True, --overwrite)")
