"""The leaderboard under hostile input (issue 28): every attack below is refused (or accepted) with a one-line
answer, in time linear in its size, and the Space, run under uvicorn in its own process, keeps serving another
client's page within 2 s while each is tried.

- reading: 4 MB lines of every hostile shape found so far cost about what a plain 4 MB line costs (a ratio
  measured in the same test, not an absolute time);
- one verdict: the eight cases where `validate` and `add` disagreed, and seeded random mutations of valid
  submissions, get the same verdict from both;
- archives: a corrupt deflate stream names its member, a directory of thousands of members is refused unparsed;
- the Space: only files its upload route received are opened (a server path, /dev/zero, a FIFO, a URL are
  refused at once and nothing is copied or served), answers are plain text without server paths, 1,100
  half-open connections from one address leave another address served;
- lesser cases: a judge answering 200 with a body that is not JSON (exit 3, one line), non-finite numbers in a
  results store (one line naming the file; never "Infinity" on the board or the Space), WAVs cut to 0 or 20 bytes.

Every server listens on 127.0.0.1 only (the flood comes from 127.0.0.2, the other client is 127.0.0.3); every
loop is bounded and every process started here is stopped here.
"""
from __future__ import annotations

import copy
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from _browser_helpers import SKIP_WITHOUT_BROWSER, chromium_driver
from _leaderboard_helpers import (METADATA, jsonl_bytes, make_header, make_manifest, make_row, make_rows,
                                  write_submission_dir, write_submission_zip)
from eval.leaderboard.store import LocalStore, add_submission, process_queue
from eval.leaderboard.validate import (METADATA_NAME, PREDICTIONS_NAME, SubmissionError, parse_submission,
                                       validate_submission)
from eval.sake_metric.limits import MAX_LINE_BYTES, MAX_OPTIONS

REPO = Path(__file__).resolve().parents[1]
LINE = MAX_LINE_BYTES - 4096  # a hostile line just under the reader's line limit
HOST, ATTACKER, VISITOR = "127.0.0.1", "127.0.0.2", "127.0.0.3"


def _refusal(call) -> str:
    """The one message of a refused call (a SubmissionError lists one problem per line, nothing else)."""
    with pytest.raises(SubmissionError) as info:
        call()
    return str(info.value)


# ------------------------------------------------------------------------------------------------ reading

