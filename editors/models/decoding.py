"""Batched greedy generation in canonical shapes, with a static KV cache and a compiled decode step on CUDA.

:func:`generate_prompts` is the one generation path of the adapters (``LALMAdapter.generate``) and of several
edits per pass (``editors.batching.generate_grouped``):

1. prompts are grouped by padded width (``editors.models.buckets``: a row's result then depends on the row alone) and
   cut into chunks within ``batch_size`` / ``max_batch_tokens``; each chunk is filled up to ``row_bucket`` rows (a
   power of two, at least ``MIN_ROWS``) with copies of its last prompt (outputs dropped);
2. each chunk is one ``generate`` from ``inputs_embeds`` (the caller may supply the embeddings, e.g. through
   per-edit connector copies, and is told the chunk's rows before the call, e.g. to route per-edit weights);
3. on CUDA the decode uses a static KV cache (``cache_implementation="static"``) whose step transformers compiles
   (``torch.compile``, CUDA graphs) once per shape; widths come in steps of 256 tokens and rows in powers of two
   (>= 16), so a run compiles a handful of shapes once instead of launching ~1,600 kernels per token. On CPU it is the
   dynamic cache of ``generate`` (the legacy path's greedy tokens on the tiny fp32 models; tests/test_invariance.py).

``DECODING`` picks the path: ``"auto"`` (static on CUDA, dynamic elsewhere), ``"static"``, ``"dynamic"``, or
``"legacy"`` (the pre-issue-18 path: one batch per ``batch_spans`` chunk padded to its longest prompt, no
bucketing; kept for the bench's comparison). Environment: ``SAKE_DECODING``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch

from editors.models.buckets import chunk_rows, group_by_width, left_pad, row_bucket
from sake_core.errors import ConfigError

logger = logging.getLogger(__name__)

DECODING_MODES = ("auto", "static", "dynamic", "legacy")


def decoding_mode(device: torch.device | str) -> str:
    """``static`` or ``dynamic`` (or ``legacy``) for generation on ``device`` (``$SAKE_DECODING``, default auto)."""
    mode = os.environ.get("SAKE_DECODING", "auto").strip().lower() or "auto"
    if mode not in DECODING_MODES:
        raise ConfigError(f"SAKE_DECODING={mode!r}; expected one of {', '.join(DECODING_MODES)}")
    if mode == "auto":
        return "static" if torch.device(device).type == "cuda" else "dynamic"
    return mode


def generation_config(adapter, max_new_tokens: int, static: bool):
    from transformers import GenerationConfig

    extra = {"cache_implementation": "static"} if static else {}
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=adapter.pad_token_id, eos_token_id=adapter.stop_token_ids,
                            repetition_penalty=1.0, **extra)


#: Called before each chunk's generation with the prompt indices of its rows (dummy rows included).
ChunkHook = Callable[[list[int]], None]
#: Returns the chunk's ``inputs_embeds`` for a prepared batch and the prompt indices of its rows.
EmbedsFn = Callable[[object, list[int]], torch.Tensor]


@torch.no_grad()
def generate_prompts(adapter, prompts: Sequence, *, max_new_tokens: int = 32, batch_size: int | None = None,
                     max_batch_tokens: int | None = None, embeds_fn: EmbedsFn | None = None,
                     before_chunk: ChunkHook | None = None, mode: str | None = None,
                     token_ids: Sequence[list[int]] | None = None) -> list[str]:
    """Greedy outputs (decoded, stripped) of ``prompts``, in order (see the module docstring). ``token_ids``:
    the prompts' ``prompt_token_ids`` when the caller has them (audio then already warmed)."""
    prompts = list(prompts)
    if not prompts:
        return []
    mode = mode or decoding_mode(adapter.device)
    if token_ids is None:
        adapter.warm_audio([a for p in prompts for a in p.audios()])
        token_ids = [adapter.prompt_token_ids(p) for p in prompts]
    chunks = _plan(adapter, token_ids, max_new_tokens, batch_size, max_batch_tokens, legacy=mode == "legacy")
    config = generation_config(adapter, max_new_tokens, static=mode == "static")
    outputs: list[str | None] = [None] * len(prompts)
    for rows, width in chunks:
        batch = adapter.prepare([prompts[i] for i in rows], token_ids=[token_ids[i] for i in rows])
        if width:
            batch = left_pad(batch, width, adapter.pad_token_id)
        if before_chunk is not None:
            before_chunk(rows)
        embeds = embeds_fn(batch, rows) if embeds_fn is not None else adapter.input_embeds(batch)
        new_tokens = adapter.model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                            generation_config=config)
        for i, text in zip(rows, adapter.decode_new_tokens(new_tokens, max_new_tokens)):
            if outputs[i] is None:  # a dummy row repeats the chunk's last prompt: keep the first
                outputs[i] = text
    return outputs  # type: ignore[return-value]


def _plan(adapter, token_ids: Sequence[list[int]], max_new_tokens: int, batch_size: int | None,
          max_batch_tokens: int | None, legacy: bool) -> list[tuple[list[int], int]]:
    """``(row indices incl. dummy rows, padded width or 0)`` per chunk."""
    from editors.models.base import batch_spans

    if legacy:
        lengths = [len(t) + max_new_tokens for t in token_ids]
        return [(list(range(a, b)), 0) for a, b in batch_spans(lengths, batch_size, max_batch_tokens)]
    chunks = []
    for width, indices in group_by_width([len(t) for t in token_ids], adapter.device):
        for rows in chunk_rows(indices, width + max_new_tokens, batch_size=batch_size,
                               max_batch_tokens=max_batch_tokens):
            chunks.append((rows + [rows[-1]] * (row_bucket(len(rows)) - len(rows)), width))
    return chunks
