"""Issue 25 (board): the `paper` label only for the paper's judge, ranking groups, reference rows never ranked,
the board id covering the judge, the judge host recorded without secrets."""
from __future__ import annotations

import json

import pytest

from _leaderboard_helpers import METADATA, fake_scorer, make_header, make_manifest, make_rows, write_submission_dir
from eval.leaderboard.build import board_data
from eval.leaderboard.space import Board, SpaceConfig
from eval.leaderboard.store import (LocalStore, ResultsFormatError, add_submission, board_id, check_results,
                                    ranking_group, result_protocol)
from eval.sake_metric.llm_judge import DEFAULT_MODEL, PAPER_HOST, PROMPT_VERSION, endpoint_host
from test_judge import SECRET, FakeOpenAI

PAPER_JUDGE = {"protocol": "paper", "name": "openai", "model": DEFAULT_MODEL, "host": PAPER_HOST,
               "prompt_version": PROMPT_VERSION, "paper_settings": True, "version": "test",
               "stage_share": {"exact": 0.5, "llm": 0.5}}


def judged_by(**judge: object):
    """A scorer like `fake_scorer` whose results carry the given judge block."""
    def scorer(path, **_):
        return fake_scorer(path) | {"judge": dict(judge)}
    return scorer


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fake = FakeOpenAI()
    yield fake
    fake.close()


def test_paper_label_only_for_the_paper_judge():
    assert result_protocol({"judge": PAPER_JUDGE}) == "paper"
    assert result_protocol({"judge": PAPER_JUDGE | {"protocol": "paper+choice"}}) == "paper+choice"
    # the paper's model, seed and effort on another endpoint (a local server answering as "gpt-5-mini")
    assert result_protocol({"judge": PAPER_JUDGE | {"host": "127.0.0.1:8000"}}) == "custom"
    assert result_protocol({"judge": PAPER_JUDGE | {"model": "my-judge"}}) == "custom"
    assert result_protocol({"judge": PAPER_JUDGE | {"paper_settings": False}}) == "custom"
    assert result_protocol({"judge": PAPER_JUDGE | {"protocol": "paper+choice", "host": None}}) == "custom+choice"
    # an older result recording no host is not taken for the paper's judge
    assert result_protocol({"judge": {"name": "openai", "stage_share": {"llm": 1.0}}}) == "custom"
    assert result_protocol({"judge": {"name": "offline"}}) == "offline"


def test_endpoint_host_keeps_no_secret():
    assert endpoint_host(None) == PAPER_HOST
    url = f"https://user:{SECRET}@Judge.Example:8443/v1/path?api_key={SECRET}#frag"
    assert endpoint_host(url) == "judge.example:8443"
    assert endpoint_host("http://[::1]:9000/v1") == "[::1]:9000"
    with pytest.raises(ValueError, match="usable host"):
        endpoint_host("not a url")
    base = {"model": "m", "method": "ft_llm", "mode": "single", "dataset_fingerprint": "f", "n_rows": 1,
            "metrics": {"overall": {}}}
    check_results(base | {"judge": PAPER_JUDGE})
    for bad in (f"user:{SECRET}@h", "h/v1", "h?key=1", "h:80/x", 7, "<b>h</b>"):
        with pytest.raises(ResultsFormatError, match="judge.host"):
            check_results(base | {"judge": PAPER_JUDGE | {"host": bad}})
    with pytest.raises(ResultsFormatError, match="judge.model"):
        check_results(base | {"judge": PAPER_JUDGE | {"model": "x" * 500}})


def test_board_id_covers_the_judge():
    content = "0123456789abcdef0123"
    ids = {board_id(content, "offline"), board_id(content, "paper"), board_id(content, "paper+choice"),
           board_id(content, "paper", model="other"), board_id(content, "paper", base_url="http://127.0.0.1:1/v1")}
    assert len(ids) == 5 and all(len(i) == 20 and int(i, 16) >= 0 for i in ids)
    assert board_id(content, "paper") == board_id(content, "openai", cache_dir="/x")  # same judge, same id
    # only the host of the endpoint counts: a key in the URL or its path changes nothing
    assert board_id(content, "paper", base_url=f"http://u:{SECRET}@127.0.0.1:1/v2?k={SECRET}") == \
        board_id(content, "paper", base_url="http://127.0.0.1:1/v1")


