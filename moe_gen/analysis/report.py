"""Routing report of a saved model: record held-out rows, compute statistics, write JSON, Markdown, PNGs.

    moe-gen analyze runs/demo/model --tasks digit_classification table_species --out runs/demo/analysis
    moe-gen analyze runs/attr/model --tasks digit_classification table_species --out cmp \\
        --compare runs/token/model --limit 64
    python scripts/analyze_routing.py runs/demo/model --tasks table_species --out analysis --mode generate

Output of one model (``--out DIR``): ``routing.json`` (statistics, the raw tables, the interference
matrix), ``report.md`` (key numbers, per-layer tables, linked plots) and the PNGs. With
``--compare B`` the two reports go to ``DIR/a`` and ``DIR/b`` and ``DIR/report.md`` sets their key
numbers side by side, with both models' expert × task heatmaps in one figure.

Modes: ``forward`` (default) runs teacher-forced forward passes over the rows, so every input and
target token is routed as in training (the generative pass: a contrastive task's second,
bidirectional decoder pass is not run), and reports the held-out loss (token + frame loss); ``generate`` runs
``moe_gen.trainer.evaluation.evaluate`` (decoding with ``model.infer``) while recording, and reports
the task metrics; generation steps are recorded too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from moe_gen.analysis import plots, stats
from moe_gen.analysis.recorder import RoutingRecorder, RoutingTables
from moe_gen.durable import atomic_open
from moe_gen.model.model import eval_mode
from moe_gen.tasks.modalities.base import label_text

__all__ = ["Analysis", "analyze", "task_interference", "batch_dependent_layers", "write_report", "write_comparison",
           "key_numbers", "main"]

MODES = ("forward", "generate")
# The TrainConfig settings of masked (4M) tasks, which the analysis collates them with as training did.
MASKED_SETTINGS = ("masked_input_budget", "masked_target_budget", "masked_alpha", "masked_target_alpha")


@dataclasses.dataclass
class Analysis:
    """Everything one report shows.

    Attributes:
        label: the model's name in reports (its directory, or what the caller chose).
        tasks: the analysed task names.
        rows: held-out rows recorded per task.
        mode: ``forward`` or ``generate``.
        tables: the recorder's tables.
        summary: ``stats.summarize(tables)``.
        evaluation: per task, ``{"loss": ...}`` (forward) or its metrics (generate).
        similarity: MoE layer name → expert cosine similarity ``[E, E]``.
        affinity: ``stats.task_affinity`` result.
        interference: ``stats.interference_matrix`` result, or None when disabled.
        model_info: router strategy, experts, top-k, MoE layers, parameters.
        masking: for analysed masked tasks whose batches were collated (forward mode, interference):
            ``{"tasks": names, "settings": MASKED_SETTINGS → value used, "defaults": names of the
            settings not given, which took TrainConfig's defaults}``; None when there is none.
        batch_dependent: ``batch_dependent_layers(model)``: the MoE layers whose routing depends on
            the batch; when there is one, forward mode batched the tasks' rows together.
    """

    label: str
    tasks: list[str]
    rows: dict[str, int]
    mode: str
    tables: RoutingTables
    summary: dict
    evaluation: dict
    similarity: dict
    affinity: dict
    interference: Optional[dict]
    model_info: dict
    masking: Optional[dict] = None
    batch_dependent: list[str] = dataclasses.field(default_factory=list)


# ---- analysis ---------------------------------------------------------------------------------

def _samples(model, task, count: int) -> list:
    """``count`` rows of ``task`` evenly spaced over it (a test split may be ordered by label), encoded
    for evaluation as the model was trained: with the statistics and closed label sets it saved,
    not ones fitted on these rows. Rows whose closed-set answer the model never trained on cannot
    be teacher-forced: they are left out, with a warning that counts them (rows that fail and are
    skipped under ``on_error="skip"`` are left out too)."""
    from moe_gen.tasks.task import CLOSED_SETS
    from moe_gen.trainer.evaluation import spaced_indices

    statistics = model.encoding_statistics(task)
    labels = {column: set(values) for column, values in statistics.get(CLOSED_SETS, {}).items()}
    known = [i for i in range(len(task)) if not labels or _labels_known(task, i, labels)]
    if not known:
        raise ValueError(f"task {task.name!r}: none of its {len(task)} rows holds a label the model trained on")
    if len(known) < len(task):
        warnings.warn(f"task {task.name!r}: {len(task) - len(known)} of {len(task)} rows hold a label the model never "
                      "trained on; the analysis leaves them out", stacklevel=3)
    plan = model.plan(task)  # (the model's own: its image tokenizers, the adapters it trained slots with)
    samples = (task.encode(known[i], model.tokenizer, training=False, statistics=statistics, plan=plan)
               for i in spaced_indices(len(known), min(count, len(known))))
    return [s for s in samples if s is not None]


def _labels_known(task, index: int, labels: dict) -> bool:
    """Whether every closed-set value of row ``index`` is among the model's ``labels`` (column →
    texts); a row the dataset fails to read counts as known (it fails, named, when encoded)."""
    try:
        row = task.data[index]
    except Exception:
        return True
    for column, texts in labels.items():
        value = row.get(column) if isinstance(row, dict) else None
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and any(label_text(v) not in texts for v in values):
            return False
    return True


def _rows_to_analyse(model, tasks: Sequence, mode: str, limit: Optional[int], batch_size: int = 1,
                     interference_rows: int = 0) -> dict:
    """Rows per task that ``analyze`` records, after checking its arguments."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if isinstance(interference_rows, bool) or not isinstance(interference_rows, int) or interference_rows < 0:
        raise ValueError(f"interference_rows must be a whole number >= 0 (0 skips interference), got "
                         f"{interference_rows!r}")
    if interference_rows > 0:  # refused now, not after every row is recorded
        stats.check_differentiable(model, "analyze")
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tasks {repeated} are given more than once: their rows would be recorded twice")
    unknown = [t.name for t in tasks if t.name not in model.task_ids]
    if unknown:
        raise ValueError(f"the model was not built for tasks {unknown}; it knows: {', '.join(model.config.tasks)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a whole number >= 1 or None (every row), got {limit!r}")
    rows = {t.name: len(t) if limit is None else min(limit, len(t)) for t in tasks}
    empty = [t.name for t in tasks if rows[t.name] == 0]
    if empty:
        raise ValueError(f"tasks {empty} have no rows to analyse")
    return rows


