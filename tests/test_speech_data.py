"""The committed speech sets: fields, audio ranges, the speaker split, no pickles, exact decoding."""

from __future__ import annotations

import importlib.util
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from moe_gen.tasks.sources import speech
from moe_gen.tasks.sources.speech import (
    SAMPLE_RATE,
    WORDS,
    load_real_clips,
    load_spoken_words,
    speaker_split,
)

FIELDS = {"audio", "sample_rate", "text", "speaker", "engine", "synthetic", "id"}
REPO = Path(__file__).resolve().parents[1]


def _check_row(row: dict, min_s: float, max_s: float) -> None:
    assert set(row) == FIELDS
    audio = row["audio"]
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.ndim == 1
    assert row["sample_rate"] == SAMPLE_RATE
    assert min_s * SAMPLE_RATE <= len(audio) <= max_s * SAMPLE_RATE, (row["id"], len(audio))
    assert -1.0 <= audio.min() and audio.max() < 1.0
    # Peak-normalised to about -1 dBFS by the generator; RMS well above a silence floor.
    assert 0.85 < np.abs(audio).max() < 0.9, row["id"]
    assert np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > 0.05, row["id"]


def test_spoken_words_rows_have_documented_fields():
    rows = load_spoken_words("all")
    assert len(rows) == 21 * len(WORDS) == 378
    for row in rows:
        _check_row(row, min_s=0.1, max_s=1.5)
        assert row["text"] in WORDS
        assert row["engine"] in ("flite", "espeak-ng") and row["synthetic"] is True
        assert row["speaker"].startswith("flite-" if row["engine"] == "flite" else "espeak-")
        assert row["id"] == f"{row['speaker']}/{row['text']}"
    assert len({row["id"] for row in rows}) == len(rows)
    # Every speaker says every word exactly once.
    by_speaker: dict[str, list[str]] = {}
    for row in rows:
        by_speaker.setdefault(row["speaker"], []).append(row["text"])
    assert len(by_speaker) == 21
    assert all(sorted(said) == sorted(WORDS) for said in by_speaker.values())


def test_split_is_by_speaker_disjoint_and_deterministic():
    train, test = load_spoken_words("train"), load_spoken_words("test")
    assert (len(train), len(test)) == (306, 72)
    train_speakers, test_speakers = {r["speaker"] for r in train}, {r["speaker"] for r in test}
    assert not train_speakers & test_speakers
    assert test_speakers == {"flite-rms", "flite-awb", "espeak-en-rp-m1", "espeak-en-caribbean-f2-fast"}
    for split, rows in (("train", train), ("test", test)):
        assert {r["text"] for r in rows} == set(WORDS), split
        assert {r["engine"] for r in rows} == {"flite", "espeak-ng"}, split
        assert all(speaker_split(r["speaker"]) == split for r in rows)
        # The documented rule, restated here so that a change to speaker_split is caught.
        assert all((zlib.crc32(r["speaker"].encode()) % 4 == 1) == (split == "test") for r in rows)
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in load_spoken_words("all"))
    again = load_spoken_words("test")
    assert [r["id"] for r in again] == [r["id"] for r in test]
    assert all(np.array_equal(a["audio"], b["audio"]) for a, b in zip(again, test))


def test_rows_are_copies_and_filters_work():
    rows = load_spoken_words("train", words=["seven", "go"])
    assert {r["text"] for r in rows} == {"seven", "go"} and len(rows) == 2 * 17
    rows[0]["audio"][:] = 0.0  # must not leak into the cached data
    assert np.abs(load_spoken_words("train", words=["seven", "go"])[0]["audio"]).max() > 0.5
    with pytest.raises(ValueError, match="known splits"):
        load_spoken_words("dev")
    with pytest.raises(ValueError, match="known words"):
        load_spoken_words("train", words=["eleven"])


