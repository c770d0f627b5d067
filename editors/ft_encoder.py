"""FT (Encoder): fine-tune the last ``n_layers`` transformer layers of the audio encoder on the edit, the audio-side
counterpart of FT (Audio) one stage lower (not in the SAKE paper; its settings follow the paper's FT rows: Adam, at
most 15 steps, early stop when the target loss < 1e-2, Table 6's FT-Audio learning rates).

Which layers: ``adapter.audio_encoder_layers()`` (Qwen2-Audio / AF3: the Whisper-style encoder's layers; DeSTA2.5:
Whisper's encoder layers up to the last one its connector taps), the last ``n_layers`` of them. Each step computes
the edit audio's encoder states with autograd (``adapter.audio_states_with_grad``: the frozen lower layers run
without building a graph), projects them through the frozen connector and runs the LLM from its input (masks and
rotary embeddings once per edit). The edit session (``editors/session.py``) clears the adapter's audio-state cache
after the edit and after the restore, since the encoder changed.

Text-only prompts never reach the audio encoder, so their outputs stay bit-identical under this method. DeSTA2.5
reads each audio's Whisper transcript as text: transcripts are always decoded with the released encoder weights
(``adapter.before_audio_encoder_edit``), so the edit changes the audio representation the connector sees, not the
transcript, and an audio's transcript does not depend on the order audios are first seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from editors.base import EditRequest, Editor, FinetuneHparams, finetune, finetune_settings
from editors.registry import register
from sake_core.errors import ConfigError, DataError


@dataclass
class FTEncoderHparams(FinetuneHparams):
    """Fine-tuning settings plus how many of the audio encoder's last layers to train."""

    bounds = {**FinetuneHparams.bounds, "n_layers": "positive"}

    n_layers: int


@register("ft_encoder")
class FTEncoder(Editor):
    """Fine-tune the last ``hparams.n_layers`` layers of ``adapter.audio_encoder_layers()``."""

    hparams_class = FTEncoderHparams
    hparams: FTEncoderHparams
    display_name = "FT (Encoder)"
    display_order = 8  # after the paper's eight methods

    def _layers(self) -> list[Any]:
        layers = self.adapter.audio_encoder_layers()
        n = self.hparams.n_layers
        if not 1 <= n <= len(layers):
            raise ConfigError(f"ft_encoder: n_layers={n}; the audio encoder has {len(layers)} layers")
        return layers[len(layers) - n:]

    def touched_parameters(self) -> list[str]:
        return [name for layer in self._layers() for name in self.adapter.parameter_names(layer)]

    def setup(self) -> None:
        self.adapter.before_audio_encoder_edit(self.touched_parameters())

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        a = self.adapter
        if edit.audio is None:
            raise DataError(f"{edit.instance_id}: FT (Encoder) needs an edit audio")
        batch = a.prepare([edit.prompt()], [edit.target])
        frame = a.hidden_entering(batch, 0)  # attention masks + rotary embeddings, once per edit
        names = set(self.touched_parameters())
        params = {n: p for n, p in a.model.named_parameters() if n in names}
        audios = edit.prompt().audios()

        def loss():  # last encoder layers (with grad) -> connector -> all LLM layers
            embeds = a.project_audio(a.audio_states_with_grad(audios))
            return a.loss_from(frame, hidden=a.input_embeds(batch, embeds))

        result = finetune(params, loss, **finetune_settings(self.hparams))
        return {"steps": result.steps, "loss": result.loss}