def task_interference(model, tasks: Sequence, rows, settings=None) -> dict:
    """The task interference matrix (``stats.interference_matrix``: cosines of per-task gradients on
    the shared transformer) on ``rows`` rows per task (a number, or task name → number), spread
    evenly over each task's rows (a split may be ordered by label: its first rows would hold a few
    labels only) and collated as each task's objective collates them in training (``settings``: the
    ``TrainConfig`` whose objective settings, such as the masked budgets, it trained with)."""
    counts = rows if isinstance(rows, dict) else {task.name: rows for task in tasks}
    batches = {task.name: _task_batch(model, task, _samples(model, task, counts[task.name]), settings=settings)
               for task in tasks}
    return stats.interference_matrix(stats.task_gradients(model, batches))


def _task_batch(model, task, samples: list, rng: Optional[random.Random] = None, settings=None):
    """``samples`` of ``task`` collated as its objective collates them in training (a masked or
    parallel task's masking and ``pass`` tag: collated as generative ones, their tokens were routed
    as the model never routes them), with the objective's draws taken from ``rng`` (default: seeded
    0). The objective is built as the trainer builds it, from ``settings`` (a ``TrainConfig``;
    default ``TrainConfig()``): a masked task's budgets and α are those of its training run, not
    ``MaskedObjective``'s defaults (a task trained with budgets 12 + 8 was analysed with 128 + 128)."""
    from moe_gen.objectives import OBJECTIVES
    from moe_gen.trainer.config import TrainConfig

    settings = dataclasses.replace(settings or TrainConfig(), distill_from={}, distill_anneal=False,
                                   distill_only_correct=False)  # (a teacher's distributions change no loss read here)
    objective = OBJECTIVES.get(task.objective).from_train_config(model, settings)
    return objective.prepare(samples, random.Random(0) if rng is None else rng)


def _masked_tasks(tasks: Sequence) -> list[str]:
    """The names of ``tasks`` trained by the masked (4M) objective or one derived from it."""
    from moe_gen.objectives import OBJECTIVES, MaskedObjective

    return [t.name for t in tasks if t.objective in OBJECTIVES and issubclass(OBJECTIVES.get(t.objective),
                                                                               MaskedObjective)]


def _masked_settings(tasks: Sequence, given: dict, collated: bool):
    """The ``TrainConfig`` the analysis builds objectives from: ``given`` (``MASKED_SETTINGS`` →
    value, None where not given) on TrainConfig's defaults, checked as a training run's are; and
    ``Analysis.masking`` (None without masked tasks, or when no batch is ``collated``). Warns, naming
    the tasks and settings, when a masked task is analysed with defaults for its budgets or α (an
    absent ``masked_target_alpha`` follows ``masked_alpha``, as TrainConfig's None does)."""
    from moe_gen.trainer.config import TrainConfig
    from moe_gen.trainer.sampling import check_modality_keys

    settings = TrainConfig(**{name: value for name, value in given.items() if value is not None})
    check_modality_keys(settings)
    masked = _masked_tasks(tasks)
    if not masked or not collated:
        return settings, None
    defaults = [name for name in MASKED_SETTINGS[:3] if given.get(name) is None]
    used = {name: getattr(settings, name) for name in MASKED_SETTINGS}
    if defaults:
        warnings.warn(f"masked tasks {masked} are analysed with TrainConfig's default "
                      f"{', '.join(f'{name}={used[name]!r}' for name in defaults)}, not necessarily the settings "
                      "they trained with: pass them (analyze(masked_input_budget=...), moe-gen analyze "
                      "--masked-input-budget ...)", stacklevel=3)
    return settings, {"tasks": masked, "settings": used, "defaults": defaults}


def batch_dependent_layers(model) -> list[str]:
    """The MoE layers of ``model`` whose route for a token depends on the other tokens of its batch
    in eval mode, each as ``"name: reason"``: a capacity factor (what a token keeps depends on the
    batch's load) or a gate that weighs tokens against each other (expert choice). Rows of such a
    model batched task by task are routed as training, which mixes the tasks' rows in a batch
    (``batch_tasks="mixed"``), never routes them: under expert choice every expert takes its share
    of each task, so MI(expert; task) was exactly 0."""
    from moe_gen.moe import MoE

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        reasons = [] if type(module.router.gate).rowwise_in_eval else [f"gate {module.config.router.gate}"]
        if module.config.capacity_factor is not None:
            reasons.append(f"capacity_factor {module.config.capacity_factor}")
        if reasons:
            out.append(f"{name}: {', '.join(reasons)}")
    return out


