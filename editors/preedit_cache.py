"""On-disk cache of the unedited model's outputs (locality is judged against them, App. E / ARCHITECTURE.md).

One JSONL file per model key (``adapter.model_key()``: model id + revision + config + dtype, plus the weight files
of a local directory) under ``CACHE_DIR/preedit/``; an entry's key hashes the item id, the prompt's content
digest and the generation settings that change outputs (``GenerationSettings.output_key()``: engine, max new
tokens, dtype, shared-prefix threshold), so every method and run with the same model and settings reuses it. An
entry also keeps whether the output stopped at the generation bound (``hit_limit``), so a warm cache gives the same
``pre_edit_hit_limit`` flags as a cold one (entries written before the flag existed give a plain ``str``: unknown).
Appends are one write +
fsync under an exclusive ``flock``, so several processes (the ranks of a multi-process run, or concurrent runs) can
share the file; a partial last line left by a killed process is closed with a newline before the next append, and
unreadable lines are skipped on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from editors.models.base import GeneratedText, Prompt
from editors.predictions import write_all
from sake_core.atomic import lock_fd

logger = logging.getLogger(__name__)


class PreEditCache:
    """item + prompt -> unedited output, for one model."""

    def __init__(self, cache_dir: str | Path, model_key: str, generation: Mapping[str, Any]) -> None:
        self.path = Path(cache_dir) / "preedit" / f"{model_key}.jsonl"
        self.generation = json.dumps(dict(generation), sort_keys=True)
        self._entries: dict[str, str] = {}
        self.hits = 0
        self.misses = 0
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                        output, hit_limit = entry["output"], entry.get("hit_limit")
                        if not isinstance(output, str):
                            continue
                        self._entries[entry["key"]] = GeneratedText(output, hit_limit) \
                            if isinstance(hit_limit, bool) else output
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    def key(self, item_id: str, prompt: Prompt) -> str:
        payload = json.dumps([item_id, prompt.digest(), self.generation])
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, item_id: str, prompt: Prompt) -> str | None:
        out = self._entries.get(self.key(item_id, prompt))
        if out is None:
            self.misses += 1
        else:
            self.hits += 1
        return out

    def put_many(self, entries: Iterable[tuple[str, Prompt, str]]) -> None:
        """Store (item id, prompt, output) triples; one append per call. An output's ``hit_limit`` (a
        :class:`GeneratedText`) is stored with it."""
        lines = []
        for item_id, prompt, output in entries:
            key = self.key(item_id, prompt)
            self._entries[key] = output
            entry: dict[str, str | bool] = {"key": key, "item_id": item_id, "output": output}
            hit_limit = getattr(output, "hit_limit", None)
            if isinstance(hit_limit, bool):
                entry["hit_limit"] = hit_limit
            lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(lines).encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            lock_fd(fd)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a writer died mid-line: keep our first entry on a line of its own
            write_all(fd, data)
        finally:
            os.close(fd)  # releases the lock
