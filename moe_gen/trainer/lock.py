"""One run per run directory: an exclusive lock on ``<output_dir>/run.lock``.

    lock = RunLock("runs/demo")
    lock.acquire()        # RunDirectoryInUse naming the directory and the holder if another run has it
    ...
    lock.release()        # also at process exit: the kernel drops the lock with its process

Two trainers writing one directory delete each other's partial checkpoints and logs and can leave a
checkpoint holding one run's weights with the other's optimizer, so the second is refused at once.

The lock is an ``fcntl.flock`` on the lock file, which holds the holder's pid, host and start time
for the refusal message. A run killed with SIGKILL leaves the file behind but not the lock (the
kernel releases it with the process), so a stale file never blocks a later run. Where a file system
does not support ``flock``, the file itself is the lock, created with ``O_EXCL``; a file left by a
process that no longer runs on this host is stale and taken over, one left by another host must
be removed by hand (the message says so).

A lock is held by one open file description: a second ``RunLock`` on the same directory, in another
thread or the same one, is refused like another process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

__all__ = ["RunLock", "RunDirectoryInUse", "LOCK_FILE"]

LOCK_FILE = "run.lock"
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


class RunDirectoryInUse(RuntimeError):
    """Another run holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


class RunLock:
    """The exclusive lock of one run directory (see the module docstring).

    Args:
        directory: the run directory (created if missing).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: Optional[int] = None
        self._inode: Optional[tuple[int, int]] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode()

    def _holder(self) -> dict:
        """The holder's record from the lock file ({} when it cannot be read yet)."""
        try:
            with open(self.path, "rb") as f:
                holder = json.loads(f.read() or b"{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict, hint: str = "") -> RunDirectoryInUse:
        who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
               if holder else "another process")
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            who = f"another trainer of this process, started {holder.get('started', '?')}"
        return RunDirectoryInUse(f"the run directory {self.directory} is in use by another run ({who}; lock file "
                                 f"{self.path}); wait for it to finish or choose another output directory{hint}")

    def acquire(self) -> None:
        """Takes the lock or raises ``RunDirectoryInUse`` at once (it never waits)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(100):  # each pass loses a race with a run that released or took over meanwhile
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _BUSY:
                    os.close(fd)
                    raise self._refuse(self._holder()) from None
                # No flock on this file system: the file, created with O_EXCL, is the lock.
                if created:
                    return self._hold(fd)
                os.close(fd)
                holder = self._holder()
                here = holder.get("host") == socket.gethostname()
                if here and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                    os.unlink(self.path)  # stale: its process is gone
                    continue
                raise self._refuse(holder, "" if here else f" (if no run uses it, delete {self.path})") from None
            # A holder that released meanwhile unlinked the file we locked: lock the one at the path.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            status = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (status.st_dev, status.st_ino):
                return self._hold(fd)
            os.close(fd)
        raise self._refuse(self._holder())

    def _hold(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.write(fd, self._record())
        status = os.fstat(fd)
        self._fd, self._inode = fd, (status.st_dev, status.st_ino)

    def release(self) -> None:
        """Removes the lock file (if it is still ours) and drops the lock; a no-op when not held."""
        if self._fd is None:
            return
        try:
            status = os.stat(self.path)
            if (status.st_dev, status.st_ino) == self._inode:
                os.unlink(self.path)  # before unlocking, so no other run ever holds a file we remove
        except OSError:
            pass  # the directory is gone (e.g. a temporary one cleaned up): nothing to remove
        os.close(self._fd)  # closing drops the flock
        self._fd = self._inode = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit os may be half torn down
            pass
