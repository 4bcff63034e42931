"""Parallel iterative decoding (``moe_gen.model.parallel``, MaskGIT) pinned piece by piece in one
process: the mask token, the code span training scores, the share of codes a training row masks,
the draw at a temperature, and the passes of ``_iterate`` against a stub model whose logits are
hand-made (which codes each pass fixes, what the next pass reads, the score)."""

from __future__ import annotations

import dataclasses
import random
import types

import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.model.parallel import _choose, _iterate, code_span, mask_code_targets, mask_token
from moe_gen.tasks import Task, Tokenizer, collate
from moe_gen.tasks.batch import IGNORE_INDEX
from moe_gen.tasks.sources.vision import load_digit_images


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def drawing(tok):
    """A parallel-objective task with a literal decoder prefix ("here:") and its debug model."""
    rows = [{"label": r["label"], "image": r["image"]} for r in load_digit_images("train")[:4]]
    task = Task("draw", "draw [TEXT:label] -> here: [IMAGE:image,preprocess=image_vq]", rows, objective="parallel")
    torch.manual_seed(0)
    return task, rows, GeneralistModel.build(flavour("debug"), [task], tok).eval()


def _code_ids(tok) -> frozenset:
    return frozenset(tok.bin_id(k) for k in range(tok.num_bins))


def test_the_mask_token_is_the_last_sentinel_and_a_tokenizer_without_sentinels_is_refused(tok):
    """Span corruption of text uses sentinels from the first one up: the mask is the last one."""
    assert mask_token(tok) == tok.sentinel_id(tok.num_sentinels - 1) != tok.sentinel_id(0)
    no_sentinels = types.SimpleNamespace(num_sentinels=0, sentinel_id=lambda k: 7)
    with pytest.raises(ValueError, match="needs a sentinel token for masked codes; the tokenizer has none"):
        mask_token(no_sentinels)


def test_code_span_finds_the_one_code_target_and_needs_an_item_after_it(tok, drawing):
    task, rows, model = drawing
    sample = model.plan(task).encode(rows[0], 0, training=True)
    prefix, codes, eos = sample.decoder  # "here:", the 16 codes, the answer's EOS
    assert code_span(sample, _code_ids(tok)) == (len(prefix), 16) == (2, len(codes))
    assert len(eos) == 1  # one item after the codes is enough: the last code is a decoder input

    def with_decoder(*chunks):
        return dataclasses.replace(sample, decoder=list(chunks))

    with pytest.raises(ValueError, match="task 'draw': the parallel objective needs an item after the image codes"):
        code_span(with_decoder(prefix, codes), _code_ids(tok))
    for chunks, found in (((prefix, eos), 0), ((prefix, codes, codes, eos), 2)):
        with pytest.raises(ValueError, match=rf"task 'draw': .* exactly one image-code target .* row 0 has {found}$"):
            code_span(with_decoder(*chunks), _code_ids(tok))


class _FixedDraw(random.Random):
    """A stream whose ``random()`` is always ``u`` (the schedule's draw); positions are drawn as usual."""

    def __init__(self, u: float) -> None:
        super().__init__(0)
        self.u = u

    def random(self) -> float:
        return self.u


@pytest.mark.parametrize("u, masked", [(0.0, 16), (0.5, 12), (0.9, 3)])
def test_a_training_row_masks_the_ceiling_of_the_cosine_share_of_its_codes(tok, drawing, u, masked):
    """⌈16 · cos(π/2 · u)⌉ codes: 16, ⌈11.3⌉ = 12, ⌈2.5⌉ = 3; each scored with the code it hides."""
    task, rows, model = drawing
    sample = model.plan(task).encode(rows[0], 0, training=True)
    plain = collate([sample], tok, model.task_ids, pass_name="masked", modality_ids=model.modality_ids)
    batch = mask_code_targets(plain, [sample], tok, _code_ids(tok), _FixedDraw(u))
    scored = batch.labels != IGNORE_INDEX
    assert int(scored.sum()) == masked
    assert (batch.decoder.tokens[scored] == mask_token(tok)).all()
    assert torch.equal(batch.labels[scored], plain.decoder.tokens[scored])


