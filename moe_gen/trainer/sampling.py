"""Multi-task sampling: which tasks fill each micro-batch, and how many positions each modality may take.

Every choice is a pure function of (seed, process rank, step, micro-batch) and of the per-task
cursors, so a resumed run draws exactly the batches an uninterrupted run would have drawn:

    task_T   ~ mixing weights            (random.Random seeded by seed/rank/step/micro; once per
                                          micro-batch with ``batch_tasks="single"``)
    row      = permutation(task, epoch)[rank::world][cursor]   (padded so every process walks as many)
    keep row if the micro-batch's modality budgets and max_tokens still allow it; otherwise it
    stays first in line for a later batch.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import random
import warnings
import zlib
from typing import Callable, Mapping, Optional, Sequence

from moe_gen.tasks.plan import Sample, TaskDataError
from moe_gen.tasks.task import Task
from moe_gen.tasks.tokenizer import Tokenizer
from moe_gen.trainer.config import TrainConfig

logger = logging.getLogger("moe_gen")

__all__ = ["check_known_labels", "check_modality_budget", "check_modality_keys", "mixing_weights",
           "sample_modality_tokens", "TaskSampler", "warn_of_batch_local_balance"]


def _rng(*parts) -> random.Random:
    # crc32 of the text, not hash(): str hashes differ between processes.
    return random.Random(zlib.crc32("/".join(map(str, parts)).encode()))


def check_task_settings(config: TrainConfig, names: Sequence[str],
                        model_tasks: Optional[Sequence[str]] = None) -> None:
    """The settings of ``config`` that name tasks, against the run's task ``names``: ``task_weights``
    names tasks being trained, ``loss_weights`` tasks the model knows (``names`` and
    ``model_tasks``; not checked when None: the sampler does not know the model), and
    ``mixing="all"`` has room for every task. The command line calls it before any data is read,
    the trainer and the sampler when they start."""
    from moe_gen.registry import did_you_mean

    fields = [("task_weights", set(names)), ("distill_from", set(names))]
    if model_tasks is not None:
        fields.append(("loss_weights", set(names) | set(model_tasks)))
    for field, allowed in fields:
        unknown = sorted(set(getattr(config, field) or {}) - allowed)
        if unknown:
            what = "the model does not know" if field == "loss_weights" else "not being trained"
            raise ValueError(f"TrainConfig.{field} names tasks {what}: {unknown}"
                             f"{did_you_mean(unknown, sorted(allowed))}; training: {', '.join(names)}")
    if config.mixing == "all" and config.batch_size < len(names):
        raise ValueError(f"mixing='all' puts every task in each micro-batch: batch_size {config.batch_size} is "
                         f"below the {len(names)} tasks")


def check_known_labels(model, tasks: Sequence[Task]) -> None:
    """Refuses a task ``model`` knows whose rows hold closed-set labels that the model's label set
    for it lacks (``ModelConfig.preprocessor_statistics``): a known task keeps the label set it was
    built with (its decoding is tied to it), so a row with another label failed at whatever step
    first drew it, after the steps before were spent (before the thirteenth audit). Under
    ``on_error="skip"`` those rows are skipped as they are drawn: a warning says so. Reads a known
    task's rows once, as fitting a new task does (only for tasks with closed sets)."""
    from moe_gen.tasks.task import CLOSED_SETS

    for task in tasks:
        saved = model.encoding_statistics(task).get(CLOSED_SETS) if task.name in model.task_ids else None
        if not saved:  # a new task (its labels are fitted), or a model saved before label sets were kept
            continue
        for column, labels in task.closed_sets().items():
            known = set(saved.get(column, labels))
            unseen = [label for label in labels if label not in known]
            if not unseen:
                continue
            listed = ", ".join(map(repr, unseen[:5])) + (f", ... ({len(unseen)} in all)" if len(unseen) > 5 else "")
            where = (f"task {task.name!r}, column {column!r}: {len(unseen)} label(s) of the rows are not in the "
                     f"model's closed set for the column ({len(known)} labels, fixed when it met the task): {listed}")
            if task.on_error == "skip":
                warnings.warn(f"{where}; the rows holding them are skipped (on_error='skip')", stacklevel=3)
                continue
            raise ValueError(f"{where}. A task the model knows keeps the label set it was built with; train the "
                             "new labels as a task of another name (it gets its own label set), or set "
                             "on_error='skip' on the task to leave the rows holding them out")


