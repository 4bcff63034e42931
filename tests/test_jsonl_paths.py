"""JSONL rows: only media slots read file paths, relative to the JSONL file, regular files only, and
optionally confined to a root; broken lines are named by file and line (issue 13, finding 5)."""

from __future__ import annotations

import base64
import io
import json
import os
import wave

import numpy as np
import pytest

from moe_gen.tasks import Task, TaskDataError, Tokenizer
from moe_gen.tasks.task import load_jsonl, media_columns

INSTRUCTION = "[AUDIO:audio] [TEXT:note] which word is it? -> [TEXT:label,closed_set]"


def _wav(target) -> None:
    """A 0.1 s WAV clip at ``target`` (a path or a binary file object)."""
    with wave.open(target if hasattr(target, "write") else str(target), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((np.sin(np.arange(1600) / 5) * 8000).astype(np.int16).tobytes())


def _jsonl(path, *rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    """``data/rows.jsonl`` beside ``data/clips/one.wav``; the test runs from another directory."""
    folder = tmp_path / "data"
    (folder / "clips").mkdir(parents=True)
    _wav(folder / "clips" / "one.wav")
    (folder / "notes.txt").write_text("a text file")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    yield folder
    os.chdir(cwd)


def test_media_paths_resolve_against_the_jsonl_folder_and_text_stays_text(data):
    path = _jsonl(data / "rows.jsonl", {"audio": "clips/one.wav", "note": "notes.txt", "label": "one"})
    task = Task("words", INSTRUCTION, path)
    assert media_columns(task.instruction) == {"audio"}
    row = task.data[0]
    assert row["audio"] == str(data / "clips" / "one.wav")
    assert row["note"] == "notes.txt"  # a text field naming a file is kept as written
    sample = task.encode(0, Tokenizer.default(), training=False)
    assert sample is not None and any(c.rows is not None for c in sample.encoder)


@pytest.mark.parametrize("make, kind", [
    (lambda folder: os.mkfifo(folder / "pipe.wav"), "a FIFO"),
    (lambda folder: (folder / "pipe.wav").mkdir(), "a directory"),
    (lambda folder: os.symlink("/dev/zero", folder / "pipe.wav"), "a character device"),
])
def test_a_media_path_naming_something_other_than_a_file_is_refused(data, make, kind):
    make(data)
    path = _jsonl(data / "rows.jsonl", {"audio": "clips/one.wav", "label": "one"},
                  {"audio": "pipe.wav", "label": "two"})
    with pytest.raises(TaskDataError, match=f"rows.jsonl, line 2, column 'audio': 'pipe.wav' is {kind}"):
        load_jsonl(path, {"audio"})
    with pytest.raises(TaskDataError, match="line 2"):
        Task("words", INSTRUCTION, path)


def test_a_missing_media_file_is_named(data):
    path = _jsonl(data / "rows.jsonl", {"audio": "clips/two.wav", "label": "two"})
    with pytest.raises(TaskDataError, match="line 1, column 'audio': cannot use the file 'clips/two.wav'"):
        load_jsonl(path, ["audio"])


def test_a_root_confines_media_paths(data, tmp_path):
    secret = tmp_path / "secret.wav"
    _wav(secret)
    os.symlink(secret, data / "clips" / "link.wav")
    rows = [{"audio": "../secret.wav"}, {"audio": str(secret)}, {"audio": "clips/link.wav"}]
    for number, row in enumerate(rows, 1):
        path = _jsonl(data / f"rows{number}.jsonl", row)
        assert load_jsonl(path, {"audio"})[0]["audio"].endswith(".wav")  # without a root they are followed
        with pytest.raises(TaskDataError, match="lies outside the data root"):
            load_jsonl(path, {"audio"}, root=str(data))
        with pytest.raises(TaskDataError, match="line 1, column 'audio'"):
            Task("words", INSTRUCTION, path, data_root=str(data))
    inside = _jsonl(data / "inside.jsonl", {"audio": "clips/one.wav"})
    assert load_jsonl(inside, {"audio"}, root=str(data))[0]["audio"] == str(data / "clips" / "one.wav")


def test_bad_base64_and_non_utf8_lines_are_named(data):
    buffer = io.BytesIO()
    _wav(buffer)
    good = {"audio": {"base64": base64.b64encode(buffer.getvalue()).decode()}, "label": "one"}
    path = _jsonl(data / "rows.jsonl", good, {"audio": {"base64": "@@not base64@@"}, "label": "two"})
    with pytest.raises(TaskDataError, match=r"rows.jsonl, line 2, column 'audio': bad base64"):
        load_jsonl(path, {"audio"})
    path = _jsonl(data / "rows.jsonl", good, {"audio": {"base64": 12}})
    with pytest.raises(TaskDataError, match="line 2, column 'audio': base64 must be a string"):
        load_jsonl(path)
    raw = data / "latin1.jsonl"
    raw.write_bytes(json.dumps(good).encode() + b"\n" + '{"label": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(TaskDataError, match="latin1.jsonl, line 2: not UTF-8 text"):
        load_jsonl(str(raw))
    assert load_jsonl(_jsonl(data / "rows.jsonl", good))[0]["audio"] == buffer.getvalue()


def test_a_bad_row_of_a_jsonl_task_is_named_by_its_line(tmp_path):
    """Rows are numbered from 0 and blank lines are skipped, so ``row 1`` alone would not find the
    line: errors of rows read from a file also give its file and line (until the rows are replaced)."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"table": {"a": 1}, "species": "x"}\n\n{"species": "y"}\n')
    numbers: list = []
    assert len(load_jsonl(str(path), line_numbers=numbers)) == 2 and numbers == [1, 3]
    task = Task("mine", "[STRUCT:table] which? -> [CATEGORY:species]", str(path))
    tok = Tokenizer.default()
    assert task.encode(0, tok) is not None
    with pytest.raises(TaskDataError, match=rf"task 'mine', row 1: missing column 'table'.*\({path}, line 3\)$"):
        task.encode(1, tok)
    task.on_error = "skip"
    assert task.encode(1, tok) is None and task.errors[0].endswith(f"({path}, line 3)")
    task.data = list(task.data)[::-1]  # no longer the file's rows: no line given
    task.on_error = "raise"
    with pytest.raises(TaskDataError) as raised:
        task.encode(0, tok)
    assert "line" not in str(raised.value)


def test_a_byte_order_mark_opens_only_the_first_line(tmp_path):
    """(mutation-testing audit r17) Editors on Windows write a UTF-8 BOM before the first line: it is no
    part of the JSON there; on a later line it is (that line is not JSON)."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"q": "a"}\n{"q": "b"}\n')
    assert load_jsonl(str(path)) == [{"q": "a"}, {"q": "b"}]
    path.write_bytes(b'{"q": "a"}\n\xef\xbb\xbf{"q": "b"}\n')
    with pytest.raises(TaskDataError, match=r"line 2: not JSON"):
        load_jsonl(str(path))
