"""The Space's data layer without a browser: protocol labels and ranks, filters, escaping, item pages."""
from __future__ import annotations

from pathlib import Path

import pytest

from _leaderboard_helpers import (METADATA, make_header, make_manifest, make_rows, write_submission_dir,
                                  write_submission_zip)
from eval.leaderboard.space import Board, SpaceConfig, markdown_text, submission_page
from eval.leaderboard.store import LocalStore, add_submission


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    manifest = make_manifest()
    store = LocalStore(root / "results")
    evil = METADATA | {"submitter": "x](javascript:alert(1)) <script>"}
    rows = make_rows(manifest, wrong_every=2)
    rows[0] = dict(rows[0], post_edit="<img src=x onerror=alert(1)>" + "y" * 5000)
    ids = []
    for n, (method, metadata, rs) in enumerate((("ft_llm", METADATA, make_rows(manifest, wrong_every=1000)),
                                                ("wise", evil, rows))):
        # the runner writes the adapter's family; a hand-made header may leave it out
        header = make_header(manifest, method=method, family="qwen2_audio" if method == "ft_llm" else None)
        sub = write_submission_dir(root / f"s{n}", header, rs, metadata)
        ids.append(add_submission(sub, manifest, store, judge="offline").submission_id)
    config = SpaceConfig(results_dir=str(root / "results"), queue_dir=str(root / "queue"), judge="offline",
                         queue_interval_s=0)
    return Board(config, manifest=manifest), ids


def test_offline_rows_rank_only_among_offline_rows(board):
    board, ids = board
    rows = board.rows()
    offline = [r for r in rows if r["protocol"] == "offline"]
    paper_single = [r for r in rows if r["protocol"] == "paper" and r["mode"] == "single"]
    assert [r["rank"] for r in offline] == [1, 2] and offline[0]["average"] >= offline[1]["average"]
    # The paper's reported rows are never ranked (issue 25): no rank number, shown after the scored rows.
    assert [r["rank"] for r in paper_single] == [None] * len(paper_single)
    assert all(r["reference"] for r in paper_single) and len(paper_single) == 24
    # A near-perfect offline row (wrong every 1000th item) still never ranks among paper rows.
    assert offline[0]["average"] > paper_single[-1]["average"]
    assert rows.index(offline[0]) < rows.index(paper_single[0])


def test_table_filters(board):
    board, _ = board
    table = board.table(protocol=["offline"])
    assert len(table) == 2 and {r[5] for r in table} == {"offline"}
    assert {r[3] for r in board.table(method=["wise"], paper_rows=False)} == {"WISE"}  # display name
    assert all(r[2] == "Qwen2-Audio" for r in board.table(family=["Qwen2-Audio"]))
    # the family comes from the header (or a reference row's own field), never guessed from the model id
    assert {r[3] for r in board.table(family=["Qwen2-Audio"], paper_rows=False)} == {"FT (LLM)"}
    assert {r[3] for r in board.table(family=["other"], paper_rows=False)} == {"WISE"}
    assert {r[2] for r in board.table(paper_rows=True) if "paper (reported)" in r[6]} == {
        "Qwen2-Audio", "Audio Flamingo 3", "DeSTA2.5-Audio"}
    assert {r[4] for r in board.table(mode=["sequential"])} == {"sequential"}
    assert not any("paper (reported)" in r[6] for r in board.table(paper_rows=False))
    assert board.choices()["protocol"] == ["paper", "paper+choice", "custom", "custom+choice", "offline"]


def test_submitter_text_is_escaped_in_the_table(board):
    board, ids = board
    cell = next(r[6] for r in board.table(method=["wise"], paper_rows=False))
    assert "](javascript" not in cell and "<script>" not in cell and cell.endswith(f"](/submission/{ids[1]})")
    assert markdown_text("a [b](c)") == "a \\[b\\]\\(c\\)"


def test_item_page_escapes_cuts_and_filters(board):
    board, ids = board
    status, page = submission_page(board, ids[1])
    assert status == 200 and page.count('<tr class="') == 57
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "more characters)" in page and "<script>" not in page
    status, failed = submission_page(board, ids[1], show="failed")
    assert failed.count('<tr class="fail"') == failed.count('<tr class="') > 0
    status, locality = submission_page(board, ids[1], dimension="locality_text")
    assert locality.count('<tr class="') == 6
    assert submission_page(board, "0" * 20)[0] == 404 and submission_page(board, "../etc/passwd")[0] == 404


