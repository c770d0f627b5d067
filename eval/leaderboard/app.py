"""Hugging Face Space entry point: build the board from the results, then serve it on port 7860.

Results come from ``SAKE_RESULTS_REPO`` (a Hub dataset repo, read with ``HF_TOKEN`` when private) or the local
directory ``SAKE_RESULTS_DIR`` (default ``./results``). The site is written to ``SAKE_SITE_DIR`` (default
``./site``). Serving uses FastAPI + uvicorn when present (they come with the Space's gradio SDK), else the
standard library's ``http.server``. Needs no torch and no model.

Run locally: ``python -m eval.leaderboard.app`` (or ``python eval/leaderboard/app.py``).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (a Space runs `python app.py`): make `eval` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.leaderboard.build import build_site  # noqa: E402
from eval.leaderboard.serve import serve_forever  # noqa: E402

logger = logging.getLogger("eval.leaderboard.app")


def prepare_site() -> Path:
    """Fetch results (Hub or local) and build the site; return its directory."""
    site_dir = Path(os.environ.get("SAKE_SITE_DIR", "site"))
    repo = os.environ.get("SAKE_RESULTS_REPO")
    if repo:
        from huggingface_hub import snapshot_download

        results_dir = snapshot_download(repo, repo_type="dataset", allow_patterns=["results/*.json"],
                                        token=os.environ.get("HF_TOKEN"))
    else:
        results_dir = os.environ.get("SAKE_RESULTS_DIR", "results")
        Path(results_dir).mkdir(parents=True, exist_ok=True)
    return build_site(results_dir, site_dir)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    site_dir = prepare_site()
    host = os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("PORT", "7860"))
    try:
        import uvicorn
        from fastapi import FastAPI
        from fastapi.staticfiles import StaticFiles
    except ImportError:
        logger.info("fastapi/uvicorn not installed: serving with http.server")
        serve_forever(site_dir, host, port)
        return
    app = FastAPI(title="SAKE leaderboard")
    app.mount("/", StaticFiles(directory=str(site_dir), html=True), name="board")
    uvicorn.run(app, host=host, port=port)


if __name__ == "__main__":
    main()
