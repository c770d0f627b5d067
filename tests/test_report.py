"""Reports: paper-shaped tables (markdown + CSV) and PNG plots from results JSON / predictions JSONL."""

from __future__ import annotations

import csv
import logging
import statistics
from pathlib import Path

import pytest

from eval.report import load_runs, main as report_main, method_label
from eval.score import score_predictions, write_json_atomic
from _metric_helpers import demo_rows, header, write_predictions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """Two methods, single (as results JSON) and sequential (as predictions JSONL), one model."""
    base = tmp_path / "runs"
    base.mkdir()
    for method, quality in (("ft_llm", 1.0), ("mend", 0.5)):
        single = write_predictions(tmp_path / f"{method}.jsonl", header(method=method), demo_rows(quality))
        write_json_atomic(base / f"{method}_single.results.json", score_predictions(single))
        # MEND's editor reports its network's training time (editors.train's train_seconds) with each edit
        per_unit = [{"unit": "u0", "seconds": 5.0, "hypernetwork_train_s": 5430.0}] if method == "mend" else []
        timing = {"units": 8, "total_s": 7384.0 if method == "ft_llm" else 42.5, "per_unit": per_unit}
        write_json_atomic(base / f"{method}_single.jsonl.timing.json", timing)
        rows = [r for gap in range(3) for r in demo_rows(max(0.0, quality - 0.25 * gap), gap=gap)]
        seq = write_predictions(tmp_path / f"{method}_seq.jsonl", header(method=method, mode="sequential"), rows)
        write_json_atomic(base / f"{method}_seq.results.json", score_predictions(seq))
    return base


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_report_writes_paper_shaped_tables_and_plots(runs_dir, tmp_path):
    out = tmp_path / "report"
    assert report_main([str(runs_dir), "--out", str(out)]) == 0
    table2 = read_csv(out / "table2_overall.csv")
    assert table2[0] == ["Model", "Protocol", "Metric", "FT (LLM)", "MEND"]
    assert [r[2] for r in table2[1:]] == ["Reliability", "Generality", "Audio Locality", "Text Locality",
                                          "Portability"]
    assert {r[1] for r in table2[1:]} == {"offline"}
    assert table2[1][3:] == ["100.00", "50.00"]
    attrs = read_csv(out / "table8_attributes.csv")
    assert attrs[0][:5] == ["Model", "Protocol", "Method", "Attr.", "Reliability"] and len(attrs[0]) == 16
    assert [(r[2], r[3]) for r in attrs[1:]] == [(m, a) for m in ("FT (LLM)", "MEND")
                                                 for a in ("ALL", "Animal", "Emotion")]
    gaps = read_csv(out / "table11_gaps.csv")
    assert [(r[2], r[3]) for r in gaps[1:]] == [(m, g) for m in ("FT (LLM)", "MEND") for g in ("0", "1", "2")]
    assert [r[4] for r in gaps[1:4]] == ["100.00", "75.00", "50.00"]
    port = read_csv(out / "table14_portability_animal.csv")
    assert port[0] == ["Model", "Protocol", "Method", "Behavior", "Diet"] and len(port) == 3
    assert (out / "table14_portability_emotion.csv").exists()
    degeneration = read_csv(out / "table18_degeneration.csv")
    assert [r[2] for r in degeneration[1:]] == ["single", "sequential"]
    assert degeneration[1][3] == "0.00" and float(degeneration[1][4]) > 0  # MEND run has "dogdogdog..."
    judge = read_csv(out / "judge_stages.csv")
    assert judge[0][5:] == ["empty", "exact", "choice", "llm", "llm_failed", "undecided", "Requests sent"]
    for row in judge[1:]:
        assert sum(float(x) for x in row[5:-1]) == pytest.approx(100.0, abs=0.05)
        assert row[3] == "offline"
    # Table 3: the two best methods by portability, sample std and range over (attribute, category) pairs
    spread = read_csv(out / "table3_portability_spread.csv")
    assert spread[0] == ["Model", "Protocol", "Method", "Portability", "Categories", "Std.", "Range"]
    assert [r[2] for r in spread[1:]] == ["FT (LLM)", "MEND"]
    ft = spread[1]
    assert ft[4] == "3" and ft[5] == "0.00" and ft[6] == "0.00"  # FT (LLM) ports every item: 100 everywhere
    mend = load_runs([runs_dir / "mend_single.results.json"])[0]
    values = [v for a in mend.results["metrics"]["per_attribute"].values()
              for v in a["portability_by_category"].values()]
    assert spread[2][5] == f"{statistics.stdev(values):.2f}" and spread[2][6] == f"{max(values) - min(values):.2f}"
    # Table 7 from the .timing.json files
    wall = read_csv(out / "table7_wall_clock.csv")
    assert wall[0][2] == "Hypernetwork training"
    assert wall[1][:6] == ["FT (LLM)", "qwen2-audio", "-", "2h 03m", "8", "923.00"]
    assert wall[2][:4] == ["MEND", "qwen2-audio", "1h 30m", "42.5s"] and wall[2][6] == "-"
    generation = read_csv(out / "generation_limits.csv")
    assert generation[0][4] == "At the limit" and all(r[4] == "-" for r in generation[1:])  # no flag in these rows
    assert generation[0][6] == "Pre-edit at the limit" and all(r[6] == "-" for r in generation[1:])
    # Figure 4 draws the random baseline from the items' option counts; Figure 5 the category distribution
    results = load_runs([runs_dir / "ft_llm_seq.results.json"])[0].results
    options = [len(r["options"]) for r in demo_rows() if r["dimension"] == "portability"]
    assert results["random_baseline"]["portability"] == pytest.approx(sum(100 / k for k in options) / len(options))
    assert (out / "fig5_categories.png").read_bytes().startswith(PNG_MAGIC)
    index = (out / "index.md").read_text()
    assert "fig5_categories.png" in index and "Table 3" in index and "Table 7" in index
    markdown = (out / "table2_overall.md").read_text()
    assert "| Model | Protocol | Metric | FT (LLM) | MEND |" in markdown
    for name in ("fig3_types_qwen2-audio.png", "fig4_gaps_qwen2-audio.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert "fig4_gaps_qwen2-audio.png" in (out / "index.md").read_text()
    # same inputs, same bytes
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert report_main([str(runs_dir), "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_report_scores_predictions_inputs_and_rejects_duplicates(runs_dir, tmp_path):
    predictions = write_predictions(tmp_path / "wise.jsonl", header(method="wise"), demo_rows(0.25))
    runs = load_runs([runs_dir, predictions])
    assert [(method_label(r.method), r.mode) for r in runs] == [
        ("FT (LLM)", "single"), ("MEND", "single"), ("WISE", "single"),
        ("FT (LLM)", "sequential"), ("MEND", "sequential")]
    assert runs[2].results["metrics"]["overall"]["reliability"] == 25.0
    with pytest.raises(ValueError, match="two results for model 'tiny/qwen2-audio', method 'ft_llm'"):
        load_runs([runs_dir, runs_dir / "ft_llm_single.results.json"])
    assert report_main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_report_only_single_runs_skips_gap_outputs(tmp_path):
    predictions = write_predictions(tmp_path / "ke.jsonl", header(method="ke"), demo_rows(1.0))
    out = tmp_path / "report"
    assert report_main([str(predictions), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert "table2_overall.md" in names and "fig3_types_qwen2-audio.png" in names
    assert not any(n.startswith(("table11", "fig4")) for n in names)
    assert read_csv(out / "table2_overall.csv")[0] == ["Model", "Protocol", "Metric", "KE"]


def test_rows_of_different_protocols_are_kept_apart(runs_dir, tmp_path):
    import json

    paper = json.loads((runs_dir / "ft_llm_single.results.json").read_text())
    paper["judge"]["protocol"] = "paper"
    paper["metrics"]["overall"]["reliability"] = 87.5
    write_json_atomic(runs_dir / "ft_llm_single.paper.results.json", paper)
    out = tmp_path / "report"
    assert report_main([str(runs_dir), "--out", str(out)]) == 0
    table2 = read_csv(out / "table2_overall.csv")
    assert [(r[1], r[3]) for r in table2[1:] if r[2] == "Reliability"] == [("paper", "87.50"), ("offline", "100.00")]
    assert (out / "fig3_types_qwen2-audio_paper.png").exists() and (out / "fig3_types_qwen2-audio_offline.png").exists()
    # older results without judge.protocol: an LLM judge then ran after the choice stage
    del paper["judge"]["protocol"]
    paper["judge"]["name"] = "openai"
    from eval.report import protocol_of
    assert protocol_of(paper) == "paper+choice"


def test_twelve_methods_get_twelve_colours_stable_per_method(monkeypatch, tmp_path):
    """Figure 3 colours each method by its display place: the paper's eight and the four beyond it never share a
    colour (a 10-colour cycle gave FT (LLM) and GRACE the same blue), and a method keeps its colour whatever else
    is plotted."""
    from eval import report
    from eval.report import Run, method_color, plot_types
    from sake_core.protocol import METHOD_ORDER

    beyond = {"ft_encoder": ("FT (Encoder)", 8), "lora": ("LoRA", 9), "grace": ("GRACE", 10),
              "alphaedit": ("AlphaEdit", 11)}
    methods = list(METHOD_ORDER) + list(beyond)
    metrics = {k: 50.0 for k in ("generality_type1", "generality_type2", "generality_type3", "locality_audio_type1",
                                  "locality_audio_type2", "locality_audio_type3", "locality_audio_type4")}

    def run(method):
        name, order = beyond.get(method, (None, None))
        return Run(source=str(tmp_path / f"{method}.json"), results={
            "model": "m", "method": method, "mode": "single", "method_display_name": name,
            "method_display_order": order, "metrics": {"overall": metrics}})

    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: figures.append(
        {t.get_label(): tuple(t.patches[0].get_facecolor()) for t in fig.axes[0].containers}))
    plot_types([run(m) for m in methods], "m", tmp_path / "all.png")
    plot_types([run(m) for m in ("grace", "ft_llm")], "m", tmp_path / "two.png")
    colours = figures[0]
    assert len(colours) == 12 and len(set(colours.values())) == 12
    assert colours["GRACE"] != colours["FT (LLM)"]
    assert figures[1] == {"GRACE": colours["GRACE"], "FT (LLM)": colours["FT (LLM)"]}
    assert method_color({"method": "my_method", "method_display_order": 12.5}) == method_color("my_method")


def test_category_counts_have_whole_number_ticks(monkeypatch, tmp_path):
    from eval import report

    ticks = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: ticks.extend(
        t for ax in fig.axes for t in ax.get_xticks()))
    report.plot_categories({"emotion": {"Scenario": 1, "Culture": 2}, "animal": {"Biology": 3}}, tmp_path / "f.png")
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_results_named_by_protocol_find_their_predictions_and_timing(tmp_path, caplog):
    """`eval.score X.jsonl --out X.offline.json` (the README's naming) keeps Table 7 and is not reported as
    unscored."""
    import logging

    base = tmp_path / "runs"
    base.mkdir()
    predictions = write_predictions(base / "X.jsonl", header(method="ft_llm"), demo_rows(1.0))
    write_json_atomic(base / "X.offline.json", score_predictions(predictions))
    write_json_atomic(base / "X.jsonl.timing.json", {"units": 8, "total_s": 80.0, "per_unit": []})
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING):
        assert report_main([str(base), "--out", str(out)]) == 0
    assert "not scored" not in caplog.text
    wall = read_csv(out / "table7_wall_clock.csv")
    assert wall[1][0] == "FT (LLM)" and wall[1][4] == "8"


def test_two_runs_of_different_attributes_are_refused_with_what_to_do(tmp_path):
    from sake_core.errors import DataError

    base = tmp_path / "runs"
    base.mkdir()
    for config in ("animal", "emotion"):
        predictions = write_predictions(base / f"{config}.jsonl", header(configs=[config]), demo_rows(1.0))
        results = score_predictions(predictions)
        assert results["configs"] == [config]
        write_json_atomic(base / f"{config}.results.json", results)
    with pytest.raises(DataError, match=r"runs of different attributes, \['animal'\] and \['emotion'\]"):
        load_runs([base])


def _attribute_parts(base: Path, **extra) -> tuple[list[dict], list[Path]]:
    """demo_rows' run written as two predictions files, one attribute each (`sake run --config X`)."""
    rows = demo_rows(0.5)
    base.mkdir(parents=True, exist_ok=True)
    parts = [write_predictions(base / f"run__{config}.jsonl",
                               header(configs=[config], date=f"2026-11-2{i}T00:00:00Z", **extra),
                               [r for r in rows if r["attribute"] == config])
             for i, config in enumerate(("animal", "emotion"))]
    return rows, parts


def test_the_attribute_parts_of_one_run_score_as_that_run(tmp_path):
    """Scoring a run's per-attribute files together gives the results of the same rows written as one file (their
    configs joined, the latest date), whatever the order of the paths; the results name the parts."""
    from eval.sake_metric.rows import PredictionsError

    rows, parts = _attribute_parts(tmp_path / "runs")
    whole = score_predictions(write_predictions(tmp_path / "whole.jsonl",
                                                header(configs=["animal", "emotion"], date="2026-11-21T00:00:00Z"),
                                                rows))
    for order in (parts, parts[::-1]):
        joined = score_predictions(order)
        assert joined.pop("parts") == ["run__animal.jsonl", "run__emotion.jsonl"]
        assert joined == whole
    assert whole["metrics"]["per_attribute"].keys() == {"animal", "emotion"}

    with pytest.raises(PredictionsError, match=r"need different file names"):
        score_predictions([parts[0], parts[0]])
    elsewhere = tmp_path / "elsewhere" / parts[0].name
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(parts[1].read_bytes())
    with pytest.raises(PredictionsError, match=r"need different file names"):
        score_predictions([parts[0], elsewhere])
    # header= overrides the file's header for the whole check, as for one file
    single = score_predictions(parts[0], header=header(configs=["animal"], mode="single", seed=7))
    assert single["configs"] == ["animal"] and single["mode"] == "single"
    other = write_predictions(tmp_path / "other.jsonl", header(configs=["emotion"], seed=1),
                              [r for r in rows if r["attribute"] == "emotion"])
    with pytest.raises(PredictionsError, match=r"header field\(s\) \['seed'\] differ"):
        score_predictions([parts[0], other])


def test_score_cli_joins_parts_and_report_reads_them_as_one_row(tmp_path, capsys, caplog):
    """`sake score A.jsonl B.jsonl --out F` writes one run's results; the report shows it as one row whose Table 7
    adds the parts' timing; a folder of unscored parts is joined the same way."""
    from eval.score import main as score_main

    base = tmp_path / "runs"
    _, parts = _attribute_parts(base)
    for i, part in enumerate(parts):
        write_json_atomic(part.with_name(part.name + ".timing.json"),
                          {"units": 4, "total_s": 10.0 + i, "sessions": 1, "per_unit": [{"unit": f"u{i}"}]})
    assert score_main([str(p) for p in parts]) == 2
    assert "--out" in capsys.readouterr().err
    assert score_main([str(p) for p in parts] + ["--out", str(base / "run.results.json")]) == 0

    for inputs in ([base], parts):  # the joined results JSON; the predictions files alone
        runs = load_runs(inputs)
        assert len(runs) == 1 and runs[0].results["configs"] == ["animal", "emotion"]
        assert runs[0].timing == {"units": 8, "total_s": 21.0, "sessions": 2,
                                  "per_unit": [{"unit": "u0"}, {"unit": "u1"}]}
    out = tmp_path / "report"
    assert report_main([str(base), "--out", str(out)]) == 0
    wall = read_csv(out / "table7_wall_clock.csv")
    assert len(wall) == 2 and wall[1][4] == "8"
    # the results moved without its parts: reported, without Table 7's time, and said so
    moved = tmp_path / "moved"
    moved.mkdir()
    (base / "run.results.json").rename(moved / "run.results.json")
    with caplog.at_level(logging.WARNING):
        (run,) = load_runs([moved])
    assert run.timing is None and "parts run__animal.jsonl, run__emotion.jsonl are not beside it" in caplog.text


def test_a_sequential_run_under_another_rule_says_so(tmp_path):
    """The results carry the sequential rule; a run that is not under the paper's (5 edits, gaps 0-5) is labelled
    with its rule wherever the report names it, and two rules of one method are not reported together."""
    from sake_core.errors import DataError

    rows = [r for gap in range(3) for r in demo_rows(1.0, gap=gap)]
    paper = score_predictions(write_predictions(tmp_path / "p.jsonl", header(mode="sequential", eval_edits=5,
                                                                               max_gap=5), rows))
    short = score_predictions(write_predictions(tmp_path / "s.jsonl", header(mode="sequential", eval_edits=2,
                                                                               max_gap=2), rows))
    assert (paper["eval_edits"], paper["max_gap"], short["eval_edits"], short["max_gap"]) == (5, 5, 2, 2)
    assert method_label(paper) == "FT (LLM)" and method_label(short) == "FT (LLM) [edits 2, gaps 0-2]"
    for name, results in (("p", paper), ("s", short)):
        write_json_atomic(tmp_path / "runs" / f"{name}.results.json", results)
    with pytest.raises(DataError, match=r"sequential rules \(eval_edits, max_gap\) \(5, 5\) and \(2, 2\)"):
        load_runs([tmp_path / "runs"])
