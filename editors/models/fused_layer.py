"""A decoder layer's forward in fewer, contiguous kernels, for the adapters' own runs of LLM layers on CUDA.

The editing methods train through the LLM's decoder layers (FT-Audio through all of them, UnKE's stage 1 and WISE
through the layers above the edited one, at every step) by :meth:`LALMAdapter.run_layers` and the paths built on it.
The Hugging Face forward of a Qwen2 or Llama layer spends much of such a step in small memory-bound kernels:

* RMSNorm as eight elementwise kernels (a cast to fp32, square, mean, add, reciprocal square root, product, a cast
  back, the weight product), each over a [rows, tokens, hidden] tensor, twice per layer, and more in the backward;
* the rotary embedding as five kernels on query and key, whose cos and sin tables are broadcast over the heads, so
  torch runs its strided (not vectorised) elementwise kernel.

:func:`layer_forward` computes the same function with the RMSNorm of :func:`torch.nn.functional.rms_norm` (one kernel
forward, CUDA's fused one) times the norm's weight, and the rotary embedding as ``q * cos + roll(q) * sin'`` over
tables laid out like the query and key (:class:`RotaryTables`, made once per run of layers; ``sin'`` carries
``rotate_half``'s sign), so every product is a contiguous, vectorised kernel. Attention, the projections and the MLP
are the layer's own modules (a method's replaced or routed linear runs as it does in the layer). On the CPU in fp32
and bf16 the outputs equal the Hugging Face layer's bit for bit (tests/test_fused_layer.py); on CUDA the fused
RMSNorm's reduction order may move a last bit.

Used where :data:`FUSED_LAYERS` says (CUDA only: the CPU keeps the Hugging Face forward, so the tiny-model outputs
the tests and the demo pin do not depend on this module) and :func:`supports` accepts the layer: a Qwen2/Llama-style
decoder layer with SDPA attention over full (not sliding-window) attention, and no hooks on the layer or its
attention module (a hook, e.g. the non-finite tracer's, then sees the modules it hooked run). A norm a method
hooked or replaced runs its own forward inside the fused one; UnKE's routed layer copies
(``editors.batching.RowRouting``) compute each edit's rows with :func:`weighted_rms_norm` on the same devices.

The graph engine's own layer loop (``editors.models.generation.graph``: prefill and the captured decode step) takes
:func:`rms_norm`, :class:`RotaryTables` and :func:`rotate` on the same devices.

It also runs packed rows (:class:`~editors.models.batch.PackedSequences`: several prompts back to back in a row),
which the Hugging Face layer cannot: :func:`packed_attention` attends within each sequence through CUDA's
variable-length flash kernel (``LALMAdapter.packs_sequences``; on CUDA FT-Audio's training rows, one row without
padding whose prompts' common chat-template tokens come once, and UnKE's stage-2 rows, one edit's sequences per
row).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from editors.models.batch import PackedSequences

#: Whether :meth:`LALMAdapter.run_layers` and the paths built on it run :func:`layer_forward`, per device type.
FUSED_LAYERS = {"cpu": False, "cuda": True}
#: Device types whose packed rows take ``torch.nn.attention.varlen.varlen_attn`` (flash); elsewhere a dense mask.
VARLEN_DEVICES = {"cuda"}


def fused_layers_on(device: torch.device | str) -> bool:
    """Whether layer runs on ``device`` use :func:`layer_forward` (:data:`FUSED_LAYERS`)."""
    return FUSED_LAYERS.get(torch.device(device).type, False)


_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def supports(layer: Any, layer_type: str) -> bool:
    """Whether :func:`layer_forward` computes ``layer``'s forward: the parts of a Qwen2/Llama decoder layer, SDPA
    attention over full attention, and no forward hooks on the layer or its attention module (which it does not
    call), nor global ones. Its norms, projections and MLP are called as modules unless a norm is a plain RMSNorm
    (:func:`rms_norm`), so a replaced or hooked one runs as it does in the layer."""
    if layer_type != "full_attention" or not all(hasattr(layer, p) for p in _LAYER_PARTS):
        return False
    attn = layer.self_attn
    if not all(hasattr(attn, p) for p in _ATTENTION_PARTS) or getattr(attn, "sliding_window", None):
        return False
    if getattr(getattr(attn, "config", None), "_attn_implementation", None) != "sdpa":
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not (_hooked(layer) or _hooked(attn))


@dataclass(frozen=True)
class RotaryTables:
    """The rotary embedding's cos and sin laid out like the query (``*_q``, [B, T, heads, head_dim]) and the key
    (``*_k``, [B, T, kv_heads, head_dim]), contiguous; ``sin`` negated on its first half (``rotate_half``'s sign)."""

    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor

    @classmethod
    def of(cls, position_embeddings: tuple[torch.Tensor, torch.Tensor], heads: int, kv_heads: int
           ) -> "RotaryTables":
        """Tables for ``position_embeddings`` (cos, sin: [B, T, head_dim]) and the given head counts."""
        cos, sin = position_embeddings
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

        def spread(table: torch.Tensor, n: int) -> torch.Tensor:
            return table.unsqueeze(2).expand(*table.shape[:2], n, table.shape[-1]).contiguous()

        cos_q, sin_q = spread(cos, heads), spread(signed, heads)
        if kv_heads == heads:
            return cls(cos_q, sin_q, cos_q, sin_q)
        return cls(cos_q, sin_q, spread(cos, kv_heads), spread(signed, kv_heads))

    @classmethod
    def for_layer(cls, layer: Any, position_embeddings: tuple[torch.Tensor, torch.Tensor]
                  ) -> "RotaryTables":
        """Tables for the head counts of ``layer``'s attention."""
        config = layer.self_attn.config
        return cls.of(position_embeddings, config.num_attention_heads,
                      getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def plain_rms_norm_eps(norm: Any) -> float | None:
    """The epsilon of ``norm`` if it is a Hugging Face RMSNorm as the library loaded it (a weight and an epsilon,
    no hooks); None for a module a method put in its place (a routed per-edit copy) or hooked, or any other."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or not isinstance(getattr(norm, "weight", None), torch.Tensor) or _hooked(norm):
        return None
    return float(eps)


def weighted_rms_norm(weight: torch.Tensor, eps: float, hidden: torch.Tensor) -> torch.Tensor:
    """An RMSNorm of ``hidden`` with ``weight``: normalised in fp32 and cast back in one kernel (the Hugging Face
    order), then the weight's product. A routed norm (``editors.batching``: one weight per edit) computes each
    edit's rows with it too."""
    return weight * F.rms_norm(hidden, (hidden.shape[-1],), eps=eps)


def rms_norm(norm: Any, hidden: torch.Tensor) -> torch.Tensor:
    """``norm``'s RMSNorm by :func:`weighted_rms_norm`; any other norm module: its own forward."""
    eps = plain_rms_norm_eps(norm)
    if eps is None:
        return norm(hidden)
    return weighted_rms_norm(norm.weight, eps, hidden)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` [B, T, heads, head_dim] (``rotate_half`` as a roll by half the
    head dimension, its sign in ``signed_sin``): the same products and sum, each rounded as in Hugging Face's."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * groups, T, D], each key/value head repeated for its query heads (as
    transformers' ``repeat_kv``)."""
    if groups == 1:
        return x
    b, n, t, d = x.shape
    return x[:, :, None].expand(b, n, groups, t, d).reshape(b, n * groups, t, d)


def layer_forward(layer: Any, hidden: torch.Tensor, mask: torch.Tensor | PackedSequences | None,
                  rotary: RotaryTables, cache: Any = None, layer_idx: int = 0) -> torch.Tensor:
    """``layer``'s output for ``hidden`` [B, T, H] (see the module docstring): ``mask`` the layer's boolean attention
    mask, None (causal, no padding) or the sequences of a packed row (:func:`packed_attention`); ``cache`` an object
    with transformers' ``Cache.update`` contract (a tail state's frozen columns) or None."""
    attn = layer.self_attn
    b, t, _ = hidden.shape
    d = attn.head_dim
    x = rms_norm(layer.input_layernorm, hidden)
    q = rotate(attn.q_proj(x).view(b, t, -1, d), rotary.cos_q, rotary.sin_q)
    k = rotate(attn.k_proj(x).view(b, t, -1, d), rotary.cos_k, rotary.sin_k)
    v = attn.v_proj(x).view(b, t, -1, d)
    if isinstance(mask, PackedSequences):
        if cache is not None:
            raise ValueError("a packed row has no frozen columns")
        out = packed_attention(q, k, v, mask, attn.scaling)
    else:
        out = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, attn.scaling, cache,
                         layer_idx).transpose(1, 2)
    hidden = hidden + attn.o_proj(out.reshape(b, t, -1))
    return hidden + layer.mlp(rms_norm(layer.post_attention_layernorm, hidden))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequences: PackedSequences,
                     scale: float) -> torch.Tensor:
    """Causal attention within each sequence of packed rows (``q``, ``k``, ``v``: [B, T, heads, head_dim], the
    sequences laid over the rows read one after another; a shared prefix seen by every sequence after it) ->
    [B, T, heads, head_dim]: CUDA's variable-length flash kernel (nothing computed across sequences; a shared
    prefix's keys and values copied before each sequence, its queries too, so every sequence is a square causal
    block); elsewhere SDPA under the dense mask."""
    b, t = q.shape[:2]
    if sequences.total != b * t:
        raise ValueError(f"packed sequences cover {sequences.total} tokens, the rows hold {b} x {t}")
    if b > 1:  # the rows as one stream: a sequence never crosses a row's end (PackedSequences.over_rows)
        out = packed_attention(q.reshape(1, b * t, *q.shape[2:]), k.reshape(1, b * t, *k.shape[2:]),
                               v.reshape(1, b * t, *v.shape[2:]), sequences, scale)
        return out.view(b, t, *out.shape[2:])
    groups = q.shape[2] // k.shape[2]
    if q.device.type in VARLEN_DEVICES:
        from torch.nn.attention import varlen

        known = _varlen_arguments(varlen.varlen_attn)
        kwargs: dict[str, Any] = {}
        if "window_size" in known:  # torch >= 2.12; earlier: is_causal
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
        if "scale" in known:
            kwargs["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-9 * scale:
            raise ValueError(f"this torch's varlen_attn has no scale argument; the layer's is {scale}")
        queries, keys, values = q[0], k[0], v[0]
        if groups > 1 and "enable_gqa" in known:
            kwargs["enable_gqa"] = True
        elif groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        starts, n = sequences.starts, sequences.longest
        if sequences.stream_starts is not None:  # a shared prefix: a copy of it before each later sequence
            queries, keys, values = (prefix_stream(t, sequences) for t in (queries, keys, values))
            starts = sequences.stream_starts
        flash = varlen.varlen_attn(queries, keys, values, starts, starts, n, n, **kwargs)
        assert isinstance(flash, torch.Tensor)  # no auxiliary outputs asked for
        if sequences.stream_starts is not None:
            flash = from_stream(flash, sequences)
        return flash[None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), repeat_heads(k.transpose(1, 2), groups),
                                         repeat_heads(v.transpose(1, 2), groups), attn_mask=sequences.dense_mask(),
                                         dropout_p=0.0, scale=scale)
    return out.transpose(1, 2)


class _PrefixStream(torch.autograd.Function):
    """Row columns ``[T, ...]`` of packed sequences with a shared prefix -> the stream variable-length attention
    reads: each later sequence preceded by a copy of the prefix. Forward one concatenation of views; backward the
    sequences' gradients as they are and the prefix's as the sum of its copies' (one gather and one reduction, in a
    fixed order), where ``index_select``'s backward adds every stream column back with atomic adds."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sequences: PackedSequences) -> torch.Tensor:
        pieces = x.split(sequences.lengths)
        ctx.sequences = sequences
        return torch.cat([part for piece in pieces[1:] for part in (pieces[0], piece)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        sequences = ctx.sequences
        copies = grad.index_select(0, sequences.prefix_in_stream).view(
            sequences.count - 1, sequences.shared_prefix, *grad.shape[1:])
        pieces = grad.split(sequences.stream_pieces)
        return torch.cat([copies.sum(0), *pieces[1::2]]), None


def prefix_stream(x: torch.Tensor, sequences: PackedSequences) -> torch.Tensor:
    """``x`` (``[T, ...]``, the row columns of ``sequences``, which share a prefix) as the stream variable-length
    attention reads: ``[prefix, sequence 1, prefix, sequence 2, ...]``."""
    if sequences.prefix_in_stream is None:
        raise ValueError("these packed sequences share no prefix")
    return _PrefixStream.apply(x, sequences)


def from_stream(y: torch.Tensor, sequences: PackedSequences) -> torch.Tensor:
    """The stream's outputs (``[stream, ...]``, as :func:`prefix_stream` laid it out) back at the row columns: the
    prefix's from its first copy, each sequence's its own."""
    pieces = y.split(sequences.stream_pieces)
    return torch.cat([pieces[0], *pieces[1::2]])


@functools.lru_cache(maxsize=4)
def _varlen_arguments(kernel: Any) -> frozenset[str]:
    """The argument names of the installed torch's ``varlen_attn`` (read once, not at every layer)."""
    return frozenset(inspect.signature(kernel).parameters)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               cache: Any, layer_idx: int) -> torch.Tensor:
    """Attention as transformers' SDPA integration computes it (``q``, ``k``, ``v``: [B, heads, T, head_dim])."""
    t = q.shape[2]
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)
    groups = q.shape[1] // k.shape[1]
    gqa: dict[str, Any] = {}
    if groups > 1 and mask is None:
        gqa["enable_gqa"] = True
    else:  # as transformers' SDPA attention: heads repeated where a mask is given
        k, v = repeat_heads(k, groups), repeat_heads(v, groups)
    causal = mask is None and t > 1
    if causal and k.shape[2] > t:
        k, v = k[:, :, :t], v[:, :, :t]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale, is_causal=causal,
                                          **gqa)
