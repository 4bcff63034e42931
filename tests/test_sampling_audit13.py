"""Task sampling defects found by the thirteenth audit; each test failed before its fix."""

from __future__ import annotations

import math

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
