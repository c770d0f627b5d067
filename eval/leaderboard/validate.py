"""Read and validate a leaderboard submission without executing or extracting anything from it.

A submission is a directory or a ``.zip`` archive holding exactly ``predictions.jsonl`` (the runner's output:
a header line and one line per evaluated item) and ``metadata.json`` (submitter, links, license). Checks, in
order: file safety (names, links, sizes, number of archive members), JSON syntax and schema per line, the
metric's own row rules (:func:`eval.sake_metric.rows.validate_row`, the function scoring applies: what validates
here is what scores), row consistency, duplicates, and coverage against the release manifest (fingerprint and
item ids). Every problem names the file, line and field and quotes a submitted value only as a short escaped
excerpt; no server path appears in a message. Every check is linear in the submission's size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable


from eval.sake_metric.limits import MAX_ROW_DEPTH, MAX_ROW_ITEMS
from eval.sake_metric.predictions_file import (PredictionsError, excerpt, parse_json_line, parse_predictions,
                                               read_header, sequential_rule)
from eval.sake_metric.predictions_file import expected_keys as run_expected_keys
from eval.sake_metric.predictions_file import load_manifest as read_manifest
from eval.sake_metric.rows import validate_row
from sake_core.protocol import (ATTRIBUTES, KIND_DIMENSION_TYPE, METHOD_NAMES, ROW_FIELDS, SEQUENTIAL_CONFIG,
                                SEQUENTIAL_EVAL_EDITS, SEQUENTIAL_MAX_GAP, method_key)
from sake_core.errors import DataError

logger = logging.getLogger(__name__)

PREDICTIONS_NAME = "predictions.jsonl"
METADATA_NAME = "metadata.json"
SUBMISSION_NAMES = (PREDICTIONS_NAME, METADATA_NAME)
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_SPLITS = ("test",)
MAX_LISTED_PROBLEMS = 25
#: Most members of a submission archive (it needs two; a few more are listed as unexpected files).
MAX_ARCHIVE_MEMBERS = 16
#: Largest central directory of a submission archive (bytes), checked before the archive is opened.
MAX_DIRECTORY_BYTES = 1 << 20
#: Largest metadata.json (bytes): a few short fields.
MAX_METADATA_BYTES = 64 * 1024
SCHEMA_PATH = Path(__file__).with_name("submission.schema.json")
# item kind (last id segment) -> (dimension, type)
ITEM_KINDS = KIND_DIMENSION_TYPE
#: Header and metadata fields the board shows as names or links: one line of visible text each (no control,
#: format, bidirectional-override or zero-width characters, no line or paragraph separators).
SHOWN_HEADER_FIELDS = ("model", "method", "method_display_name", "family", "dataset", "split")
SHOWN_METADATA_FIELDS = ("submitter", "model_link", "paper_link", "code_link", "license", "contact")
#: Unicode categories refused in a shown name: control, format (bidi overrides, zero-width), surrogate, private
#: use, line and paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
#: Letters and symbols that draw nothing (Hangul fillers, the blank Braille pattern): refused as hidden too.
_BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
#: What a header field breaking its schema pattern must be instead (the board shows these fields).
_PATTERN_EXPECTED = {"model": "printable ASCII (a Hub id, or a short name for a local model)",
                     "method": "a method id of ASCII letters, digits and _ . + -",
                     "method_display_name": "printable ASCII (a method outside the paper's eight, named in its own "
                                            "words)",
                     "family": "an adapter family key of ASCII letters, digits and _ . -"}


@dataclass(frozen=True)
class Problem:
    """One validation failure: where (file, line, field) and what was expected."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class SubmissionError(DataError):
    """A submission failed validation; ``problems`` lists every failure found (capped)."""

    def __init__(self, problems: list[Problem], source: str = "submission"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem(s)"] + [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass
class Submission:
    """A parsed submission: raw bytes (hashed for the id) plus the parsed header, rows and metadata."""

    source: str
    predictions_bytes: bytes
    metadata_bytes: bytes | None
    header: dict[str, Any]
    rows: list[dict[str, Any]]
    metadata: dict[str, Any] | None
    row_lines: list[int] = field(default_factory=list)  # 1-based line number of each row

    @property
    def submission_id(self) -> str:
        """Content hash: sha256 over predictions.jsonl bytes, a NUL, and metadata.json in canonical JSON."""
        digest = hashlib.sha256(self.predictions_bytes)
        digest.update(b"\0")
        if self.metadata is not None:
            digest.update(json.dumps(self.metadata, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8"))
        return digest.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- file reading

def _unsafe_member_name(name: str) -> str | None:
    """Why an archive member name is unsafe, or None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return "path traversal ('..')"
    if "\\" in name:
        return "backslash in name"
    return None


def _archive_directory(path: Path) -> tuple[int, int] | None:
    """(members, central directory bytes) an archive's end record declares, found as ``zipfile`` finds it (the
    last 22 bytes, else the last end-record signature in the final 64 KiB; ZIP64 records when present), or None
    when there is no end record (``zipfile`` then refuses the file). Read before ``zipfile`` parses the
    directory, so a directory of a million members is refused without being parsed."""
    end_size, locator_size, end64_size = 22, 20, 56
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size < end_size:
            return None
        handle.seek(size - end_size)
        record = handle.read(end_size)
        at = size - end_size
        if not (record[:4] == b"PK\x05\x06" and record[-2:] == b"\0\0"):
            start = max(size - (1 << 16) - end_size, 0)
            handle.seek(start)
            tail = handle.read()
            found = tail.rfind(b"PK\x05\x06")
            if found < 0 or len(tail) - found < end_size:
                return None
            record, at = tail[found:found + end_size], start + found
        members, directory = struct.unpack("<10xHI6x", record)
        if at >= locator_size + end64_size:
            handle.seek(at - locator_size)
            locator = handle.read(locator_size)
            if locator[:4] == b"PK\x06\x07":
                handle.seek(at - locator_size - end64_size)
                record64 = handle.read(end64_size)
                if record64[:4] == b"PK\x06\x06":
                    members, directory = struct.unpack("<32xQQ8x", record64)
    return members, directory


def _read_zip(path: Path, max_bytes: int) -> dict[str, bytes]:
    src = path.name
    if path.stat().st_size > max_bytes:
        raise SubmissionError([Problem(src, f"archive is {path.stat().st_size} bytes, over the limit of "
                                            f"{max_bytes} bytes")], src)
    declared = _archive_directory(path)
    if declared is not None and (declared[0] > MAX_ARCHIVE_MEMBERS or declared[1] > MAX_DIRECTORY_BYTES):
        raise SubmissionError([Problem(src, f"archive directory of {declared[0]} member(s) and {declared[1]} bytes;"
                                            f" a submission holds {' and '.join(SUBMISSION_NAMES)} (at most "
                                            f"{MAX_ARCHIVE_MEMBERS} members, {MAX_DIRECTORY_BYTES} bytes)")], src)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise SubmissionError([Problem(src, f"not a valid zip archive ({type(exc).__name__}: "
                                            f"{_exception_text(exc)})")], src) from None
    problems: list[Problem] = []
    wanted: list[zipfile.ZipInfo] = []
    seen: set[str] = set()
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:  # the end record understated the directory
            raise SubmissionError([Problem(src, f"archive of {len(infos)} members; at most {MAX_ARCHIVE_MEMBERS}")],
                                  src)
        for info in infos:
            where = f"{src}: member {excerpt(info.filename, 80)}"
            why = _unsafe_member_name(info.filename)
            mode = info.external_attr >> 16
            if why:
                problems.append(Problem(where, f"rejected: {why}"))
            elif stat.S_ISLNK(mode):
                problems.append(Problem(where, "rejected: symbolic link"))
            elif info.is_dir():
                problems.append(Problem(where, f"rejected: directory; put {' and '.join(SUBMISSION_NAMES)} "
                                               "at the archive root"))
            elif info.filename not in SUBMISSION_NAMES:
                problems.append(Problem(where, f"rejected: unexpected file; allowed: {', '.join(SUBMISSION_NAMES)}"))
            elif info.filename in seen:
                problems.append(Problem(where, "rejected: duplicate member"))
            elif info.flag_bits & 0x1:
                problems.append(Problem(where, "rejected: encrypted member"))
            else:
                seen.add(info.filename)
                wanted.append(info)
        total = sum(info.file_size for info in wanted)
        if total > max_bytes:
            problems.append(Problem(src, f"uncompressed size {total} bytes is over the limit of {max_bytes} bytes"))
        if problems:
            if len(problems) > MAX_LISTED_PROBLEMS:
                problems = problems[:MAX_LISTED_PROBLEMS] + [
                    Problem(src, f"... and {len(problems) - MAX_LISTED_PROBLEMS} more problem(s) not listed")]
            raise SubmissionError(problems, src)
        files: dict[str, bytes] = {}
        for info in wanted:
            try:
                with archive.open(info) as handle:
                    data = handle.read(max_bytes + 1)  # bounded even if the declared size lies
            except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, ValueError, RuntimeError,
                    zlib.error) as exc:
                # bad CRC, unknown compression method, truncated or corrupt (deflate) stream
                raise SubmissionError([Problem(f"{src}: member {info.filename!r}",
                                               f"unreadable ({type(exc).__name__}: {_exception_text(exc)})")],
                                      src) from None
            if len(data) > max_bytes or len(data) != info.file_size:
                raise SubmissionError([Problem(f"{src}: member {info.filename!r}",
                                               "size differs from the archive directory or is over the limit")], src)
            files[info.filename] = data
    return files


def _exception_text(exc: BaseException) -> str:
    """An exception's message in one short line, without file paths (an OSError gives its reason only)."""
    text = " ".join(str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc).split())
    return text if len(text) <= 200 else text[:199] + "…"


def _read_dir(path: Path, max_bytes: int) -> dict[str, bytes]:
    src = path.name or str(path)
    problems: list[Problem] = []
    sizes: dict[str, int] = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        where = f"{src}/{entry.name}"
        if entry.is_symlink():
            problems.append(Problem(where, "rejected: symbolic link"))
        elif entry.is_dir(follow_symlinks=False):
            problems.append(Problem(where, "rejected: unexpected directory"))
        elif not entry.is_file(follow_symlinks=False):
            problems.append(Problem(where, "rejected: not a regular file"))
        elif entry.name not in SUBMISSION_NAMES:
            problems.append(Problem(where, f"rejected: unexpected file; allowed: {', '.join(SUBMISSION_NAMES)}"))
        else:
            sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
    if sum(sizes.values()) > max_bytes:
        problems.append(Problem(src, f"size {sum(sizes.values())} bytes is over the limit of {max_bytes} bytes"))
    if problems:
        raise SubmissionError(problems, src)
    files = {}
    for name in sizes:
        with open(path / name, "rb") as handle:
            files[name] = handle.read(max_bytes + 1)
    return files


def read_submission_files(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                          metadata_path: str | os.PathLike | None = None) -> dict[str, bytes]:
    """Return ``{name: bytes}`` of a submission directory, ``.zip``, or a bare predictions ``.jsonl``.

    A bare ``.jsonl`` (optionally with ``metadata_path``) is accepted for checking a run before packing it.
    Nothing is extracted to disk and nothing is executed.
    """
    path = Path(path)
    src = path.name or str(path)
    if path.is_symlink():
        raise SubmissionError([Problem(src, "rejected: the submission path is a symbolic link")], src)
    if not path.exists():
        raise SubmissionError([Problem(src, "no such file or directory")], src)
    if path.is_dir():
        files = _read_dir(path, max_bytes)
    elif not path.is_file():  # a FIFO or a device is never opened (reading one could block or never end)
        raise SubmissionError([Problem(src, "not a regular file")], src)
    elif zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
        files = _read_zip(path, max_bytes)
    elif path.suffix.lower() == ".jsonl":
        size = path.stat().st_size
        if size > max_bytes:
            raise SubmissionError([Problem(src, f"{size} bytes is over the limit of {max_bytes} bytes")], src)
        files = {PREDICTIONS_NAME: path.read_bytes()}
    else:
        raise SubmissionError([Problem(src, "expected a directory, a .zip archive or a predictions .jsonl file")],
                              src)
    if metadata_path is not None:
        files[METADATA_NAME] = Path(metadata_path).read_bytes()
    return files


# ---------------------------------------------------------------------------------------------- parsing

@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The submission JSON Schema (``submission.schema.json``)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=4)
def _validator(definition: str) -> Any:
    """A ``jsonschema`` validator of one definition of the schema (the package of the ``[leaderboard]`` extra,
    imported here: the commands that never validate run without it)."""
    from jsonschema import Draft202012Validator

    schema = load_schema()
    return Draft202012Validator({"$ref": f"#/$defs/{definition}", "$defs": schema["$defs"]})


