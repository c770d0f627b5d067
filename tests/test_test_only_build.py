"""A test-only build (`--splits test`) works downstream: the runner edits on it, the metric scores its
predictions, the leaderboard validator checks a submission against its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _editor_helpers import cli_args, run_config

from editors.predictions import read_predictions
from editors.run import main as run_main
from eval.leaderboard.validate import SubmissionError, validate_submission
from eval.score import main as score_main
from sake_dataset import build_demo


@pytest.fixture(scope="module")
def test_only(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("test_only") / "sake"
    build_demo(out, seed=0, splits=("test",), test_per_attribute=2, sequences=1, sequence_length=3)
    return out


def test_runner_metric_and_validator_on_a_test_only_build(test_only, tmp_path, capsys):
    manifest = json.loads((test_only / "sake_manifest.json").read_text())
    assert manifest["splits"] == ["test"] and not (test_only / "gender" / "train-00000-of-00001.parquet").exists()
    argv = cli_args(run_config(test_only, tmp_path / "runs", tmp_path / "cache", configs=("gender",), limit=None,
                               model="tiny-audio-flamingo3"))
    assert run_main(argv) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    header, rows = read_predictions(path)
    assert header["split"] == "test" and header["dataset_fingerprint"] == manifest["fingerprint"]
    assert [r["item_id"] for r in rows] == manifest["item_ids"]["gender"]["test"]

    results = tmp_path / "results.json"
    assert score_main([str(path), "--judge", "offline", "--out", str(results)]) == 0
    metrics = json.loads(results.read_text())["metrics"]["overall"]
    assert metrics["reliability"] is not None and metrics["portability"] is not None

    submission = tmp_path / "submission"
    submission.mkdir()
    (submission / "predictions.jsonl").write_bytes(path.read_bytes())
    (submission / "metadata.json").write_text(json.dumps({"submitter": "Test Lab", "license": "apache-2.0",
                                                          "model_link": "https://example.org/model"}))
    # the board ranks runs over every attribute of the release: this gender-only run is refused by the full
    # release, naming what is missing, and taken by a release of the gender config alone
    with pytest.raises(SubmissionError, match="missing animal, emotion, language"):
        validate_submission(submission, manifest)
    gender_only = dict(manifest, item_ids={"gender": manifest["item_ids"]["gender"]})
    assert len(validate_submission(submission, gender_only).rows) == len(rows)

    train_header = dict(header, split="train")  # a train-split run cannot match a test-only release
    lines = path.read_text().splitlines()
    (submission / "predictions.jsonl").write_text("\n".join([json.dumps(train_header)] + lines[1:]) + "\n")
    with pytest.raises(SubmissionError):
        validate_submission(submission, manifest, allowed_splits=("test", "train"))
