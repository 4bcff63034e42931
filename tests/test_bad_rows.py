"""Bad data rows: every failure names task, column and row (so ``on_error="skip"`` skips just that
row), task-wide statistics and model building survive bad rows, and sample rates and slot sizes
are checked before they cost minutes (issue 13, findings 3, 4, 6, 7 and 9)."""

from __future__ import annotations

import io
import os
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from moe_gen.registry import PREPROCESSORS
from moe_gen.tasks import Task, TaskDataError, Tokenizer
from moe_gen.tasks.modalities.base import Preprocessor, SlotEncoding

IMAGE = np.zeros((8, 8, 3), np.uint8)
CLIP = (0.1 * np.sin(np.arange(7040) / 5)).astype(np.float32)  # 0.44 s at 16 kHz


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side)).save(out, format="PNG")
    return out.getvalue()


# (instruction, the bad row, what the message says after "task 't', column 'x', row 1: ")
BAD_ROWS = {
    "non-UTF-8 bytes as text": ("[TEXT:x] -> [TEXT:y]", {"x": b"\xff\xfe", "y": "a"}, "not UTF-8"),
    "lone surrogate in text": ("[TEXT:x] -> [TEXT:y]", {"x": "a\ud800b", "y": "a"}, "lone surrogate"),
    # the label set is tokenised when the plan is made: one such label once broke every row
    "lone surrogate in a label": ("[TEXT:y] -> [CATEGORY:x]", {"x": "b\udfff", "y": "a"}, "is not in the closed set"),
    "huge int as text": ("[TEXT:x] -> [TEXT:y]", {"x": 10**5000, "y": "a"}, "too many digits"),
    "0-frame video": ("[VIDEO:x] -> [TEXT:y]", {"x": np.zeros((0, 8, 8, 3), np.uint8), "y": "a"}, "no frames"),
    "object video array": ("[VIDEO:x] -> [TEXT:y]", {"x": np.zeros((2, 8, 8, 3), object), "y": "a"},
                           "dtype object"),
    "0x0 image array": ("[IMAGE:x] -> [TEXT:y]", {"x": np.zeros((0, 0, 3), np.uint8), "y": "a"}, "empty"),
    "0x0 PIL image": ("[IMAGE:x] -> [TEXT:y]", {"x": Image.new("RGB", (0, 0)), "y": "a"}, "empty"),
    "object image array": ("[IMAGE:x] -> [TEXT:y]", {"x": np.zeros((4, 4), object), "y": "a"}, "dtype object"),
    "string image array": ("[IMAGE:x] -> [TEXT:y]", {"x": np.zeros((4, 4), "U3"), "y": "a"}, "dtype <U3"),
    "complex image tensor": ("[IMAGE:x] -> [TEXT:y]", {"x": torch.zeros(3, 4, 4, dtype=torch.complex64), "y": "a"},
                              "complex"),
    "box as a string": ("[IMAGE:i] -> [BOX:x]", {"i": IMAGE, "x": "1234"}, "a box must be 4 numbers"),
    "box with a huge int": ("[IMAGE:i] -> [BOX:x]", {"i": IMAGE, "x": [0, 0, 10**400, 1]}, "4 numbers"),
    "non-numeric image width": ("[TEXT:y] -> [BOX:x]", {"x": [0, 0, 1, 1], "y": "a", "width": "abc", "height": 3},
                                "'width' and 'height' must be positive numbers"),
    "huge image width": ("[TEXT:y] -> [BOX:x]", {"x": [0, 0, 1, 1], "y": "a", "width": 10**400, "height": 3},
                         "'width' and 'height' must be positive numbers"),
    "ragged audio list": ("[AUDIO:x] -> [TEXT:y]", {"x": [[0.1, 0.2], [0.1]], "y": "a"}, "list of numbers"),
    "audio list of strings": ("[AUDIO:x] -> [TEXT:y]", {"x": ["a", "b"], "y": "a"}, "list of numbers"),
    "object audio array": ("[AUDIO:x] -> [TEXT:y]", {"x": np.zeros(100, object), "y": "a"}, "dtype object"),
    "sample rate '16k'": ("[AUDIO:x] -> [TEXT:y]", {"x": CLIP, "sample_rate": "16k", "y": "a"}, "sample rate"),
    "negative sample rate": ("[AUDIO:x] -> [TEXT:y]", {"x": CLIP, "sample_rate": -16000, "y": "a"}, "sample rate"),
    "zero sampling_rate": ("[AUDIO:x] -> [TEXT:y]", {"x": {"array": CLIP, "sampling_rate": 0}, "y": "a"},
                           "sample rate"),
    "ragged motion": ("[MOTION:x] -> [TEXT:y]", {"x": [[1.0, 2.0], [3.0]], "y": "a"}, "frames [T, J]"),
    "motion of strings": ("[MOTION:x] -> [TEXT:y]", {"x": [["1", "x"]], "y": "a"}, "frames [T, J]"),
    "motion without features": ("[MOTION:x] -> [TEXT:y]", {"x": np.zeros((3, 0)), "y": "a"}, "frames [T, J]"),
    # fitting the column statistics once failed on it, and with it every row of the task
    "huge int in a table cell": ("[STRUCT:x] -> [TEXT:y]", {"x": {"a": -(10**5000)}, "y": "a"}, "does not fit a float"),
    "0-d array as a table column": ("[STRUCT:x] -> [TEXT:y]", {"x": {"a": np.array(5), "b": [1]}, "y": "a"},
                                    "holds a list of cells"),
}
GOOD = {  # a good row for each modality of column x
    "TEXT": {"x": "fine", "y": "a"}, "CATEGORY": {"x": "a", "y": "a"},
    "VIDEO": {"x": np.zeros((2, 8, 8, 3), np.uint8), "y": "a"}, "IMAGE": {"x": IMAGE, "y": "a"},
    "BOX": {"i": IMAGE, "x": [0, 0, 4, 4], "y": "a", "width": 8, "height": 8},
    "AUDIO": {"x": CLIP, "y": "a"}, "MOTION": {"x": np.ones((4, 2)), "y": "a"}, "STRUCT": {"x": {"a": 1}, "y": "a"},
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_value_is_a_task_data_error_naming_task_column_and_row(case, tok):
    instruction, bad, message = BAD_ROWS[case]
    good = GOOD[re.search(r"\[(\w+):x\]", instruction).group(1)]
    task = Task("t", instruction, [good, bad, good])
    assert task.encode(0, tok) is not None  # one bad row leaves the others alone
    with pytest.raises(TaskDataError, match="task 't', column 'x', row 1: ") as caught:
        task.encode(1, tok)
    assert message in str(caught.value)
    skipping = Task("t", instruction, [good, bad, good], on_error="skip")
    assert len(list(skipping.samples(tok))) == 2 and skipping.skipped == 1


@pytest.mark.parametrize("modality", ["IMAGE", "AUDIO", "VIDEO"])
def test_a_media_path_naming_a_fifo_or_directory_fails_its_row_without_blocking(modality, tok, tmp_path):
    """Rows given in Python (not through ``load_jsonl``, which checks paths itself): opening a FIFO
    would block until something writes to it."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    instruction = f"[{modality}:x] -> [TEXT:y]"
    for path, what in [(fifo, "a FIFO, device or socket"), (tmp_path, "a directory")]:
        task = Task("t", instruction, [{"x": str(path), "y": "a"}])
        with pytest.raises(TaskDataError, match=f"task 't', column 'x', row 0: .*is {what}, not a regular file"):
            task.encode(0, tok)


def test_decompression_bomb_is_a_task_data_error(tok, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 64x64 PNG is then over twice the limit
    task = Task("t", "[IMAGE:x] -> [TEXT:y]", [{"x": _png(64), "y": "a"}])
    with pytest.raises(TaskDataError, match="task 't', column 'x', row 0: the image is too large"):
        task.encode(0, tok)


@PREPROCESSORS.register("test_bad_rows_crash")
class _Crashing(Preprocessor):
    """A preprocessor with a bug: 1/0 on every value."""

    modality = "IMAGE"

    def __call__(self, value, slot, ctx):
        return 1 / 0


@PREPROCESSORS.register("test_bad_rows_nan")
class _NonFinite(Preprocessor):
    """A preprocessor whose features are NaN for the value "nan"."""

    modality = "IMAGE"

    def __call__(self, value, slot, ctx):
        rows = torch.full((2, 3), float("nan") if value == "nan" else 1.0)
        return SlotEncoding("IMAGE", features=rows, positions=torch.zeros(2, 3, dtype=torch.long))

    def feature_dim(self):
        return 3


def test_any_other_preprocessor_error_is_wrapped_with_its_type_and_cause(tok):
    task = Task("t", "[IMAGE:x,preprocess=test_bad_rows_crash] -> [TEXT:y]", [{"x": 1, "y": "a"}])
    with pytest.raises(TaskDataError, match=r"task 't', column 'x', row 0: .*ZeroDivisionError: division by zero") \
            as caught:
        task.encode(0, tok)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


@PREPROCESSORS.register("test_bad_rows_value_error")
class _RaisingValueError(Preprocessor):
    """A preprocessor with a bug that raises a plain ValueError (TaskDataError's base class)."""

    modality = "IMAGE"

    def __call__(self, value, slot, ctx):
        raise ValueError("a bug")


def test_a_plain_value_error_while_encoding_is_wrapped_not_taken_for_a_row_error(tok, monkeypatch):
    """A ValueError is no TaskDataError: it gets the task, column and row like any other exception
    (were TaskDataError ValueError itself, ``except TaskDataError: raise`` passed it on bare)."""
    from moe_gen.tasks.plan import TaskPlan

    task = Task("t", "[IMAGE:x,preprocess=test_bad_rows_value_error] -> [TEXT:y]", [{"x": 1, "y": "a"}])
    with pytest.raises(TaskDataError, match=r"^task 't', column 'x', row 0: the 'test_bad_rows_value_error' "
                                            r"preprocessor failed on .*: ValueError: a bug$") as caught:
        task.encode(0, tok)
    assert type(caught.value.__cause__) is ValueError

    def broken(self, values, index):
        raise ValueError("another bug")

    monkeypatch.setattr(TaskPlan, "_check_groups", broken)
    task = Task("t", "[TEXT:x] -> [TEXT:y]", [{"x": "a", "y": "b"}])
    with pytest.raises(TaskDataError, match=r"^task 't', row 0: encoding failed: ValueError: another bug$") as caught:
        task.encode(0, tok)
    assert type(caught.value.__cause__) is ValueError


def test_a_dataset_row_that_cannot_be_read_is_a_task_data_error(tok):
    class Broken:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            if i == 1:
                raise OSError("corrupt shard")
            return {"x": "a", "y": "b"}

    task = Task("t", "[TEXT:x] -> [TEXT:y]", Broken(), on_error="skip")
    assert len(list(task.samples(tok))) == 1 and task.skipped == 1
    assert "task 't', row 1: cannot read the row (OSError: corrupt shard)" in task.errors[0]


# ---- finding 4: one bad MOTION value must not break every row of its task -------------------------


def test_motion_statistics_skip_bad_rows(tok):
    rows = [{"x": [[1.0, 2.0], [3.0]], "y": "a"}] + [{"x": np.full((4, 2), float(i)), "y": "a"} for i in range(4)]
    rows.append({"x": np.full((4, 2), np.inf), "y": "a"})
    task = Task("m", "[MOTION:x] -> [TEXT:y]", rows, on_error="skip")
    stats = task.motion_statistics()
    np.testing.assert_allclose(stats["mean"], [1.5, 1.5])
    assert len(list(task.samples(tok))) == 4 and task.skipped == 2
    assert "row 0" in task.errors[0] and "row 5" in task.errors[1]


def test_motion_statistics_with_only_bad_rows_say_how_many_were_skipped(tok):
    task = Task("m", "[MOTION:x] -> [TEXT:y]", [{"x": "walk", "y": "a"}, {"x": [[1, 2], [3]], "y": "a"}])
    with pytest.raises(TaskDataError, match=r"task 'm', column 'x': none of the 2 MOTION values in the 2 rows read"):
        task.motion_statistics()
    assert Task("m", "[MOTION:x] -> [TEXT:y]", []).motion_statistics() is None  # no rows: nothing to fit


# ---- finding 6: non-finite features are the row's fault, caught when it is encoded ----------------


def test_non_finite_audio_features_fail_their_row(tok):
    loud = np.random.default_rng(0).standard_normal(1600).astype(np.float32) * 1e20
    task = Task("a", "[AUDIO:x] -> [TEXT:y]", [{"x": CLIP, "y": "a"}, {"x": loud, "y": "b"}], on_error="skip")
    samples = list(task.samples(tok))
    assert len(samples) == 1 and torch.isfinite(samples[0].encoder[0].rows).all()
    assert task.skipped == 1 and "task 'a', column 'x', row 1: " in task.errors[0]
    assert "not finite" in task.errors[0]


def test_non_finite_features_of_any_preprocessor_fail_their_row(tok):
    task = Task("t", "[IMAGE:x,preprocess=test_bad_rows_nan] -> [TEXT:y]",
                [{"x": "ok", "y": "a"}, {"x": "nan", "y": "a"}])
    assert task.encode(0, tok) is not None
    with pytest.raises(TaskDataError, match="task 't', column 'x', row 1: .*non-finite features"):
        task.encode(1, tok)


# ---- finding 7: a bad first row leaves the model its adapters --------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_build_sizes_adapters_from_the_first_rows_that_encode(tok, on_error):
    from moe_gen.model import GeneralistModel, flavour

    motion = Task("m", "[TEXT:y] -> [MOTION:x]", [{"x": "broken", "y": "a"}, {"x": np.ones((4, 3)), "y": "b"}],
                  on_error=on_error)
    audio = Task("a", "[AUDIO:x] -> [TEXT:y]", [{"x": [1, "a"], "y": "a"}, {"x": CLIP, "y": "b"}], on_error=on_error)
    model = GeneralistModel.build(flavour("debug"), [motion, audio], tok)
    assert model.config.adapters == {"motion_tgt": 6, "audio_conv": 320}
    assert list(model.frame_heads) == ["motion_tgt"]
    assert motion.skipped == audio.skipped == 0  # building does not count as skipping


def test_build_names_a_task_none_of_whose_first_rows_encode(tok):
    from moe_gen.model import GeneralistModel, flavour

    task = Task("a", "[AUDIO:x] -> [TEXT:y]", [{"x": "no", "y": "a"}] * 3)
    with pytest.raises(TaskDataError, match=r"task 'a': none of its first 3 rows encode.*row 0: "):
        GeneralistModel.build(flavour("debug"), [task], tok)


# ---- finding 9: sample rates are checked, and a slot's positions are capped ------------------------


@pytest.mark.parametrize("rate", [1, 0, -16000, 0.5, 1e9, float("nan"), True, "16000", [16000]])
def test_sample_rates_out_of_range_or_not_numbers_are_refused_at_once(tok, rate):
    task = Task("a", "[AUDIO:x] -> [TEXT:y]", [{"x": CLIP, "sample_rate": rate, "y": "a"}])
    start = time.perf_counter()
    with pytest.raises(TaskDataError, match="task 'a', column 'x', row 0: .*sample rate"):
        task.encode(0, tok)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("rate", [8000, 11025, 16001, 44101, 22050.0, np.int64(48000)])
def test_any_sample_rate_in_range_resamples_quickly_to_the_right_length(tok, rate):
    task = Task("a", "[AUDIO:x] -> [TEXT:y]", [{"x": CLIP, "sample_rate": rate, "y": "a"}])
    start = time.perf_counter()
    sample = task.encode(0, tok, training=False)
    assert time.perf_counter() - start < 2
    seconds = len(CLIP) / float(rate)
    assert sample.encoder[0].rows.shape[0] == pytest.approx(seconds * 100 / 4, abs=2)


def test_positions_per_slot_are_capped_with_a_clear_error(tok):
    long_text = " ".join(["word"] * 5000)
    task = Task("t", "[TEXT:x] -> [TEXT:y]", [{"x": long_text, "y": "a"}, {"x": "short", "y": "a"}])
    with pytest.raises(TaskDataError, match=r"task 't', column 'x', row 0: .* positions, over the cap of 4096"):
        task.encode(0, tok)
    assert Task("t", "[TEXT:x,max_length=100] -> [TEXT:y]", [{"x": long_text, "y": "a"}]).encode(0, tok)
    small = Task("t", "[TEXT:x] -> [TEXT:y]", [{"x": "one two three four", "y": "a"}], max_slot_positions=2)
    with pytest.raises(TaskDataError, match="over the cap of 2 positions"):
        small.encode(0, tok)
    with pytest.raises(ValueError, match="max_slot_positions"):
        Task("t", "[TEXT:x] -> [TEXT:y]", [], max_slot_positions=0)


def test_a_long_clip_is_refused_before_it_is_resampled(tok):
    task = Task("a", "[AUDIO:x] -> [TEXT:y]", [{"x": CLIP, "sample_rate": 1000, "y": "a"}], max_slot_positions=64)
    start = time.perf_counter()
    with pytest.raises(TaskDataError, match=r"task 'a', column 'x', row 0: the clip is 7.04 s long"):
        task.encode(0, tok)
    assert time.perf_counter() - start < 1


def test_a_value_of_exactly_the_cap_is_kept_and_one_position_more_fails(tok):
    """``max_slot_positions`` is the most positions a slot may take: a value of exactly that many
    encodes, the cap one lower fails the row naming the count."""
    row = {"x": "one two three four", "y": "a"}
    n = len(Task("t", "[TEXT:x] -> [TEXT:y]", [row]).encode(0, tok).encoder[0])
    assert n > 1
    assert len(Task("t", "[TEXT:x] -> [TEXT:y]", [row], max_slot_positions=n).encode(0, tok).encoder[0]) == n
    with pytest.raises(TaskDataError, match=f"the value takes {n} positions, over the cap of {n - 1} positions"):
        Task("t", "[TEXT:x] -> [TEXT:y]", [row], max_slot_positions=n - 1).encode(0, tok)


@pytest.mark.parametrize("cap", [0, -1, True, 2.0])
def test_a_task_plan_built_directly_refuses_a_cap_that_is_not_a_positive_int(tok, cap):
    from moe_gen.tasks import TaskPlan

    with pytest.raises(ValueError, match=f"max_slot_positions must be a positive int, got {cap!r}"):
        TaskPlan("t", "[TEXT:x] -> [TEXT:y]", tok, max_slot_positions=cap)


def test_any_other_error_while_encoding_a_row_names_task_and_row(tok, monkeypatch):
    from moe_gen.tasks.plan import TaskPlan

    def broken(self, values, index):
        raise KeyError("a bug")

    monkeypatch.setattr(TaskPlan, "_check_groups", broken)
    task = Task("t", "[TEXT:x] -> [TEXT:y]", [{"x": "a", "y": "b"}])
    with pytest.raises(TaskDataError, match=r"task 't', row 0: encoding failed: KeyError: 'a bug'") as caught:
        task.encode(0, tok)
    assert isinstance(caught.value.__cause__, KeyError)


def test_a_clip_wider_than_the_motion_statistics_fails_its_row(tok):
    task = Task("m", "[MOTION:x] -> [TEXT:y]", [{"x": np.ones((4, 2)), "y": "a"}, {"x": np.ones((4, 3)), "y": "a"}],
                preprocessor_options={"motion": {"mean": np.zeros(2), "std": np.ones(2)}})
    assert task.encode(0, tok) is not None
    with pytest.raises(TaskDataError, match="task 'm', column 'x', row 1: the clip has 3 features a frame, the "
                                            "task's motion statistics 2"):
        task.encode(1, tok)


def test_one_clip_of_another_width_neither_unfits_nor_bypasses_the_motion_statistics(tok):
    """One clip of another width switched the task-wide normalisation off (every clip then normalised
    by its own mean, which erased what told the classes apart) and was itself encoded; motion options
    such as frames_per_row switched it off too."""
    rows = [{"x": np.full((6, 2), -1.0 if i % 2 else 1.0) + 0.1 * i, "y": "ab"[i % 2]} for i in range(8)]
    odd = rows + [{"x": np.ones((6, 4)), "y": "a"}]
    clean = Task("m", "[MOTION:x] -> [TEXT:y]", rows).motion_statistics()
    np.testing.assert_allclose(Task("m", "[MOTION:x] -> [TEXT:y]", odd).motion_statistics()["mean"], clean["mean"])
    task = Task("m", "[MOTION:x] -> [TEXT:y]", odd)
    with pytest.raises(TaskDataError, match="row 8: the clip has 4 features a frame, the task's motion statistics 2"):
        task.encode(8, tok)
    plain = task.encode(0, tok, training=False).encoder[0].rows
    optioned = Task("m", "[MOTION:x] -> [TEXT:y]", rows, preprocessor_options={"motion": {"frames_per_row": 2}})
    torch.testing.assert_close(optioned.encode(0, tok, training=False).encoder[0].rows, plain)
    assert abs(float(plain.mean())) > 0.5  # a class's offset survives normalisation


def test_missing_labels_are_no_class_and_numpy_labels_are_their_numbers(tok):
    """None and NaN labels became the classes "None" and "nan" (NaN rows trained as one); numpy
    ints and booleans joined the label set, then every row was refused ("needs text, got int64")."""
    rows = [{"x": "a", "y": "pos"}, {"x": "b", "y": None}, {"x": "c", "y": float("nan")},
            {"x": "d", "y": np.float32("nan")}, {"x": "e", "y": "neg"}]
    task = Task("labels", "[TEXT:x] -> [TEXT:y,closed_set]", rows, on_error="skip")
    assert task.closed_sets() == {"y": ["neg", "pos"]}
    assert len(list(task.samples(tok))) == 2 and task.skipped == 3
    assert all("missing value" in error for error in task.errors)
    for values, labels in (([np.int64(0), np.int64(2)], ["0", "2"]), ([True, np.bool_(False)], ["False", "True"])):
        task = Task("numbers", "[TEXT:x] -> [TEXT:y,closed_set]", [{"x": "a", "y": v} for v in values])
        assert task.closed_sets() == {"y": labels}
        decoded = [tok.decode(next(c.tokens for c in task.encode(i, tok).decoder if c.column == "y"))
                   for i in range(2)]
        assert decoded == [str(v) for v in values]


def test_data_given_as_columns_is_read_as_rows(tok):
    """A dict of column lists (``Dataset.to_dict()``'s shape) was taken as rows: len(task) counted
    its columns and every row failed with a misleading message."""
    columns = {"x": ["a b", "c d", "e f"], "y": np.array(["p", "q", "p"])}
    task = Task("cols", "[TEXT:x] -> [TEXT:y,closed_set]", columns)
    assert len(task) == 3 and task.data[1] == {"x": "c d", "y": "q"}
    assert task.closed_sets() == {"y": ["p", "q"]} and len(list(task.samples(tok))) == 3
    with pytest.raises(ValueError, match=r"task 'bad': data given as a dict must map each column to a list"):
        Task("bad", "[TEXT:x] -> [TEXT:y]", {"x": ["a", "b"], "y": ["p"]})


# ---- mutation-testing audit (r17): the helpers that name and read raw values ------------------------------


def test_brief_cuts_long_reprs_to_the_limit_with_an_ellipsis():
    from moe_gen.tasks.modalities.base import brief

    assert brief("x" * 58) == repr("x" * 58)  # 60 characters: kept whole
    cut = brief("x" * 59)
    assert len(cut) == 60 and cut == repr("x" * 59)[:57] + "..."
    assert brief(list(range(100)), limit=10) == "[0, 1, ..."


def test_label_text_decodes_utf8_bytes_and_refuses_other_bytes():
    from moe_gen.tasks.modalities.base import label_text

    assert label_text(b"caf\xc3\xa9") == label_text(bytearray(b"caf\xc3\xa9")) == "café"
    assert label_text(b"\xff") is None
    assert label_text(np.int64(3)) == "3" and label_text(None) is None and label_text([1]) is None


def test_tensor_to_numpy_keeps_the_float_types_numpy_has():
    """float16, float32 and float64 stay as they are; bfloat16, which numpy lacks, becomes float32."""
    from moe_gen.tasks.modalities.base import tensor_to_numpy

    for dtype, expected in ((torch.float16, np.float16), (torch.float32, np.float32), (torch.float64, np.float64),
                            (torch.bfloat16, np.float32), (torch.int64, np.int64)):
        array = tensor_to_numpy(torch.tensor([1.5, -2.0]).to(dtype))
        assert array.dtype == expected, dtype
        assert array.tolist() == ([1, -2] if dtype == torch.int64 else [1.5, -2.0]), dtype
