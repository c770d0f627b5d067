"""Tiny source fixtures in the real layouts (SAKURA, Dynamic-SUPERB, MMLU, pools), written by tests into tmp dirs."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from sake_dataset.sake import LABELS

TRACKS = {"animal": "Animal", "emotion": "Emotion", "gender": "Gender", "language": "Language"}


def write_wav(path: Path, key: str, seconds: float = 0.12, rate: int = 8000) -> None:
    """A short, unique tone (frequency and noise derived from `key`), so every file has its own content hash."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + seed % 1500) * t) + 0.01 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), rate, subtype="PCM_16")


def _options(attribute: str, label: str, index: int) -> list[str]:
    labels = list(LABELS[attribute])
    others = [x for x in labels if x != label]
    k = min(4, len(labels))
    opts = [label] + [others[(index + j) % len(others)] for j in range(k - 1)]
    pos = index % k
    opts[0], opts[pos] = opts[pos], opts[0]
    return opts


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_sakura(root: Path, per_label: int = 4) -> Path:
    """SAKURA layout: {Track}/metadata.csv + {Track}/audio/*.wav, `per_label` clips per label."""
    for attribute, track in TRACKS.items():
        rows = []
        for label in LABELS[attribute]:
            for i in range(per_label):
                name = f"{label.lower()}_{i}.wav"
                write_wav(root / track / "audio" / name, f"sakura/{track}/{name}")
                opts = _options(attribute, label, i)
                letters = "abcd"
                question = f"What is the {attribute} in the audio? " + " ".join(
                    f"({letters[j]}) {o}" for j, o in enumerate(opts))
                answer = f"({letters[opts.index(label)]}) {label}"
                rows.append([name, label.capitalize() if attribute == "emotion" else label, question, answer,
                             "A multi-hop question? (a) x (b) y", "(a) x"])
        write_csv(root / track / "metadata.csv", ["file", "attribute_label", "single_instruction", "single_answer",
                                                  "multi_instruction", "multi_answer"], rows)
    return root


DSUPERB_TASKS = {
    "EmotionRecognition": ("Recognize the emotion of the speaker. Answer happy, sad or angry.", ["happy", "sad"]),
    "NoiseDetection": ("Does the audio contain noise? Answer yes or no.", ["yes", "no"]),
    "SpeakerCounting": ("How many speakers talk in the audio? Answer 1 or 2.", ["1", "2"]),
    "AnimalSoundClassification": ("Which animal makes this sound? (a) dog (b) cat", ["dog", "cat"]),
}


def write_dynamic_superb(root: Path, per_task: int = 6) -> Path:
    for task, (instruction, labels) in DSUPERB_TASKS.items():
        rows = []
        for i in range(per_task):
            name = f"{task}_{i:03d}.wav"
            write_wav(root / task / "audio" / name, f"dsuperb/{task}/{name}")
            rows.append([name, instruction, labels[i % len(labels)]])
        write_csv(root / task / "metadata.csv", ["file", "instruction", "label"], rows)
    return root


def write_mmlu(root: Path, n: int = 12) -> Path:
    path = root / "all" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "question": [f"What is {i} plus {i}?" for i in range(n)],
        "subject": ["elementary_mathematics" if i % 2 else "high_school_physics" for i in range(n)],
        "choices": [[str(2 * i), str(2 * i + 1), str(i), str(3 * i + 7)] for i in range(n)],
        "answer": [0 for _ in range(n)],
    })
    pq.write_table(table, path)
    return root


def write_sources(root: Path, per_label: int = 4) -> dict[str, Path]:
    """All three sources under `root`; returns {"sakura", "dynamic_superb", "mmlu"} paths."""
    return {"sakura": write_sakura(root / "sakura", per_label), "dynamic_superb": write_dynamic_superb(
        root / "dynamic_superb"), "mmlu": write_mmlu(root / "mmlu")}


SMALL = {"test_per_attribute": 2, "train_per_attribute": 2, "sequences": 1, "sequence_length": 3}


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder (to check that an output stayed untouched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
