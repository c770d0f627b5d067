"""SAKE-shaped synthetic instances (ARCHITECTURE.md "Dataset"): 1 edit + 10 linked items with synthetic audio, served to the runner as in-memory rows."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np


from sake_core.atomic import atomic_write
from sake_core.protocol import ATTRIBUTES, SAMPLING_RATE
from sake_core.protocol import LABELS as PROTOCOL_LABELS

LOG = logging.getLogger(__name__)


SAMPLE_RATE = SAMPLING_RATE




LABELS = {attribute: list(labels) for attribute, labels in PROTOCOL_LABELS.items()}  # sake_core.protocol


QUESTIONS = {
    "rel": "Listen to the recording carefully. What {attr} does the audio clip express? "
           "Choose the single best answer from these options: {opts}.",
    "gen1": "Based on what you hear in this clip, which {attr} best describes it? "
            "Pick one of the following options: {opts}.",
    "loc": "Listen to this audio clip carefully. Which of the following describes its {attr} best? "
           "Select one answer from the options: {opts}.",
    "port": "Think about the {attr} heard in this recording. Which option is most closely associated with it "
            "in the real world? Options: {opts}.",
    "mmlu": "Which of the following statements about the boiling point of water at sea level is correct? "
            "(a) it is 50 degrees Celsius (b) it is 100 degrees Celsius (c) it is 150 degrees Celsius "
            "(d) it is 200 degrees Celsius",
}


def _options(options: Sequence[str]) -> str:
    return " ".join(f"({chr(97 + i)}) {o}" for i, o in enumerate(options))


def synthetic_audio(rng: np.random.Generator, seconds: tuple[float, float]) -> dict[str, Any]:
    """A clip of random length in ``seconds``: three tones plus noise, float32 at 16 kHz, as ``datasets``
    decodes an Audio column."""
    duration = float(rng.uniform(*seconds))
    t = np.arange(int(duration * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    signal = sum(0.1 * np.sin(2 * np.pi * float(rng.uniform(100, 2000)) * t) for _ in range(3))
    signal = signal + 0.02 * rng.standard_normal(t.shape[0]).astype(np.float32)
    return {"array": np.asarray(signal, dtype=np.float32), "sampling_rate": SAMPLE_RATE}


def synthetic_instance(rng: np.random.Generator, attribute: str, split: str, index: int,
                       seconds: tuple[float, float]) -> dict[str, Any]:
    """One instance row: reliability + 3 generality + 4 audio locality + 1 text locality + 1 portability; six
    clips, as in SAKE (the edit's clip for reliability, type-1 generality and portability; one alternative clip
    for types 2 and 3; one per audio locality item)."""
    labels = LABELS[attribute]
    first, second = rng.choice(len(labels), size=2, replace=False)
    original, target = labels[int(first)], labels[int(second)]
    others = [a for a in ATTRIBUTES if a != attribute]
    instance_id = f"{attribute}/{split}/{index:06d}"

    def item(kind: str, template: str, probe: str, answer: str, item_type: int, audio: dict | None) -> dict:
        row = {"id": f"{instance_id}/{kind}", "type": item_type,
               "question": QUESTIONS[template].format(attr=probe, opts=_options(LABELS.get(probe, []))),
               "options": list(LABELS.get(probe, [])), "answer": answer, "attribute": probe, "label": answer,
               "category": "", "source": "synthetic"}
        if audio is not None:
            row["audio"] = audio
        return row

    edit_audio = synthetic_audio(rng, seconds)
    # as SAKE's rows: type 1 asks the paraphrase about the edit's clip, types 2 and 3 ask the question and the
    # paraphrase about one other clip of the same label
    alternative = synthetic_audio(rng, seconds)
    synthetic_audio(rng, seconds)  # drawn and dropped: the later items' draws stay those of earlier benches
    generality = [item("gen1", "gen1", attribute, target, 1, edit_audio),
                  item("gen2", "rel", attribute, target, 2, alternative),
                  item("gen3", "gen1", attribute, target, 3, alternative)]
    locality_audio = []
    for k in (1, 2, 3, 4):
        probe = others[(k - 1) % len(others)]
        locality_audio.append(item(f"loc_audio{k}", "loc", probe, LABELS[probe][0], k, synthetic_audio(rng, seconds)))
    text_item = {"id": f"{instance_id}/loc_text", "type": 0, "question": QUESTIONS["mmlu"],
                 "options": ["50", "100", "150", "200"], "answer": "100", "attribute": "mmlu:physics", "label": "",
                 "category": "", "source": "synthetic"}
    portability = item("port", "port", attribute, target, 0, edit_audio)
    portability["category"] = "synthetic"
    return {"id": instance_id, "attribute": attribute, "split": split, "original_label": original,
            "target_label": target, "audio": edit_audio,
            "question": QUESTIONS["rel"].format(attr=attribute, opts=_options(labels)), "options": list(labels),
            "answer": target, "generality": generality, "locality_audio": locality_audio,
            "locality_text": [text_item], "portability": [portability] if split == "test" else []}


#: Steps of the bench's one sequence (the paper's sequences: ten edits, §4.2).
SEQUENCE_STEPS = 10


def sequence_rows(rows: dict[tuple[str, str], list[dict[str, Any]]], steps: int) -> list[dict[str, Any]]:
    """One sequence (``seq01``) of ``steps`` test instances taken round-robin over the attributes, ids rewritten as
    the sequential config writes them (ARCHITECTURE.md "Dataset"); the runner needs no label rules."""
    pool = [r for i in range(max(len(rows[(a, "test")]) for a in ATTRIBUTES)) for a in ATTRIBUTES
            if i < len(rows[(a, "test")]) for r in [rows[(a, "test")][i]]]
    out = []
    for step, row in enumerate((pool * steps)[:steps], start=1):
        new_id = f"sequential/test/seq01/step{step:02d}"
        new = dict(row, id=new_id, sequence_id="seq01", step=step, source_instance=row["id"])
        for column in ("generality", "locality_audio", "locality_text", "portability"):
            new[column] = [dict(item, id=new_id + "/" + item["id"].rsplit("/", 1)[1]) for item in row[column]]
        out.append(new)
    return out


class InMemoryRows:
    """The slice of ``datasets.Dataset`` the runner uses (``.data`` Arrow table, ``len``, ``ds[i]``), over rows
    held in memory with decoded audio: what ``load_instances`` returns, minus decoding and disk."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        self.rows = rows
        columns: dict[str, Any] = {"id": pa.array([r["id"] for r in rows], type=pa.string())}
        for column in ("generality", "locality_audio", "locality_text", "portability"):
            columns[column] = pa.array([[{"id": it["id"]} for it in r[column]] for r in rows],
                                       type=pa.list_(pa.struct([("id", pa.string())])))
        self.data = pa.table(columns)
        self.column_names = list(rows[0]) if rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def select_columns(self, columns: Sequence[str]) -> "InMemoryRows":
        """Rows restricted to ``columns`` (as ``datasets.Dataset.select_columns``)."""
        view = InMemoryRows.__new__(InMemoryRows)
        view.rows = [{c: row[c] for c in columns} for row in self.rows]
        view.data, view.column_names = self.data, list(columns)
        return view


