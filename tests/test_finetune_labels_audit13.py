"""Fine-tuning a task the model knows on rows with a closed-set label its label set lacks is refused
when the Trainer is built, not at the step that first draws such a row (audit 13); the test failed
before its fix."""

from __future__ import annotations

import json
import os

import pytest
from helpers import build

from moe_gen.tasks import Task, Tokenizer
from moe_gen.trainer import TrainConfig, Trainer

INSTR = "[TEXT:s] sentiment? -> [TEXT:y,closed_set]"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model that met ``sentiment`` with the labels neg and pos, saved."""
    first = Task("sentiment", INSTR, [{"s": f"i {'love' if i % 2 else 'hate'} it {i}", "y": "pos" if i % 2 else "neg"}
                                      for i in range(8)])
    path = str(tmp_path_factory.mktemp("base"))
    build([first], Tokenizer.default()).save_pretrained(path)
    return path


def _rows(new_labels=(), n=40):
    rows = [{"s": f"i love it {i}", "y": "pos" if i % 2 else "neg"} for i in range(n)]
    for i, label in enumerate(new_labels):
        rows[n - 10 + i]["y"] = label
    return rows


def _trainer(path, task, out):
    from moe_gen.model import GeneralistModel

    config = TrainConfig(steps=4, batch_size=4, log_every=1, progress=False, tensorboard=False)
    return Trainer(GeneralistModel.from_pretrained(path), [task], config, output_dir=str(out))


def test_a_new_label_of_a_known_task_is_refused_up_front(saved, tmp_path):
    """Trained and then crashed at the step that drew the row ("label 'neutral' is not in the closed
    set (2 labels)"), saying neither that the label set is the saved model's nor what to do."""
    task = Task("sentiment", INSTR, _rows(["neutral", "mixed", "a", "b", "c", "d", "e"]))
    with pytest.raises(ValueError, match=r"task 'sentiment', column 'y': 7 label\(s\) of the rows are not in the "
                                         r"model's closed set for the column \(2 labels.*'a', 'b', 'c', 'd', 'e', "
                                         r"\.\.\. \(7 in all\).*keeps the label set it was built with.*another name"
                                         r".*on_error='skip'"):
        _trainer(saved, task, tmp_path / "run")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before the run started


def test_labels_the_model_knows_are_accepted(saved, tmp_path):
    """A subset of the saved labels (here one of the two) is no change to the label set."""
    only_pos = [dict(row, y="pos") for row in _rows()]
    _trainer(saved, Task("sentiment", INSTR, only_pos), tmp_path / "run").fit()


def test_with_on_error_skip_the_rows_with_new_labels_are_skipped(saved, tmp_path):
    task = Task("sentiment", INSTR, _rows(["neutral"], n=12), on_error="skip")  # 4 steps of 4 draw every row
    with pytest.warns(UserWarning, match=r"task 'sentiment', column 'y': 1 label\(s\).*'neutral'; the rows holding "
                                         r"them are skipped"):
        trainer = _trainer(saved, task, tmp_path / "run")
    trainer.fit()
    with open(tmp_path / "run" / "logs" / "train.jsonl") as f:
        assert json.loads(f.read().splitlines()[-1])["step"] == 4
    assert task.skipped == 1 and "label 'neutral' is not in the closed set" in task.errors[0]
