#!/usr/bin/env python
"""Build the SAKE dataset: Parquet per config/split, a dataset card (README.md) and sake_manifest.json.

    python build_splits.py --demo --out /tmp/sake
    python build_splits.py --sakura PATH|HUB_ID --dynamic-superb PATH|LIST.txt|HUB_ID --mmlu PATH|cais/mmlu
        --out DIR --seed 0 [--pool crema_d=PATH --pool esc50=PATH ...] [--push-to-hub ORG/NAME]
    python build_splits.py --sakura PATH --dynamic-superb PATH --mmlu PATH --out DIR --splits test   # test only
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from sake_core.errors import ConfigError, user_errors

from sake_core.command import command_prog

log = logging.getLogger("build_splits")


def parse_pool(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--pool expects PRESET=PATH, got {text!r}")
    preset, path = text.split("=", 1)
    return preset.strip(), path.strip()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("python build_splits.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("sources (all three required unless --demo)")
    src.add_argument("--sakura", help="SAKURA folder (<Track>/metadata.csv + audio/) or Hub id (needs network)")
    src.add_argument("--dynamic-superb", help="Dynamic-SUPERB Phase-2: a folder of task folders in the release layout "
                     "(<Task>/data/test-*.parquet, or <Task>/metadata.csv with the audio beside it), a .txt task list "
                     "(one task folder or Hub id per line), or a Hub id; Hub ids need network access")
    src.add_argument("--mmlu", help="MMLU Parquet file/folder (cais/mmlu layout) or Hub id cais/mmlu")
    src.add_argument("--pool", action="append", type=parse_pool, default=[], metavar="PRESET=PATH",
                     help="labelled audio pool for train/extra audio (repeatable); presets: crema_d, esc50, "
                          "commonvoice, animal_sound_dataset, folder, csv (for folder/csv PATH is a mapping YAML; see "
                          "sake_dataset/sources/pools.py)")
    src.add_argument("--pool-limit", type=int, default=5000,
                     help="at most this many clips per label are read from each pool (5000)")
    src.add_argument("--demo", action="store_true", help="use the embedded synthetic demo sources and demo sizes")
    p.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-per-attribute", type=int, default=None, help="test instances per attribute (300)")
    p.add_argument("--train-per-attribute", type=int, default=None, help="train instances per attribute (1000)")
    p.add_argument("--sequences", type=int, default=None, help="sequences per split in `sequential` (10)")
    p.add_argument("--sequence-length", type=int, default=None, help="edits per sequence (10)")
    p.add_argument("--splits", nargs="+", choices=("train", "test"), default=None,
                   help="splits to build (default: train test; --train-per-attribute 0 means test only)")
    p.add_argument("--task-table", action="append", type=Path, default=[], metavar="YAML",
                   help="extra Dynamic-SUPERB task table (task -> attributes, format of "
                        "sake_dataset/dsuperb_tasks.yaml; its entries override the shipped ones; repeatable)")
    p.add_argument("--allow-unlisted-tasks", action="store_true",
                   help="let Dynamic-SUPERB tasks missing from the task table into type-4 pools (their attributes "
                        "are then guessed from keywords); default: they are left out and listed in the log and card")
    p.add_argument("--portability", choices=("auto", "sakura", "curated"), default=None,
                   help="portability questions: auto = SAKURA's multi-hop questions where eligible, else the curated "
                        "sake_dataset/portability_knowledge.yaml (default; --demo: curated); sakura; curated")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the built folder as a Hub dataset "
                   "(token from HF_TOKEN / huggingface-cli login)")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="only warnings, no progress bars (--no-progress, as in sake run, train and demo)")
    return p


@user_errors
def main(argv: list[str] | None = None) -> int:
    """Bad sources or arguments (a :class:`~sake_core.errors.SakeError`) end in one line on stderr and exit 2; a
    shortfall of audio prints its table (needed / available per label, the pool that would fill it), exit 2."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sake_dataset.builder import DEMO_SIZES, ShortfallError, build, build_demo

    defaults = DEMO_SIZES if args.demo else {"test_per_attribute": 300, "train_per_attribute": 1000,
                                            "sequences": 10, "sequence_length": 10}
    sizes: dict[str, Any] = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in defaults.items()}
    options: dict[str, Any] = {"splits": args.splits, "allow_unlisted_tasks": args.allow_unlisted_tasks,
                               "progress": not args.quiet}
    if args.portability:
        options["portability"] = args.portability
    if args.splits is None and args.train_per_attribute == 0:
        options["splits"] = ["test"]
    try:
        if args.demo:
            if args.pool or args.sakura or args.dynamic_superb or args.mmlu:
                raise ConfigError("--demo uses the embedded sources; drop --sakura/--dynamic-superb/"
                                  "--mmlu/--pool")
            if args.task_table:
                from sake_dataset.builder import DEMO_TASK_TABLE

                options["task_tables"] = (DEMO_TASK_TABLE, *args.task_table)
            result = build_demo(args.out, seed=args.seed, **sizes, **options)
        else:
            missing = [f"--{n.replace('_', '-')}" for n in ("sakura", "dynamic_superb", "mmlu") if not getattr(args, n)]
            if missing:
                raise ConfigError(f"missing {', '.join(missing)} (or use --demo)")
            result = build(args.sakura, args.dynamic_superb, args.mmlu, args.out, seed=args.seed, pools=args.pool,
                           pool_limit=args.pool_limit, task_tables=args.task_table, **sizes, **options)
    except ShortfallError as exc:
        print(f"build_splits: shortfall: {exc}", file=sys.stderr)
        return 2
    from sake_dataset.release import stats_markdown

    print(stats_markdown(result.stats))
    print(f"built {result.out} in {result.seconds:.1f} s; fingerprint {result.manifest['fingerprint']}")
    if args.push_to_hub:
        from sake_dataset.release import push_to_hub

        push_to_hub(result.out, args.push_to_hub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
