"""The one strict reader of predictions files (runner output), shared by scoring and the leaderboard.

A predictions file is JSONL (ARCHITECTURE.md "Prediction rows"): line 1 is the run header
(`{"kind": "header", ...}`), every other line one prediction row. `read_predictions_file` (a path) and
`parse_predictions` (bytes, e.g. a zip member) return the header and the raw rows with their line numbers, or
raise `PredictionsError` with ONE line naming the file, the line (or byte offset) and what was expected:

- a file over `MAX_FILE_BYTES`, a line over `MAX_LINE_BYTES`, more than `MAX_ROWS` rows (or the caller's
  `max_rows`);
- binary content (a NUL byte) or bytes that are not UTF-8 (byte offset of the first bad byte);
- a line that is not one JSON object: malformed JSON, NaN / Infinity, integers over `MAX_INT_DIGITS` digits,
  nesting deeper than the format allows (`MAX_HEADER_DEPTH`, `MAX_ROW_DEPTH`), more values than it holds
  (`MAX_HEADER_ITEMS`, `MAX_ROW_ITEMS`), duplicate keys, unpaired
  UTF-16 surrogate escapes (`"\\ud800"`), blank lines, a row with more than `MAX_OPTIONS` options;
- a missing or malformed header (line 1 must be `kind: header` with `mode` single|sequential);
- a file with fewer (or more) rows than the header's `expected_rows` (written by `editors/run.py`), or, given a
  release manifest (`sake_manifest.json`), item keys missing from or foreign to the release for the header's
  configs / split / mode / limit (`expected_keys`). A cut file is never scored.

Field-level checks of each row (dimension, type, pre_edit, ...) are `rows.validate_row`'s job. Limits live in
`limits.py`. Every check runs in time linear in the line (`json_depth` is a scanner of `str` passes, the rest
is the C JSON parser and single regular-expression searches without backtracking), so a hostile line of the
largest size costs about what a plain one does. No third-party imports: `evaluate` copies this module next to
the metric script.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from .limits import (MAX_FILE_BYTES, MAX_HEADER_DEPTH, MAX_HEADER_ITEMS, MAX_INT_DIGITS, MAX_LINE_BYTES,
                     MAX_ROW_DEPTH, MAX_ROW_ITEMS, MAX_ROWS, options_problem)
# the evaluate module's copy of sake_core/protocol.py (this package must stay self-contained)
from .protocol import CONFIGS, MODES, SEQUENTIAL_CONFIG, SEQUENTIAL_EVAL_EDITS, SEQUENTIAL_MAX_GAP

_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))  # bytes deleted by json_depth
_CURLY_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# digits -> "0", e/E -> "e", +/- -> "+", any other byte -> " " (what `_long_number` looks for)
_NUMBER_CLASSES = bytes(48 if b in b"0123456789" else 101 if b in b"eE" else 43 if b in b"+-" else 32
                        for b in range(256))
_LONG_DIGITS = b"0" * (MAX_INT_DIGITS + 1)
_STEP = re.compile(r"^step(\d+)$")


class PredictionsError(ValueError):
    """Bad prediction input; the message is one line naming the source, line/row and field."""


class _Reject(Exception):
    """Raised inside json hooks; turned into a PredictionsError naming the line."""


@dataclass
class PredictionsFile:
    """A read predictions file: its header and `(line number, raw row dict)` pairs, in file order."""

    source: str
    header: dict[str, Any]
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ one line

EXCERPT_CHARS = 40


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short escaped quote of a submitted value for error messages: a string's first `limit` characters as a
    Python literal (control, bidi and other unprintable characters escaped), a list or object by its size."""
    if isinstance(value, str):
        return repr(value[:limit]) + (f"... ({len(value)} characters)" if len(value) > limit else "")
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"an object of {len(value)} key(s)"
    text = repr(value)  # numbers (at most MAX_INT_DIGITS digits), booleans, null
    return text if len(text) <= limit else text[:limit] + "..."



def _outside_strings(text: str) -> bytes:
    """The UTF-8 bytes of a JSON text outside its strings (steps 1 and 2 of `json_depth`), in linear time."""
    data = text.encode("utf-8", "surrogatepass")
    return b"".join(data.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[0::2])


def _long_number(outside: bytes) -> bool:
    """True when the text outside a JSON text's strings has a run of more than `MAX_INT_DIGITS` digits or an
    exponent of three digits or more (the numbers that may break a limit); `bytes` passes only, linear."""
    classes = outside.translate(_NUMBER_CLASSES)
    return _LONG_DIGITS in classes or b"e000" in classes or b"e+000" in classes


