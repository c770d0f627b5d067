"""Leaderboard: submission validator, scoring store (idempotent, atomic), results round trip, site build, CLI."""
from __future__ import annotations

import copy
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from _leaderboard_helpers import (METADATA, fake_scorer, jsonl_bytes, make_header, make_row,
                                  make_rows, write_submission_dir, write_submission_zip)
from eval.leaderboard.__main__ import main as cli_main
from eval.leaderboard.build import build_site, read_results
from eval.leaderboard.store import LocalStore, add_submission, board_result, check_results, process_queue
from eval.leaderboard.validate import (SubmissionError, expected_keys, load_manifest, validate_submission)


def _errors(path, manifest, **kwargs) -> str:
    with pytest.raises(SubmissionError) as info:
        validate_submission(path, manifest, **kwargs)
    return str(info.value)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root except the per-id lock files (they persist by design)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".locks" not in p.relative_to(root).parts}


# ------------------------------------------------------------------------------------------------ validator

def test_valid_submission_dir_and_zip_agree(tmp_path, manifest, single):
    header, rows = single
    sub_dir = validate_submission(write_submission_dir(tmp_path / "s", header, rows), manifest)
    sub_zip = validate_submission(write_submission_zip(tmp_path / "s.zip", header, rows), manifest)
    assert len(sub_dir.rows) == len(rows) == len(expected_keys(manifest, header))
    assert sub_dir.submission_id == sub_zip.submission_id
    other = copy.deepcopy(rows)
    other[0]["post_edit"] = "something else"
    assert validate_submission(write_submission_dir(tmp_path / "o", header, other), manifest).submission_id \
        != sub_dir.submission_id


def test_empty_output_is_allowed(tmp_path, manifest, single):
    header, rows = single
    rows = copy.deepcopy(rows)
    rows[3]["post_edit"] = ""
    assert validate_submission(write_submission_dir(tmp_path / "s", header, rows), manifest).rows[3]["post_edit"] == ""


def test_missing_id(tmp_path, manifest, single):
    header, rows = single
    dropped = rows[4]["item_id"]
    message = _errors(write_submission_dir(tmp_path / "s", header, rows[:4] + rows[5:]), manifest)
    assert f"1 of {len(rows)} expected item ids missing; first: '{dropped}'" in message


def test_duplicate_id(tmp_path, manifest, single):
    header, rows = single
    rows = rows[:6] + [rows[2]] + rows[6:]
    message = _errors(write_submission_dir(tmp_path / "s", header, rows), manifest)
    # header is line 1, rows[2] is line 4; the copy is the 7th row -> line 8
    assert f"predictions.jsonl line 8, field item_id: duplicate item id '{rows[2]['item_id']}' (first at line 4)" \
        in message


def test_extra_id(tmp_path, manifest, single):
    header, rows = single
    extra = dict(rows[0], instance_id="emotion/test/000999", item_id="emotion/test/000999/rel")
    message = _errors(write_submission_dir(tmp_path / "s", header, rows + [extra]), manifest)
    line = len(rows) + 2
    assert f"line {line}, field item_id: 1 item id(s) not in the release" in message
    assert "'emotion/test/000999/rel'" in message


def test_wrong_type_of_output(tmp_path, manifest, single):
    header, rows = single
    rows = copy.deepcopy(rows)
    rows[1]["post_edit"] = 3
    del rows[2]["reference"]
    message = _errors(write_submission_dir(tmp_path / "s", header, rows), manifest)
    assert "predictions.jsonl line 3, field post_edit: expected string, got integer 3" in message
    assert "predictions.jsonl line 4, field reference: missing required field" in message


def test_inconsistent_dimension_and_gap(tmp_path, manifest, single):
    header, rows = single
    rows = copy.deepcopy(rows)
    rows[0]["dimension"] = "generality"  # a rel item
    rows[1]["gap"] = 2
    message = _errors(write_submission_dir(tmp_path / "s", header, rows), manifest)
    assert "line 2, field dimension: got \"generality\", expected 'reliability' for a rel item" in message
    assert "line 3, field gap: expected null in single mode, got 2" in message


def test_wrong_fingerprint(tmp_path, manifest, single):
    header, rows = single
    header = dict(header, dataset_fingerprint="0" * 64)
    message = _errors(write_submission_dir(tmp_path / "s", header, rows), manifest)
    assert "line 1, field dataset_fingerprint" in message
    assert manifest["fingerprint"] in message


