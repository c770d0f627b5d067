"""Score validated submissions with the metric module and store their results JSON, atomically and idempotently.

Layout of a results store (a local directory, or the same paths in a Hub dataset repo)::

    results/<submission_id>.json                 results JSON (ARCHITECTURE.md) + a "submission" block
    submissions/<submission_id>/metadata.json    the submitter's metadata block
    submissions/<submission_id>/predictions.jsonl  the scored predictions (kept for re-scoring)
    submissions/<submission_id>/items.jsonl      per-item verdicts (item_id, gap, stage, passed, degeneration)

``results/<id>.json`` is written last and is the only file the board reads, so a crash at any point leaves either
a complete result or none. A submission that fails validation or scoring writes nothing. Adds of one id are
serialized by a lock file, so exactly one of two concurrent adds reports "added"; leftovers of a killed add (staging
folders, temp files) are removed by the next add of that id.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from eval.sake_metric.llm_judge import HOST_PATTERN, PAPER_HOST, PAPER_SETTINGS, PROMPT_VERSION, endpoint_host
from sake_core.atomic import atomic_write, replace_dir, staging_dir
from sake_core.protocol import METRIC_KEYS, MODES

from .validate import METADATA_NAME, PREDICTIONS_NAME, Submission, SubmissionError, validate_submission
from sake_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Scorer = Callable[..., dict]
ITEMS_NAME = "items.jsonl"
#: Board protocol labels: ``paper`` only for the paper's judge settings (model, seed, reasoning effort) at the
#: paper's endpoint; any other LLM judge is ``custom`` (shown with its model and host), the offline stages ``offline``.
PROTOCOLS = ("paper", "paper+choice", "custom", "custom+choice", "offline")
#: What identifies a ranking group (with the mode): rows are ranked only against rows with the same values.
GROUP_FIELDS = ("protocol", "judge_model", "judge_host", "prompt_version", "dataset_fingerprint")
_SHORT_TEXT = 200  # judge model / prompt version / fingerprint longer than this break the results contract
RESULT_KEYS = ("model", "method", "mode", "dataset_fingerprint", "n_rows", "metrics", "judge")


class ResultsFormatError(DataError):
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
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ResultsFormatError(f"{where}: field metrics.{name}.{key} must be a finite number or null, "
                                         f"got {str(value)[:40]}")
    judge = result["judge"]
    if not isinstance(judge, dict):
        raise ResultsFormatError(f"{where}: field judge must be an object")
    host = judge.get("host")
    if host is not None and (not isinstance(host, str) or not HOST_PATTERN.fullmatch(host)):
        raise ResultsFormatError(f"{where}: field judge.host must be null or HOST[:PORT] (no user, path or query), "
                                 f"got {str(host)[:40]!r}")
    for name, value in (("judge.model", judge.get("model")), ("judge.prompt_version", judge.get("prompt_version")),
                        ("dataset_fingerprint", result["dataset_fingerprint"])):
        if value is not None and (not isinstance(value, str) or len(value) > _SHORT_TEXT):
            raise ResultsFormatError(f"{where}: field {name} must be null or a string of at most {_SHORT_TEXT} "
                                     f"characters")


def is_paper_judge(judge: dict[str, Any]) -> bool:
    """True when a results JSON's judge block is the paper's judge: its model, seed and reasoning effort
    (``paper_settings``) at the paper's endpoint (``host``). A block that does not record them is not."""
    return (judge.get("paper_settings") is True and judge.get("model") == PAPER_SETTINGS["model"]
            and judge.get("host") == PAPER_HOST)


def result_protocol(result: dict[str, Any]) -> str:
    """The board's protocol label of a results JSON (one of :data:`PROTOCOLS`).

    ``offline`` = deterministic stages only. An LLM-judged result (``judge.protocol`` ``paper`` or
    ``paper+choice``, or for older results derived from ``judge.name`` and the ``choice`` stage share) is
    labelled ``paper`` / ``paper+choice`` only when :func:`is_paper_judge`; any other judge model, seed,
    reasoning effort or endpoint (a local server, say) is ``custom`` / ``custom+choice``.
    """
    judge = result.get("judge") or {}
    stages = judge.get("protocol")
    if stages not in ("paper", "paper+choice", "offline"):
        if (judge.get("name") or "offline") == "offline":
            stages = "offline"
        else:
            stages = "paper+choice" if (judge.get("stage_share") or {}).get("choice") else "paper"
    if stages == "offline":
        return "offline"
    if is_paper_judge(judge):
        return stages
    return stages.replace("paper", "custom")


