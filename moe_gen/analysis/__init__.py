"""Routing analysis: what the routers of a trained model learned.

    from moe_gen.analysis import RoutingRecorder, stats
    with RoutingRecorder(model) as recorder:
        model(batch)                                   # any number of forwards or model.infer calls
    summary = stats.summarize(recorder.tables())       # load, balance, entropy, drops, MI, agreement

- ``RoutingRecorder`` (``recorder.py``): forward hooks on every MoE layer that stream counts, gate
  weights, router probabilities, entropy, drops and consecutive-layer route pairs into fixed-size
  tables by (layer, expert, task, modality, role).
- ``stats``: pure functions of those tables (and of expert weights and task gradients), with the
  definitions of every measure in its module docstring.
- ``plots``: PNGs with matplotlib (imported only when a plot is drawn).
- ``report``: ``moe-gen analyze`` — a saved model's report (``routing.json``, ``report.md``, PNGs),
  alone or side by side with a second model.

The library (``moe_gen.model``, ``routing``, ``experts``, ``tasks``) never imports this package.
"""

from moe_gen.analysis import stats
from moe_gen.analysis.recorder import RoutingRecorder, RoutingTables

__all__ = ["RoutingRecorder", "RoutingTables", "stats"]
