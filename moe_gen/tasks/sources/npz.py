"""Writing the committed data files reproducibly (used by the ``scripts/make_*_data.py`` generators)."""

from __future__ import annotations

import filecmp
import io
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

__all__ = ["write_npz", "matches_fresh_build"]


def write_npz(path: Path, arrays: dict[str, np.ndarray], *, file_mode: Optional[int] = 0o644) -> None:
    """Writes arrays as an ``.npz`` that ``np.load`` reads, with the same bytes on every run.

    ``np.savez_compressed`` stamps the current time into the zip, so no two runs would match; this
    writes each member with a fixed timestamp, in the given order, without pickles.

    Args:
        path: output file.
        arrays: name -> array; no object arrays (the file must load with allow_pickle=False).
        file_mode: Unix permissions recorded for each member (None leaves zipfile's default,
            0o600, which it records when none is set; the committed speech files were written
            that way).
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            if file_mode is not None:
                info.external_attr = file_mode << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def matches_fresh_build(out_path: Path, build: Callable[[Path], None]) -> bool:
    """Whether ``build`` (a generator writing one file) reproduces ``out_path`` byte for byte;
    the fresh file is written to a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / out_path.name
        build(fresh)
        return out_path.is_file() and filecmp.cmp(fresh, out_path, shallow=False)
