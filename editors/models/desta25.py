"""Adapter for DeSTA2.5-Audio (Hub id ``DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B``) on our transformers-only rebuild.

The model itself (config, Q-Former connector, parameter names, release checkpoint layout) is in
:mod:`editors.models.desta25_model`. This module mirrors the inference path of the public implementation's
``DeSTA25AudioModel.generate`` / ``_setup_generation`` (github kehanlu/DeSTA2.5-Audio, commit 5503dfc,
``desta/models/modeling_desta25.py``; prompt format from its README and ``examples/evaluation``):

* tokenizer: the base LLM's (Llama-3.1-8B-Instruct, its chat template), pad = eos, left padding;
* a user turn with audio is ``"<|AUDIO|>\\n{question}"``; after the chat template ``<|AUDIO|>`` becomes
  ``<start_audio><|AUDIO|><end_audio>`` (plain text around it) and the locator becomes ``prompt_size + T``
  placeholder tokens (``<|reserved_special_token_87|>``), filled with the connector's ``prompt_size`` outputs and
  the LLM embeddings of the ``T`` tokens of the audio's Whisper transcript;
* transcript: silero VAD on the 16 kHz waveform; no speech -> ``" "``; speech -> ``whisper.generate`` on the
  30 s-padded features (``max_new_tokens=128``), decoded without special tokens, stripped. Here the same greedy
  decode runs on a static cache with its step captured on CUDA (``editors.models.generation.transcripts``: the
  same tokens as ``generate`` on the tiny fp32 Whisper; ``transcript_engine="eager"`` calls ``generate`` itself);
* system prompt when the prompt has none: ``"Focus on the audio clips and instructions."`` (README usage);
* greedy generation stops on the LLM's generation-config eos ids (``<|end_of_text|>``, ``<|eom_id|>``,
  ``<|eot_id|>`` for Llama-3.1-Instruct) plus the end of turn.

Checked offline (``tests/test_desta25.py``, tiny random-init model): the saved tensor names equal the release's
module tree written out by hand (``perception.connector.{layer_prompts.k, layer_weights, qformer.layer.i.*,
proj.0/1.*}``) with the release's shapes; release-layout dir (config naming base LLM + Whisper by id, plus the
extra keys the desta trainer writes) -> ``from_pretrained``: no missing/unexpected keys (both rejected with the
names), identical state and logits; the connector equals an independent tensor-op implementation of the release's
math (post-LN BERT layers, unmasked self-attention, cross-attention to each tapped layer, per-query softmax layer
mix, LayerNorm + Linear), which a causal Q-Former would fail; the audio span is ``prompt_size`` connector outputs
then the transcript's token embeddings between ``<start_audio>`` and ``<end_audio>``; FT-Audio (``editors.ft_audio``)
changes only ``perception.connector.*`` and text-only logits/outputs stay bit-identical; a second evaluation of
the same audio runs Whisper's decoder zero times, and a fresh adapter on the same cache dir runs neither its decoder
nor its encoder. On an H100 (``random_full_size``: Llama-3.1-8B + Whisper-large-v3 geometry, random weights):
build, batched transcripts, generation, FT-Audio and FT-LLM steps run (peak 25.7 GiB).
Not checkable offline: numerical agreement with the released weights / the ``desta`` package on real audio (no
Hub access); the exact ``config.json`` of the release (read into :class:`DeSTA25Config`, unknown keys kept; its
Q-Former depth is read from it: the class default is 2, the training recipe's name says 6); the silero VAD
version the release used (torch.hub at its time; we use the ``silero-vad`` PyPI package, which ships the model).

Whisper is frozen under every method, so each audio's transcript (text) and tapped encoder states are computed
once per audio content hash: transcripts in memory and, with ``cache_dir``, on disk across runs; encoder states
in the adapter's in-memory LRU (and on disk with ``encoder_states_on_disk``). On CUDA one encoder run per audio
serves both: the transcript is decoded from it and its tapped layers are kept as the audio's states (on the CPU a
clip's states come from a run of that clip alone, so they never depend on the clips batched with it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from editors.models.base import (SAMPLING_RATE, LALMAdapter, Prompt, audio_digest,
                                 build_tiny_tokenizer, tiny_feature_extractor, to_device)
from editors.models.desta25_model import RELEASE_HUB_ID, DeSTA25Config, DeSTA25Model
from editors.models.kernels import encoder_convolutions
from editors.models.whisper_tower import WhisperFeatures
from sake_core.atomic import atomic_write

logger = logging.getLogger(__name__)

# This module's model family (read by editors.models.registry without importing it; see that module).
FAMILY = "desta25"
ADAPTER_CLASS = "DeSTA25Adapter"
MODEL_TYPES = ("desta25", "DeSTA25AudioModel")  # config.json model_type / architectures
HUB_ID_HINTS = ("desta2.5", "desta25")  # lower-case substrings of Hub ids
TINY_NAME = "tiny-desta25"
#: Audios per Whisper transcription call on CPU; on CUDA up to MAX_TRANSCRIPT_BATCH, sized from free memory (of
#: which TRANSCRIPT_MEMORY_FRACTION may be filled).
TRANSCRIPT_BATCH, MAX_TRANSCRIPT_BATCH, TRANSCRIPT_MEMORY_FRACTION = 16, 64, 0.5

#: How transcripts are decoded: "graph" (``editors.models.generation.transcripts``: a static cache, the decode step
#: captured as a CUDA graph on CUDA, no host work per token) or "eager" (transformers' ``whisper.generate``, as the
#: release calls it; also what "graph" falls back to for a generation config that module does not model).
TRANSCRIPT_ENGINES = ("graph", "eager")

#: Init std of the tiny LLM: at Llama's 0.02 a 4-layer random model barely lets input tokens reach the last
#: position, so connector-only edits (FT-Audio) could never move its output; 0.1 keeps tiny edits meaningful.
TINY_INIT_RANGE = 0.1
#: Connector outputs per audio in the tiny model (the release: 64).
TINY_PROMPT_SIZE = 8
DEFAULT_SYSTEM_PROMPT = "Focus on the audio clips and instructions."
START_AUDIO, END_AUDIO = "<start_audio>", "<end_audio>"

#: Environment variable naming a default on-disk cache folder for transcripts (and optionally encoder states).
CACHE_DIR_ENV = "SAKE_DESTA_CACHE_DIR"

#: The Llama-3.1 chat format (system header with knowledge/today dates, trimmed contents), written for the tiny
#: tokenizer; the real tokenizer brings Meta's template.
TINY_CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: {{ date_string | default('26 Jul 2024') }}\n\n"
    "{{ system_message }}<|eot_id|>"
    "{% for m in loop_messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLM_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eom_id|>", "<|eot_id|>", "<|reserved_special_token_87|>")
WHISPER_SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                          "<|notimestamps|>")

#: Geometry of the base LLM (Llama-3.1-8B-Instruct config.json, public model card), for random full-size builds.
LLAMA31_8B: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": False,
    "mlp_bias": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
#: Geometry of openai/whisper-large-v3 (config.json, public model card).
WHISPER_LARGE_V3: dict[str, Any] = {
    "vocab_size": 51866, "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
    "decoder_layers": 32, "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120,
    "max_source_positions": 1500, "max_target_positions": 448, "activation_function": "gelu",
}


@dataclass
class DeSTAAudioState:
    """Frozen per-audio inputs of the connector: tapped Whisper layers ((frames, d) each) + transcript token ids."""

    tapped: list[torch.Tensor]
    transcript_ids: list[int]


class DeSTA25Processor:
    """The LLM tokenizer, Whisper's feature extractor and Whisper's tokenizer (for transcripts)."""

    def __init__(self, tokenizer: Any, feature_extractor: Any, whisper_tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.whisper_tokenizer = whisper_tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template


def conversation(prompt: Prompt, audio_locator: str) -> list[dict[str, str]]:
    """The prompt as chat messages; a turn with audio starts with the audio locator (README format)."""
    def user(question: str, audio: np.ndarray | None) -> dict[str, str]:
        return {"role": "user", "content": f"{audio_locator}\n{question}" if audio is not None else question}

    messages = [{"role": "system", "content": prompt.system if prompt.system is not None else DEFAULT_SYSTEM_PROMPT}]
    for turn in prompt.history:
        messages.append(user(turn.question, turn.audio))
        messages.append({"role": "assistant", "content": turn.answer})
    messages.append(user(prompt.question, prompt.audio))
    return messages


class DeSTA25Adapter(WhisperFeatures, LALMAdapter):
    """DeSTA2.5-Audio behind the :class:`LALMAdapter` interface (see the module docstring)."""

    family = FAMILY
    default_hub_id = RELEASE_HUB_ID
    #: Bytes of cached audio states: one 30 s audio's tapped states are 4 x 1500 x 1280 fp32 (~31 MB) for large-v3,
    #: so 8 GiB hold ~270 of them. A pass of 32 ten-item edits reads ~220 distinct clips, whose states the
    #: transcripts' encoder run makes before the pass's generations read them (at 128 clips, a pass of 21 edits,
    #: ~147 clips, evicted ~19 before the pre-edit generation read them, and as many or more before the post-edit one).
    audio_cache_bytes = 8 * 2**30

    def __init__(self, model: DeSTA25Model, processor: DeSTA25Processor, *, model_id: str, revision: str = "",
                 is_tiny: bool = False, vad: bool = True, cache_dir: str | os.PathLike | None = None,
                 encoder_states_on_disk: bool = False, whisper_key: str | None = None,
                 transcript_engine: str = "graph") -> None:
        super().__init__(model, processor, model_id=model_id, revision=revision, is_tiny=is_tiny)
        if transcript_engine not in TRANSCRIPT_ENGINES:
            raise ValueError(f"transcript_engine {transcript_engine!r}: expected one of {TRANSCRIPT_ENGINES}")
        #: how transcripts are decoded (:data:`TRANSCRIPT_ENGINES`); part of the transcripts' cache key and of
        #: :meth:`model_key`, since the two may differ in a near-tie token on a GPU
        self.transcript_engine = transcript_engine
        self.config: DeSTA25Config = model.config
        if vad and importlib.util.find_spec("silero_vad") is None:
            logger.warning("silero-vad is not installed: transcribing every audio (the release skips non-speech "
                           "audio); `pip install silero-vad` to match it")
            vad = False
        #: whether non-speech audio goes untranscribed (the release's voice-activity detection); decided here, once,
        #: and part of :meth:`model_key`, since the transcripts (and so the outputs) depend on it
        self.vad = vad
        self._vad_model: Any = None
        cache_dir = cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.encoder_states_on_disk = encoder_states_on_disk and self.cache_dir is not None
        self.whisper_key = whisper_key or self.config.encoder_model_id
        self._transcripts: dict[str, str] = {}
        self._released_encoder: dict[str, torch.Tensor] = {}  # see before_audio_encoder_edit
        #: keep the tapped states of each transcript's encoder run as the audio's states (None: on CUDA only, see
        #: :meth:`_shares_transcript_encoder`)
        self.share_transcript_encoder: bool | None = None
        self.transcribed_audios = 0  # audios whose transcript was decoded by Whisper (not from a cache)

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, id_or_dir: str = RELEASE_HUB_ID, *, dtype: torch.dtype = torch.bfloat16,
                        device: str = "cpu", revision: str | None = None, is_tiny: bool = False,
                        perception_dtype: torch.dtype = torch.float32, vad: bool | None = None,
                        cache_dir: str | os.PathLike | None = None, encoder_states_on_disk: bool = False,
                        llm_model_id: str | None = None, encoder_model_id: str | None = None,
                        transcript_engine: str = "graph") -> "DeSTA25Adapter":
        """Load a release-layout checkpoint (Hub id or dir) and the LLM + Whisper its config names.

        A directory written by :meth:`save_pretrained` also holds ``llm/`` and ``whisper/``; those are used instead
        of the ids in its config. ``dtype`` is the LLM's; Whisper and the connector use ``perception_dtype``
        (fp32 as in the release). ``vad`` defaults to on (release behaviour) except for tiny models.
        ``transcript_engine``: one of :data:`TRANSCRIPT_ENGINES`."""
        from transformers import AutoFeatureExtractor, AutoTokenizer

        local = Path(id_or_dir)
        if local.is_dir():
            if llm_model_id is None and (local / "llm").is_dir():
                llm_model_id = str(local / "llm")
            if encoder_model_id is None and (local / "whisper").is_dir():
                encoder_model_id = str(local / "whisper")
        model = DeSTA25Model.from_pretrained(id_or_dir, dtype=dtype, device=device, perception_dtype=perception_dtype,
                                             llm_model_id=llm_model_id, encoder_model_id=encoder_model_id,
                                             revision=revision)
        llm_source = llm_model_id or model.config.llm_model_id
        whisper_source = encoder_model_id or model.config.encoder_model_id
        tokenizer = AutoTokenizer.from_pretrained(llm_source)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        processor = DeSTA25Processor(tokenizer, AutoFeatureExtractor.from_pretrained(whisper_source),
                                     AutoTokenizer.from_pretrained(whisper_source))
        whisper_key = model.config.encoder_model_id
        if local.is_dir() and (local / "whisper").is_dir():
            whisper_key = f"{local.resolve()}/whisper"
        return cls(model, processor, model_id=str(id_or_dir), revision=revision or "", is_tiny=is_tiny,
                   vad=(not is_tiny) if vad is None else vad, cache_dir=cache_dir,
                   encoder_states_on_disk=encoder_states_on_disk, whisper_key=whisper_key,
                   transcript_engine=transcript_engine)

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str = "cpu", num_layers: int = 4,
             cache_dir: str | os.PathLike | None = None, encoder_states_on_disk: bool = False) -> "DeSTA25Adapter":
        """Random-init tiny Llama + tiny Whisper (4 encoder layers, all tapped) + 2-layer Q-Former, offline
        tokenizers, a 2 s Whisper chunk, 8 prompts, transcripts of at most 6 tokens, no VAD."""
        from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperForConditionalGeneration

        tokenizer = build_tiny_tokenizer(LLM_SPECIAL_TOKENS, eos_token="<|eot_id|>", pad_token="<|eot_id|>",
                                         chat_template=TINY_CHAT_TEMPLATE)
        whisper_tokenizer = build_tiny_tokenizer(WHISPER_SPECIAL_TOKENS, eos_token="<|endoftext|>",
                                                 pad_token="<|endoftext|>", chat_template="", vocab_size=384)
        feature_extractor = tiny_feature_extractor(num_mel_bins=16, chunk_length=2)
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        llm_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
            initializer_range=TINY_INIT_RANGE,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
            eos_token_id=[tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
                          tokenizer.convert_tokens_to_ids("<|eom_id|>"), eot],
            pad_token_id=None)
        sot = whisper_tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
        eot_whisper = whisper_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        encoder_config = WhisperConfig(
            vocab_size=len(whisper_tokenizer), num_mel_bins=16, d_model=32, encoder_layers=4,
            encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_source_positions=feature_extractor.nb_max_frames // 2, max_target_positions=32,
            decoder_start_token_id=sot, bos_token_id=eot_whisper, eos_token_id=eot_whisper,
            pad_token_id=eot_whisper, begin_suppress_tokens=None, suppress_tokens=None)
        config = DeSTA25Config(
            llm_model_id=f"tiny-llama@seed{seed}", encoder_model_id=f"tiny-whisper@seed{seed}",
            qformer_num_hidden_layers=2, prompt_size=TINY_PROMPT_SIZE, target_layer_ids=[0, 1, 2, 3],
            qformer_intermediate_size=64, transcript_max_new_tokens=6, llm_config=llm_config.to_dict(),
            encoder_config=encoder_config.to_dict())
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(llm_config)
        llm.generation_config.eos_token_id = list(cast(list, llm_config.eos_token_id))
        llm.generation_config.pad_token_id = eot
        whisper = WhisperForConditionalGeneration(encoder_config)
        model = DeSTA25Model(config, llm, whisper).to(dtype=dtype, device=device)
        processor = DeSTA25Processor(tokenizer, feature_extractor, whisper_tokenizer)
        return cls(model, processor, model_id=f"tiny-desta25@seed{seed}", revision="", is_tiny=True, vad=False,
                   cache_dir=cache_dir, encoder_states_on_disk=encoder_states_on_disk)

    @classmethod
    def random_full_size(cls, seed: int = 0, *, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                         perception_dtype: torch.dtype = torch.float32) -> "DeSTA25Adapter":
        """The release's architecture at full size (Llama-3.1-8B + Whisper-large-v3 + 2-layer Q-Former, 64
        prompts on layers 7/15/23/31) with random weights, built on ``device`` without any download (benchmarks).
        Tokenizers are the offline tiny ones (their ids fit both vocabularies); the feature extractor is
        large-v3's (128 mel bins, 30 s chunk); no VAD, so every audio is transcribed (128 tokens at most)."""
        from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor
        from transformers import WhisperForConditionalGeneration

        tokenizer = build_tiny_tokenizer(LLM_SPECIAL_TOKENS, eos_token="<|eot_id|>", pad_token="<|eot_id|>",
                                         chat_template=TINY_CHAT_TEMPLATE)
        whisper_tokenizer = build_tiny_tokenizer(WHISPER_SPECIAL_TOKENS, eos_token="<|endoftext|>",
                                                 pad_token="<|endoftext|>", chat_template="", vocab_size=384)
        feature_extractor = WhisperFeatureExtractor(feature_size=WHISPER_LARGE_V3["num_mel_bins"])
        ids = tokenizer.convert_tokens_to_ids
        llm_config = LlamaConfig(**LLAMA31_8B, bos_token_id=ids("<|begin_of_text|>"),
                                 eos_token_id=[ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")])
        wids = whisper_tokenizer.convert_tokens_to_ids
        encoder_config = WhisperConfig(**WHISPER_LARGE_V3, decoder_start_token_id=wids("<|startoftranscript|>"),
                                       bos_token_id=wids("<|endoftext|>"), eos_token_id=wids("<|endoftext|>"),
                                       pad_token_id=wids("<|endoftext|>"), begin_suppress_tokens=None,
                                       suppress_tokens=None)
        config = DeSTA25Config(llm_model_id="random:Llama-3.1-8B-Instruct", encoder_model_id="openai/whisper-large-v3",
                               llm_config=llm_config.to_dict(), encoder_config=encoder_config.to_dict())
        torch.manual_seed(seed)
        with torch.device(device):
            llm = LlamaForCausalLM._from_config(llm_config, dtype=dtype)
            whisper = WhisperForConditionalGeneration._from_config(encoder_config, dtype=perception_dtype)
            model = DeSTA25Model(config, llm, whisper)
        model.perception.connector.to(perception_dtype)
        llm.generation_config.eos_token_id = list(cast(list, llm_config.eos_token_id))
        llm.generation_config.pad_token_id = ids("<|eot_id|>")
        processor = DeSTA25Processor(tokenizer, feature_extractor, whisper_tokenizer)
        return cls(model, processor, model_id=f"random-desta25-8b@seed{seed}", revision="", is_tiny=False, vad=False,
                   whisper_key=f"random-whisper-large-v3@seed{seed}")

    def save_pretrained(self, directory: str | Path) -> None:
        """Release layout (``config.json`` + connector ``model.safetensors``) plus ``llm/`` and ``whisper/`` with
        their tokenizers / feature extractor, so that :meth:`from_pretrained` on the folder needs no Hub."""
        directory = Path(directory)
        self.model.save_release_layout(directory)
        self.model.llm_model.save_pretrained(directory / "llm")
        self.tokenizer.save_pretrained(directory / "llm")
        self.model.perception.whisper.save_pretrained(directory / "whisper")
        self.processor.feature_extractor.save_pretrained(directory / "whisper")
        self.processor.whisper_tokenizer.save_pretrained(directory / "whisper")

    def model_key(self) -> str:
        """The shared key, the transcript engine where it is not transformers' ``generate``, and the voice-activity
        detection where it is on: both change the transcripts the LLM reads."""
        key = super().model_key()
        if self.transcript_engine != "eager":
            key = hashlib.sha256(f"{key}:transcripts={self.transcript_engine}".encode()).hexdigest()[:16]
        if self.vad:
            key = hashlib.sha256(f"{key}:vad".encode()).hexdigest()[:16]
        return key

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "transcript_engine": self.transcript_engine, "vad": self.vad}

    # ---- structure ----------------------------------------------------------------------------------------------

    def connector(self) -> nn.Module:
        return self.model.perception.connector

    def audio_encoder(self) -> nn.Module:
        """All of Whisper (encoder taps + transcript decoder): frozen under every method."""
        return self.model.perception.whisper

    def language_model(self) -> Any:
        return self.model.llm_model.model

    def lm_head(self) -> nn.Linear:
        return self.model.llm_model.lm_head

    def audio_encoder_layers(self) -> list[nn.Module]:
        """Whisper's encoder layers up to the last one the connector taps (those above it reach nothing)."""
        layers = self.model.perception.whisper.model.encoder.layers
        return list(layers)[: max(self.config.target_layer_ids) + 1]

    def audio_states_with_grad(self, audios: Sequence[np.ndarray]) -> list[DeSTAAudioState]:
        """Tapped encoder states with autograd, never from the disk cache; transcripts as usual (cached)."""
        audios = list(audios)
        self.transcripts(audios)
        with torch.enable_grad():
            tapped = self.model.perception.encode_tapped(self._features(audios))
        return [DeSTAAudioState([t[j] for t in tapped], self.transcript_ids(a)) for j, a in enumerate(audios)]

    def before_audio_encoder_edit(self, names: Sequence[str]) -> None:
        """Keep the released values of the encoder parameters about to be edited: transcripts are always decoded
        with them, so an audio's transcript (text the LLM reads) does not depend on when it was first seen."""
        params = dict(self.model.named_parameters())
        self._released_encoder = {n: params[n].detach().clone() for n in names}

    # ---- prompts ------------------------------------------------------------------------------------------------

    @property
    def audio_placeholder(self) -> str:
        return self.config.placeholder_token

    @property
    def end_of_turn(self) -> str:
        return "<|eot_id|>"

    @property
    def stop_token_ids(self) -> list[int]:
        ids = set(super().stop_token_ids)
        eos = self.model.llm_model.generation_config.eos_token_id
        if eos is not None:
            ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return sorted(ids)

    def render(self, prompt: Prompt) -> str:
        locator = self.config.audio_locator
        text = self.tokenizer.apply_chat_template(conversation(prompt, locator), tokenize=False,
                                                  add_generation_prompt=True)
        return text.replace(locator, f"{START_AUDIO}{self.audio_placeholder}{END_AUDIO}")

    def num_audio_tokens(self, audio: np.ndarray) -> int:
        """prompt_size connector outputs + the transcript's LLM tokens."""
        return self.config.prompt_size + len(self.transcript_ids(audio))

    def warm_audio(self, audios: Sequence[np.ndarray]) -> None:
        """Transcribe all audios of a generate/prepare call in batched Whisper calls before the (per audio)
        placeholder expansion needs each transcript's length."""
        self.transcripts(list(audios))

    # ---- transcripts --------------------------------------------------------------------------------------------

    def _transcript_key(self, audio: np.ndarray) -> str:
        payload = [self.whisper_key, str(self.model.perception.whisper.dtype), audio_digest(audio), bool(self.vad),
                   self.config.transcript_max_new_tokens]
        if self.transcript_engine != "eager":  # keys of the transcripts decoded by generate before the engine came
            payload.append(self.transcript_engine)
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()

    def _encoder_key(self, audio: np.ndarray) -> str:
        payload = [self.whisper_key, str(self.model.perception.whisper.dtype), audio_digest(audio),
                   list(self.config.target_layer_ids)]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()

    def _disk_path(self, kind: str, key: str, suffix: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"desta25_{kind}" / key[:2] / f"{key}{suffix}"

    def transcript_batch_size(self) -> int:
        """Audios per Whisper ``generate`` call: :data:`TRANSCRIPT_BATCH` on CPU; on CUDA a power of two up to
        :data:`MAX_TRANSCRIPT_BATCH` sized from the memory available now and what one row holds (its encoder output
        and every decoder layer's cross-attention keys and values over it, its own keys and values over the
        transcript; the tapped states where the run keeps them). Each decode step reads the decoder's weights once
        for the whole call (and ``generate`` loops on the host once per token), so fewer, larger calls transcribe
        faster. (On a GPU a near-tie token may come out differently at another batch size; the on-disk cache keeps
        the first.)"""
        from editors.models.buckets import floor_pow2
        from editors.models.generation.memory import available_bytes

        available = available_bytes(self.device)
        if available is None:
            return TRANSCRIPT_BATCH
        cfg: Any = self.model.perception.whisper.config
        positions, width = int(cfg.max_source_positions), int(cfg.d_model)
        itemsize = self.model.perception.whisper.dtype.itemsize
        kept = len(self.config.target_layer_ids) if self._shares_transcript_encoder() else 0  # tapped states
        per_row = itemsize * width * (positions * (2 * int(cfg.decoder_layers) + 8 + kept)
                                      + 2 * int(cfg.decoder_layers) * self.config.transcript_max_new_tokens)
        return floor_pow2(min(int(TRANSCRIPT_MEMORY_FRACTION * available) // per_row, MAX_TRANSCRIPT_BATCH))

    def transcripts(self, audios: Sequence[np.ndarray], batch_size: int | None = None) -> list[str]:
        """Whisper transcript of each audio (release rules: VAD, ``" "`` for no speech), cached per content hash
        in memory and, with a cache dir, on disk; ``batch_size`` audios per Whisper call (default:
        :meth:`transcript_batch_size`)."""
        keys = [self._transcript_key(a) for a in audios]
        todo: dict[str, np.ndarray] = {}
        for key, audio in zip(keys, audios):
            if key in self._transcripts or key in todo:
                continue
            path = self._disk_path("transcripts", key, ".json")
            if path is not None and path.is_file():
                self._transcripts[key] = json.loads(path.read_text(encoding="utf-8"))["text"]
                continue
            todo[key] = np.asarray(audio, dtype=np.float32)
        if todo:
            speech = {k: a for k, a in todo.items() if not self.vad or self._has_speech(a)}
            for k in todo.keys() - speech.keys():
                self._store_transcript(k, " ")
            items = list(speech.items())
            batch_size = batch_size or self.transcript_batch_size()
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                texts, tapped = self._run_whisper_asr([a for _, a in chunk])
                for j, ((k, audio), text) in enumerate(zip(chunk, texts)):
                    self._store_transcript(k, text)
                    if tapped is not None:
                        per_audio = [t[j] for t in tapped]
                        self.keep_audio_state(audio, DeSTAAudioState(per_audio, self.transcript_ids(audio)))
                        self._save_encoder_states(audio, per_audio)
        return [self._transcripts[k] for k in keys]

    def _shares_transcript_encoder(self) -> bool:
        """Whether a transcript's encoder run also gives the audio's cached states. Only while no encoder edit
        was ever set up (transcripts use the released encoder weights, states the current ones), and by default
        only on CUDA: on CPU :meth:`audio_states` encodes one clip per call so that a clip's states never depend
        on the clips batched with it, which a transcript batch would break."""
        if self._released_encoder:
            return False
        return self.device.type == "cuda" if self.share_transcript_encoder is None else self.share_transcript_encoder

    def transcript_ids(self, audio: np.ndarray) -> list[int]:
        """LLM token ids of the audio's transcript (as the release encodes it: no special tokens)."""
        text = self.transcripts([audio])[0]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _store_transcript(self, key: str, text: str) -> None:
        self._transcripts[key] = text
        path = self._disk_path("transcripts", key, ".json")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"text": text, "whisper": self.whisper_key}).encode())

    def _has_speech(self, audio: np.ndarray) -> bool:
        from silero_vad import get_speech_timestamps, load_silero_vad

        if self._vad_model is None:
            self._vad_model = load_silero_vad()

        return bool(get_speech_timestamps(torch.from_numpy(audio), self._vad_model, sampling_rate=SAMPLING_RATE))

    @torch.no_grad()
    def _run_whisper_asr(self, audios: list[np.ndarray]) -> tuple[list[str], list[torch.Tensor] | None]:
        """Transcripts of ``audios``, and (where :meth:`_shares_transcript_encoder`) the tapped encoder states of
        the same encoder run, ``[layer](batch, frames, d)``; else None."""
        from editors.models.buckets import row_bucket

        whisper = self.model.perception.whisper
        n = len(audios)  # filled up with copies to a canonical row count: a transcript never depends on its batch
        audios = list(audios) + [audios[-1]] * (row_bucket(n) - n)
        feats = to_device(self._features(audios), whisper.device, whisper.dtype)
        tapped: list[torch.Tensor] | None = None
        with self._released_encoder_weights():
            if self._shares_transcript_encoder():
                tapped, encoded = self.model.perception.encode_for_transcript(feats)
                tapped = [t[:n] for t in tapped]
                self.audio_encoder_calls += n
            else:
                with encoder_convolutions():  # as the shared run's (editors/models/kernels.py)
                    encoded = whisper.model.encoder(input_features=feats).last_hidden_state
            ids = self._decode_transcripts(encoded)
        self.transcribed_audios += n
        texts = self.processor.whisper_tokenizer.batch_decode(ids[:n], skip_special_tokens=True)
        return [t.strip() for t in texts], tapped

    def _decode_transcripts(self, encoded: torch.Tensor) -> torch.Tensor:
        """Greedy transcript tokens of Whisper's encoder outputs ``encoded``, by :attr:`transcript_engine`: "graph"
        decodes them with :func:`editors.models.generation.transcripts.transcribe` where that module models the
        Whisper's generation config (and the transcripts hold no timestamp token), else transformers' ``generate``
        decodes them as the release does."""
        from transformers.modeling_outputs import BaseModelOutput

        from editors.models.generation.transcripts import TranscriptRules, transcribe

        whisper, new_tokens = self.model.perception.whisper, self.config.transcript_max_new_tokens
        rules = TranscriptRules.of(whisper) if self.transcript_engine == "graph" else None
        if rules is not None:
            ids = transcribe(whisper, encoded, new_tokens, rules)
            if not rules.has_timestamps(ids):
                return ids
            logger.info("a transcript holds a timestamp token: this batch decoded again by whisper.generate")
        return whisper.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), max_new_tokens=new_tokens)

    def _released_encoder_weights(self) -> contextlib.AbstractContextManager[None]:
        """While inside, the parameters named in :meth:`before_audio_encoder_edit` hold their released values."""
        from editors.models.parameters import swapped_parameters

        return swapped_parameters(self.model, self._released_encoder)

    def _features(self, audios: list[np.ndarray]) -> torch.Tensor:
        """Log-mel features padded to Whisper's chunk (30 s for the real model): the release's processor call's
        values, computed on :attr:`mel_device` (the model's device by default: no host spectrogram, no copy)."""
        return self.log_mel_features([np.asarray(a, dtype=np.float32) for a in audios],
                                     int(self.processor.feature_extractor.nb_max_frames))

    # ---- audio states -------------------------------------------------------------------------------------------

    def _encode_audios(self, audios: list[np.ndarray]) -> list[DeSTAAudioState]:
        self.transcripts(audios)  # one batched Whisper call for the audios not transcribed yet
        states: list[DeSTAAudioState | None] = [None] * len(audios)
        todo: list[int] = []
        for i, audio in enumerate(audios):
            path = self._disk_path("encoder", self._encoder_key(audio), ".safetensors")
            if self.encoder_states_on_disk and path is not None and path.is_file():
                tensors = load_file(path, device=str(self.device))
                tapped = [tensors[f"layer{k}"] for k in range(len(self.config.target_layer_ids))]
                states[i] = DeSTAAudioState(tapped, self.transcript_ids(audio))
            else:
                todo.append(i)
        if todo:
            tapped = self.model.perception.encode_tapped(self._features([audios[i] for i in todo]))
            for j, i in enumerate(todo):
                per_audio = [t[j].detach() for t in tapped]
                states[i] = DeSTAAudioState(per_audio, self.transcript_ids(audios[i]))
                self._save_encoder_states(audios[i], per_audio)
        return [s for s in states if s is not None]

    def _save_encoder_states(self, audio: np.ndarray, tapped: list[torch.Tensor]) -> None:
        """Write one audio's tapped states to the disk cache (when ``encoder_states_on_disk``)."""
        path = self._disk_path("encoder", self._encoder_key(audio), ".safetensors")
        if self.encoder_states_on_disk and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, save_tensors({f"layer{k}": t.contiguous().cpu() for k, t in enumerate(tapped)}))

    def project_audio(self, states: list[DeSTAAudioState]) -> torch.Tensor:
        """Per audio: the connector's prompt_size outputs, then the transcript's token embeddings (no grad, as in
        the release); concatenated over audios -> [sum of num_audio_tokens, hidden]."""
        n_layers = len(self.config.target_layer_ids)
        tapped = [torch.stack([s.tapped[k] for s in states]) for k in range(n_layers)]
        prompts = self.connector()(tapped)
        embed = self.language_model().embed_tokens
        prompts = prompts.to(embed.weight.dtype)
        pieces: list[torch.Tensor] = []
        for j, state in enumerate(states):
            pieces.append(prompts[j])
            if state.transcript_ids:
                with torch.no_grad():
                    ids = torch.tensor(state.transcript_ids, dtype=torch.long, device=embed.weight.device)
                    pieces.append(embed(ids))
        return torch.cat(pieces, dim=0)
