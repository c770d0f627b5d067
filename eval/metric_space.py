"""The metric Space's app (published as ``app.py`` by ``sake publish metric``): upload a predictions JSONL, read the
scores.

Self-contained: it imports nothing of the toolkit. It loads the metric with ``evaluate.load`` from the module file
beside it (named in ``metric_space.json``, the file ``evaluate.load("ORG/NAME")`` fetches), reads the upload with
that module's strict reader (``read_predictions_file``: one-line errors, limits) and scores it with
``metric.compute``, so the page and ``evaluate.load`` give the same numbers.

    python app.py                                                   # what the Space runs (Gradio, port 7860)
    uvicorn app:create_app --factory --host 127.0.0.1 --port 7860  # the same app under uvicorn

Importing the module does nothing; :func:`create_app` / :func:`build_blocks` load the metric from the folder.

Protocols: ``offline`` (deterministic stages; no key) and ``paper`` (the LLM judge of the paper; needs the
``OPENAI_API_KEY`` secret of the Space).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETTINGS_FILE = "metric_space.json"  # {"metric_file": "NAME.py", "repo_id": "ORG/NAME"}, written by sake publish
COLUMNS = ("item_id", "dimension", "type", "attribute", "pre_edit", "gap", "category", "options")
HEADLINE = (("reliability", "Reliability"), ("generality", "Generality"), ("locality_audio", "Audio locality"),
            ("locality_text", "Text locality"), ("portability", "Portability"))
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~-])")


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


def score_file(loaded: LoadedMetric, path: str | os.PathLike, protocol: str = "offline") -> dict[str, Any]:
    """The results of the predictions file at ``path`` (header + one row per item), scored by the loaded metric."""
    if protocol not in ("offline", "paper"):
        raise ValueError(f"protocol: expected 'offline' or 'paper', got {protocol!r}")
    if protocol == "paper" and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError("the paper protocol needs the LLM judge's key: set the Space secret OPENAI_API_KEY, or "
                         "score with the offline protocol")
    read = loaded.module.read_predictions_file(path)
    rows = [row for _, row in read.rows]
    if not rows:
        raise ValueError(f"{Path(path).name}: no prediction rows after the header")
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
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return summary, scores_markdown(results), str(out)


def build_blocks(folder: str | os.PathLike = HERE) -> Any:
    """The page (Gradio Blocks): upload, protocol, score button, summary, scores table, results JSON."""
    import gradio as gr

    loaded = LoadedMetric(folder)
    with gr.Blocks(title="SAKE metric") as blocks:
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
        button.click(lambda path, chosen: answer(loaded, path, chosen), [upload, protocol], [summary, scores, results])
    return blocks


def create_app(folder: str | os.PathLike = HERE) -> Any:
    """The Space as an ASGI app (FastAPI with the Gradio page at ``/``), for uvicorn."""
    import gradio as gr
    from fastapi import FastAPI

    return gr.mount_gradio_app(FastAPI(docs_url=None, redoc_url=None, openapi_url=None), build_blocks(folder),
                               path="/", ssr_mode=False)


if __name__ == "__main__":
    build_blocks().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"), ssr_mode=False)
