"""Leaderboard robustness: strict reader limits shared by validate and add, a queue no submission can stall,
serialized adds of one id, readers never see a result without its files, leftovers of killed adds cleaned."""
from __future__ import annotations

import json
import multiprocessing
import re
import struct
import threading
import zipfile
from pathlib import Path

import pytest

from _leaderboard_helpers import (METADATA, fake_scorer, jsonl_bytes, make_header,
                                  write_submission_dir, write_submission_zip)
from eval.leaderboard.store import LocalStore, add_submission, process_queue, result_protocol
from eval.leaderboard.validate import SubmissionError, validate_submission
from eval.sake_metric.limits import MAX_HEADER_DEPTH, MAX_LINE_BYTES


def _raw_submission(path: Path, predictions: bytes, metadata: bytes | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "predictions.jsonl").write_bytes(predictions)
    (path / "metadata.json").write_bytes(metadata if metadata is not None else json.dumps(METADATA).encode())
    return path


def _header_line(header: dict, **raw_fields: str) -> bytes:
    """The header as JSON with some fields replaced by raw JSON text (e.g. NaN, deep nesting)."""
    text = json.dumps(header, sort_keys=True)
    for key, raw in raw_fields.items():
        text = text[:-1] + f', "{key}": {raw}}}'
    return text.encode()


def _predictions(header_line: bytes, rows: list[dict]) -> bytes:
    return header_line + b"\n" + b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)


@pytest.mark.parametrize("raw, needle", [
    ("NaN", "NaN is not allowed"), ("Infinity", "Infinity is not allowed"), ("-Infinity", "Infinity is not"),
    ("1e999", "not finite"), ("1" * 5000, "an integer with 5000 digits"), ("[" * 985 + "]" * 985, "JSON nested"),
    ('"\\ud800"', "unpaired UTF-16 surrogate"),
], ids=["nan", "inf", "-inf", "overflow", "5000-digits", "985-deep", "surrogate"])
def test_validate_and_add_reject_the_same_limits(tmp_path, manifest, single, raw, needle):
    header, rows = single
    sub = _raw_submission(tmp_path / "s", _predictions(_header_line(header, extra=raw), rows))
    with pytest.raises(SubmissionError, match="line 1") as info:
        validate_submission(sub, manifest)
    assert needle in str(info.value)
    store = LocalStore(tmp_path / "results")
    with pytest.raises(SubmissionError):
        add_submission(sub, manifest, store, judge="offline", scorer=fake_scorer)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json*"))


def test_hparams_nesting_and_line_length(tmp_path, manifest, single):
    header, rows = single
    deep = header | {"hparams": json.loads("{\"a\":" * MAX_HEADER_DEPTH + "1" + "}" * MAX_HEADER_DEPTH)}
    error = str(pytest.raises(SubmissionError, validate_submission,
                              write_submission_dir(tmp_path / "d", deep, rows), manifest).value)
    assert "predictions.jsonl line 1: JSON nested" in error
    long_rows = [dict(rows[0], post_edit="x" * (MAX_LINE_BYTES + 1))] + rows[1:]
    error = str(pytest.raises(SubmissionError, validate_submission,
                              write_submission_dir(tmp_path / "l", header, long_rows), manifest).value)
    assert "line 2: longer than" in error
    ok = [dict(rows[0], post_edit="\U0001F600 " * 10)] + rows[1:]  # a paired surrogate escape is fine
    assert validate_submission(write_submission_dir(tmp_path / "ok", header, ok), manifest).rows[0]["post_edit"]


