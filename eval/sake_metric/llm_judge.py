"""LLM judge: strict yes/no verdicts from an OpenAI-compatible chat-completions endpoint.

- Official `openai` client; default model `gpt-5-mini-2025-08-07`, `seed=0`, `reasoning_effort="minimal"`
  (the paper's App. E settings, `PAPER_SETTINGS`); `base_url` and model are options, so any OpenAI-compatible
  server works.
- Structured output: `response_format` is a strict JSON schema `{"verdict": "yes" | "no"}`. Anything else
  (not JSON, other keys, other values, a refusal) is malformed: the request is repeated `malformed_retries`
  times (once by default), then the item is reported as failed (`None`), never as correct, and never cached.
  `max_consecutive_malformed` (10) malformed verdicts in a row -- a server that ignores the schema -- stop the
  run with one `JudgeError` line; single malformed verdicts are logged at debug level only.
- Transport: this module retries, not the client (`max_retries=0` there), so every HTTP request is counted
  (`requests_sent`, retries included). 429, 5xx, timeouts and connection errors are retried up to
  `max_retries` times with exponential backoff (`retry_backoff` seconds, doubled each time, capped at 30 s;
  a server's `retry-after` / `retry-after-ms` is honoured up to 60 s). Then -- and at once for a refused key
  (401/403), an unknown model (404), a refused request (400) or a success answer whose body is not JSON (not an
  OpenAI-compatible endpoint) -- a `JudgeError` with a one-line message; verdicts made so far stay cached.
- On-disk cache: one JSON file per verdict, named sha256(model, prompt); a rerun of the same items makes no
  calls. Only well-formed verdicts are cached.
- Bounded concurrency (`max_workers` threads); identical prompts are sent once.
- Batch API mode (`batch=True`): write the requests as JSONL, upload, create a batch, poll, collect into the
  cache. A state file (`batch_state`) records the submitted batch so an interrupted run resumes polling
  instead of submitting again.
- The API key is read from `OPENAI_API_KEY` by this module only; it is never logged or written, and is
  removed from any error text before it is shown. Results record the endpoint only as its host
  (`endpoint_host`: host and port; never user info, path or query).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-5-mini-2025-08-07"
#: The judge settings of the paper's App. E (model, seed, reasoning effort).
PAPER_SETTINGS = {"model": DEFAULT_MODEL, "seed": 0, "reasoning_effort": "minimal"}
#: The host of the paper's judge endpoint (the OpenAI API, the client's default base URL).
PAPER_HOST = "api.openai.com"
#: What `endpoint_host` may return: a host name or IPv4 address, or a bracketed IPv6 address, and a port.
HOST_PATTERN = re.compile(r"(?:[a-z0-9](?:[a-z0-9._-]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\])(?::[0-9]{1,5})?")
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0
PROMPT_VERSION = "sake-judge-v1"

SYSTEM_PROMPT = (
    "You are a strict grader for an audio question-answering benchmark. You read a question, a model's "
    "answer and the text it must be compared with, and you reply with a JSON verdict: \"yes\" or \"no\"."
)

CORRECTNESS_PROMPT = """Decide whether the model's answer gives the same final answer as the reference answer.

Rules:
- Judge only the final answer the model commits to; ignore style, length and explanations.
- The answer may name the option by its letter, restate its text, or paraphrase it; that counts as the same
  answer when it clearly refers to the reference.
- If the answer names several different options, hedges between answers, refuses, is empty, or is
  incoherent or repetitive text, the verdict is "no".

Question:
{question}

Reference answer:
{reference}

Model's answer:
{output}

Does the model's answer match the reference answer? Reply with {"verdict": "yes"} or {"verdict": "no"}."""

CONSISTENCY_PROMPT = """Decide whether two answers of a model to the same question give the same final answer.
The first answer was produced before the model was edited, the second after. Correctness does not matter:
two identical wrong answers are consistent.

Rules:
- Compare only the final answers the two responses commit to; ignore style, length and explanations.
- An option named by its letter and the same option restated as text are the same answer.
- If the second answer commits to a different answer, several answers, refuses where the first did not,
  or is incoherent or repetitive text, the verdict is "no".

Question:
{question}

Answer before editing:
{pre_edit}

Answer after editing:
{post_edit}

Do the two answers give the same final answer? Reply with {"verdict": "yes"} or {"verdict": "no"}."""

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "verdict",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"verdict": {"type": "string", "enum": ["yes", "no"]}},
            "required": ["verdict"],
            "additionalProperties": False,
        },
    },
}


