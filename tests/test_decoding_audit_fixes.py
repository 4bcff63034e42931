"""What an audit of decoding found (2026-12-05, eighth session), each pinned: ranked candidates
answer like every answer (targets, tokens; usable in a chain) and only where their score is the
answer's; length normalisation counts the tokens it says; arguments that could do nothing, or
crashed inside torch, are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import build

import moe_gen.model.generate as generate
from moe_gen.model.chain import Link, chain
from moe_gen.tasks import Task, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


ROWS = [{"q": "red apple", "a": "fruit"}, {"q": "blue car", "a": "vehicle thing"}]


def test_a_ranked_answer_has_its_target_and_tokens_and_chains(tok):
    closed = Task("cls", "[TEXT:q] -> [TEXT:a,closed_set]", ROWS)
    model = build([closed], tok).eval()
    ranked = model.infer(closed, ROWS[:1], candidates=["fruit", "vehicle thing"])[0]
    assert ranked.targets == {"a": ranked.text} and tok.decode(ranked.tokens) == ranked.text  # were {} and []
    out = chain(model, [{"q": "red apple"}], [Link(closed, {"a": "x"}, {"candidates": ["fruit", "vehicle thing"]})])
    assert out[0]["x"] == ranked.text


@pytest.mark.parametrize("instruction, message", [
    ("[TEXT:q] -> [TEXT:a,closed_set] done .", "candidates score an answer that ends the decoder, and done ."),
    ("[TEXT:q] -> ( [TEXT:a,closed_set] )*", r"one text target \(not a repeated one\)"),
])
def test_candidates_are_refused_where_their_score_is_not_the_answers(tok, instruction, message):
    rows = [{"q": "red apple", "a": "fruit" if "*" not in instruction else ["fruit"]}]
    task = Task("t", instruction, rows)
    model = build([task], tok).eval()
    with pytest.raises(ValueError, match=message):
        model.infer(task, rows, candidates=["fruit"])


def test_length_normalisation_counts_the_tokens_read_over_the_vocabulary(tok, monkeypatch):
    rows = [{"q": "red apple", "a": "fruit", "b": "x"}]
    task = Task("lit", "[TEXT:q] -> [TEXT:a] and then some more words here [TEXT:b]", rows)
    model = build([task], tok).eval()
    finished = []
    original = generate._prediction

    def spy(grammar, hypothesis, sample, eos):
        finished.append((grammar, hypothesis))
        return original(grammar, hypothesis, sample, eos)

    monkeypatch.setattr(generate, "_prediction", spy)
    model.infer(task, rows, beams=2, max_new_tokens=2)
    grammar, hypothesis = finished[-1]
    literal = len(grammar.literals[1])
    assert hypothesis.free == len(hypothesis.tokens) - literal  # counted the 6 forced literal tokens too


def test_arguments_that_could_do_nothing_or_crashed_are_refused(tok):
    free = Task("free", "[TEXT:q] -> [TEXT:a]", ROWS)
    model = build([free], tok).eval()
    for temperature in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):
            model.infer(free, ROWS, temperature=temperature)
    with pytest.raises(ValueError, match="min_length 10 is more than max_new_tokens 3"):
        model.infer(free, ROWS, min_length=10, max_new_tokens=3)
    with pytest.raises(ValueError, match="candidates are given, not generated"):
        model.infer(free, ROWS, candidates=["fruit"], min_length=2)
    with pytest.raises(ValueError, match="task 'free': max_frames must be a whole number >= 1"):
        model.infer(free, ROWS, max_frames=0)  # (max_frames=0 stacked no rows: torch.stack of [])


def test_a_drawn_answer_does_not_depend_on_the_rows_beside_it(tok):
    rows = [{"q": "hello there how are you", "a": "x"}, {"q": "hi", "a": "y"}, {"q": "what now", "a": "z"}]
    task = Task("echo", "[TEXT:q] -> [TEXT:a]", rows)
    model = build([task], tok).eval()
    options = {"temperature": 1.0, "seed": 0, "max_new_tokens": 5}
    together = [p.tokens for p in model.infer(task, rows, **options)]
    assert [model.infer(task, [row], **options)[0].tokens for row in rows] == together  # one stream per batch
    assert model.infer(task, rows, **options)[2].tokens == together[2]  # and reproducible


def test_a_drawn_image_does_not_depend_on_the_rows_beside_it(tok):
    from moe_gen.tasks import load_preset

    images = load_preset("text_to_image_maskgit", "train", limit=3)
    model = build([images], tok).eval()
    together = [p.tokens for p in model.infer(images, images.data, temperature=1.0, seed=0)]
    assert [model.infer(images, [row], temperature=1.0, seed=0)[0].tokens for row in images.data] == together
    # and the codes are drawn: another seed, or greedy decoding, gives others (a decoder that never drew
    # would pass the comparison above)
    assert [p.tokens for p in model.infer(images, images.data, temperature=1.0, seed=1)] != together
    assert [p.tokens for p in model.infer(images, images.data)] != together


@pytest.mark.parametrize("token", ["pad_id", "bos_id", "unk_id"])
def test_free_text_never_takes_pad_bos_or_unk(tok, token):
    """A second decoding audit (ninth session): with such a token's logit 50 above the rest, greedy,
    beam and sampled free text took it at every step (PAD and BOS decoded to '', UNK to ' ⁇ ',
    each spending the length budget); no training target holds them."""
    task = Task("t", "[TEXT:q] -> [TEXT:a]", ROWS)
    model = build([task], tok).eval()
    boosted = getattr(tok, token)
    original = model.output_logits

    def output_logits(hidden):
        out = original(hidden)
        return out + 50.0 * (torch.arange(out.shape[-1], device=out.device) == boosted)

    model.output_logits = output_logits
    for options in ({}, {"beams": 3}, {"temperature": 1.0, "seed": 1}):
        answer = model.infer(task, ROWS[:1], max_new_tokens=4, **options)[0]
        assert answer.tokens and boosted not in answer.tokens, options


def test_min_length_is_checked_against_a_slots_own_max_length(tok):
    """A slot's ``max_length`` sets how long its values decode (not ``max_new_tokens``), so a
    ``min_length`` above it was accepted and silently not kept."""
    task = Task("t", "[TEXT:q] -> [TEXT:a,max_length=3]", ROWS)
    model = build([task], tok).eval()
    with pytest.raises(ValueError, match=r"min_length 5 is more than \[TEXT:a,max_length=3\]'s max_length 3"):
        model.infer(task, ROWS[:1], max_new_tokens=40, min_length=5)
    assert len(model.infer(task, ROWS[:1], max_new_tokens=40, min_length=2)[0].tokens) >= 2


def test_a_draw_does_not_depend_on_the_rank_order_of_near_ties():
    """A row sampled alone and in a batch drew other tokens: batch rounding (~5e-6) swapped two
    near-tied candidates in the best-first list, and the same uniform draw landed on the other.
    Drawn in token order, the same seed picks the same token whichever ranks first."""
    sampling = generate.Sampling(temperature=1.0)
    ranks, swapped = [-1.0, -1.0 - 1e-6, -3.0], [-1.0, -1.0 - 1e-6, -3.0]
    keys, swapped_keys = [7, 3, 9], [3, 7, 9]  # candidates 7 and 3 trade places
    for seed in range(200):
        first = keys[sampling.choose(ranks, torch.Generator().manual_seed(seed), keys)]
        second = swapped_keys[sampling.choose(swapped, torch.Generator().manual_seed(seed), swapped_keys)]
        assert first == second, seed


def test_min_length_may_equal_the_most_tokens_a_value_may_take(tok):
    """The bound is inclusive: a value of exactly its slot's ``max_length`` (or ``max_new_tokens``)
    tokens keeps both, so such a ``min_length`` is accepted and kept."""
    capped = Task("t", "[TEXT:q] -> [TEXT:a,max_length=3]", ROWS)
    plain = Task("p", "[TEXT:q] -> [TEXT:a]", ROWS)
    model = build([capped, plain], tok).eval()
    assert len(model.infer(capped, ROWS[:1], max_new_tokens=40, min_length=3)[0].tokens) == 3
    assert len(model.infer(plain, ROWS[:1], max_new_tokens=4, min_length=4)[0].tokens) == 4


def test_rows_that_differ_only_in_their_image_draw_from_streams_of_their_own(tok):
    """A row's sampling seed mixes in its whole encoded input, media rows as well as tokens: the rows
    of an image task share one prompt, and read from the tokens alone they would all draw alike."""
    from moe_gen.tasks import load_preset

    task = load_preset("digit_classification", "train", limit=3)
    plan = task.plan(tok)
    samples = [plan.encode(row, i, training=False, inference=True, template=0) for i, row in enumerate(task.data)]
    texts = [[c.tokens for c in s.encoder + s.decoder if c.tokens is not None] for s in samples]
    assert texts[0] == texts[1] == texts[2]  # the same prompt: only the pictures differ
    assert len({generate._row_seed(0, s) for s in samples}) == 3
    again = plan.encode(task.data[0], 0, training=False, inference=True, template=0)
    assert generate._row_seed(0, again) == generate._row_seed(0, samples[0]) != generate._row_seed(1, samples[0])
