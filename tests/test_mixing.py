"""Task mixing and sampling: mixing weights, one-task batches, modality budgets and max_tokens,
deterministic draws and their saved state, rows dealt to processes (moved from test_trainer.py)."""

from __future__ import annotations

import collections
import json
import warnings

import pytest
from helpers import build_attribute as build
from helpers import quiet

from moe_gen.config import RouterConfig
from moe_gen.tasks import Task, Tokenizer, load_preset
from moe_gen.trainer import TaskSampler, TrainConfig, Trainer, mixing_weights
from moe_gen.trainer.sampling import sample_modality_tokens

NAMES = ["digit_classification", "table_species", "motion_classification"]


@pytest.fixture(scope="module")
def tasks():
    return [load_preset(n, "train", limit=40) for n in NAMES]


def test_mixing_weights_follow_the_configured_rule():
    sizes = [10, 40, 90]
    tasks = [Task(f"t{i}", "[TEXT:a] -> [TEXT:b]", [{"a": "x", "b": "y"}] * n) for i, n in enumerate(sizes)]
    assert mixing_weights(tasks, quiet(mixing="proportional")) == pytest.approx([n / 140 for n in sizes])
    roots = [n ** 0.5 for n in sizes]
    assert mixing_weights(tasks, quiet(mixing="temperature", temperature=2.0)) == pytest.approx(
        [r / sum(roots) for r in roots])
    assert mixing_weights(tasks, quiet(mixing="uniform")) == pytest.approx([1 / 3] * 3)
    assert mixing_weights(tasks, quiet(mixing="weights", task_weights={"t0": 3.0, "t1": 1.0, "t2": 0.0})) == \
        pytest.approx([0.75, 0.25, 0.0])
    with pytest.raises(ValueError, match="not being trained"):
        mixing_weights(tasks, quiet(mixing="weights", task_weights={"nope": 1.0}))
    with pytest.warns(UserWarning, match=r"task weights are given \(t0, t1, t2\) but mixing is 'temperature'"):
        mixing_weights(tasks, quiet(task_weights={"t0": 3.0, "t1": 1.0, "t2": 0.0}))
    tok = Tokenizer.default()  # a task of weight 0 with a budget the others soon fill: never drawn, no error
    budgeted = quiet(mixing="weights", task_weights={"t0": 1.0, "t1": 1.0, "t2": 0.0}, max_tokens=12, batch_size=8)
    sampler = TaskSampler(tasks, tok, budgeted)
    drawn = [s.task for step in range(5) for s in sampler.next_batch(step)]
    assert drawn and "t2" not in drawn
    with pytest.raises(ValueError, match="mixing must be one of"):
        TrainConfig(mixing="random")


def test_sampled_task_shares_match_the_weights(tasks, tok):
    config = quiet(mixing="weights", task_weights={NAMES[0]: 2.0, NAMES[1]: 1.0, NAMES[2]: 1.0}, batch_size=8)
    sampler = TaskSampler(tasks, tok, config)
    counts = collections.Counter(s.task for step in range(1, 61) for s in sampler.next_batch(step))
    total = sum(counts.values())
    assert total == 480
    assert counts[NAMES[0]] / total == pytest.approx(0.5, abs=0.06)
    assert counts[NAMES[1]] / total == pytest.approx(0.25, abs=0.06)


def test_single_task_batches_hold_one_task_each_drawn_by_the_weights(tasks, tok):
    config = quiet(mixing="weights", task_weights={NAMES[0]: 2.0, NAMES[1]: 1.0, NAMES[2]: 1.0}, batch_size=8,
                   batch_tasks="single")
    sampler = TaskSampler(tasks, tok, config)
    batches = [sampler.next_batch(step) for step in range(1, 121)]
    assert all(len(batch) == 8 and len({s.task for s in batch}) == 1 for batch in batches)
    shares = collections.Counter(batch[0].task for batch in batches)
    assert shares[NAMES[0]] / 120 == pytest.approx(0.5, abs=0.12)
    assert shares[NAMES[1]] / 120 == pytest.approx(0.25, abs=0.12)
    # a budget cuts a one-task batch short instead of filling it with another task's rows
    speech = load_preset("spoken_word_classification", "train", limit=30)
    capped = TaskSampler([speech], tok, quiet(batch_size=12, batch_tasks="single", modality_budget={"AUDIO": 40}))
    batch = capped.next_batch(1)
    assert 1 <= len(batch) < 12 and sum(sample_modality_tokens(s)["AUDIO"] for s in batch) <= 40
    with pytest.raises(ValueError, match="batch_tasks must be one of mixed, single"):
        TrainConfig(batch_tasks="task")
    with pytest.raises(ValueError, match="mixing='all' puts every task in each"):
        TrainConfig(batch_tasks="single", mixing="all")


