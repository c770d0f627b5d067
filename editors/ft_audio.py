"""FT (Audio): fine-tune the modality connector only (paper §4.1, Table 6: lr Qwen 1e-4, AF3 5e-4, DeSTA 1e-4;
Adam, at most 15 steps, early stop when the target loss < 1e-2).

The audio encoder is frozen, so its output for the edit audio is computed once (``adapter.prepare`` fetches it
from the adapter's audio-state cache), and so are the attention masks and rotary embeddings; each step runs only
connector -> LLM (measured on an H100 at 7B:
2.41 s -> 1.45 s per step). Text-only inputs never pass through the connector, so their outputs cannot change.

On CUDA the training rows are packed back to back without padding (``editors/models/buckets.py``:
``PACK_SEQUENCES``), one edit's row as K edits', the prompts' common first tokens (the chat template's, before the
audio) once for all of them; on the CPU they keep their padded width groups.

Several edits per pass (:meth:`FTAudio.apply_many`): one fp32 connector copy per edit (``editors/batching.py``);
each edit's prompt gets its audio embeddings from its own copy, the K losses are summed (each copy gets exactly its
own gradient), early stop is per edit; evaluation is one batched generation from ``inputs_embeds`` in which each
item's audio is projected through its edit's copy. The model's connector is never changed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from editors.base import EditRequest, Editor, FinetuneHparams, finetune, finetune_settings
from editors.registry import register
from editors.batching import StackedCopies, finetune_many, per_edit_audio_embeds, per_edit_views
from editors.models.base import LayerState, PerEdit, Prompt, PromptBatch, to_device
from sake_core.errors import DataError


@register("ft_audio")
class FTAudio(Editor):
    """Fine-tune ``adapter.connector()`` on the edit's reliability prompt -> target answer."""

    batches_edits = True
    hparams_class = FinetuneHparams
    hparams: FinetuneHparams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._copies: StackedCopies | None = None

    def touched_parameters(self) -> list[str]:
        return self.adapter.parameter_names(self.adapter.connector())

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        if edit.audio is None:
            raise DataError(f"{edit.instance_id}: FT (Audio) needs an edit audio")
        # canonical shape (editors/models/buckets.py); encoder states computed once, cached
        [(_, batch)] = self.adapter.training_groups([edit.prompt()], [edit.target], packable=True)
        frame = self._frame(batch)
        names = set(self.touched_parameters())
        params = {n: p for n, p in self.adapter.model.named_parameters() if n in names}

        def loss():  # connector -> all LLM layers; the encoder output is reused
            return self.adapter.loss_from(frame, hidden=self.adapter.input_embeds(batch)[:, frame.first_column:])

        result = finetune(params, loss, **finetune_settings(self.hparams))
        return {"steps": result.steps, "loss": result.loss}

    def apply_many(self, edits: Sequence[EditRequest]) -> list[dict[str, Any]]:
        for edit in edits:
            if edit.audio is None:
                raise DataError(f"{edit.instance_id}: FT (Audio) needs an edit audio")
        prompts = [e.prompt() for e in edits]
        # one batch per width bucket: edit k's row has the shape it has when edited alone (editors/models/buckets.py)
        groups = [(rows, batch, self._frame(batch))
                  for rows, batch in self.adapter.training_groups(prompts, [e.target for e in edits], packable=True)]
        names = set(self.touched_parameters())
        copies = StackedCopies({n: p for n, p in self.adapter.model.named_parameters() if n in names}, len(edits))
        # edit order on the device once: a copy from pageable memory inside the loss would wait for the queue
        order = to_device(torch.tensor([k for rows, _, _ in groups for k in rows]).argsort(), self.adapter.device)

        def losses(weights):  # edit k's prompt through connector copy k, then all LLM layers; one loss per edit
            views = per_edit_views(weights)
            out = []
            for rows, batch, frame in groups:
                embeds = per_edit_audio_embeds(self.adapter, batch.audio_states,
                                               [len(prompts[k].audios()) for k in rows], views, rows)
                hidden = self.adapter.input_embeds(batch, embeds)[:, frame.first_column:]
                out.append(self.adapter.loss_from(frame, hidden=hidden, reduction="none"))
            return torch.cat(out)[order]

        results = finetune_many(copies, losses, **finetune_settings(self.hparams))
        self._copies = copies
        return [{"steps": r.steps, "loss": r.loss} for r in results]

    def _frame(self, batch: PromptBatch) -> LayerState:
        """What a training step starts from (once per batch): the masks and rotary embeddings, and the columns
        before the first audio computed once (the connector cannot change them; ``adapter.tail_state``)."""
        a = self.adapter
        return a.tail_state(a.hidden_entering(batch, 0), a.first_audio_column(batch))

    @contextlib.contextmanager
    def per_edit(self, prompts_per_edit: Sequence[Sequence[Prompt]]) -> Iterator[PerEdit]:
        if self._copies is None:
            raise RuntimeError("ft_audio: generate_many before apply_many")
        weights = {n: m.detach() for n, m in self._copies.current().items()}
        yield PerEdit.of(prompts_per_edit, connector_weights=weights)

    def reset(self) -> None:
        self._copies = None
