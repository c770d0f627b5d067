"""The graph engine's keys and values written into their lanes and gathered back, timed against the elementwise
index it replaced.

The FT-Audio pass profile (bench/NOTES.md, 2026-12-07) put the index kernels of the graph engine's KV cache among
the generation's non-matmul kernels: ``aten::index`` / ``index_put_`` over ``[lanes, :, positions]`` move one
element per thread, over bf16 a 2-byte copy each. Arms: ``bf16`` (the elementwise index over the bf16 elements, as
the engine ran it before) and ``wide`` (``graph.store_rows`` / ``graph.gather_rows``: the same index calls over a
view of each head row as 16-byte elements). The arms give the same bits (checked before timing). Prints
milliseconds per call (median of ``--repeats``) and the ``bf16`` / ``wide`` ratio.

    BENCH_MODULE=bench.copy_kernels bash bench/gpu_run.sh
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
from typing import Callable, Sequence

import torch

LOG = logging.getLogger(__name__)


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls (CUDA: synchronized; two untimed calls first)."""
    cuda = torch.cuda.is_available()
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def store_rows(lanes: int, heads: int, width: int, tokens: int, head_dim: int, device: str,
               repeats: int) -> list[tuple[str, float, float]]:
    """Keys of ``lanes`` rows (``[lanes, heads, width, head_dim]``, a transposed view as the engine's) written into
    a ``[lanes, heads, tokens, head_dim]`` cache at each row's last valid columns, then gathered back."""
    from editors.models.generation import graph

    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(lanes, width, heads, head_dim, generator=g).to(device, torch.bfloat16).transpose(1, 2)
    valid = torch.randint(width // 2, width + 1, (lanes,), generator=g).tolist()
    spans = [(row, row, 0, count) for row, count in enumerate(valid)]
    writes = graph._Writes.of(spans, width, torch.device(device))
    rows = []
    results = []
    for name, store, gather in (("bf16", _store_elementwise, _gather_elementwise),
                                ("wide", graph.store_rows, graph.gather_rows)):
        cache = torch.zeros(lanes, heads, tokens, head_dim, device=device, dtype=torch.bfloat16)
        store(cache, k, writes)
        results.append((cache.clone(), gather(cache, writes.lane[:, None], writes.position[:, None])))
        lanes_, columns = writes.lane[:, None], writes.position[:, None]
        t_store = _timed(functools.partial(store, cache, k, writes), repeats)
        t_gather = _timed(functools.partial(gather, cache, lanes_, columns), repeats)
        rows.append((name, t_store, t_gather))
    if not all(torch.equal(a, b) for a, b in zip(results[0], results[1])):
        raise AssertionError("store: the wide arm's bits differ from the elementwise arm's")
    return rows


def _store_elementwise(cache: torch.Tensor, k: torch.Tensor, writes: object) -> None:
    cache[writes.lane, :, writes.position] = k[writes.batch_row, :, writes.column]  # type: ignore[attr-defined]


def _gather_elementwise(cache: torch.Tensor, lanes: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return cache[lanes, :, columns].transpose(1, 2)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.copy_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--lanes", type=int, default=16, help="rows of one prefill forward")
    p.add_argument("--width", type=int, default=448, help="the forward's width")
    p.add_argument("--cache-tokens", type=int, default=1024, help="a lane's length")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"## KV cache copies ({name}, torch {torch.__version__}; median ms of {args.repeats})\n")
    store = store_rows(args.lanes, args.heads, args.width, args.cache_tokens, args.head_dim, device, args.repeats)
    print(f"keys into lanes and back, {args.lanes} rows of <= {args.width} columns, {args.heads} heads:")
    for arm, ms_store, ms_gather in store:
        print(f"  {arm:5s} store {ms_store:8.3f} ms ({store[0][1] / ms_store:.2f}x)  gather {ms_gather:8.3f} ms "
              f"({store[0][2] / ms_gather:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