def _batch_groups(tasks: Sequence, mixed: bool) -> list[list]:
    """The tasks whose rows share batches: with ``mixed``, those of one objective (as training
    collates a micro-batch's rows objective by objective), else each task alone."""
    if not mixed:
        return [[task] for task in tasks]
    groups: dict[str, list] = {}
    for task in tasks:
        groups.setdefault(task.objective, []).append(task)
    return list(groups.values())


def _interleaved(samples: Sequence[list]) -> list:
    """The samples of several tasks in one sequence, each task's rows spread evenly over it (the
    i-th of n rows at (i + 1/2) / n), so every batch holds the tasks in proportion to their rows."""
    keyed = [((i + 0.5) / len(rows), t, sample) for t, rows in enumerate(samples) for i, sample in enumerate(rows)]
    return [sample for *_, sample in sorted(keyed, key=lambda k: k[:2])]


def _task_part(batch, out, task_id: int):
    """``batch`` and the forward pass ``out`` over it cut to what task ``task_id`` is scored on: its
    labels (others ignored) and its target frame rows, so a mixed batch's loss is taken per task."""
    from moe_gen.tasks import IGNORE_INDEX

    task_BL = batch.decoder.tags.task
    keep = {name: task_BL.reshape(-1)[index] == task_id for name, index in batch.frame_index.items()}
    pick = lambda rows: {name: value[keep[name]] for name, value in rows.items() if bool(keep[name].any())}
    part = dataclasses.replace(batch, labels=batch.labels.masked_fill(task_BL != task_id, IGNORE_INDEX),
                               frame_targets=pick(batch.frame_targets), frame_index=pick(batch.frame_index),
                               frame_stop=pick(batch.frame_stop), frame_valid=pick(batch.frame_valid))
    return part, dataclasses.replace(out, frames=pick(out.frames), stop_logits=pick(out.stop_logits))


def _held_out_losses(model, group: Sequence, samples: dict, batch_size: int, settings=None) -> dict:
    """Mean teacher-forced loss of each task of ``group`` (tasks of one objective, whose rows share
    batches: ``_batch_groups``) on its ``samples`` (task name → rows): the token cross-entropy
    (without label smoothing) averaged over all its scored tokens plus the frame loss averaged over
    all its target frames, whatever the batch size (each batch's means weighted by the task's
    tokens and frames in it). Returns task name → ``{"loss": ...}``.

    The batches draw from one stream, seeded 0, in row order: the objectives that draw (masks of
    ``masked`` and ``parallel`` tasks) draw sample by sample, so each row gets the draws it would
    get in one batch of all the rows, and the loss and the routes recorded do not depend on
    ``batch_size`` where routing is per token (a stream seeded per batch, by its first row's place,
    gave a row other masks at another batch size).
    """
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks import IGNORE_INDEX

    objective = GenerativeObjective(model, label_smoothing=0.0)
    rng = random.Random(0)
    sums = {task.name: {"token_loss": 0.0, "frame_loss": 0.0} for task in group}
    counts = {task.name: {"token_loss": 0, "frame_loss": 0} for task in group}
    rows = _interleaved([samples[task.name] for task in group])
    for start in range(0, len(rows), batch_size):
        batch = _task_batch(model, group[0], rows[start:start + batch_size], rng, settings)
        out = model(batch)
        for name in dict.fromkeys(batch.tasks):
            part, part_out = _task_part(batch, out, model.task_ids[name])
            losses = objective.loss(part, part_out)
            weights = {"token_loss": int((part.labels != IGNORE_INDEX).sum()),
                       "frame_loss": sum(int(index.numel()) for index in part.frame_index.values())}
            for kind, weight in weights.items():
                if kind in losses:
                    sums[name][kind] += float(losses[kind]) * weight
                    counts[name][kind] += weight
    return {name: {"loss": sum(sums[name][k] / counts[name][k] for k in sums[name] if counts[name][k])}
            for name in sums}


