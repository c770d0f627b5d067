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
    "sake_core": ("sake_core",),
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
    """(line, imported module) of every import in the file: absolute and relative statements (a relative one
    resolved against the file's package) and `importlib.import_module` / `__import__` calls naming a literal."""
    module = _module_name(path, root)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            source = ".".join(base + (node.module.split(".") if node.module else []))
            if not source:
                continue
            out += [(node.lineno, source)]
            # `from sake import api` names the module sake.api
            out += [(node.lineno, f"{source}.{alias.name}") for alias in node.names
                    if (root / Path(*source.split(".")) / f"{alias.name}.py").is_file()
                    or (root / Path(*source.split(".")) / alias.name / "__init__.py").is_file()]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out += [(node.lineno, node.args[0].value)]
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
            assert top in sys.stdlib_module_names or top in ("__future__", "sake_core"), f"{path}:{line}: {target}"


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
    # a relative import and a dynamic one by a literal name are read as well
    family = tmp_path / "editors" / "models" / "qwen2_audio.py"
    family.write_text(family.read_text(encoding="utf-8") + "\n\ndef _bad():\n    from ..run import Runner\n",
                      encoding="utf-8")
    buckets = tmp_path / "editors" / "models" / "buckets.py"
    buckets.write_text(buckets.read_text(encoding="utf-8")
                       + "\n\ndef _bad():\n    import importlib\n    importlib.import_module('editors.batching')\n",
                       encoding="utf-8")
    metric = tmp_path / "eval" / "sake_metric" / "rows.py"
    metric.write_text(metric.read_text(encoding="utf-8") + "\nimport sake_core.protocol\n", encoding="utf-8")
    found = violations(tmp_path)
    assert any("editors.models.adapter imports editors.run" in v for v in found)
    assert any("editors.models.qwen2_audio imports editors.run" in v for v in found)
    assert any("editors.models.buckets imports editors.batching" in v for v in found)
    assert any("eval.sake_metric.rows imports sake_core.protocol" in v for v in found)


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_every_floor_exists(floor):
    path = REPO / Path(*floor.split("."))
    assert path.is_dir() or path.with_suffix(".py").is_file()
