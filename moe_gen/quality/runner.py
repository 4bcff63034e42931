"""Trains and scores every system of the benchmark.

Systems:
    majority, logreg, knn   classical baselines on raw features (classification tasks only)
    specialist              a dense model of the generalist's active size, trained on one task with
                            that task's share of the generalist's samples (steps · its mixing weight)
    dense                   a dense generalist on the whole suite
    token, modality, task, attribute, hybrid
                            MoE generalists routed by that strategy, at the dense model's active
                            size (FFN hidden = top_k · expert hidden) and the same steps

Generalists mix tasks as the trainer does by default, by temperature: a task's share of the
samples ∝ rows^(1/τ), τ = 2, so a 1,437-row task gets 9 times the share of a 17-row one (uniform
mixing, ``mixing="uniform"``, gives them the same share: hundreds of epochs of the smallest task,
three of the largest). Each specialist trains for its task's expected share of the generalist's
steps (``steps · weight``), the same samples. Every model run is a job (generalist × seed, or
specialist × task × seed) in a pool of ``workers`` processes with ``threads`` torch threads each;
models are scored on the same ``eval_limit`` held-out rows of every task (evenly spaced over the
test split, which may be ordered by label), the rows the classical baselines are scored on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import tempfile
import time
from typing import Optional, Sequence

from moe_gen.config import TAG_BALANCE

__all__ = ["BenchConfig", "run_benchmark", "GENERALISTS", "train_and_score", "specialist_steps",
           "SpecialistsFromError"]

GENERALISTS = ("dense", "token", "modality", "task", "attribute", "hybrid")
# systems trained only when named (``--systems``): the default table keeps its columns
EXTRA_SYSTEMS = ("instruction", "context")


@dataclasses.dataclass(kw_only=True)
class BenchConfig:
    """What the benchmark runs.

    Attributes:
        tasks: suite task names (empty: the whole suite).
        systems: generalist systems to train (``GENERALISTS``).
        specialists: also train a specialist per task.
        seeds: one run per seed of every model system.
        flavour: model flavour; ``num_experts`` overrides its experts (active size is unchanged);
            ``expert_hidden`` (None: the flavour's) each expert's hidden width, so the active FFN
            width of every system (the dense ones: FFN hidden = k · expert_hidden);
            ``moe_attention``: the MoE systems' attention output projections are mixtures of linear
            experts too, routed like the FFNs (``MoEConfig.attention``; the dense ones keep theirs);
            ``shared_expert``: the MoE systems give half their active FFN width to a shared expert
            every token uses (DeepSeek-MoE): the routed experts half as wide, the shared one
            k · expert_hidden / 2, so the active size, and the dense systems, are unchanged.
        upcycle_at: two-stage generalists (0: one stage, from scratch). Every generalist first
            trains as the dense model for this fraction of ``steps``; then the MoE systems are
            sparsely upcycled (``moe_gen.pretrained.upcycle``: every FFN becomes ``num_experts``
            copies of itself behind the system's router, ``upcycle_top_k`` per token) and every
            system, dense included, trains the remaining steps with a new optimizer and schedule.
            With ``upcycle_top_k`` 1 a token uses one copy of the dense FFN: the active size stays
            the dense model's. Each copy is the dense FFN's width (k · ``expert_hidden``), not
            ``expert_hidden``. Specialists train in one stage.
        steps, batch_size, lr, warmup_steps: generalist training (specialists: ``steps · weight``).
        label_smoothing: ``ModelConfig.label_smoothing`` of every system, specialists included (the
            token cross-entropy's; 0: none).
        sam_rho: ``TrainConfig.sam_rho`` of every run, specialists included (sharpness-aware
            minimisation: two forward and backward passes a step; 0: off).
        mixing, temperature: how the generalists share steps among tasks (``TrainConfig.mixing``:
            ``temperature`` or ``uniform``); a specialist gets its task's expected share.
        loss_average: ``TrainConfig.loss_average`` of every run (``token`` or ``sample``).
        tag_balance: ``RouterConfig.tag_balance`` of the MoE systems (None: the router's default,
            ``loss``; ``bias`` balances the load over steps, which one-task batches need).
        tag_balance_window: ``RouterConfig.tag_balance_window`` of the MoE systems (0: the loss reads
            each forward's load; W: a running load over about W forwards).
        batch_tasks: ``TrainConfig.batch_tasks`` of the generalists: ``mixed`` (each row's task
            drawn) or ``single`` (one task per batch). A specialist's batches hold its one task
            either way, so specialists are reusable across it.
        ema_decay: ``TrainConfig.ema_decay`` of the generalists (0: none); a specialist's decay
            averages over the same share of its shorter run (``1 − (1 − d)·steps / its steps``).
            With it, runs are scored with the averaged weights, and their last weights' scores are
            kept too (``scores_last`` in ``quality.json``).
        pretrained_inputs: doc_topic and spoken words read their input through a frozen
            pretrained encoder (``suite.PRETRAINED_INPUTS``: MiniLM, Whisper tiny.en), for every
            system; a second logistic regression reads the same states, mean-pooled.
        lr_scales: parameter-name prefix → learning-rate multiplier (``TrainConfig.lr_scales``, e.g.
            ``{"adapters.bag_of_words": 3}``), for every system: a specialist takes the prefixes its
            model has (before 2026-12-05 specialists trained every parameter at ``lr``).
        bag_of_words: doc_topic reads its text as TF-IDF weights of a vocabulary fitted on its
            training rows (``suite.BAG_OF_WORDS_INPUTS``), for every system; not with
            ``pretrained_inputs``.
        pose_summary: motion classification reads each pose window as one row of per-feature
            window statistics, standardised with the training rows' (``suite.POSE_SUMMARY_INPUTS``),
            for every system.
        pose_noise: std of the Gaussian noise added to every standardised statistic of those rows
            in training (the slot's ``feature_noise``; 0: none; needs ``pose_summary``).
        pose_min_length: the shortest training window of those rows, in frames: each training read
            summarises a random stretch of that many frames or more (the slot's ``min_length``; 0:
            the whole window; needs ``pose_summary``).
        subword_sampling: alpha of the segmentations doc_topic's text input draws in training
            (``suite.SUBWORD_SAMPLING_INPUTS``; the TEXT slot's ``subword_sampling``), for every
            system; 0: the tokenizer's own pieces. Not with ``pretrained_inputs`` or ``bag_of_words``.
        eval_limit: held-out rows scored per task, evenly spaced over the test split (every system
            sees the same rows).
        eval_every: also score the held-out rows every N steps while training
            (``TrainConfig.eval_every``; it does not change the training): each run's ``curve`` in
            ``quality.json``, ``[{"step", "scores": {task: metric}}]``, and a table of the mean
            over seeds in ``quality.md``. 0: the last step only. Not with ``upcycle_at``.
        fit_rows: training rows scored per classification task (evenly spaced over the train split,
            without augmentation; ``scores_train`` in ``quality.json``): a model that scores low on
            them as well as held out under-fits its task, one that scores high on them only
            over-fits it. 0: not scored.
        distill: α of distillation from the specialists (``TrainConfig.distill_weight``; 0: off):
            every generalist learns each task's scored tokens from that task's specialist of the
            same seed as well as from the reference (``moe_gen.teachers``). The specialists then
            train first, in this run (not with ``specialists_from`` or ``specialists=False``), and
            are kept in a temporary folder until the generalists are done.
        distill_temperature: τ of that distillation (``TrainConfig.distill_temperature``).
        distill_anneal: the teachers' weight falls from ``distill`` to 0 over the run
            (``TrainConfig.distill_anneal``).
        distill_only_correct: a specialist teaches only the tokens it answers right
            (``TrainConfig.distill_only_correct``).
        specialists_from: a ``quality.json`` whose specialist runs are reused instead of training
            them again (every task and seed of this run must be in it, trained with the same
            settings: ``SPECIALIST_SETTINGS``; a mismatch is refused, naming the settings).
        workers, threads: processes running jobs, torch threads per process.
        output_dir: where ``quality.json``, ``quality.md`` and ``quality.png`` go.
    """

    tasks: tuple[str, ...] = ()
    systems: tuple[str, ...] = GENERALISTS
    specialists: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    flavour: str = "debug"
    num_experts: int = 8
    expert_hidden: Optional[int] = None
    moe_attention: bool = False
    shared_expert: bool = False
    upcycle_at: float = 0.0
    upcycle_top_k: int = 1
    steps: int = 4000
    batch_size: int = 16
    lr: float = 2e-3
    lr_scales: dict = dataclasses.field(default_factory=dict)
    warmup_steps: int = 50
    label_smoothing: float = 0.0
    sam_rho: float = 0.0
    distill: float = 0.0
    distill_temperature: float = 1.0
    distill_anneal: bool = False
    distill_only_correct: bool = False
    mixing: str = "temperature"
    temperature: float = 2.0
    ema_decay: float = 0.0
    loss_average: str = "token"
    batch_tasks: str = "mixed"
    tag_balance: Optional[str] = None
    tag_balance_window: int = 0
    pretrained_inputs: bool = False
    bag_of_words: bool = False
    pose_summary: bool = False
    pose_noise: float = 0.0
    pose_min_length: int = 0
    subword_sampling: float = 0.0
    eval_limit: int = 100
    eval_every: int = 0
    fit_rows: int = 50
    specialists_from: Optional[str] = None
    workers: int = 2
    threads: int = 1
    output_dir: str = "bench_results/quality"

    def __post_init__(self) -> None:
        self._check_runs()
        from moe_gen.objectives import LOSS_AVERAGES

        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"BenchConfig.loss_average must be one of {', '.join(LOSS_AVERAGES)}, "
                             f"got {self.loss_average!r}")
        if self.tag_balance is not None and self.tag_balance not in TAG_BALANCE:
            raise ValueError(f"BenchConfig.tag_balance must be one of {', '.join(TAG_BALANCE)} (or None: the "
                             f"router's default), got {self.tag_balance!r}")
        if self.tag_balance_window < 0:
            raise ValueError(f"BenchConfig.tag_balance_window must be >= 0, got {self.tag_balance_window}")
        from moe_gen.trainer.config import BATCH_TASKS

        if self.batch_tasks not in BATCH_TASKS:
            raise ValueError(f"BenchConfig.batch_tasks must be one of {', '.join(BATCH_TASKS)}, "
                             f"got {self.batch_tasks!r}")
        self._check_model_options()
        self._check_distill()
        if self.lr_scales:
            from moe_gen.trainer import TrainConfig

            TrainConfig(lr_scales=dict(self.lr_scales))  # refuses a multiplier that is not a number >= 0
        if sum(map(bool, (self.pretrained_inputs, self.bag_of_words, self.subword_sampling))) > 1:
            raise ValueError("BenchConfig.pretrained_inputs, bag_of_words and subword_sampling each redeclare "
                             "doc_topic's input; choose one")
        if not 0 <= self.subword_sampling <= 1:
            raise ValueError(f"BenchConfig.subword_sampling must be in [0, 1] (0: off), got {self.subword_sampling}")
        if self.pose_noise < 0 or (self.pose_noise and not self.pose_summary):
            raise ValueError(f"BenchConfig.pose_noise must be >= 0 and perturbs the pose-summary rows (it needs "
                             f"pose_summary), got {self.pose_noise}")
        if self.pose_min_length < 0 or (self.pose_min_length and not self.pose_summary):
            raise ValueError(f"BenchConfig.pose_min_length must be >= 0 and shortens the pose-summary windows (it "
                             f"needs pose_summary), got {self.pose_min_length}")
        if self.specialists_from and not self.specialists:
            raise ValueError("BenchConfig.specialists_from reuses specialists; it does not combine with "
                             "specialists=False (--no-specialists)")
        if self.specialists_from and os.path.abspath(self.specialists_from) == os.path.abspath(
                os.path.join(self.output_dir, "quality.json")):
            raise ValueError(f"specialists_from {self.specialists_from!r} is this run's own output, which the run "
                             "would overwrite; write to another output_dir (--out)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"BenchConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.sam_rho < math.inf:
            raise ValueError(f"BenchConfig.sam_rho must be a finite number >= 0 (0: off), got {self.sam_rho}")
        if self.eval_limit < 1:
            raise ValueError(f"BenchConfig.eval_limit must be >= 1 (held-out rows scored per task), "
                             f"got {self.eval_limit}")
        if self.eval_every < 0 or (self.eval_every and self.upcycle_at):
            raise ValueError(f"BenchConfig.eval_every must be >= 0 and does not combine with upcycle_at (two runs), "
                             f"got {self.eval_every}")
        if self.fit_rows < 0:
            raise ValueError(f"BenchConfig.fit_rows must be >= 0 (0: no training-row scores), got {self.fit_rows}")
        if self.mixing not in ("temperature", "uniform"):
            raise ValueError(f"BenchConfig.mixing must be 'temperature' or 'uniform', got {self.mixing!r}")

    def _check_runs(self) -> None:
        """The systems and seeds: known systems, at least one seed, none named twice (a repeat would
        train every job twice, and the report would count the copies as runs of other seeds)."""
        unknown = [s for s in self.systems if s not in GENERALISTS + EXTRA_SYSTEMS]
        if unknown:
            known = ", ".join(GENERALISTS + EXTRA_SYSTEMS)
            raise ValueError(f"unknown system(s) {', '.join(unknown)}; known: {known}")
        if not self.seeds:
            raise ValueError("BenchConfig.seeds must name at least one seed")
        for name in ("systems", "seeds"):
            if twice := repeated(getattr(self, name)):
                raise ValueError(f"BenchConfig.{name} names {', '.join(map(str, twice))} more than once; name each "
                                 "once")

    def _check_model_options(self) -> None:
        """The model options: expert width, upcycling, routed attention, a shared expert."""
        if self.expert_hidden is not None and self.expert_hidden < 1:
            raise ValueError(f"BenchConfig.expert_hidden must be >= 1 (None: the flavour's), got {self.expert_hidden}")
        if not 0 <= self.upcycle_at < 1:
            raise ValueError(f"BenchConfig.upcycle_at must be in [0, 1) (0: no upcycling), got {self.upcycle_at}")
        if self.upcycle_at and (self.moe_attention or self.ema_decay or self.shared_expert):
            raise ValueError("BenchConfig.upcycle_at does not combine with moe_attention, shared_expert or ema_decay")
        if self.shared_expert and self.moe_attention:
            raise ValueError("BenchConfig.shared_expert does not combine with moe_attention (the routed attention "
                             "projections would get a shared expert too, which the dense systems lack)")
        if self.shared_expert:
            from moe_gen.model import flavour

            hidden = self.expert_hidden or flavour(self.flavour).moe.expert_hidden
            if hidden % 2:
                raise ValueError(f"BenchConfig.shared_expert halves the experts' hidden width, which is {hidden} "
                                 "(odd); choose an even expert_hidden")
        if self.upcycle_at and self.steps < 2:
            raise ValueError(f"BenchConfig.upcycle_at needs steps >= 2 (a step in each stage), got {self.steps}")
        if self.upcycle_top_k != 1 and not self.upcycle_at:
            raise ValueError("BenchConfig.upcycle_top_k applies to upcycled systems; set upcycle_at too")
        if not 1 <= self.upcycle_top_k <= self.num_experts:
            raise ValueError(f"BenchConfig.upcycle_top_k must be in [1, num_experts = {self.num_experts}], "
                             f"got {self.upcycle_top_k}")

    def _check_distill(self) -> None:
        """Distillation's settings: α in [0, 1], τ > 0, and specialists trained in this run to learn from."""
        for name in ("distill_anneal", "distill_only_correct"):
            if getattr(self, name) and not self.distill:
                raise ValueError(f"BenchConfig.{name} is a setting of distill: set distill > 0 too")
        if not 0 <= self.distill <= 1 or not self.distill_temperature > 0:
            raise ValueError(f"BenchConfig.distill must be in [0, 1] (0: off) and distill_temperature > 0, got "
                             f"{self.distill} and {self.distill_temperature}")
        if self.distill and (not self.specialists or self.specialists_from or self.upcycle_at):
            raise ValueError("BenchConfig.distill teaches the generalists with the specialists this run trains: it "
                             "does not combine with specialists=False (--no-specialists), specialists_from (their "
                             "weights were not kept) or upcycle_at")


def repeated(values: Sequence) -> list:
    """The values that ``values`` holds more than once, in order of first appearance."""
    return [v for v, n in collections.Counter(values).items() if n > 1]


def _model_config(cfg: BenchConfig, system: str):
    from moe_gen.config import RouterConfig
    from moe_gen.model import flavour

    strategy = "attribute" if system in ("dense", "specialist") else system
    router = RouterConfig(strategy=strategy, tag_balance_window=cfg.tag_balance_window,
                          **({"tag_balance": cfg.tag_balance} if cfg.tag_balance else {}))
    config = flavour(cfg.flavour).with_moe(num_experts=cfg.num_experts, router=router, attention=cfg.moe_attention)
    if cfg.expert_hidden is not None:  # dense blocks of every=2 flavours as wide as a dense twin's
        config = config.with_moe(expert_hidden=cfg.expert_hidden).replace(
            ffn_hidden=config.moe.top_k * cfg.expert_hidden)
    if cfg.label_smoothing:
        config = config.replace(label_smoothing=cfg.label_smoothing)
    if system in ("dense", "specialist"):
        return config.dense_twin()
    if cfg.shared_expert:  # half the active width shared: k routed experts of H/2 plus one of k·H/2
        hidden, k = config.moe.expert_hidden, config.moe.top_k  # (even: BenchConfig checks it)
        experts = dataclasses.replace(config.moe.experts, shared_expert=True, shared_hidden=k * hidden // 2)
        config = config.with_moe(expert_hidden=hidden // 2, experts=experts)
    return config


def bench_suite(cfg: BenchConfig, names) -> list:
    """``suite_tasks(names)`` with the inputs ``cfg`` redeclares."""
    from moe_gen.quality.suite import suite_tasks

    return suite_tasks(names, pretrained_inputs=cfg.pretrained_inputs, bag_of_words=cfg.bag_of_words,
                       pose_summary=cfg.pose_summary, pose_noise=cfg.pose_noise,
                       pose_min_length=cfg.pose_min_length, subword_sampling=cfg.subword_sampling)


def held_out(task, limit: int):
    """``task`` restricted to ``limit`` rows evenly spaced over its rows (all when it has fewer): test
    splits may be ordered by label (pydoc topics are alphabetical), so the first rows would not be
    a fair sample."""
    from moe_gen.trainer.evaluation import spaced_indices

    if len(task) <= limit:
        return task
    return task.with_rows([task.data[i] for i in spaced_indices(len(task), limit)])


def _utilisation(tables) -> dict:
    """Per MoE layer: each expert's share of the assignments, and the share of experts that get at
    least 1/(4E) of them (``stats.utilisation``, the issue's criterion)."""
    from moe_gen.analysis import stats

    counts_LE = tables.counts_LETMR.sum((2, 3, 4))
    utilised_L = stats.utilisation(counts_LE, tables.num_experts)
    out = {}
    for layer, (name, E) in enumerate(zip(tables.layer_names, tables.num_experts)):
        counts = counts_LE[layer, :E]
        if counts.sum() > 0:
            out[name] = {"share": [round(float(s), 4) for s in counts / counts.sum()],
                         "utilised": float(utilised_L[layer])}
    return out


def _interference(model, tasks, rows: int = 16) -> dict:
    """The task interference matrix of the trained model on ``rows`` held-out rows per task, spread
    over each split (``analysis.report.task_interference``), with its mean off-diagonal value and the
    share of negative (conflicting) pairs, over the pairs whose cosine is defined (a task with a zero
    gradient has none: None in the matrix; NaN for both numbers when no pair is left)."""
    import math

    from moe_gen.analysis.report import task_interference
    from moe_gen.analysis.stats import defined_off_diagonal

    result = task_interference(model, tasks, rows)
    matrix = result["matrix"]
    off = defined_off_diagonal(matrix)
    return {"tasks": result["tasks"],
            "matrix": [[None if math.isnan(v) else round(float(v), 4) for v in row] for row in matrix.tolist()],
            "mean_off_diagonal": float(off.mean()) if off.numel() else math.nan,
            "negative_pairs": float((off < 0).double().mean()) if off.numel() else math.nan}


def _ema_decay(cfg: BenchConfig, steps: int) -> float:
    """The weight-average decay of a run of ``steps``: the generalists' horizon 1 / (1 − d) scaled
    by the run's share of their steps."""
    if cfg.ema_decay == 0:
        return 0.0
    return max(0.0, 1.0 - (1.0 - cfg.ema_decay) * cfg.steps / steps)


def train_and_score(job: dict) -> dict:
    """One model run: build, train, score on held-out rows (and record routing while scoring).

    ``job``: ``{"config": BenchConfig fields, "system": name, "tasks": [suite names], "seed": s}``.
    Returns scores per task, parameter counts, utilisation per MoE layer and seconds.
    """
    import torch

    from moe_gen.analysis import RoutingRecorder
    from moe_gen.model import GeneralistModel
    from moe_gen.tasks import Tokenizer
    from moe_gen.trainer.evaluation import evaluate_task

    cfg = BenchConfig(**job["config"])
    torch.set_num_threads(cfg.threads)
    suite = bench_suite(cfg, job["tasks"])
    train = [t.build("train") for t in suite]
    test = [held_out(t.build("test"), cfg.eval_limit) for t in suite]
    start = time.perf_counter()
    torch.manual_seed(job["seed"])
    system, steps = job["system"], job["steps"]
    if cfg.upcycle_at and system != "specialist":
        model, summary, last = _two_stage(cfg, system, train, steps, job["seed"])
    else:
        model = GeneralistModel.build(_model_config(cfg, system), train, Tokenizer.default())
        model, summary, last = _fit(cfg, model, train, steps, job["seed"], eval_tasks=test,
                                    distill_from=job.get("teachers"))
    if job.get("save_to"):  # (a teacher for the generalists: BenchConfig.distill)
        model.save_pretrained(job["save_to"])
    trained = time.perf_counter()
    answers = {task.name: [] for task in suite if task.classification}
    with RoutingRecorder(model) as recorder:
        scores = {task.name: evaluate_task(model, rows, pairs=answers.get(task.name))[task.metric]
                  for task, rows in zip(suite, test)}
    scores_train = {task.name: evaluate_task(model, held_out(rows, cfg.fit_rows))[task.metric]
                    for task, rows in zip(suite, train) if task.classification and cfg.fit_rows > 0}
    scores_last = None if last is model else {
        task.name: evaluate_task(last, rows)[task.metric] for task, rows in zip(suite, test)}
    tables = recorder.tables()
    routing = {}
    if tables.layer_names:
        from moe_gen.analysis import stats

        routing_stats = stats.summarize(tables)
        routing = {k: routing_stats[k] for k in ("mean_mi_task_bits", "mean_mi_modality_bits", "mean_entropy_bits",
                                           "mean_max_over_mean")}
    interference = _interference(model, test) if len(suite) > 1 else None
    return {"system": job["system"], "seed": job["seed"], "tasks": list(job["tasks"]), "scores": scores,
            "scores_train": scores_train,
            "errors": {t.name: held_out_errors(answers[t.name], t.metric) for t in suite if t.name in answers},
            **({"scores_last": scores_last} if scores_last is not None else {}),
            **({"curve": summary["curve"]} if "curve" in summary else {}),
            "parameters": model.num_parameters(), "active_parameters": model.num_parameters(active=True),
            "utilisation": _utilisation(tables) if tables.layer_names else {},
            "routing": routing, "interference": interference,
            "final_loss": summary["loss"], "train_seconds": trained - start,
            "seconds": time.perf_counter() - start, "steps": steps}


def held_out_errors(pairs: Sequence[tuple], metric: str = "accuracy") -> dict:
    """A classification task's held-out answers summarised: ``{"rows": scored rows, "errors":
    [[reference, answer, count], ...]}``, every (reference, answer) pair that ``metric`` scores wrong
    (``exact_match``: texts that differ after lower-casing and white-space folding; otherwise texts
    that differ) with its count, most frequent first (ties in the order of the labels' text). The
    errors sum to (1 − score) · rows for ``accuracy`` and ``exact_match``."""
    from moe_gen.tasks.metrics import METRICS

    same = METRICS.get("exact_match" if metric == "exact_match" else "accuracy")
    wrong = collections.Counter((str(reference), str(answer)) for answer, reference in pairs
                                if same([answer], [reference]) < 1.0)
    return {"rows": len(pairs),
            "errors": [[ref, answer, n] for (ref, answer), n in sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))]}


def _fit(cfg: BenchConfig, model, train, steps: int, seed: int, trainable: str = "all",
         task_weights: dict | None = None, eval_tasks=None, distill_from: dict | None = None):
    """Trains ``model`` on ``train`` for ``steps`` (with the ``cfg.lr_scales`` whose prefix ``model``
    has: a specialist lacks the other tasks' adapters); ``trainable``:
    ``TrainConfig.trainable``; ``task_weights``: sample the tasks by these weights instead of
    ``cfg.mixing``); returns the model to score (the weight average with ``ema_decay``), the
    trainer's summary and the last weights. With ``cfg.eval_every`` and ``eval_tasks`` the summary
    holds their ``curve``: each evaluation's step and every task's first metric. ``distill_from``:
    task → a teacher's folder (``BenchConfig.distill``)."""
    from moe_gen.trainer import TrainConfig, Trainer

    mixing = {"mixing": "weights", "task_weights": dict(task_weights)} if task_weights else {"mixing": cfg.mixing}
    names = [name for name, _ in model.named_parameters()]
    scales = {prefix: scale for prefix, scale in cfg.lr_scales.items() if any(n.startswith(prefix) for n in names)}
    train_config = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, lr_scales=scales,
                               warmup_steps=min(cfg.warmup_steps, steps // 10), **mixing,
                               temperature=cfg.temperature, batch_tasks=cfg.batch_tasks,
                               loss_average=cfg.loss_average, sam_rho=cfg.sam_rho, seed=seed,
                               progress=False, tensorboard=False,
                               checkpoint_every=0, ema_decay=_ema_decay(cfg, steps), trainable=trainable,
                               log_every=max(steps // 4, 1), eval_limit=cfg.eval_limit, num_threads=cfg.threads,
                               eval_every=cfg.eval_every if eval_tasks else 0, distill_from=dict(distill_from or {}),
                               distill_weight=cfg.distill, distill_temperature=cfg.distill_temperature,
                               distill_anneal=cfg.distill_anneal and bool(distill_from),
                               distill_only_correct=cfg.distill_only_correct and bool(distill_from))
    with tempfile.TemporaryDirectory(prefix="moe_gen_quality_") as run_dir:
        trainer = Trainer(model, train, train_config, output_dir=run_dir, overwrite=True, eval_tasks=eval_tasks)
        summary = trainer.fit()
        if train_config.eval_every:
            from moe_gen.trainer.logs import read_jsonl_log

            records = read_jsonl_log(os.path.join(run_dir, "logs", "eval.jsonl"))
            summary["curve"] = [{"step": r["step"], "scores": {task: next(iter(m.values())) for task, m in
                                                               r["eval"].items()}} for r in records]
        return trainer.trained_model(), summary, model


def first_stage_steps(steps: int, upcycle_at: float) -> int:
    """Dense steps before upcycling (``BenchConfig.upcycle_at``): at least one in each stage."""
    return min(max(1, round(steps * upcycle_at)), steps - 1)


def _two_stage(cfg: BenchConfig, system: str, train, steps: int, seed: int):
    """``BenchConfig.upcycle_at``: the dense model for the first share of ``steps``, then (MoE
    systems) upcycled with the system's router, then the remaining steps (a new optimizer,
    schedule and data order)."""
    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel
    from moe_gen.pretrained.upcycle import upcycle
    from moe_gen.tasks import Tokenizer

    first = first_stage_steps(steps, cfg.upcycle_at)
    model = GeneralistModel.build(_model_config(cfg, "dense"), train, Tokenizer.default())
    model, _, _ = _fit(cfg, model, train, first, seed)
    if system != "dense":
        model, _ = upcycle(model, num_experts=cfg.num_experts, top_k=cfg.upcycle_top_k,
                           router=RouterConfig(strategy=system), layers="all", seed=seed)
    return _fit(cfg, model, train, steps - first, seed + 10_000)


def specialist_steps(cfg: BenchConfig, train_tasks) -> dict[str, int]:
    """Each task's expected share of the generalist's ``cfg.steps`` under its mixing (at least 1):
    the steps of that task's specialist, at the same batch size."""
    from moe_gen.trainer import TrainConfig
    from moe_gen.trainer.sampling import mixing_weights

    weights = mixing_weights(train_tasks, TrainConfig(mixing=cfg.mixing, temperature=cfg.temperature))
    return {task.name: max(1, round(cfg.steps * w)) for task, w in zip(train_tasks, weights)}


# BenchConfig fields a specialist's result depends on (``specialists_from`` must match them all)
SPECIALIST_SETTINGS = ("steps", "batch_size", "lr", "warmup_steps", "label_smoothing", "sam_rho", "mixing",
                       "temperature", "loss_average", "flavour", "expert_hidden", "pretrained_inputs", "bag_of_words",
                       "pose_summary", "pose_noise", "pose_min_length", "subword_sampling", "eval_limit", "fit_rows",
                       "ema_decay", "threads", "lr_scales")


class SpecialistsFromError(ValueError):
    """``BenchConfig.specialists_from`` cannot stand in for this run's specialists (other settings, a
    missing run, other steps or classical baselines, an unreadable file): a user error, raised before
    any model trains, that ``scripts/bench_quality.py`` answers as a usage error."""


def reused_specialists(cfg: BenchConfig, per_task: dict[str, int], classical: Optional[dict] = None) -> list[dict]:
    """The specialist runs of ``cfg.specialists_from`` for the tasks of ``per_task`` (task → the
    steps its specialist takes here) and ``cfg.seeds``, marked ``reused_from``; raises
    ``SpecialistsFromError`` when that report cannot be read, was made with other specialist settings,
    lacks a run, trained one for other steps (its task's share of another task set), or — given this
    run's ``classical`` baselines (``check_reused_classical``) — scored a task's classical baselines
    otherwise."""
    path = cfg.specialists_from
    earlier = _specialists_report(path)
    config, runs = earlier["config"], earlier["runs"]
    defaults = dataclasses.asdict(BenchConfig())
    differ = [f"{k} {config.get(k, defaults[k])!r} there, {getattr(cfg, k)!r} here" for k in SPECIALIST_SETTINGS
              if config.get(k, defaults[k]) != getattr(cfg, k)]
    if differ:
        raise SpecialistsFromError(f"specialists_from {path!r} trained its specialists with other settings: "
                                   f"{'; '.join(differ)}")
    if classical is not None:
        check_reused_classical(cfg, classical, per_task, earlier)
    found = {(r["tasks"][0], r["seed"]): r for r in runs if r.get("system") == "specialist"}
    missing = [f"{n} seed {s}" for s in cfg.seeds for n in per_task if (n, s) not in found]
    if missing:
        raise SpecialistsFromError(f"specialists_from {path!r} has no specialist for {', '.join(missing)}")
    other_steps = sorted({f"{n} ({found[n, s]['steps']} steps there, {k} here)" for s in cfg.seeds
                          for n, k in per_task.items() if found[n, s]["steps"] != k})
    if other_steps:
        raise SpecialistsFromError(f"specialists_from {path!r} trained specialists for other steps, their tasks' "
                                   f"shares of another task set: {', '.join(other_steps)}")
    return [{**found[n, s], "reused_from": path} for s in cfg.seeds for n in per_task]


def check_reused_classical(cfg: BenchConfig, classical: dict, names, earlier: Optional[dict] = None) -> None:
    """Raises ``SpecialistsFromError`` when ``cfg.specialists_from`` (``earlier``: that report, if
    already read) scored the classical baselines of a task of ``names`` otherwise than this run's
    ``classical``: other held-out rows, so its specialists were scored on other rows (``--merge``
    refuses the same)."""
    path = cfg.specialists_from
    theirs, ours = _held_out_scores((earlier or _specialists_report(path))["classical"]), _held_out_scores(classical)
    other = sorted(n for n in names if n in theirs and n in ours and theirs[n] != ours[n])
    if other:
        raise SpecialistsFromError(f"specialists_from {path!r} has other classical baselines for {', '.join(other)} "
                                   "(other held-out rows?): its specialists were scored on other rows")


def _specialists_report(path: str) -> dict:
    """The ``quality.json`` at ``path``; an unreadable one refused as ``SpecialistsFromError``."""
    try:
        return _read_report(path)
    except ValueError as exc:
        raise SpecialistsFromError(f"specialists_from: {exc}") from None


def _jobs(cfg: BenchConfig, names: Sequence[str], per_task: dict[str, int],
          teachers: Optional[str] = None) -> list[dict]:
    """Every run to train, longest first; with ``teachers`` (a folder; ``BenchConfig.distill``) the
    specialists save themselves under it and the generalists of their seed learn from them."""
    base = dataclasses.asdict(cfg)
    taught = (lambda seed: {n: os.path.join(teachers, f"seed{seed}", n) for n in names}) if teachers else None
    jobs = [{"config": base, "system": s, "tasks": list(names), "seed": seed, "steps": cfg.steps,
             **({"teachers": taught(seed)} if taught else {})}
            for seed in cfg.seeds for s in cfg.systems]
    if cfg.specialists and not cfg.specialists_from:
        jobs += [{"config": base, "system": "specialist", "tasks": [n], "seed": seed, "steps": per_task[n],
                  **({"save_to": taught(seed)[n]} if taught else {})}
                 for seed in cfg.seeds for n in names]
    jobs.sort(key=lambda j: -j["steps"] * len(j["tasks"]))  # longest first: the pool ends together
    return jobs


def _run_jobs(jobs: list[dict], workers: int, say) -> list[dict]:
    if workers <= 1:
        results = []
        for i, job in enumerate(jobs):
            results.append(train_and_score(job))
            say(f"[{i + 1}/{len(jobs)}] {job['system']} {','.join(job['tasks']) if len(job['tasks']) == 1 else ''} "
                f"seed {job['seed']}: {results[-1]['seconds']:.0f} s")
        return results
    # spawn: workers start clean (no forked torch thread pools).
    context = multiprocessing.get_context("spawn")
    results = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(train_and_score, job): job for job in jobs}
        for i, future in enumerate(concurrent.futures.as_completed(futures)):
            job = futures[future]
            results.append(future.result())
            label = job["tasks"][0] if job["system"] == "specialist" else ""
            say(f"[{i + 1}/{len(jobs)}] {job['system']} {label} seed {job['seed']}: "
                f"{results[-1]['seconds']:.0f} s")
    return results


def run_benchmark(cfg: BenchConfig, *, say=print) -> dict:
    """Runs every system and returns the report (also written to ``cfg.output_dir``); a
    ``specialists_from`` that cannot stand in is refused (``SpecialistsFromError``) before any model
    trains, and before the classical baselines unless it is theirs that differ."""
    from moe_gen.quality.report import build_report, write_report

    start = time.perf_counter()
    suite = bench_suite(cfg, cfg.tasks)
    names = [t.name for t in suite]
    train_tasks = [task.build("train") for task in suite]
    per_task = specialist_steps(cfg, train_tasks)
    reused = reused_specialists(cfg, per_task) if cfg.specialists_from else []  # settings, runs and steps
    classical = _classical_baselines(cfg, suite, train_tasks)
    say(f"classical baselines: {time.perf_counter() - start:.0f} s")
    if cfg.specialists_from:
        check_reused_classical(cfg, classical, per_task)
    if cfg.distill:  # the specialists first: the generalists learn from them
        with tempfile.TemporaryDirectory(prefix="moe_gen_teachers_") as teachers:
            jobs = _jobs(cfg, names, per_task, teachers)
            results = _run_jobs([j for j in jobs if "save_to" in j], cfg.workers, say)
            results += _run_jobs([j for j in jobs if "save_to" not in j], cfg.workers, say)
    else:
        results = _run_jobs(_jobs(cfg, names, per_task), cfg.workers, say) + reused
    report = build_report(cfg, suite, classical, results, wall_seconds=time.perf_counter() - start)
    write_report(report, cfg.output_dir)
    return report


def _classical_baselines(cfg: BenchConfig, suite, train_tasks) -> dict:
    """Per classification task, the classical baselines' scores on its ``cfg.eval_limit`` held-out
    rows (and the frozen-states one where the task has it)."""
    from moe_gen.quality.baselines import FROZEN_STATES, classical_scores, frozen_states_score

    classical = {}
    for task, train in zip(suite, train_tasks):
        if task.classification:
            scored = held_out(task.build("test"), cfg.eval_limit)
            classical[task.name] = classical_scores(task, [train.data[i] for i in range(len(train))],
                                                    [scored.data[i] for i in range(len(scored))])
            if task.frozen_states:
                classical[task.name][FROZEN_STATES] = frozen_states_score(task, train, scored)
    return classical


# BenchConfig fields that may differ between reports merged into one: which seeds and systems ran,
# whether and where from the specialists came, how many processes ran them and where the report went.
MERGE_FREE = ("seeds", "systems", "specialists", "specialists_from", "workers", "output_dir")


def _read_report(path: str, kind: str = "quality.json", keys: Sequence[str] = ("config", "runs", "classical")) -> dict:
    """A benchmark report read from ``path``; ``ValueError`` naming the file when it cannot be read
    or lacks one of ``keys``."""
    from moe_gen.trainer.checkpoint import read_json_object

    return read_json_object(path, keys, kind)


def _held_out_scores(classical: dict) -> dict:
    """The classical baselines' held-out scores, without their cross-validated ones (which reports
    made before 2026-12-04 lack)."""
    return {task: {k: v for k, v in base.items() if k != "cv"} for task, base in classical.items()}


def _with_cross_validation(suite, classical: dict) -> dict:
    """``classical`` with the cross-validated scores of every task that lacks them (deterministic,
    from the suite's training rows), for merging reports made before they were scored."""
    from moe_gen.quality.baselines import cross_validated_scores

    out = {}
    for task in suite:
        if task.name in classical:
            out[task.name] = dict(classical[task.name])
            if "cv" not in out[task.name]:
                train = task.build("train")
                out[task.name]["cv"] = cross_validated_scores(task, [train.data[i] for i in range(len(train))])
    return out


def settings_changed(first: dict, second: dict) -> dict:
    """The ``BenchConfig`` settings, less ``MERGE_FREE`` (which never change a run's scores), in which
    two reports' configurations differ: name → [first's value, second's]. A setting a report was made
    before is read at its default (as JSON holds it: tuples as lists)."""
    defaults = json.loads(json.dumps(dataclasses.asdict(BenchConfig())))
    fields = {f.name for f in dataclasses.fields(BenchConfig)} - set(MERGE_FREE)
    return {k: [first.get(k, defaults[k]), second.get(k, defaults[k])] for k in sorted(fields)
            if first.get(k, defaults[k]) != second.get(k, defaults[k])}


def merge_reports(paths: Sequence[str], output_dir: str) -> dict:
    """One report from several ``quality.json`` of the same settings on other seeds or systems
    (e.g. a run of ``--seeds 0 1 2`` and one of ``--seeds 3 4 5``, or a dense run and an attribute
    run with ``--no-specialists``): their runs pooled, seeds and systems united, wall times added;
    written to ``output_dir``. Raises ``ValueError`` naming the file and what differs when a
    setting other than ``MERGE_FREE`` differs, the classical baselines differ (other held-out
    rows) or a system's seed is in two reports."""
    from moe_gen.quality.report import build_report, write_report

    if len(paths) < 2:
        raise ValueError(f"merging needs at least two reports, got {len(paths)}")
    reports = [_read_report(p) for p in paths]
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    first = {k: v for k, v in reports[0]["config"].items() if k in fields}
    for path, report in zip(paths[1:], reports[1:]):
        differ = [f"{k} {a!r} in {paths[0]!r}, {b!r} here"
                  for k, (a, b) in settings_changed(first, report["config"]).items()]
        if differ:
            raise ValueError(f"{path!r} was made with other settings: {'; '.join(differ)}")
        if _held_out_scores(report["classical"]) != _held_out_scores(reports[0]["classical"]):
            raise ValueError(f"{path!r} has other classical baselines than {paths[0]!r} (other held-out rows?)")
    seen: dict[tuple, str] = {}
    for path, report in zip(paths, reports):
        for run in report["runs"]:
            key = (run["system"], run["seed"], tuple(run["tasks"]))
            if key in seen:
                raise ValueError(f"{path!r} and {seen[key]!r} both hold the {run['system']} run of seed "
                                 f"{run['seed']} ({', '.join(run['tasks'])})")
            seen[key] = path
    seeds = sorted({s for report in reports for s in report["config"]["seeds"]})
    systems = {s for report in reports for s in report["config"]["systems"]}
    cfg = BenchConfig(**{**first, "tasks": tuple(first.get("tasks", ())), "seeds": tuple(seeds),
                         "systems": tuple(s for s in GENERALISTS + EXTRA_SYSTEMS if s in systems),
                         "output_dir": output_dir,
                         "specialists": any(report["config"].get("specialists", True) for report in reports),
                         "specialists_from": None})
    suite = bench_suite(cfg, cfg.tasks)
    classical = next((rep["classical"] for rep in reports if all("cv" in b for b in rep["classical"].values())),
                     None) or _with_cross_validation(suite, reports[0]["classical"])
    report = build_report(cfg, suite, classical, [r for rep in reports for r in rep["runs"]],
                          wall_seconds=sum(float(rep.get("wall_seconds", 0.0)) for rep in reports))
    write_report(report, output_dir)
    return report


def default_output(quick: bool) -> str:
    return os.path.join("bench_results", "quality_quick" if quick else "quality")