def ranking_group(result: dict[str, Any]) -> dict[str, Any]:
    """The fields (:data:`GROUP_FIELDS`) that must match for two results of one mode to be ranked together:
    protocol label, judge model, judge host, prompt version, dataset fingerprint (None where not recorded)."""
    judge = result.get("judge") or {}
    protocol = result_protocol(result)
    llm = protocol != "offline"
    return {"protocol": protocol, "judge_model": judge.get("model") if llm else None,
            "judge_host": judge.get("host") if llm else None,
            "prompt_version": judge.get("prompt_version") if llm else None,
            "dataset_fingerprint": result.get("dataset_fingerprint")}


def group_key(group: dict[str, Any]) -> str:
    """A ranking group as one stable string (rows with equal keys are ranked together)."""
    return json.dumps([group.get(k) for k in GROUP_FIELDS], ensure_ascii=True, separators=(",", ":"))


def group_label(group: dict[str, Any]) -> str:
    """A short human label of a ranking group: ``protocol · model @ host · prompt version · data FINGERPRINT``."""
    parts = [str(group["protocol"])]
    if group.get("judge_model") or group.get("judge_host"):
        parts.append(f"{group.get('judge_model') or '?'} @ {group.get('judge_host') or '?'}")
    if group.get("prompt_version"):
        parts.append(str(group["prompt_version"]))
    fingerprint = group.get("dataset_fingerprint")
    parts.append(f"data {str(fingerprint)[:12]}" if fingerprint else "data unknown")
    return " · ".join(parts)


def judge_identity(judge: str, **judge_options: Any) -> dict[str, Any]:
    """What the board's id of a scored submission covers besides its content: the scoring protocol and, for the
    LLM judge, its model, endpoint host and prompt version (a key or the endpoint's path is never part of it)."""
    if judge == "offline":
        return {"protocol": "offline"}
    return {"protocol": "paper+choice" if judge == "paper+choice" else "paper",
            "judge_model": judge_options.get("model") or PAPER_SETTINGS["model"],
            "judge_host": endpoint_host(judge_options.get("base_url")), "prompt_version": PROMPT_VERSION}


