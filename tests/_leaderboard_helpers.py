"""Fixtures for the leaderboard tests: a small release manifest, runner-shaped predictions, submissions."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

ATTR_KINDS = ["rel", "gen1", "gen2", "gen3", "loc_audio1", "loc_audio2", "loc_audio3", "loc_audio4", "loc_text",
              "port"]
KIND_INFO = {"rel": ("reliability", 0), "gen1": ("generality", 1), "gen2": ("generality", 2),
             "gen3": ("generality", 3), "loc_audio1": ("locality_audio", 1), "loc_audio2": ("locality_audio", 2),
             "loc_audio3": ("locality_audio", 3), "loc_audio4": ("locality_audio", 4),
             "loc_text": ("locality_text", 0), "port": ("portability", 0)}
SEQ_KINDS = ["rel", "gen1", "loc_audio1", "loc_text", "port"]
METADATA = {"submitter": "Test Lab", "model_link": "https://huggingface.co/Qwen/Qwen2-Audio-7B-Instruct",
            "paper_link": "https://arxiv.org/abs/0000.00000", "license": "apache-2.0"}


def make_manifest(n_instances: int = 3, n_sequences: int = 2, n_steps: int = 7) -> dict[str, Any]:
    """A manifest shaped like ARCHITECTURE.md: emotion + gender (no loc_audio2) test items, plus sequences."""
    item_ids: dict[str, dict[str, list[str]]] = {}
    for attr in ("emotion", "gender"):
        kinds = [k for k in ATTR_KINDS if not (attr == "gender" and k == "loc_audio2")]
        item_ids[attr] = {"test": [f"{attr}/test/{i:06d}/{k}" for i in range(n_instances) for k in kinds],
                          "train": [f"{attr}/train/{i:06d}/{k}" for i in range(n_instances) for k in kinds
                                    if k != "port"]}
    item_ids["sequential"] = {"test": [f"sequential/test/seq{s:02d}/step{t:02d}/{k}" for s in range(n_sequences)
                                       for t in range(1, n_steps + 1) for k in SEQ_KINDS]}
    files = {"emotion/test.parquet": "a" * 64, "gender/test.parquet": "b" * 64}
    fingerprint = hashlib.sha256("\n".join(f"{p}:{h}" for p, h in sorted(files.items())).encode()).hexdigest()
    return {"format": 1, "seed": 0, "sources": {}, "files": files, "fingerprint": fingerprint, "item_ids": item_ids}


def make_header(manifest: dict, mode: str = "single", method: str = "ft_audio",
                model: str = "Qwen/Qwen2-Audio-7B-Instruct", family: str | None = "qwen2_audio") -> dict[str, Any]:
    return {"kind": "header", "model": model, "family": family, "model_revision": "0123abc", "method": method,
            "hparams": {"lr": 1e-4, "max_steps": 15}, "mode": mode, "dataset": "sake/sake",
            "dataset_fingerprint": manifest["fingerprint"],
            "configs": ["sequential"] if mode == "sequential" else ["emotion", "gender"], "split": "test",
            "seed": 0, "limit": None, "versions": {"sake": "0.1.0"}, "date": "2026-11-26T12:00:00Z"}


def make_row(item_id: str, gap: int | None, correct: bool) -> dict[str, Any]:
    instance_id, _, kind = item_id.rpartition("/")
    dimension, item_type = KIND_INFO[kind]
    attribute = instance_id.split("/")[0]
    if attribute == "sequential":  # the edited attribute of the sequence's step
        attribute = ("animal", "emotion", "gender", "language")[int(instance_id[-2:]) % 4]
    reference = "happy" if dimension != "locality_text" else "B"
    pre_edit = "sad" if dimension.startswith("locality") else None
    if dimension.startswith("locality"):
        post = pre_edit if correct else "angry"
    else:
        post = reference if correct else "neutral"
    return {"kind": "prediction", "instance_id": instance_id, "item_id": item_id, "dimension": dimension,
            "type": item_type, "attribute": attribute, "question": "What emotion? (a) happy (b) sad",
            "options": ["happy", "sad"], "reference": reference, "pre_edit": pre_edit, "post_edit": post,
            "gap": gap, "category": "Scenario" if kind == "port" else ""}


def make_rows(manifest: dict, mode: str = "single", wrong_every: int = 4) -> list[dict[str, Any]]:
    """One row per required key; every `wrong_every`-th row is wrong, so metrics are not all 100."""
    rows = []
    if mode == "single":
        keys = [(i, None) for cfg in ("emotion", "gender") for i in manifest["item_ids"][cfg]["test"]]
    else:
        from eval.leaderboard.validate import expected_keys

        keys = expected_keys(manifest, make_header(manifest, "sequential"))
    for n, (item_id, gap) in enumerate(keys):
        rows.append(make_row(item_id, gap, correct=(n % wrong_every != 0)))
    return rows


def jsonl_bytes(header: dict, rows: list[dict]) -> bytes:
    return "".join(json.dumps(obj, sort_keys=True) + "\n" for obj in [header] + rows).encode("utf-8")


def write_submission_dir(path: Path, header: dict, rows: list[dict], metadata: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "predictions.jsonl").write_bytes(jsonl_bytes(header, rows))
    (path / "metadata.json").write_text(json.dumps(metadata or METADATA), encoding="utf-8")
    return path


def write_submission_zip(path: Path, header: dict, rows: list[dict], metadata: dict | None = None,
                         extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("predictions.jsonl", jsonl_bytes(header, rows))
        archive.writestr("metadata.json", json.dumps(metadata or METADATA))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


def fake_scorer(path: str, judge: str = "offline", **_: Any) -> dict[str, Any]:
    """A stand-in with the results JSON shape (exact match only), for store mechanics tests."""
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    header, rows = lines[0], lines[1:]

    def block(selected: list[dict]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        def pct(rs):
            if not rs:
                return None
            ok = [r["post_edit"] == (r["pre_edit"] if r["dimension"].startswith("locality") else r["reference"])
                  for r in rs]
            return round(100.0 * sum(ok) / len(ok), 2)
        for dim in ("reliability", "generality", "locality_audio", "locality_text", "portability"):
            out[dim] = pct([r for r in selected if r["dimension"] == dim])
        for t in (1, 2, 3):
            out[f"generality_type{t}"] = pct([r for r in selected if r["dimension"] == "generality" and r["type"] == t])
        for t in (1, 2, 3, 4):
            out[f"locality_audio_type{t}"] = pct([r for r in selected
                                                  if r["dimension"] == "locality_audio" and r["type"] == t])
        out["portability_by_category"] = {}
        return out

    attrs = sorted({r["attribute"] for r in rows})
    gaps = sorted({r["gap"] for r in rows if r["gap"] is not None})
    return {"model": header["model"], "method": header["method"], "mode": header["mode"],
            "dataset_fingerprint": header["dataset_fingerprint"], "n_rows": len(rows),
            "metrics": {"overall": block(rows), "per_attribute": {a: block([r for r in rows if r["attribute"] == a])
                                                                  for a in attrs},
                        "per_gap": {str(g): block([r for r in rows if r["gap"] == g]) for g in gaps}},
            "judge": {"name": judge, "model": None, "version": "test", "stage_share": {"exact": 1.0}},
            "degeneration_rate": 0.0, "versions": {}, "date": "2026-11-26T12:00:00Z"}
