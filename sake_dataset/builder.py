"""Build a SAKE release from sources: read -> partition train/test -> construct -> check -> write (atomically)."""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sake_core.atomic import atomic_write, replace_dir, staging_dir
from sake_core.shipped import shipped_path

from .construction import (InstanceBuilder, build_attribute_split, build_sequential, check_instance,
                           make_edit_pairs)
from .dsuperb_tasks import TaskTable, load_task_table
from .knowledge import load_portability, load_question_banks
from .labels import ATTRIBUTES
from .partition import SplitPool, clip_quota, partition_by_hash, partition_clips
from .portability import MODES as PORTABILITY_MODES
from .portability import PortabilityBank, multi_hop_questions
from .progress import progress_bars
from .records import ConstructionError, LabelledClip, SourceError, TaskClip, TextQuestion
from .release import (AudioEncoder, card_yaml, dimension_stats, guess_baseline, parquet_path,
                      portability_categories, portability_origins, provenance, render_card, stats_markdown,
                      write_manifest, write_parquet)
from .schema import CONFIGS, PAPER_TOTALS, SPLITS, count_totals, expected_totals, item_rows

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_DIR = PACKAGE_DIR / "demo_sources"
DEMO_TASK_TABLE = DEMO_DIR / "dynamic_superb_tasks.yaml"  # the synthetic demo tasks are not Phase-2 tasks
LICENSE_FILE = "LICENSE.md"  # the card's license_link: every source's license, named and linked
CARD_TEMPLATE = shipped_path("dataset_card.md")  # the checkout's top-level file, or the wheel's copy
# The demo SAKURA has 8 clips per label; gender (2 labels, no demo pool) bounds the sizes: 3 + 5 clips per label.
DEMO_SIZES = {"test_per_attribute": 6, "train_per_attribute": 10, "sequences": 3, "sequence_length": 5}
POOL_FOR_ATTRIBUTE = {"animal": "esc50 or animal_sound_dataset", "emotion": "crema_d", "gender": "commonvoice",
                      "language": "commonvoice"}
#: Each source's license, named and linked (the card's Licenses section and LICENSE.md of every build).
LICENSES = {
    "sakura": "SAKURA (Yang et al., 2025; [release](https://github.com/ckyang1124/SAKURA)): see its release; its "
              "audio keeps the licenses of the corpora it compiles (Common Voice, CREMA-D, ESC-50, Animal-Sound "
              "Dataset)",
    "dsuperb": "Dynamic-SUPERB Phase-2 (Huang et al., 2025; [release](https://github.com/dynamic-superb/dynamic-superb)):"
               " per-task licenses of the task's source corpus, listed in its task files",
    "mmlu": "MMLU (Hendrycks et al., 2021; [cais/mmlu](https://huggingface.co/datasets/cais/mmlu)): "
            "[MIT](https://github.com/hendrycks/test/blob/master/LICENSE)",
    "crema_d": "CREMA-D (Cao et al., 2014; [release](https://github.com/CheyneyComputerScience/CREMA-D)): "
               "[Open Database License (ODbL) v1.0](https://opendatacommons.org/licenses/odbl/1-0/)",
    "esc50": "ESC-50 (Piczak, 2015; [release](https://github.com/karolpiczak/ESC-50)): "
             "[CC BY-NC 3.0](https://creativecommons.org/licenses/by-nc/3.0/)",
    "commonvoice": "Common Voice (Ardila et al., 2020; [release](https://commonvoice.mozilla.org/datasets)): "
                   "[CC0 1.0](https://creativecommons.org/publicdomain/zero/1.0/)",
    "animal_sound_dataset": "Animal-Sound Dataset (Şaşmaz & Tek, 2018; "
                            "[release](https://github.com/YashNita/Animal-Sound-Dataset)): see its repository",
    "demo": "project-made synthetic audio: the toolkit's license, "
            "[Apache-2.0](https://www.apache.org/licenses/LICENSE-2.0)",
}


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    stats: dict[str, Any]
    seconds: float
    rows: dict[str, dict[str, list[dict[str, Any]]]] = field(repr=False, default_factory=dict)


class ShortfallError(ConstructionError):
    """Not enough distinct audio for the requested sizes; `table` maps (split, attribute, label) to
    (needed, available)."""

    def __init__(self, message: str, table: dict[tuple[str, str, str], tuple[int, int]]):
        super().__init__(message)
        self.table = table


