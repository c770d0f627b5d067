"""The metric Space's app (published as ``app.py`` by ``sake publish metric``): upload a predictions JSONL, read the
scores.

Self-contained: it imports nothing of the toolkit but ``upload_guard.py``, which is published beside it (in a
checkout, the leaderboard's ``eval/leaderboard/upload_guard.py``). It loads the metric with ``evaluate.load`` from the module file
beside it (named in ``metric_space.json``, the file ``evaluate.load("ORG/NAME")`` fetches), reads the upload with
that module's strict reader (``read_predictions_file``: one-line errors, limits) and scores it with
``metric.compute``, so the page and ``evaluate.load`` give the same numbers.

    python app.py                                                   # what the Space runs (uvicorn, port 7860)
    uvicorn app:create_app --factory --host 127.0.0.1 --port 7860  # the same app, uvicorn's options yours

Importing the module does nothing; :func:`create_app` / :func:`build_blocks` load the metric from the folder.

Protocols: ``offline`` (deterministic stages; no key) and ``paper`` (the LLM judge of the paper; needs the
``OPENAI_API_KEY`` secret of the Space, and scores at most ``SAKE_PAPER_ROWS_PER_HOUR`` rows an hour, 50,000 by
default, about three complete runs: each undecided row costs the Space's key a judge call).

A public page: it scores only files its upload form received (a regular file in Gradio's upload folder, at most
``SAKE_MAX_MB``, 100 by default, of at most ``SAKE_MAX_ROWS`` rows, 50,000 by default: a complete run of the release
holds about 16,000), one at a time with at most 16 waiting. The app runs under uvicorn (:func:`create_app`, which
``python app.py`` serves too), where Gradio skips its own check of named paths: ``upload_guard.UploadsOnly`` refuses
a call naming any other file before Gradio copies it, and ``upload_guard.UploadGate`` admits at most
``SAKE_UPLOADS_PER_HOUR`` (30) uploads per client an hour, counts their bytes as they arrive and deletes uploads
after an hour.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Collection

try:  # the published folder: upload_guard.py beside app.py; a checkout: the leaderboard's module
    from upload_guard import UploadGate, UploadsOnly, check_upload, gradio_upload_dir
except ImportError:
    from eval.leaderboard.upload_guard import UploadGate, UploadsOnly, check_upload, gradio_upload_dir

HERE = Path(__file__).resolve().parent
SETTINGS_FILE = "metric_space.json"  # {"metric_file": "NAME.py", "repo_id": "ORG/NAME"}, written by sake publish
COLUMNS = ("item_id", "dimension", "type", "attribute", "pre_edit", "gap", "category", "options")
HEADLINE = (("reliability", "Reliability"), ("generality", "Generality"), ("locality_audio", "Audio locality"),
            ("locality_text", "Text locality"), ("portability", "Portability"))
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~-])")
MAX_UPLOAD_BYTES = int(float(os.environ.get("SAKE_MAX_MB") or 100) * 2**20)
MAX_ROWS = int(os.environ.get("SAKE_MAX_ROWS") or 50_000)
PAPER_ROWS_PER_HOUR = int(os.environ.get("SAKE_PAPER_ROWS_PER_HOUR") or 50_000)
_paper_runs: collections.deque[tuple[float, int]] = collections.deque()  # (when, rows) of recent paper scorings
_paper_lock = threading.Lock()


def _paper_budget(rows: int) -> None:
    """Count a paper-protocol scoring of ``rows`` rows against the hourly budget; ValueError when it would pass it."""
    now = time.monotonic()
    with _paper_lock:
        while _paper_runs and now - _paper_runs[0][0] >= 3600:
            _paper_runs.popleft()
        used = sum(n for _, n in _paper_runs)
        if used + rows > PAPER_ROWS_PER_HOUR:
            raise ValueError(f"this page scores at most {PAPER_ROWS_PER_HOUR} rows an hour with the paper protocol "
                             f"(each undecided row is a judge call on its key; {used} used, this file has {rows}); "
                             "score offline here, or run eval.score with your own key")
        _paper_runs.append((now, rows))


def markdown_text(text: Any) -> str:
    """``text`` on one line with Markdown's special characters escaped (shown as typed, never as markup)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _value(value: Any) -> str:
    return "–" if value is None else f"{float(value):.2f}"


