"""Score a predictions file into a results JSON.

Python API (stable; the leaderboard calls it):

    score_predictions(predictions, *, protocol=None, prefilter=None, judge=None, manifest=None, max_failed=0,
                      header=None, model=DEFAULT_MODEL, base_url=None, cache_dir=None, max_workers=8,
                      batch=False, batch_state=None, reasoning_effort="minimal", max_retries=5,
                      retry_backoff=1.0, items_out=None) -> dict

    predictions: path of a predictions JSONL (header line + rows, ARCHITECTURE.md; read by the strict reader
                 `eval.sake_metric.predictions_file`), a list of such paths (the parts of one run written one
                 attribute each, `join_parts`; the results then name them under `parts`), or an iterable of row
                 dicts (optionally starting with a `kind: header` dict).
    protocol:    "paper" (App. E: empty -> exact -> LLM judge with `model`, `base_url`, `cache_dir`, ...) or
                 "offline" (empty -> exact -> choice; undecided items count as incorrect/inconsistent).
                 Default: "paper" when `judge` is "openai" or an `LLMJudge`, "offline" when it is "offline";
                 with neither given, "paper" when OPENAI_API_KEY is set, else "offline".
    prefilter:   None, or "choice" (paper protocol only): the multiple-choice matcher decides before the LLM
                 where it can; recorded as protocol "paper+choice".
    judge:       kept for older callers: "offline", "openai" (= protocol "paper") or a ready `LLMJudge`.
    manifest:    a release manifest dict or path (`sake_manifest.json` or its folder): the rows must cover
                 exactly its item keys for the run's configs/split/mode/limit. Default: the manifest of the
                 header's dataset folder when it exists here with the same fingerprint, else no such check.
    max_failed:  items allowed to stay without a well-formed LLM verdict (counted wrong and listed); more
                 raise `JudgeFailures` naming the count and the first item id.
    header:      overrides the file's header (model, method, mode, dataset_fingerprint, versions, date).
    items_out:   optional path: write one JSON line per item (item_id, gap, stage, passed, degeneration).
    returns:     the results JSON dict (ARCHITECTURE.md "Results JSON", `judge.protocol` included).
    raises:      `PredictionsError` (bad input), `JudgeError` (no key, key refused, server unreachable,
                 retries exhausted), `JudgeFailures` -- each with a one-line message.

CLI:
    python -m eval.score PREDICTIONS.jsonl [PART.jsonl ...] [--judge offline|openai] [--prefilter choice]
                         [--max-failed N] [--base-url URL] [--model M] [--manifest DIR] [--out results.json]
                         [--cache-dir DIR] [--batch --batch-state FILE] [--items-out F]

Default judge: `openai` (the paper protocol) when OPENAI_API_KEY is set, else `offline`; offline results are
printed with one line saying they are not comparable with the paper's.
Exit status: 0 written; 2 bad input; 3 judge error or too many failed items (nothing written).
No torch, no evaluate: this imports only the metric's own modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeGuard, cast

from eval.sake_metric.llm_judge import DEFAULT_MODEL, JudgeConfig, JudgeError, LLMJudge, default_cache_dir
from eval.sake_metric.predictions_file import check_complete, load_manifest, manifest_for
from eval.sake_metric.rows import PredictionRow, PredictionsError, load_predictions
from eval.sake_metric.scoring import (NOT_COMPARABLE_LINE, JudgeFailures, build_results, check_failures,
                                      default_protocol, judge_rows, protocol_name)
from sake_core.atomic import atomic_write
from sake_core.errors import ConfigError, error_prefix, user_errors
from sake_core.command import command_prog
from sake_core.protocol import CONFIGS
from sake_core.run_header import resume_differences

logger = logging.getLogger(__name__)

__all__ = ["score_predictions", "make_judge", "write_json_atomic", "PredictionsError", "JudgeError",
           "JudgeFailures", "resolve_protocol", "add_judge_arguments", "judge_options", "main"]


def make_judge(
    judge: str | LLMJudge = "offline", *, model: str = DEFAULT_MODEL, base_url: str | None = None,
    cache_dir: str | os.PathLike | None = None, max_workers: int = 8, batch: bool = False,
    batch_state: str | os.PathLike | None = None, reasoning_effort: str | None = "minimal",
    max_retries: int = 5, seed: int = 0, retry_backoff: float = 1.0,
) -> str | LLMJudge:
    """"offline" stays a string; "openai" becomes an `LLMJudge` with these settings; a judge passes through."""
    if isinstance(judge, LLMJudge):
        return judge
    if judge == "offline":
        return "offline"
    if judge != "openai":
        raise ValueError(f"judge must be 'offline' or 'openai', got {judge!r}")
    config = JudgeConfig(model=model, base_url=base_url, seed=seed, reasoning_effort=reasoning_effort,
                         max_workers=max_workers, max_retries=max_retries, retry_backoff=retry_backoff,
                         cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
                         batch=batch, batch_state=batch_state)
    return LLMJudge(config)


def resolve_protocol(protocol: str | None, judge: str | LLMJudge | None) -> tuple[str, str | LLMJudge]:
    """(protocol, judge) from what a caller gave: the protocol wins; "paper" needs an LLM judge."""
    uses_llm = isinstance(judge, LLMJudge) or judge == "openai"
    if protocol is None:
        protocol = "paper" if uses_llm else "offline" if judge == "offline" else default_protocol()
    protocol_name(protocol)
    if protocol == "paper":
        if judge == "offline":
            raise ValueError("protocol 'paper' needs the LLM judge; judge='offline' contradicts it")
        return protocol, judge if uses_llm and judge is not None else "openai"
    if uses_llm:
        raise ValueError("protocol 'offline' uses no LLM judge; drop judge='openai' or use protocol='paper'")
    return protocol, "offline"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON (sorted keys off, stable order) atomically (:func:`sake_core.atomic.atomic_write`)."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _load_file(path: str | os.PathLike, manifest: Mapping[str, Any] | None,
               header: Mapping[str, Any] | None = None) -> tuple[dict | None, list]:
    """One predictions file's (header, rows), ``header`` overriding the file's; without a `manifest`, a file whose
    own dataset folder is here must hold every item of it (a file missing items is refused)."""
    file_header, rows = load_predictions(path, header=header, manifest=manifest)
    if manifest is None and file_header:
        found = manifest_for(file_header)
        if found is not None:
            check_complete(file_header, [(i + 2, {"item_id": r.item_id, "gap": r.gap}) for i, r in enumerate(rows)],
                           source=os.fspath(path), manifest=found)
    return file_header, rows


def join_parts(paths: Sequence[str | os.PathLike], manifest: Mapping[str, Any] | None = None,
               ) -> tuple[dict[str, Any], list[PredictionRow]]:
    """One run written as several predictions files, one per attribute (``sake run --config emotion`` and so on):
    their rows as one run's, under a header whose ``configs`` is their union and ``date`` the latest.

    The files must agree on every resume field of the run header (as a resume compares them,
    ``sake_core.run_header.resume_differences``: model, method, hparams, dataset, split, seed, limit, generation, ...)
    but ``configs``, and their configs must not overlap. The parts are
    taken in the protocol's order of their configs, so the joined rows (and the results' bytes) do not depend on
    the order the paths are given in."""
    names = [Path(p).name for p in paths]
    if len(set(names)) < len(names):
        raise PredictionsError(f"the parts of one run need different file names (the results name them, and the "
                               f"report finds them beside the results): {sorted(names)}")
    parts = []
    for path in paths:
        header, rows = _load_file(path, manifest)
        if not header or not header.get("configs"):
            raise PredictionsError(f"{os.fspath(path)}: a run header with 'configs' is needed to join it with other "
                                   "predictions files")
        parts.append((os.fspath(path), header, rows))
    order = {config: i for i, config in enumerate(CONFIGS)}
    parts.sort(key=lambda part: min(order.get(c, len(order)) for c in part[1]["configs"]))
    first, header, _ = parts[0]
    seen: dict[str, str] = {}  # config -> the part holding it
    for source, other, _ in parts:
        differ = [k for k in resume_differences(header, other) if k != "configs"]
        if differ:
            raise PredictionsError(f"{source}: not the same run as {first}: header field(s) {differ} differ (only "
                                   "'configs' may differ between the parts of one run)")
        for config in other["configs"]:
            if config in seen:
                raise PredictionsError(f"{source}: config {config!r} is also in {seen[config]}: the parts of one run "
                                       "must hold different configs")
            seen[config] = source
    joined = dict(header)
    joined["configs"] = [c for _, h, _ in parts for c in h["configs"]]
    dates = [h["date"] for _, h, _ in parts if isinstance(h.get("date"), str)]
    joined["date"] = max(dates) if dates else header.get("date")
    joined.pop("expected_rows", None)
    return joined, [row for _, _, rows in parts for row in rows]


def score_predictions(
    predictions: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[Mapping[str, Any]], *,
    protocol: str | None = None,
    prefilter: str | None = None, judge: str | LLMJudge | None = None,
    manifest: Mapping[str, Any] | str | os.PathLike | None = None, max_failed: int = 0,
    header: Mapping[str, Any] | None = None, model: str = DEFAULT_MODEL, base_url: str | None = None,
    cache_dir: str | os.PathLike | None = None, max_workers: int = 8, batch: bool = False,
    batch_state: str | os.PathLike | None = None, reasoning_effort: str | None = "minimal",
    max_retries: int = 5, retry_backoff: float = 1.0, items_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Validate, judge and aggregate predictions under a protocol; return the results JSON dict (module doc)."""
    protocol, judge = resolve_protocol(protocol, judge)
    name = protocol_name(protocol, prefilter)
    if isinstance(manifest, (str, os.PathLike)):
        manifest = load_manifest(manifest)
    if isinstance(predictions, (str, os.PathLike)):
        file_header, rows = _load_file(predictions, manifest, header)
    elif _is_paths(predictions):
        file_header, rows = join_parts(predictions, manifest)
        file_header = dict(header) if header is not None else file_header
    else:
        file_header, rows = load_predictions(cast(Iterable[Mapping[str, Any]], predictions), header=header,
                                             manifest=manifest)
    the_judge = make_judge(judge, model=model, base_url=base_url, cache_dir=cache_dir, max_workers=max_workers,
                           batch=batch, batch_state=batch_state, reasoning_effort=reasoning_effort,
                           max_retries=max_retries, retry_backoff=retry_backoff)
    verdicts = judge_rows(rows, the_judge, protocol=protocol, prefilter=prefilter)
    check_failures(verdicts, max_failed)
    if items_out is not None:
        _write_jsonl_atomic(items_out, (v.as_dict() for v in verdicts))
    results = build_results(file_header, verdicts, the_judge, name)
    if _is_paths(predictions):
        results["parts"] = sorted(Path(p).name for p in predictions)
    return results


