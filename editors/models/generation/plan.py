"""Which prompts share a chunk: canonical shapes (``editors.models.buckets``) within the settings' batching limits.

A chunk is ``(rows, width)``: the prompt indices of its rows (filled up to :func:`~editors.models.buckets.row_bucket`
with copies of its last prompt, whose outputs are dropped) and the width bucket its prompts are left-padded to.
Rows of different width buckets never share a chunk, so a row's output depends on the row alone.
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
    for width, indices in group_by_width(token_lengths, device):
        for rows in chunk_rows(indices, width + max_new_tokens, batch_size=batch_size,
                               max_batch_tokens=max_batch_tokens):
            chunks.append(Chunk(rows=rows + [rows[-1]] * (row_bucket(len(rows)) - len(rows)), width=width,
                                real=len(rows)))
    return chunks
