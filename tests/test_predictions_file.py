"""The strict predictions-file reader (eval/sake_metric/predictions_file.py): one-line errors, completeness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.sake_metric.limits import MAX_INT_DIGITS, MAX_ROW_DEPTH
from eval.sake_metric.predictions_file import (PredictionsError, expected_keys, parse_predictions,
                                               read_predictions_file)
from tests._metric_helpers import demo_rows, header, write_predictions

REPO = Path(__file__).resolve().parents[1]


def _file(tmp_path: Path, head: dict | None = None, rows: list[dict] | None = None) -> Path:
    rows = demo_rows() if rows is None else rows
    return write_predictions(tmp_path / "p.jsonl", header(expected_rows=len(rows)) if head is None else head, rows)


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(PredictionsError) as info:
        read_predictions_file(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_reads_header_and_rows_with_line_numbers(tmp_path):
    path = _file(tmp_path)
    read = read_predictions_file(path)
    assert read.header["kind"] == "header"
    assert [n for n, _ in read.rows[:3]] == [2, 3, 4]
    assert len(read.rows) == len(demo_rows())


@pytest.mark.parametrize("cut", [1, 10])
def test_file_cut_at_a_line_boundary_is_refused(tmp_path, cut):
    path = _file(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-cut]))
    message = _error(path)
    assert f"{len(lines) - 1 - cut} prediction rows" in message and "expected_rows" in message


def test_missing_header_is_refused(tmp_path):
    path = write_predictions(tmp_path / "p.jsonl", None, demo_rows())
    assert "line 1: expected the run header" in _error(path)


def test_binary_and_non_utf8(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert "binary content" in _error(path)
    good = _file(tmp_path).read_bytes()
    cut = good.index(b"\n") + 30
    path.write_bytes(good[:cut] + b"\xff" + good[cut:])
    message = _error(path)
    assert f"byte offset {cut}" in message and "line 2" in message and "not UTF-8" in message


def test_deep_nesting_nan_big_int_surrogate_duplicate_key(tmp_path):
    rows = demo_rows()
    base = json.dumps(rows[0])
    cases = {
        "nested": base[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}",
        "finite": base.replace('"type": 0', '"type": NaN'),
        "not finite": base.replace('"type": 0', '"type": 1e999'),
        "digits": base.replace('"type": 0', '"type": ' + "9" * (MAX_INT_DIGITS + 1)),
        "surrogate": base.replace('"post_edit": "', '"post_edit": "\\ud800'),
        "duplicate": base[:-1] + ', "type": 0}',
    }
    for expected, line in cases.items():
        path = tmp_path / f"{expected}.jsonl"
        path.write_text(json.dumps(header(expected_rows=1)) + "\n" + line + "\n")
        assert expected in _error(path), expected
    # brackets inside strings do not count as nesting; a paired surrogate escape is fine
    ok = dict(rows[0], post_edit="[[[[[[{{{{ \ud83d\ude00")
    path = write_predictions(tmp_path / "ok.jsonl", header(expected_rows=1), [ok])
    assert read_predictions_file(path).rows[0][1]["post_edit"].endswith("\U0001F600")
    nested = dict(rows[0], options=[["x"]] if MAX_ROW_DEPTH < 3 else [[["x"]]])
    path = write_predictions(tmp_path / "n.jsonl", header(expected_rows=1), [nested])
    assert "nested" in _error(path)


def test_blank_line_second_header_and_long_line(tmp_path):
    path = _file(tmp_path)
    text = path.read_text().split("\n")
    path.write_text("\n".join(text[:3] + [""] + text[3:]))
    assert "line 4: blank line" in _error(path)
    path.write_text("\n".join(text[:2] + [text[0]] + text[2:]))
    assert "line 3: a second run header" in _error(path)


def test_manifest_item_ids(tmp_path):
    rows = demo_rows()
    ids = [r["item_id"] for r in rows]
    manifest = {"fingerprint": "f" * 64, "item_ids": {"animal": {"test": ids + ["animal/test/000009/rel"]}}}
    head = header()
    path = write_predictions(tmp_path / "p.jsonl", head, rows)
    message = _error(path, manifest=manifest)
    assert "1 of the" in message and "animal/test/000009/rel" in message
    manifest["item_ids"]["animal"]["test"] = ids
    assert len(read_predictions_file(path, manifest=manifest).rows) == len(rows)
    # a limited run needs only its first instances
    limited = write_predictions(tmp_path / "l.jsonl", header(limit=1, configs=["animal"]),
                                [r for r in rows if r["instance_id"] == "animal/test/000000"])
    manifest["item_ids"]["animal"]["test"] = [i for i in ids if i.startswith("animal/")]
    assert read_predictions_file(limited, manifest=manifest)


def test_sequential_expected_keys():
    ids = [f"sequential/test/seq00/step{s:02d}/rel" for s in range(1, 8)]
    keys = expected_keys({"item_ids": {"sequential": {"test": ids}}},
                         {"mode": "sequential", "split": "test", "configs": ["sequential"]})
    # steps 1..5 evaluated at gaps 0..5 while step + gap <= 7
    assert len(keys) == 6 + 6 + 5 + 4 + 3
    assert (ids[4], 2) in keys and (ids[4], 3) not in keys and not any(k[0] == ids[5] for k in keys)


def test_bytes_entry_point_names_the_source():
    with pytest.raises(PredictionsError, match=r"^predictions.jsonl: empty file"):
        parse_predictions(b"", "predictions.jsonl")


def test_score_cli_one_line_errors(tmp_path):
    cut = _file(tmp_path)
    cut.write_text("".join(cut.read_text().splitlines(keepends=True)[:-1]))
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(bytes(range(256)))
    for path in (cut, binary):
        proc = subprocess.run([sys.executable, "-m", "eval.score", str(path), "--judge", "offline"], cwd=REPO,
                              capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and str(path) in proc.stderr
        assert not path.with_name(path.stem + ".results.json").exists()
