"""The graph engine: greedy decoding over a static KV cache with no per-token host work.

What it does, per :func:`generate_graph` call:

1. **Prefixes once.** Each prompt is split where its own system prompt + dialogue history end (:func:`prefix_split`:
   a function of the prompt alone). Prompts with the same prefix (same tokens, same audio, same edit in a per-edit
   pass) form a group whose rows go to one chunk together (a group whose prefix is short is split by tail width
   instead when that pads less), and the prefix is prefilled once per chunk into a prefix cache the group's rows
   share: IE-IKE's ~2,900-token demonstrations once per edit instead of once per item.
2. **Chunks.** Groups fill as few chunks as the batching limits allow (rows, and padded tokens: every row at the
   chunk's widest tail + new tokens, every group's prefix once at the widest prefix): every decode step reads the
   model's weights once for all of a chunk's rows, so rows of different widths share a chunk unless the padding
   they add would cost more cache reads than another read of the weights (:func:`_plan`). Rows per group are
   rounded up to a power of two for the static buffers (groups too on CPU), rows to a multiple of
   :data:`ROW_STEP` on CUDA (where every group's prefix cache is real memory: IE-IKE's ~1.5 GiB per edit); the
   extra rows are inert (never prefilled, finished from the start; on CPU they repeat a real row instead, up to the
   canonical row count of ``editors.models.buckets``).
3. **Prefill** of the chunk's real rows, batched per tail width (no compute spent on padding): attention over [the
   group's prefix, the row's own tail]; keys and values go to the static cache
   ``[rows, kv heads, widest tail + max_new_tokens, head dim]``, right-aligned at the widest tail. On CUDA the
   prefixes and the rows of one width are prefilled in parts of at most ``memory.prefill_tokens`` tokens, so the
   prefill's activations stay the same size however many rows (edits) a chunk holds; the token budget counts
   them once. On CPU a chunk is prefilled whole.
4. **Decode** ``max_new_tokens - 1`` steps of one token per row. A step reads only static buffers (current token,
   positions, write index, masks, caches) and advances them itself, so on CUDA it is captured once as a CUDA graph
   and replayed for every later step, chunk and call of that shape: no kernel launches from Python, no host sync
   in the loop. Stop tokens are handled on the device (finished rows emit padding); every few steps the loop asks,
   without waiting, whether every row has finished (an event polled on the host) and stops early when they have.
   On CPU the same step runs uncaptured.

Attention in the decode step is computed by hand (scores, fp32 softmax, weighted values, as the eager attention of
transformers) over the group's prefix cache (one copy per group: each group's queries are gathered into fixed
slots) and the row's own cache, masked positions excluded. Projections, norms and MLPs are the model's own modules,
so replaced modules keep working: routed per-edit Linears (FT-LLM) and per-edit LoRA adapters read the device
tensor ``routing.row_edit`` during the step and gather each row's edit (``editors.models.generation.per_edit``), so
K edits share one captured graph. WISE's router plans each row's memory before the call (``PromptRouting``), so
its rows are routed the same way. Methods whose modules decide on the host while decoding (GRACE) use the eager
engine.

Capture cost: one warm-up step + one capture per chunk shape (``STATS``: captures, seconds). Captured shapes are
kept across calls on the adapter (without per-edit routing: its weights live only for one pass), up to
:data:`KEEP_FRACTION` of the memory the process may use (least recently used dropped first; a shape larger than
that is freed after its last chunk), keyed by the shape and the identity of the modules and weights they read. The
token budget counts kept shapes as free memory, and a new shape that needs it drops them first; :func:`release`
drops them all (the runner does at the start of each pass of K edits, before it applies them, and on an
out-of-memory error).
Nothing is compiled, so there is no compile cache to keep between runs. Exactness: on the tiny fp32 models the
greedy outputs equal the eager engine's for the three families (tests/test_generation.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from editors.models.batch import to_device
from editors.models.buckets import MIN_ROWS, left_pad
from editors.models.generation.memory import (GENERATION_FRACTION, available_bytes, cuda_device, kv_bytes_per_token,
                                              prefill_tokens)
from editors.models.generation.output import GeneratedText, decode_new_tokens
from editors.models.generation.per_edit import PerEdit
from editors.models.generation.settings import GenerationSettings
from editors.models.prompts import Prompt

if TYPE_CHECKING:  # pragma: no cover
    from editors.models.adapter import LALMAdapter

logger = logging.getLogger(__name__)

#: Steps between the decode loop's (non-blocking) looks at whether every row has finished.
CHECK_EVERY = 8
#: Captured shapes kept across calls: at most this fraction of the device's memory (their caches and graph pools).
KEEP_FRACTION = 0.25
#: Rows of a chunk's static buffers on CUDA: a multiple of this (inert extra rows still cost cache reads per step).
ROW_STEP = 8
#: Width granularity of prompts and prefixes (tokens): CPU as the canonical buckets; on CUDA finer than the eager
#: engine's 256 (padding costs cache reads at every step).
WIDTH_STEP = {"cpu": 32, "cuda": 64}

#: Counters of the graph engine since the last :func:`reset_stats` (the bench reports them).
STATS: dict[str, float] = {}


def reset_stats() -> None:
    STATS.update({"calls": 0, "chunks": 0, "captures": 0, "capture_s": 0.0, "reused": 0, "decode_steps": 0,
                  "prefix_groups": 0, "prefix_tokens": 0, "rows": 0, "real_rows": 0})


reset_stats()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _bucket(length: int, device: torch.device) -> int:
    step = WIDTH_STEP.get(device.type, WIDTH_STEP["cpu"])
    return max(step, -(-int(length) // step) * step) if length else 0


# ----------------------------------------------------------------------------------------------------------------
# The language model, layer by layer
# ----------------------------------------------------------------------------------------------------------------


class _LM:
    """The decoder stack of an adapter (Qwen2 / Llama layout: pre-norm attention + MLP blocks, rotary positions,
    full attention), run layer by layer with an attention function of our own."""

    def __init__(self, adapter: "LALMAdapter") -> None:
        lm: Any = adapter.language_model()  # the decoder stack (its children differ per family)
        cfg = lm.config
        types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in types):
            raise ValueError(f"{adapter.model_id}: the graph engine needs full attention in every layer "
                             f"(layer types {sorted(set(types))}); use --engine eager")
        self.embed, self.layers, self.norm, self.rotary = lm.embed_tokens, list(lm.layers), lm.norm, lm.rotary_emb
        self.head: Any = adapter.lm_head()
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.scale = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.device, self.dtype = adapter.device, adapter.dtype

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hidden states after every layer (before the final norm); ``attend(layer, q, k, v)`` -> ``[B, H, T, d]``
        (queries and keys already rotated)."""
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        b, t, d = hidden.shape[0], hidden.shape[1], self.head_dim
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_proj(x).view(b, t, -1, d).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            out = attend(i, q, k, v).transpose(1, 2).reshape(b, t, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def last_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy next token of each row from the last position's hidden state."""
        return self.head(self.norm(hidden[:, -1])).argmax(-1)

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        rep = self.heads // self.kv_heads
        if rep == 1:
            return x
        b, h, t, d = x.shape
        return x[:, :, None].expand(b, h, rep, t, d).reshape(b, h * rep, t, d)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _self_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` bool: causal over valid (left-padded) positions; a padding query sees itself only (keeps
    its values finite, never seen by a valid query)."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]
    return (mask | torch.eye(t, dtype=torch.bool, device=valid.device)[None]).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# Prefixes
# ----------------------------------------------------------------------------------------------------------------


def prefix_split(adapter: "LALMAdapter", prompt: Prompt, token_ids: Sequence[int], memo: dict) -> tuple[int, int]:
    """``(tokens, audios)`` of the prompt's prefix: its rendered system prompt + history up to where the last user
    turn's own content starts (the common token prefix of the same conversation ending in two different plain
    questions), cut so that it holds whole audios and leaves the prompt at least one token. A function of the
    prompt alone."""
    key = (prompt.system, tuple(id(t) for t in prompt.history))
    if key not in memo:
        a = adapter.prompt_token_ids(Prompt("A", None, prompt.system, prompt.history))
        b = adapter.prompt_token_ids(Prompt("B", None, prompt.system, prompt.history))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        memo[key] = a[:n]
    common = memo[key]
    n = 0
    limit = min(len(common), len(token_ids) - 1)
    while n < limit and common[n] == token_ids[n]:
        n += 1
    slot = adapter.audio_placeholder_id
    slots = sum(1 for i in token_ids[:n] if i == slot)
    audios, used, whole = prompt.audios(), 0, 0
    while whole < len(audios) and used + adapter.num_audio_tokens(audios[whole]) <= slots:
        used += adapter.num_audio_tokens(audios[whole])
        whole += 1
    if used < slots:  # cut before the audio the prefix holds only part of
        seen = 0
        for pos, token in enumerate(token_ids[:n]):
            if token == slot:
                if seen == used:
                    n = pos
                    break
                seen += 1
    return n, whole


@dataclass
class _Piece:
    """Rows that share one prefix (and, in a per-edit pass, one edit), prefilled once, in one chunk."""

    prefix: list[int]  # prefix token ids
    audios: list[Any]  # the prefix's audios
    rows: list[int]  # prompt indices
    prefix_width: int
    width: int  # the rows' tail width (the bucket of the longest)


def _pieces(groups: dict[tuple, list[int]], prefixes: dict[tuple, tuple[list[int], list[Any]]],
            tails: list[list[int]], device: torch.device, cap_rows: int) -> list[_Piece]:
    """Each group's rows as one piece, split by tail width bucket when recomputing the prefix per bucket costs fewer
    tokens than padding every tail to the longest (short prefixes: the chat template's), and in pieces of at most
    ``cap_rows``."""
    out = []
    for key, rows in groups.items():
        ids, audios = prefixes[key]
        by_width: dict[int, list[int]] = {}
        for i in rows:
            by_width.setdefault(_bucket(len(tails[i]), device), []).append(i)
        widest = max(by_width)
        padding = sum(len(r) * (widest - w) for w, r in by_width.items())
        parts = sorted(by_width.items()) if len(ids) * (len(by_width) - 1) < padding else [(widest, rows)]
        for width, part in parts:
            for start in range(0, len(part), cap_rows):
                out.append(_Piece(ids, audios, part[start:start + cap_rows], _bucket(len(ids), device), width))
    return out


@dataclass
class _Chunk:
    """Pieces decoded together: one static cache as wide as the widest piece (prefix and tail), each piece
    prefilled at its own width."""

    pieces: list[_Piece]

    @property
    def prefix_width(self) -> int:
        return max(p.prefix_width for p in self.pieces)

    @property
    def width(self) -> int:
        return max(p.width for p in self.pieces)

    @property
    def rows(self) -> list[int]:
        return [i for p in self.pieces for i in p.rows]

    def sizes(self, device: torch.device) -> list[int]:
        """Rows per piece; on CPU the last piece repeats its last row up to the canonical row count."""
        sizes = [len(p.rows) for p in self.pieces]
        if device.type == "cpu":
            sizes[-1] += max(_pow2(sum(sizes)), MIN_ROWS) - sum(sizes)  # (a power of two, as buckets.row_bucket)
        return sizes

    def shape(self, device: torch.device) -> tuple[int, int, int, int, int]:
        """(prefix width, tail width, rows, groups, rows per group), rounded up for the static buffers."""
        sizes = self.sizes(device)
        groups = (_pow2(len(sizes)) if device.type == "cpu" else len(sizes)) if self.prefix_width else 1
        slots = _pow2(max(sizes)) if self.prefix_width else 1
        rows = sum(sizes) if device.type == "cpu" else -(-sum(sizes) // ROW_STEP) * ROW_STEP
        return (self.prefix_width, self.width, rows, groups, slots)


def _tokens(pieces: Sequence[_Piece], new_tokens: int) -> tuple[int, int]:
    """(padded tokens a chunk of ``pieces`` holds: every row at the widest tail + new tokens, every piece's prefix
    at the widest prefix; the real tokens among them)."""
    rows = sum(len(p.rows) for p in pieces)
    width, prefix = max(p.width for p in pieces), max(p.prefix_width for p in pieces)
    real = sum(len(p.rows) * (p.width + new_tokens) + p.prefix_width for p in pieces)
    return rows * (width + new_tokens) + len(pieces) * prefix, real


def _parts(pieces: Iterable[int], sizes: Sequence[int], cap: int) -> Iterator[tuple[list[int], list[int]]]:
    """Consecutive rows of ``pieces`` (``sizes`` rows each) in parts of at most ``cap`` rows, for one prefill
    forward each: a part's pieces and its rows of each (a piece may continue in the next part)."""
    part: list[int] = []
    counts: list[int] = []
    room = cap
    for piece, size in zip(pieces, sizes):
        while size:
            take = min(size, room)
            part.append(piece)
            counts.append(take)
            size, room = size - take, room - take
            if not room:
                yield part, counts
                part, counts, room = [], [], cap
    if part:
        yield part, counts


def _plan(pieces: list[_Piece], settings: GenerationSettings, split_tokens: int) -> list[_Chunk]:
    """Pieces in as few chunks as the batching limits allow (rows, and padded tokens). Pieces of different widths
    share a chunk: each is prefilled at its own width, only the decode reads the padding between them. Pieces go in
    order of width, and a piece starts a new chunk when the padding it would add (tokens every decode step reads)
    exceeds ``split_tokens`` (what reading the model's weights once more costs, in tokens of cache)."""
    n = settings.max_new_tokens
    chunks: list[_Chunk] = []
    current: list[_Piece] = []
    for piece in sorted(pieces, key=lambda p: (p.prefix_width, p.width), reverse=True):
        if current:
            tokens, real = _tokens(current + [piece], n)
            before, before_real = _tokens(current, n)
            rows = sum(len(p.rows) for p in current) + len(piece.rows)
            fits = ((not settings.batch_size or rows <= settings.batch_size)
                    and (not settings.max_batch_tokens or tokens <= settings.max_batch_tokens)
                    and (tokens - real) - (before - before_real) <= split_tokens)
            if not fits:
                chunks.append(_Chunk(current))
                current = []
        current.append(piece)
    if current:
        chunks.append(_Chunk(current))
    return chunks


# ----------------------------------------------------------------------------------------------------------------
# One chunk shape: static buffers, the decode step and its graph
# ----------------------------------------------------------------------------------------------------------------


class _State:
    """Static buffers of one chunk shape and its captured decode step (reused by every chunk of that shape)."""

    def __init__(self, lm: _LM, shape: tuple[int, int, int, int, int], steps: int, pad_id: int,
                 stop_ids: torch.Tensor) -> None:
        self.lm, self.steps, self.pad_id, self.stop_ids = lm, steps, pad_id, stop_ids
        self.prefix_width, self.width, self.rows, self.groups, self.slots = shape
        dev, dt = lm.device, lm.dtype
        length = self.width + steps
        self.keys = [torch.zeros(self.rows, lm.kv_heads, length, lm.head_dim, dtype=dt, device=dev)
                     for _ in lm.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        pshape = (self.groups, lm.kv_heads, self.prefix_width, lm.head_dim)
        self.prefix_keys = [torch.zeros(pshape, dtype=dt, device=dev) for _ in lm.layers] if self.prefix_width else []
        self.prefix_values = [torch.zeros_like(k) for k in self.prefix_keys]
        self.prefix_valid = torch.zeros(self.groups, self.prefix_width, dtype=torch.bool, device=dev)
        self.slot_row = torch.zeros(self.groups * self.slots, dtype=torch.long, device=dev)  # slot -> row
        self.row_slot = torch.zeros(self.rows, dtype=torch.long, device=dev)  # row -> slot
        self.valid = torch.zeros(self.rows, length, dtype=torch.bool, device=dev)
        self.token = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.position = torch.zeros(self.rows, 1, dtype=torch.long, device=dev)
        self.write = torch.zeros(1, dtype=torch.long, device=dev)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.finished = torch.zeros(self.rows, dtype=torch.bool, device=dev)
        self.out = torch.zeros(self.rows, steps, dtype=torch.long, device=dev)
        self.row_edit = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.graph: Any = None

    def nbytes(self) -> int:
        tensors = self.keys + self.values + self.prefix_keys + self.prefix_values
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- prefill ------------------------------------------------------------------------------------------------

    def layout(self, sizes: Sequence[int]) -> None:
        """Rows of pieces of ``sizes`` rows, in order: each piece's rows take its group's first slots."""
        slot_row = [0] * (self.groups * self.slots)
        row_slot = [0] * self.rows
        row = 0
        for g, size in enumerate(sizes):
            for k in range(size):
                slot_row[g * self.slots + k] = row
                row_slot[row] = g * self.slots + k
                row += 1
        self.slot_row.copy_(to_device(torch.tensor(slot_row), self.slot_row.device))
        self.row_slot.copy_(to_device(torch.tensor(row_slot), self.row_slot.device))
        self.prefix_valid.zero_()

    def prefill_prefixes(self, embeds: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                         first: int = 0) -> None:
        """Run prefixes ``first:first + G`` of the chunk (``[G, P, hidden]``, left-padded) once into the prefix
        cache."""
        lm, lo, hi = self.lm, first, first + embeds.shape[0]
        self.prefix_valid[lo:hi] = valid
        mask = _self_attention_mask(valid)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.prefix_keys[i][lo:hi].copy_(k)
            self.prefix_values[i][lo:hi].copy_(v)
            return nn.functional.scaled_dot_product_attention(q, lm.repeat_kv(k), lm.repeat_kv(v), attn_mask=mask,
                                                              scale=lm.scale)

        lm.forward(embeds, positions, attend)

    def begin(self, rows: int) -> None:
        """Reset the masks and outputs for a chunk of ``rows`` real rows (rows beyond them are inert)."""
        w = self.width
        self.valid.zero_()
        self.valid[rows:, w - 1] = True  # inert rows: one (zero) key, finite values
        self.finished.fill_(True)
        self.out.fill_(self.pad_id)
        self.token.zero_()
        self.position.zero_()

    def prefill(self, embeds: torch.Tensor, tail_valid: torch.Tensor, positions: torch.Tensor, start: int,
                groups: Sequence[int], sizes: Sequence[int]) -> None:
        """Run rows ``start:start + len(embeds)`` (``[rows, w, hidden]``, left-padded to their own width ``w`` <= the
        cache's; consecutive pieces of ``sizes`` rows over the prefixes of ``groups``) over their prefixes; fill
        their caches (right-aligned at the cache's width), masks, first token and decode position."""
        lm, w, r = self.lm, embeds.shape[1], embeds.shape[0]
        lo, hi, stop = self.width - w, self.width, start + r
        self.valid[start:stop, lo:hi] = tail_valid
        tail_mask = _self_attention_mask(tail_valid)
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.keys[i][start:stop, :, lo:hi].copy_(k)
            self.values[i][start:stop, :, lo:hi].copy_(v)
            if not self.prefix_width:
                return nn.functional.scaled_dot_product_attention(q, lm.repeat_kv(k), lm.repeat_kv(v),
                                                                  attn_mask=tail_mask, scale=lm.scale)
            outs = []
            for j, a, b in zip(groups, bounds, bounds[1:]):  # one piece at a time: its group's prefix for its rows
                pk = self.prefix_keys[i][j:j + 1].expand(b - a, -1, -1, -1)
                pv = self.prefix_values[i][j:j + 1].expand(b - a, -1, -1, -1)
                pmask = self.prefix_valid[j][None, None, None, :].expand(b - a, 1, w, -1)
                mask = torch.cat([pmask, tail_mask[a:b]], dim=-1)
                outs.append(nn.functional.scaled_dot_product_attention(
                    q[a:b], lm.repeat_kv(torch.cat([pk, k[a:b]], dim=2)),
                    lm.repeat_kv(torch.cat([pv, v[a:b]], dim=2)), attn_mask=mask, scale=lm.scale))
            return torch.cat(outs)

        hidden = lm.forward(embeds, positions, attend)
        token = lm.last_token(hidden)
        self.out[start:stop, :1] = token[:, None]
        self.finished[start:stop] = self._stops(token)
        self.token[start:stop] = token
        self.position[start:stop] = positions[:, -1:] + 1

    def end_prefill(self) -> None:
        """Decoding writes after the widest tail."""
        self.write.fill_(self.width)
        self.step_index.fill_(1)

    def _stops(self, token: torch.Tensor) -> torch.Tensor:
        return (token[:, None] == self.stop_ids[None, :]).any(-1)

    # ---- decode -------------------------------------------------------------------------------------------------

    def _attend_decode(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token per row: write its key/value, attend over [its group's prefix cache, its own cache]."""
        lm, r = self.lm, self.rows
        kv, rep, d = lm.kv_heads, lm.heads // lm.kv_heads, lm.head_dim
        self.keys[i].index_copy_(2, self.write, k)
        self.values[i].index_copy_(2, self.write, v)
        qt = q.reshape(r, kv, rep, d)
        scores = torch.matmul(qt, self.keys[i].transpose(-1, -2)) * lm.scale  # [R, kv, rep, L]
        scores = scores.masked_fill(~self.valid[:, None, None, :], float("-inf"))
        if not self.prefix_width:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(probs, self.values[i]).reshape(r, kv * rep, 1, d)
        g, s, p = self.groups, self.slots, self.prefix_width

        def to_groups(x: torch.Tensor) -> torch.Tensor:  # [G*S, kv, rep, X] (slots) -> [G, kv, S*rep, X]
            return x.reshape(g, s, kv, rep, -1).permute(0, 2, 1, 3, 4).reshape(g, kv, s * rep, x.shape[-1])

        def to_slots(x: torch.Tensor) -> torch.Tensor:  # [G, kv, S*rep, X] -> [G*S, kv, rep, X]
            return x.reshape(g, kv, s, rep, -1).permute(0, 2, 1, 3, 4).reshape(g * s, kv, rep, x.shape[-1])

        pscores = torch.matmul(to_groups(qt.index_select(0, self.slot_row)), self.prefix_keys[i].transpose(-1, -2))
        pscores = (pscores * lm.scale).masked_fill(~self.prefix_valid[:, None, None, :], float("-inf"))
        scores = torch.cat([to_slots(pscores).index_select(0, self.row_slot), scores], dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pout = torch.matmul(to_groups(probs[..., :p].index_select(0, self.slot_row)), self.prefix_values[i])
        out = to_slots(pout).index_select(0, self.row_slot) + torch.matmul(probs[..., p:], self.values[i])
        return out.reshape(r, kv * rep, 1, d)

    def step(self) -> None:
        """One decode step for every row, reading and advancing only this state's buffers."""
        lm = self.lm
        self.valid.index_fill_(1, self.write, True)
        hidden = lm.embed(self.token).unsqueeze(1)
        hidden = lm.forward(hidden, self.position, self._attend_decode)
        token = torch.where(self.finished, torch.full_like(self.token, self.pad_id), lm.last_token(hidden))
        self.out.index_copy_(1, self.step_index, token[:, None])
        self.finished |= self._stops(token)
        self.token.copy_(token)
        self.position.add_(1)
        self.write.add_(1)
        self.step_index.add_(1)

    def decode(self, pool: Any) -> int:
        """The remaining ``steps - 1`` decode steps (fewer once every row has finished); returns the steps run."""
        todo = self.steps - 1
        cuda = self.lm.device.type == "cuda"
        done, pending = 0, []
        while done < todo:
            if not cuda:
                if bool(self.finished.all()):
                    break
                self.step()
            elif self.graph is None:
                started = time.perf_counter()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.step()  # warm-up: a real step, eager
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.step()  # recorded, not run
                self.graph = graph
                STATS["captures"] += 1
                STATS["capture_s"] += time.perf_counter() - started
            else:
                self.graph.replay()
            done += 1
            if cuda and done % CHECK_EVERY == 0 and done < todo:
                flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
                flag.copy_(self.finished.all().view(1), non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                pending.append((event, flag))
                if pending[0][0].query():  # never waits: a look at a check already done
                    if bool(pending.pop(0)[1][0]):
                        break
        STATS["decode_steps"] += done
        return done


# ----------------------------------------------------------------------------------------------------------------
# States kept across calls
# ----------------------------------------------------------------------------------------------------------------

_KEPT = "_graph_engine_states"


def _kept(adapter: "LALMAdapter") -> "OrderedDict[tuple, _State]":
    states = adapter.__dict__.get(_KEPT)
    if states is None:
        states = adapter.__dict__[_KEPT] = OrderedDict()
    return states


def release(adapter: "LALMAdapter") -> None:
    """Drop the captured shapes kept on ``adapter`` (their caches and graphs)."""
    _kept(adapter).clear()


def _identity(lm: _LM) -> tuple:
    """What a captured step reads besides its buffers: the modules it calls and the weights' storage."""
    modules = tuple(id(m) for layer in lm.layers for m in layer.modules())
    weights = tuple(p.data_ptr() for layer in lm.layers for p in layer.parameters())
    return (modules, weights, id(lm.head), lm.head.weight.data_ptr(), id(lm.norm), id(lm.embed),
            lm.embed.weight.data_ptr())


def _keep_budget(device: torch.device) -> float:
    """:data:`KEEP_FRACTION` of the memory this process may use on ``device`` (a per-process cap counted)."""
    if device.type != "cuda":
        return 0.0
    device = cuda_device(device)
    total = torch.cuda.get_device_properties(device).total_memory
    return KEEP_FRACTION * total * min(1.0, torch.cuda.get_per_process_memory_fraction(device))


def kept_bytes(adapter: "LALMAdapter") -> int:
    """Device memory the shapes kept on ``adapter`` hold (given back when a generation needs it)."""
    return sum(s.nbytes() for s in _kept(adapter).values())


def _keep(adapter: "LALMAdapter", states: dict[tuple, _State], device: torch.device) -> None:
    kept = _kept(adapter)
    for key, state in states.items():
        kept[key] = state
        kept.move_to_end(key)
    budget = _keep_budget(device)
    while kept and sum(s.nbytes() for s in kept.values()) > budget:
        kept.popitem(last=False)


def _state_bytes(adapter: "LALMAdapter", shape: tuple[int, int, int, int, int], steps: int) -> int:
    """What ``_State.nbytes()`` of a new state of ``shape`` will be: every token its caches hold."""
    prefix_width, width, rows, groups, _ = shape
    return kv_bytes_per_token(adapter) * (rows * (width + steps) + groups * prefix_width)


def _make_room(adapter: "LALMAdapter", kept: dict[tuple, _State], need: int, in_use: set) -> None:
    """Drop kept shapes (least recently used first, not those of this call) until ``need`` bytes (a new shape's
    buffers) fit the memory a generation may fill: the token budget counted kept shapes as free."""
    for key in [k for k in kept if k not in in_use]:
        available = available_bytes(adapter.device)
        if available is None or GENERATION_FRACTION * available >= need:
            return
        del kept[key]
        torch.cuda.empty_cache()


def _split_tokens(adapter: "LALMAdapter", lm: _LM) -> int:
    """Tokens of KV cache whose reads cost as much as one more read of the language model's weights: the padding
    worth a separate chunk (:func:`_plan`)."""
    weights = sum(p.numel() * p.element_size() for layer in lm.layers for p in layer.parameters())
    weights += lm.head.weight.numel() * lm.head.weight.element_size()
    return max(1, weights // kv_bytes_per_token(adapter))


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_graph(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]],
                   settings: GenerationSettings, per_edit: PerEdit | None = None) -> list[GeneratedText]:
    """Greedy outputs of ``prompts`` (``token_ids`` given, audio warmed), in order (see the module docstring)."""
    lm = _LM(adapter)
    n, dev = settings.max_new_tokens, lm.device
    STATS["calls"] += 1
    memo: dict = {}
    groups: dict[tuple, list[int]] = {}
    prefixes: dict[tuple, tuple[list[int], list[Any]]] = {}
    tails, tail_audios = [], []
    for i, (prompt, ids) in enumerate(zip(prompts, token_ids)):
        split, n_audio = prefix_split(adapter, prompt, ids, memo)
        audios = prompt.audios()
        key = (per_edit.edit_of[i] if per_edit is not None else None, tuple(ids[:split]),
               tuple(id(a) for a in audios[:n_audio]))
        groups.setdefault(key, []).append(i)
        prefixes.setdefault(key, (list(ids[:split]), audios[:n_audio]))
        tails.append(list(ids[split:]))
        tail_audios.append(audios[n_audio:])
    cap_rows = settings.batch_size or 1 << 62
    if settings.max_batch_tokens:
        cap_rows = max(1, min(cap_rows, settings.max_batch_tokens // (_bucket(max(map(len, tails)), dev) + n)))
    chunks = _plan(_pieces(groups, prefixes, tails, dev, cap_rows), settings, _split_tokens(adapter, lm))
    part_tokens = prefill_tokens(adapter) or 1 << 62  # per prefill forward (CUDA); a chunk whole on CPU
    stop_ids = to_device(torch.tensor(adapter.stop_token_ids), dev)
    routing = per_edit.routing if per_edit is not None else None
    keep = dev.type == "cuda" and routing is None  # a routed step reads this pass's per-edit weights only
    identity = _identity(lm) if keep else None
    kept = _kept(adapter) if keep else {}
    states: dict[tuple, _State] = {}
    pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
    last_use = {chunk.shape(dev): c for c, chunk in enumerate(chunks)}
    outputs: list[GeneratedText | None] = [None] * len(prompts)
    for c, chunk in enumerate(chunks):
        shape = chunk.shape(dev)
        state_key = (identity, n, adapter.pad_token_id, tuple(adapter.stop_token_ids), shape)
        state = states.get(state_key) or kept.get(state_key)
        if state is None:
            if kept:
                _make_room(adapter, kept, _state_bytes(adapter, shape, n), set(states))
            state = _State(lm, shape, n, adapter.pad_token_id, stop_ids)
        elif state_key not in states:
            STATS["reused"] += 1
        states[state_key] = state
        sizes = chunk.sizes(dev)  # on CPU: repeats of the last row up to the canonical count (outputs dropped)
        rows = chunk.rows + [chunk.rows[-1]] * (sum(sizes) - len(chunk.rows))
        state.layout(sizes)
        prefix_lengths = [len(p.prefix) for p in chunk.pieces]  # the tails' positions start after them
        if chunk.prefix_width:
            for part, _ in _parts(range(len(chunk.pieces)), [1] * len(chunk.pieces),
                                  max(1, part_tokens // chunk.prefix_width)):
                members = [chunk.pieces[g] for g in part]
                firsts = [p.rows[0] for p in members]  # a member of each piece stands for its edit
                batch = left_pad(adapter._collate([p.prefix for p in members], [a for p in members for a in p.audios]),
                                 chunk.prefix_width, adapter.pad_token_id)
                if per_edit is not None:
                    per_edit.before_chunk(firsts)
                    embeds = per_edit.embeds(adapter, batch, firsts, [len(p.audios) for p in members])
                else:
                    embeds = adapter.input_embeds(batch)
                state.prefill_prefixes(embeds, batch.attention_mask.bool(), batch.position_ids, part[0])
                STATS["prefix_groups"] += len(members)
                STATS["prefix_tokens"] += sum(len(p.prefix) for p in members)
        state.begin(len(rows))
        start = 0
        for width, run in itertools.groupby(range(len(chunk.pieces)), key=lambda g: chunk.pieces[g].width):
            run_pieces = list(run)  # consecutive pieces of one tail width, prefilled at that width
            for pieces, part_sizes in _parts(run_pieces, [sizes[g] for g in run_pieces],
                                             max(1, part_tokens // width)):
                sub = rows[start:start + sum(part_sizes)]
                batch = left_pad(adapter._collate([tails[i] for i in sub],
                                                  [a for i in sub for a in tail_audios[i]]),
                                 width, adapter.pad_token_id)
                if per_edit is not None:
                    per_edit.before_chunk(sub)
                    embeds = per_edit.embeds(adapter, batch, sub, [len(tail_audios[i]) for i in sub])
                else:
                    embeds = adapter.input_embeds(batch)
                offsets = to_device(torch.tensor([prefix_lengths[g] for g, k in zip(pieces, part_sizes)
                                                  for _ in range(k)]), dev)
                state.prefill(embeds, batch.attention_mask.bool(), batch.position_ids + offsets[:, None], start,
                              pieces, part_sizes)
                start += len(sub)
        state.end_prefill()
        if per_edit is not None:
            edits = per_edit.row_edits(rows)
            state.row_edit.copy_(to_device(torch.tensor(edits + [edits[-1]] * (state.rows - len(edits))), dev))
        if routing is not None:
            routing.row_edit = state.row_edit
        try:
            done = state.decode(pool)
        finally:
            if routing is not None:
                routing.row_edit = None
        texts = decode_new_tokens(adapter, state.out[:len(chunk.rows), :done + 1], n)
        for row, text in zip(chunk.rows, texts):
            outputs[row] = text
        STATS["chunks"] += 1
        STATS["rows"] += state.rows
        STATS["real_rows"] += len(chunk.rows)
        if last_use[shape] == c and (not keep or state.nbytes() > _keep_budget(dev)):
            del states[state_key]  # not kept: free its caches before the next shape
            kept.pop(state_key, None)
            del state
    if keep:
        _keep(adapter, states, dev)
    missing = [i for i, o in enumerate(outputs) if o is None]
    if missing:  # a planning bug, never silently an empty answer
        raise RuntimeError(f"graph engine: no output for prompts {missing[:5]}")
    return outputs  # type: ignore[return-value]
