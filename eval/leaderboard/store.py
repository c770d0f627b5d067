"""Score validated submissions with the metric module and store their results JSON, atomically and idempotently.

Layout of a results store (a local directory, or the same paths in a Hub dataset repo)::

    results/<submission_id>.json                 results JSON (ARCHITECTURE.md) + a "submission" block
    submissions/<submission_id>/metadata.json    the submitter's metadata block
    submissions/<submission_id>/predictions.jsonl  the scored predictions (kept for re-scoring)

``results/<id>.json`` is written last and is the only file the board reads, so a crash at any point leaves either
a complete result or none. A submission that fails validation or scoring writes nothing.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from sake.atomic import atomic_write, replace_dir, staging_dir
from sake.protocol import METRIC_KEYS, MODES

from .validate import METADATA_NAME, PREDICTIONS_NAME, Submission, validate_submission

logger = logging.getLogger(__name__)

Scorer = Callable[..., dict]
RESULT_KEYS = ("model", "method", "mode", "dataset_fingerprint", "n_rows", "metrics", "judge")


class ResultsFormatError(ValueError):
    """A results JSON does not follow the contract of ARCHITECTURE.md."""


def check_results(result: Any, where: str = "results") -> None:
    """Raise :class:`ResultsFormatError` naming the field when ``result`` breaks the results JSON contract."""
    if not isinstance(result, dict):
        raise ResultsFormatError(f"{where}: expected a JSON object")
    for key in RESULT_KEYS:
        if key not in result:
            raise ResultsFormatError(f"{where}: missing field {key!r}")
    metrics = result["metrics"]
    if not isinstance(metrics, dict) or not isinstance(metrics.get("overall"), dict):
        raise ResultsFormatError(f"{where}: field metrics.overall must be an object")
    if result["mode"] not in MODES:
        raise ResultsFormatError(f"{where}: field mode must be 'single' or 'sequential', got {result['mode']!r}")
    for name, block in [("overall", metrics["overall"])] + \
            [(f"per_attribute.{k}", v) for k, v in (metrics.get("per_attribute") or {}).items()] + \
            [(f"per_gap.{k}", v) for k, v in (metrics.get("per_gap") or {}).items()]:
        if not isinstance(block, dict):
            raise ResultsFormatError(f"{where}: field metrics.{name} must be an object")
        for key in METRIC_KEYS:
            value = block.get(key)
            if value is not None and not isinstance(value, (int, float)):
                raise ResultsFormatError(f"{where}: field metrics.{name}.{key} must be a number or null")
    if not isinstance(result["judge"], dict):
        raise ResultsFormatError(f"{where}: field judge must be an object")


# ---------------------------------------------------------------------------------------------- scoring

def _default_scorer() -> Scorer:
    try:
        from eval.score import score_predictions
    except ImportError as exc:  # the metric module is a separate part of the toolkit
        raise RuntimeError("scoring needs eval.score.score_predictions (the SAKE metric module)") from exc
    return score_predictions


def score_submission(submission: Submission, judge: str = "openai", scorer: Scorer | None = None,
                     **judge_options: Any) -> dict[str, Any]:
    """Score a validated submission with the metric module; self-reported scores are never read.

    The predictions are handed to the scorer as the runner's JSONL file (a temporary copy). ``judge_options``
    (e.g. ``cache_dir``, ``base_url``, ``model``) are passed on where the scorer accepts them.
    """
    scorer = scorer or _default_scorer()
    accepted = inspect.signature(scorer).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    options = {k: v for k, v in judge_options.items() if v is not None and (takes_any or k in accepted)}
    dropped = sorted(set(k for k, v in judge_options.items() if v is not None) - set(options))
    if dropped:
        logger.warning("scorer does not take option(s) %s; ignored", ", ".join(dropped))
    with tempfile.TemporaryDirectory(prefix="sake-score-") as tmp:
        path = Path(tmp) / PREDICTIONS_NAME
        path.write_bytes(submission.predictions_bytes)
        result = scorer(str(path), judge=judge, **options)
    check_results(result, "scorer output")
    header = submission.header
    for key in ("model", "method", "mode"):
        if result[key] != header[key]:
            raise ResultsFormatError(f"scorer output: field {key} is {result[key]!r}, header says {header[key]!r}")
    return result


def board_result(submission: Submission, scored: dict[str, Any], added: str | None = None) -> dict[str, Any]:
    """The results JSON the board stores: the metric's results plus a ``submission`` block."""
    header = {k: v for k, v in submission.header.items() if k != "kind"}
    result = dict(scored)
    result["submission"] = {
        "id": submission.submission_id,
        "metadata": submission.metadata,
        "header": header,
        "added": added or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return result


# ---------------------------------------------------------------------------------------------- stores

class ResultsStore(Protocol):
    """Where scored results live (local directory or Hub dataset repo)."""

    def has(self, submission_id: str) -> bool: ...
    def put(self, submission_id: str, result: dict, metadata: dict | None, predictions: bytes) -> None: ...
    def results(self) -> list[dict]: ...


def dump_json(obj: Any) -> bytes:
    """Canonical JSON bytes for stored files (sorted keys, UTF-8, trailing newline)."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


class LocalStore:
    """A results directory on disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def result_path(self, submission_id: str) -> Path:
        return self.root / "results" / f"{submission_id}.json"

    def has(self, submission_id: str) -> bool:
        return self.result_path(submission_id).is_file()

    def put(self, submission_id: str, result: dict, metadata: dict | None, predictions: bytes) -> None:
        # Side files first (in a temp folder moved into place), the result JSON last: it marks completion.
        final = self.root / "submissions" / submission_id
        staging = staging_dir(final)
        try:
            atomic_write(staging / METADATA_NAME, dump_json(metadata))
            atomic_write(staging / PREDICTIONS_NAME, predictions)
            replace_dir(staging, final)  # a folder left by an earlier crash (no result yet) is replaced
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic_write(self.result_path(submission_id), dump_json(result))

    def results(self) -> list[dict]:
        out = []
        for path in sorted((self.root / "results").glob("*.json")):
            result = json.loads(path.read_text(encoding="utf-8"))
            check_results(result, str(path))
            out.append(result)
        return out


class HubStore:
    """The same layout in a Hugging Face dataset repo; each submission is one commit (all files or none)."""

    def __init__(self, repo_id: str, token: str | None = None, revision: str = "main"):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.revision = revision
        self.api = HfApi(token=token or os.environ.get("HF_TOKEN"))

    def has(self, submission_id: str) -> bool:
        return self.api.file_exists(self.repo_id, f"results/{submission_id}.json", repo_type="dataset",
                                    revision=self.revision)

    def put(self, submission_id: str, result: dict, metadata: dict | None, predictions: bytes) -> None:
        from huggingface_hub import CommitOperationAdd

        operations = [
            CommitOperationAdd(f"submissions/{submission_id}/{METADATA_NAME}", dump_json(metadata)),
            CommitOperationAdd(f"submissions/{submission_id}/{PREDICTIONS_NAME}", predictions),
            CommitOperationAdd(f"results/{submission_id}.json", dump_json(result)),
        ]
        self.api.create_commit(self.repo_id, operations, commit_message=f"Add submission {submission_id}",
                               repo_type="dataset", revision=self.revision)

    def results(self) -> list[dict]:
        from huggingface_hub import snapshot_download

        local = snapshot_download(self.repo_id, repo_type="dataset", revision=self.revision,
                                  allow_patterns=["results/*.json"], token=self.api.token)
        return LocalStore(local).results()


def open_store(results_dir: str | None = None, hub_repo: str | None = None,
               token: str | None = None) -> ResultsStore:
    """A Hub store when ``hub_repo`` is given (token from the argument or ``HF_TOKEN``), else a local one."""
    if hub_repo:
        return HubStore(hub_repo, token=token)
    if not results_dir:
        raise ValueError("give a results directory or a Hub dataset repo")
    return LocalStore(results_dir)


# ---------------------------------------------------------------------------------------------- add / queue

@dataclass
class AddOutcome:
    submission_id: str
    status: str  # "added" or "exists"
    result: dict | None


def add_submission(path: str | os.PathLike, manifest: dict[str, Any], store: ResultsStore,
                   judge: str = "openai", scorer: Scorer | None = None, added: str | None = None,
                   validate_options: dict[str, Any] | None = None, **judge_options: Any) -> AddOutcome:
    """Validate, score and store one submission. Re-adding the same content is a no-op ("exists")."""
    submission = validate_submission(path, manifest, **(validate_options or {}))
    submission_id = submission.submission_id
    if store.has(submission_id):
        logger.info("submission %s is already on the board", submission_id)
        return AddOutcome(submission_id, "exists", None)
    scored = score_submission(submission, judge=judge, scorer=scorer, **judge_options)
    result = board_result(submission, scored, added=added)
    store.put(submission_id, result, submission.metadata, submission.predictions_bytes)
    logger.info("added submission %s (%s / %s, %s)", submission_id, result["model"], result["method"],
                result["mode"])
    return AddOutcome(submission_id, "added", result)


def process_queue(queue_dir: str | os.PathLike, manifest: dict[str, Any], store: ResultsStore,
                  judge: str = "openai", scorer: Scorer | None = None, **options: Any) -> list[tuple[str, str]]:
    """Add every submission in ``QUEUE/pending`` in name order; move it to ``done/`` or ``rejected/``.

    A rejected submission gets ``rejected/<name>.error.txt`` with the validator's message. Returns
    ``[(name, outcome)]``.
    """
    from .validate import SubmissionError

    queue = Path(queue_dir)
    outcomes = []
    for entry in sorted((queue / "pending").iterdir()) if (queue / "pending").is_dir() else []:
        if entry.name.startswith("."):
            continue
        try:
            outcome = add_submission(entry, manifest, store, judge=judge, scorer=scorer, **options)
        except SubmissionError as exc:
            target = queue / "rejected"
            target.mkdir(parents=True, exist_ok=True)
            atomic_write(target / f"{entry.name}.error.txt", (str(exc) + "\n").encode("utf-8"))
            os.replace(entry, target / entry.name)
            outcomes.append((entry.name, "rejected"))
            continue
        target = queue / "done"
        target.mkdir(parents=True, exist_ok=True)
        os.replace(entry, target / entry.name)
        outcomes.append((entry.name, f"{outcome.status} {outcome.submission_id}"))
    return outcomes

