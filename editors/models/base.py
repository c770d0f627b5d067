"""The adapter interface and its helpers, importable from one place (each lives in its own module):

* :mod:`editors.models.prompts`: :class:`Prompt`, :class:`Turn`, :func:`chat_messages`, audio helpers;
* :mod:`editors.models.batch`: :class:`PromptBatch`, :class:`LayerState`, :func:`batch_spans`, ``IGNORE_INDEX``;
* :mod:`editors.models.adapter`: :class:`LALMAdapter` (the interface + generic tokenizing, embedding, losses),
  :func:`resolve_dtype`;
* :mod:`editors.models.generation`: :class:`GenerationSettings`, :class:`GeneratedText`, :class:`PerEdit` (the
  generation layer behind ``LALMAdapter.generate``);
* :mod:`editors.models.interface`: :class:`EditableModel` (what an editing method may call on a model);
* :mod:`editors.models.weights`: the weight-file digest behind the model key;
* :mod:`editors.models.tiny`: offline tokenizers and feature extractors of the tiny models.
"""

from editors.models.adapter import LALMAdapter, as_linear, resolve_dtype
from editors.models.batch import IGNORE_INDEX, LayerState, PromptBatch, batch_spans, to_device
from editors.models.buckets import training_groups  # the function behind LALMAdapter.training_groups (kept importable)
from editors.models.interface import EditableModel
from editors.models.generation import GeneratedText, GenerationSettings, PerEdit
from editors.models.prompts import SAMPLING_RATE, Prompt, Turn, as_audio_array, audio_digest, chat_messages
from editors.models.tiny import (TINY_CORPUS, build_tiny_tokenizer, tiny_feature_extractor, whisper_encoder_tokens,
                                 whisper_mel_frames)
from editors.models.weights import WEIGHT_SUFFIXES, weights_digest

__all__ = ["IGNORE_INDEX", "SAMPLING_RATE", "TINY_CORPUS", "WEIGHT_SUFFIXES", "EditableModel", "GeneratedText", "GenerationSettings",
           "LALMAdapter", "LayerState", "PerEdit", "Prompt", "PromptBatch", "Turn", "as_audio_array", "as_linear",
           "audio_digest", "batch_spans", "build_tiny_tokenizer", "chat_messages", "resolve_dtype",
           "tiny_feature_extractor", "to_device", "training_groups", "weights_digest", "whisper_encoder_tokens", "whisper_mel_frames"]
