"""Scoring a very long output: today's offline judge against the old quadratic path, in one run.

A model that never stops (or a hostile submission) can write an output of megabytes. This script writes a
predictions file whose rows carry such an output and times `eval.score.score_predictions(..., protocol="offline")`
on it in a fresh child process (wall time and the child's peak resident memory, interpreter included), then runs
the OLD judging path -- kept here, and only here, as the naive baseline: every option mention compared with every
other one, degeneration patterns with unbounded repeats, no cap on the judged text -- on a much smaller output,
and prints both and their ratio.

    python -m bench.judge_long_output                       # 1 MB output, baseline on 16 KB
    python -m bench.judge_long_output --size 4000000 --baseline-size 32000

What makes today's path fast: the judged text of an output is its first `MAX_JUDGED_CHARS` characters
(`eval/sake_metric/limits.py`), and matching (`matching.py`) and degeneration (`degeneration.py`) are linear in
the text they read (`--raw` also times them on the whole uncapped output).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

OPTIONS = ["dog", "cat", "very sad", "sad"]


def long_output(n_chars: int) -> str:
    """A runaway answer: one option said over and over (the worst case of the old matcher), then a word."""
    unit = "the dog barks and the dog "
    return (unit * (n_chars // len(unit) + 1))[:n_chars]


def write_predictions(path: Path, output: str) -> None:
    header = {"kind": "header", "model": "bench", "method": "bench", "mode": "single", "configs": ["animal"],
              "split": "test", "dataset_fingerprint": None, "expected_rows": 2, "max_new_tokens": 512}
    rows = [
        {"kind": "prediction", "instance_id": "animal/test/000000", "item_id": "animal/test/000000/rel",
         "dimension": "reliability", "type": 0, "attribute": "animal", "question": "Which animal? (a) dog (b) cat",
         "options": OPTIONS, "reference": "dog", "pre_edit": "cat", "post_edit": output, "gap": None,
         "category": ""},
        {"kind": "prediction", "instance_id": "animal/test/000000", "item_id": "animal/test/000000/loc_audio1",
         "dimension": "locality_audio", "type": 1, "attribute": "animal", "question": "Which animal?",
         "options": OPTIONS, "reference": "cat", "pre_edit": "cat", "post_edit": output, "gap": None,
         "category": ""},
    ]
    path.write_text("\n".join(json.dumps(r) for r in [header, *rows]) + "\n", encoding="utf-8")


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from eval.score import score_predictions
results = score_predictions(sys.argv[1], protocol="offline")
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "stages": results["judge"]["stage_counts"], "clipped": results["judge"]["clipped_outputs"]}))
"""


def time_current(path: Path) -> dict:
    """Score `path` offline in a fresh Python process; its wall time (importing the scorer included) and peak
    resident memory."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the old path (naive baseline, as the metric judged before the cap and the linear matcher) ---------------
OLD_SUBSTRING_REPEAT = re.compile(r"([^\W\d_][^\n]{1,39}?)(?:[\s,.;:!?\-]*\1){3,}", re.IGNORECASE)
OLD_WORD_REPEAT = re.compile(r"\b([^\W\d_]{3,})\b(?:[\s,.;:!?\-]+\1\b){2,}", re.IGNORECASE)
OLD_CHAR_RUN = re.compile(r"(\S)\1{9,}")
OLD_NEWLINE_RUN = re.compile(r"(?:\r?\n[ \t]*){4,}")


def old_text_mentions(output: str, options: Sequence[str]) -> set[int]:
    from eval.sake_metric.matching import normalize

    words = normalize(output).split()
    spans = []
    for index, option in enumerate(options):
        target = normalize(option).split()
        for start in range(len(words) - len(target) + 1):
            if words[start:start + len(target)] == target:
                spans.append((start, start + len(target), index))
    kept = [s for s in spans if not any(o is not s and o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0])
                                        for o in spans)]
    return {index for _, _, index in kept}


def time_old(output: str) -> float:
    t0 = time.perf_counter()
    for text in (output, output):  # the two rows of the file
        old_text_mentions(text, OPTIONS)
        for pattern in (OLD_NEWLINE_RUN, OLD_CHAR_RUN, OLD_WORD_REPEAT, OLD_SUBSTRING_REPEAT):
            if pattern.search(text):
                break
    return time.perf_counter() - t0


def time_raw(output: str) -> tuple[float, float]:
    """Today's matcher and degeneration detector on the whole, uncapped output (linear)."""
    from eval.sake_metric.degeneration import degeneration_kind
    from eval.sake_metric.matching import choose_option

    t0 = time.perf_counter()
    choose_option(output, OPTIONS)
    t1 = time.perf_counter()
    degeneration_kind(output + "x")
    return t1 - t0, time.perf_counter() - t1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.judge_long_output", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="characters of the long output (default: 1 MB)")
    p.add_argument("--baseline-size", type=int, default=16_000,
                   help="characters of the output the old quadratic path judges (default: %(default)s)")
    p.add_argument("--raw", action="store_true", help="also time today's matcher/degeneration on the uncapped text")
    args = p.parse_args(argv)
    from eval.sake_metric.limits import MAX_JUDGED_CHARS

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.jsonl"
        write_predictions(path, long_output(args.size))
        current = time_current(path)
    old_s = time_old(long_output(args.baseline_size))
    print(f"offline judging of 2 rows with a {args.size:,}-character output (judged text capped at "
          f"{MAX_JUDGED_CHARS:,} characters; {current['clipped']} row(s) capped):")
    print(f"  today:    {current['seconds']:.3f} s, peak memory {current['peak_mb']:.0f} MB "
          f"(whole process: interpreter, reader, scorer)")
    print(f"  old path: {old_s:.3f} s on a {args.baseline_size:,}-character output "
          f"({args.size / args.baseline_size:.0f}x shorter)")
    print(f"  ratio old/today: {old_s / max(current['seconds'], 1e-9):.1f}x faster today on a "
          f"{args.size / args.baseline_size:.0f}x longer output")
    ok = current["seconds"] < 1.0 and current["peak_mb"] < 200
    print(f"  target (< 1 s, < 200 MB): {'met' if ok else 'MISSED'}")
    if args.raw:
        match_s, degen_s = time_raw(long_output(args.size))
        print(f"  uncapped {args.size:,} characters, today's code: matcher {match_s:.3f} s, "
              f"degeneration {degen_s:.3f} s (linear)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
