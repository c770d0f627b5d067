"""editors.run: single and sequential runs on the demo dataset, restore, pre-edit cache, resume, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from _editor_helpers import changed_tensors, cli_args, make_bad_dataset, make_long_sequential, run_config, state_copy
from editors.data import load_instances
from editors.models import load_adapter
from editors.predictions import read_predictions
from editors.plan import RunPlan
from editors.run import Runner, main
from eval.sake_metric.predictions_file import read_predictions_file
from editors.config import RunConfig
from sake import run as api_run
from sake_core.errors import DataError
from sake_core.protocol import (CONSISTENCY_DIMENSIONS, ITEM_COLUMNS, OPTIONAL_ROW_FIELDS, ROW_FIELDS,
                                RUN_HEADER_FIELDS)

ROW_KEYS = set(ROW_FIELDS) | set(OPTIONAL_ROW_FIELDS)


@pytest.fixture(scope="module")
def qwen():
    return load_adapter("tiny-qwen2-audio", seed=0)


@pytest.fixture(scope="module")
def flamingo():
    return load_adapter("tiny-audio-flamingo3", seed=0)


def run(adapter, config: RunConfig) -> tuple[Runner, Path]:
    runner = Runner(config, adapter=adapter)
    return runner, runner.run()


def test_single_mode_end_to_end_with_exact_restore(qwen, demo_dataset, tmp_path):
    before = state_copy(qwen.model)
    runner, path = run(qwen, run_config(demo_dataset, tmp_path / "out", tmp_path / "cache", method="ft_audio",
                                        configs=("emotion", "gender"), limit=2,
                                        hparams={"max_steps": 400}))  # room to reach the early-stop loss
    assert changed_tensors(qwen.model, before) == []  # every edit restored bit-exactly
    header, rows = read_predictions(path)
    assert tuple(header) == RUN_HEADER_FIELDS and header["mode"] == "single" and header["method"] == "ft_audio"
    assert header["eval_edits"] is None and header["max_gap"] is None  # the sequential rule: not in single mode
    manifest = json.loads((demo_dataset / "sake_manifest.json").read_text())
    assert header["dataset_fingerprint"] == manifest["fingerprint"] and header["configs"] == ["emotion", "gender"]
    assert all(set(r) == ROW_KEYS and r["gap"] is None for r in rows)
    # the unedited outputs of the items whose score reads them (locality), as the paper's protocol; none elsewhere
    assert header["pre_edit_items"] == "locality"
    assert all(isinstance(r["pre_edit"], str) == (r["dimension"] in CONSISTENCY_DIMENSIONS) for r in rows)
    expected_ids = []
    for config in ("emotion", "gender"):
        for row in load_instances(str(demo_dataset), config, "test").select(range(2)):
            expected_ids.append(row["id"] + "/rel")
            for column in ("generality", "locality_audio", "locality_text", "portability"):
                expected_ids += [item["id"] for item in row[column]]
    assert [r["item_id"] for r in rows] == expected_ids
    assert all(isinstance(r["post_edit_hit_limit"], bool) for r in rows)
    assert all(isinstance(r["pre_edit_hit_limit"], bool) == (r["pre_edit"] is not None) for r in rows)
    assert header["expected_rows"] == len(rows)  # the strict reader accepts the complete file, manifest included
    assert len(read_predictions_file(path, manifest=manifest).rows) == len(rows)
    rel = [r for r in rows if r["dimension"] == "reliability"]
    assert len(rel) == 4 and all(r["post_edit"] == r["reference"] for r in rel)  # the edit took
    text = [r for r in rows if r["dimension"] == "locality_text"]
    assert text and all(r["post_edit"] == r["pre_edit"] for r in text)  # FT-Audio cannot touch text-only inputs
    assert {r["attribute"] for r in rows} == {"emotion", "gender"}
    assert Path(str(path) + ".timing.json").is_file()


def test_pre_edit_items_all_adds_the_other_items_and_keeps_the_locality_outputs(qwen, demo_dataset, tmp_path):
    common = {"configs": ("animal",), "limit": 2, "method": "ft_llm", "hparams": {"max_steps": 2}}
    _, default = run(qwen, run_config(demo_dataset, tmp_path / "a", tmp_path / "cache_a", **common))
    _, every = run(qwen, run_config(demo_dataset, tmp_path / "b", tmp_path / "cache_b", pre_edit_items="all",
                                    **common))
    header, rows = read_predictions(every)
    assert header["pre_edit_items"] == "all" and all(isinstance(r["pre_edit"], str) for r in rows)
    _, rows_default = read_predictions(default)
    # the same unedited outputs where both have one (generated in a batch of 5 items per edit against 10), and the
    # same post-edit outputs everywhere
    assert [(r["pre_edit"] if r["pre_edit"] is not None else o["pre_edit"], r["post_edit"]) for r, o in
            zip(rows_default, rows)] == [(o["pre_edit"], o["post_edit"]) for o in rows]
    with pytest.raises(DataError, match="pre_edit_items"):  # a file of the other setting is not resumed into
        run(qwen, run_config(demo_dataset, default, tmp_path / "cache_a", pre_edit_items="all", **common))


def test_preedit_outputs_are_cached_across_methods(qwen, demo_dataset, tmp_path):
    common = {"configs": ("language",), "limit": 1}
    first, path1 = run(qwen, run_config(demo_dataset, tmp_path / "a", tmp_path / "cache", **common))
    assert first.preedit.misses > 0
    second, path2 = run(qwen, run_config(demo_dataset, tmp_path / "b", tmp_path / "cache", method="ft_llm", **common))
    assert second.preedit.misses == 0 and second.preedit.hits == first.preedit.misses
    pre1 = [(r["pre_edit"], r["pre_edit_hit_limit"]) for r in read_predictions(path1)[1]]
    # a warm cache keeps the pre-edit generation-limit flag (stored with the entry)
    assert pre1 == [(r["pre_edit"], r["pre_edit_hit_limit"]) for r in read_predictions(path2)[1]]
    assert pre1 and all(isinstance(flag, bool) for text, flag in pre1 if text is not None)
    entries = [json.loads(line) for line in next((tmp_path / "cache" / "preedit").glob("*.jsonl")).open()]
    assert entries and all(isinstance(e["hit_limit"], bool) for e in entries)


def test_sequential_rows_cover_gaps_0_to_5_of_edits_1_to_5(flamingo, demo_dataset, tmp_path):
    dataset = make_long_sequential(demo_dataset, tmp_path / "long", length=10)
    runner, path = run(flamingo, run_config(dataset, tmp_path / "out", tmp_path / "cache", model="tiny-audio-flamingo3",
                                            mode="sequential", limit=1, max_new_tokens=3, method="ft_llm",
                                            hparams={"max_steps": 2}))
    header, rows = read_predictions(path)
    assert header["mode"] == "sequential" and header["configs"] == ["sequential"]
    assert header["eval_edits"] == 5 and header["max_gap"] == 5  # the paper's rule, stated in the file
    assert header["expected_rows"] == len(rows)
    step_of = {f"sequential/test/seq01/step{s:02d}": s for s in range(1, 11)}
    pairs = Counter((step_of[r["instance_id"]], r["gap"]) for r in rows)
    assert set(pairs) == {(s, g) for s in range(1, 6) for g in range(0, 6)}
    keys = [(r["item_id"], r["gap"]) for r in rows]
    assert len(keys) == len(set(keys))
    ds = load_instances(str(dataset), "sequential", "test")
    for s in range(1, 6):
        row = ds[s - 1]
        n_items = 1 + sum(len(row[c]) for c in ("generality", "locality_audio", "locality_text", "portability"))
        assert all(pairs[(s, g)] == n_items for g in range(6))
        # pre-edit outputs are the unedited model's: identical at every gap
        texts = {r["pre_edit"] for r in rows if r["item_id"] == f"{row['id']}/loc_text"}
        assert len(texts) == 1 and isinstance(texts.pop(), str)


def test_sequential_generations_hold_every_evaluated_edit_with_the_rows_of_one_per_edit(qwen, demo_dataset, tmp_path,
                                                                                        monkeypatch):
    dataset = make_long_sequential(demo_dataset, tmp_path / "long")
    config = run_config(dataset, tmp_path / "one.jsonl", tmp_path / "cache1", mode="sequential", limit=1,
                        max_new_tokens=4, method="wise", hparams={"n_iter": 5})  # the schedule, not the edit
    runner = Runner(config, adapter=qwen)
    calls: list[int] = []
    generate = runner._generate
    monkeypatch.setattr(runner, "_generate", lambda prompts: calls.append(len(prompts)) or generate(prompts))
    one = runner.run()
    # the five locality items of each of edits 1-5 before the edits, in one generation; then one generation per
    # step of all the edits it evaluates
    length = len(runner.plan.sequences[0][1])
    steps = [len(runner.plan.evaluated(t, length)) for t in range(1, length + 1)]
    assert calls == [5 * 5] + [10 * n for n in steps] and max(steps) == 5
    monkeypatch.undo()

    batched, pre_edit = Runner.evaluate_many, Runner.pre_edit_outputs

    def one_per_edit(self, edits, items):  # the earlier loop: a generation per evaluated edit
        return [batched(self, [e], [its])[0] for e, its in zip(edits, items)]

    def pre_one_per_edit(self, items):  # ... and per edit's items before the edits (10 items each)
        return [o for start in range(0, len(items), 10) for o in pre_edit(self, items[start:start + 10])]

    monkeypatch.setattr(Runner, "evaluate_many", one_per_edit)
    monkeypatch.setattr(Runner, "pre_edit_outputs", pre_one_per_edit)
    each = Runner(config.replace(out=str(tmp_path / "each.jsonl"), cache_dir=str(tmp_path / "cache2")),
                  adapter=qwen).run()
    assert one.read_text().splitlines()[1:] == each.read_text().splitlines()[1:]


def test_edits_run_one_at_a_time_get_their_pre_edit_outputs_ahead_with_the_rows_of_one_per_edit(
        qwen, demo_dataset, tmp_path, monkeypatch):
    import editors.run as run_module

    monkeypatch.setattr(run_module, "PRE_EDIT_AHEAD", 3)
    config = run_config(demo_dataset, tmp_path / "ahead.jsonl", tmp_path / "cache1", method="grace", limit=2,
                        max_new_tokens=4, hparams={"n_iter": 5})  # GRACE edits one at a time; 2 of each of 4 configs
    runner = Runner(config, adapter=qwen)
    calls: list[int] = []
    generate = runner._generate
    monkeypatch.setattr(runner, "_generate", lambda prompts: calls.append(len(prompts)) or generate(prompts))
    ahead = runner.run()
    # the locality items of three edits at a time (8 edits: 3 + 3 + 2) before them, each edit's items after it
    _, rows = read_predictions(ahead)
    items = Counter(r["instance_id"] for r in rows)
    locality = Counter(r["instance_id"] for r in rows if r["dimension"] in CONSISTENCY_DIMENSIONS)
    order = list(items)
    assert len(order) == 8 and len(calls) == 3 + 8
    for block, first in enumerate((0, 3, 6)):
        edits = order[first:first + 3]
        assert calls[4 * block] == sum(locality[e] for e in edits)
        assert calls[4 * block + 1:4 * block + 1 + len(edits)] == [items[e] for e in edits]
    monkeypatch.setattr(run_module, "PRE_EDIT_AHEAD", 1)  # one edit's pre-edit outputs at a time
    each = Runner(config.replace(out=str(tmp_path / "each.jsonl"), cache_dir=str(tmp_path / "cache2")),
                  adapter=qwen).run()
    assert ahead.read_text().splitlines()[1:] == each.read_text().splitlines()[1:]


def test_passes_get_their_pre_edit_outputs_ahead_with_the_rows_of_each_pass_alone(qwen, demo_dataset, tmp_path,
                                                                                     monkeypatch):
    import editors.run as run_module

    monkeypatch.setattr(run_module, "PRE_EDIT_AHEAD", 3)
    config = run_config(demo_dataset, tmp_path / "ahead.jsonl", tmp_path / "cache1", method="i_ike", limit=2,
                        max_new_tokens=4, edits_per_pass=2)
    runner = Runner(config, adapter=qwen)
    calls: list[int] = []
    generate = runner._generate  # the pre-edit generations (a pass's post-edit one goes through generate_many)
    monkeypatch.setattr(runner, "_generate", lambda prompts: calls.append(len(prompts)) or generate(prompts))
    ahead = runner.run()
    _, rows = read_predictions(ahead)
    locality = Counter(r["instance_id"] for r in rows if r["dimension"] in CONSISTENCY_DIMENSIONS)
    order = list(dict.fromkeys(r["instance_id"] for r in rows))
    # 8 edits in passes of 2: at least 3 edits ahead when a pass's edit has none (edits 1-3, 4-5, 6-7, 8)
    blocks = [order[0:3], order[3:5], order[5:7], order[7:8]]
    assert calls == [sum(locality[e] for e in block) for block in blocks]
    monkeypatch.setattr(run_module, "PRE_EDIT_AHEAD", 1)  # each pass's pre-edit outputs alone, just before it
    each = Runner(config.replace(out=str(tmp_path / "each.jsonl"), cache_dir=str(tmp_path / "cache2")),
                  adapter=qwen).run()
    assert ahead.read_text().splitlines()[1:] == each.read_text().splitlines()[1:]


def _cut_points(path: Path) -> list[int]:
    """Byte offsets to truncate at: inside a line, at a line end inside a unit, at a unit boundary."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")[:-1]
    ends, pos = [], 0
    for line in lines:
        pos += len(line) + 1
        ends.append(pos)
    _, rows = read_predictions(path)
    units = [r["instance_id"] + str(r["gap"]) for r in rows]
    boundary = next(i for i in range(1, len(units)) if units[i] != units[i - 1])  # first row of unit 2
    return [ends[boundary] + 7, ends[boundary + 1], ends[boundary], len(lines[0]) // 2]


@pytest.mark.parametrize("mode,method", [("single", "i_ike"), ("sequential", "ft_llm")])
def test_resume_after_a_kill_equals_an_uninterrupted_run(qwen, demo_dataset, tmp_path, mode, method):
    config = run_config(demo_dataset, tmp_path / "full.jsonl", tmp_path / "cache", mode=mode, method=method,
                        configs=("emotion",) if mode == "single" else ("sequential",),
                        limit=3 if mode == "single" else 1, max_new_tokens=4)
    _, full = run(qwen, config)
    reference = full.read_bytes()
    cuts = _cut_points(full)
    for cut in cuts if mode == "single" else cuts[::2]:  # sequential resume replays edits: keep it short
        part = tmp_path / f"cut{cut}.jsonl"
        part.write_bytes(reference[:cut])
        run(qwen, config.replace(out=str(part)))
        if cut < reference.index(b"\n"):  # killed while writing the header: a fresh header (new date)
            assert part.read_bytes().split(b"\n", 1)[1] == reference.split(b"\n", 1)[1]
        else:
            assert part.read_bytes() == reference


@pytest.mark.parametrize("stop", [RuntimeError("simulated crash"), KeyboardInterrupt()])
def test_resume_after_an_exception_mid_run(qwen, demo_dataset, tmp_path, monkeypatch, stop):
    """A run stopped by an error or by Ctrl-C keeps its finished units and their timing (written as it stops, not
    only every TIMING_EVERY_S); the same run resumes and adds its session to the timing."""
    config = run_config(demo_dataset, tmp_path / "x.jsonl", tmp_path / "cache", limit=3, configs=("animal",))
    _, path = run(qwen, config)
    reference = read_predictions(path)[1]
    path.unlink()
    runner = Runner(config, adapter=qwen)
    calls = {"n": 0}
    original = runner.adapter.generate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise stop
        return original(*args, **kwargs)

    monkeypatch.setattr(runner.adapter, "generate", flaky)
    timing = Path(str(path) + ".timing.json")
    timing.unlink()
    with pytest.raises(type(stop)):
        runner.run()
    monkeypatch.undo()
    assert 0 < len(read_predictions(path)[1]) < len(reference)
    first = json.loads(timing.read_text())  # the crashed session kept what it timed
    assert first["sessions"] == 1 and 0 < first["units"] < 3
    run(qwen, config)
    assert read_predictions(path)[1] == reference
    # the resumed session added to it: every unit timed once, the seconds of both sessions
    both = json.loads(timing.read_text())
    assert both["sessions"] == 2 and both["units"] == 3 and both["total_s"] > first["total_s"]
    assert len({u["unit"] for u in both["per_unit"]}) == 3


def test_resume_refuses_a_different_run(qwen, demo_dataset, tmp_path):
    config = run_config(demo_dataset, tmp_path / "r.jsonl", tmp_path / "cache", limit=1, configs=("gender",))
    assert api_run(config, adapter=qwen) == tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match="different run"):
        api_run(config.replace(seed=3), adapter=qwen)
    # a run that stopped before its first row left only its header: the corrected rerun starts the file again
    path = tmp_path / "r.jsonl"
    path.write_text(path.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    assert api_run(config.replace(seed=3), adapter=qwen) == path
    header, rows = read_predictions(path)
    assert header["seed"] == 3 and rows


def test_resume_takes_the_same_dataset_by_another_path(qwen, demo_dataset, tmp_path, monkeypatch):
    """The dataset given as a relative path resumes the run that named it by its absolute path (their fingerprints
    agree): nothing is redone or rewritten."""
    import os

    config = run_config(demo_dataset, tmp_path / "r.jsonl", tmp_path / "cache", limit=1, configs=("gender",))
    api_run(config, adapter=qwen)
    written = (tmp_path / "r.jsonl").read_bytes()
    monkeypatch.chdir(Path(demo_dataset).parent)
    relative = config.replace(dataset=os.path.relpath(demo_dataset))
    assert relative.dataset != config.dataset
    api_run(relative, adapter=qwen)
    assert (tmp_path / "r.jsonl").read_bytes() == written


def test_a_predictions_file_has_one_writer_at_a_time(tmp_path):
    """A second writer of the same predictions file (another run, or another process resuming it) is refused while
    the first holds it, before it reads or cuts a byte; once the first closes, the file resumes as usual, and a
    file refused as another run's keeps no lock."""
    from editors.predictions import PredictionsFile
    from sake_core.errors import DataError

    path = tmp_path / "p.jsonl"
    head = {"kind": "header", "method": "ft_llm"}

    def writer(header=head):
        return PredictionsFile(path, header, unit_of=lambda row: row["unit"], expected_rows={"a": 1, "b": 1})

    first = writer()
    assert first.open() == set()
    first.append_unit("a", [{"unit": "a"}])
    second = writer()
    with pytest.raises(DataError, match="being written by another run"):
        second.open()
    first.append_unit("b", [{"unit": "b"}])
    first.close()
    assert second.open() == {"a", "b"}
    second.close()
    other = writer({"kind": "header", "method": "ft_audio"})
    with pytest.raises(DataError, match="different run"):
        other.open()
    with writer() as again:
        assert again.done == {"a", "b"}
    assert path.read_text().count("\n") == 3


@pytest.mark.parametrize("tail,kept,problem", [
    # what a kill leaves after the complete units: dropped on resume
    ('{"unit": "c", "i": 0}\n{"unit": "c", "i"', {"a", "b"}, None),
    ('{"unit": "c", "i": 0}\n\u0000\u0000\n', {"a", "b"}, None),
    # damage: refused, the file untouched
    ('{"unit": "c", "i": 0}\n{"unit": "d", "i": 0}\n', None, r"line 5 starts unit 'd' after 1 of the 2 rows"),
    ('{"unit": "a", "i": 0}\n', None, r"line 4 repeats unit 'a'"),
    ('not json\n{"unit": "c", "i": 0}\n{"unit": "c", "i": 1}\n', None, r"line 4 is not a readable row, and rows"),
])
def test_resume_drops_what_a_kill_left_and_refuses_a_damaged_file(tmp_path, tail, kept, problem):
    """A kill leaves at most one unit's first rows (and a line cut short) after the complete units: a resume drops
    them. A bad line with rows after it, a unit short of rows with another after it, or a unit twice is damage: the
    resume stops with the line, and the finished units after it are not deleted."""
    from editors.predictions import PredictionsFile
    from sake_core.errors import DataError

    path = tmp_path / "p.jsonl"
    head = {"kind": "header", "method": "ft_llm"}
    complete = '{"unit": "a", "i": 0}\n{"unit": "b", "i": 0}\n'
    path.write_text(json.dumps(head) + "\n" + complete + tail)
    before = path.read_bytes()
    file = PredictionsFile(path, head, unit_of=lambda row: row["unit"],
                           expected_rows={"a": 1, "b": 1, "c": 2, "d": 1})
    if problem is None:
        with file:
            assert file.done == kept
        assert path.read_text() == json.dumps(head) + "\n" + complete
        return
    with pytest.raises(DataError, match=problem) as error:
        file.open()
    assert "nothing was changed" in str(error.value) and path.read_bytes() == before


@pytest.mark.parametrize("override,message", [
    ({"--method": "nope"}, "unknown editing method"),
    ({"--model": "tiny-gpt"}, "unknown model"),
    ({"--config": "colour"}, "unknown config"),
    ({"--config": "sequential"}, "--mode sequential"),
    ({"--hparam": "learning_rate=1"}, "unknown key"),
    ({"--hparam": "lr"}, "key=value"),
])
def test_bad_input_is_a_clear_error(demo_dataset, tmp_path, capsys, override, message):
    argv = {"--model": "tiny-qwen2-audio", "--method": "ft_llm", "--dataset": str(demo_dataset),
            "--out": str(tmp_path / "o"), "--cache-dir": str(tmp_path / "c"), "--limit": "1", **override}
    assert main([x for kv in argv.items() for x in kv] + ["--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_dataset_without_expected_columns_is_a_clear_error(demo_dataset, tmp_path, capsys):
    bad = make_bad_dataset(demo_dataset, tmp_path / "bad", drop="generality")
    assert main(cli_args(run_config(bad, tmp_path / "o", tmp_path / "c", configs=("emotion",)))) == 2
    err = capsys.readouterr().err
    assert "missing column(s) ['generality']" in err and str(bad) in err


def test_cli_main_writes_the_predictions_file(demo_dataset, tmp_path, capsys):
    argv = cli_args(run_config(demo_dataset, tmp_path / "cli", tmp_path / "cache", configs=("gender",), limit=1,
                               model="tiny-audio-flamingo3"))
    assert main(argv) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "cli" / "tiny-audio-flamingo3__i_ike__single__test__gender.jsonl"
    header, rows = read_predictions(path)
    assert header["method"] == "i_ike" and rows and rows[0]["item_id"].endswith("/rel")


def test_an_output_folder_that_cannot_be_written_is_one_line_before_the_model_loads(demo_dataset, tmp_path,
                                                                                     monkeypatch, capsys):
    import os

    import editors.run as run_module

    out = tmp_path / "ro"
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if Path(path) == out and mode == os.W_OK
                        else access(path, mode, *a, **k))
    monkeypatch.setattr(run_module, "load_adapter", lambda *a, **k: pytest.fail("the model loaded"))
    argv = cli_args(run_config(demo_dataset, out, tmp_path / "cache", configs=("gender",), limit=1))
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {out}: cannot write here (permissions or a read-only file system)\n"


def test_family_default_generation_length_and_hit_limit_flag(qwen, demo_dataset, tmp_path):
    import torch

    from editors.models.generation import decode_new_tokens, family_defaults

    assert family_defaults("desta25")["max_new_tokens"] == 512
    assert family_defaults("qwen2_audio", tiny=True)["max_new_tokens"] == 32
    runner, path = run(qwen, run_config(demo_dataset, tmp_path / "out", tmp_path / "cache", configs=("emotion",),
                                        limit=1, max_new_tokens=None))
    header, rows = read_predictions(path)
    assert header["max_new_tokens"] == 32  # tiny model: the YAML's tiny section
    assert header["generation"] == {"engine": "eager", "max_new_tokens": 32, "dtype": "float32",
                                    "min_shared_prefix": 256}  # what changes outputs: in the header
    assert all(isinstance(r["post_edit_hit_limit"], bool) for r in rows)
    # flagged exactly when a row used every new token without a stop token
    stop, other = qwen.stop_token_ids[0], 5 if 5 not in qwen.stop_token_ids else 6
    tokens = torch.tensor([[other, other, stop], [other, other, other]])
    assert [t.hit_limit for t in decode_new_tokens(qwen, tokens, 3)] == [False, True]
    assert [t.hit_limit for t in decode_new_tokens(qwen, tokens, 4)] == [False, False]


def test_the_plan_knows_units_rows_and_files_without_a_model(demo_dataset, tmp_path, monkeypatch):
    import editors.models

    monkeypatch.setattr(editors.models, "load_adapter", lambda *a, **k: pytest.fail("the plan loaded a model"))
    single = RunPlan(run_config(demo_dataset, tmp_path / "out", tmp_path / "cache", configs=("emotion", "gender"),
                                limit=2))
    assert [u.config for u in single.units] == ["emotion", "emotion", "gender", "gender"]
    rows = load_instances(str(demo_dataset), "emotion", "test")
    first = rows[0]
    assert single.units[0].key == first["id"] and single.unit_of({"instance_id": first["id"]}) == first["id"]
    assert single.units[0].expected_rows == 1 + sum(len(first[c]) for c in ITEM_COLUMNS)
    assert single.path == single.part_path == tmp_path / "out" / "tiny-qwen2-audio__i_ike__single__test__emotion+gender.jsonl"
    sequential = RunPlan(run_config(demo_dataset, tmp_path / "seq.jsonl", tmp_path / "cache", mode="sequential",
                                    limit=1, eval_edits=2, max_gap=1))
    (seq_id, steps), = sequential.sequences
    assert [u.key for u in sequential.units] == [f"{seq_id}/step01", f"{seq_id}/step02", f"{seq_id}/step03"]
    assert sequential.evaluated(2, len(steps)) == [1, 2]  # edit 1 at gap 1, edit 2 at gap 0
    step_one_id = sequential.datasets["sequential"][steps[0]]["id"]
    assert sequential.unit_of({"instance_id": step_one_id, "gap": 1}) == f"{seq_id}/step02"
    assert not sequential.merge().merged  # nothing written yet: nothing to merge


def test_the_progress_bar_names_the_run(qwen, demo_dataset, tmp_path, monkeypatch):
    import editors.run as run_module

    labels = []
    real = run_module.tqdm

    def recording(*args, **kwargs):
        labels.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "tqdm", recording)
    run(qwen, run_config(demo_dataset, tmp_path / "out", tmp_path / "cache", method="i_ike", configs=("emotion",),
                         limit=1))
    assert labels == ["i_ike single, tiny-qwen2-audio"]
    assert run_module.progress_label("lora", "sequential", str(tmp_path)) == f"lora sequential, {tmp_path.name}"
