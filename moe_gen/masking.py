"""Masked multimodal modeling (4M, Mizrahi et al. 2023): fixed token budgets split by Dirichlet.

Every sample gets the same input budget and target budget, whatever its number of modalities:
per sample, a Dirichlet(α) draw over the sample's modalities splits each budget; a modality takes
at most the positions it has, and what is left over goes to the modality with the largest share
(as 4M does). Inputs and targets are disjoint random subsets of each modality's positions, kept in
their original order. As in 4M the inputs are chosen first and the targets among the positions
left; 4M's budgets (128 + 128) are far below the positions its samples hold, and where a sample
holds no more positions than the input budget, it shows all but one, which is its target (before
2026-12-06 it showed them all and predicted nothing: the default 128 on a 17-position digit trained
on the routing loss alone). ``α`` may be a number or a dict by modality (``{"IMAGE": 1000, "TEXT": 1e-3}``
approximates 4M's RGB-to-all mixture).

moe_gen's decoder predicts the target positions in order, teacher-forced: token targets with the
cross-entropy, feature targets (image patches, audio/motion rows) by regression with the frame
heads. (4M predicts discrete tokens of per-modality tokenizers for every modality.)
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Mapping, Union

import numpy as np
import torch

from moe_gen.tasks.plan import INPUT, TARGET, Chunk, Sample

__all__ = ["split_budget", "mask_sample", "masked_view", "masked_place", "check_masked_answer"]


def split_budget(budget: int, available: Mapping[str, int], alpha: Union[float, Mapping[str, float]],
                 rng: random.Random) -> dict[str, int]:
    """Positions per modality: a Dirichlet(α) share of ``budget``, capped at what each modality has;
    the remainder goes to the modality with the largest share that still has room."""
    names = [m for m in sorted(available) if available[m] > 0]
    if not names or budget <= 0:
        return {m: 0 for m in available}
    alphas = [float(alpha.get(m, 1.0)) if isinstance(alpha, Mapping) else float(alpha) for m in names]
    gen = np.random.default_rng(rng.randrange(2**32))
    shares = gen.dirichlet([max(a, 1e-6) for a in alphas])
    counts = {m: min(int(s * budget), available[m]) for m, s in zip(names, shares)}
    left = min(budget, sum(available[m] for m in names)) - sum(counts.values())
    for m in sorted(names, key=lambda n: -shares[names.index(n)]):
        if left <= 0:
            break
        extra = min(left, available[m] - counts[m])
        counts[m] += extra
        left -= extra
    return {m: counts.get(m, 0) for m in available}


def _streams(sample: Sample) -> dict[str, list[tuple[Chunk, int]]]:
    """Every (chunk, index) position of the sample's data slots, by modality (prompts excluded)."""
    streams: dict[str, list[tuple[Chunk, int]]] = {}
    for chunk in sample.encoder + sample.decoder:
        if chunk.column is None:  # literal prompt text and EOS markers carry no content
            continue
        streams.setdefault(chunk.modality, []).extend((chunk, j) for j in range(len(chunk)))
    return streams


def _gather(modality: str, stream: list[tuple[Chunk, int]], chosen: list[int], role: int, loss: bool) -> list[Chunk]:
    """The positions ``chosen`` (sorted indices into the modality's ``stream``) as chunks, each
    item placed at its index in the stream (``Chunk.position_ids``: which image code, say, a
    position holds or predicts; in sequence they would all move up into the gaps); consecutive
    picks from one source chunk stay one chunk. A target of a closed-set slot keeps the label trie's
    tokens (``Chunk.allowed``: its loss a softmax over them, as the generative one is and decoding
    reads) where every position before it in the label is a target before it, the prefix the trie's
    sets follow; elsewhere its softmax is over every token (before the twenty-sixth session's audit it
    was everywhere)."""
    out: list[Chunk] = []
    for _, group in itertools.groupby(chosen, key=lambda p: id(stream[p][0])):
        places = list(group)
        chunk, index = stream[places[0]][0], [stream[p][1] for p in places]
        if chunk.tokens is not None:
            # (index is sorted and distinct: index[k] == k holds when the label's first k + 1 positions are picked)
            allowed = [chunk.allowed[j] if j == k else None for k, j in enumerate(index)] \
                if loss and chunk.allowed is not None else None
            out.append(Chunk(modality, role, loss, tokens=[chunk.tokens[j] for j in index], column=chunk.column,
                             allowed=allowed if allowed and any(a is not None for a in allowed) else None,
                             position_ids=places))
        else:
            rows = torch.tensor(index, dtype=torch.long)
            # the padding of the source's last row stays marked when that row is this chunk's last
            # and the stop flag's target with it (rows picked from the middle of a signal do not end it)
            last = index[-1] == len(chunk) - 1
            out.append(Chunk(modality, role, loss, rows=chunk.rows[rows], positions=chunk.positions[rows],
                             adaptor=chunk.adaptor, column=chunk.column, position_ids=places,
                             padded_values=chunk.padded_values if last else 0, ends=last and chunk.ends))
    return out


