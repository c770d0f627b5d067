"""What cuDNN's convolutions cost the audio encoder when a batch's shape is new, against torch's own kernels.

``editors.models.kernels.encoder_convolutions`` runs the audio encoders' convolutions without cuDNN, which builds
an execution plan on the host for every new (clips, frames) shape. Here Qwen2-Audio's tower encodes the same clips
(lengths drawn from the scale's range with ``--seed``, longest first, ``encoder_batch_cuda`` per call, as
``audio_states`` batches them), in rounds of fresh clip sets, each set once under each arm and then again warm:

* ``cudnn``: convolutions through cuDNN (the baseline: torch's default);
* ``native``: torch's own kernels (the library's).

An arm's first encoding of a round's clips is its cold one: under ``cudnn`` it meets the shapes cuDNN has not planned
yet (all of them in the first round; later rounds repeat many, since widths are rounded to ``encoder_width_step``).
The order of the arms alternates from one round to the next, so that neither always runs first. It prints the
seconds per round cold and warm and the largest state difference between the arms (bf16 rounding on a GPU).

    BENCH_MODULE=bench.encoder_convolutions bash bench/gpu_run.sh --clips 160 --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch

from bench.encoder_width import draw_clips, encode_all
from bench.models import _sync, build_adapter, full_scale, tiny_scale
from editors.models import kernels

ARMS = ("cudnn", "native")


def encode(adapter: Any, clips: list[np.ndarray], batch: int, arm: str, device: str) -> tuple[float, list]:
    """Seconds to encode ``clips`` under ``arm`` (the device synchronised before and after), and the states."""
    kept = kernels.CONVOLUTION_CUDNN
    kernels.CONVOLUTION_CUDNN = arm == "cudnn"
    try:
        _sync(device)
        start = time.perf_counter()
        out = encode_all(adapter, clips, batch)
        _sync(device)
        return time.perf_counter() - start, out
    finally:
        kernels.CONVOLUTION_CUDNN = kept


def measure(adapter: Any, scale: Any, clips: int, rounds: int, seed: int) -> list[dict[str, Any]]:
    batch = adapter.encoder_batch_cuda if scale.device == "cuda" else 4
    rows = []
    for r in range(rounds):
        drawn = sorted(draw_clips(scale, clips, seed + r), key=lambda c: -len(c))
        shapes = {(len(drawn[i:i + batch]), adapter.encoder_width(drawn[i:i + batch]))
                  for i in range(0, clips, batch)}
        row: dict[str, Any] = {"round": r + 1, "shapes": len(shapes), "first": ARMS[r % 2]}
        states = {}
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            row[f"{arm} cold"], states[arm] = encode(adapter, drawn, batch, arm, scale.device)
            row[f"{arm} warm"], _ = encode(adapter, drawn, batch, arm, scale.device)
        row["max_abs_diff"] = max(float((x.float() - y.float()).abs().max())
                                  for x, y in zip(states["cudnn"], states["native"]))
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], clips: int, device: str) -> str:
    lines = [f"{clips} clips per round on {device}", "",
             "| round | shapes | first arm | cudnn cold (s) | cudnn warm (s) | native cold (s) | native warm (s) | "
             "cudnn cold / native cold | largest state difference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['shapes']} | {r['first']} | {r['cudnn cold']:.3f} | {r['cudnn warm']:.3f} | "
                     f"{r['native cold']:.3f} | {r['native warm']:.3f} | "
                     f"{r['cudnn cold'] / r['native cold']:.2f}x | {r['max_abs_diff']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=160, help="clips per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode with the tiny model")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scale = tiny_scale() if args.tiny else full_scale()
    adapter = build_adapter(scale, args.seed)
    device_name = torch.cuda.get_device_name(0) if scale.device == "cuda" else "CPU"
    print(render(measure(adapter, scale, args.clips, args.rounds, args.seed), args.clips, device_name), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