def shortfall_message(table: dict[tuple[str, str, str], tuple[int, int]], have_pools: bool) -> str:
    lines = ["not enough distinct audio clips for the requested sizes (train and test must not share audio; "
             "every instance needs its own edit clip, every label at least 2 clips per split; test takes SAKURA "
             "first, train what is left):", "",
             f"  {'split':<6} {'attribute':<10} {'label':<10} {'needed':>7} {'available':>9} {'missing':>8}  "
             "pool that would fill it"]
    order = {"test": 0, "train": 1}
    for (split, attribute, label), (need, have) in sorted(table.items(), key=lambda kv: (order[kv[0][0]], kv[0])):
        lines.append(f"  {split:<6} {attribute:<10} {label:<10} {need:>7} {have:>9} {need - have:>8}  "
                     f"--pool {POOL_FOR_ATTRIBUTE[attribute].split(' or ')[0]}=PATH"
                     + (" (or animal_sound_dataset=PATH)" if attribute == "animal" else "")
                     + (" (or crema_d=PATH with VideoDemographics.csv)" if attribute == "gender" else ""))
    lines += ["", "Add audio with --pool PRESET=PATH (presets: crema_d, esc50, commonvoice, animal_sound_dataset, "
              "folder, csv) or ask for what the sources allow with --train-per-attribute / --test-per-attribute."
              + (" (pools were given but do not cover it)" if have_pools else "")]
    return "\n".join(lines)


def _read_sources(sakura: str | Path, dynamic_superb: str | Path, mmlu: str | Path,
                  pools: Sequence[tuple[str, str]], pool_limit: int):
    from .sources import read_dynamic_superb, read_mmlu, read_sakura
    from .sources.pools import read_pools

    clips = read_sakura(sakura)
    reports = read_pools(pools, pool_limit)
    pool_clips: list[LabelledClip] = [c for r in reports for c in r.clips]
    return clips, pool_clips, reports, read_dynamic_superb(dynamic_superb), read_mmlu(mmlu)


def resolve_splits(splits: Sequence[str] | None, train_per_attribute: int) -> tuple[str, ...]:
    """The splits a build writes, in SPLITS order: `splits` if given, else both, or test only when
    `train_per_attribute` is 0."""
    if splits is None:
        splits = ("test",) if train_per_attribute == 0 else SPLITS
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConstructionError(f"--splits must name one or more of {list(SPLITS)}, got {list(splits)}")
    return tuple(s for s in SPLITS if s in splits)


