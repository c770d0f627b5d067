"""Where the Space keeps submissions from upload to score: a local queue folder, or a Hub dataset repo (the requests
repo) beside the results repo, so that a restarted Space loses no pending submission.

Local (:class:`LocalQueue`, the ``queue`` CLI and local mode): ``QUEUE/pending/<name>.zip``, moved to ``done/`` or
``rejected/`` (with ``<name>.error.txt``) by :func:`eval.leaderboard.store.process_queue`.

Hub (:class:`HubQueue`): one request per submission in the requests repo, in the manner of Hugging Face's
leaderboard template (a requests repo of status records beside a results repo), in our own layout::

    requests/<name>.zip     the uploaded archive, as the submitter sent it (kept in every state)
    requests/<name>.json    {"name", "status": "pending" | "finished" | "rejected", "submitted", "updated",
                             "submission_id", "model", "method", "mode", "outcome" | "error"}

Submitting is one commit holding both files, so a request is never half there. The worker scores every pending
request in name order (:func:`eval.leaderboard.store.add_submission` into the results store) and then commits its
new status. A Space killed between storing a result and marking its request finds the request pending after the
restart, scores it again as ``exists`` (adds are idempotent by submission id) and marks it finished.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sake_core.atomic import atomic_write

from .store import ResultsStore, Scorer, add_submission, dump_json, file_lock, one_line_error, process_queue

logger = logging.getLogger(__name__)

REQUESTS_DIR = "requests"
STATUSES = ("pending", "finished", "rejected")


@dataclass
class QueueStatus:
    """What the Submit tab shows: pending names (in scoring order) and the latest rejected ones with their error."""

    pending: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


class SubmissionQueue(Protocol):
    """A queue of submissions waiting to be scored (local folder or Hub requests repo)."""

    def submit(self, name: str, data: bytes, info: dict[str, Any]) -> None: ...
    def has_pending(self) -> bool: ...
    def status(self, shown: int = 10) -> QueueStatus: ...
    def run(self, manifest: dict[str, Any], store: ResultsStore, judge: str, scorer: Scorer | None = None,
            **options: Any) -> list[tuple[str, str]]: ...


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalQueue:
    """The queue folder on the Space's disk (``pending/``, ``done/``, ``rejected/``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def submit(self, name: str, data: bytes, info: dict[str, Any]) -> None:
        """Queue an archive (``info`` is not kept: the archive's header says it all)."""
        atomic_write(self.folder / "pending" / name, data)  # the temp file's name starts with ".": skipped

    def _pending(self) -> list[str]:
        folder = self.folder / "pending"
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []

    def has_pending(self) -> bool:
        return bool(self._pending())

    def status(self, shown: int = 10) -> QueueStatus:
        errors = sorted((self.folder / "rejected").glob("*.error.txt"), key=lambda p: p.name, reverse=True)[:shown]
        return QueueStatus(self._pending(), [(p.name[:-len(".error.txt")], p.read_text(encoding="utf-8").strip())
                                             for p in errors])

    def run(self, manifest: dict[str, Any], store: ResultsStore, judge: str, scorer: Scorer | None = None,
            **options: Any) -> list[tuple[str, str]]:
        return process_queue(self.folder, manifest, store, judge=judge, scorer=scorer, **options)


