"""SAKE leaderboard: submission format and validator, scoring into a results store, queue, static board, and
the Gradio Space (``python -m eval.leaderboard.space``).

CLI: ``python -m eval.leaderboard {validate,pack,score,add,queue,build,serve} --help``.
"""
from .build import build_site
from .store import LocalStore, add_submission, open_store, score_submission
from .validate import Submission, SubmissionError, load_manifest, validate_submission

__all__ = ["Submission", "SubmissionError", "LocalStore", "add_submission", "build_site", "load_manifest",
           "open_store", "score_submission", "validate_submission"]
