"""Model adapters: one module per LALM family, all behind :class:`editors.models.base.LALMAdapter`.

:func:`load_adapter` turns a ``--model`` argument into an adapter:

* ``tiny-qwen2-audio`` / ``tiny-audio-flamingo3`` / ``tiny-desta25``: random-init tiny models (tests, CI);
* a local directory: its ``config.json`` ``model_type`` picks the family (a saved tiny model stays tiny: the
  directory holds ``sake_tiny.json``);
* a Hub id: the family comes from the id (or, failing that, from the Hub config).
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import torch

from editors.models.base import LALMAdapter, Prompt, Turn, resolve_dtype
from sake.registry import families

logger = logging.getLogger(__name__)

__all__ = ["FAMILIES", "LALMAdapter", "Prompt", "Turn", "adapter_class", "family_of", "load_adapter",
           "TINY_MODELS"]

#: The families, discovered from the adapter modules of this folder (each declares FAMILY, ADAPTER_CLASS,
#: MODEL_TYPES, HUB_ID_HINTS, TINY_NAME; see sake.registry). Adding a family = adding one adapter module.
_FAMILIES = families()

#: family key (hparams YAML key) -> "module:class"
FAMILIES: dict[str, str] = {k: f"{f.module}:{f.adapter_class}" for k, f in _FAMILIES.items()}

#: config.json model_type (or architecture) -> family
MODEL_TYPES: dict[str, str] = {t: k for k, f in _FAMILIES.items() for t in f.model_types}

#: --model names of the tiny random-init models -> family
TINY_MODELS: dict[str, str] = {f.tiny_name: k for k, f in _FAMILIES.items()}

#: lower-case substrings of Hub ids -> family
HUB_ID_HINTS: tuple[tuple[str, str], ...] = tuple((h, k) for k, f in _FAMILIES.items() for h in f.hub_id_hints)

TINY_MARKER = "sake_tiny.json"


def adapter_class(family: str) -> type[LALMAdapter]:
    """The adapter class of a family key; ValueError for unknown or not-yet-built families."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    module_name, class_name = FAMILIES[family].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"model family {family!r} has no adapter yet ({module_name} missing)") from exc
        raise
    return getattr(module, class_name)


def family_of(model: str) -> str:
    """The family of a ``--model`` argument (tiny name, local dir or Hub id)."""
    if model in TINY_MODELS:
        return TINY_MODELS[model]
    path = Path(model)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{model}: a model directory needs a config.json")
        config = json.loads(config_file.read_text())
        keys = [config.get("model_type", "")] + list(config.get("architectures") or [])
        for key in keys:
            if key in MODEL_TYPES:
                return MODEL_TYPES[key]
        raise ValueError(f"{config_file}: model_type {config.get('model_type')!r} is not a supported LALM "
                         f"(supported: {sorted(MODEL_TYPES)})")
    lowered = model.lower()
    for hint, family in HUB_ID_HINTS:
        if hint in lowered:
            return family
    if "/" in model and not model.startswith((".", "/")):
        try:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(model).model_type
        except Exception as exc:  # noqa: BLE001 - any Hub/network failure means "unknown model"
            raise ValueError(f"unknown model {model!r}: not a tiny name ({sorted(TINY_MODELS)}), a local model "
                             f"directory or a loadable Hub id ({exc})") from exc
        if model_type in MODEL_TYPES:
            return MODEL_TYPES[model_type]
        raise ValueError(f"model {model!r} has model_type {model_type!r}, not a supported LALM")
    raise ValueError(f"unknown model {model!r}: expected one of {sorted(TINY_MODELS)}, a local model directory "
                     "or a Hub id such as Qwen/Qwen2-Audio-7B-Instruct")


def load_adapter(model: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu", seed: int = 0,
                 revision: str | None = None) -> LALMAdapter:
    """Build the adapter for ``model`` (see the module docstring) in ``dtype`` on ``device``.

    ``seed`` only matters for tiny models (their random initialisation)."""
    family = family_of(model)
    cls = adapter_class(family)
    torch_dtype = resolve_dtype(dtype)
    if model in TINY_MODELS:
        return cls.tiny(seed, dtype=torch_dtype, device=device)
    is_tiny = Path(model).is_dir() and (Path(model) / TINY_MARKER).is_file()
    logger.info("loading %s (%s) as %s on %s", model, family, torch_dtype, device)
    return cls.from_pretrained(model, dtype=torch_dtype, device=device, revision=revision, is_tiny=is_tiny)


def save_tiny(adapter: LALMAdapter, directory: str | Path) -> None:
    """Save a tiny adapter so that :func:`load_adapter` of the directory gives it back (still marked tiny)."""
    directory = Path(directory)
    adapter.save_pretrained(directory)
    (directory / TINY_MARKER).write_text(json.dumps({"family": adapter.family, "model_id": adapter.model_id}))
