"""Where the toolkit keeps what it computes once and reuses (pre-edit outputs, weight digests, AlphaEdit's
preserved-key statistics, trained hypernetworks): ``$SAKE_CACHE``, else ``~/.cache/sake``. Computed here only;
a ``--cache-dir`` argument (or ``RunConfig.cache_dir``) replaces it for one run."""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable naming the cache root.
CACHE_ENV = "SAKE_CACHE"


def cache_root() -> Path:
    """``$SAKE_CACHE`` or ``~/.cache/sake`` (read at each call, so a changed environment takes effect)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sake")
