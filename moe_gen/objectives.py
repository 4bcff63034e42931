"""Objectives wrap model + loss and return a dict with ``"loss"`` and its named parts.

Generative: token cross-entropy over scored positions (label smoothing optional), L1 on continuous
target rows (a mean over rows of each row's mean, as ``LossScales`` count rows) plus a binary
stop-flag loss, and the routing auxiliary losses of every MoE layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from moe_gen.model.grammar import check_answer_layout
from moe_gen.model.model import GeneralistModel, summed_aux_losses
from moe_gen.registry import OBJECTIVES
from moe_gen.routing.tags import PASSES
from moe_gen.tasks.batch import IGNORE_INDEX, Batch, Side
from moe_gen.teachers import Teachers, soft_cross_entropy

__all__ = ["OBJECTIVES", "Objective", "GenerativeObjective", "ContrastiveObjective", "MaskedObjective",
           "LossScales", "contrastive_side", "smoothed_cross_entropy"]

LOSS_AVERAGES = ("token", "sample")  # how GenerativeObjective averages token cross-entropy over a batch


@dataclasses.dataclass(frozen=True)
class LossScales:
    """Factors on an objective's token loss and on each adapter's frame loss (each a mean over its
    own batch) that make a step of several micro-batches (gradient accumulation) on several
    processes weigh every scored token, and every frame row, alike, as one large batch would. The
    trainer computes them (``moe_gen.trainer.scales``): for a micro-batch holding ``n`` of the ``N``
    scored tokens of its objective over the step, ``token = c·n/N``, where ``c`` turns the
    trainer's weighting of the micro-batch (its samples' share of the micro-batch, over ``A``
    micro-batches, averaged over ``W`` processes) into the objective's share of the whole step's
    samples; ``frame`` does the same per frame adapter. Both are 1 for one micro-batch in one
    process. ``teacher`` multiplies the objective's ``distill_weight`` at this step (the schedule
    of ``TrainConfig.distill_anneal``; 1 without one)."""

    token: float = 1.0
    frame: Mapping[str, float] = dataclasses.field(default_factory=dict)  # adapter → factor (absent: 1)
    teacher: float = 1.0


class Objective:
    """The interface the trainer uses: ``from_train_config`` builds the objective from a
    ``TrainConfig``, ``prepare`` turns a group of samples into a ``Batch``, ``loss_counts`` says
    what its token and frame losses average over, ``check_task`` refuses a task it cannot train,
    and calling it (with optional ``LossScales``) returns a dict with ``"loss"`` and its named
    parts. No objective is special-cased by name."""

    loss_average: str = "token"
    distils = False  # whether it learns from TrainConfig.distill_from's teachers (moe_gen.teachers)

    model: GeneralistModel

    @classmethod
    def from_train_config(cls, model: GeneralistModel, config) -> "Objective":
        """The objective with the settings of ``config`` (a ``TrainConfig``) that apply to it."""
        return cls(model, task_weights=config.loss_weights or None)

    def check_task(self, plan) -> None:
        """Raises ``ValueError`` naming the task when this objective cannot train the task of
        ``plan`` (its ``TaskPlan`` as the model encodes it): the trainer asks for every task when
        it is built, so that a task is refused before the first step, not when a draw first meets
        what the objective cannot do. By default a task is refused whose answer ``model.infer``
        could not decode (``moe_gen.model.grammar.check_answer_layout``, every template): one with
        no scored decoder slot trained on the routing loss alone; objectives that override this
        call it too."""
        for template in range(len(plan.templates)):
            check_answer_layout(plan, template)

    def prepare(self, samples, rng) -> Batch:
        """``samples`` collated into one batch (``rng``: for objectives that draw, e.g. masks)."""
        from moe_gen.tasks.batch import collate

        return collate(samples, self.model.tokenizer, self.model.task_ids, modality_ids=self.model.modality_ids)

    def loss_counts(self, batch: Batch) -> tuple[int, dict[str, int]]:
        """(scored tokens — samples with scored tokens under ``loss_average="sample"`` —, target
        frame rows per adapter) of ``batch``: what its token and frame losses are means over."""
        scored_BL = batch.labels != IGNORE_INDEX
        if self.loss_average == "sample":
            sample_BL = batch.decoder.tags.sample
            row_BL = torch.arange(scored_BL.shape[0], device=scored_BL.device).unsqueeze(1).expand_as(scored_BL)
            tokens = int(torch.unique((row_BL * (int(sample_BL.max()) + 1) + sample_BL)[scored_BL]).numel())
        else:
            tokens = int(scored_BL.sum())
        return tokens, {name: int(t.shape[0]) for name, t in batch.frame_targets.items()}

    def part_counts(self, batch: Batch) -> dict[str, int]:
        """What each of the objective's own logged parts (besides the token, frame and per-task
        losses, which the trainer counts) is a mean over in ``batch``, so that the trainer combines
        micro-batches as one large batch would; a part not named weighs 1 a micro-batch."""
        return {}

    def __call__(self, batch: Batch, scales: Optional[LossScales] = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@OBJECTIVES.register("generative")
class GenerativeObjective(Objective):
    """Encoder-decoder generation loss.

    Args:
        model: the generalist model.
        frame_weight: weight of the L1 + stop loss of continuous targets.
        task_weights: loss weight per task name: its token (or sample) losses are multiplied by it;
            the count they are divided by stays unweighted.
        loss_average: how the token cross-entropy is averaged over a batch: ``token`` (every
            scored token counts once, so a sample with a 30-token answer weighs 30 times one with a
            one-token label) or ``sample`` (each sample's tokens are averaged first, then the
            samples: every sample weighs the same, whatever its answer's length).
        label_smoothing: the token loss's smoothing; None: the model's ``config.label_smoothing``
            (training), 0 for the plain cross-entropy (the analysis's held-out loss).
        teachers: ``moe_gen.teachers.Teachers`` to distil from (None: none): ``prepare`` puts
            their distributions in the batch, and each scored token of a task with a teacher costs
            ``(1 − distill_weight) · CE + distill_weight · τ² · H(teacher, student)``.
        distill_weight: α in [0, 1], the teachers' share of those tokens' loss.

    Raises:
        ValueError: for settings ``TrainConfig`` or ``ModelConfig`` would refuse (a weight that is
            not a finite number >= 0, ``label_smoothing`` outside [0, 1)), naming the setting.
    """

    distils = True

    def __init__(self, model: GeneralistModel, frame_weight: float = 1.0,
                 task_weights: Optional[dict[str, float]] = None, loss_average: str = "token",
                 label_smoothing: Optional[float] = None, teachers: Optional[Teachers] = None,
                 distill_weight: float = 0.5) -> None:
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average must be one of {', '.join(LOSS_AVERAGES)}; got {loss_average!r}")
        _check_weights(type(self).__name__, task_weights, frame_weight=frame_weight)
        if label_smoothing is not None and not _number_in(label_smoothing, 0.0, 1.0):
            raise ValueError(f"{type(self).__name__}: label_smoothing must be None (the model's) or a number in "
                             f"[0, 1), as ModelConfig.label_smoothing, got {label_smoothing!r}")
        if isinstance(distill_weight, bool) or not isinstance(distill_weight, numbers.Real) \
                or not 0 <= distill_weight <= 1:
            raise ValueError(f"{type(self).__name__}: distill_weight must be a number in [0, 1], "
                             f"got {distill_weight!r}")
        self.model, self.frame_weight, self.loss_average = model, frame_weight, loss_average
        self.label_smoothing = label_smoothing
        self.teachers, self.distill_weight = teachers, float(distill_weight)
        if teachers is not None:
            teachers.check(model)
            teachers.to(next(model.parameters()).device)  # (the trainer has put the model on its device)
        self.task_weights = dict(task_weights or {})
        unknown = sorted(set(self.task_weights) - set(model.task_ids))
        if unknown:
            raise ValueError(f"task_weights name tasks the model does not know: {unknown}; "
                             f"known: {', '.join(model.task_ids)}")
        # Loss weight of every task id (1 unless given): task t's losses are multiplied by w_t.
        self._weight_of_task = torch.tensor([self.task_weights.get(name, 1.0) for name in model.config.tasks]
                                            or [1.0], dtype=torch.float32)

    @classmethod
    def from_train_config(cls, model: GeneralistModel, config) -> "GenerativeObjective":
        distil = config.distill_from and cls.distils
        teachers = Teachers.load(config.distill_from, config.distill_temperature,
                                 config.distill_only_correct) if distil else None
        return cls(model, frame_weight=config.frame_weight, task_weights=config.loss_weights or None,
                   loss_average=config.loss_average, teachers=teachers, distill_weight=config.distill_weight)

    def prepare(self, samples, rng) -> Batch:
        """``samples`` collated, with the teachers' distributions (``Batch.soft_labels``) when there
        are teachers."""
        batch = super().prepare(samples, rng)
        if self.teachers is not None:
            batch.soft_labels = self.teachers.soft_labels(samples, batch)
        return batch

    def part_counts(self, batch: Batch) -> dict[str, int]:
        if batch.soft_labels is None:
            return {}
        return {"distill_loss": int((batch.soft_labels.sum(-1) > 0).sum()),
                "reference_loss": int((batch.labels != IGNORE_INDEX).sum())}

    def __call__(self, batch: Batch, scales: Optional[LossScales] = None) -> dict[str, torch.Tensor]:
        return self.loss(batch, self.model(batch), scales)

    def loss(self, batch: Batch, out, scales: Optional[LossScales] = None) -> dict[str, torch.Tensor]:
        """The losses of a forward pass ``out`` (``ModelOutput``) over ``batch``; ``scales`` multiply
        the token and frame terms of ``"loss"`` (the parts logged stay this batch's own means)."""
        parts: dict[str, torch.Tensor] = {}
        scored = batch.labels != IGNORE_INDEX
        zero = out.logits.reshape(-1)[:1].float().sum() * 0.0  # (a sum of all fp16 logits can overflow: inf·0)
        # Closed-set targets: a softmax over the tokens the label trie allows, as decoding uses.
        logits = batch.restrict_to_allowed(out.logits.float())
        task_BL = batch.decoder.tags.task
        per_task: dict[int, list[torch.Tensor]] = {}
        if scored.any():
            smoothing = self.model.config.label_smoothing if self.label_smoothing is None else self.label_smoothing
            ce_N = smoothed_cross_entropy(logits[scored], batch.labels[scored], smoothing)
            if batch.soft_labels is not None and self.teachers is not None:
                weight = self.distill_weight * (scales or LossScales()).teacher
                ce_N = self._with_teachers(logits[scored], batch.soft_labels, ce_N, weight, parts)
            task_N = task_BL[scored]
            parts["token_loss"] = self._token_mean(batch, scored, task_N, ce_N)
            parts["token_accuracy"] = (logits[scored].argmax(-1) == batch.labels[scored]).float().mean().detach()
            _add_per_task(per_task, task_N, ce_N.detach())
        frame_terms, scaled_frames = [], []  # per adapter: its L1 + stop loss, and times its scale
        frame_scales = (scales or LossScales()).frame
        for name, predicted in out.frames.items():
            target = batch.frame_targets[name]
            task_R = task_BL.reshape(-1)[batch.frame_index[name]]
            valid = batch.frame_valid.get(name)  # (the zeros that pad a run's last row are no target)
            # L1 is a mean over rows of each row's mean over its values, with task weights or without
            # (a mean over all values weighed a row with padded values less, and micro-batches, whose
            # LossScales count rows, did not combine to one batch's mean)
            l1_R = _row_means((predicted.float() - target.float()).abs(), valid)
            if self.task_weights:  # each row's L1 and stop loss times its task's weight, over the rows
                w_R = self._weight_of_task.to(task_R.device)[task_R]
                stop_R = F.binary_cross_entropy_with_logits(out.stop_logits[name].float(), batch.frame_stop[name],
                                                            reduction="none")
                terms = [(w_R * l1_R).mean(), (w_R * stop_R).mean()]
            else:
                terms = [l1_R.mean(), F.binary_cross_entropy_with_logits(out.stop_logits[name].float(),
                                                                         batch.frame_stop[name])]
            frame_terms.append(torch.stack(terms).sum())
            scaled_frames.append(_scaled(frame_terms[-1], frame_scales.get(name, 1.0)))
            _add_per_task(per_task, task_R, l1_R.detach())
        if frame_terms:
            parts["frame_loss"] = torch.stack(frame_terms).sum()
        names = self.model.config.tasks
        unknown = [t for t in per_task if not 0 <= t < len(names)]
        if unknown:  # (collated with other task ids than the model's: an IndexError here before)
            raise ValueError(f"the batch holds task id {unknown[0]}, which the model does not have (its tasks: "
                             f"{', '.join(f'{i}: {n}' for i, n in enumerate(names))}); collate with model.task_ids")
        for task_id, values in sorted(per_task.items()):
            # per task: mean token cross-entropy plus mean L1 of its frame rows (for logs)
            parts[f"task_loss/{names[task_id]}"] = torch.stack(values).sum()
        aux = sum(out.aux_losses.values(), zero)
        token_scale = (scales or LossScales()).token
        frames = torch.stack(scaled_frames).sum() if scaled_frames else zero
        loss = _scaled(parts.get("token_loss", zero), token_scale) + self.frame_weight * frames + aux
        return {"loss": loss, **parts, "aux_loss": aux.detach() if torch.is_tensor(aux) else aux,
                **{f"aux/{k}": v.detach() for k, v in out.aux_losses.items()}}

    def _with_teachers(self, logits_NV: torch.Tensor, soft_NV: torch.Tensor, ce_N: torch.Tensor, weight: float,
                       parts: dict) -> torch.Tensor:
        """``ce_N`` with the teachers' term mixed in by ``weight`` at the tokens they speak for
        (``distill_loss`` in ``parts``: its mean there; ``reference_loss``: ``ce_N``'s mean, the loss
        to the references alone, comparable with runs without teachers)."""
        parts["reference_loss"] = ce_N.detach().mean()
        taught_N = soft_NV.sum(-1) > 0
        if not taught_N.any():
            return ce_N
        soft_N = soft_cross_entropy(logits_NV[taught_N], soft_NV[taught_N], self.teachers.temperature)
        parts["distill_loss"] = soft_N.detach().mean()
        mixed_N = ce_N.clone()
        mixed_N[taught_N] = (1 - weight) * ce_N[taught_N] + weight * soft_N
        return mixed_N

    def _token_mean(self, batch: Batch, scored_BL: torch.Tensor, task_N: torch.Tensor,
                    ce_N: torch.Tensor) -> torch.Tensor:
        """The batch's token cross-entropy: the mean over scored tokens (``loss_average="token"``)
        or over samples of each sample's mean (``"sample"``), every token times its task's loss
        weight. The weights scale the sum, not the count it is divided by, so a weighted task's loss
        is larger whatever else the batch holds (a batch of one task included)."""
        if self.loss_average == "sample":
            # A sample is a (row, sample-in-row) pair: packed rows hold several.
            sample_BL = batch.decoder.tags.sample
            B, L = scored_BL.shape
            row_BL = torch.arange(B, device=scored_BL.device).unsqueeze(1).expand(B, L)
            key_N = (row_BL * (int(sample_BL.max()) + 1) + sample_BL)[scored_BL]
            _, inverse_N, counts = torch.unique(key_N, return_inverse=True, return_counts=True)
            base_N = 1.0 / counts[inverse_N].float()
        else:
            base_N = None
        if self.task_weights:
            w_N = self._weight_of_task.to(task_N.device)[task_N]
            base_N = w_N if base_N is None else base_N * w_N
            count = len(ce_N) if self.loss_average == "token" else int(counts.numel())
            return (ce_N * base_N).sum() / count
        return ce_N.mean() if base_N is None else (ce_N * base_N).sum() / base_N.sum()


def _check_weights(owner: str, task_weights: Optional[Mapping[str, float]] = None, **weights: float) -> None:
    """Refuses the loss weights ``TrainConfig`` refuses (``frame_weight``, ``loss_weights``), given to
    an objective built from Python: each a finite number >= 0 (a negative weight trained the task
    to raise its loss, a NaN made every loss NaN).

    Args:
        owner: who is given them, for the message (the objective's class name).
        task_weights: loss weight per task name.
        weights: other weights by argument name (``frame_weight``, ``caption_weight``, ...).

    Raises:
        ValueError: naming the owner, the argument (and task) and the value.
    """
    for name, value in weights.items():
        if not _number_in(value, 0.0, math.inf):
            raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    for task, weight in (task_weights or {}).items():
        if not _number_in(weight, 0.0, math.inf):
            raise ValueError(f"{owner}.task_weights[{task!r}] must be a finite number >= 0, got {weight!r}")


def _number_in(value, low: float, high: float) -> bool:
    """Whether ``value`` is a real number (not a bool) in ``[low, high)``; NaN never is."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and low <= value < high


def _row_means(error_RF: torch.Tensor, valid_RF: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's mean error over its target values (all of them where ``valid_RF`` is None)."""
    return error_RF.mean(-1) if valid_RF is None else (error_RF * valid_RF).sum(-1) / valid_RF.sum(-1)


def _scaled(value: torch.Tensor, scale: float) -> torch.Tensor:
    return value if scale == 1.0 else value * scale


def smoothed_cross_entropy(logits_NV: torch.Tensor, labels_N: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-row cross-entropy with label smoothing ``ε`` spread over the classes a row allows:
    ``(1 − ε)·(−log p_label) + ε·mean_j(−log p_j)`` over the finite logits ``j`` of the row (a
    closed-set row has −inf on the tokens it does not allow). Rows with every logit finite get what
    ``F.cross_entropy(label_smoothing=ε)`` gives; spreading over all V classes instead would put
    mass on tokens the row can never produce (an infinite loss, or with a finite fill a loss that
    falls forever as the allowed logits sink together)."""
    if smoothing == 0:
        return F.cross_entropy(logits_NV, labels_N, reduction="none")
    logp_NV = logits_NV.log_softmax(-1)
    nll_N = -logp_NV.gather(1, labels_N.unsqueeze(1)).squeeze(1)
    allowed_NV = torch.isfinite(logits_NV)
    uniform_N = -logp_NV.masked_fill(~allowed_NV, 0.0).sum(-1) / allowed_NV.sum(-1)
    return (1 - smoothing) * nll_N + smoothing * uniform_N


def _add_per_task(per_task: dict, task_N: torch.Tensor, values_N: torch.Tensor) -> None:
    """Appends each task's mean of ``values_N`` (rows tagged with their task id) to ``per_task``."""
    counts = torch.bincount(task_N)
    sums = torch.zeros(counts.shape[0], dtype=torch.float32, device=values_N.device).index_add(
        0, task_N, values_N.float())
    for task_id in counts.nonzero().flatten().tolist():
        per_task.setdefault(task_id, []).append(sums[task_id] / counts[task_id])


def contrastive_side(batch: Batch, pad_id: int) -> Side:
    """The decoder input of the contrastive pass: the target tokens themselves (not shifted),
    attended bidirectionally, tagged ``pass=contrastive`` and ``causal=False`` so routers see the
    pass. Continuous targets take no part."""
    dec = batch.decoder
    is_token = batch.labels != IGNORE_INDEX
    tokens = torch.where(is_token, batch.labels, pad_id)
    tags = dataclasses.replace(dec.tags, causal=torch.zeros_like(dec.tags.causal),
                               pass_id=torch.full_like(dec.tags.pass_id, PASSES.index("contrastive")))
    return Side(tokens=tokens, is_token=is_token, rows={}, index={}, positions={}, padding_mask=~is_token, tags=tags)


def _masked_mean(hidden_BSD: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    weights = valid_BS.unsqueeze(-1).to(hidden_BSD.dtype)
    return (hidden_BSD * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@OBJECTIVES.register("contrastive")
class ContrastiveObjective(Objective):
    """MaMMUT's two passes in one step: the generative loss (captioning) plus a symmetric InfoNCE
    between the pooled encoder output and the pooled bidirectional decoder pass over the target
    text, with a learned temperature. Weights default to CoCa's: caption 2.0, contrastive 1.0.
    Rows must hold one sample each (no packing): pooling is per row. ``task_weights`` multiply a
    task's caption losses, as ``GenerativeObjective``'s, and each of its rows' InfoNCE terms (both
    directions) inside the batch's mean, whose count stays unweighted; a row of weight 0 still
    serves as a negative of the others. ``frame_weight`` weighs the caption's continuous targets
    (L1 + stop) as ``GenerativeObjective``'s does.
    """

    def __init__(self, model: GeneralistModel, caption_weight: float = 2.0, contrastive_weight: float = 1.0,
                 task_weights: Optional[dict[str, float]] = None, loss_average: str = "token",
                 frame_weight: float = 1.0) -> None:
        _check_weights(type(self).__name__, task_weights, caption_weight=caption_weight,
                      contrastive_weight=contrastive_weight, frame_weight=frame_weight)
        self.model = model
        self.generative = GenerativeObjective(model, frame_weight=frame_weight, task_weights=task_weights,
                                              loss_average=loss_average)
        self.loss_average = loss_average
        self.caption_weight, self.contrastive_weight = caption_weight, contrastive_weight

    @classmethod
    def from_train_config(cls, model: GeneralistModel, config) -> "ContrastiveObjective":
        return cls(model, task_weights=config.loss_weights or None, loss_average=config.loss_average,
                   frame_weight=config.frame_weight)

    def check_task(self, plan) -> None:
        """Raises ``ValueError`` naming the task when a template of it has no token target (text,
        a closed set, boxes, image codes): the contrastive pass reads only scored tokens, so
        ``prepare`` refuses such rows (below); checked here too, so that the trainer refuses the
        task when it is built, not at the first step that draws one of its rows."""
        super().check_task(plan)
        for t, (_, decoder) in enumerate(plan.templates):
            targets = [p for p in decoder if p.loss and not p.slot.is_literal]
            if any(plan.preprocessor(p).makes_tokens for p in targets):
                continue
            where = f"template {t}" if len(plan.templates) > 1 else "its answer"
            slots = sorted({f"{p.modality.name}:{p.name}" for p in targets})
            raise ValueError(f"task {plan.name!r}: the contrastive objective needs a token target (text) to compare "
                             f"with the input; {where} has only {slots or 'no targets'}")

    def prepare(self, samples, rng) -> Batch:
        """The samples collated as ``Objective.prepare`` collates them.

        Raises:
            ValueError: naming the task and row, when a sample has no token target (text): the
                contrastive pass reads only scored tokens, so continuous targets (motion, audio
                rows) would leave each row the EOS alone, every row the others' positive and the
                InfoNCE term 0 in every batch.
        """
        for sample in samples:
            if not any(c.loss and c.column is not None and c.tokens is not None for c in sample.decoder):
                slots = sorted({f"{c.modality}:{c.column}" for c in sample.decoder if c.loss and c.column})
                raise ValueError(f"task {sample.task!r}: the contrastive objective needs a token target (text) to "
                                 f"compare with the input; row {sample.index} has only {slots or 'no targets'}")
        return super().prepare(samples, rng)

    def part_counts(self, batch: Batch) -> dict[str, int]:
        """The caption loss is a mean over what the token loss averages (``loss_counts``); the
        InfoNCE term and the retrieval accuracy are means over the rows of the batch."""
        rows = int(batch.labels.shape[0])
        return {"caption_loss": self.loss_counts(batch)[0], "contrastive_loss": rows, "retrieval_accuracy": rows}

    def __call__(self, batch: Batch, scales: Optional[LossScales] = None) -> dict[str, torch.Tensor]:
        if int(batch.encoder.tags.sample.max()) > 0:
            raise ValueError("the contrastive objective pools one sample per row; collate without pack=True")
        model = self.model
        out = model(batch)  # the encoder runs once: its states serve the caption and the pooled input
        caption = self.generative.loss(batch, out, scales)
        side = contrastive_side(batch, model.tokenizer.pad_id)
        text = model.decode_bidirectional(side)
        pooled_image = _masked_mean(out.encoder_hidden, ~batch.encoder.padding_mask)
        image_BD = F.normalize(model.contrastive_image(pooled_image), dim=-1)
        text_BD = F.normalize(model.contrastive_text(_masked_mean(text.hidden, side.is_token)), dim=-1)
        # CLIP's cap on the temperature, on the parameter (as CLIP clamps it after each step): a clamp in
        # the forward gave no gradient at the cap, and the scale stayed there for good once Adam's
        # momentum took it past (before the twenty-sixth session's audit)
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        scale = model.logit_scale.exp()
        logits_BB = scale * image_BD @ text_BD.t()
        # Rows with the same target text, or the same input, are each other's positives (a caption
        # given to several images is not a negative of itself, nor an image given several captions:
        # its pooled states are the same, so no model could tell them apart): each direction's loss
        # is −log of the softmax mass on the row's positives, the plain InfoNCE when all are distinct.
        same_BB = _same_rows(side.tokens, side.is_token) | _same_inputs(batch.encoder)
        weight_B = None  # each row's task weight: row i's image query and text query both weigh w_i
        if self.generative.task_weights:
            weight_B = self.generative._weight_of_task.to(logits_BB.device)[batch.decoder.tags.task[:, 0]]
        contrastive = 0.5 * (_multi_positive_nce(logits_BB, same_BB, weight_B)
                             + _multi_positive_nce(logits_BB.t(), same_BB, weight_B))
        # Every routing loss counts once, unweighted: the encoder's and the causal decoder pass's
        # (in ``out``, also inside the caption loss, taken out of it here) and the contrastive pass's.
        routing = sum(out.aux_losses.values(), logits_BB.reshape(-1)[:1].float().sum() * 0.0)
        aux = sum((o.aux_loss for o in text.moe_outputs), routing)
        loss = self.caption_weight * (caption["loss"] - routing) + self.contrastive_weight * contrastive + aux
        # (logged unscaled: this batch's own caption loss, as the other parts are)
        caption_loss = (caption.get("token_loss", 0.0) + self.generative.frame_weight
                        * caption.get("frame_loss", 0.0) + routing).detach()
        parts = {**caption, "loss": loss, "caption_loss": caption_loss,
                 "contrastive_loss": contrastive.detach(), "aux_loss": aux.detach(),
                 **{f"aux/contrastive_pass/{k}": v.detach() for k, v in summed_aux_losses(text.moe_outputs).items()}}
        if not bool(same_BB.all()):  # with one distinct text every retrieval is right
            # right when the retrieved text is the row's own, or the same text as another row's
            parts["retrieval_accuracy"] = same_BB.gather(1, logits_BB.argmax(1, keepdim=True)).float().mean().detach()
        return parts


def _same_rows(tokens_BL: torch.Tensor, scored_BL: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, B]``: True where rows ``i`` and ``j`` hold the same scored tokens, wherever in the row
    they start (a template with literal text before the answer shifts them: compared position by
    position, one caption was its own negative)."""
    scored_BL = torch.ones_like(tokens_BL, dtype=torch.bool) if scored_BL is None else scored_BL.bool()
    # each row's scored tokens moved to its front in their order (a stable sort), the rest −1: equal
    # key rows are equal token sequences, compared on the device by ``torch.unique``
    order_BL = torch.argsort((~scored_BL).to(torch.int8), dim=1, stable=True)
    keys_BL = tokens_BL.long().gather(1, order_BL).masked_fill(~scored_BL.gather(1, order_BL), -1)
    _, group_B = torch.unique(keys_BL, dim=0, return_inverse=True)
    return group_B[:, None] == group_B[None, :]


def _same_inputs(encoder: Side) -> torch.Tensor:
    """``[B, B]``: True where rows ``i`` and ``j`` give the encoder the same input: the same tokens,
    tags and feature rows at the same places (one image with several captions, say). One key row per
    sample, compared bit for bit on the device by ``torch.unique`` (a loop over the rows copied each
    row's features to the host every step)."""
    B, S = encoder.tokens.shape
    pad_BS = encoder.padding_mask
    parts = [pad_BS.long(), encoder.tokens.masked_fill(pad_BS, 0), encoder.is_token.long().masked_fill(pad_BS, 0),
             encoder.tags.task.long().masked_fill(pad_BS, 0)]
    for name in sorted(encoder.rows):
        rows_NF = encoder.rows[name].float()  # (a bf16 row is exact in fp32)
        placed = rows_NF.new_zeros(B * S, rows_NF.shape[1]).index_copy(0, encoder.index[name], rows_NF)
        present = torch.zeros(B * S, dtype=torch.long, device=placed.device).index_fill(0, encoder.index[name], 1)
        parts += [placed.view(torch.int32).long().view(B, -1), present.view(B, S)]
    keys_BK = torch.cat([part.to(encoder.tokens.device) for part in parts], dim=1)
    _, group_B = torch.unique(keys_BK, dim=0, return_inverse=True)
    return group_B[:, None] == group_B[None, :]


def _multi_positive_nce(logits_BB: torch.Tensor, positive_BB: torch.Tensor,
                        weight_B: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over rows of ``−log Σ_{j positive} softmax(logits_i)_j``, each row's term times
    ``weight_B`` when given (the count stays the rows')."""
    log_p = logits_BB.float().log_softmax(-1)
    loss_B = -log_p.masked_fill(~positive_BB, float("-inf")).logsumexp(-1)
    return loss_B.mean() if weight_B is None else (loss_B * weight_B).sum() / loss_B.shape[0]


@OBJECTIVES.register("masked")
class MaskedObjective(GenerativeObjective):
    """4M masked multimodal modeling: ``prepare`` masks samples to fixed input/target budgets split
    by Dirichlet(α) across each sample's modalities (``moe_gen.masking``; ``target_alpha`` splits
    the target budget, default ``alpha``, as 4M samples inputs and targets apart) and collates them with
    ``pass=masked``; the loss is the generative one on the chosen targets. Build the model with
    ``ModelConfig(predict_all_features=True)`` so feature targets have regression heads
    (``check_task`` refuses a task whose feature rows have none).
    """

    distils = False  # (its targets are masked positions of inputs, which no task's teacher predicts)

    def __init__(self, model: GeneralistModel, *, input_budget: int = 128, target_budget: int = 128,
                 alpha=0.5, target_alpha=None, frame_weight: float = 1.0,
                 task_weights: Optional[dict[str, float]] = None, loss_average: str = "token") -> None:
        from moe_gen.trainer.config import TrainConfig
        from moe_gen.trainer.sampling import check_modality_keys

        # the budgets and alphas checked as a training run's are (a target budget of 0 trained nothing;
        # an α for a modality moe_gen does not know, "image" or 4M's "RGB", left every modality at 1.0)
        check_modality_keys(TrainConfig(masked_input_budget=input_budget, masked_target_budget=target_budget,
                                        masked_alpha=alpha, masked_target_alpha=target_alpha))
        super().__init__(model, frame_weight, task_weights, loss_average)
        self.input_budget, self.target_budget, self.alpha = input_budget, target_budget, alpha
        self.target_alpha = alpha if target_alpha is None else target_alpha

    @classmethod
    def from_train_config(cls, model: GeneralistModel, config) -> "MaskedObjective":
        return cls(model, input_budget=config.masked_input_budget, target_budget=config.masked_target_budget,
                   alpha=config.masked_alpha, target_alpha=config.masked_target_alpha, frame_weight=config.frame_weight,
                   task_weights=config.loss_weights or None, loss_average=config.loss_average)

    def check_task(self, plan) -> None:
        """Raises ``ValueError`` naming the task and slot when a data slot of the task (input or
        target) makes feature rows that the model has no frame head for: masking makes any data
        position a target, whatever ``masked_target_alpha`` says (the part of a budget that the
        modalities drawn cannot hold goes to any modality with positions left, one of α 0 too), so
        the first draw that picks such a row stopped the run mid-way. Also refuses, as decoding
        would after the run (``moe_gen.masking.check_masked_answer``), targets in several
        modalities or literal text / a closing EOS between target values."""
        from moe_gen.masking import check_masked_answer

        super().check_task(plan)
        for t in range(len(plan.templates)):
            check_masked_answer(plan, t)
        for encoder, decoder in plan.templates:
            for p in encoder + decoder:
                if (p.slot.is_literal or p.preprocess is None or plan.preprocessor_named(p.preprocess).makes_tokens
                        or p.adaptor in self.model.frame_heads):
                    continue
                raise ValueError(f"task {plan.name!r} trained with the masked objective: slot {p.slot} makes "
                                 f"{p.adaptor!r} feature rows, which masking may draw as targets, and the model has no "
                                 "frame head to predict them; build the model with "
                                 "ModelConfig(predict_all_features=True) (a frame head for every adapter), or train "
                                 "the task with another objective")

    def prepare(self, samples, rng) -> Batch:
        from moe_gen.masking import mask_sample
        from moe_gen.tasks.batch import collate

        masked = [mask_sample(s, input_budget=self.input_budget, target_budget=self.target_budget,
                              alpha=self.alpha, target_alpha=self.target_alpha, rng=rng) for s in samples]
        for sample in masked:
            for chunk in sample.decoder:
                if chunk.rows is not None and chunk.adaptor not in self.model.frame_heads:
                    raise ValueError(f"task {sample.task!r}: masking made {chunk.modality}:{chunk.column} rows of "
                                     f"row {sample.index} targets, but the model has no frame head for "
                                     f"{chunk.adaptor!r} rows; build it with ModelConfig(predict_all_features=True)")
        return collate(masked, self.model.tokenizer, self.model.task_ids, pass_name="masked",
                       modality_ids=self.model.modality_ids)


@OBJECTIVES.register("parallel")
class ParallelObjective(GenerativeObjective):
    """MaskGIT training of image-code targets (``moe_gen.model.parallel``): a cosine-schedule share
    of each sample's codes is masked and predicted at once by the decoder reading bidirectionally;
    ``model.infer`` decodes such a task that way (4 passes; ``parallel_steps=T`` for others). Every
    sample of the objective needs exactly one ``[IMAGE:...,preprocess=image_vq]`` target and no
    other (``check_task``; ``moe_gen.model.parallel.code_span``)."""

    distils = False  # (its targets are image codes drawn per step; a teacher would see other masks)

    def check_task(self, plan) -> None:
        """Raises ``ValueError`` naming the task and its targets unless each of its templates has
        exactly one target, image codes: only the codes are scored (a closed-set label after them
        kept its allowed tokens where the last code is predicted, an infinite loss), and parallel
        decoding reads a single image-code target."""
        for _, decoder in plan.templates:
            targets = [p for p in decoder if p.loss]
            if len(targets) != 1 or targets[0].decode is None or targets[0].decode.kind != "codes":
                raise ValueError(f"task {plan.name!r}: the parallel objective trains exactly one target, image codes "
                                 f"([IMAGE:...,preprocess=image_vq]); the task's targets are "
                                 f"{', '.join(str(p.slot) for p in targets) or 'none'}: keep the image codes as "
                                 "its one target and train any other in a task of its own (e.g. generative)")
        super().check_task(plan)

    @functools.cached_property
    def _code_ids(self) -> frozenset:
        """The vocabulary's discrete-value block, which holds image codes (built once, not per step)."""
        tok = self.model.tokenizer
        return frozenset(tok.bin_id(k) for k in range(tok.num_bins))

    def prepare(self, samples, rng) -> Batch:
        from moe_gen.model.parallel import mask_code_targets
        from moe_gen.tasks.batch import collate

        tok = self.model.tokenizer
        batch = collate(samples, tok, self.model.task_ids, pass_name="masked", modality_ids=self.model.modality_ids)
        return mask_code_targets(batch, samples, tok, self._code_ids, rng)
