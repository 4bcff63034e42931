"""Sampling decoding (issue 17): reproducible by seed, greedy at top_k=1 / temperature 0 / tiny top_p,
within the answer grammar, and clear errors for bad settings."""

import math
from collections import Counter

import pytest
import torch

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.model.generate import Sampling
from moe_gen.tasks import Tokenizer, collate, load_preset

TASKS = ["doc_topic", "visual_grounding", "table_to_text", "digit_detection"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def setup(tok):
    tasks = [load_preset(n, "train", limit=4) for n in TASKS]
    torch.manual_seed(0)
    config = flavour("debug", moe={"router": RouterConfig(strategy="attribute")})
    model = GeneralistModel.build(config, tasks, tok).eval()
    return model, tasks


def answers(model, task, **kwargs):
    return [(p.tokens, p.targets) for p in model.infer(task, task.data, max_new_tokens=6, max_items=3, **kwargs)]


@pytest.mark.parametrize("task_index", range(len(TASKS)))
def test_greedy_limits_of_sampling_equal_greedy_decoding(setup, task_index):
    model, tasks = setup
    task = tasks[task_index]
    greedy = answers(model, task)
    assert answers(model, task, top_k=1, temperature=5.0, seed=3) == greedy
    assert answers(model, task, temperature=0.0) == greedy
    assert answers(model, task, top_p=1e-9, seed=4) == greedy


def test_sampling_is_reproducible_by_seed_and_draws_other_answers(setup):
    model, tasks = setup
    task = tasks[TASKS.index("table_to_text")]  # free text: many allowed tokens per step
    first = answers(model, task, temperature=3.0, seed=7)
    assert answers(model, task, temperature=3.0, seed=7) == first
    draws = {tuple(tuple(t) for t, _ in answers(model, task, temperature=3.0, seed=s)) for s in range(4)}
    assert len(draws) > 1  # different seeds draw different answers from an untrained model
    assert first != answers(model, task)  # and not the greedy one


def test_top_k_or_top_p_alone_draws_at_temperature_one(setup):
    model, tasks = setup
    task = tasks[TASKS.index("table_to_text")]
    greedy = answers(model, task)
    for cut in ({"top_k": 50}, {"top_p": 0.99}):
        assert answers(model, task, seed=1, **cut) == answers(model, task, temperature=1.0, seed=1, **cut) != greedy


def test_sampled_answers_stay_within_the_grammar(setup):
    model, tasks = setup
    topics, grounding = tasks[TASKS.index("doc_topic")], tasks[TASKS.index("visual_grounding")]
    labels = set(model.encoding_statistics(topics)["closed_sets"]["topic"])
    for seed in range(3):
        for p in model.infer(topics, topics.data, temperature=5.0, seed=seed):
            assert p.text in labels  # a closed set: only whole labels of the training rows
        for p in model.infer(grounding, grounding.data, temperature=5.0, seed=seed):
            assert p.box is not None and len(p.box) == 4  # a box is four location tokens


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, "top_p must lie in"),
    ({"top_p": 1.5}, "top_p must lie in"),
    ({"temperature": -1.0}, "temperature must be a number >= 0"),
    ({"top_k": 0}, "top_k must be a positive integer"),
    ({"temperature": 1.0, "beams": 3}, "do not combine with beams"),
    ({"top_k": 3, "beams": 2}, "do not combine with beams > 1"),
    ({"top_p": 0.5, "candidates": ["assert"]}, "do not combine with beams > 1 or candidates"),  # (one of its labels)
])
def test_bad_sampling_settings_fail_clearly(setup, kwargs, message):
    model, tasks = setup
    with pytest.raises(ValueError, match=message):
        model.infer(tasks[0], tasks[0].data[:1], **kwargs)


def test_frame_targets_refuse_sampling(tok):
    task = load_preset("text_to_speech", "train", limit=2)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [task], tok).eval()
    with pytest.raises(ValueError, match="sampling draws tokens; its target .* is frames"):
        model.infer(task, task.data, temperature=1.0)
    with pytest.raises(ValueError, match="top_p must lie in"):
        Sampling(top_p=-0.1)


