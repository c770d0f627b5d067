"""The metric Space (`sake publish metric ... --dry-run DIR`) started from its dry-run folder alone under uvicorn on
127.0.0.1, driven in a real headless Chromium: uploading the demo's predictions shows the scores `eval.score`
gives; a cut file gets a one-line answer (issue 26, item 4)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from _browser_helpers import SKIP_WITHOUT_BROWSER, chromium_driver
from eval import publish
from eval.score import score_predictions
from sake.demo import DEFAULT_MODEL

pytestmark = pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="needs Debian's chromium and chromium-driver")

REPO_ID = "acme/sake_metric"


@pytest.fixture(scope="module")
def predictions(demo_dataset, tmp_path_factory) -> Path:
    """A predictions file of the demo: FT-Audio on the reference model, 2 emotion edits (single editing: `gap` is
    empty on every row, the rows evaluate's Gradio-3 widget used to drop)."""
    from sake.api import RunConfig, run

    out = tmp_path_factory.mktemp("demo-run")
    return run(RunConfig(model=str(DEFAULT_MODEL), method="ft_audio", dataset=str(demo_dataset),
                         configs=("emotion",), split="test", limit=2, out=str(out), cache_dir=str(out / "cache"),
                         max_new_tokens=32, progress=False))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(folder: Path, root: Path, command: list[str], **env_changes: str):
    """The published ``folder`` served by ``command`` in its own process on a free port (the folder's files only:
    no PYTHONPATH, no SAKE_* but ``env_changes``); yields its URL once ``/`` answers 200."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SAKE_")}
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_EVALUATE_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONDONTWRITEBYTECODE="1",
               PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", **env_changes)
    log_path = root / "server.log"
    log = open(log_path, "wb")
    server = subprocess.Popen([arg.replace("{port}", str(port)) for arg in command], cwd=folder, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the metric Space did not start: "
                                     + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The dry-run folder served by uvicorn in its own process: the folder's files only (no PYTHONPATH)."""
    root = tmp_path_factory.mktemp("metric-space")
    folder = publish.publish_metric(REPO_ID, root / "sake_metric")
    uvicorn = [sys.executable, "-m", "uvicorn", "app:create_app", "--factory", "--host", "127.0.0.1", "--port",
               "{port}"]
    with _serving(folder, root, uvicorn) as url:
        yield {"url": url, "root": root, "folder": folder}


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser = chromium_driver(tmp_path_factory.mktemp("chromium-profile"), window_size="1400,1100",
                              page_load_timeout=60)
    yield browser
    browser.quit()


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _score(driver, url: str, path: Path) -> str:
    """Open the Space, upload ``path``, press Score; return the summary text once it answers."""
    driver.get(url + "/")
    file_input = _wait(driver, lambda d: d.find_element("css selector", "#predictions input[type=file]"))
    file_input.send_keys(str(path))
    _wait(driver, lambda d: path.stem in d.find_element("id", "predictions").text)  # the name shows on the page
    driver.find_element("id", "score-button").click()
    return _wait(driver, lambda d: d.find_element("id", "summary").text.strip() or None, timeout=120)


def test_uploading_the_demo_predictions_shows_their_scores(space, driver, predictions, tmp_path):
    expected = score_predictions(str(predictions), judge="offline")["metrics"]
    summary = _score(driver, space["url"], predictions)
    assert summary.startswith("Scores") and "sake-reference-qwen2-audio · ft_audio · single" in summary
    assert "protocol offline" in summary and str(DEFAULT_MODEL.parent) not in summary  # a local path: its name
    rows = _wait(driver, lambda d: d.execute_script(
        "return Array.from(document.querySelectorAll('#scores table tbody tr')).map(function (tr) {"
        "  return Array.from(tr.cells).map(function (c) { return c.textContent.trim(); }); })") or None)
    table = {row[0]: row[1:] for row in rows}
    assert set(table) == {"overall", "emotion"}
    keys = ("reliability", "generality", "locality_audio", "locality_text", "portability")
    for scope, block in (("overall", expected["overall"]), ("emotion", expected["per_attribute"]["emotion"])):
        assert table[scope] == ["–" if block[k] is None else f"{block[k]:.2f}" for k in keys], scope
    assert float(table["overall"][0]) == pytest.approx(expected["overall"]["reliability"], abs=0.005)

    # a file cut after its header: one line on the page, no scores
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(predictions.read_bytes().split(b"\n", 1)[0] + b"\n")
    summary = _score(driver, space["url"], cut)
    assert summary.startswith("Not scored")
    assert len(summary.splitlines()) == 2 and "Traceback" not in summary
    assert driver.find_elements("css selector", "#scores table") == []


def test_an_api_call_naming_a_server_file_is_refused(space, predictions, tmp_path):
    """The page mounted under uvicorn (where Gradio skips its own check of named paths and copies a named file into
    its cache) scores only files its upload form received: a call naming the demo's predictions by their server
    path, a FIFO or a system file is refused (403, one line) before Gradio opens it."""
    import json

    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for path in (str(predictions), str(fifo), "/etc/passwd"):
        body = json.dumps({"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, "offline"]}).encode()
        request = urllib.request.Request(space["url"] + "/gradio_api/call/score", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                event = json.loads(response.read())["event_id"]
        except urllib.error.HTTPError as error:  # refused before Gradio copies the file (upload_guard)
            assert error.code == 403 and "not a file uploaded to this Space" in error.read().decode()
            continue
        raise AssertionError(f"a call naming {path} was accepted (event {event})")


def test_the_same_folder_still_loads_with_evaluate(space, predictions):
    """`evaluate.load` of the Space folder scores the same file to the same numbers (the page's path)."""
    script = ("import json, sys; sys.path.insert(0, '.'); import app\n"
              "loaded = app.LoadedMetric('.')\n"
              f"print(json.dumps(app.score_file(loaded, {str(predictions)!r})['metrics']['overall']))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(space["root"] / "modules2"), HF_EVALUATE_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=space["folder"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == json.loads(json.dumps(score_predictions(str(predictions), judge="offline")["metrics"]["overall"]))


def test_python_app_py_runs_the_guarded_app(tmp_path):
    """``python app.py``, what the Space runs, serves the page behind the upload guard: with one upload an hour
    allowed, a second upload from the same address is answered 429."""
    import uuid

    folder = publish.publish_metric(REPO_ID, tmp_path / "sake_metric")
    with _serving(folder, tmp_path, [sys.executable, "app.py"], SAKE_UPLOADS_PER_HOUR="1",
                  GRADIO_TEMP_DIR=str(tmp_path / "uploads")) as url:
        statuses = []
        for _ in range(2):
            boundary = uuid.uuid4().hex
            body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="p.jsonl"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n{}\r\n" f"--{boundary}--\r\n").encode()
            request = urllib.request.Request(url + "/gradio_api/upload", data=body,
                                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
        assert statuses == [200, 429]
