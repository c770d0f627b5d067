"""The program name a part's command-line interface shows in its usage line and errors."""

from __future__ import annotations

import sys


def command_prog(module_form: str) -> str:
    """``sake X`` when the CLI runs as a subcommand of the ``sake`` command (which sets ``sys.argv[0]`` to
    ``"sake X"``), else ``module_form`` (how the part runs on its own, e.g. ``python -m editors.run``)."""
    first = sys.argv[0] if sys.argv else ""
    return first if first.startswith("sake ") else module_form