def mixing_weights(tasks: Sequence[Task], config: TrainConfig) -> list[float]:
    """Probability of each task per draw (summing to 1).

    ``proportional``: ∝ rows; ``temperature``: ∝ rows^(1/τ) (τ=1 proportional, τ→∞ uniform);
    ``uniform``; ``weights``: ``config.task_weights[name]`` or the task's own ``weight``; ``all``
    gives every task a fixed share of every micro-batch, reported here as uniform.
    """
    return _shares(raw_mixing_weights(tasks, config))


def _shares(raw: Sequence[float]) -> list[float]:
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"mixing weights sum to {total}; give at least one task a positive weight")
    return [w / total for w in raw]


def raw_mixing_weights(tasks: Sequence[Task], config: TrainConfig) -> list[float]:
    """The weights ``mixing_weights`` normalises: rows, (rows / the largest task's rows)^(1/τ), 1, or
    each task's weight."""
    if not tasks:
        raise ValueError("training needs at least one task")
    check_task_settings(config, [t.name for t in tasks])
    weighted = sorted(t.name for t in tasks if t.weight != 1.0) + sorted(config.task_weights)
    if weighted and config.mixing != "weights":
        warnings.warn(f"task weights are given ({', '.join(dict.fromkeys(weighted))}) but mixing is "
                      f"{config.mixing!r}, which does not read them; use mixing='weights'", UserWarning, stacklevel=3)
    sizes = [len(t) for t in tasks]
    for task, size in zip(tasks, sizes):
        if size == 0:
            raise ValueError(f"task {task.name!r} has no rows to train on")
    if config.mixing == "proportional":
        raw = [float(n) for n in sizes]
    elif config.mixing == "temperature":
        # n^(1/τ) divided by the largest task's, in log space: the same shares, at most 1 (n^(1/τ)
        # itself overflowed a float for a small τ: 2000^(1/0.01) ≈ 1e330); a task far smaller than
        # the largest gets a share that rounds to 0 (τ → 0: every draw goes to the largest tasks)
        logs = [math.log(n) for n in sizes]
        raw = [math.exp((x - max(logs)) / config.temperature) for x in logs]
    elif config.mixing == "weights":
        raw = [float(config.task_weights.get(t.name, t.weight)) for t in tasks]
        for task, weight in zip(tasks, raw):
            if not (math.isfinite(weight) and weight >= 0):  # a Task's own weight is not checked elsewhere
                raise ValueError(f"task {task.name!r}: its mixing weight must be a finite number >= 0, got {weight}")
    else:
        raw = [1.0] * len(tasks)
    return raw


def sample_modality_tokens(sample: Sample) -> collections.Counter:
    """Positions of each modality in a sample, encoder and decoder together."""
    counts: collections.Counter = collections.Counter()
    for chunk in sample.encoder + sample.decoder:
        counts[chunk.modality] += len(chunk)
    return counts


