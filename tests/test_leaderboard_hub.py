"""The leaderboard Space keeps every submission in Hub dataset repos (a requests repo and a results repo), tested
against a local stand-in for the Hub API; a restarted Space (a new Board on fresh disk) finds what was pending and
scores it. Local mode runs from the published folder with no Hub (issue 26, item 5)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from _hub_standin import HubDown, StandInHub
from _space_helpers import free_port, space_env, start_space, wait_for
from _leaderboard_helpers import make_header, make_manifest, make_rows, write_submission_zip
from eval import publish
from eval.leaderboard.space import Board, SpaceConfig
from eval.leaderboard.submission_queue import HubQueue

RESULTS, REQUESTS = "acme/board-results", "acme/board-requests"


@pytest.fixture
def hub(tmp_path):
    standin = StandInHub(tmp_path / "hub")
    standin.create_repo(RESULTS, repo_type="dataset")
    standin.create_repo(REQUESTS, repo_type="dataset")
    return standin


def _board(hub, disk: Path, manifest) -> Board:
    """A Space process: its own (fresh) local disk, the repos on the Hub."""
    config = SpaceConfig(results_dir=str(disk / "results"), queue_dir=str(disk / "queue"), results_repo=RESULTS,
                         requests_repo=REQUESTS, judge="offline", queue_interval_s=0,
                         upload_dir=str(disk.parent / "uploads"))
    return Board(config, manifest=manifest, hub_api=hub)


def _zip(tmp_path: Path, manifest, name: str, method: str = "lora", wrong_every: int = 3) -> Path:
    """A submission archive in the Space's upload folder (the only place a Space reads submissions from)."""
    header = dict(make_header(manifest, method=method), method_display_name="LoRA", method_display_order=9.5)
    (tmp_path / "uploads").mkdir(exist_ok=True)
    return write_submission_zip(tmp_path / "uploads" / name, header, make_rows(manifest, wrong_every=wrong_every))


def _records(hub) -> dict[str, dict]:
    files = hub.files(REQUESTS)
    return {json.loads(data)["name"]: json.loads(data) for path, data in files.items() if path.endswith(".json")}


def test_pending_submissions_survive_a_restart(hub, tmp_path):
    manifest = make_manifest()
    first = _board(hub, tmp_path / "disk1", manifest)
    upload = _zip(tmp_path, manifest, "a.zip")
    data = upload.read_bytes()
    answer = first.submit(str(upload))
    assert answer.startswith("Queued\n"), answer
    # the archive and its pending record are in the requests repo (one commit), nothing on the Space's disk
    (name, record), = _records(hub).items()
    assert record["status"] == "pending" and record["method"] == "lora"
    assert hub.files(REQUESTS)[f"requests/{name}"] == data
    assert not (tmp_path / "disk1").exists() and not upload.exists()
    assert hub.commits == [("dataset", REQUESTS, f"Queue submission {name}")]

    # The Space restarts on a fresh disk: the new process sees the pending submission and scores it.
    second = _board(hub, tmp_path / "disk2", manifest)
    assert f"Pending (1): {name}" in second.queue_status()
    outcomes = second.run_queue()
    assert len(outcomes) == 1 and outcomes[0][1].startswith("added ")
    sid = outcomes[0][1].split()[1]
    assert _records(hub)[name]["status"] == "finished" and _records(hub)[name]["submission_id"] == sid
    results = hub.files(RESULTS)
    assert {f"results/{sid}.json", f"submissions/{sid}/predictions.jsonl", f"submissions/{sid}/items.jsonl"} <= \
        set(results)

    # A third process shows the row, with the display name the submission's header carried (no editors/ needed).
    third = _board(hub, tmp_path / "disk3", manifest)
    assert "Pending (0): none" in third.queue_status()
    rows = [r for r in third.table(paper_rows=False)]
    assert len(rows) == 1 and rows[0][3] == "LoRA" and rows[0][5] == "offline"
    assert ("LoRA", "lora") in third.choices()["method"]
    assert third.run_queue() == []  # nothing pending: nothing done
    # re-submitting the same content: already on the board, nothing queued
    assert third.submit(str(_zip(tmp_path, manifest, "a.zip"))).startswith("Already on the board\n")
    assert len(_records(hub)) == 1


def test_a_request_scored_but_not_marked_is_finished_after_restart(hub, tmp_path, monkeypatch):
    manifest = make_manifest()
    board = _board(hub, tmp_path / "disk1", manifest)
    board.submit(str(_zip(tmp_path, manifest, "a.zip")))
    original = HubQueue._mark

    def killed(self, record, status, **fields):  # the Space dies right after the result commit
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(HubQueue, "_mark", killed)
    with pytest.raises(KeyboardInterrupt):
        board.run_queue()
    (name, record), = _records(hub).items()
    assert record["status"] == "pending" and any(path.startswith("results/") for path in hub.files(RESULTS))

    monkeypatch.setattr(HubQueue, "_mark", original)
    outcomes = _board(hub, tmp_path / "disk2", manifest).run_queue()
    assert outcomes[0][1].startswith("exists ")
    assert _records(hub)[name]["status"] == "finished" and _records(hub)[name]["outcome"] == "exists"


