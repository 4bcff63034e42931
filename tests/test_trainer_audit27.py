"""The trainer, twenty-seventh audit: evaluations while training around a resume, an empty
eval_tasks, and training rows too long for the model's position table. Each test fails on the
code before its fix."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import build, quiet

import moe_gen.trainer.best as trainer_module  # (where evaluations while training are scored)
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Task, TaskDataError, Tokenizer, load_preset
from moe_gen.trainer import Trainer
from moe_gen.trainer.checkpoint import read_trainer_state
from moe_gen.trainer.logs import read_jsonl_log


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tasks():
    return [load_preset("table_species", "train", limit=8)]


def _config(**settings):
    return quiet(**{"steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_every": 3, "eval_limit": 2, **settings})


def _evaluations(output) -> list[dict]:
    path = os.path.join(str(output), "logs", "eval.jsonl")
    return read_jsonl_log(path) if os.path.exists(path) else []


def _scores(monkeypatch, values):
    """Evaluations score ``values`` in turn (whatever the model answers)."""
    scores = iter(values)
    monkeypatch.setattr(trainer_module, "eval_score", lambda results, metric: next(scores))


def test_a_resumed_run_redoes_the_evaluation_that_failed_and_stopped_the_run(tok, tasks, tmp_path, monkeypatch):
    _scores(monkeypatch, [0.9, 0.4])  # the resumed run's steps 3 and 6
    first = Trainer(build(tasks, tok), tasks, _config(keep_best=True), output_dir=str(tmp_path))

    def failing(*args, **kwargs):
        raise OSError("the eval data's mount went away")

    monkeypatch.setattr(first, "evaluate", failing)
    with pytest.raises(OSError):
        first.fit()  # stops at step 3, after a checkpoint of it
    first.close()
    resumed = Trainer(build(tasks, tok), tasks, _config(keep_best=True), output_dir=str(tmp_path), resume=True)
    assert resumed.step == 3
    summary = resumed.fit()
    assert [e["step"] for e in _evaluations(tmp_path)] == [3, 6]  # step 3's evaluation was skipped
    assert (summary["best_step"], summary["best_score"]) == (3, 0.9)
    # the checkpoint of step 3 was written again with its evaluation: resumed from it, nothing is redone
    state = read_trainer_state(os.path.join(str(tmp_path), "checkpoints", "step-0000003"))
    assert state["evaluated"] == 3 and state["best"] == {"step": 3, "score": 0.9}


def test_best_weights_saved_after_the_checkpoint_resumed_from_are_moved_aside(tok, tasks, tmp_path, monkeypatch,
                                                                               capsys):
    """A run killed after a better evaluation past its last checkpoint left ``best/`` holding that
    discarded step's weights while ``fit`` named it for an earlier best."""
    _scores(monkeypatch, [0.5, 0.9, 0.4, 0.3])  # killed run: steps 3, 6; resumed run (another lr): 6, 8
    settings = {"steps": 8, "keep_best": True, "checkpoint_every": 4}
    first = Trainer(build(tasks, tok), tasks, _config(**settings), output_dir=str(tmp_path))
    real, step_6 = first.train_step, {}

    def killed_at_8(step, *args):
        if step == 7:
            step_6.update({k: v.clone() for k, v in first.model.state_dict().items()})
        if step == 8:
            raise KeyboardInterrupt
        return real(step, *args)

    monkeypatch.setattr(first, "train_step", killed_at_8)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    first.close()
    resumed = Trainer(build(tasks, tok), tasks, _config(**settings, lr=5e-4), output_dir=str(tmp_path), resume=True)
    summary = resumed.fit()
    assert (summary["best_step"], summary["best_score"], summary["best_model"]) == (3, 0.5, None)
    aside = tmp_path / "best.discarded-step-6"
    assert not (tmp_path / "best").exists() and aside.is_dir()
    assert "held step 6's weights, saved after the checkpoint of step 4" in capsys.readouterr().out
    kept = GeneralistModel.from_pretrained(str(aside)).state_dict()
    assert all(torch.equal(kept[name], step_6[name]) for name in kept)


def test_with_expert_shards_the_checkpoint_keep_best_writes_records_the_new_best(tok, tasks, tmp_path, monkeypatch):
    """With expert parallelism ``save_model`` writes a checkpoint of the step first; it recorded the
    earlier best (and no evaluation of the step), so a run resumed from it forgot the best."""
    _scores(monkeypatch, [0.7])
    trainer = Trainer(build(tasks, tok), tasks, _config(steps=3, eval_every=0, keep_best=False),
                      output_dir=str(tmp_path))
    trainer.fit()
    seen = []

    def save_checkpoint():  # what the checkpoint written for the best model holds of the trainer's state
        seen.append({key: trainer.state[key] for key in ("best", "evals_since_best", "evaluated")})
        return None  # (failed: save_model gives up, and the best is not kept)

    monkeypatch.setattr(trainer, "plan", object())  # (as shard_experts leaves it)
    monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(trainer.config, "keep_best", True)
    logger = type("Log", (), {"log_eval": lambda self, record: None})()
    trainer._evaluate_while_training(3, logger)
    assert seen == [{"best": {"step": 3, "score": 0.7}, "evals_since_best": 0, "evaluated": 3}]
    assert trainer.state["best"] is None and trainer.state["evals_since_best"] == 1  # the save failed


def test_an_empty_eval_tasks_evaluates_nothing_and_eval_every_without_eval_tasks_is_refused(tok, tasks, tmp_path):
    """``eval_tasks=[]`` fell back to the training tasks, scored on their training rows."""
    trainer = Trainer(build(tasks, tok), tasks, _config(eval_every=0), output_dir=str(tmp_path / "a"), eval_tasks=[])
    assert trainer.eval_tasks == [] and trainer.evaluate() == {}
    trainer.close()
    with pytest.raises(ValueError, match="eval_every=3 evaluates the eval_tasks, and eval_tasks is empty"):
        Trainer(build(tasks, tok), tasks, _config(), output_dir=str(tmp_path / "b"), eval_tasks=[])
    assert not (tmp_path / "b").exists()


def _long_row_task(on_error):
    long = " ".join(f"word{i}" for i in range(300))  # past the debug flavour's 1,024 positions
    rows = [{"q": long, "a": "yes"}] + [{"q": f"short {i}", "a": "no" if i % 2 else "yes"} for i in range(7)]
    return Task("longq", "[TEXT:q] ? -> [TEXT:a,closed_set]", rows, on_error=on_error)


def test_a_training_row_past_the_position_table_is_skipped_under_on_error_skip(tok, tmp_path):
    task = _long_row_task("skip")
    summary = Trainer(build([task], tok), [task], quiet(steps=3, batch_size=8, warmup_steps=0),
                      output_dir=str(tmp_path)).fit()
    assert summary["step"] == 3 and task.skipped == 1 and "row 0" in task.errors[0]


def test_a_training_row_past_the_position_table_names_task_and_row(tok, tmp_path):
    task = _long_row_task("raise")
    trainer = Trainer(build([task], tok), [task], quiet(steps=3, batch_size=8, warmup_steps=0),
                      output_dir=str(tmp_path))
    with pytest.raises(TaskDataError, match=r"task 'longq', row 0: .*past the learned position table"):
        trainer.fit()
