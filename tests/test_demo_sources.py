"""Checks of the committed demo sources (sake_dataset/demo_sources) and the portability knowledge file.

The audio is not regenerated here (espeak-ng may be missing); the text parts are, and must match the committed files.
"""

from __future__ import annotations

import copy
import csv
import io
import re
import wave
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tools import make_demo_sources as mds

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sake_dataset" / "demo_sources"
KNOWLEDGE = ROOT / "sake_dataset" / "portability_knowledge.yaml"
OPTION_RE = re.compile(r"\(([a-z])\) ")

TRACK_LABELS = {
    "Animal": ["dog", "cat", "pig", "cow", "frog", "hen", "rooster", "sheep", "crow"],
    "Emotion": ["happy", "disgust", "sad", "fear", "angry"],
    "Gender": ["male", "female"],
    "Language": ["English", "German", "Spanish", "French", "Italian", "Chinese", "Japanese", "Korean"],
}


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def parse_options(instruction: str) -> list[str]:
    """Option texts of `... (a) x (b) y ...` in order; the letters must run a, b, c, ..."""
    parts = OPTION_RE.split(instruction)
    letters = parts[1::2]
    assert letters == [chr(ord("a") + i) for i in range(len(letters))], instruction
    return [text.strip() for text in parts[2::2]]


def check_answer(instruction: str, answer: str) -> str:
    options = parse_options(instruction)
    match = re.fullmatch(r"\(([a-z])\) (.+)", answer)
    assert match, f"answer {answer!r} is not '(x) text'"
    index = ord(match.group(1)) - ord("a")
    assert options[index] == match.group(2), (instruction, answer)
    return match.group(2)


@pytest.fixture(scope="module")
def knowledge() -> dict:
    with open(KNOWLEDGE, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


# ------------------------------------------------------------------------------------------------ knowledge


def test_knowledge_file_is_valid(knowledge):
    assert mds.knowledge_problems(knowledge) == []
    for attribute, labels in mds.ATTRIBUTE_LABELS.items():
        categories = knowledge[attribute]["categories"]
        assert sorted(categories) == sorted(mds.KNOWLEDGE_CATEGORIES[attribute])
        for block in categories.values():
            assert set(block["answers"]) == set(labels)
            if attribute != "gender":  # gender has 2 labels; its 3rd+ texts come from `alternatives`
                assert len(set(block["answers"].values())) >= 3


def test_gender_answers_differ_everywhere(knowledge):
    for category, block in knowledge["gender"]["categories"].items():
        assert block["answers"]["male"] != block["answers"]["female"], category
        assert len(block["alternatives"]["male"]) + 1 >= 3 and len(block["alternatives"]["female"]) + 1 >= 3


def test_knowledge_check_catches_problems(knowledge):
    broken = copy.deepcopy(knowledge)
    for block in broken["animal"]["categories"].values():
        block["answers"]["hen"] = block["answers"]["rooster"]
    assert any("hen and rooster" in p for p in mds.knowledge_problems(broken))
    broken = copy.deepcopy(knowledge)
    del broken["language"]["categories"]["dish"]["answers"]["Korean"]
    assert any("language/dish" in p for p in mds.knowledge_problems(broken))
    broken = copy.deepcopy(knowledge)
    broken["emotion"]["categories"]["scenario"]["answers"] = {e: "x" for e in mds.EMOTIONS}
    assert any("emotion/scenario" in p for p in mds.knowledge_problems(broken))


# ------------------------------------------------------------------------------------------------ SAKURA


@pytest.mark.parametrize("track", list(TRACK_LABELS))
def test_sakura_track_layout(track, knowledge):
    columns, rows = read_csv(DEMO / "sakura" / track / "metadata.csv")
    assert columns == ["file", "attribute_label", "single_instruction", "single_answer", "multi_instruction",
                       "multi_answer"]
    labels = TRACK_LABELS[track]
    assert sorted({r["attribute_label"] for r in rows}) == sorted(labels)
    attribute = track.lower()
    categories = knowledge[attribute]["categories"]
    for label in labels:
        assert sum(r["attribute_label"] == label for r in rows) == 8
    assert len({r["file"] for r in rows}) == len(rows)
    for row in rows:
        assert (DEMO / "sakura" / track / "audio" / row["file"]).is_file(), row["file"]
        single = check_answer(row["single_instruction"], row["single_answer"])
        options = parse_options(row["single_instruction"])
        if track == "Gender":
            assert options == ["Female", "Male"] and single == row["attribute_label"].capitalize()
        else:
            assert len(options) == 4 and len(set(options)) == 4 and set(options) <= set(labels)
            assert single == row["attribute_label"]
        multi = check_answer(row["multi_instruction"], row["multi_answer"])
        multi_options = parse_options(row["multi_instruction"])
        assert len(multi_options) == 4 and len(set(multi_options)) == 4
        question = row["multi_instruction"].split(" (a) ")[0]
        matching = [c for c, block in categories.items() if question in block["questions"]]
        assert matching, question
        assert any(categories[c]["answers"][row["attribute_label"]] == multi for c in matching)
    assert {f.name for f in (DEMO / "sakura" / track / "audio").iterdir()} == {r["file"] for r in rows}


def test_all_wavs_are_16k_mono_short():
    wavs = sorted(DEMO.rglob("*.wav"))
    assert len(wavs) >= 200  # plus the Dynamic-SUPERB clips inside their Parquet tables
    for path in wavs:
        with wave.open(str(path), "rb") as handle:
            assert (handle.getframerate(), handle.getnchannels(), handle.getsampwidth()) == (16000, 1, 2), path
            seconds = handle.getnframes() / 16000
            assert 0.8 <= seconds <= 2.0, (path, seconds)
            assert handle.getnframes() > 0


def test_demo_sources_size_limit():
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024, total


# --------------------------------------------------------------------------------------- Dynamic-SUPERB


def test_dynamic_superb_tasks():
    """Phase-2 release layout: <Task>/data/test-00000-of-00001.parquet with a datasets Audio column."""
    tasks = sorted(p.name for p in (DEMO / "dynamic_superb").iterdir() if p.is_dir())
    table = yaml.safe_load((DEMO / "dynamic_superb_tasks.yaml").read_text(encoding="utf-8"))["tasks"]
    assert sorted(table) == tasks
    unrelated = []
    for task in tasks:
        parquet = pq.read_table(DEMO / "dynamic_superb" / task / "data" / "test-00000-of-00001.parquet")
        assert parquet.column_names == ["file", "audio", "instruction", "label"]
        assert b"Audio" in parquet.schema.metadata[b"huggingface"]  # a datasets Audio feature
        rows = parquet.to_pylist()
        for row in rows:
            assert row["label"].lower() in row["instruction"].lower(), row
            with wave.open(io.BytesIO(row["audio"]["bytes"]), "rb") as handle:
                assert (handle.getframerate(), handle.getnchannels()) == (16000, 1)
                assert 0.8 <= handle.getnframes() / 16000 <= 2.0
        if not table[task]:
            unrelated.append(task)
            assert len(rows) >= 12 and len({r["label"] for r in rows}) >= 2
    assert len(unrelated) >= 3
    assert table["EmotionRecognition"] == ["emotion"] and table["SpokenLanguageIdentification"] == ["language"]


# ------------------------------------------------------------------------------------------------ MMLU


def test_mmlu_parquet():
    table = pq.read_table(DEMO / "mmlu" / "all" / "test-00000-of-00001.parquet")
    assert table.column_names == ["question", "subject", "choices", "answer"]
    assert str(table.schema.field("answer").type) == "int64"
    rows = table.to_pylist()
    assert len(rows) >= 50 and len({r["subject"] for r in rows}) >= 6
    for row in rows:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4 and 0 <= row["answer"] < 4
    assert len({r["answer"] for r in rows}) == 4  # answers are not all in one position


# ------------------------------------------------------------------------------------------------ pools


def test_crema_d_pool():
    names = sorted(p.name for p in (DEMO / "pools" / "crema_d" / "AudioWAV").glob("*.wav"))
    emotions = []
    for name in names:
        match = re.fullmatch(r"(\d{4})_([A-Z]{3})_(ANG|DIS|FEA|HAP|NEU|SAD)_(LO|MD|HI|XX)\.wav", name)
        assert match, name
        emotions.append(match.group(3))
    assert {e: emotions.count(e) for e in set(emotions)} == {e: 4 for e in ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]}


