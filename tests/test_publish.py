"""`sake publish`: the dry-run folders are what users will meet on the Hub (real contents, evaluate.load works,
the leaderboard Space imports no torch); uploads go through huggingface_hub with the right repo types."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _leaderboard_helpers import jsonl_bytes, make_header, make_manifest, make_rows
from eval import publish
from eval.score import score_predictions

REPO = Path(__file__).resolve().parents[1]


class FakeApi:
    """Records huggingface_hub.HfApi calls; upload_folder snapshots the folder's files at call time."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        FakeApi.calls.append(("upload_folder", repo_id, kwargs, files))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_metric_dry_run_loads_with_evaluate_and_matches_score(tmp_path):
    out = tmp_path / "metric"
    assert publish.main(["metric", "sake/metric", "--dry-run", str(out)]) == 0
    names = sorted(_tree(out))
    assert "metric.py" in names and "sake_metric.py" not in names and "__init__.py" not in names
    assert {"app.py", "README.md", "requirements.txt", "rows.py", "scoring.py", "predictions_file.py"} <= set(names)
    card = (out / "README.md").read_text(encoding="utf-8")
    front = card.split("---\n")[1]
    assert "sdk: gradio\n" in front and "app_file: app.py\n" in front and "title: SAKE" in front
    assert (out / "app.py").read_bytes() == (REPO / "eval" / "metric_space.py").read_bytes()
    assert json.loads((out / "metric_space.json").read_text()) == {"metric_file": "metric.py", "repo_id": "sake/metric"}
    assert "torch" not in (out / "requirements.txt").read_text()
    # the card's metadata (read back with huggingface_hub's card API) and its usage line with the real repo id
    from huggingface_hub import SpaceCard

    data = SpaceCard.load(out / "README.md").data
    assert (data.sdk, data.sdk_version, data.app_file, data.title) == ("gradio", publish.GRADIO_SDK_VERSION,
                                                                       "app.py", "SAKE")
    assert "evaluate" in data.tags and data.description.startswith("Scores knowledge edits")
    usage = [line for line in card.splitlines() if "evaluate.load(" in line and line.startswith("metric =")]
    assert usage == ['metric = evaluate.load("sake/metric")']
    assert "once published" not in card

    manifest = make_manifest()
    predictions = tmp_path / "predictions.jsonl"
    # pre_edit filled for every item, as the runner writes it when known (evaluate refuses a string column whose
    # first value is None: a limit of evaluate's input check, noted in the report)
    rows = [dict(r, pre_edit=r["pre_edit"] or "sad") for r in make_rows(manifest, wrong_every=3)]
    predictions.write_bytes(jsonl_bytes(make_header(manifest), rows))
    expected = score_predictions(str(predictions), judge="offline")["metrics"]
    script = f"""
import json, evaluate
lines = open({str(predictions)!r}).read().splitlines()
rows = [json.loads(l) for l in lines[1:]]
metric = evaluate.load({str(out)!r})
cols = {{k: [r[k] for r in rows] for k in ("item_id", "dimension", "type", "attribute", "pre_edit", "gap",
                                          "category", "options")}}
res = metric.compute(predictions=[r["post_edit"] for r in rows], references=[r["reference"] for r in rows],
                     questions=[r["question"] for r in rows], judge="offline", **cols)
print(json.dumps({{"metrics": res["metrics"], "module": type(metric).__module__}}))
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_EVALUATE_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["metrics"] == json.loads(json.dumps(expected))
    assert "eval.sake_metric" not in got["module"]  # loaded from the published folder, not the repository


def test_leaderboard_dry_run_is_a_slim_wired_space(tmp_path):
    out = tmp_path / "board"
    assert publish.main(["leaderboard", "sake/leaderboard", "--results-repo", "sake/results", "--judge", "offline",
                         "--dry-run", str(out)]) == 0
    files = _tree(out)
    assert {"README.md", "app.py", "requirements.txt", "leaderboard.json", "eval/__init__.py", "eval/score.py",
            "eval/leaderboard/space.py", "eval/sake_metric/scoring.py", "sake_core/errors.py"} <= set(files)
    front = files["README.md"].decode().split("---\n")[1]
    assert "sdk: gradio\n" in front and "app_file: app.py\n" in front and "sdk_version: " in front
    requirements = files["requirements.txt"].decode().split()
    assert not any(r.startswith(("torch", "transformers", "torchcodec")) for r in requirements)
    assert json.loads(files["leaderboard.json"]) == {"judge": "offline", "manifest": "sake/sake", "queue_dir": "queue",
                                                     "queue_interval_s": 30.0, "results_repo": "sake/results",
                                                     "requests_repo": "sake/leaderboard-requests"}
    assert not any("__pycache__" in name or name.startswith(("tests/", "sake/", "sake_core/_shipped")) for name in files)
    assert {"sake_core/protocol.py", "sake_core/atomic.py", "sake_core/errors.py"} <= set(files)
    # The folder runs on its own: its app imports the Space from its own copy of `eval`, and no torch.
    check = ("import sys, app, eval.leaderboard.space as s, eval.score, sake_core; "
             "from pathlib import Path; assert Path(sake_core.__file__).resolve().parent == Path('sake_core').resolve(); "
             "from eval.leaderboard.space import SpaceConfig; c = SpaceConfig.from_env(); "
             "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
             "print(s.__file__, c.results_repo, c.judge)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("SAKE_")}
    proc = subprocess.run([sys.executable, "-c", check], cwd=out, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, repo, judge = proc.stdout.split()
    assert Path(path).resolve() == (out / "eval" / "leaderboard" / "space.py").resolve()
    assert (repo, judge) == ("sake/results", "offline")


def test_uploads_use_the_right_repo_types(tmp_path, fake_hub):
    assert publish.main(["metric", "sake/metric"]) == 0
    assert publish.main(["leaderboard", "sake/leaderboard", "--private-results"]) == 0
    metric_dry = _tree(publish.publish_metric("sake/metric", tmp_path / "metric"))
    board_dry = _tree(publish.publish_leaderboard("sake/leaderboard", dry_run=tmp_path / "board"))
    calls = fake_hub.calls
    assert calls[0] == ("create_repo", "sake/metric", {"repo_type": "space", "space_sdk": "gradio", "exist_ok": True})
    assert calls[1][:3] == ("upload_folder", "sake/metric", {"repo_type": "space", "commit_message": "SAKE metric"})
    assert calls[1][3] == metric_dry  # exactly the dry-run folder is uploaded
    assert calls[2] == ("create_repo", "sake/leaderboard-results", {"repo_type": "dataset", "exist_ok": True,
                                                                     "private": True})
    assert calls[3] == ("create_repo", "sake/leaderboard-requests", {"repo_type": "dataset", "exist_ok": True,
                                                                      "private": True})
    assert calls[4] == ("create_repo", "sake/leaderboard", {"repo_type": "space", "space_sdk": "gradio",
                                                             "exist_ok": True})
    assert calls[5][1] == "sake/leaderboard" and calls[5][2]["repo_type"] == "space" and calls[5][3] == board_dry

    built = tmp_path / "built"
    (built / "emotion").mkdir(parents=True)
    (built / "emotion" / "test.parquet").write_bytes(b"PAR1")
    (built / "sake_manifest.json").write_text(json.dumps(make_manifest()))
    fake_hub.calls = []
    assert publish.main(["dataset", "sake/sake", "--from", str(built)]) == 0
    assert fake_hub.calls[0] == ("create_repo", "sake/sake", {"repo_type": "dataset", "exist_ok": True})
    assert fake_hub.calls[1][2]["repo_type"] == "dataset" and fake_hub.calls[1][3] == _tree(built)
    assert _tree(publish.publish_dataset("sake/sake", built, dry_run=tmp_path / "ds")) == _tree(built)


def test_bad_arguments_one_line(tmp_path, capsys):
    assert publish.main(["metric", "sake/bad-name", "--dry-run", str(tmp_path / "m")]) == 2
    assert "must be a Python identifier" in capsys.readouterr().err
    assert publish.main(["dataset", "sake/sake", "--from", str(tmp_path)]) == 2
    assert "not a built SAKE dataset" in capsys.readouterr().err
    assert publish.main(["leaderboard", "no-slash"]) == 2
