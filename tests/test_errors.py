"""User-facing errors (sake_core/errors.py): every command-line entry point turns a SakeError into one line on stderr
and exit status 2, and lets anything else (a bug) raise with its traceback."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sake.cli import COMMANDS
from sake_core.errors import ConfigError, DataError, SakeError, user_errors

REPO = Path(__file__).resolve().parent.parent

#: Every CLI the toolkit has: the modules `sake COMMAND` dispatches to.
CLIS = tuple(module for module, _ in COMMANDS.values())


def test_the_decorator_prints_one_line_for_a_user_error_and_lets_a_bug_raise(capsys):
    @user_errors
    def main(argv=None):
        if argv == ["user"]:
            raise DataError("data.jsonl: line 3\nis not JSON")
        if argv == ["bug"]:
            raise ValueError("a bug inside numpy")
        return 0

    assert main([]) == 0 and main.handles_user_errors
    assert main(["user"]) == 2
    assert capsys.readouterr().err == "error: data.jsonl: line 3 is not JSON\n"
    with pytest.raises(ValueError, match="a bug inside numpy"):
        main(["bug"])


def test_a_missing_optional_package_is_one_line_naming_its_extra(capsys, tmp_path):
    """Through ``python -m`` as through ``sake``: the leaderboard's commands start without the [leaderboard] extra
    (its packages load where they are used) and a command that needs one says which extra installs it."""
    @user_errors
    def main(argv=None):
        if argv == ["needs"]:
            raise ModuleNotFoundError("No module named 'jsonschema'", name="jsonschema")
        if argv == ["version"]:  # installed, but not the version the code needs: not "not installed"
            raise ImportError("cannot import name 'Draft2099Validator' from 'jsonschema'", name="jsonschema")
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    assert main(["needs"]) == 2
    assert capsys.readouterr().err == ("error: the optional package 'jsonschema' is not installed (the [leaderboard] "
                                       "extra); install it with: pip install 'sake-toolkit[leaderboard]'\n")
    with pytest.raises(ModuleNotFoundError):  # a required package: a broken install keeps its traceback
        main([])
    with pytest.raises(ImportError, match="cannot import name"):
        main(["version"])
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "p.jsonl").write_text('{"kind": "header"}\n')
    (tmp_path / "m.json").write_text("{}")
    block = "import sys, runpy; sys.modules.update(jsonschema=None, gradio=None, uvicorn=None); "
    for module, argv in (("eval.leaderboard", ["--help"]), ("eval.leaderboard.space", ["--help"]),
                         ("eval.leaderboard", ["pack", str(tmp_path / "p.jsonl"), "--metadata", str(tmp_path / "m.json"),
                                               "--out", str(tmp_path / "s.zip")])):
        code = block + f"sys.argv = ['x', *{argv!r}]; runpy.run_module({module!r}, run_name='__main__')"
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr, (module, argv, proc.stderr[-2000:])
        if argv == ["--help"]:
            assert proc.returncode == 0 and "usage" in proc.stdout, (module, proc.stdout[-500:])
        else:
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
            assert "not installed (the [leaderboard] extra)" in proc.stderr


def test_an_unwritable_place_and_ctrl_c_are_one_line(capsys):
    """A read-only folder, a full disk or a refused permission is the machine's, not a bug: one line naming the
    path. Ctrl-C: one line and exit 130. Any other OSError keeps its traceback."""
    import errno

    @user_errors
    def main(argv=None):
        if argv == ["ro"]:
            raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/.run.jsonl.lock")
        if argv == ["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        if argv == ["ctrl-c"]:
            raise KeyboardInterrupt
        raise OSError(errno.EBADF, "Bad file descriptor")

    assert main(["ro"]) == 2
    assert capsys.readouterr().err == "error: /mnt/ro/.run.jsonl.lock: Read-only file system\n"
    assert main(["full"]) == 2 and capsys.readouterr().err == "error: No space left on device\n"
    assert main(["ctrl-c"]) == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(OSError, match="Bad file descriptor"):
        main([])


def test_under_the_sake_command_the_line_names_the_subcommand(monkeypatch, capsys):
    from sake import cli

    monkeypatch.setattr(sys, "argv", ["pytest"])  # cli.main sets sys.argv[0] to "sake demo" for the part
    assert cli.main(["demo", "--methods", "no_such_method", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sake demo: error: ") and "no_such_method" in err and err.count("\n") == 1
    assert sys.argv == ["pytest"]  # restored: a later in-process call is not taken for a sake subcommand


def test_a_bad_predictions_file_under_sake_score_names_the_subcommand(monkeypatch, capsys, tmp_path):
    from sake import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "header"}\n', encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert cli.main(["score", str(bad), "--judge", "offline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sake score: error: ") and "line 1" in err
    assert cli.main(["report", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("sake report: error: ")


@pytest.mark.parametrize("module", CLIS)
def test_every_cli_main_handles_user_errors(module):
    main = importlib.import_module(module).main
    assert getattr(main, "handles_user_errors", False), f"{module}.main is not decorated with user_errors"


@pytest.mark.parametrize("argv,message", [
    (["--sakura", "s"], "missing --dynamic-superb, --mmlu (or use --demo)"),
    (["--demo", "--mmlu", "m", "--out", "o"], "--demo uses the embedded sources"),
])
def test_build_splits_argument_errors_are_one_line(argv, message, capsys):
    import build_splits

    assert build_splits.main(argv + ([] if "--out" in argv else ["--out", "o"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_demo_without_its_model_is_one_line(tmp_path, capsys):
    from sake import demo

    assert demo.main(["--model", "no-such-model", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err == "error: model no-such-model not found\n"


def test_a_bug_in_the_runner_keeps_its_traceback(monkeypatch, tmp_path, demo_dataset):
    import editors.run

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(editors.run, "Runner", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        editors.run.main(["--model", "tiny-qwen2-audio", "--method", "i_ike", "--dataset", str(demo_dataset),
                          "--out", str(tmp_path), "--no-progress"])


def test_a_user_error_of_the_runner_is_printed_once_without_traceback(tmp_path):
    """In a fresh process (logging configured by the CLI itself): one line on stderr, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "editors.run", "--model", "tiny-qwen2-audio", "--method", "i_ike",
                           "--dataset", str(tmp_path / "no-dataset"), "--out", str(tmp_path / "out"),
                           "--config", "emotion", "--no-progress"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1  # not logged as well
    assert "no-dataset: dataset not found" in proc.stderr


