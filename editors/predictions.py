"""The predictions JSONL file (ARCHITECTURE.md "Prediction rows"): run header + one row per evaluated item.

Crash safety: the rows of one unit of work (an instance in single mode, one step of a sequence in sequential mode)
go to disk in one ``write`` followed by ``fsync``. On resume (:meth:`PredictionsFile.open`), a trailing partial
line and a trailing unit with fewer rows than expected are cut off (file truncated to the end of the last
complete unit), so a rerun continues with exactly the rows an uninterrupted run would have written; anything else
after the complete units (a damaged line with rows after it, a unit twice) is refused, never cut.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

from sake_core.atomic import atomic_write, lock_fd
from sake_core.run_header import resume_differences
from sake_core.errors import DataError

logger = logging.getLogger(__name__)



def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False)


def writer_lock(path: Path) -> int:
    """Hold the one-writer lock of the predictions file ``path``: an exclusive lock (:func:`lock_fd`) on the hidden
    file ``.<name>.lock`` beside it (the predictions file itself is replaced when its header is written), held until
    the returned descriptor is closed or the process dies. Another run writing ``path`` now is a
    :class:`DataError`: two writers would interleave their rows, and one's resume would cut the other's."""
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    if not lock_fd(fd, wait=False):
        os.close(fd)
        raise DataError(f"{path} is being written by another run (it holds {lock}); wait for that run to end or "
                        "write to another --out")
    return fd


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written, then ``fsync``."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


class PredictionsFile:
    """Append-only predictions file with resume.

    ``unit_of(row)`` maps a row to its unit key; ``expected_rows[unit]`` is how many rows a complete unit has.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], *, unit_of: Callable[[dict[str, Any]], Hashable],
                 expected_rows: dict[Hashable, int]) -> None:
        self.path = Path(path)
        self.header = header
        self.unit_of = unit_of
        self.expected_rows = expected_rows
        self.done: set[Hashable] = set()
        self._fd: int | None = None
        self._lock: int | None = None

    def open(self) -> set[Hashable]:
        """Take the file's one-writer lock (:func:`writer_lock`), then create the file (header only) or resume it;
        returns the units already complete."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = writer_lock(self.path)
        try:
            if not self.path.exists() or self.path.stat().st_size == 0:
                atomic_write(self.path, dumps(self.header) + "\n")
            else:
                self._resume()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            self.close()  # a file that cannot be resumed keeps no lock
            raise
        return set(self.done)

    def _resume(self) -> None:
        raw = self.path.read_bytes()
        end_of_header = raw.find(b"\n")
        if end_of_header < 0:  # killed while writing the header: start over
            atomic_write(self.path, dumps(self.header) + "\n")
            return
        try:
            old = json.loads(raw[:end_of_header])
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.path}: line 1 is not a JSON run header") from exc
        if old.get("kind") != "header":
            raise DataError(f"{self.path}: line 1 is not a run header (kind: header)")
        diff = resume_differences(old, self.header)
        if diff and raw.find(b"\n", end_of_header + 1) < 0:
            # only the header of a run that wrote no row (it stopped before its first unit, e.g. on a bad
            # hyperparameter): nothing to keep, so the corrected run starts the file again
            logger.warning("%s: replacing the header of a run that wrote no row (%s differed)", self.path,
                           ", ".join(diff))
            atomic_write(self.path, dumps(self.header) + "\n")
            return
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} != {self.header.get(k)!r}" for k in diff)
            raise DataError(f"{self.path} was written by a different run ({details}); "
                             "use another --out or delete the file")
        self.header = old  # keep the original date
        good_end = end_of_header + 1
        pos = good_end
        current: Hashable | None = None
        count = 0
        while True:
            nl = raw.find(b"\n", pos)
            if nl < 0:
                break  # trailing partial line (or nothing)
            unit = self._unit_of_line(raw[pos:nl])
            if unit is None:
                break
            if unit != current:
                if current is not None and count != self.expected_rows.get(current, -1):
                    break
                if unit in self.done:
                    break
                current, count = unit, 0
            count += 1
            pos = nl + 1
            if count == self.expected_rows.get(current, -1):
                self.done.add(current)
                good_end = pos
        if good_end < len(raw):
            problem, rows = self._damage(raw, good_end)
            if problem is not None:
                raise DataError(f"{self.path}: {problem}: the file is damaged, not cut short by a kill (a kill leaves "
                                "at most one unfinished unit at its end); nothing was changed: repair that line, or "
                                "move the file aside to run again")
            logger.info("%s: dropping the %d trailing bytes (%d complete row(s)) of an unfinished unit", self.path,
                        len(raw) - good_end, rows)
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())

    def _unit_of_line(self, line: bytes) -> Hashable | None:
        """The unit of one complete line, or None when the line is not a readable row."""
        try:
            return self.unit_of(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None

    def _damage(self, raw: bytes, start: int) -> tuple[str | None, int]:
        """What the bytes after the last complete unit (from ``start``) hold: ``(None, rows)`` when they are what a
        kill leaves, the first ``rows`` rows of one unit not yet complete and perhaps a line cut short (no newline)
        or unreadable lines after them; else ``(the first line that says otherwise, 0)``. A run appends a unit's
        rows in one write, so anything else (a unit short of rows with rows after it, a unit twice, a bad line with
        rows after it) is damage, and resuming before it would delete finished units."""
        line = raw.count(b"\n", 0, start) + 1
        unit: Hashable | None = None
        rows, unreadable, pos = 0, None, start
        while (nl := raw.find(b"\n", pos)) >= 0:
            found = self._unit_of_line(raw[pos:nl])
            if found is None:
                unreadable = unreadable or line
            elif unreadable is not None:
                return f"line {unreadable} is not a readable row, and rows follow it (line {line})", 0
            elif unit is None and found in self.done:
                return f"line {line} repeats unit {found!r}, which the file already holds complete", 0
            elif unit is not None and found != unit:
                return (f"line {line} starts unit {found!r} after {rows} of the {self.expected_rows.get(unit, '?')} "
                        f"rows of unit {unit!r}"), 0
            else:
                unit, rows = found, rows + 1
            line, pos = line + 1, nl + 1
        return None, rows

    def append_unit(self, unit: Hashable, rows: Iterable[dict[str, Any]]) -> None:
        """Write one unit's rows in a single write + fsync."""
        if self._fd is None:
            raise RuntimeError("PredictionsFile.open() first")
        data = "".join(dumps(r) + "\n" for r in rows).encode("utf-8")
        write_all(self._fd, data)
        self.done.add(unit)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            os.close(self._lock)  # releases the writer lock
            self._lock = None

    def __enter__(self) -> "PredictionsFile":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_predictions(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, rows) of a predictions file (complete lines only)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    complete = [line for line in lines[:-1] if line.strip()]
    if not complete:
        raise DataError(f"{path}: no run header")
    return json.loads(complete[0]), [json.loads(line) for line in complete[1:]]
