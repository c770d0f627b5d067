"""Progress bars of the dataset build: one switch for every bar the readers and the writer show
(``build(..., progress=False)``, ``build_splits.py --quiet``, ``sake demo --no-progress``)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

_enabled = [True]


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show (or hide) the build's bars inside the block; the previous setting afterwards."""
    _enabled.append(enabled)
    try:
        yield
    finally:
        _enabled.pop()


def bar(iterable: Iterable[Any], **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``, hidden when the innermost :func:`progress_bars` says so."""
    return tqdm(iterable, disable=not _enabled[-1], **kwargs)
