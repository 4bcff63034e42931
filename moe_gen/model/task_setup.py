"""What a model derives from its tasks when it is built or given new ones: the adapters their
feature slots need (and their widths), the encoding statistics fitted on their rows, the prompt
words the ``instruction`` router reads, and checks on the tasks given; and how a saved model's
plan of a task reads slots as it was trained (``GeneralistModel.plan``).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any, Mapping, Optional, Sequence

from moe_gen.tasks.tokenizer import Tokenizer


def _task_words(names: Sequence[str], tasks: Sequence, known: Sequence[str],
                known_words: Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """The prompt words of each task name, by task id (the ``instruction`` router's input): from
    the given ``tasks``' instructions, else what the model knew for that name, else none."""
    given = {t.name: t.instruction.prompt_words() for t in tasks}
    before = {name: tuple(words) for name, words in zip(known, known_words)}
    return tuple(given.get(name, before.get(name, ())) for name in names)


def _refuse_widths(adaptor: str, first: tuple[str, Optional[str]], other: tuple[str, Optional[str]],
                   width: int, other_width: int) -> None:
    """Raises ``ValueError`` for two slots, ``(task, column)`` each, that feed ``adaptor`` features of two
    widths: of two tasks, naming both; of one task, naming it and both slots (before the fifteenth
    audit two MOTION inputs of one task built, and every step then failed in collate naming neither)."""

    def slot(column: Optional[str]) -> str:
        return f"column {column!r}" if column is not None else "a slot filled by position"

    if first[0] != other[0]:
        raise ValueError(f"tasks {first[0]!r} and {other[0]!r} feed the {adaptor!r} adapter features of width "
                         f"{width} and {other_width}: one adapter takes one width (give the slots the same "
                         "preprocessing options, or another adaptor=)")
    named = other[1] if other[1] is not None else "x"
    raise ValueError(f"task {first[0]!r}: its slots of {slot(first[1])} and {slot(other[1])} feed the {adaptor!r} "
                     f"adapter features of width {width} and {other_width}: one adapter takes one width. Give one "
                     f"slot an adapter of its own, e.g. ADAPTERS.register('{named}_{adaptor}')(ADAPTERS.get("
                     f"'{adaptor}')) and adaptor={named}_{adaptor} on that slot, or give both the same "
                     "preprocessing options")


def _task_features(tasks: Sequence, tokenizer: Tokenizer, adapters: dict, frame_adapters: list):
    """Adapter name → feature width for every feature slot of ``tasks`` (sized from each task's
    first rows that encode, one per template: ``Task.probe``), and the adapters whose rows are
    decoder targets."""
    fed_by: dict[str, tuple[str, Optional[str]]] = {}  # adapter → the first (task, column) of these that feeds it
    for task in tasks:
        for sample in task.probe(tokenizer):
            for chunk in sample.encoder + sample.decoder:
                if chunk.rows is not None:
                    width, fed = int(chunk.rows.shape[1]), (task.name, chunk.column)
                    if chunk.adaptor in fed_by and adapters[chunk.adaptor] != width:
                        _refuse_widths(chunk.adaptor, fed_by[chunk.adaptor], fed, adapters[chunk.adaptor], width)
                    fed_by.setdefault(chunk.adaptor, fed)
                    adapters[chunk.adaptor] = width
            for chunk in sample.decoder:
                if chunk.rows is not None and chunk.loss and chunk.adaptor not in frame_adapters:
                    frame_adapters.append(chunk.adaptor)
    return adapters, frame_adapters


def _fitted_statistics(tasks: Sequence, known: Mapping) -> dict:
    """``known`` plus each task's ``fit_statistics()`` (tasks whose slots learn nothing are left out)."""
    statistics = dict(known)
    for task in tasks:
        fitted = task.fit_statistics()
        if fitted:
            statistics[task.name] = fitted
    return statistics


def _build_inputs(config, tokenizer) -> None:
    """Refuses what ``GeneralistModel.build`` cannot build from, naming what it takes (a dict or no
    tokenizer raised an AttributeError from inside before the twenty-sixth session's audit)."""
    from moe_gen.model.config import ModelConfig

    if not isinstance(config, ModelConfig):
        raise ValueError(f"GeneralistModel.build takes a ModelConfig (flavour(...), ModelConfig.from_dict(...)), "
                         f"got {type(config).__name__}")
    if not all(hasattr(tokenizer, name) for name in ("vocab_size", "pad_id", "encode")):  # (an HFTokenizer too)
        raise ValueError(f"GeneralistModel.build takes a Tokenizer (Tokenizer.default()), got "
                         f"{type(tokenizer).__name__}")


def _distinct_tasks(tasks: Any, method: str) -> list:
    """``tasks`` as a list of ``Task`` objects (``task_list``: a ValueError naming ``method``
    otherwise), refusing two different task objects of one name: they would share a task id, and
    the last one's closed sets and fitted statistics would serve both (as ``Trainer`` refuses them)."""
    from moe_gen.tasks.task import task_list

    tasks = task_list(tasks, method)
    seen: dict = {}
    for task in tasks:
        first = seen.setdefault(task.name, task)
        if first is not task:
            raise ValueError(f"{method}: two different tasks are named {task.name!r} ({first!r} and {task!r}); "
                             "task names must be distinct")
    return tasks


def _with_saved_target_adapters(plan, adapters) -> Any:
    """``plan`` (a copy where it changes) with each decoder-side AUDIO/MOTION slot that names no
    ``adaptor=`` read by the modality's input adapter where the model has that one and not the
    target adapter: models saved before the fifteenth audit trained such targets through the input
    adapter (``ModalitySpec.target_adaptor`` is the default since), and load and answer as trained."""
    def as_trained(p):
        if ("adaptor" in p.slot.attrs or p.adaptor in adapters or p.adaptor != p.modality.target_adaptor
                or p.modality.adaptor not in adapters):
            return p
        return dataclasses.replace(p, adaptor=p.modality.adaptor)

    templates = [(encoder, [as_trained(p) for p in decoder]) for encoder, decoder in plan.templates]
    if all(new is old for (_, d), (_, n) in zip(plan.templates, templates) for old, new in zip(d, n)):
        return plan
    plan = copy.copy(plan)
    plan.templates = templates
    return plan


def row_indices(task_name: str, indices: Optional[Sequence], count: int) -> Sequence[int]:
    """``infer``'s ``indices`` as ints, one per row (default: the rows' positions). Numpy integers
    are whole numbers too (``np.arange`` raised a TypeError from the row's random seed before the
    twenty-seventh session's audit, and ``["a"]`` or ``[1.5]`` were taken as seeds)."""
    if indices is None:
        return range(count)
    try:
        if any(isinstance(i, bool) for i in indices):
            raise TypeError("a bool is no row number")
        out = [operator.index(i) for i in indices]
    except TypeError:
        raise ValueError(f"task {task_name!r}: infer's indices must be whole numbers, one per row (row "
                         f"numbers in the task's data), got {list(indices)[:5]!r}") from None
    if len(out) != count:
        raise ValueError(f"infer got {count} rows but {len(out)} indices")
    return out


def check_task_modalities(tasks: Sequence, modality_ids: Mapping[str, int]) -> None:
    """Raises ``ValueError`` naming the task and modality for a task that uses a modality the
    model's tag vocabulary lacks (one registered after the model was built): ``add_tasks`` accepted
    it, and its first training step failed, the model holding a task it could never encode, before
    the twenty-seventh session's audit."""
    for task in tasks:
        used = {"TEXT" if slot.is_literal else slot.modality
                for template in task.instruction.templates for slot in template.encoder + template.decoder}
        unknown = sorted(used - set(modality_ids))
        if unknown:
            raise ValueError(f"task {task.name!r} uses modality {unknown[0]!r}, which is not in the model's "
                             f"modality vocabulary ({', '.join(modality_ids)}); the model was built before it was "
                             "registered, and cannot tag its tokens")
