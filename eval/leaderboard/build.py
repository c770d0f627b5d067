"""Build the static leaderboard site from a results directory (no server code, no CDN, no external libraries).

``SITE_DIR`` receives ``index.html``, ``board.css``, ``board.js`` (copied from this package), ``data.js`` (the rows,
as ``window.SAKE_BOARD = {...}`` so the page also works from ``file://``) and ``submissions/<id>.json`` (each
row's metadata link). The paper's own numbers (``reference_rows.json``) are added as reference rows: marked, never
ranked (no rank, not counted, never the best value). Scored rows carry their ranking group (``store.ranking_group``:
protocol label, judge model and host, prompt version, dataset fingerprint); the page ranks and marks the best
value within one group only.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

from sake_core.atomic import write_tree
from sake_core.protocol import METHOD_NAMES, METHOD_ORDER, method_display

from .store import check_results, dump_json, group_key, group_label, load_json_file, ranking_group, result_protocol

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
STATIC_DIR = PACKAGE_DIR  # index.html, board.css, board.js sit beside this module (package data)
REFERENCE_PATH = PACKAGE_DIR / "reference_rows.json"
STATIC_FILES = ("index.html", "board.css", "board.js")


def judge_label(judge: dict[str, Any] | None, with_undecided: bool = True) -> str:
    """A short human label for a results JSON's ``judge`` block (name: model @ host (version), share undecided)."""
    if not judge:
        return "unknown"
    parts = [str(judge.get("name") or "judge")]
    if judge.get("model"):
        parts.append(str(judge["model"]) + (f" @ {judge['host']}" if judge.get("host") else ""))
    label = ": ".join(parts)
    if judge.get("version"):
        label += f" ({judge['version']})"
    undecided = (judge.get("stage_share") or {}).get("undecided")
    if undecided and with_undecided:
        label += f", {100 * undecided:.0f}% undecided"
    return label


