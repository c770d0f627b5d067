"""Which editing methods and model families exist, discovered from their files (no hand-kept lists).

* A **method** is a module ``<dir>/<name>.py`` holding an :class:`editors.base.Editor` subclass decorated with
  ``@register("<name>")``, plus its hyperparameters ``<dir>/hparams/<name>.yaml``. ``<dir>`` is ``editors/``
  and every folder named in the environment variable ``SAKE_METHODS_PATH`` (``os.pathsep``-separated), so a
  method can live outside the checkout. The class may set ``display_name`` (how reports and the board show it)
  and ``display_order`` (its place among methods; the paper's methods keep the order of
  :data:`sake.protocol.METHOD_ORDER`).
* A **model family** is an adapter module ``editors/models/<module>.py`` that declares, at module level,
  ``FAMILY`` (its key, also the hparams YAML section), ``ADAPTER_CLASS`` (the adapter's class name),
  ``MODEL_TYPES`` (``config.json`` ``model_type`` / architecture names it loads), ``HUB_ID_HINTS`` (lower-case
  substrings of Hub ids) and ``TINY_NAME`` (the ``--model`` name of its random-init tiny model); optional
  ``DISPLAY_NAME``.

Discovery reads the files with :mod:`ast` and imports nothing, so the metric, report and board (which need no
torch) can ask for names and order too; :func:`editors.base.get_editor_class` and
:func:`editors.models.adapter_class` import the module when a run needs it.
"""

from __future__ import annotations

import ast
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sake.protocol import FAMILY_NAMES, FAMILY_ORDER, METHOD_NAMES, METHOD_ORDER

REPO_DIR = Path(__file__).resolve().parent.parent
EDITORS_DIR = REPO_DIR / "editors"
MODELS_DIR = EDITORS_DIR / "models"
METHODS_PATH_ENV = "SAKE_METHODS_PATH"


@dataclass(frozen=True)
class MethodInfo:
    """One discovered editing method."""

    name: str
    path: Path  # the module file
    hparams_path: Path  # its YAML
    class_name: str
    display_name: str
    display_order: float

    @property
    def module(self) -> str:
        """Importable module name for a method in ``editors/``; a private name for one elsewhere."""
        if self.path.parent == EDITORS_DIR:
            return f"editors.{self.path.stem}"
        return f"sake_external_methods.{self.name}"


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


def method_dirs() -> list[Path]:
    """Folders searched for methods: ``editors/`` then each folder of ``$SAKE_METHODS_PATH``."""
    extra = [Path(p) for p in os.environ.get(METHODS_PATH_ENV, "").split(os.pathsep) if p.strip()]
    return [EDITORS_DIR] + extra


def _literal(node: ast.AST, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError as exc:
        raise ValueError(f"{where}: expected a literal value ({exc})") from exc


def _registered_classes(tree: ast.Module) -> list[tuple[str, ast.ClassDef]]:
    out = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            if (isinstance(deco, ast.Call) and getattr(deco.func, "id", getattr(deco.func, "attr", None)) == "register"
                    and deco.args and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
                out.append((deco.args[0].value, node))
    return out


def _class_constants(node: ast.ClassDef) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stmt in node.body:
        targets = []
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        for target in targets:
            if isinstance(target, ast.Name) and target.id in ("display_name", "display_order"):
                out[target.id] = ast.literal_eval(value)
    return out


def _stamp(dirs: tuple[Path, ...]) -> tuple[tuple[str, int], ...]:
    """What the method scan depends on: every candidate file and its modification time."""
    out = []
    for directory in dirs:
        if directory.is_dir():
            for path in sorted(directory.glob("*.py")) + sorted((directory / "hparams").glob("*.yaml")):
                out.append((str(path), path.stat().st_mtime_ns))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _scan_methods(dirs: tuple[Path, ...], stamp: tuple[tuple[str, int], ...]) -> dict[str, MethodInfo]:
    found: dict[str, MethodInfo] = {}
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            source = path.read_text(encoding="utf-8")
            if "register" not in source:
                continue
            tree = ast.parse(source, filename=str(path))
            for name, node in _registered_classes(tree):
                if name != path.stem:
                    raise ValueError(f"{path}: registers method {name!r}; a method's module must be named "
                                     f"after it ({name}.py)")
                if name in found:
                    raise ValueError(f"{path}: method {name!r} is already defined in {found[name].path}")
                hparams = directory / "hparams" / f"{name}.yaml"
                if not hparams.is_file():
                    raise ValueError(f"{path}: method {name!r} has no hyperparameter file {hparams}")
                consts = _class_constants(node)
                order = (METHOD_ORDER.index(name) if name in METHOD_ORDER
                         else float(consts.get("display_order", len(METHOD_ORDER))))
                found[name] = MethodInfo(name=name, path=path, hparams_path=hparams, class_name=node.name,
                                         display_name=METHOD_NAMES.get(name) or consts.get("display_name") or name,
                                         display_order=order)
    return dict(sorted(found.items(), key=lambda kv: (kv[1].display_order, kv[0])))


def methods() -> dict[str, MethodInfo]:
    """Every discovered method, in display order (the paper's first)."""
    dirs = tuple(method_dirs())
    return dict(_scan_methods(dirs, _stamp(dirs)))


def method_display_name(name: str | None) -> str:
    """How reports show a method: the paper's name, the class's ``display_name``, else the name itself."""
    if not name:
        return "?"
    if name in METHOD_NAMES:
        return METHOD_NAMES[name]
    info = methods().get(name)
    return info.display_name if info else name


def method_sort_key(name: str | None) -> tuple[float, str]:
    """Sort key putting methods in display order; unknown names after every known one, by name."""
    name = name or ""
    if name in METHOD_ORDER:
        return (float(METHOD_ORDER.index(name)), name)
    info = methods().get(name)
    return (info.display_order if info else float("inf"), name)


@functools.lru_cache(maxsize=None)
def _scan_families(models_dir: Path) -> dict[str, FamilyInfo]:
    found: dict[str, FamilyInfo] = {}
    for path in sorted(models_dir.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        consts: dict[str, Any] = {}
        for stmt in tree.body:
            target = None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target, value = stmt.targets[0], stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                target, value = stmt.target, stmt.value
            if isinstance(target, ast.Name) and target.id in ("FAMILY", "ADAPTER_CLASS", "MODEL_TYPES",
                                                                "HUB_ID_HINTS", "TINY_NAME", "DISPLAY_NAME"):
                consts[target.id] = _literal(value, f"{path}: {target.id}")
        if "FAMILY" not in consts:
            continue  # a helper module, not an adapter
        missing = [k for k in ("ADAPTER_CLASS", "MODEL_TYPES", "HUB_ID_HINTS", "TINY_NAME") if k not in consts]
        if missing:
            raise ValueError(f"{path}: an adapter module declaring FAMILY also needs {missing}")
        key = consts["FAMILY"]
        if key in found:
            raise ValueError(f"{path}: family {key!r} is already declared by {found[key].module}")
        found[key] = FamilyInfo(key=key, module=f"editors.models.{path.stem}", adapter_class=consts["ADAPTER_CLASS"],
                                model_types=tuple(consts["MODEL_TYPES"]), hub_id_hints=tuple(consts["HUB_ID_HINTS"]),
                                tiny_name=consts["TINY_NAME"],
                                display_name=FAMILY_NAMES.get(key) or consts.get("DISPLAY_NAME") or key)
    order = {k: i for i, k in enumerate(FAMILY_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def families() -> dict[str, FamilyInfo]:
    """Every adapter module's family, the paper's families first (in its order)."""
    return _scan_families(MODELS_DIR)
