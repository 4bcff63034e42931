"""Defects a trainer audit found (2026-12-05, ninth session), each with the behaviour it now has:
a skipped step's NaN written as strict JSON, the step that stops a diverged run logged, and new
adapters of a fine-tuning run initialised from its seed."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import flavour_with

from moe_gen.model import GeneralistModel
from moe_gen.tasks import Task, Tokenizer
from moe_gen.trainer import TrainConfig, Trainer
from moe_gen.trainer.trainer import TrainingDiverged


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _diverging_trainer(tok, tmp_path, **config) -> Trainer:
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": "yes" if i % 2 else "no"} for i in range(12)])
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug"), [task], tok)
    with torch.no_grad():
        model.token_embedding.weight.fill_(float("nan"))  # every step's loss is NaN: skipped and logged
    return Trainer(model, [task], TrainConfig(batch_size=4, log_every=1, progress=False, tensorboard=False,
                                              **config), output_dir=str(tmp_path))


def _strict(constant):
    raise ValueError(f"{constant} is not JSON")


def test_skipped_steps_are_logged_as_strict_json(tok, tmp_path):
    """Before, ``json.dumps`` wrote bare ``NaN``, which only Python's lenient parser reads."""
    trainer = _diverging_trainer(tok, tmp_path, steps=2, max_bad_steps=5)
    trainer.fit()
    lines = (tmp_path / "logs" / "train.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=_strict) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["skipped"] and r["loss"] is None and r["grad_norm"] is None for r in records)


def test_the_step_that_stops_a_diverged_run_is_logged(tok, tmp_path):
    """Before, ``TrainingDiverged`` was raised before ``fit`` logged the step that raised it."""
    trainer = _diverging_trainer(tok, tmp_path, steps=5, max_bad_steps=2)
    with pytest.raises(TrainingDiverged, match="2 steps in a row") as caught:
        trainer.fit()
    lines = (tmp_path / "logs" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert caught.value.record["step"] == 2


def test_new_tasks_adapters_start_from_the_runs_seed(tok, tmp_path):
    """Fine-tuning a text model on an image task adds an image adapter; its weights came from
    whatever state torch's global generator was in, so two identical runs differed (and
    ``TrainConfig.seed`` did not change them). Now they come from the run's seed."""
    from moe_gen.tasks import load_preset

    text = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": "yes"} for i in range(4)])
    torch.manual_seed(0)
    GeneralistModel.build(flavour_with("debug"), [text], tok).save_pretrained(str(tmp_path / "base"))
    image = load_preset("digit_classification", "train", limit=8)

    def new_adapter(ambient: int, seed: int) -> dict:
        torch.manual_seed(ambient)
        model = GeneralistModel.from_pretrained(str(tmp_path / "base"))
        trainer = Trainer(model, [image], TrainConfig(steps=1, seed=seed, progress=False, tensorboard=False),
                          output_dir=str(tmp_path / f"run{ambient}{seed}"))
        trainer.close()
        assert "image_patch" in trainer.new_adapters
        return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("adapters.image_patch")}

    first, second, other_seed = new_adapter(0, 0), new_adapter(1, 0), new_adapter(0, 1)
    assert first and all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)


# ---- accumulation as one large batch, where a step holds several objectives or frame adapters ----

def _grads_of_one_step(tasks, tok, tmp_path, micro_batches, **config):
    """Loss and gradient of one step whose micro-batches hold exactly ``micro_batches`` (lists of
    (task, row index)), on a dense debug model without dropout."""
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug", every=0, dropout=0.0), tasks, tok)
    trainer = Trainer(model, tasks, TrainConfig(steps=1, batch_size=len(micro_batches[0]),
                                                accumulate=len(micro_batches), clip_norm=0, lr=1e-3, progress=False,
                                                tensorboard=False, **config),
                      output_dir=str(tmp_path / f"run{len(micro_batches)}"))
    by_key = {(t.name, i): s for t in tasks for i, s in enumerate(t.samples(tok))}
    trainer.sampler.next_batch = lambda step, micro: [by_key[k] for k in micro_batches[micro]]
    seen = {}

    def clip(clip=trainer._clip):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return clip()

    trainer._clip = clip
    record = trainer.train_step(1)
    trainer.close()
    return record, seen


