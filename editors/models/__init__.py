"""Model adapters: one module per LALM family, all behind the adapter interface (:mod:`editors.models.base`).

This package is the model floor: it imports nothing from ``editors`` above it. Families are discovered from the
adapter modules of this folder (:mod:`editors.models.registry`); :func:`load_adapter` turns a ``--model`` argument
(tiny name, local directory or Hub id) into an adapter.
"""

from __future__ import annotations

from editors.models.registry import (FAMILIES, HUB_ID_HINTS, MODEL_TYPES, TINY_MARKER, TINY_MODELS, adapter_class,
                                     families, family_of, load_adapter, save_tiny)

__all__ = ["FAMILIES", "HUB_ID_HINTS", "MODEL_TYPES", "TINY_MARKER", "TINY_MODELS", "adapter_class", "families",
           "family_of", "load_adapter", "save_tiny"]