def _is_paths(predictions: object) -> TypeGuard[Sequence[str | os.PathLike]]:
    """A non-empty list or tuple of paths (the parts of one run), not an iterable of row dicts."""
    return (isinstance(predictions, (list, tuple)) and bool(predictions)
            and all(isinstance(p, (str, os.PathLike)) for p in predictions))


def add_judge_arguments(p: argparse.ArgumentParser) -> None:
    """The judge options of every command that scores predictions (``eval.score``, ``eval.report``), declared once;
    :func:`judge_options` turns them into keyword arguments of :func:`score_predictions`."""
    p.add_argument("--judge", choices=("offline", "openai"), default=None,
                   help="offline: offline protocol (empty -> exact -> choice; undecided -> incorrect); "
                        "openai: the paper protocol (empty -> exact -> LLM judge, App. E) (default: openai when "
                        "OPENAI_API_KEY is set, else offline)")
    p.add_argument("--prefilter", choices=("choice",), default=None,
                   help="with --judge openai: let the multiple-choice matcher decide before the LLM where it can "
                        "(protocol 'paper+choice'; fewer requests, not the paper's protocol)")
    p.add_argument("--max-failed", type=int, default=0, metavar="N",
                   help="items allowed to stay without a well-formed LLM verdict (counted wrong, listed); more "
                        "make the command fail without writing results (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="judge model (default: %(default)s)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: the OpenAI API)")
    p.add_argument("--reasoning-effort", default="minimal",
                   help="reasoning_effort sent to the judge; 'none' to omit it (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="verdict cache directory (default: $SAKE_JUDGE_CACHE "
                   "or ~/.cache/sake/judge)")
    p.add_argument("--max-workers", type=int, default=8, help="concurrent judge requests (default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries of a request refused with 429/5xx or lost (default: %(default)s)")
    p.add_argument("--retry-backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubled each retry (default: %(default)s)")


def judge_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`score_predictions` from the options of :func:`add_judge_arguments`
    (ConfigError for a prefilter without the LLM judge). No ``--judge``: the paper protocol when OPENAI_API_KEY is
    set, else the offline one (:func:`eval.sake_metric.scoring.default_protocol`)."""
    if args.judge is None:
        args.judge = "openai" if default_protocol() == "paper" else "offline"
    if args.prefilter and args.judge != "openai":
        raise ConfigError("--prefilter choice applies to the paper protocol (--judge openai); the offline protocol "
                          "already ends with the choice stage")
    effort = None if args.reasoning_effort.lower() == "none" else args.reasoning_effort
    return {"judge": args.judge, "prefilter": args.prefilter, "max_failed": args.max_failed, "model": args.model,
            "base_url": args.base_url, "reasoning_effort": effort, "cache_dir": args.cache_dir,
            "max_workers": args.max_workers, "max_retries": args.max_retries, "retry_backoff": args.retry_backoff}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("python -m eval.score"), description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", nargs="+",
                   help="predictions JSONL written by editors/run.py (header line + rows); several files of one run "
                        "written one attribute each (--config) are scored as one run (--out needed)")
    add_judge_arguments(p)
    p.add_argument("--manifest", default=None,
                   help="dataset manifest (sake_manifest.json or its folder): refuse a file missing any of its "
                        "items (default: the header's dataset folder when present here)")
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


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    options = judge_options(args)
    if len(args.predictions) > 1 and not args.out:
        raise ConfigError("several predictions files are scored as one run: name its results file with --out")
    predictions = args.predictions[0] if len(args.predictions) == 1 else args.predictions
    out = Path(args.out) if args.out else default_results_path(predictions)
    batch_state = args.batch_state or (str(out) + ".batch.json" if args.batch else None)
    try:
        results = score_predictions(predictions, manifest=args.manifest, batch=args.batch,
                                    batch_state=batch_state, items_out=args.items_out, **options)
    except PredictionsError as exc:
        print(f"{error_prefix()}error: {exc}", file=sys.stderr)
        return 2
    except (JudgeError, JudgeFailures) as exc:
        print(f"{error_prefix()}error: {exc}", file=sys.stderr)
        return 3
    write_json_atomic(out, results)
    overall = results["metrics"]["overall"]
    summary = ", ".join(f"{k}={overall[k]:.2f}" for k in ("reliability", "generality", "locality_audio",
                                                            "locality_text", "portability")
                        if overall.get(k) is not None)
    shares = ", ".join(f"{k}={v:.3f}" for k, v in results["judge"]["stage_share"].items() if v)
    judge = results["judge"]
    sent = f"; {judge['requests_sent']} request(s) sent" if "requests_sent" in judge else ""
    hit = results["generation"]["hit_max_new_tokens"]
    print(f"wrote {out} ({judge['protocol']} protocol): {summary}; judge stages: {shares}{sent}; "
          f"degeneration={results['degeneration_rate']}"
          + (f"; {hit} output(s) stopped at max_new_tokens" if hit else ""))
    if judge["protocol"] == "offline":
        print(NOT_COMPARABLE_LINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
