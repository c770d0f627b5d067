"""`sake demo`: dataset -> reference model edits -> offline scores -> report, end to end on a small slice, and the
README block it rewrites (issue 6)."""

from __future__ import annotations

import json

import pytest
import torch

from sake import demo
from sake_core.errors import ConfigError

MODEL_DIR = demo.DEFAULT_MODEL


def test_replace_block_rewrites_only_between_markers() -> None:
    text = f"# Title\n\nintro\n{demo.START_MARKER}\nold table\n{demo.END_MARKER}\n\n## Next\nkeep me\n"
    new = demo.replace_block(text, "| a | b |\n")
    assert new.startswith("# Title\n\nintro\n" + demo.START_MARKER + "\n| a | b |\n" + demo.END_MARKER)
    assert new.endswith(f"{demo.END_MARKER}\n\n## Next\nkeep me\n")
    assert "old table" not in new
    assert demo.replace_block(new, "| a | b |\n") == new  # idempotent


def test_sequential_methods_auto_is_ft_audio_and_the_methods_beyond_the_paper() -> None:
    assert demo.sequential_methods("auto", ["ft_llm", "ft_audio", "lora", "grace", "i_ike"]) == \
        ["ft_audio", "lora", "grace"]
    assert demo.sequential_methods("auto", ["i_ike"]) == ["ft_audio"]
    assert demo.sequential_methods("none", ["lora"]) == []
    assert demo.sequential_methods("wise,ft_llm", ["lora"]) == ["wise", "ft_llm"]
    with pytest.raises(ConfigError, match="not available"):
        demo.sequential_methods("no_such_method", [])


@pytest.mark.parametrize("text", ["no markers here\n", f"{demo.END_MARKER}\nx\n{demo.START_MARKER}\n"])
def test_replace_block_needs_both_markers_in_order(text: str) -> None:
    with pytest.raises(ValueError, match="markers"):
        demo.replace_block(text, "x")


def test_demo_table_has_paper_columns() -> None:
    results = [{"method": "ft_audio", "mode": "single", "metrics": {"overall": {
        "reliability": 100.0, "generality": 87.5, "locality_audio": 50.0, "locality_text": 100.0,
        "portability": None}}}]
    table = demo.demo_table(results).splitlines()
    assert table[0] == ("| Method | Mode | Reliability | Generality | Audio locality | Text locality | "
                        "Portability |")
    assert table[2] == "| FT (Audio) | single | 100.00 | 87.50 | 50.00 | 100.00 | - |"


def test_sake_demo_runs_end_to_end(tmp_path, capsys) -> None:
    from sake import cli as sake_cli

    readme = tmp_path / "README.md"
    readme.write_text(f"# SAKE\n\n{demo.START_MARKER}\n(old)\n{demo.END_MARKER}\n\nrest\n", encoding="utf-8")
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--limit", "1", "--methods", "ft_audio,i_ike", "--no-progress", "--threads", "1",
            "--update-readme", "--readme", str(readme)]
    threads = torch.get_num_threads()
    try:
        _check_demo(sake_cli, argv, out, readme, capsys)
    finally:
        torch.set_num_threads(threads)


def _check_demo(sake_cli, argv, out, readme, capsys) -> None:
    assert sake_cli.main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    if "--no-progress" in argv:  # no bar at all, the dataset builder's and the libraries' included
        assert "%|" not in captured.err and "it/s]" not in captured.err
    assert "| FT (Audio) | single |" in printed and "| I-IKE | single |" in printed
    assert "| FT (Audio) | sequential |" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    rows = {(r["method"], r["mode"]): r for r in summary["results"]}
    assert set(rows) == {("ft_audio", "single"), ("i_ike", "single"), ("ft_audio", "sequential")}
    assert rows[("ft_audio", "single")]["locality_text"] == 100.0
    assert rows[("ft_audio", "single")]["reliability"] >= 75.0
    results = sorted((out / "runs").rglob("*.results.json"))
    assert len(results) == 3
    plots = sorted((out / "report").glob("*.png"))
    assert {p.name.split("_")[0] for p in plots} == {"fig3", "fig4", "fig5"}
    assert all(f"plot:   {p}" in printed for p in plots)
    text = readme.read_text(encoding="utf-8")
    assert (out / "demo_table.md").read_text(encoding="utf-8").strip() in text
    assert "(old)" not in text and "| FT (Audio) | single |" in text and text.endswith("\n\nrest\n")
    assert "[sake demo] building the demo dataset" in printed
    work_s = summary["work_s"]
    assert work_s == summary["wall_s"] and f"{work_s / 60:.1f} min wall time on CPU" in text

    # a rerun reuses the finished runs: same predictions, same table
    before = {p.name: p.read_bytes() for p in (out / "runs").rglob("*.jsonl")}
    assert sake_cli.main(argv) == 0
    again = capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "runs").rglob("*.jsonl")} == before
    # it says it reuses them, and the README keeps the time of the run that did the work, not the rerun's
    assert "[sake demo] reusing the demo dataset" in again and "building" not in again
    assert readme.read_text(encoding="utf-8") == text
    assert json.loads((out / "demo_summary.json").read_text())["work_s"] == work_s
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table == [line for line in again.splitlines() if line.startswith("|")]
