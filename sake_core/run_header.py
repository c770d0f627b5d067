"""Comparing two run headers: which of the fields a resume must agree on (``protocol.RESUME_FIELDS``) differ.

A resume of a predictions file, the merge of part files and the joining of one run's per-attribute files all
ask :func:`resume_differences`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from sake_core.protocol import RESUME_FIELDS

#: Resume fields naming something whose content another resume field keys: they may be spelled differently
#: (``runs/x`` and ``/home/me/runs/x``) when that key agrees.
_CONTENT_KEYS = {"model": "model_key", "dataset": "dataset_fingerprint"}


def _same_value(old: Any, new: Any) -> bool:
    """Equal header values, where two strings naming one existing file or folder (a relative and an absolute
    spelling, seen from the current folder) count as equal, in nested objects and lists too (``hparams``)."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str):
        return os.path.exists(old) and os.path.exists(new) and os.path.realpath(old) == os.path.realpath(new)
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same_value(old[k], new[k]) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same_value(a, b) for a, b in zip(old, new))
    return False


def resume_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The :data:`RESUME_FIELDS` in which two run headers differ (a rerun resumes a file only when there are none);
    a path spelled another way counts as the same (:func:`_same_value`), and so does a model or dataset whose
    content key agrees."""
    differences = []
    for name in RESUME_FIELDS:
        if _same_value(old.get(name), new.get(name)):
            continue
        key = _CONTENT_KEYS.get(name)
        if key and old.get(key) and old.get(key) == new.get(key):
            continue
        differences.append(name)
    return differences
