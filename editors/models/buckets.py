"""Canonical batch shapes: why a row's output does not depend on the other rows of its batch (issue 18).

Floating-point results depend on the shapes a kernel sees, not only on the values of one row: an attention row
sums over a different number of (masked) keys when the batch is padded to a longer neighbour, and a matrix product
with few rows takes another kernel path than one with many (on CPU, fp32: fewer than ~12 rows; measured). Greedy
decoding turns such last-bit differences into different tokens at near ties, and fine-tuning with Adam amplifies
them (an update is ``m / sqrt(v)``: a gradient element near zero flips sign). So every batch the runner builds is
given a shape that depends on each row alone:

* width: a row is left-padded to :func:`width_bucket` of its own length, and rows of different buckets never
  share a batch (:func:`group_by_width`); positions come from the attention mask, so padding changes nothing else;
* rows: a batch has at least :data:`MIN_ROWS` rows (dummy rows, results dropped), and so does every matrix
  product over a few rows (:func:`padded_rows`: the target-token LM head, a routed per-edit leaf during decoding);
* audio: the frozen encoder runs on one clip at a time (``LALMAdapter.audio_states``).

With these rules a row computes the same function of its own inputs whether it ran with K=1 or K=8 edits per pass,
with a cold or a warm pre-edit cache, or after a resume (tests/test_invariance.py, CPU fp32, byte-identical rows).
On a GPU the matrix kernels still choose by the whole shape, so the bench reports the share of identical rows; there
training whose steps run only a short tail of columns also puts all its rows in one batch (:data:`TAIL_ONE_BATCH`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from editors.models.batch import PromptBatch

if TYPE_CHECKING:  # pragma: no cover
    from editors.models.adapter import LALMAdapter

#: Fewest rows of a matrix product (and of a generation batch); fewer take another CPU kernel path.
MIN_ROWS = 16
#: Width granularity of padded generation prompts (tokens): CPU (tiny models) and CUDA (few compiled decode shapes).
WIDTH_STEP = {"cpu": 32, "cuda": 256}
#: Width granularity of training batches (tokens): CPU as generation; on CUDA 256. Every padded column is computed
#: forward and backward at every step, but each width is a batch of its own: at 32 on the H200, UnKE's stage 2
#: (one run of rows per edit and width, each writing a whole weight gradient of its layer copy) and FT-Audio's
#: launch-bound steps were slower than at 256 (UnKE 2.39 against 2.13 s/edit, FT-Audio 1.09 against 1.00; same
#: call, bench/NOTES.md).
TRAINING_WIDTH_STEP = {"cpu": 32, "cuda": 256}
#: Training whose steps run only a short tail of columns (``tail_only``: UnKE's stage 1, ~20 columns from the last
#: prompt token): on CUDA all rows in one batch at the widest row's width, since each batch is a forward and backward
#: of its own through the layers above and such steps are launch-bound (UnKE's stage 1 ran at 23 % GPU busy in two
#: or three width groups, bench/NOTES.md), while the padding costs only the one no-grad pass over the whole width. On
#: CPU the width groups (a row's bits then do not depend on the other rows).
TAIL_ONE_BATCH = {"cpu": False, "cuda": True}
#: Training of one LLM layer on fixed inputs (UnKE's stage 2: an edit's prompt and its 25 preservation prompts):
#: on CUDA each edit's sequences are laid back to back, running on from row to row, in rows of the training width
#: (``editors.batching.packed_layer_rows``; only an edit's last row ends in padding), since at the training width of
#: 256 the ~135-token text prompts are half padding and every width group is a run of rows with a weight gradient of
#: its own. On CPU one sequence per row (a row's bits then do not depend on the other rows).
PACK_TRAINING = {"cpu": False, "cuda": True}
#: Training through every LLM layer on rows of many lengths (FT-Audio's steps: rows of ~160-440 tokens): on CUDA the
#: rows are packed back to back into one row without padding (``LALMAdapter.prepare(..., packed=True)``; the
#: prompts' common chat-template tokens once, a prefix every prompt attends to), each attending within itself
#: through the variable-length flash kernel, where the adapter runs every layer through
#: ``editors.models.fused_layer`` (``LALMAdapter.packs_sequences``); at the training width of 256 the rows were
#: ~1.4x padding, computed forward and backward at every step. UnKE's packed stage-2 rows (:data:`PACK_TRAINING`)
#: then attend through the same kernel, each row's sequences read as one stream (``PackedSequences.over_rows``)
#: instead of under a boolean mask. On CPU the width groups (a row's bits then do not depend on the other rows).
PACK_SEQUENCES = {"cpu": False, "cuda": True}
IGNORE_INDEX = -100


def width_bucket(length: int, device: torch.device | str, step: int | None = None) -> int:
    """The padded width of a prompt of ``length`` tokens (``step``: the granularity; default the generation
    step of ``device``, :data:`WIDTH_STEP`)."""
    if step is None:
        step = WIDTH_STEP.get(torch.device(device).type, WIDTH_STEP["cpu"])
    return max(step, -(-int(length) // step) * step)


def row_bucket(rows: int) -> int:
    """Rows of a generation batch holding ``rows`` real rows: a power of two, at least :data:`MIN_ROWS` (few
    distinct shapes: each one is a compiled decode step on CUDA)."""
    n = MIN_ROWS
    while n < rows:
        n *= 2
    return n


def floor_pow2(n: int) -> int:
    """The largest power of two <= ``n`` (1 for ``n`` <= 1)."""
    return 1 << max(0, int(n).bit_length() - 1)


def group_by_width(lengths: Sequence[int], device: torch.device | str, step: int | None = None
                   ) -> list[tuple[int, list[int]]]:
    """``(width, indices)`` per width bucket (:func:`width_bucket`), buckets in order of first appearance, indices
    in input order."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(width_bucket(n, device, step), []).append(i)
    return list(groups.items())


