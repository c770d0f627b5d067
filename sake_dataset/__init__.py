"""SAKE dataset: sources -> normalized records -> edit instances -> Parquet release (no models, no metrics).

    from sake_dataset import build, build_demo, ATTRIBUTES, LABELS, features, item_kinds
"""

from typing import Any

from .labels import ATTRIBUTES, LABELS
from .records import ConstructionError, SourceError
from .schema import CONFIGS, DIMENSION_OF_KIND, ITEM_KINDS, SPLITS, expected_kinds, features, item_kinds, item_rows


def build(*args: Any, **kwargs: Any) -> Any:
    """`sake_dataset.builder.build` (imported lazily): build a release from sources; see its docstring."""
    from .builder import build as _build

    return _build(*args, **kwargs)


def build_demo(*args: Any, **kwargs: Any) -> Any:
    """`sake_dataset.builder.build_demo`: build from the embedded synthetic demo sources."""
    from .builder import build_demo as _build_demo

    return _build_demo(*args, **kwargs)


__all__ = ["ATTRIBUTES", "CONFIGS", "DIMENSION_OF_KIND", "ITEM_KINDS", "LABELS", "SPLITS", "ConstructionError",
           "SourceError", "build", "build_demo", "expected_kinds", "features", "item_kinds", "item_rows"]
