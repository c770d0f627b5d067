"""The leaderboard Space (Gradio app + per-submission pages) in a real headless Chromium: a bad zip's error on the
page, a good zip queued, scored by the queue, then its row in the table and its item page."""
from __future__ import annotations

import zipfile
import urllib.error
import urllib.request

import pytest

from _browser_helpers import SKIP_WITHOUT_BROWSER, chromium_driver
from _leaderboard_helpers import make_header, make_manifest, make_rows, write_submission_zip


pytestmark = pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    from eval.leaderboard.serve import start_server
    from eval.leaderboard.space import Board, SpaceConfig, create_app

    root = tmp_path_factory.mktemp("space")
    manifest = make_manifest()
    config = SpaceConfig(results_dir=str(root / "results"), queue_dir=str(root / "queue"), judge="offline",
                         queue_interval_s=0)
    board = Board(config, manifest=manifest)
    server = start_server(create_app(board))
    header = make_header(manifest, model="Qwen/Qwen2-Audio-7B-Instruct", method="ft_llm")
    good = write_submission_zip(root / "good.zip", header, make_rows(manifest, wrong_every=3),
                                metadata={"submitter": "Browser Lab $$\\Huge{X}$$", "license": "mit",
                                          "model_link": "https://huggingface.co/Qwen/Qwen2-Audio-7B-Instruct"})
    bad = write_submission_zip(root / "bad.zip", header, make_rows(manifest)[:-1])
    yield {"url": server.url, "board": board, "good": good, "bad": bad, "root": root}
    server.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser = chromium_driver(tmp_path_factory.mktemp("chromium-profile"), window_size="1600,1200",
                              page_load_timeout=60)
    yield browser
    browser.quit()


def _wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _upload(driver, url, path):
    """Open the Space, go to the Submit tab, upload ``path``, press the button; return the answer text."""
    driver.get(url + "/")
    tab = _wait(driver, lambda d: next((b for b in d.find_elements("css selector", "button[role=tab]")
                                        if b.text.strip() == "Submit"), None))
    tab.click()
    file_input = _wait(driver, lambda d: d.find_element("css selector", "#submission-file input[type=file]"))
    file_input.send_keys(str(path))
    _wait(driver, lambda d: path.stem in d.find_element("id", "submission-file").text)  # name shown on the page
    driver.find_element("id", "submit-button").click()
    # the answer is plain text in a text box (never rendered as Markdown or HTML)
    return _wait(driver, lambda d: (d.find_element("css selector", "#submit-result textarea").get_attribute("value")
                                    .strip() or None))


def test_submit_queue_table_and_item_page(space, driver):
    url, board = space["url"], space["board"]
    # A bad archive: the validator's problem shows on the page, nothing is queued.
    answer = _upload(driver, url, space["bad"])
    assert "Rejected" in answer and "expected item ids missing" in answer
    assert not (space["root"] / "queue" / "pending").exists() or not any((space["root"] / "queue" / "pending").iterdir())

    # A good archive: queued, then scored by the queue (the Space's worker runs exactly this).
    answer = _upload(driver, url, space["good"])
    assert "Queued" in answer
    outcomes = board.run_queue()
    assert len(outcomes) == 1 and outcomes[0][1].startswith("added ")
    sid = outcomes[0][1].split()[1]

    # Its row in the table: filter the protocol to "offline" (Gradio's dropdown), the paper rows disappear and the
    # submission stays, ranked 1 among offline rows whatever the paper rows score; its link opens the item page.
    from selenium.webdriver.common.keys import Keys

    driver.get(url + "/")
    _wait(driver, lambda d: "paper (reported)" in d.find_element("id", "board-table").get_attribute("textContent"))
    box = driver.find_element("css selector", "#filter-protocol input")
    box.click()
    box.send_keys("offline")
    box.send_keys(Keys.ENTER)
    body_rows = "return Array.from(document.querySelectorAll('#board-table .virtual-body [role=row]')).map(" \
                "function (r) { return Array.from(r.querySelectorAll('[role=gridcell]')).map(" \
                "function (c) { return c.textContent.trim(); }); })"  # the rows Gradio's table shows
    rows = _wait(driver, lambda d: (lambda rs: rs if rs and all(r[5] == "offline" for r in rs) else None)(
        d.execute_script(body_rows)))
    assert len(rows) == 1 and {tuple(r) for r in rows} == {("1", "Qwen/Qwen2-Audio-7B-Instruct", "Qwen2-Audio", "FT (LLM)", "single",
                                         "offline", "Browser Lab $$\\Huge{X}$$ · items") + tuple(rows[0][7:])}
    # a submitter's text is text: no LaTeX (nor Markdown) is rendered from it
    assert not driver.find_elements("css selector", "#board-table .katex")
    from eval.score import score_predictions

    (space["root"] / "p.jsonl").write_bytes(zipfile.ZipFile(space["good"]).read("predictions.jsonl"))
    expected = score_predictions(str(space["root"] / "p.jsonl"), judge="offline")["metrics"]["overall"]
    assert [float(v) for v in rows[0][7:12]] == [round(expected[k], 2) for k in (
        "reliability", "generality", "locality_audio", "locality_text", "portability")]
    assert rows[0][-4] == "57"  # Items, then Judge, Ranked with and Best in group (issue 25)
    assert rows[0][-3].startswith("offline") and rows[0][-2].startswith("offline · data ") and rows[0][-1] == ""
    link = next(a for a in driver.find_elements("css selector", "#board-table .virtual-body a")
                if f"/submission/{sid}" in (a.get_attribute("href") or ""))

    # The item page: every item with question, outputs, verdict and deciding stage; the failed-items view.
    driver.get(link.get_attribute("href"))
    assert driver.find_element("id", "protocol").text == "offline"
    rows = driver.find_elements("css selector", "#items tbody tr")
    assert len(rows) == 57
    failed = driver.find_elements("css selector", "#items tbody tr.fail")
    assert 0 < len(failed) < len(rows)
    first = failed[0].find_elements("tag name", "td")
    assert first[3].text.startswith("What emotion?") and first[7].text == "fail" and first[8].text in (
        "exact", "choice", "empty", "undecided")
    driver.find_element("id", "failed-link").click()
    assert len(driver.find_elements("css selector", "#items tbody tr")) == len(failed)


def test_space_headers_and_unknown_pages(space):
    response = urllib.request.urlopen(space["url"] + "/")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors" in response.headers["content-security-policy"]
    for path in ("/submission/0123456789abcdef0123", "/submission/..%2F..%2Fetc", "/submission/%00"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(space["url"] + path)
        assert info.value.code == 404
