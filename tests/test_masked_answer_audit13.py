"""Decoding a masked-objective task with several target values (audit 13); the refusals failed
before the fix."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import build

import moe_gen.model.generate as generate_module
from moe_gen.masking import mask_sample
from moe_gen.tasks import Task, Tokenizer, collate


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


ROWS = [{"q": "hello there", "a": "one", "b": "red"}, {"q": "hi", "a": "one", "b": "blue"}]


@pytest.mark.parametrize("answer, between", [
    ("[TEXT:a,closed_set] and then [TEXT:b,closed_set]", "literal text 'and then'"),
    ("[TEXT:a] [TEXT:b,closed_set]", r"the EOS that closes \[TEXT:a\]"),
    ("( [TEXT:b,closed_set] , )*", "literal text ','"),
    ("( [TEXT:b] )*", r"the EOS that closes \[TEXT:b\]"),
])
def test_literal_text_or_eos_between_masked_targets_is_refused(tok, answer, between):
    """Masked samples hold the targets' data positions back to back; decoding fed the literal text
    (or a free-text value's EOS) first, so the next target was predicted from a context training
    never had (log-probabilities off by up to 4.2)."""
    rows = [dict(r, b=[r["b"]]) for r in ROWS] if "(" in answer else ROWS
    task = Task("m", f"[TEXT:q] -> {answer}", rows, objective="masked")
    model = build([task], tok, predict_all_features=True).eval()
    with pytest.raises(ValueError, match=rf"task 'm' trained with the masked objective has {between} between its "
                                         "target values"):
        model.infer(task, rows)


def test_literal_text_around_masked_targets_is_allowed(tok):
    """Text before the first target or after the last is never fed before a target."""
    task = Task("m", "[TEXT:q] -> so [TEXT:a,closed_set] [TEXT:b,closed_set] .", ROWS, objective="masked")
    model = build([task], tok, predict_all_features=True).eval()
    answers = model.infer(task, ROWS)
    assert all(a.targets["a"] == "one" and a.targets["b"] in ("red", "blue") for a in answers)


def test_adjacent_masked_targets_decode_as_they_train(tok, monkeypatch):
    """Two targets of one modality with nothing between them decode as training places them: the
    step that predicts b's first token reads what the training forward of the masked sample with
    all of q in and all of a and b out reads there."""
    task = Task("m", "[TEXT:q] -> [TEXT:a,closed_set] [TEXT:b,closed_set]", ROWS, objective="masked")
    model = build([task], tok, predict_all_features=True).eval()
    row, inputs = ROWS[0], len(tok.encode(ROWS[0]["q"]))
    full = model.plan(task).encode(row, 0, training=False)
    for seed in range(1000):  # the masked sample whose inputs are all of q
        trained = mask_sample(full, input_budget=inputs, target_budget=100, rng=random.Random(seed))
        if [c.column for c in trained.encoder] == ["q"]:
            break
    a, b = len(tok.encode("one")), len(tok.encode("red"))
    assert [(c.column, c.position_ids) for c in trained.decoder] == [
        ("a", list(range(inputs, inputs + a))), ("b", list(range(inputs + a, inputs + a + b)))]
    batch = collate([trained], tok, model.task_ids, pass_name="masked", modality_ids=model.modality_ids)
    with torch.no_grad():
        logp = model(batch).logits.float().log_softmax(-1)[0]
    recorded, log_probs = [], generate_module.CachedDecoder.log_probs
    monkeypatch.setattr(generate_module.CachedDecoder, "log_probs",
                        lambda self, h: recorded.append(log_probs(self, h)) or recorded[-1])
    answer = model.infer(task, [row])[0]
    assert answer.targets["a"] == "one"  # the only label a has
    torch.testing.assert_close(recorded[a][0], logp[a], atol=1e-4, rtol=0)  # the step after a's tokens: b's first
    torch.testing.assert_close(recorded[0][0], logp[0], atol=1e-4, rtol=0)
