"""eval.agreement: per-dimension agreement and Cohen's kappa of two judgings of the same predictions."""

from __future__ import annotations

import json

import pytest

from eval.agreement import agreement, kappa, main
from eval.score import score_predictions, write_json_atomic
from tests._metric_helpers import demo_rows, header, write_predictions


def test_kappa_known_values():
    assert kappa([True, True, False, False], [True, True, False, False]) == 1.0
    assert kappa([True, False, True, False], [False, True, False, True]) == -1.0
    # p_o = 0.75, p_e = 0.5 -> 0.5
    assert kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert kappa([True, True], [True, True]) is None


def test_agreement_of_two_judgings(tmp_path, capsys):
    path = write_predictions(tmp_path / "p.jsonl", header(), demo_rows(0.5))
    offline = score_predictions(path, protocol="offline")
    # a second judging that flips exactly the reliability verdicts
    flipped = json.loads(json.dumps(offline))
    items = flipped["items"]
    items["passed"] = "".join(("0" if p == "1" else "1") if d == "r" else p
                              for d, p in zip(items["dimension"], items["passed"]))
    report = agreement(offline, flipped)["per_dimension"]
    assert report["reliability"]["agreement"] == 0.0 and report["reliability"]["kappa"] == -1.0
    assert report["generality"]["agreement"] == 100.0 and report["generality"]["kappa"] == 1.0
    n = len(demo_rows())
    assert report["all"]["items"] == n
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json_atomic(a, offline)
    write_json_atomic(b, flipped)
    assert main([str(a), str(b), "--json", str(tmp_path / "agree.json")]) == 0
    out = capsys.readouterr().out
    assert "offline protocol" in out and "| reliability | 8 | 0.00 | -1.000 |" in out
    assert json.loads((tmp_path / "agree.json").read_text())["per_dimension"]["all"]["items"] == n


def test_different_rows_are_refused(tmp_path, capsys):
    one = score_predictions(write_predictions(tmp_path / "p.jsonl", header(), demo_rows()), protocol="offline")
    two = score_predictions(write_predictions(tmp_path / "q.jsonl", header(), demo_rows()[:-1]), protocol="offline")
    write_json_atomic(tmp_path / "a.json", one)
    write_json_atomic(tmp_path / "b.json", two)
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keys_sha256" in err
