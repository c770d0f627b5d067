"""A local stand-in for the few Hugging Face Hub calls the leaderboard makes (no network): an object with
``HfApi``'s method names whose every call is bound to the real ``HfApi`` signature first (a call the real client
would refuse fails here too), holding repos as folders and applying each commit all at once. Downloads are laid out
like the Hub cache on Linux (symlinks into a blob folder), since code reading them must cope with that."""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import io
import itertools
import threading
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError


class HubDown(ConnectionError):
    """Raised by every call while the stand-in is switched off (a Hub outage)."""


class StandInHub:
    """Repos under ``root/<repo_type>/<org>/<name>/``; ``commits`` records ``(repo_type, repo_id, message)``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.commits: list[tuple[str, str, str]] = []
        self.down = False
        self._lock = threading.Lock()
        self._downloads = itertools.count()

    # ---------------------------------------------------------------------------------------------- helpers

    def _bind(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.down:
            raise HubDown(f"stand-in Hub is down ({name})")
        bound = inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        if values.get("revision") not in (None, "main"):
            raise ValueError(f"stand-in Hub: only revision main, got {values['revision']!r}")
        return values

    def repo(self, repo_id: str, repo_type: str | None) -> Path:
        return self.root / (repo_type or "model") / repo_id

    def _existing(self, repo_id: str, repo_type: str | None) -> Path:
        folder = self.repo(repo_id, repo_type)
        if not folder.is_dir():
            raise RepositoryNotFoundError(f"{repo_type}/{repo_id}: no such repo on the stand-in Hub")
        return folder

    def files(self, repo_id: str, repo_type: str = "dataset") -> dict[str, bytes]:
        folder = self._existing(repo_id, repo_type)
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    # ---------------------------------------------------------------------------------------------- HfApi

    def create_repo(self, *args: Any, **kwargs: Any) -> str:
        a = self._bind("create_repo", *args, **kwargs)
        folder = self.repo(a["repo_id"], a["repo_type"])
        if folder.is_dir() and not a["exist_ok"]:
            raise ValueError(f"{a['repo_id']}: exists")
        folder.mkdir(parents=True, exist_ok=True)
        return a["repo_id"]

    def create_commit(self, *args: Any, **kwargs: Any) -> None:
        a = self._bind("create_commit", *args, **kwargs)
        with self._lock:
            folder = self._existing(a["repo_id"], a["repo_type"])
            staged: dict[str, bytes | None] = {}
            for op in a["operations"]:
                if isinstance(op, CommitOperationAdd):
                    data = op.path_or_fileobj
                    if isinstance(data, (str, Path)):
                        data = Path(data).read_bytes()
                    elif isinstance(data, io.IOBase):
                        data = data.read()
                    staged[op.path_in_repo] = bytes(data)
                elif isinstance(op, CommitOperationDelete):
                    staged[op.path_in_repo] = None
                else:
                    raise TypeError(f"stand-in Hub: unsupported operation {op!r}")
            for path, data in staged.items():  # all operations are checked before anything is written
                target = folder / path
                if data is None:
                    target.unlink(missing_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
            self.commits.append((a["repo_type"], a["repo_id"], a["commit_message"]))

    def list_repo_files(self, *args: Any, **kwargs: Any) -> list[str]:
        a = self._bind("list_repo_files", *args, **kwargs)
        return sorted(self.files(a["repo_id"], a["repo_type"]))

    def file_exists(self, *args: Any, **kwargs: Any) -> bool:
        a = self._bind("file_exists", *args, **kwargs)
        return (self._existing(a["repo_id"], a["repo_type"]) / a["filename"]).is_file()

    def _download_dir(self) -> Path:
        return self.root / ".downloads" / str(next(self._downloads))

    def _cached(self, target: Path, data: bytes) -> None:
        """``target`` as the Hub cache lays it out on Linux: a symlink into a blob folder."""
        blob = self.root / ".blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)

    def hf_hub_download(self, *args: Any, **kwargs: Any) -> str:
        a = self._bind("hf_hub_download", *args, **kwargs)
        source = self._existing(a["repo_id"], a["repo_type"]) / a["filename"]
        if not source.is_file():
            raise EntryNotFoundError(f"{a['repo_id']}: no file {a['filename']}")
        target = self._download_dir() / a["filename"]
        self._cached(target, source.read_bytes())
        return str(target)

    def snapshot_download(self, *args: Any, **kwargs: Any) -> str:
        a = self._bind("snapshot_download", *args, **kwargs)
        patterns = a["allow_patterns"]
        patterns = [patterns] if isinstance(patterns, str) else patterns
        target = self._download_dir()
        target.mkdir(parents=True)
        for path, data in self.files(a["repo_id"], a["repo_type"]).items():
            if patterns is None or any(fnmatch.fnmatch(path, p) for p in patterns):
                self._cached(target / path, data)
        return str(target)
