"""What it costs, and what it prevents, that no attention under a gradient runs cuDNN's kernel.

The edit session applies every edit under :func:`editors.models.kernels.training_attention`, which allows every
scaled-dot-product attention backend except cuDNN's (its backward returns NaN for some masked shapes on H100/H200).
For each method, ``--edits`` edits of the synthetic dataset are applied in one pass (``EditSession.apply_many``)
and restored, under each arm, the arms' order alternating from one repeat to the next:

* ``safe``: the session as the toolkit runs it;
* ``cudnn``: every backend allowed during the apply (torch's own choice: cuDNN's kernel first on H100/H200).

It prints the apply time per edit of each arm (median over ``--repeats``), their ratio, and per arm how many edits
ended with a non-finite training loss (the sign of a NaN gradient carried into the weights).

    BENCH_MODULE=bench.training_attention bash bench/gpu_run.sh --methods ft_llm,ft_audio --edits 16
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import statistics
import time
from typing import Any, Iterator, Sequence

from bench.arms import Bench, plan_units, synthetic_bench
from bench.models import _sync

LOG = logging.getLogger(__name__)
ARMS = ("safe", "cudnn")


@contextlib.contextmanager
def arm(name: str) -> Iterator[None]:
    """Inside the block the session's attention backends are those of arm ``name``."""
    from torch.nn.attention import SDPBackend

    from editors.models import kernels

    kept = kernels.TRAINING_BACKENDS
    if name == "cudnn":
        kernels.TRAINING_BACKENDS = [b for n, b in SDPBackend.__members__.items() if n != "ERROR"]
    try:
        yield
    finally:
        kernels.TRAINING_BACKENDS = kept


def non_finite_losses(stats: Sequence[dict[str, Any]]) -> int:
    """How many edits' stats report a training loss that is NaN or infinite."""
    return sum(1 for s in stats if isinstance(s.get("loss"), float) and not math.isfinite(s["loss"]))


def measure(bench: Bench, method: str, edits: int, repeats: int) -> dict[str, Any]:
    """Apply and restore ``edits`` edits in one pass under each arm, ``repeats`` times (see the module docstring)."""
    from editors.base import EditRequest
    from editors.session import EditSession

    configs, limit = plan_units(edits, 0)
    requests = [EditRequest.from_row(row) for row in bench.dataset.ordered(configs, limit)][:edits]
    session = EditSession(bench.editor(method))
    seconds: dict[str, list[float]] = {a: [] for a in ARMS}
    bad: dict[str, int] = {a: 0 for a in ARMS}
    with arm("safe"):  # one untimed pass: the process's first kernels and allocations
        session.apply_many(requests[:2], seed=bench.seed)
        session.restore()
    for r in range(repeats):
        for name in ARMS if r % 2 == 0 else ARMS[::-1]:
            with arm(name):
                _sync(bench.scale.device)
                start = time.perf_counter()
                stats = session.apply_many(requests, seed=bench.seed)
                _sync(bench.scale.device)
                seconds[name].append((time.perf_counter() - start) / len(requests))
                session.restore()
            bad[name] += non_finite_losses(stats)
            LOG.info("%s, arm %s, repeat %d: %.3f s/edit apply", method, name, r + 1, seconds[name][-1])
    median = {a: statistics.median(seconds[a]) for a in ARMS}
    return {"method": method, "edits": len(requests), "repeats": repeats,
            "apply_s_per_edit": {a: round(median[a], 4) for a in ARMS},
            "safe_over_cudnn": round(median["safe"] / median["cudnn"], 3),
            "edits_with_non_finite_loss": bad}


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | edits x repeats | apply s/edit, safe | apply s/edit, cuDNN allowed | safe / cuDNN | "
             "edits with a non-finite loss (safe, cuDNN) |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["apply_s_per_edit"]
        b = r["edits_with_non_finite_loss"]
        lines.append(f"| {r['method']} | {r['edits']} x {r['repeats']} | {s['safe']:.3f} | {s['cudnn']:.3f} | "
                     f"{r['safe_over_cudnn']:.2f}x | {b['safe']}, {b['cudnn']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ft_llm,ft_audio")
    p.add_argument("--edits", type=int, default=16, help="edits applied in one pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="qwen2_audio", choices=("qwen2_audio", "desta25"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode with the tiny model")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = []
    with synthetic_bench(tiny=args.tiny, seed=args.seed, model=args.model, units=args.edits, max_new_tokens=32,
                         prefix="sake-attention-") as bench:
        for method in [m for m in args.methods.split(",") if m]:
            rows.append(measure(bench, method, args.edits, args.repeats))
            print(render(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
