"""The leaderboard Space: a Gradio app (table, submit, about) plus one HTML page per submission, on uvicorn.

- **Leaderboard** tab: one row per scored result and per row the paper reports (marked ``paper (reported)``);
  filters by model family, method, mode and judging protocol. Every row carries its protocol (``paper``,
  ``paper+choice``, ``offline``); ranks are counted within one mode and one protocol, so an offline row is never
  ranked among paper rows.
- **Submit** tab: upload a submission ``.zip``; the board's validator (the same one ``add`` runs) answers on the
  page at once, and a valid archive is queued (``QUEUE/pending``). A worker thread scores the queue
  (:func:`eval.leaderboard.store.process_queue`: a failing submission goes to ``rejected/`` and the queue goes on).
- **About** tab: the submission format and the protocols.
- ``/submission/<id>``: the submission's items with question, reference, pre- and post-edit output, verdict and
  the stage that decided it (``items.jsonl`` stored with the result), filterable to the failed items.

Configuration (environment, or ``leaderboard.json`` next to the Space's ``app.py``; the environment wins):
``SAKE_RESULTS_REPO`` (Hub dataset repo holding the results store; token ``HF_TOKEN``) or ``SAKE_RESULTS_DIR``
(local store, default ``./results``), ``SAKE_MANIFEST`` (release manifest: Hub dataset id, folder or file),
``SAKE_QUEUE_DIR`` (default ``./queue``), ``SAKE_JUDGE`` (``paper`` needs the judge's API key as a Space secret;
``offline`` for demos), ``SAKE_QUEUE_INTERVAL`` (seconds between queue runs, default 30; 0 turns the worker off),
``SAKE_MAX_MB`` (default 50). Run locally: ``python -m eval.leaderboard.space``.
"""
from __future__ import annotations

import functools
import html
import json
import logging
import math
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sake_core.atomic import atomic_write
from sake_core.protocol import FAMILY_NAMES, method_display

from .build import display_model_name, reference_rows
from .store import (ITEMS_NAME, PROTOCOLS, LocalStore, ResultsStore, open_store, process_queue,
                    result_protocol)
from .validate import (DEFAULT_MAX_BYTES, PREDICTIONS_NAME, SubmissionError, load_manifest,
                       validate_submission)

logger = logging.getLogger(__name__)

CONFIG_FILE = "leaderboard.json"
HEADLINE = (("reliability", "Reliability"), ("generality", "Generality"), ("locality_audio", "Locality (audio)"),
            ("locality_text", "Locality (text)"), ("portability", "Portability"))
COLUMNS = ["Rank", "Model", "Family", "Method", "Mode", "Protocol", "Source"] + [t for _, t in HEADLINE] + \
          ["Average", "Items"]
#: Model ids of the paper's families (the header's ``family`` names the adapter when the runner wrote it).
FAMILY_PATTERNS = (("qwen2_audio", re.compile(r"qwen2[-_]?audio", re.I)),
                   ("audio_flamingo3", re.compile(r"flamingo|(^|[/_-])af3", re.I)),
                   ("desta25", re.compile(r"desta", re.I)))
ITEMS_PER_PAGE = 200
ITEMS_CACHE = 8  # submissions whose parsed items are kept in memory
SHOWN_CHARS = 2000  # an output longer than this is cut on the item page (the full text stays in the store)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~-])")
SAFE_ID = re.compile(r"^[0-9a-f]{20}$")


def model_family(model: str, header: dict[str, Any] | None = None) -> str:
    """The family shown in the family filter (display name from ``sake_core.protocol.FAMILY_NAMES``): the header's
    ``family`` (adapter key), else the family a known model id belongs to, else ``other``."""
    family = (header or {}).get("family")
    if not family:
        family = next((key for key, pattern in FAMILY_PATTERNS if pattern.search(model or "")), None)
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