def json_depth(text: str, limit: int) -> int:
    """Nesting depth of a JSON text (brackets inside strings ignored), or `limit + 1` once it is deeper.

    Linear in the text, whatever it holds: a constant number of passes of `bytes` methods over its UTF-8 form,
    no backtracking expression (an unterminated string of escaped quotes made the earlier regular expression
    quadratic); brackets, quotes and backslashes are ASCII, which no byte of a multi-byte character is.
    1. Escape pairs are dropped left to right (two backslashes first, then backslash-quote): what is left of a
       string holds no backslash and ends at the next quote.
    2. Splitting at quotes leaves the text outside strings at the even positions (an unterminated string runs to
       the end of the line; the JSON parser refuses that line anyway).
    3. Brackets alone, ``{}`` read as ``[]``: each pass of ``replace(b"[]", b"")`` removes every innermost pair,
       so a balanced text of depth d is empty after exactly d passes; at most `limit + 1` passes are made.
    Brackets never closed (a malformed line) count as nesting too: the parser recurses into them.
    """
    opened = text.count("[") + text.count("{")
    if opened <= limit:
        return opened  # an upper bound that is already within the limit
    return _depth_outside(_outside_strings(text), limit)


def _depth_outside(outside: bytes, limit: int) -> int:
    """Step 3 of `json_depth` on the text outside strings."""
    brackets = outside.translate(_CURLY_AS_SQUARE, _NOT_BRACKET)
    depth = 0
    while b"[]" in brackets:
        if depth == limit:
            return limit + 1
        brackets = brackets.replace(b"[]", b"")
        depth += 1
    # left: "]" * a + "[" * b (brackets never matched); each unclosed "[" is one more level for the parser
    return min(limit + 1, depth + brackets.count(b"["))


def _reject_constant(name: str) -> Any:
    raise _Reject(f"{name} is not allowed (JSON numbers must be finite)")


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _Reject(f"an integer with {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS} allowed)")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf: as unusable as a literal Infinity
        raise _Reject(f"the number {text[:40]} is not finite (JSON numbers must be finite)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Reject(f"duplicate key {excerpt(key)} in one object")
            seen.add(key)
    return obj


def parse_json_line(text: str, *, where: str, max_depth: int, max_items: int | None = None) -> Any:
    """One JSON value of a line under the reader's rules (see module doc); PredictionsError naming `where`.

    `max_items`: most members and array entries the line may hold (commas outside strings + 1), checked before
    the line is parsed, so a line of a million tiny values costs a count, not a parse.
    """
    outside = _outside_strings(text)
    opened = text.count("[") + text.count("{")
    depth = opened if opened <= max_depth else _depth_outside(outside, max_depth)
    if depth > max_depth:
        raise PredictionsError(f"{where}: JSON nested {depth} levels deep or more; the format allows at most "
                               f"{max_depth}")
    if max_items is not None and outside.count(b",") >= max_items:
        raise PredictionsError(f"{where}: JSON of {outside.count(b',') + 1} values (members and array entries); "
                               f"the format has far fewer (at most {max_items} allowed)")
    # The number hooks (a Python call per number) are needed only where a number may break a limit (see
    # `_long_number`); elsewhere the parser's own are exact.
    hooks: dict[str, Any] = {"parse_int": _parse_int, "parse_float": _parse_float} if _long_number(outside) else {}
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys, **hooks)
    except _Reject as exc:
        raise PredictionsError(f"{where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise PredictionsError(f"{where}: not valid JSON, column {exc.colno}: {exc.msg}") from None
    except (RecursionError, ValueError) as exc:  # belt and braces: never a traceback
        raise PredictionsError(f"{where}: not valid JSON ({type(exc).__name__})") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start:exc.end].encode("utf-16", "surrogatepass")[2:].hex()
            raise PredictionsError(f"{where}: a string holds an unpaired UTF-16 surrogate (\\u{bad[2:4]}{bad[0:2]}); "
                                   "expected valid Unicode text") from None
    return value


# ------------------------------------------------------------------------------------------------ the file

