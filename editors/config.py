"""The typed configuration of one editing run (:class:`RunConfig`): what ``python -m editors.run`` parses its
arguments into, and what :func:`sake.api.run` takes.

Checked on construction, without importing torch or any method: field types and ranges, the method (one of the
discovered methods, :mod:`editors.registry`), the model's family (a tiny name, a local model directory of a known
``model_type`` or a Hub id; a Hub id whose name gives no hint is resolved when the model loads) and every
``hparams`` key (one the method's YAML defines). Each failure is a :class:`~sake_core.errors.ConfigError` naming the
field and what is known."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sake_core.errors import ConfigError
from sake_core.protocol import (ATTRIBUTES, MODES, PRE_EDIT_ITEMS, SEQUENTIAL_CONFIG, SEQUENTIAL_EVAL_EDITS,
                                SEQUENTIAL_MAX_GAP)

#: ``RunConfig.engine``: ``auto`` or one of the generation layer's engines (``editors.models.generation.ENGINES``).
ENGINE_CHOICES = ("auto", "eager", "graph")


@dataclass(frozen=True)
class RunConfig:
    """One editing run: apply ``method`` to ``model`` on the SAKE ``dataset`` and write predictions to ``out``.

    ``configs`` defaults to the four attribute configs in single mode and ``("sequential",)`` in sequential mode.
    ``hparams`` overrides keys of ``editors/hparams/<method>.yaml`` (unknown keys are an error). ``dtype`` and
    ``device`` default to bf16 on a GPU, fp32 on CPU. ``max_new_tokens``: None = the model family's generation
    length (``editors/models/generation/defaults.yaml``). ``engine``: the decode engine (``auto``: the graph
    engine on CUDA where the method allows it, else eager; ``editors.models.generation``). ``eval_edits``/
    ``max_gap``: the sequential rule (paper: 5 and 5), written to the predictions header. ``edits_per_pass``:
    independent single edits applied at once (None: sized from the memory an edit needs, 1 on CPU).
    ``pre_edit_items``: which items get the unedited model's output (``locality``: the items whose score reads it,
    as the paper's protocol; ``all``: every item, e.g. to see what an edit changed), written to the header.
    """

    model: str
    method: str
    dataset: str
    out: str = "runs"
    configs: tuple[str, ...] = ()
    split: str = "test"
    mode: str = "single"
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int | None = None
    batch_size: int = 0
    max_batch_tokens: int | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    device: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    eval_edits: int = SEQUENTIAL_EVAL_EDITS
    max_gap: int = SEQUENTIAL_MAX_GAP
    edits_per_pass: int | None = None
    engine: str = "auto"
    pre_edit_items: str = "locality"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "method", "dataset", "out", "split"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
            elif not isinstance(value, str) or not value:
                raise ConfigError(f"RunConfig.{name}: expected a non-empty string, got {value!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(self.cache_dir))
        if self.mode not in MODES:
            raise ConfigError(f"RunConfig.mode: expected one of {list(MODES)}, got {self.mode!r}")
        configs = (self.configs,) if isinstance(self.configs, str) else tuple(self.configs or ())
        if self.mode == "sequential":
            configs = configs or (SEQUENTIAL_CONFIG,)
            if configs != (SEQUENTIAL_CONFIG,):
                raise ConfigError(f"--mode sequential takes --config {SEQUENTIAL_CONFIG} only, got {list(configs)}")
        else:
            configs = tuple(dict.fromkeys(configs or ATTRIBUTES))
            bad = [c for c in configs if c not in ATTRIBUTES]
            if bad:
                raise ConfigError(f"--mode single: unknown config(s) {bad}; expected {list(ATTRIBUTES)}"
                                 + (" (use --mode sequential for the sequential config)"
                                    if SEQUENTIAL_CONFIG in bad else ""))
        object.__setattr__(self, "configs", configs)
        object.__setattr__(self, "hparams", dict(self.hparams or {}))
        for name, low in (("limit", 1), ("eval_edits", 1), ("max_gap", 0), ("edits_per_pass", 1),
                          ("max_new_tokens", 1), ("batch_size", 0), ("max_batch_tokens", 0)):
            value = getattr(self, name)
            if value is None and name in ("limit", "edits_per_pass", "max_new_tokens", "max_batch_tokens"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"RunConfig.{name}: expected an integer >= {low}, got {value!r}")
        if self.engine not in ENGINE_CHOICES:
            raise ConfigError(f"RunConfig.engine: expected one of {list(ENGINE_CHOICES)}, got {self.engine!r}")
        if self.pre_edit_items not in PRE_EDIT_ITEMS:
            raise ConfigError(f"RunConfig.pre_edit_items: expected one of {list(PRE_EDIT_ITEMS)}, "
                              f"got {self.pre_edit_items!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"RunConfig.seed: expected an integer, got {self.seed!r}")
        self._check_names()

    def _check_names(self) -> None:
        """The method, the model's family and the hparams keys exist (read from files: nothing imported)."""
        from editors.models.registry import family_of
        from editors.registry import hparams_keys, method_info

        method_info(self.method)  # ConfigError naming the known methods
        family = family_of(self.model, offline=True)  # ConfigError naming the known families / tiny names
        known = hparams_keys(self.method, family)
        unknown = sorted(set(self.hparams) - known)
        if unknown:
            raise ConfigError(f"RunConfig.hparams: unknown key(s) {unknown} for method {self.method!r} "
                              f"(known: {', '.join(sorted(known))})")

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def output_path(self) -> Path:
        """``OUT/MODEL__METHOD__MODE__SPLIT.jsonl``, with ``__CONFIG+CONFIG`` before the suffix for a single-editing
        run of some of the attributes (so runs of different attributes into one folder do not meet in one file),
        or ``out`` itself when it ends in ``.jsonl``."""
        if self.out.endswith(".jsonl"):
            return Path(self.out)
        slug = Path(self.model.rstrip("/")).name if Path(self.model).exists() else self.model.replace("/", "--")
        name = f"{slug}__{self.method}__{self.mode}__{self.split}"
        if self.mode == "single" and set(self.configs) != set(ATTRIBUTES):
            name += "__" + "+".join(sorted(self.configs))
        return Path(self.out) / f"{name}.jsonl"
