"""Score a predictions file into a results JSON.

Python API (stable; the leaderboard calls it):

    score_predictions(predictions, *, judge="offline", header=None, model=DEFAULT_MODEL, base_url=None,
                      cache_dir=None, max_workers=8, batch=False, batch_state=None,
                      reasoning_effort="minimal", items_out=None) -> dict

    predictions: path of a predictions JSONL (header line + rows, ARCHITECTURE.md) or an iterable of row
                 dicts (optionally starting with a `kind: header` dict).
    judge:       "offline" (stages empty / exact / choice; undecided items count as incorrect/inconsistent
                 and are reported as the `undecided` share), "openai" (then the LLM judge with `model`,
                 `base_url`, `cache_dir`, ...), or a ready `eval.sake_metric.llm_judge.LLMJudge`.
    header:      overrides the file's header (model, method, mode, dataset_fingerprint, versions, date).
    items_out:   optional path: write one JSON line per item (item_id, gap, stage, passed, degeneration).
    returns:     the results JSON dict (ARCHITECTURE.md "Results JSON"); raises
                 `eval.sake_metric.rows.PredictionsError` (a ValueError) on bad input, naming line and field.

CLI:
    python -m eval.score PREDICTIONS.jsonl [--judge offline|openai] [--base-url URL] [--model M]
                         [--out results.json] [--cache-dir DIR] [--batch --batch-state FILE] [--items-out F]

No torch, no evaluate: this imports only the metric's own modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from eval.sake_metric.llm_judge import DEFAULT_MODEL, JudgeConfig, LLMJudge, default_cache_dir
from eval.sake_metric.rows import PredictionsError, load_predictions
from eval.sake_metric.scoring import build_results, judge_rows
from sake.atomic import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["score_predictions", "make_judge", "write_json_atomic", "PredictionsError", "main"]


def make_judge(
    judge: str | LLMJudge = "offline", *, model: str = DEFAULT_MODEL, base_url: str | None = None,
    cache_dir: str | os.PathLike | None = None, max_workers: int = 8, batch: bool = False,
    batch_state: str | os.PathLike | None = None, reasoning_effort: str | None = "minimal",
    max_retries: int = 5, seed: int = 0,
) -> str | LLMJudge:
    """"offline" stays a string; "openai" becomes an `LLMJudge` with these settings; a judge passes through."""
    if isinstance(judge, LLMJudge):
        return judge
    if judge == "offline":
        return "offline"
    if judge != "openai":
        raise ValueError(f"judge must be 'offline' or 'openai', got {judge!r}")
    config = JudgeConfig(model=model, base_url=base_url, seed=seed, reasoning_effort=reasoning_effort,
                         max_workers=max_workers, max_retries=max_retries,
                         cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
                         batch=batch, batch_state=batch_state)
    return LLMJudge(config)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON (sorted keys off, stable order) atomically (:func:`sake.atomic.atomic_write`)."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def score_predictions(
    predictions: str | os.PathLike | Iterable[Mapping[str, Any]], *, judge: str | LLMJudge = "offline",
    header: Mapping[str, Any] | None = None, model: str = DEFAULT_MODEL, base_url: str | None = None,
    cache_dir: str | os.PathLike | None = None, max_workers: int = 8, batch: bool = False,
    batch_state: str | os.PathLike | None = None, reasoning_effort: str | None = "minimal",
    items_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Validate, judge and aggregate predictions; return the results JSON dict (see module doc)."""
    file_header, rows = load_predictions(predictions, header=header)
    the_judge = make_judge(judge, model=model, base_url=base_url, cache_dir=cache_dir, max_workers=max_workers,
                           batch=batch, batch_state=batch_state, reasoning_effort=reasoning_effort)
    verdicts = judge_rows(rows, the_judge)
    if items_out is not None:
        _write_jsonl_atomic(items_out, (v.as_dict() for v in verdicts))
    return build_results(file_header, verdicts, the_judge)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", help="predictions JSONL written by editors/run.py (header line + rows)")
    p.add_argument("--judge", choices=("offline", "openai"), default="offline",
                   help="offline: deterministic stages only (undecided -> incorrect); openai: + LLM judge")
    p.add_argument("--model", default=DEFAULT_MODEL, help="judge model (default: %(default)s)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: the OpenAI API)")
    p.add_argument("--reasoning-effort", default="minimal",
                   help="reasoning_effort sent to the judge; 'none' to omit it (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="verdict cache directory (default: $SAKE_JUDGE_CACHE "
                   "or ~/.cache/sake/judge)")
    p.add_argument("--max-workers", type=int, default=8, help="concurrent judge requests (default: %(default)s)")
    p.add_argument("--batch", action="store_true", help="use the Batch API (submit, poll, collect)")
    p.add_argument("--batch-state", default=None, help="batch state file for resuming (default: OUT.batch.json)")
    p.add_argument("--out", default=None, help="results JSON path (default: PREDICTIONS with .results.json)")
    p.add_argument("--items-out", default=None, help="optional per-item verdicts JSONL")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def default_results_path(predictions: str | os.PathLike) -> Path:
    """`run/predictions.jsonl` -> `run/predictions.results.json`."""
    path = Path(predictions)
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".results.json")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out) if args.out else default_results_path(args.predictions)
    batch_state = args.batch_state or (str(out) + ".batch.json" if args.batch else None)
    effort = None if args.reasoning_effort.lower() == "none" else args.reasoning_effort
    try:
        results = score_predictions(args.predictions, judge=args.judge, model=args.model, base_url=args.base_url,
                                    cache_dir=args.cache_dir, max_workers=args.max_workers, batch=args.batch,
                                    batch_state=batch_state, reasoning_effort=effort, items_out=args.items_out)
    except PredictionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(out, results)
    overall = results["metrics"]["overall"]
    summary = ", ".join(f"{k}={overall[k]:.2f}" for k in ("reliability", "generality", "locality_audio",
                                                            "locality_text", "portability")
                        if overall.get(k) is not None)
    shares = ", ".join(f"{k}={v:.3f}" for k, v in results["judge"]["stage_share"].items() if v)
    print(f"wrote {out}: {summary}; judge stages: {shares}; degeneration={results['degeneration_rate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
