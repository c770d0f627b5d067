"""User-facing errors: what a person running the toolkit did wrong (a bad argument, a missing or malformed file, a
method that does not exist), as opposed to a bug.

Every such error is a :class:`SakeError` (or a subclass). The command-line entry points turn a ``SakeError`` into
one line on stderr and exit status 2; any other exception is a bug and keeps its traceback. Subclasses also
derive from the matching built-in (``ValueError``, ``FileNotFoundError``, ``KeyError``) so that code catching
those keeps working.
"""

from __future__ import annotations

import errno
import functools
import sys
from typing import Callable, TypeVar


class SakeError(Exception):
    """Base of every user-facing error: the message is one line that names the file, field or argument at fault
    and what was expected."""


class ConfigError(SakeError, ValueError):
    """A run configuration, hyperparameter or command-line value is invalid (unknown method or key, wrong type)."""


class DataError(SakeError, ValueError):
    """An input file (dataset, predictions, results, submission) is missing something or is malformed."""


class ResourceError(SakeError, RuntimeError):
    """The machine cannot do what was asked (e.g. one unit of work does not fit in device memory even alone)."""


class TrainingDiverged(SakeError, ArithmeticError):
    """A training loss, validation loss or gradient became NaN or infinite (a learning rate too high, or a kernel
    that returns NaN); the message names the method, the step and the instance, and for a gradient the first
    operation that produced a NaN."""


class MissingExtraError(SakeError, ImportError):
    """A command needs an optional package that is not installed; the message names the extra that installs it."""


#: Optional third-party packages (top-level module name) -> the extra of ``sake-toolkit`` that installs them
#: (pyproject.toml, ``[project.optional-dependencies]``).
EXTRA_OF_MODULE = {"jsonschema": "leaderboard", "gradio": "leaderboard", "fastapi": "leaderboard",
                   "uvicorn": "leaderboard", "selenium": "dev", "pytest": "dev"}


def missing_extra(exc: ImportError) -> MissingExtraError | None:
    """A :class:`MissingExtraError` when ``exc`` is the import of a package of an extra, else None (a missing
    required package is a broken install, not a user's choice: the caller keeps the traceback)."""
    module = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return MissingExtraError(f"the optional package {module!r} is not installed (the [{extra}] extra); install it "
                             f"with: pip install 'sake-toolkit[{extra}]'")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (newlines folded), as the command-line entry points print it."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


F = TypeVar("F", bound=Callable[..., int])


def error_prefix() -> str:
    """``sake X: `` under the ``sake`` command (whose ``sys.argv[0]`` is ``sake X`` while a part runs:
    sake_core.command.command_prog), else nothing: what goes before ``error: MESSAGE`` on stderr."""
    first = sys.argv[0] if sys.argv else ""
    return f"{first}: " if first.startswith("sake ") else ""


#: Errors of the machine, not of the program: a folder that cannot be written (permissions, a read-only file system),
#: a full disk or quota. A command reports them in one line naming the path.
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def user_errors(main: F) -> F:
    """Decorator of a command-line entry point ``main(argv=None) -> int``: a :class:`SakeError` becomes one line
    ``error: MESSAGE`` on stderr (``sake X: error: MESSAGE`` under the ``sake`` command) and exit status 2 (logged
    nowhere else), and so do a missing optional package (:func:`missing_extra`: the extra that installs it) and an
    ``OSError`` of :data:`ENVIRONMENT_ERRNOS` (``error: PATH: Read-only file
    system``); Ctrl-C is one line ``interrupted`` and exit status 130. Any other exception is a bug and propagates
    with its traceback."""
    @functools.wraps(main)
    def run(*args: object, **kwargs: object) -> int:
        try:
            return main(*args, **kwargs)
        except SakeError as exc:
            print(f"{error_prefix()}error: {one_line(exc)}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as exc:  # an optional package of an extra, absent: one line naming the extra
            error = missing_extra(exc)
            if error is None:  # a required package is missing: a broken install, keep the traceback
                raise
            print(f"{error_prefix()}error: {one_line(error)}", file=sys.stderr)
            return 2
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"{error_prefix()}error: {where}{exc.strerror or one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{error_prefix()}interrupted", file=sys.stderr)
            return 130
    run.handles_user_errors = True  # type: ignore[attr-defined]  # checked by tests/test_errors.py
    return run  # type: ignore[return-value]
