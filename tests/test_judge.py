"""LLM judge through the real `openai` client against a local OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eval.sake_metric.llm_judge import JudgeConfig, JudgeError, LLMJudge, cache_key, parse_verdict
from eval.sake_metric.rows import load_predictions
from eval.sake_metric.scoring import judge_rows
from eval.score import score_predictions
from _metric_helpers import header, row, write_predictions

SECRET = "sk-test-secret-do-not-leak"
REPO = Path(__file__).resolve().parents[1]


class FakeOpenAI:
    """A tiny OpenAI-compatible server: chat completions, files and batches. Stops itself after 60 s."""

    def __init__(self):
        self.requests: list[dict] = []        # chat-completion bodies received (including refused ones)
        self.plan: list[tuple[int, str | None]] = []  # queued (status, content) answers, then `verdict_for`
        self.batches: dict[str, dict] = {}
        self.files: dict[str, str] = {}
        self.batch_creations = 0
        self.retrieve_failures = 0            # answer this many batch retrievals with HTTP 500
        self.auth_headers: list[str] = []
        self.expected_key: str | None = None  # answer 401 to any other bearer token
        self.failing: list[int] = []          # refuse each prompt's first chat request with these statuses in turn
        self.refused_once: set[str] = set()   # prompts already refused once
        self.malformed_marker: str | None = None  # a prompt holding it gets a malformed verdict
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict | str, headers: dict | None = None):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with server.lock:
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                if self.path.endswith("/chat/completions"):
                    body = json.loads(raw)
                    prompt = body["messages"][-1]["content"]
                    with server.lock:
                        server.requests.append(body)
                        n = len(server.requests)
                        if server.expected_key is not None and \
                                self.headers.get("Authorization") != f"Bearer {server.expected_key}":
                            status, content = 401, None
                        elif server.plan:
                            status, content = server.plan.pop(0)
                        elif server.failing and prompt not in server.refused_once:
                            # each item's first request is refused (status codes in turn), its retry answered:
                            # the same for any interleaving of the concurrent workers
                            server.refused_once.add(prompt)
                            status, content = server.failing[n % len(server.failing)], None
                        else:
                            status, content = 200, None
                    if status == 401:  # as real servers do, echo part of the refused key
                        token = self.headers.get("Authorization", "")[7:]
                        self._send(401, {"error": {"message": f"Incorrect API key provided: {token}",
                                                   "type": "invalid_request_error"}})
                        return
                    if status != 200:
                        self._send(status, {"error": {"message": "slow down", "type": "rate_limit"}},
                                   {"retry-after-ms": "5"})
                        return
                    if content is None:
                        content = server.verdict_for(prompt)
                        if server.malformed_marker and server.malformed_marker in prompt:
                            content = "yes"
                    self._send(200, server.completion(body["model"], content))
                elif self.path.endswith("/files"):
                    text = raw.decode("utf-8", "replace")
                    lines = re.findall(r'^\{"custom_id".*$', text, flags=re.MULTILINE)
                    with server.lock:
                        file_id = f"file-{len(server.files)}"
                        server.files[file_id] = "\n".join(line.rstrip("\r") for line in lines)
                    self._send(200, {"id": file_id, "object": "file", "bytes": len(raw), "created_at": 0,
                                     "filename": "in.jsonl", "purpose": "batch", "status": "processed"})
                elif self.path.endswith("/batches"):
                    body = json.loads(raw)
                    with server.lock:
                        server.batch_creations += 1
                        batch_id = f"batch-{server.batch_creations}"
                        server.batches[batch_id] = {"input": body["input_file_id"], "polls": 0}
                    self._send(200, server.batch_object(batch_id, "validating"))
                else:
                    self._send(404, {"error": {"message": "no route"}})

            def do_GET(self):
                match = re.search(r"/batches/([\w-]+)$", self.path)
                if match:
                    with server.lock:
                        if server.retrieve_failures > 0:
                            server.retrieve_failures -= 1
                            self._send(500, {"error": {"message": "boom"}})
                            return
                        batch = server.batches[match.group(1)]
                        batch["polls"] += 1
                        status = "completed" if batch["polls"] >= 2 else "in_progress"
                    self._send(200, server.batch_object(match.group(1), status))
                    return
                match = re.search(r"/files/([\w-]+)/content$", self.path)
                if match:
                    self._send(200, server.files[match.group(1)])
                    return
                self._send(404, {"error": {"message": "no route"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 1
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.watchdog = threading.Timer(60.0, self.httpd.shutdown)
        self.watchdog.daemon = True
        self.watchdog.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def verdict_for(prompt: str) -> str:
        """'yes' when the judged answer mentions 'canine' or 'unchanged', else 'no'."""
        if "Answer after editing:\n" in prompt:
            yes = "unchanged" in prompt.split("Answer after editing:\n", 1)[1].lower()
        else:
            yes = "canine" in prompt.split("Model's answer:\n", 1)[1].lower()
        return json.dumps({"verdict": "yes" if yes else "no"})

    @staticmethod
    def completion(model: str, content: str) -> dict:
        return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}]}

    def batch_object(self, batch_id: str, status: str) -> dict:
        output_id = None
        if status == "completed":
            output_id = f"out-{batch_id}"
            lines = []
            for line in self.files[self.batches[batch_id]["input"]].splitlines():
                request = json.loads(line)
                content = self.verdict_for(request["body"]["messages"][-1]["content"])
                lines.append(json.dumps({"id": "r", "custom_id": request["custom_id"], "response": {
                    "status_code": 200, "body": self.completion(request["body"]["model"], content)}}))
            self.files[output_id] = "\n".join(lines) + "\n"
        return {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                "created_at": 0, "input_file_id": self.batches[batch_id]["input"], "status": status,
                "output_file_id": output_id}

    def close(self):
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fake = FakeOpenAI()
    yield fake
    fake.close()


def make_judge(server: FakeOpenAI, cache: Path, **kw) -> LLMJudge:
    config = dict(model="judge-model-x", base_url=server.base_url, cache_dir=cache, max_workers=2, max_retries=2,
                  timeout=10.0)
    config.update(kw)
    return LLMJudge(JudgeConfig(**config))


def llm_rows() -> list:
    """Rows that no deterministic stage decides (the LLM must)."""
    raw = [
        row("animal/test/000000/rel", "reliability", "A canine is barking here.", reference="dog"),
        row("animal/test/000000/gen1", "generality", "Some kind of bird, maybe.", reference="dog", type=1),
        row("animal/test/000000/loc_audio1", "locality_audio", "Output unchanged, roughly",
            pre_edit="Something else entirely", reference="cow", type=1),
        row("animal/test/000000/port", "portability", "It eats meat mostly", reference="herbivore",
            options=["herbivore", "carnivore"], category="Diet"),
    ]
    return load_predictions(raw)[1]


def test_request_carries_model_seed_prompt_and_schema(server, tmp_path):
    judge = make_judge(server, tmp_path / "cache")
    verdicts = judge_rows(llm_rows(), judge)
    assert [v.stage for v in verdicts] == ["llm"] * 4
    assert [v.passed for v in verdicts] == [True, False, True, False]
    assert len(server.requests) == 4 and judge.calls == 4
    bodies = {b["messages"][-1]["content"].split("\n")[0]: b for b in server.requests}
    for body in server.requests:
        assert body["model"] == "judge-model-x"
        assert body["seed"] == 0
        assert body["reasoning_effort"] == "minimal"
        schema = body["response_format"]["json_schema"]
        assert body["response_format"]["type"] == "json_schema" and schema["strict"] is True
        assert schema["schema"]["properties"]["verdict"]["enum"] == ["yes", "no"]
    prompts = [b["messages"][-1]["content"] for b in server.requests]
    assert any("A canine is barking here." in p and "dog" in p for p in prompts)
    assert any("Answer before editing:\nSomething else entirely" in p for p in prompts)
    assert len(bodies) == 2  # one correctness and one consistency template


def test_second_run_makes_zero_calls(server, tmp_path):
    first = judge_rows(llm_rows(), make_judge(server, tmp_path / "cache"))
    sent = len(server.requests)
    judge = make_judge(server, tmp_path / "cache")
    second = judge_rows(llm_rows(), judge)
    assert len(server.requests) == sent and judge.calls == 0 and judge.cache_hits == 4
    assert [v.passed for v in first] == [v.passed for v in second]
    # the cache is keyed by everything a verdict depends on: another judge model, seed, reasoning effort or
    # endpoint host misses it (a local server's verdicts never answer for the paper's judge)
    assert "127.0.0.1" in server.base_url
    for change in (dict(model="another-model"), dict(seed=1), dict(reasoning_effort="low"),
                   dict(base_url=server.base_url.replace("127.0.0.1", "localhost"))):
        other = make_judge(server, tmp_path / "cache", **change)
        judge_rows(llm_rows()[:1], other)
        assert other.calls == 1 and other.cache_hits == 0, change
    again = make_judge(server, tmp_path / "cache")
    judge_rows(llm_rows(), again)
    assert again.calls == 0 and again.cache_hits == 4


@pytest.mark.parametrize("status", [429, 503])
def test_429_or_5xx_then_200_succeeds(server, tmp_path, status):
    server.plan = [(status, None), (status, None)]
    judge = make_judge(server, tmp_path / "cache", max_workers=1)
    verdicts = judge_rows(llm_rows()[:1], judge)
    assert verdicts[0].stage == "llm" and verdicts[0].passed is True
    assert len(server.requests) == 3  # two refused by the server, retried by the client


def test_identical_prompts_are_sent_once(server, tmp_path):
    raw = [row(f"animal/test/{i:06d}/rel", "reliability", "A canine is barking here.", reference="dog")
           for i in range(5)]
    judge = make_judge(server, tmp_path / "cache", max_workers=4)
    verdicts = judge_rows(load_predictions(raw)[1], judge)
    assert [v.passed for v in verdicts] == [True] * 5 and len(server.requests) == 1


def test_malformed_verdict_is_retried_then_reported(server, tmp_path):
    # malformed once, then a valid verdict: retried and accepted
    server.plan = [(200, "yes please")]
    judge = make_judge(server, tmp_path / "c1", max_workers=1)
    verdicts = judge_rows(llm_rows()[:1], judge)
    assert verdicts[0].stage == "llm" and verdicts[0].passed is True and judge.calls == 2
    # always malformed (even a 'yes'-looking one): reported as llm_failed, never correct, never cached
    server.plan = [(200, '{"verdict": "YES"}'), (200, "yes"), (200, '{"verdict": "yes", "x": 1}')]
    judge = make_judge(server, tmp_path / "c2", max_workers=1, malformed_retries=2)
    verdicts = judge_rows(llm_rows()[:1], judge)
    assert verdicts[0].stage == "llm_failed" and verdicts[0].passed is False
    assert judge.calls == 3
    assert not list((tmp_path / "c2").rglob("*.json"))


def stage_rows() -> list[dict]:
    return [
        row("animal/test/000001/rel", "reliability", "dog", reference="dog"),                       # exact
        row("animal/test/000001/gen1", "generality", "", reference="dog", type=1),                   # empty
        row("animal/test/000001/gen2", "generality", "(b)", reference="cat", type=2),                # choice could
        row("animal/test/000001/gen3", "generality", "A canine, I think", reference="dog", type=3),  # llm
    ]


def test_paper_protocol_sends_a_choice_decidable_item_to_the_llm(server, tmp_path, caplog):
    path = write_predictions(tmp_path / "p.jsonl", header(), stage_rows())
    caplog.set_level(logging.DEBUG)
    results = score_predictions(path, judge="openai", base_url=server.base_url, model="judge-model-x",
                                cache_dir=tmp_path / "cache")
    judge = results["judge"]
    assert judge["protocol"] == "paper"
    assert judge["stage_share"] == {"empty": 0.25, "exact": 0.25, "choice": 0.0, "llm": 0.5, "llm_failed": 0.0,
                                    "undecided": 0.0}
    assert any("Model's answer:\n(b)" in b["messages"][-1]["content"] for b in server.requests)
    assert judge["requests_sent"] == len(server.requests) == 2 and judge["verdict_requests"] == 2
    assert judge["paper_settings"] is False and judge["model"] == "judge-model-x"
    # the fake LLM says "no" to "(b)" where the matcher would say "cat": the protocols can differ
    assert results["metrics"]["overall"]["generality"] == pytest.approx(100 / 3, abs=1e-3)
    # opt-in prefilter: the matcher decides "(b)" before the LLM, recorded as its own protocol
    prefiltered = score_predictions(path, protocol="paper", prefilter="choice", base_url=server.base_url,
                                    model="judge-model-x", cache_dir=tmp_path / "cache")
    assert prefiltered["judge"]["protocol"] == "paper+choice" and prefiltered["judge"]["stage_share"]["choice"] == 0.25
    assert prefiltered["judge"]["requests_sent"] == 0  # the one LLM item is cached from the first pass
    assert prefiltered["metrics"]["overall"]["generality"] == pytest.approx(200 / 3, abs=1e-3)
    offline = score_predictions(path, protocol="offline")
    assert offline["judge"]["protocol"] == "offline" and offline["judge"]["stage_share"]["undecided"] == 0.25
    # the key went to the server as a bearer token but is never logged nor written
    assert any(SECRET in h for h in server.auth_headers)
    assert SECRET not in caplog.text and SECRET not in json.dumps(results)
    assert all(SECRET not in p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


def test_paper_settings_are_the_defaults():
    config = JudgeConfig(cache_dir=None)
    assert (config.model, config.seed, config.reasoning_effort) == ("gpt-5-mini-2025-08-07", 0, "minimal")
    assert config.paper_settings


def flaky_rows() -> list[dict]:
    rows = []
    for i in range(6):
        answer = f"A canine, surely ({i})" if i % 2 else f"Some bird ({i})"
        rows.append(row(f"animal/test/{i:06d}/rel", "reliability", answer, reference="dog"))
        rows.append(row(f"animal/test/{i:06d}/loc_audio1", "locality_audio", f"unchanged {i}" if i % 3 else f"x {i}",
                        pre_edit=f"before {i}", reference="cow", type=1))
    return rows


def test_429_and_500_give_the_same_verdicts_as_a_clean_run(server, tmp_path):
    path = write_predictions(tmp_path / "p.jsonl", header(), flaky_rows())
    common = dict(protocol="paper", base_url=server.base_url, model="judge-model-x", max_workers=3,
                  retry_backoff=0.001)
    clean = score_predictions(path, cache_dir=tmp_path / "clean", **common)
    assert clean["judge"]["requests_sent"] == 12
    server.requests.clear()
    server.failing = [429, 500, 503]  # the first request of every item refused
    flaky = score_predictions(path, cache_dir=tmp_path / "flaky", **common)
    assert flaky["items"] == clean["items"] and flaky["metrics"] == clean["metrics"]
    assert flaky["judge"]["requests_sent"] == len(server.requests) == 24  # retries counted as sent
    assert flaky["judge"]["verdict_requests"] == 12
    # a second pass sends nothing
    server.requests.clear()
    again = score_predictions(path, cache_dir=tmp_path / "flaky", **common)
    assert again["judge"]["requests_sent"] == 0 and not server.requests and again["items"] == clean["items"]


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_cli(args: list[str], capsys, monkeypatch, env_key: str | None = SECRET) -> CliRun:
    """`python -m eval.score ARGS` in this process (fast), with OPENAI_API_KEY set to `env_key` (or unset)."""
    from eval.score import main

    if env_key is None:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    else:
        monkeypatch.setenv("OPENAI_API_KEY", env_key)
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return CliRun(code, captured.out, captured.err)


def one_error_line(proc: CliRun) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_malformed_verdicts_fail_loudly_and_a_rerun_asks_only_for_them(server, tmp_path, capsys, monkeypatch,
                                                                       caplog):
    caplog.set_level(logging.DEBUG)
    rows = flaky_rows()
    rows[4]["post_edit"] = rows[4]["post_edit"] + " BROKEN"   # animal/test/000002/rel
    rows[9]["post_edit"] = rows[9]["post_edit"] + " BROKEN"   # animal/test/000004/loc_audio1
    path = write_predictions(tmp_path / "p.jsonl", header(), rows)
    out, cache = tmp_path / "results.json", tmp_path / "cache"
    server.malformed_marker = "BROKEN"
    cli = ["--judge", "openai", "--base-url", server.base_url, "--model", "judge-model-x", "--cache-dir", str(cache),
           "--retry-backoff", "0.001", "--max-workers", "1", "--out", str(out), "-v", str(path)]
    first = run_cli(cli, capsys, monkeypatch)
    assert first.returncode == 3 and not out.exists()
    error = one_error_line(first)
    assert "2 item(s)" in error and "first: animal/test/000002/rel" in error
    assert len(server.requests) == 10 + 2 * 2  # 10 good items once, 2 bad ones 1 + 1 repeat each
    assert len(list(cache.rglob("*.json"))) == 10  # nothing of the failed items cached
    # allowed failures: results written, the failures listed and counted wrong
    allowed = run_cli(cli + ["--max-failed", "2"], capsys, monkeypatch)
    assert allowed.returncode == 0, allowed.stderr
    judge = json.loads(out.read_text())["judge"]
    assert judge["n_failed"] == 2 and judge["failed_items"] == ["animal/test/000002/rel",
                                                                "animal/test/000004/loc_audio1"]
    assert judge["requests_sent"] == 4 and judge["cache_hits"] == 10  # only the two failed items asked again
    # the server recovers: a rerun asks for the failed items only, once each
    server.malformed_marker = None
    server.requests.clear()
    fixed = run_cli(cli, capsys, monkeypatch)
    assert fixed.returncode == 0 and len(server.requests) == 2
    assert json.loads(out.read_text())["judge"]["n_failed"] == 0
    # the key is in no file and no log
    for proc in (first, allowed, fixed):
        assert SECRET not in proc.stdout + proc.stderr
    assert "HTTP Request: POST" in caplog.text and SECRET not in caplog.text  # debug logs of openai/httpx too
    assert all(SECRET.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_a_server_ignoring_the_schema_stops_the_run_after_ten_malformed_verdicts(server, tmp_path, capsys,
                                                                                 monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    rows = [row(f"animal/test/{i:06d}/rel", "reliability", f"BROKEN answer {i}", reference="dog") for i in range(70)]
    path = write_predictions(tmp_path / "p.jsonl", header(), rows)
    server.malformed_marker = "BROKEN"  # every verdict malformed: 70 prompts x 3 attempts = 210 requests before
    cli = ["--judge", "openai", "--base-url", server.base_url, "--model", "judge-model-x", "--cache-dir",
           str(tmp_path / "cache"), "--max-workers", "1", "--out", str(tmp_path / "r.json"), str(path)]
    proc = run_cli(cli, capsys, monkeypatch)
    assert proc.returncode == 3 and "10 malformed verdicts in a row" in one_error_line(proc)
    assert len(server.requests) == 10  # 5 prompts, each asked once more
    warnings = [r for r in caplog.records if r.name.startswith("eval") and r.levelno >= logging.WARNING]
    assert warnings == [] and "malformed" not in proc.stderr.replace(one_error_line(proc), "")
    assert not (tmp_path / "r.json").exists() and not list((tmp_path / "cache").rglob("*.json"))
    # concurrent workers stop too: only the requests already in flight are answered after the tenth
    server.requests.clear()
    judge = make_judge(server, tmp_path / "c4", max_workers=4)
    with pytest.raises(JudgeError, match="malformed verdicts in a row"):
        judge.judge([f"Model's answer:\nBROKEN {i}" for i in range(70)])
    assert 10 <= len(server.requests) <= 13


def test_malformed_verdicts_stop_the_run_only_when_consecutive(server, tmp_path):
    bad = (200, "not json")
    server.plan = [bad] * 9 + [(200, json.dumps({"verdict": "yes"}))] + [bad] * 9  # 9 in a row at most
    judge = make_judge(server, tmp_path / "c", max_workers=1)
    verdicts = judge.judge([f"Model's answer:\nA canine {i}" for i in range(10)])
    assert len(server.requests) == 20 and judge.malformed == 18
    assert verdicts == [None] * 4 + [True] + [None] * 4 + [True]  # each prompt asked twice at most
    judge = make_judge(server, tmp_path / "c2", max_workers=1, max_consecutive_malformed=3)
    server.plan = [bad] * 3
    with pytest.raises(JudgeError, match="gave 3 malformed verdicts in a row"):
        judge.judge(["Model's answer:\nA canine"] * 1 + ["Model's answer:\nA dog"])


def test_one_line_errors_for_key_server_and_retries(server, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    path = write_predictions(tmp_path / "p.jsonl", header(), flaky_rows()[:2])
    base = ["--judge", "openai", "--model", "judge-model-x", "--cache-dir", str(tmp_path / "cache"),
            "--retry-backoff", "0.001", "--max-retries", "2", str(path)]
    server.expected_key = "sk-the-right-one"
    cases = {
        "OPENAI_API_KEY": run_cli(base, capsys, monkeypatch, env_key=None),                          # no key
        "rejected the API key": run_cli(base + ["--base-url", server.base_url], capsys, monkeypatch),  # wrong key
        "cannot reach the judge server": run_cli(base + ["--base-url", "http://127.0.0.1:9/v1"], capsys,
                                                 monkeypatch),
    }
    server.expected_key = None
    server.plan = [(500, None)] * 10
    cases["retries exhausted after 3 attempt(s)"] = run_cli(base + ["--base-url", server.base_url], capsys,
                                                            monkeypatch)
    for expected, proc in cases.items():
        assert proc.returncode == 3 and expected in one_error_line(proc), (expected, proc.stderr)
        assert SECRET not in proc.stderr + proc.stdout
    assert any(SECRET in h for h in server.auth_headers)  # the wrong key was sent, and echoed by the server
    assert SECRET not in caplog.text
    assert not list(tmp_path.glob("*.results.json"))


def test_batch_mode_submits_polls_collects_and_resumes(server, tmp_path):
    state = tmp_path / "batch_state.json"
    server.retrieve_failures = 1  # the first poll fails: the run is interrupted after submitting
    judge = make_judge(server, tmp_path / "cache", batch=True, batch_state=state, poll_interval=0.01, max_retries=0)
    with pytest.raises(Exception):
        judge_rows(llm_rows(), judge)
    assert server.batch_creations == 1 and json.loads(state.read_text())["batch_id"] == "batch-1"
    # rerun: resumes polling the same batch instead of submitting again
    judge = make_judge(server, tmp_path / "cache", batch=True, batch_state=state, poll_interval=0.01)
    verdicts = judge_rows(llm_rows(), judge)
    assert server.batch_creations == 1
    assert [v.passed for v in verdicts] == [True, False, True, False]
    assert [v.stage for v in verdicts] == ["llm"] * 4
    assert not server.requests  # no online calls in batch mode
    # collected verdicts are cached: a third run makes no request at all
    judge = make_judge(server, tmp_path / "cache", batch=True, batch_state=state, poll_interval=0.01)
    judge_rows(llm_rows(), judge)
    assert judge.calls == 0 and server.batch_creations == 1


def test_missing_api_key_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = LLMJudge(JudgeConfig(cache_dir=tmp_path))
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        judge_rows(llm_rows()[:1], judge)


def test_parse_verdict_and_cache_key():
    assert parse_verdict('{"verdict": "yes"}') is True
    assert parse_verdict('{"verdict": "no"}') is False
    for bad in (None, "", "yes", '{"verdict": "Yes"}', '{"verdict": true}', '{"answer": "yes"}', "[1]"):
        assert parse_verdict(bad) is None
    assert cache_key("m", "p") == cache_key("m", "p") != cache_key("m2", "p") != cache_key("m", "p2")


def test_metric_card_documents_the_prompts_verbatim():
    import yaml

    from eval.sake_metric.llm_judge import CONSISTENCY_PROMPT, CORRECTNESS_PROMPT, SYSTEM_PROMPT

    card = (Path(__file__).resolve().parents[1] / "eval" / "sake_metric" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["title"] == "SAKE" and "metric" in front["tags"]
    for prompt in (SYSTEM_PROMPT, CORRECTNESS_PROMPT, CONSISTENCY_PROMPT):
        assert prompt in card


def test_metric_compute_uses_the_paper_protocol_with_a_judge(server, tmp_path):
    from eval.sake_metric.sake_metric import SakeMetric

    rows = stage_rows()
    columns = ("item_id", "dimension", "type", "attribute", "pre_edit", "gap", "category", "options")
    inputs = dict(predictions=[r["post_edit"] for r in rows], references=[r["reference"] for r in rows],
                  questions=[r["question"] for r in rows], **{c: [r[c] for r in rows] for c in columns})
    metric = SakeMetric()
    paper = metric.compute(**inputs, judge="openai", judge_model="judge-model-x", base_url=server.base_url,
                           cache_dir=str(tmp_path / "cache"))
    assert paper["judge"]["protocol"] == "paper" and paper["judge"]["stage_counts"]["llm"] == 2
    assert any("Model's answer:\n(b)" in b["messages"][-1]["content"] for b in server.requests)
    prefiltered = metric.compute(**inputs, judge="openai", prefilter="choice", judge_model="judge-model-x",
                                 base_url=server.base_url, cache_dir=str(tmp_path / "cache"))
    assert prefiltered["judge"]["protocol"] == "paper+choice"
    assert metric.compute(**inputs)["judge"]["protocol"] == "offline"
