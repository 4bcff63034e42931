"""Hugging Face's undecoded media dicts, fifteenth audit: ``{"bytes": ..., "path": ...}``, as
``datasets``' ``Audio``, ``Image`` and ``Video`` features with ``decode=False`` (and a dataset's
Arrow rows) hold them, read as their bytes, else their path. AUDIO refused one saying it needs
"... a dict ..., got dict", IMAGE refused it too; each test failed before the fix."""

from __future__ import annotations

import io
import re
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from moe_gen.tasks import Task, TaskDataError, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _wav_bytes() -> bytes:
    """0.3 s of a 300 Hz tone, 16-bit PCM at 16 kHz."""
    t = np.arange(4800) / 16000
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((0.5 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _png_bytes() -> bytes:
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[2:6, 2:6, 0] = 255
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _rows(task: Task, tok: Tokenizer) -> list[torch.Tensor]:
    return [task.encode(i, tok, training=False).encoder[0].rows for i in range(len(task))]


@pytest.mark.parametrize("modality, data, suffix", [("AUDIO", _wav_bytes(), ".wav"), ("IMAGE", _png_bytes(), ".png")],
                         ids=["audio", "image"])
def test_a_bytes_and_path_dict_reads_as_its_bytes_else_its_path(tok, tmp_path, modality, data, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    values = [data, {"bytes": data, "path": "elsewhere" + suffix},  # the bytes win (the path may be the archive's)
              {"bytes": None, "path": str(path)}]  # a local file's dict holds no bytes
    task = Task("t", f"[{modality}:x] what? -> [TEXT:y]", [{"x": v, "y": "z"} for v in values])
    plain, undecoded, by_path = _rows(task, tok)
    torch.testing.assert_close(undecoded, plain)
    torch.testing.assert_close(by_path, plain)


def test_a_video_dict_reads_as_its_bytes(tok, tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(4):
            frame = np.full((32, 32, 3), 60 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    task = Task("v", "[VIDEO:x] what? -> [TEXT:y]", [{"x": v, "y": "z"} for v in
                                                     (str(path), {"bytes": path.read_bytes(), "path": "clip.mp4"})])
    plain, undecoded = _rows(task, tok)
    torch.testing.assert_close(undecoded, plain)


@pytest.mark.parametrize("modality, value, message", [
    ("AUDIO", {"wav": b"RIFF"}, "an AUDIO slot reads a dict {'array', 'sampling_rate'} or {'bytes', 'path'} (a "
                                "Hugging Face media dict: its bytes, else its path); this one has keys 'wav'"),
    ("IMAGE", {"bytes": [1, 2], "path": None}, "an IMAGE slot reads a dict {'bytes', 'path'} (a Hugging Face "
                                               "media dict: its bytes, else its path); this one has keys 'bytes', "
                                               "'path' ('bytes' holds a list)"),
])
def test_a_dict_of_other_keys_is_refused_naming_the_keys_read(tok, modality, value, message):
    task = Task("t", f"[{modality}:x] what? -> [TEXT:y]", [{"x": value, "y": "z"}])
    with pytest.raises(TaskDataError, match="^" + re.escape(f"task 't', column 'x', row 0: {message}")):
        task.encode(0, tok)


def test_a_jsonl_media_dict_path_resolves_beside_the_file_and_stays_inside_the_data_root(tok, tmp_path):
    """In a JSONL file the dict's path is read as a string path is: relative to the file, and refused
    outside ``data_root`` (it escaped both)."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "outside.png")
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(data / "inside.png")
    instruction = "[IMAGE:image] what is it? -> [TEXT:label]"

    def task(value):
        (data / "rows.jsonl").write_text(json.dumps({"image": value, "label": "x"}) + "\n")
        return Task("t", instruction, str(data / "rows.jsonl"), data_root=str(data))

    inside = task({"bytes": None, "path": "inside.png"})
    assert inside.data[0]["image"]["path"] == str(data / "inside.png")
    assert inside.encode(0, tok, training=False) is not None
    with pytest.raises(TaskDataError, match="lies outside the data root"):
        task({"bytes": None, "path": str(tmp_path / "outside.png")})
    with pytest.raises(TaskDataError, match="lies outside the data root"):
        task([{"bytes": None, "path": "../outside.png"}])


def test_a_media_dict_whose_bytes_are_no_bytes_is_refused_even_with_a_path():
    """(mutation-testing audit r17) The path stands in only where ``bytes`` is null: a dict whose
    ``bytes`` holds something else (a str, say) is refused, naming what it holds."""
    from moe_gen.tasks.modalities.base import SlotValueError, undecoded_media

    assert undecoded_media({"bytes": b"\x89PNG", "path": "a.png"}, "an IMAGE slot") == b"\x89PNG"
    assert undecoded_media({"bytes": None, "path": "a.png"}, "an IMAGE slot") == "a.png"
    with pytest.raises(SlotValueError, match=r"an IMAGE slot reads a dict \{'bytes', 'path'\} .*this one has keys "
                                             r"'bytes', 'path' \('bytes' holds a str\)"):
        undecoded_media({"bytes": "iVBOR", "path": "a.png"}, "an IMAGE slot")
