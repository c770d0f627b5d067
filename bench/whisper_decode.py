"""Whisper's transcript decode at DeSTA2.5's full size: ``whisper.generate`` against the static-cache engine.

Times a transcript decode from precomputed encoder outputs (as DeSTA2.5's shared encoder run makes them: fp32,
128 new tokens, random weights never stop early) for a few batch sizes, with each arm:

* ``sdpa``: ``whisper.generate`` with transformers' SDPA function and PyTorch's kernel choice (the
  memory-efficient kernel for fp32 on CUDA; the release's path);
* ``sdpa-math``: the same under PyTorch's math backend (batched matmuls and a softmax);
* ``static``: ``editors.models.generation.transcripts.transcribe`` (static cache, the decode step captured as a
  CUDA graph: the library's default, ``DeSTA25Adapter.transcript_engine == "graph"``);

and reports each against the first arm, with the share of transcripts whose tokens are identical to its (the
engines sum in different orders, so a near-tie token may differ on a GPU). The per-call times over the batch
sizes also give each decode loop's fixed cost per step and its cost per audio.

    BENCH_MODULE=bench.whisper_decode bash bench/gpu_run.sh --batches 7,21,64
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

ARMS = ("sdpa", "sdpa-math", "static")


@contextlib.contextmanager
def arm(name: str) -> Iterator[None]:
    """The SDPA backend of arm ``name`` for the block (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]) if name == "sdpa-math" else contextlib.nullcontext():
        yield


def decoder(name: str, whisper: torch.nn.Module, encoded: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    """Arm ``name``'s decode of ``encoded``: the new tokens ``[B, new_tokens]`` (padding after an end token)."""
    from transformers.modeling_outputs import BaseModelOutput

    from editors.models.generation.transcripts import TranscriptRules, transcribe

    if name != "static":
        return functools.partial(whisper.generate, encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                                 max_new_tokens=new_tokens)
    rules = TranscriptRules.of(whisper)
    if rules is None:
        raise SystemExit("this Whisper's generation config is not modelled by the static engine")

    def static() -> torch.Tensor:
        ids = transcribe(whisper, encoded, new_tokens, rules)
        return torch.nn.functional.pad(ids, (0, new_tokens - ids.shape[1]), value=rules.pad)

    return static


def profile_call(call: Callable[[], object], name: str, rows: int = 12) -> str:
    """``call()`` once under arm ``name`` with the profiler: its kernels by total device time (a table)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with arm(name), torch.no_grad(), profile(activities=activities) as prof:
        call()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="7,21,64", help="audios per Whisper call, comma-separated")
    p.add_argument("--arms", default="sdpa,static", help="arms, comma-separated (the first is the baseline)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode with the tiny DeSTA2.5 (6 new tokens)")
    p.add_argument("--profile", action="store_true",
                   help="after the timings, one call of the first arm per batch size under the profiler: top kernels")
    args = p.parse_args(argv)
    names = args.arms.split(",")
    if not names or any(n not in ARMS for n in names):
        p.error(f"--arms {args.arms!r}: expected a comma-separated choice of {', '.join(ARMS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from editors.models.desta25 import DeSTA25Adapter

    adapter = DeSTA25Adapter.tiny(seed=args.seed) if args.tiny else DeSTA25Adapter.random_full_size(seed=args.seed)
    whisper = adapter.model.perception.whisper
    new_tokens = min(args.max_new_tokens, 6) if args.tiny else args.max_new_tokens
    sync = torch.cuda.synchronize if whisper.device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(args.seed)
    batches = [int(b) for b in args.batches.split(",")]
    low, high = (0.5, 2.0) if args.tiny else (5.0, 16.0)
    audios = [rng.standard_normal(int(16000 * rng.uniform(low, high))).astype(np.float32) * 0.1
              for _ in range(max(batches))]
    others = names[1:]
    print(f"| audios per call | {' | '.join(f'{n} s per call' for n in names)} | "
          f"{' | '.join(f'{names[0]} / {n}' for n in others)} | "
          f"{' | '.join(f'{n}: identical transcripts' for n in others)} |")
    print(f"|---|{'---|' * (len(names) + 2 * len(others))}")
    profiled: list[tuple[int, str]] = []
    for b in batches:
        feats = adapter._features(audios[:b]).to(whisper.device, whisper.dtype)
        with torch.no_grad():
            _, encoded = adapter.model.perception.encode_for_transcript(feats)
        times: dict[str, float] = {}
        ids: dict[str, torch.Tensor] = {}
        for name in names:
            decode = decoder(name, whisper, encoded, new_tokens)
            best = float("inf")
            for _ in range(args.repeats):
                sync()
                start = time.perf_counter()
                with arm(name), torch.no_grad():
                    out = decode()
                sync()
                best = min(best, time.perf_counter() - start)
            times[name], ids[name] = best, out.cpu()
        base = ids[names[0]]
        ratios = [f"{times[names[0]] / times[n]:.2f}x" for n in others]
        same = [f"{sum(bool(torch.equal(base[i], ids[n][i])) for i in range(b))}/{b}" for n in others]
        print(f"| {b} | {' | '.join(f'{times[n]:.3f}' for n in names)} | {' | '.join(ratios)} | "
              f"{' | '.join(same)} |", flush=True)
        if args.profile:
            profiled.append((b, profile_call(decoder(names[0], whisper, encoded, new_tokens), names[0])))
    for b, table in profiled:
        print(f"\n{names[0]}, {b} audios per call, one call under the profiler (top kernels by device time):\n")
        print(table)


if __name__ == "__main__":
    main()
