"""Which model families exist and how a ``--model`` argument becomes an adapter.

A **model family** is an adapter module ``editors/models/<module>.py`` that declares, at module level,
``FAMILY`` (its key, also the hparams YAML section), ``ADAPTER_CLASS`` (the adapter's class name),
``MODEL_TYPES`` (``config.json`` ``model_type`` / architecture names it loads), ``HUB_ID_HINTS`` (lower-case
substrings of Hub ids) and ``TINY_NAME`` (the ``--model`` name of its random-init tiny model); optional
``DISPLAY_NAME``. Discovery reads the files with :mod:`ast` (nothing imported, no torch); adding a family is adding
one adapter module.

:func:`load_adapter` turns a ``--model`` argument into an adapter:

* ``tiny-qwen2-audio`` / ``tiny-audio-flamingo3`` / ``tiny-desta25``: random-init tiny models (tests, CI);
* a local directory: its ``config.json`` ``model_type`` picks the family (a saved tiny model stays tiny: the
  directory holds ``sake_tiny.json``);
* a Hub id: the family comes from the id (or, failing that, from the Hub config).
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sake_core.atomic import replace_dir, staging_dir
from sake_core.errors import ConfigError, DataError, one_line
from sake_core.protocol import FAMILY_NAMES, FAMILY_ORDER

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from editors.models.adapter import LALMAdapter

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent
TINY_MARKER = "sake_tiny.json"


@dataclass(frozen=True)
class FamilyInfo:
    """One discovered model family (adapter module)."""

    key: str
    module: str  # importable module name, e.g. editors.models.qwen2_audio
    adapter_class: str
    model_types: tuple[str, ...]
    hub_id_hints: tuple[str, ...]
    tiny_name: str
    display_name: str


def _literal(node: ast.AST, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError as exc:
        raise ConfigError(f"{where}: expected a literal value ({exc})") from exc


@functools.lru_cache(maxsize=None)
def _scan_families(models_dir: Path) -> dict[str, FamilyInfo]:
    found: dict[str, FamilyInfo] = {}
    for path in sorted(models_dir.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        nodes: dict[str, ast.AST] = {}
        for stmt in tree.body:
            target = None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target, value = stmt.targets[0], stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                target, value = stmt.target, stmt.value
            if isinstance(target, ast.Name) and target.id in ("FAMILY", "ADAPTER_CLASS", "MODEL_TYPES",
                                                                "HUB_ID_HINTS", "TINY_NAME", "DISPLAY_NAME"):
                nodes[target.id] = value
        if "FAMILY" not in nodes:
            continue  # a helper module, not an adapter
        consts = {name: _literal(node, f"{path}: {name}") for name, node in nodes.items()}
        missing = [k for k in ("ADAPTER_CLASS", "MODEL_TYPES", "HUB_ID_HINTS", "TINY_NAME") if k not in consts]
        if missing:
            raise ConfigError(f"{path}: an adapter module declaring FAMILY also needs {missing}")
        key = consts["FAMILY"]
        if key in found:
            raise ConfigError(f"{path}: family {key!r} is already declared by {found[key].module}")
        found[key] = FamilyInfo(key=key, module=f"editors.models.{path.stem}", adapter_class=consts["ADAPTER_CLASS"],
                                model_types=tuple(consts["MODEL_TYPES"]), hub_id_hints=tuple(consts["HUB_ID_HINTS"]),
                                tiny_name=consts["TINY_NAME"],
                                display_name=FAMILY_NAMES.get(key) or consts.get("DISPLAY_NAME") or key)
    order = {k: i for i, k in enumerate(FAMILY_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def families() -> dict[str, FamilyInfo]:
    """Every adapter module's family, the paper's families first (in its order)."""
    return _scan_families(MODELS_DIR)


_FAMILIES = families()

#: family key (hparams YAML key) -> "module:class"
FAMILIES: dict[str, str] = {k: f"{f.module}:{f.adapter_class}" for k, f in _FAMILIES.items()}

#: config.json model_type (or architecture) -> family
MODEL_TYPES: dict[str, str] = {t: k for k, f in _FAMILIES.items() for t in f.model_types}

#: --model names of the tiny random-init models -> family
TINY_MODELS: dict[str, str] = {f.tiny_name: k for k, f in _FAMILIES.items()}

#: lower-case substrings of Hub ids -> family
HUB_ID_HINTS: tuple[tuple[str, str], ...] = tuple((h, k) for k, f in _FAMILIES.items() for h in f.hub_id_hints)


def adapter_class(family: str) -> type[LALMAdapter]:
    """The adapter class of a family key; :class:`ConfigError` for unknown or not-yet-built families."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    module_name, class_name = FAMILIES[family].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigError(f"model family {family!r} has no adapter yet ({module_name} missing)") from exc
        raise
    return getattr(module, class_name)


