"""``step_loss_scales`` on a hand-worked step: the factors that make two micro-batches, on one or two
processes, weigh every scored token and frame row as one large batch would (the trainer's
accumulation tests check the same through whole training steps, on one process)."""

from __future__ import annotations

import pytest

from moe_gen import distributed
from moe_gen.objectives import LossScales
from moe_gen.trainer.scales import step_loss_scales, takes_scales


class Counted:
    """An objective whose batch is its own ``loss_counts``: (scored tokens, frame rows per adapter)."""

    def loss_counts(self, batch):
        return batch

    def __call__(self, batch, scales=None):
        raise NotImplementedError


class Keywords(Counted):
    def __call__(self, batch, **options):  # takes ``scales`` through ``**options``
        raise NotImplementedError


class Plain(Counted):
    def __call__(self, batch):  # takes no scales: its micro-batch means count alike
        raise NotImplementedError


OBJECTIVES = {"g": Counted(), "h": Keywords(), "p": Plain()}
# two micro-batches of 4 samples: (size, [(objective, samples, its batch = its counts), ...]);
# "video" never has a row in the step, "image" one
MICRO_BATCHES = [
    (4, [("g", [0, 1, 2], (6, {"audio": 2, "image": 1})), ("h", [3], (4, {"audio": 1}))]),
    (4, [("g", [4], (6, {"audio": 1, "video": 0})), ("h", [5, 6], (8, {"audio": 1})), ("p", [7], (5, {}))]),
]
# by hand: S = 8, S_g = 4, N_g = 12, R_g,audio = 3, R_g,image = 1, S_h = 3, N_h = 12, R_h,audio = 2,
# A = 2, W = 1, and c = (S_g / S) / (S_gi / S_i) · A · W. g in micro-batch 0: c = (4/8) / (3/4) · 2 = 4/3,
# token 4/3 · 6/12 = 2/3, audio 4/3 · 2/3 = 8/9, image 4/3 · 1/1; in micro-batch 1: c = (4/8) / (1/4) · 2 = 4,
# token 4 · 6/12 = 2, audio 4 · 1/3 = 4/3. h: c = 3 and 3/2, token 3 · 4/12 = 1 and 3/2 · 8/12 = 1, audio
# 3 · 1/2 and 3/2 · 1/2.
EXPECTED = [{"g": LossScales(2 / 3, {"audio": 8 / 9, "image": 4 / 3}), "h": LossScales(1.0, {"audio": 3 / 2})},
            {"g": LossScales(2.0, {"audio": 4 / 3}), "h": LossScales(1.0, {"audio": 3 / 4})}]


def _assert_scales(got, expected):
    assert [set(per) for per in got] == [set(per) for per in expected]  # "p" takes none: left out
    for per, want in zip(got, expected):
        for name, scales in want.items():
            if scales is None:
                assert per[name] is None, name
            else:
                assert per[name].token == pytest.approx(scales.token), name
                assert dict(per[name].frame) == pytest.approx(dict(scales.frame)), name


def test_scales_of_a_hand_worked_step():
    """A frame factor away from 1 keeps the scales even where the token factor is 1; an adapter with no
    rows in the step has no factor (not a division by zero)."""
    _assert_scales(step_loss_scales(OBJECTIVES, MICRO_BATCHES, ["video", "image", "audio"], world=1), EXPECTED)


def test_two_processes_with_the_same_micro_batches_scale_as_one(monkeypatch):
    """Every total doubles over two identical processes and data parallelism averages their gradients:
    the factors, multiplied by the world size ``W``, are those of one process."""
    monkeypatch.setattr(distributed, "summed_over_processes", lambda totals: 2 * totals)
    _assert_scales(step_loss_scales(OBJECTIVES, MICRO_BATCHES, ["audio", "image", "video"], world=2), EXPECTED)


def test_one_micro_batch_on_one_process_needs_no_scales():
    """Every factor is 1 (None) for one micro-batch on one process."""
    got = step_loss_scales(OBJECTIVES, MICRO_BATCHES[:1], ["audio", "image"], world=1)
    assert got == [{"g": None, "h": None}]


def test_which_objectives_take_scales():
    assert takes_scales(Counted()) and takes_scales(Keywords())
    assert not takes_scales(Plain())

    class Uncounted:
        def __call__(self, batch, scales=None):
            raise NotImplementedError

    assert not takes_scales(Uncounted())
