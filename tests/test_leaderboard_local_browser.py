"""The leaderboard Space started from its dry-run folder in local mode (`python app.py --local`, no Hub, the
toolkit's editors/ unimportable), driven in a real headless Chromium: a submission of a method beyond the paper is
queued, scored by the Space's worker and shown by the display name its predictions header carries; a rejected
archive's problems read as text, not HTML entities (issue 26, items 5 and 6)."""
from __future__ import annotations

import json

import pytest

from _browser_helpers import SKIP_WITHOUT_BROWSER, chromium_driver
from _leaderboard_helpers import make_header, make_manifest, make_rows, write_submission_zip
from _space_helpers import free_port, space_env, start_space, wait_for
from eval import publish

pytestmark = pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("local-space")
    folder = publish.publish_leaderboard("acme/board", judge="offline", dry_run=root / "board")
    manifest = make_manifest()
    (root / "sake_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    port = free_port()
    process = start_space(folder, port, space_env(SAKE_MANIFEST=str(root / "sake_manifest.json"),
                                                  SAKE_QUEUE_INTERVAL="0.5"), "--local")
    url = f"http://127.0.0.1:{port}"
    log = root / f"space-{port}.log"
    try:
        wait_for(url + "/", process, log)
        yield {"url": url, "root": root, "folder": folder, "manifest": manifest, "log": log}
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser = chromium_driver(tmp_path_factory.mktemp("chromium-profile"), window_size="1600,1200",
                              page_load_timeout=60)
    yield browser
    browser.quit()


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _upload(driver, url, path):
    driver.get(url + "/")
    tab = _wait(driver, lambda d: next((b for b in d.find_elements("css selector", "button[role=tab]")
                                        if b.text.strip() == "Submit"), None))
    tab.click()
    _wait(driver, lambda d: d.find_element("css selector", "#submission-file input[type=file]")).send_keys(str(path))
    _wait(driver, lambda d: path.stem in d.find_element("id", "submission-file").text)
    driver.find_element("id", "submit-button").click()
    # the answer is plain text in a text box (never rendered as Markdown or HTML)
    return _wait(driver, lambda d: (d.find_element("css selector", "#submit-result textarea").get_attribute("value")
                                    .strip() or None))


BODY_ROWS = ("return Array.from(document.querySelectorAll('#board-table .virtual-body [role=row]')).map("
             "function (r) { return Array.from(r.querySelectorAll('[role=gridcell]')).map("
             "function (c) { return c.textContent.trim(); }); })")


def test_local_space_scores_a_submission_and_shows_its_display_name(space, driver):
    manifest, root = space["manifest"], space["root"]
    header = dict(make_header(manifest, method="lora"), method_display_name="LoRA", method_display_order=9.5)
    bad = write_submission_zip(root / "bad.zip", header, make_rows(manifest)[:-1])
    answer = _upload(driver, space["url"], bad)
    assert answer.startswith("Rejected") and "expected item ids missing" in answer
    assert "first: 'gender/test/000002/port'" in answer  # quotes as typed (html.escape made them &#x27;)
    assert not any(entity in answer for entity in ("&lt;", "&gt;", "&#x27;", "&quot;", "&amp;"))

    good = write_submission_zip(root / "good.zip", header, make_rows(manifest, wrong_every=3),
                                metadata={"submitter": "Local Lab", "license": "mit",
                                          "model_link": "https://huggingface.co/Qwen/Qwen2-Audio-7B-Instruct"})
    answer = _upload(driver, space["url"], good)
    assert answer.startswith("Queued"), answer
    # the Space's own worker scores it (every 0.5 s) into ./results of the folder
    _wait(driver, lambda d: any((space["folder"] / "results" / "results").glob("*.json")), timeout=120)

    driver.get(space["url"] + "/")
    rows = _wait(driver, lambda d: [r for r in d.execute_script(BODY_ROWS) if len(r) > 6 and r[6] != "paper (reported)"]
                 or None)
    assert len(rows) == 1
    assert rows[0][3] == "LoRA" and rows[0][4] == "single" and rows[0][5] == "offline"
    assert rows[0][6] == "Local Lab · items"
    text = space["log"].read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
