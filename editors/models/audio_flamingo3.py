"""Adapter for Audio Flamingo 3 (``AudioFlamingo3ForConditionalGeneration``, Hub id nvidia/audio-flamingo-3-hf).

Structure: Whisper-style audio encoder ``model.audio_tower`` run on 30 s windows (each window: stride-2 conv +
average pool; a batch of windows run only as wide as its longest needs), connector ``model.multi_modal_projector``
(Linear-GELU-Linear), LLM ``model.language_model`` (Qwen2-7B, 28 layers) and ``lm_head``. Each audio is one
``<sound>`` in the chat text, expanded to one token per embedding (the valid frames of all its windows,
concatenated).
"""

from __future__ import annotations

import numpy as np
import torch

from editors.models.base import SAMPLING_RATE, whisper_encoder_tokens
from editors.models.tower_projector import TowerProjectorAdapter

# This module's model family (read by editors.models.registry without importing it; see that module).
FAMILY = "audio_flamingo3"
ADAPTER_CLASS = "AudioFlamingo3Adapter"
MODEL_TYPES = ("audioflamingo3",)  # config.json model_type / architectures
HUB_ID_HINTS = ("audio-flamingo-3", "audioflamingo3")  # lower-case substrings of Hub ids
TINY_NAME = "tiny-audio-flamingo3"

#: Chat template of the tiny model: Qwen2 chat format with a ``<sound>`` slot where a user turn has audio
#: (audio before text, as in the original AF3 prompt "<sound>\n{question}"), written for our tests.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' %}<sound>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>")

#: Longest audio the processor keeps (seconds), as in the released processor.
MAX_AUDIO_SECONDS = 600


class AudioFlamingo3Adapter(TowerProjectorAdapter):
    """Audio Flamingo 3 behind the :class:`LALMAdapter` interface (loading, structure and rendering:
    :class:`~editors.models.tower_projector.TowerProjectorAdapter`)."""

    family = FAMILY
    default_hub_id = "nvidia/audio-flamingo-3-hf"
    model_class = "AudioFlamingo3ForConditionalGeneration"
    config_class = "AudioFlamingo3Config"
    processor_class = "AudioFlamingo3Processor"
    encoder_model_type = "audioflamingo3_encoder"
    audio_token = "<sound>"
    audio_token_id_field = "audio_token_id"
    processor_takes_audio_token = True
    special_tokens = SPECIAL_TOKENS
    tiny_chat_template = TINY_CHAT_TEMPLATE

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             num_layers: int = 4) -> "AudioFlamingo3Adapter":
        return cls._random_init(
            seed, dtype=dtype, device=device, num_mel_bins=16, chunk_length=2, model_id=f"tiny-audio-flamingo3@seed{seed}",
            is_tiny=True, audio_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
            text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": num_layers,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                         "initializer_range": 0.2})

    @classmethod
    def random_full_size(cls, seed: int = 0, *, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                         num_layers: int = 28) -> "AudioFlamingo3Adapter":
        """The AF3 architecture (Whisper-large-v3 encoder, Qwen2.5-7B LLM) with random weights, for throughput
        benchmarks without the checkpoint (tiny offline tokenizer, real 128-mel 30 s feature extractor)."""
        return cls._random_init(
            seed, dtype=dtype, device=device, num_mel_bins=128, chunk_length=30,
            model_id=f"random-audio-flamingo3@seed{seed}", is_tiny=False,
            audio_config={"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20, "intermediate_size": 5120},
            text_config={"vocab_size": 151936, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": num_layers, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0})

    # ---- prompts and audio --------------------------------------------------------------------------------------

    @property
    def audio_placeholder(self) -> str:
        return getattr(self.processor, "audio_token", None) or self.audio_token

    def _windows(self, audio: np.ndarray) -> list[np.ndarray]:
        fe = self.processor.feature_extractor
        window = int(SAMPLING_RATE * fe.chunk_length)
        max_windows = max(1, int(getattr(self.processor, "max_audio_len", MAX_AUDIO_SECONDS) // fe.chunk_length))
        n = max(1, min(-(-len(audio) // window), max_windows))
        return [audio[i * window:(i + 1) * window] for i in range(n)]

    def num_audio_tokens(self, audio: np.ndarray) -> int:
        hop = int(self.processor.feature_extractor.hop_length)
        return sum(whisper_encoder_tokens(max(1, -(-len(w) // hop))) for w in self._windows(audio))

    def _encode_audios(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        """The audio tower on each clip's 30 s windows, a batch of windows cut to the longest one's frames (the
        windows' states are the whole window's: editors/models/whisper_tower.py)."""
        windows: list[np.ndarray] = []
        owners: list[int] = []
        for i, audio in enumerate(audios):
            for w in self._windows(np.asarray(audio, dtype=np.float32)):
                windows.append(w)
                owners.append(i)
        per_audio: list[list[torch.Tensor]] = [[] for _ in audios]
        for owner, state in zip(owners, self.encode_cut(self.model.model.audio_tower, windows)):
            per_audio[owner].append(state)
        return [torch.cat(parts, dim=0) for parts in per_audio]