@dataclass
class SpaceConfig:
    """Where the Space reads results, keeps its queue, and how it scores."""

    results_dir: str = "results"
    results_repo: str | None = None
    manifest: str = "sake/sake"
    queue_dir: str = "queue"
    judge: str = "paper"
    queue_interval_s: float = 30.0
    max_bytes: int = DEFAULT_MAX_BYTES
    refresh_s: float = 60.0  # how long Hub results are cached
    judge_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, config_file: str | os.PathLike | None = None) -> "SpaceConfig":
        """Defaults <- ``leaderboard.json`` (when present) <- environment variables."""
        values: dict[str, Any] = {}
        path = Path(config_file) if config_file else Path(CONFIG_FILE)
        if path.is_file():
            values.update(json.loads(path.read_text(encoding="utf-8")))
        env = os.environ
        for key, name, cast in (("results_repo", "SAKE_RESULTS_REPO", str), ("results_dir", "SAKE_RESULTS_DIR", str),
                                ("manifest", "SAKE_MANIFEST", str), ("queue_dir", "SAKE_QUEUE_DIR", str),
                                ("judge", "SAKE_JUDGE", str), ("queue_interval_s", "SAKE_QUEUE_INTERVAL", float)):
            if env.get(name):
                values[key] = cast(env[name])
        if env.get("SAKE_MAX_MB"):
            values["max_bytes"] = int(float(env["SAKE_MAX_MB"]) * 2**20)
        known = {f for f in cls.__dataclass_fields__}
        config = cls(**{k: v for k, v in values.items() if k in known})
        if config.judge not in PROTOCOLS:
            raise ValueError(f"SAKE_JUDGE / leaderboard.json judge: got {config.judge!r}, expected one of "
                             f"{', '.join(PROTOCOLS)}")
        return config