@pytest.mark.parametrize("model", ["Qwen/Qwen2-Audio-7B-Instruct", "models/no-such-qwen2-audio"])
def test_a_model_that_cannot_be_loaded_is_one_line(model, tmp_path, demo_dataset):
    """A Hub model out of reach (offline here) or a folder that does not exist, in a fresh process: one line
    naming the model, exit 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "editors.run", "--model", model, "--method", "ft_llm",
                           "--dataset", str(demo_dataset), "--out", str(tmp_path / "out"), "--limit", "1",
                           "--no-progress", "--log-level", "warning"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {model}: cannot load this model as a Hub id (or local folder): ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_user_errors_derive_from_the_matching_builtins():
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    from eval.agreement import AgreementError
    from eval.leaderboard.validate import SubmissionError
    from eval.publish import PublishError
    from sake_dataset.records import ConstructionError, SourceError

    for cls in (AgreementError, SubmissionError, PublishError, SourceError, ConstructionError):
        assert issubclass(cls, SakeError), cls


def test_every_cli_takes_no_progress():
    """``--no-progress`` is one spelling across the entry points: build_splits.py takes it beside ``--quiet``."""
    import build_splits

    assert build_splits.make_parser().parse_args(["--demo", "--out", "x", "--no-progress"]).quiet is True