def read_results(results_dir: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``[(id, results JSON)]`` from ``RESULTS_DIR/results/*.json`` (or ``RESULTS_DIR/*.json``), sorted by id."""
    root = Path(results_dir)
    folder = root / "results" if (root / "results").is_dir() else root
    out = []
    for path in sorted(folder.glob("*.json")):
        result = load_json_file(path)
        check_results(result, str(path))
        sid = (result.get("submission") or {}).get("id") or path.stem
        out.append((sid, result))
    return out


def display_model_name(model: str) -> str:
    """How a submitted model id is shown: Hub ids as they are, a local directory path by its last component."""
    if model.startswith(("/", "./", "../", "~")) or "\\" in model:
        return model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return model


def submission_row(sid: str, result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The board row of one scored result, and the JSON its metadata link points to (None without metadata)."""
    sub = result.get("submission") or {}
    metadata = sub.get("metadata") or {}
    header = sub.get("header") or {}
    row = {
        "id": sid,
        "reference": False,
        "model": result["model"],
        "model_display": result.get("model_display") or display_model_name(result["model"]),
        "model_link": metadata.get("model_link") or "",
        "method": result["method"],
        "method_name": method_display(result["method"], result.get("method_display_name"),
                                      result.get("method_display_order"))[0],
        "method_order": _finite(method_display(result["method"], result.get("method_display_name"),
                                               result.get("method_display_order"))[1]),
        "mode": result["mode"],
        "submitter": metadata.get("submitter") or "",
        "source": "submission",
        "link": f"submissions/{sid}.json" if sub else "",
        "judge": judge_label(result.get("judge")),
        "judge_base": judge_label(result.get("judge"), with_undecided=False),
        "judge_stages": (result.get("judge") or {}).get("stage_share") or {},
        "protocol": result_protocol(result),
        **_group_fields(ranking_group(result)),
        "metrics": result["metrics"],
        "degeneration_rate": result.get("degeneration_rate"),
        "configs": header.get("configs") or [],
        "split": header.get("split") or "",
        "n_rows": result.get("n_rows"),
        "date": sub.get("added") or result.get("date") or "",
    }
    detail = None
    if sub:
        detail = {"id": sid, "metadata": metadata, "header": header, "judge": result.get("judge"),
                  "n_rows": result.get("n_rows"), "dataset_fingerprint": result.get("dataset_fingerprint"),
                  "versions": result.get("versions"), "added": sub.get("added")}
    return row, detail


def _group_fields(group: dict[str, Any]) -> dict[str, Any]:
    """A board row's ranking-group fields: the group's values, its key and its label."""
    return {"judge_model": group["judge_model"], "judge_host": group["judge_host"],
            "prompt_version": group["prompt_version"], "dataset_fingerprint": group["dataset_fingerprint"],
            "group": group_key(group), "group_label": group_label(group)}


#: The ranking group of the paper's reported rows: shown, never ranked (no rank, not counted, never best).
REFERENCE_GROUP = {"group": "reference", "group_label": "reported in the paper (reference rows, not ranked)",
                   "judge_model": None, "judge_host": None, "prompt_version": None, "dataset_fingerprint": None}


def reference_rows(path: str | os.PathLike = REFERENCE_PATH) -> tuple[list[dict[str, Any]], str]:
    """The paper's reported rows as board rows, and the note describing them."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    judge = (data.get("judge") or {}).get("label") or judge_label(data.get("judge"))
    rows = []
    for ref in data["rows"]:
        rows.append({
            "id": f"paper:{ref['model']}:{ref['method']}:{ref['mode']}",
            "reference": True,
            "model": ref["model"],
            "model_display": ref.get("model_display") or ref["model"],
            "model_link": "",
            "family": ref["family"],
            "method": ref["method"],
            "method_name": method_display(ref["method"])[0],
            "method_order": _finite(method_display(ref["method"])[1]),
            "mode": ref["mode"],
            "submitter": "reported in the paper",
            "source": ref["source"],
            "source_detail": ref.get("source_detail") or ref["source"],
            "link": "#reference-note",
            "judge": judge,
            "judge_base": judge,
            "judge_stages": {},
            "protocol": "paper",
            **REFERENCE_GROUP,
            "metrics": ref["metrics"],
            "degeneration_rate": ref.get("degeneration_rate"),
            "overall_note": ref.get("overall_note", ""),
            "portability_category_spread": ref.get("portability_category_spread"),
            "configs": [], "split": "test", "n_rows": None, "date": "",
        })
    return rows, data.get("note", "")


def board_data(results_dir: str | os.PathLike, include_reference: bool = True) -> tuple[dict, dict[str, dict]]:
    """The page's data object and the per-submission detail JSONs."""
    rows, details = [], {}
    for sid, result in read_results(results_dir):
        row, detail = submission_row(sid, result)
        rows.append(row)
        if detail is not None:
            details[sid] = detail
    note = ""
    if include_reference:
        refs, note = reference_rows()
        rows.extend(refs)
    dates = [row["date"] for row in rows if row["date"]]
    data = {"format": 1, "generated": max(dates) if dates else "", "reference_note": note, "rows": rows,
            "methods": board_methods(rows)}
    return data, details


def _finite(order: float) -> float | None:
    """A display order for JSON (no Infinity in data.js): None for "after every known method"."""
    return order if math.isfinite(order) else None


def board_methods(rows: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """``[{"id", "name"}]`` for the board: the paper's eight methods (in its order) and every method on the board,
    in display order, named as the rows record them (the page takes names and order from here)."""
    known: dict[str, tuple[float, str]] = {m: (float(i), METHOD_NAMES[m]) for i, m in enumerate(METHOD_ORDER)}
    for row in rows:
        order = row.get("method_order")
        known.setdefault(row["method"], (float("inf") if order is None else float(order),
                                         row.get("method_name") or row["method"]))
    ids = sorted(known, key=lambda m: (known[m][0], m))
    return [{"id": m, "name": known[m][1]} for m in ids]


def build_site(results_dir: str | os.PathLike, out_dir: str | os.PathLike,
               include_reference: bool = True) -> Path:
    """Build the static board for ``results_dir`` into ``out_dir``; same inputs give byte-identical files."""
    data, details = board_data(results_dir, include_reference=include_reference)
    payload = json.dumps(data, sort_keys=True, ensure_ascii=True, separators=(",", ":"),
                         allow_nan=False).replace("</", "<\\/")
    files = {name: (STATIC_DIR / name).read_bytes() for name in STATIC_FILES}
    files["data.js"] = f"window.SAKE_BOARD = {payload};\n".encode("ascii")
    for sid, detail in details.items():
        files[f"submissions/{sid}.json"] = dump_json(detail)
    write_tree(Path(out_dir), files)
    n_sub = sum(1 for row in data["rows"] if not row["reference"])
    logger.info("built %s: %d submitted row(s), %d reference row(s)", out_dir, n_sub, len(data["rows"]) - n_sub)
    return Path(out_dir)
