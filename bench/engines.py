"""The decode engines side by side on the runner's own prompts (generation only, no edit applied): per prompt kind
(``plain``: K edits' 10 items as their pre-edit prompts; ``i_ike`` / ``ie_ike``: the same items rewritten by the
method for K independent edits, so each edit's instruction / demonstrations form a shared prefix), time per engine
(first call, with the graph engine's captures, and a second call), the share of identical outputs, peak memory and
the graph engine's counters.

    python -m bench.engines --tiny --edits 2 --kinds plain,ie_ike         # CPU smoke (uncaptured graph engine)
    python -m bench.engines --edits 16 --kinds plain,i_ike,ie_ike --json out.json   # on a GPU, full size
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.models import build_adapter, full_scale, tiny_scale
from bench.synthetic import SyntheticDataset

LOG = logging.getLogger(__name__)


def prompts_of(kind: str, adapter: Any, dataset: SyntheticDataset, rows: list[dict[str, Any]], seed: int) -> list:
    """The prompts one generation of ``kind`` gets for the edits of ``rows``."""
    from editors.base import EditRequest, RunContext
    from editors.data import eval_items
    from editors.registry import load_hparams
    from editors.registry import get_editor_class

    items = [[it.prompt() for it in eval_items(row)] for row in rows]
    if kind == "plain":
        return [p for ps in items for p in ps]
    context = RunContext(seed=seed, load_rows=lambda config, split: dataset.load(str(dataset.root), config, split))
    editor = get_editor_class(kind)(adapter, load_hparams(kind, adapter.family, tiny=adapter.is_tiny), context)
    edits = [EditRequest.from_row(row) for row in rows]
    editor.apply_many(edits)
    out = [p for e, ps in zip(edits, items) for p in editor.rewrite_prompts(ps, e)]
    editor.reset()
    return out


def timed(device: str, fn: Any) -> tuple[float, Any]:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, value


def bench_kind(adapter: Any, prompts: list, engines: Sequence[str], max_new_tokens: int, device: str,
               max_batch_tokens: int | None) -> dict[str, Any]:
    from editors.models.generation import graph

    out: dict[str, Any] = {"prompts": len(prompts)}
    outputs = {}
    for engine in engines:
        settings = adapter.generation_settings(max_new_tokens, engine=engine, max_batch_tokens=max_batch_tokens)
        graph.reset_stats()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        first, outputs[engine] = timed(device, lambda: adapter.generate(prompts, settings=settings))
        stats = dict(graph.STATS)
        second, again = timed(device, lambda: adapter.generate(prompts, settings=settings))
        out[engine] = {"first_s": round(first, 3), "second_s": round(second, 3),
                       "per_prompt_ms": round(1000 * second / len(prompts), 2),
                       "repeatable": again == outputs[engine],
                       "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}
        if engine == "graph":
            out[engine]["stats"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}
        LOG.info("%d prompts, %s: %s", len(prompts), engine, out[engine])
    if len(engines) == 2:
        a, b = (outputs[e] for e in engines)
        out["identical_share"] = round(sum(x == y for x, y in zip(a, b)) / len(a), 3)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode with the tiny model")
    parser.add_argument("--model", default="qwen2_audio", choices=("qwen2_audio", "desta25"))
    parser.add_argument("--edits", type=int, default=16, help="edits whose items one generation holds (K)")
    parser.add_argument("--kinds", default="plain,i_ike,ie_ike", help="comma-separated: plain, i_ike, ie_ike")
    parser.add_argument("--engines", default="eager,graph")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="generation bound, EOS disabled (default: %(default)s, bench.goals' protocol)")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scale = tiny_scale() if args.tiny else full_scale()
    adapter = build_adapter(scale, args.seed, args.model)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        per = -(-args.edits // 4)
        dataset = SyntheticDataset.make(Path(tmp) / "d", per, 2, args.seed, scale.audio_seconds)
        rows = [r for attribute in ("animal", "emotion", "gender", "language")
                for r in dataset.rows[(attribute, "test")]][:args.edits]
        result: dict[str, Any] = {"edits": args.edits, "max_new_tokens": args.max_new_tokens}
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            prompts = prompts_of(kind, adapter, dataset, rows, args.seed)
            result[kind] = bench_kind(adapter, prompts, engines, args.max_new_tokens, scale.device,
                                      args.max_batch_tokens)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