def construct(sakura_clips: Sequence[LabelledClip], pool_clips: Sequence[LabelledClip], tasks: Sequence[TaskClip],
              texts: Sequence[TextQuestion], seed: int = 0, test_per_attribute: int = 300,
              train_per_attribute: int = 1000, sequences: int = 10, sequence_length: int = 10,
              have_pools: bool = False, splits: Sequence[str] | None = None, task_table: TaskTable | None = None,
              portability: str = "auto") -> dict[str, dict[str, list[dict[str, Any]]]]:
    """All rows of a release, {config: {split: rows}} for the splits built, as a pure function of normalized
    records and a seed.

    `splits`: the splits to build (default both; test only when `train_per_attribute` is 0). `task_table`: which
    Dynamic-SUPERB tasks each attribute's type-4 items may use (default: the checked-in table). `portability`:
    `auto` (SAKURA multi-hop questions where eligible, else the curated knowledge), `sakura` or `curated`.
    Checks every instance (composition and rules), the Table 1 identities per split (and the paper totals when
    run at paper size), and that train and test share no audio. Audio fields hold `AudioRef`s.
    """
    built = resolve_splits(splits, train_per_attribute)
    sizes = {"test": test_per_attribute, "train": train_per_attribute}
    for split in built:
        if sizes[split] < 1:
            raise ConstructionError(f"--{split}-per-attribute must be at least 1 when the {split} split is built, "
                                    f"got {sizes[split]} (build the test split only with --splits test)")
    if portability not in PORTABILITY_MODES:
        raise ConstructionError(f"--portability must be one of {list(PORTABILITY_MODES)}, got {portability!r}")
    task_table = task_table or load_task_table()
    banks = load_question_banks()
    knowledge = load_portability()
    questions, skipped = multi_hop_questions(sakura_clips)
    if skipped:
        log.warning("SAKURA multi-hop questions skipped: %s", dict(skipped))
    multi_hop = PortabilityBank(questions, knowledge) if questions else None
    if multi_hop is not None:
        _log_multi_hop(multi_hop)

    # 1. edit pairs (balanced) and the clips each split needs
    pairs = {split: {a: make_edit_pairs(a, sizes[split], random.Random(f"{seed}:pairs:{split}:{a}"))
                     for a in ATTRIBUTES} for split in built}
    quota = {split: {a: clip_quota(pairs[split][a], a) for a in ATTRIBUTES} if split in built else {}
             for split in SPLITS}
    test_clips, train_clips, short = partition_clips(sakura_clips, pool_clips, quota["test"], quota["train"],
                                                     random.Random(f"{seed}:partition"))
    if short:
        raise ShortfallError(shortfall_message(short, have_pools), short)
    if "train" not in built:  # a test-only build: the clips train would take serve the test split's other items
        for attribute, by_label in train_clips.items():
            for label, extra in by_label.items():
                test_clips[attribute][label] += extra
                extra.clear()

    # 2. Dynamic-SUPERB and MMLU: disjoint by content too, proportional to the split sizes
    assigned = {c.audio.sha256: "test" for by in test_clips.values() for cs in by.values() for c in cs}
    assigned.update({c.audio.sha256: "train" for by in train_clips.values() for cs in by.values() for c in cs})
    share = 1.0 if built == ("test",) else (0.0 if built == ("train",) else
                                            test_per_attribute / (test_per_attribute + train_per_attribute))
    task_test, task_train = partition_by_hash(tasks, lambda t: t.audio.sha256, assigned, share,
                                              random.Random(f"{seed}:tasks"))
    text_test, text_train = partition_by_hash(texts, lambda q: q.question + "\x00" + "\x00".join(q.choices), {},
                                              share, random.Random(f"{seed}:texts"))
    split_pools = {"test": SplitPool("test", test_clips, task_test, text_test),
                   "train": SplitPool("train", train_clips, task_train, text_train)}

    # 3. construction + per-instance checks
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {c: {} for c in CONFIGS}
    for split in built:
        builder = InstanceBuilder(split_pools[split], banks, knowledge, random.Random(f"{seed}:{split}:instances"),
                                  tasks=task_table, multi_hop=multi_hop, portability_mode=portability)
        all_instances = []
        for attribute in ATTRIBUTES:
            rows[attribute][split] = build_attribute_split(builder, attribute, pairs[split][attribute])
            for row in rows[attribute][split]:
                check_instance(row, task_table)
            all_instances += rows[attribute][split]
        builder.rng = random.Random(f"{seed}:{split}:sequential")
        rows["sequential"][split] = build_sequential(builder, all_instances, sequences, sequence_length)
        for row in rows["sequential"][split]:
            check_instance(row, task_table)
        got = count_totals(all_instances)
        want = expected_totals(sizes[split], split)
        if got != want:
            raise ConstructionError(f"{split}: composition {got} != expected {want} (instances, audio, QA)")
        paper_n, paper_totals = PAPER_TOTALS[split]
        if sizes[split] == paper_n and got != paper_totals:
            raise ConstructionError(f"{split}: composition {got} != paper Table 1 {paper_totals}")
        log.info("%s: %d instances, %d audio inputs, %d QA pairs", split, *got)

    # 4. train and test share no audio (source content hash; the encoded bytes are checked again on writing)
    hashes: dict[str, set[str]] = {split: set() for split in built}
    for config in CONFIGS:
        for split in built:
            for row in rows[config][split]:
                for item in item_rows(row):
                    if "audio" in item:
                        hashes[split].add(item["audio"].sha256)
    shared = hashes.get("train", set()) & hashes.get("test", set())
    if shared:
        raise ConstructionError(f"train and test share {len(shared)} audio clips (content hash), e.g. "
                                f"{sorted(shared)[0]}")

    return rows


def _log_multi_hop(bank: PortabilityBank) -> None:
    """The build log's account of SAKURA's multi-hop questions: per App. I.1 category, and how many (y_o, y_e,
    question) candidates the exclusion rule drops."""
    excluded = bank.exclusion_counts()
    for attribute, counts in bank.category_counts().items():
        e = excluded[attribute]
        log.info("SAKURA multi-hop questions, %s: %s; candidate items (y_o, y_e, question) %d, dropped %d "
                 "(the knowledge for y_o gives the same answer), kept %d", attribute,
                 ", ".join(f"{c} {n}" for c, n in counts.items()), e["candidates"], e["dropped"], e["kept"])


