"""The summary of a ``bench/ab.sh`` run: each arm's s/edit per method and engine, round by round, and the ratio of
the two arms' means.

    python -m bench.ab_summary OUT_DIR        (the folder holding ab_new1.json, ab_old1.json, ...)
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

ARM_FILE = re.compile(r"ab_(new|old)(\d+)\.json")


def seconds_per_edit(out_dir: Path) -> dict[tuple[str, str, str], list[float]]:
    """(method, engine, arm) -> the s/edit of each round, in round order, from the ``bench.goals`` JSON files of
    ``out_dir`` (a process that wrote none, e.g. one stopped by its timeout, has no entry)."""
    files = sorted(((int(m.group(2)), m.group(1), p) for p in out_dir.glob("ab_*.json")
                    if (m := ARM_FILE.fullmatch(p.name))))
    arms: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for _, arm, path in files:
        for row in json.loads(path.read_text())["rows"]:
            for run in row["runs"]:
                if run.get("s_per_edit") is not None:
                    arms[row["method"], run["engine"], arm].append(float(run["s_per_edit"]))
    return dict(arms)


def summary_lines(arms: dict[tuple[str, str, str], list[float]]) -> list[str]:
    """One line per method and engine: both arms' rounds and, where both ran, new/old of their means."""
    lines = []
    for method, engine in sorted({(m, e) for m, e, _ in arms}):
        new, old = arms.get((method, engine, "new"), []), arms.get((method, engine, "old"), [])
        line = (f"{method} {engine}: new {' '.join(f'{s:.3f}' for s in new) or '-'}"
                f" | old {' '.join(f'{s:.3f}' for s in old) or '-'}")
        if new and old:
            line += f" | new/old (means) {(sum(new) / len(new)) / (sum(old) / len(old)):.3f}"
        lines.append(line)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="the folder of one bench/ab.sh run ($OUT)")
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        parser.error(f"{args.out_dir} is not a folder")
    print("\n".join(summary_lines(seconds_per_edit(args.out_dir))) or f"no ab_*.json with rows in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
