"""sake_core.atomic: atomic_write and replace_dir keep every reader on a complete old or new version."""

from __future__ import annotations

import os
import stat
import multiprocessing
from pathlib import Path

import pytest

from sake_core import atomic
from sake_core.atomic import atomic_write, replace_dir, staging_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_text_and_bytes_with_fixed_mode(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "a" / "x.txt", "héllo\n")
        atomic_write(tmp_path / "b.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "x.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _mode(tmp_path / "a" / "x.txt") == 0o644 and _mode(tmp_path / "b.bin") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin"]


def test_atomic_write_failure_keeps_old_bytes_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _folder(dest: Path, version: str) -> Path:
    new = staging_dir(dest)
    (new / "a.txt").write_text(version)
    (new / "b.txt").write_text(version)
    return new


def test_replace_dir_creates_then_replaces(tmp_path):
    dest = tmp_path / "site"
    assert replace_dir(_folder(dest, "1"), dest) == dest
    replace_dir(_folder(dest, "2"), dest)
    assert (dest / "a.txt").read_text() == "2" and _mode(dest) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no staging or old folder left


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_replace_dir_both_paths(tmp_path, monkeypatch, exchange):
    if exchange and atomic._RENAMEAT2 is None:
        pytest.skip("renameat2 is not available on this system")
    if not exchange:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    dest = tmp_path / "out"
    replace_dir(_folder(dest, "old"), dest)
    replace_dir(_folder(dest, "new"), dest)
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"a.txt": "new", "b.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _poll(dest: str, stop, problems) -> None:
    """Reader process: open ``dest`` (pinning one folder) and read both files; record what goes wrong."""
    while not stop.is_set():
        try:
            fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            problems.put("missing")
            continue
        try:
            a = open(f"/proc/self/fd/{fd}/a.txt").read()
            b = open(f"/proc/self/fd/{fd}/b.txt").read()
            if a != b:
                problems.put(f"mixed {a}/{b}")
        except FileNotFoundError:
            problems.put("incomplete")
        finally:
            os.close(fd)


def _swap_while_reading(tmp_path: Path, swaps: int) -> list[str]:
    dest = tmp_path / "out"
    replace_dir(_folder(dest, "0"), dest)
    ctx = multiprocessing.get_context("fork")
    stop, problems = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_poll, args=(str(dest), stop, problems))
    reader.start()
    try:
        for version in range(1, swaps + 1):
            replace_dir(_folder(dest, str(version)), dest)
    finally:
        stop.set()
        reader.join()
    assert (dest / "a.txt").read_text() == str(swaps)
    found = []
    while not problems.empty():
        found.append(problems.get())
    return found


@pytest.mark.skipif(atomic._RENAMEAT2 is None or not Path("/proc/self/fd").is_dir(),
                    reason="renameat2 is not available on this system")
def test_readers_never_see_a_missing_or_mixed_folder(tmp_path, monkeypatch):
    """With RENAME_EXCHANGE, a reader process polling during 200 swaps always finds a complete folder of one
    version. (Old folders are kept during the test, so that a reader that pinned one can still read it.)"""
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)
    assert _swap_while_reading(tmp_path, 200) == []


def test_leftovers_of_killed_swaps_are_cleaned(tmp_path):
    dest = tmp_path / "out"
    replace_dir(_folder(dest, "1"), dest)
    # a swap killed after moving the old folder aside, and a staging folder of a process that no longer runs
    (tmp_path / ".out.old-abc").mkdir()
    dead = tmp_path / ".out.new-999999999-xyz"
    dead.mkdir()
    live = staging_dir(dest)  # ours: still running, kept
    replace_dir(_folder(dest, "2"), dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
    assert (dest / "a.txt").read_text() == "2"


def test_fallback_swap_killed_between_renames_is_repaired(tmp_path, monkeypatch):
    """Fallback path killed after moving `dest` aside: the next call puts the old folder back first."""
    monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    dest = tmp_path / "out"
    replace_dir(_folder(dest, "1"), dest)
    os.rename(dest, tmp_path / ".out.old-killed")  # what a kill between the two renames leaves
    atomic._clean_leftovers(dest)
    assert (dest / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        replace_dir(staging_dir(tmp_path / "f"), tmp_path / "f")
