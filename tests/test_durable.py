"""``moe_gen.durable``: a written file's data and a folder's renames flushed to disk, and files
written through private temporary files given the permissions the umask gives."""

from __future__ import annotations

import os
import tempfile

import pytest

from moe_gen.durable import fsync_dir, fsync_file, shareable


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_shareable_gives_the_permissions_the_umask_gives_and_leaves_the_umask_as_it_was(tmp_path, mask):
    fd, path = tempfile.mkstemp(dir=tmp_path)  # owner-only, 0600
    os.close(fd)
    before = os.umask(mask)
    try:
        shareable(path)
        assert os.umask(mask) == mask  # (reading it means setting it)
    finally:
        os.umask(before)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_fsync_file_and_fsync_dir_flush_the_file_and_the_folder(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names an fsynced descriptor through /proc")
    path = tmp_path / "weights"
    path.write_bytes(b"x")
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    fsync_file(str(path))
    fsync_dir(str(tmp_path))
    assert synced == [os.path.realpath(path), os.path.realpath(tmp_path)]


def test_fsync_dir_does_nothing_where_a_folder_cannot_be_opened(tmp_path, monkeypatch):
    """Windows cannot open a folder to flush it: the save goes on (best effort), it does not fail."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    assert fsync_dir(str(tmp_path)) is None
