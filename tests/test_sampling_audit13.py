"""Task sampling defects found by the thirteenth audit; each test failed before its fix."""

from __future__ import annotations

import collections
import json
import math
import random
import warnings
import zlib

import pytest

from moe_gen.tasks import Task, Tokenizer
from moe_gen.trainer import TaskSampler, TrainConfig, mixing_weights


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _quiet(**kwargs) -> TrainConfig:
    return TrainConfig(**{"progress": False, "tensorboard": False, **kwargs})


def _task(name: str, rows: int, **kwargs) -> Task:
    return Task(name, "[TEXT:a] -> [TEXT:b]", [{"a": f"{name} {i}", "b": "y"} for i in range(rows)], **kwargs)


# ---- temperature mixing ---------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 5.0])
def test_temperature_shares_are_rows_to_the_one_over_tau(tau):
    sizes = [2000, 50, 7]
    tasks = [_task(f"t{i}", n) for i, n in enumerate(sizes)]
    expected = [n ** (1 / tau) / sum(m ** (1 / tau) for m in sizes) for n in sizes]
    shares = mixing_weights(tasks, _quiet(mixing="temperature", temperature=tau))
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(shares, expected))


def test_a_small_temperature_gives_the_draws_to_the_largest_tasks(tok):
    """2000^(1/0.01) overflowed a float: an OverflowError naming nothing when the Trainer was built."""
    tasks = [_task("big", 2000), _task("small", 50), _task("also_big", 2000)]
    config = _quiet(mixing="temperature", temperature=0.01, batch_size=8)
    shares = mixing_weights(tasks, config)
    assert math.isclose(shares[0], 0.5) and math.isclose(shares[2], 0.5) and shares[1] < 1e-100
    sampler = TaskSampler(tasks, tok, config)
    assert {s.task for step in range(1, 6) for s in sampler.next_batch(step)} == {"big", "also_big"}


# ---- rows dealt out over processes ------------------------------------------------------------------

def _draws(world: int, steps: int = 400) -> collections.Counter:
    small, other = _task("small", 5), _task("other", 400)
    config = _quiet(mixing="uniform", batch_size=4)
    samplers = [TaskSampler([small, other], Tokenizer.default(), config, rank=r, world=world) for r in range(world)]
    drawn: collections.Counter = collections.Counter()
    for step in range(1, steps + 1):
        for sampler in samplers:
            drawn.update(s.index for s in sampler.next_batch(step) if s.task == "small")
    return drawn


def test_rows_of_a_task_that_does_not_divide_over_the_processes_are_drawn_equally_often():
    """5 rows on 4 processes were sharded [[0, 4], [1], [2], [3]]: rows 1-3 drawn twice as often."""
    drawn = _draws(world=4)
    assert set(drawn) == set(range(5)) and max(drawn.values()) < 1.05 * min(drawn.values())


def test_every_process_walks_as_many_rows_and_an_epoch_deals_out_every_row(tok):
    task = _task("t", 5)
    samplers = [TaskSampler([task], tok, _quiet(batch_size=2), rank=r, world=4) for r in range(4)]
    epoch = [[s.index for s in sampler.next_batch(1)] for sampler in samplers]  # 2 rows: each one's epoch
    assert all(len(rows) == 2 for rows in epoch) and set(sum(epoch, [])) == set(range(5))
    assert all(sampler.state_dict()["cursors"]["t"] == [1, 0] for sampler in samplers)


def test_one_process_draws_the_rows_in_the_order_it_always_did(tok):
    task = _task("t", 7)
    sampler = TaskSampler([task], tok, _quiet(batch_size=7))
    for epoch in range(3):
        order = list(range(7))
        random.Random(zlib.crc32(f"0/order/t/{epoch}".encode())).shuffle(order)
        assert [s.index for s in sampler.next_batch(epoch + 1)] == order



def test_each_process_walks_every_world_th_row_of_the_epochs_shuffled_order(tok):
    """``row = permutation(task, epoch)[rank::world][cursor]`` (as torch's ``DistributedSampler``
    deals): 7 rows on 3 processes, the order wrapped around so each walks 3 rows an epoch."""
    task = _task("t", 7)
    for rank in range(3):
        sampler = TaskSampler([task], tok, _quiet(batch_size=3), rank=rank, world=3)
        for epoch in range(2):
            order = list(range(7))
            random.Random(zlib.crc32(f"0/order/t/{epoch}".encode())).shuffle(order)
            assert [s.index for s in sampler.next_batch(epoch + 1)] == (order + order)[rank:9:3], (rank, epoch)


