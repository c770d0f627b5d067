"""The leaderboard Space: a Gradio app (table, submit, about) plus one HTML page per submission, on uvicorn.

- **Leaderboard** tab: one row per scored result and per row the paper reports (marked ``paper (reported)``,
  never ranked: no rank number, not counted); filters by model family, method, mode and judging protocol. Every
  scored row carries its protocol label (``paper``, ``paper+choice``: the paper's judge settings; ``custom``,
  ``custom+choice``: another judge model or endpoint; ``offline``), its judge (model @ host) and its ranking group;
  ranks are counted within one mode and one group (:func:`eval.leaderboard.store.ranking_group`: protocol, judge
  model and host, prompt version, dataset fingerprint), so an offline row is never ranked among paper rows.
- **Submit** tab: upload a submission ``.zip``; the board's validator (the same one ``add`` runs) answers on the
  page at once, as plain text (never Markdown or HTML), and a valid archive is queued (``QUEUE/pending``). A worker
  thread scores the queue (:func:`eval.leaderboard.store.process_queue`: a failing submission goes to
  ``rejected/`` and the queue goes on).
- Uploads only: a call of the submit endpoint (or any other) naming a file is served only when the file is one
  Gradio's upload route received (its upload folder), a regular file within the size limit; anything else (a
  server path, ``/dev/zero``, a FIFO, a URL) is refused before it is opened, by :class:`UploadsOnly` in front of
  Gradio and again by :meth:`Board.submit` (:func:`check_upload`). Gradio's own check is not relied on: it is
  skipped for an app mounted with ``mount_gradio_app``.
- Worker processes: an upload is validated, and the queue scored, in worker processes (:class:`Isolated`), so
  the JSON parser holding the interpreter's lock for a long line stalls a worker, never the server; a
  validation running past ``validate_timeout_s`` is stopped and the upload refused.
- **About** tab: the submission format and the protocols.
- ``/submission/<id>``: the submission's items with question, reference, pre- and post-edit output, verdict and
  the stage that decided it (``items.jsonl`` stored with the result), filterable to the failed items.

Configuration (environment, or ``leaderboard.json`` next to the Space's ``app.py``; the environment wins):
``SAKE_RESULTS_REPO`` (Hub dataset repo holding the results store; token ``HF_TOKEN``) or ``SAKE_RESULTS_DIR``
(local store, default ``./results``), ``SAKE_REQUESTS_REPO`` (Hub dataset repo holding the submissions until and
after they are scored, :mod:`eval.leaderboard.submission_queue`) or ``SAKE_QUEUE_DIR`` (local queue, default
``./queue``), ``SAKE_MANIFEST`` (release manifest: Hub dataset id, folder or file), ``SAKE_JUDGE`` (``paper``
needs the judge's API key as a Space secret; ``offline`` for demos), ``SAKE_QUEUE_INTERVAL`` (seconds between
queue runs, default 30; 0 turns the worker off), ``SAKE_MAX_MB`` (default 50), ``SAKE_MAX_CONNECTIONS_PER_CLIENT``
(default :data:`eval.leaderboard.serve.MAX_CONNECTIONS_PER_CLIENT`; 0 turns the cap off, e.g. behind a proxy whose
one address carries every visitor).

On the Hub the Space keeps everything in the two dataset repos, so a restart loses no submission. **Local mode**
(``python app.py --local`` in the published folder, or ``SAKE_LOCAL=1``; ``python -m eval.leaderboard.space
--local`` in a checkout) ignores the repos and runs on ``./results`` and ``./queue`` with no Hub at all; the
manifest is ``SAKE_MANIFEST`` (a built dataset folder or its ``sake_manifest.json``) or, without it, the Submit tab
says that one is needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import html
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from eval.sake_metric.predictions_file import excerpt, parse_predictions

from sake_core.errors import SakeError, user_errors
from sake_core.protocol import FAMILY_NAMES, method_display

from .build import display_model_name, judge_label, reference_rows
from .store import ITEMS_NAME, PROTOCOLS, LocalStore, ResultsStore, board_id, group_key, group_label, \
    one_line_error, open_store, ranking_group, result_protocol, without_paths
from .submission_queue import SubmissionQueue, open_queue
from .upload_guard import UploadGate, UploadRefused, UploadsOnly, check_upload, gradio_upload_dir
from .validate import (DEFAULT_MAX_BYTES, PREDICTIONS_NAME, SubmissionError, load_manifest,
                       validate_submission)

logger = logging.getLogger(__name__)

CONFIG_FILE = "leaderboard.json"
HEADLINE = (("reliability", "Reliability"), ("generality", "Generality"), ("locality_audio", "Locality (audio)"),
            ("locality_text", "Locality (text)"), ("portability", "Portability"))
COLUMNS = ["Rank", "Model", "Family", "Method", "Mode", "Protocol", "Source"] + [t for _, t in HEADLINE] + \
          ["Average", "Items", "Judge", "Ranked with", "Best in group"]
ITEMS_PER_PAGE = 200
ITEMS_CACHE = 8  # submissions whose parsed items are kept in memory (by the item pages' worker process)
ITEMS_CACHE_BYTES = 256 * 1024 * 1024  # and at most this much of their stored files
PAGE_WAITERS = 8  # item page requests in flight at once (waiting for the pages' worker or in it; the rest: 503)
PAGE_WAIT_S = 10.0  # how long one of them waits
SHOWN_CHARS = 2000  # an output longer than this is cut on the item page (the full text stays in the store)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~-])")
SAFE_ID = re.compile(r"^[0-9a-f]{20}$")
MULTIPART_SLACK = 1 << 20  # an upload request's bytes beyond its one file: the multipart framing
SHOWN_ERROR_CHARS = 600  # of one rejected submission's error in the queue status
WORKER_START_S = 120.0  # longest wait for a worker process to start


def plain_text(text: str) -> str:
    """Text shown to visitors: one problem per line, no server path, no control characters."""
    text = without_paths(text)
    return "".join(c if c in "\n\t" or c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def model_family(family: Any) -> str:
    """The family shown in the family filter: the display name (``sake_core.protocol.FAMILY_NAMES``) of a row's
    ``family`` (the adapter key the runner writes into the header; the reference rows carry theirs), else the key
    as written, else ``other``. The board never guesses a family from a model id."""
    return FAMILY_NAMES.get(str(family), str(family)) if family else "other"


def markdown_text(text: str) -> str:
    """``text`` with every Markdown/HTML special character backslash-escaped (submitter text in a table cell)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _shown(text: Any) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f" … ({len(text) - SHOWN_CHARS} more characters)"