@dataclasses.dataclass
class SyntheticDataset:
    """Seeded test and train rows per attribute, served to the runner in place of ``load_instances``."""

    root: Path  # a local folder (holds sake_manifest.json) so the runner treats the dataset as local
    rows: dict[tuple[str, str], list[dict[str, Any]]]

    @classmethod
    def make(cls, root: Path, per_attribute: int, train_per_attribute: int, seed: int,
             seconds: tuple[float, float]) -> "SyntheticDataset":
        rng = np.random.default_rng(seed)
        rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for split, count in (("test", per_attribute), ("train", train_per_attribute)):
            for attribute in ATTRIBUTES:
                rows[(attribute, split)] = [synthetic_instance(rng, attribute, split, i, seconds)
                                            for i in range(count)]
        rows[("sequential", "test")] = sequence_rows(rows, SEQUENCE_STEPS)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / "sake_manifest.json", json.dumps({"format": 1, "seed": seed,
                                                              "fingerprint": f"bench-synthetic-seed{seed}"}))
        return cls(root=root, rows=rows)

    def load(self, dataset: str, config: str, split: str) -> InMemoryRows:
        """The runner's ``rows_loader``: ``editors.data.load_instances`` over these in-memory rows."""
        if Path(dataset) != self.root or (config, split) not in self.rows:
            raise ValueError(f"bench dataset has no {config}/{split} at {dataset}")
        return InMemoryRows(self.rows[(config, split)])

    def ordered(self, configs: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """Test rows in the runner's unit order (config by config, first ``limit`` rows each)."""
        return [row for config in configs for row in self.rows[(config, "test")][:limit]]