def test_audio_is_speech_like():
    # Thresholds sit well between this data (level range >= 42 dB, speech-band share >= 0.83) and
    # white noise given the same trimming and fades (2 dB, 0.61).
    for row in load_spoken_words("all") + load_real_clips():
        x = row["audio"].astype(np.float64)
        # Speech is loud and quiet by turns: 10 ms frame energies span tens of dB.
        frames = x[: len(x) // 160 * 160].reshape(-1, 160)
        level_db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
        assert level_db.max() - level_db.min() > 25, row["id"]
        # Most energy lies in the speech band, not at DC or near Nyquist.
        power = np.abs(np.fft.rfft(x)) ** 2
        freq = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
        assert power[(freq > 80) & (freq < 5000)].sum() > 0.75 * power.sum(), row["id"]
    # Different words from one speaker differ in their spectra.
    rows = load_spoken_words("all", words=["one", "two", "six", "yes"])
    for speaker in {r["speaker"] for r in rows}:
        clips = [r["audio"] for r in rows if r["speaker"] == speaker]
        spectra = [np.log(np.abs(np.fft.rfft(c, n=8192))[:2048] + 1e-3) for c in clips]
        for i in range(len(clips)):
            for j in range(i + 1, len(clips)):
                assert np.mean(np.abs(spectra[i] - spectra[j])) > 0.1, (speaker, i, j)


def test_real_clips():
    rows = load_real_clips()
    assert [r["text"] for r in rows] == [
        f"{side} {where}" for side in ("front", "rear", "side") for where in ("center", "left", "right")
        if (side, where) != ("side", "center")
    ]  # fmt: skip
    for row in rows:
        _check_row(row, min_s=0.8, max_s=2.0)
        assert row["speaker"] == "alsa-utils" and row["engine"] == "recorded" and row["synthetic"] is False


@pytest.mark.parametrize("name", ["speech_words.npz", "speech_alsa.npz"])
def test_files_load_without_pickle(name: str):
    path = REPO / "moe_gen" / "tasks" / "data" / name
    assert path.stat().st_size < 4_000_000
    with np.load(path, allow_pickle=False) as z:
        assert all(z[key].dtype != object for key in z.files)


def test_encoder_and_decoder_round_trip_exactly(tmp_path, monkeypatch):
    # The generator's writer and the loader's reader agree sample for sample, including steps that
    # overflow int16 (from -32768 to 32767), which the delta coding must wrap and unwrap.
    script = REPO / "scripts" / "make_speech_data.py"
    spec = importlib.util.spec_from_file_location("make_speech_data", script)
    make = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_speech_data", make)  # dataclasses look their module up there
    spec.loader.exec_module(make)
    rng = np.random.default_rng(0)
    clips = [rng.integers(-32768, 32768, size=n, dtype=np.int16) for n in (5, 1, 300)]
    clips[0][:3] = [-32768, 32767, -32768]
    make.write_npz(tmp_path / "x.npz", make.pack(clips, ["a", "b c", "d"], ["s"] * 3, ["flite"] * 3))
    monkeypatch.setattr(speech, "DATA_DIR", tmp_path)
    speech._read.cache_clear()
    try:
        rows = speech._rows("x.npz")
    finally:
        speech._read.cache_clear()
    assert [r["id"] for r in rows] == ["s/a", "s/b_c", "s/d"]
    for row, clip in zip(rows, clips):
        assert np.array_equal(np.round(row["audio"] * 32768.0).astype(np.int16), clip)


def _fake_archive(path: Path, **override) -> Path:
    """Two clips of two samples each, in the committed layout; `override` replaces arrays."""
    arrays = {
        "format_version": np.int64(speech.FORMAT_VERSION),
        "sample_rate": np.int64(SAMPLE_RATE),
        "offsets": np.array([0, 2, 4], dtype=np.int64),
        "pcm_delta_lo": np.array([1, 1, 0, 1], dtype=np.uint8),
        "pcm_delta_hi": np.zeros(4, dtype=np.uint8),
        "text": np.array(["yes", "no"]),
        "speaker": np.array(["s", "s"]),
        "engine": np.array(["flite", "flite"]),
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ({}, None),
        ({"format_version": np.int64(2)}, "format 2 at 16000 Hz, this loader reads format 1 at 16000 Hz"),
        ({"sample_rate": np.int64(8000)}, "format 1 at 8000 Hz"),
        ({"offsets": np.array([0, 2, 5])}, "offsets and labels do not match the audio"),  # past the end
        ({"text": np.array(["yes"])}, "offsets and labels do not match the audio"),  # a label short
    ],
    ids=["sound", "format", "rate", "offsets", "labels"],
)
def test_foreign_or_damaged_files_are_refused(tmp_path, monkeypatch, override, message):
    _fake_archive(tmp_path / "x.npz", **override)
    monkeypatch.setattr(speech, "DATA_DIR", tmp_path)
    speech._read.cache_clear()
    try:
        if message is None:
            rows = speech._rows("x.npz")
            assert [r["id"] for r in rows] == ["s/yes", "s/no"]
            assert [np.round(r["audio"] * 32768).tolist() for r in rows] == [[1, 2], [2, 3]]
        else:
            with pytest.raises(ValueError, match=message):
                speech._rows("x.npz")
    finally:
        speech._read.cache_clear()


