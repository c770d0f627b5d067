"""Which prompts share a chunk: canonical shapes (``editors.models.buckets``) within the settings' batching limits.

A chunk is ``(rows, width)``: the prompt indices of its rows (filled up to :func:`~editors.models.buckets.row_bucket`
with copies of its last prompt, whose outputs are dropped) and the width bucket its prompts are left-padded to.
Rows of different width buckets never share a chunk, so a row's output depends on the row alone. On CPU a chunk is
always filled to its row bucket (at least ``MIN_ROWS``: the bits of a row do not depend on the batch); elsewhere the
filling stops at ``max_batch_tokens``, whose copies would be computed like real rows (the eager engine runs them
through ``generate``), so a budget below ``MIN_ROWS`` rows of a long prompt holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from editors.models.buckets import chunk_rows, group_by_width, row_bucket


@dataclass(frozen=True)
class Chunk:
    rows: list[int]  # prompt indices, dummy rows (repeats of the last real one) included
    width: int  # padded prompt width
    real: int  # real rows (the first ``real`` of ``rows``)


def plan_chunks(token_lengths: Sequence[int], device: torch.device | str, max_new_tokens: int, *,
                batch_size: int | None = None, max_batch_tokens: int | None = None) -> list[Chunk]:
    """Canonical chunks of prompts of ``token_lengths`` tokens, in order of first appearance of their width."""
    chunks = []
    budgeted = bool(max_batch_tokens) and torch.device(device).type != "cpu"
    for width, indices in group_by_width(token_lengths, device):
        for rows in chunk_rows(indices, width + max_new_tokens, batch_size=batch_size,
                               max_batch_tokens=max_batch_tokens):
            filled = row_bucket(len(rows))
            if budgeted:
                filled = max(len(rows), min(filled, int(max_batch_tokens or 0) // (width + max_new_tokens)))
            chunks.append(Chunk(rows=rows + [rows[-1]] * (filled - len(rows)), width=width, real=len(rows)))
    return chunks