def _repeats(tokens, n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_and_min_length_rule_free_text(setup):
    model, tasks = setup
    task = tasks[TASKS.index("table_to_text")]
    plain = model.infer(task, task.data, max_new_tokens=12)
    assert any(_repeats(p.tokens, 1) for p in plain)  # the untrained model repeats tokens
    for n in (1, 2):
        for kwargs in ({}, {"beams": 3}, {"temperature": 2.0, "seed": 1}):
            ruled = model.infer(task, task.data, max_new_tokens=12, no_repeat_ngram=n, min_length=5, **kwargs)
            for p in ruled:
                assert not _repeats(p.tokens, n), (n, kwargs, p.tokens)
                assert len(p.tokens) >= 5, (n, kwargs, p.tokens)
    with pytest.raises(ValueError, match="no_repeat_ngram must be an integer >= 0"):
        model.infer(task, task.data[:1], no_repeat_ngram=-1)


def test_min_length_holds_back_the_end_of_a_short_value(setup, tok):
    from moe_gen.model.generate import TextRules
    from moe_gen.model.grammar import State, TargetGrammar

    model, tasks = setup
    task = tasks[TASKS.index("table_to_text")]
    grammar = TargetGrammar(task.plan(tok, model.encoding_statistics(task)), tok)
    short = State(grammar.first, length=2)
    options = grammar.options(short)
    assert {o.action for o in options} >= {"content"} and any(o.action in ("close", "end") for o in options)
    held = TextRules(min_length=3).allowed(grammar, short, options)
    assert held and all(o.action not in ("close", "end") for o in held)
    assert TextRules(min_length=2).allowed(grammar, short, options) == options  # long enough
    ending = [o for o in options if o.action in ("close", "end")]
    assert TextRules(min_length=9).allowed(grammar, short, ending) == ending  # never a dead end
    state = State(grammar.first, length=4, pieces=tuple((grammar.first, 0, t) for t in (5, 6, 5, 6)))
    assert TextRules(no_repeat_ngram=2).banned(grammar, state) == [5]  # the value ends in 6, and "6 5" was seen


@pytest.mark.parametrize("action", ["content", "start"])
def test_best_free_token_equals_the_argmax_over_unclaimed_tokens(action):
    """Greedy's shortcut (the plain argmax when no other option claims it) picks what masking the
    claimed tokens and taking the argmax picks: the lowest id of the best unclaimed value."""
    from moe_gen.model.generate import _best
    from moe_gen.model.grammar import Option

    g = torch.Generator().manual_seed(0)
    option = Option(slot=0, tokens=None, scored=True, action=action)
    for trial in range(200):
        logp = torch.randint(0, 6, (40,), generator=g).float().log_softmax(0)  # many ties
        claimed = torch.randperm(40, generator=g)[: trial % 12].tolist()
        masked = logp.clone()
        masked[claimed] = float("-inf")
        best = int(masked.argmax())
        assert best == min(i for i in range(40) if i not in claimed and masked[i] == masked.max())
        rank, value, token = _best(logp, option, claimed, 1, {})[0]
        assert (token, value) == (best, float(masked[best]))
        lift = float(masked.logsumexp(0)) - value if action == "start" else 0.0
        assert rank == pytest.approx(value + lift)


def test_an_option_that_starts_a_value_is_drawn_with_its_total_probability():
    """An answer may end (EOS, p = 0.5) or start another box, whose first location token is one of
    100 (p = 0.005 each, 0.5 together): at temperature 1 a box starts half the time, and its first
    token is one of the 100 (drawn token by token, each would carry the whole box's mass: 100/101)."""
    from moe_gen.model.generate import _draw, _Hypothesis
    from moe_gen.model.grammar import Option, State

    hyp = _Hypothesis(State(slot=0), 0.0, 0.0, 0)
    end, start = Option(0, (1,), True, "end"), Option(1, tuple(range(10, 110)), True, "start")
    box_mass = torch.tensor([0.005] * 100).log().logsumexp(0).item()  # log 0.5
    lift = box_mass - torch.tensor(0.005).log().item()
    expansions = [(torch.tensor(0.5).log().item(), -0.69, 1, hyp, end)]
    expansions += [(torch.tensor(0.005).log().item() + lift, -5.3, t, hyp, start) for t in range(10, 110)]
    expansions.sort(key=lambda e: (-e[0], e[2]))
    generator = torch.Generator().manual_seed(0)
    drawn = [_draw(expansions, Sampling(), generator) for _ in range(2000)]
    started = [e for e in drawn if e[4] is start]
    assert abs(len(started) / len(drawn) - 0.5) < 0.05
    assert len({e[2] for e in started}) > 50  # the box's first token is drawn among its own
    greedy = [_draw(expansions, Sampling(temperature=0), generator) for _ in range(3)]
    assert all(e == expansions[0] for e in greedy)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_a_draw_follows_the_softmax_of_the_ranks_divided_by_the_temperature(temperature):
    """p ∝ exp(rank / T), worked out by hand: T = 0.5 sharpens ranks 0, -1, -3 to p ≈ (0.88, 0.12, 0.002),
    T = 2 flattens them to p ≈ (0.55, 0.33, 0.12) (the ranks multiplied by T swap the two)."""
    ranks = [0.0, -1.0, -3.0]
    weights = [math.exp(r / temperature) for r in ranks]
    expected = [w / sum(weights) for w in weights]
    generator = torch.Generator().manual_seed(0)
    n = 4000
    counts = Counter(Sampling(temperature=temperature).choose(ranks, generator) for _ in range(n))
    assert [counts[i] / n for i in range(3)] == pytest.approx(expected, abs=0.025)


def test_top_p_keeps_the_smallest_best_first_prefix_that_holds_top_p():
    """Two equally likely candidates: the first alone holds half the mass, so top_p = 0.5 keeps it
    alone (a draw is then greedy); any top_p above a half keeps both."""
    generator = torch.Generator().manual_seed(0)
    assert {Sampling(top_p=0.5).choose([0.0, 0.0], generator) for _ in range(200)} == {0}
    assert {Sampling(top_p=0.51).choose([0.0, 0.0], generator) for _ in range(200)} == {0, 1}
    assert {Sampling(top_p=0.7).choose([0.0, 0.0, -50.0], generator) for _ in range(200)} == {0, 1}


def test_top_k_draws_among_the_k_best_tokens_of_a_free_text_step(setup):
    """A free-text value's first token is drawn among the ``top_k`` best tokens of the step, not only
    among each option's best one (its best token and the end of the value: at most two)."""
    model, tasks = setup
    task = tasks[TASKS.index("table_to_text")]
    firsts = [set() for _ in task.data]
    for seed in range(12):
        for row, p in enumerate(model.infer(task, task.data, max_new_tokens=2, top_k=4, temperature=100.0, seed=seed)):
            firsts[row].add(p.tokens[0] if p.tokens else model.tokenizer.eos_id)  # (no token: the value ended)
    assert all(3 <= len(drawn) <= 4 for drawn in firsts), firsts
    # the 4 best first tokens, from a forward over each row's decoder prefix (the cached decoding's
    # first step equals it): the draws are among them, not any 4
    plan = model.plan(task)
    samples = [plan.encode(row, i, training=False, inference=True, template=0) for i, row in enumerate(task.data)]
    batch = collate(samples, model.tokenizer, model.task_ids)
    with torch.no_grad():
        logits = model(batch).logits
    last = (~batch.decoder.padding_mask).sum(1) - 1
    best = logits[torch.arange(len(samples)), last].topk(4).indices
    for drawn, row_best in zip(firsts, best.tolist()):
        assert drawn <= set(row_best), (drawn, row_best)


def test_with_every_token_equally_likely_each_step_takes_the_lowest_id(setup, monkeypatch):
    """Ties go to the lowest token id, across options as within one (greedy decoding always did):
    with uniform log-probabilities a free-text value takes the lowest id it may write."""
    model, tasks = setup
    task = tasks[TASKS.index("table_to_text")]
    tok = model.tokenizer
    monkeypatch.setattr(model, "output_logits", lambda hidden: torch.zeros(*hidden.shape[:-1], tok.vocab_size))
    predictions = model.infer(task, task.data[:2], max_new_tokens=3)
    lowest = min(i for i in range(tok.vocab_size) if i not in (tok.pad_id, tok.bos_id, tok.unk_id))
    for p in predictions:
        assert p.tokens == ([] if lowest == tok.eos_id else [lowest] * 3), (lowest, p.tokens)
