"""The built leaderboard page in a real headless Chromium (selenium + the system chromedriver, no downloads)."""
from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from _browser_helpers import SKIP_WITHOUT_BROWSER, chromium_driver
from _leaderboard_helpers import fake_scorer, make_header, make_manifest, make_rows, write_submission_dir
from eval.leaderboard.build import build_site
from eval.leaderboard.serve import make_app, start_server
from eval.leaderboard.store import LocalStore, add_submission

SCREENSHOT_COPY = Path("/tmp/leaderboard.png")

pytestmark = pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    manifest = make_manifest()
    store = LocalStore(root / "results")
    ids = {}
    runs = [("single", "ft_audio", "Qwen/Qwen2-Audio-7B-Instruct", 4),
            ("single", "ft_llm", "nvidia/audio-flamingo-3-hf", 3),
            ("sequential", "ft_audio", "Qwen/Qwen2-Audio-7B-Instruct", 5)]
    for n, (mode, method, model, wrong_every) in enumerate(runs):
        sub = write_submission_dir(root / f"sub{n}", make_header(manifest, mode, method, model),
                                   make_rows(manifest, mode, wrong_every=wrong_every))
        outcome = add_submission(sub, manifest, store, judge="offline", scorer=fake_scorer,
                                 added="2026-11-26T13:00:00Z")
        ids[(mode, method)] = outcome.submission_id
    site_dir = build_site(root / "results", root / "site")
    server = start_server(make_app(site_dir))
    yield {"url": f"{server.url}/index.html", "ids": ids, "root": root}
    server.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser = chromium_driver(tmp_path_factory.mktemp("chromium-profile"), window_size="1760,1300",
                              page_load_timeout=30, browser_logs=True)
    yield browser
    browser.quit()


def _row_ids(driver, table):
    return [tr.get_attribute("data-id") for tr in driver.find_elements("css selector", f"#table-{table} tbody tr.row")]


def _column_values(driver, table, key):
    """Displayed numbers of column `key` in row order (None for '–')."""
    keys = [th.get_attribute("data-key") for th in driver.find_elements("css selector", f"#table-{table} th[data-key]")]
    # the header has two rows; data cells follow the left-to-right order of the data-key headers in LAYOUT order
    order = driver.execute_script(
        "return Array.from(document.querySelectorAll('#table-%s tbody tr.row')).map(function (tr) {"
        "  return Array.from(tr.children).map(function (td) { return td.textContent; }); });" % table)
    layout = driver.execute_script(
        "var t = document.querySelector('#table-%s'); var top = t.tHead.rows[0], bottom = t.tHead.rows[1];"
        "var keys = [], j = 0; Array.from(top.cells).forEach(function (c) {"
        "  if (c.dataset.key) { keys.push(c.dataset.key); } else { for (var i = 0; i < c.colSpan; i++) {"
        "  keys.push(bottom.cells[j++].dataset.key); } } }); return keys;" % table)
    assert set(layout) == set(keys)
    index = layout.index(key)
    return [None if cells[index] == "\u2013" else float(cells[index]) for cells in order]