def test_errors_name_the_unknown_words_and_the_known_splits():
    with pytest.raises(ValueError, match=r"unknown words \['eleven', 'twelve'\]; known words: zero, one, "):
        load_spoken_words("train", words=["twelve", "go", "eleven"])
    with pytest.raises(ValueError, match="unknown split 'dev'; known splits: train, test, all"):
        load_spoken_words("dev")


def test_words_filter_every_split():
    rows = load_spoken_words("all", words=["go"])
    assert len(rows) == 21 and {r["text"] for r in rows} == {"go"}
    assert [r["id"] for r in rows] == [r["id"] for r in load_spoken_words("all") if r["text"] == "go"]


def test_write_npz_writes_the_same_bytes_in_the_given_order_without_pickles(tmp_path):
    import zipfile

    from moe_gen.tasks.sources.npz import write_npz

    arrays = {"b": np.arange(6, dtype=np.int16).reshape(2, 3), "a": np.array(["x", "yz"])}
    write_npz(tmp_path / "one.npz", arrays)
    write_npz(tmp_path / "two.npz", arrays)
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    with np.load(tmp_path / "one.npz", allow_pickle=False) as z:
        assert z.files == ["b", "a"] and all(np.array_equal(z[key], arrays[key]) for key in arrays)
    with zipfile.ZipFile(tmp_path / "one.npz") as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == ["b.npy", "a.npy"]
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) and i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
    assert [i.external_attr >> 16 for i in infos] == [0o644, 0o644]
    for mode, recorded in ((0o640, 0o640), (None, 0o600)):  # None: zipfile's default, as the speech files
        write_npz(tmp_path / "mode.npz", arrays, file_mode=mode)
        with zipfile.ZipFile(tmp_path / "mode.npz") as zf:
            assert {i.external_attr >> 16 for i in zf.infolist()} == {recorded}
    with pytest.raises(ValueError, match="allow_pickle"):
        write_npz(tmp_path / "objects.npz", {"o": np.array([{}, []], dtype=object)})


def test_matches_fresh_build_compares_bytes_and_leaves_the_file_alone(tmp_path):
    from moe_gen.tasks.sources.npz import matches_fresh_build, write_npz

    out = tmp_path / "data.npz"
    build = lambda path: write_npz(path, {"x": np.arange(4)})  # noqa: E731
    assert not matches_fresh_build(out, build)  # nothing committed yet
    build(out)
    assert matches_fresh_build(out, build)
    before = out.read_bytes()
    assert not matches_fresh_build(out, lambda path: write_npz(path, {"x": np.arange(5)}))
    assert out.read_bytes() == before