def test_a_resume_mid_epoch_on_several_processes_continues_identically(tok):
    tasks = [_task("small", 5), _task("other", 13)]
    config = _quiet(mixing="uniform", batch_size=3)
    for rank in range(4):
        run = TaskSampler(tasks, tok, config, rank=rank, world=4)
        for step in range(1, 8):
            run.next_batch(step)
        state = json.loads(json.dumps(run.state_dict()))
        resumed = TaskSampler(tasks, tok, config, rank=rank, world=4)
        resumed.load_state_dict(state)
        expected = [[(s.task, s.index) for s in run.next_batch(step)] for step in range(8, 20)]
        assert [[(s.task, s.index) for s in resumed.next_batch(step)] for step in range(8, 20)] == expected


def test_a_process_whose_rows_fail_to_encode_this_epoch_finds_the_good_row_of_another():
    """Each epoch deals a process other rows: one good row of four reaches every process in turn."""
    rows = [{"a": "good", "b": "y"}] + [{"a": f"bad {i}"} for i in range(3)]  # rows 1-3 lack column b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = Task("t", "[TEXT:a] -> [TEXT:b]", rows, on_error="skip")
        for rank in (0, 1):
            sampler = TaskSampler([task], Tokenizer.default(), _quiet(batch_size=1), rank=rank, world=2)
            assert all(sampler.next_batch(step)[0].index == 0 for step in range(1, 20))
        bad = Task("bad", "[TEXT:a] -> [TEXT:b]", rows[1:], on_error="skip")
        with pytest.raises(ValueError, match="task 'bad': no row encodes"):
            TaskSampler([bad], Tokenizer.default(), _quiet(batch_size=1), rank=1, world=2).next_batch(1)


@pytest.mark.parametrize("rows, rank, world, most", [(400, 1, 4, 2 * 100 + 400), (30, 0, 1, 30)])
def test_a_task_whose_rows_all_fail_is_refused_after_a_bounded_number_of_encodes(rows, rank, world, most):
    """A shuffled walk over several processes meets every row only after ~N ln N tries (2,134
    encodes for 400 rows on 4 processes): after two epochs' worth of its own rows, the rows not yet
    met are tried once. On one process an epoch meets every row: once each has failed the task is
    refused, without encoding any row a second time (exactly 30 encodes for 30 rows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = Task("bad", "[TEXT:a] -> [TEXT:b]", [{"a": f"bad {i}"} for i in range(rows)], on_error="skip")
        calls, encode = [0], task.encode

        def counted(*args, **kwargs):
            calls[0] += 1
            return encode(*args, **kwargs)

        task.encode = counted
        with pytest.raises(ValueError, match="task 'bad': no row encodes"):
            TaskSampler([task], Tokenizer.default(), _quiet(batch_size=1), rank=rank, world=world).next_batch(1)
    assert calls[0] <= most if world > 1 else calls[0] == most


def test_a_state_dealt_before_every_process_walked_as_many_rows_goes_on_with_the_next_epoch():
    """With fewer rows than processes, the sampler before this session gave a process with no rows
    of its own all of them: its saved position (2 of 3 rows) is past the one row it walks now."""
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"t {i}", "b": "y"} for i in range(3)])
    sampler = TaskSampler([task], Tokenizer.default(), _quiet(batch_size=1), rank=3, world=4)
    state = json.loads(json.dumps(sampler.state_dict()))
    state["cursors"]["t"] = [0, 2]
    sampler.load_state_dict(state)
    assert sampler.state_dict()["cursors"]["t"] == [1, 0]
    assert sampler.next_batch(1)[0].task == "t"


def test_a_state_at_the_end_of_this_processs_share_goes_on_with_the_next_epoch():
    """A saved position equal to the rows a process walks an epoch (one row of three on rank 3 of
    4, position 1) is past its last row: it goes on at the next epoch's first row, not past the end
    of the order."""
    task = Task("t", "[TEXT:a] -> [TEXT:b]", [{"a": f"t {i}", "b": "y"} for i in range(3)])
    sampler = TaskSampler([task], Tokenizer.default(), _quiet(batch_size=1), rank=3, world=4)
    state = json.loads(json.dumps(sampler.state_dict()))
    state["cursors"]["t"] = [0, 1]
    sampler.load_state_dict(state)
    assert sampler.state_dict()["cursors"]["t"] == [1, 0]
    assert sampler.next_batch(1)[0].task == "t"
