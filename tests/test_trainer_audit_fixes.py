"""Defects a trainer audit found (2026-12-05, ninth session), each with the behaviour it now has:
a skipped step's NaN written as strict JSON, the step that stops a diverged run logged, and new
adapters of a fine-tuning run initialised from its seed."""

from __future__ import annotations

import json

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
