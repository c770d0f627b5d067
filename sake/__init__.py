"""The SAKE toolkit's top floor: the Python API (:mod:`sake.api`), the ``sake`` command (:mod:`sake.cli`) and the
demo (:mod:`sake.demo`). It imports the parts below it; nothing below imports it (ARCHITECTURE.md, "Floors").

    from sake import RunConfig, run, score, editing

Importing :mod:`sake` needs no torch; the API functions import the editors and the metric when called.
"""

from sake.api import EditedModel, RunConfig, editing, report, run, score

__all__ = ["EditedModel", "RunConfig", "editing", "report", "run", "score"]
