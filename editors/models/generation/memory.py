"""What a generation needs in device memory, from the model's configuration: the KV cache of every token a chunk
holds (prompt tokens + new tokens; a shared prefix once per group) and the activations of the prefill. On CUDA a
generation whose settings leave ``max_batch_tokens`` unset gets a token budget from the memory free at that moment
(:func:`token_budget`), so chunks grow with the device and shrink while K edits' copies hold memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from editors.models.adapter import LALMAdapter

#: Share of the available device memory a generation's chunk may fill (the rest: allocator slack, logits, the
#: audio encoder of clips not cached yet).
GENERATION_FRACTION = 0.8


def kv_bytes_per_token(adapter: "LALMAdapter") -> int:
    """Bytes of keys + values one token takes in every LLM layer."""
    cfg: Any = adapter.language_model().config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * adapter.dtype.itemsize


def activation_bytes_per_token(adapter: "LALMAdapter") -> int:
    """Peak activations one prompt token holds during a prefill, inside one layer (the residual stream, the
    normed input, queries/keys/values and the attention output; the MLP's gate, up and product)."""
    cfg: Any = adapter.language_model().config
    return (6 * int(cfg.hidden_size) + 3 * int(cfg.intermediate_size)) * adapter.dtype.itemsize


#: Activations one graph-engine prefill forward may hold on CUDA: a chunk's rows (and its prefixes) are prefilled in
#: parts of at most this many bytes of :func:`activation_bytes_per_token`, so that transient does not grow with the
#: rows of a chunk (the edits of a pass); a part of ~2 GiB (~18k tokens at 7B) keeps the matmuls large.
PREFILL_BYTES = 2 * 2**30


def prefill_tokens(adapter: "LALMAdapter") -> int | None:
    """Prompt tokens per graph-engine prefill forward on CUDA (:data:`PREFILL_BYTES`); None on CPU, where a chunk
    is prefilled whole (its canonical shapes)."""
    if adapter.device.type != "cuda":
        return None
    return max(1, PREFILL_BYTES // activation_bytes_per_token(adapter))


def prefill_bytes(adapter: "LALMAdapter", longest: int = 0) -> int:
    """Activations one graph-engine prefill forward holds on CUDA: one part's (:data:`PREFILL_BYTES`), or those of
    the ``longest`` sequence where it is longer than a part (a prefix or a row's tail is never split: a sequential
    IE-IKE prompt of ten edits' demonstrations, ~37k tokens at 7B, is prefilled in one forward)."""
    return max(PREFILL_BYTES, int(longest) * activation_bytes_per_token(adapter))


def cuda_device(device: torch.device) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:N`` of the current device): some of torch's memory queries
    refuse a CUDA device without one."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def available_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on a CUDA ``device`` (free + cached by the allocator but unused);
    None elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    device = cuda_device(device)
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cap = torch.cuda.get_per_process_memory_fraction(device) * total - allocated  # a process limit, if set
    return int(max(0, min(free + torch.cuda.memory_reserved(device) - allocated, cap)))


def token_budget(adapter: "LALMAdapter", fraction: float = GENERATION_FRACTION, reclaimable: int = 0,
                 engine: str = "graph", longest: int = 0) -> int | None:
    """Padded tokens one generation chunk of ``engine`` may hold now (rows x (width + new tokens), prefixes once),
    from the available memory (+ ``reclaimable`` bytes the engine gives back when it needs them): the graph engine
    holds :func:`kv_bytes_per_token` per token and one prefill forward's activations (:func:`prefill_bytes` of the
    call's ``longest`` prompt, in tokens); the eager engine prefills a chunk whole, :func:`kv_bytes_per_token` +
    :func:`activation_bytes_per_token` per token (both engines compute the logits of the last position only). None
    on CPU."""
    available = available_bytes(adapter.device)
    if available is None:
        return None
    usable = int(fraction * (available + reclaimable))
    if engine == "graph":  # prefilled in parts: their activations once, not per token of the chunk
        return max(1, (usable - prefill_bytes(adapter, longest)) // kv_bytes_per_token(adapter))
    return max(1, usable // (kv_bytes_per_token(adapter) + activation_bytes_per_token(adapter)))