def _zip_bad_crc(path: Path, header, rows) -> Path:
    write_submission_zip(path, header, rows)
    data = bytearray(path.read_bytes())
    # corrupt the stored CRC-32 of the first member's local header (offset 14) and its central directory entry
    crc_local = struct.unpack_from("<I", data, 14)[0]
    data[14:18] = struct.pack("<I", crc_local ^ 0xFFFFFFFF)
    central = data.find(b"PK\x01\x02")
    data[central + 16:central + 20] = struct.pack("<I", crc_local ^ 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def _zip_unknown_method(path: Path, header, rows) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("predictions.jsonl", jsonl_bytes(header, rows))
        archive.writestr("metadata.json", json.dumps(METADATA))
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # compression method field
        start = 0
        while (start := data.find(signature, start)) != -1:
            data[start + offset:start + offset + 2] = struct.pack("<H", 99)
            start += 4
    path.write_bytes(bytes(data))
    return path


def test_queue_goes_on_past_any_failure(tmp_path, manifest, single):
    header, rows = single
    pending = tmp_path / "queue" / "pending"
    pending.mkdir(parents=True)
    _zip_bad_crc(pending / "a_bad_crc.zip", header, rows)
    _zip_unknown_method(pending / "b_method.zip", header, rows)
    with zipfile.ZipFile(pending / "c_deep.zip", "w") as archive:
        archive.writestr("predictions.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n")
        archive.writestr("metadata.json", json.dumps(METADATA))
    with zipfile.ZipFile(pending / "d_bigint.zip", "w") as archive:
        archive.writestr("predictions.jsonl", _predictions(_header_line(header, seed2="9" * 5000), rows))
        archive.writestr("metadata.json", json.dumps(METADATA))
    (pending / "e_not_a_zip.zip").write_bytes(b"PK\x03\x04 garbage")
    write_submission_zip(pending / "f_good.zip", header, rows)
    write_submission_zip(pending / "g_scorer_dies.zip", make_header(manifest, method="ft_llm"), rows)

    def scorer(path, **kwargs):
        if json.loads(Path(path).read_text().splitlines()[0])["method"] == "ft_llm":
            raise RuntimeError("judge API down\nsecond line")
        return fake_scorer(path, **kwargs)

    outcomes = dict(process_queue(tmp_path / "queue", manifest, LocalStore(tmp_path / "results"),
                                  judge="offline", scorer=scorer))
    assert outcomes["f_good.zip"].startswith("added ")
    rejected = sorted(n for n, o in outcomes.items() if o == "rejected")
    assert rejected == ["a_bad_crc.zip", "b_method.zip", "c_deep.zip", "d_bigint.zip", "e_not_a_zip.zip",
                        "g_scorer_dies.zip"]
    assert not list(pending.iterdir())
    for name in rejected:
        error = (tmp_path / "queue" / "rejected" / f"{name}.error.txt").read_text()
        assert error.count("\n") == 1 and error.strip(), name
    errors = {n: (tmp_path / "queue" / "rejected" / f"{n}.error.txt").read_text() for n in rejected}
    assert "unreadable" in errors["a_bad_crc.zip"] and "unreadable" in errors["b_method.zip"]
    assert "JSON nested" in errors["c_deep.zip"] and "5000 digits" in errors["d_bigint.zip"]
    assert errors["g_scorer_dies.zip"] == "RuntimeError: judge API down | second line\n"

    # The same name rejected again (an upload retried) keeps both archives and both errors.
    write_submission_zip(pending / "g_scorer_dies.zip", make_header(manifest, method="ft_llm"), rows[:-1])
    process_queue(tmp_path / "queue", manifest, LocalStore(tmp_path / "results"), judge="offline", scorer=scorer)
    again = (tmp_path / "queue" / "rejected" / "g_scorer_dies.zip.1.error.txt").read_text()
    assert "expected item ids missing" in again and (tmp_path / "queue" / "rejected" / "g_scorer_dies.zip.1").is_file()
    assert errors["g_scorer_dies.zip"] == (tmp_path / "queue" / "rejected" / "g_scorer_dies.zip.error.txt").read_text()


def _add_in_process(args):
    sub, manifest, root = args
    return add_submission(sub, manifest, LocalStore(root), judge="offline", scorer=fake_scorer).status


def test_concurrent_adds_of_one_id_add_once(tmp_path, manifest, single):
    header, rows = single
    sub = write_submission_dir(tmp_path / "s", header, rows)
    root = tmp_path / "results"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        statuses = pool.map(_add_in_process, [(sub, manifest, root)] * 4)
    assert sorted(statuses) == ["added", "exists", "exists", "exists"]
    results = list((root / "results").glob("*.json"))
    assert len(results) == 1 and (root / "submissions" / results[0].stem / "predictions.jsonl").is_file()


def test_reader_never_sees_a_result_without_its_files(tmp_path, manifest, single):
    header, rows = single
    root = tmp_path / "results"
    subs = [write_submission_dir(tmp_path / f"s{i}", header, rows, METADATA | {"description": f"run {i}"})
            for i in range(8)]
    seen_bad, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            for result in (root / "results").glob("*.json") if (root / "results").is_dir() else []:
                folder = root / "submissions" / result.stem
                if not ((folder / "predictions.jsonl").is_file() and (folder / "metadata.json").is_file()):
                    seen_bad.append(result.stem)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        threads = [threading.Thread(target=add_submission, args=(s, manifest, LocalStore(root)),
                                    kwargs={"judge": "offline", "scorer": fake_scorer}) for s in subs * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        thread.join()
    assert not seen_bad
    assert len(list((root / "results").glob("*.json"))) == 8


def test_leftovers_of_a_killed_add_are_cleaned(tmp_path, manifest, single):
    header, rows = single
    sub = write_submission_dir(tmp_path / "s", header, rows)
    sid = validate_submission(sub, manifest).submission_id
    root = tmp_path / "results"
    (root / "submissions" / f".{sid}.abc").mkdir(parents=True)  # staging folder of a killed add
    (root / "submissions" / sid).mkdir()  # files moved in, result never written
    (root / "submissions" / sid / "predictions.jsonl").write_bytes(b"stale")
    (root / "results").mkdir()
    (root / "results" / f".{sid}.json.xyz.tmp").write_bytes(b"half")
    assert add_submission(sub, manifest, LocalStore(root), judge="offline", scorer=fake_scorer).status == "added"
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".locks" not in p.parts)
    assert names == ["results", f"results/{sid}.json", "submissions", f"submissions/{sid}",
                     f"submissions/{sid}/metadata.json", f"submissions/{sid}/predictions.jsonl"]
    assert (root / "submissions" / sid / "predictions.jsonl").read_bytes() != b"stale"


def test_protocol_label_from_results():
    assert result_protocol({"judge": {"protocol": "paper+choice", "name": "openai"}}) == "paper+choice"
    assert result_protocol({"judge": {"name": "offline"}}) == "offline"
    assert result_protocol({"judge": {"name": "openai", "stage_share": {"exact": 0.5, "llm": 0.5}}}) == "paper"
    assert result_protocol({"judge": {"name": "openai", "stage_share": {"choice": 0.2}}}) == "paper+choice"


def test_two_queue_runs_at_once_process_each_entry_once(tmp_path, manifest, single):
    header, rows = single
    pending = tmp_path / "queue" / "pending"
    pending.mkdir(parents=True)
    for n in range(3):
        write_submission_zip(pending / f"s{n}.zip", header, rows, METADATA | {"description": f"run {n}"})
    results, failures = [], []

    def run():
        try:
            results.extend(process_queue(tmp_path / "queue", manifest, LocalStore(tmp_path / "results"),
                                         judge="offline", scorer=fake_scorer))
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert sorted(name for name, _ in results) == ["s0.zip", "s1.zip", "s2.zip"]
    assert all(outcome.startswith("added ") for _, outcome in results)
    assert sorted(p.name for p in (tmp_path / "queue" / "done").iterdir()) == ["s0.zip", "s1.zip", "s2.zip"]


def test_non_finite_numbers_are_never_stored_or_read(tmp_path, manifest, single):
    from eval.leaderboard.build import read_results
    from eval.leaderboard.store import ResultsFormatError

    header, rows = single
    sub = write_submission_dir(tmp_path / "s", header, rows)

    def nan_scorer(path, **kwargs):
        result = fake_scorer(path, **kwargs)
        result["metrics"]["overall"]["reliability"] = float("nan")
        return result

    pending = tmp_path / "queue" / "pending"
    pending.mkdir(parents=True)
    write_submission_zip(pending / "nan.zip", header, rows)
    assert process_queue(tmp_path / "queue", manifest, LocalStore(tmp_path / "results"), judge="offline",
                         scorer=nan_scorer) == [("nan.zip", "rejected")]
    assert "metrics.overall.reliability must be a finite number" in \
        (tmp_path / "queue" / "rejected" / "nan.zip.error.txt").read_text()
    assert not list((tmp_path / "results").rglob("*.json"))
    add_submission(sub, manifest, LocalStore(tmp_path / "results"), judge="offline", scorer=fake_scorer)
    stored = next((tmp_path / "results" / "results").glob("*.json"))
    text, n = re.subn(r'"reliability": [0-9.]+', '"reliability": NaN', stored.read_text(), count=1)
    assert n == 1
    stored.write_text(text)
    with pytest.raises(ResultsFormatError, match=f"{stored.name}: NaN is not valid JSON"):
        read_results(tmp_path / "results")
