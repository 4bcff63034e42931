"""Two feature slots of ONE task that feed one adapter features of two widths, fifteenth audit:
refused when the model is built, naming the task and both slots and saying how to give one slot an
adapter of its own (two MOTION inputs of different widths built, and every step then failed in
collate naming no task or slot; only two tasks' conflict was refused). The test failed before the
fix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.registry import ADAPTERS
from moe_gen.tasks import Task, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _rows(n: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"body": rng.standard_normal((10, 6)).astype(np.float32),   # 6 features a frame
             "hand": rng.standard_normal((10, 4)).astype(np.float32),   # 4 features a frame
             "y": ["x", "z"][i % 2]} for i in range(n)]


def test_two_widths_of_one_task_are_refused_at_build_naming_task_and_slots(tok):
    task = Task("two", "[MOTION:body] and [MOTION:hand] -> [TEXT:y,closed_set]", _rows())
    message = ("task 'two': its slots of column 'body' and column 'hand' feed the 'motion_mlp' adapter features of "
               "width 12 and 8: one adapter takes one width. Give one slot an adapter of its own, e.g. "
               "ADAPTERS.register('hand_motion_mlp')(ADAPTERS.get('motion_mlp')) and adaptor=hand_motion_mlp on "
               "that slot, or give both the same preprocessing options")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        GeneralistModel.build(flavour("debug"), [task], tok)


def test_the_fix_the_message_gives_builds_and_answers(tok):
    ADAPTERS.register("hand_motion_mlp")(ADAPTERS.get("motion_mlp"))
    try:
        task = Task("two", "[MOTION:body] and [MOTION:hand,adaptor=hand_motion_mlp] -> [TEXT:y,closed_set]",
                    _rows())
        torch.manual_seed(0)
        model = GeneralistModel.build(flavour("debug"), [task], tok)
        assert model.config.adapters == {"motion_mlp": 12, "hand_motion_mlp": 8}
        assert [p.text for p in model.infer(task, task.data[:2])] != [None, None]
    finally:
        ADAPTERS.unregister("hand_motion_mlp")
