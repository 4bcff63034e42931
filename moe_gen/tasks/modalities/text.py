"""Text preprocessing: normalisation, span masking with sentinels, token noise.

These are the operations behind the TEXT slot attributes ``uncased``, ``no_punctuation``,
``max_length``, ``mask_ratio``, ``noise_ratio`` and ``subword_sampling`` (subword regularisation,
Kudo 2018: a training read of an input is cut into pieces by a segmentation drawn from the unigram
model's distribution over them, not always the most likely one; smaller alpha, more varied
pieces). They work on token ids of the shared ``Tokenizer`` and take an explicit ``random.Random``
(or a seed drawn from it) so a sample encodes the same way every time it is drawn with the same seed.
"""

from __future__ import annotations

import random
import string
import unicodedata
from typing import Optional

from moe_gen.tasks.tokenizer import Tokenizer

__all__ = ["normalize_text", "span_mask", "add_token_noise", "truncate", "slot_token_ids", "slot_text"]

_PUNCTUATION = set(string.punctuation)


def normalize_text(text: str, *, uncased: bool = False, no_punctuation: bool = False) -> str:
    """Lower-cases (``uncased``) and/or removes punctuation (``no_punctuation``).

    Punctuation is every Unicode character whose category starts with "P" plus ASCII
    punctuation; runs of white space left behind collapse to one space.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if uncased:
        text = text.lower()
    if no_punctuation:
        text = "".join(
            " " if (c in _PUNCTUATION or unicodedata.category(c).startswith("P")) else c for c in text
        )
        text = " ".join(text.split())
    return text


def truncate(ids: list[int], max_length: int | None) -> list[int]:
    """The first ``max_length`` ids (all of them when ``max_length`` is None)."""
    if max_length is None:
        return list(ids)
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    return list(ids[:max_length])


def slot_token_ids(text: str, attrs, tokenizer: Tokenizer, sampling_seed: Optional[int] = None) -> list[int]:
    """The token ids a text slot with attributes ``attrs`` trains on for ``text`` (before masking
    and noise): normalised (``uncased``, ``no_punctuation``), tokenised, cut at ``max_length``
    (and then before a character the cut split: byte pieces of half a "漢" or "🙂" decode to
    "\ufffd", and a lone word-start piece to a trailing space). With ``sampling_seed`` and the
    slot's ``subword_sampling=alpha``, tokenised into a segmentation drawn by that seed."""
    text = normalize_text(text, uncased=bool(attrs.get("uncased")), no_punctuation=bool(attrs.get("no_punctuation")))
    if sampling_seed is not None and attrs.get("subword_sampling") is not None:
        ids = tokenizer.encode_sampled(text, float(attrs["subword_sampling"]), sampling_seed)
    else:
        ids = tokenizer.encode(text)
    kept = truncate(ids, attrs.get("max_length"))
    if len(kept) < len(ids):
        while kept and _cut_short(tokenizer.decode(kept)):
            kept.pop()
    return kept


def _cut_short(text: str) -> bool:
    return text.endswith("\ufffd") or text != text.rstrip()


def slot_text(value, attrs, tokenizer: Tokenizer) -> str:
    """A target value as a model trained on the slot writes it: normalised by the slot's
    attributes, tokenised and decoded (the tokenizer's own normalisation, e.g. sentencepiece's
    NFKC and whitespace folding, applies too: a model can only write what it was taught, so
    "Hello,  world" is answered, and scored, as "Hello, world"). What its answers are scored against."""
    from moe_gen.tasks.modalities.base import label_text

    text = label_text(value)  # bytes as their UTF-8 text, as the slot trains on them (not "b'...'")
    return tokenizer.decode(slot_token_ids(str(value) if text is None else text, attrs, tokenizer))


def span_mask(
    ids: list[int],
    mask_ratio: float,
    tokenizer: Tokenizer,
    rng: random.Random,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """T5-style span corruption.

    About ``mask_ratio`` of the tokens, in spans of mean length ``mean_span``, are replaced in
    the input by one sentinel each; the target lists each sentinel followed by the tokens it
    hid. With ``mask_ratio=0`` the input is unchanged and the target empty. Sentinels the text
    holds itself keep theirs: the spans take the sentinels after the highest of them (none left:
    the text is not masked).

    Returns:
        (input ids, target ids).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n = len(ids)
    if n == 0 or mask_ratio == 0:
        return list(ids), []
    # sentinels the text itself holds (written "<extra_id_0>" in the data) stay its own: the spans take
    # the ones after them (before the twenty-sixth session's audit both read <extra_id_0>)
    own = {tokenizer.sentinel_id(k): k for k in range(tokenizer.num_sentinels)}
    first = max((own[i] for i in ids if i in own), default=-1) + 1
    if first >= tokenizer.num_sentinels:  # none left to mark a span with: the text as it is
        return list(ids), []
    # at least one token (a short text, or a small ratio, would otherwise hand the model its answer
    # unmasked), and at least one left visible where there are two or more
    num_masked = max(1, round(n * mask_ratio)) if n == 1 else min(max(1, round(n * mask_ratio)), n - 1)
    num_spans = max(1, min(round(num_masked / mean_span), num_masked, n - num_masked,
                           tokenizer.num_sentinels - first))
    # Split the masked count into num_spans positive lengths, and the kept count into
    # num_spans + 1 gaps (the first may be empty), each by a random composition.
    span_lengths = _random_composition(num_masked, num_spans, rng, allow_zero_first=False)
    gap_lengths = _random_composition(n - num_masked, num_spans + 1, rng, allow_zero_first=True)
    inputs, targets, pos = [], [], 0
    for k in range(num_spans):
        inputs.extend(ids[pos:pos + gap_lengths[k]])
        pos += gap_lengths[k]
        sentinel = tokenizer.sentinel_id(first + k)
        inputs.append(sentinel)
        targets.append(sentinel)
        targets.extend(ids[pos:pos + span_lengths[k]])
        pos += span_lengths[k]
    inputs.extend(ids[pos:])
    return inputs, targets


def _random_composition(total: int, parts: int, rng: random.Random, allow_zero_first: bool) -> list[int]:
    """``parts`` lengths summing to ``total``; all ≥ 1, except possibly the first and last gap."""
    if not allow_zero_first:
        cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds, bounds[1:])]
    # Gaps between spans must be ≥ 1 (else two spans merge); the outer gaps may be 0.
    inner = parts - 2
    if inner == 0:
        first = rng.randint(0, total)
        return [first, total - first]
    spare = total - inner
    cuts = sorted(rng.randint(0, spare) for _ in range(2))
    first, last = cuts[0], spare - cuts[1]
    middle_total = cuts[1] - cuts[0] + inner
    middle = _random_composition(middle_total, inner, rng, allow_zero_first=False) if inner else []
    return [first, *middle, last]


def add_token_noise(
    ids: list[int], noise_ratio: float, tokenizer: Tokenizer, rng: random.Random
) -> list[int]:
    """Replaces about ``noise_ratio`` of the (non-special) tokens by random ordinary pieces."""
    if not 0.0 <= noise_ratio <= 1.0:
        raise ValueError(f"noise_ratio must be in [0, 1], got {noise_ratio}")
    out = list(ids)
    for i, t in enumerate(out):
        if not tokenizer.is_special(t) and rng.random() < noise_ratio:
            out[i] = rng.choice(tokenizer.piece_ids)  # the same draws as randrange over the range
    return out
