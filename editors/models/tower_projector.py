"""What the Qwen2-Audio and Audio Flamingo 3 adapters share: transformers lays both checkpoints out the same way.

A Whisper-style encoder ``model.audio_tower`` (run only as wide as a batch's clips need:
:class:`~editors.models.whisper_tower.CutTowerEncoding`), a connector ``model.multi_modal_projector``, a Qwen2 LLM
``model.language_model`` and ``lm_head``, prompts in the ChatML format of the checkpoint's chat template. Loading,
the random-init models of the tests and the bench, the structure and the prompt rendering are written here once; a
family module names its transformers classes, its audio token and its tiny chat template, and says how many
embeddings an audio takes and how its clips reach the tower.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from editors.models.base import LALMAdapter, Prompt, build_tiny_tokenizer, chat_messages, tiny_feature_extractor
from editors.models.whisper_tower import CutTowerEncoding


def _transformers_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


class TowerProjectorAdapter(CutTowerEncoding, LALMAdapter):
    """The shared part of the Qwen2-Audio and AF3 adapters (see the module docstring)."""

    #: The family's transformers classes, by name (imported when a model is built).
    model_class: ClassVar[str] = ""
    config_class: ClassVar[str] = ""
    processor_class: ClassVar[str] = ""
    #: ``model_type`` of the audio encoder's config.
    encoder_model_type: ClassVar[str] = ""
    #: The placeholder token each audio's embeddings replace, and the model config's field holding its id.
    audio_token: ClassVar[str] = ""
    audio_token_id_field: ClassVar[str] = ""
    #: Whether the processor is told the audio token (its default differs from the tiny tokenizer's).
    processor_takes_audio_token: ClassVar[bool] = False
    #: The tiny offline tokenizer's special tokens and chat template (the checkpoint's format, written for tests).
    special_tokens: ClassVar[tuple[str, ...]] = ()
    tiny_chat_template: ClassVar[str] = ""

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, id_or_dir: str, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                        revision: str | None = None, is_tiny: bool = False) -> Any:
        from transformers import AutoProcessor

        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        model = _transformers_class(cls.model_class).from_pretrained(id_or_dir, dtype=dtype, device_map=device,
                                                                     **kwargs)
        processor = AutoProcessor.from_pretrained(id_or_dir, **kwargs)
        rev = revision or getattr(model.config, "_commit_hash", None) or ""
        return cls(model, processor, model_id=id_or_dir, revision=rev, is_tiny=is_tiny)

    @classmethod
    def _random_init(cls, seed: int, *, dtype: torch.dtype, device: str, num_mel_bins: int, chunk_length: int,
                     audio_config: dict[str, Any], text_config: dict[str, Any], model_id: str, is_tiny: bool) -> Any:
        """A random-init model of the real class with the offline tokenizer (vocabulary size from the tokenizer
        unless ``text_config`` sets it) and a Whisper feature extractor of ``chunk_length`` seconds; tiny models
        are built on the CPU then moved, full-size ones directly on ``device``."""
        tokenizer = build_tiny_tokenizer(cls.special_tokens, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                         chat_template=cls.tiny_chat_template)
        feature_extractor = tiny_feature_extractor(num_mel_bins=num_mel_bins, chunk_length=chunk_length)
        extra = {"audio_token": cls.audio_token} if cls.processor_takes_audio_token else {}
        processor = _transformers_class(cls.processor_class)(
            feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=cls.tiny_chat_template, **extra)
        config = _transformers_class(cls.config_class)(
            audio_config={"model_type": cls.encoder_model_type, "num_mel_bins": num_mel_bins,
                          "max_source_positions": feature_extractor.nb_max_frames // 2, **audio_config},
            text_config={"model_type": "qwen2", "vocab_size": len(tokenizer), "tie_word_embeddings": False,
                         "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "bos_token_id": None, **text_config},
            **{cls.audio_token_id_field: tokenizer.convert_tokens_to_ids(cls.audio_token)},
        )
        model_class = _transformers_class(cls.model_class)
        torch.manual_seed(seed)
        if is_tiny:
            model = model_class(config).to(dtype=dtype, device=device)
        else:
            with torch.device(device):
                model = model_class._from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return cls(model, processor, model_id=model_id, revision="", is_tiny=is_tiny)

    # ---- structure ----------------------------------------------------------------------------------------------

    def connector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def audio_encoder(self) -> nn.Module:
        return self.model.model.audio_tower

    def language_model(self) -> Any:
        return self.model.model.language_model

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def audio_encoder_layers(self) -> list[nn.Module]:
        """The Whisper-style encoder's transformer layers ``audio_tower.layers`` (the pooling and final LayerNorm
        after them stay frozen)."""
        return list(self.model.model.audio_tower.layers)

    # ---- prompts ------------------------------------------------------------------------------------------------

    @property
    def end_of_turn(self) -> str:
        return "<|im_end|>"

    def render(self, prompt: Prompt) -> str:
        template = self.processor.chat_template or self.tokenizer.chat_template
        return self.tokenizer.apply_chat_template(chat_messages(prompt), chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)

    # ---- audio --------------------------------------------------------------------------------------------------

    def project_audio(self, states: list[torch.Tensor]) -> torch.Tensor:
        return self.connector()(torch.cat(list(states), dim=0))
