"""Split "all" of every preset is train + test, found by the thirteenth audit: the motion and video
presets' "all" held windows of neither split (and missed test ones), and few_shot_instructions' error
for an unknown split listed "train, test" though "all" loads. Each test failed before its fix."""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest

from moe_gen.registry import TASKS
from moe_gen.tasks import load_preset


def _content(value):
    """A value made comparable: arrays by dtype, shape and bytes, containers item by item."""
    if isinstance(value, np.ndarray):
        return ("array", str(value.dtype), value.shape, hashlib.sha1(np.ascontiguousarray(value).tobytes()).digest())
    if isinstance(value, dict):
        return tuple(sorted((str(key), _content(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_content(item) for item in value)
    return repr(value)


@pytest.mark.parametrize("name", TASKS.list())
def test_split_all_of_every_preset_is_the_rows_of_train_and_test(name):
    train, test, every = (load_preset(name, split).data for split in ("train", "test", "all"))
    assert len(every) == len(train) + len(test)
    assert collections.Counter(map(_content, every)) == collections.Counter(map(_content, train + test))


@pytest.mark.parametrize("name", ["motion_classification", "text_to_motion", "video_classification",
                                  "video_captioning", "few_shot_instructions"])
def test_split_all_of_the_presets_that_differed_is_train_then_test(name):
    train, test, every = (load_preset(name, split).data for split in ("train", "test", "all"))
    assert [row["id"] for row in every] == [row["id"] for row in train + test]


def test_an_unknown_split_of_few_shot_instructions_lists_all():
    with pytest.raises(ValueError, match="unknown split 'validation'; known: train, test, all"):
        load_preset("few_shot_instructions", "validation")
