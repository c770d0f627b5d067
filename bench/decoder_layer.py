"""A training step's forward and backward through LLM decoder layers: the Hugging Face layer against the fused one.

What ``editors.models.fused_layer`` changes, measured alone: ``--layers`` decoder layers of the full-size
Qwen2-Audio-7B LLM (random weights, bf16) run forward and backward (the gradient of the hidden states entering them,
the weights frozen, as in FT-Audio's and UnKE's steps) over ``--rows`` left-padded rows of 160-440 tokens padded to
``--width`` (FT-Audio's training rows), with the boolean mask transformers builds. Arms alternate within each repeat:

* ``hf``: the Hugging Face layer's forward (``FUSED_LAYERS["cuda"] = False``);
* ``fused``: the library's (one-kernel RMSNorm, rotary over contiguous tables).

It prints the median milliseconds per step of each arm, their ratio, and the largest difference of the two arms'
outputs and gradients relative to the largest value (bf16).

    BENCH_MODULE=bench.decoder_layer bash bench/gpu_run.sh --layers 8
    python -m bench.decoder_layer --tiny          # CPU smoke run on the tiny model
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from bench.models import _sync

LOG = logging.getLogger(__name__)
ARMS = ("hf", "fused")


def build(tiny: bool, layers: int, seed: int) -> Any:
    """The adapter whose layers are timed: Qwen2-Audio-7B's LLM geometry (``layers`` layers) on CUDA in bf16, or
    the tiny model in fp32 on the CPU."""
    from editors.models.qwen2_audio import Qwen2AudioAdapter

    if tiny:
        return Qwen2AudioAdapter.tiny(seed)
    return Qwen2AudioAdapter.random_full_size(seed, num_layers=layers)


def inputs(adapter: Any, rows: int, width: int, seed: int) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor,
                                                                     tuple[torch.Tensor, torch.Tensor]]:
    """Hidden states, masks, positions and rotary embeddings of ``rows`` left-padded rows of 160-440 tokens (at
    most ``width``) padded to ``width``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(160, width), min(440, width) + 1, (rows,), generator=gen)
    columns = torch.arange(width)
    attention_mask = (columns[None, :] >= (width - lengths)[:, None]).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    device, dtype = adapter.device, adapter.dtype
    hidden = torch.randn(rows, width, adapter.language_model().config.hidden_size, generator=gen).to(device, dtype)
    batch = SimpleNamespace(attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
                            sequences=None)
    masks = adapter._masks(hidden, batch)
    rotary = adapter.language_model().rotary_emb(hidden, batch.position_ids)
    return hidden, masks, batch.position_ids, rotary


def step(adapter: Any, arm: str, hidden: torch.Tensor, masks: dict[str, Any], position_ids: torch.Tensor,
         rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward through every layer of ``adapter`` under ``arm``: (output, input gradient)."""
    from editors.models import fused_layer

    device = adapter.device.type
    kept = fused_layer.FUSED_LAYERS[device]
    fused_layer.FUSED_LAYERS[device] = arm == "fused"
    try:
        x = hidden.detach().requires_grad_(True)
        out = adapter._run_layers(x, 0, adapter.num_llm_layers, masks, position_ids, rotary)
        (grad,) = torch.autograd.grad(out.float().square().mean(), [x])
    finally:
        fused_layer.FUSED_LAYERS[device] = kept
    return out.detach(), grad


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers run per step (full size; default 8)")
    p.add_argument("--rows", type=int, default=15, help="training rows per step (default 15: an FT-Audio pass)")
    p.add_argument("--width", type=int, default=512, help="padded width in tokens (default 512)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per arm (default 7, after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a smoke run)")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device: pass --tiny for the CPU smoke run")
    adapter = build(args.tiny, args.layers, args.seed)
    hidden, masks, position_ids, rotary = inputs(adapter, args.rows, args.width, args.seed)
    device = adapter.device.type
    results = {arm: step(adapter, arm, hidden, masks, position_ids, rotary) for arm in ARMS}  # warm-up
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
            _sync(device)
            started = time.perf_counter()
            step(adapter, arm, hidden, masks, position_ids, rotary)
            _sync(device)
            times[arm].append(1000 * (time.perf_counter() - started))
    median = {arm: statistics.median(t) for arm, t in times.items()}
    (out_hf, grad_hf), (out_fused, grad_fused) = results["hf"], results["fused"]
    print(f"decoder layers: {adapter.num_llm_layers} layers, {args.rows} rows x {args.width} tokens, "
          f"{adapter.dtype} on {device}")
    for arm in ARMS:
        print(f"  {arm:5s} {median[arm]:8.1f} ms per forward+backward (median of {args.repeats})")
    print(f"  hf / fused: {median['hf'] / median['fused']:.2f}x; largest relative difference: output "
          f"{relative_difference(out_fused, out_hf):.2g}, input gradient {relative_difference(grad_fused, grad_hf):.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