def family_of(model: str, *, offline: bool = False) -> str | None:
    """The family of a ``--model`` argument (tiny name, local dir or Hub id). A Hub id whose name gives no hint is
    looked up in its Hub config, unless ``offline`` (then None: undecided until the model is loaded)."""
    if model in TINY_MODELS:
        return TINY_MODELS[model]
    path = Path(model)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{model}: a model directory needs a config.json")
        config = json.loads(config_file.read_text())
        keys = [config.get("model_type", "")] + list(config.get("architectures") or [])
        for key in keys:
            if key in MODEL_TYPES:
                return MODEL_TYPES[key]
        raise ConfigError(f"{config_file}: model_type {config.get('model_type')!r} is not a supported LALM "
                         f"(supported: {sorted(MODEL_TYPES)})")
    lowered = model.lower()
    for hint, family in HUB_ID_HINTS:
        if hint in lowered:
            return family
    if "/" in model and not model.startswith((".", "/")):
        if offline:
            return None
        try:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(model).model_type
        except Exception as exc:  # noqa: BLE001 - any Hub/network failure means "unknown model"
            raise ConfigError(f"unknown model {model!r}: not a tiny name ({sorted(TINY_MODELS)}), a local model "
                             f"directory or a loadable Hub id ({exc})") from exc
        if model_type in MODEL_TYPES:
            return MODEL_TYPES[model_type]
        raise ConfigError(f"model {model!r} has model_type {model_type!r}, not a supported LALM")
    raise ConfigError(f"unknown model {model!r}: expected one of {sorted(TINY_MODELS)}, a local model directory "
                     "or a Hub id such as Qwen/Qwen2-Audio-7B-Instruct")


def load_adapter(model: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu", seed: int = 0,
                 revision: str | None = None) -> LALMAdapter:
    """Build the adapter for ``model`` (see the module docstring) in ``dtype`` on ``device``.

    ``seed`` only matters for tiny models (their random initialisation)."""
    from editors.models.adapter import resolve_dtype

    family = family_of(model)
    assert family is not None
    cls = adapter_class(family)
    torch_dtype = resolve_dtype(dtype)
    if model in TINY_MODELS:
        return cls.tiny(seed, dtype=torch_dtype, device=device)
    is_tiny = Path(model).is_dir() and (Path(model) / TINY_MARKER).is_file()
    logger.info("loading %s (%s) as %s on %s", model, family, torch_dtype, device)
    try:
        return cls.from_pretrained(model, dtype=torch_dtype, device=device, revision=revision, is_tiny=is_tiny)
    except OSError as exc:  # not on the Hub or not reachable, no such folder, a folder without the model's files
        where = "local folder" if Path(model).exists() else "Hub id (or local folder)"
        raise DataError(f"{model}: cannot load this model as a {where}: {one_line(exc)}") from exc


def run_model_name(adapter: LALMAdapter) -> str:
    """The ``--model`` a run of this adapter names (the key of its trained hypernetworks' folders): a built-in
    tiny model's registered name (``tiny-qwen2-audio``, not its ``@seed`` model id), else the adapter's model id
    (a Hub id or a folder)."""
    name, _, seed = adapter.model_id.partition("@seed")
    return name if adapter.is_tiny and name in TINY_MODELS and seed.isdigit() else adapter.model_id


def save_tiny(adapter: LALMAdapter, directory: str | Path) -> None:
    """Save a tiny adapter so that :func:`load_adapter` of the directory gives it back (still marked tiny)."""
    directory = Path(directory)
    staged = staging_dir(directory)  # the folder appears complete (weights and marker) or not at all
    adapter.save_pretrained(staged)
    (staged / TINY_MARKER).write_text(json.dumps({"family": adapter.family, "model_id": adapter.model_id}))
    replace_dir(staged, directory)
