"""Model identity: a digest of a local model directory's weight files (memoized, so a large checkpoint is read
once), part of the adapter's model key (the key of the pre-edit cache)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from sake_core.atomic import atomic_write
from sake_core.cache import cache_root

logger = logging.getLogger(__name__)

#: File endings of model weights hashed into a local directory's model key.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_digest(directory: str | Path) -> str:
    """sha256 over (relative path, size, sha256) of every weight file under ``directory``.

    A file's sha256 is memoized in ``$SAKE_CACHE/weights/`` (default ``~/.cache/sake``) under its resolved path,
    size, inode and modification time, so a 15 GB checkpoint is read once, not on every run or rank."""
    root = Path(directory).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        logger.warning("%s: no weight files (%s); its model key cannot follow retraining", directory,
                       ", ".join(WEIGHT_SUFFIXES))
        return ""
    memo_dir = cache_root() / "weights"
    memo_file = memo_dir / (hashlib.sha256(str(root).encode()).hexdigest()[:24] + ".json")
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    entries, changed = [], False
    for path in files:
        st = path.stat()
        rel = path.relative_to(root).as_posix()
        stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
        known = memo.get(rel)
        if not (isinstance(known, dict) and known.get("stamp") == stamp):
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
            known = memo[rel] = {"stamp": stamp, "sha256": digest.hexdigest()}
            changed = True
        entries.append([rel, st.st_size, known["sha256"]])
    if changed:
        try:
            memo_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(memo_file, json.dumps(memo, sort_keys=True))
        except OSError as exc:  # a read-only cache only costs a re-hash next time
            logger.warning("cannot memoize weight digests in %s (%s)", memo_dir, exc)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
