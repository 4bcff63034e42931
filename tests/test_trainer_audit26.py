"""The trainer, twenty-sixth audit: a fit() interrupted (Ctrl-C) during a step's evaluation or
checkpoint, then called again, does what was left of that step (before, the step counted as done and
both were skipped for good: at the last step the second fit() wrote no checkpoint at all)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import build, quiet

from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import Trainer
from moe_gen.trainer.logs import read_jsonl_log


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=8) for n in ("digit_classification", "table_species")]


def _trainer(tok, tasks, output, **config) -> Trainer:
    return Trainer(build(tasks, tok), tasks, quiet(steps=2, batch_size=4, warmup_steps=0, eval_every=2, eval_limit=2,
                                                   checkpoint_every=0, **config), output_dir=str(output))


def _interrupt_once(obj, name: str) -> list[int]:
    """Makes ``obj.<name>`` raise KeyboardInterrupt on its first call; returns the list its real
    calls are counted in."""
    real, calls = getattr(obj, name), []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    setattr(obj, name, stopping)
    return calls


def _evaluations(output) -> list[dict]:
    path = os.path.join(str(output), "logs", "eval.jsonl")
    return read_jsonl_log(path) if os.path.exists(path) else []


def test_ctrl_c_during_the_last_steps_evaluation_then_fit_again_evaluates_and_checkpoints(tok, tasks, tmp_path):
    trainer = _trainer(tok, tasks, tmp_path / "run")
    calls = _interrupt_once(trainer, "evaluate")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.step == 2 and trainer.latest_checkpoint() is None
    summary = trainer.fit()
    assert len(calls) == 2  # the evaluation ran again, once
    assert trainer.last_evaluation is not None and trainer.last_evaluation[0] == 2
    assert summary["checkpoint_step"] == 2
    assert [e["step"] for e in _evaluations(tmp_path / "run")] == [2]


def test_ctrl_c_during_the_checkpoint_then_fit_again_saves_it_without_evaluating_again(tok, tasks, tmp_path):
    trainer = _trainer(tok, tasks, tmp_path / "run", patience=3)
    evaluations = _interrupt_once(trainer, "evaluate")
    evaluations.append(1)  # (the interrupt is meant for the checkpoint: the evaluation runs)
    saves = _interrupt_once(trainer, "save_checkpoint")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.step == 2 and len(evaluations) == 2
    summary = trainer.fit()
    assert len(evaluations) == 2 and len(saves) == 2  # evaluated once; the checkpoint written the second time
    assert summary["checkpoint_step"] == 2
    assert [e["step"] for e in _evaluations(tmp_path / "run")] == [2]
    assert trainer.state["evals_since_best"] == 0  # the one evaluation is the best, counted once


def test_a_finished_run_fit_again_does_nothing_more(tok, tasks, tmp_path):
    trainer = _trainer(tok, tasks, tmp_path / "run")
    calls = _interrupt_once(trainer, "evaluate")
    calls.append(1)  # (never interrupts)
    trainer.fit()
    saves = _interrupt_once(trainer, "save_checkpoint")
    saves.append(1)
    trainer.fit()
    assert len(calls) == 2 and len(saves) == 1  # one evaluation and one checkpoint, in the first fit


def test_a_later_checkpoint_left_by_a_stopped_run_does_not_crowd_out_the_one_just_written(tok, tasks, tmp_path):
    """A run stopped after renaming step 4's folder but before pointing ``latest`` at it resumes from
    step 2; keeping one checkpoint, its save of step 3 must keep step 3 (``latest`` names it)."""
    output = tmp_path / "run"
    with Trainer(build(tasks, tok), tasks, quiet(steps=4, batch_size=4, warmup_steps=0, checkpoint_every=2),
                 output_dir=str(output)) as first:
        first.fit()
    checkpoints = output / "checkpoints"
    (checkpoints / "latest").write_text("step-0000002")  # (the pointer's write for step 4 never happened)
    with Trainer(build(tasks, tok), tasks, quiet(steps=3, batch_size=4, warmup_steps=0, checkpoint_every=1,
                                                keep_checkpoints=1), output_dir=str(output), resume=True) as resumed:
        assert resumed.step == 2
        summary = resumed.fit()
        assert summary["checkpoint_step"] == 3
        assert resumed.latest_checkpoint() == str(checkpoints / "step-0000003")
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-")) == \
        ["step-0000003", "step-0000004"]  # step 2 pruned; step 4 left for the run to replace


def test_saving_a_model_assembled_from_expert_shards_draws_nothing_from_the_runs_generator(tok, tasks, tmp_path,
                                                                                           monkeypatch):
    """With expert parallelism process 0 builds a whole model to load the shards into (``keep_best``
    does it while training): its initialisation must leave the run's random stream alone, or process
    0's dropout and router noise part from the other processes' (before the twenty-sixth audit)."""
    from moe_gen import distributed
    from moe_gen.model import GeneralistModel

    trainer = _trainer(tok, tasks, tmp_path / "run")
    shards = str(tmp_path / "shards")

    def save_checkpoint():  # (what a checkpoint of sharded experts holds of the model, written by one process)
        distributed.save_shards(shards, "model", trainer.model.state_dict(), trainer.model)
        return shards

    monkeypatch.setattr(trainer, "plan", object())  # (as shard_experts leaves it; read only as "is there one")
    monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
    before = torch.get_rng_state()
    trainer.save_model(str(tmp_path / "best"))
    assert torch.equal(torch.get_rng_state(), before)
    saved = GeneralistModel.from_pretrained(str(tmp_path / "best"))
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], value, msg=name)