def analyze(model, tasks: Sequence, *, label: str = "model", mode: str = "forward", limit: Optional[int] = None,
            batch_size: int = 16, interference_rows: int = 16, masked_input_budget: Optional[int] = None,
            masked_target_budget: Optional[int] = None, masked_alpha=None, masked_target_alpha=None) -> Analysis:
    """Records ``model`` on the rows of ``tasks`` (``moe_gen.tasks.Task``, usually test splits) and
    computes every statistic.

    Args:
        model: a ``GeneralistModel`` built for these tasks.
        mode: ``forward`` (teacher-forced passes, held-out loss) or ``generate`` (``evaluate``).
        limit: rows per task, evenly spaced over its rows (None: all). Pass whole splits and cut
            here rather than loading a preset with ``limit``: a split's first rows may hold a single
            label (whose loss, and gradient, is then exactly 0). Rows are encoded with the
            statistics and closed label sets the model saved from its training rows.
        batch_size: rows per forward pass (or per ``infer`` call).
        interference_rows: rows of each task in its gradient batch; 0 skips interference.
        masked_input_budget, masked_target_budget, masked_alpha, masked_target_alpha: the
            ``TrainConfig`` settings the model's masked (4M) tasks trained with, which their batches
            are masked with; None: not given, TrainConfig's default (a warning names those a masked
            task is analysed with; an absent ``masked_target_alpha`` follows ``masked_alpha``).

    Raises:
        ValueError: for bad arguments, or a model sharded over processes (FSDP, expert parallelism):
            pass the whole model (``stats.check_whole_model`` says how to get it).
    """
    from moe_gen.tasks.task import task_list

    tasks = task_list(tasks, "analyze")
    if not tasks:
        raise ValueError("analyze: no tasks given")
    stats.check_whole_model(model, "analyze")
    rows = _rows_to_analyse(model, tasks, mode, limit, batch_size, interference_rows)
    given = dict(zip(MASKED_SETTINGS, (masked_input_budget, masked_target_budget, masked_alpha, masked_target_alpha)))
    settings, masking = _masked_settings(tasks, given, collated=mode == "forward" or interference_rows > 0)
    dependent = batch_dependent_layers(model)
    with eval_mode(model):
        tables, evaluation = _record(model, tasks, rows, mode, limit, batch_size, settings, mixed=bool(dependent))
        interference = None
        if interference_rows > 0:
            interference = task_interference(model, tasks, {t.name: min(interference_rows, rows[t.name])
                                                            for t in tasks}, settings)
    return Analysis(label=label, tasks=[t.name for t in tasks], rows=rows, mode=mode,
                    tables=tables, summary=stats.summarize(tables), evaluation=evaluation,
                    similarity=stats.expert_similarity(model),
                    affinity=stats.task_affinity(tables.counts_LETMR, tables.task_names), interference=interference,
                    model_info=_model_info(model, tables), masking=masking, batch_dependent=dependent)


def _record(model, tasks: Sequence, rows: dict, mode: str, limit: Optional[int], batch_size: int, settings,
            mixed: bool):
    """The routing tables of ``mode``'s passes over the rows and the evaluation per task; ``rows``
    becomes the rows recorded (unknown labels and failed rows left out). Forward passes batch each
    task's rows alone, unless ``mixed`` (routing depends on the batch: ``batch_dependent_layers``):
    then the rows of the tasks of one objective share batches, as in training, counted by task."""
    with RoutingRecorder(model) as recorder, torch.no_grad():
        if mode == "forward":
            samples = {task.name: _samples(model, task, rows[task.name]) for task in tasks}
            rows.update({name: len(rows_of) for name, rows_of in samples.items()})
            evaluation = {}
            for group in _batch_groups(tasks, mixed):
                evaluation.update(_held_out_losses(model, group, samples, batch_size, settings))
            evaluation = {task.name: evaluation[task.name] for task in tasks}
        else:
            from moe_gen.trainer.evaluation import evaluate

            evaluation = evaluate(model, tasks, limit=limit, batch_size=batch_size)
    return recorder.tables(), evaluation


def _model_info(model, tables: RoutingTables) -> dict:
    """Router strategy, gate, experts, top-k, MoE layers, parameters (all and active), width."""
    moe = model.config.moe
    decoder = moe.router_for("decoder").strategy
    router = moe.router.strategy if decoder == moe.router.strategy else f"{moe.router.strategy} (decoder {decoder})"
    return {"router": router, "gate": moe.router.gate, "experts": moe.num_experts, "top_k": moe.top_k,
            "moe_layers": len(tables.layer_names), "parameters": model.num_parameters(),
            "active_parameters": model.num_parameters(active=True), "d_model": model.config.d_model}


def _task_columns(analysis: Analysis) -> list[int]:
    return [analysis.tables.task_names.index(name) for name in analysis.tasks]


def task_shares(analysis: Analysis) -> np.ndarray:
    """``[L, N, E]`` share of each analysed task's assignments per expert, tasks in analysis order."""
    share = stats.group_load(analysis.tables.counts_LETMR, "task")
    return share[:, _task_columns(analysis)].numpy()


def _offdiag_mean(matrix: torch.Tensor) -> float:
    N = matrix.shape[0]
    if N < 2:
        return 0.0
    mask = ~torch.eye(N, dtype=torch.bool)
    return float(matrix[mask].mean())


