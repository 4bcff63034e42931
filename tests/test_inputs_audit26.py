"""Inputs, twenty-sixth audit: a JPEG's EXIF orientation is applied (a phone photo was read sideways,
and boxes drawn on it landed elsewhere); ``moe-gen infer --input`` names the file's line of a row that
does not fit (its "row N" counted rows, not lines: blank lines moved it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moe_gen.cli import main
from moe_gen.tasks.modalities.visual import load_image


@pytest.mark.parametrize("given", ["path", "bytes", "pil"])
def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path, given):
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:, :10] = 255  # stored 30 wide and 20 high, its left third white
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: shown turned 90° clockwise (how phones save a portrait photo)
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image({"path": str(path), "bytes": path.read_bytes(), "pil": Image.open(path)}[given])
    assert loaded.size == (20, 30)  # as a viewer shows it: 20 wide, 30 high
    pixels = np.asarray(loaded)
    assert pixels[:10].mean() > 200 and pixels[-10:].mean() < 50  # the white third now on top
    plain = tmp_path / "plain.jpg"
    Image.fromarray(stored).save(plain, quality=95)  # no orientation: as stored
    assert load_image(str(plain)).size == (30, 20)


def test_infer_input_names_the_line_of_a_row_that_does_not_fit(tmp_path, capsys):
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    torch.manual_seed(0)
    tasks = [load_preset("table_species", "train", limit=4)]
    GeneralistModel.build(flavour("debug"), tasks, Tokenizer.default()).save_pretrained(str(tmp_path / "model"))
    good = '{"table": {"sepal length": 5.1, "sepal width": 3.5, "petal length": 1.4, "petal width": 0.2}}'
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{good}\n\n\n{good}\n" + '{"tabel": {"sepal length": 5.1}}\n')
    assert main(["infer", str(tmp_path / "model"), "--task", "table_species", "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert "row 2: missing column 'table'" in err and f"({path}, line 5)" in err


def test_a_tensor_is_channels_first_whatever_its_width():
    red = torch.zeros(3, 5, 3, dtype=torch.uint8)
    red[0] = 255  # 3 channels, 5 high, 3 wide: was read as 3 high, 5 wide, white
    image = load_image(red)
    assert image.size == (3, 5) and image.getpixel((0, 0)) == (255, 0, 0)
    rgba = torch.zeros(4, 5, 6, dtype=torch.uint8)  # torchvision's read_image of a PNG with alpha (was refused)
    rgba[2], rgba[3] = 255, 255  # opaque blue
    image = load_image(rgba)
    assert image.size == (6, 5) and image.getpixel((0, 0)) == (0, 0, 255)


def test_an_atomic_write_stopped_part_way_leaves_the_earlier_file_and_no_temporary_one(tmp_path):
    from moe_gen.durable import atomic_open

    path = tmp_path / "eval.json"
    path.write_text("earlier")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(str(path)) as f:
            f.write("x" * 100_000)  # (past the write buffer: in place, the file was torn here)
            raise KeyboardInterrupt
    assert path.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    with atomic_open(str(path)) as f:
        f.write("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())  # as a file the process creates


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_benchmark_report_that_fails_to_write_leaves_the_earlier_report(tmp_path):
    """``quality.json`` (and the analysis report, ``eval.json``) were written in place: a failure or a
    kill part-way left a torn file where the last complete report was (before the twenty-sixth audit)."""
    import json

    from moe_gen.quality.report import write_files

    write_files({"runs": [1, 2, 3]}, str(tmp_path), "quality", "earlier")
    with pytest.raises(TypeError):
        write_files({"runs": list(range(20_000)), "zz": object()}, str(tmp_path), "quality", "new")
    assert json.loads((tmp_path / "quality.json").read_text()) == {"runs": [1, 2, 3]}
    assert (tmp_path / "quality.md").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quality.json", "quality.md"]


def test_an_atomic_write_to_a_pipe_writes_into_it(tmp_path):
    """``--out /dev/stdout`` or a named pipe: written as it is (a rename would replace it by a file)."""
    import os
    import threading

    from moe_gen.durable import atomic_open

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    with atomic_open(str(fifo)) as f:
        f.write("through the pipe")
    reader.join(timeout=10)
    assert got == ["through the pipe"] and not fifo.is_file() and fifo.exists()
