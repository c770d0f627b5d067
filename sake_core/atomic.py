"""Crash-safe writes: one :func:`atomic_write` for files and one :func:`replace_dir` for folders.

* :func:`atomic_write` writes a temp file in the target's folder, fsyncs it, gives it mode 0o644, renames it over
  the target (``os.replace``) and fsyncs the folder. A reader sees the old bytes or the new bytes, never a part;
  a crash leaves at most a hidden ``.NAME.*.tmp`` file, which is removed when the write fails inside Python.
* :func:`replace_dir` swaps a fully written folder in for ``dest``. On Linux it exchanges the two names in one
  ``renameat2(RENAME_EXCHANGE)`` call, so at every instant ``dest`` is either the old complete folder or the new
  complete one. Where that call is unavailable (another OS, or a file system without the flag) it falls back to
  two renames (``dest`` aside, then the new folder in): ``dest`` is then missing for the instant between them,
  never partial, and a swap killed in that instant is repaired by the next call, which puts the old folder back
  before anything else. The old folder is deleted after the swap; leftovers of killed swaps (old folders, and
  staging folders of processes that no longer run) are removed by the next call for the same ``dest``.

Build the new folder with :func:`staging_dir` (a hidden sibling of ``dest``, on the same file system, named
so that a later call can tell whether its writer is still alive).

:func:`lock_fd` is the one exclusive ``flock`` of the writers that share a file or folder.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from .errors import ConfigError

logger = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o755
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def lock_fd(fd: int, *, wait: bool = True) -> bool:
    """An exclusive ``flock`` on ``fd``, held until it is closed (or the process dies). With ``wait`` False, False
    when another open file holds it now. Where ``fcntl`` is missing (not POSIX) nothing is locked: True."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically with mode 0o644 (see the module docstring).
    Creates the parent folder when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------------- folders

def _old_prefix(dest: Path) -> str:
    return f".{dest.name}.old-"


def _staging_prefix(dest: Path) -> str:
    return f".{dest.name}.new-"


def staging_dir(dest: str | os.PathLike) -> Path:
    """A new empty folder (mode 0o755) beside ``dest`` to build its replacement in; pass it to
    :func:`replace_dir`. Its name carries this process's id, so a later call can remove it if this process dies."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{_staging_prefix(dest)}{os.getpid()}-"))
    tmp.chmod(DIR_MODE)
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _clean_leftovers(dest: Path) -> None:
    """Undo or remove what killed swaps of ``dest`` left: put an old folder back when ``dest`` is missing (a
    fallback swap killed between its two renames), then delete old folders and dead writers' staging folders."""
    parent = dest.parent
    if not parent.is_dir():
        return
    olds = sorted((p for p in parent.iterdir() if p.name.startswith(_old_prefix(dest)) and p.is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(dest):
        logger.warning("%s: restoring the folder a killed swap left at %s", dest, olds[-1])
        os.rename(olds.pop(), dest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for staging in parent.iterdir():
        if not staging.name.startswith(_staging_prefix(dest)):
            continue
        pid_text = staging.name[len(_staging_prefix(dest)):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(staging, ignore_errors=True)


def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_RENAMEAT2 = _libc_renameat2()


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). Returns False
    when the system or file system cannot do it (nothing changed); raises OSError for other failures."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def replace_dir(new_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put the complete folder ``new_dir`` in place of ``dest`` (which may not exist yet) and delete the old one;
    see the module docstring for the guarantee. ``new_dir`` must be on the same file system as ``dest`` (use
    :func:`staging_dir`). Returns ``dest``."""
    new_dir, dest = Path(new_dir), Path(dest)
    if not new_dir.is_dir():
        raise ConfigError(f"{new_dir}: expected a folder to put in place of {dest}")
    if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir()):
        raise ConfigError(f"{dest}: exists and is not a folder; refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(dest)
    if not os.path.lexists(dest):
        os.rename(new_dir, dest)
        _fsync_dir(dest.parent)
        return dest
    if exchange(new_dir, dest):
        # new_dir's name now holds the old folder: give it an old- name (cleaned by the next call if we die)
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_old_prefix(dest)))
        os.rmdir(old)
        os.rename(new_dir, old)
    else:
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_old_prefix(dest)))
        os.rmdir(old)
        os.rename(dest, old)
        try:
            os.rename(new_dir, dest)
        except BaseException:
            os.rename(old, dest)
            raise
    _fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def write_tree(out_dir: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative path -> bytes, mode 0o644) into a fresh staging folder beside ``out_dir``, then
    swap it in with :func:`replace_dir`: ``out_dir`` is the old or the new complete folder at every instant."""
    out = Path(out_dir).resolve()
    staging = staging_dir(out)
    try:
        for rel, data in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(0o644)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