def key_numbers(analysis: Analysis) -> dict:
    """The headline numbers of a report (also the rows of a comparison)."""
    s, info = analysis.summary, analysis.model_info
    moe = info["moe_layers"] > 0
    dash = "–"
    similarity = [_offdiag_mean(m) for m in analysis.similarity.values()]
    losses = [v["loss"] for v in analysis.evaluation.values() if isinstance(v, dict) and "loss" in v]
    out = {
        "router": info["router"] if moe else "dense",
        "MoE layers": info["moe_layers"],
        "experts × top-k": f"{info['experts']} × {info['top_k']}" if moe else dash,
        "parameters (active)": f"{info['parameters']:,} ({info['active_parameters']:,})",
        "mean expert-load CV": s["mean_cv"] if moe else dash,
        "mean max/mean load": s["mean_max_over_mean"] if moe else dash,
        "expert utilisation (share ≥ 1/(4E) of load)": s["mean_utilisation"] if moe else dash,
        "mean router entropy (bits)": s["mean_entropy_bits"] if moe else dash,
        "drop rate": s["overall_drop_rate"] if moe else dash,
        "MI(expert; task) (bits)": s["mean_mi_task_bits"] if moe else dash,
        "MI(expert; modality) (bits)": s["mean_mi_modality_bits"] if moe else dash,
        "specialisation by task": s["mean_specialisation_task"] if moe else dash,
        "specialisation by modality": s["mean_specialisation_modality"] if moe else dash,
        **{f"MI(expert; modality) in {stack} (bits)": value if moe else dash
           for stack, value in s["mean_mi_modality_bits_by_stack"].items()},
        "route consistency (consecutive layers)": s["mean_route_consistency"] if s["route_agreement"] else dash,
        "mean expert cosine similarity": sum(similarity) / len(similarity) if similarity else dash,
    }
    if analysis.interference is not None:
        # between two tasks that both have a gradient (one task has only its self-similarity, 1; a
        # task with a zero gradient has no defined cosine, not a cosine of 0)
        off_diagonal = stats.defined_off_diagonal(analysis.interference["matrix"])
        out["mean interference (off-diagonal)"] = float(off_diagonal.mean()) if off_diagonal.numel() else dash
        out["most negative interference"] = float(off_diagonal.min()) if off_diagonal.numel() else dash
    if losses:
        out["mean held-out loss"] = sum(losses) / len(losses)
    return out


# ---- writing ----------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _plots(analysis: Analysis, out_dir: str) -> dict[str, str]:
    """Writes the PNGs; returns plot name → file name (relative to ``out_dir``)."""
    files: dict[str, str] = {}
    t = analysis.tables
    if t.layer_names:
        files["heatmaps"] = "expert_task_heatmaps.png"
        plots.plot_expert_heatmaps(task_shares(analysis), t.layer_names, analysis.tasks,
                                   os.path.join(out_dir, files["heatmaps"]))
        # per layer: expert ids of different layers are unrelated, so their counts do not add up
        by_modality_LME = stats.group_load(t.counts_LETMR, "modality")
        used = [m for m in range(by_modality_LME.shape[1]) if by_modality_LME[:, m].sum() > 0]
        if used:
            files["modality_load"] = "modality_load.png"
            modalities = [t.modality_names[m] for m in used]
            plots.plot_expert_heatmaps(by_modality_LME[:, used].numpy(), t.layer_names, modalities,
                                       os.path.join(out_dir, files["modality_load"]),
                                       title="share of each modality's assignments per expert")
        files["entropy"] = "entropy_by_layer.png"
        s = analysis.summary
        plots.plot_entropy_by_layer({analysis.label: s["entropy_bits"]}, s["max_entropy_bits"], t.layer_names,
                                    os.path.join(out_dir, files["entropy"]))
    if analysis.affinity["linkage"] is not None:
        files["dendrogram"] = "task_dendrogram.png"
        plots.plot_dendrogram(analysis.affinity["linkage"], analysis.affinity["tasks"],
                              os.path.join(out_dir, files["dendrogram"]))
    if analysis.interference is not None:
        files["interference"] = "interference.png"
        plots.plot_interference(analysis.interference["matrix"].numpy(), analysis.interference["tasks"],
                                os.path.join(out_dir, files["interference"]))
    return files


def _to_json(analysis: Analysis, files: dict[str, str]) -> dict:
    affinity = analysis.affinity
    interference = analysis.interference
    return stats.json_ready({
        "label": analysis.label, "tasks": analysis.tasks, "rows": analysis.rows, "mode": analysis.mode,
        "masking": analysis.masking, "batch_dependent": analysis.batch_dependent,
        "model": analysis.model_info, "key_numbers": key_numbers(analysis), "evaluation": analysis.evaluation,
        "summary": analysis.summary,
        "expert_similarity": {name: {"matrix": m, "mean_offdiagonal": _offdiag_mean(m)}
                              for name, m in analysis.similarity.items()},
        "task_affinity": {"tasks": affinity["tasks"], "distance": affinity["distance"], "linkage": affinity["linkage"]},
        "interference": None if interference is None else {
            "tasks": interference["tasks"], "matrix": interference["matrix"], "dot": interference["dot"],
            "norms": interference["norms"],
            "definition": "I[i, j] = g_i·g_j / (|g_i| |g_j|): first-order change of task i's loss along a unit "
                          "step of task j's gradient, relative to a unit step along its own"},
        "plots": files,
        "tables": analysis.tables.to_dict(),
    })


def write_report(analysis: Analysis, out_dir: str) -> dict[str, str]:
    """Writes ``routing.json``, ``report.md`` and the PNGs of one analysis into ``out_dir``.

    Returns:
        name → path of everything written.
    """
    os.makedirs(out_dir, exist_ok=True)
    files = _plots(analysis, out_dir)
    with atomic_open(os.path.join(out_dir, "routing.json")) as f:
        json.dump(_to_json(analysis, files), f, indent=1, allow_nan=False)
    with atomic_open(os.path.join(out_dir, "report.md")) as f:
        f.write("\n".join(_markdown(analysis, files)) + "\n")
    written = {name: os.path.join(out_dir, file) for name, file in files.items()}
    written.update(json=os.path.join(out_dir, "routing.json"), markdown=os.path.join(out_dir, "report.md"))
    return written


