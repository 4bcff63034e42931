"""Audit 15 of the objectives: what an objective cannot train, or the answer infer cannot decode, is
refused when the ``Trainer`` is built (``Objective.check_task``), and the objectives' own settings,
given from Python, are checked as ``TrainConfig`` checks them; each test failed before its fix."""

import pytest
from helpers import build

from moe_gen.tasks import Task, Tokenizer, load_preset
from moe_gen.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _trainer(model, tasks, tmp_path, **overrides):
    config = TrainConfig(**{"steps": 2, "batch_size": 2, "warmup_steps": 0, "progress": False, "tensorboard": False,
                            "checkpoint_every": 0, **overrides})
    return Trainer(model, tasks, config, output_dir=str(tmp_path / "run"))


def test_a_contrastive_task_without_a_token_target_is_refused_when_the_trainer_is_built(tok, tmp_path):
    """The contrastive objective had no check_task: a task whose answer is motion frames was
    refused only when a step first drew one of its rows, after the steps before it had trained."""
    base = load_preset("text_to_motion", "train", limit=4)
    motion = Task("motion_retrieval", base.instruction, base.data, objective="contrastive")
    model = build([motion], tok)
    with pytest.raises(ValueError, match=r"task 'motion_retrieval': the contrastive objective needs a token "
                                         r"target \(text\).*its answer has only \['MOTION:motion'\]"):
        _trainer(model, [motion], tmp_path)