class Board:
    """The Space's data: results (cached), submissions to the queue, the queue worker, per-item pages."""

    def __init__(self, config: SpaceConfig, store: ResultsStore | None = None,
                 manifest: dict[str, Any] | None = None):
        self.config = config
        self.store = store or open_store(config.results_dir, config.results_repo)
        self._manifest = manifest
        self._cache: tuple[float, list[dict[str, Any]]] | None = None
        self._items: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.queue = Path(config.queue_dir)
        self._stop = threading.Event()

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = load_manifest(self.config.manifest)
        return self._manifest

    # ------------------------------------------------------------------------------------------ rows

    @functools.cached_property
    def reported_rows(self) -> list[dict[str, Any]]:
        """The paper's reported rows as board rows (a checked-in file: read once, not on every table refresh)."""
        return [{"id": ref["id"], "reference": True, "model": ref["model"], "model_display": ref["model_display"],
                 "family": model_family(ref["model"]), "method": ref["method"],
                 "method_name": method_display(ref["method"])[0], "method_order": method_display(ref["method"])[1],
                 "mode": ref["mode"],
                 "protocol": "paper", "metrics": ref["metrics"]["overall"], "n_rows": None, "submitter": "paper"}
                for ref in reference_rows()[0]]

    def results(self) -> list[dict[str, Any]]:
        """Stored results (Hub stores cached for ``refresh_s``)."""
        with self._lock:
            now = time.monotonic()
            if self._cache is None or isinstance(self.store, LocalStore) or now - self._cache[0] > self.config.refresh_s:
                self._cache = (now, self.store.results())
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
                         "family": model_family(result["model"], header), "method": result["method"],
                         "method_name": method_display(result["method"], result.get("method_display_name"),
                                                       result.get("method_display_order"))[0],
                         "method_order": method_display(result["method"], result.get("method_display_name"),
                                                        result.get("method_display_order"))[1],
                         "mode": result["mode"], "protocol": result_protocol(result),
                         "metrics": result["metrics"]["overall"], "n_rows": result.get("n_rows"),
                         "submitter": (sub.get("metadata") or {}).get("submitter", "")})
        rows += [dict(ref) for ref in self.reported_rows]  # copies: rank and average are set per call
        for row in rows:
            row["average"] = _average(row["metrics"])
        order = {p: i for i, p in enumerate(PROTOCOLS)}
        rows.sort(key=lambda r: (r["mode"] != "single", order.get(r["protocol"], 9),
                                 -(r["average"] if r["average"] is not None else -math.inf), r["model"],
                                 r["method"], r["reference"]))
        counters: dict[tuple[str, str], int] = {}
        for row in rows:  # ranks within one mode and one protocol: offline rows never rank among paper rows
            group = (row["mode"], row["protocol"])
            counters[group] = counters.get(group, 0) + 1
            row["rank"] = counters[group]
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
                source = "paper (reported)"
            else:
                source = f"[{markdown_text(row['submitter'] or 'submission')} · items](/submission/{row['id']})"
            values = [_rounded(row["metrics"].get(key)) for key, _ in HEADLINE]
            out.append([row["rank"], row["model_display"], row["family"], row["method_name"],
                        row["mode"],
                        row["protocol"], source] + values + [row["average"], row["n_rows"]])
        return out

    # ------------------------------------------------------------------------------------------ submit / queue

    def submit(self, path: str | os.PathLike | None) -> str:
        """Validate an uploaded archive with the board's validator; queue it when valid. Returns Markdown."""
        if not path:
            return "Choose a submission `.zip` first."
        if not (Path(path).is_file() and Path(path).suffix.lower() == ".zip"):
            return "### Rejected\n- expected a `.zip` archive holding predictions.jsonl and metadata.json"
        try:
            submission = validate_submission(path, self.manifest, max_bytes=self.config.max_bytes)
        except SubmissionError as exc:
            lines = [f"- {html.escape(str(p))}" for p in exc.problems]
            return "### Rejected\n" + "\n".join(lines)
        except Exception as exc:  # noqa: BLE001 - whatever the archive holds, the page answers in one line
            return f"### Rejected\n- {html.escape(type(exc).__name__)}: {html.escape(str(exc))}"
        sid = submission.submission_id
        if self.store.has(sid):
            return f"### Already on the board\nSubmission `{sid}` has been scored: see `/submission/{sid}`."
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{sid}.zip"
        # the temp file's name starts with ".", which the queue skips
        atomic_write(self.queue / "pending" / name, Path(path).read_bytes())
        header = submission.header
        return (f"### Queued\nSubmission `{sid}` ({html.escape(header['model'])} / {html.escape(header['method'])}"
                f" / {header['mode']}, {len(submission.rows)} rows) is valid and waits in the queue as `{name}`. "
                f"It appears on the board once scored ({self.config.judge} protocol).")

    def queue_status(self, shown: int = 10) -> str:
        """Markdown: pending submissions, and the latest rejected ones with their one-line error."""
        pending = sorted(p.name for p in (self.queue / "pending").glob("*") if not p.name.startswith("."))
        errors = sorted((self.queue / "rejected").glob("*.error.txt"), key=lambda p: p.name, reverse=True)[:shown]
        lines = [f"**Pending** ({len(pending)}): " + (", ".join(f"`{n}`" for n in pending) or "none")]
        if errors:
            lines.append("**Rejected while scoring** (latest first):")
            lines += [f"- `{p.name[:-len('.error.txt')]}`: {html.escape(p.read_text(encoding='utf-8').strip())}"
                      for p in errors]
        return "\n".join(lines)

    def run_queue(self) -> list[tuple[str, str]]:
        """Score everything pending (never raises for a bad submission)."""
        outcomes = process_queue(self.queue, self.manifest, self.store, judge=self.config.judge,
                                 validate_options={"max_bytes": self.config.max_bytes}, **self.config.judge_options)
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
        self._stop.set()

    # ------------------------------------------------------------------------------------------ item pages

    def items(self, sid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(result, item rows with verdicts) of a stored submission, or None when it is not on the board."""
        result = next((r for r in self.results() if (r.get("submission") or {}).get("id") == sid), None)
        if result is None:
            return None
        with self._lock:
            if sid in self._items:  # a stored submission never changes: its items are parsed once
                return result, self._items[sid]
        predictions = self.store.submission_file(sid, PREDICTIONS_NAME) or b""
        verdicts_bytes = self.store.submission_file(sid, ITEMS_NAME)
        lines = [json.loads(line) for line in predictions.decode("utf-8").splitlines()[1:] if line.strip()]
        if verdicts_bytes is None:
            verdicts = _offline_verdicts(predictions)  # results stored before per-item verdicts were kept
        else:
            verdicts = [json.loads(line) for line in verdicts_bytes.decode("utf-8").splitlines() if line.strip()]
        by_key = {(v["item_id"], v.get("gap")): v for v in verdicts}
        items = []
        for row in lines:
            verdict = by_key.get((row["item_id"], row.get("gap")), {})
            items.append({**row, "passed": verdict.get("passed"), "stage": verdict.get("stage", "?"),
                          "degeneration": verdict.get("degeneration")})
        with self._lock:
            while len(self._items) >= ITEMS_CACHE:
                self._items.pop(next(iter(self._items)))
            self._items[sid] = items
        return result, items


def _offline_verdicts(predictions: bytes) -> list[dict[str, Any]]:
    """Per-item verdicts of the metric's deterministic stages (for results stored without ``items.jsonl``)."""
    import tempfile

    from eval.score import score_predictions

    with tempfile.TemporaryDirectory(prefix="sake-items-") as tmp:
        (Path(tmp) / PREDICTIONS_NAME).write_bytes(predictions)
        score_predictions(str(Path(tmp) / PREDICTIONS_NAME), judge="offline", items_out=str(Path(tmp) / ITEMS_NAME))
        return [json.loads(line) for line in (Path(tmp) / ITEMS_NAME).read_text(encoding="utf-8").splitlines()]


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
    found = board.items(sid)
    if found is None:
        return 404, "<!doctype html><title>Not found</title><p>No such submission on the board.</p>"
    result, items = found
    selected = [it for it in items if (show != "failed" or it["passed"] is False)
                and (not dimension or it["dimension"] == dimension)]
    pages = max(1, math.ceil(len(selected) / ITEMS_PER_PAGE))
    page = min(max(1, page), pages)
    shown = selected[(page - 1) * ITEMS_PER_PAGE: page * ITEMS_PER_PAGE]
    metadata = (result.get("submission") or {}).get("metadata") or {}

    def link(**changes: Any) -> str:
        query = {"show": show, "dimension": dimension, "page": 1} | changes
        return f"/submission/{sid}?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})

    failed = sum(1 for it in items if it["passed"] is False)
    dims = sorted({it["dimension"] for it in items})
    nav = [f'<a href="{esc(link(show="all"))}">all items ({len(items)})</a>',
           f'<a id="failed-link" href="{esc(link(show="failed"))}">failed items ({failed})</a>']
    nav += [f'<a href="{esc(link(dimension=d))}">{esc(d)}</a>' for d in dims]
    body = []
    for it in shown:
        verdict = "pass" if it["passed"] else ("fail" if it["passed"] is False else "?")
        dim = it["dimension"] + (f" {it['type']}" if it.get("type") else "")
        gap = "" if it.get("gap") is None else str(it["gap"])
        body.append(
            f'<tr class="{verdict}" data-item="{esc(it["item_id"])}"><td>{esc(it["item_id"])}</td><td>{esc(gap)}</td>'
            f'<td>{esc(dim)}</td><td class="out">{esc(_shown(it.get("question")))}</td>'
            f'<td class="out">{esc(_shown(it.get("reference")))}</td>'
            f'<td class="out">{esc(_shown(it.get("pre_edit")))}</td>'
            f'<td class="out">{esc(_shown(it.get("post_edit")))}</td>'
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
{esc(str(judge.get("model") or ""))}) · {len(items)} items, {failed} failed</p>
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
- **paper**: the paper's protocol: deterministic stages (empty, exact match) and then the LLM judge;
- **paper+choice**: the paper's protocol with the opt-in multiple-choice prefilter before the LLM judge;
- **offline**: deterministic stages only (no LLM judge); undecided items count as wrong.

Ranks are counted within one mode and one protocol: an offline row is never ranked among paper rows. Rows
marked *paper (reported)* are the numbers the paper reports, transcribed from its tables.

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
    datatypes: list[Any] = ["number", "str", "str", "str", "str", "str", "markdown"] + ["number"] * (len(HEADLINE) + 2)
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
                table = gr.Dataframe(value=board.table(), headers=COLUMNS, datatype=datatypes, interactive=False,
                                     elem_id="board-table", max_height=900, wrap=True)
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
                answer = gr.Markdown(elem_id="submit-result")
                status = gr.Markdown(elem_id="queue-status")
                submit.click(board.submit, upload, answer).then(board.queue_status, None, status)
                blocks.load(board.queue_status, None, status)
            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT, elem_id="about")
    return blocks