def mask_sample(sample: Sample, *, input_budget: int = 128, target_budget: int = 128,
                alpha: Union[float, Mapping[str, float]] = 0.5,
                target_alpha: Union[None, float, Mapping[str, float]] = None, rng: random.Random) -> Sample:
    """A 4M training sample: ``input_budget`` positions in, split across the sample's modalities by
    Dirichlet(``alpha``), and ``target_budget`` other positions to predict, split by
    Dirichlet(``target_alpha``; default ``alpha``). A sample of ``input_budget`` positions or fewer
    shows all but one: every sample has a target, and one input unless ``input_budget`` is 0.

    Raises:
        ValueError: naming the task and the row, when the sample has too few data positions for
            that (none; or one, with an ``input_budget`` of 1 or more).
    """
    streams = _streams(sample)
    available = {m: len(v) for m, v in streams.items()}
    total = sum(available.values())
    if total < 1 + min(input_budget, 1):
        raise ValueError(f"task {sample.task!r}: row {sample.index} holds {total} data position(s); the masked "
                         f"objective needs one to predict and, with masked_input_budget {input_budget}, one to show")
    inputs = split_budget(min(input_budget, total - 1), available, alpha, rng)
    remaining = {m: available[m] - inputs[m] for m in available}
    targets = split_budget(target_budget, remaining, alpha if target_alpha is None else target_alpha, rng)
    encoder, decoder = [], []
    for modality in sorted(streams):
        positions = list(range(len(streams[modality])))
        rng.shuffle(positions)
        chosen_in = sorted(positions[: inputs[modality]])
        chosen_out = sorted(positions[inputs[modality]: inputs[modality] + targets[modality]])
        encoder += _gather(modality, streams[modality], chosen_in, INPUT, False)
        decoder += _gather(modality, streams[modality], chosen_out, TARGET, True)
    # The decoder predicts the modalities of the task's declared targets first, in the template's
    # order, then the others: where a declared target is all out, it comes right after BOS, as
    # ``masked_view`` decodes it (sorted by name, a digit's label always followed the image codes
    # left out, and decoding it first asked what training never had).
    declared = list(dict.fromkeys(c.modality for c in sample.decoder if c.loss and c.column is not None))
    decoder.sort(key=lambda c: declared.index(c.modality) if c.modality in declared else len(declared))
    return dataclasses.replace(sample, encoder=encoder, decoder=decoder,
                               meta={**sample.meta, "budgets": {"input": inputs, "target": targets}})


def masked_view(sample: Sample) -> Sample:
    """An inference sample (``plan.encode(..., inference=True)``) as the masked objective shows
    samples, for decoding a task trained with it: every data position of its inputs in the
    encoder, ordered by modality as ``mask_sample`` orders them, without the instruction's literal
    text; the decoder holds no forced prefix (literal text, copied prompts), so the answer starts
    right after BOS. Collate it with ``pass_name="masked"``. Unlike training, the encoder holds
    every input position, not an input budget's share (4M reads all it is given), each at its
    place in its modality's stream, as training places them; the answer is placed after its
    modality's inputs (``masked_place``). Made for targets of one modality (``infer`` refuses
    others: training numbers each modality's items apart). A given ``no_loss`` decoder slot before
    the target is an input, as training's streams make it."""
    streams = _streams(sample)
    encoder = [chunk for m in sorted(streams) for chunk in _gather(m, streams[m], list(range(len(streams[m]))),
                                                                   INPUT, False)]
    return dataclasses.replace(sample, encoder=encoder, decoder=[])


def masked_place(sample: Sample, modality: str) -> int:
    """Where a ``masked_view`` sample places a target of ``modality``: after its modality's
    inputs, as ``mask_sample`` numbers each modality's positions."""
    return sum(len(c) for c in sample.encoder if c.modality == modality)


def check_masked_answer(plan, template: int = 0) -> None:
    """Checks that a task trained with the masked objective can be decoded as it trains: a masked
    sample's targets are data positions only, of one modality, numbered along its stream back to
    back, with no literal text and no EOS between them. Decoding follows the template's layout
    (``moe_gen.model.grammar``), so a second modality's targets, or literal text or a free-text
    value's closing EOS before a later target value (another slot, or the next item of a
    repetition group), would have the targets after it read where training never put them.
    Literal text before the first target, or after the last, is never fed (``masked_view``).

    Raises:
        ValueError: naming the task, when it has no target, or what stands between its targets.
    """
    decoder = plan.templates[template][1]
    scored = [i for i, p in enumerate(decoder) if p.loss]
    if not scored:  # (as the grammar says it: nothing to decode, and masking has no target to draw)
        raise ValueError(f"task {plan.name!r} has no scored decoder slot to decode")
    modalities = sorted({decoder[i].modality.name for i in scored})
    if len(modalities) > 1:  # each modality's items are numbered apart in training (masking)
        raise ValueError(f"task {plan.name!r} trained with the masked objective has targets in "
                         f"{len(modalities)} modalities ({', '.join(modalities)}); decoding it reads one "
                         "modality's answer: declare one target modality, or decode each as its own task")
    closing = plan.closing_eos(template)
    grouped = {decoder[i].slot.repeat for i in scored if decoder[i].slot.repeat is not None}
    for i, p in enumerate(decoder):
        if not p.slot.is_literal and i not in closing:
            continue
        before_a_target = i >= scored[0] and any(j > i for j in scored)
        if not before_a_target and p.slot.repeat not in grouped:  # (None never is)
            continue  # before the first target or after the last: never fed before a target
        what = f"literal text {p.slot.text!r}" if p.slot.is_literal else f"the EOS that closes {p.slot}"
        raise ValueError(f"task {plan.name!r} trained with the masked objective has {what} between its target "
                         "values; its masked samples hold the targets' data positions back to back, without "
                         "literal text or EOS, so decoding would read the targets after it where training never "
                         "put them: leave the text out of the answer (or put it in the input), declare one "
                         "target, or train the task with the generative objective")