def test_wrong_split_and_header_field(tmp_path, manifest, single):
    header, rows = single
    message = _errors(write_submission_dir(tmp_path / "s", dict(header, split="train"), rows), manifest)
    assert "line 1, field split: got 'train', the board accepts test" in message
    bad = dict(header, mode="batch")
    message = _errors(write_submission_dir(tmp_path / "t", bad, rows), manifest)
    assert "predictions.jsonl line 1: header field 'mode' must be one of single, sequential, got 'batch'" in message


def test_oversize(tmp_path, manifest, single):
    header, rows = single
    path = write_submission_dir(tmp_path / "s", header, rows)
    size = sum(p.stat().st_size for p in path.iterdir())
    message = _errors(path, manifest, max_bytes=size - 1)
    assert f"size {size} bytes is over the limit of {size - 1} bytes" in message
    archive = write_submission_zip(tmp_path / "s.zip", header, rows)
    assert "over the limit" in _errors(archive, manifest, max_bytes=1000)


@pytest.mark.parametrize("name, why", [
    ("../evil.jsonl", "path traversal"),
    ("sub/../../evil.jsonl", "path traversal"),
    ("/etc/cron.d/evil", "absolute path"),
    ("C:/evil.txt", "absolute path"),
    ("run.py", "unexpected file"),
])
def test_archive_member_rejected(tmp_path, manifest, single, name, why):
    header, rows = single
    archive = write_submission_zip(tmp_path / "s.zip", header, rows, extra={name: b"print('never run')"})
    message = _errors(archive, manifest)
    assert f"member {name!r}: rejected: {why}" in message
    assert not (tmp_path / "evil.jsonl").exists()


def test_archive_symlink_rejected(tmp_path, manifest, single):
    header, rows = single
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("predictions.jsonl", jsonl_bytes(header, rows))
        link = zipfile.ZipInfo("metadata.json")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    assert "member 'metadata.json': rejected: symbolic link" in _errors(archive, manifest)


def test_directory_symlink_rejected(tmp_path, manifest, single):
    header, rows = single
    path = write_submission_dir(tmp_path / "s", header, rows)
    (path / "metadata.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", path / "metadata.json")
    assert "s/metadata.json: rejected: symbolic link" in _errors(path, manifest)