def _assert_same_step(one, two):
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
    for name, grad in one[1].items():
        torch.testing.assert_close(two[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_accumulation_equals_one_batch_with_two_objectives(tok, tmp_path):
    """A second objective's group was weighed by its micro-batch share times its token share:
    41.8% off one batch (2.8% before the token weighting)."""
    from moe_gen.objectives import OBJECTIVES, GenerativeObjective

    if "generative_copy" not in OBJECTIVES:
        OBJECTIVES.register("generative_copy")(type("GenerativeCopy", (GenerativeObjective,), {}))
    words = "alpha beta gamma delta epsilon zeta".split()
    a = Task("a", "[TEXT:q] -> [TEXT:x]", [{"q": w, "x": " ".join(words)} for w in words[:4]])
    b = Task("b", "[TEXT:q] -> [TEXT:x]", [{"q": w, "x": w} for w in words[:4]], objective="generative_copy")
    rows = [("a", 0), ("b", 0), ("b", 1), ("b", 2), ("a", 1), ("a", 2), ("a", 3), ("b", 3)]
    _assert_same_step(_grads_of_one_step([a, b], tok, tmp_path, [rows]),
                      _grads_of_one_step([a, b], tok, tmp_path, [rows[:4], rows[4:]]))


def test_accumulation_equals_one_batch_with_two_frame_adapters(tok, tmp_path):
    """The frame loss is a sum of per-adapter means; one scale for all rows left it 55% off."""
    from moe_gen.tasks import load_preset

    tasks = [load_preset("text_to_motion", "train", limit=3), load_preset("text_to_speech", "train", limit=1)]
    rows = [("text_to_motion", 0), ("text_to_motion", 1), ("text_to_motion", 2), ("text_to_speech", 0)]
    _assert_same_step(_grads_of_one_step(tasks, tok, tmp_path, [rows]),
                      _grads_of_one_step(tasks, tok, tmp_path, [rows[:2], rows[2:]]))


def test_an_objective_without_scales_trains_with_accumulation(tok, tmp_path):
    """A user objective written to ``__call__(self, batch)`` got ``scales=`` and raised TypeError."""
    from moe_gen.objectives import OBJECTIVES, GenerativeObjective, Objective

    class Plain(Objective):
        def __init__(self, model):
            self.model, self.inner = model, GenerativeObjective(model)

        @classmethod
        def from_train_config(cls, model, config):
            return cls(model)

        def __call__(self, batch):
            return self.inner(batch)

    if "plain_objective" not in OBJECTIVES:
        OBJECTIVES.register("plain_objective")(Plain)
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": "yes " * (1 + i % 5)} for i in range(8)],
                objective="plain_objective")
    halves = [[("t", 0), ("t", 1)], [("t", 2), ("t", 3)]]
    record, grads = _grads_of_one_step([task], tok, tmp_path / "both", halves)
    assert math.isfinite(record["loss"]) and grads
    # without token counts each micro-batch's mean weighs the same: the step is the mean of the two
    # micro-batches' own steps (its gradient, and its loss)
    alone = [_grads_of_one_step([task], tok, tmp_path / f"half{i}", [half]) for i, half in enumerate(halves)]
    assert record["loss"] == pytest.approx((alone[0][0]["loss"] + alone[1][0]["loss"]) / 2, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, (alone[0][1][name] + alone[1][1][name]) / 2, atol=1e-6, rtol=1e-4, msg=name)


def test_a_diverged_run_logs_its_last_step_between_logging_steps(tok, tmp_path):
    trainer = _diverging_trainer(tok, tmp_path, steps=5, max_bad_steps=2)
    trainer.config = dataclasses.replace(trainer.config, log_every=10)
    with pytest.raises(TrainingDiverged):
        trainer.fit()
    lines = (tmp_path / "logs" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2]


def test_the_logged_caption_loss_is_its_batchs_own_under_accumulation(tok, tmp_path):
    """Contrastive rows in one of two micro-batches: the logged caption loss was multiplied by that
    batch's loss scale (2 here)."""
    import random

    from moe_gen.tasks import load_preset

    tasks = [load_preset("image_text_retrieval", "train", limit=2), load_preset("digit_captioning", "train", limit=6)]
    rows = [("image_text_retrieval", 0), ("image_text_retrieval", 1), ("digit_captioning", 0), ("digit_captioning", 1)]
    later = [("digit_captioning", i) for i in range(2, 6)]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug", every=0, dropout=0.0), tasks, tok)
    trainer = Trainer(model, tasks, TrainConfig(steps=1, batch_size=4, accumulate=2, clip_norm=0, progress=False,
                                                tensorboard=False), output_dir=str(tmp_path))
    by_key = {(t.name, i): s for t in tasks for i, s in enumerate(t.samples(tok))}
    micro = [[by_key[k] for k in rows], [by_key[k] for k in later]]
    trainer.sampler.next_batch = lambda step, m: micro[m]
    contrastive = trainer.objectives["contrastive"]
    with torch.no_grad():
        own = float(contrastive(contrastive.prepare(micro[0][:2], random.Random(0)))["caption_loss"])
    record = trainer.train_step(1)
    trainer.close()
    assert record["caption_loss"] == pytest.approx(own, rel=1e-4)