def _rounded(value: Any) -> float | None:
    return round(float(value), 2) if isinstance(value, (int, float)) else None


def _average(metrics: dict[str, Any]) -> float | None:
    values = [v for v in (metrics.get(key) for key, _ in HEADLINE) if isinstance(v, (int, float))]
    return round(sum(values) / len(values), 2) if values else None


def mark_best(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``best``: the headline columns (and Average) where it holds the best value of its ranking
    group (same mode and group, two rows or more), joined by ", "; reference rows are never best ("")."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        row["best"] = ""
        if not row["reference"]:
            groups.setdefault((row["mode"], row["group"]), []).append(row)
    for members in groups.values():
        if len(members) < 2:
            continue
        for key, title in HEADLINE + (("average", "Average"),):
            def value(row: dict[str, Any], key: str = key) -> float | None:
                v = row["average"] if key == "average" else _rounded(row["metrics"].get(key))
                return v if isinstance(v, (int, float)) else None
            values = [v for v in (value(r) for r in members) if v is not None]
            if not values:
                continue
            top = max(values)
            for row in members:
                if value(row) == top:
                    row["best"] = f"{row['best']}, {title}" if row["best"] else title


@dataclass
class SpaceConfig:
    """Where the Space reads results, keeps its queue, and how it scores."""

    results_dir: str = "results"
    results_repo: str | None = None
    manifest: str | None = "sake/sake"
    queue_dir: str = "queue"
    requests_repo: str | None = None
    local: bool = False  # local mode: no Hub (the repos are ignored)
    judge: str = "paper"
    queue_interval_s: float = 30.0
    max_bytes: int = DEFAULT_MAX_BYTES
    refresh_s: float = 60.0  # how long Hub results are cached
    judge_options: dict[str, Any] = field(default_factory=dict)
    upload_dir: str | None = None  # where uploads are accepted from; None: Gradio's upload folder
    isolate: bool = True  # validate uploads and run the queue in worker processes (see Board)
    validate_timeout_s: float = 120.0  # an upload whose validation runs longer is refused
    uploads_per_hour: int = 30  # uploads one client address may send in an hour (0: no limit)
    upload_ttl_s: float = 3600.0  # an upload is deleted once submitted, or once this old if never submitted
    max_upload_dir_mb: float = 2048.0  # uploads are refused while the upload folder holds more than this
    max_pending: int = 50  # submissions that may wait in the queue; a new one is refused while it is full

    @classmethod
    def from_env(cls, config_file: str | os.PathLike | None = None, local: bool | None = None) -> "SpaceConfig":
        """Defaults <- ``leaderboard.json`` (when present) <- environment variables; ``local`` (else
        ``SAKE_LOCAL``) switches to local mode (:meth:`local_mode`)."""
        values: dict[str, Any] = {}
        path = Path(config_file) if config_file else Path(CONFIG_FILE)
        if path.is_file():
            values.update(json.loads(path.read_text(encoding="utf-8")))
        env = os.environ
        for key, name, cast in (("results_repo", "SAKE_RESULTS_REPO", str), ("results_dir", "SAKE_RESULTS_DIR", str),
                                ("manifest", "SAKE_MANIFEST", str), ("queue_dir", "SAKE_QUEUE_DIR", str),
                                ("requests_repo", "SAKE_REQUESTS_REPO", str),
                                ("judge", "SAKE_JUDGE", str), ("queue_interval_s", "SAKE_QUEUE_INTERVAL", float),
                                ("uploads_per_hour", "SAKE_UPLOADS_PER_HOUR", int),
                                ("max_pending", "SAKE_MAX_PENDING", int)):
            if env.get(name):
                values[key] = cast(env[name])
        if env.get("SAKE_MAX_MB"):
            values["max_bytes"] = int(float(env["SAKE_MAX_MB"]) * 2**20)
        known = {f for f in cls.__dataclass_fields__}
        config = cls(**{k: v for k, v in values.items() if k in known})
        if config.judge not in PROTOCOLS:
            raise ValueError(f"SAKE_JUDGE / leaderboard.json judge: got {config.judge!r}, expected one of "
                             f"{', '.join(PROTOCOLS)}")
        use_local = local if local is not None else env.get("SAKE_LOCAL", "").lower() in ("1", "true", "yes")
        if use_local:
            config = config.local_mode(manifest_given="SAKE_MANIFEST" in env)
        return config

    def local_mode(self, manifest_given: bool = False) -> "SpaceConfig":
        """The same Space with no Hub: local results and queue folders; the manifest only when given or a local
        path (a Hub dataset id would need the Hub)."""
        manifest = self.manifest if manifest_given or (self.manifest and Path(self.manifest).exists()) else None
        return dataclasses.replace(self, results_repo=None, requests_repo=None, manifest=manifest, local=True)


class ManifestMissing(SakeError, LookupError):
    """The board was started without a release manifest (local mode without ``SAKE_MANIFEST``)."""


class Board:
    """The Space's data: results (cached), submissions to the queue, the queue worker, per-item pages."""

    def __init__(self, config: SpaceConfig, store: ResultsStore | None = None,
                 manifest: dict[str, Any] | None = None, queue: SubmissionQueue | None = None, hub_api: Any = None):
        """``store`` / ``queue`` default to the configured ones (Hub repos through ``hub_api``, a
        ``huggingface_hub.HfApi`` by default, or local folders)."""
        self.config = config
        # a store / queue opened from the config can be opened again in a worker process (a given object, or one
        # talking to a given Hub client, cannot travel there)
        self._own_store = store is None and queue is None and hub_api is None
        self.store = store or open_store(config.results_dir, config.results_repo, api=hub_api)
        self.requests = queue or open_queue(config.queue_dir, config.requests_repo, api=hub_api)
        self._manifest = manifest
        self._cache: tuple[float, list[dict[str, Any]]] | None = None
        self._items: dict[str, tuple[list[dict[str, Any]], int]] = {}  # parsed items (a store given to the board)
        self._lock = threading.Lock()
        self._items_lock = threading.Lock()
        self._page_waiters = threading.BoundedSemaphore(PAGE_WAITERS)
        self._stop = threading.Event()
        self.upload_dir = config.upload_dir or gradio_upload_dir()
        self.received: Collection[str] | None = None  # the paths Gradio's upload route returned (set by create_app)
        self._checker: Isolated | None = None  # worker processes, started on first use
        self._scorer: Isolated | None = None
        self._pages: Isolated | None = None  # parses stored predictions for the item pages

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            if not self.config.manifest:
                raise ManifestMissing("this board has no release manifest to check submissions against: start it "
                                      "with SAKE_MANIFEST set to a built dataset folder (or its sake_manifest.json)")
            self._manifest = load_manifest(self.config.manifest)
        return self._manifest

    # ------------------------------------------------------------------------------------------ rows

    @functools.cached_property
    def reported_rows(self) -> list[dict[str, Any]]:
        """The paper's reported rows as board rows (a checked-in file: read once, not on every table refresh)."""
        return [{"id": ref["id"], "reference": True, "model": ref["model"], "model_display": ref["model_display"],
                 "family": model_family(ref.get("family")), "method": ref["method"],
                 "method_name": method_display(ref["method"])[0], "method_order": method_display(ref["method"])[1],
                 "mode": ref["mode"],
                 "protocol": "paper", "metrics": ref["metrics"]["overall"], "n_rows": None, "submitter": "paper",
                 "judge": ref["judge"], "group": ref["group"], "group_label": ref["group_label"]}
                for ref in reference_rows()[0]]

    def results(self) -> list[dict[str, Any]]:
        """Stored results (Hub stores cached for ``refresh_s``)."""
        with self._lock:
            now = time.monotonic()
            if self._cache is None or isinstance(self.store, LocalStore) or now - self._cache[0] > self.config.refresh_s:
                self._cache = (now, self.store.results(skip_bad=True))  # a broken file: left out and logged
            return self._cache[1]

    def invalidate(self) -> None:
        with self._lock:
            self._cache = None

    def rows(self) -> list[dict[str, Any]]:
        """Board rows (submissions and paper rows) with protocol, family, average and rank, sorted for display."""
        rows = []
        for result in self.results():
            sub = result.get("submission") or {}
            header = sub.get("header") or {}
            rows.append({"id": sub.get("id", ""), "reference": False, "model": result["model"],
                         "model_display": display_model_name(result["model"]),
                         "family": model_family(header.get("family")), "method": result["method"],
                         "method_name": method_display(result["method"], result.get("method_display_name"),
                                                       result.get("method_display_order"))[0],
                         "method_order": method_display(result["method"], result.get("method_display_name"),
                                                        result.get("method_display_order"))[1],
                         "mode": result["mode"], "protocol": result_protocol(result),
                         "judge": judge_label(result.get("judge"), with_undecided=False),
                         "group": group_key(ranking_group(result)), "group_label": group_label(ranking_group(result)),
                         "metrics": result["metrics"]["overall"], "n_rows": result.get("n_rows"),
                         "submitter": (sub.get("metadata") or {}).get("submitter", "")})
        rows += [dict(ref) for ref in self.reported_rows]  # copies: rank and average are set per call
        for row in rows:
            row["average"] = _average(row["metrics"])
        order = {p: i for i, p in enumerate(PROTOCOLS)}
        rows.sort(key=lambda r: (r["mode"] != "single", r["reference"], order.get(r["protocol"], 9), r["group"],
                                 -(r["average"] if r["average"] is not None else -math.inf), r["model"],
                                 r["method"]))
        counters: dict[tuple[str, str], int] = {}
        for row in rows:  # ranks within one mode and one ranking group; the paper's reported rows get none
            if row["reference"]:
                row["rank"] = None
                continue
            group = (row["mode"], row["group"])
            counters[group] = counters.get(group, 0) + 1
            row["rank"] = counters[group]
        mark_best(rows)
        return rows

    def choices(self) -> dict[str, list[str]]:
        rows = self.rows()
        names = {r["method"]: (r["method_order"], r["method_name"]) for r in rows}
        methods = sorted(names, key=lambda m: (names[m][0], m))
        return {"family": sorted({r["family"] for r in rows}),
                "method": [(names[m][1], m) for m in methods],
                "mode": ["single", "sequential"], "protocol": list(PROTOCOLS)}

    def table(self, family: list[str] | None = None, method: list[str] | None = None,
              mode: list[str] | None = None, protocol: list[str] | None = None,
              paper_rows: bool = True) -> list[list[Any]]:
        """Table rows (``COLUMNS``) passing the filters (an empty filter passes everything)."""
        out = []
        for row in self.rows():
            if (family and row["family"] not in family) or (method and row["method"] not in method) or \
                    (mode and row["mode"] not in mode) or (protocol and row["protocol"] not in protocol) or \
                    (row["reference"] and not paper_rows):
                continue
            if row["reference"]:
                source = "paper (reported) · not ranked"
            else:
                source = f"[{markdown_text(row['submitter'] or 'submission')} · items](/submission/{row['id']})"
            values = [_rounded(row["metrics"].get(key)) for key, _ in HEADLINE]
            out.append([row["rank"], row["model_display"], row["family"], row["method_name"],
                        row["mode"],
                        row["protocol"], source] + values + [row["average"], row["n_rows"], row["judge"],
                                                             row["group_label"], row["best"]])
        return out

    # ------------------------------------------------------------------------------------------ submit / queue

    def check_upload(self, path: Any) -> Path:
        """``path`` as an upload this Space received (:func:`check_upload`), or :class:`UploadRefused`."""
        return check_upload(path, self.upload_dir, self.config.max_bytes, self.received)

    def submit(self, path: str | os.PathLike | None) -> str:
        """Validate an uploaded archive with the board's validator; queue it when valid. Returns plain text.

        Only a file this Space received as an upload is opened (:meth:`check_upload`); the answer quotes the
        submitter's values only as short escaped excerpts and names no server path.
        """
        if not path:
            return "Choose a submission .zip first."
        try:
            upload = self.check_upload(path)
        except UploadRefused as exc:
            return f"Rejected\n- {exc}"
        try:
            return self._submit_upload(upload)
        finally:  # read (or refused): the upload is not kept on the Space's disk
            with contextlib.suppress(OSError):
                upload.unlink()

    def _submit_upload(self, upload: Path) -> str:
        if upload.suffix.lower() != ".zip":
            return "Rejected\n- expected a .zip archive holding predictions.jsonl and metadata.json"
        try:
            if self.config.isolate:
                if self._checker is None:
                    self._checker = Isolated(self.manifest, timeout_s=self.config.validate_timeout_s)
                try:
                    verdict = self._checker(check_submission, str(upload), self.config.max_bytes)
                except TimeoutError:
                    return (f"Rejected\n- validation took longer than {self.config.validate_timeout_s:g} s; a "
                            "submission is read in time linear in its size, so this one is refused")
                except RuntimeError as exc:
                    logger.error("validation worker: %s", exc)
                    return "Rejected\n- the validator failed on this upload; try again later"
            else:
                verdict = check_submission(str(upload), self.config.max_bytes, self.manifest)
        except ManifestMissing as exc:
            return plain_text(f"Not checked\n- {exc}")
        if "problems" in verdict:
            return plain_text("Rejected\n" + "\n".join(f"- {p}" for p in verdict["problems"]))
        if "error" in verdict:
            return plain_text(f"Rejected\n- {verdict['error']}")
        sid = board_id(verdict["id"], self.config.judge, **self.config.judge_options)
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{sid}.zip"
        try:
            if self.store.has(sid):
                return f"Already on the board\nSubmission {sid} has been scored: see /submission/{sid}"
            pending = self.requests.status(0).pending
            waiting = next((p for p in pending if p.endswith(f"-{sid}.zip")), None)
            if waiting:
                return f"Already queued\nSubmission {sid} waits in the queue as {waiting}."
            if len(pending) >= self.config.max_pending:
                return (f"Not queued\n- the queue is full ({len(pending)} submissions wait to be scored); the "
                        "submission is valid: try again later")
            self.requests.submit(name, upload.read_bytes(), {"submission_id": sid, "model": verdict["model"],
                                                             "method": verdict["method"], "mode": verdict["mode"]})
        except Exception as exc:  # noqa: BLE001 - the store or the requests repo is unreachable: nothing queued
            logger.warning("submission %s not queued: %s", sid, one_line_error(exc))
            return plain_text(f"Not queued\n- the board's storage did not answer ({type(exc).__name__}); the "
                              "submission is valid: try again in a minute")
        return plain_text(f"Queued\nSubmission {sid} ({excerpt(verdict['model'], 80)} / "
                          f"{excerpt(verdict['method'], 60)} / {verdict['mode']}, {verdict['rows']} rows) is "
                          f"valid and waits in the queue as {name}. It appears on the board once scored "
                          f"({self.config.judge} protocol).")

    def queue_status(self, shown: int = 10) -> str:
        """Plain text: pending submissions, and the latest rejected ones with (the start of) their one-line error."""
        status = self.requests.status(shown)
        listed = ", ".join(status.pending[:shown]) or "none"
        more = len(status.pending) - shown
        lines = [f"Pending ({len(status.pending)}): " + listed + (f" and {more} more" if more > 0 else "")]
        if status.rejected:
            lines.append("Rejected while scoring (latest first):")
            for name, error in status.rejected:
                error = error.strip()
                if len(error) > SHOWN_ERROR_CHARS:
                    error = error[:SHOWN_ERROR_CHARS] + f"... ({len(error) - SHOWN_ERROR_CHARS} more characters)"
                lines.append(f"- {name}: {error}")
        return plain_text("\n".join(lines))

    def run_queue(self) -> list[tuple[str, str]]:
        """Score everything pending (never raises for a bad submission; nothing to do reads no manifest); in a
        worker process when the store and queue come from the config, so reading and scoring submissions never
        holds this process's GIL."""
        if not self.requests.has_pending():
            return []
        if self.config.isolate and self._own_store:
            if self._scorer is None:
                self._scorer = Isolated(self.manifest)
            outcomes = self._scorer(run_queue_of, self.config)
        else:
            outcomes = self.requests.run(self.manifest, self.store, judge=self.config.judge,
                                     validate_options={"max_bytes": self.config.max_bytes},
                                     **self.config.judge_options)
        if outcomes:
            self.invalidate()
        return outcomes

    def start_worker(self) -> threading.Thread | None:
        """A daemon thread running the queue every ``queue_interval_s`` (None when the interval is 0)."""
        if self.config.queue_interval_s <= 0:
            return None

        def loop() -> None:
            while not self._stop.wait(self.config.queue_interval_s):
                try:
                    for name, outcome in self.run_queue():
                        logger.info("queue: %s: %s", name, outcome)
                except Exception:  # noqa: BLE001 - the worker must outlive e.g. a Hub outage
                    logger.exception("queue run failed; retrying in %.0f s", self.config.queue_interval_s)

        thread = threading.Thread(target=loop, name="sake-queue", daemon=True)
        thread.start()
        return thread

    def stop_worker(self) -> None:
        """Stop the queue thread and the worker processes."""
        self._stop.set()
        for isolated in (self._checker, self._scorer, self._pages):
            if isolated is not None:
                isolated.close()

    # ------------------------------------------------------------------------------------------ item pages

    def items_page(self, sid: str, show: str = "all", dimension: str = "", page: int = 1
                   ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(result, :func:`items_page` of its items) of a stored submission, or None when it is not on the board.

        The stored predictions are a submitter's bytes: with the board's own store they are parsed in a worker
        process (:func:`page_of`, which keeps the parsed items of recent submissions, so that concurrent visits of
        one submission parse it once and the server process holds one page at a time, never a whole file)."""
        result = next((r for r in self.results() if (r.get("submission") or {}).get("id") == sid), None)
        if result is None:
            return None
        if self.config.isolate and self._own_store:
            with self._lock:
                if self._pages is None:
                    self._pages = Isolated({}, timeout_s=self.config.validate_timeout_s)
            # a few visitors wait for the worker, briefly; the rest are told it is busy at once (a page request
            # never holds a server thread for long, whatever a flood of them asks)
            if not self._page_waiters.acquire(blocking=False):
                raise TimeoutError("too many item pages are being prepared")
            try:
                return result, self._pages(page_of, self.config, sid, show, dimension, page, wait_s=PAGE_WAIT_S)
            finally:
                self._page_waiters.release()
        with self._items_lock:  # one parse at a time: concurrent visits of one submission wait for its parse
            items = self._items[sid][0] if sid in self._items else _cache_items(self._items, sid, self.store)
        return result, items_page(items, show, dimension, page)


# ---------------------------------------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}  # what a worker process keeps between calls (the release manifest)


def check_submission(path: str, max_bytes: int, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate an upload (in a worker process, against the worker's manifest unless one is given):
    ``{"problems": [...]}``, ``{"error": line}``, or the summary ``{"id", "model", "method", "mode", "rows"}`` --
    plain data, so no exception crosses the process boundary."""
    try:
        submission = validate_submission(path, manifest if manifest is not None else _WORKER["manifest"],
                                         max_bytes=max_bytes)
    except SubmissionError as exc:
        return {"problems": [str(problem) for problem in exc.problems]}
    except Exception as exc:  # noqa: BLE001 - whatever the archive holds, the page answers in one line
        return {"error": one_line_error(exc)}
    header = submission.header
    return {"id": submission.submission_id, "model": header["model"], "method": header["method"],
            "mode": header["mode"], "rows": len(submission.rows)}


def run_queue_of(config: SpaceConfig) -> list[tuple[str, str]]:
    """Score a Space's pending submissions (in a worker process): its store and queue opened from its config."""
    store = open_store(config.results_dir, config.results_repo)
    queue = open_queue(config.queue_dir, config.requests_repo)
    return queue.run(_WORKER["manifest"], store, judge=config.judge,
                     validate_options={"max_bytes": config.max_bytes}, **config.judge_options)


def submission_items(store: ResultsStore, sid: str) -> list[dict[str, Any]]:
    """A stored submission's prediction rows, each with its verdict, its deciding stage and its degeneration flag,
    read by the metric's strict reader (the reader that accepted the file; no other line splitting)."""
    return _read_items(store, sid)[0]


def _read_items(store: ResultsStore, sid: str) -> tuple[list[dict[str, Any]], int]:
    """(:func:`submission_items`, the stored files' size in bytes)."""
    predictions = store.submission_file(sid, PREDICTIONS_NAME) or b""
    rows = [row for _, row in parse_predictions(predictions, PREDICTIONS_NAME).rows]
    verdicts_bytes = store.submission_file(sid, ITEMS_NAME)
    if verdicts_bytes is None:
        verdicts = _offline_verdicts(predictions)  # results stored before per-item verdicts were kept
    else:
        verdicts = json_lines(verdicts_bytes.decode("utf-8"))
    by_key = {(v["item_id"], v.get("gap")): v for v in verdicts}
    items = []
    for row in rows:
        verdict = by_key.get((row["item_id"], row.get("gap")), {})
        items.append({**row, "passed": verdict.get("passed"), "stage": verdict.get("stage", "?"),
                      "degeneration": verdict.get("degeneration")})
    return items, len(predictions) + len(verdicts_bytes or b"")


def json_lines(text: str) -> list[Any]:
    """The JSON values of a JSON Lines text split at newlines only (``str.splitlines`` would also split inside a
    value at U+2028, U+0085 or a lone carriage return, which JSON strings may hold raw)."""
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _cache_items(cache: dict[str, tuple[list[dict[str, Any]], int]], sid: str, store: ResultsStore
                 ) -> list[dict[str, Any]]:
    """:func:`submission_items` of ``sid``, kept in ``cache`` with those of recent submissions (at most
    :data:`ITEMS_CACHE` of them and :data:`ITEMS_CACHE_BYTES` of stored files; the oldest go first)."""
    items, size = _read_items(store, sid)
    while cache and (len(cache) >= ITEMS_CACHE or sum(n for _, n in cache.values()) + size > ITEMS_CACHE_BYTES):
        cache.pop(next(iter(cache)))
    cache[sid] = (items, size)
    return items


def items_page(items: list[dict[str, Any]], show: str = "all", dimension: str = "", page: int = 1
               ) -> dict[str, Any]:
    """One page of a submission's items for ``/submission/<id>``: the items shown (``show`` ``all`` or ``failed``,
    one ``dimension`` or all; :data:`ITEMS_PER_PAGE` a page, texts cut to :data:`SHOWN_CHARS`), the page number and
    count, and the counts the page's navigation shows."""
    selected = [it for it in items if (show != "failed" or it["passed"] is False)
                and (not dimension or it["dimension"] == dimension)]
    pages = max(1, math.ceil(len(selected) / ITEMS_PER_PAGE))
    page = min(max(1, page), pages)
    texts = ("question", "reference", "pre_edit", "post_edit")
    shown = [{**it, **{name: _shown(it.get(name)) for name in texts}, "options": None}
             for it in selected[(page - 1) * ITEMS_PER_PAGE: page * ITEMS_PER_PAGE]]
    return {"items": shown, "page": page, "pages": pages, "total": len(items),
            "failed": sum(1 for it in items if it["passed"] is False),
            "dimensions": sorted({it["dimension"] for it in items})}


def page_of(config: SpaceConfig, sid: str, show: str, dimension: str, page: int) -> dict[str, Any]:
    """:func:`items_page` of a stored submission, in a worker process: its store opened from the Space's config,
    the parsed items of recent submissions kept in the worker."""
    cache = _WORKER.setdefault("items", {})
    if sid in cache:
        items = cache[sid][0]
    else:
        store = _WORKER.get("store")
        if store is None:
            store = _WORKER["store"] = open_store(config.results_dir, config.results_repo)
        items = _cache_items(cache, sid, store)
    return items_page(items, show, dimension, page)


def _serve_calls(connection: Any, manifest: dict[str, Any]) -> None:
    """A worker process's loop: run each ``(function, args)`` received, send back ``(ok, value or error)``."""
    _WORKER["manifest"] = manifest
    connection.send("ready")
    while True:
        try:
            function, args = connection.recv()
        except (EOFError, OSError):  # the server went away
            return
        try:
            connection.send((True, function(*args)))
        except Exception as exc:  # noqa: BLE001 - reported to the caller in one line
            connection.send((False, f"{type(exc).__name__}: {exc}"))


class Isolated:
    """One worker process, spawned on first use and kept, that runs module-level functions for the Space.

    Reading an untrusted submission is linear in its size, but a JSON parser holds the interpreter's lock for a
    whole line; in a worker it holds the worker's, and the server keeps answering every other client. Calls run
    one at a time. A call running past ``timeout_s`` kills the worker and raises TimeoutError; a worker that dies
    raises RuntimeError; either way the next call starts a new one.
    """

    def __init__(self, manifest: dict[str, Any], timeout_s: float | None = None):
        self.manifest = manifest
        self.timeout_s = timeout_s
        self._process: Any = None
        self._connection: Any = None
        self._lock = threading.Lock()

    def __call__(self, function: Callable[..., Any], *args: Any, wait_s: float | None = None) -> Any:
        """``function(*args)`` in the worker; ``wait_s``: the longest wait for the worker to be free (None: as
        long as it takes), after which TimeoutError."""
        if not self._lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise TimeoutError(f"the worker is busy (waited {wait_s} s)")
        try:
            if self._process is None or not self._process.is_alive():
                self._start()
            self._connection.send((function, args))
            if not self._connection.poll(self.timeout_s):  # None: wait as long as it takes
                logger.warning("%s ran past %s s: worker process stopped", function.__name__, self.timeout_s)
                self._stop()
                raise TimeoutError(f"{function.__name__} ran past {self.timeout_s} s")
            try:
                ok, value = self._connection.recv()
            except (EOFError, OSError):
                self._stop()
                raise RuntimeError(f"the worker process running {function.__name__} died") from None
        finally:
            self._lock.release()
        if not ok:
            raise RuntimeError(value)
        return value

    def _start(self) -> None:
        self._stop()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(target=_serve_calls, args=(theirs, self.manifest), name="sake-worker",
                                        daemon=True)
        self._process.start()
        theirs.close()
        self._connection = ours
        try:  # the call's timeout starts once the worker has imported what it runs
            ready = ours.poll(WORKER_START_S) and ours.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._stop()
            raise RuntimeError("the worker process did not start")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=10)
            self._connection.close()
        self._process = self._connection = None

    def close(self) -> None:
        with self._lock:
            self._stop()


def _offline_verdicts(predictions: bytes) -> list[dict[str, Any]]:
    """Per-item verdicts of the metric's deterministic stages (for results stored without ``items.jsonl``)."""
    import tempfile

    from eval.score import score_predictions

    with tempfile.TemporaryDirectory(prefix="sake-items-") as tmp:
        (Path(tmp) / PREDICTIONS_NAME).write_bytes(predictions)
        score_predictions(str(Path(tmp) / PREDICTIONS_NAME), judge="offline", items_out=str(Path(tmp) / ITEMS_NAME))
        return json_lines((Path(tmp) / ITEMS_NAME).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- HTML page

PAGE_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #d0d7de;padding:4px 6px;vertical-align:top}
th{background:#f6f8fa;text-align:left}tr.fail td{background:#fff5f5}tr.pass td.v{color:#1a7f37}
tr.fail td.v{color:#cf222e;font-weight:600}td.out{max-width:28em;white-space:pre-wrap;word-break:break-word}
nav a{margin-right:1em}.meta{color:#57606a}
"""
PAGE_HEADERS = {"content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
                                           "frame-ancestors 'self' https://huggingface.co https://*.hf.space"}


def submission_page(board: Board, sid: str, show: str = "all", dimension: str = "", page: int = 1) -> tuple[int, str]:
    """(HTTP status, HTML) of ``/submission/<sid>``: the items with verdict and deciding stage."""
    esc = html.escape
    if not SAFE_ID.match(sid or ""):
        return 404, "<!doctype html><title>Not found</title><p>No such submission.</p>"
    try:
        found = board.items_page(sid, show, dimension, page)
    except (TimeoutError, RuntimeError) as exc:  # the worker process ran out of time or died
        logger.warning("item page of %s: %s", sid, exc)
        return 503, "<!doctype html><title>Busy</title><p>This page could not be prepared; try again shortly.</p>"
    if found is None:
        return 404, "<!doctype html><title>Not found</title><p>No such submission on the board.</p>"
    result, listing = found
    page, pages, shown = listing["page"], listing["pages"], listing["items"]
    metadata = (result.get("submission") or {}).get("metadata") or {}

    def link(**changes: Any) -> str:
        query = {"show": show, "dimension": dimension, "page": 1} | changes
        return f"/submission/{sid}?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})

    failed, total = listing["failed"], listing["total"]
    nav = [f'<a href="{esc(link(show="all"))}">all items ({total})</a>',
           f'<a id="failed-link" href="{esc(link(show="failed"))}">failed items ({failed})</a>']
    nav += [f'<a href="{esc(link(dimension=d))}">{esc(d)}</a>' for d in listing["dimensions"]]
    body = []
    for it in shown:
        verdict = "pass" if it["passed"] else ("fail" if it["passed"] is False else "?")
        dim = it["dimension"] + (f" {it['type']}" if it.get("type") else "")
        gap = "" if it.get("gap") is None else str(it["gap"])
        body.append(
            f'<tr class="{verdict}" data-item="{esc(it["item_id"])}"><td>{esc(it["item_id"])}</td><td>{esc(gap)}</td>'
            f'<td>{esc(dim)}</td><td class="out">{esc(it["question"])}</td>'
            f'<td class="out">{esc(it["reference"])}</td>'
            f'<td class="out">{esc(it["pre_edit"])}</td>'
            f'<td class="out">{esc(it["post_edit"])}</td>'
            f'<td class="v">{verdict}</td><td>{esc(str(it["stage"]))}</td></tr>')
    pager = ""
    if pages > 1:
        pager = (f'<p>page {page} of {pages} '
                 + (f'<a href="{esc(link(page=page - 1))}">previous</a> ' if page > 1 else "")
                 + (f'<a href="{esc(link(page=page + 1))}">next</a>' if page < pages else "") + "</p>")
    title = f"{result['model']} / {result['method']} / {result['mode']}"
    judge = result.get("judge") or {}
    document = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{esc(title)} · SAKE leaderboard</title><style>{PAGE_CSS}</style></head><body>
<p><a href="/">← leaderboard</a></p>
<h1 id="title">{esc(title)}</h1>
<p class="meta">submission <code>{esc(sid)}</code> by {esc(str(metadata.get("submitter", "")))} ·
protocol <b id="protocol">{esc(result_protocol(result))}</b> (judge {esc(str(judge.get("name", "")))}
{esc(str(judge.get("model") or ""))}) · {total} items, {failed} failed</p>
<p class="meta">Correctness items (reliability, generality, portability) pass when the post-edit output gives the
reference; locality items pass when the post-edit output gives the same answer as the pre-edit output. The stage
is the judging step that decided the item (empty, exact, choice, llm, undecided).</p>
<nav>{" ".join(nav)}</nav>{pager}
<table id="items"><thead><tr><th>item</th><th>gap</th><th>dimension</th><th>question</th><th>reference</th>
<th>pre-edit output</th><th>post-edit output</th><th>verdict</th><th>stage</th></tr></thead>
<tbody>{"".join(body)}</tbody></table>{pager}</body></html>"""
    return 200, document


# ---------------------------------------------------------------------------------------------- Gradio app

ABOUT = """
## SAKE leaderboard

Scores of knowledge edits of large audio-language models on the SAKE benchmark (*SAKE: Towards Editing
Auditory Attribute Knowledge of Large Audio-Language Models*): reliability, generality, audio and text locality,
portability, in percent. The board scores every submission itself from its predictions; self-reported numbers
are never read.

### Protocols
Every row is labelled with how its items were judged:
- **paper**: the paper's protocol (deterministic stages, empty and exact match, then the LLM judge) with the
  paper's judge settings (model, seed, reasoning effort) at the paper's endpoint;
- **paper+choice**: the same with the opt-in multiple-choice prefilter before the LLM judge;
- **custom** / **custom+choice**: the same stages with another judge model, seed, reasoning effort or endpoint
  (shown in the Judge column as model @ host);
- **offline**: deterministic stages only (no LLM judge); undecided items count as wrong.

Ranks are counted within one mode and one ranking group: the same protocol, judge model, judge host, prompt
version and dataset revision (the "Ranked with" column): an offline row is never ranked among paper rows. Rows
marked *paper (reported)* are the numbers the paper reports, transcribed from its tables: they have no rank and
count in none (the paper's judge prompts and data sample are not the board's).

### Submission format
A `.zip` with exactly two files at its root:
- `predictions.jsonl`: the file `python -m editors.run` writes, unchanged (line 1 the run header, then one line
  per evaluated item: question, reference, pre- and post-edit output, ...), for the `test` split of the
  release, every item exactly once (sequential: every (item, gap) of the first five edits);
- `metadata.json`: `{"submitter", "model_link", "license"}` required; `paper_link`, `code_link`, `contact`,
  `description` optional; links must be `http(s)://`.

Build it with `python -m eval.leaderboard pack predictions.jsonl --metadata metadata.json --out submission.zip`
and check it first with `python -m eval.leaderboard validate submission.zip --manifest sake/sake`: the Submit
tab runs the same validator. Each submission's page lists its items with the verdict and the judging stage
that decided it.
"""


def build_blocks(board: Board) -> Any:
    """The Gradio Blocks of the Space (tabs: Leaderboard, Submit, About)."""
    import gradio as gr

    choices = board.choices()
    datatypes: list[Any] = ["number", "str", "str", "str", "str", "str", "markdown"] + \
        ["number"] * (len(HEADLINE) + 2) + ["str", "str", "str"]
    with gr.Blocks(title="SAKE leaderboard") as blocks:
        gr.Markdown("# SAKE leaderboard\nEditing auditory attribute knowledge of large audio-language models.")
        with gr.Tabs():
            with gr.Tab("Leaderboard", id="board"):
                with gr.Row():
                    family = gr.Dropdown(choices["family"], multiselect=True, label="Model family",
                                         elem_id="filter-family")
                    method = gr.Dropdown(choices["method"], multiselect=True, label="Method", elem_id="filter-method")
                    mode = gr.Dropdown(choices["mode"], multiselect=True, label="Mode", elem_id="filter-mode")
                    protocol = gr.Dropdown(choices["protocol"], multiselect=True, label="Protocol",
                                           elem_id="filter-protocol")
                    paper = gr.Checkbox(True, label="Paper's reported rows", elem_id="filter-paper")
                refresh = gr.Button("Refresh", elem_id="refresh", size="sm")
                # latex_delimiters=[]: a submitter's "$$...$$" stays text (the Markdown cells render no LaTeX)
                table = gr.Dataframe(value=board.table(), headers=COLUMNS, datatype=datatypes, interactive=False,
                                     elem_id="board-table", max_height=900, wrap=True, latex_delimiters=[])
                filters: list[Any] = [family, method, mode, protocol, paper]
                for component in filters:
                    component.change(board.table, filters, table)
                refresh.click(board.table, filters, table)
                blocks.load(board.table, filters, table)
            with gr.Tab("Submit", id="submit"):
                gr.Markdown("Upload a submission `.zip` (`predictions.jsonl` + `metadata.json`). It is validated "
                            "here at once; a valid one is queued and scored.")
                upload = gr.File(label="Submission .zip", file_types=[".zip"], type="filepath",
                                 elem_id="submission-file")
                submit = gr.Button("Validate and submit", variant="primary", elem_id="submit-button")
                # plain text boxes: a submitter's values in an answer are data, never Markdown or HTML
                answer = gr.Textbox(label="Result", interactive=False, lines=3, max_lines=30,
                                    elem_id="submit-result")
                status = gr.Textbox(label="Queue", interactive=False, lines=2, max_lines=20,
                                    elem_id="queue-status")
                submit.click(board.submit, upload, answer).then(board.queue_status, None, status)
                blocks.load(board.queue_status, None, status)
            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT, elem_id="about")
    return blocks


def create_app(board: Board) -> Any:
    """The Space's ASGI app: ``/submission/<id>`` pages and the Gradio app at ``/``, with security headers.

    Gradio may serve files only from its upload folder (no ``allowed_paths``; the results and queue folders
    blocked), and :class:`UploadsOnly` refuses any call naming a file that is not an upload of this Space.
    """
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    from .serve import SecurityHeaders

    app = FastAPI(title="SAKE leaderboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/submission/{sid}", response_class=HTMLResponse)
    def submission(sid: str, show: str = "all", dimension: str = "", page: int = 1) -> HTMLResponse:
        status, document = submission_page(board, sid, show=show, dimension=dimension, page=page)
        return HTMLResponse(document, status_code=status, headers=PAGE_HEADERS)

    blocks = build_blocks(board)
    blocked = [str(Path(folder).resolve()) for folder in (board.config.results_dir, board.config.queue_dir)]
    app = gr.mount_gradio_app(app, blocks, path="/", max_file_size=board.config.max_bytes, footer_links=[],
                              ssr_mode=False, allowed_paths=[], blocked_paths=blocked)
    board.received = blocks.upload_file_set  # the exact paths Gradio's upload route returned
    config = board.config
    gate = UploadGate(board.upload_dir, config.uploads_per_hour, config.upload_ttl_s,
                      int(config.max_upload_dir_mb * 2**20), max_request_bytes=config.max_bytes + MULTIPART_SLACK,
                      received=board.received)
    guarded = UploadsOnly(app, board.check_upload, gate=gate)
    # Gradio needs inline scripts and styles: its pages get every header but a script-restricting CSP.
    headers = {"x-content-type-options": "nosniff", "referrer-policy": "strict-origin-when-cross-origin",
               "permissions-policy": "camera=(), microphone=(), geolocation=()",
               "content-security-policy": "frame-ancestors 'self' https://huggingface.co https://*.hf.space; "
                                          "object-src 'none'; base-uri 'self'"}
    return SecurityHeaders(guarded, headers)


@user_errors
def main(argv: list[str] | None = None) -> int:
    """Run the Space: results store, queue worker, Gradio app on uvicorn (port ``PORT`` or 7860)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="app.py", description="The SAKE leaderboard Space (eval.leaderboard.space)",
        epilog="Set by the environment: HOST (default 0.0.0.0) and PORT (default 7860); SAKE_RESULTS_DIR or "
               "SAKE_RESULTS_REPO, SAKE_QUEUE_DIR or SAKE_REQUESTS_REPO, SAKE_MANIFEST, SAKE_JUDGE, "
               "SAKE_QUEUE_INTERVAL, SAKE_MAX_MB, SAKE_UPLOADS_PER_HOUR, SAKE_MAX_PENDING, "
               "SAKE_MAX_CONNECTIONS_PER_CLIENT (eval/leaderboard/README.md).")
    parser.add_argument("--local", action="store_true", default=None,
                        help="local mode: no Hub; ./results and ./queue, the manifest from SAKE_MANIFEST")
    args = parser.parse_args(argv)
    import uvicorn  # the [leaderboard] extra's server (after the arguments: --help answers without it)

    from .serve import MAX_CONNECTIONS_PER_CLIENT, uvicorn_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    board = Board(SpaceConfig.from_env(local=args.local))
    if board.config.local:
        logger.info("local mode: results in %s, queue in %s, manifest %s", board.config.results_dir,
                    board.config.queue_dir, board.config.manifest or "none (set SAKE_MANIFEST)")
    if isinstance(board.store, LocalStore):
        Path(board.config.results_dir).mkdir(parents=True, exist_ok=True)
    board.start_worker()
    host = os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("PORT", "7860"))
    per_client = int(os.environ.get("SAKE_MAX_CONNECTIONS_PER_CLIENT", MAX_CONNECTIONS_PER_CLIENT))
    try:
        uvicorn.Server(uvicorn_config(create_app(board), host, port, per_client=per_client, log_level="info")).run()
    finally:
        board.stop_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main())
