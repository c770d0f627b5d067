"""The Whisper-style audio tower of Qwen2-Audio and Audio Flamingo 3, run only as wide as a batch's clips need.

Both towers are two convolutions (the second of stride 2), learned positions, bidirectional layers with padded keys
masked, an average pool of stride 2 and a LayerNorm, and their own ``forward`` takes only the checkpoint's whole
30 s window of mel frames. Run here on a batch cut to its longest clip's frames (plus the two frames the
convolutions reach past it, rounded up to a step), each clip's valid outputs see what they see in the window: the
same mel frames (the silence past a clip is zeros either way), the same positional embeddings, and keys past the
clip masked. Only the work on the silent tail goes (a 10 s clip: a third of the window).

The log-mel spectrogram is computed here too (:func:`log_mel`, the Whisper feature extractor's arithmetic) so that it
stays where it is computed: the extractor hands a spectrogram computed on the GPU back to the host as a NumPy array,
a host sync per encoder call, and the host then copies it back.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from editors.models.batch import to_device
from editors.models.kernels import encoder_convolutions
from editors.models.prompts import SAMPLING_RATE
from editors.models.tiny import whisper_encoder_tokens, whisper_mel_frames


def cut_width(audios: Sequence[np.ndarray], feature_extractor: Any, step: int) -> int:
    """Mel frames a batch of ``audios`` is encoded at: the longest clip's frames plus two, rounded up to ``step``,
    at most the window (a ``step`` at least the window always runs the whole window)."""
    longest = max(whisper_mel_frames(len(a), feature_extractor) for a in audios)
    return min(int(feature_extractor.nb_max_frames), -(-(longest + 2) // step) * step)


def log_mel(clips: Sequence[np.ndarray], feature_extractor: Any, width: int, device: torch.device | str
            ) -> torch.Tensor:
    """Log-mel spectrograms ``[batch, mels, width]`` (float32, on ``device``) of ``clips`` zero-padded or cut to
    ``width`` frames: the values of the Whisper ``feature_extractor`` called with ``padding="max_length"`` and
    ``max_length=width * hop_length`` (its torch path, computed on ``device``), without leaving ``device``. An
    extractor that dithers or normalises is called itself (its output is then copied to ``device``)."""
    fe = feature_extractor
    hop, samples = int(fe.hop_length), width * int(fe.hop_length)
    if float(getattr(fe, "dither", 0.0)) != 0.0 or getattr(fe, "do_normalize", False):
        feats = fe(list(clips), sampling_rate=SAMPLING_RATE, padding="max_length", max_length=samples,
                   return_tensors="pt")
        return to_device(feats["input_features"], device, torch.float32)
    waves = np.zeros((len(clips), samples), dtype=np.float32)
    for row, clip in enumerate(clips):
        n = min(len(clip), samples)
        waves[row, :n] = clip[:n]
    wave = to_device(torch.from_numpy(waves), device)
    window = torch.hann_window(int(fe.n_fft), device=wave.device)
    spectrum = torch.stft(wave, int(fe.n_fft), hop, window=window, return_complex=True)
    power = (spectrum[..., :-1].abs() ** 2).contiguous()
    filters = to_device(torch.from_numpy(np.ascontiguousarray(fe.mel_filters)), wave.device, torch.float32)
    mel = torch.clamp(filters.T @ power, min=1e-10).log10()
    mel = torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (mel + 4.0) / 4.0


def tower_states(tower: Any, features: torch.Tensor, mel_frames: Sequence[int]) -> torch.Tensor:
    """The tower's output for ``features`` [batch, mels, width] of any width up to the window, with each row's
    keys past its ``mel_frames`` valid frames masked: [batch, width // 4, hidden] (the tower's own ``forward``
    in its order). No host sync: which rows are padded is known from ``mel_frames``."""
    with encoder_convolutions():  # torch's own kernels: no cuDNN plan per (clips, frames) shape
        hidden = nn.functional.gelu(tower.conv1(features))
        hidden = nn.functional.gelu(tower.conv2(hidden)).permute(0, 2, 1)
    positions = hidden.shape[1]
    hidden = hidden + tower.embed_positions.weight[:positions]
    hidden = nn.functional.dropout(hidden, p=tower.dropout, training=tower.training)
    mask = _key_mask(tower, hidden, [(int(n) - 1) // 2 + 1 for n in mel_frames])
    for layer in tower.layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    hidden = tower.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
    return tower.layer_norm(hidden)


def _key_mask(tower: Any, hidden: torch.Tensor, valid_positions: Sequence[int]) -> Any:
    """The tower layers' attention mask for rows whose keys past ``valid_positions`` are padding. Built directly
    for SDPA (a boolean ``[batch, 1, 1, positions]``, True = attend: what transformers builds, broadcast over the
    queries), since transformers' builder asks the device whether any key is masked (a host sync); other
    attention implementations get transformers' own mask."""
    from transformers.masking_utils import create_bidirectional_mask

    positions = hidden.shape[1]
    if all(n >= positions for n in valid_positions):
        return create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=None)
    lengths = to_device(torch.tensor(list(valid_positions), dtype=torch.long), hidden.device)
    valid = torch.arange(positions, device=hidden.device)[None, :] < lengths[:, None]
    if tower.config._attn_implementation == "sdpa":
        return valid[:, None, None, :]
    return create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=valid.long())


class WhisperFeatures:
    """What an adapter whose audio goes through a Whisper feature extractor adds: where the log-mel spectrogram is
    computed, and :meth:`log_mel_features`. It supplies ``processor`` and ``device``."""

    #: Where the mel spectrogram is computed: ``None`` = the model's device (``bench/encoder_width.py`` times both).
    mel_device: str | None = None

    processor: Any
    device: Any

    def log_mel_features(self, clips: Sequence[np.ndarray], width: int) -> torch.Tensor:
        """:func:`log_mel` of ``clips`` at ``width`` frames, computed on :attr:`mel_device` (float32)."""
        return log_mel(clips, self.processor.feature_extractor, width, self.mel_device or self.device)


class CutTowerEncoding(WhisperFeatures):
    """What an adapter whose audio tower runs here (Qwen2-Audio, AF3) adds: the width step and :meth:`encode_cut`
    (and :class:`WhisperFeatures`). The adapter passes its tower in."""

    #: Mel frames a batch is rounded up to; a step at least the window (the tiny models' 2 s) runs the whole window.
    encoder_width_step: int = 256

    def encoder_width(self, clips: Sequence[np.ndarray]) -> int:
        """Mel frames a batch of ``clips`` is encoded at (:func:`cut_width`)."""
        return cut_width(clips, self.processor.feature_extractor, self.encoder_width_step)

    def encode_cut(self, tower: Any, clips: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each clip's valid states of ``tower`` (at most one window per clip), the batch cut to
        :meth:`encoder_width`: those of the tower's own forward over the whole window."""
        fe = self.processor.feature_extractor
        mel = self.log_mel_features(clips, self.encoder_width(clips))
        frames = [whisper_mel_frames(len(c), fe) for c in clips]
        hidden = tower_states(tower, to_device(mel, self.device, tower.conv1.weight.dtype), frames)
        return [hidden[i, : whisper_encoder_tokens(n)] for i, n in enumerate(frames)]