class JudgeError(RuntimeError):
    """The LLM judge cannot run (no API key, key refused, server unreachable, retries exhausted, malformed verdicts
    in a row, failed batch); the message is one line without the key."""


def _fill(template: str, **values: str) -> str:
    """Replace `{name}` placeholders in one pass (values may contain braces; they are not re-read)."""
    return re.sub(r"\{(question|reference|output|pre_edit|post_edit)\}", lambda m: values[m.group(1)], template)


def correctness_prompt(question: str, reference: str, output: str) -> str:
    """User prompt asking whether `output` gives the reference answer."""
    return _fill(CORRECTNESS_PROMPT, question=question.strip() or "(not given)", reference=reference.strip(),
                 output=output.strip())


def consistency_prompt(question: str, pre_edit: str, post_edit: str) -> str:
    """User prompt asking whether the post-edit output gives the same answer as the pre-edit output."""
    return _fill(CONSISTENCY_PROMPT, question=question.strip() or "(not given)", pre_edit=pre_edit.strip(),
                 post_edit=post_edit.strip())


def cache_key(model: str, prompt: str, *, host: str = PAPER_HOST, seed: int = 0,
              reasoning_effort: str | None = "minimal") -> str:
    """sha256 of everything a verdict depends on: the verdict cache's file name.

    The prompt version, endpoint host, model, seed, reasoning effort, system prompt and user prompt: a verdict from
    a local server or under other settings never answers for the paper's judge (results record `host` and
    `protocol` from the run's settings, so a cached verdict must have been made under those same settings).
    """
    payload = json.dumps([PROMPT_VERSION, host, model, seed, reasoning_effort, SYSTEM_PROMPT, prompt],
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def parse_verdict(content: str | None) -> bool | None:
    """`{"verdict": "yes"}` -> True, `{"verdict": "no"}` -> False, anything else -> None (malformed)."""
    if not content:
        return None
    try:
        obj = json.loads(content)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(obj, dict) or set(obj) != {"verdict"}:
        return None
    verdict = obj["verdict"]
    if verdict == "yes":
        return True
    if verdict == "no":
        return False
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    # A private copy of the temp-file + os.replace write: this evaluate module must stay self-contained (it is
    # published alone to the Hub), so it cannot import sake_core.atomic.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class VerdictCache:
    """Verdicts on disk, one `<sha256>.json` per `cache_key`; `None` directory = no cache."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory is not None else None

    def get(self, key: str) -> bool | None:
        if self.directory is None:
            return None
        path = self.directory / key[:2] / f"{key}.json"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return parse_verdict(json.dumps({"verdict": entry.get("verdict")}))

    def put(self, key: str, model: str, prompt: str, verdict: bool) -> None:
        if self.directory is None:
            return
        entry = {"model": model, "prompt_version": PROMPT_VERSION, "verdict": "yes" if verdict else "no",
                 "prompt": prompt}
        _atomic_write_text(self.directory / key[:2] / f"{key}.json", json.dumps(entry, ensure_ascii=False))


def default_cache_dir() -> Path:
    """`$SAKE_JUDGE_CACHE`, else `~/.cache/sake/judge`."""
    env = os.environ.get("SAKE_JUDGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sake" / "judge"


@dataclass
class JudgeConfig:
    """Settings of the LLM judge (see module doc)."""

    model: str = DEFAULT_MODEL
    base_url: str | None = None
    seed: int = 0
    reasoning_effort: str | None = "minimal"
    max_workers: int = 8
    max_retries: int = 5
    retry_backoff: float = 1.0
    timeout: float = 120.0
    malformed_retries: int = 1
    max_consecutive_malformed: int = 10
    cache_dir: str | os.PathLike | None = field(default_factory=default_cache_dir)
    batch: bool = False
    batch_state: str | os.PathLike | None = None
    poll_interval: float = 30.0

    @property
    def paper_settings(self) -> bool:
        """True when model, seed and reasoning effort are the paper's (App. E)."""
        return (self.model, self.seed, self.reasoning_effort) == tuple(PAPER_SETTINGS.values())


def endpoint_host(base_url: str | None) -> str:
    """The host (and port) of a judge endpoint, `PAPER_HOST` for the default one; never user info, path or query.

    ValueError (one line) for a URL without a usable host.
    """
    if not base_url:
        return PAPER_HOST
    try:
        parts = urllib.parse.urlsplit(str(base_url).strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host:
        raise ValueError("the judge's base URL must be http(s)://HOST[:PORT]/..., got one without a usable host")
    shown = f"[{host}]" if ":" in host else host
    shown = f"{shown}:{port}" if port is not None else shown
    if not HOST_PATTERN.fullmatch(shown):
        raise ValueError("the judge's base URL must be http(s)://HOST[:PORT]/..., got a host with other characters")
    return shown


def _redact(text: str) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    text = " ".join(str(text).split())
    return text.replace(key, "***") if key else text


def _not_json(server: str) -> str:
    return (f"the judge server at {server} answered with a body that is not JSON (HTTP 200); expected an "
            "OpenAI-compatible chat-completions endpoint: check --base-url")


def _retry_after(exc: Any) -> float | None:
    """Seconds a server asked to wait (`retry-after-ms` / `retry-after` headers), or None."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms") is not None:
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after") is not None:
            return float(headers["retry-after"])
    except (TypeError, ValueError):
        return None
    return None


class LLMJudge:
    """Judge prompts with an OpenAI-compatible model.

    Counters: `requests_sent` (HTTP requests, retries and repeats included), `calls` (verdict requests:
    prompts sent, malformed repeats included; batch lines in batch mode), `cache_hits`, `malformed`.
    """

    name = "openai"

    def __init__(self, config: JudgeConfig | None = None, client: Any = None):
        self.config = config or JudgeConfig()
        self.cache = VerdictCache(self.config.cache_dir)
        self._client = client
        self.calls = 0
        self.requests_sent = 0
        self.cache_hits = 0
        self.malformed = 0
        self._malformed_run = 0  # malformed verdicts in a row (any prompt); a well-formed one resets it
        self._stopped: str | None = None  # the one-line reason once the run stopped on malformed verdicts
        self._lock = threading.Lock()

    # -- client -------------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        with self._lock:
            return self._get_client()

    def _get_client(self) -> Any:
        if self._client is None:
            from openai import OpenAI

            api_key = os.environ.get("OPENAI_API_KEY")
            if not api_key:
                if not self.config.base_url:
                    raise JudgeError("the openai judge needs OPENAI_API_KEY in the environment "
                                     "(or --base-url for a local OpenAI-compatible server)")
                api_key = "no-key"  # local servers often need none; the client insists on a value
            self._client = OpenAI(api_key=api_key, base_url=self.config.base_url, max_retries=0,
                                  timeout=self.config.timeout)
        return self._client

    @property
    def host(self) -> str:
        """The endpoint's host and port as results record it (`endpoint_host`)."""
        return endpoint_host(self.config.base_url)

    @property
    def server(self) -> str:
        """The endpoint's base URL (for messages)."""
        return self.config.base_url or str(getattr(self._client, "base_url", "") or "https://api.openai.com/v1")

    def send(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One API call with this module's retries (see module doc); JudgeError with one line when it fails."""
        import openai

        attempt = 0
        while True:
            with self._lock:
                self.requests_sent += 1
            try:
                return call(*args, **kwargs)
            except openai.AuthenticationError:
                raise JudgeError(f"the judge server at {self.server} rejected the API key (HTTP 401); check "
                                 "OPENAI_API_KEY") from None
            except openai.PermissionDeniedError:
                raise JudgeError(f"the judge server at {self.server} refused access with this API key "
                                 "(HTTP 403)") from None
            except openai.NotFoundError:
                raise JudgeError(f"the judge server at {self.server} has no model {self.config.model!r} or no "
                                 "such endpoint (HTTP 404); check --model and --base-url") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as exc:
                status = getattr(exc, "status_code", None)
                what = (f"HTTP {status}" if status else
                        "timed out" if isinstance(exc, openai.APITimeoutError) else "unreachable")
                if attempt >= self.config.max_retries:
                    if status is None:
                        raise JudgeError(f"cannot reach the judge server at {self.server} ({what} after "
                                         f"{attempt + 1} attempt(s)); check --base-url and the network") from None
                    raise JudgeError(f"the judge server at {self.server} kept failing ({what}); retries "
                                     f"exhausted after {attempt + 1} attempt(s)") from None
                wait = _retry_after(exc)
                backoff = min(MAX_BACKOFF_S, self.config.retry_backoff * (2 ** attempt))
                delay = backoff if wait is None else min(max(wait, 0.0), MAX_RETRY_AFTER_S)
                logger.info("judge request: %s; retry %d/%d in %.2f s", what, attempt + 1,
                            self.config.max_retries, delay)
                time.sleep(delay)
                attempt += 1
            except openai.APIStatusError as exc:
                raise JudgeError(f"the judge server at {self.server} refused the request (HTTP "
                                 f"{exc.status_code}: {_redact(getattr(exc, 'message', ''))[:200]})") from None
            except ValueError:  # json.JSONDecodeError: a success status with a body that is not JSON
                raise JudgeError(_not_json(self.server)) from None

    def request_body(self, prompt: str) -> dict[str, Any]:
        """The chat-completions request for one prompt (also the body of a Batch API line)."""
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            "seed": self.config.seed,
            "response_format": VERDICT_SCHEMA,
        }
        if self.config.reasoning_effort:
            body["reasoning_effort"] = self.config.reasoning_effort
        return body

    def _ask(self, prompt: str) -> bool | None:
        """One prompt: send, parse, repeat on a malformed verdict; None when it stays malformed. JudgeError once
        `max_consecutive_malformed` verdicts in a row were malformed (then every worker stops asking)."""
        import openai

        client = self.client
        for attempt in range(1 + self.config.malformed_retries):
            with self._lock:
                if self._stopped:
                    raise JudgeError(self._stopped)
                self.calls += 1
            try:
                response = self.send(client.chat.completions.create, **self.request_body(prompt))
                if isinstance(response, (str, bytes)):  # the client hands back a body it could not read as JSON
                    raise JudgeError(_not_json(self.server))
                message = response.choices[0].message if response.choices else None
                verdict = parse_verdict(getattr(message, "content", None)) if message is not None else None
            except (openai.APIResponseValidationError, AttributeError, TypeError, IndexError):
                verdict = None  # a body that is not a chat completion: as malformed as a bad verdict
            with self._lock:
                if verdict is not None:
                    self._malformed_run = 0
                    return verdict
                self.malformed += 1
                self._malformed_run += 1
                if self._malformed_run >= self.config.max_consecutive_malformed and not self._stopped:
                    self._stopped = (f"the judge at {self.server} (model {self.config.model!r}) gave "
                                     f"{self._malformed_run} malformed verdicts in a row (expected JSON "
                                     '{"verdict": "yes"|"no"}); stopped after '
                                     f"{self.requests_sent} request(s); check --model and --base-url (the "
                                     "server must honour response_format json_schema)")
                if self._stopped:
                    raise JudgeError(self._stopped)
            logger.debug("malformed judge verdict (attempt %d/%d)", attempt + 1, 1 + self.config.malformed_retries)
        return None

    # -- public ---------------------------------------------------------------------------------------------
    def judge(self, prompts: Sequence[str], progress: Callable[[int], None] | None = None) -> list[bool | None]:
        """Verdict per prompt: True (yes), False (no), None (malformed after retries or missing in a batch)."""
        config = self.config
        keys = [cache_key(config.model, p, host=self.host, seed=config.seed,
                          reasoning_effort=config.reasoning_effort) for p in prompts]
        verdicts: dict[str, bool | None] = {}
        todo: dict[str, str] = {}
        for key, prompt in zip(keys, prompts):
            if key in verdicts or key in todo:
                continue
            cached = self.cache.get(key)
            if cached is not None:
                verdicts[key] = cached
                self.cache_hits += 1
            else:
                todo[key] = prompt
        if todo:
            if self.config.batch:
                verdicts.update(self._judge_batch(todo))
            else:
                verdicts.update(self._judge_online(todo, progress))
        return [verdicts[k] for k in keys]

    def _judge_online(self, todo: dict[str, str], progress: Callable[[int], None] | None) -> dict[str, bool | None]:
        from concurrent.futures import as_completed

        from tqdm.auto import tqdm

        out: dict[str, bool | None] = {}
        items = list(todo.items())
        _ = self.client  # fail early (missing key) before starting threads

        def work(item: tuple[str, str]) -> tuple[str, bool | None]:
            key, prompt = item
            verdict = self._ask(prompt)
            if verdict is not None:
                self.cache.put(key, self.config.model, prompt, verdict)
            return key, verdict

        workers = max(1, min(self.config.max_workers, len(items)))
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            futures = [pool.submit(work, item) for item in items]
            for future in tqdm(as_completed(futures), total=len(futures), desc="LLM judge", leave=False):
                key, verdict = future.result()  # a JudgeError stops the run (verdicts so far stay cached)
                out[key] = verdict
                if progress:
                    progress(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return out

    # -- Batch API ----------------------------------------------------------------------------------------
    def _judge_batch(self, todo: dict[str, str]) -> dict[str, bool | None]:
        """Submit (or resume) one Batch API job for `todo`, wait for it and collect verdicts into the cache."""
        state_path = Path(self.config.batch_state or "sake_judge_batch.json")
        keys_digest = hashlib.sha256("\n".join(sorted(todo)).encode()).hexdigest()
        state: dict[str, Any] = {}
        if state_path.exists():
            state = json.loads(state_path.read_text(encoding="utf-8"))
        client = self.client
        if state.get("keys_digest") == keys_digest and state.get("model") == self.config.model:
            batch_id = state["batch_id"]
            logger.info("resuming batch %s from %s", batch_id, state_path)
        else:
            input_path = state_path.with_suffix(".input.jsonl")
            lines = [json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                                 "body": self.request_body(prompt)}, ensure_ascii=False)
                     for key, prompt in sorted(todo.items())]
            _atomic_write_text(input_path, "\n".join(lines) + "\n")
            uploaded = self.send(client.files.create, file=(input_path.name, input_path.read_bytes()),
                                 purpose="batch")
            batch = self.send(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"sake": PROMPT_VERSION})
            batch_id = batch.id
            state = {"batch_id": batch_id, "input_file_id": uploaded.id, "model": self.config.model,
                     "keys_digest": keys_digest, "n_requests": len(todo)}
            _atomic_write_text(state_path, json.dumps(state, indent=2))
            self.calls += len(todo)
            logger.info("submitted batch %s with %d requests (state: %s)", batch_id, len(todo), state_path)
        while True:
            batch = self.send(client.batches.retrieve, batch_id)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                break
            logger.info("batch %s: %s", batch_id, batch.status)
            time.sleep(self.config.poll_interval)
        if batch.status == "failed" or not getattr(batch, "output_file_id", None):
            raise JudgeError(f"batch {batch_id} ended with status {batch.status!r} and no output; delete "
                             f"{state_path} to submit again")
        out: dict[str, bool | None] = {key: None for key in todo}
        text = self.send(client.files.content, batch.output_file_id).text
        for line in text.split("\n"):  # newlines only: a model's answer may hold a raw U+2028
            if not line.strip():
                continue
            record = json.loads(line)
            key = record.get("custom_id")
            if key not in todo:
                continue
            response = record.get("response") or {}
            body = response.get("body") or {}
            try:
                content = body["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                content = None
            verdict = parse_verdict(content) if response.get("status_code", 200) == 200 else None
            if verdict is None:
                self.malformed += 1
            else:
                self.cache.put(key, self.config.model, todo[key], verdict)
            out[key] = verdict
        state["status"] = batch.status
        _atomic_write_text(state_path, json.dumps(state, indent=2))
        return out
