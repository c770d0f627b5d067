"""Tiny source fixtures in the real layouts (SAKURA, Dynamic-SUPERB, MMLU, pools), written by tests into tmp dirs."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from sake_dataset.knowledge import load_portability
from sake_dataset.labels import LABELS

TRACKS = {"animal": "Animal", "emotion": "Emotion", "gender": "Gender", "language": "Language"}


def write_wav(path, key: str, seconds: float = 0.12, rate: int = 8000) -> None:
    """A short, unique tone (frequency and noise derived from `key`), so every file has its own content hash;
    `path` is a file path or a binary buffer."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + seed % 1500) * t) + 0.01 * rng.standard_normal(len(t))
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), rate, subtype="PCM_16", format="WAV")


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


SAKURA_COLUMNS = ["file", "attribute_label", "single_instruction", "single_answer", "multi_instruction",
                  "multi_answer"]


def multi_hop(attribute: str, label: str, index: int) -> tuple[str, str]:
    """A SAKURA-style multi-hop question about a `label` clip (from the curated knowledge) and its answer."""
    cats = load_portability()[attribute]
    name = sorted(cats)[index % len(cats)]
    cat = cats[name]
    truth = cat.answers[label]
    wrong = sorted({a for other, a in cat.answers.items() if a.lower() != truth.lower()})[:3]
    opts = wrong[:index % (len(wrong) + 1)] + [truth] + wrong[index % (len(wrong) + 1):]
    letters = "abcdefgh"
    question = cat.questions[0] + " " + " ".join(f"({letters[j]}) {o}" for j, o in enumerate(opts))
    return question, f"({letters[opts.index(truth)]}) {truth}"


def sakura_rows(attribute: str, per_label: int) -> list[list[str]]:
    """Metadata rows of one track ({label}_{i}.wav, SAKURA columns)."""
    rows = []
    for label in LABELS[attribute]:
        for i in range(per_label):
            name = f"{label.lower()}_{i}.wav"
            opts = _options(attribute, label, i)
            letters = "abcd"
            question = f"What is the {attribute} in the audio? " + " ".join(
                f"({letters[j]}) {o}" for j, o in enumerate(opts))
            answer = f"({letters[opts.index(label)]}) {label}"
            rows.append([name, label.capitalize() if attribute == "emotion" else label, question, answer,
                         *multi_hop(attribute, label, i)])
    return rows


def write_sakura(root: Path, per_label: int = 4) -> Path:
    """SAKURA layout: {Track}/metadata.csv + {Track}/audio/*.wav, `per_label` clips per label."""
    for attribute, track in TRACKS.items():
        rows = sakura_rows(attribute, per_label)
        for row in rows:
            write_wav(root / track / "audio" / row[0], f"sakura/{track}/{row[0]}")
        write_csv(root / track / "metadata.csv", SAKURA_COLUMNS, rows)
    return root


def sakura_hub_datasets(per_label: int = 4) -> dict:
    """The four SAKURA Hub configs (`AnimalQA`, ...) as in-memory datasets: SAKURA columns + an `audio` column."""
    import io

    import datasets

    out = {}
    for attribute, track in TRACKS.items():
        rows = sakura_rows(attribute, per_label)
        columns = {c: [r[j] for r in rows] for j, c in enumerate(SAKURA_COLUMNS)}
        audio = []
        for row in rows:
            buf = io.BytesIO()
            write_wav(buf, f"sakura/{track}/{row[0]}")
            audio.append({"bytes": buf.getvalue(), "path": row[0]})
        features = datasets.Features({**{c: datasets.Value("string") for c in SAKURA_COLUMNS},
                                      "audio": datasets.Audio()})
        out[f"{track}QA"] = datasets.Dataset.from_dict({**columns, "audio": audio}, features=features)
    return out


# Dynamic-SUPERB Phase-2 task names (all in sake_dataset/dsuperb_tasks.yaml): name -> (instruction, labels).
# SarcasmDetection_Mustard: the table maps it to emotion although neither its name nor its instruction has an
# attribute keyword.
DSUPERB_TASKS = {
    "EmotionRecognition_MultimodalEmotionlinesDataset": (
        "Recognize the emotion of the speaker. Answer happy, sad or angry.", ["happy", "sad"]),
    "NoiseDetection_LJSpeech_MUSAN-Gaussian": ("Does the audio contain noise? Answer yes or no.", ["yes", "no"]),
    "SpeakerCounting_LibriTTS-TestClean": ("How many speakers talk in the audio? (a) 1 (b) 2", ["1", "2"]),
    "BirdSoundDetection_Warblrb10k": ("Is there a bird call in this recording? (a) yes (b) no", ["yes", "no"]),
    "SarcasmDetection_Mustard": ("Is the speaker being sarcastic? Answer yes or no.", ["yes", "no"]),
}
DSUPERB_BESIDE = ("SpeakerCounting_LibriTTS-TestClean",)  # written as metadata.csv with the audio beside it


def dsuperb_rows(task: str, per_task: int) -> list[dict]:
    instruction, labels = DSUPERB_TASKS[task]
    rows = []
    for i in range(per_task):
        name = f"{task}_{i:03d}.wav"
        buf = io.BytesIO()
        write_wav(buf, f"dsuperb/{task}/{name}")
        rows.append({"file": name, "audio": {"bytes": buf.getvalue(), "path": name}, "instruction": instruction,
                     "label": labels[i % len(labels)]})
    return rows


def dsuperb_features():
    import datasets

    return datasets.Features({"file": datasets.Value("string"), "audio": datasets.Audio(),
                              "instruction": datasets.Value("string"), "label": datasets.Value("string")})


def write_dsuperb_task(task_dir: Path, rows: list[dict]) -> Path:
    """One task in the Phase-2 release layout: data/test-00000-of-00001.parquet with a datasets Audio column."""
    import datasets

    path = task_dir / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {c: [r[c] for r in rows] for c in ("file", "audio", "instruction", "label")}
    datasets.Dataset.from_dict(columns, features=dsuperb_features()).to_parquet(str(path))
    return path


def write_dynamic_superb(root: Path, per_task: int = 6) -> Path:
    """Phase-2 task folders: Parquet release layout, and one task as metadata.csv with its audio beside it."""
    for task in DSUPERB_TASKS:
        rows = dsuperb_rows(task, per_task)
        if task in DSUPERB_BESIDE:
            for r in rows:
                (root / task).mkdir(parents=True, exist_ok=True)
                (root / task / r["file"]).write_bytes(r["audio"]["bytes"])
            write_csv(root / task / "metadata.csv", ["file", "instruction", "label"],
                      [[r["file"], r["instruction"], r["label"]] for r in rows])
        else:
            write_dsuperb_task(root / task, rows)
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