def test_esc50_pool():
    columns, rows = read_csv(DEMO / "pools" / "esc50" / "meta" / "esc50.csv")
    assert columns == ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    categories = {r["category"] for r in rows}
    assert set(TRACK_LABELS["Animal"]) < categories
    assert categories - set(TRACK_LABELS["Animal"])  # non-animal rows the reader must drop
    for row in rows:
        assert (DEMO / "pools" / "esc50" / "audio" / row["filename"]).is_file()
        assert row["filename"] == f"{row['fold']}-{row['src_file']}-{row['take']}-{row['target']}.wav"
        assert int(row["target"]) == mds.ESC50_TARGETS[row["category"]]


# ------------------------------------------------------------------------------------- generator itself


def test_text_parts_regenerate_identically(tmp_path):
    mds.build(tmp_path, seed=0, text_only=True)
    for rel in sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.csv")):
        assert (tmp_path / rel).read_bytes() == (DEMO / rel).read_bytes(), rel
    mmlu = "mmlu/all/test-00000-of-00001.parquet"
    assert pq.read_table(tmp_path / mmlu).equals(pq.read_table(DEMO / mmlu))
    table = "dynamic_superb_tasks.yaml"
    assert (tmp_path / table).read_bytes() == (DEMO / table).read_bytes()


def test_other_seed_changes_questions(tmp_path):
    mds.build(tmp_path, seed=1, text_only=True)
    rel = "sakura/Animal/metadata.csv"
    assert (tmp_path / rel).read_bytes() != (DEMO / rel).read_bytes()


def test_wav_bytes_and_finish_clip():
    rng = np.random.default_rng(0)
    long_clip = mds.finish_clip(rng.standard_normal(16000 * 5), 0.5, np.random.default_rng(1))
    short_clip = mds.finish_clip(np.ones(1000), 0.5, np.random.default_rng(1))
    assert len(long_clip) <= 2.0 * 16000 and len(short_clip) >= 0.8 * 16000
    assert abs(np.max(np.abs(long_clip)) - 0.5) < 0.01
    data = mds.wav_bytes(long_clip)
    assert data == mds.wav_bytes(long_clip) and data[:4] == b"RIFF" and len(data) == 44 + 2 * len(long_clip)
    with pytest.raises(ValueError):
        mds.finish_clip(np.zeros(100), 0.5, rng)
