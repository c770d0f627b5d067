"""Which editing methods exist, discovered from their files (no hand-kept list), and how to load one.

A **method** is a module ``<dir>/<name>.py`` holding an :class:`editors.base.Editor` subclass decorated with
``@register("<name>")``, plus its hyperparameters ``<dir>/hparams/<name>.yaml``. ``<dir>`` is this folder
(``editors/``) and every folder named in the environment variable ``SAKE_METHODS_PATH`` (``os.pathsep``-separated),
so a method can live outside the checkout. The class may set ``display_name`` (how reports and the board show it)
and ``display_order`` (its place among methods; the paper's methods keep the order of
:data:`sake_core.protocol.METHOD_ORDER`). The runner writes both into every predictions header, so the metric,
reports and the board read them from the data and never from this module.

Discovery (:func:`methods`) reads the files with :mod:`ast` and imports nothing (no torch), so ``--help`` texts and
configuration checks are cheap; :func:`get_editor_class` imports a method's module when a run needs it, and
:func:`load_hparams` builds a method's typed hyperparameters from its YAML (:mod:`editors.hparams` does the
reading; this module knows which file and class belong to a method).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from editors.hparams import Hparams, build_hparams, section_keys
from sake_core.errors import ConfigError
from sake_core.protocol import METHOD_NAMES, METHOD_ORDER

if TYPE_CHECKING:  # pragma: no cover
    from editors.base import Editor

EDITORS_DIR = Path(__file__).resolve().parent
METHODS_PATH_ENV = "SAKE_METHODS_PATH"
#: The prefix under which a method from ``$SAKE_METHODS_PATH`` is imported (it is not part of a package).
EXTERNAL_PREFIX = "sake_external_methods"

_REGISTRY: dict[str, type["Editor"]] = {}
E = TypeVar("E", bound=type)


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`editors.base.Editor` subclass available under ``name``."""
    def wrap(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"editing method {name!r} registered twice")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls
    return wrap


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
        return f"{EXTERNAL_PREFIX}.{self.name}"


def method_dirs() -> list[Path]:
    """Folders searched for methods: ``editors/`` then each folder of ``$SAKE_METHODS_PATH``."""
    extra = [Path(p) for p in os.environ.get(METHODS_PATH_ENV, "").split(os.pathsep) if p.strip()]
    return [EDITORS_DIR] + extra


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


def _class_constants(node: ast.ClassDef, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in ("display_name", "display_order"):
                try:
                    out[target.id] = ast.literal_eval(value)
                except ValueError as exc:
                    raise ConfigError(f"{where}: {target.id} must be a literal ({exc})") from exc
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
                    raise ConfigError(f"{path}: registers method {name!r}; a method's module must be named "
                                      f"after it ({name}.py)")
                if name in found:
                    raise ConfigError(f"{path}: method {name!r} is already defined in {found[name].path}")
                hparams = directory / "hparams" / f"{name}.yaml"
                if not hparams.is_file():
                    raise ConfigError(f"{path}: method {name!r} has no hyperparameter file {hparams}")
                consts = _class_constants(node, str(path))
                order = (METHOD_ORDER.index(name) if name in METHOD_ORDER
                         else float(consts.get("display_order", len(METHOD_ORDER))))
                found[name] = MethodInfo(name=name, path=path, hparams_path=hparams, class_name=node.name,
                                         display_name=METHOD_NAMES.get(name) or consts.get("display_name") or name,
                                         display_order=float(order))
    return dict(sorted(found.items(), key=lambda kv: (kv[1].display_order, kv[0])))


def methods() -> dict[str, MethodInfo]:
    """Every discovered method, in display order (the paper's first)."""
    dirs = tuple(method_dirs())
    return dict(_scan_methods(dirs, _stamp(dirs)))


def available_methods() -> list[str]:
    """Every discovered method name, in display order (the paper's methods first, in its order)."""
    return list(methods())


def method_info(name: str) -> MethodInfo:
    """The discovered method ``name``; :class:`ConfigError` naming the known ones otherwise."""
    info = methods().get(name)
    if info is None:
        raise ConfigError(f"unknown editing method {name!r}; known: {', '.join(methods())} (a method is "
                          "editors/<name>.py registering it + editors/hparams/<name>.yaml)")
    return info


def get_editor_class(name: str) -> type["Editor"]:
    """The editor class of a method name (imports its module on first use)."""
    if name not in _REGISTRY:
        info = method_info(name)
        if info.module.startswith("editors."):
            importlib.import_module(info.module)
        else:  # a method from $SAKE_METHODS_PATH: load its file under a private module name
            spec = importlib.util.spec_from_file_location(info.module, info.path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"{info.path}: cannot be loaded as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[info.module] = module
            spec.loader.exec_module(module)
        if name not in _REGISTRY:
            raise ConfigError(f"{info.path} does not register a method named {name!r}")
    return _REGISTRY[name]


def method_sort_key(name: str | None) -> tuple[float, str]:
    """Sort key putting methods in display order; unknown names after every known one, by name."""
    name = name or ""
    if name in METHOD_ORDER:
        return (float(METHOD_ORDER.index(name)), name)
    info = methods().get(name)
    return (info.display_order if info else float("inf"), name)


def hparams_file(method: str) -> Path:
    """The YAML of a discovered method (``editors/hparams/<name>.yaml`` or the ``hparams/`` folder beside a
    method found on ``$SAKE_METHODS_PATH``)."""
    return method_info(method).hparams_path


def hparams_keys(method: str, family: str | None = None) -> set[str]:
    """The keys ``method``'s YAML defines for ``family`` (every section when None): what ``--hparam`` may
    override. Reads files only (nothing imported)."""
    return section_keys(hparams_file(method), family)


def load_hparams(method: str, family: str, *, tiny: bool = False,
                 overrides: Sequence[str] | Mapping[str, Any] = ()) -> Hparams:
    """The typed hyperparameters of ``method`` for a model ``family`` (its class's ``hparams_class`` built from
    its YAML by :func:`editors.hparams.build_hparams`: ``defaults`` <- family <- ``tiny`` <- ``overrides``)."""
    return build_hparams(get_editor_class(method).hparams_class, hparams_file(method), family, tiny=tiny,
                         overrides=overrides)