def test_local_judge_server_is_a_custom_row_ranked_alone(server, tmp_path):
    """The issue's case: a submission judged by a local server with the paper's model name was a `paper` row ranked
    first, above the paper's rows. Now: labelled `custom` (model @ host), ranked in its own group; the same
    submission judged offline first can be judged again (not `exists`)."""
    import eval.score as score

    manifest = make_manifest()
    store = LocalStore(tmp_path / "results")
    sub = write_submission_dir(tmp_path / "s", make_header(manifest, method="ft_llm"),
                               make_rows(manifest, wrong_every=1000), METADATA)
    offline = add_submission(sub, manifest, store, judge="offline", scorer=score.score_predictions)
    assert offline.status == "added"
    assert add_submission(sub, manifest, store, judge="offline", scorer=score.score_predictions).status == "exists"
    local = add_submission(sub, manifest, store, judge="paper", scorer=score.score_predictions,
                           base_url=server.base_url, cache_dir=str(tmp_path / "cache"))
    assert local.status == "added" and local.submission_id != offline.submission_id
    port = server.base_url.split(":")[2].split("/")[0]
    assert local.result["judge"]["host"] == f"127.0.0.1:{port}"
    assert local.result["ranking_group"] == ranking_group(local.result)
    assert local.result["ranking_group"]["protocol"] == "custom"
    stored = (tmp_path / "results" / "results" / f"{local.submission_id}.json").read_text()
    assert SECRET not in stored and "/v1" not in stored

    board = Board(SpaceConfig(results_dir=str(tmp_path / "results"), queue_dir=str(tmp_path / "queue"),
                              judge="offline", queue_interval_s=0), manifest=manifest)
    rows = board.rows()
    mine = {r["id"]: r for r in rows if not r["reference"]}
    assert mine[local.submission_id]["protocol"] == "custom" and mine[local.submission_id]["rank"] == 1
    assert mine[offline.submission_id]["rank"] == 1  # each alone in its group
    assert f"{DEFAULT_MODEL} @ 127.0.0.1:{port}" in mine[local.submission_id]["judge"]
    single = [r for r in rows if r["mode"] == "single"]
    assert all(r["rank"] is None for r in single if r["reference"])
    assert single.index(mine[local.submission_id]) < min(i for i, r in enumerate(single) if r["reference"])
    table = board.table(mode=["single"])
    assert all(t[0] is None and "not ranked" in t[6] for t in table if "paper (reported)" in t[6])


def test_ranking_groups_split_on_every_field(tmp_path):
    manifest = make_manifest()
    store = LocalStore(tmp_path / "results")
    variants = {"paper": {}, "paper2": {}, "model": {"model": "other-judge"}, "host": {"host": "127.0.0.1:9"},
                "prompt": {"prompt_version": "sake-judge-v0"}}
    ids = {}
    for n, (name, change) in enumerate(variants.items()):
        rows = make_rows(manifest, wrong_every=2 + n)
        sub = write_submission_dir(tmp_path / name, make_header(manifest, method="ft_llm"), rows,
                                   METADATA | {"submitter": name})
        ids[name] = add_submission(sub, manifest, store, judge="paper", scorer=judged_by(**(PAPER_JUDGE | change))
                                   ).submission_id
    # a result of an earlier dataset revision (the board's manifest changed since): its own group
    sub = write_submission_dir(tmp_path / "data", make_header(manifest, method="ft_llm"),
                               make_rows(manifest, wrong_every=3), METADATA | {"submitter": "data"})
    earlier = judged_by(**PAPER_JUDGE)
    ids["data"] = add_submission(sub, manifest, store, judge="paper",
                                 scorer=lambda path, **k: earlier(path) | {"dataset_fingerprint": "f" * 64}
                                 ).submission_id

    board = Board(SpaceConfig(results_dir=str(tmp_path / "results"), queue_dir=str(tmp_path / "queue"),
                              judge="offline", queue_interval_s=0), manifest=manifest)
    rows = {r["id"]: r for r in board.rows() if not r["reference"]}
    assert sorted([rows[ids["paper"]]["rank"], rows[ids["paper2"]]["rank"]]) == [1, 2]
    assert rows[ids["paper"]]["group"] == rows[ids["paper2"]]["group"]
    for name in ("model", "host", "prompt", "data"):
        assert rows[ids[name]]["rank"] == 1, name
    assert len({rows[ids[n]]["group"] for n in variants if n != "paper2"} | {rows[ids["data"]]["group"]}) == 5
    assert rows[ids["host"]]["protocol"] == "custom" and rows[ids["model"]]["protocol"] == "custom"
    assert rows[ids["prompt"]]["protocol"] == "paper"  # the paper's judge, an older prompt: same label, own group
    # the best value is marked per group (the Space's "Best in group"): the better of the two paper rows only;
    # a row alone in its group and the reference rows are never marked
    better = min((rows[ids["paper"]], rows[ids["paper2"]]), key=lambda r: r["rank"])
    assert "Average" in better["best"] and rows[ids["model"]]["best"] == ""
    assert [r for r in board.rows() if r["reference"] and r["best"]] == []

    # the static board's rows carry the same groups; reference rows their own, unranked one
    data, _ = board_data(tmp_path / "results")
    static = {r["id"]: r for r in data["rows"]}
    assert static[ids["paper"]]["group"] == static[ids["paper2"]]["group"] != static[ids["host"]]["group"]
    assert "127.0.0.1:9" in static[ids["host"]]["group_label"] and "127.0.0.1:9" in static[ids["host"]]["judge"]
    refs = [r for r in data["rows"] if r["reference"]]
    assert refs and {r["group"] for r in refs} == {"reference"}
    json.dumps(data, allow_nan=False)
