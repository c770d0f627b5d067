"""Shared helpers of the source readers: CSV/TSV reading with named errors, finding folders."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator, Sequence

from ..records import SourceError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{path}: missing file (expected {what})")
    return path


def read_text(path: Path, what: str = "a UTF-8 text file") -> str:
    """The text of a UTF-8 file (a leading BOM is dropped); a file that is not UTF-8 raises one SourceError line
    naming the file and the byte offset of the first bad byte."""
    require_file(Path(path), what)
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
                          f"(expected {what} encoded as UTF-8)") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_table(path: Path, required: Sequence[str], delimiter: str = ",") -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV/TSV file as (line number, dict), after checking that every required column exists."""
    text = read_text(path, "a table with columns " + ", ".join(required))
    with io.StringIO(text, newline="") as f:
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
