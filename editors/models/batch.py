"""Tensors handed between the adapter and the editing methods: a tokenized :class:`PromptBatch` (left-padded rows,
or one row of :class:`PackedSequences`), the :class:`LayerState` entering an LLM layer, and :func:`batch_spans`
(chunking sequences under row/token limits); copies between host and device that do not wait (:func:`to_device`,
:class:`StopFlags`) and the side stream of the eager steps before a CUDA graph capture (:func:`side_stream`)."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

#: Label value ignored by the cross-entropy (positions that are not target tokens).
IGNORE_INDEX = -100


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host ``tensor`` on ``device`` (then cast to ``dtype``). To a CUDA device the copy goes through pinned memory
    and does not block: a copy from pageable memory makes the host wait until the device has run everything queued
    before it, and the device then idles while the host prepares the next work. Refused while a CUDA graph is
    being captured (the capture then fails and its caller runs eagerly). Elsewhere: ``Tensor.to``."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if torch.cuda.is_current_stream_capturing():  # a replay would read the pinned buffer as it is then
            raise RuntimeError("to_device during a CUDA graph capture: copy host data to the device before it")
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)


@contextlib.contextmanager
def side_stream(device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block on a fresh CUDA stream that waits for the current one and is waited for after: PyTorch's advice
    for the eager steps before a CUDA graph capture (lazily made library state then exists off the capture's
    stream)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)


class StopFlags:
    """A device loop's "stop now?" booleans read back without waiting: :meth:`push` copies a one-element flag to
    the host (pinned memory and an event on CUDA; elsewhere at once), :meth:`seen` says whether a copy that has
    already arrived says stop. The loop stops a step or so after it could have, and never waits for the device."""

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, Any]] = []  # (host copy, the event that says it arrived)

    def push(self, flag: torch.Tensor) -> None:
        if flag.device.type != "cuda":
            self._pending.append((flag.reshape(1).clone(), None))
            return
        host = torch.empty(1, dtype=flag.dtype, pin_memory=True)
        host.copy_(flag.reshape(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host, event))

    def seen(self) -> bool:
        while self._pending and self.arrived(self._pending[0][1]):
            if bool(self._pending.pop(0)[0][0]):
                return True
        return False

    @staticmethod
    def arrived(event: Any) -> bool:
        return event is None or bool(event.query())


def continued_rows(segments: torch.Tensor) -> list[bool]:
    """For each row of ``segments`` (``[R, W]``, sequence numbers, -1 on padding) but the last: whether the sequence
    that ends it goes on at the start of the next row (the same number, not padding)."""
    ends, starts = segments[:-1, -1], segments[1:, 0]
    return ((ends == starts) & (ends >= 0)).tolist()


@dataclass(frozen=True)
class PackedSequences:
    """Several sequences back to back in one row (a packed :class:`PromptBatch`), or in the rows of a batch read one
    after another (:meth:`over_rows`): each attends causally within itself only. ``starts`` the device's int32
    offsets of the sequences in the stream and its length at the end (``[S + 1]``, the cumulative lengths
    variable-length attention takes), ``lengths`` the same on the host.

    With a ``shared_prefix`` of P columns (:meth:`of`), the first sequence (``lengths[0] == P``) is a prefix that
    every later sequence also attends to, as if each later sequence were that prefix and then its own columns (the
    prompts' common chat-template tokens, computed once instead of once per prompt). Variable-length attention then
    reads a stream where each later sequence is preceded by a copy of the prefix's keys and values
    (``editors.models.fused_layer.prefix_stream``; ``stream_starts`` the offsets of its sequences, each with its copy,
    ``prefix_in_stream`` the stream positions of every copy's columns; the prefix's own outputs come from its first
    copy)."""

    starts: torch.Tensor
    lengths: tuple[int, ...]
    shared_prefix: int = 0
    stream_starts: torch.Tensor | None = None
    prefix_in_stream: torch.Tensor | None = None

    @classmethod
    def of(cls, lengths: Sequence[int], device: torch.device | str, shared_prefix: int = 0) -> "PackedSequences":
        """The sequences of ``lengths`` (host numbers, each > 0) back to back, their offsets on ``device``; with
        ``shared_prefix`` (``lengths[0]``, at least two sequences) the first is a prefix of every later one."""
        if not lengths or min(lengths) < 1:
            raise ValueError(f"packed sequences need lengths >= 1, got {list(lengths)[:8]}")
        lengths = tuple(int(n) for n in lengths)
        device = torch.device(device)
        ends = torch.tensor(lengths).cumsum(0)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), ends])
        if not shared_prefix:
            return cls(starts=to_device(starts.to(torch.int32), device), lengths=lengths)
        if shared_prefix != lengths[0] or len(lengths) < 2:
            raise ValueError(f"a shared prefix of {shared_prefix} columns needs it as the first of at least two "
                             f"sequences; lengths {list(lengths)[:8]}")
        sizes = torch.tensor([shared_prefix + n for n in lengths[1:]])
        stream_starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        prefix_in_stream = (stream_starts[:-1, None] + torch.arange(shared_prefix)).reshape(-1)
        return cls(starts=to_device(starts.to(torch.int32), device), lengths=lengths, shared_prefix=shared_prefix,
                   stream_starts=to_device(stream_starts.to(torch.int32), device),
                   prefix_in_stream=to_device(prefix_in_stream, device))

    @classmethod
    def over_rows(cls, segments: torch.Tensor, device: torch.device | str) -> "PackedSequences":
        """The sequences of rows ``segments`` (host ``[R, W]``: each column's sequence number, -1 on padding), rows
        read one after another: each run of like columns one sequence (a row's padding too, which then attends
        within itself: its outputs are nobody's input). A sequence that ends a row goes on at the start of the next
        row where that row begins with its number (:func:`continued_rows`); elsewhere a row's end ends it. A
        sequence number that comes back within a row after another's columns is an error (a sequence must be
        contiguous)."""
        segments = segments.cpu()
        lengths: list[int] = []
        goes_on = continued_rows(segments)
        for r, row in enumerate(segments):
            cuts = [0, *((row[1:] != row[:-1]).nonzero().squeeze(1) + 1).tolist(), int(row.numel())]
            numbers = [int(row[c]) for c in cuts[:-1]]
            if len({n for n in numbers if n >= 0}) != sum(n >= 0 for n in numbers):
                raise ValueError(f"row {r}: a sequence's columns are not contiguous ({numbers})")
            runs = [b - a for a, b in zip(cuts, cuts[1:])]
            if r > 0 and goes_on[r - 1]:  # the previous row's last sequence goes on here
                lengths[-1] += runs.pop(0)
            lengths += runs
        return cls.of(lengths, device)

    @functools.cached_property
    def total(self) -> int:
        return sum(self.lengths)

    @functools.cached_property
    def stream_pieces(self) -> tuple[int, ...]:
        """With a shared prefix: the stream's pieces in order, the prefix's copy and then its sequence for each
        later sequence (what the stream splits into)."""
        return tuple(n for length in self.lengths[1:] for n in (self.shared_prefix, length))

    @functools.cached_property
    def longest(self) -> int:
        """The longest sequence of the stream variable-length attention reads (a shared prefix counted in each)."""
        return max(self.lengths[1:]) + self.shared_prefix if self.shared_prefix else max(self.lengths)

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def prompts(self) -> int:
        """The sequences that are prompts of their own (a shared prefix is not one)."""
        return self.count - (1 if self.shared_prefix else 0)

    def dense_mask(self) -> torch.Tensor:
        """The boolean attention mask ``[1, 1, N, N]`` of the packed row: column j visible to query i when both are in
        one sequence, or j in a shared prefix, and j <= i (for attention without variable-length kernels, e.g. on the
        CPU; built once, every layer reads it)."""
        return self._dense_mask

    @functools.cached_property
    def _dense_mask(self) -> torch.Tensor:
        device = self.starts.device
        segment = torch.repeat_interleave(torch.arange(self.count, device=device),
                                          torch.tensor(self.lengths, device=device))
        columns = torch.arange(segment.numel(), device=device)
        seen = segment[:, None] == segment[None, :]
        if self.shared_prefix:  # the prefix's columns seen by every column after them
            seen = seen | (segment[None, :] == 0)
        mask = seen & (columns[:, None] >= columns[None, :])
        return mask[None, None]


@dataclass
class PromptBatch:
    """A tokenized, left-padded batch ready for the LLM (built once, reused across optimisation steps).

    ``audio_states`` holds the frozen encoder output of every audio of the batch, in the order their placeholder
    tokens appear (row-major); :meth:`LALMAdapter.input_embeds` projects them through the (possibly trained)
    connector and scatters them into the placeholder positions.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 0 on left padding
    position_ids: torch.Tensor  # [B, T] long
    audio_token_mask: torch.Tensor  # [B, T] bool, True at audio placeholder tokens
    audio_states: list[Any]  # one entry per audio, family-specific (a tensor for Whisper-style encoders)
    n_audio_slots: int = 0  # number of placeholder tokens (known on the host: no device sync needed)
    # The placeholders' flat indices (row * width + column, row-major: the order of ``audio_states``' outputs),
    # found on the host when the batch is built: scattering the connector outputs there, and the backward that
    # gathers their gradients, need no device sync (a boolean mask's backward is a ``masked_select``, which syncs).
    audio_positions: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [B, T] long, IGNORE_INDEX except on target tokens
    # Positions that predict a target token (precomputed so the loss needs no host sync): row, column, token id.
    target_rows: torch.Tensor | None = None
    target_cols: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    target_counts: torch.Tensor | None = None  # [items] number of target tokens per prompt
    # A packed batch (``LALMAdapter.prepare(..., packed=True)``): one row holding every prompt back to back, without
    # padding; ``target_items`` then says which prompt each target position belongs to (otherwise its row).
    sequences: PackedSequences | None = None
    target_items: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def items(self) -> int:
        """The number of prompts of the batch (its rows, or the sequences of a packed row)."""
        return self.batch_size if self.sequences is None else self.sequences.prompts


@dataclass
class LayerState:
    """Hidden states entering LLM layer ``layer`` plus what is needed to run the model from there."""

    layer: int
    hidden: torch.Tensor  # [B, T, H]
    masks: dict[str, Any]  # attention-mask mapping by layer type ("full_attention", "sliding_attention")
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    batch: PromptBatch
    extra: dict[str, Any] = field(default_factory=dict)
    #: A tail state (``LALMAdapter.tail_state``): the first column of the whole batch that ``hidden`` holds, and
    #: each layer's keys and values of the columns before it (they attend there and never change).
    first_column: int = 0
    frozen: FrozenColumns | None = None


class FrozenColumns:
    """Keys and values, per LLM layer, of the columns before a tail state's own, handed to the layers as their
    cache: while :attr:`recording` (one pass over the whole width, no grad) each layer's keys and values of columns
    ``< first`` are kept; afterwards each layer attends over them followed by its own columns' and stores
    nothing."""

    def __init__(self, first: int) -> None:
        self.first = first
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a layer attends over (the ``Cache.update`` contract of transformers)."""
        if self.recording:
            self.keys[layer_idx] = key_states[:, :, :self.first].contiguous()
            self.values[layer_idx] = value_states[:, :, :self.first].contiguous()
            return key_states, value_states
        return (torch.cat([self.keys[layer_idx], key_states], dim=2),
                torch.cat([self.values[layer_idx], value_states], dim=2))


def batch_spans(lengths: Sequence[int], batch_size: int | None = None, max_batch_tokens: int | None = None
                ) -> list[tuple[int, int]]:
    """Consecutive [start, stop) chunks of sequences with at most ``batch_size`` rows and at most
    ``max_batch_tokens`` padded tokens (rows x longest); a single longer sequence still gets its own chunk."""
    spans: list[tuple[int, int]] = []
    start, longest = 0, 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        full = batch_size is not None and i - start >= batch_size
        too_big = max_batch_tokens is not None and grown * (i - start + 1) > max_batch_tokens
        if i > start and (full or too_big):
            spans.append((start, i))
            start, grown = i, n
        longest = grown
    if lengths:
        spans.append((start, len(lengths)))
    return spans