def build(sakura: str | Path, dynamic_superb: str | Path, mmlu: str | Path, out: str | Path, seed: int = 0,
          test_per_attribute: int = 300, train_per_attribute: int = 1000, sequences: int = 10,
          sequence_length: int = 10, pools: Sequence[tuple[str, str]] = (), demo: bool = False,
          card_template: str | Path | None = None, source_names: dict[str, Any] | None = None,
          pool_limit: int = 5000, splits: Sequence[str] | None = None, task_tables: Sequence[str | Path] = (),
          allow_unlisted_tasks: bool = False, portability: str = "auto", progress: bool = True) -> BuildResult:
    """Build the SAKE release into `out` (Parquet per config/split, README.md card, sake_manifest.json).

    Everything is written into a staging folder next to `out` (`sake_core.atomic.staging_dir`) and swapped in at the
    end (`sake_core.atomic.replace_dir`): at every instant `out` is the earlier complete build or the new complete one,
    and leftovers of killed builds are removed by the next build. Same sources + seed give byte-identical Parquet
    files. `splits`, `portability`: see `construct`; `task_tables`: extra Dynamic-SUPERB task tables (same format
    as `dsuperb_tasks.yaml`, overriding it); `allow_unlisted_tasks`: let tasks missing from the tables into
    type-4 pools (their keyword guess decides). `progress`: the readers' and writer's progress bars.
    """
    with progress_bars(progress):
        start = time.monotonic()
        out = Path(out)
        built = resolve_splits(splits, train_per_attribute)
        table = load_task_table(tuple(str(p) for p in task_tables), allow_unlisted_tasks)
        sakura_clips, pool_clips, pool_reports, tasks, texts = _read_sources(sakura, dynamic_superb, mmlu, pools,
                                                                              pool_limit)
        unlisted = table.unlisted((t.task, t.instruction) for t in tasks)
        if unlisted:
            log.warning("Dynamic-SUPERB tasks missing from the task table (%s type-4 pools; keyword guess in "
                        "brackets): %s", "admitted to" if allow_unlisted_tasks else "left out of every",
                        ", ".join(f"{t} [{', '.join(a) or 'none'}]" for t, a in unlisted.items()))

        rows = construct(sakura_clips, pool_clips, tasks, texts, seed=seed, test_per_attribute=test_per_attribute,
                         train_per_attribute=train_per_attribute, sequences=sequences, sequence_length=sequence_length,
                         have_pools=bool(pools), splits=built, task_table=table, portability=portability)
        encoder = AudioEncoder()

        # 5. write into a staging folder next to `out`, then swap
        remove_leftovers(out)
        tmp = staging_dir(out)
        try:
            for config in CONFIGS:
                for split in built:
                    write_parquet(rows[config][split], tmp / parquet_path(config, split), config == "sequential",
                                  encoder, desc=f"{config}/{split}")
            encoded = {split: {encoder.encoded_hash(item["audio"]) for config in CONFIGS for row in rows[config][split]
                               for item in item_rows(row) if "audio" in item} for split in built}
            if encoded.get("train", set()) & encoded.get("test", set()):
                raise ConstructionError("train and test share encoded audio bytes (identical recordings under "
                                        "different source files)")
            stats = _statistics(rows, encoder, sequences, sequence_length, built)
            stats["pools"] = {r.preset: {"path": str(r.path), "clips": len(r.clips), "dropped": dict(sorted(
                r.dropped.items()))} for r in pool_reports}
            stats["dsuperb"] = {"tasks": len({t.task for t in tasks}), "unlisted": unlisted,
                                "allow_unlisted": allow_unlisted_tasks}
            item_ids = {c: {s: [it["id"] for row in rows[c][s] for it in item_rows(row)] for s in built}
                        for c in CONFIGS}
            sources = source_names or {"sakura": str(sakura), "dynamic_superb": str(dynamic_superb), "mmlu": str(mmlu),
                                       "pools": {p: str(path) for p, path in pools}}
            template = Path(card_template or CARD_TEMPLATE)
            if not template.is_file():
                raise SourceError(f"{template}: missing file (expected the dataset card template)")
            num = {c: {s: len(rows[c][s]) for s in built} for c in CONFIGS}
            used_origins = sorted({o for split in built for cfg in stats["provenance"][split].values() for o in cfg})
            licenses = "\n".join(f"- `{o}`: {LICENSES.get(o, 'see the pool corpus license')}" for o in used_origins)
            if demo:
                licenses = ("- every source of this build is the project's synthetic stand-in (`sake_dataset/demo_sources`,"
                            " the toolkit's license, Apache-2.0); the origin names (" + ", ".join(used_origins) +
                            ") only say which corpus layout each imitates. The real corpora's licenses:\n" +
                            "\n".join(f"  - `{o}`: {LICENSES[o]}" for o in used_origins if o in LICENSES))
            sources_md = "\n".join(f"- {k}: `{v}`" for k, v in sources.items() if v and not isinstance(v, dict))
            for preset, info in stats["pools"].items():
                dropped = ", ".join(f"{k} x{n}" for k, n in info["dropped"].items()) or "none"
                where = (sources.get("pools") or {}).get(preset, info["path"])
                sources_md += (f"\n- pool `{preset}` (`{where}`): {info['clips']} labelled clips read; dropped (not SAKE "
                               f"labels): {dropped}")
            sizes_on_disk = {c: {s: (tmp / parquet_path(c, s)).stat().st_size for s in built} for c in CONFIGS}
            card = render_card(template.read_text(encoding="utf-8"), card_yaml(num, sizes_on_disk),
                               stats_markdown(stats), demo, sources_md, licenses)
            atomic_write(tmp / "README.md", card)
            atomic_write(tmp / LICENSE_FILE, "# Licenses of the sources of this SAKE build\n\nSAKE combines audio and "
                         "questions from several corpora; each part keeps its source's license:\n\n" + licenses + "\n")
            manifest = write_manifest(tmp, seed, sources, item_ids, built)
            replace_output(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.monotonic() - start
        log.info("built %s in %.1f s (fingerprint %s)", out, seconds, manifest["fingerprint"][:12])
        return BuildResult(out=out, manifest=manifest, stats=stats, seconds=seconds, rows=rows)


def _statistics(rows, encoder: AudioEncoder, sequences: int, length: int, built: Sequence[str]) -> dict[str, Any]:
    stats: dict[str, Any] = {"splits": list(built), "totals": {}, "dimensions": {}, "sequential": {},
                             "provenance": {}, "guess_baseline": {}, "portability_origins": {},
                             "portability_categories": {}}
    for split in built:
        single = [r for a in ATTRIBUTES for r in rows[a][split]]
        stats["totals"][split] = count_totals(single)
        stats["dimensions"][split] = dimension_stats(single, encoder)
        stats["guess_baseline"][split] = guess_baseline(single)
        stats["portability_origins"][split] = portability_origins(single)
        stats["portability_categories"][split] = portability_categories(single)
        for attribute, counts in stats["portability_categories"][split].items():
            log.info("%s portability items, %s: %s", split, attribute,
                     ", ".join(f"{c} {n}" for c, n in counts.items()))
        stats["sequential"][split] = {"sequences": sequences, "length": length,
                                      "rows": len(rows["sequential"][split])}
        stats["provenance"][split] = provenance({a: rows[a][split] for a in ATTRIBUTES})
    stats["origins"] = sorted({o for s in built for c in stats["provenance"][s].values() for o in c})
    return stats


def remove_leftovers(out: Path) -> None:
    """Remove `.{out}.building-*` folders that killed builds of earlier toolkit versions left next to `out` (the
    staging folders of killed builds of this version are removed by `replace_dir`)."""
    if out.parent.is_dir():
        for leftover in sorted(out.parent.glob(f".{out.name}.building-*")):
            log.info("removing the leftover of an earlier killed build: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def replace_output(tmp: Path, out: Path) -> None:
    """Swap the complete new build `tmp` in as `out` (see `build`)."""
    replace_dir(tmp, out)


def demo_sources() -> dict[str, Any]:
    """Paths of the embedded demo sources (same layouts as the real ones)."""
    pools = []
    for preset in ("crema_d", "esc50"):
        path = DEMO_DIR / "pools" / preset
        if path.is_dir():
            pools.append((preset, str(path)))
    return {"sakura": DEMO_DIR / "sakura", "dynamic_superb": DEMO_DIR / "dynamic_superb",
            "mmlu": DEMO_DIR / "mmlu", "pools": pools}


def build_demo(out: str | Path, seed: int = 0, **overrides: Any) -> BuildResult:
    """Build from the embedded synthetic demo sources with the demo sizes (overridable).

    The demo's Dynamic-SUPERB tasks are synthetic stand-ins, mapped in `demo_sources/dynamic_superb_tasks.yaml`;
    its portability questions come from the curated knowledge file (the demo SAKURA's multi-hop questions are made
    from that same file)."""
    src = demo_sources()
    options = {**DEMO_SIZES, "task_tables": (DEMO_TASK_TABLE,), "portability": "curated", **overrides}
    names = {"sakura": "demo:sakura", "dynamic_superb": "demo:dynamic_superb", "mmlu": "demo:mmlu",
             "pools": {p: f"demo:pools/{p}" for p, _ in src["pools"]}}
    return build(src["sakura"], src["dynamic_superb"], src["mmlu"], out, seed=seed, pools=src["pools"], demo=True,
                 source_names=names, **options)
