"""Collation: samples → a padded (or packed) batch with routing tags for every position.

Shape legend: B rows, S encoder positions, L decoder positions, N feature rows of one adapter,
F their width, M modalities.

Encoder positions hold token ids or feature rows (embedded by the slot's adapter and scattered
into the sequence by ``*_index``, flat indices into ``B·S``). The decoder is teacher-forced:
position t reads item t-1 (BOS at t=0) and predicts item t. Decoder positions are tagged with
the modality and role of the item they predict, so every position that generates a box routes
as BOX. Continuous targets (audio, motion rows) are predicted by regression with a stop flag on
the last row of each run.

Packing puts several short samples in one row; ``tags.sample`` says which sample each position
belongs to, so attention (and context routing) can stay within a sample.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Mapping, Optional, Sequence

import torch

from moe_gen.routing.tags import MODALITIES as TAG_MODALITIES
from moe_gen.routing.tags import PASSES, TokenTags
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
    """

    tokens: torch.Tensor
    is_token: torch.Tensor
    rows: dict[str, torch.Tensor]
    index: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    padding_mask: torch.Tensor
    tags: TokenTags


@dataclasses.dataclass
class Batch:
    """A collated batch.

    Attributes:
        encoder, decoder: the two sides (decoder inputs are the previous items).
        labels: long ``[B, L]`` next-token targets, ``IGNORE_INDEX`` where nothing is scored.
        frame_targets: adapter name → float ``[N, F]`` regression targets at ``frame_index``
            (flat decoder positions), with ``frame_stop`` float ``[N]`` (1 on a run's last row).
        tasks: the task name of each sample, in row-then-sample order.
        tokens_per_modality: valid positions per modality name, both sides.
        padding_fraction: share of padded positions over both sides.
    """

    encoder: Side
    decoder: Side
    labels: torch.Tensor
    frame_targets: dict[str, torch.Tensor]
    frame_index: dict[str, torch.Tensor]
    frame_stop: dict[str, torch.Tensor]
    tasks: list[str]
    tokens_per_modality: dict[str, int]
    padding_fraction: float


def _modality_id(name: str) -> int:
    return TAG_MODALITIES.index(name) if name in TAG_MODALITIES else len(TAG_MODALITIES) - 1


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


class _SideBuilder:
    """Accumulates one side's positions, row by row."""

    def __init__(self, num_rows: int, task_ids: Mapping[str, int], num_modalities: int) -> None:
        self.rows: list[list[dict]] = [[] for _ in range(num_rows)]
        self.task_ids, self.num_modalities = task_ids, num_modalities

    def add(self, row: int, *, token: Optional[int], feature: Optional[tuple], modality: str,
            role: int, causal: bool, task: str, task_modalities: tuple[str, ...], sample: int,
            pass_id: int) -> None:
        self.rows[row].append(dict(token=token, feature=feature, modality=modality, role=role,
                                   causal=causal, task=task, used=task_modalities, sample=sample,
                                   pass_id=pass_id))

    def build(self, pad_id: int) -> Side:
        B = len(self.rows)
        S = max([len(r) for r in self.rows] + [1])
        tokens = torch.full((B, S), pad_id, dtype=torch.long)
        is_token = torch.zeros(B, S, dtype=torch.bool)
        padding = torch.ones(B, S, dtype=torch.bool)
        task = torch.zeros(B, S, dtype=torch.long)
        modality = torch.zeros(B, S, dtype=torch.long)
        role = torch.zeros(B, S, dtype=torch.long)
        causal = torch.zeros(B, S, dtype=torch.bool)
        pass_id = torch.zeros(B, S, dtype=torch.long)
        sample = torch.zeros(B, S, dtype=torch.long)
        used = torch.zeros(B, S, self.num_modalities, dtype=torch.bool)
        rows, index, positions = defaultdict(list), defaultdict(list), defaultdict(list)
        for b, items in enumerate(self.rows):
            for s, item in enumerate(items):
                padding[b, s] = False
                if item["token"] is not None:
                    tokens[b, s], is_token[b, s] = item["token"], True
                else:
                    adaptor, row, pos = item["feature"]
                    rows[adaptor].append(row)
                    positions[adaptor].append(pos)
                    index[adaptor].append(b * S + s)
                task[b, s] = self.task_ids[item["task"]]
                modality[b, s] = _modality_id(item["modality"])
                role[b, s], causal[b, s] = item["role"], item["causal"]
                pass_id[b, s], sample[b, s] = item["pass_id"], item["sample"]
                for m in item["used"]:
                    used[b, s, _modality_id(m)] = True
        tags = TokenTags(task=task, modality=modality, role=role, task_modalities=used, causal=causal,
                         pass_id=pass_id, sample=sample)
        return Side(
            tokens=tokens, is_token=is_token,
            rows={k: torch.stack(v) for k, v in rows.items()},
            index={k: torch.tensor(v, dtype=torch.long) for k, v in index.items()},
            positions={k: torch.stack(v) for k, v in positions.items()},
            padding_mask=padding, tags=tags,
        )


