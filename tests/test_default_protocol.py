"""Issue 25 item 2: defaults that say what they are. With OPENAI_API_KEY set, scoring uses the paper protocol;
without it, the offline protocol, and every table says in one line that its numbers are not comparable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _metric_helpers import demo_rows, header, write_predictions
from eval.report import load_runs, main as report_main, write_report
from eval.sake_metric.scoring import NOT_COMPARABLE_LINE, comparability_note
from eval.score import main as score_main, resolve_protocol, score_predictions
from sake.demo import readme_block
from test_judge import SECRET, FakeOpenAI


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fake = FakeOpenAI()
    yield fake
    fake.close()


def test_the_default_protocol_follows_the_key(monkeypatch):
    assert resolve_protocol(None, None) == ("offline", "offline")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert resolve_protocol(None, None) == ("paper", "openai")
    assert resolve_protocol(None, "offline") == ("offline", "offline")  # an explicit choice wins
    assert comparability_note(["paper", "offline"]) == NOT_COMPARABLE_LINE and comparability_note(["paper"]) is None
    assert "not comparable with the paper's" in NOT_COMPARABLE_LINE and "\n" not in NOT_COMPARABLE_LINE


def test_score_cli_without_key_is_offline_and_says_so(tmp_path, capsys):
    path = write_predictions(tmp_path / "p.jsonl", header(), demo_rows(0.5))
    assert score_main([str(path), "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "(offline protocol)" in out[0] and out[1] == NOT_COMPARABLE_LINE
    assert json.loads((tmp_path / "r.json").read_text())["judge"]["protocol"] == "offline"


def test_score_cli_with_key_uses_the_paper_protocol(tmp_path, capsys, monkeypatch, server):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    path = write_predictions(tmp_path / "p.jsonl", header(), demo_rows(0.5))
    assert score_main([str(path), "--out", str(tmp_path / "r.json"), "--base-url", server.base_url,
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "(paper protocol)" in out and NOT_COMPARABLE_LINE not in out
    assert json.loads((tmp_path / "r.json").read_text())["judge"]["protocol"] == "paper"


def test_every_report_table_of_offline_runs_carries_the_line(tmp_path, capsys):
    paths = [write_predictions(tmp_path / f"{m}.jsonl", header(method=m), demo_rows(q))
             for m, q in (("ft_llm", 1.0), ("mend", 0.5))]
    assert report_main([str(p) for p in paths] + ["--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == NOT_COMPARABLE_LINE
    tables = sorted((tmp_path / "report").glob("*.md"))
    assert len(tables) > 3
    for table in tables:
        count = table.read_text().count(NOT_COMPARABLE_LINE)
        assert count == (len(tables) - 1 if table.name == "index.md" else 1), table.name
    # paper-protocol results only: no line
    paper = score_predictions(paths[0])
    paper["judge"]["protocol"] = "paper"
    (tmp_path / "paper.results.json").write_text(json.dumps(paper))
    written = write_report(load_runs([tmp_path / "paper.results.json"]), tmp_path / "paper-report")
    assert not any(NOT_COMPARABLE_LINE in Path(p).read_text() for p in written if str(p).endswith(".md"))


def test_demo_readme_block_has_the_line_and_the_same_table():
    table = "| Method | Mode |\n|---|---|\n| FT (LLM) | single |"
    block = readme_block(table, command="sake demo", model="m", n_items=3, wall_s=60.0, plots=[])
    assert [line for line in block.splitlines() if line.startswith("|")] == table.splitlines()
    assert block.splitlines().count(NOT_COMPARABLE_LINE) == 1
    assert block.index(table) < block.index(NOT_COMPARABLE_LINE)
