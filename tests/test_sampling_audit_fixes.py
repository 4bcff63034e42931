"""Trainer data-path defects found by an audit (2026-12-05, seventh session); each test failed
before its fix."""

from __future__ import annotations

import collections
import json
import os
import warnings

import pytest
import torch
from helpers import flavour_with

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Task, Tokenizer
from moe_gen.trainer import TaskSampler, TrainConfig, Trainer, mixing_weights
from moe_gen.trainer.evaluation import evaluate_task


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _model(task, tok):
    torch.manual_seed(0)
    return GeneralistModel.build(flavour_with("debug", router=RouterConfig(strategy="attribute")), [task], tok)


def test_a_task_with_one_good_row_keeps_drawing_it(tok):
    """The skip loop gave up after one shard's worth of tries, which from mid-epoch ran into a
    reshuffled epoch before reaching the good row: "no row ... encodes"."""
    rows = [{"a": "good", "b": "y"}] + [{"a": f"bad {i}"} for i in range(3)]  # rows 1-3 lack column b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = Task("t", "[TEXT:a] -> [TEXT:b]", rows, on_error="skip")
        sampler = TaskSampler([task], tok, TrainConfig(batch_size=1, progress=False, tensorboard=False))
        assert all(sampler.next_batch(step)[0].index == 0 for step in range(1, 50))


def test_a_second_fit_on_the_same_trainer_keeps_the_log(tok, tmp_path):
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": str(i % 3)} for i in range(12)])
    config = TrainConfig(steps=3, batch_size=4, log_every=1, progress=False, tensorboard=False)
    trainer = Trainer(_model(task, tok), [task], config, output_dir=str(tmp_path))
    trainer.fit()
    trainer.config.steps = 5
    trainer.fit()
    with open(os.path.join(tmp_path, "logs", "train.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]


class _Rows:
    """A dataset whose row 2 cannot be read (a corrupt shard)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 2:
            raise OSError("corrupt shard")
        if not 0 <= i < 6:
            raise IndexError(i)
        return {"a": f"row {i}", "b": "yes" if i % 2 else "no"}


def test_evaluation_skips_a_row_the_dataset_cannot_read(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = Task("t", "[TEXT:a] -> [TEXT:b,closed_set]", _Rows(), on_error="skip")
        model = _model(task, tok)
        result = evaluate_task(model, task)
    assert result["skipped"] == 1 and 0.0 <= result["accuracy"] <= 1.0
    strict = Task("s", "[TEXT:a] -> [TEXT:b,closed_set]", [{"a": "x", "b": "no"}, {"a": "y", "b": "yes"}])
    with pytest.raises(ValueError, match=r"task 's': evaluation needs limit >= 1.*got limit=0, batch_size=64"):
        evaluate_task(_model(strict, tok), strict, limit=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate_task(_model(strict, tok), strict, batch_size=0)


def test_a_task_weight_that_is_negative_or_not_a_number_is_refused(tok):
    rows = [{"a": "x", "b": "y"}]
    config = TrainConfig(mixing="weights", progress=False, tensorboard=False)
    for weight in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="task 'bad': weight must be a finite number >= 0"):
            Task("bad", "[TEXT:a] -> [TEXT:b]", rows, weight=weight)  # refused when made (thirteenth audit)
        bad = Task("bad", "[TEXT:a] -> [TEXT:b]", rows)
        bad.weight = weight  # set afterwards: mixing refuses it
        with pytest.raises(ValueError, match="task 'bad': its mixing weight must be a finite number >= 0"):
            mixing_weights([Task("good", "[TEXT:a] -> [TEXT:b]", rows), bad], config)


def test_all_mixing_fills_the_batch_size_it_is_given(tok):
    tasks = [Task(name, "[TEXT:a] -> [TEXT:b]", [{"a": f"{name} {i}", "b": "y"} for i in range(20)])
             for name in ("p", "q", "r")]
    sampler = TaskSampler(tasks, tok, TrainConfig(mixing="all", batch_size=5, progress=False, tensorboard=False))
    totals: collections.Counter = collections.Counter()
    for step in range(1, 7):
        batch = sampler.next_batch(step)
        counts = collections.Counter(s.task for s in batch)
        assert len(batch) == 5 and set(counts) == {"p", "q", "r"}
        totals.update(counts)
    assert set(totals.values()) == {10}  # the extra rows take turns
    with pytest.raises(ValueError, match="batch_size 2 is below the 3 tasks"):
        TaskSampler(tasks, tok, TrainConfig(mixing="all", batch_size=2, progress=False, tensorboard=False))
