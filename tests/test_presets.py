"""load_preset and preset(): the split, limit, objective and metrics a preset's Task gets, and the
presets whose objective or rows differ from the rest (licences: test_preset_licences.py)."""

from __future__ import annotations

import re

import pytest

from moe_gen import TASKS
from moe_gen.tasks import load_preset, preset, preset_info
from moe_gen.tasks.presets import PresetInfo

TOY = "test_presets_toy"


@pytest.fixture
def asked():
    """Registers preset TOY (no objective given) over 5 hand-made rows of each split; yields the
    splits its builder is asked for."""
    calls: list[str] = []

    def build(split):
        calls.append(split)
        if split == "broken":
            raise ValueError("the source is broken")
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; known: train, test")
        return [{"q": f"{split} {i}", "a": str(i)} for i in range(5)]

    preset(TOY, "[TEXT:q] -> [TEXT:a]", "hand-made rows", ("exact_match", "bleu"), licence=" own rows ")(build)
    try:
        yield calls
    finally:
        TASKS.unregister(TOY)


def test_load_preset_gives_the_train_split_the_limit_and_the_presets_objective_and_metrics(asked):
    task = load_preset(TOY)
    assert asked == ["train"] and [row["q"] for row in task.data] == [f"train {i}" for i in range(5)]
    assert task.objective == "generative" and task.metrics == ("exact_match", "bleu")
    assert preset_info(TOY).objective == "generative"
    assert PresetInfo("p", "[TEXT:q] -> [TEXT:a]", "s", ("accuracy",)).objective == "generative"
    assert [row["q"] for row in load_preset(TOY, "test", limit=2).data] == ["test 0", "test 1"]
    assert load_preset(TOY, limit=0).data == []  # what model.infer(preset name) loads
    assert load_preset(TOY, limit=9).data == load_preset(TOY).data


@pytest.mark.parametrize("limit", [True, 2.0, "3", -1])
def test_load_preset_refuses_a_limit_that_is_not_a_whole_number(asked, limit):
    message = f"load_preset('{TOY}'): limit must be None or a whole number >= 0, got {limit!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_preset(TOY, limit=limit)
    assert asked == []  # refused before the rows are built


def test_only_an_unknown_split_gets_the_presets_name(asked):
    with pytest.raises(ValueError, match=f"^load_preset\\('{TOY}'\\): unknown split 'dev'; known: train, test$"):
        load_preset(TOY, "dev")
    with pytest.raises(ValueError, match="^the source is broken$"):  # not a split: passed on as it is
        load_preset(TOY, "broken")


def test_a_licence_left_blank_is_refused_naming_the_preset():
    with pytest.raises(ValueError, match="^preset 'test_presets_blank': say under which licence its data comes"):
        preset("test_presets_blank", "[TEXT:a] -> [TEXT:b]", "nowhere", ("exact_match",), licence="\t")
    assert "test_presets_blank" not in TASKS.list()


@pytest.mark.parametrize("name, objective", [("image_text_retrieval", "contrastive"),
                                             ("text_to_image_maskgit", "parallel"),
                                             ("digit_masked_modeling", "masked"),
                                             ("text_to_image", "generative")])
def test_presets_train_with_their_own_objective(name, objective):
    assert preset_info(name).objective == objective
    assert load_preset(name, "test", limit=0).objective == objective


def test_image_making_presets_score_the_images_with_the_digit_metrics():
    digit_metrics = {"digit_accuracy", "digit_fid", "pixel_mse"}
    for name in ("text_to_image", "text_to_image_maskgit", "image_infilling"):
        assert set(preset_info(name).metrics) == digit_metrics, name


def test_text_to_motion_rows_are_whole_clip_parts_cut_in_time():
    train, test = (load_preset("text_to_motion", split).data for split in ("train", "test"))
    assert [row["clip"] for row in train] == [row["clip"] for row in test] and len(train) == 20
    for before, after in zip(train, test):
        # the test part starts where the training part ends, under the same text
        assert before["start"] == 0 and after["start"] == len(before["motion"]) > len(after["motion"]) >= 12
        assert before["text"] == after["text"]
    assert max(len(row["motion"]) for row in train) > 12  # not the 12-frame windows of motion_classification