def test_one_task_batches_with_the_tag_balance_loss_are_warned_about(tasks, tok, tmp_path):
    """The tag-balance loss reads a micro-batch's own load: with one task per batch it cannot see
    the experts other tasks crowd (utilisation fell from 0.90 to 0.71 per layer)."""
    with pytest.warns(UserWarning, match="batch_tasks='single' with tag_balance='loss'"):
        Trainer(build(tasks, tok), tasks, quiet(steps=1, batch_size=4, batch_tasks="single"),
                output_dir=str(tmp_path / "a")).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        biased = build(tasks, tok, router=RouterConfig(strategy="attribute", tag_balance="bias"))
        single = quiet(steps=1, batch_size=4, batch_tasks="single")
        Trainer(biased, tasks, single, output_dir=str(tmp_path / "b")).close()
        Trainer(build(tasks, tok), tasks, quiet(steps=1, batch_size=4), output_dir=str(tmp_path / "c")).close()
        windowed = build(tasks, tok, router=RouterConfig(strategy="attribute", tag_balance_window=8))
        Trainer(windowed, tasks, single, output_dir=str(tmp_path / "d")).close()  # a running load: no warning


def test_all_mixing_puts_every_task_in_every_batch(tasks, tok):
    sampler = TaskSampler(tasks, tok, quiet(mixing="all", batch_size=6))
    for step in range(1, 6):
        batch = sampler.next_batch(step)
        assert collections.Counter(s.task for s in batch) == {n: 2 for n in NAMES}


def test_rows_are_drawn_without_replacement_within_an_epoch(tok):
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": "y"} for i in range(10)])
    sampler = TaskSampler([task], tok, quiet(batch_size=5))
    first_epoch = [s.index for step in (1, 2) for s in sampler.next_batch(step)]
    assert sorted(first_epoch) == list(range(10))
    second_epoch = [s.index for step in (3, 4) for s in sampler.next_batch(step)]
    assert sorted(second_epoch) == list(range(10)) and second_epoch != first_epoch


def test_data_positions_saved_by_another_number_of_processes_keep_their_share_with_a_warning(tok, caplog):
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": "y"} for i in range(40)])
    two = TaskSampler([task], tok, quiet(batch_size=2), rank=0, world=2)
    for step in (1, 2, 3, 4, 5):  # 10 of rank 0's 20 rows
        two.next_batch(step)
    state = two.state_dict()
    assert state["world"] == 2 and state["cursors"]["t"] == [0, 10]
    same = TaskSampler([task], tok, quiet(batch_size=2), rank=0, world=2)
    same.load_state_dict(state)
    assert [s.index for s in same.next_batch(6)] == [s.index for s in two.next_batch(6)]  # exact
    one = TaskSampler([task], tok, quiet(batch_size=2))
    with caplog.at_level("WARNING", logger="moe_gen"):
        one.load_state_dict(state)
    assert "saved by 2 processes" in caplog.text
    assert one.state_dict()["cursors"]["t"] == [0, 20]  # half of its 40 rows, as rank 0 had done half of 20


def test_modality_budget_caps_positions_per_micro_batch(tok):
    speech = load_preset("spoken_word_classification", "train", limit=30)
    digits = load_preset("digit_classification", "train", limit=30)
    free = TaskSampler([speech, digits], tok, quiet(mixing="uniform", batch_size=12))
    capped = TaskSampler([speech, digits], tok, quiet(mixing="uniform", batch_size=12, modality_budget={"AUDIO": 40}))
    audio_free, audio_capped = [], []
    for step in range(1, 11):
        audio_free.append(sum(sample_modality_tokens(s)["AUDIO"] for s in free.next_batch(step)))
        batch = capped.next_batch(step)
        audio_capped.append(sum(sample_modality_tokens(s)["AUDIO"] for s in batch))
        assert len(batch) == 12  # the budget is filled with other tasks, not left empty
    assert max(audio_capped) <= 40 < max(audio_free)
    with pytest.raises(ValueError, match="unknown modalities"):
        TaskSampler([speech], tok, quiet(modality_budget={"SMELL": 3}))


