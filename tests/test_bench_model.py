"""scripts/bench_model.py's guards: generation is timed only on answers of equal length, and ratios
are paired by round (the timings themselves belong to the script, not to tests)."""

from types import SimpleNamespace

import pytest
from helpers import load_script


@pytest.fixture
def bench(monkeypatch):
    return load_script("bench_model", monkeypatch)


def _infer(lengths):
    """A stand-in for ``model.infer`` whose answers have these token counts (and records its options)."""
    calls = []

    def infer(task, rows, **options):
        calls.append(options)
        return [SimpleNamespace(tokens=list(range(n))) for n in lengths]

    return infer, calls


def test_generated_tokens_asks_for_exact_lengths_and_refuses_unequal_answers(bench):
    infer, calls = _infer([8, 8, 8])
    assert bench.generated_tokens(infer, "task", [{}] * 3, 8) == 24
    assert calls == [{"max_new_tokens": 8, "min_length": 8}]
    infer, _ = _infer([8, 7, 8])  # one answer stopped early: the models would decode unequal work
    with pytest.raises(RuntimeError, match=r"generation answers have \[7, 8\] tokens, not 8 each"):
        bench.generated_tokens(infer, "task", [{}] * 3, 8)


def test_ratios_are_paired_by_round(bench):
    # the variant is 2x the reference in every round although both drift by 10x between rounds
    times = {"dense": [1.0, 10.0, 1.0, 10.0, 1.0], "moe": [2.0, 20.0, 2.0, 20.0, 2.0]}
    seconds, ratio, q1, q3 = bench.paired_ratios(times, "dense")["moe"]
    assert (seconds, ratio, q1, q3) == (2.0, 2.0, 2.0, 2.0)
    seconds, ratio, _, _ = bench.paired_ratios(times, "dense", invert=True)["moe"]
    assert ratio == 0.5