def _header(a: Analysis) -> list[str]:
    """The report's title, what it analysed and how (masked settings included)."""
    lines = [f"# Routing report: {a.label}", "",
             f"Tasks: {', '.join(f'{n} ({a.rows[n]} rows)' for n in a.tasks)}. Mode: `{a.mode}` "
             f"({'teacher-forced forward passes' if a.mode == 'forward' else 'decoding with model.infer'}). "
             "Definitions of every number: `moe_gen.analysis.stats`.", "", _batching(a)]
    if a.masking is not None:
        used = ", ".join(f"{name}={value!r}" for name, value in a.masking["settings"].items())
        used += " (masked_alpha's)" if a.masking["settings"]["masked_target_alpha"] is None else ""
        lines += ["", f"Masked tasks ({', '.join(a.masking['tasks'])}) are masked with {used}."]
        if a.masking["defaults"]:
            lines += ["", f"**Warning:** {', '.join(a.masking['defaults'])} were not given: these are TrainConfig's "
                      "defaults, not necessarily the settings the model trained with (pass them: "
                      "`analyze(masked_...=)`, `--masked-...`; `moe-gen analyze` reads them from the run directory "
                      "of a `moe-gen pretrain`/`finetune` model)."]
    return lines


def _batching(a: Analysis) -> str:
    """How the rows were batched, and whether the numbers depend on the batch."""
    if not a.tables.layer_names:
        return "The rows of each task were batched alone."
    if not a.batch_dependent:
        return ("Routing is per token: the rows of each task were batched alone, and the numbers do not depend on "
                "the batch size.")
    reasons = ", ".join(dict.fromkeys(line.split(": ", 1)[1] for line in a.batch_dependent))
    how = ("the rows of the tasks of one objective were batched together, each task's rows spread evenly over the "
           "batches, as training's `batch_tasks=\"mixed\"` batches them, and counted by task"
           if a.mode == "forward" else "`model.infer` decoded each task's rows in batches of their own")
    return (f"Routing depends on the batch in {len(a.batch_dependent)} MoE layers ({reasons}): {how}; the numbers "
            "change with the batch size (interference: each task's gradient on a batch of its own rows).")


def _markdown(a: Analysis, files: dict[str, str]) -> list[str]:
    s, t = a.summary, a.tables
    lines = [*_header(a), "", "## Key numbers", ""]
    lines += _table(["", a.label], [[k, v] for k, v in key_numbers(a).items()])
    lines += ["", "## Held-out evaluation", ""]
    metric_names = sorted({m for v in a.evaluation.values() for m in v})
    lines += _table(["task", *metric_names], [[n, *[a.evaluation.get(n, {}).get(m, "") for m in metric_names]]
                                              for n in a.tasks])
    if not t.layer_names:
        lines += ["", "This model has no MoE layer: there is no routing to show."]
    else:
        lines += ["", "## Layers", ""]
        columns = ("tokens", "cv", "max_over_mean", "utilisation", "entropy_bits", "max_entropy_bits", "drop_rate",
                   "mi_task_bits", "mi_modality_bits", "specialisation_task", "specialisation_modality")
        rows = [[name, *(s[c][layer] for c in columns)] for layer, name in enumerate(t.layer_names)]
        lines += _table(["layer", "tokens", "load CV", "max/mean", "utilisation", "entropy (bits)", "log2 E",
                         "drop rate", "MI task", "MI modality", "spec. task", "spec. modality"], rows)
        lines += ["", "## Experts by task", "", "Share of each task's assignments that each expert took, per layer.",
                  "", f"![expert x task heatmaps]({files['heatmaps']})"]
        if "modality_load" in files:
            lines += ["", "## Experts by modality", "", "Share of each modality's assignments that each expert "
                      "took, per layer.", "", f"![expert x modality heatmaps]({files['modality_load']})", ""]
            lines += _table(["modality", "tokens per layer", "drop rate per layer"],
                            [[m, ", ".join(_fmt(v) for v in s["tokens_by_modality"][m]),
                              ", ".join(_fmt(v) for v in s["drop_rate_by_modality"][m])]
                             for m in s["tokens_by_modality"]])
        lines += ["", "## Router entropy", "", f"![entropy by layer]({files['entropy']})"]
        if s["route_agreement"]:
            lines += ["", "## Route agreement between consecutive layers", ""]
            lines += _table(["layers", "tokens", "consistency", "MI (bits)", "MI / H(next)"],
                            [[" → ".join(r["layers"]), r["tokens"], r["consistency"], r["mutual_information"],
                              r["normalised"]] for r in s["route_agreement"]])
        lines += ["", "## Expert similarity (cosine of flattened weights)", ""]
        lines += _table(["layer", "mean off-diagonal", "max off-diagonal"],
                        [[name, _offdiag_mean(m),  # (one expert has no pair: no value, not -1)
                          float((m - 2 * torch.eye(m.shape[0])).max()) if m.shape[0] > 1 else None]
                         for name, m in a.similarity.items()])
    lines += ["", "## Task affinity", ""]
    if "dendrogram" in files:
        lines += ["Tasks clustered (average linkage) by the Jensen-Shannon distance of their expert usage.", "",
                  f"![task dendrogram]({files['dendrogram']})"]
    else:
        lines += ["Fewer than two tasks were routed: nothing to cluster."]
    if a.interference is not None:
        inter = a.interference
        lines += ["", "## Task interference", "",
                  "I[i, j] = g_i·g_j / (‖g_i‖ ‖g_j‖): the first-order change of task i's loss after a unit step along "
                  "task j's gradient, relative to a unit step along its own (REFERENCE.md §2). Negative: j's update "
                  "hurts i. Gradients of the shared encoder-decoder parameters on one held-out batch per task.", "",
                  f"![interference]({files['interference']})", ""]
        zero = [n for n, norm in zip(inter["tasks"], inter["norms"].tolist()) if norm == 0]
        if zero:
            lines += [f"The loss of {', '.join(zero)} has a zero gradient on its batch (e.g. every row has the "
                      "same closed-set label): its cosines are undefined (–), and left out of the key numbers.", ""]
        lines += _table(["task i \\ step along j", *inter["tasks"]],
                        [[n, *("–" if math.isnan(v) else v for v in inter["matrix"][i].tolist())]
                         for i, n in enumerate(inter["tasks"])])
    lines += ["", "Raw tables and every statistic: [routing.json](routing.json)."]
    return lines


