"""What running Qwen2-Audio's audio encoder only as wide as a batch's clips need saves, against the whole window.

``Qwen2AudioAdapter._encode_audios`` cuts a batch to its longest clip's mel frames (plus the convolutions' reach,
rounded up to ``encoder_width_step``) instead of the checkpoint's 30 s window, and computes the mel spectrogram on
``mel_device`` (default: the model's device). Four arms encode the same clips in batches of
``encoder_batch_cuda`` (lengths drawn from the scale's range with ``--seed``), no cache, the arms' order alternating
from one repeat to the next:

* ``window``: the whole window, mel on the host (the naive baseline: what the tower's own ``forward`` requires);
* ``cut, drawn order``: the cut width, mel on the device, clips in the order drawn (a batch of mixed lengths, as
  when each prefill batch encodes its own clips);
* ``cut, host mel``: the cut width, mel on the host, clips longest first (as ``audio_states`` sorts what
  ``encode_ahead`` hands it);
* ``cut, device mel``: the same with the mel on the model's device (the adapters' default).

It prints seconds per clip (median over ``--repeats``), each arm's speed-up over ``window``, and the largest
difference of the cut arms' states from the window's (bf16 on the GPU: rounding only).

    BENCH_MODULE=bench.encoder_width bash bench/gpu_run.sh --clips 64
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from bench.models import _sync, build_adapter, full_scale, tiny_scale

LOG = logging.getLogger(__name__)
ARMS = ("window", "cut, drawn order", "cut, host mel", "cut, device mel")


@contextlib.contextmanager
def arm(adapter: Any, name: str) -> Iterator[None]:
    """Inside the block the adapter encodes as arm ``name`` says; its settings are put back after."""
    kept = adapter.encoder_width_step, adapter.mel_device
    if name == "window":
        adapter.encoder_width_step = int(adapter.processor.feature_extractor.nb_max_frames)
    adapter.mel_device = "cpu" if name in ("window", "cut, host mel") else None
    try:
        yield
    finally:
        adapter.encoder_width_step, adapter.mel_device = kept


def draw_clips(scale: Any, count: int, seed: int) -> list[np.ndarray]:
    """``count`` noise clips of lengths drawn uniformly from the scale's range (16 kHz), in the order drawn."""
    rng = np.random.default_rng(seed)
    seconds = rng.uniform(*scale.audio_seconds, size=count)
    return [0.1 * rng.standard_normal(int(16000 * s)).astype(np.float32) for s in seconds]


def encode_all(adapter: Any, clips: list[np.ndarray], batch: int) -> list[torch.Tensor]:
    """Every clip's encoder states, ``batch`` clips per call, gradients off."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(clips), batch):
            out += adapter._encode_audios(clips[start:start + batch])
    return out


def measure(adapter: Any, drawn: list[np.ndarray], batch: int, repeats: int, device: str) -> dict[str, Any]:
    """Seconds per clip of each arm (median over ``repeats``) and the cut arms' largest state difference from the
    window's (``drawn``: the clips in the order drawn)."""
    order = sorted(range(len(drawn)), key=lambda i: -len(drawn[i]))
    clips = {a: drawn if a == "cut, drawn order" else [drawn[i] for i in order] for a in ARMS}
    seconds: dict[str, list[float]] = {a: [] for a in ARMS}
    states: dict[str, list[torch.Tensor]] = {}
    for name in ARMS:  # one untimed round: first kernels, allocations and cuDNN plans of every width
        with arm(adapter, name):
            out = encode_all(adapter, clips[name], batch)
        states[name] = out if name == "cut, drawn order" else [out[order.index(i)] for i in range(len(drawn))]
    for r in range(repeats):
        for name in ARMS if r % 2 == 0 else ARMS[::-1]:
            with arm(adapter, name):
                _sync(device)
                start = time.perf_counter()
                encode_all(adapter, clips[name], batch)
                _sync(device)
                seconds[name].append((time.perf_counter() - start) / len(drawn))
            LOG.info("arm %s, repeat %d: %.4f s/clip", name, r + 1, seconds[name][-1])
    median = {a: statistics.median(seconds[a]) for a in ARMS}
    diff = {a: max(float((x.float() - y.float()).abs().max()) for x, y in zip(states[a], states["window"]))
            for a in ARMS[1:]}
    return {"clips": len(drawn), "batch": batch, "repeats": repeats,
            "s_per_clip": {a: round(median[a], 5) for a in ARMS},
            "speedup": {a: round(median["window"] / median[a], 2) for a in ARMS},
            "max_abs_diff": diff,
            "window_frames": int(adapter.processor.feature_extractor.nb_max_frames),
            "mean_frames": round(float(np.mean([adapter.encoder_width([c]) for c in drawn])), 1)}


def render(result: dict[str, Any], device: str) -> str:
    lines = [f"{result['clips']} clips on {device}, {result['batch']} per call, median of {result['repeats']}; "
             f"mean width alone {result['mean_frames']} of {result['window_frames']} mel frames", "",
             "| arm | s/clip | speed-up over window | largest |state - window's| |", "|---|---|---|---|"]
    for a in ARMS:
        diff = result["max_abs_diff"].get(a)
        lines.append(f"| {a} | {result['s_per_clip'][a]:.5f} | {result['speedup'][a]:.2f}x | "
                     f"{'-' if diff is None else f'{diff:.3g}'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode with the tiny model")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scale = tiny_scale() if args.tiny else full_scale()
    adapter = build_adapter(scale, args.seed)
    clips = draw_clips(scale, args.clips, args.seed)
    batch = adapter.encoder_batch_cuda if scale.device == "cuda" else 4
    device_name = torch.cuda.get_device_name(0) if scale.device == "cuda" else "CPU"
    print(render(measure(adapter, clips, batch, args.repeats, scale.device), device_name), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