def collate(
    samples: Sequence[Sample],
    tokenizer: Tokenizer,
    task_ids: Mapping[str, int],
    *,
    pack: bool = False,
    max_length: Optional[int] = None,
    pass_name: str = "generative",
) -> Batch:
    """Pads (or packs) samples into a ``Batch``.

    Args:
        samples: encoded samples (from ``TaskPlan.encode``).
        tokenizer: for pad, BOS ids.
        task_ids: task name → index in the model's task vocabulary (the ``task`` tag).
        pack: put several samples per row (first fit up to ``max_length`` encoder positions).
        max_length: row length for packing (default: the longest sample).
        pass_name: the ``pass`` tag of every position.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    for s in samples:
        if s.task not in task_ids:
            raise ValueError(f"task {s.task!r} is not in the task vocabulary ({', '.join(task_ids)})")
    if pack:
        lengths = [max(s.lengths()) for s in samples]
        groups = pack_rows(lengths, max_length or max(lengths))
    else:
        groups = [[i] for i in range(len(samples))]
    pass_id = PASSES.index(pass_name)
    M = len(TAG_MODALITIES)
    enc, dec = _SideBuilder(len(groups), task_ids, M), _SideBuilder(len(groups), task_ids, M)
    labels_rows: list[list[int]] = [[] for _ in groups]
    frames = defaultdict(lambda: ([], [], []))  # adaptor -> (targets, (row, pos), stop)
    counts: Counter = Counter()
    tasks = []
    for row, group in enumerate(groups):
        for local, i in enumerate(group):
            sample = samples[i]
            tasks.append(sample.task)
            common = dict(task=sample.task, task_modalities=sample.task_modalities, sample=local,
                          pass_id=pass_id)
            for chunk in sample.encoder:
                counts[chunk.modality] += len(chunk)
                for j in range(len(chunk)):
                    feature = None if chunk.tokens is not None else (chunk.adaptor, chunk.rows[j],
                                                                     chunk.positions[j])
                    enc.add(row, token=chunk.tokens[j] if chunk.tokens is not None else None,
                            feature=feature, modality=chunk.modality, role=chunk.role, causal=False,
                            **common)
            _add_decoder(sample, row, dec, labels_rows[row], frames, tokenizer, common, counts)
    encoder, decoder = enc.build(tokenizer.pad_id), dec.build(tokenizer.pad_id)
    B, L = decoder.padding_mask.shape
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for b, lab in enumerate(labels_rows):
        labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    frame_targets, frame_index, frame_stop = {}, {}, {}
    for adaptor, (targets, where, stops) in frames.items():
        frame_targets[adaptor] = torch.stack(targets)
        frame_index[adaptor] = torch.tensor([b * L + t for b, t in where], dtype=torch.long)
        frame_stop[adaptor] = torch.tensor(stops, dtype=torch.float32)
    total = encoder.padding_mask.numel() + decoder.padding_mask.numel()
    padded = int(encoder.padding_mask.sum() + decoder.padding_mask.sum())
    return Batch(encoder, decoder, labels, frame_targets, frame_index, frame_stop, tasks,
                 dict(counts), padded / total if total else 0.0)


def _add_decoder(sample: Sample, row: int, dec: _SideBuilder, labels: list[int], frames, tokenizer,
                 common, counts) -> None:
    """Teacher forcing: the input of each position is the previous item (BOS first)."""
    previous = ("token", tokenizer.bos_id, None)
    for chunk in sample.decoder:
        counts[chunk.modality] += len(chunk)
        for j in range(len(chunk)):
            kind, token, feature = previous
            dec.add(row, token=token if kind == "token" else None, feature=feature,
                    modality=chunk.modality, role=chunk.role, causal=True, **common)
            t = len(dec.rows[row]) - 1
            if chunk.tokens is not None:
                labels.append(chunk.tokens[j] if chunk.loss else IGNORE_INDEX)
                previous = ("token", chunk.tokens[j], None)
            else:
                labels.append(IGNORE_INDEX)
                if chunk.loss:
                    targets, where, stops = frames[chunk.adaptor]
                    targets.append(chunk.rows[j])
                    where.append((row, t))
                    stops.append(1.0 if j == len(chunk) - 1 else 0.0)
                previous = ("feature", None, (chunk.adaptor, chunk.rows[j], chunk.positions[j]))