def write_comparison(a: Analysis, b: Analysis, out_dir: str) -> dict[str, str]:
    """Writes both reports (``out_dir/a``, ``out_dir/b``) and a side-by-side ``out_dir/report.md``
    with ``compare_heatmaps.png`` and ``routing.json`` holding both analyses' key numbers."""
    os.makedirs(out_dir, exist_ok=True)
    written_a = write_report(a, os.path.join(out_dir, "a"))
    written_b = write_report(b, os.path.join(out_dir, "b"))
    heatmaps = "compare_heatmaps.png"
    tasks = [n for n in a.tasks if n in b.tasks]
    share_a = task_shares(a)[:, [a.tasks.index(n) for n in tasks]]
    share_b = task_shares(b)[:, [b.tasks.index(n) for n in tasks]]
    plots.plot_heatmaps_side_by_side(share_a, share_b, a.tables.layer_names, b.tables.layer_names, tasks,
                                     [a.label, b.label], os.path.join(out_dir, heatmaps))
    keys_a, keys_b = key_numbers(a), key_numbers(b)
    names = list(dict.fromkeys([*keys_a, *keys_b]))
    lines = [f"# Routing comparison: {a.label} vs {b.label}", "",
             f"Tasks: {', '.join(tasks)}. Full reports: [{a.label}](a/report.md), [{b.label}](b/report.md).", "",
             "## Key numbers", ""]
    lines += _table(["", a.label, b.label], [[k, keys_a.get(k, "–"), keys_b.get(k, "–")] for k in names])
    lines += ["", "## Experts by task, side by side", "", f"![side-by-side heatmaps]({heatmaps})"]
    for sub, analysis in (("a", a), ("b", b)):
        if analysis.interference is not None:
            lines += ["", f"## Interference: {analysis.label}", "", f"![interference {sub}]({sub}/interference.png)"]
    lines += ["", "Both analyses' key numbers: [routing.json](routing.json)."]
    with atomic_open(os.path.join(out_dir, "report.md")) as f:
        f.write("\n".join(lines) + "\n")
    with atomic_open(os.path.join(out_dir, "routing.json")) as f:
        json.dump(stats.json_ready({"a": {"label": a.label, "key_numbers": keys_a, "report": "a/report.md"},
                               "b": {"label": b.label, "key_numbers": keys_b, "report": "b/report.md"},
                               "tasks": tasks}), f, indent=1, allow_nan=False)
    return {"markdown": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "routing.json"),
            "heatmaps": os.path.join(out_dir, heatmaps), "a": written_a["markdown"], "b": written_b["markdown"]}


# ---- command line -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-gen analyze", description="Routing analysis of a saved model: which experts serve which tasks, "
        "modalities and roles, load balance, drops, entropy, specialisation, task interference.")
    parser.add_argument("model_dir", help="a directory written by GeneralistModel.save_pretrained")
    parser.add_argument("--tasks", nargs="+", required=True, help="task preset names (their test split is used)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--limit", type=int, default=32, help="held-out rows per task (default 32)")
    parser.add_argument("--compare", metavar="MODEL_DIR_B", help="a second model to report side by side")
    parser.add_argument("--mode", choices=MODES, default="forward",
                        help="forward: teacher-forced passes and held-out loss (default); generate: decode with "
                             "model.infer and report the task metrics")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--interference-rows", type=int, default=16,
                        help="rows per task in the gradient batch for the interference matrix (0: skip)")
    masked = ("masked tasks: the TrainConfig.{} they trained with (default: the one saved in the run directory of a "
              "moe-gen pretrain/finetune model, MODEL_DIR/../checkpoints; else TrainConfig's{})")
    parser.add_argument("--masked-input-budget", type=int, help=masked.format("masked_input_budget", ""))
    parser.add_argument("--masked-target-budget", type=int, help=masked.format("masked_target_budget", ""))
    parser.add_argument("--masked-alpha", type=_yaml_value, help=masked.format("masked_alpha", "") +
                        ": a number or a mapping such as '{IMAGE: 1.0, TEXT: 0.1}'")
    parser.add_argument("--masked-target-alpha", type=_yaml_value,
                        help=masked.format("masked_target_alpha", "; absent: --masked-alpha's"))
    return parser


