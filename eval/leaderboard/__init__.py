"""SAKE leaderboard: submission format and validator, scoring into a results store, queue, static board, and
the Gradio Space (``python -m eval.leaderboard.space``).

CLI: ``python -m eval.leaderboard {validate,pack,score,add,queue,build,serve} --help``.
"""
import importlib
from typing import Any

#: Exported name -> its module; imported on first use, so that ``python -m eval.leaderboard`` starts (and names a
#: missing optional package in one line) before any of them is loaded.
_EXPORTS = {"build_site": "build", "LocalStore": "store", "add_submission": "store", "open_store": "store",
            "score_submission": "store", "Submission": "validate", "SubmissionError": "validate",
            "load_manifest": "validate", "validate_submission": "validate"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
