"""Adapter for Qwen2-Audio-Instruct (``Qwen2AudioForConditionalGeneration``, Hub id Qwen/Qwen2-Audio-7B-Instruct).

Structure: Whisper-style audio encoder ``model.audio_tower`` (stride-2 conv + average pool: 25 embeddings per
second over a window of ``max_source_positions * 2`` mel frames, run here only as wide as a batch's clips need),
connector ``model.multi_modal_projector`` (one Linear), LLM ``model.language_model`` (Qwen2, 32 layers) and
``lm_head``. Each audio appears in the chat as ``Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>`` and its
``<|AUDIO|>`` is expanded to one token per embedding.
"""

from __future__ import annotations

import numpy as np
import torch

from editors.models.base import whisper_encoder_tokens, whisper_mel_frames
from editors.models.tower_projector import TowerProjectorAdapter

# This module's model family (read by editors.models.registry without importing it; see that module).
FAMILY = "qwen2_audio"
ADAPTER_CLASS = "Qwen2AudioAdapter"
MODEL_TYPES = ("qwen2_audio",)  # config.json model_type / architectures
HUB_ID_HINTS = ("qwen2-audio",)  # lower-case substrings of Hub ids
TINY_NAME = "tiny-qwen2-audio"

#: Chat template of the tiny model: the Qwen2-Audio-Instruct chat format (default system prompt, numbered audio
#: slots before the text of a user turn), written for our tests.
TINY_CHAT_TEMPLATE = (
    "{% set ns = namespace(audio=0) %}"
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' %}{% set ns.audio = ns.audio + 1 %}"
    "Audio {{ ns.audio }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")


class Qwen2AudioAdapter(TowerProjectorAdapter):
    """Qwen2-Audio-Instruct behind the :class:`LALMAdapter` interface (loading, structure and rendering:
    :class:`~editors.models.tower_projector.TowerProjectorAdapter`)."""

    family = FAMILY
    default_hub_id = "Qwen/Qwen2-Audio-7B-Instruct"
    model_class = "Qwen2AudioForConditionalGeneration"
    config_class = "Qwen2AudioConfig"
    processor_class = "Qwen2AudioProcessor"
    encoder_model_type = "qwen2_audio_encoder"
    audio_token = "<|AUDIO|>"
    audio_token_id_field = "audio_token_index"
    special_tokens = SPECIAL_TOKENS
    tiny_chat_template = TINY_CHAT_TEMPLATE

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             num_layers: int = 4) -> "Qwen2AudioAdapter":
        return cls._random_init(
            seed, dtype=dtype, device=device, num_mel_bins=16, chunk_length=2, model_id=f"tiny-qwen2-audio@seed{seed}",
            is_tiny=True, audio_config={"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64},
            text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": num_layers,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                         "initializer_range": 0.2})

    @classmethod
    def random_full_size(cls, seed: int = 0, *, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                         num_layers: int = 32) -> "Qwen2AudioAdapter":
        """The Qwen2-Audio-7B architecture with random weights (for throughput benchmarks without the checkpoint):
        the tiny offline tokenizer with the embedding table at the real vocabulary size, and the real 128-mel,
        30 s feature extractor."""
        return cls._random_init(
            seed, dtype=dtype, device=device, num_mel_bins=128, chunk_length=30,
            model_id=f"random-qwen2-audio-7b@seed{seed}", is_tiny=False,
            audio_config={"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120},
            text_config={"vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": num_layers, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5})

    # ---- prompts and audio --------------------------------------------------------------------------------------

    @property
    def audio_placeholder(self) -> str:
        return self.audio_token

    def num_audio_tokens(self, audio: np.ndarray) -> int:
        return whisper_encoder_tokens(whisper_mel_frames(len(audio), self.processor.feature_extractor))

    def _encode_audios(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        """The audio tower on a batch cut to :meth:`encoder_width` instead of the checkpoint's 30 s window (the
        clips' states are the window's: editors/models/whisper_tower.py)."""
        return self.encode_cut(self.model.model.audio_tower, [np.asarray(a, dtype=np.float32) for a in audios])
