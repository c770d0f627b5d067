"""The toolkit as users install it (issue 26): the built wheel holds everything `sake` needs, its console script runs
from any folder, each subcommand names itself `sake X`, and a missing extra is one line naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from sake.cli import COMMANDS, main
from sake_core.shipped import SHIPPED

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _env(pythonpath: Path) -> dict[str, str]:
    """The machine's environment with only ``pythonpath`` on PYTHONPATH (no SAKE_* settings of the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAKE_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(pythonpath), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.mark.parametrize("command", ["run", "train", "score", "report", "agreement", "leaderboard", "build"])
def test_each_subcommand_names_itself_sake_x(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sake {command}"), out[:200]
    assert "python -m" not in out.splitlines()[0]


BLOCK_EXTRA = """
import sys
for name in ("jsonschema", "gradio", "fastapi", "uvicorn"):
    sys.modules[name] = None  # as if the [leaderboard] extra were not installed
from sake.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_missing_extra_is_one_line_naming_it(tmp_path):
    env = _env(REPO)
    proc = _run([sys.executable, "-c", BLOCK_EXTRA, "leaderboard", "validate", "x.zip", "--manifest", "m"],
                tmp_path, env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("sake leaderboard: error: ") and "[leaderboard]" in lines[0] and \
        "pip install 'sake-toolkit[leaderboard]'" in lines[0] and "'jsonschema'" in lines[0]
    # --help still answers (exit 0): what the command does and the extra it needs
    proc = _run([sys.executable, "-c", BLOCK_EXTRA, "leaderboard", "--help"], tmp_path, env)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: sake leaderboard "), proc.stderr[-2000:]
    assert "pip install 'sake-toolkit[leaderboard]'" in " ".join(proc.stdout.split())
    # publishing writes folders only: it needs no leaderboard extra, dry run or not
    proc = _run([sys.executable, "-c", BLOCK_EXTRA, "publish", "metric", "acme/metric", "--dry-run",
                 str(tmp_path / "m")], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "m" / "metric.py").is_file()
    proc = _run([sys.executable, "-c", BLOCK_EXTRA, "publish", "leaderboard", "acme/board", "--dry-run",
                 str(tmp_path / "b")], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_missing_required_package_keeps_its_traceback(tmp_path):
    script = "import sys; sys.modules['yaml'] = None\nfrom sake.cli import main\nsys.exit(main(['run', '--help']))"
    proc = _run([sys.executable, "-c", script], tmp_path, _env(REPO))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "yaml" in proc.stderr


def _tracked_copy(dest: Path) -> Path:
    """The checkout's files as git knows them (tracked, plus new files not ignored) under ``dest``: a build there
    leaves no build/ or egg-info in the worktree."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from the checkout (no network, no build isolation), installed into its own target folder
    over this environment's third-party packages."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    root = tmp_path_factory.mktemp("wheel")
    source = _tracked_copy(root / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    proc = _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"),
                       str(source)], root, dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (root / "dist").glob("sake_toolkit-*.whl")
    target = root / "site"
    proc = _run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], root,
                dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = root / "elsewhere"  # an unrelated folder: no checkout around it
    elsewhere.mkdir()
    return {"wheel": wheel, "site": target, "source": source, "sake": target / "bin" / "sake", "cwd": elsewhere,
            "env": _env(target)}


def test_wheel_holds_the_shipped_files_and_no_checkout_only_folders(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for relative in SHIPPED:
        source = REPO / relative
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for file in files:
            inside = f"sake_core/_shipped/{file.relative_to(REPO)}"
            assert inside in names, inside
            assert zipfile.ZipFile(installed["wheel"]).read(inside) == file.read_bytes()
    assert "sake/demo.py" in names and "build_splits.py" in names
    assert not any(n.startswith(("tools/", "bench/", "tests/", "models/")) for n in names)


def test_installed_console_script_runs_from_an_unrelated_folder(installed):
    sake, cwd, env, site = installed["sake"], installed["cwd"], installed["env"], installed["site"]
    where = _run([sys.executable, "-c", "import sake, sake_core, editors, eval, sake_dataset, build_splits\n"
                  "from sake_core.shipped import shipped_path\n"
                  "for m in (sake, sake_core, editors, eval, sake_dataset, build_splits): print(m.__file__)\n"
                  "print(shipped_path('dataset_card.md'))\nprint(shipped_path('models/sake-reference-qwen2-audio'))"],
                 cwd, env)
    assert where.returncode == 0, where.stderr[-2000:]
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(site.resolve()), line  # the install, not the checkout

    proc = _run([str(sake), "--version"], cwd, env)
    assert proc.returncode == 0 and proc.stdout.strip() == "sake 0.1.0", proc.stderr[-2000:]
    helps = {name: subprocess.Popen([str(sake), name, "--help"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in COMMANDS}
    for name, child in helps.items():
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, f"sake {name} --help: {err[-2000:]}"
        assert out.startswith(f"usage: sake {name}"), f"sake {name} --help: {out[:300]}"

    proc = _run([str(sake), "build", "--demo", "--out", str(cwd / "data")], cwd, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (cwd / "data" / "README.md").read_text(encoding="utf-8")
    template = (REPO / "dataset_card.md").read_text(encoding="utf-8")
    heading = next(line for line in template.splitlines() if line.startswith("# "))
    assert heading in card  # the template's text reached the card through the wheel
    assert (cwd / "data" / "sake_manifest.json").is_file() and (cwd / "data" / "emotion").is_dir()

    proc = _run([str(sake), "publish", "metric", "acme/sake_metric", "--dry-run", str(cwd / "space")], cwd, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    space = cwd / "space"
    assert {"sake_metric.py", "app.py", "README.md", "requirements.txt", "scoring.py"} <= \
        {p.name for p in space.iterdir()}
    assert 'evaluate.load("acme/sake_metric")' in (space / "README.md").read_text(encoding="utf-8")


def test_sdist_carries_the_shipped_files(installed):
    """`pip install` of an sdist builds the wheel from it: the sdist must hold what setup.py copies (MANIFEST.in)."""
    script = "from setuptools import build_meta; print(build_meta.build_sdist('sdist'))"
    proc = _run([sys.executable, "-c", script], installed["source"], dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    archive = installed["source"] / "sdist" / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"setup.py", "dataset_card.md", "models/sake-reference-qwen2-audio/model.safetensors",
            "models/sake-reference-qwen2-audio/config.json"} <= names
