"""SAKE metric: hand-computed values, locality vs pre-edit, choice matcher, degeneration, bad input, evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.sake_metric.degeneration import degeneration_kind, is_degenerate
from eval.sake_metric.matching import choose_option, exact_match, normalize
from eval.sake_metric.rows import PredictionsError, load_predictions
from eval.sake_metric.scoring import judge_rows
from eval.score import main as score_main
from eval.score import score_predictions
from _metric_helpers import EMOTIONS, demo_rows, header, row, write_predictions

REPO = Path(__file__).resolve().parents[1]
ANIMAL = "animal/test/000000"
ANIMAL2 = "animal/test/000001"


def hand_rows() -> list[dict]:
    """Rows whose metrics are computed by hand in `test_hand_computed_metrics`."""
    return [
        row(f"{ANIMAL}/rel", "reliability", "cat", reference="cat", pre_edit="dog"),            # exact: correct
        row(f"{ANIMAL2}/rel", "reliability", "dog", reference="cat", pre_edit="dog"),           # choice: wrong
        row(f"{ANIMAL}/gen1", "generality", "(b)", reference="cat", type=1),                    # choice: correct
        row(f"{ANIMAL2}/gen1", "generality", "It is a cow.", reference="cat", type=1),          # choice: wrong
        row(f"{ANIMAL}/gen2", "generality", "  ", reference="cat", type=2),                     # empty: wrong
        row(f"{ANIMAL}/gen3", "generality", "b) cat", reference="cat", type=3),                 # choice: correct
        row(f"{ANIMAL}/loc_audio1", "locality_audio", "dog", reference="cow", pre_edit="dog", type=1),  # same
        row(f"{ANIMAL}/loc_audio2", "locality_audio", "cow", reference="cow", pre_edit="dog", type=2),  # changed
        row(f"{ANIMAL}/loc_audio3", "locality_audio", "cow", reference="cat", pre_edit="(c)", type=3),  # same
        row(f"{ANIMAL}/loc_audio4", "locality_audio", "not a frog", reference="frog", pre_edit="It's a frog",
            type=4),                                                                            # undecided
        row(f"{ANIMAL}/loc_text", "locality_text", "paris!", reference="Paris", pre_edit="Paris",
            options=["London", "Paris"]),                                                       # exact: same
        row(f"{ANIMAL}/port", "portability", "herbivore", reference="herbivore",
            options=["herbivore", "carnivore"], category="Diet"),
        row(f"{ANIMAL2}/port", "portability", "The answer is carnivore", reference="herbivore",
            options=["herbivore", "carnivore"], category="Behavior"),
        row("emotion/test/000000/rel", "reliability", "Happy.", reference="happy", attribute="emotion",
            options=EMOTIONS),
    ]


def test_hand_computed_metrics(tmp_path):
    path = write_predictions(tmp_path / "p.jsonl", header(), hand_rows())
    results = score_predictions(path)
    overall = results["metrics"]["overall"]
    assert overall["reliability"] == pytest.approx(200 / 3, abs=1e-3)
    assert (overall["generality"], overall["generality_type1"], overall["generality_type2"],
            overall["generality_type3"]) == (50.0, 50.0, 0.0, 100.0)
    assert (overall["locality_audio"], overall["locality_audio_type1"], overall["locality_audio_type2"],
            overall["locality_audio_type3"], overall["locality_audio_type4"]) == (50.0, 100.0, 0.0, 100.0, 0.0)
    assert overall["locality_text"] == 100.0
    assert overall["portability"] == 50.0
    assert overall["portability_by_category"] == {"Behavior": 0.0, "Diet": 100.0}
    animal = results["metrics"]["per_attribute"]["animal"]
    emotion = results["metrics"]["per_attribute"]["emotion"]
    assert animal["reliability"] == 50.0 and emotion["reliability"] == 100.0
    assert emotion["generality"] is None and emotion["portability"] is None
    assert emotion["portability_by_category"] == {}
    assert results["metrics"]["per_gap"] == {}
    assert results["counts"]["overall"]["generality_type1"] == 2 and results["n_rows"] == 14
    stages = results["judge"]["stage_counts"]
    assert stages == {"empty": 1, "exact": 5, "choice": 7, "llm": 0, "llm_failed": 0, "undecided": 1}
    assert sum(results["judge"]["stage_share"].values()) == pytest.approx(1.0)
    assert results["judge"]["name"] == "offline"
    assert (results["model"], results["method"], results["mode"]) == ("tiny/qwen2-audio", "ft_llm", "single")
    assert results["dataset_fingerprint"] == "f" * 64 and results["date"] == "2026-11-26T00:00:00Z"


def test_locality_compares_with_pre_edit_not_reference():
    rows = [
        # both wrong (reference is cow) but unchanged -> consistent
        row("a/loc_audio1", "locality_audio", "It is a dog.", reference="cow", pre_edit="It is a dog.", type=1),
        # post-edit now matches the reference but differs from pre-edit -> inconsistent
        row("b/loc_audio1", "locality_audio", "cow", reference="cow", pre_edit="dog", type=1),
        # same option, different wording -> consistent via the choice matcher
        row("c/loc_audio1", "locality_audio", "(a)", reference="cow", pre_edit="It sounds like a dog", type=1),
    ]
    results = score_predictions(rows)
    assert results["counts"]["overall"]["locality_audio"] == 3
    assert results["metrics"]["overall"]["locality_audio"] == pytest.approx(200 / 3, abs=1e-3)
    items = judge_rows(load_predictions(rows)[1])
    assert [(v.passed, v.stage) for v in items] == [(True, "exact"), (False, "choice"), (True, "choice")]


def test_per_gap_metrics_in_sequential_mode(tmp_path):
    rows = []
    for gap, outputs in ((0, ("cat", "cow")), (1, ("cat", "dog"))):
        rows.append(row("seq/test/seq00/step01/rel", "reliability", outputs[0], reference="cat", gap=gap))
        rows.append(row("seq/test/seq00/step02/rel", "reliability", outputs[1], reference="cow", gap=gap))
        rows.append(row("seq/test/seq00/step01/loc_text", "locality_text", "B", reference="x", gap=gap,
                        pre_edit="(b)" if gap == 0 else "(a)", options=["x", "y"]))
    path = write_predictions(tmp_path / "s.jsonl", header(mode="sequential"), rows)
    results = score_predictions(path)
    per_gap = results["metrics"]["per_gap"]
    assert sorted(per_gap) == ["0", "1"]
    assert per_gap["0"]["reliability"] == 100.0 and per_gap["1"]["reliability"] == 50.0
    assert per_gap["0"]["locality_text"] == 100.0 and per_gap["1"]["locality_text"] == 0.0
    assert results["metrics"]["overall"]["reliability"] == 75.0 and results["mode"] == "sequential"
    assert per_gap["0"]["generality"] is None


@pytest.mark.parametrize("output, expected", [
    ("(b)", 1), ("b)", 1), ("B.", 1), ("B", 1), ("Answer: C", 2), ("option d", 3),
    ("It is a dog.", 0), ("The sound is from a cat, not a dog.", 1), ("Not a dog; it is a cat", 1),
    ("The answer is (a) dog", 0),
    ("It's not a dog.", None),            # only a negated mention
    ("neither dog nor cat", None),
    ("dog or cat", None),                 # two options named
    ("(a) cat", None),                    # letter and text disagree
    ("(a) or (b)", None),
    ("(e)", None),                        # a letter with no option
    ("A cat's purr? No wait, a dog", None),
    ("dogs", None), ("catholic", None),   # no whole-word option text
    ("I'm not sure", None), ("", None),
])
def test_choice_matcher_decides_only_when_unambiguous(output, expected):
    assert choose_option(output, ["dog", "cat", "cow", "frog"]).index == expected


@pytest.mark.parametrize("output, expected", [
    ("No.", 1), ("Yes, it is.", 0), ("The answer is no", 1), ("No, it is not.", 1), ("yes or no", None),
])
def test_choice_matcher_yes_no_options(output, expected):
    assert choose_option(output, ["yes", "no"]).index == expected


def test_choice_matcher_longer_option_wins_and_normalization():
    assert choose_option("It is a female voice.", ["male", "female"]).index == 1
    assert choose_option("very sad", ["sad", "very sad"]).index == 1
    assert choose_option("The speaker is speaking Mandarin Chinese", ["English", "Mandarin Chinese"]).index == 1
    assert normalize("  Don’t  PANIC!! ") == "dont panic"
    assert exact_match("Paris.", "paris") and not exact_match("", "")


@pytest.mark.parametrize("text, kind", [
    ("dogdogdogdogdog", "substring_repeat"),
    ("happy catholic catholic catholic catholic catholic", "word_repeat"),
    ("happy catholic catholic catholic", "word_repeat"),
    ("I am sad. I am sad. I am sad. I am sad.", "substring_repeat"),
    ("sad\n\n\n\n\n\n", "newline_run"),
    ("!!!!!!!!!!!!", "char_run"),
])
def test_degeneration_on_paper_examples(text, kind):
    assert degeneration_kind(text) == kind


@pytest.mark.parametrize("text", [
    "The speaker sounds happy.", "It is a dog, a very very loyal dog.", "First line.\n\nSecond paragraph.",
    "The population is 1000000.", "haha, that is a cat", "(b) cat", "", "ha ha ha, funny", "Bye bye!",
    "Bonjour! Je m'appelle Marie. J'habite à Paris.",
])
def test_degeneration_not_on_normal_text(text):
    assert not is_degenerate(text)


def test_degeneration_rate_in_results():
    rows = [row(f"x{i}/rel", "reliability", out, reference="dog")
            for i, out in enumerate(["dog", "dogdogdogdogdog", "cat", "cat\n\n\n\n\n"])]
    results = score_predictions(rows)
    assert results["degeneration_rate"] == 50.0
    assert results["degeneration"]["kinds"] == {"newline_run": 1, "substring_repeat": 1}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("pre_edit"), r"line 2: missing field\(s\) 'pre_edit'"),
    (lambda r: r.update(dimension="fluency"), r"line 2: field 'dimension' must be one of"),
    (lambda r: r.update(type=7), r"line 2: field 'type' must be an int in \[1, 2, 3\]"),
    (lambda r: r.update(post_edit=None), r"line 2: field 'post_edit' must be a string"),
    (lambda r: r.update(gap=2), r"line 2: field 'gap' must be null in a single-mode run"),
    (lambda r: r.update(options="dog"), r"line 2: field 'options' must be a list of strings"),
    (lambda r: r.update(reference=""), r"line 2: field 'reference' must be a non-empty string for generality"),
])
def test_bad_rows_name_line_and_field(tmp_path, mutate, message):
    bad = row("a/gen1", "generality", "dog", type=1)
    mutate(bad)
    path = write_predictions(tmp_path / "bad.jsonl", header(), [bad, row("a/rel", "reliability", "dog")])
    with pytest.raises(PredictionsError, match=message) as info:
        score_predictions(path)
    assert str(path) in str(info.value)


def test_bad_input_duplicates_locality_without_pre_edit_and_json(tmp_path):
    rows = [row("a/rel", "reliability", "dog"), row("a/gen1", "generality", "dog", type=1),
            row("a/rel", "reliability", "cat")]
    path = write_predictions(tmp_path / "dup.jsonl", header(), rows)
    with pytest.raises(PredictionsError, match=r"line 4: duplicate field 'item_id' 'a/rel' \(already on line 2\)"):
        score_predictions(path)
    with pytest.raises(PredictionsError, match=r"row 1: field 'pre_edit' must be a string for locality_audio"):
        score_predictions([row("a/rel", "reliability", "dog"),
                           row("a/loc_audio1", "locality_audio", "dog", type=1, pre_edit=None)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(header()) + "\n{not json\n")
    with pytest.raises(PredictionsError, match="line 2: not valid JSON"):
        score_predictions(broken)
    with pytest.raises(PredictionsError, match="header field 'mode'"):
        score_predictions([header(mode="batch"), row("a/rel", "reliability", "dog")])


def test_cli_writes_results_atomically_and_reproducibly(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    path = write_predictions(tmp_path / "run" / "predictions.jsonl", header(), demo_rows(0.5))
    assert score_main([str(path), "--items-out", str(tmp_path / "items.jsonl")]) == 0
    out = tmp_path / "run" / "predictions.results.json"
    first = out.read_bytes()
    assert score_main([str(path), "--out", str(out)]) == 0
    assert out.read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.jsonl", "predictions.results.json"]
    results = json.loads(first)
    assert results["metrics"]["overall"]["reliability"] == 50.0
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == results["n_rows"]
    bad = write_predictions(tmp_path / "bad.jsonl", header(), [row("a/rel", "fluency", "x")])
    assert score_main([str(bad)]) == 2
    assert "field 'dimension'" in capsys.readouterr().err


def test_evaluate_load_from_fresh_process_matches_score(tmp_path):
    """`evaluate.load("eval/sake_metric")` in a new process (fresh module cache) gives the scorer's metrics."""
    rows = hand_rows()
    expected = score_predictions(rows)["metrics"]
    script = f"""
import json, sys
import evaluate
rows = json.loads(open({str(tmp_path / 'rows.json')!r}).read())
metric = evaluate.load("eval/sake_metric")
cols = {{k: [r[k] for r in rows] for k in ("item_id", "dimension", "type", "attribute", "pre_edit", "gap",
                                          "category", "options")}}
out = metric.compute(predictions=[r["post_edit"] for r in rows], references=[r["reference"] for r in rows],
                     questions=[r["question"] for r in rows], **cols)
print(json.dumps({{"metrics": out["metrics"], "stage_share": out["judge"]["stage_share"],
                  "torch_free_core": True}}))
"""
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_EVALUATE_OFFLINE="1",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["metrics"] == json.loads(json.dumps(expected))
    assert sum(got["stage_share"].values()) == pytest.approx(1.0)


