"""Writing a built SAKE release: Parquet per config/split, statistics, the dataset card and the manifest.

Determinism: audio is embedded as 16 kHz PCM WAV bytes, rows are written in a fixed order with a fixed row-group
size, and no timestamps enter any file, so the same rows give byte-identical Parquet files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from sake_dataset.progress import bar

from sake_core.atomic import atomic_write

from .audio import encode_wav_16k
from .portability import CATEGORIES, MULTI_HOP_MARK, ORIGIN_CURATED, ORIGIN_SAKURA
from .records import AudioRef
from .labels import ATTRIBUTES
from .schema import CONFIGS, DIMENSION_OF_KIND, SPLITS, features, item_rows

log = logging.getLogger(__name__)

ROW_GROUP_SIZE = 16  # instance rows per Parquet row group (each row embeds ~9 audio clips)
DIMENSION_ROWS: tuple[tuple[str, str, int | None], ...] = (
    ("Reliability", "reliability", None),
    ("Generality (avg.)", "generality", None), ("Generality type 1", "generality", 1),
    ("Generality type 2", "generality", 2), ("Generality type 3", "generality", 3),
    ("Audio locality (avg.)", "locality_audio", None), ("Audio locality type 1", "locality_audio", 1),
    ("Audio locality type 2", "locality_audio", 2), ("Audio locality type 3", "locality_audio", 3),
    ("Audio locality type 4", "locality_audio", 4), ("Text locality", "locality_text", None),
    ("Portability", "portability", None),
)


def parquet_path(config: str, split: str) -> str:
    return f"{config}/{split}-00000-of-00001.parquet"


class AudioEncoder:
    """Encodes each source clip once (cache by content hash) and remembers durations and encoded hashes."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[bytes, float]] = {}

    def encode(self, ref: AudioRef) -> dict[str, Any]:
        if ref.sha256 not in self.cache:
            self.cache[ref.sha256] = encode_wav_16k(ref)
        return {"bytes": self.cache[ref.sha256][0], "path": ref.name}

    def duration(self, ref: AudioRef) -> float:
        if ref.sha256 not in self.cache:
            self.encode(ref)
        return self.cache[ref.sha256][1]

    def encoded_hash(self, ref: AudioRef) -> str:
        return hashlib.sha256(self.encode(ref)["bytes"]).hexdigest()


def _materialize(value: Any, encoder: AudioEncoder) -> Any:
    if isinstance(value, AudioRef):
        return encoder.encode(value)
    if isinstance(value, dict):
        return {k: _materialize(v, encoder) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v, encoder) for v in value]
    return value


def write_parquet(rows: Sequence[dict[str, Any]], path: Path, sequential: bool, encoder: AudioEncoder,
                  desc: str = "") -> None:
    """Write rows (AudioRefs encoded on the fly) with a fixed schema and row-group size."""
    schema = features(sequential=sequential).arrow_schema
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, compression="zstd", write_statistics=False) as writer:
        if not rows:
            writer.write_table(schema.empty_table())
        for start in bar(range(0, len(rows), ROW_GROUP_SIZE), desc=desc or str(path.name), leave=False):
            chunk = [_materialize(r, encoder) for r in rows[start:start + ROW_GROUP_SIZE]]
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema), row_group_size=ROW_GROUP_SIZE)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- statistics

def _summary(values: Sequence[float]) -> tuple[float, float, float, float] | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return mean, min(values), max(values), std


def dimension_stats(rows: Iterable[dict[str, Any]], encoder: AudioEncoder) -> dict[str, dict[str, Any]]:
    """Per dimension row of Tables 4-5: audio durations (s) and question lengths (words): avg/min/max/std."""
    durations: dict[str, list[float]] = {name: [] for name, _, _ in DIMENSION_ROWS}
    lengths: dict[str, list[float]] = {name: [] for name, _, _ in DIMENSION_ROWS}
    for row in rows:
        for item in item_rows(row):
            kind = item["id"].rsplit("/", 1)[1]
            dim = DIMENSION_OF_KIND[kind]
            for name, d, t in DIMENSION_ROWS:
                if d == dim and (t is None or t == item["type"]):
                    lengths[name].append(len(item["question"].split()))
                    if "audio" in item:
                        durations[name].append(encoder.duration(item["audio"]))
    return {name: {"duration": _summary(durations[name]), "text_length": _summary(lengths[name])}
            for name, _, _ in DIMENSION_ROWS}


GUESS_DIMENSIONS: tuple[tuple[str, str, int | None], ...] = tuple(
    (name, dim, t) for name, dim, t in DIMENSION_ROWS if t is None)