class HubQueue:
    """Requests in a Hub dataset repo (see the module doc). ``api`` is a ``huggingface_hub.HfApi`` (or a stand-in
    with the same methods: ``create_commit``, ``snapshot_download``, ``hf_hub_download``)."""

    def __init__(self, repo_id: str, api: Any = None, token: str | None = None, revision: str = "main",
                 lock_dir: str | os.PathLike | None = None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token or os.environ.get("HF_TOKEN"))
        self.repo_id = repo_id
        self.revision = revision
        self.api = api
        self.lock_dir = Path(lock_dir) if lock_dir else None
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------------------- repo access

    def _download(self, path_in_repo: str) -> Path:
        return Path(self.api.hf_hub_download(self.repo_id, path_in_repo, repo_type="dataset", revision=self.revision))

    def _commit(self, files: dict[str, bytes], message: str) -> None:
        from huggingface_hub import CommitOperationAdd

        self.api.create_commit(self.repo_id, [CommitOperationAdd(path, data) for path, data in files.items()],
                               commit_message=message, repo_type="dataset", revision=self.revision)

    def records(self) -> dict[str, dict[str, Any]]:
        """Every request's status record, by archive name (one snapshot of ``requests/*.json``)."""
        local = Path(self.api.snapshot_download(self.repo_id, repo_type="dataset", revision=self.revision,
                                                allow_patterns=[f"{REQUESTS_DIR}/*.json"]))
        out = {}
        for path in sorted((local / REQUESTS_DIR).glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            out[record["name"]] = record
        return out

    # -------------------------------------------------------------------------------------------- the queue

    def submit(self, name: str, data: bytes, info: dict[str, Any]) -> None:
        """Add the archive and its pending record in one commit."""
        record = {**info, "name": name, "status": "pending", "submitted": _now(), "updated": _now()}
        self._commit({f"{REQUESTS_DIR}/{name}": data, f"{REQUESTS_DIR}/{name}.json": dump_json(record)},
                     f"Queue submission {name}")

    def _pending(self) -> list[str]:
        return sorted(name for name, record in self.records().items() if record.get("status") == "pending")

    def has_pending(self) -> bool:
        return bool(self._pending())

    def status(self, shown: int = 10) -> QueueStatus:
        records = self.records()
        rejected = sorted((r for r in records.values() if r.get("status") == "rejected"),
                          key=lambda r: r["name"], reverse=True)[:shown]
        return QueueStatus(sorted(n for n, r in records.items() if r.get("status") == "pending"),
                           [(r["name"], str(r.get("error", ""))) for r in rejected])

    def _mark(self, record: dict[str, Any], status: str, **fields: Any) -> None:
        new = {**record, **fields, "status": status, "updated": _now()}
        self._commit({f"{REQUESTS_DIR}/{record['name']}.json": dump_json(new)},
                     f"Submission {record['name']}: {status}")

    def run(self, manifest: dict[str, Any], store: ResultsStore, judge: str, scorer: Scorer | None = None,
            **options: Any) -> list[tuple[str, str]]:
        """Score every pending request in name order; one that fails is marked rejected with its one-line error
        and the queue goes on. Runs of one queue are serialized (in this process; with ``lock_dir``, across
        processes of this machine)."""
        with self._lock, (file_lock(self.lock_dir / "requests.lock") if self.lock_dir else contextlib.nullcontext()):
            outcomes = []
            records = self.records()
            for name in sorted(n for n, r in records.items() if r.get("status") == "pending"):
                record = records[name]
                try:
                    with tempfile.TemporaryDirectory(prefix="sake-request-") as tmp:
                        # a regular file: the Hub cache hands out symlinks, which the validator refuses
                        archive = Path(tmp) / name
                        archive.write_bytes(self._download(f"{REQUESTS_DIR}/{name}").read_bytes())
                        outcome = add_submission(archive, manifest, store, judge=judge, scorer=scorer, **options)
                except Exception as exc:  # noqa: BLE001 - by design: one bad submission never stops the queue
                    message = one_line_error(exc)
                    logger.warning("rejected %s: %s", name, message)
                    self._mark(record, "rejected", error=message)
                    outcomes.append((name, "rejected"))
                    continue
                self._mark(record, "finished", submission_id=outcome.submission_id, outcome=outcome.status)
                outcomes.append((name, f"{outcome.status} {outcome.submission_id}"))
            return outcomes


def open_queue(queue_dir: str | os.PathLike, requests_repo: str | None = None, api: Any = None) -> SubmissionQueue:
    """The Hub requests repo when ``requests_repo`` is given (token ``HF_TOKEN``), else the local folder."""
    if requests_repo:
        return HubQueue(requests_repo, api=api)
    return LocalQueue(queue_dir)
