"""Editing throughput at full model scale: our runner's single-editing path against a naive loop (the CLI).

Builds the full-size architecture with random weights through the adapters' own builders
(``Qwen2AudioAdapter.random_full_size``: Qwen2-Audio-7B in bf16; with ``--model desta25``
``DeSTA25Adapter.random_full_size``: Llama-3.1-8B in bf16 + Whisper-large-v3 and the Q-Former in fp32), makes
SAKE-shaped edit instances with synthetic 5-16 s audio (1 edit + 10 linked items), and times, per method (any
name the runner's registry knows), on the same instances with the same hyperparameters
(``editors/hparams/<method>.yaml``) and the same ``max_new_tokens`` (EOS disabled in both arms, so every
generation runs to the bound):

* ours: ``editors.run.Runner(config, adapter=..., rows_loader=...).run()``, what ``python -m editors.run`` runs, in single
  mode (pre-edit outputs through its cache, apply, one batched evaluation, exact restore, predictions JSONL);
  only the dataset loader is swapped for in-memory rows (``InMemoryRows``), as ``datasets`` would hand them over;
* naive: pre-edit and post-edit outputs with one ``generate`` per question from processor inputs (the audio
  encoder runs in every prefill), the edit with Adam on the method's touched parameters where every step runs
  the whole model from the audio features (encoder recomputed), and restore by ``load_state_dict`` of a deep
  copy of the touched tensors. Prompts come from the same adapter/method, so both arms see the same tokens.
  DeSTA2.5 has no HF processor: its naive question runs the adapter on that one question with every audio cache
  dropped first (Whisper transcript + encoder taps recomputed per call, as the release's ``generate`` does), its
  naive FT step drops the encoder states (taps recomputed, transcript kept) and takes the LLM's full-sequence
  HF loss.

Modules: ``bench.paper`` (Table 7 figures), ``bench.models`` (scales, bench adapters), ``bench.synthetic``
(instances), ``bench.arms`` (the arms, identical-row shares, profile), ``bench.roofline`` (ceilings, floor),
``bench.report`` (Markdown), ``bench.identity`` (row comparison, generation-path switch); this file is the CLI.

It also measures the device ceilings (bf16 matmul 8192^3, device-to-device copy), estimates a floor per method
(training FLOPs / matmul rate + generation bytes / bandwidth) and writes ``bench/RESULTS.md``.

``--tiny`` runs the same code on CPU with the adapter's tiny random model (smoke mode for tests)::

    python -m bench.edit_throughput --tiny --edits 1 --methods ft_audio,i_ike --out /tmp/RESULTS.md
    python -m bench.edit_throughput --tiny --model desta25 --edits 1 --methods ft_audio --out /tmp/RESULTS.md

On a GPU::

    python -m bench.edit_throughput --methods ft_audio,ft_llm,i_ike --edits 8 --max-new-tokens 32
    python -m bench.edit_throughput --model desta25 --methods ft_audio,ft_llm,i_ike --edits 2

``--model desta25`` writes its results as a DeSTA section appended to ``--out`` (replacing an earlier DeSTA
section, keeping everything else); the Qwen2-Audio writer keeps an existing DeSTA section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


from bench.arms import (  # noqa: F401 (re-exported)
    ArmResult,
    Bench,
    GenerateCounter,
    add_pre_edit_items,
    batched_plan,
    identical_shares,
    naive_global_warmup,
    plan_units,
    run_batched,
    run_naive,
    run_ours,
    whatif_static_decode,
)
from bench.models import build_adapter, full_scale, tiny_scale  # noqa: F401 (re-exported)
from bench.paper import PAPER_TABLE7_SINGLE, paper_seconds_per_edit  # noqa: F401 (re-exported)
from bench.report import (  # noqa: F401 (re-exported)
    DESTA_BEGIN,
    DESTA_END,
    _fmt,
    device_name,
    merge_results,
    render_results,
    render_table,
    write_results,
)
from bench.roofline import (FLOOR_KEYS, Shapes, edit_shapes, floor_seconds, mean_floor,  # noqa: F401 (re-exported)
                            measure_ceilings, model_sizes)
from bench.synthetic import SyntheticDataset, synthetic_instance  # noqa: F401 (re-exported)

from sake_core.atomic import atomic_write

LOG = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.edit_throughput",
        description="Time single editing at full model scale (Qwen2-Audio-7B or DeSTA2.5-Audio, random weights): "
                    "the runner's path vs a naive loop, with the device ceilings and a floor estimate; writes a "
                    "Markdown table (issues 7, 11).")
    parser.add_argument("--model", choices=sorted(PAPER_TABLE7_SINGLE), default="qwen2_audio",
                        help="architecture to time (default: %(default)s); desta25 appends a DeSTA section to --out "
                             "(replacing an earlier one) and keeps the rest of the file")
    parser.add_argument("--methods", default="ft_audio,ft_llm,i_ike",
                        help="comma-separated editing methods, any name the runner's registry knows (editors/"
                             "<name>.py; default: %(default)s); methods other than ft_audio/ft_llm run their own apply "
                             "in the naive arm and have no training term in the floor")
    parser.add_argument("--edits", type=int, default=8, help="timed edits per arm and method (default: %(default)s)")
    parser.add_argument("--naive-edits", type=int, default=None,
                        help="timed edits of the naive arm (default: --edits; the first of the same instances)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed edits before each arm (default: 1)")
    parser.add_argument("--naive-warmup", type=int, default=None,
                        help="untimed naive edits before each naive arm (default: --warmup; with 0, one short "
                             "global naive warm-up runs before the first method)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation bound, EOS disabled (default: 32)")
    parser.add_argument("--arms", default="ours,naive",
                        help="arms to run: ours, naive (default: %(default)s; 'none' with --edits-per-pass to run "
                             "only the batched arms)")
    parser.add_argument("--edits-per-pass", default="",
                        help="comma-separated K values (e.g. 1,8,16): also run the runner with --edits-per-pass K "
                             "per method (one untimed pass, then whole passes covering --edits edits; fresh pre-edit "
                             "cache) and add the edits-per-pass table (issue 12)")
    parser.add_argument("--compare-decoding", action="store_true",
                        help="per K of --edits-per-pass also run the eager engine (--engine eager) "
                             "and report its s/edit and the share of identical rows")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode with the adapter's tiny random model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                        help="Markdown output (default: bench/RESULTS.md)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers as JSON here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder for predictions and caches (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU only: profile the runner's phases on one more instance per method")
    parser.add_argument("--whatif-decode", action="store_true",
                        help="GPU and qwen2_audio only: also time one instance's evaluation with a static KV cache + compiled decode")
    parser.add_argument("--log-level", default="INFO")
    add_pre_edit_items(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.naive_warmup is None:
        args.naive_warmup = args.warmup
    if not 0 <= args.naive_warmup <= args.warmup:
        parser.error("--naive-warmup must be between 0 and --warmup")
    if args.naive_edits is not None and not 1 <= args.naive_edits <= args.edits:
        parser.error("--naive-edits must be between 1 and --edits (the naive arm times the first of the same edits)")
    try:
        args.edits_per_pass = [int(k) for k in args.edits_per_pass.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--edits-per-pass: expected comma-separated integers, got {args.edits_per_pass!r}")
    if any(k < 1 for k in args.edits_per_pass):
        parser.error("--edits-per-pass values must be >= 1")
    for name in ("edits", "warmup", "max_new_tokens"):
        if getattr(args, name) < (1 if name != "warmup" else 0):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def bench_method(bench: Bench, method: str, args: argparse.Namespace, ceilings: dict[str, float]) -> dict[str, Any]:
    """Both arms, the floor and the table row of one method."""
    arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    naive_edits = args.edits if args.naive_edits is None else args.naive_edits
    ours = warm = naive = ArmResult(error="not requested")
    try:
        editor = bench.editor(method)
    except ValueError as error:  # a method not written yet
        LOG.warning("%s: %s", method, error)
        editor = None
        ours = warm = naive = ArmResult(error=str(error))
    if editor is not None and "ours" in arms:
        ours, warm = run_ours(bench, method, args.edits, args.warmup, args.profile)
    floor = {k: float("nan") for k in FLOOR_KEYS}
    shapes: list[Shapes] = []
    if editor is not None:
        timed = bench.dataset.ordered(*plan_units(args.edits, args.warmup))[args.warmup: args.warmup + args.edits]
        shapes = [edit_shapes(bench, editor, row) for row in timed]
        # the floor counts the updates the runner made (early stop included)
        floor = mean_floor(bench, method, shapes, ceilings, ours.info.get("steps") and ours.info["mean_steps"])
    # after the shapes: they read DeSTA2.5 transcripts still cached from ours (the naive arm drops them)
    if editor is not None and "naive" in arms:
        order = bench.dataset.ordered(*plan_units(args.edits, args.warmup))  # the runner's unit order
        skip = args.warmup - args.naive_warmup  # the naive arm times the same instances as ours
        naive = run_naive(bench, method, order[skip: args.warmup + naive_edits], args.naive_warmup)
    batched = [run_batched(bench, method, args.edits, k) for k in args.edits_per_pass] if editor is not None else []
    same = identical_shares(bench, method, args, batched, ours)
    gib = lambda arm: arm.peak_bytes / 2**30 if arm.peak_bytes and arm.seconds else None  # noqa: E731
    row = {"method": method, "paper": paper_seconds_per_edit(method, bench.model), "ours": ours.per_edit,
           "warm": warm.per_edit, "naive": naive.per_edit,
           "floor": None if math.isnan(floor["floor_s"]) else floor["floor_s"], "floor_parts": floor,
           "perception_fp32": bench.model == "desta25", "peak_ours": gib(ours), "peak_naive": gib(naive),
           "error_ours": ours.error, "error_naive": naive.error, "info_ours": ours.info, "info_naive": naive.info,
           "batched": batched, "identical": same,
           "raw": {"ours_s": ours.seconds, "ours_warm_s": warm.seconds, "naive_s": naive.seconds,
                   "info_ours_warm": warm.info, "edit_tokens": [sh.edit_tokens for sh in shapes],
                   "post_tokens_mean": [float(np.mean(sh.post_tokens)) for sh in shapes],
                   "pre_tokens_mean": [float(np.mean(sh.pre_tokens)) for sh in shapes]}}
    LOG.info("%s: ours %s s/edit (warm cache %s), naive %s s/edit, floor %s s/edit", method,
             _fmt(ours.per_edit, ".3f"), _fmt(warm.per_edit, ".3f"), _fmt(naive.per_edit, ".3f"),
             _fmt(row["floor"], ".3f"))
    return row


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scale = tiny_scale() if args.tiny else full_scale()
    if scale.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --tiny for the CPU smoke mode")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from editors.registry import get_editor_class

    for method in methods:  # any method the runner's registry knows; a clear line for any other name
        try:
            get_editor_class(method)
        except ValueError as error:
            raise SystemExit(f"--methods: {error}") from None
    naive_edits = args.edits if args.naive_edits is None else args.naive_edits
    ceilings = measure_ceilings(scale)
    LOG.info("ceilings: %.1f TFLOP/s matmul, %.2f TB/s copy", ceilings["matmul_flops_per_s"] / 1e12,
             ceilings["copy_bytes_per_s"] / 1e12)
    adapter = build_adapter(scale, args.seed, args.model)
    needed = [(max(args.edits, naive_edits), args.warmup)] + [batched_plan(args.edits, k)[::-1]
                                                               for k in args.edits_per_pass]
    limit = max(plan_units(edits, warmup)[1] for edits, warmup in needed)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sake-bench-")))
        # one more test row per attribute than the plan needs: the profiled instance
        dataset = SyntheticDataset.make(workdir / "dataset", limit + 1, 2, args.seed, scale.audio_seconds)
        bench = Bench(scale=scale, adapter=adapter, dataset=dataset, counter=GenerateCounter(adapter.model),
                      max_new_tokens=args.max_new_tokens, seed=args.seed, workdir=workdir, model=args.model,
                      pre_edit_items=args.pre_edit_items)
        params_b = sum(p.numel() for p in adapter.model.parameters()) / 1e9
        if "naive" in args.arms and args.naive_warmup == 0:
            naive_global_warmup(bench)
        rows = []
        for method in methods:
            rows.append(bench_method(bench, method, args, ceilings))
            # rewritten after every method, so a run cut short still leaves the rows it finished
            write_results(args.out, render_results(args, scale, rows, ceilings, params_b), args.model)
        whatif = None
        if args.whatif_decode and args.model != "qwen2_audio":
            LOG.warning("--whatif-decode is written for qwen2_audio only: skipped")
        elif args.whatif_decode and scale.device == "cuda":
            bench.adapter.clear_audio_cache()
            whatif = whatif_static_decode(bench, dataset.ordered(*plan_units(args.edits, args.warmup))[0])
        text = render_results(args, scale, rows, ceilings, params_b)
        if whatif is not None:
            text += ("\n## What-if: evaluation decode with a static KV cache + compiled step "
                     "(not the runner's path)\n\n"
                     f"`{json.dumps(whatif, sort_keys=True)}`\n")
        write_results(args.out, text, args.model)
        if args.json is not None:
            raw = {r["method"]: {k: v for k, v in r.items()} for r in rows}
            atomic_write(args.json, json.dumps({"ceilings": ceilings, "device": device_name(scale),
                                                "model": args.model, "methods": raw},
                                               indent=1, sort_keys=True, default=str) + "\n")
    print(render_table(rows))
    LOG.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
