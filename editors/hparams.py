"""Hyperparameters as data: ``editors/hparams/<method>.yaml``.

Each file has a ``defaults`` mapping, one mapping per model family (the ``FAMILY`` keys of the adapter modules:
``qwen2_audio``, ``audio_flamingo3``, ``desta25``; paper Table 6) and a ``tiny`` mapping applied on top for tiny random-init models (tests, CI).
:func:`load_hparams` merges ``defaults`` <- family <- ``tiny`` (tiny models only) <- CLI overrides
(``--hparam key=value``, the value parsed as YAML, e.g. ``lr=1e-3``, ``layer=-1``, ``optimizer=sgd``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"


def hparams_file(method: str) -> Path:
    """The YAML of ``method`` (``editors/hparams/`` or, for a method found on ``$SAKE_METHODS_PATH``, the
    ``hparams/`` folder beside its module)."""
    from sake.registry import methods

    info = methods().get(method)
    return info.hparams_path if info else HPARAMS_DIR / f"{method}.yaml"


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-3", "layer=-1"]`` -> ``{"lr": 0.001, "layer": -1}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--hparam {item!r}: expected key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--hparam {item!r}: empty key")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _looks_numeric(parsed):
            parsed = float(parsed)  # YAML 1.1 reads "1e-3" as a string
        out[key] = parsed
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numeric(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, str) and _looks_numeric(v) else v) for k, v in mapping.items()}


def load_hparams(method: str, family: str, *, tiny: bool = False, overrides: Sequence[str] | dict[str, Any] = ()
                 ) -> dict[str, Any]:
    """The merged hyperparameters of ``method`` for a model ``family`` (see the module docstring).

    Raises ValueError naming the file when it is missing, malformed or has no entry for the family, and when an
    override names a key the file does not define."""
    path = hparams_file(method)
    if not path.is_file():
        raise ValueError(f"no hyperparameter file for method {method!r}: {path} missing")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at top level")
    if family not in data:
        raise ValueError(f"{path}: no entry for model family {family!r} (has {sorted(k for k in data)})")
    merged: dict[str, Any] = {}
    for section in ("defaults", family) + (("tiny",) if tiny else ()):
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        merged.update(_numeric(value))
    extra = dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)
    unknown = sorted(set(extra) - set(merged))
    if unknown:
        raise ValueError(f"--hparam: unknown key(s) {unknown} for {method} (known: {sorted(merged)})")
    merged.update(extra)
    return merged
