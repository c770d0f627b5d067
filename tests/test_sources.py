"""Source readers on small fixtures of the real layouts; bad input stops the build with a named error and leaves an
earlier output folder untouched."""

from __future__ import annotations

import csv
import shutil

import pytest
from _dataset_helpers import DSUPERB_TASKS, SMALL, TRACKS, tree_digest, write_sources

import build_splits
from sake_dataset.builder import build
from sake_dataset.records import SourceError
from sake_dataset.sources import read_dynamic_superb, read_mmlu, read_sakura


@pytest.fixture(scope="module")
def good_sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture()
def sources(good_sources, tmp_path):
    """A private copy of the fixture sources that a test may break."""
    out = {}
    for key, path in good_sources.items():
        out[key] = tmp_path / "src" / key
        shutil.copytree(path, out[key])
    return out


@pytest.fixture()
def previous(good_sources, tmp_path):
    """An earlier good build in tmp_path/out, and the digest of its files."""
    out = tmp_path / "out"
    build(good_sources["sakura"], good_sources["dynamic_superb"], good_sources["mmlu"], out, seed=3, **SMALL)
    return out, tree_digest(out)


def test_readers_normalize_records(good_sources):
    clips = read_sakura(good_sources["sakura"])
    assert len(clips) == 4 * (9 + 5 + 2 + 8)
    emotion = [c for c in clips if c.attribute == "emotion"]
    assert {c.label for c in emotion} == {"happy", "disgust", "sad", "fear", "angry"}  # "Happy" -> "happy"
    clip = emotion[0]
    assert clip.answer in clip.options and clip.source.startswith("sakura:Emotion/")
    assert len(clip.audio.sha256) == 64 and 0.1 < clip.audio.duration < 0.2
    tasks = read_dynamic_superb(good_sources["dynamic_superb"])
    assert {t.task for t in tasks} == set(DSUPERB_TASKS)
    sarcasm = [t for t in tasks if t.task == "SarcasmDetection_Mustard"]
    assert sarcasm[0].source == "dsuperb:SarcasmDetection_Mustard/SarcasmDetection_Mustard_000.wav"
    assert [t.label for t in sarcasm] == ["yes", "no"] * 3  # table order
    counting = [t for t in tasks if t.task == "SpeakerCounting_LibriTTS-TestClean"]  # audio beside the table
    assert len(counting) == 6 and all(0.1 < t.audio.duration < 0.2 for t in counting)
    texts = read_mmlu(good_sources["mmlu"])
    assert len(texts) == 12 and texts[0].choices[texts[0].answer_index] == "0"


def _rewrite_csv(path, edit):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def _break(kind, sources):
    meta = sources["sakura"] / TRACKS["emotion"] / "metadata.csv"
    with open(meta, newline="", encoding="utf-8") as f:
        first = list(csv.reader(f))[1][0]
    audio = sources["sakura"] / TRACKS["emotion"] / "audio" / first
    if kind == "missing file":
        audio.unlink()
        return [first, "file"]
    if kind == "missing column":
        _rewrite_csv(meta, lambda rows: [r[:3] + r[4:] for r in rows])
        return ["metadata.csv", "single_answer"]
    if kind == "unknown label":
        _rewrite_csv(meta, lambda rows: [rows[0], [rows[1][0], "bored", *rows[1][2:]], *rows[2:]])
        return ["metadata.csv:2", "attribute_label", "bored"]
    if kind == "corrupt audio":
        audio.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
        return [first, "readable audio"]
    if kind == "mmlu missing column":
        import pyarrow.parquet as pq

        path = sources["mmlu"] / "all" / "test-00000-of-00001.parquet"
        pq.write_table(pq.read_table(path).drop(["subject"]), path)
        return ["test-00000-of-00001.parquet", "subject"]
    if kind == "dynamic-superb missing file":
        task = sources["dynamic_superb"] / "SpeakerCounting_LibriTTS-TestClean"
        (task / "SpeakerCounting_LibriTTS-TestClean_000.wav").unlink()
        return ["SpeakerCounting_LibriTTS-TestClean_000.wav", "metadata.csv:2", "file"]
    if kind == "non-utf8 table":
        raw = meta.read_bytes()
        meta.write_bytes(raw[:30] + b"\xff" + raw[31:])
        return ["metadata.csv", "byte offset 30", "UTF-8"]
    if kind == "truncated wav":
        audio.write_bytes(audio.read_bytes()[:60])
        return [first, "truncated WAV"]
    if kind == "too short":
        import numpy as np
        import soundfile as sf

        sf.write(audio, np.zeros(40, dtype="float32"), 8000, subtype="PCM_16")
        return [first, "5.0 ms long", "at least 0.1 s"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing file", "missing column", "unknown label", "corrupt audio",
                                  "mmlu missing column", "dynamic-superb missing file", "non-utf8 table",
                                  "truncated wav", "too short"])
def test_bad_input_named_error_and_previous_output_intact(kind, sources, previous):
    out, digest = previous
    expected = _break(kind, sources)
    with pytest.raises(SourceError) as err:
        build(sources["sakura"], sources["dynamic_superb"], sources["mmlu"], out, seed=3, **SMALL)
    for needle in expected:
        assert needle in str(err.value), (needle, str(err.value))
    assert tree_digest(out) == digest
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "src"]  # no temp folder left behind
    assert "\n" not in str(err.value)  # one line


def test_cli_reports_bad_input_and_keeps_output(sources, previous, capsys):
    out, digest = previous
    _break("unknown label", sources)
    argv = ["--sakura", str(sources["sakura"]), "--dynamic-superb", str(sources["dynamic_superb"]), "--mmlu",
            str(sources["mmlu"]), "--out", str(out), "--test-per-attribute", "2", "--train-per-attribute", "2",
            "--sequences", "1", "--sequence-length", "3", "--quiet"]
    assert build_splits.main(argv) == 2
    assert "attribute_label" in capsys.readouterr().err
    assert tree_digest(out) == digest


def test_cli_builds_from_paths(good_sources, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--sakura", str(good_sources["sakura"]), "--dynamic-superb", str(good_sources["dynamic_superb"]),
            "--mmlu", str(good_sources["mmlu"]), "--out", str(out), "--test-per-attribute", "2",
            "--train-per-attribute", "2", "--sequences", "1", "--sequence-length", "3", "--quiet"]
    assert build_splits.main(argv) == 0
    assert "| Test | 8 | 70 | 78 |" in capsys.readouterr().out
    assert (out / "sequential" / "test-00000-of-00001.parquet").is_file()


def test_rebuild_replaces_previous_output(good_sources, previous):
    out, digest = previous
    build(good_sources["sakura"], good_sources["dynamic_superb"], good_sources["mmlu"], out, seed=4, **SMALL)
    assert tree_digest(out) != digest
