"""``keep_freed_memory`` (moe_gen/runtime.py): the two glibc ``mallopt`` settings it makes, in that
order and with glibc's own option numbers, and the platforms and libraries where it changes nothing.

A fake libc records the calls, so the test process's own allocator is left alone; one real call runs
in a subprocess that loads the module file alone (no torch import)."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

from moe_gen import runtime
from moe_gen.runtime import keep_freed_memory

# glibc's malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_MAX -4 (M_TOP_PAD is -2, M_MMAP_THRESHOLD -3: setting that
# one to 0 would serve every block by mmap, the opposite of what is wanted).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


class _FakeLibc:
    """A libc whose ``mallopt`` records (option, value) and answers from ``results`` in turn."""

    def __init__(self, results=(1, 1)):
        self.calls: list[tuple[int, int]] = []
        results = list(results)

        def mallopt(option, value):
            self.calls.append((option, value))
            return results.pop(0)

        self.mallopt = mallopt


def _use(monkeypatch, libc, platform: str = "linux") -> list[str]:
    opened: list[str] = []

    def cdll(name):
        opened.append(name)
        if isinstance(libc, BaseException):
            raise libc
        return libc

    monkeypatch.setattr(runtime.sys, "platform", platform)
    monkeypatch.setattr(runtime.ctypes, "CDLL", cdll)
    return opened


def test_keep_freed_memory_turns_off_mmap_then_trimming_with_glibcs_option_numbers(monkeypatch):
    libc = _FakeLibc()
    opened = _use(monkeypatch, libc)
    assert keep_freed_memory() is True
    assert libc.calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)]  # the largest C int: never trim
    assert len(opened) == 1


@pytest.mark.parametrize("results, calls", [((0, 1), 1), ((1, 0), 2)])
def test_keep_freed_memory_reports_a_refused_setting(monkeypatch, results, calls):
    """mallopt returns 0 when it refuses: either refusal is a failure (the first one stops it)."""
    libc = _FakeLibc(results)
    _use(monkeypatch, libc)
    assert keep_freed_memory() is False
    assert len(libc.calls) == calls


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_keep_freed_memory_changes_nothing_off_linux(monkeypatch, platform):
    libc = _FakeLibc()
    opened = _use(monkeypatch, libc, platform)
    assert keep_freed_memory() is False
    assert opened == [] and libc.calls == []


@pytest.mark.parametrize("libc", [OSError("no libc"), object()], ids=["no-libc", "no-mallopt"])
def test_keep_freed_memory_answers_false_without_a_c_library_or_mallopt(monkeypatch, libc):
    _use(monkeypatch, libc)
    assert keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"),
                    reason="glibc only")
def test_keep_freed_memory_succeeds_on_this_glibc():
    path = str(Path(runtime.__file__))
    code = (f"import importlib.util as u; s = u.spec_from_file_location('runtime', {path!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.keep_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"
