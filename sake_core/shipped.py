"""Files kept at the checkout's top level that the installed toolkit needs too: the dataset card template
(``dataset_card.md``) and the reference model (``models/sake-reference-qwen2-audio/``).

They stay where the design puts them (one copy each, at the top level of the repository). Building a wheel copies
them into the package as ``sake_core/_shipped/<same relative path>`` (``setup.py``, ``SHIPPED``); at run time
:func:`shipped_path` finds them in either place, so a checkout, an editable install and a wheel installed with
``pip install .`` read the same files.
"""

from __future__ import annotations

from pathlib import Path

#: where a wheel holds the shipped files (beside this module)
INSTALLED_ROOT = Path(__file__).resolve().parent / "_shipped"
#: the checkout's top level (the folder holding ``sake_core/``)
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
#: the top-level paths a wheel ships (files or folders, relative to the checkout's root); setup.py copies these
SHIPPED = ("dataset_card.md", "models/sake-reference-qwen2-audio")


def shipped_path(relative: str) -> Path:
    """The installed copy of the top-level path ``relative`` (one of :data:`SHIPPED`) when the toolkit runs from a
    wheel, else the checkout's own file. The path returned may not exist (the caller says what is missing)."""
    if relative not in SHIPPED:
        raise ValueError(f"{relative!r}: not a shipped path (expected one of {', '.join(SHIPPED)})")
    installed = INSTALLED_ROOT / relative
    return installed if installed.exists() else CHECKOUT_ROOT / relative