def _lines(chunks: Iterable[bytes], source: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line bytes without the newline) of a byte stream, with size limits."""
    buffer = b""
    offset = 0  # byte offset of buffer[0] in the file
    number = 0
    total = 0
    for chunk in chunks:
        if total == 0:
            nul = chunk.find(b"\0", 0, 8192)
            if nul >= 0:  # a binary file (image, archive, pickle, ...): say so before any line-level message
                raise PredictionsError(f"{source}: binary content (NUL byte at byte offset {nul}); expected "
                                       "UTF-8 JSON lines")
        total += len(chunk)
        if total > MAX_FILE_BYTES:
            raise PredictionsError(f"{source}: over {MAX_FILE_BYTES} bytes, the limit for a predictions file")
        buffer += chunk
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            number += 1
            yield number, offset + start, buffer[start:end]
            start = end + 1
        buffer = buffer[start:]
        offset += start
        if len(buffer) > MAX_LINE_BYTES:
            raise PredictionsError(f"{source}, line {number + 1}: longer than {MAX_LINE_BYTES} bytes, the limit "
                                   "for one line")
    if buffer:
        yield number + 1, offset, buffer


def _decode(raw: bytes, where: str, offset: int) -> str:
    if len(raw) > MAX_LINE_BYTES:
        raise PredictionsError(f"{where}: longer than {MAX_LINE_BYTES} bytes, the limit for one line")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise PredictionsError(f"{where}: binary content (NUL byte at byte offset {offset + nul}); expected "
                               "UTF-8 JSON lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PredictionsError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset "
                               f"{offset + exc.start}); expected UTF-8 JSON lines") from None
    return text[:-1] if text.endswith("\r") else text


def check_header(header: Any, *, source: str) -> dict[str, Any]:
    """The run header of line 1 (ARCHITECTURE.md), checked for the fields scoring relies on."""
    where = f"{source}, line 1"
    if not isinstance(header, dict) or header.get("kind") != "header":
        got = "a prediction row" if isinstance(header, dict) and header.get("kind") == "prediction" else (
            f"a JSON {type(header).__name__}" if not isinstance(header, dict) else "an object without kind: header")
        raise PredictionsError(f"{where}: expected the run header ({{\"kind\": \"header\", ...}} as written by "
                               f"editors/run.py), got {got}")
    mode = header.get("mode")
    if mode not in MODES:
        raise PredictionsError(f"{where}: header field 'mode' must be one of {', '.join(MODES)}, got {excerpt(mode)}")
    expected = header.get("expected_rows")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 0):
        raise PredictionsError(f"{where}: header field 'expected_rows' must be an integer >= 0, got {excerpt(expected)}")
    limit = header.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise PredictionsError(f"{where}: header field 'limit' must be null or an integer >= 0, got {excerpt(limit)}")
    configs = header.get("configs")
    if configs is not None and not (isinstance(configs, list) and len(configs) <= len(CONFIGS)
                                    and all(isinstance(c, str) for c in configs)):
        got = f"a list of {len(configs)} entries" if isinstance(configs, list) else f"a JSON {type(configs).__name__}"
        raise PredictionsError(f"{where}: header field 'configs' must be a list of at most {len(CONFIGS)} config "
                               f"names, got {got}")
    return header


def _header_line(text: str, source: str) -> dict[str, Any]:
    where = f"{source}, line 1"
    if not text.strip():
        raise PredictionsError(f"{where}: blank line; expected one JSON object per line")
    return check_header(parse_json_line(text, where=where, max_depth=MAX_HEADER_DEPTH, max_items=MAX_HEADER_ITEMS),
                        source=source)


def read_header(raw: bytes, source: str) -> dict[str, Any]:
    """The run header (line 1) of a predictions file's bytes, checked as :func:`parse_predictions` checks it,
    without reading the rows (e.g. to bound their number before they are parsed)."""
    end = raw.find(b"\n", 0, MAX_LINE_BYTES + 1)
    line = raw[:end] if end >= 0 else raw[:MAX_LINE_BYTES + 1]
    if not line:
        raise PredictionsError(f"{source}: empty file; expected the run header on line 1, then prediction rows")
    return _header_line(_decode(line, f"{source}, line 1", 0), source)


def parse_predictions(chunks: bytes | Iterable[bytes], source: str, *,
                      manifest: Mapping[str, Any] | None = None, max_rows: int | None = None,
                      max_rows_reason: str = "the most this reader takes") -> PredictionsFile:
    """Read a predictions file from bytes (or an iterable of byte chunks); see the module doc for the checks.

    ``max_rows`` (at most ``MAX_ROWS``) refuses a file of more rows as soon as the reader meets the first one too
    many, saying ``max_rows_reason``: the leaderboard passes the number of rows a complete run of the header holds,
    so a file padded with rows costs no more than a complete one.
    """
    if isinstance(chunks, (bytes, bytearray)):
        chunks = [bytes(chunks)]
    limit = MAX_ROWS if max_rows is None else min(max_rows, MAX_ROWS)
    limit_reason = "the limit for one file" if max_rows is None or max_rows >= MAX_ROWS else max_rows_reason
    header: dict[str, Any] | None = None
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, offset, raw in _lines(chunks, source):
        where = f"{source}, line {number}"
        text = _decode(raw, where, offset)
        if number == 1:
            header = _header_line(text, source)
            continue
        if not text.strip():
            raise PredictionsError(f"{where}: blank line; expected one JSON object per line")
        obj = parse_json_line(text, where=where, max_depth=MAX_ROW_DEPTH, max_items=MAX_ROW_ITEMS)
        if not isinstance(obj, dict):
            raise PredictionsError(f"{where}: expected a prediction row (a JSON object), got a JSON "
                                   f"{type(obj).__name__}")
        if obj.get("kind") == "header":
            raise PredictionsError(f"{where}: a second run header; only line 1 may be the header")
        too_many = options_problem(obj.get("options"))
        if too_many:
            raise PredictionsError(f"{where}: field 'options' holds {too_many}")
        if len(rows) >= limit:
            raise PredictionsError(f"{where}: more than {limit} prediction rows, {limit_reason}")
        rows.append((number, obj))
    if header is None:
        raise PredictionsError(f"{source}: empty file; expected the run header on line 1, then prediction rows")
    if not rows:
        raise PredictionsError(f"{source}: no prediction rows after the run header")
    check_complete(header, rows, source=source, manifest=manifest)
    return PredictionsFile(source=source, header=header, rows=rows)


def read_predictions_file(path: str | os.PathLike, *, manifest: Mapping[str, Any] | None = None,
                          chunk_bytes: int = 1 << 20, max_rows: int | None = None,
                          max_rows_reason: str = "the most this reader takes") -> PredictionsFile:
    """Read and check a predictions file from disk (streamed; see the module doc; ``max_rows`` as for
    :func:`parse_predictions`)."""
    source = os.fspath(path)
    try:
        handle = open(source, "rb")
    except OSError as exc:
        raise PredictionsError(f"{source}: cannot read predictions file ({exc.strerror})") from None
    with handle:
        if os.path.isdir(source):
            raise PredictionsError(f"{source}: a directory; expected a predictions .jsonl file")
        return parse_predictions(iter(lambda: handle.read(chunk_bytes), b""), source, manifest=manifest,
                                 max_rows=max_rows, max_rows_reason=max_rows_reason)


# ------------------------------------------------------------------------------------------------ completeness

def row_key(row: Mapping[str, Any]) -> tuple[Any, Any]:
    """(item_id, gap): rows are unique by it (gap None in single mode)."""
    return row.get("item_id"), row.get("gap")


def _first_n_groups(ids: list[str], group_of: Any, n: int | None) -> list[str]:
    if n is None:
        return ids
    kept: list[str] = []
    groups: set[str] = set()
    for item_id in ids:
        group = group_of(item_id)
        if group not in groups:
            if len(groups) == n:
                continue
            groups.add(group)
        kept.append(item_id)
    return kept


def sequential_rule(header: Mapping[str, Any]) -> tuple[int, int]:
    """``(eval_edits, max_gap)`` a sequential predictions file follows: the header's values, the paper's (first 5
    edits, gaps 0-5) when the header leaves them out or null (headers written before the fields)."""
    eval_edits = header.get("eval_edits")
    max_gap = header.get("max_gap")
    return (SEQUENTIAL_EVAL_EDITS if eval_edits is None else int(eval_edits),
            SEQUENTIAL_MAX_GAP if max_gap is None else int(max_gap))


def expected_keys(manifest: Mapping[str, Any], header: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    """Every (item_id, gap) a complete run of `header` holds, in manifest order.

    Single mode: the item ids of each header config for the header split (the first `limit` instances of each
    config when `limit` is set), gap None. Sequential mode: an item of the edit at step s of a sequence
    (`sequential/{split}/{seq}/step{s:02d}/{kind}`) for every gap g with s <= eval_edits, g <= max_gap and
    s + g <= the sequence's last step (the first `limit` sequences when `limit` is set).
    Raises KeyError / ValueError when the manifest lacks a config or split or has a malformed sequential id.
    """
    split = header["split"]
    limit = header.get("limit")
    item_ids = manifest["item_ids"]
    if header["mode"] != "sequential":
        keys: list[tuple[str, int | None]] = []
        for config in header["configs"]:
            ids = list(item_ids[config][split])
            keys += [(i, None) for i in _first_n_groups(ids, lambda i: i.rpartition("/")[0], limit)]
        return keys
    ids = list(item_ids[SEQUENTIAL_CONFIG][split])
    ids = _first_n_groups(ids, lambda i: i.rpartition("/")[0].rpartition("/")[0], limit)
    eval_edits, max_gap = sequential_rule(header)
    where: dict[str, tuple[str, int]] = {}
    last: dict[str, int] = {}
    for item_id in ids:
        sequence, _, step_name = item_id.rpartition("/")[0].rpartition("/")
        match = _STEP.match(step_name)
        if not match:
            raise ValueError(f"sequential item id {item_id!r} has no 'stepNN' segment")
        step = int(match.group(1))
        where[item_id] = (sequence, step)
        last[sequence] = max(last.get(sequence, 0), step)
    keys = []
    for item_id in ids:
        sequence, step = where[item_id]
        if step <= eval_edits:
            keys += [(item_id, g) for g in range(max_gap + 1) if step + g <= last[sequence]]
    return keys


def _describe(key: tuple[str, Any]) -> str:
    return excerpt(key[0], 80) if key[1] is None else f"{excerpt(key[0], 80)} at gap {excerpt(key[1])}"


def check_complete(header: Mapping[str, Any], rows: list[tuple[int, dict[str, Any]]], *, source: str,
                   manifest: Mapping[str, Any] | None = None) -> None:
    """Rows against the header's `expected_rows` and, given one, the release manifest's item keys."""
    expected_rows = header.get("expected_rows")
    if expected_rows is not None and len(rows) != expected_rows:
        if len(rows) < expected_rows:
            raise PredictionsError(
                f"{source}: {len(rows)} prediction rows, but the run header's expected_rows is {expected_rows}: "
                "the file is incomplete (an interrupted run or a cut file); rerun the same editors.run command "
                "to finish it")
        raise PredictionsError(f"{source}: {len(rows)} prediction rows, more than the run header's expected_rows "
                               f"({expected_rows})")
    if manifest is None:
        return
    fingerprint = manifest.get("fingerprint")
    if header.get("dataset_fingerprint") not in (None, fingerprint):
        raise PredictionsError(f"{source}, line 1: header field 'dataset_fingerprint' "
                               f"{excerpt(header.get('dataset_fingerprint'), 80)} does not match the manifest's "
                               f"{fingerprint!r}")
    try:
        expected = expected_keys(manifest, header)
    except (KeyError, TypeError, ValueError) as exc:
        configs = "/".join(excerpt(c) for c in header.get("configs") or [])
        raise PredictionsError(f"{source}, line 1: the dataset manifest has no item ids for this run's configs "
                               f"{configs} / split {excerpt(header.get('split'))} ({type(exc).__name__})") from None
    got = {row_key(row): number for number, row in rows}
    missing = [k for k in expected if k not in got]
    if missing:
        raise PredictionsError(
            f"{source}: {len(missing)} of the {len(expected)} items the dataset manifest lists for this run are "
            f"missing (first: {_describe(missing[0])}); a cut or partial file is not scored")
    expected_set = set(expected)
    extra = [(number, key) for key, number in got.items() if key not in expected_set]
    if extra:
        number, key = min(extra)
        raise PredictionsError(f"{source}, line {number}: item {_describe(key)} is not in the dataset manifest for "
                               f"{'/'.join(header.get('configs') or [])} {excerpt(header.get('split'))} "
                               f"({len(extra)} such row(s))")


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A local `sake_manifest.json` (or a dataset folder holding one); PredictionsError when unreadable."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "sake_manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise PredictionsError(f"{path}: cannot read the dataset manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("item_ids"), dict):
        raise PredictionsError(f"{path}: not a SAKE dataset manifest (expected an object with 'item_ids')")
    return manifest


def manifest_for(header: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest of the header's dataset when it is a local folder built for the same fingerprint, else None."""
    dataset = header.get("dataset")
    if not isinstance(dataset, str) or not os.path.isfile(os.path.join(dataset, "sake_manifest.json")):
        return None
    try:
        manifest = load_manifest(dataset)
    except PredictionsError:
        return None
    if header.get("dataset_fingerprint") != manifest.get("fingerprint"):
        return None
    return manifest
