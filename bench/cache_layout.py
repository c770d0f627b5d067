"""The graph engine's KV cache per edit at full size, planned on the CPU (no weights, no GPU): lanes against the
padded layout they replaced.

For the bench's synthetic instances (clips 5-16 s) and Qwen2-Audio-7B's real shapes (the model built on the
``meta`` device: its tokenizer, feature extractor and configuration, no weights), each method's evaluation prompts of
K edits are planned by the engine's own code (``_pieces``, ``_plan``, ``_Chunk.shape``), and the tokens its static
cache holds are set beside the padded layout (every row at the chunk's widest tail + new tokens, every shared prefix
at the widest prefix: the engine before lanes, computed here from the same prompts and prefix split). Prints tokens
and GiB per edit and the ratio. The prompts are what the runner gives the graph engine in a pass of K edits
(``Editor.rewrite_prompts`` of each edit's items; the pre-edit prompts for ``plain``), as one call without
batching limits (a GPU's token budget may cut it into more chunks). The last column counts the row prefill's
tokens: every row at its piece's longest tail (the engine before 6dd5ec4) against every row at its own tail.

    python -m bench.cache_layout --methods plain,i_ike,ie_ike --edits 16
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.synthetic import SyntheticDataset
from editors.base import EditRequest, RunContext
from editors.data import eval_items
from editors.models.generation import graph
from editors.models.generation.memory import kv_bytes_per_token
from editors.models.generation.settings import GenerationSettings
from editors.models.prompts import Prompt
from editors.models.qwen2_audio import Qwen2AudioAdapter
from editors.registry import get_editor_class, load_hparams

LOG = logging.getLogger("bench.cache_layout")
ATTRIBUTES = ("emotion", "gender", "language", "animal")


def method_prompts(adapter: Any, dataset: SyntheticDataset, method: str, edits: int) -> list[list[Prompt]]:
    """Each edit's evaluation prompts as the runner hands them to generation (``plain``: unedited)."""
    rows = [r for a in ATTRIBUTES for r in dataset.rows[(a, "test")]][:edits]
    editor = None
    if method != "plain":
        context = RunContext(seed=0, load_rows=lambda config, split: dataset.load(str(dataset.root), config, split))
        editor = get_editor_class(method)(adapter, load_hparams(method, adapter.family), context)
    out = []
    for row in rows:
        prompts = [item.prompt() for item in eval_items(row)]
        if editor is not None:
            edit = EditRequest.from_row(row)
            editor.apply(edit)
            prompts = editor.rewrite_prompts(prompts, edit)
            editor.reset()
        out.append(prompts)
    return out


def padded_tokens(adapter: Any, prompts: Sequence[Prompt], token_ids: Sequence[list[int]], new_tokens: int) -> int:
    """Tokens of one chunk in the padded layout: every row at the widest tail bucket + new tokens, each group's
    prefix (same split as the engine's) at the widest prefix bucket."""
    device, memo = torch.device("cuda"), {}
    groups: dict[tuple, int] = {}
    widest_tail = 0
    for prompt, ids in zip(prompts, token_ids):
        split, _ = graph.prefix_split(adapter, prompt, ids, memo)
        groups[tuple(ids[:split])] = split
        widest_tail = max(widest_tail, graph._bucket(len(ids) - split, device))
    widest_prefix = graph._bucket(max(groups.values()), device)
    return len(prompts) * (widest_tail + new_tokens) + len(groups) * widest_prefix


def lane_tokens(adapter: Any, prompts: Sequence[Prompt], token_ids: Sequence[list[int]], new_tokens: int) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(tokens the engine's chunks hold, the real tokens among them, each chunk's shape) for one generation call."""
    settings = GenerationSettings(max_new_tokens=new_tokens, engine="graph")
    pieces, _, _ = graph._pieces(adapter, prompts, token_ids, None, settings)
    chunks = graph._plan(pieces, settings, torch.device("cuda"))
    shapes = [c.shape(torch.device("cuda")) for c in chunks]
    return sum(w * g for w, g, _, _ in shapes), sum(p.length(new_tokens) for p in pieces), shapes


def prefill_tail_tokens(adapter: Any, prompts: Sequence[Prompt], token_ids: Sequence[list[int]], new_tokens: int
                        ) -> tuple[int, int, int]:
    """Tokens the row prefill runs for one generation call (every row's tail, padded): (each row at its piece's
    longest tail, as before 6dd5ec4; each row at its own tail, as now; the real tail tokens)."""
    settings = GenerationSettings(max_new_tokens=new_tokens, engine="graph")
    pieces, _, _ = graph._pieces(adapter, prompts, token_ids, None, settings)
    device = torch.device("cuda")
    longest = sum(graph._bucket(max(p.tails), device) * len(p.rows) for p in pieces)
    own = sum(graph._bucket(t, device) for p in pieces for t in p.tails)
    return longest, own, sum(sum(p.tails) for p in pieces)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="plain,i_ike,ie_ike", help="comma-separated: plain, i_ike, ie_ike")
    parser.add_argument("--edits", type=int, default=16, help="edits of one pass (K)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the bench's new tokens per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    adapter = Qwen2AudioAdapter.random_full_size(args.seed, device="meta")
    per_token = kv_bytes_per_token(adapter)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = SyntheticDataset.make(Path(tmp), -(-args.edits // len(ATTRIBUTES)), 8, args.seed, (5.0, 16.0))
        print(f"KV cache per edit, Qwen2-Audio-7B shapes ({per_token // 1024} KiB per token), K={args.edits}, "
              f"{args.max_new_tokens} new tokens")
        print("| prompts | padded layout (tokens/edit, GiB/edit) | lanes (tokens/edit, GiB/edit) | real tokens/edit | "
              "lanes / padded | chunks (lane width, lanes, rows per lane, rows) | row prefill tokens/edit: at the "
              "piece's longest tail, at the row's own, real |")
        print("|---|---|---|---|---|---|---|")
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            per_edit = method_prompts(adapter, dataset, method, args.edits)
            prompts = [p for ps in per_edit for p in ps]
            token_ids = [adapter.prompt_token_ids(p) for p in prompts]
            padded = padded_tokens(adapter, prompts, token_ids, args.max_new_tokens)
            lanes, real, shapes = lane_tokens(adapter, prompts, token_ids, args.max_new_tokens)
            k = len(per_edit)

            def gib(tokens: int, k: int = k) -> str:
                return f"{tokens / k:,.0f}, {tokens / k * per_token / 2**30:.2f}"

            longest, own, tail_real = prefill_tail_tokens(adapter, prompts, token_ids, args.max_new_tokens)
            print(f"| {method} | {gib(padded)} | {gib(lanes)} | {real / k:,.0f} | {lanes / padded:.2f} | {shapes} | "
                  f"{longest / k:,.0f}, {own / k:,.0f}, {tail_real / k:,.0f} |")


if __name__ == "__main__":
    main()
