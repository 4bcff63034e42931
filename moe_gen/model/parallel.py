"""Parallel iterative decoding of image-code targets (MaskGIT, Chang et al. 2022).

Shape legend: B rows, L decoder positions, N codes per image, K codebook size.

Training (the ``parallel`` objective, ``moe_gen.objectives.ParallelObjective``): a random share
of a sample's code tokens, cos(π/2 · u) for u ~ U(0, 1) (MaskGIT's cosine schedule), is replaced
by a mask token; the decoder reads the whole code sequence at once (bidirectional self-attention,
cross-attending to the encoder as usual) and each masked position predicts its own code. The
batch is tagged with the ``masked`` pass and ``causal=False`` (as the contrastive pass is), so
tag-routed layers can route it apart from left-to-right decoding; decoding tags it alike (before
2026-12-06 both tagged every decoder position ``causal=True``).

Decoding (``parallel_generate``): all N codes start masked; each of ``steps`` decoder passes
(at most N: one code a pass at the least) predicts every masked position, keeps the most
confident predictions and leaves ⌊N · cos(π/2 · (t+1) / steps)⌋ positions masked for the next
pass (fewer than before it: each pass fixes at least one; ``masked_counts``), none after the
last. With 4 steps a 16-code image takes 4 decoder passes instead of 16. The decoder reads the
sequence training reads: the forced text before the codes, the codes, and the template's literal
text and EOS after them (``_masked_batch``).

The mask token is the vocabulary's last sentinel (``<extra_id_{S-1}>``); span corruption of
text uses sentinels from the first one up, so the two meet only in a text with S spans.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

import torch

from moe_gen.tasks.batch import IGNORE_INDEX, Batch, collate
from moe_gen.tasks.plan import TARGET, Chunk, Sample

__all__ = ["mask_token", "code_span", "mask_code_targets", "masked_counts", "parallel_generate"]


def mask_token(tokenizer) -> int:
    """The id that stands for a code not decided yet."""
    if tokenizer.num_sentinels < 1:
        raise ValueError("parallel decoding needs a sentinel token for masked codes; the tokenizer has none")
    return tokenizer.sentinel_id(tokenizer.num_sentinels - 1)


def code_span(sample: Sample, code_ids: frozenset) -> tuple[int, int]:
    """(offset, length) of the sample's image-code target among its decoder items.

    Raises:
        ValueError: naming the task and row, when the sample has no such target, more than one, or
            another target besides (only the codes are scored: a closed-set label after them kept
            its allowed tokens where the last code is predicted, an infinite loss).
    """
    offset, spans, others = 0, [], []
    for chunk in sample.decoder:
        if chunk.loss and chunk.column is not None:
            if chunk.modality == "IMAGE" and chunk.tokens and set(chunk.tokens) <= code_ids:
                spans.append((offset, len(chunk)))
            else:
                others.append(f"{chunk.modality}:{chunk.column}")
        offset += len(chunk)
    if len(spans) != 1:
        raise ValueError(f"task {sample.task!r}: the parallel objective needs exactly one image-code target "
                         f"(an [IMAGE:...,preprocess=image_vq] target slot); row {sample.index} has {len(spans)}")
    if others:
        raise ValueError(f"task {sample.task!r}: the parallel objective trains the image codes alone; row "
                         f"{sample.index} also has the target(s) {sorted(set(others))}: train them as a task of "
                         "their own (e.g. with the generative objective)")
    if spans[0][0] + spans[0][1] >= offset:  # the last code is a decoder input only if an item follows
        raise ValueError(f"task {sample.task!r}: the parallel objective needs an item after the image codes "
                         "(the answer's EOS, which disable_auto_boseos removes)")
    return spans[0]


def masked_counts(length: int, steps: int) -> list[int]:
    """Codes still masked after each of T = min(steps, N) passes: ⌊N · cos(π/2 · (t+1)/T)⌋, ending
    at 0, and fewer after every pass than before it (each pass fixes at least one code), as
    MaskGIT's own decoder clips it. The floor alone could leave a count unchanged (16 codes in 10
    passes: 15, 15, ...), and a pass that fixes no code reads the same input again: a decoder pass
    for nothing. Past one code a pass (steps > N), more passes could only fix none.

    The clip never runs the schedule dry: with k passes to go, N · cos(π/2 · (T-k)/T) =
    N · sin(π/2 · k/T) ≥ N · k/T ≥ k codes are left (sin is concave there), one for each pass.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"parallel decoding needs a whole number of steps >= 1 (parallel_steps), got {steps!r}")
    passes = max(1, min(steps, length))
    left, out = length, []
    for t in range(passes - 1):
        left = min(left - 1, math.floor(length * math.cos(math.pi / 2 * (t + 1) / passes)))
        out.append(left)
    return out + [0]


