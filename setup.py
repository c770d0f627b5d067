"""Build step of the wheel (everything else is declared in pyproject.toml).

The dataset card template and the reference model live at the repository's top level (``dataset_card.md``,
``models/``); a wheel holds only packages. ``build_py`` therefore copies each path of ``sake_core.shipped.SHIPPED``
into the built package as ``sake_core/_shipped/<path>``, where ``sake_core.shipped.shipped_path`` finds it once
installed. An editable install copies nothing: it reads the checkout's files in place.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def shipped_paths() -> tuple[str, ...]:
    """``SHIPPED`` read from ``sake_core/shipped.py`` without importing the package (one list, kept there)."""
    tree = ast.parse((ROOT / "sake_core" / "shipped.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SHIPPED" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("sake_core/shipped.py: no SHIPPED tuple")


class BuildWithShippedFiles(build_py):
    """``build_py`` that also copies the top-level shipped files into ``sake_core/_shipped/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "sake_core" / "_shipped"
        for relative in shipped_paths():
            source = ROOT / relative
            if not source.exists():
                raise FileNotFoundError(f"{source}: missing (sake_core.shipped.SHIPPED lists it for the wheel)")
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copyfile(source, dest)


setup(cmdclass={"build_py": BuildWithShippedFiles})