def create_app(board: Board) -> Any:
    """The Space's ASGI app: ``/submission/<id>`` pages and the Gradio app at ``/``, with security headers."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    from .serve import SecurityHeaders

    app = FastAPI(title="SAKE leaderboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/submission/{sid}", response_class=HTMLResponse)
    def submission(sid: str, show: str = "all", dimension: str = "", page: int = 1) -> HTMLResponse:
        status, document = submission_page(board, sid, show=show, dimension=dimension, page=page)
        return HTMLResponse(document, status_code=status, headers=PAGE_HEADERS)

    app = gr.mount_gradio_app(app, build_blocks(board), path="/", max_file_size=board.config.max_bytes,
                              footer_links=[], ssr_mode=False)
    # Gradio needs inline scripts and styles: its pages get every header but a script-restricting CSP.
    headers = {"x-content-type-options": "nosniff", "referrer-policy": "strict-origin-when-cross-origin",
               "permissions-policy": "camera=(), microphone=(), geolocation=()",
               "content-security-policy": "frame-ancestors 'self' https://huggingface.co https://*.hf.space; "
                                          "object-src 'none'; base-uri 'self'"}
    return SecurityHeaders(app, headers)


def main() -> None:
    """Run the Space: results store, queue worker, Gradio app on uvicorn (port ``PORT`` or 7860)."""
    import uvicorn

    from .serve import uvicorn_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    board = Board(SpaceConfig.from_env())
    if isinstance(board.store, LocalStore):
        Path(board.config.results_dir).mkdir(parents=True, exist_ok=True)
    board.start_worker()
    host = os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("PORT", "7860"))
    uvicorn.Server(uvicorn_config(create_app(board), host, port, log_level="info")).run()


if __name__ == "__main__":
    main()
