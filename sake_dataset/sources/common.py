"""Shared helpers of the source readers: CSV/TSV reading with named errors, finding folders."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Sequence

from ..records import SourceError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{path}: missing file (expected {what})")
    return path


def read_table(path: Path, required: Sequence[str], delimiter: str = ",") -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV/TSV file as (line number, dict), after checking that every required column exists."""
    require_file(path, "a table with columns " + ", ".join(required))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise SourceError(f"{path}: missing column(s) {missing} (expected columns {list(required)}, "
                              f"found {columns})")
        for i, row in enumerate(reader, start=2):
            yield i, {k: (v if v is not None else "") for k, v in row.items()}


def find_dir(root: Path, name: str) -> Path | None:
    """`root/name`, matching the folder name case-insensitively."""
    direct = root / name
    if direct.is_dir():
        return direct
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and child.name.lower() == name.lower():
                return child
    return None


def is_hub_id(spec: str) -> bool:
    """'owner/name' that is not an existing local path."""
    return not Path(spec).exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
