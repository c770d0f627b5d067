"""The per-edit strategy: the items of K edits in one generation, each row computed under its own edit's weights
(issue 12, ``--edits-per-pass K``).

A :class:`PerEdit` says which edit each prompt belongs to and how its weights reach the model:

* ``connector_weights`` (name -> ``[K, ...]``, FT-Audio and LoRA on the connector): each prompt's audio is projected
  through its edit's connector copy (:func:`per_edit_audio_embeds`); only the prompt's embeddings change, so
  decoding needs nothing more;
* ``routing`` (FT-LLM's routed Linears and norms, LoRA's per-edit adapters): an object whose modules compute each
  batch row with its edit's weights. The engines set ``routing.runs`` (contiguous ``(edit, start, stop)`` runs of
  the chunk's rows) before every forward of a chunk; the graph engine also sets ``routing.row_edit`` (a device
  tensor ``[rows]``, the edit of each row) around its captured decode step, where the modules gather per-row
  weights instead of looping over runs, so one captured step serves every chunk and every K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from editors.models.parameters import swapped_parameters


def runs_of(edit_of_row: Sequence[int]) -> list[tuple[int, int, int]]:
    """Contiguous runs ``(edit, start, stop)`` of a row -> edit assignment."""
    runs: list[tuple[int, int, int]] = []
    for i, k in enumerate(edit_of_row):
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1], i + 1)
        else:
            runs.append((k, i, i + 1))
    return runs


def per_edit_audio_embeds(adapter: Any, states: Sequence[Any], audios_per_edit: Sequence[int],
                          weights: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
                          edits: Sequence[int] | None = None) -> torch.Tensor | None:
    """Connector outputs of ``states`` (every audio of a batch, in order), the first ``audios_per_edit[0]`` through
    edit ``edits[0]``'s connector copy (``weights``: name -> ``[K, ...]``, or the K per-edit tensors: a training
    loss passes ``unbind(0)`` views taken once per step, whose backward does not write a whole stack per edit), the
    next through ``edits[1]``'s, ... (``edits`` defaults to 0, 1, ...). None when there is no audio."""
    edits = list(range(len(audios_per_edit))) if edits is None else list(edits)
    pieces, pos = [], 0
    for k, n in zip(edits, audios_per_edit):
        if n:
            with swapped_parameters(adapter.model, {name: w[k] for name, w in weights.items()}):
                pieces.append(adapter.project_audio(list(states[pos:pos + n])))
        pos += n
    if pos != len(states):
        raise ValueError(f"{len(states)} audio states but {pos} audios counted over the edits")
    return torch.cat(pieces, dim=0) if pieces else None


@dataclass
class PerEdit:
    """K edits' prompts in one generation (see the module docstring); ``edit_of[i]`` = the edit of prompt i."""

    edit_of: list[int]
    connector_weights: dict[str, torch.Tensor] | None = None
    routing: Any = None

    @classmethod
    def of(cls, prompts_per_edit: Sequence[Sequence[Any]], **weights: Any) -> "PerEdit":
        return cls(edit_of=[k for k, ps in enumerate(prompts_per_edit) for _ in ps], **weights)

    def before_chunk(self, rows: Sequence[int]) -> None:
        """Route the chunk's rows (``rows``: prompt indices, dummy rows included) to their edits."""
        if self.routing is not None:
            self.routing.runs = runs_of([self.edit_of[i] for i in rows])

    def embeds(self, adapter: Any, batch: Any, rows: Sequence[int], audio_counts: Sequence[int]) -> torch.Tensor:
        """The chunk's ``inputs_embeds``: each row's audio through its edit's connector copy (``audio_counts``: audios
        of each row)."""
        audio_embeds = None
        if self.connector_weights is not None and batch.audio_states:
            runs = runs_of([self.edit_of[i] for i in rows])
            counts = [sum(audio_counts[a:b]) for _, a, b in runs]
            audio_embeds = per_edit_audio_embeds(adapter, batch.audio_states, counts, self.connector_weights,
                                                 [k for k, _, _ in runs])
        return adapter.input_embeds(batch, audio_embeds)

    def row_edits(self, rows: Sequence[int]) -> list[int]:
        return [self.edit_of[i] for i in rows]