def test_choosing_takes_the_best_code_cold_and_draws_each_row_from_its_own_stream_at_a_temperature():
    logp = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    best, best_logp = _choose(logp, 0.0, [])
    assert torch.equal(best, logp.argmax(-1)) and torch.equal(best_logp, logp.amax(-1))

    def streams():
        return [torch.Generator().manual_seed(seed) for seed in (11, 12)]

    drawn, drawn_logp = _choose(logp, 2.0, streams())
    assert not torch.equal(drawn, best)  # drawn, not the best
    for row, stream in enumerate(streams()):  # softmax(logp / T), from the row's own stream
        expected = torch.multinomial((logp[row] / 2.0).softmax(-1), 1, generator=stream).squeeze(-1)
        assert torch.equal(drawn[row], expected), row
    assert torch.equal(drawn[1:], _choose(logp[1:], 2.0, streams()[1:])[0])  # not changed by the row beside it
    assert torch.equal(drawn_logp, logp.gather(-1, drawn.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(_choose(logp, 1e-4, streams())[0], best)  # nearly cold: nearly always the best


@dataclasses.dataclass
class _Side:
    tokens: torch.Tensor


class _StubModel:
    """A decoder whose logits ignore its input (vocabulary entry v scores ``table[b, p, v]`` at
    position p of row b) and that records what each pass read."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.seen = table, []

    def encode(self, encoder):
        return None

    def decode(self, side, encoder, memory, causal=True):
        assert causal is False
        self.seen.append(side.tokens.clone())
        return types.SimpleNamespace(hidden=self.table)

    def output_logits(self, hidden):
        return hidden


def test_each_pass_fixes_the_most_confident_codes_and_the_next_pass_reads_them():
    """4 codes in 2 passes (2 left masked after the first). Row 0's codes sit at positions 1-4,
    row 1's after a one-token prefix (2-5); the vocabulary holds 3 codes (ids 5, 6, 7), mask 9."""
    code_tokens, mask = torch.tensor([5, 6, 7]), 9
    # per code position, logits over the 3 codes: best code and confidence differ
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 6.0], [0.0, 1.5, 0.0]])
    table = torch.full((2, 6, 10), -50.0)
    table[0, 1:5, 5:8] = logits  # confidence: position 2 > 0 > 3 > 1
    table[1, 2:6, 5:8] = logits.flip(0)  # reversed: position 1 > 3 > 0 > 2
    tokens = torch.tensor([[1, mask, mask, mask, mask, 2], [1, 4, mask, mask, mask, mask]])
    model = _StubModel(table)
    batch = types.SimpleNamespace(encoder=None, decoder=_Side(tokens))
    codes, scores = _iterate(model, batch, torch.tensor([0, 1]), code_tokens, 4, mask, 2, 0.0, [])

    assert codes.tolist() == [[0, 1, 2, 1], [1, 2, 1, 0]]
    assert len(model.seen) == 2 and torch.equal(model.seen[0], tokens)
    assert model.seen[1].tolist() == [[1, 5, mask, 7, mask, 2], [1, 4, mask, 7, mask, 5]]
    expected = logits.log_softmax(-1).amax(-1).sum().double()  # each code's log-probability, once
    torch.testing.assert_close(scores, torch.stack([expected, expected]))


def test_parallel_decoding_puts_an_eos_after_the_codes_where_the_answer_drops_its_own(tok, drawing):
    """A decoder slot with ``disable_auto_boseos`` before the codes leaves nothing after them; the
    last code must still be a decoder input, so decoding adds the EOS."""
    _, rows, _ = drawing
    task = Task("draw_after", "draw [TEXT:label] -> [TEXT:label,no_loss,disable_auto_boseos] "
                "[IMAGE:image,preprocess=image_vq]", rows, objective="parallel")
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    seen, decode = [], model.decode
    model.decode = lambda side, *args, **kwargs: seen.append(side.tokens.clone()) or decode(side, *args, **kwargs)
    answers = model.infer(task, rows[:2], parallel_steps=2)
    assert [len(a.tokens) for a in answers] == [16, 16]
    assert len(seen) == 2 and (seen[0] == mask_token(tok)).sum(1).tolist() == [16, 16]


def test_parallel_decoding_refuses_a_decoder_only_model(tok, drawing):
    task, rows, _ = drawing
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug", layout="decoder-only"), [task], tok).eval()
    with pytest.raises(ValueError, match="parallel decoding needs the encoder-decoder layout"):
        model.infer(task, rows[:1], parallel_steps=2)
