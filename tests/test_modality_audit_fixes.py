"""Defects an audit of the non-image modalities found (2026-12-05, eighth session), each pinned:
audio reading and augmentation, MOTION and pose-summary statistics, STRUCT numbers and
attributes, video frame counts, phones, and boxes beside several images."""

from __future__ import annotations

import io
import struct
import uuid
import wave

import numpy as np
import pytest
import torch

from moe_gen.tasks import Task, TaskDataError, Tokenizer
from moe_gen.tasks.modalities.box import quantize_box
from moe_gen.tasks.modalities.signals import read_waveform
from moe_gen.tasks.modalities.text_like import to_phones


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


TONE = (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32)  # 1 s at 16 kHz: 25 rows of 4 fbank frames


def _riff(fmt: bytes, data: bytes) -> bytes:
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def _audio_rows(tok, value, **row):
    task = Task("asr", "[AUDIO:wav] -> [TEXT:text]", [{"wav": value, "text": "a", **row}])
    return task.encode(0, tok, training=False).encoder[0].rows


# ---- audio ------------------------------------------------------------------------------------------


def test_speed_perturbation_never_takes_a_clip_past_the_cap_that_evaluation_meets(tok):
    # a clip exactly at the cap: x0.9 used to make it ~11% longer after the check, failing rows at random
    task = Task("asr", "[AUDIO:wav] -> [TEXT:text]", [{"wav": TONE, "text": "a"}], max_slot_positions=25)
    assert task.encode(0, tok, training=False).encoder[0].rows.shape[0] == 25
    for seed in range(12):
        assert task.encode(0, tok, seed=seed, training=True).encoder[0].rows.shape[0] <= 25


def test_a_dict_waveform_without_its_own_rate_takes_the_rows_rate(tok):
    half = TONE[:8000]  # 1 s at 8 kHz
    expected = _audio_rows(tok, half, sample_rate=8000)
    torch.testing.assert_close(_audio_rows(tok, {"array": half}, sample_rate=8000), expected)
    assert expected.shape[0] == 25


def test_wav_files_of_24_bits_floats_and_the_extensible_header_are_read(tok):
    reference = read_waveform(TONE)[0]
    pcm24 = b"".join(int(v * 8388607).to_bytes(4, "little", signed=True)[:3] for v in TONE)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(3)
        f.setframerate(16000)
        f.writeframes(pcm24)
    floats = _riff(struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32), TONE.tobytes())
    subtype = uuid.UUID("00000001-0000-0010-8000-00aa00389b71").bytes_le  # PCM
    four = np.repeat((TONE * 32767).astype("<i2")[:, None], 4, axis=1).tobytes()
    extensible = _riff(struct.pack("<HHIIHHHHI", 0xFFFE, 4, 16000, 128000, 8, 16, 22, 16, 0x33) + subtype, four)
    for data, atol in ((buffer.getvalue(), 1e-6), (floats, 0.0), (extensible, 1e-4)):
        wav, rate = read_waveform(data)
        assert rate == 16000
        torch.testing.assert_close(wav, reference, atol=atol, rtol=0)


