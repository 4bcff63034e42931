"""What slots learn from the training rows (``Task.fit_statistics``), fifteenth audit: a MOTION
slot in a repetition group is normalised with the statistics of every clip of its lists (the
whole list was read as one clip, refused, and the task could not be planned); a slot filled by
position (no column) is fitted too, under ``"slot N"``, and encodes as the same slot by column
does, also in a model saved and loaded (it was never fitted: bag_of_words and pose_summary failed
every row, STRUCT and MOTION fell back to unfitted encodings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Task
from moe_gen.tasks.instruction import Instruction
from moe_gen.tasks.task import MOTION_NORMALISATION


def _clip_lists(rows: int = 6, clips: int = 2, seed: int = 0) -> list[dict]:
    """Rows of ``clips`` clips each (frames [12, 6] around 5, spread 2) with a label per clip."""
    rng = np.random.default_rng(seed)
    return [{"clips": [rng.normal(5, 2, (12, 6)) for _ in range(clips)], "labels": ["walk", "run"][:clips],
             "label": "walk"} for _ in range(rows)]


@pytest.mark.parametrize("instruction", [
    "what moves? ( [MOTION:clips] )* -> [TEXT:label]",
    "( [MOTION:clips] [TEXT:labels] )* what are these? -> [TEXT:label]",
])
def test_a_motion_slot_in_a_repetition_group_is_normalised_by_all_its_clips(tok, instruction):
    rows = _clip_lists()
    task = Task("motion_list", instruction, rows)
    fitted = task.fit_statistics()[MOTION_NORMALISATION]
    every_frame = np.concatenate([clip for row in rows for clip in row["clips"]])
    np.testing.assert_allclose(fitted["mean"], every_frame.mean(0), rtol=1e-5)
    np.testing.assert_allclose(fitted["std"], every_frame.std(0), rtol=1e-5)
    sample = task.encode(0, tok, training=False)
    clips = [chunk.rows for chunk in sample.encoder if chunk.rows is not None]
    assert len(clips) == 2
    assert abs(float(np.concatenate([c.numpy() for c in clips]).mean())) < 1.0  # around 5 before


def test_pose_summary_in_a_repetition_group_encodes_each_clip(tok):
    task = Task("pose_list", "what moves? ( [MOTION:clips,preprocess=pose_summary] )* -> [TEXT:label]",
                _clip_lists())
    assert len(task.fit_statistics()["pose_summary"]["clips"]["mean"]) == 3 * 6
    sample = task.encode(0, tok, training=False)
    assert [tuple(c.rows.shape) for c in sample.encoder if c.rows is not None] == [(1, 18), (1, 18)]


# ---- slots filled by position learn from the rows too, under "slot N" -----------------------------

_TEXTS = ["the cat sat on the mat", "dogs bark at night", "the cat and the dog", "night falls on the town"] * 3
_RNG = np.random.default_rng(1)
_TABLES = [{"a": float(i), "b": "xy"[i % 2]} for i in range(12)]
_CLIPS = [_RNG.normal(loc=i, scale=1.0, size=(8, 4)) for i in range(12)]  # clip i sits around i


@pytest.mark.parametrize("slot, values, fitted", [
    ("[TEXT{},preprocess=bag_of_words]", _TEXTS, "bag_of_words"),
    ("[MOTION{},preprocess=pose_summary]", _CLIPS, "pose_summary"),
    ("[STRUCT{}]", _TABLES, "struct"),
    ("[MOTION{}]", _CLIPS, MOTION_NORMALISATION),
])
def test_a_slot_filled_by_position_is_fitted_and_encodes_as_by_column(tok, slot, values, fitted):
    by_column = Task("t", f"what is it? {slot.format(':x')} -> [TEXT:y]", [{"x": v, "y": "a"} for v in values])
    by_position = Task("t", f"what is it? {slot.format('')} -> [TEXT]", [(v, "a") for v in values])
    statistics = by_position.fit_statistics()
    expected = by_column.fit_statistics()[fitted]
    assert statistics[fitted] == (expected if fitted == MOTION_NORMALISATION else {"slot 1": expected["x"]})
    for i in (0, 11):
        assert torch.equal(by_position.encode(i, tok, training=False).encoder[1].rows,
                           by_column.encode(i, tok, training=False).encoder[1].rows)


def test_template_names_slots_filled_by_position_by_their_place_in_the_row():
    template = Instruction.parse("what? [TEXT] [IMAGE:img] ( [STRUCT] )* -> [TEXT:y] [BOX]").templates[0]
    assert template.positions() == (None, 0, None, 1, None, 2)
    assert template.slot_names() == (None, "slot 1", "img", "slot 2", "y", "slot 3")


def test_two_motion_slots_filled_by_position_are_normalised_each_by_its_own(tok):
    rows = [(_RNG.normal(0, 1, (6, 3)), _RNG.normal(100, 10, (6, 3)), "a") for _ in range(10)]
    task = Task("two", "[MOTION] then [MOTION] -> [TEXT]", rows)
    per_slot = task.fit_statistics()[MOTION_NORMALISATION]["columns"]
    assert sorted(per_slot) == ["slot 1", "slot 2"]
    assert np.mean(per_slot["slot 2"]["mean"]) == pytest.approx(100, abs=5)
    first, second = (c.rows for c in task.encode(0, tok, training=False).encoder if c.rows is not None)
    assert abs(float(first.mean())) < 1.5 and abs(float(second.mean())) < 1.5  # both around 0


def test_a_model_saved_and_loaded_encodes_slots_filled_by_position_as_in_training(tok, tmp_path):
    rows = [(table, clip, text, "a") for table, clip, text in zip(_TABLES, _CLIPS, _TEXTS)]
    instruction = "[STRUCT] [MOTION] [TEXT,preprocess=bag_of_words] what is it? -> [TEXT]"
    train = Task("positional", instruction, rows)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [train], tok)
    model.save_pretrained(str(tmp_path / "m"))
    loaded = GeneralistModel.from_pretrained(str(tmp_path / "m"))
    saved = loaded.config.preprocessor_statistics["positional"]
    assert {name: sorted(saved[name]) for name in ("struct", "bag_of_words")} == {
        "struct": ["slot 1"], "bag_of_words": ["slot 3"]}
    empty = Task("positional", instruction, [])  # nothing to fit on
    plan = empty.plan(loaded.tokenizer, loaded.encoding_statistics(empty))
    for i in (0, 7):
        reloaded, trained = plan.encode(rows[i], i, training=False), train.encode(i, tok, training=False)
        for got, want in zip(reloaded.encoder, trained.encoder):
            assert (got.rows is None and want.rows is None) or torch.equal(got.rows, want.rows)
