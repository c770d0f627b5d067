"""Prediction rows: the fields the metric reads, loading a predictions JSONL and validating rows.

A predictions file (ARCHITECTURE.md, "Prediction rows") is JSONL: line 1 is the run header
(`{"kind": "header", "model", "method", "mode", ...}`), every other line one evaluated item
(`{"kind": "prediction", "instance_id", "item_id", "dimension", "type", "attribute", "question", "options",
"reference", "pre_edit", "post_edit", "gap", "category"}`).

Validation errors are `PredictionsError` (a `ValueError`) naming the file, the line (or row index) and the
field, and saying what was expected; a value is quoted as a short escaped excerpt (`excerpt`), never in full.
`validate_row` is the one list of row rules: scoring applies it, and the leaderboard's validator calls it for
every row, so a submission the board accepts is one scoring accepts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .limits import options_problem
from .predictions_file import PredictionsError, excerpt, read_predictions_file
# Dimensions, allowed `type` values per dimension, the fields every row carries and the modes: the protocol
# module (a copy of sake_core/protocol.py, so that this evaluate module stays self-contained).
from .protocol import (CONSISTENCY_DIMENSIONS, CORRECTNESS_DIMENSIONS, DIMENSIONS, MODES, OPTIONAL_ROW_FIELDS,
                       ROW_FIELDS, TYPES)

# Fields the metric itself needs (the evaluate module passes only these).
METRIC_FIELDS = (
    "item_id", "dimension", "type", "attribute", "reference", "pre_edit", "post_edit", "gap", "category",
    "options",
)
#: Optional row field written by editors/run.py: the post-edit output stopped at max_new_tokens.
HIT_LIMIT_FIELD, PRE_HIT_LIMIT_FIELD = OPTIONAL_ROW_FIELDS


@dataclass(frozen=True)
class PredictionRow:
    """One validated prediction row (only the fields the metric uses)."""

    item_id: str
    dimension: str
    type: int
    attribute: str
    reference: str
    pre_edit: str | None
    post_edit: str
    gap: int | None
    category: str
    options: tuple[str, ...]
    instance_id: str = ""
    question: str = ""
    hit_limit: bool | None = None  # the post-edit output stopped at max_new_tokens (None: not recorded)
    pre_hit_limit: bool | None = None  # the pre-edit output stopped at max_new_tokens (None: not recorded)

    @property
    def is_consistency(self) -> bool:
        """True for locality items (judged post-edit vs pre-edit output)."""
        return self.dimension in CONSISTENCY_DIMENSIONS


def _where(source: str, line: int | None, unit: str = "line") -> str:
    return f"{source}, {unit} {line}" if line is not None else source


def validate_row(
    raw: Mapping[str, Any], *, source: str = "<rows>", line: int | None = None,
    required: Iterable[str] = METRIC_FIELDS, unit: str = "line",
) -> PredictionRow:
    """Check one raw row and return it as a `PredictionRow`.

    `required`: fields that must be present as keys (values may be null where the interface allows).
    Raises `PredictionsError` naming `source`/`line` and the field.
    """
    where = _where(source, line, unit)
    if not isinstance(raw, Mapping):
        raise PredictionsError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [f for f in required if f not in raw]
    if missing:
        raise PredictionsError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)}")
    kind = raw.get("kind", "prediction")
    if kind != "prediction":
        raise PredictionsError(f"{where}: field 'kind' must be 'prediction', got {excerpt(kind)}")

    def text(field: str, *, nullable: bool = False, default: str | None = "") -> str | None:
        value = raw.get(field, default)
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            expected = "a string or null" if nullable else "a string"
            raise PredictionsError(f"{where}: field {field!r} must be {expected}, got {excerpt(value)}")
        return value

    item_id = text("item_id")
    if not item_id:
        raise PredictionsError(f"{where}: field 'item_id' must be a non-empty string")
    dimension = text("dimension")
    if dimension not in DIMENSIONS:
        raise PredictionsError(
            f"{where}: field 'dimension' must be one of {', '.join(DIMENSIONS)}, got {excerpt(dimension)}")
    type_ = raw.get("type", 0)
    if isinstance(type_, bool) or not isinstance(type_, int) or type_ not in TYPES[dimension]:
        raise PredictionsError(
            f"{where}: field 'type' must be an int in {list(TYPES[dimension])} for dimension {dimension!r}, "
            f"got {excerpt(type_)}")
    attribute = text("attribute")
    if not attribute:
        raise PredictionsError(f"{where}: field 'attribute' must be a non-empty string")
    pre_edit = text("pre_edit", nullable=True, default=None)
    if dimension in CONSISTENCY_DIMENSIONS and pre_edit is None:
        raise PredictionsError(
            f"{where}: field 'pre_edit' must be a string for {dimension} items (locality compares the "
            f"post-edit output with the pre-edit output), got null")
    post_edit = raw.get("post_edit")
    if not isinstance(post_edit, str):
        raise PredictionsError(
            f"{where}: field 'post_edit' must be a string (the edited model's output), got {excerpt(post_edit)}")
    reference = text("reference", nullable=True, default="")
    if dimension in CORRECTNESS_DIMENSIONS and not (reference or "").strip():
        raise PredictionsError(
            f"{where}: field 'reference' must be a non-empty string for {dimension} items (correctness compares "
            f"the post-edit output with it), got {excerpt(reference)}")
    gap = raw.get("gap")
    if gap is not None and (isinstance(gap, bool) or not isinstance(gap, int) or gap < 0):
        raise PredictionsError(f"{where}: field 'gap' must be null or an int >= 0, got {excerpt(gap)}")
    category = text("category", nullable=True, default="") or ""
    options = raw.get("options")
    if options is None:
        options = []
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
        bad = options if not isinstance(options, (list, tuple)) else next(o for o in options if not isinstance(o, str))
        raise PredictionsError(f"{where}: field 'options' must be a list of strings, got "
                               f"{excerpt(options) if bad is options else 'an entry ' + excerpt(bad)}")
    too_many = options_problem(options)
    if too_many:
        raise PredictionsError(f"{where}: field 'options' holds {too_many}")
    flags = {}
    for name in (HIT_LIMIT_FIELD, PRE_HIT_LIMIT_FIELD):  # one rule for both generation-limit flags
        flags[name] = raw.get(name)
        if flags[name] is not None and not isinstance(flags[name], bool):
            raise PredictionsError(f"{where}: field {name!r} must be true, false or null, got {excerpt(flags[name])}")
    return PredictionRow(
        hit_limit=flags[HIT_LIMIT_FIELD], pre_hit_limit=flags[PRE_HIT_LIMIT_FIELD], item_id=item_id, dimension=dimension, type=type_, attribute=attribute, reference=reference or "",
        pre_edit=pre_edit, post_edit=post_edit, gap=gap, category=category, options=tuple(options),
        instance_id=str(raw.get("instance_id") or ""), question=str(raw.get("question") or ""),
    )


def validate_rows(
    raws: Iterable[tuple[int | None, Mapping[str, Any]]], *, source: str = "<rows>",
    required: Iterable[str] = METRIC_FIELDS, mode: str | None = None, unit: str = "line",
) -> list[PredictionRow]:
    """Validate (line, raw row) pairs: per-row checks, unique (item_id, gap), gaps consistent with `mode`.

    `unit` names what the numbers count in error messages ("line" of a file, "row" of a list).
    """
    required = tuple(required)
    rows: list[PredictionRow] = []
    seen: dict[tuple[str, int | None], int | None] = {}
    for line, raw in raws:
        row = validate_row(raw, source=source, line=line, required=required, unit=unit)
        key = (row.item_id, row.gap)
        if key in seen:
            first = seen[key]
            first_where = f"{unit} {first}" if first is not None else "an earlier row"
            gap_note = f" and gap {row.gap}" if row.gap is not None else ""
            raise PredictionsError(
                f"{_where(source, line, unit)}: duplicate field 'item_id' {excerpt(row.item_id)}{gap_note} "
                f"(already on {first_where}); rows must be unique by (item_id, gap)")
        seen[key] = line
        if mode == "single" and row.gap is not None:
            raise PredictionsError(
                f"{_where(source, line, unit)}: field 'gap' must be null in a single-mode run, got {row.gap}")
        if mode == "sequential" and row.gap is None:
            raise PredictionsError(
                f"{_where(source, line, unit)}: field 'gap' must be an int in a sequential-mode run, got null")
        rows.append(row)
    if mode is None and rows:
        with_gap = {r.gap is not None for r in rows}
        if len(with_gap) > 1:
            raise PredictionsError(
                f"{source}: field 'gap' is null on some rows and set on others; use null for single editing "
                "and an int for every row of a sequential run")
    return rows


def check_header(header: Mapping[str, Any] | None, *, source: str) -> None:
    """Check the few header fields the metric relies on (mode) of a header given with rows."""
    if header is None:
        return
    mode = header.get("mode")
    if mode is not None and mode not in MODES:
        raise PredictionsError(f"{source}, line 1: header field 'mode' must be one of {MODES}, got {excerpt(mode)}")


def load_predictions(
    predictions: str | os.PathLike | Iterable[Mapping[str, Any]], *, header: Mapping[str, Any] | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> tuple[dict | None, list[PredictionRow]]:
    """Load and validate predictions from a JSONL path or from an iterable of row dicts.

    A file goes through the strict reader (`predictions_file.read_predictions_file`: header required, size,
    encoding and JSON limits, complete against the header's `expected_rows` and, given one, the dataset
    `manifest`) and requires every field of ARCHITECTURE.md's prediction row. An iterable may start with a
    header dict (`kind: header`) and needs only `METRIC_FIELDS`. `header` overrides the file's or iterable's.
    """
    raws: list[tuple[int, Mapping[str, Any]]]
    if isinstance(predictions, (str, os.PathLike)):
        source = os.fspath(predictions)
        read = read_predictions_file(source, manifest=manifest)
        file_header, raws = read.header, list(read.rows)
        required: tuple[str, ...] = ROW_FIELDS
    else:
        source = "<rows>"
        file_header = None
        raws = []
        for index, obj in enumerate(predictions):
            if isinstance(obj, Mapping) and obj.get("kind") == "header":
                if file_header is not None or raws:
                    raise PredictionsError(f"{source}, row {index}: a 'kind: header' row must come first")
                file_header = dict(obj)
                continue
            raws.append((index, obj))
        required = METRIC_FIELDS
    use_header = dict(header) if header is not None else file_header
    check_header(use_header, source=source)
    mode = use_header.get("mode") if use_header else None
    unit = "row" if source == "<rows>" else "line"
    rows = validate_rows(raws, source=source, required=required, mode=mode, unit=unit)
    if not rows:
        raise PredictionsError(f"{source}: no prediction rows")
    return use_header, rows

