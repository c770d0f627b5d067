"""How far two judgings of the same predictions agree: per dimension, the share of items with the same verdict
and Cohen's kappa.

    python -m eval.agreement RESULTS_A.json RESULTS_B.json [--json OUT.json]

Typical use: score one predictions file twice -- `--judge offline` and `--judge openai` (the paper protocol),
or the paper protocol with and without `--prefilter choice` -- and compare, to see how far offline or
prefiltered numbers sit from the paper protocol on your own outputs.

The per-item verdicts come from the results JSON itself (`items`: one character per item in row order, plus
`keys_sha256`, the digest of the (item_id, gap) sequence), so no cache or predictions file is needed; two results
are compared only when their digests match (the same rows in the same order). Kappa is
(p_o - p_e) / (1 - p_e) with p_e from each judging's own pass rate; it is null when p_e is 1 (both judgings
give every item the same constant verdict).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from eval.sake_metric.scoring import DIMENSION_CODES
from sake_core.errors import DataError, user_errors
from sake_core.command import command_prog

DIMENSIONS = tuple(DIMENSION_CODES)


class AgreementError(DataError):
    """Results that cannot be compared; one-line message naming the file."""


def _items(results: dict[str, Any], source: str) -> dict[str, str]:
    items = results.get("items") if isinstance(results, dict) else None
    if not isinstance(items, dict) or not all(isinstance(items.get(k), str) for k in
                                              ("keys_sha256", "dimension", "passed")):
        raise AgreementError(f"{source}: no per-item verdicts ('items'); rescore the predictions with this "
                             "version of eval.score")
    if not len(items["dimension"]) == len(items["passed"]):
        raise AgreementError(f"{source}: field 'items' is inconsistent (dimension and passed differ in length)")
    return items


def kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary labelings of the same items (None when undefined)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def agreement(results_a: dict[str, Any], results_b: dict[str, Any], *, source_a: str = "A",
              source_b: str = "B") -> dict[str, Any]:
    """Per dimension (and `all`): items, agreement share (%), Cohen's kappa, each judging's pass rate (%)."""
    items_a, items_b = _items(results_a, source_a), _items(results_b, source_b)
    if items_a["keys_sha256"] != items_b["keys_sha256"]:
        raise AgreementError(f"{source_a} and {source_b} judge different rows (items.keys_sha256 differs); score "
                             "the same predictions file twice")
    rows: dict[str, Any] = {}
    for dimension in DIMENSIONS + ("all",):
        code = DIMENSION_CODES.get(dimension)
        picked = [i for i, d in enumerate(items_a["dimension"]) if code is None or d == code]
        a = [items_a["passed"][i] == "1" for i in picked]
        b = [items_b["passed"][i] == "1" for i in picked]
        if not picked:
            continue
        k = kappa(a, b)
        rows[dimension] = {
            "items": len(picked),
            "agreement": round(100.0 * sum(x == y for x, y in zip(a, b)) / len(picked), 2),
            "kappa": None if k is None else round(k, 4),
            "pass_a": round(100.0 * sum(a) / len(a), 2),
            "pass_b": round(100.0 * sum(b) / len(b), 2),
        }
    protocol = lambda r: (r.get("judge") or {}).get("protocol") or "?"  # noqa: E731
    return {"a": {"source": source_a, "protocol": protocol(results_a)},
            "b": {"source": source_b, "protocol": protocol(results_b)},
            "per_dimension": rows}


def markdown(report: dict[str, Any]) -> str:
    """The agreement as a markdown table."""
    a, b = report["a"], report["b"]
    lines = [f"Agreement of A = {a['source']} ({a['protocol']} protocol) and B = {b['source']} "
             f"({b['protocol']} protocol)", "",
             "| Dimension | Items | Agreement (%) | Cohen's kappa | A passed (%) | B passed (%) |",
             "|---|---:|---:|---:|---:|---:|"]
    for dimension, r in report["per_dimension"].items():
        k = "-" if r["kappa"] is None else f"{r['kappa']:.3f}"
        lines.append(f"| {dimension} | {r['items']} | {r['agreement']:.2f} | {k} | {r['pass_a']:.2f} | "
                     f"{r['pass_b']:.2f} |")
    return "\n".join(lines) + "\n"


def _load(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AgreementError(f"{path}: cannot read a results JSON ({exc})") from None


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=command_prog("python -m eval.agreement"), description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_a", help="results JSON written by eval.score")
    p.add_argument("results_b", help="results JSON of the same predictions under another judging")
    p.add_argument("--json", default=None, help="also write the agreement as JSON to this path")
    args = p.parse_args(argv)
    report = agreement(_load(args.results_a), _load(args.results_b), source_a=args.results_a,
                       source_b=args.results_b)
    if args.json:
        from eval.score import write_json_atomic

        write_json_atomic(args.json, report)
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
