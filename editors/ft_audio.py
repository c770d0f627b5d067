"""FT (Audio): fine-tune the modality connector only (paper §4.1, Table 6: lr Qwen 1e-4, AF3 5e-4, DeSTA 1e-4;
Adam, at most 15 steps, early stop when the target loss < 1e-2).

The audio encoder is frozen, so its output for the edit audio is computed once (``adapter.prepare`` fetches it
from the adapter's audio-state cache), and so are the attention masks and rotary embeddings; each step runs only
connector -> LLM (``../shared/perf/h100-figures.md``:
2.41 s -> 1.45 s at 7B). Text-only inputs never pass through the connector, so their outputs cannot change.
"""

from __future__ import annotations

from typing import Any

from editors.base import EditRequest, Editor, finetune, register


@register("ft_audio")
class FTAudio(Editor):
    """Fine-tune ``adapter.connector()`` on the edit's reliability prompt -> target answer."""

    def touched_parameters(self) -> list[str]:
        return self.adapter.parameter_names(self.adapter.connector())

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        if edit.audio is None:
            raise ValueError(f"{edit.instance_id}: FT (Audio) needs an edit audio")
        batch = self.adapter.prepare([edit.prompt()], [edit.target])  # encoder states: computed once, cached
        frame = self.adapter.hidden_entering(batch, 0)  # attention masks + rotary embeddings, once per edit
        names = set(self.touched_parameters())
        params = {n: p for n, p in self.adapter.model.named_parameters() if n in names}

        def loss():  # connector -> all LLM layers; the encoder output is reused
            return self.adapter.loss_from(frame, hidden=self.adapter.input_embeds(batch))

        result = finetune(params, loss, lr=float(self.hparams["lr"]),
                          max_steps=int(self.hparams["max_steps"]),
                          early_stop_loss=self.hparams.get("early_stop_loss"),
                          optimizer=self.hparams.get("optimizer", "adam"),
                          weight_decay=float(self.hparams.get("weight_decay", 0.0)))
        return {"steps": result.steps, "loss": result.loss}
