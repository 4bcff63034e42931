"""Objectives, twenty-sixth audit: the contrastive temperature's cap is on the parameter (a clamp in the
forward gave no gradient at the cap, and the scale stayed there); a masked sample's closed-set target
is scored over the label set, as the generative loss and decoding read it, where its label prefix is
among the targets."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import build

from moe_gen.masking import mask_sample
from moe_gen.objectives import ContrastiveObjective, MaskedObjective
from moe_gen.tasks import Task, Tokenizer, collate, load_preset

CAP = math.log(100.0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def retrieval(tok):
    base = load_preset("image_text_retrieval", "train", limit=4)
    task = Task("retrieval", base.instruction, base.data[:4], objective="contrastive")
    model = build([task], tok, dropout=0.0).eval()
    return model, collate(list(task.samples(tok)), tok, model.task_ids)


def _loss_and_grad(model, batch, value: float) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.fill_(value)
    out = ContrastiveObjective(model, caption_weight=0.0)(batch)
    out["loss"].backward()
    return float(out["contrastive_loss"]), float(model.logit_scale.grad)


def test_the_temperature_learns_at_its_cap_and_a_scale_past_it_comes_back(retrieval):
    model, batch = retrieval
    below, below_grad = _loss_and_grad(model, batch, CAP - 0.01)
    at, at_grad = _loss_and_grad(model, batch, CAP)
    past, past_grad = _loss_and_grad(model, batch, CAP + 0.5)
    assert below_grad != 0.0 and at_grad != 0.0  # (at the cap the gradient was 0: the scale could not come down)
    assert float(model.logit_scale.detach()) == pytest.approx(CAP)  # the parameter itself is held at the cap
    assert past == pytest.approx(at) and past_grad == pytest.approx(at_grad)
    assert at_grad == pytest.approx(below_grad, rel=0.2)  # the loss varies smoothly up to the cap


def test_a_masked_label_target_is_scored_over_the_label_set(tok):
    task = load_preset("digit_masked_modeling", "train", limit=4)
    samples = list(task.samples(tok))
    model = build([task], tok, predict_all_features=True, dropout=0.0).eval()
    alpha = {"IMAGE": 1000.0, "TEXT": 1e-3}  # every image code in, the label the one target
    objective = MaskedObjective(model, input_budget=16, target_budget=1, alpha=alpha)
    batch = objective.prepare(samples, random.Random(0))
    label = next(c for c in samples[0].decoder if c.column == "label")
    masked = mask_sample(samples[0], input_budget=16, target_budget=1, alpha=alpha, rng=random.Random(0))
    assert [c.allowed for c in masked.decoder if c.column == "label"] == [label.allowed[:1]]
    with torch.no_grad():
        logits = model(batch).logits.float()
        scored = batch.labels != -100
        allowed = label.allowed[0]
        per_row = [F.cross_entropy(logits[scored][i:i + 1, allowed], torch.tensor([allowed.index(int(t))]))
                   for i, t in enumerate(batch.labels[scored])]
        expected = torch.stack(per_row).mean()
        assert float(objective(batch)["token_loss"]) == pytest.approx(float(expected), rel=1e-5)
        # (over every token it was 10.2 here, against 1.5 over the four labels)
        assert float(F.cross_entropy(logits[scored], batch.labels[scored])) > float(expected) + 5


def test_a_label_position_without_its_prefix_among_the_targets_is_scored_over_every_token():
    from moe_gen.masking import _gather
    from moe_gen.tasks.sample import Chunk

    label = Chunk("TEXT", 1, True, tokens=[5, 6, 7], column="label", allowed=[[5, 9], [6], [7, 8]])
    stream = [(label, j) for j in range(3)]
    whole = _gather("TEXT", stream, [0, 1, 2], 1, True)
    assert whole[0].allowed == [[5, 9], [6], [7, 8]]
    gap = _gather("TEXT", stream, [0, 2], 1, True)  # position 1 is an input: 2's trie set follows a prefix not scored
    assert gap[0].allowed == [[5, 9], None]
    assert _gather("TEXT", stream, [1, 2], 1, True)[0].allowed is None
    assert _gather("TEXT", stream, [0, 1], 0, False)[0].allowed is None  # inputs are not scored