def test_integer_pcm_is_scaled_by_its_type_and_a_list_of_whole_numbers_is_refused(tok):
    int16 = np.round(TONE * 32768).astype(np.int16)
    torch.testing.assert_close(read_waveform(int16)[0], read_waveform(TONE)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(read_waveform(np.uint8([0, 128, 255]))[0], torch.tensor([-1.0, 0.0, 127 / 128]))
    with pytest.raises(TaskDataError, match=r"row 0: the waveform list holds whole numbers up to 9830.*numpy "
                                            r"integer array"):
        _audio_rows(tok, int16.tolist())
    _audio_rows(tok, [0.0, 1.0, -1.0] * 400)  # floats in [-1, 1] that happen to be whole: read as they are


def test_a_64_bit_integer_waveform_is_read_as_a_list_is(tok):
    # np.array of Python ints is int64: no PCM format has 64-bit samples, so int16-scale samples held in
    # it were scaled by 2^63 into silence; they are refused as a list of whole numbers is
    int16 = np.round(TONE * 32768).astype(np.int16)
    for dtype in (np.int64, np.uint64):
        with pytest.raises(TaskDataError, match=rf"row 0: the waveform {np.dtype(dtype)} array holds whole numbers "
                                                r"up to \d+: integer PCM samples"):
            _audio_rows(tok, np.abs(int16).astype(dtype) if dtype == np.uint64 else int16.astype(dtype))
    whole = np.array([0, 1, -1] * 400)  # whole numbers within [-1, 1]: read as floats, as a list of them is
    torch.testing.assert_close(read_waveform(whole)[0], read_waveform([0.0, 1.0, -1.0] * 400)[0])
    int32 = int16.astype(np.int32) << 16  # 32-bit PCM is still scaled by its type's range
    torch.testing.assert_close(read_waveform(int32)[0], read_waveform(TONE)[0], atol=1e-4, rtol=0)


def test_frames_per_row_and_video_frames_must_be_usable_counts(tok):
    for instruction, options, message in [
        ("[AUDIO:x] -> [TEXT:y]", {"audio_fbank": {"frames_per_row": 0}}, "frames_per_row must be a whole number"),
        ("[MOTION:x] -> [TEXT:y]", {"motion": {"frames_per_row": 0}}, "frames_per_row must be a whole number"),
        ("[VIDEO:x] -> [TEXT:y]", {"video": {"frames": 65}}, "frames must be a whole number from 1 to 64"),
        ("[VIDEO:x] -> [TEXT:y]", {"video": {"frames": 0}}, "frames must be a whole number from 1 to 64"),
    ]:
        with pytest.raises(ValueError, match=message):
            Task("t", instruction, [], preprocessor_options=options).plan(tok)
    for size, patch in ((20, 8), (33, 8)):  # the grid would silently drop the pixels past the last patch
        with pytest.raises(ValueError, match=f"video size {size} must be a multiple of the patch size {patch}"):
            options = {"video": {"size": size, "patch": patch}}
            Task("t", "[VIDEO:x] -> [TEXT:y]", [], preprocessor_options=options).plan(tok)


# ---- motion -----------------------------------------------------------------------------------------


def _clip(rng, constant, width=3):
    frames = rng.normal(size=(8, width)).astype(np.float32)
    frames[:, -1] = constant
    return frames


@pytest.mark.parametrize("preprocess", ["motion", "pose_summary"])
def test_a_feature_constant_in_training_stays_bounded_on_a_held_out_clip(tok, preprocess):
    rng = np.random.default_rng(0)
    instruction = f"[MOTION:m,preprocess={preprocess}] what? -> [TEXT:label,closed_set]"
    train = Task("mo", instruction, [{"m": _clip(rng, 0.0), "label": "a"} for _ in range(6)])
    held_out = Task("mo", instruction, [{"m": _clip(rng, 0.1), "label": "a"}])
    rows = held_out.encode(0, tok, training=False, statistics=train.fit_statistics()).encoder[0].rows
    assert float(rows.abs().max()) < 10  # was 1e4 (motion) and 1e5 (pose_summary): 0.1 divided by ~0


def test_each_motion_column_is_normalised_by_its_own_statistics(tok):
    rng = np.random.default_rng(0)
    rows = [{"big": (1000 * rng.normal(size=(6, 3))).astype(np.float32),
             "small": rng.normal(size=(6, 3)).astype(np.float32), "label": "a"} for _ in range(4)]
    task = Task("two", "[MOTION:big] [MOTION:small] what? -> [TEXT:label,closed_set]", rows)
    saved = task.fit_statistics()["motion_normalisation"]
    assert set(saved["columns"]) == {"big", "small"}
    frames = torch.cat([task.encode(i, tok, training=False).encoder[1].rows.reshape(-1, 3) for i in range(4)])
    assert frames.std(0).min() > 0.5  # the small column was read in the big one's units: std ~0.002
    # one MOTION column keeps the saved format it always had
    one = Task("one", "[MOTION:small] what? -> [TEXT:label,closed_set]", rows).fit_statistics()
    assert set(one["motion_normalisation"]) == {"mean", "std"}


def test_pose_summary_statistics_take_the_most_common_width(tok):
    rng = np.random.default_rng(0)
    rows = [{"m": rng.normal(size=(6, 4 if i == 0 else 6)).astype(np.float32), "label": "a"} for i in range(10)]
    task = Task("ps", "[MOTION:m,preprocess=pose_summary] what? -> [TEXT:label,closed_set]", rows, on_error="skip")
    encoded = [task.encode(i, tok, training=False) for i in range(10)]
    assert sum(e is not None for e in encoded) == 9 and encoded[0] is None  # the odd first clip only


# ---- tables -----------------------------------------------------------------------------------------

TABLE = "[STRUCT:t] which? -> [TEXT:label,closed_set]"


def _z(tok, train_tables, test_tables):
    train = Task("tb", TABLE, [{"t": t, "label": "a"} for t in train_tables])
    test = Task("tb", TABLE, [{"t": t, "label": "a"} for t in test_tables])
    statistics = train.fit_statistics()
    return [test.encode(i, tok, training=False, statistics=statistics).encoder[0].rows[:, 1].tolist()
            for i in range(len(test_tables))], statistics["struct"]["t"]


def test_numbers_without_statistics_keep_their_order_above_22025(tok):
    z, _ = _z(tok, [{"p": "n/a"}, {"p": "n/a"}], [{"p": v} for v in (3e4, 1e6, 1e9)])
    values = [row[0] for row in z]
    assert values == sorted(values) and len(set(values)) == 3  # all 10.0 when clipped


@pytest.mark.parametrize("values", [(1e-13, 2e-13, 3e-13, 4e-13), (1e160, 2e160, 3e160), (1e308, 1.5e308, 0.0)])
def test_column_statistics_hold_at_tiny_and_huge_magnitudes(tok, values):
    tables = [{"x": v} for v in values]
    z, statistics = _z(tok, tables, tables)
    z = np.array([row[0] for row in z])
    assert np.isfinite(statistics["std"]["x"]) and np.isfinite(statistics["mean"]["x"])
    unit = np.array(values) / max(values)  # the z-scores do not depend on the unit
    np.testing.assert_allclose(z, (unit - unit.mean()) / unit.std(), rtol=1e-5, atol=1e-6)


# ---- phones and boxes -------------------------------------------------------------------------------


def test_quotes_are_not_part_of_a_word_and_a_text_without_one_is_refused(tok):
    assert to_phones("say 'cat'") == to_phones("say cat") == ["S", "EY", "|", "K", "AE", "T"]
    assert to_phones("don't") == ["D", "OW", "N", "T"]
    task = Task("p", "[PHONE:t] -> [TEXT:y]", [{"t": "'", "y": "a"}])
    with pytest.raises(TaskDataError, match="row 0: \"'\" has no letter or digit to speak"):
        task.encode(0, tok)


def test_a_box_beside_images_of_different_sizes_is_refused(tok):
    row = {"a": np.zeros((100, 100, 3), np.uint8), "b": np.zeros((400, 400, 3), np.uint8), "box": [200, 200, 400, 400]}
    task = Task("g", "[IMAGE:a] [IMAGE:b] where in the second image? -> [BOX:box]", [row])
    with pytest.raises(TaskDataError, match=r"column 'box', row 0: the sample's images differ in size \('a' 100x100, "
                                            r"'b' 400x400\)"):
        task.encode(0, tok)
    same = Task("g", "[IMAGE:a] [IMAGE:b] where? -> [BOX:box]", [{**row, "b": row["a"], "box": [0, 0, 50, 50]}])
    assert same.encode(0, tok) is not None  # images of one size: the box's pixels are unambiguous


# ---- video ------------------------------------------------------------------------------------------


def test_a_video_file_is_resized_as_it_is_decoded_with_the_same_features(tok, tmp_path):
    # frames are reduced to the preprocessor's size while decoding (a long HD file no longer sits in
    # memory whole): the features equal those of the fully decoded frames given as an array
    import av

    rng = np.random.default_rng(0)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for _ in range(9):
            frame = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        full = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    task = Task("vid", "[VIDEO:v] -> [TEXT:t]", [{"v": str(path), "t": "x"}, {"v": full, "t": "x"}])
    from_file, from_array = (task.encode(i, tok, training=False).encoder[0] for i in (0, 1))
    assert torch.equal(from_file.rows, from_array.rows) and from_file.rows.shape == (4 * 16, 192)
    from moe_gen.tasks.modalities.visual import load_video_frames

    assert load_video_frames(str(path), size=32).shape == (9, 32, 32, 3)  # what is held while decoding


# ---- found by the thirteenth session's audit (2026-12-06) -------------------------------------------


def test_a_box_finds_its_image_in_slots_filled_by_position(tok):
    """Slots without a column were not recorded for the BOX: every row was refused as if the
    instruction had no IMAGE slot."""
    image, box = np.zeros((48, 64, 3), np.uint8), [8, 4, 40, 36]
    by_column = Task("g", "[IMAGE:img] where is it? -> [BOX:box]", [{"img": image, "box": box}])
    by_position = Task("g", "[IMAGE] where is it? -> [BOX]", [(image, box)])
    expected = by_column.encode(0, tok, training=False)
    got = by_position.encode(0, tok, training=False)
    assert got.decoder[0].tokens == expected.decoder[0].tokens
    assert got.meta["image_size"] == expected.meta["image_size"] == (64, 48)


def test_a_repeated_group_of_images_of_different_sizes_is_refused_for_its_boxes(tok):
    """Every box of `( [IMAGE] [BOX] )*` was measured against the first item's image: a later box on
    a larger image became 'the whole image', silently."""
    small, large = np.zeros((20, 30, 3), np.uint8), np.zeros((40, 60, 3), np.uint8)
    ins = "( [IMAGE:crops] [BOX:boxes] )* what are these? -> [TEXT:y]"
    task = Task("t", ins, [{"crops": [small, large], "boxes": [[0, 0, 30, 20], [0, 0, 30, 20]], "y": "a"}])
    with pytest.raises(TaskDataError, match=r"row 0: the sample's images differ in size \('crops'\[0\] 30x20, "
                                            r"'crops'\[1\] 60x40\)"):
        task.encode(0, tok, training=False)
    alike = Task("t", ins, [{"crops": [large, large], "boxes": [[0, 0, 30, 20], [0, 0, 60, 40]], "y": "a"}])
    boxes = [c for c in alike.encode(0, tok, training=False).encoder if c.modality == "BOX"]
    assert [tok.bin_index(t) for t in boxes[0].tokens] == quantize_box([0, 0, 30, 20], 60, 40, tok.num_bins)
    assert [tok.bin_index(t) for t in boxes[1].tokens] == quantize_box([0, 0, 60, 40], 60, 40, tok.num_bins)


@pytest.mark.parametrize("top", [1.0, 1.001, 1.2, 1.5])
def test_a_float_image_that_overshoots_one_is_read_as_a_unit_image(tok, top):
    """A [0, 1] image a bicubic resize took to 1.001 was read as [0, 255] pixels: all black."""
    ramp = np.linspace(0.0, top, 64 * 64, dtype=np.float32).reshape(64, 64, 1).repeat(3, axis=2)
    clipped = np.clip(ramp, 0.0, 1.0)
    task = Task("c", "[IMAGE:img] what is it? -> [TEXT:y]", [{"img": ramp, "y": "a"}, {"img": clipped, "y": "a"}])
    features = [task.encode(i, tok, training=False).encoder[0].rows for i in (0, 1)]
    torch.testing.assert_close(features[0], features[1])
    brighter = Task("c", "[IMAGE:img] what is it? -> [TEXT:y]", [{"img": ramp * 100, "y": "a"}])
    assert not torch.allclose(brighter.encode(0, tok, training=False).encoder[0].rows, features[1])


def test_decimal_cells_are_numbers(tok):
    """SQL NUMERIC columns arrive as ``decimal.Decimal``: refused as 'not a number' before."""
    from decimal import Decimal

    from moe_gen.tasks.modalities.table import MISSING, NUMERIC, read_cell

    assert read_cell(Decimal("2.50")) == (NUMERIC, 2.5)
    assert read_cell(Decimal("NaN"))[0] == read_cell(Decimal("sNaN"))[0] == MISSING
    with pytest.raises(Exception, match="numbers must be finite"):
        read_cell(Decimal("Infinity"))
    rows = [{"t": {"price": Decimal(str(v))}, "y": "a"} for v in (1, 2, 3)]
    floats = [{"t": {"price": float(v)}, "y": "a"} for v in (1, 2, 3)]
    a, b = (Task("t", "[STRUCT:t] which? -> [TEXT:y]", r) for r in (rows, floats))
    assert a.fit_statistics() == b.fit_statistics()
    torch.testing.assert_close(a.encode(1, tok, training=False).encoder[0].rows,
                               b.encode(1, tok, training=False).encoder[0].rows)


def test_a_box_target_beside_images_of_different_sizes_is_refused_at_inference_too(tok):
    """Inference encodes no target, so the size check never ran: the box was decoded onto the first
    image's size, whichever came first."""
    square = lambda n: np.zeros((n, n, 3), np.uint8)  # noqa: E731
    rows = [{"a": square(32), "b": square(32), "box": [1, 2, 10, 12]}]
    plan = Task("two", "[IMAGE:a] [IMAGE:b] where? -> [BOX:box]", rows).plan(tok)
    alike = plan.encode({"a": square(32), "b": square(32)}, 0, training=False, inference=True)
    assert alike.meta["image_size"] == (32, 32)
    for row in ({"a": square(32), "b": square(64)}, {"a": square(64), "b": square(32)}):
        with pytest.raises(TaskDataError, match=r"column 'box', row 0: the sample's images differ in size"):
            plan.encode(row, 0, training=False, inference=True)


@pytest.mark.parametrize("pixels, dtype, expected", [
    ([[0, 1], [1, 0]], "int64", [[0, 255], [255, 0]]),  # a 0/1 mask: scaled by 255
    ([[0, 500], [1000, 250]], "int32", [[0, 127], [255, 63]]),  # past 255 (16-bit): by 255 over the maximum
    ([[0, 100], [255, 7]], "int64", [[0, 100], [255, 7]]),  # within [0, 255]: as they are
])
def test_integer_pixels_are_scaled_by_their_range(pixels, dtype, expected):
    from moe_gen.tasks.modalities.visual import load_image

    image = load_image(np.asarray(pixels, dtype=dtype))
    assert np.asarray(image)[..., 0].tolist() == expected


# ---- mutation-testing audit (r17): phone length limit, image sizes of BOX rows -----------------------------


def test_phones_read_by_a_text_slot_keep_its_max_length(tok):
    """``[TEXT:t,preprocess=phone,max_length=3]``: the first 3 phone tokens of the whole sequence."""
    rows = [{"t": "the cat sat", "y": "a"}]
    whole = Task("p", "[PHONE:t] -> [TEXT:y]", rows).encode(0, tok).encoder[0].tokens
    assert len(whole) == 10  # DH AH | K AE T | S AE T
    cut = Task("p", "[TEXT:t,preprocess=phone,max_length=3] -> [TEXT:y]", rows).encode(0, tok).encoder[0].tokens
    assert cut == whole[:3] == [tok.symbol_id(f"<ph_{p}>") for p in ("DH", "AH", "|")]


@pytest.mark.parametrize("width", [0, -1, float("inf"), float("nan"), "wide"])
def test_a_box_row_needs_a_positive_finite_image_size(tok, width):
    """An image width of 0 or infinity is no size to measure pixel coordinates against (with infinity
    every coordinate fell into bin 0)."""
    task = Task("b", "[TEXT:q] -> [BOX:box]", [{"q": "where", "box": [0, 0, 5, 5], "width": width, "height": 10}])
    with pytest.raises(TaskDataError, match=r"the row's 'width' and 'height' must be positive numbers \(the image "
                                            r"size in pixels\)"):
        task.encode(0, tok)
    fine = Task("b", "[TEXT:q] -> [BOX:box]", [{"q": "where", "box": [0, 0, 5, 5], "width": 10, "height": 10}])
    assert fine.encode(0, tok).decoder[0].tokens == [tok.bin_id(b) for b in (0, 0, 500, 500)]