def test_malformed_jsonl_line(tmp_path, manifest, single):
    header, rows = single
    path = write_submission_dir(tmp_path / "s", header, rows)
    lines = (path / "predictions.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the closing of line 3
    (path / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    message = _errors(path, manifest)
    assert "predictions.jsonl line 3: not valid JSON, column " in message and ": Unterminated string" in message


def test_bad_metadata(tmp_path, manifest, single):
    header, rows = single
    metadata = dict(METADATA, model_link="javascript:alert(1)", homepage="x")
    del metadata["license"]
    message = _errors(write_submission_dir(tmp_path / "s", header, rows, metadata=metadata), manifest)
    assert "metadata.json, field license: missing required field" in message
    assert "metadata.json, field model_link" in message
    assert "'homepage' was unexpected" in message


def test_sequential_expected_keys_and_missing_gap(tmp_path, manifest):
    header = make_header(manifest, "sequential")
    keys = expected_keys(manifest, header)
    # 2 sequences of 7 steps, 5 items per step: step s in 1..5 needs gaps 0..min(5, 7-s).
    per_step = {s: min(5, 7 - s) + 1 for s in range(1, 6)}
    assert len(keys) == 2 * 5 * sum(per_step.values())
    assert ("sequential/test/seq00/step05/rel", 2) in keys and ("sequential/test/seq00/step05/rel", 3) not in keys
    assert not any("step06" in k[0] for k in keys)
    rows = make_rows(manifest, "sequential")
    validate_submission(write_submission_dir(tmp_path / "ok", header, rows), manifest)
    drop = next(i for i, r in enumerate(rows) if r["gap"] == 4)
    message = _errors(write_submission_dir(tmp_path / "s", header, rows[:drop] + rows[drop + 1:]), manifest)
    assert f"first: '{rows[drop]['item_id']}' at gap 4" in message


def test_sequential_run_with_its_own_rule_is_refused_by_the_board(tmp_path, manifest):
    """A run with --eval-edits 2 --max-gap 1 says so in its header; the metric's reader scores it by that rule, but
    the board refuses it, naming both fields, so that no sequential row is ranked against a run evaluated on
    fewer edits or gaps. The paper's values, written out or left null, are accepted."""
    from eval.sake_metric.predictions_file import parse_predictions

    header = dict(make_header(manifest, "sequential"), eval_edits=2, max_gap=1)
    keys = expected_keys(manifest, header)
    assert {gap for _, gap in keys} == {0, 1}
    assert {int(item.split("/step")[1][:2]) for item, _ in keys} == {1, 2}
    rows = [make_row(item_id, gap, correct=True) for item_id, gap in keys]
    assert len(parse_predictions(jsonl_bytes(header, rows), "own.jsonl", manifest=manifest).rows) == len(keys)
    message = _errors(write_submission_dir(tmp_path / "own", header, rows), manifest)
    assert "line 1, field eval_edits: got 2; the board takes the paper's sequential protocol: 5" in message
    assert "line 1, field max_gap: got 1; the board takes the paper's sequential protocol: 5" in message
    paper = make_header(manifest, "sequential")
    full = make_rows(manifest, "sequential")
    validate_submission(write_submission_dir(tmp_path / "null", paper, full), manifest)
    written = dict(paper, eval_edits=5, max_gap=5)
    validate_submission(write_submission_dir(tmp_path / "written", written, full), manifest)
    assert "missing" in _errors(write_submission_dir(tmp_path / "paper", paper, rows), manifest)
    late = dict(full[0], gap=6)
    message = _errors(write_submission_dir(tmp_path / "gap", paper, full + [late]), manifest)
    assert "field gap" in message


def test_a_single_run_over_some_attributes_is_refused_by_the_board(tmp_path, manifest):
    """A single-editing run of one attribute (``--config emotion``) scores, but it is not ranked against runs over
    every attribute of the release: the board refuses it, naming what is missing."""
    header = dict(make_header(manifest), configs=["emotion"])
    rows = [r for r in make_rows(manifest) if r["attribute"] == "emotion"]
    message = _errors(write_submission_dir(tmp_path / "one", header, rows), manifest)
    assert "field configs: a board entry covers every attribute of the release; missing gender" in message


def test_board_and_metric_list_the_same_keys_but_the_board_ignores_limit(manifest):
    """The board's coverage check and the metric's reader share one list of expected keys; a board entry is a
    complete run whatever its header's ``limit``."""
    from eval.sake_metric.predictions_file import expected_keys as run_keys

    sequential = dict(make_header(manifest, "sequential"), eval_edits=2, max_gap=1)
    assert expected_keys(manifest, sequential) == run_keys(manifest, sequential)
    single = make_header(manifest)
    assert expected_keys(manifest, single) == [item for item, _ in run_keys(manifest, single)]
    limited = dict(single, limit=1)
    assert expected_keys(manifest, limited) == expected_keys(manifest, single)
    assert len(run_keys(manifest, limited)) < len(expected_keys(manifest, single))


def test_load_manifest_from_dir_and_file(tmp_path, manifest):
    (tmp_path / "sake_manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(tmp_path)["fingerprint"] == manifest["fingerprint"]
    assert load_manifest(tmp_path / "sake_manifest.json")["fingerprint"] == manifest["fingerprint"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_manifest(tmp_path / "nowhere" / "x.json")
    (tmp_path / "cut.json").write_text('{"fingerprint": "x", "item_ids": {')
    with pytest.raises(ValueError, match="cut.json: cannot read the dataset manifest"):
        load_manifest(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="list.json: not a SAKE dataset manifest"):
        load_manifest(tmp_path / "list.json")
    (tmp_path / "nofp.json").write_text('{"item_ids": {}}')
    with pytest.raises(ValueError, match="missing field 'fingerprint'"):
        load_manifest(tmp_path / "nofp.json")


# ------------------------------------------------------------------------------------------------ store

def test_add_is_idempotent(tmp_path, manifest, single):
    header, rows = single
    sub = write_submission_dir(tmp_path / "s", header, rows)
    store = LocalStore(tmp_path / "results")
    first = add_submission(sub, manifest, store, judge="offline", scorer=fake_scorer)
    snapshot = _tree(tmp_path / "results")
    calls = []
    second = add_submission(sub, manifest, store, judge="offline",
                            scorer=lambda *a, **k: calls.append(1) or fake_scorer(*a, **k))
    assert (first.status, second.status) == ("added", "exists")
    assert first.submission_id == second.submission_id and not calls
    assert _tree(tmp_path / "results") == snapshot
    assert sorted(snapshot) == [f"results/{first.submission_id}.json",
                                f"submissions/{first.submission_id}/metadata.json",
                                f"submissions/{first.submission_id}/predictions.jsonl"]


def test_bad_submission_changes_nothing(tmp_path, manifest, single):
    header, rows = single
    store = LocalStore(tmp_path / "results")
    add_submission(write_submission_dir(tmp_path / "good", header, rows), manifest, store, judge="offline",
                   scorer=fake_scorer)
    snapshot = _tree(tmp_path / "results")
    bad = write_submission_dir(tmp_path / "bad", dict(header, method="ft_llm"), rows[1:])
    with pytest.raises(SubmissionError):
        add_submission(bad, manifest, store, judge="offline", scorer=fake_scorer)
    assert _tree(tmp_path / "results") == snapshot


def test_crash_mid_scoring_leaves_no_result(tmp_path, manifest, single):
    header, rows = single
    sub = write_submission_dir(tmp_path / "s", header, rows)
    store = LocalStore(tmp_path / "results")

    def crashing(path, **kwargs):
        raise RuntimeError("judge died")

    with pytest.raises(RuntimeError, match="judge died"):
        add_submission(sub, manifest, store, judge="offline", scorer=crashing)
    assert _tree(tmp_path / "results") == {}


def test_crash_while_storing_leaves_no_result(tmp_path, manifest, single, monkeypatch):
    header, rows = single
    sub = write_submission_dir(tmp_path / "s", header, rows)
    store = LocalStore(tmp_path / "results")
    import eval.leaderboard.store as store_module

    real_write = store_module.atomic_write

    def dying_write(path, data):  # the side files land, the result JSON (written last) does not
        if Path(path).parent.name == "results":
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(store_module, "atomic_write", dying_write)
    with pytest.raises(OSError, match="disk full"):
        add_submission(sub, manifest, store, judge="offline", scorer=fake_scorer)
    assert not list((tmp_path / "results").glob("results/*"))
    assert read_results(tmp_path / "results") == []
    monkeypatch.undo()
    assert add_submission(sub, manifest, store, judge="offline", scorer=fake_scorer).status == "added"
    assert len(read_results(tmp_path / "results")) == 1


def test_results_json_round_trip(tmp_path, manifest, single):
    header, rows = single
    submission = validate_submission(write_submission_dir(tmp_path / "s", header, rows), manifest)
    scored = fake_scorer(str(tmp_path / "s" / "predictions.jsonl"), judge="offline")
    result = board_result(submission, scored, added="2026-11-26T13:00:00Z")
    check_results(result)
    store = LocalStore(tmp_path / "results")
    store.put(submission.submission_id, result, submission.metadata, submission.predictions_bytes)
    assert store.results() == [result]
    assert read_results(tmp_path / "results") == [(submission.submission_id, result)]
    assert result["submission"]["metadata"] == METADATA and result["submission"]["header"]["method"] == "ft_audio"
    assert (tmp_path / "results" / "submissions" / submission.submission_id / "predictions.jsonl").read_bytes() \
        == submission.predictions_bytes


def test_queue_moves_good_and_bad(tmp_path, manifest, single):
    header, rows = single
    pending = tmp_path / "queue" / "pending"
    write_submission_zip(pending.mkdir(parents=True) or pending / "a.zip", header, rows)
    write_submission_zip(pending / "b.zip", header, rows[:-1])
    outcomes = process_queue(tmp_path / "queue", manifest, LocalStore(tmp_path / "results"), judge="offline",
                             scorer=fake_scorer)
    assert [o[0] for o in outcomes] == ["a.zip", "b.zip"]
    assert outcomes[0][1].startswith("added ") and outcomes[1][1] == "rejected"
    assert (tmp_path / "queue" / "done" / "a.zip").exists()
    assert "expected item ids missing" in (tmp_path / "queue" / "rejected" / "b.zip.error.txt").read_text()


def test_real_metric_scores_a_submission(tmp_path, manifest, single):
    """Integration with the metric module (eval.score), offline judge."""
    import eval.score as score
    header, rows = single
    store = LocalStore(tmp_path / "results")
    outcome = add_submission(write_submission_dir(tmp_path / "s", header, rows), manifest, store, judge="offline",
                             scorer=score.score_predictions)
    result = outcome.result
    assert result["n_rows"] == len(rows)
    overall = result["metrics"]["overall"]
    assert 0 <= overall["reliability"] <= 100 and overall["generality_type2"] is not None
    assert result["judge"]["name"]


# ------------------------------------------------------------------------------------------------ build + CLI

def test_build_is_deterministic_and_escapes(tmp_path, manifest, single):
    header, rows = single
    metadata = dict(METADATA, submitter="</script><script>alert(1)</script>")
    store = LocalStore(tmp_path / "results")
    add_submission(write_submission_dir(tmp_path / "s", header, rows, metadata=metadata), manifest, store,
                   judge="offline", scorer=fake_scorer, added="2026-11-26T13:00:00Z")
    build_site(tmp_path / "results", tmp_path / "site1")
    build_site(tmp_path / "results", tmp_path / "site2")
    assert _tree(tmp_path / "site1") == _tree(tmp_path / "site2")
    data_js = (tmp_path / "site1" / "data.js").read_text()
    assert "</script>" not in data_js
    data = json.loads(data_js[len("window.SAKE_BOARD = "):-2])
    submitted = [r for r in data["rows"] if not r["reference"]]
    assert len(submitted) == 1 and submitted[0]["submitter"] == metadata["submitter"]
    assert len([r for r in data["rows"] if r["reference"]]) == 48
    link = tmp_path / "site1" / submitted[0]["link"]
    assert json.loads(link.read_text())["metadata"]["submitter"] == metadata["submitter"]


def test_reference_rows_match_paper_table2():
    """Spot values of paper Table 2 and Table 12 (transcribed into reference_rows.json)."""
    data = json.loads((Path(__file__).parents[1] / "eval/leaderboard/reference_rows.json").read_text())
    rows = {(r["model"], r["method"], r["mode"]): r for r in data["rows"]}
    qwen_ft_audio = rows[("Qwen/Qwen2-Audio-7B-Instruct", "ft_audio", "single")]["metrics"]["overall"]
    assert (qwen_ft_audio["reliability"], qwen_ft_audio["generality"], qwen_ft_audio["portability"]) == \
        (100.0, 81.81, 49.92)
    assert rows[("DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B", "wise", "single")]["metrics"]["overall"]["locality_audio"] \
        == 38.90
    assert rows[("nvidia/audio-flamingo-3-hf", "ie_ike", "single")]["metrics"]["per_attribute"]["gender"][
        "locality_audio_type2"] is None
    seq = rows[("Qwen/Qwen2-Audio-7B-Instruct", "mend", "sequential")]["metrics"]["per_gap"]
    assert [seq[str(g)]["reliability"] for g in range(6)] == [88.0, 76.0, 66.0, 68.0, 62.0, 60.0]
    assert all(r["reference"] for r in data["rows"]) and "paper" in data["note"].lower()
    # Table 3 (std / range over the 26 knowledge categories) follows from the transcribed Tables 14-17.
    import statistics

    spreads = [r for r in data["rows"] if r.get("portability_category_spread")]
    assert len(spreads) == 6
    for row in spreads:
        values = [v for a in row["metrics"]["per_attribute"].values() for v in a["portability_by_category"].values()]
        assert len(values) == 26
        assert round(statistics.stdev(values), 2) == row["portability_category_spread"]["std"]
        assert round(max(values) - min(values), 2) == row["portability_category_spread"]["range"]


def test_cli_validate_and_add(tmp_path, manifest, single, capsys, monkeypatch):
    header, rows = single
    (tmp_path / "sake_manifest.json").write_text(json.dumps(manifest))
    good = write_submission_dir(tmp_path / "s", header, rows)
    bad = write_submission_dir(tmp_path / "b", header, rows[:-1])
    assert cli_main(["validate", str(good), "--manifest", str(tmp_path)]) == 0
    assert "OK " in capsys.readouterr().out
    assert cli_main(["validate", str(bad), "--manifest", str(tmp_path)]) == 1
    assert "expected item ids missing" in capsys.readouterr().err
    assert cli_main(["pack", str(good / "predictions.jsonl"), "--metadata", str(good / "metadata.json"),
                     "--out", str(tmp_path / "p.zip")]) == 0
    assert cli_main(["validate", str(tmp_path / "p.zip"), "--manifest", str(tmp_path)]) == 0
    import eval.leaderboard.store as store_module

    monkeypatch.setattr(store_module, "_default_scorer", lambda: fake_scorer)
    capsys.readouterr()
    assert cli_main(["add", str(tmp_path / "p.zip"), "--manifest", str(tmp_path), "--judge", "offline",
                     "--results", str(tmp_path / "res")]) == 0
    assert cli_main(["add", str(good), "--manifest", str(tmp_path), "--judge", "offline",
                     "--results", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out.split()
    assert out[0] == "added" and out[2] == "exists" and out[1] == out[3]
    assert cli_main(["build", str(tmp_path / "res"), "--out", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").exists()


def test_hub_store_writes_one_commit(tmp_path, manifest, single, monkeypatch):
    """The Hub store (no network: HfApi replaced) puts all three files in one commit and checks existence."""
    import huggingface_hub

    commits, existing = [], set()

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def file_exists(self, repo_id, filename, repo_type=None, revision=None):
            assert repo_type == "dataset"
            return filename in existing

        def create_commit(self, repo_id, operations, commit_message, repo_type=None, revision=None):
            commits.append([op.path_in_repo for op in operations])
            existing.update(op.path_in_repo for op in operations)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from eval.leaderboard.store import open_store

    store = open_store(hub_repo="org/sake-results", token="hf_test")
    header, rows = single
    sub = write_submission_dir(tmp_path / "s", header, rows)
    first = add_submission(sub, manifest, store, judge="offline", scorer=fake_scorer)
    again = add_submission(sub, manifest, store, judge="offline", scorer=fake_scorer)
    sid = first.submission_id
    assert (first.status, again.status) == ("added", "exists")
    assert commits == [[f"submissions/{sid}/metadata.json", f"submissions/{sid}/predictions.jsonl",
                        f"results/{sid}.json"]]
    # Scored by the metric (offline protocol): the per-item verdicts go in the same commit, the result last.
    other = write_submission_dir(tmp_path / "t", header, rows, METADATA | {"description": "second"})
    sid2 = add_submission(other, manifest, store, judge="offline").submission_id
    assert commits[1] == [f"submissions/{sid2}/metadata.json", f"submissions/{sid2}/predictions.jsonl",
                          f"submissions/{sid2}/items.jsonl", f"results/{sid2}.json"]


def test_demo_release_manifest_round_trip(tmp_path, demo_dataset):
    """Against a real manifest written by the dataset builder (demo release): complete runs validate, score
    with the metric module and build; a run missing one sequential gap is rejected."""
    manifest = load_manifest(demo_dataset)
    store = LocalStore(tmp_path / "results")
    for mode in ("single", "sequential"):
        header = dict(make_header(manifest, mode),
                      configs=["sequential"] if mode == "sequential" else ["animal", "emotion", "gender", "language"])
        ids = expected_keys(manifest, header)
        keys = ids if mode == "sequential" else [(i, None) for i in ids]
        rows = [make_row(item_id, gap, correct=n % 3 != 0) for n, (item_id, gap) in enumerate(keys)]
        if mode == "sequential":
            steps = {int(k[0].split("/")[3][4:]) for k in keys}
            assert steps == {1, 2, 3, 4, 5} and {k[1] for k in keys} <= set(range(6))
            broken = [r for r in rows if not (r["gap"] == 1 and r["item_id"].endswith("step02/rel"))]
            with pytest.raises(SubmissionError, match="at gap 1"):
                validate_submission(write_submission_dir(tmp_path / "broken", header, broken), manifest)
        sub = write_submission_dir(tmp_path / mode, header, rows)
        result = add_submission(sub, manifest, store, judge="offline").result  # the real metric (eval.score)
        assert result["n_rows"] == len(rows) and result["judge"]["name"] == "offline"
        if mode == "sequential":
            assert sorted(result["metrics"]["per_gap"]) == sorted({str(k[1]) for k in keys})
    assert sorted(r["mode"] for r in store.results()) == ["sequential", "single"]
    build_site(tmp_path / "results", tmp_path / "site")


def test_board_shows_local_model_paths_by_their_last_component():
    from eval.leaderboard.build import display_model_name

    assert display_model_name("/work/x/models/sake-reference-qwen2-audio/") == "sake-reference-qwen2-audio"
    assert display_model_name("./models/ref") == "ref"
    assert display_model_name("Qwen/Qwen2-Audio-7B-Instruct") == "Qwen/Qwen2-Audio-7B-Instruct"
