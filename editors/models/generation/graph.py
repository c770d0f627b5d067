"""The graph engine: greedy decoding over a static KV cache with no per-token host work.

What it does, per :func:`generate_graph` call:

1. **Pieces.** Each prompt is split where its own system prompt + dialogue history end (:func:`prefix_split`: a
   function of the prompt alone). Prompts with the same prefix (same tokens, same audio, same edit in a per-edit
   pass) form a group; rows of a group that ask about one clip (SAKE's reliability, type-1 generality and
   portability items) form a group of their own through that clip where that saves more than it repeats
   (:func:`_prefix_groups`). A group's rows share pieces (:func:`_pieces`): a piece holds the prefix once, then each of
   its rows' own tail and new tokens back to back, at their real lengths. How many rows share a piece follows from
   the prefix's and the tails' lengths (:func:`rows_per_lane`): IE-IKE's ~3,000-token demonstrations are held once
   per edit with its ten rows beside them; a short prefix (the chat template's) is not shared, each row then is a
   piece of its own whole prompt.
2. **Lanes and chunks.** The static KV cache of a chunk is ``lanes x width`` tokens; each lane holds pieces back to
   back (first fit, longest first, lanes as wide as the longest piece or twice that, whichever a decode step reads
   less of), so rows shorter than the widest share a lane instead of each padding one (:func:`_plan`). Chunks are as
   few as the batching limits allow (rows; tokens: lanes x width): every decode step reads the model's weights once
   for all of a chunk's rows. Rows are rounded up for the static buffers (the canonical row counts of
   ``editors.models.buckets`` on CPU, a multiple of :data:`ROW_STEP` on CUDA); the extra rows are inert (never
   prefilled, finished from the start, writing to a spare last column).
3. **Prefill** of the pieces' prefixes once each, then of every row's tail at its own tail's width (rows of one
   width batched together, whatever their piece): keys and values go to the row's place in its lane first; the
   rows attend in groups, their prefixes gathered from their lanes beside their own tails (one call per group and
   layer); or, for a prefix of at least :data:`SPLIT_PREFIX` tokens (1,024), in two parts
   merged by their log-sum-exps: the prefix read where it lies in its lane, once for all the rows of its piece (their
   queries folded into one sequence, no mask), and each row's own tail (:func:`attention_lse`). On CUDA
   prefixes and tails are prefilled in parts of at most ``memory.prefill_tokens`` tokens, so the prefill's
   activations stay the same size however many rows (edits) a chunk holds; the token budget counts them once (a
   part's, or a longer sequence's: one prefix or tail is never split, ``memory.prefill_bytes``). On CPU a chunk is
   prefilled whole.
4. **Decode** ``max_new_tokens - 1`` steps of one token per row. A step reads only static buffers (current token,
   positions, write positions, masks, caches) and advances them itself, so on CUDA it is captured once as a CUDA
   graph and replayed for every later step, chunk and call of that shape: no kernel launches from Python, no host
   sync in the loop. Stop tokens are handled on the device (finished rows emit padding); every few steps the loop
   asks, without waiting, whether every row has finished (an event polled on the host) and stops early when they
   have. On CPU the same step runs uncaptured.

Attention in the decode step is computed by hand (scores, fp32 softmax, weighted values, as the eager attention of
transformers): the rows' queries are gathered into their lanes' slots, so each lane is read once for all of its
rows, and each row's mask lets it see its piece's prefix and its own tail. Projections, norms and MLPs are the
model's own modules, so replaced modules keep working: routed per-edit Linears (FT-LLM) and per-edit LoRA adapters
read the device tensor ``routing.row_edit`` during the step and gather each row's edit
(``editors.models.generation.per_edit``), so K edits share one captured graph.
WISE's router plans each row's memory before the call (``PromptRouting``), so its rows are routed the same way.
Methods whose modules decide on the host while decoding (GRACE) use the eager engine.

Capture cost: one warm-up step + one capture per chunk shape (``STATS``: captures, seconds). Captured shapes are
kept across calls on the adapter (without per-edit routing: its weights live only for one pass), up to
:data:`KEEP_FRACTION` of the memory the process may use, counted as each shape's last chunk of a call is done
(least recently used dropped first; a shape larger than that is freed after its last chunk), keyed by the shape and
the identity of the modules and weights they read. The token budget counts kept shapes as free memory, and a new
shape that needs it (its caches and its prefill's activations) drops them first; :func:`release` drops them all (the
runner does at the start of each pass of K edits, before it applies them, and on an out-of-memory error).
Nothing is compiled, so there is no compile cache to keep between runs. Exactness: on the tiny fp32 models the
greedy outputs equal the eager engine's for the three families (tests/test_generation.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from editors.models import fused_layer
from editors.models.batch import StopFlags, side_stream, to_device
from editors.models.buckets import MIN_ROWS, left_pad
from editors.models.generation.memory import (GENERATION_FRACTION, available_bytes, cuda_device, kv_bytes_per_token,
                                              prefill_bytes, prefill_tokens)
from editors.models.generation.output import GeneratedText, decode_new_tokens
from editors.models.generation.per_edit import PerEdit
from editors.models.generation.settings import GenerationSettings
from editors.models.prompts import Prompt, audio_digest

if TYPE_CHECKING:  # pragma: no cover
    from editors.models.adapter import LALMAdapter

logger = logging.getLogger(__name__)

#: Steps between the decode loop's (non-blocking) looks at whether every row has finished.
CHECK_EVERY = 8
#: Captured shapes kept across calls: at most this fraction of the device's memory (their caches and graph pools).
KEEP_FRACTION = 0.25
#: Rows of a chunk's static buffers on CUDA: a multiple of this (inert extra rows still cost cache reads per step).
ROW_STEP = 8
#: Rows of one lane at most (each reads the whole lane at every decode step).
LANE_ROWS = 16
#: What one cached token costs a decode step (its key and value read: 512 bytes per layer and key-value head in
#: bf16 at head dim 128) over what one score costs (~24 bytes through the step's matmul, scale, mask, fp32 softmax
#: and cast): :func:`rows_per_lane`.
SCORE_RATIO = 20
#: A piece joins a chunk whose lanes are at most this many times its own length (a row reads its whole lane's scores,
#: other rows' tokens included: at most ~(PACK_SPAN - 1) / SCORE_RATIO more than its own).
PACK_SPAN = 4
#: Free device memory (bytes, as the driver counts it) below which a capture first empties the allocator's cache: a
#: decode step's own tensors in the graph's pool are tens of MB at 7B (:func:`record`).
CAPTURE_HEADROOM = 2 * 2**30
#: Record captures through ``torch.cuda.graph`` (a device sync and emptied caches first): the bench's A/B of
#: :func:`record` (``bench.goals --capture torch``).
CAPTURE_VIA_TORCH = False
#: Width granularity of prompts and prefixes (tokens): CPU as the canonical buckets; on CUDA finer than the eager
#: engine's 256 (padding costs cache reads at every step).
WIDTH_STEP = {"cpu": 32, "cuda": 64}
#: The row prefill attends over a prefix of at least this many tokens in two parts merged by their log-sum-exps (the
#: prefix read in place, once per piece, and each row's own tail) instead of gathering each row's copy of it beside
#: its tail; shorter prefixes are gathered, in groups of rows (one call per group and layer). None: every prefix is
#: gathered. The gather copied each edit's ~3,000-token IE-IKE demonstrations ten times per layer; reading them in
#: place took IE-IKE from 1.034 to 0.835 s/edit on an H100 (``bench.goals --split-prefix``, one call, 32 edits at
#: the default K; FT-LLM, whose prefixes are shorter, 0.584 and 0.580). (A read in place with every row's mask over
#: its piece's whole lane span, other rows' tails included, was tried and removed untimed: it left the host behind
#: with per-piece masks, and computes scores over every row's tail.)
SPLIT_PREFIX: int | None = 1024
#: Rows of a group that ask about the same clip (SAKE's reliability, type-1 generality and portability items) share
#: the prefix through that clip (:func:`_prefix_groups`); False: only the system prompt + history are shared (the
#: bench's A/B: ``bench.goals --share-clips off``).
SHARE_CLIPS = True
#: Transient bytes of a gathered row-prefill attention call: the keys and values it gathers (its rows' prefixes
#: beside their own tails; again repeated over the heads under grouped-query attention) and its mask as the
#: memory-efficient kernel expands it over the heads.
ATTENTION_BYTES = 2**30

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
        # RMSNorm in one kernel and the rotary products over contiguous tables (the same bits on the CPU)
        self.fused = fused_layer.fused_layers_on(adapter.device)

    def _norm(self, norm: Any, hidden: torch.Tensor) -> torch.Tensor:
        return fused_layer.rms_norm(norm, hidden) if self.fused else norm(hidden)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hidden states after every layer (before the final norm); ``attend(layer, q, k, v)`` -> ``[B, H, T, d]``
        (queries and keys already rotated)."""
        cos, sin = self.rotary(hidden, positions)
        tables = fused_layer.RotaryTables.of((cos, sin), self.heads, self.kv_heads) if self.fused else None
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        b, t, d = hidden.shape[0], hidden.shape[1], self.head_dim
        for i, layer in enumerate(self.layers):
            x = self._norm(layer.input_layernorm, hidden)
            attn = layer.self_attn
            q, k = attn.q_proj(x).view(b, t, -1, d), attn.k_proj(x).view(b, t, -1, d)
            v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
            if tables is not None:
                q = fused_layer.rotate(q, tables.cos_q, tables.sin_q).transpose(1, 2)
                k = fused_layer.rotate(k, tables.cos_k, tables.sin_k).transpose(1, 2)
            else:
                q, k = q.transpose(1, 2), k.transpose(1, 2)
                q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            out = attend(i, q, k, v).transpose(1, 2).reshape(b, t, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(self._norm(layer.post_attention_layernorm, hidden))
        return hidden

    def last_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy next token of each row from the last position's hidden state."""
        return self.head(self._norm(self.norm, hidden[:, -1])).argmax(-1)

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        return fused_layer.repeat_heads(x, self.heads // self.kv_heads)


def _split(prefix: int) -> bool:
    """Whether the row prefill attends over a prefix of ``prefix`` tokens in two parts (:data:`SPLIT_PREFIX`)."""
    return bool(prefix) and SPLIT_PREFIX is not None and prefix >= SPLIT_PREFIX


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``[B, H, L, d]`` and each query's log-sum-exp of its scores ``[B, H, L]`` (fp32): on CUDA torch's
    flash kernel (no ``bias``, 16-bit) or memory-efficient kernel (``bias``: additive, broadcast over the heads,
    its last dimension a multiple of 16), which return it; on the CPU the same in fp32 arithmetic."""
    if q.device.type == "cuda":
        if bias is None and q.dtype in (torch.bfloat16, torch.float16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        else:
            expanded = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, expanded, True, 0.0, False,
                                                                              scale=scale)[:2]
        return out, lse[..., :q.shape[2]]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype), lse


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint sets of keys merged into attention over both (:func:`attention_lse`'s outputs):
    each part weighed by its share of the query's softmax, ``sigmoid(lse_a - lse_b)`` for part a."""
    weight = torch.sigmoid(lse_a - lse_b)[..., None]
    return (out_a.float() * weight + out_b.float() * (1 - weight)).to(out_a.dtype)


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


def prefix_split(adapter: "LALMAdapter", prompt: Prompt, token_ids: Sequence[int], memo: dict,
                 own_audio: bool = False) -> tuple[int, int]:
    """``(tokens, audios)`` of the prompt's prefix: its rendered system prompt + history up to where the last user
    turn's own content starts (the common token prefix of the same conversation ending in two different plain
    questions), cut so that it holds whole audios and leaves the prompt at least one token. With ``own_audio``,
    the two questions carry the prompt's own audio, so the prefix runs on through that audio where the family's
    template puts it before the question (rows asking about one clip then share it). A function of the prompt
    alone."""
    audio = prompt.audio if own_audio else None
    key = (prompt.system, tuple(id(t) for t in prompt.history), audio_digest(audio))
    if key not in memo:
        a = adapter.prompt_token_ids(Prompt("A", audio, prompt.system, prompt.history))
        b = adapter.prompt_token_ids(Prompt("B", audio, prompt.system, prompt.history))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        memo[key] = a[:n]
    common = memo[key]
    limit = min(len(common), len(token_ids) - 1)
    ids = np.asarray(token_ids[:limit])
    differ = np.flatnonzero(np.asarray(common[:limit]) != ids)  # (IE-IKE's prefixes are ~3,000 tokens)
    n = int(differ[0]) if differ.size else limit
    slot = adapter.audio_placeholder_id
    slots = int(np.count_nonzero(ids[:n] == slot))
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
    """Rows that share one prefix (and, in a per-edit pass, one edit), laid out in a lane as [prefix | row 1's tail
    and new tokens | row 2's ... ]. A row whose prefix is not shared is a piece of its own with no prefix (its whole
    prompt is its tail)."""

    prefix: list[int]  # prefix token ids ([]: none)
    audios: list[Any]  # the prefix's audios
    rows: list[int]  # prompt indices
    tails: list[int]  # each row's tail length (tokens after the prefix)

    def length(self, new_tokens: int) -> int:
        """Tokens of the piece: the prefix once, each row's tail and the ``new_tokens - 1`` tokens decoding writes."""
        return len(self.prefix) + sum(t + new_tokens - 1 for t in self.tails)

    def segments(self, new_tokens: int) -> list[int]:
        """Where each row's tail starts, from the piece's start."""
        starts, at = [], len(self.prefix)
        for t in self.tails:
            starts.append(at)
            at += t + new_tokens - 1
        return starts


def rows_per_lane(prefix: int, tail: float, rows: int) -> int:
    """How many rows of a group share one copy of its ``prefix``-token prefix (rows of ``tail`` tokens on average).
    A lane's rows each read the whole lane at every decode step (one score per key, ~1/:data:`SCORE_RATIO` of a
    cached token's reads), so sharing ``s`` rows reads the prefix once instead of ``s`` times but every row's tail
    ``s`` times over: per row ``(prefix / s + tail) * (1 + s / SCORE_RATIO)``, least at
    ``s = sqrt(SCORE_RATIO * prefix / tail)``; at most :data:`LANE_ROWS` and the group's rows."""
    if prefix <= 0 or rows <= 1:
        return 1
    best = math.sqrt(SCORE_RATIO * prefix / max(tail, 1.0))
    return max(1, min(rows, LANE_ROWS, int(round(best))))


@dataclass
class _Chunk:
    """Rows decoded together: one static cache of ``lanes x width`` tokens. Each lane holds pieces back to back
    (first fit, longest first), so rows shorter than the widest fill a lane together instead of each padding one;
    the last column of every lane is spare (inert rows attend to it)."""

    width: int
    lanes: list[list[_Piece]]

    @property
    def pieces(self) -> list[_Piece]:
        return [p for lane in self.lanes for p in lane]

    @property
    def rows(self) -> list[int]:
        """Prompt indices in the chunk's row order (lane by lane)."""
        return [i for p in self.pieces for i in p.rows]

    @property
    def slots(self) -> int:
        """Rows of the fullest lane."""
        return max(sum(len(p.rows) for p in lane) for lane in self.lanes)

    def fit(self, piece: _Piece, new_tokens: int) -> list[_Piece] | None:
        """The first lane with room for ``piece`` (tokens and :data:`LANE_ROWS`), or None."""
        need = piece.length(new_tokens)
        for lane in self.lanes:
            used = sum(p.length(new_tokens) for p in lane)
            if used + need <= self.width - 1 and sum(len(p.rows) for p in lane) + len(piece.rows) <= LANE_ROWS:
                return lane
        return None

    def shape(self, device: torch.device) -> tuple[int, int, int, int]:
        """(lane width, lanes, rows per lane, rows) of the static buffers: rows rounded up to the canonical row counts
        of ``editors.models.buckets`` on CPU (a power of two, at least :data:`MIN_ROWS`), to a multiple of
        :data:`ROW_STEP` on CUDA."""
        rows = len(self.rows)
        rows = max(_pow2(rows), MIN_ROWS) if device.type == "cpu" else -(-rows // ROW_STEP) * ROW_STEP
        return self.width, len(self.lanes), self.slots, rows


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


def _plan(pieces: list[_Piece], settings: GenerationSettings, device: torch.device) -> list[_Chunk]:
    """Pieces in as few chunks as the batching limits allow, packed into lanes (:func:`_pack`) as wide as the longest
    piece or twice as wide, whichever a decode step reads less of (:func:`_reads`): wider lanes pack rows of
    typical length with less padding left over, but each row reads its lane's scores."""
    plans = [_pack(pieces, settings, device, spread) for spread in (1, 2)]
    return min(plans, key=lambda chunks: sum(_reads(c) for c in chunks))


def _reads(chunk: _Chunk) -> float:
    """What a decode step of ``chunk`` reads, in cached tokens: every lane's keys and values, and each of its slots'
    scores (1/:data:`SCORE_RATIO` of a token each)."""
    return len(chunk.lanes) * chunk.width * (1 + chunk.slots / SCORE_RATIO)


def _pack(pieces: list[_Piece], settings: GenerationSettings, device: torch.device, spread: int) -> list[_Chunk]:
    """Pieces longest first; a chunk's lanes are ``spread`` times its longest piece (+ the spare column); a piece
    joins the chunk's first lane with room, else a new lane, unless the chunk's lanes exceed :data:`PACK_SPAN` times
    ``spread`` times its own length (its rows would read too many other rows' tokens) or a limit is reached (rows;
    tokens: lanes x width): then it starts the next chunk."""
    n = settings.max_new_tokens
    chunks: list[_Chunk] = []
    current: _Chunk | None = None
    for piece in sorted(pieces, key=lambda p: p.length(n), reverse=True):
        width = _bucket(spread * piece.length(n) + 1, device)
        if current is not None and current.width <= PACK_SPAN * width and (
                not settings.batch_size or len(current.rows) + len(piece.rows) <= settings.batch_size):
            lane = current.fit(piece, n)
            if lane is not None:
                lane.append(piece)
                continue
            if not settings.max_batch_tokens or (len(current.lanes) + 1) * current.width <= settings.max_batch_tokens:
                current.lanes.append([piece])
                continue
        if current is not None:
            chunks.append(current)
        if settings.max_batch_tokens and spread > 1:
            width = min(width, max(_bucket(piece.length(n) + 1, device), settings.max_batch_tokens))
        current = _Chunk(width, [[piece]])
    if current is not None:
        chunks.append(current)
    return chunks


# ----------------------------------------------------------------------------------------------------------------
# One chunk shape: static buffers, the decode step and its graph
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Writes:
    """Where one prefill forward's keys and values go: batch row and column -> lane and lane position."""

    batch_row: torch.Tensor
    column: torch.Tensor
    lane: torch.Tensor
    position: torch.Tensor

    @classmethod
    def of(cls, spans: Sequence[tuple[int, int, int, int]], width: int, device: torch.device) -> "_Writes":
        """``spans``: (batch row, lane, lane position, tokens) of each row's valid columns, right-aligned at
        ``width`` in the (left-padded) batch."""
        b: list[int] = []
        c: list[int] = []
        g: list[int] = []
        p: list[int] = []
        for row, lane, at, count in spans:
            b += [row] * count
            c += range(width - count, width)
            g += [lane] * count
            p += range(at, at + count)
        tensors = [to_device(torch.tensor(x, dtype=torch.long), device) for x in (b, c, g, p)]
        return cls(*tensors)


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` (its last dimension contiguous) viewed with the widest element of 16, 8 or 4 bytes that its head rows
    divide into: the same bytes, so an index or index-put over the other dimensions copies exactly what it copies
    over ``x``, but with a fraction of the elements (the index kernels move one element per thread: over bf16 a
    2-byte copy each, bench/copy_kernels.py)."""
    row = x.shape[-1] * x.element_size()
    for dtype in (torch.complex128, torch.int64, torch.int32):
        size = dtype.itemsize
        if (row % size == 0 and x.stride(-1) == 1 and (x.storage_offset() * x.element_size()) % size == 0
                and all((st * x.element_size()) % size == 0 for st in x.stride()[:-1])):
            return x.view(dtype) if size > x.element_size() else x
    return x


def store_rows(cache: torch.Tensor, states: torch.Tensor, writes: _Writes) -> None:
    """``states`` (``[B, heads, w, d]``) at ``writes``' batch rows and columns into ``cache`` (``[lanes, heads,
    positions, d]``) at their lanes and positions."""
    wide(cache)[writes.lane, :, writes.position] = wide(states)[writes.batch_row, :, writes.column]


def gather_rows(cache: torch.Tensor, lanes: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[n, heads, P, d]``: each of ``n`` rows' ``columns`` (``[n, P]``) of its lane (``lanes``: ``[n, 1]``) of
    ``cache``."""
    return wide(cache)[lanes, :, columns].transpose(1, 2).view(cache.dtype)


@dataclass
class _Place:
    """Where a prompt's row lives in a chunk."""

    row: int  # its row of the static buffers
    lane: int
    prefix_start: int  # its piece's prefix in the lane ([start, start + prefix length))
    prefix: int  # prefix length
    tail_start: int  # its own tail in the lane


@dataclass
class _Run:
    """Rows ``[a, b)`` of a prefill forward attended together: over their own tails with their prefixes gathered
    beside them (``gather``: lanes ``[n, 1]``, lane positions ``[n, P]``), over their own tails alone (neither), or
    in two parts (``prefixes``: each piece's rows ``[c, e)`` of the forward and its prefix's lane, first and end
    column; ``mask`` then is the tails' additive bias) merged by their log-sum-exps."""

    rows: tuple[int, int]
    mask: torch.Tensor
    gather: tuple[torch.Tensor, torch.Tensor] | None = None
    prefixes: list[tuple[int, int, int, int, int]] | None = None


class _State:
    """Static buffers of one chunk shape and its captured decode step (reused by every chunk of that shape)."""

    def __init__(self, lm: _LM, shape: tuple[int, int, int, int], steps: int, pad_id: int,
                 stop_ids: torch.Tensor) -> None:
        self.lm, self.steps, self.pad_id, self.stop_ids = lm, steps, pad_id, stop_ids
        self.width, self.lanes, self.slots, self.rows = shape
        dev, dt = lm.device, lm.dtype
        cache = (self.lanes, lm.kv_heads, self.width, lm.head_dim)
        self.keys = [torch.zeros(cache, dtype=dt, device=dev) for _ in lm.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        slots = self.lanes * self.slots
        self.blocked = torch.ones(slots, self.width, dtype=torch.bool, device=dev)  # what a slot's row does not see
        self.slot_row = torch.zeros(slots, dtype=torch.long, device=dev)  # the row whose query a lane slot holds
        self.row_slot = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.lane_of = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.write = torch.zeros(self.rows, dtype=torch.long, device=dev)  # lane position of the row's next token
        self.advance = torch.zeros(self.rows, dtype=torch.long, device=dev)  # 1 for real rows, 0 for inert ones
        self.token = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.position = torch.zeros(self.rows, 1, dtype=torch.long, device=dev)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.finished = torch.zeros(self.rows, dtype=torch.bool, device=dev)
        self.out = torch.zeros(self.rows, steps, dtype=torch.long, device=dev)
        self.row_edit = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.graph: Any = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ---- prefill ------------------------------------------------------------------------------------------------

    def begin(self, chunk: _Chunk) -> dict[int, _Place]:
        """Lay out ``chunk`` (rows in its order, lane ``g`` holding its ``g``-th lane's pieces back to back): every
        real row sees its piece's prefix and its own tail, and decoding writes after its tail. Inert rows (beyond the
        real ones) write to lane 0's spare last column; empty lane slots see only their lane's spare column. Returns
        each prompt's place."""
        n, spare = self.steps, self.width - 1
        valid = torch.zeros(self.lanes * self.slots, self.width, dtype=torch.bool)
        valid[:, spare] = True
        write = torch.full((self.rows,), spare, dtype=torch.long)
        advance = torch.zeros(self.rows, dtype=torch.long)
        lane_of = torch.zeros(self.rows, dtype=torch.long)
        slot_row = torch.zeros(self.lanes * self.slots, dtype=torch.long)
        row_slot = torch.zeros(self.rows, dtype=torch.long)
        places: dict[int, _Place] = {}
        row = 0
        for g, lane in enumerate(chunk.lanes):
            start, slot = 0, g * self.slots
            for piece in lane:
                for prompt, tail, at in zip(piece.rows, piece.tails, piece.segments(n)):
                    places[prompt] = _Place(row, g, start, len(piece.prefix), start + at)
                    valid[slot, spare] = False
                    valid[slot, start:start + len(piece.prefix)] = True
                    valid[slot, start + at:start + at + tail] = True
                    write[row], advance[row], lane_of[row] = start + at + tail, 1, g
                    slot_row[slot], row_slot[row] = row, slot
                    row, slot = row + 1, slot + 1
                start += piece.length(n)
        for name, value in (("blocked", ~valid), ("write", write), ("advance", advance), ("lane_of", lane_of),
                            ("slot_row", slot_row), ("row_slot", row_slot)):
            target = getattr(self, name)
            target.copy_(to_device(value, target.device))
        self.finished.fill_(True)
        self.out.fill_(self.pad_id)
        self.token.zero_()
        self.position.zero_()
        return places

    def prefill_prefixes(self, embeds: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                         writes: _Writes) -> None:
        """Run a batch of prefixes (``[B, P, hidden]``, left-padded) once, their keys and values to their lanes."""
        lm = self.lm
        mask = _self_attention_mask(valid)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self._store(i, k, v, writes)
            return nn.functional.scaled_dot_product_attention(q, lm.repeat_kv(k), lm.repeat_kv(v), attn_mask=mask,
                                                              scale=lm.scale)

        lm.forward(embeds, positions, attend)

    def _store(self, i: int, k: torch.Tensor, v: torch.Tensor, writes: _Writes) -> None:
        store_rows(self.keys[i], k, writes)
        store_rows(self.values[i], v, writes)

    def prefill(self, embeds: torch.Tensor, tail_valid: torch.Tensor, positions: torch.Tensor,
                prefixes: Sequence[tuple[int, int, int]], writes: _Writes, rows: torch.Tensor) -> None:
        """Run a batch of tails (``[B, w, hidden]``, left-padded to ``w``; ``prefixes``: each row's lane, prefix start
        and prefix length in the lane), each row attending over its prefix and its own tail;
        keys and values to their lanes; each row's first token and decode position to its buffer row in ``rows``.

        How the rows attend is planned once per forward (:meth:`_runs`): rows with a long prefix in two parts, the
        prefix read where it lies once per piece (its rows' queries folded into one sequence) and their own tails,
        merged by the parts' log-sum-exps; other rows in groups, their prefixes gathered from their lanes beside their
        own tails."""
        lm = self.lm
        tail_mask = _self_attention_mask(tail_valid)
        runs = self._runs(prefixes, tail_mask)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self._store(i, k, v, writes)  # every row's tail in its lane (decoding reads it there)
            outs = []
            for run in runs:
                a, b = run.rows
                if run.prefixes is not None:
                    outs.append(self._split_attention(i, q[a:b], k[a:b], v[a:b], run))
                    continue
                keys, values = k[a:b], v[a:b]
                if run.gather is not None:  # each row's prefix gathered from its lane beside its own tail
                    lanes, columns = run.gather
                    keys = torch.cat([gather_rows(self.keys[i], lanes, columns), keys], dim=2)
                    values = torch.cat([gather_rows(self.values[i], lanes, columns), values], dim=2)
                outs.append(nn.functional.scaled_dot_product_attention(
                    q[a:b], lm.repeat_kv(keys), lm.repeat_kv(values), attn_mask=run.mask, scale=lm.scale))
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        hidden = lm.forward(embeds, positions, attend)
        token = lm.last_token(hidden)
        self.out[:, 0].index_copy_(0, rows, token)
        self.finished.index_copy_(0, rows, self._stops(token))
        self.token.index_copy_(0, rows, token)
        self.position.index_copy_(0, rows, positions[:, -1:] + 1)

    def _split_attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run: _Run) -> torch.Tensor:
        """Layer ``i``'s attention of a run's rows in two parts: each piece's prefix read where it lies in its lane,
        once for all its rows (their queries folded into one sequence: every query sees the whole prefix), and each
        row's own tail (``run.mask``: the additive causal/padding bias); the parts weighed by their log-sum-exps."""
        lm, a = self.lm, run.rows[0]
        n, heads, w, d = q.shape
        tail_out, tail_lse = attention_lse(q, lm.repeat_kv(k), lm.repeat_kv(v), run.mask, lm.scale)
        prefix_out, prefix_lse = torch.empty_like(tail_out), torch.empty_like(tail_lse)
        for c, e, lane, lo, hi in run.prefixes or []:
            folded = q[c - a:e - a].transpose(0, 1).reshape(1, heads, (e - c) * w, d)
            out, lse = attention_lse(folded, lm.repeat_kv(self.keys[i][lane:lane + 1, :, lo:hi]),
                                     lm.repeat_kv(self.values[i][lane:lane + 1, :, lo:hi]), None, lm.scale)
            prefix_out[c - a:e - a] = out.reshape(heads, e - c, w, d).transpose(0, 1)
            prefix_lse[c - a:e - a] = lse.reshape(heads, e - c, w).transpose(0, 1)
        return merge_attention(prefix_out, prefix_lse, tail_out, tail_lse)

    def _runs(self, prefixes: Sequence[tuple[int, int, int]], tail_mask: torch.Tensor) -> list[_Run]:
        """How the rows attend, the same in every layer: consecutive rows with a prefix of at least
        :data:`SPLIT_PREFIX` tokens as one run in two parts (:meth:`_split_attention`); the other rows in groups of
        about :data:`ATTENTION_BYTES` of gathered keys and values (shorter prefixes padded with masked columns). Index
        tensors and masks are built on the device: on the host they outlasted the forward."""
        lm, w = self.lm, tail_mask.shape[-1]
        # per key column and row of a gathered group: the gathered keys and values, their copy repeated over the
        # heads (grouped-query attention), the mask over the heads
        repeated = 2 * lm.heads * lm.head_dim if lm.heads != lm.kv_heads else 0
        per_token = (2 * lm.kv_heads * lm.head_dim + repeated + lm.heads * w) * lm.dtype.itemsize
        out: list[_Run] = []
        a = 0
        while a < len(prefixes):
            b = a + 1
            if _split(prefixes[a][2]):
                while b < len(prefixes) and _split(prefixes[b][2]):
                    b += 1
                out.append(self._split_run(a, b, prefixes[a:b], tail_mask))
            else:
                longest = prefixes[a][2]
                while (b < len(prefixes) and not _split(prefixes[b][2])
                       and (b + 1 - a) * (max(longest, prefixes[b][2]) + w) * per_token <= ATTENTION_BYTES):
                    longest = max(longest, prefixes[b][2])
                    b += 1
                out.append(self._gathered_run(a, b, prefixes[a:b], longest, tail_mask))
            a = b
        return out

    def _split_run(self, a: int, b: int, prefixes: Sequence[tuple[int, int, int]], tail_mask: torch.Tensor) -> _Run:
        """Rows ``[a, b)`` in two parts: the pieces among them (consecutive rows of one lane and prefix) with their
        prefix's lane span, and the tails' mask as an additive bias."""
        pieces: list[tuple[int, int, int, int, int]] = []
        for j, (lane, start, n) in enumerate(prefixes, start=a):
            if pieces and pieces[-1][2:] == (lane, start, start + n):
                pieces[-1] = (pieces[-1][0], j + 1, *pieces[-1][2:])
            else:
                pieces.append((j, j + 1, lane, start, start + n))
        bias = torch.zeros(tail_mask[a:b].shape, dtype=self.lm.dtype, device=tail_mask.device)
        return _Run((a, b), bias.masked_fill_(~tail_mask[a:b], float("-inf")), prefixes=pieces)

    def _gathered_run(self, a: int, b: int, prefixes: Sequence[tuple[int, int, int]], longest: int,
                      tail_mask: torch.Tensor) -> _Run:
        """Rows ``[a, b)`` with their prefixes (at most ``longest`` tokens) gathered from their lanes: lanes ``[n, 1]``
        and lane positions ``[n, longest]`` (a shorter prefix padded with the lane's spare column, masked); the mask
        ``[n, 1, w, longest + w]``. Without any prefix: their tail mask alone."""
        if not longest:
            return _Run((a, b), tail_mask[a:b])
        device, w = self.lm.device, tail_mask.shape[-1]
        small = to_device(torch.tensor(prefixes, dtype=torch.long), device)
        steps = torch.arange(longest, device=device)[None, :]
        seen = steps < small[:, 2:3]  # [n, P]: the row's own prefix
        columns = torch.where(seen, small[:, 1:2] + steps, torch.full_like(steps, self.width - 1))
        mask = torch.cat([seen[:, None, None, :].expand(b - a, 1, w, longest), tail_mask[a:b]], dim=-1)
        return _Run((a, b), mask, gather=(small[:, :1], columns))

    def end_prefill(self) -> None:
        self.step_index.fill_(1)

    def _stops(self, token: torch.Tensor) -> torch.Tensor:
        return (token[:, None] == self.stop_ids[None, :]).any(-1)

    # ---- decode -------------------------------------------------------------------------------------------------

    def _attend_decode(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token per row: write its key/value into its lane, then attend over what each row sees of its lane
        (its prefix and its own tail), the queries gathered into their lane's slots so that each lane is read once
        for all of its rows."""
        lm, g, s, width = self.lm, self.lanes, self.slots, self.width
        kv, rep, d = lm.kv_heads, lm.heads // lm.kv_heads, lm.head_dim
        keys, values = self.keys[i], self.values[i]
        wide(keys)[self.lane_of, :, self.write] = wide(k[:, :, 0])
        wide(values)[self.lane_of, :, self.write] = wide(v[:, :, 0])
        slotted = q.reshape(self.rows, kv, rep, d).index_select(0, self.slot_row)  # [G*S, kv, rep, d]
        lanes_q = slotted.view(g, s, kv, rep, d).permute(0, 2, 1, 3, 4).reshape(g, kv, s * rep, d)
        scores = torch.matmul(lanes_q, keys.transpose(-1, -2)) * lm.scale  # [G, kv, S*rep, W]
        scores = scores.view(g, kv, s, rep, width).masked_fill(self.blocked.view(g, 1, s, 1, width), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(g, kv, s * rep, width)
        out = torch.matmul(probs, values)  # [G, kv, S*rep, d]
        out = out.view(g, kv, s, rep, d).permute(0, 2, 1, 3, 4).reshape(g * s, kv, rep, d)
        return out.index_select(0, self.row_slot).reshape(self.rows, kv * rep, 1, d)

    def step(self) -> None:
        """One decode step for every row, reading and advancing only this state's buffers."""
        lm = self.lm
        self.blocked.scatter_(1, self.write.index_select(0, self.slot_row)[:, None], False)
        hidden = lm.embed(self.token).unsqueeze(1)
        hidden = lm.forward(hidden, self.position, self._attend_decode)
        token = torch.where(self.finished, torch.full_like(self.token, self.pad_id), lm.last_token(hidden))
        self.out.index_copy_(1, self.step_index, token[:, None])
        self.finished |= self._stops(token)
        self.token.copy_(token)
        self.position.add_(1)
        self.write.add_(self.advance)
        self.step_index.add_(1)

    def capture(self) -> Any:
        """This state's decode step captured (:func:`capture_step`), kept as its graph."""
        self.graph = capture_step(self.step, self.lm.device, STATS)
        return self.graph

    def decode(self) -> int:
        """The decode steps after the prefill (see :func:`run_steps`); how many ran."""
        done = run_steps(self.steps - 1, self.step, self.finished, self.graph, self.capture)
        STATS["decode_steps"] += done
        return done


def run_steps(todo: int, step: Callable[[], None], finished: torch.Tensor, graph: Any,
              capture: Callable[[], Any]) -> int:
    """Up to ``todo`` decode steps; how many ran. On the CPU ``step()`` until every row of ``finished`` is set. On
    CUDA ``graph`` replayed (a step recorded earlier), or where it is None ``capture()`` first (one step run, the
    next recorded: :func:`capture_step`; it returns the graph); every :data:`CHECK_EVERY` steps the loop pushes a
    look at ``finished`` and stops once an earlier look, already arrived, says every row has finished (it never
    waits for the device)."""
    cuda = finished.device.type == "cuda"
    done, looks = 0, StopFlags()
    while done < todo:
        if not cuda:
            if bool(finished.all()):
                break
            step()
        elif graph is None:
            graph = capture()
        else:
            graph.replay()
        done += 1
        if cuda and done % CHECK_EVERY == 0 and done < todo:
            looks.push(finished.all())
            if looks.seen():
                break
    return done


def capture_step(step: Callable[[], None], device: torch.device, stats: dict[str, Any]) -> Any:
    """Run ``step`` once eagerly (warm-up, on a side stream), then record it as a CUDA graph (recorded, not run: the
    first replay runs it; :func:`record`); counted in ``stats`` (``captures``, ``capture_s``)."""
    started = time.perf_counter()
    with side_stream(device):
        step()
    graph = record(step, device)
    stats["captures"] += 1
    stats["capture_s"] += time.perf_counter() - started
    return graph


def record(step: Callable[[], None], device: torch.device) -> Any:
    """``step``'s kernels recorded as a CUDA graph in a memory pool of its own, on a side stream (nothing runs).

    Its own pool, never one shared with the other shapes of a call: when the last graph of a pool is freed (a shape
    dropped in the middle of a call), the allocator marks the pool freeable but keeps it until it next frees cached
    blocks, and a capture into that pool before then fails an internal assert of PyTorch's allocator
    (``use_count > 0``; met on an H100 in a sequential IE-IKE run, 2026-12-07). A decode step's own tensors are tens
    of MB at 7B, so a pool per shape costs little.

    Not through ``torch.cuda.graph``: on entering, that waits for the device to finish its queue and empties the
    allocator's device and pinned-host caches, so the host sat idle while the prefill queued before the capture ran,
    and the memory the next pass (and the next pinned copy) needs was allocated from the driver again. Here the
    device's queue keeps running while the host records, and the device cache is emptied only when the driver has
    less than :data:`CAPTURE_HEADROOM` bytes free for the graph's pool (what the allocator cannot return during a
    capture). :data:`CAPTURE_VIA_TORCH` (the bench's A/B) takes torch's context instead."""
    graph = torch.cuda.CUDAGraph()
    if CAPTURE_VIA_TORCH:
        with torch.cuda.graph(graph):
            step()
        return graph
    if torch.cuda.mem_get_info(cuda_device(device))[0] < CAPTURE_HEADROOM:
        torch.cuda.empty_cache()
    with side_stream(device):
        graph.capture_begin()
        try:
            step()
        finally:
            graph.capture_end()
    return graph


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


def keeps_shapes(device: torch.device, per_edit: PerEdit | None) -> bool:
    """Whether a call keeps its captured shapes for later calls: on CUDA, without per-edit routing (a routed step
    reads this pass's per-edit weights only)."""
    return device.type == "cuda" and (per_edit is None or per_edit.routing is None)


def _keep(adapter: "LALMAdapter", key: tuple, state: _State, device: torch.device) -> None:
    """``state`` kept on ``adapter`` as the most recently used, then the least recently used dropped until what is
    kept fits :func:`_keep_budget`. Called as a call is done with each shape, so a call holds at most the budget
    beside the shapes it still needs: a long call over many shapes (a sequence's growing in-context prompts) once
    held all of them until it ended, and ran an 80 GB card out of memory."""
    kept = _kept(adapter)
    kept[key] = state
    kept.move_to_end(key)
    budget = _keep_budget(device)
    while kept and sum(s.nbytes() for s in kept.values()) > budget:
        kept.popitem(last=False)


def _state_bytes(adapter: "LALMAdapter", shape: tuple[int, int, int, int]) -> int:
    """What ``_State.nbytes()`` of a new state of ``shape`` will be: every token its lanes hold."""
    width, lanes, _, _ = shape
    return kv_bytes_per_token(adapter) * lanes * width


def _longest(chunk: _Chunk) -> int:
    """Tokens of the longest sequence one prefill forward of ``chunk`` runs: a prefix or a row's tail."""
    return max(max(len(p.prefix), *p.tails) for p in chunk.pieces)


def _make_room(adapter: "LALMAdapter", kept: dict[tuple, _State], need: int, in_use: set) -> None:
    """Drop kept shapes (least recently used first, not those of this call) until ``need`` bytes (a new shape's
    buffers and its prefill's activations) fit the memory a generation may fill: the token budget counted kept
    shapes as free."""
    for key in [k for k in kept if k not in in_use]:
        available = available_bytes(adapter.device)
        if available is None or GENERATION_FRACTION * available >= need:
            return
        del kept[key]
        torch.cuda.empty_cache()


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
    pieces, tails, tail_audios = _pieces(adapter, prompts, token_ids, per_edit, settings)
    chunks = _plan(pieces, settings, dev)
    part_tokens = prefill_tokens(adapter) or 1 << 62  # per prefill forward (CUDA); a chunk whole on CPU
    stop_ids = to_device(torch.tensor(adapter.stop_token_ids), dev)
    routing = per_edit.routing if per_edit is not None else None
    keep = keeps_shapes(dev, per_edit)
    identity = _identity(lm) if keep else None
    kept = _kept(adapter) if keep else {}
    states: dict[tuple, _State] = {}
    last_use = {chunk.shape(dev): c for c, chunk in enumerate(chunks)}
    outputs: list[GeneratedText | None] = [None] * len(prompts)
    for c, chunk in enumerate(chunks):
        shape = chunk.shape(dev)
        state_key = (identity, n, adapter.pad_token_id, tuple(adapter.stop_token_ids), shape)
        state = states.get(state_key) or kept.get(state_key)
        if state is None:
            if kept:
                _make_room(adapter, kept, _state_bytes(adapter, shape) + prefill_bytes(adapter, _longest(chunk)),
                           set(states))
            state = _State(lm, shape, n, adapter.pad_token_id, stop_ids)
        elif state_key not in states:
            STATS["reused"] += 1
        states[state_key] = state
        places = state.begin(chunk)
        _prefill(adapter, state, chunk, places, tails, tail_audios, per_edit, part_tokens)
        state.end_prefill()
        rows = chunk.rows  # in buffer row order
        if per_edit is not None:
            edits = per_edit.row_edits(rows)
            state.row_edit.copy_(to_device(torch.tensor(edits + [edits[-1]] * (state.rows - len(edits))), dev))
        if routing is not None:
            routing.row_edit = state.row_edit
        try:
            done = state.decode()
        finally:
            if routing is not None:
                routing.row_edit = None
        texts = decode_new_tokens(adapter, state.out[:len(rows), :done + 1], n)
        for row, text in zip(rows, texts):
            outputs[row] = text
        STATS["chunks"] += 1
        STATS["rows"] += state.rows
        STATS["real_rows"] += len(rows)
        if last_use[shape] == c:  # this call is done with the shape: kept within the budget, or freed
            del states[state_key]
            if keep and state.nbytes() <= _keep_budget(dev):
                _keep(adapter, state_key, state, dev)
            else:
                kept.pop(state_key, None)
            del state
    missing = [i for i, o in enumerate(outputs) if o is None]
    if missing:  # a planning bug, never silently an empty answer
        raise RuntimeError(f"graph engine: no output for prompts {missing[:5]}")
    return outputs  # type: ignore[return-value]


def _pieces(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]],
            per_edit: PerEdit | None, settings: GenerationSettings
            ) -> tuple[list[_Piece], list[list[int]], list[list[Any]]]:
    """The pieces of a call, and each prompt's tail (token ids, audios) after its piece's prefix. Prompts with the
    same prefix (same tokens, same audio, same edit in a per-edit pass) form a group; a group's rows share pieces of
    :func:`rows_per_lane` rows (rows of similar tail length together), and a row that shares with none keeps its
    whole prompt as its tail."""
    n = settings.max_new_tokens
    groups = _prefix_groups(adapter, prompts, token_ids, per_edit)
    budget = settings.max_batch_tokens or 1 << 62
    tails: list[list[int]] = [[] for _ in prompts]
    tail_audios: list[list[Any]] = [[] for _ in prompts]
    pieces = []
    for members in groups:
        first, split, n_audio = members[0]
        prefix = list(token_ids[first][:split])
        mean_tail = sum(len(token_ids[i]) - split for i, _, _ in members) / len(members)
        per_piece = rows_per_lane(len(prefix), mean_tail, len(members))
        while per_piece > 1 and len(prefix) + per_piece * (mean_tail + n) > budget:
            per_piece //= 2  # one piece must fit a chunk
        if per_piece == 1:
            for i, _, _ in members:
                tails[i], tail_audios[i] = list(token_ids[i]), prompts[i].audios()
                pieces.append(_Piece([], [], [i], [len(tails[i])]))
            continue
        audios = prompts[first].audios()[:n_audio]
        for i, _, _ in members:
            tails[i], tail_audios[i] = list(token_ids[i][split:]), prompts[i].audios()[n_audio:]
        ordered = sorted((i for i, _, _ in members), key=lambda i: len(tails[i]))
        for start in range(0, len(ordered), per_piece):
            rows = ordered[start:start + per_piece]
            pieces.append(_Piece(prefix, audios, rows, [len(tails[i]) for i in rows]))
    return pieces, tails, tail_audios


def _prefix_groups(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]],
                   per_edit: PerEdit | None) -> list[list[tuple[int, int, int]]]:
    """Prompts grouped by a shared prefix: ``(prompt index, prefix tokens, prefix audios)`` of each member. First by
    :func:`prefix_split` (system prompt + history; same edit in a per-edit pass); then the rows of a group that ask
    about the same clip (SAKE's reliability, type-1 generality and portability items carry the edit's audio) form
    a group of their own through that clip (``own_audio``) where what they save, ``(rows - 1) x`` the clip's tokens,
    outweighs holding and prefilling the group's shorter prefix once more (IE-IKE's demonstrations stay one
    group)."""
    memo: dict = {}
    short: dict[tuple, list[tuple[int, int, int]]] = {}
    clips: dict[tuple, dict[str, list[int]]] = {}  # per group: the rows asking about each clip
    for i, (prompt, ids) in enumerate(zip(prompts, token_ids)):
        split, n_audio = prefix_split(adapter, prompt, ids, memo)
        key = (per_edit.edit_of[i] if per_edit is not None else None, tuple(ids[:split]),
               tuple(audio_digest(a) for a in prompt.audios()[:n_audio]))
        short.setdefault(key, []).append((i, split, n_audio))
        if SHARE_CLIPS and prompt.audio is not None:
            clips.setdefault(key, {}).setdefault(audio_digest(prompt.audio), []).append(i)
    out = []
    for key, members in short.items():
        prefix, n_audio = members[0][1], members[0][2]
        taken: set[int] = set()
        for rows in clips.get(key, {}).values():
            # at most (rows - 1) x the rest of the prompt is saved: render the clip's split only where that could pay
            if len(rows) < 2 or (len(rows) - 1) * (len(token_ids[rows[0]]) - prefix) <= prefix:
                continue
            subgroups: dict[int, list[tuple[int, int, int]]] = {}
            for i in rows:
                split, n_long = prefix_split(adapter, prompts[i], token_ids[i], memo, own_audio=True)
                if n_long > n_audio:
                    subgroups.setdefault(split, []).append((i, split, n_long))
            for split, sub in subgroups.items():
                if len(sub) > 1 and (len(sub) - 1) * (split - prefix) > prefix:
                    out.append(sub)
                    taken.update(i for i, _, _ in sub)
        rest = [m for m in members if m[0] not in taken]
        if rest:
            out.append(rest)
    return out


def _prefill(adapter: "LALMAdapter", state: _State, chunk: _Chunk, places: dict[int, _Place],
             tails: list[list[int]], tail_audios: list[list[Any]], per_edit: PerEdit | None, part_tokens: int) -> None:
    """Prefill a chunk into ``state``: the pieces' prefixes once each, then every row's tail, rows batched by their
    own tail width (no compute spent on another row's padding), in parts of at most ``part_tokens`` tokens."""
    dev = state.lm.device
    shared = [p for p in chunk.pieces if p.prefix]
    if shared:
        width = _bucket(max(len(p.prefix) for p in shared), dev)
        for part, _ in _parts(range(len(shared)), [1] * len(shared), max(1, part_tokens // width)):
            members = [shared[j] for j in part]
            firsts = [p.rows[0] for p in members]  # a row of each piece stands for its edit
            batch = left_pad(adapter._collate([p.prefix for p in members], [a for p in members for a in p.audios]),
                             width, adapter.pad_token_id)
            if per_edit is not None:
                per_edit.before_chunk(firsts)
                embeds = per_edit.embeds(adapter, batch, firsts, [len(p.audios) for p in members])
            else:
                embeds = adapter.input_embeds(batch)
            spans = [(j, places[f].lane, places[f].prefix_start, len(p.prefix))
                     for j, (f, p) in enumerate(zip(firsts, members))]
            state.prefill_prefixes(embeds, batch.attention_mask.bool(), batch.position_ids,
                                   _Writes.of(spans, width, dev))
            STATS["prefix_groups"] += len(members)
            STATS["prefix_tokens"] += sum(len(p.prefix) for p in members)
    # every row at its own tail's width (rows of one width prefilled together, whatever their piece): the attention
    # gathers each row's prefix from its lane, so a forward's launches do not grow with the pieces it holds
    by_width: dict[int, list[int]] = {}
    for piece in chunk.pieces:
        for row in piece.rows:
            by_width.setdefault(_bucket(len(tails[row]), dev), []).append(row)
    for width in sorted(by_width):
        rows = by_width[width]
        step = max(1, part_tokens // width)
        for start in range(0, len(rows), step):
            _prefill_rows(adapter, state, rows[start:start + step], width, tails, tail_audios, per_edit, places)


def _prefill_rows(adapter: "LALMAdapter", state: _State, rows: list[int], width: int, tails: list[list[int]],
                  tail_audios: list[list[Any]], per_edit: PerEdit | None, places: dict[int, _Place]) -> None:
    """One prefill forward: ``rows`` left-padded to ``width``, each attending over its piece's prefix."""
    dev = state.lm.device
    batch = left_pad(adapter._collate([tails[i] for i in rows], [a for i in rows for a in tail_audios[i]]),
                     width, adapter.pad_token_id)
    if per_edit is not None:
        per_edit.before_chunk(rows)
        embeds = per_edit.embeds(adapter, batch, rows, [len(tail_audios[i]) for i in rows])
    else:
        embeds = adapter.input_embeds(batch)
    writes = _Writes.of([(j, places[i].lane, places[i].tail_start, len(tails[i])) for j, i in enumerate(rows)],
                        width, dev)
    offsets = to_device(torch.tensor([places[i].prefix for i in rows]), dev)
    buffer_rows = to_device(torch.tensor([places[i].row for i in rows]), dev)
    prefixes = [(places[i].lane, places[i].prefix_start, places[i].prefix) for i in rows]
    state.prefill(embeds, batch.attention_mask.bool(), batch.position_ids + offsets[:, None], prefixes, writes,
                  buffer_rows)