def mask_code_targets(batch: Batch, samples: Sequence[Sample], tokenizer, code_ids: frozenset,
                      rng: random.Random) -> Batch:
    """A padded teacher-forcing batch (one sample a row) turned into a MaskGIT batch: in each row
    a cosine-schedule share of the codes (at least one) is masked in the decoder input and scored
    at its own position; nothing else is scored; the decoder attends bidirectionally
    (``_bidirectional``)."""
    tokens = batch.decoder.tokens.clone()
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    mask = mask_token(tokenizer)
    for b, sample in enumerate(samples):
        offset, length = code_span(sample, code_ids)
        count = max(1, math.ceil(length * math.cos(math.pi / 2 * rng.random())))
        for j in rng.sample(range(length), count):
            position = offset + j + 1  # decoder input position t reads item t - 1 (BOS at 0)
            labels[b, position] = tokens[b, position]
            tokens[b, position] = mask
    return _bidirectional(dataclasses.replace(batch, decoder=dataclasses.replace(batch.decoder, tokens=tokens),
                                              labels=labels))


def _bidirectional(batch: Batch) -> Batch:
    """``batch`` with its decoder attending bidirectionally and its tokens tagged so (``causal``
    False), for training and decoding alike: routers read the tag."""
    tags = dataclasses.replace(batch.decoder.tags, causal=torch.zeros_like(batch.decoder.tags.causal))
    return dataclasses.replace(batch, decoder=dataclasses.replace(batch.decoder, tags=tags), causal=False)


