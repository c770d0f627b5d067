"""The output folder is never lost: a build killed at any step of its final swap leaves a complete output (the
earlier build or the new one), and the next build removes what the killed one left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _dataset_helpers import SMALL, write_sources

from sake_dataset.builder import build

REPO = Path(__file__).resolve().parents[1]

# Runs one build in a child process that dies (os._exit: no cleanup, no finally) at the chosen step of the final
# swap: every os.rename / exchange call made inside `replace_output` is a step; "before N" dies just before
# step N, "after N" just after it. FALLBACK=1 makes the exchange unavailable (two-rename fallback).
KILLED_BUILD = """
import os, sys
import sake_core.atomic as atomic
import sake_dataset.builder as builder

sakura, dsuperb, mmlu, out, when, step, fallback = sys.argv[1:8]
step, state = int(step), {"active": False, "n": 0}

def as_step(fn):
    def wrapped(*args, **kwargs):
        if not state["active"]:
            return fn(*args, **kwargs)
        state["n"] += 1
        if when == "before" and state["n"] == step:
            os._exit(137)
        result = fn(*args, **kwargs)
        if when == "after" and state["n"] == step:
            os._exit(137)
        return result
    return wrapped

os.rename = as_step(os.rename)
atomic.exchange = (lambda a, b: False) if fallback == "1" else as_step(atomic.exchange)
swap = builder.replace_output

def replace_output(tmp, out):
    state["active"] = True
    swap(tmp, out)
    state["active"] = False

builder.replace_output = replace_output
builder.build(sakura, dsuperb, mmlu, out, seed=4, test_per_attribute=2, train_per_attribute=2, sequences=1,
              sequence_length=3)
sys.exit(0)
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("swap_sources"))


@pytest.fixture(scope="module")
def earlier(sources, tmp_path_factory):
    """An earlier complete build (seed 3) to copy in place before each killed build."""
    return build(sources["sakura"], sources["dynamic_superb"], sources["mmlu"],
                 tmp_path_factory.mktemp("earlier") / "out", seed=3, **SMALL).out


def complete_fingerprint(folder: Path) -> str | None:
    """The manifest fingerprint when `folder` holds a complete build (every listed file with its hash)."""
    manifest_path = folder / "sake_manifest.json"
    if not manifest_path.is_file() or not (folder / "README.md").is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest["files"].items():
        path = folder / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return None
    return manifest["fingerprint"]


def _killed_build(sources, out: Path, when: str, step: int, fallback: bool) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    argv = [sys.executable, "-c", KILLED_BUILD, str(sources["sakura"]), str(sources["dynamic_superb"]),
            str(sources["mmlu"]), str(out), when, str(step), "1" if fallback else "0"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300).returncode


@pytest.mark.parametrize("fallback,when,step", [
    (False, "before", 1), (False, "after", 1), (False, "after", 2),   # exchange, then old folder renamed aside
    (True, "after", 1),                                               # fallback: between its two renames
])
def test_build_killed_during_the_swap_leaves_a_complete_output(sources, earlier, tmp_path, fallback, when, step):
    out = tmp_path / "release" / "out"
    shutil.copytree(earlier, out)
    old_fp = complete_fingerprint(out)
    (out.parent / ".out.building-1234-x").mkdir()  # what a killed build of an earlier version left
    (out.parent / ".out.building-1234-x" / "junk.parquet").write_bytes(b"x" * 1000)

    assert _killed_build(sources, out, when, step, fallback) == 137
    found = complete_fingerprint(out)
    if fallback and (when, step) == ("after", 1):
        # without an atomic exchange the name is free for the instant between the two renames; the earlier
        # build is complete under its aside name and the next build puts it back before anything else
        assert found is None and not out.exists()
        (aside,) = [p for p in out.parent.iterdir() if p.name.startswith(".out.old-")]
        assert complete_fingerprint(aside) == old_fp
    else:
        assert found is not None and found in {old_fp, _new_fingerprint(sources, tmp_path)}
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name != "out")
    assert leftovers  # the killed build left its staging / old folder (and the earlier junk) behind

    again = build(sources["sakura"], sources["dynamic_superb"], sources["mmlu"], out, seed=5, **SMALL)
    assert complete_fingerprint(out) == again.manifest["fingerprint"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # leftovers of killed builds removed


_NEW = {}


def _new_fingerprint(sources, tmp_path) -> str:
    """Fingerprint of the seed-4 build the child process makes (built once, undisturbed)."""
    if "fp" not in _NEW:
        _NEW["fp"] = build(sources["sakura"], sources["dynamic_superb"], sources["mmlu"], tmp_path / "ref", seed=4,
                           **SMALL).manifest["fingerprint"]
    return _NEW["fp"]