def _severe_logs(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_board_in_headless_chromium(site, driver):
    from selenium.webdriver.support.ui import Select

    driver.get(site["url"])
    assert driver.title.startswith("SAKE leaderboard")
    assert _severe_logs(driver) == []

    # Expected rows: the three submissions plus the paper's 24 single and 24 sequential reference rows.
    single, sequential = _row_ids(driver, "single"), _row_ids(driver, "sequential")
    assert len(single) == 2 + 24 and len(sequential) == 1 + 24
    assert {site["ids"][("single", "ft_audio")], site["ids"][("single", "ft_llm")]} <= set(single)
    assert site["ids"][("sequential", "ft_audio")] in sequential
    ref_rows = driver.find_elements("css selector", "#table-single tbody tr.ref")
    assert len(ref_rows) == 24 and "paper" in ref_rows[0].text
    # The reference rows are marked, in a block of their own after the scored rows, and never marked best
    # (issue 25); each ranking group starts with a line naming it.
    assert all(tr.find_element("css selector", ".badge").text == "reference" for tr in ref_rows)
    assert driver.find_elements("css selector", "#table-single tbody tr.ref td.best") == []
    heads = [tr.text for tr in driver.find_elements("css selector", "#table-single tbody tr.group")]
    assert heads[0].startswith("Ranked together: offline · data ") and heads[-1].startswith("Reported in the paper")
    assert len(heads) == 2
    assert driver.find_elements("css selector", "#table-single tbody tr.row:not(.ref) td.best")  # best of the group
    ft_llm = site["ids"][("single", "ft_llm")]
    link = driver.find_element("css selector", f"#table-single tr[data-id='{ft_llm}'] a[title='submission metadata']")
    assert link.get_attribute("href").endswith(f"submissions/{ft_llm}.json")
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as response:
        assert json.loads(response.read())["metadata"]["submitter"] == "Test Lab"

    # Sorting: clicking a header reorders rows by that column (descending, then ascending), within each judging
    # protocol: the offline-judged submissions always follow the paper-protocol rows, whatever their values.
    def protocols():
        return [tr.get_attribute("data-protocol") for tr in
                driver.find_elements("css selector", "#table-single tbody tr.row")]

    def by_protocol(values):
        groups = {}
        for protocol, v in zip(protocols(), values):
            groups.setdefault(protocol, []).append(v)
        return groups

    assert protocols() == ["offline"] * 2 + ["paper"] * 24
    before = _row_ids(driver, "single")
    driver.find_element("css selector", "#table-single th[data-key='locality_text']").click()
    after = _row_ids(driver, "single")
    assert after != before and protocols() == ["offline"] * 2 + ["paper"] * 24
    for values in by_protocol(_column_values(driver, "single", "locality_text")).values():
        present = [v for v in values if v is not None]
        assert present == sorted(present, reverse=True) and values[: len(present)] == present
    driver.find_element("css selector", "#table-single th[data-key='locality_text']").click()
    for values in by_protocol(_column_values(driver, "single", "locality_text")).values():
        values = [v for v in values if v is not None]
        assert values == sorted(values)
    driver.find_element("css selector", "#table-single th[data-key='model']").click()
    names = [tr.find_elements("css selector", "td")[0].text for tr in
             driver.find_elements("css selector", "#table-single tbody tr.row")]
    assert len(set(names)) == 5
    for group in by_protocol(names).values():
        assert driver.execute_script(
            "var n = arguments[0]; for (var i = 1; i < n.length; i++) { if (n[i - 1].localeCompare(n[i]) > 0) "
            "{ return false; } } return true;", group)

    # Filters hide rows.
    Select(driver.find_element("id", "filter-method")).select_by_value("ft_llm")
    rows = driver.find_elements("css selector", "#table-single tbody tr.row")
    assert len(rows) == 1 + 3 and {r.get_attribute("data-method") for r in rows} == {"ft_llm"}
    Select(driver.find_element("id", "filter-method")).select_by_value("")
    driver.find_element("id", "show-reference").click()
    assert set(_row_ids(driver, "single")) == {site["ids"][("single", "ft_audio")], site["ids"][("single", "ft_llm")]}
    driver.find_element("id", "show-reference").click()
    Select(driver.find_element("id", "filter-model")).select_by_value("Qwen/Qwen2-Audio-7B-Instruct")
    rows = driver.find_elements("css selector", "#table-single tbody tr.row")
    assert len(rows) == 1 + 8 and {r.get_attribute("data-model") for r in rows} == {"Qwen/Qwen2-Audio-7B-Instruct"}

    # Portability spread over knowledge categories, computed in the page, equals paper Table 3 (Qwen, FT (Audio)).
    ids = _row_ids(driver, "single")
    paper_row = ids.index("paper:Qwen/Qwen2-Audio-7B-Instruct:ft_audio:single")
    assert _column_values(driver, "single", "port_cat_std")[paper_row] == 17.09
    assert _column_values(driver, "single", "port_cat_range")[paper_row] == 62.27

    # Per-attribute view: gender has no audio-locality type 2.
    Select(driver.find_element("id", "view-attribute")).select_by_value("gender")
    assert set(_column_values(driver, "single", "locality_audio_type2")) == {None}
    Select(driver.find_element("id", "view-attribute")).select_by_value("ALL")

    # Gap chart: one line per visible sequential row (the submission and the paper's 8 Qwen rows).
    lines = driver.find_elements("css selector", "#gap-chart polyline.gap-line")
    assert len(lines) == len(_row_ids(driver, "sequential")) == 1 + 8
    assert len(lines[0].get_attribute("points").split()) == 6
    Select(driver.find_element("id", "chart-metric")).select_by_value("portability")
    assert len(driver.find_elements("css selector", "#gap-chart polyline.gap-line")) == 9
    assert _severe_logs(driver) == []

    # Screenshot of the whole page (Qwen filter on).
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1760, min(int(height) + 140, 6000))
    shot = site["root"] / "leaderboard.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    try:
        shutil.copyfile(shot, SCREENSHOT_COPY)
    except OSError:
        pass
    print(f"leaderboard screenshot: {shot} (copy: {SCREENSHOT_COPY})")


def test_empty_board_renders_without_errors(tmp_path, driver):
    (tmp_path / "results").mkdir()
    site_dir = build_site(tmp_path / "results", tmp_path / "site", include_reference=False)
    server = start_server(make_app(site_dir))
    try:
        driver.get(f"{server.url}/")
        assert _row_ids(driver, "single") == [] and _row_ids(driver, "sequential") == []
        assert "No rows match" in driver.find_element("id", "table-single").text
        assert "no sequential rows" in driver.find_element("id", "gap-chart").text
        assert _severe_logs(driver) == []
    finally:
        server.stop()