def training_width_step(device: torch.device | str) -> int:
    """The width step of training batches on ``device`` (:data:`TRAINING_WIDTH_STEP`)."""
    return TRAINING_WIDTH_STEP.get(torch.device(device).type, TRAINING_WIDTH_STEP["cpu"])


def tail_start(first: int, width: int, device: torch.device | str) -> int:
    """Where a tail state (``LALMAdapter.tail_state``) of a ``width``-column batch whose columns ``first``.. may
    change starts: at least :data:`MIN_ROWS` columns before the end. On the CPU also where the whole width's
    attention would start a block of queries, in a tail long enough to be split into blocks of the same size (torch's
    CPU attention: 32 queries per block below 192, 64 below 768, else 256). The backward of attention adds up the
    blocks' contributions to each key; cut elsewhere, it adds them in another grouping and the gradient differs in its
    last bits. On CUDA the kernels choose by shape anyway, so the tail starts at ``first``."""
    first = max(0, min(int(first), width - MIN_ROWS))
    if torch.device(device).type == "cuda":
        return first
    for block, shortest in ((256, 768), (64, 192), (32, 0)):
        if width >= shortest:
            return max(0, min(first, width - shortest) // block * block)
    return first


def chunk_rows(indices: Sequence[int], width: int, *, batch_size: int | None = None,
               max_batch_tokens: int | None = None) -> list[list[int]]:
    """Consecutive chunks of ``indices`` (one width bucket) of at most ``batch_size`` rows and at most
    ``max_batch_tokens`` padded tokens: :func:`row_bucket` rows (dummy rows included) x ``width``, except that a
    chunk always holds one row (and on CPU is filled to :data:`MIN_ROWS` rows, ``generation.plan.plan_chunks``)."""
    cap = len(indices) or 1
    if batch_size:
        cap = min(cap, batch_size)
    if max_batch_tokens:
        fit = max_batch_tokens // max(1, width)  # rows of the chunk's padded batch
        if fit >= MIN_ROWS:  # real rows whose row bucket stays within the budget: a power of two
            fit = floor_pow2(fit)
        cap = max(1, min(cap, fit))
    return [list(indices[i:i + cap]) for i in range(0, len(indices), cap)]


def left_pad(batch: PromptBatch, width: int, pad_id: int) -> PromptBatch:
    """A :class:`~editors.models.base.PromptBatch` left-padded to ``width`` columns (no-op when already there)."""
    extra = width - batch.input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"batch is {batch.input_ids.shape[1]} tokens wide, more than the bucket {width}")
    if extra == 0:
        return batch

    def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:
        return torch.cat([torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device), t], dim=1)

    positions = batch.audio_positions
    if positions is not None:  # row * width + column -> row * (width + extra) + column + extra
        positions = positions + (positions // batch.input_ids.shape[1] + 1) * extra
    return replace(batch, input_ids=pad(batch.input_ids, pad_id), attention_mask=pad(batch.attention_mask, 0),
                   position_ids=pad(batch.position_ids, 0), audio_token_mask=pad(batch.audio_token_mask, False),
                   audio_positions=positions, labels=None if batch.labels is None else pad(batch.labels, IGNORE_INDEX),
                   target_cols=None if batch.target_cols is None else batch.target_cols + extra)


def canonical(adapter: LALMAdapter, batch: PromptBatch) -> PromptBatch:
    """``batch`` (one prompt, or prompts of one width bucket) left-padded to its width bucket."""
    return left_pad(batch, width_bucket(batch.input_ids.shape[1], batch.input_ids.device), adapter.pad_token_id)


def padded_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` (a Linear, the LM head) computed over at least :data:`MIN_ROWS` rows of the
    flattened input (zero rows appended, their results dropped), so that a few rows take the same kernel path as
    many."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n >= MIN_ROWS:
        return fn(x)
    out = fn(to_min_rows(rows))[:n]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def to_min_rows(rows: torch.Tensor) -> torch.Tensor:
    """2-D ``rows`` with zero rows appended up to :data:`MIN_ROWS` (the padding of :func:`padded_rows`)."""
    return torch.cat([rows, rows.new_zeros(MIN_ROWS - rows.shape[0], rows.shape[1])], dim=0)


def training_groups(adapter: LALMAdapter, prompts: Sequence, targets: Sequence[str] | None, *, tail_only: bool = False,
                    packable: bool = False) -> list[tuple[list[int], PromptBatch]]:
    """Teacher-forcing batches of ``prompts`` -> ``targets`` (or the prompts alone: ``targets`` None) in canonical
    shapes: ``(indices, batch)`` per width bucket of :data:`TRAINING_WIDTH_STEP`, each batch left-padded to its
    bucket. One edit alone gets the batch its row gets among K edits. ``tail_only`` (the caller's steps run only a
    tail of columns): one batch at the widest bucket where :data:`TAIL_ONE_BATCH` says so for the device.
    ``packable`` (the caller runs the batches through every layer from the embeddings, with no tail state): one
    packed batch of every prompt where the adapter packs sequences (:data:`PACK_SEQUENCES`)."""
    adapter.warm_audio([a for p in prompts for a in p.audios()])
    token_ids = [adapter.prompt_token_ids(p) for p in prompts]
    if packable and adapter.packs_sequences():
        return [(list(range(len(prompts))), adapter.prepare(prompts, targets, token_ids=token_ids, packed=True))]
    lengths = [len(t) + (len(adapter.target_token_ids(targets[i])) if targets is not None else 0)
               for i, t in enumerate(token_ids)]
    groups = []
    grouped = group_by_width(lengths, adapter.device, training_width_step(adapter.device))
    if tail_only and TAIL_ONE_BATCH.get(torch.device(adapter.device).type, False) and len(grouped) > 1:
        grouped = [(max(width for width, _ in grouped), list(range(len(prompts))))]
    for width, indices in grouped:
        batch = adapter.prepare([prompts[i] for i in indices], None if targets is None else
                                [targets[i] for i in indices], token_ids=[token_ids[i] for i in indices])
        groups.append((indices, left_pad(batch, width, adapter.pad_token_id)))
    return groups
