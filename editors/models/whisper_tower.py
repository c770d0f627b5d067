"""The Whisper-style audio tower of Qwen2-Audio and Audio Flamingo 3, run only as wide as a batch's clips need.

Both towers are two convolutions (the second of stride 2), learned positions, bidirectional layers with padded keys
masked, an average pool of stride 2 and a LayerNorm, and their own ``forward`` takes only the checkpoint's whole
30 s window of mel frames. Run here on a batch cut to its longest clip's frames (plus the two frames the
convolutions reach past it, rounded up to a step), each clip's valid outputs see what they see in the window: the
same mel frames (the silence past a clip is zeros either way), the same positional embeddings, and keys past the
clip masked. Only the work on the silent tail goes (a 10 s clip: a third of the window).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from editors.models.batch import to_device
from editors.models.prompts import SAMPLING_RATE
from editors.models.tiny import whisper_encoder_tokens, whisper_mel_frames


def cut_width(audios: Sequence[np.ndarray], feature_extractor: Any, step: int) -> int:
    """Mel frames a batch of ``audios`` is encoded at: the longest clip's frames plus two, rounded up to ``step``,
    at most the window (a ``step`` at least the window always runs the whole window)."""
    longest = max(whisper_mel_frames(len(a), feature_extractor) for a in audios)
    return min(int(feature_extractor.nb_max_frames), -(-(longest + 2) // step) * step)


def tower_states(tower: Any, features: torch.Tensor, mel_frames: torch.Tensor) -> torch.Tensor:
    """The tower's output for ``features`` [batch, mels, width] of any width up to the window, with each row's
    keys past its ``mel_frames`` valid frames masked: [batch, width // 4, hidden] (the tower's own ``forward``
    in its order)."""
    from transformers.masking_utils import create_bidirectional_mask

    hidden = nn.functional.gelu(tower.conv1(features))
    hidden = nn.functional.gelu(tower.conv2(hidden)).permute(0, 2, 1)
    positions = hidden.shape[1]
    hidden = hidden + tower.embed_positions.weight[:positions]
    hidden = nn.functional.dropout(hidden, p=tower.dropout, training=tower.training)
    conv_len = (mel_frames.to(hidden.device) - 1) // 2 + 1
    valid = torch.arange(positions, device=hidden.device)[None, :] < conv_len[:, None]
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=valid.long())
    for layer in tower.layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    hidden = tower.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
    return tower.layer_norm(hidden)


class CutTowerEncoding:
    """What an adapter whose audio tower runs here (Qwen2-Audio, AF3) adds: the width step, where the mel spectrogram
    is computed, and :meth:`encode_cut`. The adapter passes its tower in; it supplies ``processor`` and ``device``."""

    #: Mel frames a batch is rounded up to; a step at least the window (the tiny models' 2 s) runs the whole window.
    encoder_width_step: int = 256
    #: Where the mel spectrogram is computed: ``None`` = the model's device (``bench/encoder_width.py`` times both).
    mel_device: str | None = None

    processor: Any
    device: Any

    def encoder_width(self, clips: Sequence[np.ndarray]) -> int:
        """Mel frames a batch of ``clips`` is encoded at (:func:`cut_width`)."""
        return cut_width(clips, self.processor.feature_extractor, self.encoder_width_step)

    def encode_cut(self, tower: Any, clips: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each clip's valid states of ``tower`` (at most one window per clip), the batch cut to
        :meth:`encoder_width`: those of the tower's own forward over the whole window."""
        fe = self.processor.feature_extractor
        feats = fe(list(clips), sampling_rate=SAMPLING_RATE, return_attention_mask=True, padding="max_length",
                   max_length=self.encoder_width(clips) * int(fe.hop_length), return_tensors="pt",
                   device=self.mel_device or str(self.device))
        frames = feats["attention_mask"].sum(-1)
        hidden = tower_states(tower, to_device(feats["input_features"], self.device, tower.conv1.weight.dtype), frames)
        return [hidden[i, : whisper_encoder_tokens(int(n))] for i, n in enumerate(frames.tolist())]
