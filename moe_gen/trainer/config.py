"""Training configuration (``TrainConfig``) and the run configuration the ``moe-gen`` command reads.

    RunConfig ─┬─ model: flavour name + ModelConfig overrides
               ├─ train: TrainConfig  (mixing, budgets, optimiser, checkpoints, logs)
               └─ tasks: preset names (or Task objects from Python)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Union

import torch

from moe_gen.config import ConfigBase

__all__ = ["TrainConfig", "MIXING", "TRAINABLE"]

MIXING = ("proportional", "temperature", "uniform", "weights", "all")
BATCH_TASKS = ("mixed", "single")
TRAINABLE = ("all", "experts", "routers", "adapters", "new_adapters")
PRECISIONS = ("fp32", "bf16")
SHARDING = ("replicate", "fsdp", "hsdp")


@dataclasses.dataclass(kw_only=True)
class TrainConfig(ConfigBase):
    """How a run trains.

    Attributes:
        steps: optimizer steps.
        batch_size: samples per micro-batch on each process.
        accumulate: micro-batches per optimizer step (gradient accumulation).
        lr, min_lr_ratio, warmup_steps: AdamW learning rate with linear warm-up (step i of the
            warm-up at ``lr · (i + 1) / warmup_steps``), then cosine decay from ``lr`` that reaches
            ``lr · min_lr_ratio`` at step ``steps``, one past the last (the last step runs just
            above it, as transformers' cosine schedule does).
        weight_decay, betas, eps: AdamW settings (no decay on biases, norms and embeddings; betas two
            numbers in [0, 1)).
        clip_norm: global gradient-norm clipping (0 disables).
        sam_rho: ρ of sharpness-aware minimisation (SAM, Foret et al. 2021; 0: off). Each step
            takes the gradient g of its micro-batches, moves the weights by ρ·g/‖g‖ (the norm over
            every trainable parameter, before clipping), takes the gradient of the same micro-batches
            there, moves the weights back and steps with that one (clipped as usual): two forward
            and backward passes a step. The step's logged loss is the first pass's; routing
            balance advances once per step, from the first pass.
        distill_from: task name → a teacher model for it, a ``save_pretrained`` folder (e.g. a
            specialist trained on that task alone): each scored token of the task also learns the
            teacher's distribution there (``moe_gen.teachers``; the generative objective only).
        distill_weight: α in [0, 1], the teacher's share of those tokens' loss:
            ``(1 − α)·CE + α·τ²·H(teacher, student)``.
        distill_temperature: τ > 0, both distributions softened by it.
        distill_anneal: teacher annealing (Clark et al. 2019): the teachers' weight falls linearly
            from ``distill_weight`` at the first step to 0 at the last, so the run ends on the
            references alone.
        distill_only_correct: a scored token learns its teacher's distribution only where the
            teacher's most likely token is the reference; elsewhere it keeps the plain loss, so a
            teacher's wrong answers are not taught (a weak teacher then teaches only what it gets
            right).
        ema_decay: d in [0, 1): keep an exponential moving average of the weights,
            ``avg ← d·avg + (1 − d)·w`` after every optimizer step (PyTorch's ``AveragedModel``;
            buffers such as routing biases are copied, not averaged), which ``evaluate`` and
            ``save_model`` then use and checkpoints keep. 0 (default): no average. One process or
            ``sharding="replicate"`` only (not with FSDP or expert parallelism).
        precision: ``fp32`` or ``bf16`` (autocast; the router gate stays fp32).
        seed: seeds model initialisation order, sampling, augmentation and dropout.
        mixing: how tasks share steps: ``proportional`` (to data size), ``temperature``
            (size^(1/τ), T5/mT5), ``uniform``, ``weights`` (``task_weights``), ``all`` (OFASys: every
            task contributes to every micro-batch; the loss is normalised by tokens).
        temperature: τ for ``temperature`` mixing.
        batch_tasks: what one micro-batch holds: ``mixed`` (each row's task drawn by the mixing
            weights) or ``single`` (one task per micro-batch, drawn by the same weights, as
            Uni-Perceiver-MoE gives each GPU one task per step): with ``mixed`` a task of a few
            percent of the draws has about one row in most batches, so its own parameters (its
            adapter) take many Adam steps of one-row gradients, each as large as a full batch's;
            with ``single`` they take about the specialist's steps, over full batches. Not with
            ``mixing="all"``.
        task_weights: sampling weight per task name for ``weights`` mixing (default 1; a ``Task``'s
            own ``weight`` is used when the name is absent).
        loss_weights: loss weight per task name: a task's token cross-entropy (and its frame
            rows' L1 and stop losses, and a contrastive task's rows' InfoNCE terms) is multiplied by
            it inside the batch's mean, whose count stays unweighted, so the weight acts whatever
            else the batch holds (one-task batches and tasks alone in their objective included). 0
            leaves the task's loss out.
        loss_average: how the token cross-entropy is averaged over a micro-batch: ``token`` (every
            scored token once: long answers, such as a detection's boxes, outweigh one-token
            labels) or ``sample`` (each sample's mean first, then the samples': every sample weighs
            the same). See ``GenerativeObjective``.
        lr_scales: parameter-name prefix → learning-rate multiplier (the longest matching prefix
            wins; others train at ``lr``): e.g. ``{"encoder.": 0.1, "token_embedding": 0.1}``
            trains a pretrained encoder ten times slower than the new decoder and adapters.
        modality_budget: at most this many positions of a modality (name → count) in a micro-batch,
            so long audio or video samples do not crowd out text; a sample that would exceed it is
            left for a later batch (a lone over-budget sample is still taken).
        max_tokens: at most this many positions (encoder + decoder) in a micro-batch.
        frame_weight: weight of the continuous-target (L1 + stop) loss, in every objective (the
            contrastive one's caption loss included).
        masked_input_budget, masked_target_budget: the 4M budgets of ``masked`` tasks: inputs are
            drawn first, targets among the positions left, and a sample of no more positions than
            the input budget shows all but one, its target (``moe_gen.masking.mask_sample``).
        masked_alpha: the Dirichlet α that splits the input budget across a sample's modalities: a
            number, or one per modality (``{"IMAGE": 1.0, "TEXT": 0.1}``: text is seldom an input;
            a modality not named gets 1.0; unknown names are refused when training starts, and by
            ``MaskedObjective``). 4M's RGB-to-all mixture is ``{"IMAGE": 1000, "TEXT": 0, ...}``: 0
            for every other modality.
        masked_target_alpha: the same for the target budget; None: ``masked_alpha``.
        checkpoint_every: write a checkpoint every N steps (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        max_failed_checkpoints: stop the run (``CheckpointError``) after this many checkpoint writes
            in a row failed (full disk, unwritable directory); a failure while the run directory
            holds no checkpoint at all stops it at once, since nothing of the run would be kept.
        max_bad_steps: stop after this many consecutive steps with a non-finite loss or gradient.
        log_every: steps between log lines (JSONL, TensorBoard, progress bar postfix).
        progress: show a progress bar.
        tensorboard: write TensorBoard scalars (needs the ``tensorboard`` package).
        trainable: what trains: ``all``, ``experts``, ``routers``, ``adapters`` (with the frame and
            stop heads) or ``new_adapters`` (those ``GeneralistModel.add_tasks`` created). A refused
            ``Trainer`` leaves the model as it was given (no tasks added, flags unchanged).
        expert_parallel: size of the expert-parallel group under ``torchrun`` (1: experts replicated).
        sharding: how dense parameters live on several processes: ``replicate`` (every process holds
            them all; PyTorch's DDP averages their gradients in buckets during backward; see
            ``moe_gen.distributed.replicate``), ``fsdp`` (PyTorch's FSDP2:
            each of W processes holds 1/W of every parameter, gradient and AdamW moment; see
            ``moe_gen.fsdp``) or ``hsdp`` (FSDP2 sharding over groups of ``shard_size`` processes,
            replicated across groups; ``shard_size=1``: replicated, FSDP2 all-reducing gradients
            during backward). One process: no effect.
        shard_size: processes a parameter is sharded over with ``sharding="hsdp"``.
        fsdp_unit: what FSDP2 gathers and reduces at once: each ``block`` (least memory) or each
            ``stack`` (fewer, larger collectives).
        activation_checkpointing: recompute each block's activations in backward instead of keeping
            them (``GeneralistModel.set_activation_checkpointing``): less memory, about a third
            more compute per step, the same gradients.
        eval_limit: rows per task that ``evaluate`` scores, evenly spaced over its rows (>= 1; None: all).
        eval_batch_size: rows per ``infer`` call in ``evaluate`` (>= 1).
        eval_every: evaluate the trainer's ``eval_tasks`` every N steps and at the last step, on
            ``eval_limit`` rows each, while training (0: only when asked, ``Trainer.evaluate``). Each
            evaluation is a line of ``logs/eval.jsonl`` (``{"step", "eval": {task: {metric: value}},
            "eval_score"}``) and TensorBoard scalars ``eval/<task>/<metric>``; it does not change the
            training (its random draws are its own). ``eval_score`` is what ``best_metric`` names.
        keep_best: with ``eval_every``, save the weights of the evaluation with the best
            ``eval_score`` so far to ``<output_dir>/best`` (``save_pretrained``, atomic; checkpoints
            keep its step and score, so a resumed run goes on comparing with it); ``fit``'s summary
            names it (``best_step``, ``best_score``, ``best_model``). Choose it on validation rows,
            not on the rows you report: the score of the step chosen on them is optimistic.
        patience: with ``eval_every``: stop the run when this many evaluations in a row have not
            beaten the best ``eval_score`` (early stopping; its last step is checkpointed, a resumed
            run stays stopped, and ``fit``'s summary says ``stopped_early``). 0: train to ``steps``.
        best_metric: what ``eval_score`` is: ``mean`` (the mean over the eval tasks of each one's
            first metric, losses and error rates negated so that higher is better) or
            ``<task>/<metric>`` (that one, negated when lower is better).
        num_threads: torch intra-op threads (>= 1; None: torch's default).
        device: ``auto`` (the process's GPU when CUDA is available — ``cuda:LOCAL_RANK`` under
            torchrun, ``moe_gen.distributed.local_rank()`` — else the CPU), or a torch device string.
    """

    steps: int = 200
    batch_size: int = 16
    accumulate: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    clip_norm: float = 1.0
    sam_rho: float = 0.0
    ema_decay: float = 0.0
    distill_from: dict = dataclasses.field(default_factory=dict)
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    distill_anneal: bool = False
    distill_only_correct: bool = False
    precision: str = "fp32"
    seed: int = 0
    mixing: str = "temperature"
    temperature: float = 2.0
    batch_tasks: str = "mixed"
    task_weights: dict = dataclasses.field(default_factory=dict)
    loss_weights: dict = dataclasses.field(default_factory=dict)
    loss_average: str = "token"
    lr_scales: dict = dataclasses.field(default_factory=dict)
    modality_budget: dict = dataclasses.field(default_factory=dict)
    max_tokens: Optional[int] = None
    frame_weight: float = 1.0
    masked_input_budget: int = 128
    masked_target_budget: int = 128
    masked_alpha: Union[float, dict] = 0.5
    masked_target_alpha: Optional[Union[float, dict]] = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_failed_checkpoints: int = 3
    max_bad_steps: int = 5
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    trainable: str = "all"
    expert_parallel: int = 1
    sharding: str = "replicate"
    shard_size: int = 1
    fsdp_unit: str = "block"
    activation_checkpointing: bool = False
    eval_limit: Optional[int] = 100
    eval_batch_size: int = 64
    eval_every: int = 0
    keep_best: bool = False
    patience: int = 0
    best_metric: str = "mean"
    num_threads: Optional[int] = None
    device: str = "auto"

    def __post_init__(self) -> None:
        self.check_types()  # a value such as --train.lr abc is named before any comparison below
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.accumulate >= 1, f"accumulate must be >= 1, got {self.accumulate}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.mixing in MIXING, f"mixing must be one of {', '.join(MIXING)}; got {self.mixing!r}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.batch_tasks in BATCH_TASKS,
             f"batch_tasks must be one of {', '.join(BATCH_TASKS)}; got {self.batch_tasks!r}"),
            (self.batch_tasks == "mixed" or self.mixing != "all",
             "batch_tasks='single' draws one task per micro-batch; mixing='all' puts every task in each"),
            (self.loss_average in ("token", "sample"),
             f"loss_average must be 'token' or 'sample', got {self.loss_average!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"),
            (self.trainable in TRAINABLE, f"trainable must be one of {', '.join(TRAINABLE)}; got {self.trainable!r}"),
            (self.max_bad_steps >= 1, f"max_bad_steps must be >= 1, got {self.max_bad_steps}"),
            (abs(self.seed) < 2**40,  # (seed · 1000 + rank seeds torch, whose seeds are 64-bit)
             f"seed must be between -2**40 and 2**40 (torch's generators take 64-bit seeds derived from it), "
             f"got {self.seed}"),
            (self.expert_parallel >= 1, f"expert_parallel must be >= 1, got {self.expert_parallel}"),
            (self.sharding in SHARDING, f"sharding must be one of {', '.join(SHARDING)}; got {self.sharding!r}"),
            (self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}"),
            (self.masked_input_budget >= 0 and self.masked_target_budget >= 1,
             f"masked_input_budget must be >= 0 and masked_target_budget >= 1 (positions a sample shows and "
             f"predicts), got {self.masked_input_budget} and {self.masked_target_budget}"),
            (self.fsdp_unit in ("block", "stack"), f"fsdp_unit must be 'block' or 'stack', got {self.fsdp_unit!r}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.max_failed_checkpoints >= 1,
             f"max_failed_checkpoints must be >= 1, got {self.max_failed_checkpoints}"),
            (self.checkpoint_every >= 0,
             f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.eval_limit is None or self.eval_limit >= 1,
             f"eval_limit must be >= 1 or None (every row), got {self.eval_limit}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.num_threads is None or self.num_threads >= 1,
             f"num_threads must be >= 1 or None (torch's default), got {self.num_threads}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be >= 1 or None, got {self.max_tokens}"),
            (self.clip_norm >= 0, f"clip_norm must be >= 0 (0 disables), got {self.clip_norm}"),
            (self.sam_rho >= 0, f"sam_rho must be >= 0 (0: no sharpness-aware minimisation), got {self.sam_rho}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.frame_weight >= 0, f"frame_weight must be >= 0, got {self.frame_weight}"),
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (all(0 <= beta < 1 for beta in self.betas),  # (AdamW refused 1.5 only when the run was built)
             f"betas must be two numbers in [0, 1), got {list(self.betas)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")
        self._check_finite_and_device()
        self._check_mappings()
        self._check_evaluation()
        self._check_distillation()

    def _check_distillation(self) -> None:
        """The teachers' settings: α in [0, 1], τ > 0, teachers' folders, and no schedule or
        selection without teachers."""
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"TrainConfig: distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ValueError(f"TrainConfig: distill_temperature must be > 0, got {self.distill_temperature}")
        for task, path in self.distill_from.items():
            if not isinstance(path, str) or not path:
                raise ValueError(f"TrainConfig.distill_from[{task!r}] must be the folder of a saved teacher model, "
                                 f"got {path!r}")
        for name in ("distill_anneal", "distill_only_correct"):
            if getattr(self, name) and not self.distill_from:
                raise ValueError(f"TrainConfig: {name} is a setting of distillation: name the teachers in "
                                 "distill_from too")

    def _check_evaluation(self) -> None:
        """The settings of evaluation while training."""
        if self.eval_every < 0:
            raise ValueError(f"TrainConfig: eval_every must be >= 0 (0: no evaluation while training), got "
                             f"{self.eval_every}")
        if self.patience < 0:
            raise ValueError(f"TrainConfig: patience must be >= 0 (0: train to steps), got {self.patience}")
        for name in ("keep_best", "patience"):
            if getattr(self, name) and not self.eval_every:
                raise ValueError(f"TrainConfig: {name} reads the evaluations while training: set eval_every > 0 too")
        if self.best_metric != "mean" and "/" not in self.best_metric.strip("/"):
            raise ValueError(f"TrainConfig: best_metric must be 'mean' or '<task>/<metric>', got {self.best_metric!r}")

    def _check_finite_and_device(self) -> None:
        """Every number finite (``lr=inf`` passed ``lr > 0`` and trained NaN weights) and ``device`` a
        device torch can name."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TrainConfig: {field.name} must be a finite number, got {value}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"TrainConfig: device must be 'auto' or a torch device such as cpu, cuda or "
                                 f"cuda:1, got {self.device!r} ({exc})") from None

    def _check_mappings(self) -> None:
        """The values of the fields keyed by task, parameter prefix or modality."""
        for name in ("task_weights", "loss_weights"):
            for task, weight in getattr(self, name).items():
                if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < math.inf:
                    raise ValueError(f"TrainConfig.{name}[{task!r}] must be a finite number >= 0, got {weight!r}")
        for prefix, scale in self.lr_scales.items():
            if not isinstance(prefix, str) or isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                    or not 0 <= scale < math.inf:  # (inf trained one step, then every loss was NaN)
                raise ValueError(f"TrainConfig.lr_scales maps parameter-name prefixes to finite multipliers >= 0, got "
                                 f"{prefix!r}: {scale!r}")
        for name in ("masked_alpha", "masked_target_alpha"):
            alpha = getattr(self, name)
            for modality, value in (alpha.items() if isinstance(alpha, dict) else [("", alpha)]):
                # None only as the whole masked_target_alpha (it then follows masked_alpha)
                allowed_none = value is None and not modality and name == "masked_target_alpha"
                if not allowed_none and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                         or not 0 <= value < math.inf):  # (inf: NaN shares mid-step)
                    where = f"[{modality!r}]" if modality else ""
                    raise ValueError(f"TrainConfig.{name}{where} must be a finite number >= 0, got {value!r}")
        for modality, budget in self.modality_budget.items():
            if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
                raise ValueError(f"TrainConfig.modality_budget[{modality!r}] must be an integer >= 1, got {budget!r}")


@dataclasses.dataclass
class RunConfig(ConfigBase):
    """One training run, as a recipe (``moe_gen.trainer.recipes``) or a YAML file describes it and
    ``moe-gen pretrain`` / ``finetune`` carry it out. YAML over a recipe and ``--a.b value`` flags
    merge into its dict form by one rule (``moe_gen.config.merge``); ``from_dict`` then checks every key.

    Attributes:
        model: how the model is made: ``flavour`` plus ``ModelConfig`` overrides (``{"flavour":
            "tiny", "moe": {"router": {"strategy": "attribute"}}}``), or ``init: "hf:..."`` (and ``upcycle``)
            for a pretrained backbone; empty for ``finetune``, which loads a saved model.
        train: the ``TrainConfig``.
        tasks: preset names trained on (their ``train`` split).
        eval_tasks: preset names evaluated on their ``test`` split (empty: ``tasks``).
        output_dir: where logs, checkpoints, the model and ``eval.json`` go.
        baseline: evaluate the model before training too (the table shows both).
    """

    model: dict = dataclasses.field(default_factory=dict)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tasks: tuple[str, ...] = ()
    eval_tasks: tuple[str, ...] = ()
    output_dir: str = "runs/default"
    baseline: bool = False

    def __post_init__(self) -> None:
        self.check_types()
        if not self.output_dir:
            raise ValueError("RunConfig.output_dir must name the run's folder, got an empty string")