def _yaml_value(text: str):
    """A flag's value read as YAML, as the run configuration's dotted flags read theirs."""
    from moe_gen.cli import yaml_load

    try:
        return yaml_load(text)
    except Exception as exc:  # noqa: BLE001 - any YAML error: argparse names the flag and the text
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r} ({exc})") from None


def _run_masked_settings(model_dir: str) -> tuple[dict, Optional[str], list]:
    """The masked settings saved by the run that wrote ``model_dir``, when it is the ``model`` folder
    of a ``moe-gen pretrain``/``finetune`` run directory: its latest checkpoint's ``trainer.json``
    holds the run's ``TrainConfig``. Returns (``MASKED_SETTINGS`` → value, that file, the run's
    tasks); ``({}, None, [])`` for a model saved elsewhere or a run that saved no checkpoint."""
    from moe_gen.trainer.checkpoint import latest_checkpoint, read_trainer_state

    path = os.path.normpath(os.path.abspath(model_dir))
    checkpoint = (latest_checkpoint(os.path.join(os.path.dirname(path), "checkpoints"))
                  if os.path.basename(path) == "model" else None)
    if checkpoint is None:
        return {}, None, []
    state = read_trainer_state(checkpoint)
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    return ({name: config[name] for name in MASKED_SETTINGS if name in config},
            os.path.join(checkpoint, "trainer.json"), list(state.get("tasks") or []))


def _masked_options(args, model_dir: str, tasks: Sequence) -> dict:
    """``analyze``'s masked settings for the model in ``model_dir``: each flag given, else the value
    its run saved (``_run_masked_settings``), else None (TrainConfig's default, with a warning)."""
    masked = _masked_tasks(tasks)
    saved, source, trained = _run_masked_settings(model_dir) if masked else ({}, None, [])
    options = {name: getattr(args, name) if getattr(args, name) is not None else saved.get(name)
               for name in MASKED_SETTINGS}
    if source is not None:
        untrained = [name for name in masked if name not in trained]
        if untrained:
            warnings.warn(f"{source}: that run did not train the masked tasks {untrained} (it trained "
                          f"{', '.join(trained)}): the masked settings it saved may not be theirs; pass the ones "
                          "they trained with (--masked-input-budget, ...)", stacklevel=2)
        print(f"{model_dir}: masked settings read from {source}: "
              f"{', '.join(f'{name}={saved[name]!r}' for name in saved)}")
    return options


def _load(model_dir: str):
    from moe_gen.model import GeneralistModel

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir!r} is not a saved model directory (no config.json); "
                         "write one with GeneralistModel.save_pretrained")
    return GeneralistModel.from_pretrained(model_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``moe-gen analyze MODEL_DIR --tasks a b --out DIR [--limit N] [--compare MODEL_DIR_B]``; returns
    the exit status (2 for a user error, with its message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        from moe_gen.tasks.presets import load_preset, preset_names

        tasks = [load_preset(name, "test") for name in preset_names(args.tasks)]  # whole splits: see analyze(limit=)
        options = dict(mode=args.mode, limit=args.limit, batch_size=args.batch_size,
                       interference_rows=args.interference_rows)
        models = _checked_models(args, tasks, options)  # both, before either is recorded
        first = analyze(models[0][0], tasks, label=_label(args.model_dir), **options, **models[0][1])
        if args.compare:
            second = analyze(models[1][0], tasks, label=_label(args.compare, avoid=first.label), **options,
                             **models[1][1])
            written = write_comparison(first, second, args.out)
        else:
            written = write_report(first, args.out)
    except ValueError as exc:
        print(f"moe-gen analyze: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written['markdown']} and {written['json']}")
    return 0


def _checked_models(args, tasks: Sequence, options: dict) -> list[tuple]:
    """The model of ``MODEL_DIR`` (and of ``--compare``), each with its masked settings
    (``_masked_options``), loaded and checked against the tasks and options before any row is
    recorded: a second model that cannot be analysed was refused only after the first one's whole
    analysis, by a message that did not say which model it was.

    Raises:
        ValueError: naming the model directory (and ``--compare``) and what is wrong.
    """
    out = []
    for directory, role in ((args.model_dir, ""), (args.compare, " (--compare)")):
        if directory is None:
            continue
        model = _load(directory)  # (its message names the directory)
        try:
            masked = _masked_options(args, directory, tasks)
            _rows_to_analyse(model, tasks, options["mode"], options["limit"], options["batch_size"],
                             options["interference_rows"])
            _masked_settings(tasks, masked, collated=False)  # checked as a training run's are
        except ValueError as exc:
            raise ValueError(f"{directory}{role}: {exc}") from None
        out.append((model, masked))
    return out


def _label(model_dir: str, avoid: Optional[str] = None) -> str:
    """A short name for a model directory (``runs/attr/model`` → ``attr/model``), unlike ``avoid``."""
    parts = [p for p in os.path.normpath(os.path.abspath(model_dir)).split(os.sep) if p]
    label = "/".join(parts[-2:]) if len(parts) >= 2 else (parts[-1] if parts else model_dir)
    return label if label != avoid else f"{label} (B)"


if __name__ == "__main__":
    raise SystemExit(main())