def test_a_submission_failing_in_scoring_is_rejected_with_its_error_and_the_queue_goes_on(hub, tmp_path):
    manifest = make_manifest()
    board = _board(hub, tmp_path / "disk", manifest)
    board.submit(str(_zip(tmp_path, manifest, "a.zip", method="ft_audio")))
    time.sleep(1.1)  # queue names carry the second: the second one sorts after
    board.submit(str(_zip(tmp_path, manifest, "b.zip", method="grace", wrong_every=5)))
    first = min(_records(hub))

    def scorer(path, judge="offline", **_):
        if json.loads(Path(path).read_text().splitlines()[0])["method"] == "ft_audio":
            raise RuntimeError("judge <unreachable> & 'down'")
        from eval.score import score_predictions

        return score_predictions(path, judge=judge)

    board.config.judge_options = {}
    outcomes = board.requests.run(board.manifest, board.store, judge="offline", scorer=scorer)
    assert [o.split()[0] for _, o in outcomes] == ["rejected", "added"]
    records = _records(hub)
    assert records[first]["status"] == "rejected"
    assert records[first]["error"] == "RuntimeError: judge <unreachable> & 'down'"
    status = board.queue_status()
    assert "Rejected while scoring" in status and first in status
    assert "judge <unreachable> & 'down'" in status  # plain text: shown as written, never rendered


def test_a_hub_outage_is_one_line_on_the_submit_tab_and_nothing_is_lost(hub, tmp_path):
    manifest = make_manifest()
    board = _board(hub, tmp_path / "disk", manifest)
    hub.down = True
    answer = board.submit(str(_zip(tmp_path, manifest, "a.zip")))
    assert answer.startswith("Not queued\n") and len(answer.splitlines()) == 2 and "HubDown" in answer
    with pytest.raises(HubDown):
        board.run_queue()  # the worker logs it and retries on its next run
    hub.down = False
    assert _records(hub) == {}


def test_publish_wires_both_repos(tmp_path, monkeypatch):
    import huggingface_hub

    hub = StandInHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    hub.upload_folder = lambda **kwargs: None  # the Space upload itself is test_publish's
    assert publish.main(["leaderboard", "acme/board", "--private-results"]) == 0
    assert hub.repo("acme/board-results", "dataset").is_dir() and hub.repo("acme/board-requests", "dataset").is_dir()
    config = json.loads(publish.leaderboard_files("acme/board")["leaderboard.json"])
    assert (config["results_repo"], config["requests_repo"]) == ("acme/board-results", "acme/board-requests")


def test_local_mode_runs_from_the_dry_run_folder_without_hub(tmp_path):
    folder = publish.publish_leaderboard("acme/board", dry_run=tmp_path / "board")
    assert json.loads((folder / "leaderboard.json").read_text())["results_repo"] == "acme/board-results"
    port = free_port()
    process = start_space(folder, port, space_env(SAKE_QUEUE_INTERVAL="0.5"), "--local")
    log = tmp_path / f"space-{port}.log"
    try:
        wait_for(f"http://127.0.0.1:{port}/", process, log)
        time.sleep(2)  # a few worker runs on the empty queue
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "local mode" in text and "manifest none" in text, text[-3000:]
    assert (folder / "results").is_dir()


def test_local_mode_config_drops_the_repos_and_a_hub_manifest(tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("SAKE_")]:
        monkeypatch.delenv(name)
    (tmp_path / "leaderboard.json").write_text(json.dumps({"results_repo": RESULTS, "requests_repo": REQUESTS,
                                                           "manifest": "sake/sake", "judge": "offline"}))
    hub_config = SpaceConfig.from_env(tmp_path / "leaderboard.json")
    assert (hub_config.results_repo, hub_config.requests_repo, hub_config.local) == (RESULTS, REQUESTS, False)
    config = SpaceConfig.from_env(tmp_path / "leaderboard.json", local=True)
    assert (config.results_repo, config.requests_repo, config.manifest, config.local) == (None, None, None, True)
    monkeypatch.setenv("SAKE_LOCAL", "1")
    monkeypatch.setenv("SAKE_MANIFEST", str(tmp_path / "m.json"))
    assert SpaceConfig.from_env(tmp_path / "leaderboard.json").manifest == str(tmp_path / "m.json")

    board = Board(dataclasses.replace(config, results_dir=str(tmp_path / "results"),
                                      queue_dir=str(tmp_path / "queue"), upload_dir=str(tmp_path / "uploads")))
    manifest = make_manifest()
    answer = board.submit(str(_zip(tmp_path, manifest, "a.zip")))
    assert answer.startswith("Not checked\n") and "SAKE_MANIFEST" in answer and len(answer.splitlines()) == 2
    assert board.run_queue() == [] and "Pending (0): none" in board.queue_status()
