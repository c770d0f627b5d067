"""The floors of ARCHITECTURE.md ("Floors"), checked on the import graph of the source: every import statement of
every library module (module level or inside a function) may only name the project packages its floor allows."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = ("sake_core", "sake_dataset", "editors", "eval", "sake", "build_splits", "bench", "tools", "tests")

#: floor (module prefix) -> project packages its modules may import (longest matching prefix wins)
ALLOWED: dict[str, tuple[str, ...]] = {
    "sake_core": (),
    "sake_dataset": ("sake_core", "sake_dataset"),
    "build_splits": ("sake_core", "sake_dataset"),
    "editors.models": ("sake_core", "editors.models"),
    "editors": ("sake_core", "editors"),
    "eval.sake_metric": ("eval.sake_metric",),
    "eval": ("sake_core", "sake_dataset", "eval"),
    "sake": ("sake_core", "sake_dataset", "editors", "eval", "sake", "build_splits"),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, imported module) of every absolute import in the file (relative imports stay in the package)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)]
            # `from sake import api` names the module sake.api
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                    if (root / Path(*node.module.split("."), f"{alias.name}.py")).is_file()]
    return out


def _floor(module: str) -> str | None:
    matches = [f for f in ALLOWED if module == f or module.startswith(f + ".")]
    return max(matches, key=len) if matches else None


def _allowed(target: str, allowed: tuple[str, ...]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def violations(root: Path = REPO) -> list[str]:
    """``file:line: module imports target (floor F allows ...)`` for every import that breaks a floor's rule."""
    out = []
    files = [root / "build_splits.py"] + [p for pkg in ("sake_core", "sake_dataset", "editors", "eval", "sake")
                                           for p in sorted((root / pkg).rglob("*.py"))]
    for path in files:
        module = _module_name(path, root)
        floor = _floor(module)
        assert floor is not None, module
        for line, target in _imports(path, root):
            if target.split(".")[0] not in PROJECT:
                continue  # the standard library or a third-party package
            if not _allowed(target, ALLOWED[floor]):
                out.append(f"{path.relative_to(root)}:{line}: {module} imports {target} (floor {floor} allows "
                           f"{', '.join(ALLOWED[floor]) or 'nothing of the project'})")
    return out


def test_no_import_breaks_a_floor():
    assert violations() == []


def test_ground_imports_only_the_standard_library():
    for path in sorted((REPO / "sake_core").rglob("*.py")):
        for line, target in _imports(path):
            top = target.split(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__", f"{path}:{line}: {target}"


def test_an_upward_import_is_caught(tmp_path):
    """The check fails on a floor that imports from above it (a copy of the tree with one bad import added)."""
    import shutil

    for name in ("sake_core", "sake_dataset", "editors", "eval", "sake"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.wav",
                                                                                   "*.parquet", "*.safetensors"))
    shutil.copy(REPO / "build_splits.py", tmp_path / "build_splits.py")
    assert violations(tmp_path) == []
    adapter = tmp_path / "editors" / "models" / "adapter.py"
    adapter.write_text(adapter.read_text(encoding="utf-8") + "\n\ndef _bad():\n    from editors.run import Runner\n",
                       encoding="utf-8")
    metric = tmp_path / "eval" / "sake_metric" / "rows.py"
    metric.write_text(metric.read_text(encoding="utf-8") + "\nimport sake_core.protocol\n", encoding="utf-8")
    found = violations(tmp_path)
    assert any("editors.models.adapter imports editors.run" in v for v in found)
    assert any("eval.sake_metric.rows imports sake_core.protocol" in v for v in found)


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_every_floor_exists(floor):
    path = REPO / Path(*floor.split("."))
    assert path.is_dir() or path.with_suffix(".py").is_file()
