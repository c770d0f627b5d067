"""Reading hostile predictions lines: today's linear reader against the old quadratic depth check, in one run.

The leaderboard reads untrusted lines of up to 4 MB. This script times the reader the board and scoring share
(`eval.leaderboard.validate.parse_submission`, which runs `eval/sake_metric/predictions_file.py`) on a line of
each hostile shape and on a plain line of the same size, and prints their ratio. It then times the OLD depth
check -- kept here, and only here, as the naive baseline: a backtracking regular expression that removes strings
before counting brackets, quadratic on brackets followed by an unterminated string of escaped quotes -- against
today's `json_depth` on growing lines of that shape, and prints how each grows.

    python -m bench.hostile_lines                    # 4 MB lines; baseline on 10, 20 and 40 KB
    python -m bench.hostile_lines --size 1000000 --baseline-sizes 10000 20000
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the repository and its test fixtures (_leaderboard_helpers)

# -- the old depth check (naive baseline) ------------------------------------------------------------------
OLD_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
OLD_NOT_BRACKET = re.compile(r"[^\[\]{}]")


def old_json_depth(text: str, limit: int) -> int:
    """The depth check before issue 28: strings removed by a backtracking expression, then brackets counted."""
    depth = deepest = 0
    for char in OLD_NOT_BRACKET.sub("", OLD_STRING.sub('""', text)):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
        else:
            depth -= 1
    return deepest


def quadratic_shape(size: int) -> str:
    """Brackets, then an unterminated string of escaped quotes: the shape the old expression retried from every
    quote."""
    start = '{"x": ' + "[" * 20 + '"'
    return start + '\\"' * ((size - len(start)) // 2)


def best_time(function: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_lines", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4 * 1024 * 1024 - 4096, help="hostile line size in bytes")
    parser.add_argument("--baseline-sizes", type=int, nargs="+", default=[10_000, 20_000, 40_000],
                        help="line sizes for the old depth check (it is quadratic: keep them small)")
    args = parser.parse_args(argv)

    import test_hostile_inputs as hostile
    from _leaderboard_helpers import METADATA, jsonl_bytes, make_header, make_manifest, make_rows

    from eval.leaderboard.validate import METADATA_NAME, PREDICTIONS_NAME, SubmissionError, parse_submission
    from eval.sake_metric.predictions_file import json_depth

    hostile.LINE = args.size
    manifest = make_manifest()
    header, rows = make_header(manifest), make_rows(manifest)
    metadata = json.dumps(METADATA).encode()

    def read(files: dict[str, bytes]) -> None:
        try:
            parse_submission(files, source="bench.zip")
        except SubmissionError:
            pass

    plain = {PREDICTIONS_NAME: jsonl_bytes(dict(header, expected_rows=1), [dict(rows[0], post_edit="x" * args.size)]),
             METADATA_NAME: metadata}
    baseline = best_time(lambda: read(plain))
    print(f"reading one {args.size:,}-byte line (validate's reader = scoring's): plain line {baseline:.3f} s")
    for name, (line1, line2, _) in hostile._line_cases(header, rows[0]).items():
        files = {PREDICTIONS_NAME: line1 + b"\n" + line2 + b"\n", METADATA_NAME: metadata}
        seconds = best_time(lambda: read(files), repeats=2)
        print(f"  {name:<66s} {seconds:7.3f} s  {seconds / baseline:6.1f}x the plain line")

    print("depth check on brackets + an unterminated string of escaped quotes:")
    for size in args.baseline_sizes:
        text = quadratic_shape(size)
        old = best_time(lambda: old_json_depth(text, 2), repeats=1)
        new = best_time(lambda: json_depth(text, 2))
        print(f"  {size:>9,} bytes: old {old:8.3f} s, today {new:.5f} s ({old / max(new, 1e-9):,.0f}x)")
    text = quadratic_shape(args.size)
    print(f"  {args.size:>9,} bytes: today {best_time(lambda: json_depth(text, 2)):.3f} s (the old check: "
          "quadratic, hours by extrapolation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
