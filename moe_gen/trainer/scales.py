"""Loss scales that make a step of several micro-batches, on several processes, one large batch.

The trainer weighs objective group ``g`` of micro-batch ``i`` by its share of that micro-batch's
samples, ``S_gi / S_i``, over ``A`` micro-batches, and data parallelism averages the ``W``
processes' gradients. One large batch would weigh group ``g`` by its share of the whole step's
samples, ``S_g / S``, and inside it every scored token alike: ``1 / N_g`` each. So the token mean
of ``(i, g)``, over its own ``n_gi`` tokens, is multiplied by

    c · n_gi / N_g,   c = (S_g / S) / (S_gi / S_i) · A · W,

and each frame adapter's mean by ``c · r_gia / R_ga`` with its rows (``LossScales``). ``S``, ``S_g``,
``N_g`` and ``R_ga`` are summed over the step's micro-batches and the processes (one all-reduce).
Routing losses stay per forward, weighed as before. Objectives without ``loss_counts``, or whose
``__call__`` takes no ``scales``, are left as they were (their micro-batch means count alike).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Sequence

import torch

from moe_gen import distributed
from moe_gen.objectives import LossScales

__all__ = ["step_loss_scales", "annealed_teachers"]


def takes_scales(objective) -> bool:
    """Whether ``objective(batch, scales=...)`` is accepted and ``loss_counts`` exists."""
    if getattr(objective, "loss_counts", None) is None:
        return False
    try:
        parameters = inspect.signature(objective.__call__).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "scales" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def step_loss_scales(objectives: dict, micro_batches: Sequence, frame_adapters: Sequence[str],
                     world: int) -> list[dict[str, Optional[LossScales]]]:
    """Per micro-batch (``(size, [(name, samples, batch), ...])``, as the trainer prepares them),
    objective name → the ``LossScales`` of that group, None where every factor is 1; an objective
    that takes none is left out. Every process must call it (one all-reduce when ``world > 1``)."""
    names, adapters = sorted(objectives), sorted(frame_adapters)
    scaled = {name for name in names if takes_scales(objectives[name])}
    # per micro-batch and objective: (samples, tokens, rows per adapter)
    counts = [{name: (len(group), *objectives[name].loss_counts(batch)) for name, group, batch in groups
               if name in scaled} for _, groups in micro_batches]
    totals = torch.zeros(len(names) + 1, 2 + len(adapters), dtype=torch.float64)  # last row: [S, ...]
    totals[-1, 0] = float(sum(size for size, _ in micro_batches))
    for per_name in counts:
        for name, (samples, tokens, rows) in per_name.items():
            g = names.index(name)
            totals[g, 0] += samples
            totals[g, 1] += tokens
            for adapter, n in rows.items():
                totals[g, 2 + adapters.index(adapter)] += n
    totals = distributed.summed_over_processes(totals).tolist()
    out = []
    for (size, _), per_name in zip(micro_batches, counts):
        out.append({})
        for name, (samples, tokens, rows) in per_name.items():
            g_total = totals[names.index(name)]
            c = (g_total[0] / totals[-1][0]) / (samples / size) * len(micro_batches) * world
            token = c * tokens / g_total[1] if g_total[1] else 1.0
            frame = {a: c * n / g_total[2 + adapters.index(a)] for a, n in rows.items() if n}
            trivial = token == 1.0 and all(f == 1.0 for f in frame.values())
            out[-1][name] = None if trivial else LossScales(token, frame)
    return out


def annealed_teachers(scales: list[dict[str, Optional[LossScales]]], objectives: dict, step: int,
                      steps: int) -> list[dict[str, Optional[LossScales]]]:
    """``scales`` (``step_loss_scales``' output) with the teachers' factor of step ``step`` of
    ``steps`` (1-based) set for every objective that distils: ``TrainConfig.distill_anneal``'s
    linear fall from 1 at the first step to 0 at the last."""
    teacher = 1.0 - (step - 1) / max(steps - 1, 1)
    return [{**group, **{name: dataclasses.replace(group.get(name) or LossScales(), teacher=teacher)
                         for name, objective in objectives.items() if objective.distils}}
            for group in scales]
