"""The multi-task trainer.

    trainer = Trainer(model, tasks, TrainConfig(steps=500), output_dir="runs/demo")
    trainer.fit()                 # mixes tasks, balances modalities, checkpoints, logs
    trainer.evaluate(test_tasks)  # {task: {metric: value}}

One optimizer step: ``accumulate`` micro-batches drawn by the ``TaskSampler`` (mixing weights,
modality budgets) → each objective on its share of the samples (generative, contrastive, masked)
→ backward → gradients synchronised across processes (dense averaged, experts kept per shard) →
global-norm clipping → AdamW (warm-up + cosine) → logs → checkpoint every N steps.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import random
import shutil
import time
import zlib
from typing import Optional, Sequence

import torch

from moe_gen import distributed
from moe_gen.analysis.recorder import RoutingRecorder
from moe_gen.experts.parallel import ExpertParallelPlan
from moe_gen.model.model import NEW_HEADS, GeneralistModel
from moe_gen.objectives import OBJECTIVES, LossScales
from moe_gen.routing.balance import balance_state, restore_balance_state
from moe_gen.tasks.task import Task
from moe_gen.teachers import teacher_fingerprints
from moe_gen.trainer.averaging import update_average, weight_average
from moe_gen.trainer.best import EvaluationWhileTraining
from moe_gen.trainer.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rank_state_file,
    read_trainer_state,
    save_checkpoint,
)
from moe_gen.trainer.config import TrainConfig
from moe_gen.trainer.evaluation import evaluate as evaluate_tasks
from moe_gen.trainer.lock import RunDirectoryInUse, RunLock
from moe_gen.trainer.logs import RunLogger, iter_jsonl_log, routing_summary
from moe_gen.trainer.optim import WarmupCosine, _fusable, _param_groups, select_trainable  # noqa: F401
from moe_gen.trainer.resume import check_resumable, check_same_model
from moe_gen.trainer.sampling import TaskSampler, check_known_labels, check_task_settings, warn_of_batch_local_balance
from moe_gen.trainer.scales import annealed_teachers, step_loss_scales
from moe_gen.trainer.undo import model_undo

__all__ = ["Trainer", "TrainingDiverged", "select_trainable", "WarmupCosine"]

logger = logging.getLogger("moe_gen")


class TrainingDiverged(RuntimeError):
    """``TrainConfig.max_bad_steps`` steps in a row had a non-finite loss or gradient norm;
    ``record`` is the log record of the step that stopped the run (``Trainer.fit`` logs it)."""

    def __init__(self, message: str, record: Optional[dict] = None) -> None:
        super().__init__(message)
        self.record = record


def _log_counts(batch, task_names, objective) -> dict[str, int]:
    """What a batch's logged means are over: what its objective's token loss averages (scored
    tokens, or samples: ``loss_counts``), scored tokens (``token_accuracy``), target frame rows
    (``frame_loss``), each task's tokens and rows (``task_loss/<task>``) and what the objective's
    own parts are means over (``part_counts``: the contrastive caption loss, InfoNCE term and
    retrieval accuracy), so that micro-batches combine as one large batch would (exactly for one
    objective and one frame adapter)."""
    from moe_gen.tasks.batch import IGNORE_INDEX

    scored = batch.labels != IGNORE_INDEX
    task_BL = batch.decoder.tags.task
    ids = [task_BL[scored]] + [task_BL.reshape(-1)[index] for index in batch.frame_index.values()]
    rows = sum(int(index.numel()) for index in batch.frame_index.values())
    averaged = objective.loss_counts(batch)[0] if hasattr(objective, "loss_counts") else int(scored.sum())
    out = {"token_loss": averaged, "token_accuracy": int(scored.sum()), "frame_loss": rows}
    per_task = torch.bincount(torch.cat(ids).cpu(), minlength=len(task_names)).tolist()
    out.update({f"task_loss/{task_names[t]}": n for t, n in enumerate(per_task) if n})
    out.update(objective.part_counts(batch) if hasattr(objective, "part_counts") else {})
    return out


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    """Mean of the values, each by its weight (a plain mean where the weights sum to 0)."""
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else sum(v for v, _ in pairs) / len(pairs)


class Trainer(EvaluationWhileTraining):
    """Trains one generalist model on a mixture of tasks.

    Args:
        model: a ``GeneralistModel``; tasks it does not know yet are added (``add_tasks``), with new
            adapters where their features need them (fine-tuning).
        tasks: the training tasks (``moe_gen.tasks.Task``).
        config: ``TrainConfig``.
        output_dir: where ``checkpoints/``, ``logs/train.jsonl`` and ``tensorboard/`` go.
        eval_tasks: held-out tasks for ``evaluate()`` (default: the training tasks).
        resume: continue from the newest checkpoint in ``output_dir`` if there is one.
        overwrite: start over in an ``output_dir`` that holds checkpoints of an earlier run (they
            are deleted); without it (and without ``resume``) such a directory is an error.

    One run per directory: the trainer locks ``output_dir`` (``moe_gen.trainer.lock``) and a second
    trainer on it, in this process or another, raises ``RunDirectoryInUse``. The lock is released
    when ``fit`` returns or raises, or, inside ``with Trainer(...) as trainer:``, at the end of the
    block (so evaluation and ``save_model`` after ``fit`` run under it too), or by ``close()``.

    Checkpoint writes that fail (full disk, unwritable directory) are reported and counted; the run
    stops with ``CheckpointError`` after ``config.max_failed_checkpoints`` failures in a row, or at
    the first one while the directory holds no checkpoint at all. ``fit``'s summary names the latest
    checkpoint (``checkpoint``, ``checkpoint_step``; None when there is none) and the failed writes.
    """

    def __init__(self, model: GeneralistModel, tasks: Sequence[Task], config: Optional[TrainConfig] = None, *,
                 output_dir: str = "runs/default", eval_tasks: Optional[Sequence[Task]] = None,
                 resume: bool = False, overwrite: bool = False) -> None:
        from moe_gen.tasks.task import task_list

        if config is not None and not isinstance(config, TrainConfig):
            raise ValueError(f"Trainer takes a TrainConfig (TrainConfig(**settings)), got {type(config).__name__}")
        if not isinstance(model, GeneralistModel):
            raise ValueError(f"Trainer trains a GeneralistModel, got {type(model).__name__}")
        self.config = config = config or TrainConfig()
        self.tasks = task_list(tasks, "Trainer")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tasks must have distinct names; repeated: {duplicates}")
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run directory's "
                             "checkpoints, overwrite deletes them")
        self.rank, self.world = distributed.world_info().rank, distributed.world_info().world_size
        eval_tasks = self.tasks if eval_tasks is None else task_list(eval_tasks, "Trainer's eval_tasks")
        # (an empty list fell back to the training tasks, scored on their training rows: eval_every,
        # keep_best and patience chose "best" weights on them without a word)
        self.model, self.output_dir, self.eval_tasks = model, output_dir, list(eval_tasks)
        if not self.eval_tasks and config.eval_every:
            raise ValueError(f"eval_every={config.eval_every} evaluates the eval_tasks, and eval_tasks is empty; "
                             "give eval_tasks, or leave eval_every at 0 to train without evaluating")
        strangers = sorted({t.name for t in self.eval_tasks} - set(names) - set(model.task_ids))
        if strangers:  # refused before any folder is touched, not after the run, when evaluation would fail
            raise ValueError(f"eval_tasks {strangers} are neither trained in this run nor known to the model "
                             f"(training: {', '.join(names)}; the model knows: {', '.join(model.task_ids)})")
        check_known_labels(model, self.tasks)  # before any folder is touched, not at the step that draws the row
        self.checkpoint_dir = os.path.join(output_dir, "checkpoints")
        self.best_dir = os.path.join(output_dir, "best")  # TrainConfig.keep_best
        # (step, results) of the latest evaluation while training (eval_every), in this process's fit
        self.last_evaluation: Optional[tuple[int, dict]] = None
        self._lock: Optional[RunLock] = None  # held by the main process only
        self._claimed = False  # whether this run holds the directory (the same on every process)
        self._in_context = False
        self._lock_output_dir()
        undo = model_undo(model)
        try:
            self._build(resume, overwrite)
        except BaseException:
            undo()  # a refused build leaves the model as it was given (a corrected retry starts clean)
            self.close()
            raise

    def _lock_output_dir(self) -> None:
        """Takes the run directory's lock on the main process; every process raises if it is held."""
        refusal: Optional[Exception] = None
        if self.rank == 0:
            lock = RunLock(self.output_dir)
            try:
                lock.acquire()
                self._lock = lock
            except (RunDirectoryInUse, OSError) as exc:
                refusal = exc
        if distributed.any_true(refusal is not None):
            raise refusal or RunDirectoryInUse(f"the run directory {self.output_dir} is in use by another run "
                                               "(see process 0)")
        self._claimed = True

    def close(self) -> None:
        """Releases the run directory (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._claimed = False

    def __enter__(self) -> "Trainer":
        self._in_context = True
        return self

    def __exit__(self, *exc) -> None:
        self._in_context = False
        self.close()

    def _earlier_run(self, resume: bool, overwrite: bool) -> tuple[Optional[str], bool]:
        """(the newest checkpoint to resume, whether the checkpoint directory holds anything at all).
        With ``overwrite`` nothing of it is read (it is deleted, however broken); without ``resume``
        or ``overwrite`` any content is an error."""
        leftovers = os.path.isdir(self.checkpoint_dir) and bool(os.listdir(self.checkpoint_dir))
        if not leftovers or overwrite:
            return None, leftovers
        if not resume:
            try:
                earlier = latest_checkpoint(self.checkpoint_dir)
            except ValueError as exc:
                earlier = f"none complete: {exc}"
            raise ValueError(f"{self.checkpoint_dir} holds checkpoints of an earlier run (latest: {earlier}); "
                             "resume it (resume=True, --resume), start over (overwrite=True, --overwrite), "
                             "or choose another output directory")
        earlier = latest_checkpoint(self.checkpoint_dir)
        if earlier is not None:
            self._check_resumable(earlier)
        return earlier, leftovers

    def _check_resumable(self, path: str) -> None:
        """Raises unless the checkpoint at ``path`` can continue this run (its tasks, a step within
        ``steps``), from its ``trainer.json`` alone: refused before any weight reaches the model,
        on every process if on any (so none waits for the others)."""
        refusal: Optional[Exception] = None
        try:
            state = read_trainer_state(path)
            rank_state_file(path, self.rank)  # every process refuses together, before any loads
            check_resumable(path, state, tasks=[t.name for t in self.tasks], config=self.config.to_dict(),
                            tokenizer=self.model.tokenizer.fingerprint(), teachers=self.teacher_fingerprints)
        except (OSError, ValueError, KeyError) as exc:
            refusal = exc
        if distributed.any_true(refusal is not None):
            raise refusal or ValueError(f"checkpoint {path} cannot be resumed (another process refused it)")

    def _add_tasks(self, resumed: Optional[str]) -> list[str]:
        """Adds the tasks the model does not know; returns the adapters that needed (``trainable=
        "new_adapters"``). A resumed run whose model knows its tasks already (the model the first run
        trained, or its saved copy) takes those the checkpoint's run added."""
        unknown = [t for t in self.tasks if t.name not in self.model.task_ids]
        if unknown:
            with torch.random.fork_rng(devices=[]):  # new adapters and heads start from the run's seed
                torch.manual_seed(self.config.seed)
                return self.model.add_tasks(unknown)
        saved = read_trainer_state(resumed).get("new_adapters") or [] if resumed is not None else []
        return [a for a in saved if a in self.model.adapters or a.removesuffix(NEW_HEADS) in self.model.frame_heads]

    def _build(self, resume: bool, overwrite: bool) -> None:
        config, model = self.config, self.model
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        for task in self.tasks:  # (Task refuses one too) before the model or an earlier run changes
            if task.objective not in OBJECTIVES:
                raise ValueError(f"task {task.name!r}: unknown objective {task.objective!r}; known: "
                                 f"{', '.join(OBJECTIVES.list())}")
        # the teachers' files as the run begins, which its checkpoints record (a resumed run learns from the same)
        self.teacher_fingerprints = teacher_fingerprints(config.distill_from)
        # An earlier run's checkpoints are resumed or, with overwrite, removed: decided before the model changes.
        earlier, leftovers = self._earlier_run(resume, overwrite)
        self.new_adapters = self._add_tasks(earlier if resume else None)
        self.device = _resolve_device(config.device)
        model.to(self.device)
        self.plan = self._shard()
        if config.activation_checkpointing:
            model.set_activation_checkpointing(True)
        self.num_trainable = select_trainable(model, config.trainable, self.new_adapters)
        warn_of_batch_local_balance(model, config)
        self.objectives = self._objectives()
        self.ddp = None  # replicated parameters on several processes: averaged by DDP during backward
        if self.world > 1 and config.sharding == "replicate":
            self.ddp = distributed.replicate(model, self.objectives, self.plan)
        self.loss_module = self.ddp or distributed.LossModule(model, self.objectives)
        sharded = self.plan is not None or (self.world > 1 and config.sharding != "replicate")
        self.average = weight_average(model, config, sharded=sharded)
        groups = _param_groups(model, config.weight_decay, config.lr, config.lr_scales)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                           fused=_fusable(groups) or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(config.warmup_steps, config.steps, config.min_lr_ratio))
        if config.warmup_steps > config.steps:  # (not refused: a resumed run may raise steps)
            logger.warning("TrainConfig.warmup_steps=%d is longer than the run's steps=%d: the learning rate reaches "
                           "%.3g of lr at the last step and never decays; set warmup_steps below steps",
                           config.warmup_steps, config.steps, config.steps / config.warmup_steps)
        # the sampler encodes with the model's plans, which hold its own image tokenizers (kept by the
        # sampler: a task's plan cache lets old plans go)
        self.sampler = TaskSampler(self.tasks, model.tokenizer, config, rank=self.rank, world=self.world,
                                   statistics={t.name: model.encoding_statistics(t) for t in self.tasks},
                                   plans={t.name: model.plan(t) for t in self.tasks}, check=model.check_reach)
        self.step = 0
        self._done_after = (0, 0)  # the last steps whose evaluation and checkpoint were done (_after_step)
        # best: the best evaluation's step and eval_score (eval_every), evaluations since (patience);
        # evaluated: the last step evaluated (earlier where the step's evaluation failed: redone on resume)
        self.state = {"skipped_steps": 0, "bad_in_a_row": 0, "tokens_seen": 0, "failed_checkpoints": 0, "best": None,
                      "evals_since_best": 0, "evaluated": 0}
        self.failed_checkpoints_in_a_row = 0
        torch.manual_seed(config.seed * 1000 + self.rank)
        self.resumed_from: Optional[str] = None
        self.baseline: Optional[dict] = None  # evaluation before training (the CLI's), kept in checkpoints
        if resume and earlier is not None:
            self._resume(earlier)
        elif leftovers:
            distributed.barrier()
            if self.rank == 0:
                shutil.rmtree(self.checkpoint_dir)
            distributed.barrier()
        if self.resumed_from is None and self.rank == 0:  # an earlier run's best weights are not this run's
            shutil.rmtree(self.best_dir, ignore_errors=True)

    # ---- building ----------------------------------------------------------------------------

    def _shard(self) -> Optional[ExpertParallelPlan]:
        """Expert parallelism and FSDP/HSDP as configured; returns the experts' plan (None without)."""
        config, model, plan = self.config, self.model, None
        if config.expert_parallel > 1:
            from moe_gen.experts.parallel import shard_experts

            if config.expert_parallel > self.world:
                raise ValueError(f"expert_parallel={config.expert_parallel} needs at least that many processes; "
                                 f"this run has {self.world} (launch with torchrun --nproc_per_node "
                                 f"{config.expert_parallel})")
            plan = shard_experts(model, config.expert_parallel)
        if config.sharding in ("fsdp", "hsdp") and self.world > 1:
            from moe_gen.fsdp import shard_dense

            shard_dense(model, config.shard_size if config.sharding == "hsdp" else None, config.fsdp_unit,
                        param_dtype=torch.bfloat16 if config.precision == "bf16" else None)
        if self.world > 1:  # every process runs backward (DDP's all-reduce, the all-to-alls, FSDP's reductions),
            # also one whose batch uses no adapter while only adapters train: its loss touches them all with
            # weight 0 (the gradients of those no process used are dropped again by sync_gradients)
            model.touch_all_adapters = True
        return plan

    def _objectives(self) -> dict:
        names = sorted({t.objective for t in self.tasks})
        cfg = self.config
        # (before the objectives, whose own check names their argument, task_weights, not loss_weights)
        check_task_settings(cfg, [t.name for t in self.tasks], self.model.task_ids)
        every_task_everywhere = cfg.mixing == "all" and not cfg.modality_budget and cfg.max_tokens is None
        if len(names) > 1 and self.world > 1 and (cfg.expert_parallel > 1 or cfg.sharding != "replicate") \
                and not every_task_everywhere:
            # each process runs the objectives its own micro-batch holds (a contrastive one makes a
            # second decoder pass): the all-to-alls and FSDP gathers of the processes would not pair up,
            # unless every micro-batch holds every task (mixing="all" without budgets that drop rows)
            raise ValueError(f"tasks of several objectives ({', '.join(names)}) cannot train with "
                             f"expert_parallel={cfg.expert_parallel} and sharding={cfg.sharding!r} on {self.world} "
                             "processes: each process runs the objectives its own batch holds, so their collective "
                             "calls would not match (a crash or a hang); use sharding='replicate' with "
                             "expert_parallel=1, mixing='all' (every task in every batch), or train each "
                             "objective's tasks in their own run")
        objectives = {name: OBJECTIVES.get(name).from_train_config(self.model, cfg) for name in names}
        for task in self.tasks:  # refused now, not when a draw first meets what its objective cannot train
            if task.name in cfg.distill_from and not objectives[task.objective].distils:
                raise ValueError(f"TrainConfig.distill_from[{task.name!r}]: task {task.name!r} trains with the "
                                 f"{task.objective!r} objective, which does not learn from teachers")
            objectives[task.objective].check_task(self.model.plan(task))
        return objectives

    def _resume(self, path: str) -> None:
        saved_model = read_trainer_state(path).get("model_config")
        if saved_model is not None:  # after add_tasks: the model as the run that saved it had it
            check_same_model(path, saved_model, self.model.config.to_dict())
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                sampler=self.sampler, plan=self.plan, average=self.average,
                                lr_scales=self.config.lr_scales)
        if self.average is not None and int(self.average.n_averaged) == 0:  # a checkpoint without an average
            self.average.module.load_state_dict(self.model.state_dict())  # starts from the resumed weights
        self.step = int(state["step"])
        for key in self.state:
            self.state[key] = state.get(key, self.state[key])
        # (a checkpoint without "evaluated" predates it: its step's evaluation, if any, was done)
        self._done_after = (int(state.get("evaluated", self.step)), self.step)
        if self.config.keep_best and self.rank == 0:
            self._check_best_dir()
        self.baseline = state.get("baseline")
        self.resumed_from = path

    # ---- training ----------------------------------------------------------------------------

    def _autocast(self):
        if self.config.precision == "bf16":
            device = next(self.model.parameters()).device.type
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _accumulate(self, step: int,
                    micro_batches: Optional[list] = None) -> tuple[dict, collections.Counter, bool, list]:
        """Forward and backward of the step's micro-batches (drawn, unless given): every loss part
        with what it is a mean over, the positions per modality, whether every loss was finite, and
        the micro-batches."""
        values: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        positions: collections.Counter = collections.Counter()
        finite = True
        if micro_batches is None:
            micro_batches = [self._prepare_micro_batch(step, micro) for micro in range(self.config.accumulate)]
        scales = step_loss_scales(self.objectives, micro_batches, list(self.model.frame_heads), self.world)
        if self.config.distill_from and self.config.distill_anneal:
            scales = annealed_teachers(scales, self.objectives, step, self.config.steps)
        for micro, (size, groups) in enumerate(micro_batches):
            parts, over, counts, ok = self._micro_batch(micro, size, groups, scales[micro])
            finite &= ok
            positions.update(counts)
            for key, value in parts.items():
                values[key].append((value, over.get(key, 1.0)))
        return values, positions, finite, micro_batches

    def _sharpness_aware(self, step: int, micro_batches: list) -> bool:
        """``sam_rho``: replaces the step's gradient g by the gradient of the same micro-batches at
        the weights moved by ρ·g/‖g‖ (‖g‖ over every process's parameters, before clipping), then
        moves the weights back. The routers' balancing state (bias, running loads) keeps what the
        first pass made of it: it advances once per step. Returns whether every loss was finite."""
        norm = self._clip(clip=False)
        if not math.isfinite(norm):
            return False
        scale = self.config.sam_rho / max(norm, 1e-12)
        moved = [p for p in self.model.parameters() if p.grad is not None]
        with torch.no_grad():
            kept = [p.detach().clone() for p in moved]  # (restored by copy: w + e − e is not w to the bit)
            for p in moved:
                p.add_(p.grad, alpha=scale)
        self.optimizer.zero_grad(set_to_none=True)
        balance = balance_state(self.model)
        try:
            _, _, finite, _ = self._accumulate(step, micro_batches)
        finally:
            with torch.no_grad():
                for p, weight in zip(moved, kept):
                    p.copy_(weight)
            restore_balance_state(self.model, balance)
        return finite

    @contextlib.contextmanager
    def _undone_if_stopped(self):
        """Puts back, when the block raises, what a step changes before its optimizer step: the
        gradients (cleared: a retried step would add to the stopped one's), the sampler's position
        (its rows are drawn again, not skipped), torch's random state (dropout and router noise draw
        alike) and the routers' balancing state (bias, running loads), then re-raises."""
        sampler = self.sampler.state_dict()
        draws = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        routers = balance_state(self.model)
        try:
            yield
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            self.sampler.load_state_dict(sampler)
            torch.set_rng_state(draws[0])  # (dropout and router noise draw the same again)
            if draws[1] is not None:
                torch.cuda.set_rng_state_all(draws[1])
            restore_balance_state(self.model, routers)
            raise

    def _prepare_micro_batch(self, step: int, micro: int) -> tuple[int, list[tuple[str, list, object]]]:
        """Micro-batch ``micro`` of ``step`` drawn and collated: its sample count and, per
        objective (sorted by name), (name, samples, batch on the trainer's device)."""
        samples = self.sampler.next_batch(step, micro)
        objective_of = {t.name: t.objective for t in self.tasks}
        groups: dict[str, list] = collections.defaultdict(list)
        for sample in samples:
            groups[objective_of[sample.task]].append(sample)
        prepared = []
        for name in sorted(groups):
            # the same draws on a resumed run (the stream is named by seed, process and step)
            rng = random.Random(zlib.crc32(f"{self.config.seed}/mask/{self.rank}/{step}/{micro}".encode()))
            prepared.append((name, groups[name], self.objectives[name].prepare(groups[name], rng).to(self.device)))
        return len(samples), prepared

    def _micro_batch(self, micro: int, size: int, groups: list,
                     scales: dict[str, Optional[LossScales]]) -> tuple[dict, dict, collections.Counter, bool]:
        """Forward + backward of one prepared micro-batch (``size`` samples), one objective group
        after the other (each group's graph is freed before the next is built; under DDP only the
        step's last backward communicates); returns its loss parts, what each part is a mean over
        (``_log_counts``), modality positions and whether every process's loss was finite (a step
        with a non-finite micro-batch is skipped on every process)."""
        cfg = self.config
        parts: dict[str, float] = {}
        counts: collections.Counter = collections.Counter()
        shares: dict[str, float] = {}  # of the groups that returned each part
        positions: collections.Counter = collections.Counter()
        loss = torch.zeros((), device=self.device)
        for i, (name, group, batch) in enumerate(groups):
            positions.update(batch.tokens_per_modality)
            counts.update(_log_counts(batch, self.model.config.tasks, self.objectives[name]))
            last = micro == cfg.accumulate - 1 and i == len(groups) - 1
            with contextlib.nullcontext() if last else distributed.no_sync(self.loss_module):
                with self._autocast():
                    out = self.loss_module(name, batch, scales.get(name))
                share = len(group) / size
                group_loss = out["loss"].float() * share
                if group_loss.requires_grad:
                    (group_loss / cfg.accumulate).backward()
            loss = loss + group_loss.detach()
            for key, value in out.items():
                if key != "loss" and torch.is_tensor(value) and value.numel() == 1:
                    # per-task parts belong to one group; the others are averaged over the groups that
                    # returned them, by their shares (a part of one objective is not diluted by the rest)
                    weight = 1.0 if key.startswith("task_loss/") else share
                    parts[key] = parts.get(key, 0.0) + float(value.detach()) * weight
                    shares[key] = shares.get(key, 0.0) + weight
        parts = {key: value / shares[key] for key, value in parts.items()}
        finite = not distributed.any_true(not bool(torch.isfinite(loss)))
        parts["loss"] = float(loss)
        return parts, counts, positions, finite

    def _clip(self, clip: bool = True) -> float:
        """The gradients made whole (summed over the processes where they are not yet) and their
        global norm, returned; with ``clip``, scaled down to ``clip_norm`` when above it."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.clip_norm if self.config.clip_norm > 0 and clip else float("inf")
        if self.world > 1:
            distributed.sync_gradients(self.model, self.plan, dense_synced=self.ddp is not None)
            return float(distributed.clip_grad_norm_(self.model, max_norm, self.plan))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def train_step(self, step: int, recorder: Optional[RoutingRecorder] = None) -> dict:
        """One optimizer step (``accumulate`` micro-batches); returns its log record (with routing
        numbers when a ``RoutingRecorder`` of the model is given). Stopped before its optimizer
        step (Ctrl-C, an error in a later micro-batch), it is undone (``_undone_if_stopped``), so
        that calling ``fit`` again runs the step as it would have run."""
        if recorder is not None:
            recorder.reset()
            recorder.start()
        cfg = self.config
        start = time.perf_counter()
        self.model.train()
        with self._undone_if_stopped():
            values, positions, finite, micro_batches = self._accumulate(step)
            if cfg.sam_rho > 0 and finite:
                if recorder is not None:  # the routing of the weights the step starts from
                    recorder.stop()
                finite = self._sharpness_aware(step, micro_batches)
        # each part averaged over the micro-batches it occurred in, by what it is a mean over
        totals = {key: _weighted_mean(v) for key, v in values.items()}
        norm = self._clip()
        finite = finite and not distributed.any_true(not math.isfinite(norm))
        lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            self.optimizer.step()
            if self.average is not None:
                update_average(self.average, self.model)
            self.state["bad_in_a_row"] = 0
        else:
            self.state["skipped_steps"] += 1
            self.state["bad_in_a_row"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        elapsed = time.perf_counter() - start
        self.state["tokens_seen"] += sum(positions.values())
        # every part (the loss the step optimised included) the mean over the processes that had it,
        # positions summed over the processes
        totals, positions = distributed.merged_over_processes(totals, positions)
        total = max(1, sum(positions.values()))
        loss = totals.pop("loss")
        record = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": norm, "skipped": not finite,
            "skipped_steps": self.state["skipped_steps"], "step_time": elapsed,
            "tokens_per_s": sum(positions.values()) / elapsed,
            "task_loss": {k.split("/", 1)[1]: v for k, v in totals.items() if k.startswith("task_loss/")},
            "aux": {k.split("/", 1)[1]: v for k, v in totals.items() if k.startswith("aux/")},
            "modality_share": {m: round(c / total, 4) for m, c in sorted(positions.items())},
            **{k: v for k, v in totals.items() if "/" not in k},
        }
        if recorder is not None:
            recorder.stop()
            record.update(routing_summary(recorder.tables()))
        if not finite and self.state["bad_in_a_row"] >= cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{self.state['bad_in_a_row']} steps in a row (up to step {step}) had a non-finite loss or gradient "
                f"norm (last loss {record['loss']}, norm {norm}); lower TrainConfig.lr, keep clip_norm > 0, or check "
                f"the data of the tasks in these batches ({', '.join(sorted(record['task_loss']) or ['?'])})", record)
        return record

    def fit(self) -> dict:
        """Trains to ``config.steps``; returns a summary: last step and loss (resumed at its last
        step, the loss the log holds for it), skipped steps, time, the latest checkpoint
        (``checkpoint``, ``checkpoint_step``: None when there is none; a step before ``step`` when
        the last writes failed) and ``failed_checkpoints`` (failed writes in this run and the runs
        it resumed). Raises ``CheckpointError`` when checkpoint writes keep failing (see the class
        docstring)."""
        cfg = self.config
        if not self._claimed:  # an earlier fit released the directory
            self._lock_output_dir()
        try:
            # a run past step 0 (resumed, or trained by an earlier fit) keeps its log up to this step
            logger = RunLogger(self.output_dir, cfg.steps, self.step, enabled=self.rank == 0, progress=cfg.progress,
                               tensorboard=cfg.tensorboard, resume_step=self.step if self.step else None)
            recorder = RoutingRecorder(self.model)  # hooks only during logged steps
            start, record = time.perf_counter(), None
            try:
                self._after_step(self.step, logger)  # what an interrupt (Ctrl-C) left undone of the last step
                while self.step < cfg.steps and not self._out_of_patience():
                    step = self.step + 1
                    log_now = step % cfg.log_every == 0 or step == cfg.steps
                    try:
                        record = self.train_step(step, recorder if log_now else None)
                    except TrainingDiverged as error:  # the step that stopped the run is logged, always
                        if error.record is not None:
                            logger.log(error.record)
                        raise
                    self.step = step
                    if log_now:
                        logger.log(record)
                    logger.advance()
                    self._after_step(step, logger)
            finally:
                recorder.stop()
                logger.close()
        finally:
            if not self._in_context:
                self.close()
        checkpoint = self.latest_checkpoint()
        # no step ran (resumed at the last step): the loss the run it continues logged at this step
        return {"step": self.step, "loss": record["loss"] if record else _logged_loss(logger.path, self.step),
                "skipped_steps": self.state["skipped_steps"], "seconds": time.perf_counter() - start,
                "checkpoint": checkpoint, "checkpoint_step": _checkpoint_step(checkpoint),
                "failed_checkpoints": self.state["failed_checkpoints"], **self._best_summary()}

    def _after_step(self, step: int, logger: RunLogger) -> None:
        """A trained step's evaluation (``eval_every``) and checkpoint, each done once: a ``fit``
        interrupted during them (Ctrl-C) and called again does what was left (before the twenty-sixth
        session's audit the step counted as done, and both were skipped for good)."""
        cfg = self.config
        if step == 0:
            return
        # a checkpoint written before its step's evaluation (which failed, the run resumed) is written
        # again with the evaluation's result (before the twenty-seventh session's audit a resumed run
        # skipped that evaluation, and its best)
        again = False
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and self._done_after[0] < step:
            self._evaluate_while_training(step, logger)
            again = self._done_after[1] >= step
        self._done_after = (step, self._done_after[1])
        if again or (self._done_after[1] < step and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                                                     or step == cfg.steps or self._out_of_patience())):
            self.save_checkpoint()  # (a stopped run's last step is kept)
        self._done_after = (step, step)

    def latest_checkpoint(self) -> Optional[str]:
        """The newest complete checkpoint in the run directory (None when there is none, or when its
        ``latest`` pointer is broken)."""
        try:
            return latest_checkpoint(self.checkpoint_dir)
        except (OSError, ValueError):
            return None

    def save_checkpoint(self) -> Optional[str]:
        """Writes a checkpoint of the current step (every process must call it); returns its path, or
        None when the write failed. Raises ``CheckpointError`` when the run must stop: after
        ``config.max_failed_checkpoints`` failed writes in a row, or a failed write while the run
        directory holds no checkpoint at all."""
        state = {**self.state, "tasks": [t.name for t in self.tasks], "config": self.config.to_dict(),
                 "model_config": self.model.config.to_dict(), "new_adapters": self.new_adapters,
                 "baseline": self.baseline, "tokenizer": self.model.tokenizer.fingerprint(),
                 "teachers": self.teacher_fingerprints}
        try:
            path = save_checkpoint(self.checkpoint_dir, self.step, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, sampler=self.sampler, trainer_state=state, plan=self.plan,
                                   keep=self.config.keep_checkpoints, average=self.average)
        except CheckpointError as exc:
            failure = exc
        else:
            self.failed_checkpoints_in_a_row = 0
            return path
        self.state["failed_checkpoints"] += 1
        self.failed_checkpoints_in_a_row += 1
        latest = self.latest_checkpoint()
        kept = f"the latest checkpoint is {latest} (step {_checkpoint_step(latest)})" if latest else \
            "no checkpoint of this run exists"
        # the main process's view decides, so every process stops together
        none_kept = distributed.any_true(self.rank == 0 and latest is None)
        limit = self.config.max_failed_checkpoints
        if none_kept or self.failed_checkpoints_in_a_row >= limit:
            why = ("nothing of the run would be kept" if none_kept else
                   f"{self.failed_checkpoints_in_a_row} checkpoint writes in a row failed "
                   f"(TrainConfig.max_failed_checkpoints={limit})")
            raise CheckpointError(f"stopping at step {self.step}: {failure}, and {why}. Saved: {kept}"
                                  f"{'; resume from it with --resume / resume=True' if latest else ''}") from failure
        print(f"[moe_gen] {failure}; {kept}; training goes on (it stops after {limit} failed writes in a row)",
              flush=True)
        return None

    # ---- evaluation and export ---------------------------------------------------------------

    def evaluate(self, tasks: Optional[Sequence[Task]] = None, limit: Optional[int] = -1) -> dict:
        """``{task: {metric: value}}`` on ``tasks`` (default: ``eval_tasks``), at most ``limit`` rows each
        (default ``config.eval_limit``). An empty list scores none (it scored every eval task
        before the twenty-seventh session's audit)."""
        limit = self.config.eval_limit if limit == -1 else limit
        return evaluate_tasks(self.trained_model(), self.eval_tasks if tasks is None else tasks, limit=limit,
                              batch_size=self.config.eval_batch_size)

    def trained_model(self) -> GeneralistModel:
        """The weights that ``evaluate`` and ``save_model`` use, whole on this process: the running
        average with ``ema_decay`` > 0, else the model itself, or (FSDP) an unsharded copy gathered
        from its shards (every process must call it)."""
        from moe_gen.fsdp import is_sharded, unsharded_copy

        if self.average is not None:
            return self.average.module
        return unsharded_copy(self.model) if is_sharded(self.model) else self.model

    def save_model(self, directory: str) -> None:
        """``save_pretrained`` of the trained model (with expert parallelism: the full model, assembled
        from a checkpoint of this step written first, on the main process). Atomic: ``directory``
        holds the whole model or is as it was. Raises ``OSError`` on every process if it failed."""
        path = None
        if self.plan is not None:
            path = self.save_checkpoint()
            if path is None:
                raise CheckpointError(f"the model was not saved to {directory}: the checkpoint it is assembled "
                                      "from could not be written")
        error = None
        model = self.trained_model() if path is None else None
        if self.rank == 0:
            try:
                if path is None:
                    model.save_pretrained(directory)
                else:
                    # (its initialisation draws nothing from the run's generator: keep_best saves it while training,
                    # and process 0's dropout and router noise moved away from the others' before the twenty-sixth
                    # session's audit)
                    with torch.random.fork_rng(devices=[]):
                        full = GeneralistModel(self.model.config, self.model.tokenizer)
                    full.load_state_dict(distributed.load_shards(path, "model", full))
                    full.save_pretrained(directory)
            except OSError as exc:
                error = exc
        if distributed.any_true(error is not None):
            raise error or OSError(f"the model was not saved to {directory} (it failed on process 0)")


def _logged_loss(path: str, step: int) -> Optional[float]:
    """The loss the run log at ``path`` holds for ``step`` (None without that record, or no log)."""
    loss = None
    for record in iter_jsonl_log(path) if os.path.exists(path) else ():  # (one record at a time)
        if record.get("step") == step:
            loss = record.get("loss")
    return loss


def _checkpoint_step(path: Optional[str]) -> Optional[int]:
    """The step of a checkpoint directory ``.../step-0000200`` (None for None)."""
    return None if path is None else int(os.path.basename(path).split("-", 1)[1])


def _resolve_device(name: str) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device is {name!r}, but CUDA is not available here (use 'auto' or 'cpu')")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())  # the GPU init_distributed chose
    return torch.device("cpu")
