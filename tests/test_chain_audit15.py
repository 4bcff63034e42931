"""Chained generation's checks, found by the fifteenth audit: every link is checked before any
runs, and rows must be a list of dicts; each test failed before its fix."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from helpers import build

from moe_gen.model import GeneralistModel, Link, chain, flavour
from moe_gen.tasks import Task, Tokenizer, load_preset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tasks = [load_preset(name, "train", limit=8) for name in ("text_to_image", "digit_classification")]
    return GeneralistModel.build(flavour("debug"), tasks, Tokenizer.default()).eval()


@pytest.fixture
def ran(model, monkeypatch):
    """The tasks ``model.infer`` was called for."""
    calls, infer = [], model.infer
    monkeypatch.setattr(model, "infer", lambda task, rows, **kwargs: calls.append(task) or infer(task, rows, **kwargs))
    return calls


DRAW = Link("text_to_image", {"image": "image"})


@pytest.mark.parametrize("link, message", [
    (Link("digit_classification", {"lable": "read_back"}),
     "the task has no target column 'lable' to pass on; its target columns are ['label']"),
    (Link("digit_counting", {"count": "n"}), "the model was not built for task 'digit_counting'"),
    (Link("digit_classification", {"label": "x"}, {"beam": 2}), "infer takes no option 'beam'; its options are "),
])
def test_a_bad_second_link_is_refused_before_the_first_runs(model, ran, link, message):
    """Each was found only after the first link's inference (and the second's, for the column)."""
    with pytest.raises(ValueError, match="^" + re.escape(f"chain link 1 ({link.task!r}): {message}")):
        chain(model, [{"label": "seven"}] * 4, [DRAW, link])
    assert ran == []


def test_links_are_checked_without_rows(model, ran):
    """With no rows a misspelt column passed: nothing reached the per-answer check."""
    with pytest.raises(ValueError, match=r"^chain link 0 \('text_to_image'\): the task has no target column 'imgae'"):
        chain(model, [], [Link("text_to_image", {"imgae": "image"})])
    assert chain(model, [], [DRAW]) == []


def test_rows_must_be_a_list_of_dicts(model, ran):
    """One dict as rows failed with dict()'s "dictionary update sequence element #0 has length 1"."""
    with pytest.raises(ValueError, match=r"^chain takes a list of rows, got one dict; pass \[row\]"):
        chain(model, {"label": "seven"}, [DRAW])
    with pytest.raises(ValueError, match="^chain: row 1 is a str, not a dict by column"):
        chain(model, [{"label": "seven"}, "two"], [DRAW])
    with pytest.raises(ValueError, match="options maps infer's keyword arguments"):
        Link("text_to_image", {"image": "image"}, ["parallel_steps"])
    assert ran == []
    out = chain(model, [{"label": "seven"}], [DRAW, Link("digit_classification", {"label": "read_back"})])
    assert out[0]["image"].shape == (16, 16, 3) and isinstance(out[0]["read_back"], str)
    assert ran == ["text_to_image", "digit_classification"]


# ---- pinned by mutation testing (round 18): what a mutant of chain.py got away with ----------------

def test_a_links_options_reach_infer(model, monkeypatch):
    """Each link's options are infer's keyword arguments for that link alone (dropping them passed)."""
    calls, infer = [], model.infer
    monkeypatch.setattr(model, "infer", lambda task, rows, **kw: calls.append((task, kw)) or infer(task, rows, **kw))
    chain(model, [{"label": "seven"}], [Link("text_to_image", {"image": "image"}, {"parallel_steps": 2}),
                                        Link("digit_classification", {"label": "read_back"}, {"max_new_tokens": 3})])
    assert calls == [("text_to_image", {"parallel_steps": 2}), ("digit_classification", {"max_new_tokens": 3})]


@pytest.mark.parametrize("answer, message", [
    (None, "row 1 could not be encoded"),
    (SimpleNamespace(targets={"other": 1}), "the answer for row 1 has no target column 'label'; it has ['other']"),
])
def test_an_answer_that_cannot_pass_on_names_link_and_row(model, monkeypatch, answer, message):
    """While running: a row skipped by ``on_error="skip"`` (None) or an answer without the column
    is refused naming the link's number and task and the row, not an AttributeError or KeyError."""
    infer = model.infer

    def answering(task, rows, **kwargs):
        answers = infer(task, rows, **kwargs)
        return answers if task == "text_to_image" else [answers[0], answer]

    monkeypatch.setattr(model, "infer", answering)
    with pytest.raises(ValueError, match="^" + re.escape(f"chain link 1 ('digit_classification'): {message}")):
        chain(model, [{"label": "seven"}, {"label": "two"}], [DRAW, Link("digit_classification", {"label": "x"})])


def test_the_columns_a_link_may_pass_on_are_the_keys_of_the_answers_targets():
    """Positional target slots are keyed by their slot names ('slot 2', 'slot 3', as
    ``Prediction.targets`` keys them since the twenty-seventh session's audit; their index before),
    and a copied prompt (``no_loss``) is not a target: it cannot be passed on."""
    tok = Tokenizer.default()
    positional = Task("pos", "[TEXT] -> [TEXT] [TEXT]", [("red apple", "fruit", "x")])
    prompted = Task("echo", "[TEXT:q] -> [TEXT:q,no_loss] [TEXT:a]", [{"q": "red apple", "a": "fruit"}])
    model = build([positional, prompted], tok).eval()
    for task, rows in ((positional, [("red apple",)]), (prompted, [{"q": "red apple"}])):
        keys = sorted(model.infer(task, rows)[0].targets)
        assert task is prompted or keys == ["slot 2", "slot 3"]
        assert chain(model, [], [Link(task, {key: key for key in keys})]) == []  # every key passes the check
    assert keys == ["a"]
    with pytest.raises(ValueError, match=re.escape("no target column 'q' to pass on; its target columns are ['a']")):
        chain(model, [], [Link(prompted, {"q": "q"})])
