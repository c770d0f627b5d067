"""How a run generates: :class:`GenerationSettings`, resolved once from the model family's defaults
(``defaults.yaml`` beside this file) and passed as one value to every generation of the run.

The fields that change outputs (:meth:`GenerationSettings.output_key`: engine, max new tokens, dtype, the eager
engine's shared-prefix threshold) go into the run header, the resume check and the pre-edit cache key; the batching
limits (rows and padded tokens per chunk) only size the work and are recorded beside them. No environment variable
changes outputs: a run, ``sake.editing(...)``, the demo and the bench all call :func:`resolve_settings`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping

import yaml

from sake_core.errors import ConfigError

DEFAULTS_FILE = Path(__file__).resolve().parent / "defaults.yaml"

#: Decode engines (:mod:`editors.models.generation`): ``eager`` = Hugging Face ``generate`` with a dynamic KV cache
#: in canonical chunks; ``graph`` = our own loop over a static KV cache whose decode step is one CUDA graph per
#: shape bucket (run uncaptured on CPU). ``auto`` resolves to ``graph`` on CUDA when the method allows it, else
#: ``eager``.
ENGINES = ("eager", "graph")
#: Default padded tokens per generation chunk on CPU (on CUDA: sized from the memory available at each generation).
CPU_BATCH_TOKENS = 32768


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Greedy generation of one run (see the module docstring)."""

    max_new_tokens: int
    engine: str = "eager"
    dtype: str = "float32"
    min_shared_prefix: int = 0
    batch_size: int | None = None  # rows per chunk (None: no limit)
    max_batch_tokens: int | None = None  # padded tokens (rows x (width + max_new_tokens)) per chunk (None: no limit)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"generation engine {self.engine!r}; expected one of {', '.join(ENGINES)}")
        for name in ("max_new_tokens", "batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if value is None and name != "max_new_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"generation {name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.min_shared_prefix, int) or self.min_shared_prefix < 0:
            raise ConfigError(f"generation min_shared_prefix: expected an integer >= 0, got {self.min_shared_prefix!r}")

    def output_key(self) -> dict[str, Any]:
        """The fields that change outputs: the run header's ``generation`` field, part of the resume check and of
        the pre-edit cache key."""
        return {"engine": self.engine, "max_new_tokens": self.max_new_tokens, "dtype": self.dtype,
                "min_shared_prefix": self.min_shared_prefix}

    def batching(self) -> dict[str, Any]:
        """The limits that only size the work (recorded in the header, not compared on resume)."""
        return {"batch_size": self.batch_size, "max_batch_tokens": self.max_batch_tokens}

    def replace(self, **changes: Any) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=None)
def _defaults_file() -> dict[str, Any]:
    data = yaml.safe_load(DEFAULTS_FILE.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{DEFAULTS_FILE}: expected a mapping at top level")
    return data


def family_defaults(family: str, *, tiny: bool = False) -> dict[str, Any]:
    """``defaults`` <- the family's section <- ``tiny`` (tiny models) of ``defaults.yaml``."""
    data = _defaults_file()
    merged: dict[str, Any] = {}
    for section in ("defaults", family) + (("tiny",) if tiny else ()):
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{DEFAULTS_FILE}: section {section!r} must be a mapping")
        merged.update(value)
    return merged


def resolve_engine(engine: str, device_type: str, method_engines: tuple[str, ...] = ENGINES,
                   method: str = "") -> str:
    """``engine`` (``auto``, ``eager`` or ``graph``) for a method that supports ``method_engines`` (its first entry
    is its preferred engine on CUDA) on a ``device_type`` (``cpu`` / ``cuda``)."""
    if engine == "auto":
        if device_type != "cuda":
            return "eager"
        return method_engines[0]
    if engine not in ENGINES:
        raise ConfigError(f"generation engine {engine!r}; expected auto or one of {', '.join(ENGINES)}")
    if engine not in method_engines:
        raise ConfigError(f"method {method or '?'} generates with the {' or '.join(method_engines)} engine only, "
                          f"not {engine!r}")
    return engine


def resolve_settings(family: str, *, tiny: bool, device_type: str, dtype: str, max_new_tokens: int | None = None,
                     engine: str = "auto", method_engines: tuple[str, ...] = ENGINES, method: str = "",
                     batch_size: int | None = None, max_batch_tokens: int | None = None,
                     overrides: Mapping[str, Any] | None = None) -> GenerationSettings:
    """The one place generation settings come from: the family's defaults, then the explicit arguments (None =
    the default; ``max_batch_tokens``: None = :data:`CPU_BATCH_TOKENS` on CPU and no cap elsewhere, where each
    generation sizes its chunks from the memory available; 0 = no cap). ``overrides`` may set any other field (e.g.
    ``min_shared_prefix``)."""
    if max_batch_tokens is None and device_type == "cpu":
        max_batch_tokens = CPU_BATCH_TOKENS
    defaults = family_defaults(family, tiny=tiny)
    fields: dict[str, Any] = {"max_new_tokens": int(defaults["max_new_tokens"] if max_new_tokens is None else max_new_tokens),
              "min_shared_prefix": int(defaults.get("min_shared_prefix", 0)),
              "engine": resolve_engine(engine, device_type, method_engines, method),
              "dtype": str(dtype).replace("torch.", ""),
              "batch_size": batch_size or None, "max_batch_tokens": max_batch_tokens or None}
    fields.update(overrides or {})
    return GenerationSettings(**fields)