def _choose(logp_BNK: torch.Tensor, temperature: float,
            generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Code indices ``[B, N]`` (best, or drawn at ``temperature``, each row from its own stream)
    and their log-probabilities."""
    if temperature > 0:
        probs = (logp_BNK / temperature).softmax(-1)
        choice = torch.stack([torch.multinomial(probs[b], 1, generator=g).squeeze(-1)
                              for b, g in enumerate(generators)])
    else:
        choice = logp_BNK.argmax(-1)
    return choice, logp_BNK.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def parallel_generate(model, plan, samples: Sequence[Sample], *, steps: int = 4, temperature: float = 0.0,
                      seed: int = 0) -> list:
    """Image-code answers for encoded inference samples in ``steps`` decoder passes (one encoder
    pass); ``temperature`` > 0 draws each code (reproducibly by ``seed``) instead of taking the
    most likely. Returns ``Prediction`` objects with ``.image``, ``.tokens`` (the code tokens)
    and ``.score`` (the sum of the chosen codes' log-probabilities when they were fixed)."""
    from moe_gen.model.generate import Prediction, _row_streams
    from moe_gen.model.grammar import TargetGrammar

    if model.config.decoder_only:
        raise ValueError("parallel decoding needs the encoder-decoder layout")
    grammar = TargetGrammar(plan, model.tokenizer, modality_ids=model.modality_ids)
    scored = [i for i, p in enumerate(grammar.slots) if p.loss]
    if len(scored) != 1 or grammar.kinds[scored[0]] != "codes":
        raise ValueError(f"task {plan.name!r}: parallel decoding needs a single image-code target "
                         f"([IMAGE:...,preprocess=image_vq]); its targets are {[grammar.kinds[i] for i in scored]}")
    slot = scored[0]
    spec = grammar.slots[slot].decode
    mask = mask_token(model.tokenizer)
    device = model.token_embedding.weight.device
    # the codes follow each sample's forced decoder prefix (literal text before the image)
    offsets = torch.tensor([sum(map(len, s.decoder)) for s in samples], device=device)
    batch = _masked_batch(model, grammar, slot, samples, mask).to(device)
    code_tokens = torch.tensor(spec.tokens, device=device)
    # one stream per row (seed and input): a drawn image does not depend on the rows beside it
    codes, scores = _iterate(model, batch, offsets, code_tokens, spec.length, mask, steps, temperature,
                             _row_streams(seed, samples))
    render = grammar.renderers[slot]
    out = []
    for row, score in zip(codes.cpu(), scores.tolist()):
        image = render(row.tolist())
        out.append(Prediction(image=image, tokens=[int(code_tokens[k]) for k in row], score=float(score),
                              targets={grammar.keys[slot]: image}))
    return out


def _iterate(model, batch: Batch, offsets: torch.Tensor, code_tokens: torch.Tensor, N: int, mask: int, steps: int,
             temperature: float, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding passes over ``N`` codes a row: code indices ``[B, N]`` and the summed
    log-probabilities ``[B]``."""
    B, device = len(offsets), offsets.device
    rows = torch.arange(B, device=device).unsqueeze(1)
    positions = offsets.unsqueeze(1) + 1 + torch.arange(N, device=device)  # decoder inputs holding the codes
    memory = model.encode(batch.encoder)
    undecided = torch.ones(B, N, dtype=torch.bool, device=device)
    codes = torch.zeros(B, N, dtype=torch.long, device=device)
    scores = torch.zeros(B, dtype=torch.float64, device=device)
    tokens = batch.decoder.tokens.clone()
    for left in masked_counts(N, steps):
        side = dataclasses.replace(batch.decoder, tokens=tokens)
        hidden = model.decode(side, batch.encoder, memory, causal=False).hidden
        logp = model.output_logits(hidden[rows, positions])[..., code_tokens].float().log_softmax(-1)
        choice, confidence = _choose(logp.cpu(), temperature, generators)  # drawn on the CPU: any device alike
        choice, confidence = choice.to(device), confidence.to(device)
        fix = undecided.sum(1) - left  # codes to fix in this pass, per row: the most confident undecided ones
        ranks = confidence.masked_fill(~undecided, float("-inf")).argsort(dim=1, descending=True).argsort(dim=1)
        newly = (ranks < fix.unsqueeze(1)) & undecided
        codes = torch.where(newly, choice, codes)
        scores += torch.where(newly, confidence, 0.0).sum(1).double()
        undecided &= ~newly
        tokens[rows, positions] = torch.where(undecided, torch.full_like(codes, mask), code_tokens[codes])
    return codes, scores


def _masked_batch(model, grammar, slot: int, samples: Sequence[Sample], mask: int) -> Batch:
    """The inference samples laid out as training lays out their decoder (``mask_code_targets``
    with every code masked): the forced prefix, a mask token for each code of target ``slot``, then
    what the template puts after the codes, its literal text (forced) and the answer's EOS (also
    where ``disable_auto_boseos`` leaves nothing after the codes: every mask must be a decoder
    input); collated for the ``masked`` pass and tagged as training tags it. Before the fifteenth
    audit the literal text after the codes was left out: the bidirectional decoder read it in
    training, never in decoding."""
    target = grammar.slots[slot]
    codes = Chunk(target.modality.name, TARGET, True, tokens=[mask] * target.decode.length, column=target.slot.column)
    after = []
    for i in range(slot + 1, len(grammar.slots)):  # TargetGrammar: literal text alone follows the one target
        assert grammar.kinds[i] == "literal", (grammar.slots[i].slot, grammar.kinds[i])
        p = grammar.slots[i]
        after.append(Chunk(p.modality.name, p.role, p.loss, tokens=list(grammar.literals[i])))
    auto_eos = not any(p.slot.attrs.get("disable_auto_boseos") for p in grammar.slots)
    if auto_eos or not after:  # (TaskPlan.encode: the answer's EOS, tagged like the item before it)
        last = after[-1] if after else codes
        after.append(Chunk(last.modality, last.role, last.loss, tokens=[model.tokenizer.eos_id]))
    targets = [dataclasses.replace(s, decoder=[*s.decoder, codes, *after]) for s in samples]
    return _bidirectional(collate(targets, model.tokenizer, model.task_ids, pass_name="masked",
                                  modality_ids=model.modality_ids))
