"""Built-in data and task mixing defects found by an audit (2026-12-06, twelfth session); each test
failed before its fix."""

from __future__ import annotations

import pytest
import torch
from helpers import flavour_with

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TaskSampler, TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(**{"progress": False, "tensorboard": False, "batch_size": 4, "warmup_steps": 2, **kwargs})


def _weighted(weight: float) -> list:
    return [load_preset("digit_classification", "train", limit=6),
            load_preset("table_species", "train", limit=6, weight=weight)]


def test_a_resume_with_another_task_weight_is_refused(tok, tmp_path):
    """A task's own weight (read by mixing="weights" where task_weights does not name it) was not
    saved: the resumed run drew other batches without a word."""
    tasks = _weighted(1.0)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug", router=RouterConfig(strategy="attribute")), tasks, tok)
    with Trainer(model, tasks, _config(steps=4, mixing="weights"), output_dir=str(tmp_path)) as trainer:
        trainer.train_step(1)
        trainer.step = 1
        trainer.save_checkpoint()
    heavier = _weighted(50.0)
    with pytest.raises(ValueError, match=r"other mixing weights \(table_species 1 → 50\): the resumed run would "
                                         r"draw other batches"):
        Trainer(model, heavier, _config(steps=4, mixing="weights"), output_dir=str(tmp_path), resume=True)
    state = TaskSampler(tasks, tok, _config(mixing="weights")).state_dict()
    assert state["weights"] == {"digit_classification": 1.0, "table_species": 1.0}
    # the same shares (every weight doubled) draw the same batches; a state saved before the weights were
    # recorded loads as it did
    TaskSampler(_weighted(1.0), tok, _config(mixing="weights", task_weights={
        "digit_classification": 3.0, "table_species": 3.0})).load_state_dict(state)
    TaskSampler(heavier, tok, _config(mixing="weights")).load_state_dict({k: v for k, v in state.items()
                                                                          if k != "weights"})


def test_all_mixing_under_a_budget_squeezes_every_task_alike(tok):
    """Each micro-batch was filled task by task: the first task used the budget up and the next one,
    of the same modality, had no row in any step."""
    import collections

    from moe_gen.tasks import Task
    from moe_gen.trainer.sampling import sample_modality_tokens

    tasks = [Task(name, "[TEXT:a] -> [TEXT:b]", [{"a": f"{name} row", "b": "y"}] * 20) for name in ("p", "q")]
    budget = sum(2 * sample_modality_tokens(task.encode(0, tok))["TEXT"] for task in tasks)  # two rows of each
    sampler = TaskSampler(tasks, tok, _config(mixing="all", batch_size=8, modality_budget={"TEXT": budget}))
    for step in range(1, 6):
        batch = sampler.next_batch(step)
        assert [s.task for s in batch] == ["p", "p", "q", "q"]  # listed task by task, as without a budget
    unlimited = TaskSampler(tasks, tok, _config(mixing="all", batch_size=5))
    assert collections.Counter(s.task for s in unlimited.next_batch(1)) == {"p": 2, "q": 3}


def test_split_all_is_train_and_test_and_a_wrong_split_names_the_preset():
    """video_qa's "all" drew 100 clips of its own (neither split's; test seeds over every digit) and
    few_shot_instructions refused "all" without naming itself."""
    for name in ("video_qa", "few_shot_instructions"):
        ids = [row["id"] for split in ("train", "test") for row in load_preset(name, split).data]
        assert [row["id"] for row in load_preset(name, "all").data] == ids
    with pytest.raises(ValueError, match=r"load_preset\('few_shot_instructions'\): unknown split 'validation'; "
                                         r"known: train, test"):
        load_preset("few_shot_instructions", "validation")
