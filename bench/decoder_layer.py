"""A training step's forward and backward through LLM decoder layers: the Hugging Face layer, the fused one, packed rows.

What ``editors.models.fused_layer`` changes, measured alone: ``--layers`` decoder layers of the full-size
Qwen2-Audio-7B LLM (random weights, bf16) run forward and backward (the gradient of the hidden states entering them,
the weights frozen, as in FT-Audio's and UnKE's steps) over ``--rows`` left-padded rows of 160-440 tokens padded to
``--width`` (FT-Audio's training rows), with the boolean mask transformers builds. Arms alternate within each repeat:

* ``hf``: the Hugging Face layer's forward (``FUSED_LAYERS["cuda"] = False``), padded rows;
* ``fused``: the library's (one-kernel RMSNorm, rotary over contiguous tables), padded rows;
* ``packed``: the library's on the same tokens packed into one row without padding (variable-length attention on
  CUDA; FT-Audio's training layout there);
* ``compiled`` (with ``--compiled``): ``packed`` with each layer's forward through ``torch.compile`` (inductor's
  fused elementwise kernels for the norms, rotary products, SwiGLU and residuals, forward and backward; the
  matmuls and the attention stay library kernels): what fusing the step's elementwise work could give at most, and
  what its first compile costs (printed; the toolkit compiles nothing);
* ``packed_cat`` (with ``--rotary-cat``): ``packed`` with the rotary products' half-swap as one ``cat`` of the two
  halves (:func:`rotate_by_cat`, forward and backward) instead of ``torch.roll``, whose kernel moved its bytes at a
  quarter of an H100's copy rate in FT-Audio's pass (bench/NOTES.md, 2026-12-07 19:31): the same bits (printed).

It prints the median milliseconds per step of each arm, its ratio to ``hf``, and the largest difference of its
outputs and gradients on the valid tokens from ``hf``'s, relative to the largest value (bf16 on the GPU).

    BENCH_MODULE=bench.decoder_layer bash bench/gpu_run.sh --layers 8 [--compiled] [--rotary-cat]
    python -m bench.decoder_layer --tiny          # CPU smoke run on the tiny model
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from bench.models import _sync

LOG = logging.getLogger(__name__)
ARMS = ("hf", "fused", "packed")


def build(tiny: bool, layers: int, seed: int) -> Any:
    """The adapter whose layers are timed: Qwen2-Audio-7B's LLM geometry (``layers`` layers) on CUDA in bf16, or
    the tiny model in fp32 on the CPU."""
    from editors.models.qwen2_audio import Qwen2AudioAdapter

    if tiny:
        return Qwen2AudioAdapter.tiny(seed)
    return Qwen2AudioAdapter.random_full_size(seed, num_layers=layers)


@dataclass
class Inputs:
    """One arm's inputs to the layers: hidden states, masks, positions, rotary embeddings, and where each row's
    valid tokens sit in them (``valid``: a boolean [rows, width] of the padded layout, or None for the packed row,
    whose tokens are the valid ones in order)."""

    hidden: torch.Tensor
    masks: dict[str, Any]
    position_ids: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]
    valid: torch.Tensor | None


def inputs(adapter: Any, rows: int, width: int, seed: int) -> dict[str, Inputs]:
    """The padded layout (``rows`` left-padded rows of 160-440 tokens, at most ``width``, padded to ``width``) and the
    packed layout of the same tokens (one row, no padding), with the same hidden states on the valid tokens."""
    from editors.models.batch import PackedSequences

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(160, width), min(440, width) + 1, (rows,), generator=gen)
    columns = torch.arange(width)
    attention_mask = (columns[None, :] >= (width - lengths)[:, None]).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    device, dtype = adapter.device, adapter.dtype
    hidden = torch.randn(rows, width, adapter.language_model().config.hidden_size, generator=gen).to(device, dtype)
    valid = attention_mask.bool().to(device)
    batch = SimpleNamespace(attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
                            sequences=None)
    rotary = adapter.language_model().rotary_emb(hidden, batch.position_ids)
    padded = Inputs(hidden, adapter._masks(hidden, batch), batch.position_ids, rotary, valid)
    ends = lengths.cumsum(0)
    sequences = PackedSequences(starts=torch.cat([torch.zeros(1, dtype=torch.long), ends]).to(torch.int32).to(device),
                                lengths=tuple(int(n) for n in lengths))
    packed_hidden = hidden[valid][None]
    packed_positions = batch.position_ids[valid][None]
    packed = Inputs(packed_hidden, {"full_attention": sequences}, packed_positions,
                    adapter.language_model().rotary_emb(packed_hidden, packed_positions), None)
    return {"hf": padded, "fused": padded, "packed": packed}


@functools.cache
def _compiled_layer_forward() -> Any:
    """``fused_layer.layer_forward`` through ``torch.compile`` (made once; the first call compiles)."""
    from editors.models import fused_layer

    return torch.compile(fused_layer.layer_forward, dynamic=False)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """``t``'s last dimension with its two halves swapped (``torch.roll`` by half of it), as one ``cat``."""
    half = t.shape[-1] // 2
    return torch.cat((t[..., half:], t[..., :half]), dim=-1)


