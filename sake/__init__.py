"""SAKE toolkit core: the protocol constants (:mod:`sake.protocol`) and crash-safe writes (:mod:`sake.atomic`).

Importing :mod:`sake` needs no torch; the Python API that runs models lives in :mod:`sake.api`.
"""