def board_id(content_id: str, judge: str = "paper", **judge_options: Any) -> str:
    """The board's id of a submission scored with ``judge``: 20 hex characters over the content id (which covers
    the predictions, hence the dataset fingerprint, and the metadata) and :func:`judge_identity`, so the same
    submission judged another way is another row (an offline-judged one can be judged again with the paper's)."""
    identity = json.dumps(judge_identity(judge, **judge_options), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{content_id}\0{identity}".encode("utf-8")).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- scoring

def _default_scorer() -> Scorer:
    try:
        from eval.score import score_predictions
    except ImportError as exc:  # the metric module is a separate part of the toolkit
        raise RuntimeError("scoring needs eval.score.score_predictions (the SAKE metric module)") from exc
    return score_predictions


def score_submission(submission: Submission, judge: str = "paper", scorer: Scorer | None = None,
                     **judge_options: Any) -> dict[str, Any]:
    """Score a validated submission with the metric module; self-reported scores are never read.

    The predictions are handed to the scorer as the runner's JSONL file (a temporary copy). ``judge_options``
    (e.g. ``cache_dir``, ``base_url``, ``model``) are passed on where the scorer accepts them.
    """
    return score_with_items(submission, judge=judge, scorer=scorer, **judge_options)[0]


def _scorer_judge(judge: str) -> str:
    """The board's protocol names -> the scorer's judge argument (``paper`` = the LLM judge of the paper)."""
    return {"paper": "openai", "paper+choice": "openai"}.get(judge, judge)


def score_with_items(submission: Submission, judge: str = "paper", scorer: Scorer | None = None,
                     **judge_options: Any) -> tuple[dict[str, Any], bytes | None]:
    """:func:`score_submission` plus the per-item verdicts JSONL bytes (None when the scorer writes none)."""
    scorer = scorer or _default_scorer()
    accepted = inspect.signature(scorer).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    options = {k: v for k, v in judge_options.items() if v is not None and (takes_any or k in accepted)}
    dropped = sorted(set(k for k, v in judge_options.items() if v is not None) - set(options))
    if dropped:
        logger.warning("scorer does not take option(s) %s; ignored", ", ".join(dropped))
    items = None
    with tempfile.TemporaryDirectory(prefix="sake-score-") as tmp:
        path = Path(tmp) / PREDICTIONS_NAME
        path.write_bytes(submission.predictions_bytes)
        if takes_any or "items_out" in accepted:
            options["items_out"] = str(Path(tmp) / ITEMS_NAME)
        if judge == "paper+choice":
            if not (takes_any or "prefilter" in accepted):
                raise ValueError("the scorer has no choice prefilter (protocol paper+choice)")
            options["prefilter"] = "choice"
        try:
            result = scorer(str(path), judge=_scorer_judge(judge), **options)
        except ValueError as exc:  # bad input (PredictionsError): name the file as submitted, not the temp copy
            if str(path) not in str(exc):
                raise
            message = str(exc).replace(str(path), PREDICTIONS_NAME)
            try:
                renamed = type(exc)(message)
            except Exception:  # noqa: BLE001 - an error type that takes more than a message
                renamed = ValueError(message)
            raise renamed from None
        if (Path(tmp) / ITEMS_NAME).is_file():
            items = (Path(tmp) / ITEMS_NAME).read_bytes()
    check_results(result, "scorer output")
    header = submission.header
    for key in ("model", "method", "mode"):
        if result[key] != header[key]:
            raise ResultsFormatError(f"scorer output: field {key} is {result[key]!r}, header says {header[key]!r}")
    return result, items


def board_result(submission: Submission, scored: dict[str, Any], added: str | None = None,
                 submission_id: str | None = None) -> dict[str, Any]:
    """The results JSON the board stores: the metric's results plus a ``submission`` block (``id``: the board id,
    :func:`board_id`; ``content_id``: the validator's) and the ``ranking_group`` it is ranked in."""
    header = {k: v for k, v in submission.header.items() if k != "kind"}
    result = dict(scored)
    result["ranking_group"] = ranking_group(scored)
    result["submission"] = {
        "id": submission_id or submission.submission_id,
        "content_id": submission.submission_id,
        "metadata": submission.metadata,
        "header": header,
        "added": added or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return result


# ---------------------------------------------------------------------------------------------- stores

class ResultsStore(Protocol):
    """Where scored results live (local directory or Hub dataset repo)."""

    def has(self, submission_id: str) -> bool: ...
    def put(self, submission_id: str, result: dict, metadata: dict | None, predictions: bytes,
            items: bytes | None = None) -> None: ...
    def results(self, skip_bad: bool = False) -> list[dict]: ...
    def submission_file(self, submission_id: str, name: str) -> bytes | None: ...
    def lock(self, submission_id: str) -> contextlib.AbstractContextManager: ...


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def dump_json(obj: Any) -> bytes:
    """Canonical JSON bytes for stored files (sorted keys, UTF-8, trailing newline). NaN/Infinity raise
    ValueError: they are not JSON, and a stored file must parse everywhere (browsers included)."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _no_constant(name: str) -> Any:
    raise DataError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf: as unusable as a literal Infinity
        raise ValueError(f"the number {text[:40]} is not finite (JSON numbers of a result must be finite)")
    return value


def load_json_file(path: Path) -> Any:
    """A stored JSON file; NaN/Infinity (literal or overflowing, ``1e999``) or bad JSON raise
    :class:`ResultsFormatError` naming the file, in one line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, NaN/Infinity, bad UTF-8
        raise ResultsFormatError(f"{path}: {' '.join(str(exc).split())[:200]}") from None


class LocalStore:
    """A results directory on disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def result_path(self, submission_id: str) -> Path:
        return self.root / "results" / f"{submission_id}.json"

    def has(self, submission_id: str) -> bool:
        return self.result_path(submission_id).is_file()

    def lock(self, submission_id: str) -> contextlib.AbstractContextManager:
        """Serializes adds of one submission id (across threads and processes)."""
        return file_lock(self.root / ".locks" / f"{submission_id}.lock")

    def _clean_leftovers(self, submission_id: str) -> None:
        """Remove what a killed add of this id left: staging folders, temp files, files without a result."""
        for folder, pattern in ((self.root / "submissions", f".{submission_id}.*"),
                                (self.root / "results", f".{submission_id}.json.*.tmp")):
            for leftover in folder.glob(pattern) if folder.is_dir() else []:
                logger.info("removing leftover of an interrupted add: %s", leftover)
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        final = self.root / "submissions" / submission_id
        if final.exists() and not self.has(submission_id):
            shutil.rmtree(final, ignore_errors=True)

    def put(self, submission_id: str, result: dict, metadata: dict | None, predictions: bytes,
            items: bytes | None = None) -> None:
        """Store one result; call it holding :meth:`lock` for this id. The result JSON is written last."""
        result_bytes = dump_json(result)  # serialize first: nothing is written if it fails
        self._clean_leftovers(submission_id)
        final = self.root / "submissions" / submission_id
        staging = staging_dir(final)
        try:
            atomic_write(staging / METADATA_NAME, dump_json(metadata))
            atomic_write(staging / PREDICTIONS_NAME, predictions)
            if items is not None:
                atomic_write(staging / ITEMS_NAME, items)
            replace_dir(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic_write(self.result_path(submission_id), result_bytes)

    def submission_file(self, submission_id: str, name: str) -> bytes | None:
        """A side file of a stored submission (``predictions.jsonl``, ``items.jsonl``, ...), or None."""
        path = self.root / "submissions" / submission_id / name
        return path.read_bytes() if self.has(submission_id) and path.is_file() else None

    def results(self, skip_bad: bool = False) -> list[dict]:
        """Every stored result; a file breaking the contract raises :class:`ResultsFormatError` naming it, or with
        ``skip_bad`` is left out with a one-line warning (the Space keeps serving the other rows)."""
        out = []
        for path in sorted((self.root / "results").glob("*.json")):
            try:
                result = load_json_file(path)
                check_results(result, str(path))
            except ResultsFormatError as exc:
                if not skip_bad:
                    raise
                logger.warning("left out of the board: %s", exc)
                continue
            out.append(result)
        return out


class HubStore:
    """The same layout in a Hugging Face dataset repo; each submission is one commit (all files or none)."""

    def __init__(self, repo_id: str, token: str | None = None, revision: str = "main",
                 lock_dir: str | os.PathLike | None = None, api: Any = None):
        """``api``: a ``huggingface_hub.HfApi`` (default: one with ``token`` or ``HF_TOKEN``) or a stand-in with
        its methods (``file_exists``, ``create_commit``, ``snapshot_download``, ``hf_hub_download``)."""
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token or os.environ.get("HF_TOKEN"))
        self.repo_id = repo_id
        self.revision = revision
        self.api = api
        key = hashlib.sha256(f"{repo_id}@{revision}".encode()).hexdigest()[:16]
        self.lock_dir = Path(lock_dir) if lock_dir else Path(tempfile.gettempdir()) / "sake-leaderboard-locks" / key

    def lock(self, submission_id: str) -> contextlib.AbstractContextManager:
        """Serializes adds of one id on this machine (the Hub commit itself is all-or-nothing)."""
        return file_lock(self.lock_dir / f"{submission_id}.lock")

    def has(self, submission_id: str) -> bool:
        return self.api.file_exists(self.repo_id, f"results/{submission_id}.json", repo_type="dataset",
                                    revision=self.revision)

    def put(self, submission_id: str, result: dict, metadata: dict | None, predictions: bytes,
            items: bytes | None = None) -> None:
        from huggingface_hub import CommitOperationAdd

        operations = [
            CommitOperationAdd(f"submissions/{submission_id}/{METADATA_NAME}", dump_json(metadata)),
            CommitOperationAdd(f"submissions/{submission_id}/{PREDICTIONS_NAME}", predictions),
        ]
        if items is not None:
            operations.append(CommitOperationAdd(f"submissions/{submission_id}/{ITEMS_NAME}", items))
        operations.append(CommitOperationAdd(f"results/{submission_id}.json", dump_json(result)))
        self.api.create_commit(self.repo_id, operations, commit_message=f"Add submission {submission_id}",
                               repo_type="dataset", revision=self.revision)

    def results(self, skip_bad: bool = False) -> list[dict]:
        local = self.api.snapshot_download(self.repo_id, repo_type="dataset", revision=self.revision,
                                           allow_patterns=["results/*.json"])
        return LocalStore(local).results(skip_bad=skip_bad)

    def submission_file(self, submission_id: str, name: str) -> bytes | None:
        """A side file of a stored submission, downloaded from the dataset repo, or None."""
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = self.api.hf_hub_download(self.repo_id, f"submissions/{submission_id}/{name}", repo_type="dataset",
                                            revision=self.revision)
        except EntryNotFoundError:
            return None
        return Path(path).read_bytes()


def open_store(results_dir: str | None = None, hub_repo: str | None = None,
               token: str | None = None, api: Any = None) -> ResultsStore:
    """A Hub store when ``hub_repo`` is given (token from the argument or ``HF_TOKEN``; ``api``: a stand-in for
    ``HfApi``), else a local one."""
    if hub_repo:
        return HubStore(hub_repo, token=token, api=api)
    if not results_dir:
        raise ConfigError("give a results directory or a Hub dataset repo")
    return LocalStore(results_dir)


# ---------------------------------------------------------------------------------------------- add / queue

@dataclass
class AddOutcome:
    submission_id: str
    status: str  # "added" or "exists"
    result: dict | None


def add_submission(path: str | os.PathLike, manifest: dict[str, Any], store: ResultsStore,
                   judge: str = "paper", scorer: Scorer | None = None, added: str | None = None,
                   validate_options: dict[str, Any] | None = None, **judge_options: Any) -> AddOutcome:
    """Validate, score and store one submission. Re-adding the same content with the same judge settings is a
    no-op ("exists"); judged another way (:func:`board_id`) it is another row.

    ``judge``: ``paper`` (the paper's protocol: deterministic stages, then the LLM judge; needs its API key) or
    ``offline`` (deterministic stages only). Adds of one id hold the store's lock for that id, so of two
    concurrent adds exactly one reports "added".
    """
    submission = validate_submission(path, manifest, **(validate_options or {}))
    submission_id = board_id(submission.submission_id, judge, **judge_options)
    with store.lock(submission_id):
        if store.has(submission_id):
            logger.info("submission %s is already on the board", submission_id)
            return AddOutcome(submission_id, "exists", None)
        # the board's manifest, never one the header's `dataset` names: a submission's paths are the
        # submitter's, and the server reads none of them
        scored, items = score_with_items(submission, judge=judge, scorer=scorer, manifest=manifest,
                                         **judge_options)
        result = board_result(submission, scored, added=added, submission_id=submission_id)
        store.put(submission_id, result, submission.metadata, submission.predictions_bytes, items)
    logger.info("added submission %s (%s / %s, %s)", submission_id, result["model"], result["method"],
                result["mode"])
    return AddOutcome(submission_id, "added", result)


MAX_ERROR_LINE = 2000
#: An absolute file path in a message (not a URL's path): replaced by its last component.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"():,]+/)+([^\s/'\"():,]*)")


def without_paths(text: str) -> str:
    """``text`` with every absolute file path cut to its last component (messages shown to visitors name no
    folder of the server)."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def one_line_error(exc: BaseException) -> str:
    """An exception as one line without server paths: a validator's problems joined with " | ", anything else as
    ``Type: message``."""
    text = str(exc) if isinstance(exc, SubmissionError) else f"{type(exc).__name__}: {exc}"
    line = without_paths(" | ".join(part.strip() for part in text.splitlines() if part.strip()))
    return line if len(line) <= MAX_ERROR_LINE else line[: MAX_ERROR_LINE - 1] + "…"


def process_queue(queue_dir: str | os.PathLike, manifest: dict[str, Any], store: ResultsStore,
                  judge: str = "paper", scorer: Scorer | None = None, **options: Any) -> list[tuple[str, str]]:
    """Add every submission in ``QUEUE/pending`` in name order; move it to ``done/`` or ``rejected/``.

    No submission can stall the queue: any exception while adding one (a validator problem, a corrupt archive, a
    scorer or store failure) moves it to ``rejected/`` with ``<name>.error.txt`` holding the error in one line,
    and the queue goes on with the next. Names starting with "." (uploads in progress) are skipped; runs of one
    queue folder are serialized by ``QUEUE/.queue.lock``. Returns ``[(name, outcome)]``.
    """
    queue = Path(queue_dir)
    with file_lock(queue / ".queue.lock"):  # one queue run at a time (a Space worker and a CLI run, say)
        return _run_queue(queue, manifest, store, judge, scorer, options)


def _run_queue(queue: Path, manifest: dict[str, Any], store: ResultsStore, judge: str, scorer: Scorer | None,
               options: dict[str, Any]) -> list[tuple[str, str]]:
    outcomes = []
    for entry in sorted((queue / "pending").iterdir()) if (queue / "pending").is_dir() else []:
        if entry.name.startswith("."):
            continue
        try:
            outcome = add_submission(entry, manifest, store, judge=judge, scorer=scorer, **options)
        except Exception as exc:  # noqa: BLE001 - by design: one bad submission never stops the queue
            message = one_line_error(exc)
            logger.warning("rejected %s: %s", entry.name, message)
            name = _move(entry, queue / "rejected")
            atomic_write(queue / "rejected" / f"{name}.error.txt", message + "\n")
            outcomes.append((entry.name, "rejected"))
            continue
        _move(entry, queue / "done")
        outcomes.append((entry.name, f"{outcome.status} {outcome.submission_id}"))
    return outcomes


def _move(entry: Path, folder: Path) -> str:
    """Move a queue entry into ``folder`` under a name not taken there yet (``NAME``, ``NAME.1``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    name, n = entry.name, 0
    while (folder / name).exists() or (folder / f"{name}.error.txt").exists():
        n += 1
        name = f"{entry.name}.{n}"
    os.replace(entry, folder / name)
    return name

