"""SAKE toolkit core: the protocol constants (:mod:`sake.protocol`), crash-safe writes (:mod:`sake.atomic`), the
method and family registries (:mod:`sake.registry`) and the Python API (:mod:`sake.api`):

    from sake import RunConfig, run, score, editing

Importing :mod:`sake` needs no torch; the API functions import the editors and the metric when called.
"""

from sake.api import EditedModel, RunConfig, editing, report, run, score

__all__ = ["EditedModel", "RunConfig", "editing", "report", "run", "score"]