def _short(value: Any, limit: int = 60) -> str:
    """A submitted value quoted in a message: JSON of at most ``limit`` characters, non-ASCII escaped."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, (list, dict)):
        return excerpt(value)
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
                    float: "number", type(None): "null"}


def schema_problems(obj: Any, definition: str, where: str) -> list[Problem]:
    """Schema failures of ``obj`` against ``#/$defs/{definition}``, each naming the field."""
    problems = []
    for error in sorted(_validator(definition).iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
        path = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "required":
            missing = [k for k in error.validator_value if isinstance(obj, dict) and k not in obj]
            for key in missing:
                problems.append(Problem(f"{where}, field {key}" if not path else f"{where}, field {path}.{key}",
                                        "missing required field"))
            continue
        if error.validator == "additionalProperties":
            instance = error.instance
            extra = [k for k in instance if k not in error.schema.get("properties", {})] \
                if isinstance(instance, dict) else []
            shown = ", ".join(excerpt(k) for k in extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            problems.append(Problem(f"{where}", f"Additional properties are not allowed ({shown} "
                                                f"{'was' if len(extra) == 1 else 'were'} unexpected)"))
            continue
        field_name = f", field {path}" if path else ""
        if error.validator == "type":
            expected = error.validator_value
            expected = " or ".join(expected) if isinstance(expected, list) else expected
            got = _JSON_TYPE_NAMES.get(type(error.instance), type(error.instance).__name__)
            message = f"expected {expected}, got {got} {_short(error.instance)}"
        elif error.validator in ("enum", "const"):
            allowed = error.validator_value if error.validator == "enum" else [error.validator_value]
            message = f"got {_short(error.instance)}, expected one of {', '.join(map(str, allowed))}"
        elif error.validator == "pattern" and path.endswith("_link"):
            message = f"got {_short(error.instance)}, expected an http(s):// URL"
        elif error.validator == "pattern" and path in _PATTERN_EXPECTED:
            message = f"got {_short(error.instance)}, expected {_PATTERN_EXPECTED[path]}"
        elif error.validator in ("minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum"):
            size = f" ({len(error.instance)})" if isinstance(error.instance, (str, list)) else ""
            message = f"got {_short(error.instance)}{size}, expected {error.validator} {error.validator_value}"
        else:  # jsonschema's own text quotes the whole value: name the rule only
            message = f"got {_short(error.instance)}, which breaks the schema rule {error.validator!r}"
        problems.append(Problem(f"{where}{field_name}", message))
    return problems


def shown_text_problems(obj: dict[str, Any], fields: Iterable[str], where: str) -> list[Problem]:
    """Problems of the string ``fields`` of ``obj`` that the board shows: a hidden character (control, format,
    separator, a letter that draws nothing) or no visible character at all."""
    problems = []
    for name in fields:
        value = obj.get(name)
        if not isinstance(value, str) or not value:
            continue
        hidden = next((c for c in value if unicodedata.category(c) in _HIDDEN_CATEGORIES or c in _BLANK_CHARACTERS),
                      None)
        if hidden is not None:
            problems.append(Problem(f"{where}, field {name}",
                                    f"holds the hidden character U+{ord(hidden):04X} "
                                    f"({unicodedata.name(hidden, unicodedata.category(hidden))}); the board shows this "
                                    "field as one line of visible text"))
        elif not any(c.isprintable() and not c.isspace() for c in value):
            problems.append(Problem(f"{where}, field {name}", "has no visible character"))
    return problems


def display_name_problems(header: dict[str, Any], where: str) -> list[Problem]:
    """A method outside the paper's eight that claims one of their names (the board would show it as that
    method)."""
    name = header.get("method_display_name")
    if not isinstance(name, str) or method_key(header.get("method")) in METHOD_NAMES:
        return []
    claimed = method_key(name)
    if claimed in METHOD_NAMES:
        return [Problem(f"{where}, field method_display_name",
                        f"got {_short(name)}, the name of the paper's method {claimed!r}; method "
                        f"{_short(header.get('method'))} needs a name of its own")]
    return []


class _Collector:
    """Accumulates problems and stops listing after a cap (the count stays exact)."""

    def __init__(self, cap: int = MAX_LISTED_PROBLEMS):
        self.cap = cap
        self.problems: list[Problem] = []
        self.dropped = 0

    def add(self, problems: Iterable[Problem] | Problem) -> None:
        for problem in [problems] if isinstance(problems, Problem) else problems:
            if len(self.problems) < self.cap:
                self.problems.append(problem)
            else:
                self.dropped += 1

    @property
    def full(self) -> bool:
        """Whether the cap is reached (costly checks then stop: nothing more could be listed)."""
        return len(self.problems) >= self.cap

    def raise_if_any(self, source: str, stopped_at: str | None = None) -> None:
        if self.problems:
            listed = list(self.problems)
            if self.dropped:
                listed.append(Problem(source, f"... and {self.dropped} more problem(s) not listed"))
            if stopped_at:
                listed.append(Problem(source, f"checking stopped at {stopped_at} after {self.cap} problems; fix "
                                              "these and validate again"))
            raise SubmissionError(listed, source)


def _problem_from(exc: PredictionsError) -> Problem:
    """The reader's one-line message as a Problem (``where: message``)."""
    where, _, message = str(exc).partition(": ")
    return Problem(where.replace(", line", " line"), message or str(exc))


def _item_kind(item_id: str, instance_id: str) -> str | None:
    prefix = instance_id + "/"
    if not item_id.startswith(prefix):
        return None
    kind = item_id[len(prefix):]
    return kind if kind in ITEM_KINDS else None


def sequential_problems(header: dict[str, Any]) -> list[Problem]:
    """A sequential header's evaluation rule against the paper's (the first ``SEQUENTIAL_EVAL_EDITS`` edits of each
    sequence at gaps 0..``SEQUENTIAL_MAX_GAP``): a board entry follows it, so that every sequential row is ranked
    against rows of the same protocol (a run with fewer edits or gaps scores differently and is not comparable)."""
    if header.get("mode") != "sequential":
        return []
    problems = []
    for name, paper in (("eval_edits", SEQUENTIAL_EVAL_EDITS), ("max_gap", SEQUENTIAL_MAX_GAP)):
        value = header.get(name)
        if value is not None and (isinstance(value, bool) or value != paper):
            problems.append(Problem(f"{PREDICTIONS_NAME} line 1, field {name}",
                                    f"got {_short(value)}; the board takes the paper's sequential protocol: {paper} "
                                    "(or null, which means it)"))
    return problems


def _release_rows(raw: bytes, manifest: dict[str, Any], allowed_splits: Iterable[str], problems: _Collector,
                  source: str) -> int | None:
    """How many rows a board file may hold: those a complete run of the predictions' header holds in the release
    (read from line 1 alone) and a few more, each then named by the duplicate and coverage checks. A header the
    release refuses raises here with every problem found so far; None when line 1 itself is unreadable or breaks
    the schema (the full read then names the problem)."""
    try:
        header = read_header(raw, PREDICTIONS_NAME)
    except PredictionsError:
        return None
    if schema_problems(header, "header", PREDICTIONS_NAME) or sequential_problems(header):
        return None
    found = header_coverage_problems(header, manifest, allowed_splits)
    if found:
        problems.add(found)
        problems.raise_if_any(source)
    # a few rows of slack, so that a file with a duplicate or a foreign row is told which one
    return len(expected_keys(manifest, header)) + MAX_LISTED_PROBLEMS


def parse_submission(files: dict[str, bytes], source: str = "submission", require_metadata: bool = True,
                     manifest: dict[str, Any] | None = None,
                     allowed_splits: Iterable[str] = DEFAULT_SPLITS) -> Submission:
    """Parse and schema-check the files of a submission; raise :class:`SubmissionError` with every problem (the
    first :data:`MAX_LISTED_PROBLEMS`: the per-row checks stop there).

    Given the release ``manifest``, the header is checked against it before any row is read (fingerprint, split,
    configs) and the file may hold no more rows than a complete run of that header does, so the work is bounded
    by the release's size, not by what a file can be padded with.
    """
    problems = _Collector()
    if PREDICTIONS_NAME not in files:
        problems.add(Problem(source, f"missing {PREDICTIONS_NAME}"))
    if require_metadata and METADATA_NAME not in files:
        problems.add(Problem(source, f"missing {METADATA_NAME}"))
    problems.raise_if_any(source)

    metadata = None
    metadata_bytes = files.get(METADATA_NAME)
    if metadata_bytes is not None and len(metadata_bytes) > MAX_METADATA_BYTES:
        problems.add(Problem(METADATA_NAME, f"{len(metadata_bytes)} bytes; at most {MAX_METADATA_BYTES} (a few "
                                            "short fields)"))
    elif metadata_bytes is not None:
        try:
            metadata = parse_json_line(metadata_bytes.decode("utf-8"), where=METADATA_NAME, max_depth=MAX_ROW_DEPTH,
                                       max_items=MAX_ROW_ITEMS)
        except UnicodeDecodeError as exc:
            problems.add(Problem(METADATA_NAME, f"not UTF-8 (byte {exc.start})"))
        except PredictionsError as exc:
            problems.add(_problem_from(exc))
        else:
            found = schema_problems(metadata, "metadata", METADATA_NAME)
            problems.add(found)
            if not found:
                problems.add(shown_text_problems(metadata, SHOWN_METADATA_FIELDS, METADATA_NAME))

    # The one strict reader of predictions files (eval/sake_metric/predictions_file.py, limits in limits.py) is
    # the reader scoring uses too: what validates here is what scores.
    raw = files[PREDICTIONS_NAME]
    max_rows = None if manifest is None else _release_rows(raw, manifest, allowed_splits, problems, source)
    try:
        parsed = parse_predictions(raw, PREDICTIONS_NAME, max_rows=max_rows,
                                   max_rows_reason="the rows a complete run of this header holds in the release")
    except PredictionsError as exc:
        problems.add(_problem_from(exc))
        problems.raise_if_any(source)
    header: dict[str, Any] = parsed.header
    rows: list[dict[str, Any]] = []
    row_lines: list[int] = []
    where = f"{PREDICTIONS_NAME} line 1"
    found = schema_problems(header, "header", where)
    problems.add(found)
    if not found:
        problems.add(shown_text_problems(header, SHOWN_HEADER_FIELDS, where))
        problems.add(display_name_problems(header, where))
    if header.get("limit") is not None:
        problems.add(Problem(f"{where}, field limit",
                             f"got {_short(header['limit'])}: a run limited to its first instances is not a board "
                             "entry; submit a complete run (limit null)"))
    stopped_at = None
    for number, obj in parsed.rows:
        if problems.full:
            stopped_at = f"{PREDICTIONS_NAME} line {number}"
            break
        where = f"{PREDICTIONS_NAME} line {number}"
        found = schema_problems(obj, "prediction", where)
        problems.add(found)
        if not found:
            rows.append(obj)
            row_lines.append(number)
    problems.raise_if_any(source, stopped_at)

    # Header: the sequential rule the file follows.
    sequential = header["mode"] == "sequential"
    if sequential:
        problems.add(sequential_problems(header))
        problems.raise_if_any(source)
    max_gap = sequential_rule(header)[1]

    # Row consistency: ids, dimension/type against the item kind, gap against the mode; then the metric's own
    # row rules (rows.validate_row, the function scoring applies), so scoring refuses no row this accepts.
    first_line: dict[Any, int] = {}
    for row, number in zip(rows, row_lines):
        if problems.full:
            stopped_at = f"{PREDICTIONS_NAME} line {number}"
            break
        where = f"{PREDICTIONS_NAME} line {number}"
        before = len(problems.problems) + problems.dropped
        kind = _item_kind(row["item_id"], row["instance_id"])
        if kind is None:
            problems.add(Problem(f"{where}, field item_id",
                                 f"{_short(row['item_id'])} is not '{{instance_id}}/{{kind}}' with kind in "
                                 f"{', '.join(ITEM_KINDS)}"))
        else:
            dimension, item_type = ITEM_KINDS[kind]
            if row["dimension"] != dimension:
                problems.add(Problem(f"{where}, field dimension",
                                     f"got {_short(row['dimension'])}, expected {dimension!r} for a {kind} item"))
            if row["type"] != item_type:
                problems.add(Problem(f"{where}, field type",
                                     f"got {row['type']}, expected {item_type} for a {kind} item"))
        if sequential and row["gap"] is None:
            problems.add(Problem(f"{where}, field gap",
                                 f"expected an integer 0..{max_gap} in sequential mode, got null"))
        if sequential and isinstance(row["gap"], int) and not 0 <= row["gap"] <= max_gap:
            problems.add(Problem(f"{where}, field gap",
                                 f"expected an integer 0..{max_gap} (the header's max_gap), got {row['gap']}"))
        if not sequential and row["gap"] is not None:
            problems.add(Problem(f"{where}, field gap", f"expected null in single mode, got {row['gap']}"))
        key = (row["item_id"], row["gap"]) if sequential else row["item_id"]
        if key in first_line:
            label = excerpt(row["item_id"], 80) + (f" at gap {row['gap']}" if sequential else "")
            problems.add(Problem(f"{where}, field item_id",
                                 f"duplicate item id {label} (first at line {first_line[key]})"))
        else:
            first_line[key] = number
        if len(problems.problems) + problems.dropped == before:
            try:
                validate_row(row, source=PREDICTIONS_NAME, line=number, required=ROW_FIELDS)
            except PredictionsError as exc:
                problems.add(_problem_from(exc))
    problems.raise_if_any(source, stopped_at)
    return Submission(source=source, predictions_bytes=raw, metadata_bytes=metadata_bytes, header=header,
                      rows=rows, metadata=metadata, row_lines=row_lines)


# ---------------------------------------------------------------------------------------------- manifest

def load_manifest(ref: str | os.PathLike, revision: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Load ``sake_manifest.json`` from a file, a dataset directory, or a Hub dataset repo id."""
    path = Path(ref)
    if path.is_dir():
        path = path / "sake_manifest.json"
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(ref)):
            raise FileNotFoundError(f"manifest {ref}: no such file or directory (expected a sake_manifest.json, "
                                    "a dataset directory holding one, or a Hub dataset id such as sake/sake)")
        from huggingface_hub import hf_hub_download  # Hub dataset id such as "sake/sake"

        path = Path(hf_hub_download(str(ref), "sake_manifest.json", repo_type="dataset", revision=revision,
                                    token=token))
    manifest = read_manifest(path)  # the metric's reader: one-line error for unreadable JSON or no item_ids
    if "fingerprint" not in manifest:
        raise DataError(f"manifest {path}: missing field 'fingerprint'")
    return manifest


def expected_keys(manifest: dict[str, Any], header: dict[str, Any]) -> list[Any]:
    """Every key a complete submission must hold, in manifest order: item ids (single mode) or ``(item_id, gap)``
    keys (sequential mode, the header's :func:`sequential_rule`), as the metric's reader lists them
    (:func:`eval.sake_metric.predictions_file.expected_keys`). A board entry is a complete run, so a header's
    ``limit`` is not applied.
    """
    keys = run_expected_keys(manifest, {**header, "limit": None})
    return keys if header["mode"] == "sequential" else [item_id for item_id, _ in keys]


def _describe_key(key: Any) -> str:
    return f"{excerpt(key[0], 80)} at gap {key[1]}" if isinstance(key, tuple) else excerpt(key, 80)


def header_coverage_problems(header: dict[str, Any], manifest: dict[str, Any],
                             allowed_splits: Iterable[str] = DEFAULT_SPLITS) -> list[Problem]:
    """Fingerprint, split and config problems of a (schema-valid) header against a release manifest."""
    where = f"{PREDICTIONS_NAME} line 1"
    problems: list[Problem] = []
    if header["dataset_fingerprint"] != manifest["fingerprint"]:
        problems.append(Problem(f"{where}, field dataset_fingerprint",
                                f"{excerpt(header['dataset_fingerprint'], 80)} does not match the release manifest's "
                                f"fingerprint {manifest['fingerprint']!r}"))
    allowed_splits = tuple(allowed_splits)
    if header["split"] not in allowed_splits:
        problems.append(Problem(f"{where}, field split",
                                f"got {excerpt(header['split'])}, the board accepts {', '.join(allowed_splits)}"))
    sequential = header["mode"] == "sequential"
    if sequential and header["configs"] != [SEQUENTIAL_CONFIG]:
        problems.append(Problem(f"{where}, field configs", "sequential mode needs configs ['sequential']"))
    if not sequential and SEQUENTIAL_CONFIG in header["configs"]:
        problems.append(Problem(f"{where}, field configs", "single mode takes attribute configs only"))
    if not sequential:
        released = [c for c in ATTRIBUTES if header["split"] in manifest["item_ids"].get(c, {})]
        missing = [c for c in released if c not in header["configs"]]
        if missing:
            problems.append(Problem(f"{where}, field configs",
                                    f"a board entry covers every attribute of the release; missing "
                                    f"{', '.join(missing)} (run without --config, or name them all)"))
    for config in header["configs"]:
        if config not in manifest["item_ids"] or header["split"] not in manifest["item_ids"][config]:
            problems.append(Problem(f"{where}, field configs",
                                    f"config {config!r} split {excerpt(header['split'])} is not in the release "
                                    "manifest"))
    return problems


def coverage_problems(submission: Submission, manifest: dict[str, Any],
                      allowed_splits: Iterable[str] = DEFAULT_SPLITS) -> list[Problem]:
    """Fingerprint, split/config and item-id coverage problems of a parsed submission against a manifest."""
    header = submission.header
    problems = header_coverage_problems(header, manifest, allowed_splits)
    if problems:
        return problems
    sequential = header["mode"] == "sequential"
    expected = expected_keys(manifest, header)
    expected_set = set(expected)
    got: dict[Any, int] = {}
    for row, number in zip(submission.rows, submission.row_lines):
        key = (row["item_id"], row["gap"]) if sequential else row["item_id"]
        got.setdefault(key, number)
    missing = [key for key in expected if key not in got]
    extra = [(key, number) for key, number in got.items() if key not in expected_set]
    if missing:
        shown = ", ".join(_describe_key(k) for k in missing[:3])
        problems.append(Problem(PREDICTIONS_NAME,
                                f"{len(missing)} of {len(expected)} expected item ids missing; first: {shown}"))
    if extra:
        key, number = extra[0]
        problems.append(Problem(f"{PREDICTIONS_NAME} line {number}, field item_id",
                                f"{len(extra)} item id(s) not in the release for {'/'.join(header['configs'])} "
                                f"{excerpt(header['split'])}; first: {_describe_key(key)}"))
    return problems


def validate_submission(path: str | os.PathLike, manifest: dict[str, Any] | None,
                        max_bytes: int = DEFAULT_MAX_BYTES, allowed_splits: Iterable[str] = DEFAULT_SPLITS,
                        metadata_path: str | os.PathLike | None = None,
                        require_metadata: bool = True) -> Submission:
    """Read, parse and check a submission; return it or raise :class:`SubmissionError` listing every problem.

    ``manifest=None`` skips the release checks (fingerprint, ids); the board never does that.
    """
    source = Path(path).name or str(path)
    files = read_submission_files(path, max_bytes=max_bytes, metadata_path=metadata_path)
    submission = parse_submission(files, source=source, require_metadata=require_metadata, manifest=manifest,
                                  allowed_splits=allowed_splits)
    if manifest is not None:
        problems = coverage_problems(submission, manifest, allowed_splits)
        if problems:
            raise SubmissionError(problems, source)
    logger.info("%s: valid (%d rows, id %s)", source, len(submission.rows), submission.submission_id)
    return submission