def test_scoring_imports_no_torch_and_no_evaluate():
    code = ("import sys, eval.score, eval.report; "
            "print(sorted(m for m in ('torch', 'evaluate', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_linear_matcher_keeps_the_old_containment_rule():
    """The one-pass matcher keeps exactly the mentions the old all-pairs containment rule kept."""
    import random

    from bench.judge_long_output import old_text_mentions
    from eval.sake_metric.matching import _text_mentions

    rng = random.Random(0)
    vocab = ["very", "sad", "not", "dog", "cat", "hot", "dog", "a", "the", "very", "happy"]
    options = ["sad", "very sad", "dog", "hot dog", "cat", "happy"]
    for _ in range(300):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
        opts = rng.sample(options, rng.randint(2, len(options)))
        positive, negated = _text_mentions(text, opts)
        assert positive | negated == old_text_mentions(text, opts), (text, opts)


def test_over_long_outputs_are_judged_on_their_first_max_judged_chars():
    from eval.sake_metric.limits import MAX_JUDGED_CHARS

    pad = "x" * MAX_JUDGED_CHARS
    rows = [row("animal/test/000000/rel", "reliability", "dog " + pad + " cat cat", reference="dog",
                options=["dog", "cat"]),
            row("animal/test/000001/rel", "reliability", pad + " dog", reference="dog", options=["dog", "cat"])]
    verdicts = judge_rows(load_predictions(rows)[1])
    assert [(v.stage, v.passed, v.clipped) for v in verdicts] == [("choice", True, True), ("undecided", False, True)]


def test_results_count_outputs_stopped_at_max_new_tokens(tmp_path):
    from eval.score import score_predictions
    from _metric_helpers import header, write_predictions

    rows = demo_rows()
    for i, r in enumerate(rows):
        r["post_edit_hit_limit"] = i in (0, 5)
        r["pre_edit_hit_limit"] = i in (1, 2, 3) if i < 6 else None  # pre-edit flags, some unknown
    results = score_predictions(write_predictions(tmp_path / "p.jsonl", header(max_new_tokens=32), rows))
    assert results["generation"]["hit_max_new_tokens"] == 2 and results["generation"]["max_new_tokens"] == 32
    assert results["generation"]["rows_with_flag"] == len(rows)
    assert results["generation"]["pre_edit_hit_max_new_tokens"] == 3
    assert results["generation"]["pre_edit_rows_with_flag"] == 6
    assert sum(results["generation"]["pre_edit_per_dimension"].values()) == 3
    for field in ("post_edit_hit_limit", "pre_edit_hit_limit"):  # one rule for both flags
        bad = [dict(r) for r in rows]
        bad[0][field] = "yes"
        with pytest.raises(PredictionsError, match=field):
            score_predictions(write_predictions(tmp_path / "q.jsonl", header(), bad))


def test_evaluate_module_accepts_a_null_pre_edit_in_the_first_row():
    """evaluate type-checks a string column by its first value; a correctness row's null pre-edit must still pass."""
    import evaluate

    metric = evaluate.load(str(Path(__file__).resolve().parents[1] / "eval" / "sake_metric"))
    results = metric.compute(
        predictions=["dog", "cat", "cow"], references=["dog", "cat", "cow"], item_id=["a/rel", "a/gen1", "a/loc_audio1"],
        dimension=["reliability", "generality", "locality_audio"], type=[0, 1, 1], attribute=["animal"] * 3,
        pre_edit=[None, None, "hen"], gap=[None] * 3, category=[""] * 3, options=[["dog", "cat"]] * 3)
    overall = results["metrics"]["overall"]
    assert (overall["reliability"], overall["generality"], overall["locality_audio"]) == (100.0, 100.0, 0.0)
