"""The `sake` command: one entry point that dispatches to each part's own CLI.

    sake demo ...         the main job on a fresh machine (build demo data, edit the reference model, score, report)
    sake build ...        build_splits.py (the SAKE dataset)
    sake run ...          editors.run (apply an editing method, write predictions JSONL)
    sake train ...        editors.train (hypernetworks for KE / MEND)
    sake score ...        eval.score (predictions -> results JSON)
    sake report ...       eval.report (tables and plots)
    sake agreement ...    eval.agreement (agreement and Cohen's kappa of two judgings)
    sake leaderboard ...  eval.leaderboard (validate / score / add / queue / build / serve)
    sake publish ...      eval.publish (dataset / metric / leaderboard on the Hugging Face Hub)

Each subcommand takes the same arguments as its module (`sake run --help` == `python -m editors.run --help`).
"""

from __future__ import annotations

import importlib
import inspect
import sys

from sake_core.errors import SakeError, missing_extra, one_line

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sake.demo", "the main job: demo dataset -> reference model edits -> scores and plots"),
    "build": ("build_splits", "build the SAKE dataset (Parquet + card)"),
    "run": ("editors.run", "run an editing method, write predictions JSONL"),
    "train": ("editors.train", "train a KE / MEND hypernetwork"),
    "score": ("eval.score", "score predictions into a results JSON"),
    "report": ("eval.report", "paper-style tables and plots from results"),
    "agreement": ("eval.agreement", "agreement and Cohen's kappa of two judgings of the same predictions"),
    "leaderboard": ("eval.leaderboard.__main__", "validate, score, add and build the leaderboard"),
    "publish": ("eval.publish", "publish the dataset, the metric or the leaderboard Space on the Hub"),
}


def _usage() -> str:
    lines = ["usage: sake COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`sake COMMAND --help` shows each command's arguments; `sake --version` the toolkit's version."]
    return "\n".join(lines)


def version() -> str:
    """The installed toolkit's version (``sake-toolkit`` distribution), else the checkout's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("sake-toolkit")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch `sake COMMAND ARGS` to the module that implements COMMAND. A user-facing error
    (:class:`~sake_core.errors.SakeError`) becomes one line on stderr and exit status 2; anything else is a bug and
    keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        print(f"sake {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sake: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    saved_argv = sys.argv
    sys.argv = [f"sake {name}", *rest]  # the part's program name while it runs (restored after, for in-process calls)
    try:
        entry = importlib.import_module(COMMANDS[name][0]).main
        # Every part's CLI is `main(argv=None)`; a `main()` without parameters reads sys.argv, set above.
        takes_argv = bool(inspect.signature(entry).parameters)
        result = entry(rest) if takes_argv else entry()
    except ModuleNotFoundError as exc:
        error = missing_extra(exc)
        if error is None:  # a required package is missing: a broken install, keep the traceback
            raise
        if {"-h", "--help"} & set(rest):  # help still answers: what the command does and what it needs
            print(f"usage: sake {name} ...\n\n{COMMANDS[name][1]}.\n\nNot available in this installation: "
                  f"{one_line(error)}")
            return 0
        print(f"sake {name}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except SakeError as exc:
        print(f"sake {name}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
