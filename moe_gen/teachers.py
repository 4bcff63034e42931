"""Distillation from teachers: a trained model per task whose distribution over each scored token
the model being trained learns as well as the reference token.

A generalist that learns a task less well than a model trained on that task alone (a specialist)
can be given the specialist's solution: besides the reference, each scored token of the task is
also fitted to the specialist's softened distribution there (Hinton, Vinyals and Dean 2015), as
Clark et al. (2019, "BAM! Born-again multi-task networks") distil one single-task teacher per task
into a multi-task student. ``TrainConfig.distill_from`` maps task names to teachers saved with
``save_pretrained``; ``distill_weight`` α and ``distill_temperature`` τ set each such token's loss:

    (1 − α) · CE(reference) + α · τ² · H(p_teacher(τ), p_student(τ))

where ``p(τ)`` is the softmax of the logits divided by τ (over the allowed tokens only, for a
closed-set target) and H the cross-entropy (the teacher's entropy, a constant, is in the logged
``distill_loss`` too). Tokens of tasks without a teacher keep the plain loss. With
``distill_anneal`` α falls linearly to 0 at the last step (BAM's teacher annealing), so that the
run ends on the references and a weak teacher does not cap its task. With ``distill_only_correct`` a
teacher speaks only at the tokens where its most likely token is the reference, so that a weak
teacher teaches what it gets right and not its mistakes (in the spirit of Wen et al. 2019's
"knowledge adjustment", which corrects a teacher's wrong predictions instead of dropping them).

A teacher reads the very samples the student is given (augmented alike), collated with its own
task ids, after the student's batch is prepared; its distributions travel in
``Batch.soft_labels``. It must share the student's vocabulary (``Tokenizer.fingerprint``), know the
task it teaches, encode it with the same statistics (``encoding_statistics``: label sets, column
scales, fitted on the same rows) and read its samples; anything else is refused, naming the task.
With teachers the trainer also logs ``reference_loss``, the scored tokens' cross-entropy to the
references alone (``token_loss`` then holds the mixed loss). A checkpoint records each teacher's
``folder_fingerprint``: a run resumed after a teacher's folder was rewritten is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from typing import Mapping, Optional, Sequence

import torch

from moe_gen.tasks.batch import IGNORE_INDEX, Batch, collate

__all__ = ["Teachers", "soft_cross_entropy", "folder_fingerprint", "teacher_fingerprints"]


class Teachers:
    """One frozen teacher model per task name, used in evaluation mode without gradients.

    Args:
        models: task name → its teacher (a ``GeneralistModel``).
        temperature: τ > 0; the teachers' distributions are softened by it.
        only_correct: a teacher speaks only at the tokens where its most likely token is the
            reference (its distribution is zeros at the others, which then keep the plain loss).
    """

    def __init__(self, models: Mapping[str, object], temperature: float = 1.0, only_correct: bool = False) -> None:
        if not temperature > 0:
            raise ValueError(f"Teachers: temperature must be > 0, got {temperature!r}")
        self.models = dict(models)
        self.temperature = float(temperature)
        self.only_correct = bool(only_correct)
        for model in self.models.values():
            model.eval()
            model.requires_grad_(False)

    @classmethod
    def load(cls, paths: Mapping[str, str], temperature: float = 1.0, only_correct: bool = False) -> "Teachers":
        """The teachers saved at ``paths`` (task → ``save_pretrained`` folder); a folder that cannot
        be read is named with its task."""
        from moe_gen.model import GeneralistModel

        models = {}
        for task, path in paths.items():
            try:
                models[task] = GeneralistModel.from_pretrained(path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"distill_from[{task!r}]: cannot load the teacher at {path!r}: {exc}") from None
        return cls(models, temperature, only_correct)

    def check(self, student) -> None:
        """Refuses a teacher that cannot teach ``student``: a task the student does not know, a
        teacher that does not know its task, another vocabulary, or a task it encodes with other
        statistics (fitted on other training rows: other label sets, column scales or columns)."""
        mine = student.tokenizer.fingerprint()
        for task, teacher in self.models.items():
            if task not in student.task_ids:
                raise ValueError(f"distill_from names task {task!r}, which the model does not know; known: "
                                 f"{', '.join(student.task_ids)}")
            if task not in teacher.task_ids:
                raise ValueError(f"distill_from[{task!r}]: the teacher does not know task {task!r} (it knows "
                                 f"{', '.join(teacher.task_ids)})")
            if teacher.tokenizer.fingerprint() != mine:
                raise ValueError(f"distill_from[{task!r}]: the teacher's vocabulary is not the model's (tokenizer "
                                 f"fingerprints {teacher.tokenizer.fingerprint()} and {mine}): its distributions "
                                 "would be over other tokens")
            theirs, ours = _as_json(teacher.encoding_statistics(task)), _as_json(student.encoding_statistics(task))
            if theirs != ours:
                differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                raise ValueError(f"distill_from[{task!r}]: the teacher encodes the task with other statistics than "
                                 f"the model ({', '.join(differ)} differ: was it trained on other rows of the task?); "
                                 "it would read the samples under other label sets or scales")

    def soft_labels(self, samples: Sequence, batch: Batch) -> Optional[torch.Tensor]:
        """``Batch.soft_labels`` for ``batch``, the student's collation of ``samples`` (one sample a
        row): every teacher's distribution at the scored tokens of its task's samples, zeros
        elsewhere; None when no sample has a teacher or nothing is scored."""
        scored_BL = batch.labels != IGNORE_INDEX
        rows_of = {task: [i for i, s in enumerate(samples) if s.task == task] for task in self.models}
        rows_of = {task: rows for task, rows in rows_of.items() if rows}
        if not rows_of or not scored_BL.any():
            return None
        if batch.labels.shape[0] != len(samples):
            raise ValueError(f"distillation ({', '.join(rows_of)}) needs one sample a row: {len(samples)} samples "
                             f"in {batch.labels.shape[0]} rows (packed batches are not supported)")
        counts_B = scored_BL.sum(1).tolist()
        starts_B = [0, *itertools.accumulate(counts_B)]  # where each row's scored tokens begin, flat
        # (on the teachers' device: the trainer moves the batch there next, so the distributions are not copied back)
        device = next(next(iter(self.models.values())).parameters()).device
        out = torch.zeros(sum(counts_B), self._vocab_size(), device=device)
        for task, rows in rows_of.items():
            probs_NV = self._task_probs(task, [samples[i] for i in rows], batch.labels[rows][scored_BL[rows]])
            if probs_NV is not None:
                index = torch.cat([torch.arange(starts_B[r], starts_B[r] + counts_B[r]) for r in rows])
                out[index.to(device)] = probs_NV.to(device)
        return out

    def _vocab_size(self) -> int:
        return next(iter(self.models.values())).tokenizer.vocab_size

    @torch.no_grad()
    def _task_probs(self, task: str, samples: list, labels_N: torch.Tensor) -> Optional[torch.Tensor]:
        """The teacher of ``task``'s softened distribution at each scored token of ``samples``, which
        the student scores as ``labels_N``; None when nothing is scored."""
        teacher = self.models[task]
        device = next(teacher.parameters()).device
        try:
            batch = collate(samples, teacher.tokenizer, teacher.task_ids, modality_ids=teacher.modality_ids)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"distill_from[{task!r}]: the teacher cannot read the task's samples: {exc}") from exc
        batch = batch.to(device)
        scored_BL = batch.labels != IGNORE_INDEX
        if not scored_BL.any():
            return None
        if not torch.equal(batch.labels[scored_BL].cpu(), labels_N.cpu()):
            raise ValueError(f"distill_from[{task!r}]: the teacher's reference tokens differ from the model's for "
                             "the same samples (another closed label set or answer layout?)")
        try:
            logits_BLV = batch.restrict_to_allowed(teacher(batch).logits.float())
        except (KeyError, ValueError, RuntimeError) as exc:  # (a teacher of another instruction: other inputs, widths)
            raise ValueError(f"distill_from[{task!r}]: the teacher cannot read the task's samples (was it trained "
                             f"on another instruction?): {exc}") from exc
        logits_NV = logits_BLV[scored_BL]
        probs_NV = (logits_NV / self.temperature).softmax(-1)
        if self.only_correct:  # (where the teacher's answer is wrong, its row stays zeros: the plain loss)
            probs_NV = probs_NV * (logits_NV.argmax(-1) == batch.labels[scored_BL]).unsqueeze(-1)
        return probs_NV

    def to(self, device) -> "Teachers":
        """Moves every teacher to ``device``; returns self."""
        for model in self.models.values():
            model.to(device)
        return self


def folder_fingerprint(path: str) -> str:
    """A short hash of every file under ``path`` (names and contents): a saved teacher's identity,
    which a checkpoint records so that a resumed run learns from the teacher it began with."""
    if not os.path.isdir(path):
        raise FileNotFoundError("no such folder")
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def teacher_fingerprints(paths: Mapping[str, str]) -> dict[str, str]:
    """``folder_fingerprint`` of every teacher folder of ``paths`` (task → folder); a folder that
    cannot be read is named with its task."""
    out = {}
    for task, path in paths.items():
        try:
            out[task] = folder_fingerprint(path)
        except OSError as exc:
            raise ValueError(f"distill_from[{task!r}]: cannot load the teacher at {path!r}: {exc}") from None
    return out


def _as_json(value) -> dict:
    # (tuples as lists and read-only mappings as dicts, as a saved model's configuration holds them)
    return json.loads(json.dumps(value, default=dict))


def soft_cross_entropy(logits_NV: torch.Tensor, soft_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, ``τ² · H(soft, softmax(logits / τ))``: the cross-entropy of the student's softened
    distribution under a teacher's (``soft_NV``, rows summing to 1). Tokens the teacher gives no
    mass (−inf logits of closed-set rows among them) add nothing."""
    logp_NV = (logits_NV / temperature).log_softmax(-1)
    return -(soft_NV * logp_NV.masked_fill(soft_NV <= 0, 0.0)).sum(-1) * temperature ** 2
