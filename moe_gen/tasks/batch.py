"""Collation: samples → a padded (or packed) batch with routing tags for every position.

Shape legend: B rows, S encoder positions, L decoder positions, N feature rows of one adapter,
F their width, M modalities.

Encoder positions hold token ids or feature rows (embedded by the slot's adapter and scattered
into the sequence by ``*_index``, flat indices into ``B·S``). The decoder is teacher-forced:
position t reads item t-1 (BOS at t=0) and predicts item t. Decoder positions are tagged with
the modality and role of the item they predict, so every position that generates a box routes
as BOX; where the layout leaves the next item open (another box, or the end), the position is
tagged like the slot before it instead (``Chunk.lead``), so tags never give the answer away.
Continuous targets (audio, motion rows) are predicted by regression with a stop flag on the last
row of each run.

Packing puts several short samples in one row; ``tags.sample`` says which sample each position
belongs to, so attention (and context routing) can stay within a sample.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Mapping, Optional, Sequence

import torch

from moe_gen.routing.tags import PASSES, TokenTags
from moe_gen.tasks.modalities.base import modality_tag_names
from moe_gen.tasks.plan import Sample
from moe_gen.tasks.tokenizer import Tokenizer

__all__ = ["Side", "Batch", "collate", "pack_rows", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclasses.dataclass
class Side:
    """One side (encoder or decoder) of a batch.

    Attributes:
        tokens: long ``[B, S]`` token ids (pad id at feature and padding positions).
        is_token: bool ``[B, S]`` positions embedded from ``tokens``.
        rows: adapter name → float ``[N, F]`` feature rows; ``index``: long ``[N]`` flat positions
            (b·S + s) they fill; ``positions``: adapter name → long ``[N, 3]``.
        padding_mask: bool ``[B, S]``, True at padding.
        tags: ``TokenTags`` ``[B, S]`` (with ``sample`` ids).
        position_ids: long ``[B, S]``, each position's place in its sample where some chunk gave
            one (``Chunk.position_ids``: masked samples); None: in sequence within each sample.
    """

    tokens: torch.Tensor
    is_token: torch.Tensor
    rows: dict[str, torch.Tensor]
    index: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    padding_mask: torch.Tensor
    tags: TokenTags
    position_ids: Optional[torch.Tensor] = None

    @classmethod
    def from_token_ids(cls, ids: Sequence[Sequence[int]], pad_id: int, num_modalities: int) -> "Side":
        """Token sequences as one side (right-padded, one sample a row, tagged TEXT input of task
        0): what a converted checkpoint's encoder or decoder-only stack reads in a comparison
        with the original model."""
        B, S = len(ids), max(map(len, ids))
        tokens = torch.full((B, S), pad_id, dtype=torch.long)
        padding = torch.ones(B, S, dtype=torch.bool)
        for b, row in enumerate(ids):
            tokens[b, :len(row)] = torch.tensor(list(row), dtype=torch.long)
            padding[b, :len(row)] = False
        tags = dataclasses.replace(TokenTags.constant((B, S), num_modalities=num_modalities),
                                   sample=torch.zeros(B, S, dtype=torch.long))
        return cls(tokens=tokens, is_token=~padding, rows={}, index={}, positions={}, padding_mask=padding, tags=tags)

    def to(self, device) -> "Side":
        """The side on ``device``."""
        return Side(tokens=self.tokens.to(device), is_token=self.is_token.to(device),
                    rows={k: v.to(device) for k, v in self.rows.items()},
                    index={k: v.to(device) for k, v in self.index.items()},
                    positions={k: v.to(device) for k, v in self.positions.items()},
                    padding_mask=self.padding_mask.to(device), tags=self.tags.to(device),
                    position_ids=None if self.position_ids is None else self.position_ids.to(device))

    def attention_mask(self, causal: bool = False) -> torch.Tensor:
        """bool ``[B, S, S]``: query i may attend to key j (same packed sample, j not padding,
        and j <= i when ``causal``). Padding queries see nothing."""
        same = self.tags.sample.unsqueeze(2) == self.tags.sample.unsqueeze(1)
        mask = same & ~self.padding_mask.unsqueeze(1) & ~self.padding_mask.unsqueeze(2)
        if causal:
            S = mask.shape[-1]
            mask &= torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
        return mask

    def cross_attention_mask(self, keys: "Side") -> torch.Tensor:
        """bool ``[B, L, S]``: this side's positions may attend to ``keys`` positions of the same
        packed sample (decoder → encoder)."""
        same = self.tags.sample.unsqueeze(2) == keys.tags.sample.unsqueeze(1)
        return same & ~keys.padding_mask.unsqueeze(1) & ~self.padding_mask.unsqueeze(2)


@dataclasses.dataclass
class Batch:
    """A collated batch.

    Attributes:
        encoder, decoder: the two sides (decoder inputs are the previous items).
        labels: long ``[B, L]`` next-token targets, ``IGNORE_INDEX`` where nothing is scored.
        frame_targets: adapter name → float ``[N, F]`` regression targets at ``frame_index``
            (flat decoder positions), with ``frame_stop`` float ``[N]`` (1 on a run's last row);
            ``frame_valid`` bool ``[N, F]`` for adapters whose rows end in padding (the zeros that
            fill a run's last row of stacked frames: not targets).
        allowed_index: long ``[P]`` flat decoder positions of closed-set targets, with
            ``allowed_tokens`` long ``[P, A]`` the tokens the label trie allows there (-1 pads).
        tasks: the task name of each sample, in row-then-sample order.
        tokens_per_modality: valid positions per modality name, both sides.
        padding_fraction: share of padded positions over both sides.
        causal: the decoder attends left to right (False: bidirectionally, for parallel decoding
            of masked targets, ``moe_gen.model.parallel``).
        soft_labels: float ``[N, V]``, one row per scored token (``labels``' scored positions in
            row-major order): a teacher's distribution over the vocabulary there, to distil from
            (``moe_gen.teachers``); a row of zeros where no teacher speaks. None: no teacher.
    """

    encoder: Side
    decoder: Side
    labels: torch.Tensor
    frame_targets: dict[str, torch.Tensor]
    frame_index: dict[str, torch.Tensor]
    frame_stop: dict[str, torch.Tensor]
    allowed_index: torch.Tensor
    allowed_tokens: torch.Tensor
    tasks: list[str]
    tokens_per_modality: dict[str, int]
    padding_fraction: float
    causal: bool = True
    frame_valid: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    soft_labels: Optional[torch.Tensor] = None

    def restrict_to_allowed(self, logits_BLV: torch.Tensor) -> torch.Tensor:
        """``logits_BLV`` with −inf on every token a closed-set target position does not allow (its
        label trie's tokens stay), so a softmax there is over the allowed tokens, as decoding is;
        other positions unchanged."""
        if not self.allowed_index.numel():
            return logits_BLV
        flat = logits_BLV.reshape(-1, logits_BLV.shape[-1])
        rows = flat[self.allowed_index]
        keep = torch.zeros_like(rows, dtype=torch.bool)
        valid = self.allowed_tokens >= 0
        row_index = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1).expand_as(valid)
        keep[row_index[valid], self.allowed_tokens[valid]] = True
        # -inf removes the other tokens exactly (label smoothing then spreads over the allowed ones)
        flat = flat.index_put((self.allowed_index,), rows.masked_fill(~keep, float("-inf")))
        return flat.view_as(logits_BLV)

    def to(self, device) -> "Batch":
        """The batch on ``device`` (a no-op copy-free return when it is already there)."""
        if self.labels.device == torch.device(device):
            return self
        move = lambda d: {k: v.to(device) for k, v in d.items()}
        return dataclasses.replace(self, encoder=self.encoder.to(device), decoder=self.decoder.to(device),
                                   labels=self.labels.to(device), frame_targets=move(self.frame_targets),
                                   frame_index=move(self.frame_index), frame_stop=move(self.frame_stop),
                                   frame_valid=move(self.frame_valid),
                                   allowed_index=self.allowed_index.to(device),
                                   allowed_tokens=self.allowed_tokens.to(device),
                                   soft_labels=None if self.soft_labels is None else self.soft_labels.to(device))


def _modality_ids() -> dict[str, int]:
    return {name: i for i, name in enumerate(modality_tag_names())}


def _check_modalities(samples: Sequence[Sample], modality_id: Mapping[str, int]) -> None:
    """Raises naming the task and modality when a sample uses a modality the vocabulary lacks."""
    for sample in samples:
        unknown = sorted(set(sample.task_modalities) - set(modality_id))
        if unknown:
            raise ValueError(f"task {sample.task!r} uses modality {unknown[0]!r}, which is not in the model's "
                             f"modality vocabulary ({', '.join(modality_id)}); the model was built before it "
                             "was registered")


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Groups sample indices into rows of at most ``max_length`` positions (first fit, by length
    descending); a sample longer than ``max_length`` gets a row of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return [sorted(r) for r in rows]


@dataclasses.dataclass
class _Run:
    """Consecutive positions of one row that share their tags (one chunk, or part of one)."""

    tokens: Optional[torch.Tensor]  # long [n], or None for feature rows
    feature: Optional[tuple]  # (adaptor, rows [n, F], positions [n, 3])
    modality: int
    role: int
    causal: bool
    task: int
    used: torch.Tensor  # bool [M]
    sample: int
    pass_id: int
    position: Optional[torch.Tensor] = None  # long [n]: the items' positions in their sample (None: in sequence)

    def __len__(self) -> int:
        return int(self.tokens.shape[0]) if self.tokens is not None else int(self.feature[1].shape[0])


class _SideBuilder:
    """Accumulates one side's runs of positions, row by row, and fills tensors run by run."""

    def __init__(self, num_rows: int) -> None:
        self.rows: list[list[_Run]] = [[] for _ in range(num_rows)]

    def length(self, row: int) -> int:
        return sum(len(r) for r in self.rows[row])

    def build(self, pad_id: int, num_modalities: int) -> Side:
        B = len(self.rows)
        S = max([self.length(b) for b in range(B)] + [1])
        tokens = torch.full((B, S), pad_id, dtype=torch.long)
        is_token = torch.zeros(B, S, dtype=torch.bool)
        padding = torch.ones(B, S, dtype=torch.bool)
        fields = {name: torch.zeros(B, S, dtype=torch.long)
                  for name in ("task", "modality", "role", "pass_id", "sample")}
        causal = torch.zeros(B, S, dtype=torch.bool)
        used = torch.zeros(B, S, num_modalities, dtype=torch.bool)
        rows, index, positions = defaultdict(list), defaultdict(list), defaultdict(list)
        # positions in the sample, filled only where some run gives its own (else None: in sequence)
        explicit = any(run.position is not None for runs in self.rows for run in runs)
        position_ids = torch.zeros(B, S, dtype=torch.long) if explicit else None
        for b, runs in enumerate(self.rows):
            at, sample, in_sample = 0, None, 0
            for run in runs:
                n = len(run)
                span = slice(at, at + n)
                if explicit:
                    if run.sample != sample:
                        sample, in_sample = run.sample, 0
                    position_ids[b, span] = run.position if run.position is not None else \
                        torch.arange(in_sample, in_sample + n)
                    in_sample += n
                padding[b, span] = False
                if run.tokens is not None:
                    tokens[b, span], is_token[b, span] = run.tokens, True
                else:
                    adaptor, feats, pos = run.feature
                    rows[adaptor].append(feats)
                    positions[adaptor].append(pos)
                    index[adaptor].append(torch.arange(b * S + at, b * S + at + n))
                for name in fields:
                    fields[name][b, span] = getattr(run, name)
                causal[b, span] = run.causal
                used[b, span] = run.used
                at += n
        tags = TokenTags(task=fields["task"], modality=fields["modality"], role=fields["role"],
                         task_modalities=used, causal=causal, pass_id=fields["pass_id"], sample=fields["sample"])
        for name, parts in rows.items():
            widths = sorted({int(p.shape[1]) for p in parts})
            if len(widths) > 1:  # (torch.cat's message named neither the adapter nor the samples)
                raise ValueError(f"the samples of this batch feed the {name!r} adapter features of widths "
                                 f"{widths}: one adapter takes one width (tasks whose slots share an adapter need "
                                 "the same preprocessing options, or another adaptor=)")
        return Side(
            tokens=tokens, is_token=is_token,
            rows={k: torch.cat(v) for k, v in rows.items()},
            index={k: torch.cat(v) for k, v in index.items()},
            positions={k: torch.cat(v) for k, v in positions.items()},
            padding_mask=padding, tags=tags, position_ids=position_ids,
        )


def collate(
    samples: Sequence[Sample],
    tokenizer: Tokenizer,
    task_ids: Mapping[str, int],
    *,
    pack: bool = False,
    max_length: Optional[int] = None,
    pass_name: str = "generative",
    modality_ids: Optional[Mapping[str, int]] = None,
) -> Batch:
    """Pads (or packs) samples into a ``Batch``.

    Args:
        samples: encoded samples (from ``TaskPlan.encode``).
        tokenizer: for pad, BOS ids.
        task_ids: task name → index in the model's task vocabulary (the ``task`` tag).
        pack: put several samples per row (first fit up to ``max_length`` encoder positions).
        max_length: row length for packing (default: the longest sample).
        pass_name: the ``pass`` tag of every position.
        modality_ids: modality name → id (a model's ``modality_ids``: the ids it was trained on);
            default the modality tag vocabulary of this process.
    """
    _check_samples(samples, task_ids)
    if not hasattr(tokenizer, "pad_id") or not hasattr(tokenizer, "bos_id"):
        raise ValueError(f"collate takes the model's tokenizer (model.tokenizer), got {type(tokenizer).__name__}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"collate: max_length must be a whole number >= 1 or None, got {max_length!r}")
    groups = _row_groups(samples, pack, max_length)
    if pass_name not in PASSES:
        raise ValueError(f"collate: unknown pass {pass_name!r}; known: {', '.join(PASSES)}")
    pass_id = PASSES.index(pass_name)
    modality_id = dict(modality_ids) if modality_ids is not None else _modality_ids()
    _check_modalities(samples, modality_id)
    M = len(modality_id)
    enc, dec = _SideBuilder(len(groups)), _SideBuilder(len(groups))
    labels_rows: list[list[torch.Tensor]] = [[] for _ in groups]
    allowed: list[tuple[int, int, list[int]]] = []  # (row, position, allowed tokens)
    frames = defaultdict(lambda: ([], [], [], []))  # adaptor -> (targets, flat (row, t) lists, stop flags, valid)
    counts: Counter = Counter()
    tasks = []
    for row, group in enumerate(groups):
        for local, i in enumerate(group):
            sample = samples[i]
            tasks.append(sample.task)
            used = torch.zeros(M, dtype=torch.bool)
            used[[modality_id[m] for m in sample.task_modalities]] = True
            common = dict(task=task_ids[sample.task], used=used, sample=local, pass_id=pass_id)
            _add_encoder(sample, row, enc, common, counts, modality_id)
            start = dec.length(row)
            _add_decoder(sample, row, dec, labels_rows[row], frames, tokenizer, common, counts, modality_id)
            allowed.extend(_allowed_positions(sample, row, start))
    encoder, decoder = enc.build(tokenizer.pad_id, M), dec.build(tokenizer.pad_id, M)
    B, L = decoder.padding_mask.shape
    labels = _labels(labels_rows, B, L)
    frame_targets, frame_index, frame_stop, frame_valid = _frame_targets(frames, L)
    allowed_index, allowed_tokens = _allowed_tensors(allowed, L)
    total = encoder.padding_mask.numel() + decoder.padding_mask.numel()
    padded = int(encoder.padding_mask.sum() + decoder.padding_mask.sum())
    return Batch(encoder, decoder, labels, frame_targets, frame_index, frame_stop, allowed_index, allowed_tokens, tasks,
                 dict(counts), padded / total if total else 0.0, frame_valid=frame_valid)


def _check_samples(samples: Sequence[Sample], task_ids: Mapping[str, int]) -> None:
    """Raises ``ValueError`` for no samples, a sample that is none (a row ``Task.encode`` skipped: None),
    a task outside the vocabulary, or a vocabulary that is no mapping of names to ids >= 0 (a raw
    AttributeError or TypeError from inside, or ids the model does not have, before the twenty-sixth
    session's audit)."""
    if isinstance(samples, Sample) or not isinstance(samples, Sequence):
        raise ValueError(f"collate takes a list of samples (Task.encode's), got {type(samples).__name__}")
    if not samples:
        raise ValueError("collate needs at least one sample")
    if not isinstance(task_ids, Mapping):
        raise ValueError(f"collate's task_ids maps task names to ids (model.task_ids), got {type(task_ids).__name__}")
    for name, task_id in task_ids.items():
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
            raise ValueError(f"collate's task_ids gives task {name!r} the id {task_id!r}; ids are whole numbers >= 0 "
                             "(model.task_ids)")
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise ValueError(f"collate: item {i} is {type(s).__name__}, not a sample (Task.encode gives None for a "
                             "row it skips: leave those out)")
        if s.task not in task_ids:
            raise ValueError(f"task {s.task!r} is not in the task vocabulary ({', '.join(task_ids)})")


def _row_groups(samples: Sequence[Sample], pack: bool, max_length: Optional[int]) -> list[list[int]]:
    """The sample indices of every row: one sample a row, or packed first fit (``pack_rows``)."""
    if pack:
        lengths = [max(s.lengths()) for s in samples]
        return pack_rows(lengths, max_length or max(lengths))
    return [[i] for i in range(len(samples))]


def _add_encoder(sample: Sample, row: int, enc: _SideBuilder, common, counts, modality_id: dict[str, int]) -> None:
    """One run per encoder chunk: its tokens, or its feature rows for the chunk's adaptor."""
    for chunk in sample.encoder:
        counts[chunk.modality] += len(chunk)
        enc.rows[row].append(_Run(
            tokens=None if chunk.tokens is None else torch.tensor(chunk.tokens, dtype=torch.long),
            feature=None if chunk.tokens is not None else (chunk.adaptor, chunk.rows, chunk.positions),
            modality=modality_id[chunk.modality], role=chunk.role, causal=False, **common,
            position=None if chunk.position_ids is None else torch.tensor(chunk.position_ids, dtype=torch.long)))


def _allowed_positions(sample: Sample, row: int, start: int) -> list[tuple[int, int, list[int]]]:
    """(row, decoder position, allowed tokens) of every scored closed-set position of the sample,
    whose decoder side starts at ``start``."""
    allowed = []
    at = start
    for chunk in sample.decoder:
        if chunk.allowed is not None and len(chunk.allowed) != len(chunk):
            raise ValueError(f"task {sample.task!r}, row {sample.index}: a closed-set chunk has "
                             f"{len(chunk.allowed)} allowed lists for {len(chunk)} positions")
        if chunk.allowed is not None and chunk.loss:  # (None: a position open to the whole vocabulary)
            allowed.extend((row, at + j, options) for j, options in enumerate(chunk.allowed) if options is not None)
        at += len(chunk)
    return allowed


def _labels(labels_rows: list[list[torch.Tensor]], B: int, L: int) -> torch.Tensor:
    """long ``[B, L]``: every row's labels, ``IGNORE_INDEX`` after them."""
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for b, parts in enumerate(labels_rows):
        if parts:
            lab = torch.cat(parts)
            labels[b, : lab.numel()] = lab
    return labels


def _frame_targets(frames, L: int) -> tuple[dict, dict, dict, dict]:
    """Per adaptor: the regression targets ``[N, F]``, their flat decoder positions ``[N]``, stop
    flags ``[N]`` and, where some value only pads its row, which values are targets ``[N, F]``."""
    frame_targets, frame_index, frame_stop, frame_valid = {}, {}, {}, {}
    for adaptor, (targets, where, stops, valid) in frames.items():
        frame_targets[adaptor] = torch.cat(targets)
        frame_index[adaptor] = torch.cat([b * L + t for b, t in where])
        frame_stop[adaptor] = torch.cat(stops)
        if not all(bool(v.all()) for v in valid):
            frame_valid[adaptor] = torch.cat(valid)
    return frame_targets, frame_index, frame_stop, frame_valid


def _allowed_tensors(allowed: list[tuple[int, int, list[int]]], L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """long ``[P]`` flat decoder positions of closed-set targets and long ``[P, A]`` their allowed
    tokens (-1 pads)."""
    width = max([len(a) for _, _, a in allowed] + [1])
    allowed_index = torch.tensor([b * L + t for b, t, _ in allowed], dtype=torch.long)
    allowed_tokens = torch.full((len(allowed), width), -1, dtype=torch.long)
    for i, (_, _, options) in enumerate(allowed):
        allowed_tokens[i, : len(options)] = torch.tensor(options, dtype=torch.long)
    return allowed_index, allowed_tokens


def _add_decoder(sample: Sample, row: int, dec: _SideBuilder, labels: list, frames, tokenizer, common,
                 counts, modality_id: dict[str, int]) -> None:
    """Teacher forcing: position t reads item t-1 (BOS first) and is tagged like item t, which it predicts."""
    previous = ("token", torch.tensor([tokenizer.bos_id]), None)  # the last item of the run before
    for chunk in sample.decoder:
        n = len(chunk)
        if n == 0:  # an empty given value (a no_loss text ""): no position, and the next chunk reads
            continue  # what came before it (one lead position here shifted every later label and frame)
        counts[chunk.modality] += n
        start = dec.length(row)
        tags = dict(modality=modality_id[chunk.modality], role=chunk.role, causal=True, **common)
        # The first position of the chunk reads the previous chunk's last item (tagged like that
        # chunk's slot where the layout left open what comes next, see TaskPlan.open_ends)...
        kind, token, feature = previous
        lead = tags if chunk.lead is None else dict(tags, modality=modality_id[chunk.lead[0]], role=chunk.lead[1])
        # (a position takes the place of the item it predicts, as it takes its tags)
        place = None if chunk.position_ids is None else torch.tensor(chunk.position_ids, dtype=torch.long)
        dec.rows[row].append(_Run(tokens=token if kind == "token" else None, feature=feature, **lead,
                                  position=None if place is None else place[:1]))
        # ...and the others read this chunk's items 0..n-2.
        if n > 1:
            rest = dict(tags, position=None if place is None else place[1:])
            if chunk.tokens is not None:
                dec.rows[row].append(_Run(tokens=torch.tensor(chunk.tokens[:-1], dtype=torch.long), feature=None,
                                          **rest))
            else:
                dec.rows[row].append(_Run(tokens=None, feature=(chunk.adaptor, chunk.rows[:-1],
                                                                chunk.positions[:-1]), **rest))
        if chunk.tokens is not None:
            ids = torch.tensor(chunk.tokens, dtype=torch.long)
            labels.append(ids if chunk.loss else torch.full((n,), IGNORE_INDEX, dtype=torch.long))
            previous = ("token", ids[-1:], None)
        else:
            labels.append(torch.full((n,), IGNORE_INDEX, dtype=torch.long))
            if chunk.loss:
                targets, where, stops, valid = frames[chunk.adaptor]
                targets.append(chunk.rows)
                valid.append(torch.ones_like(chunk.rows, dtype=torch.bool))
                if chunk.padded_values:
                    valid[-1][-1, -chunk.padded_values:] = False
                where.append((row, torch.arange(start, start + n)))
                stop = torch.zeros(n)
                stop[-1] = 1.0 if chunk.ends else 0.0
                stops.append(stop)
            previous = ("feature", None, (chunk.adaptor, chunk.rows[-1:], chunk.positions[-1:]))