class LoadedMetric:
    """The metric of a Space folder: ``evaluate.load`` of its module file, and that module (its strict reader)."""

    def __init__(self, folder: str | os.PathLike = HERE):
        import evaluate

        self.folder = Path(folder)
        self.settings = json.loads((self.folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        self.metric = evaluate.load(str(self.folder / self.settings["metric_file"]))
        self.module = sys.modules[type(self.metric).__module__]
        self.received: Collection[str] | None = None  # the paths Gradio's upload route returned (by the page)


def score_file(loaded: LoadedMetric, path: str | os.PathLike, protocol: str = "offline") -> dict[str, Any]:
    """The results of the predictions file at ``path`` (header + one row per item), scored by the loaded metric."""
    if protocol not in ("offline", "paper"):
        raise ValueError(f"protocol: expected 'offline' or 'paper', got {protocol!r}")
    if protocol == "paper" and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError("the paper protocol needs the LLM judge's key: set the Space secret OPENAI_API_KEY, or "
                         "score with the offline protocol")
    read = loaded.module.read_predictions_file(path, max_rows=MAX_ROWS,
                                               max_rows_reason="the most this page scores (a complete run of the "
                                                               "release holds about 16,000)")
    rows = [row for _, row in read.rows]
    if not rows:
        raise ValueError(f"{Path(path).name}: no prediction rows after the header")
    if protocol == "paper":
        _paper_budget(len(rows))
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    return loaded.metric.compute(predictions=[row.get("post_edit") for row in rows],
                                 references=[row.get("reference") for row in rows],
                                 questions=[row.get("question") or "" for row in rows],
                                 judge="openai" if protocol == "paper" else "offline", header=read.header,
                                 **columns)


def scores_markdown(results: dict[str, Any]) -> str:
    """Overall and per-attribute scores as a Markdown table (values in percent)."""
    metrics = results["metrics"]
    lines = ["| Scope | " + " | ".join(label for _, label in HEADLINE) + " |",
             "|---|" + "---:|" * len(HEADLINE)]
    scopes = [("overall", metrics["overall"])] + sorted((metrics.get("per_attribute") or {}).items())
    scopes += [(f"gap {gap}", block) for gap, block in sorted((metrics.get("per_gap") or {}).items(),
                                                               key=lambda kv: int(kv[0]))]
    for scope, block in scopes:
        lines.append(f"| {markdown_text(scope)} | " + " | ".join(_value(block.get(key)) for key, _ in HEADLINE) +
                     " |")
    return "\n".join(lines)


def answer(loaded: LoadedMetric, path: str | None, protocol: str) -> tuple[str, str, str | None]:
    """What the page shows for an upload: (summary Markdown, scores Markdown, results JSON path or None)."""
    if not path:
        return "Choose a predictions `.jsonl` file first.", "", None
    try:
        path = str(check_upload(path, gradio_upload_dir(), MAX_UPLOAD_BYTES, loaded.received))
        results = score_file(loaded, path, protocol)
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, the page answers in one line
        message = " ".join(str(exc).split()) or type(exc).__name__
        return f"### Not scored\n{markdown_text(message)}", "", None
    judge = results.get("judge") or {}
    model = str(results.get("model") or "model")
    if model.startswith(("/", ".", "~")):  # a local model directory: its name, not the submitter's disk layout
        model = Path(model).name
    summary = (f"### Scores\n{markdown_text(model)} · "
               f"{markdown_text(results.get('method') or 'method')} · {markdown_text(results.get('mode'))} · "
               f"{results.get('n_rows')} rows · protocol **{markdown_text(judge.get('protocol') or protocol)}**")
    out = Path(path).with_name("results.json")
    staged = out.with_name(f".results.{os.getpid()}.{threading.get_ident()}.tmp")  # written whole, then renamed
    staged.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staged, out)
    return summary, scores_markdown(results), str(out)


def build_blocks(folder: str | os.PathLike = HERE) -> Any:
    """The page (Gradio Blocks): upload, protocol, score button, summary, scores table, results JSON."""
    import gradio as gr

    loaded = LoadedMetric(folder)
    with gr.Blocks(title="SAKE metric", delete_cache=(3600, 3600)) as blocks:
        loaded.received = blocks.upload_file_set
        gr.Markdown(f"# SAKE metric\nUpload a predictions file written by the SAKE runner (`predictions.jsonl`: "
                    f"the run header, then one row per evaluated item) to score it. The same module loads with "
                    f"`evaluate.load(\"{loaded.settings['repo_id']}\")`.")
        upload = gr.File(label="Predictions .jsonl", file_types=[".jsonl"], type="filepath", elem_id="predictions")
        protocol = gr.Radio(["offline", "paper"], value="offline", label="Protocol", elem_id="protocol",
                            info="offline: empty -> exact -> multiple-choice matcher; paper: empty -> exact -> LLM "
                                 "judge (needs the OPENAI_API_KEY secret)")
        button = gr.Button("Score", variant="primary", elem_id="score-button")
        summary = gr.Markdown(elem_id="summary")
        scores = gr.Markdown(elem_id="scores")
        results = gr.File(label="Results JSON", elem_id="results-json")
        button.click(lambda path, chosen: answer(loaded, path, chosen), [upload, protocol], [summary, scores, results],
                     api_name="score")
    return blocks.queue(max_size=16, default_concurrency_limit=1)


def create_app(folder: str | os.PathLike = HERE) -> Any:
    """The Space as an ASGI app (FastAPI with the Gradio page at ``/``), for uvicorn."""
    import gradio as gr
    from fastapi import FastAPI

    blocks = build_blocks(folder)
    app = gr.mount_gradio_app(FastAPI(docs_url=None, redoc_url=None, openapi_url=None), blocks, path="/",
                              ssr_mode=False, max_file_size=MAX_UPLOAD_BYTES)
    uploads, received = gradio_upload_dir(), blocks.upload_file_set
    gate = UploadGate(uploads, int(os.environ.get("SAKE_UPLOADS_PER_HOUR") or 30), ttl_s=3600.0,
                      max_dir_bytes=20 * MAX_UPLOAD_BYTES, max_request_bytes=MAX_UPLOAD_BYTES + (1 << 20),
                      received=received)
    return UploadsOnly(app, lambda path: check_upload(path, uploads, MAX_UPLOAD_BYTES, received), gate=gate)


def main() -> None:
    """What the Space runs (``python app.py``): :func:`create_app` under uvicorn, so the upload guard is in front
    of the page however it is started (port ``PORT``, else ``GRADIO_SERVER_PORT``, else 7860)."""
    import uvicorn

    port = int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    uvicorn.run(create_app(), host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"), port=port,
                timeout_keep_alive=5, limit_concurrency=256)


if __name__ == "__main__":
    main()