def test_item_page_reads_rows_as_the_validator_does(tmp_path):
    """Raw U+2028 and U+0085 inside a JSON string and a lone carriage return between tokens are one line to the
    validator and to the item page alike (not three, as ``str.splitlines`` would make them); concurrent visits of
    one submission all get its page, which the board's own store prepares in a worker process."""
    from concurrent.futures import ThreadPoolExecutor

    from _leaderboard_helpers import jsonl_bytes

    manifest = make_manifest()
    header, rows = make_header(manifest, method="ft_llm"), make_rows(manifest)
    rows[1] = dict(rows[1], post_edit="neu\u2028tr\u0085al")
    text = jsonl_bytes(header, rows).decode("utf-8").replace('"gap": null,', '"gap": null,\r', 1)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "predictions.jsonl").write_text(text, encoding="utf-8", newline="")
    (sub / "metadata.json").write_text(__import__("json").dumps(METADATA), encoding="utf-8")
    sid = add_submission(sub, manifest, LocalStore(tmp_path / "results"), judge="offline").submission_id
    board = Board(SpaceConfig(results_dir=str(tmp_path / "results"), queue_dir=str(tmp_path / "queue"),
                              judge="offline", queue_interval_s=0), manifest=manifest)
    try:
        with ThreadPoolExecutor(6) as pool:
            pages = list(pool.map(lambda _: submission_page(board, sid), range(6)))
    finally:
        board.stop_worker()
    assert {status for status, _ in pages} == {200} and len({page for _, page in pages}) == 1
    page = pages[0][1]
    assert page.count('<tr class="') == len(rows) and "neu\u2028tr\u0085al" in page


def test_queue_status_lists_pending_and_rejected(board, tmp_path):
    board, ids = board
    queue = Path(board.config.queue_dir)  # the local queue (LocalQueue)
    (queue / "pending").mkdir(parents=True, exist_ok=True)
    (queue / "rejected").mkdir(parents=True, exist_ok=True)
    (queue / "pending" / "b.zip").write_bytes(b"x")
    (queue / "rejected" / "a.zip.error.txt").write_text("JudgeError: no <key>\n")
    status = board.queue_status()  # plain text (shown in a text box): nothing is escaped, nothing is rendered
    assert "Pending (1): b.zip" in status and "- a.zip: JudgeError: no <key>" in status


def test_reported_rows_are_read_once(board, monkeypatch):
    """Every table refresh builds the rows; the checked-in reported rows are read once per board, not per call."""
    import eval.leaderboard.space as space

    board, _ = board
    calls = []
    real = space.reference_rows
    monkeypatch.setattr(space, "reference_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    board.__dict__.pop("reported_rows", None)
    first = board.rows()
    board.table(protocol=["paper"])
    board.choices()
    assert len(calls) == 1
    assert [r["rank"] for r in board.rows()] == [r["rank"] for r in first]
    assert all("rank" not in r for r in board.reported_rows)  # the cached rows stay unranked


def test_submit_queues_the_zip_atomically(board, tmp_path):
    """A valid upload lands in pending/ whole (same bytes, mode 0644), with no temporary file left beside it."""
    board, _ = board
    (tmp_path / "uploads").mkdir()
    fresh = Board(SpaceConfig(results_dir=board.config.results_dir, queue_dir=str(tmp_path / "queue"),
                              judge="offline", queue_interval_s=0, upload_dir=str(tmp_path / "uploads")),
                  manifest=board.manifest)
    upload = write_submission_zip(tmp_path / "uploads" / "sub.zip", make_header(fresh.manifest, method="i_ike"),
                                  make_rows(fresh.manifest))
    data = upload.read_bytes()
    assert fresh.submit(str(upload)).startswith("Queued\n")
    queued = list((tmp_path / "queue" / "pending").iterdir())
    assert len(queued) == 1 and queued[0].name.endswith(".zip") and not queued[0].name.startswith(".")
    assert queued[0].read_bytes() == data and queued[0].stat().st_mode & 0o777 == 0o644
    assert not upload.exists()  # the upload itself is not kept on the Space's disk