class _SwapHalves(torch.autograd.Function):
    """:func:`_swap_halves` whose backward swaps the gradient's halves the same way (a swap is its own inverse)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _swap_halves(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _swap_halves(grad)


def rotate_by_cat(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``fused_layer.rotate`` with the half-swap as :class:`_SwapHalves` instead of ``torch.roll``: the same
    products and sum on the same values, so the same bits forward and backward."""
    return x * cos + _SwapHalves.apply(x) * signed_sin


def step(adapter: Any, arm: str, given: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward through every layer of ``adapter`` under ``arm``: (output, input gradient) on the
    valid tokens, in order."""
    from editors.models import adapter as adapter_module
    from editors.models import fused_layer

    device = adapter.device.type
    kept = fused_layer.FUSED_LAYERS[device]
    kept_forward, kept_rotate = adapter_module.layer_forward, fused_layer.rotate
    fused_layer.FUSED_LAYERS[device] = arm != "hf"
    if arm == "compiled":
        adapter_module.layer_forward = _compiled_layer_forward()
    if arm == "packed_cat":
        fused_layer.rotate = rotate_by_cat
    try:
        x = given.hidden.detach().requires_grad_(True)
        out = adapter._run_layers(x, 0, adapter.num_llm_layers, given.masks, given.position_ids, given.rotary)
        # the loss over the valid tokens only, so that both layouts differentiate the same function
        kept_out = out[given.valid] if given.valid is not None else out[0]
        (grad,) = torch.autograd.grad(kept_out.float().square().mean(), [x])
    finally:
        fused_layer.FUSED_LAYERS[device] = kept
        adapter_module.layer_forward, fused_layer.rotate = kept_forward, kept_rotate
    return kept_out.detach(), (grad[given.valid] if given.valid is not None else grad[0])


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
    p.add_argument("--compiled", action="store_true",
                   help="also the packed arm with each layer through torch.compile (prints its first compile's time)")
    p.add_argument("--rotary-cat", action="store_true",
                   help="also the packed arm with the rotary half-swap as a cat instead of torch.roll")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device: pass --tiny for the CPU smoke run")
    adapter = build(args.tiny, args.layers, args.seed)
    given = inputs(adapter, args.rows, args.width, args.seed)
    device = adapter.device.type
    arms = ARMS + (("compiled",) if args.compiled else ()) + (("packed_cat",) if args.rotary_cat else ())
    given["compiled"] = given["packed_cat"] = given["packed"]
    results = {}
    for arm in arms:  # warm-up (the compiled arm's first call compiles)
        _sync(device)
        started = time.perf_counter()
        results[arm] = step(adapter, arm, given[arm])
        _sync(device)
        if arm == "compiled":
            print(f"compiled arm: first forward+backward (compile included) {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            _sync(device)
            started = time.perf_counter()
            step(adapter, arm, given[arm])
            _sync(device)
            times[arm].append(1000 * (time.perf_counter() - started))
    median = {arm: statistics.median(t) for arm, t in times.items()}
    out_hf, grad_hf = results["hf"]
    tokens = int(given["packed"].hidden.shape[1])
    print(f"decoder layers: {adapter.num_llm_layers} layers, {args.rows} rows x {args.width} tokens "
          f"({tokens} valid: {args.rows * args.width / tokens:.2f}x padding), {adapter.dtype} on {device}")
    for arm in arms:
        out, grad = results[arm]
        print(f"  {arm:10s} {median[arm]:8.1f} ms per forward+backward (median of {args.repeats}); "
              f"hf / {arm}: {median['hf'] / median[arm]:.2f}x; largest relative difference from hf: output "
              f"{relative_difference(out, out_hf):.2g}, input gradient {relative_difference(grad, grad_hf):.2g}")
    if args.rotary_cat:
        same = all(torch.equal(a, b) for a, b in zip(results["packed_cat"], results["packed"]))
        print(f"packed_cat against packed: output and input gradient {'the same bits' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
