"""Shared fixtures for the metric / judge / report tests: hand-built prediction rows and files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ANIMALS = ["dog", "cat", "cow", "frog"]
EMOTIONS = ["happy", "sad", "angry", "neutral"]


def header(method: str = "ft_llm", model: str = "tiny/qwen2-audio", mode: str = "single", **extra: Any) -> dict:
    """A run header as editors/run.py writes it."""
    h = {"kind": "header", "model": model, "model_revision": "0" * 40, "method": method, "hparams": {},
         "mode": mode, "dataset": "tests/sake", "dataset_fingerprint": "f" * 64, "configs": ["animal"],
         "split": "test", "seed": 0, "limit": None, "versions": {"sake_toolkit": "0.1.0"},
         "date": "2026-11-26T00:00:00Z"}
    h.update(extra)
    return h


def row(item_id: str, dimension: str, post_edit: str, *, reference: str = "dog", pre_edit: str | None = "",
        type: int = 0, attribute: str = "animal", options: list[str] | None = None, gap: int | None = None,
        category: str = "", question: str = "What animal makes this sound?") -> dict:
    """One prediction row with every field of ARCHITECTURE.md."""
    return {"kind": "prediction", "instance_id": item_id.rsplit("/", 1)[0], "item_id": item_id,
            "dimension": dimension, "type": type, "attribute": attribute, "question": question,
            "options": list(ANIMALS if options is None else options), "reference": reference,
            "pre_edit": pre_edit, "post_edit": post_edit, "gap": gap, "category": category}


def write_predictions(path: Path, head: dict | None, rows: list[dict]) -> Path:
    """Write a predictions JSONL (header line first when given)."""
    lines = ([json.dumps(head)] if head is not None else []) + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def demo_rows(quality: float = 1.0, gap: int | None = None, prefix: str = "animal/test") -> list[dict]:
    """A small single-editing run over two attributes with every dimension and type.

    `quality` in {1.0, 0.5, 0.0}-ish: the first round(quality * n) instances get right answers.
    Answers mix exact text, option letters and sentences so every deterministic stage is used.
    """
    rows: list[dict] = []
    for attr, labels in (("animal", ANIMALS), ("emotion", EMOTIONS)):
        n = 4
        good = round(quality * n)
        for i in range(n):
            inst = f"{attr}/test/{i:06d}" if prefix == "animal/test" else f"{prefix}/{attr}{i}"
            target = labels[(i + 1) % 4]
            wrong = labels[i % 4]
            ok = i < good
            rows.append(row(f"{inst}/rel", "reliability", target if ok else wrong, reference=target,
                            attribute=attr, options=labels, gap=gap, pre_edit=wrong))
            for t in (1, 2, 3):
                out = f"({chr(97 + labels.index(target))})" if ok else f"It sounds {wrong}."
                rows.append(row(f"{inst}/gen{t}", "generality", out, reference=target, type=t, attribute=attr,
                                options=labels, gap=gap, pre_edit=wrong))
            for t in (1, 2, 3, 4):
                pre = "The answer is yes."
                post = pre if ok else "no"
                rows.append(row(f"{inst}/loc_audio{t}", "locality_audio", post, reference="yes", type=t,
                                attribute=attr, options=["yes", "no"], gap=gap, pre_edit=pre))
            rows.append(row(f"{inst}/loc_text", "locality_text", "B) Paris" if ok else "",
                            reference="Paris", attribute=attr, options=["London", "Paris", "Rome", "Oslo"],
                            gap=gap, pre_edit="(b)"))
            category = ("Diet", "Behavior")[i % 2] if attr == "animal" else "Scenario"
            rows.append(row(f"{inst}/port", "portability", "herbivore" if ok else "dogdogdogdogdog",
                            reference="herbivore", attribute=attr, options=["herbivore", "carnivore"],
                            gap=gap, category=category, pre_edit="carnivore"))
    return rows
