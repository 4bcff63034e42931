"""Chained generation's checks, found by the fifteenth audit: every link is checked before any
runs, and rows must be a list of dicts; each test failed before its fix."""

from __future__ import annotations

import re

import pytest
import torch

from moe_gen.model import GeneralistModel, Link, chain, flavour
from moe_gen.tasks import Tokenizer, load_preset


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
