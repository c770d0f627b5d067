"""The ground floor of the SAKE toolkit: what every other part imports and that imports nothing of the project.

* :mod:`sake_core.protocol`: the protocol constants (configs, labels, item kinds, prediction-row and header fields,
  metric keys, the sequential rule, display names and order of the paper's methods and families);
* :mod:`sake_core.atomic`: crash-safe writes (``atomic_write``, ``replace_dir``, ``staging_dir``);
* :mod:`sake_core.errors`: :class:`~sake_core.errors.SakeError`, the base of every user-facing error.

Standard library only (no torch, no numpy): the metric, the leaderboard and the dataset builder import it freely.
The floors above it and what each may import are listed in ARCHITECTURE.md ("Floors") and checked by
``tests/test_layers.py``.
"""
