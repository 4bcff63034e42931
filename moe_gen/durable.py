"""Writes that survive a machine crash, not only a killed process.

A rename makes a finished file visible in one step, so a process killed mid-write never leaves a
torn file under the final name. After a power loss, though, the file's data and the rename itself
may not have reached the disk unless they were flushed: ``fsync_file`` flushes a written file
before it is renamed into place, and ``fsync_dir`` flushes a folder's entries (the renames in it)
before anything that points at them (a checkpoint's ``latest``) is written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_open", "fsync_file", "fsync_dir", "shareable"]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """A file to write ``path``'s new content into: a temporary file beside it, flushed to disk and
    renamed over ``path`` when the block ends without error (with the umask's permissions,
    ``shareable``); removed, and ``path`` left as it was, when it raises or the process is stopped
    (a report, a plot or ``eval.json`` written in place was left torn by a kill mid-write, the
    earlier complete one gone, before the twenty-sixth session's audit). ``kwargs`` go to ``open``
    (``encoding=``). A path that is there but is no regular file (``/dev/stdout``, a pipe) is
    written as it is: renaming over it would replace the device or pipe by a file."""
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, mode, **kwargs) as f:
            yield f
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_file(path: str) -> None:
    """Flushes a written file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Flushes a folder's entries (files created or renamed in it) to disk. Best effort: where a
    folder cannot be opened for that (Windows), it does nothing."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def shareable(path: str) -> None:
    """Gives a file written through a private temporary file (``mkstemp``, safetensors: owner-only,
    0600) the permissions the process's umask gives a file it creates (0644 under umask 022, 0664
    under 002), so that whoever may read the other files of a model or checkpoint may read it too."""
    mask = os.umask(0)  # (reading the umask means setting it: put straight back)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