def _line_cases(header: dict, row: dict) -> dict[str, tuple[bytes, bytes, str | None]]:
    """name -> (line 1, line 2, expected refusal or None for accepted): 4 MB lines of each hostile shape."""
    head = json.dumps(header).encode()
    body = json.dumps(row).encode()
    prefix = body[:-1] + b', "x": '  # the row with one more field, then the hostile value

    def without(obj: dict, key: str) -> bytes:  # the object's JSON, open for one more field
        return json.dumps({k: v for k, v in obj.items() if k != key}).encode()[:-1] + b", "

    def fill(start: bytes, unit: bytes, end: bytes = b"") -> bytes:
        return start + unit * ((LINE - len(start) - len(end)) // len(unit)) + end

    long_options = dict(row, options=[f"{chr(97 + i)} " + "x" * (LINE // MAX_OPTIONS - 64) for i in range(MAX_OPTIONS)])
    return {
        # the shape that made the earlier regular expression quadratic (hours at 4 MB)
        "brackets, then an unterminated string of escaped quotes": (
            head, fill(prefix + b"[" * 200_000 + b'"', b'\\"'), "JSON nested"),
        "an unterminated string of escaped quotes and backslashes": (
            head, fill(prefix + b'"', b'\\\\\\"'), "not valid JSON"),
        "nesting 2,000,000 deep": (head, fill(prefix, b"[", b"]" * 10), "JSON nested"),
        "a million closing brackets": (head, fill(prefix + b"[", b"]"), "not valid JSON"),
        "500 options of 8 KB (the 28 s row)": (
            head, json.dumps(dict(row, options=["a" * 8000] * 500)).encode(), "500 options; at most 26"),
        "a million one-letter options": (head, fill(without(row, "options") + b'"options": [', b'"a",', b'"a"]}'),
                                         "values (members and array entries)"),
        "a 4-million-digit integer": (head, fill(without(row, "type") + b'"type": ', b"9", b"}"), "digits"),
        "a 4-million-digit fraction": (head, fill(without(row, "type") + b'"type": 1.', b"1", b"}"),
                                       "expected integer"),
        "400,000 members": (head, fill(b'{"kind": "prediction", ', b'"k": 1, ', b'"k": 2}'),
                            "values (members and array entries)"),
        "two duplicate keys of 2 MB": (head, b'{"' + b"k" * (LINE // 2 - 16) + b'": 1, "' + b"k" * (LINE // 2 - 16)
                                       + b'": 2}', "duplicate key 'kkkk"),
        "unpaired surrogate escapes": (head, fill(prefix + b'"', b"\\ud800", b'"}'), "surrogate"),
        "a header with 450,000 distinct configs": (
            without(header, "configs") + b'"configs": [' + b",".join(b"[%d]" % i for i in range(450_000)) + b"]}",
            body, "values (members and array entries)"),
        "a header with 9,000 distinct configs (JSON Schema's uniqueItems is quadratic)": (
            without(header, "configs") + b'"configs": [' + b",".join(b"[%d]" % i for i in range(9_000)) + b"]}",
            body, "'configs' must be a list"),
        "brackets inside strings (valid)": (head, fill(prefix + b'"', b"[{", b'"}'), None),
        "26 options of 150 KB (valid, judged on their first characters)": (head, json.dumps(long_options).encode(),
                                                                           None),
    }


def test_a_file_padded_with_rows_is_refused_at_the_release_size(tmp_path, manifest, single):
    """A valid header then a million tiny rows (a 50 KB zip): the board reads no more rows than a complete run of
    the header holds in the release (plus a few, which the duplicate check names), so the work is bounded by the
    release, not by the padding; a header the release refuses is refused before any row is read."""
    header, rows = single
    expected = len(rows)
    padded = jsonl_bytes(header, []) + b'{"kind":"prediction"}\n' * 1_000_000
    files = {PREDICTIONS_NAME: padded, METADATA_NAME: json.dumps(METADATA).encode()}
    message = _refusal(lambda: parse_submission(files, "padded.zip", manifest=manifest))
    assert "problem(s)" in message
    assert f"more than {expected + 25} prediction rows, the rows a complete run of this header holds" in message
    foreign = jsonl_bytes(dict(header, split="train"), []) + b'{"kind":"prediction"}\n' * 1_000_000
    message = _refusal(lambda: parse_submission({**files, PREDICTIONS_NAME: foreign}, "foreign.zip",
                                                manifest=manifest))
    assert message.count("\n  - ") == 1 and "field split: got 'train', the board accepts test" in message
    # rows the release holds, each breaking the schema: the per-row checks stop after the listed problems
    junk = jsonl_bytes(header, []) + b'{"kind":"prediction"}\n' * expected
    message = _refusal(lambda: parse_submission({**files, PREDICTIONS_NAME: junk}, "junk.zip", manifest=manifest))
    assert message.count("missing required field") == 25
    assert "checking stopped at predictions.jsonl line 3 after 25 problems" in message
    # the same rows valid but one repeated: named as a duplicate, not as a count
    repeated = rows + [rows[0]]
    message = _refusal(lambda: validate_submission(write_submission_dir(tmp_path / "dup", header, repeated),
                                                   manifest))
    assert f"duplicate item id {rows[0]['item_id']!r}" in message


def test_names_the_board_shows_are_one_line_of_visible_text(manifest, single):
    """Submitter, links and header names with a bidirectional override, zero-width characters only or a trailing
    newline are refused naming the character; display fields have types and lengths; a method of its own cannot
    take a paper method's name, and no recorded name or place puts another method among the paper's eight."""
    from sake_core.protocol import method_display

    header, rows = single

    def problems(metadata: dict | None = None, **fields) -> str:
        files = {PREDICTIONS_NAME: jsonl_bytes(dict(header, **fields), rows),
                 METADATA_NAME: json.dumps(metadata or METADATA).encode()}
        return _refusal(lambda: parse_submission(files, "names.zip", manifest=manifest))

    message = problems(dict(METADATA, submitter="\u200b\u200b", license="\u202eMIT",
                            model_link="https://evil.example/\n"))
    assert "field submitter: holds the hidden character U+200B (ZERO WIDTH SPACE)" in message
    assert "field license: holds the hidden character U+202E (RIGHT-TO-LEFT OVERRIDE)" in message
    assert "field model_link" in message and message.count("\n  - ") == 3
    assert "field model: has no visible character" in problems(model="   ")
    # look-alikes of the paper's names (Cyrillic, Greek, fullwidth letters) and letters that draw nothing
    assert "field method: got \"\\u041cEND\", expected a method id of ASCII" in problems(method="\u041cEND")
    assert "field method: got" in problems(method="\uff37\uff29\uff33\uff25")
    assert "field method_display_name: got" in problems(method="mine", method_display_name="\u041cEND")
    assert "field model: got" in problems(model="Qwen/Qwen2-\u0391udio-7B-Instruct")
    message = problems(dict(METADATA, submitter="\u3164", license="\u2800"))
    assert "field submitter: holds the hidden character U+3164 (HANGUL FILLER)" in message
    assert "field license: holds the hidden character U+2800 (BRAILLE PATTERN BLANK)" in message
    message = problems(method="evil", method_display_name="FT (LLM)")
    assert "field method_display_name: got \"FT (LLM)\", the name of the paper's method 'ft_llm'" in message
    message = problems(method="evil", method_display_name={"a": 1}, method_display_order=-5, family={"a": 1})
    assert "field method_display_name: expected string or null, got object" in message
    assert "field method_display_order: got -5, expected minimum 0" in message and "field family" in message
    assert "field method_display_name: got" in problems(method="evil", method_display_name="x" * 3_000_000)
    assert method_display("evil", "FT (LLM)", -5) == ("evil", 8.0)
    assert method_display("lora", "LoRA", 9) == ("LoRA", 9.0) and method_display("ft_llm", "X", 99) == ("FT (LLM)", 0.0)


def _read_time(files: dict[str, bytes], repeats: int, enough: float = 0.0) -> tuple[float, str | None]:
    """(best of up to `repeats` wall times of `parse_submission`, its refusal or None); stops repeating once a
    time is within `enough` seconds."""
    best, outcome = float("inf"), None
    for _ in range(repeats):
        if best <= enough:
            break
        start = time.perf_counter()
        try:
            parse_submission(files, source="s.zip")
            outcome = None
        except SubmissionError as exc:
            outcome = str(exc)
        best = min(best, time.perf_counter() - start)
    return best, outcome


def test_hostile_lines_cost_about_what_a_plain_line_costs(manifest):
    """Each 4 MB hostile line is refused (or accepted) by validate's reader in at most 20x the time of a plain
    4 MB line (a row whose output is 4 MB of text) measured in the same test; the quadratic scan took hours."""
    header, rows = make_header(manifest), make_rows(manifest)
    metadata = json.dumps(METADATA).encode()
    plain_row = dict(rows[0], post_edit="x" * LINE)
    plain = {PREDICTIONS_NAME: jsonl_bytes(dict(header, expected_rows=1), [plain_row]), METADATA_NAME: metadata}
    baseline, outcome = _read_time(plain, repeats=3)
    assert outcome is None, outcome
    slow = {}
    for name, (line1, line2, expected) in _line_cases(header, rows[0]).items():
        files = {PREDICTIONS_NAME: line1 + b"\n" + line2 + b"\n", METADATA_NAME: metadata}
        assert len(line1) <= MAX_LINE_BYTES and len(line2) <= MAX_LINE_BYTES, name
        seconds, outcome = _read_time(files, repeats=3, enough=20 * baseline)  # a retry only when slow
        if expected is None:
            assert outcome is None, (name, outcome)
        else:
            assert outcome is not None and expected in outcome, (name, outcome)
            assert len(outcome) < 1000, (name, len(outcome))  # quotes a short excerpt, never the line
        if seconds > 20 * baseline:
            slow[name] = round(seconds / baseline, 1)
    assert not slow, f"hostile lines over 20x a plain 4 MB line ({baseline:.3f} s): {slow}"


def _judge_time(raw: dict, repeats: int = 2) -> float:
    from eval.sake_metric.rows import validate_row
    from eval.sake_metric.scoring import judge_rows

    row = validate_row(raw)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        judge_rows([row])
        best = min(best, time.perf_counter() - start)
    return best


def test_long_options_references_and_questions_are_judged_on_their_first_characters():
    """A row of 26 options of 10,000 characters whose words the 16,000-character output repeats is judged
    (offline protocol, the matcher) in at most 40x the time of the same output with four short options; the
    unbounded matcher compared every option at every word (a 500-option row took 28 s). The LLM prompt holds at
    most the judged characters."""
    from eval.sake_metric.limits import MAX_OPTION_CHARS, MAX_QUESTION_CHARS
    from eval.sake_metric.rows import validate_row
    from eval.sake_metric.scoring import judge_prompt

    filler = "a " * 5000
    plain = dict(make_row("emotion/test/000000/rel", None, correct=False), post_edit=filler * 3)
    hostile = dict(plain, options=[filler + chr(98 + i) for i in range(MAX_OPTIONS)], reference=filler + "b",
                   question="q" * 100_000)
    varied = dict(hostile, options=[("a " * (500 - i)).strip() for i in range(MAX_OPTIONS)])  # 26 lengths
    baseline = _judge_time(plain, repeats=3)
    for raw in (hostile, varied):
        assert _judge_time(raw) <= 40 * baseline + 0.05
    prompt = judge_prompt(validate_row(hostile))
    assert len(prompt) < MAX_QUESTION_CHARS + MAX_OPTION_CHARS + 16_000 + 2000
    with pytest.raises(ValueError, match="27 options; at most 26"):
        validate_row(dict(hostile, options=hostile["options"] + ["z"]))


def _mentions_by_definition(output: str, options: list[str]) -> tuple[set[int], set[int]]:
    """The matcher's text rule word by word (no hashing): at each word every option phrase starting there; only
    the longest counts, and not when a mention that started earlier reaches as far; negated within 3 words."""
    from eval.sake_metric.matching import NEGATION_WINDOW, NEGATION_WORDS, _strip_letter, normalize

    words = normalize(output).split()
    targets = [(normalize(_strip_letter(o)).split(), i) for i, o in enumerate(options)]
    positive, negated, reach = set(), set(), 0
    for start in range(len(words)):
        found = [(start + len(t), i) for t, i in targets if t and words[start:start + len(t)] == t]
        if not found:
            continue
        longest = max(end for end, _ in found)
        for end, index in found:
            if end == longest and reach < end:
                window = words[max(0, start - NEGATION_WINDOW):start]
                (negated if any(w in NEGATION_WORDS for w in window) else positive).add(index)
        reach = max(reach, longest)
    return positive, negated - positive


def test_the_hashing_matcher_finds_what_the_word_by_word_rule_finds():
    """Seeded random outputs and option lists (repeated words, shared prefixes, negations, duplicates)."""
    from eval.sake_metric.matching import _text_mentions

    rng = random.Random(28)
    vocab = ["a", "b", "dog", "cat", "very", "sad", "not", "no", "rather", "than", "(b)", "it's", "x y", "A."]
    for _ in range(3000):
        options = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 6))]
        output = " ".join(rng.choice(vocab + options) for _ in range(rng.randint(0, 15)))
        assert _text_mentions(output, options) == _mentions_by_definition(output, options), (output, options)


# ------------------------------------------------------------------------------------------------ one verdict

def _first(rows: list[dict], dimension: str) -> dict:
    return next(r for r in rows if r["dimension"] == dimension)


def _dataset_on_server(tmp_path: Path, manifest: dict) -> str:
    folder = tmp_path / "server-dataset"
    folder.mkdir(exist_ok=True)
    (folder / "sake_manifest.json").write_text(json.dumps(manifest))
    return str(folder)


EIGHT_CASES = {
    "empty reference": lambda h, rows, tmp, m: _first(rows, "reliability").update(reference=""),
    "whitespace-only reference": lambda h, rows, tmp, m: _first(rows, "generality").update(reference=" \t "),
    "locality row with pre_edit null": lambda h, rows, tmp, m: _first(rows, "locality_audio").update(pre_edit=None),
    "empty attribute": lambda h, rows, tmp, m: _first(rows, "portability").update(attribute=""),
    "post_edit_hit_limit 'yes'": lambda h, rows, tmp, m: rows[3].update(post_edit_hit_limit="yes"),
    "pre_edit_hit_limit 'yes'": lambda h, rows, tmp, m: rows[4].update(pre_edit_hit_limit="yes"),  # issue 25
    "type 0.0": lambda h, rows, tmp, m: _first(rows, "reliability").update(type=0.0),
    "sequential gap 0.0": lambda h, rows, tmp, m: next(r for r in rows if r["gap"] == 0).update(gap=0.0),
    "limit 1 with a dataset path on the server": lambda h, rows, tmp, m: h.update(
        limit=1, dataset=_dataset_on_server(tmp, m)),
}
EXPECTED_FIELD = {"empty reference": "'reference'", "whitespace-only reference": "'reference'",
                  "locality row with pre_edit null": "'pre_edit'", "empty attribute": "'attribute'",
                  "post_edit_hit_limit 'yes'": "'post_edit_hit_limit'", "type 0.0": "'type'",
                  "pre_edit_hit_limit 'yes'": "'pre_edit_hit_limit'",
                  "sequential gap 0.0": "'gap'", "limit 1 with a dataset path on the server": "field limit"}


@pytest.mark.parametrize("case", list(EIGHT_CASES))
def test_the_eight_disagreements_are_one_verdict(tmp_path, manifest, case):
    mode = "sequential" if "sequential" in case else "single"
    header, rows = make_header(manifest, mode), make_rows(manifest, mode)
    EIGHT_CASES[case](header, rows, tmp_path, manifest)
    sub = write_submission_dir(tmp_path / "s", header, rows)
    message = _refusal(lambda: validate_submission(sub, manifest))
    assert EXPECTED_FIELD[case] in message and str(tmp_path) not in message, message
    store = LocalStore(tmp_path / "results")
    assert _refusal(lambda: add_submission(sub, manifest, store, judge="offline")) == message
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.json"))


POOL = [None, "", " ", "\t\n", "x", "yes", "no", 0, 0.0, 1, 1.0, -1, 2, 4, 5, 6, 9, 2.5, True, False, [], ["a"],
        ["happy", "sad"], ["a"] * (MAX_OPTIONS + 1), [1, 2], [["x"]], {}, {"a": 1}, "dog", "happy", "(b)", "(ı)",
        "İ) x", "option ı", "\u202e", "<img src=x onerror=alert(1)>", "![i](https://evil.example/x.png)",
        "reliability", "generality", "locality_audio", "locality_text", "portability", "sequential", "single",
        "test", "train", "emotion", "gender", "header", "prediction", "a" * 300, "\u00a0", "1e999"]
ROW_FIELDS_MUTATED = ["kind", "instance_id", "item_id", "dimension", "type", "attribute", "question", "options",
                      "reference", "pre_edit", "post_edit", "gap", "category", "post_edit_hit_limit",
                      "pre_edit_hit_limit", "extra"]
HEADER_FIELDS_MUTATED = ["model", "model_revision", "method", "hparams", "mode", "dataset", "dataset_fingerprint",
                         "configs", "split", "seed", "limit", "eval_edits", "max_gap", "expected_rows", "versions",
                         "date", "max_new_tokens", "family", "kind"]


def _mutate(rng: random.Random, header: dict, rows: list[dict], tmp: Path, manifest: dict) -> str:
    """Apply one random change to (header, rows) in place; return what it was."""
    kind = rng.choice(["row", "row", "row", "row", "drop field", "header", "header", "rows"])
    if kind == "row":
        row, name, value = rng.choice(rows), rng.choice(ROW_FIELDS_MUTATED), copy.deepcopy(rng.choice(POOL))
        item = row.get("item_id")
        row[name] = value
        return f"row {item} {name}={value!r:.40}"
    if kind == "drop field":
        row = rng.choice(rows)
        name = rng.choice(list(row))
        item = row.get("item_id")
        del row[name]
        return f"row {item} without {name}"
    if kind == "header":
        name = rng.choice(HEADER_FIELDS_MUTATED + ["dataset on the server"])
        if name == "dataset on the server":
            header["dataset"] = _dataset_on_server(tmp, manifest)
            header["limit"] = rng.choice([None, 1, 2, 100])
            return f"header dataset on the server, limit {header['limit']}"
        header[name] = copy.deepcopy(rng.choice(POOL))
        return f"header {name}={header[name]!r:.40}"
    change = rng.choice(["duplicate", "drop", "swap ids", "shuffle"])
    if change == "duplicate":
        rows.append(copy.deepcopy(rng.choice(rows)))
    elif change == "drop":
        rows.pop(rng.randrange(len(rows)))
    elif change == "swap ids":
        a, b = rng.sample(range(len(rows)), 2)
        rows[a]["item_id"], rows[b]["item_id"] = rows[b]["item_id"], rows[a]["item_id"]
    else:
        rng.shuffle(rows)
    return f"rows: {change}"


@pytest.mark.parametrize("mode, cases", [("single", 60), ("sequential", 25)])
def test_random_mutations_get_one_verdict_from_validate_and_add(tmp_path, mode, cases):
    """Seeded random mutations (one or two changes each) of a valid submission: `validate` accepts exactly
    what `add` (validate + the metric's scoring, offline protocol) accepts."""
    manifest = make_manifest(n_instances=2, n_sequences=1, n_steps=6)
    rng = random.Random(f"issue 28 {mode}")
    base_header, base_rows = make_header(manifest, mode), make_rows(manifest, mode)
    accepted = 0
    for n in range(cases):
        header, rows = copy.deepcopy(base_header), copy.deepcopy(base_rows)
        changes = [_mutate(rng, header, rows, tmp_path, manifest) for _ in range(rng.choice([1, 1, 2]))]
        sub = write_submission_dir(tmp_path / f"s{n}", header, rows)
        try:
            validate_submission(sub, manifest)
            valid = True
        except SubmissionError:
            valid = False
        store = LocalStore(tmp_path / f"r{n}")
        try:
            add_submission(sub, manifest, store, judge="offline")
            added = True
        except SubmissionError:
            added = False
        except Exception as exc:  # noqa: BLE001 - scoring refused what validate let through: the bug this guards
            pytest.fail(f"{changes}: validate said {valid}, add raised {type(exc).__name__}: {exc}")
        assert valid == added, changes
        accepted += valid
    assert 0 < accepted < cases  # the mutations reach both verdicts


# ------------------------------------------------------------------------------------------------ archives

def _corrupt_deflate_zip(path: Path, header: dict, rows: list[dict]) -> Path:
    """A zip whose predictions.jsonl deflate stream is broken mid-way (zlib.error, not a CRC mismatch)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("predictions.jsonl", jsonl_bytes(header, rows))
        archive.writestr("metadata.json", json.dumps(METADATA))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, 26)
    start = 30 + name_length + extra_length  # the first member's compressed data
    data[start + 40:start + 120] = b"\xff" * 80
    path.write_bytes(bytes(data))
    return path


def test_corrupt_deflate_stream_names_its_member(tmp_path, manifest, single, capsys):
    from eval.leaderboard.__main__ import main as cli_main

    header, rows = single
    archive = _corrupt_deflate_zip(tmp_path / "bad.zip", header, rows)
    message = _refusal(lambda: validate_submission(archive, manifest))
    assert "member 'predictions.jsonl': unreadable (error: Error -3" in message, message
    (tmp_path / "sake_manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli_main(["validate", str(archive), "--manifest", str(tmp_path)]) == 1  # no traceback: exit 1
    assert "member 'predictions.jsonl': unreadable" in capsys.readouterr().err
    pending = tmp_path / "queue" / "pending"
    pending.mkdir(parents=True)
    _corrupt_deflate_zip(pending / "a.zip", header, rows)
    assert process_queue(tmp_path / "queue", manifest, LocalStore(tmp_path / "results"), judge="offline") == [
        ("a.zip", "rejected")]
    error = (tmp_path / "queue" / "rejected" / "a.zip.error.txt").read_text()
    assert error.count("\n") == 1 and "member 'predictions.jsonl': unreadable" in error


def _many_members_zip(path: Path, members: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for n in range(members):
            archive.writestr(f"m{n}", b"")
    return path


def _understated(source: Path, path: Path, declared: int) -> Path:
    """A copy of `source` whose end record declares `declared` members (its directory is unchanged)."""
    data = bytearray(source.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, declared, declared)
    path.write_bytes(bytes(data))
    return path


def test_archive_member_count_is_capped_before_parsing(tmp_path, manifest, monkeypatch):
    big = _many_members_zip(tmp_path / "many.zip", 21_000)  # a directory of about 1.1 MB
    opened = []
    real = zipfile.ZipFile.__init__
    monkeypatch.setattr(zipfile.ZipFile, "__init__", lambda self, *a, **k: opened.append(a) or real(self, *a, **k))
    start = time.perf_counter()
    message = _refusal(lambda: validate_submission(big, manifest))
    assert "archive directory of 21000 member(s)" in message and time.perf_counter() - start < 1.0
    assert not opened  # refused from the end record: the directory was never parsed
    monkeypatch.undo()
    lying = _understated(big, tmp_path / "lying.zip", declared=2)
    assert "archive directory of 2 member(s) and" in _refusal(lambda: validate_submission(lying, manifest))
    small_lie = _understated(_many_members_zip(tmp_path / "small.zip", 40), tmp_path / "small-lie.zip", declared=2)
    assert "archive of 40 members; at most 16" in _refusal(lambda: validate_submission(small_lie, manifest))


# ------------------------------------------------------------------------------------------------ answers are data

def test_answers_are_plain_text_without_server_paths(tmp_path, manifest, single):
    from eval.leaderboard.space import Board, SpaceConfig

    header, rows = single
    uploads = tmp_path / "uploads" / ("f" * 64)
    uploads.mkdir(parents=True)
    board = Board(SpaceConfig(results_dir=str(tmp_path / "results"), queue_dir=str(tmp_path / "queue"),
                              judge="offline", queue_interval_s=0, upload_dir=str(tmp_path / "uploads")),
                  manifest=manifest)
    evil = "\u202e![x](https://evil.example/i.png) [claim your rank](https://evil.example) <b>" + "y" * 5000
    bad_ids, bad_category = copy.deepcopy(rows), copy.deepcopy(rows)
    bad_ids[1]["item_id"] = evil
    bad_category[2]["category"] = [evil] * 10
    answers = [board.submit(str(write_submission_zip(uploads / "meta.zip", header, rows,
                                                     metadata=dict(METADATA, submitter=evil, model_link=evil)))),
               board.submit(str(write_submission_zip(uploads / "ids.zip", header, bad_ids))),
               board.submit(str(write_submission_zip(uploads / "category.zip", header, bad_category)))]
    for answer in answers[:2]:
        assert answer.startswith("Rejected\n"), answer
        assert str(tmp_path) not in answer and "/tmp/" not in answer
        assert "\u202e" not in answer and "\\u202e" in answer  # unprintable characters escaped
        for line in answer.splitlines()[1:]:
            assert len(line) < 400, line  # each problem quotes a short excerpt of the value, never all of it
    assert "field model_link" in answers[0] and "field submitter" in answers[0]
    assert "field item_id" in answers[1]
    assert answers[2] == "Rejected\n- predictions.jsonl line 4, field category: expected string or null, got array " \
                         "a list of 10 item(s)"
    only_reference = copy.deepcopy(rows)
    only_reference[0]["reference"] = "   "
    answer = board.submit(str(write_submission_zip(uploads / "ref.zip", header, only_reference)))
    assert answer == ("Rejected\n- predictions.jsonl line 2: field 'reference' must be a non-empty string for "
                      "reliability items (correctness compares the post-edit output with it), got '   '"), answer

    # an error raised while scoring names the file as submitted, never the server's temporary copy
    def scorer(path, **kwargs):
        raise ValueError(f"{path}, line 3: something about {Path(path).parent}/other.txt")

    (tmp_path / "queue" / "pending").mkdir(parents=True, exist_ok=True)
    good = write_submission_zip(tmp_path / "queue" / "pending" / "z.zip", header, rows)
    assert good.is_file()
    board_outcomes = process_queue(board.requests.folder, manifest, board.store, judge="offline", scorer=scorer)
    assert board_outcomes == [("z.zip", "rejected")]
    status = board.queue_status()
    assert "z.zip: ValueError: predictions.jsonl, line 3: something about other.txt" in status, status
    assert "sake-score-" not in status and "/tmp" not in status


# ------------------------------------------------------------------------------------------------ lesser cases

class _NotJsonJudge:
    """An OpenAI-compatible URL answering every request with HTTP 200 and a body that is not JSON."""

    def __init__(self, content_type: str):
        body = b"<html><body>gateway page</body></html>"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("content_type", ["application/json", "text/html"])
def test_judge_answering_200_with_a_body_that_is_not_json(tmp_path, content_type, capsys, monkeypatch):
    """`python -m eval.score --judge openai` (its main, in this process) against a server answering 200 with an
    HTML page: exit 3 with one line, nothing written."""
    from _metric_helpers import header as run_header
    from _metric_helpers import row as metric_row
    from _metric_helpers import write_predictions
    from eval.score import main as score_main

    path = write_predictions(tmp_path / "p.jsonl", run_header(),
                             [metric_row("animal/test/000000/rel", "reliability", "A canine barks.")])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, HOST)
    judge = _NotJsonJudge(content_type)
    try:
        code = score_main([str(path), "--judge", "openai", "--base-url", judge.url, "--cache-dir",
                           str(tmp_path / "cache"), "--max-retries", "0"])
    finally:
        judge.close()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 3 and len(errors) == 1 and "not JSON" in errors[0], errors
    assert not path.with_name("p.results.json").exists()


@pytest.mark.parametrize("raw", ["1e999", "NaN"])
def test_non_finite_numbers_in_a_results_store_are_refused_naming_the_file(tmp_path, manifest, single, raw, capsys):
    from eval.leaderboard.__main__ import main as cli_main
    from eval.leaderboard.space import Board, SpaceConfig
    from eval.leaderboard.store import ResultsFormatError

    header, rows = single
    add_submission(write_submission_dir(tmp_path / "s", header, rows), manifest, LocalStore(tmp_path / "results"),
                   judge="offline")
    other = dict(header, method="ft_llm")
    add_submission(write_submission_dir(tmp_path / "t", other, rows), manifest, LocalStore(tmp_path / "results"),
                   judge="offline")
    stored = sorted((tmp_path / "results" / "results").glob("*.json"))
    text = stored[0].read_text()
    text, n = re.subn(r'"reliability": [0-9.]+', f'"reliability": {raw}', text, count=1)
    assert n == 1
    stored[0].write_text(text)
    with pytest.raises(ResultsFormatError, match=re.escape(stored[0].name)):
        LocalStore(tmp_path / "results").results()
    capsys.readouterr()
    assert cli_main(["build", str(tmp_path / "results"), "--out", str(tmp_path / "site")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and stored[0].name in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "site").exists()
    # the Space leaves the broken file out (and says so in its log) and serves the other rows
    board = Board(SpaceConfig(results_dir=str(tmp_path / "results"), queue_dir=str(tmp_path / "queue"),
                              judge="offline", queue_interval_s=0), manifest=manifest)
    table = board.table(paper_rows=False)
    assert len(table) == 1 and "inf" not in json.dumps(table).lower() and "nan" not in json.dumps(table).lower()


@pytest.mark.parametrize("size", [0, 20])
def test_wav_cut_to_a_few_bytes_names_the_member(tmp_path, size):
    import numpy as np
    import soundfile as sf

    from sake_dataset.audio import probe_audio
    from sake_dataset.records import SourceError

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(8000, dtype="float32"), 16000, format="WAV")
    cut = buffer.getvalue()[:size]
    for name, data in (("pool.zip:clips/dog_01.wav", cut), (str(tmp_path / "dog_02.wav"), None)):
        if data is None:
            Path(name).write_bytes(cut)
        with pytest.raises(SourceError) as info:
            probe_audio(name, data=data, field="audio")
        message = str(info.value)
        assert message.startswith(f"{name}: field 'audio' does not point to readable audio"), message
        assert f"({size} bytes)" in message or "empty (0 bytes)" in message
        assert "BytesIO" not in message and "0x" not in message and "\n" not in message


# ------------------------------------------------------------------------------------------------ the Space

def test_uploads_are_limited_per_address_and_swept_from_disk(tmp_path):
    """The upload route (behind :class:`UploadsOnly`) admits ``per_hour`` uploads from one client, then answers 429
    naming the limit while another client is still served (an IPv6 client counts by its /64); it counts the bytes as
    they arrive, so a body past its allowance (declared or chunked, with no length) is cut off before the app
    stores it; a sweep in a thread deletes uploads older than the time to live, the folders they leave empty, and
    their paths from the app's set of received uploads."""
    import asyncio

    from eval.leaderboard.upload_guard import UPLOAD_ROUTE, UploadGate, UploadsOnly

    served: list[tuple[str, int, bool]] = []

    async def app(scope, receive, send):  # reads the whole body, as Gradio's upload route does
        size, cut = 0, False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                cut = True
                break
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        served.append((scope["client"][0], size, cut))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    def upload(middleware, client: str, size: int = 1000, declared: bool = True, chunks: int = 1) -> int:
        headers = [(b"content-length", str(size).encode())] if declared else [(b"transfer-encoding", b"chunked")]
        scope = {"type": "http", "method": "POST", "path": UPLOAD_ROUTE, "client": (client, 1234), "headers": headers}
        parts = [b"x" * (size // chunks)] * chunks
        sent: list[dict] = []

        async def receive():
            body = parts.pop(0) if parts else b""
            return {"type": "http.request", "body": body, "more_body": bool(parts)}

        async def send(message):
            sent.append(message)

        asyncio.run(middleware(scope, receive, send))
        return sent[0]["status"]

    folder = tmp_path / "uploads"
    old, new = folder / ("a" * 64) / "old.zip", folder / ("b" * 64) / "new.zip"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 100)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    received = {str(old), str(new)}
    gate = UploadGate(folder, per_hour=3, ttl_s=3600, max_dir_bytes=10_000, max_request_bytes=5_000,
                      received=received)
    guarded = UploadsOnly(app, lambda path: None, gate=gate)
    assert [upload(guarded, ATTACKER) for _ in range(4)] == [200, 200, 200, 429]
    assert upload(guarded, VISITOR) == 200 and [c for c, _, _ in served] == [ATTACKER] * 3 + [VISITOR]
    deadline = time.monotonic() + 10
    while gate._sweeping and time.monotonic() < deadline:  # the first upload started the sweep
        time.sleep(0.05)
    assert not old.exists() and not old.parent.exists() and new.exists() and received == {str(new)}
    assert gate.admit(ATTACKER, 10).startswith("too many uploads from this address: at most 3 an hour")
    assert upload(guarded, HOST, size=6_000) == 429  # declared over the request's allowance
    served.clear()
    assert upload(guarded, HOST, size=8_000, declared=False, chunks=8) == 200  # chunked: counted as it arrives
    (client, size, cut), = served  # cut off at the chunk that passed its allowance (at most 5,000 bytes)
    assert client == HOST and cut and size <= 6_000
    v6 = [{"client": (f"2001:db8::{n}", 1)} for n in (1, 2)] + [{"client": ("2001:db8:0:1::1", 1)}]
    assert UploadGate.client_key(v6[0]) == UploadGate.client_key(v6[1]) != UploadGate.client_key(v6[2])
    assert UploadGate.client_key({"client": ("127.0.0.2", 1)}) == "127.0.0.2"


def test_a_submission_is_queued_once_and_the_queue_is_capped(tmp_path, manifest, single):
    """A valid upload already waiting in the queue is not queued again; a full queue refuses new ones (the
    submission is valid: try later); the queue status names at most ten pending submissions; every upload is
    deleted once read."""
    from eval.leaderboard.space import Board, SpaceConfig

    header, rows = single
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    board = Board(SpaceConfig(results_dir=str(tmp_path / "results"), queue_dir=str(tmp_path / "queue"),
                              judge="offline", queue_interval_s=0, upload_dir=str(uploads), max_pending=2),
                  manifest=manifest)
    first = board.submit(str(write_submission_zip(uploads / "a.zip", header, rows)))
    again = board.submit(str(write_submission_zip(uploads / "b.zip", header, rows)))
    assert first.startswith("Queued\n") and again.startswith("Already queued\n"), (first, again)
    other = dict(METADATA, submitter="Other Lab")
    assert board.submit(str(write_submission_zip(uploads / "c.zip", header, rows, other))).startswith("Queued\n")
    full = board.submit(str(write_submission_zip(uploads / "d.zip", header, rows, dict(other, license="mit"))))
    assert full.startswith("Not queued\n- the queue is full (2 submissions wait to be scored)"), full
    assert list(uploads.iterdir()) == []
    pending = tmp_path / "queue" / "pending"
    for n in range(12):
        (pending / f"20261207T0000{n:02d}-{n:020d}.zip").write_bytes(b"")
    status = board.queue_status()
    assert status.startswith("Pending (14): ") and status.splitlines()[0].endswith(" and 4 more"), status


def test_check_upload_accepts_only_regular_files_received_as_uploads(tmp_path):
    from eval.leaderboard.upload_guard import UploadRefused, check_upload

    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    good = uploads / "abc" / "s.zip"
    good.write_bytes(b"PK")
    os.mkfifo(uploads / "abc" / "fifo.zip")
    os.symlink("/etc/passwd", uploads / "abc" / "link.zip")
    (tmp_path / "outside.zip").write_bytes(b"PK")
    assert check_upload(str(good), uploads, 10) == good
    assert check_upload(str(good), uploads, 10, received={str(good)}) == good
    refused = [str(uploads / "abc" / "fifo.zip"), str(uploads / "abc" / "link.zip"), str(tmp_path / "outside.zip"),
               str(uploads / "abc" / ".." / ".." / "outside.zip"), "/etc/passwd", "/dev/zero", str(uploads),
               "http://127.0.0.1:1/x.zip", "", None, 7, {"path": "x"}, str(good) + "\0"]
    for path in refused:
        with pytest.raises(UploadRefused) as info:
            check_upload(path, uploads, 10)
        assert "/" not in str(info.value).replace("(or the upload route)", "")  # names no path
    with pytest.raises(UploadRefused, match="over the limit of 1 bytes"):
        check_upload(str(good), uploads, 1)
    with pytest.raises(UploadRefused):  # in the folder, but not one the upload route returned
        check_upload(str(good), uploads, 10, received=set())


class SpaceProcess:
    """`python -m eval.leaderboard.space` under uvicorn on 127.0.0.1 (its own process), with its own folders."""

    def __init__(self, root: Path, manifest: dict):
        (root / "manifest.json").write_text(json.dumps(manifest))
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            self.port = probe.getsockname()[1]
        self.root = root
        self.uploads = root / "gradio-uploads"
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOST": HOST, "PORT": str(self.port),
               "SAKE_RESULTS_DIR": str(root / "results"), "SAKE_QUEUE_DIR": str(root / "queue"),
               "SAKE_MANIFEST": str(root / "manifest.json"), "SAKE_JUDGE": "offline", "SAKE_QUEUE_INTERVAL": "0",
               "GRADIO_TEMP_DIR": str(self.uploads), "GRADIO_ANALYTICS_ENABLED": "False",
               "NO_PROXY": "127.0.0.0/8", "no_proxy": "127.0.0.0/8"}
        self.log = open(root / "space.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "eval.leaderboard.space"], cwd=root, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://{HOST}:{self.port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if http_get(self.url, "/", source=HOST, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Space did not start: {(root / 'space.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.log.close()


def http_get(url: str, path: str, source: str = VISITOR, timeout: float = 10) -> tuple[int, bytes]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout, source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def http_post(url: str, path: str, body: bytes, content_type: str = "application/json",
              timeout: float = 60) -> tuple[int, bytes]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout, source_address=(HOST, 0))
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Visitor:
    """Another client (its own address) loading the Space's page every 0.2 s; records the slowest load."""

    def __init__(self, url: str):
        self.url = url
        self.slowest = 0.0
        self.loads = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                status, _ = http_get(self.url, "/", timeout=10)
                if status != 200:
                    self.failures.append(f"HTTP {status}")
            except OSError as exc:
                self.failures.append(type(exc).__name__)
            self.slowest = max(self.slowest, time.perf_counter() - start)
            self.loads += 1
            self._stop.wait(0.2)

    def __enter__(self) -> "Visitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def submit_through_api(space: SpaceProcess, archive: Path) -> str:
    """Upload `archive` (Gradio's upload route), call the submit endpoint with it, return the answer text."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{archive.name}"\r\n'
            "Content-Type: application/zip\r\n\r\n").encode() + archive.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, answer = http_post(space.url, "/gradio_api/upload", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200, answer
    paths = json.loads(answer)
    return call_submit(space, {"path": paths[0], "meta": {"_type": "gradio.FileData"}, "orig_name": archive.name})


def call_submit(space: SpaceProcess, file_data: object) -> str:
    status, answer = http_post(space.url, "/gradio_api/call/submit", json.dumps({"data": [file_data]}).encode())
    if status != 200:
        return f"HTTP {status}: {answer.decode()}"
    event = json.loads(answer)["event_id"]
    status, stream = http_get(space.url, f"/gradio_api/call/submit/{event}", source=HOST, timeout=60)
    match = re.search(r"event: complete\ndata: (.*)\n", stream.decode())
    assert match, stream
    return json.loads(match.group(1))[0]


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    process = SpaceProcess(tmp_path_factory.mktemp("space"), make_manifest())
    try:
        # Gradio's first API call builds its API description in the event loop (about a second, once per
        # process) and the first upload starts the validation worker: both here, so that the timings below are
        # those of the inputs
        assert call_submit(process, None) == "Choose a submission .zip first."
        empty = process.root / "empty.zip"
        zipfile.ZipFile(empty, "w").close()
        assert submit_through_api(process, empty).startswith("Rejected\n")
        yield process
    finally:
        process.stop()


def test_submit_endpoint_opens_only_uploads(space, tmp_path):
    """Server paths, /dev/zero, a FIFO and a URL named in a call of the submit endpoint are refused at once,
    nothing is copied into Gradio's folders, and Gradio serves no file of the server."""
    fifo = tmp_path / "submission.zip"
    os.mkfifo(fifo)
    secret = tmp_path / "secret.zip"
    secret.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    named = [str(REPO / "eval" / "leaderboard" / "space.py"), "/etc/passwd", "/dev/zero", str(fifo), str(secret),
             "http://127.0.0.1:1/s.zip", str(space.uploads / ".." / "results")]
    with Visitor(space.url) as visitor:
        for path in named:
            for file_data in ({"path": path, "meta": {"_type": "gradio.FileData"}}, {"path": path}):
                start = time.perf_counter()
                answer = call_submit(space, file_data)
                assert time.perf_counter() - start < 1.0, (path, answer)
                assert answer.startswith("HTTP 403") and "not a file uploaded to this Space" in answer, answer
                assert path not in answer
            for route in (f"/gradio_api/file={path}", f"/file={path}"):
                assert http_get(space.url, route)[0] in (403, 404), route  # 404: no such route
    assert visitor.loads > 0 and not visitor.failures and visitor.slowest < 2.0, vars(visitor)
    copied = [p.name for p in space.uploads.rglob("*") if p.is_file()] if space.uploads.exists() else []
    assert not {"passwd", "zero", "space.py", "submission.zip", "secret.zip"} & set(copied), copied
    # a body that is not JSON, or one too large to be a call, is refused as well
    assert http_post(space.url, "/gradio_api/call/submit", b"{not json")[0] == 400
    assert http_post(space.url, "/gradio_api/queue/join", b"[" + b" " * (2 << 20) + b"]")[0] == 413
    # the answer boxes are plain text, not Markdown or HTML
    config = json.loads(http_get(space.url, "/config")[1])
    kinds = {c["props"].get("elem_id"): c["type"] for c in config["components"]}
    assert kinds["submit-result"] == kinds["queue-status"] == "textbox"


def _hostile_archives(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (zip, what the answer says): small archives that unpack to the hostile inputs."""
    manifest = make_manifest()
    header, rows = make_header(manifest), make_rows(manifest)
    cases = _line_cases(header, rows[0])
    out = {}
    for name in ("brackets, then an unterminated string of escaped quotes", "nesting 2,000,000 deep",
                 "500 options of 8 KB (the 28 s row)", "a header with 450,000 distinct configs",
                 "a header with 9,000 distinct configs (JSON Schema's uniqueItems is quadratic)",
                 "two duplicate keys of 2 MB"):
        line1, line2, expected = cases[name]
        path = root / f"{len(out)}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(PREDICTIONS_NAME, line1 + b"\n" + line2 + b"\n")
            archive.writestr(METADATA_NAME, json.dumps(METADATA))
        out[name] = (path, expected)
    out["a corrupt deflate stream"] = (_corrupt_deflate_zip(root / "deflate.zip", header, rows), "unreadable")
    out["21,000 members"] = (_many_members_zip(root / "members.zip", 21_000), "member(s)")
    bomb = root / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(PREDICTIONS_NAME, b"\0" * (60 << 20))
        archive.writestr(METADATA_NAME, json.dumps(METADATA))
    out["60 MB of zeros in 60 KB"] = (bomb, "over the limit")
    quadratic_case = copy.deepcopy(rows)
    quadratic_case[0]["reference"] = " "
    out["a whitespace reference"] = (write_submission_zip(root / "ref.zip", header, quadratic_case), "'reference'")
    return out


def test_hostile_uploads_are_answered_while_another_client_is_served(space, tmp_path):
    for name, (archive, expected) in _hostile_archives(tmp_path).items():
        with Visitor(space.url) as visitor:
            answer = submit_through_api(space, archive)
        assert answer.startswith("Rejected\n") and expected in answer, (name, answer[:500])
        assert str(space.root) not in answer and len(answer) < 4000, (name, answer[:500])
        assert visitor.loads > 0 and not visitor.failures and visitor.slowest < 2.0, (name, vars(visitor))
    manifest = make_manifest()
    good = write_submission_zip(tmp_path / "good.zip", make_header(manifest), make_rows(manifest))
    assert submit_through_api(space, good).startswith("Queued\n")


@pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="needs Debian's chromium and chromium-driver")
def test_rejection_text_is_plain_text_in_a_browser(space, tmp_path):
    """Markdown and HTML in a rejected submission's values (and in an error of the queue) reach a visitor's
    browser as text: no image is loaded, no link or element is made from them."""
    from selenium.webdriver.support.ui import WebDriverWait

    evil = "![pixel](https://evil.example/p.png) [claim your rank](https://evil.example/claim) <img src=x>"
    manifest = make_manifest()
    archive = write_submission_zip(tmp_path / "evil.zip", make_header(manifest), make_rows(manifest),
                                   metadata=dict(METADATA, model_link=evil))
    rejected = space.root / "queue" / "rejected"
    rejected.mkdir(parents=True, exist_ok=True)
    (rejected / "old.zip.error.txt").write_text(f"JudgeError: {evil}\n")
    driver = chromium_driver(tmp_path / "profile", window_size="1400,1000", page_load_timeout=60)
    try:
        wait = WebDriverWait(driver, 60, poll_frequency=0.1)
        driver.get(space.url + "/")
        tab = wait.until(lambda d: next((b for b in d.find_elements("css selector", "button[role=tab]")
                                         if b.text.strip() == "Submit"), None))
        tab.click()
        wait.until(lambda d: d.find_element("css selector", "#submission-file input[type=file]")).send_keys(
            str(archive))
        wait.until(lambda d: "evil" in d.find_element("id", "submission-file").text)
        driver.find_element("id", "submit-button").click()
        answer = wait.until(lambda d: d.find_element("css selector", "#submit-result textarea")
                            .get_attribute("value").strip() or None)
        status = wait.until(lambda d: "old.zip" in d.find_element("css selector", "#queue-status textarea")
                            .get_attribute("value") and d.find_element("css selector", "#queue-status textarea")
                            .get_attribute("value"))
        assert answer.startswith("Rejected\n") and "field model_link" in answer and "![pixel](https" in answer
        assert "[claim your rank](https://evil.example/claim) <img src=x>" in status
        made = driver.execute_script(
            "return Array.from(document.querySelectorAll('#submit-result *, #queue-status *')).filter("
            "function (e) { return ['IMG', 'A', 'B', 'SCRIPT', 'IFRAME'].indexOf(e.tagName) >= 0; }).length")
        assert made == 0
        images = driver.execute_script("return Array.from(document.images).map(function (i) { return i.src; })")
        assert not [src for src in images if "evil.example" in src or src.endswith("/x")]
    finally:
        driver.quit()


def test_half_open_connections_from_one_address_leave_others_served(space):
    """1,100 connections from 127.0.0.2 that send half a request head: the server closes those over the
    per-address cap at once, and a client at 127.0.0.3 loads the page within 2 s meanwhile."""
    from eval.leaderboard.serve import MAX_CONNECTIONS_PER_CLIENT

    attackers: list[socket.socket] = []
    try:
        for _ in range(1100):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((ATTACKER, 0))
            sock.settimeout(5)
            sock.connect((HOST, space.port))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
            attackers.append(sock)
        start = time.perf_counter()
        status, page = http_get(space.url, "/", source=VISITOR, timeout=10)
        elapsed = time.perf_counter() - start
        assert status == 200 and b"SAKE leaderboard" in page and elapsed < 2.0, (status, elapsed)
        closed = 0
        deadline = time.monotonic() + 5
        for sock in attackers:
            sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                closed += sock.recv(1) == b""
            except socket.timeout:
                pass
            except OSError:
                closed += 1
        assert closed >= 1100 - MAX_CONNECTIONS_PER_CLIENT, closed
    finally:
        for sock in attackers:
            sock.close()


def test_the_metric_page_scores_a_few_runs_an_hour_with_the_paper_judge(monkeypatch):
    """Each undecided row of a paper-protocol scoring costs the metric Space's judge key a call: an hourly budget
    of rows refuses a file that would pass it, in one line that says how to score instead."""
    from eval import metric_space

    monkeypatch.setattr(metric_space, "PAPER_ROWS_PER_HOUR", 100)
    monkeypatch.setattr(metric_space, "_paper_runs", __import__("collections").deque())
    metric_space._paper_budget(60)
    metric_space._paper_budget(40)
    with pytest.raises(ValueError, match="at most 100 rows an hour with the paper protocol .*100 used, this file has 1"):
        metric_space._paper_budget(1)


def test_item_pages_wait_for_the_worker_briefly():
    """A call of a busy worker process waits at most ``wait_s`` (then TimeoutError), so an item page request never
    holds a server thread for long behind another visitor's parse."""
    import threading

    from eval.leaderboard.space import Isolated

    worker = Isolated({}, timeout_s=30)
    try:
        slow = threading.Thread(target=worker, args=(time.sleep, 3.0))
        slow.start()
        time.sleep(0.5)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="the worker is busy"):
            worker(time.sleep, 0.0, wait_s=0.2)
        assert time.monotonic() - start < 2.0
        slow.join()
        assert worker(time.sleep, 0.0, wait_s=1.0) is None
    finally:
        worker.close()