def _shard_size(rows: int, world: int) -> int:
    """Rows each of ``world`` processes walks per epoch: the epoch's rows dealt out evenly, the last
    round completed from the start of the epoch's order (as torch's ``DistributedSampler`` pads)."""
    return -(-rows // world)


class _Cursor:
    """Walks one process's share of a task's rows, one shuffled epoch after another.

    Every process shuffles all the rows with the same seed each epoch and takes every ``world``-th
    from its ``rank``, the order wrapped around to ``_shard_size`` rows apiece: every process walks
    as many rows, so none draws its rows more often than another (fixed shards of unequal sizes drew
    the rows of the short ones more often, every epoch, before the thirteenth audit), and the rows
    drawn twice in an epoch are other ones each epoch. With one process: the shuffled rows."""

    def __init__(self, task: Task, seed: int, rank: int, world: int, statistics=None, plan=None,
                 check: Optional[Callable] = None) -> None:
        self.task, self.seed, self.statistics, self.plan, self.check = task, seed, statistics, plan, check
        self.rank, self.world = rank, world
        self.size = _shard_size(len(task), world)
        self.epoch, self.position = 0, 0
        self._order: Optional[list[int]] = None
        self._peeked: Optional[tuple[int, int, Optional[Sample]]] = None

    def _permutation(self) -> list[int]:
        if self._order is None:
            order = list(range(len(self.task)))
            _rng(self.seed, "order", self.task.name, self.epoch).shuffle(order)
            wrapped = order * -(-self.size * self.world // len(order))  # (fewer rows than processes: repeated)
            self._order = wrapped[self.rank:self.size * self.world:self.world]
        return self._order

    def index(self) -> int:
        """The task row the cursor is at."""
        return self._permutation()[self.position]

    def peek(self, tokenizer: Tokenizer) -> Optional[Sample]:
        """The next row encoded (None when it fails to encode under ``on_error="skip"``)."""
        if self._peeked is None or self._peeked[:2] != (self.epoch, self.position):
            # A different augmentation draw every epoch, the same one on a resumed run.
            self._peeked = (self.epoch, self.position, self._encode(self.index(), tokenizer))
        return self._peeked[2]

    def _encode(self, index: int, tokenizer: Tokenizer) -> Optional[Sample]:
        """Row ``index`` encoded for training and checked by ``check`` (the model's reach past its
        position table), or None when it fails under ``on_error="skip"``. (Before the
        twenty-seventh session's audit a row too long for the table was found in the batch's
        forward: a bare ValueError naming no row stopped the run, ``on_error="skip"`` or not, and a
        resumed run met it again at the same step.)"""
        sample = self.task.encode(index, tokenizer, seed=self.seed * 100_003 + self.epoch, training=True,
                                  statistics=self.statistics, plan=self.plan)
        if sample is not None and self.check is not None:
            try:
                self.check(self.task.name, sample)
            except TaskDataError as exc:
                if self.task.on_error != "skip":
                    raise
                self.task.skip_row(index, exc)
                return None
        return sample

    def some_row_encodes(self, tokenizer: Tokenizer, failed: set[int]) -> bool:
        """Whether a row of the task outside ``failed`` encodes (tried in order, up to the first)."""
        return any(self._encode(index, tokenizer) is not None for index in range(len(self.task)) if index not in failed)

    def advance(self) -> None:
        self.position += 1
        if self.position == self.size:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None


def check_modality_budget(budget: Mapping[str, int], field: str = "modality_budget") -> None:
    """Raises ``ValueError`` when ``TrainConfig.modality_budget`` (or another ``field`` keyed by
    modality: ``masked_alpha``) names a modality nobody registered."""
    unknown = sorted(set(budget) - _known_modalities(), key=str)
    if unknown:
        from moe_gen.registry import did_you_mean

        known = sorted(_known_modalities())
        guesses = did_you_mean([str(name).upper() for name in unknown], known)
        raise ValueError(f"TrainConfig.{field} names unknown modalities {unknown}{guesses}; "
                         f"known: {', '.join(known)}")


def check_modality_keys(config: TrainConfig) -> None:
    """``check_modality_budget`` for every ``TrainConfig`` field keyed by modality."""
    check_modality_budget(config.modality_budget)
    for field in ("masked_alpha", "masked_target_alpha"):
        if isinstance(getattr(config, field), Mapping):
            check_modality_budget(getattr(config, field), field)


class TaskSampler:
    """Draws the samples of each micro-batch for one process.

    Args:
        tasks: the tasks being trained.
        tokenizer: the model's vocabulary.
        config: mixing, batch size, budgets and seed.
        rank, world: this process and the data-parallel world; each process walks its own share
            of every task's rows each epoch, all as many rows (``_Cursor``).
        statistics: task name → the model's encoding statistics for it
            (``GeneralistModel.encoding_statistics``); a task without them fits its own rows.
        plans: task name → the plan to encode it with (``GeneralistModel.plan``: the model's own
            image tokenizers), kept for the sampler's life; a task without one encodes with the
            plan ``Task.plan`` returns for the tokenizer and its statistics.
        check: ``check(task name, sample)`` raises ``TaskDataError`` for an encoded row the model
            cannot take (``GeneralistModel.check_reach``); the row is skipped or raises as the
            task's ``on_error`` says.
    """

    def __init__(self, tasks: Sequence[Task], tokenizer: Tokenizer, config: TrainConfig,
                 rank: int = 0, world: int = 1, statistics: Optional[Mapping] = None,
                 plans: Optional[Mapping] = None, check: Optional[Callable] = None) -> None:
        self.tasks, self.tokenizer, self.config = list(tasks), tokenizer, config
        self.rank, self.world = rank, world
        # (checks the task settings, check_task_settings)
        self.raw_weights = raw_mixing_weights(self.tasks, config)
        self.weights = _shares(self.raw_weights)
        self.cursors = [_Cursor(t, config.seed, rank, world, (statistics or {}).get(t.name), (plans or {}).get(t.name),
                                check) for t in self.tasks]
        check_modality_keys(config)

    def state_dict(self) -> dict:
        """Cursor positions and mixing weights (JSON-serialisable) for exact resume."""
        return {"rank": self.rank, "world": self.world,
                "cursors": {c.task.name: [c.epoch, c.position] for c in self.cursors},
                "rows": {c.task.name: len(c.task) for c in self.cursors}, "seed": self.config.seed,
                "weights": {t.name: w for t, w in zip(self.tasks, self.raw_weights)}}

    def _check_weights(self, saved: Optional[Mapping]) -> None:
        """Refuses mixing weights other than the checkpoint's (a task's own ``weight`` may change
        where ``TrainConfig.task_weights`` does not name it): the run would draw other tasks. Weights
        scaled together draw the same; a checkpoint saved without weights (before 2026-12-06) passes."""
        names = [t.name for t in self.tasks]
        if not saved or not set(names) <= set(saved) or sum(float(saved[n]) for n in names) <= 0:
            return  # (a task the checkpoint lacks is refused with the cursors)
        old = _shares([float(saved[n]) for n in names])
        if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(old, self.weights)):
            return
        changed = [f"{n} {float(saved[n]):g} → {w:g}" for n, w in zip(names, self.raw_weights) if float(saved[n]) != w]
        raise ValueError(f"the checkpoint's run drew its tasks with other mixing weights ({', '.join(changed)}): the "
                         "resumed run would draw other batches than the run it continues; resume with the same "
                         "weights (Task(weight=...), TrainConfig.task_weights), or start over")

    def load_state_dict(self, state: dict) -> None:
        """Restores the cursors. Saved by another number of processes, each task's rows were
        sharded otherwise: this process continues at the same epoch and the same share of its
        (new) shard, with a warning that the data order is not the uninterrupted run's."""
        positions = state["cursors"]
        if state.get("seed", self.config.seed) != self.config.seed:  # positions in another seed's orders
            raise ValueError(f"the checkpoint's data positions are in the row orders of seed {state['seed']}, and "
                             f"this run's seed is {self.config.seed}; resume with the same seed")
        saved_world = int(state.get("world", self.world))
        if saved_world != self.world:
            logger.warning("the checkpoint's data positions were saved by %d processes and this run has %d: each "
                           "task continues at the same epoch and share of this process's rows, not in the "
                           "uninterrupted run's order", saved_world, self.world)
        for cursor in self.cursors:
            if cursor.task.name not in positions:
                raise ValueError(f"the checkpoint has no sampler position for task {cursor.task.name!r}; it was "
                                 f"written for tasks {sorted(positions)}")
            rows = state.get("rows", {}).get(cursor.task.name)
            if rows is not None and int(rows) != len(cursor.task):  # its epochs' orders would be others
                raise ValueError(f"task {cursor.task.name!r} had {rows} rows when the checkpoint was written and "
                                 f"has {len(cursor.task)} now; its data changed since: resume with the same data, "
                                 "or start over")
            cursor.epoch, cursor.position = map(int, positions[cursor.task.name])
            if saved_world != self.world:
                saved_rows = _shard_size(len(cursor.task), saved_world)
                cursor.position = cursor.position * cursor.size // max(saved_rows, 1)
            cursor._order, cursor._peeked = None, None
            if cursor.position >= cursor.size:  # (the rows are the checkpoint's: checked above)
                # dealt before every process walked as many rows: with fewer rows than processes, a
                # process with none of its own walked them all, and its position may be past this share
                logger.warning("task %r: the checkpoint's sampler position %d is past the %d rows this process walks "
                               "an epoch (a checkpoint dealt by an earlier version): it goes on with the next epoch",
                               cursor.task.name, cursor.position, cursor.size)
                cursor.epoch, cursor.position = cursor.epoch + 1, 0
        self._check_weights(state.get("weights"))  # (after the rows: with other rows, other weights)

    def next_batch(self, step: int, micro: int = 0) -> list[Sample]:
        """The samples of micro-batch ``micro`` of ``step``."""
        cfg = self.config
        rng = _rng(cfg.seed, "mix", self.rank, step, micro)
        used: collections.Counter = collections.Counter()
        samples: list[Sample] = []
        if cfg.mixing == "all":
            # batch_size rows shared as evenly as the tasks allow; the tasks given the remainder's
            # extra row take turns from step to step. Rows are taken one per task in turn (from task
            # step % n), so budgets squeeze every task alike (taken task by task, the first tasks used
            # a budget up and a later one of the same modality had no row, every step); the batch
            # lists them task by task
            n = len(self.tasks)
            quota = {(step + k) % n: cfg.batch_size // n + (k < cfg.batch_size % n) for k in range(n)}
            while quota:
                for i in list(quota):
                    quota[i] -= 1
                    if not self._take(i, samples, used) or not quota[i]:
                        del quota[i]
            order = {t.name: i for i, t in enumerate(self.tasks)}
            return sorted(samples, key=lambda sample: order[sample.task])
        # tasks of weight 0 are never drawn (left among the open ones, they were all that was left once
        # the others no longer fitted the budgets, and random.choices refused weights summing to 0)
        open_tasks = [i for i in range(len(self.tasks)) if self.weights[i] > 0]
        if cfg.batch_tasks == "single":
            i = rng.choices(open_tasks, weights=[self.weights[j] for j in open_tasks])[0]
            while len(samples) < cfg.batch_size and self._take(i, samples, used):
                pass
            return samples
        # Every pass adds a row or closes a task, so this ends within batch_size + tasks passes. (A cap
        # of 4 × batch_size passes, before the twenty-seventh session's audit, ended the draw while a
        # task that fitted was still open once ~3 × batch_size tasks had no room: short batches.)
        while len(samples) < cfg.batch_size and open_tasks:
            i = rng.choices(open_tasks, weights=[self.weights[j] for j in open_tasks])[0]
            if not self._take(i, samples, used):
                open_tasks.remove(i)  # this task no longer fits this micro-batch
        return samples

    def _take(self, i: int, samples: list, used: collections.Counter) -> bool:
        """Adds task ``i``'s next row if the budgets allow (False when they do not)."""
        cursor, cfg = self.cursors[i], self.config
        failed: set[int] = set()
        for tries in itertools.count(1):  # rows that fail to encode (on_error="skip") are passed over
            if (sample := cursor.peek(self.tokenizer)) is not None:
                break
            failed.add(cursor.index())
            # Each epoch deals this process other rows, so a walk meets every row only after ~N ln N
            # tries: after two epochs' worth of its own, the rows not yet met are tried once in order.
            if (len(failed) == len(cursor.task) or tries > 2 * cursor.size + 20 * len(cursor.task)
                    or (tries == 2 * cursor.size and not cursor.some_row_encodes(self.tokenizer, failed))):
                raise ValueError(f"task {cursor.task.name!r}: no row encodes ({cursor.task.skipped} skipped; "
                                 f"first error: {cursor.task.errors[:1]})")
            cursor.advance()
        counts = sample_modality_tokens(sample)
        if samples:
            for modality, budget in cfg.modality_budget.items():
                if used[modality] + counts[modality] > int(budget) and counts[modality]:
                    return False
            if cfg.max_tokens is not None and sum(used.values()) + sum(counts.values()) > cfg.max_tokens:
                return False
        cursor.advance()
        samples.append(sample)
        used.update(counts)
        return True


def _known_modalities() -> set[str]:
    from moe_gen.registry import MODALITIES

    return set(MODALITIES.list())


def warn_of_batch_local_balance(model, config: TrainConfig) -> None:
    """One task per micro-batch (``batch_tasks="single"``) with the tag-balance loss reading each
    forward's own load (``tag_balance_window=0``): it spreads each task over its own experts and
    cannot see the experts other tasks crowd (measured: utilisation 0.90 → 0.71 per layer; ``bias``
    kept 0.92; docs/learning_quality.md, "One task per batch")."""
    from moe_gen.routing.router import Router

    if config.batch_tasks != "single":
        return
    modes = sorted({m.router_config.tag_balance for m in model.modules() if isinstance(m, Router)
                    and m.tag_balanced and m.router_config.tag_balance in ("loss", "loss+bias")
                    and m.load_average is None})
    if modes:
        warnings.warn(f"batch_tasks='single' with tag_balance={modes[0]!r}: the balance loss reads one task's load per "
                      "micro-batch and cannot move a task off experts other tasks crowd; set "
                      "RouterConfig.tag_balance_window (e.g. 8: a running load) or tag_balance='bias'",
                      UserWarning, stacklevel=4)