def guess_baseline(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Random-guess accuracy per dimension: the mean of 1 / (number of options) over the items that have options
    (percent), and how many items have none (free-form answers, e.g. some Dynamic-SUPERB tasks)."""
    inverse: dict[str, list[float]] = {dim: [] for _, dim, _ in GUESS_DIMENSIONS}
    free: dict[str, int] = {dim: 0 for _, dim, _ in GUESS_DIMENSIONS}
    for row in rows:
        for item in item_rows(row):
            dim = DIMENSION_OF_KIND[item["id"].rsplit("/", 1)[1]]
            if item["options"]:
                inverse[dim].append(1.0 / len(item["options"]))
            else:
                free[dim] += 1
    return {dim: {"percent": 100.0 * sum(v) / len(v) if v else None, "items": len(v), "free_form": free[dim]}
            for dim, v in inverse.items()}


def portability_origins(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Portability items by where their question came from: SAKURA's multi-hop questions or the curated file."""
    counts = {ORIGIN_SAKURA: 0, ORIGIN_CURATED: 0}
    for row in rows:
        for item in row["portability"]:
            counts[ORIGIN_SAKURA if MULTI_HOP_MARK in item["source"] else ORIGIN_CURATED] += 1
    return counts


def portability_categories(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Portability items per attribute and knowledge category (App. I.1, the columns of paper Tables 14-17; every
    category listed, zeros included)."""
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        for item in row["portability"]:
            key = (row["attribute"], item["category"])
            counts[key] = counts.get(key, 0) + 1
    attributes = [a for a in ATTRIBUTES if any(k[0] == a for k in counts)]
    return {a: {c: counts.get((a, c), 0) for c in (*CATEGORIES[a], *sorted(
        c for b, c in counts if b == a and c not in CATEGORIES[a]))} for a in attributes}


def provenance(rows_by_config: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Distinct audio clips per attribute config and origin (the prefix of an item's `source`)."""
    out: dict[str, dict[str, int]] = {}
    for config, rows in rows_by_config.items():
        seen: dict[str, set[str]] = {}
        for row in rows:
            for item in item_rows(row):
                if "audio" in item:
                    origin = item["source"].split(":", 1)[0]
                    seen.setdefault(origin, set()).add(item["audio"].sha256)
        out[config] = {origin: len(v) for origin, v in sorted(seen.items())}
    return out


def _fmt(stat, digits: int, extreme_digits: int) -> str:
    if stat is None:
        return "| – | – | – | – |"
    mean, lo, hi, std = stat
    return f"| {mean:.{digits}f} | {lo:.{extreme_digits}f} | {hi:.{extreme_digits}f} | {std:.{digits}f} |"


def stats_markdown(stats: dict[str, Any]) -> str:
    """Markdown tables shaped like paper Tables 1, 4 and 5 (+ sequential counts, random-guess baseline, portability
    origins and knowledge categories, Dynamic-SUPERB task screening and provenance), for the splits of this
    build."""
    built = [s for s in ("train", "test") if s in stats["splits"]]
    lines = ["### Splits", "", "This build holds the split(s): " + ", ".join(f"`{s}`" for s in built) + "."
             + (" A test-only build: methods that learn from the train split (KE/MEND training, IE-IKE "
                "demonstrations, UnKE/WISE preservation data drawn from train) need a build with both splits."
                if built == ["test"] else ""), "",
             "### Composition (paper Table 1; single-editing configs, items counted per QA pair)", "",
             "| Split | # Instances | # Speech/Audio Inputs | # QA Pairs |", "|---|---:|---:|---:|"]
    for split in built:
        n = stats["totals"][split]
        lines.append(f"| {split.capitalize()} | {n[0]:,} | {n[1]:,} | {n[2]:,} |")
    lines += ["", "Sequential config (§4.2): " + ", ".join(
        f"{split}: {stats['sequential'][split]['sequences']} sequences × {stats['sequential'][split]['length']} "
        f"edits = {stats['sequential'][split]['rows']} rows" for split in built), ""]
    for key, title, extreme in (("duration", "Audio duration in seconds (paper Table 4)", 2),
                                ("text_length", "Question length in words (paper Table 5)", 0)):
        for split in [s for s in ("test", "train") if s in built]:
            lines += [f"### {title}: {split}", "", "| Metric | Avg. | Min. | Max. | Std. |",
                      "|---|---:|---:|---:|---:|"]
            for name, _, _ in DIMENSION_ROWS:
                stat = stats["dimensions"][split][name][key]
                if stat is None and (key == "duration" and name == "Text locality"):
                    continue
                if stat is None and split == "train" and name == "Portability":
                    continue
                lines.append(f"| {name} {_fmt(stat, 2, extreme)}")
            lines.append("")
    if stats.get("guess_baseline"):
        lines += ["### Random-guess baseline (percent: mean of 1 / number of options over the items)", "",
                  "| Split | " + " | ".join(name for name, _, _ in GUESS_DIMENSIONS) + " |",
                  "|---|" + "---:|" * len(GUESS_DIMENSIONS)]
        notes = []
        for split in built:
            cells = []
            for name, dim, _ in GUESS_DIMENSIONS:
                g = stats["guess_baseline"][split][dim]
                cells.append("–" if g["percent"] is None else f"{g['percent']:.2f}")
                if g["free_form"]:
                    notes.append(f"{split} {name.lower()}: {g['free_form']} free-form item(s) without options left "
                                 "out")
            lines.append(f"| {split.capitalize()} | " + " | ".join(cells) + " |")
        lines += ([""] + [f"- {n}" for n in notes] if notes else []) + [""]
    if stats.get("portability_origins"):
        lines += ["### Portability questions by origin", "", "| Split | SAKURA multi-hop | curated knowledge file |",
                  "|---|---:|---:|"]
        for split in built:
            o = stats["portability_origins"][split]
            lines.append(f"| {split.capitalize()} | {o[ORIGIN_SAKURA]} | {o[ORIGIN_CURATED]} |")
        lines.append("")
    for split in [s for s in built if (stats.get("portability_categories") or {}).get(s)]:
        lines += [f"### Portability items by knowledge category: {split} (App. I.1; the columns of paper Tables "
                  "14-17)", "", "| Attribute | Items per category |", "|---|---|"]
        for attribute, counts in stats["portability_categories"][split].items():
            lines.append(f"| {attribute} | " + ", ".join(f"{c} {n}" for c, n in counts.items()) + " |")
        lines.append("")
    if stats.get("dsuperb") is not None:
        d = stats["dsuperb"]
        lines += ["### Dynamic-SUPERB tasks (audio locality type 4)", "",
                  f"{d['tasks']} tasks read; the attributes each task is about come from the task table "
                  "(`sake_dataset/dsuperb_tasks.yaml`)."]
        if d["unlisted"]:
            verdict = ("admitted to type-4 pools by the build flag, excluded where their keyword guess names the edited "
                       "attribute" if d["allow_unlisted"] else "left out of every type-4 pool")
            lines += [f"Tasks missing from the table ({verdict}; keyword guess in brackets):", ""]
            lines += [f"- `{t}` [{', '.join(a) or 'none'}]" for t, a in d["unlisted"].items()]
        else:
            lines.append("Every task is in the table.")
        lines.append("")
    lines += ["### Provenance (distinct audio clips per source)", "",
              "| Split | Config | " + " | ".join(stats["origins"]) + " |",
              "|---|---|" + "---:|" * len(stats["origins"])]
    for split in built:
        for config in ATTRIBUTES:
            counts = stats["provenance"][split].get(config, {})
            row = " | ".join(str(counts.get(o, 0)) for o in stats["origins"])
            lines.append(f"| {split} | {config} | {row} |")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- card

def card_yaml(num_examples: dict[str, dict[str, int]], num_bytes: dict[str, dict[str, int]]) -> str:
    """The YAML header: `configs:` with data_files and `dataset_info` (features, splits) per config; only the
    splits present in `num_examples` are listed."""
    configs, infos = [], []
    for config in CONFIGS:
        splits = [s for s in SPLITS if s in num_examples[config]]
        configs.append({"config_name": config, "data_files": [
            {"split": split, "path": parquet_path(config, split)} for split in splits]})
        infos.append({"config_name": config,
                      "features": features(sequential=config == "sequential")._to_yaml_list(),
                      "splits": [{"name": split, "num_bytes": num_bytes[config][split],
                                  "num_examples": num_examples[config][split]} for split in splits]})
    return yaml.safe_dump({"configs": configs, "dataset_info": infos}, sort_keys=False, allow_unicode=True).strip()


def render_card(template: str, header_yaml: str, stats_md: str, demo: bool, sources_md: str,
                licenses_md: str) -> str:
    note = ("**The audio of this build is synthetic.** It was generated by the project's demo generator "
            "(synthesized speech and animal-like calls), not recorded from people or animals; it exists so that "
            "the pipeline runs offline. Use the real sources for any scientific result."
            if demo else "The audio comes from the source corpora listed below (see Provenance).")
    return (template.replace("{{YAML}}", header_yaml).replace("{{STATISTICS}}", stats_md)
            .replace("{{AUDIO_NOTE}}", note).replace("{{SOURCES}}", sources_md).replace("{{LICENSES}}", licenses_md))


def write_manifest(out: Path, seed: int, sources: dict[str, Any], item_ids: dict[str, dict[str, list[str]]],
                   splits: Sequence[str] = SPLITS) -> dict:
    """`sake_manifest.json` (ARCHITECTURE.md): the splits built, file hashes of the Parquet files, fingerprint,
    item ids."""
    files = {}
    for config in CONFIGS:
        for split in splits:
            rel = parquet_path(config, split)
            files[rel] = sha256_file(out / rel)
    fingerprint = hashlib.sha256("\n".join(f"{p}:{h}" for p, h in sorted(files.items())).encode()).hexdigest()
    manifest = {"format": 1, "seed": seed, "splits": [s for s in SPLITS if s in splits], "sources": sources,
                "files": files, "fingerprint": fingerprint, "item_ids": item_ids}
    atomic_write(out / "sake_manifest.json", json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest


def push_to_hub(folder: Path, repo_id: str) -> None:
    """Upload a built dataset folder as the Hub dataset ``repo_id`` (token from ``HF_TOKEN`` /
    ``HUGGING_FACE_HUB_TOKEN`` or the saved login)."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                      commit_message="SAKE build")
    log.info("pushed %s to https://huggingface.co/datasets/%s", folder, repo_id)