@pytest.mark.parametrize("batch_tasks", ["mixed", "single"])
def test_sampler_state_restores_the_exact_sequence(tasks, tok, batch_tasks):
    config = quiet(batch_size=7, batch_tasks=batch_tasks)
    a = TaskSampler(tasks, tok, config)
    for step in range(1, 6):
        a.next_batch(step)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [[(s.task, s.index) for s in a.next_batch(step)] for step in range(6, 10)]
    b = TaskSampler(tasks, tok, config)
    b.load_state_dict(state)
    assert [[(s.task, s.index) for s in b.next_batch(step)] for step in range(6, 10)] == expected


def test_processes_walk_disjoint_shards(tok):
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": "y"} for i in range(12)])
    samplers = [TaskSampler([task], tok, quiet(batch_size=3), rank=r, world=2) for r in (0, 1)]
    seen = [{s.index for step in (1, 2) for s in sampler.next_batch(step)} for sampler in samplers]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))


def test_mixing_weights_that_sum_to_zero_are_refused(tasks):
    with pytest.raises(ValueError, match="give at least one task a positive weight"):
        mixing_weights(tasks, quiet(mixing="weights", task_weights={n: 0.0 for n in NAMES}))


def _same_length_rows_task() -> Task:
    return Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": "y"} for i in range(10)])


def test_a_micro_batchs_first_row_is_taken_whatever_the_budgets(tok):
    """Budgets cap what joins a micro-batch; a row larger than a budget still makes a batch of one
    (refused, it would leave every micro-batch empty)."""
    task = _same_length_rows_task()
    for config in (quiet(batch_size=3, modality_budget={"TEXT": 1}), quiet(batch_size=3, max_tokens=1)):
        sampler = TaskSampler([task], tok, config)
        assert [len(sampler.next_batch(step)) for step in range(3)] == [1, 1, 1]


def test_max_tokens_admits_a_batch_of_exactly_that_many_positions(tok):
    task = _same_length_rows_task()
    drawn = TaskSampler([task], tok, quiet(batch_size=10)).next_batch(0)
    sizes = {sum(sample_modality_tokens(s).values()) for s in drawn}
    assert len(sizes) == 1  # every row holds as many positions
    sampler = TaskSampler([task], tok, quiet(batch_size=3, max_tokens=2 * sizes.pop()))
    assert [len(sampler.next_batch(step)) for step in range(3)] == [2, 2, 2]


def test_a_budget_leaves_rows_without_that_modality_alone(tasks, tok):
    """Once the first row has gone over the IMAGE budget, rows without images still join."""
    sampler = TaskSampler([tasks[0], _same_length_rows_task()], tok,
                          quiet(mixing="all", batch_size=4, modality_budget={"IMAGE": 1}))
    for step in (0, 2):  # the digits task takes the first turn
        assert [s.task for s in sampler.next_batch(step)] == ["digit_classification", "t", "t"]


def test_the_micro_batches_of_a_step_draw_their_tasks_independently(tasks, tok):
    sampler = TaskSampler(tasks, tok, quiet(batch_size=1, batch_tasks="single"))
    drawn = [(sampler.next_batch(step, 0)[0].task, sampler.next_batch(step, 1)[0].task) for step in range(10)]
    assert any(first != second for first, second in drawn)


def test_every_epoch_draws_another_augmentation(tok):
    counting = load_preset("digit_counting", "train", limit=1)  # augment=dihedral, one row: an epoch a step
    sampler = TaskSampler([counting], tok, quiet(batch_size=1))
    images = [next(c for c in sampler.next_batch(step)[0].encoder if c.tokens is None).rows for step in range(6)]
    assert len({tuple(rows.flatten().tolist()) for rows in images}) > 1


def test_a_state_of_another_seed_or_other_rows_is_refused(tok):
    task = _same_length_rows_task()
    state = TaskSampler([task], tok, quiet(batch_size=2)).state_dict()
    with pytest.raises(ValueError, match="row orders of seed 0.*resume with the same seed"):
        TaskSampler([task], tok, quiet(batch_size=2, seed=1)).load_state_dict(dict(state, seed=0))
    longer = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"row {i}", "b": "y"} for i in range(11)])
    with pytest.raises(ValueError, match="had 10 rows when the checkpoint was written and has 11 now"):
        TaskSampler([longer], tok, quiet(batch_size=2)).load_state_dict(state)
