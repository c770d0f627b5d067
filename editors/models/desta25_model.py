"""DeSTA2.5-Audio rebuilt from transformers classes only (no remote code, no ``desta`` package).

Mirrors ``desta/models/modeling_desta25.py`` of the public implementation (github kehanlu/DeSTA2.5-Audio, commit
5503dfc): ``DeSTA25Config``, ``QformerConnector``, ``WhisperPerception.forward_whisper``,
``DeSTA25AudioModel._prepare_inputs_for_llm`` / ``from_pretrained`` / ``state_dict``. Our code, written from reading
it; the parameter tree is the same so the released ``model.safetensors`` loads unchanged:

    llm_model.*                              LlamaForCausalLM (base LLM, loaded from ``config.llm_model_id``)
    perception.whisper.*                     WhisperForConditionalGeneration (``config.encoder_model_id``)
    perception.connector.layer_prompts.{k}   (1, prompt_size, d_whisper)   one learned query set per tapped layer
    perception.connector.layer_weights       (prompt_size, n_tapped)        softmax over tapped layers, per query
    perception.connector.qformer.layer.{i}.* BertEncoder layers (self-attn + cross-attn + FFN), BertConfig()
                                             defaults except hidden=d_whisper, heads=whisper encoder heads
    perception.connector.proj.0.*            LayerNorm(d_whisper)
    perception.connector.proj.1.*            Linear(d_whisper -> LLM hidden)

The release's ``model.safetensors`` holds only the trainable tensors (its ``state_dict`` override keeps
``requires_grad`` ones), i.e. ``perception.connector.*``; the LLM and Whisper come from their own Hub ids named in
``config.json``. ``save_release_layout`` writes exactly that layout; ``from_pretrained`` reads it.

Forward (as in the release): Whisper's encoder is run layer by layer on 30 s-padded log-mel features
(conv1-gelu-conv2-gelu, + positions, layers without mask); the output of each tapped layer (before the encoder's
final LayerNorm) is the cross-attention memory of the Q-Former, whose input is that layer's learned prompts; the
per-layer Q-Former outputs are mixed with softmax(layer_weights) over layers, then LayerNorm + Linear. The Q-Former
is a decoder-configured ``BertEncoder`` run without masks and with eager attention, so its self-attention over the
prompts is bidirectional (checked by a test). The LLM input is the token embeddings of the chat text where the
audio placeholder span holds ``prompt_size`` connector outputs followed by the LLM embeddings of the Whisper
transcript's tokens.

Dtypes: the release loads the LLM in bf16 and Whisper + connector in fp32 (``from_pretrained`` without dtype) and
casts the connector output into the LLM's embedding dtype; ``from_pretrained`` here does the same by default
(``dtype`` for the LLM, ``perception_dtype`` = fp32).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, PreTrainedModel, WhisperForConditionalGeneration
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

try:  # transformers >= 5 spells it PreTrainedConfig
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.bert.modeling_bert import BertEncoder

from editors.models.kernels import encoder_convolutions
from sake_core.atomic import atomic_write
from sake_core.errors import DataError

logger = logging.getLogger(__name__)

RELEASE_HUB_ID = "DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Tapped Whisper encoder layers per encoder id, as the release's QformerConnector sets them.
TARGET_LAYERS_BY_ENCODER: dict[str, list[int]] = {
    "openai/whisper-medium": [5, 11, 17, 23],
    "openai/whisper-small": [2, 5, 8, 11],
    "openai/whisper-tiny": [0, 1, 2, 3],
    "openai/whisper-large-v3": [7, 15, 23, 31],
}


class DeSTA25Config(PreTrainedConfig):
    """Configuration with the release's field names (``config.json`` of the Hub checkpoint reads into it).

    ``llm_config`` / ``encoder_config``: taken from the file when present (dicts with ``model_type``), else
    fetched with ``AutoConfig.from_pretrained`` from the two ids (the release always does the latter).
    ``target_layer_ids``: the release derives it from ``encoder_model_id`` (table above) and stores it in the saved
    config; an explicit list is used as given (needed for the tiny model and for local Whisper dirs).
    ``transcript_max_new_tokens`` (ours, release value 128) bounds Whisper's transcript decoding;
    ``qformer_intermediate_size`` (ours, ``None`` = BertConfig default 3072 as in the release) lets the tiny model
    stay small. Other keys of a release ``config.json`` are kept as attributes.
    """

    model_type = "desta25"

    def __init__(
        self,
        llm_model_id: str = "DeSTA-ntu/Llama-3.1-8B-Instruct",
        encoder_model_id: str = "openai/whisper-large-v3",
        connector_mode: str = "qformer_1",
        qformer_num_hidden_layers: int = 2,
        prompt_size: int = 64,
        use_lora: bool = False,
        audio_locator: str = "<|AUDIO|>",
        placeholder_token: str = "<|reserved_special_token_87|>",
        target_layer_ids: list[int] | None = None,
        qformer_intermediate_size: int | None = None,
        transcript_max_new_tokens: int = 128,
        llm_config: dict | PreTrainedConfig | None = None,
        encoder_config: dict | PreTrainedConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if connector_mode != "qformer_1":
            raise NotImplementedError(f"connector_mode {connector_mode!r}: only 'qformer_1' exists in the release")
        if use_lora:
            raise NotImplementedError("use_lora=True checkpoints (LoRA on the LLM) are not supported")
        if target_layer_ids is None:
            if encoder_model_id not in TARGET_LAYERS_BY_ENCODER:
                raise ValueError(
                    f"target_layer_ids not given and encoder_model_id {encoder_model_id!r} is not one of "
                    f"{sorted(TARGET_LAYERS_BY_ENCODER)}"
                )
            target_layer_ids = TARGET_LAYERS_BY_ENCODER[encoder_model_id]
        self.llm_model_id = llm_model_id
        self.encoder_model_id = encoder_model_id
        self.connector_mode = connector_mode
        self.qformer_num_hidden_layers = int(qformer_num_hidden_layers)
        self.prompt_size = int(prompt_size)
        self.use_lora = use_lora
        self.audio_locator = audio_locator
        self.placeholder_token = placeholder_token
        self.target_layer_ids = [int(i) for i in target_layer_ids]
        self.qformer_intermediate_size = qformer_intermediate_size
        self.transcript_max_new_tokens = int(transcript_max_new_tokens)
        self.llm_config = _as_config(llm_config, llm_model_id)
        self.encoder_config = _as_config(encoder_config, encoder_model_id)
        super().__init__(**kwargs)

    def qformer_config(self) -> BertConfig:
        """The Q-Former's BertConfig: release defaults, sized by Whisper's encoder, eager (unmasked) attention."""
        kwargs: dict[str, Any] = dict(
            num_hidden_layers=self.qformer_num_hidden_layers,
            num_attention_heads=self.encoder_config.encoder_attention_heads,
            hidden_size=self.encoder_config.d_model,
            add_cross_attention=True,
            is_decoder=True,
        )
        if self.qformer_intermediate_size is not None:
            kwargs["intermediate_size"] = self.qformer_intermediate_size
        config = BertConfig(**kwargs)
        # eager attention ignores `is_causal`: bidirectional self-attention over the prompts, as in the release
        config._attn_implementation = "eager"
        return config


class QFormerConnector(nn.Module):
    """``perception.connector``: learned prompts per tapped layer -> BertEncoder (cross-attn) -> layer mix -> proj."""

    def __init__(self, config: DeSTA25Config) -> None:
        super().__init__()
        self.target_layer_ids = list(config.target_layer_ids)
        self.prompt_size = config.prompt_size
        d_model = config.encoder_config.d_model
        n_layers = len(self.target_layer_ids)
        self.layer_prompts = nn.ParameterList(
            [nn.Parameter(torch.randn(1, config.prompt_size, d_model)) for _ in range(n_layers)]
        )
        self.layer_weights = nn.Parameter(torch.zeros(config.prompt_size, n_layers, dtype=torch.float))
        self.qformer = BertEncoder(config.qformer_config())
        self.proj = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, config.llm_config.hidden_size))

    def forward(self, tapped_states: list[torch.Tensor]) -> torch.Tensor:
        """tapped_states[k]: (batch, frames, d_whisper) output of encoder layer target_layer_ids[k].

        Returns (batch, prompt_size, llm_hidden)."""
        n_layers = len(self.target_layer_ids)
        if len(tapped_states) != n_layers:
            raise ValueError(f"expected {n_layers} tapped layers, got {len(tapped_states)}")
        # The release runs the Q-Former once per tapped layer; here the layers are one batch (layer-major), the same
        # per-sample math in one set of kernel launches (FT-Audio's training steps on DeSTA2.5 were bound by their
        # launches). Results agree with the per-layer loop to float rounding (~5e-7), not bit for bit.
        batch = tapped_states[0].size(0)
        prompts = torch.cat([self.layer_prompts[k].expand(batch, -1, -1) for k in range(n_layers)], dim=0)
        out = self.qformer(prompts, encoder_hidden_states=torch.cat(list(tapped_states), dim=0)).last_hidden_state
        out = out[:, : self.prompt_size, :]
        stacked = out.reshape(n_layers, batch, *out.shape[1:]).permute(1, 2, 0, 3)  # (b, prompt, layer, d)
        mix = torch.softmax(self.layer_weights, dim=-1).unsqueeze(-1)  # (prompt, layer, 1)
        mixed = (stacked * mix).sum(dim=2)
        return self.proj(mixed)


class WhisperPerception(nn.Module):
    """``perception``: the frozen Whisper (encoder taps + decoder for transcripts) and the trainable connector."""

    def __init__(self, config: DeSTA25Config, whisper: WhisperForConditionalGeneration) -> None:
        super().__init__()
        self.whisper = whisper
        self.connector = QFormerConnector(config)
        self.target_layer_ids = list(config.target_layer_ids)

    @property
    def expected_frames(self) -> int:
        encoder = self.whisper.model.encoder
        return encoder.config.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]

    def encode_tapped(self, input_features: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the tapped encoder layers (pre final LayerNorm), as the release's ``forward_whisper`` (grad
        follows torch's mode: the adapter runs it without grad, FT-Encoder with).

        input_features: (batch, n_mels, expected_frames). Layers above the last tapped one are skipped (their
        output is not used)."""
        tapped, _ = self._run_encoder(input_features, max(self.target_layer_ids) + 1)
        return tapped

    def encode_for_transcript(self, input_features: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One pass of Whisper's whole encoder: the tapped layers' outputs (as :meth:`encode_tapped`) and the
        encoder's output (after its final LayerNorm, what ``whisper.generate`` decodes transcripts from), so one
        encoder run serves both the transcript and the connector."""
        n_layers = len(self.whisper.model.encoder.layers)
        tapped, hidden = self._run_encoder(input_features, n_layers)
        return tapped, self.whisper.model.encoder.layer_norm(hidden)

    def _run_encoder(self, input_features: torch.Tensor, n_layers: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The first ``n_layers`` encoder layers, as ``WhisperEncoder.forward`` runs them in eval mode: the tapped
        layers' outputs and the last layer's output."""
        if input_features.shape[-1] != self.expected_frames:
            raise ValueError(
                f"Whisper expects {self.expected_frames} mel frames (padded chunk), got {input_features.shape[-1]}"
            )
        encoder = self.whisper.model.encoder
        param = encoder.conv1.weight
        features = input_features.to(device=param.device, dtype=param.dtype)
        with encoder_convolutions():  # torch's own kernels: no cuDNN plan per batch shape (editors/models/kernels.py)
            hidden = nn.functional.gelu(encoder.conv1(features))
            hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + encoder.embed_positions.weight[: encoder.config.max_source_positions, :]
        tapped: list[torch.Tensor] = []
        for idx, layer in enumerate(list(encoder.layers)[:n_layers]):
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
            if idx in self.target_layer_ids:
                tapped.append(hidden)
        return tapped, hidden

    def forward(self, tapped_states: list[torch.Tensor]) -> torch.Tensor:
        return self.connector(tapped_states)


class DeSTA25Model(nn.Module):
    """The whole model: ``llm_model`` + ``perception`` (names as in the release)."""

    #: a causal LM (a PreTrainedModel with transformers' GenerationMixin: ``generate``)
    llm_model: Any

    def __init__(self, config: DeSTA25Config, llm_model: PreTrainedModel, whisper: WhisperForConditionalGeneration):
        super().__init__()
        self.config = config
        self.llm_model = llm_model
        self.perception = WhisperPerception(config, whisper)
        for p in self.llm_model.parameters():
            p.requires_grad_(False)
        for p in self.perception.whisper.parameters():
            p.requires_grad_(False)

    # -- parameters ------------------------------------------------------------------------------------------
    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """What the release's ``state_dict`` saves: the connector (the only trainable part, ``use_lora=False``)."""
        return {f"perception.connector.{k}": v.detach() for k, v in self.perception.connector.state_dict().items()}

    # -- forward ---------------------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        audio_embeds: torch.Tensor | None = None,
        audio_positions: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with connector outputs written at the audio spans.

        audio_embeds: (n_audio, prompt_size, hidden); audio_positions[j] = (row, start) of audio j's span. The
        transcript tokens that follow each span are ordinary ids in ``input_ids`` (the release writes their
        embeddings over placeholder ids: same values)."""
        embeds = self.llm_model.get_input_embeddings()(input_ids)
        if audio_embeds is None:
            return embeds
        if audio_positions is None or len(audio_positions) != audio_embeds.size(0):
            raise ValueError("audio_positions must give one (row, start) per audio embedding")
        size = audio_embeds.size(1)
        embeds = embeds.clone()
        for j, (row, start) in enumerate(audio_positions):
            embeds[row, start : start + size] = audio_embeds[j].to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        audio_embeds: torch.Tensor | None = None,
        audio_positions: list[tuple[int, int]] | None = None,
        labels: torch.Tensor | None = None,
        **llm_kwargs: Any,
    ) -> CausalLMOutputWithPast:
        embeds = self.embed(input_ids, audio_embeds, audio_positions)
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
            **llm_kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """The LLM's ``generate`` from prepared embeddings (returns only the new tokens), as the release does."""
        return self.llm_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # -- save / load -----------------------------------------------------------------------------------------
    def save_release_layout(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` (connector tensors only) as the Hub release stores them."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config_dict = self.config.to_dict()
        atomic_write(out / CONFIG_NAME, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.contiguous().cpu() for k, v in self.release_state_dict().items()}
        atomic_write(out / WEIGHTS_NAME, save_tensors(tensors, metadata={"format": "pt"}))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = RELEASE_HUB_ID,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        perception_dtype: torch.dtype = torch.float32,
        llm_model_id: str | None = None,
        encoder_model_id: str | None = None,
        revision: str | None = None,
    ) -> "DeSTA25Model":
        """Load a release-layout checkpoint (Hub id or local dir) plus the base LLM and Whisper its config names.

        ``llm_model_id`` / ``encoder_model_id`` override the ids in the config (e.g. local copies). Every tensor of
        ``model.safetensors`` must map onto a parameter (no unexpected keys) and every connector parameter must be
        in it (no missing keys); ``llm_model.*`` / ``perception.whisper.*`` tensors, if a file has them, override
        the base weights."""
        config_path = _resolve_file(name_or_path, CONFIG_NAME, revision)
        weights_path = _resolve_file(name_or_path, WEIGHTS_NAME, revision)
        with open(config_path, encoding="utf-8") as f:
            config_dict = json.load(f)
        if config_dict.get("model_type") not in (None, DeSTA25Config.model_type):
            raise DataError(f"{config_path}: model_type {config_dict.get('model_type')!r}, expected 'desta25'")
        config_dict.pop("model_type", None)
        config_dict.pop("transformers_version", None)
        for key in ("llm_model_id", "encoder_model_id"):
            if not config_dict.get(key):
                raise DataError(f"{config_path}: missing {key!r}")
        # the config keeps the release's ids; overrides (local copies) only change where the weights come from
        llm_source = llm_model_id or config_dict["llm_model_id"]
        whisper_source = encoder_model_id or config_dict["encoder_model_id"]
        logger.info("loading LLM %s (%s)", llm_source, dtype)
        llm = AutoModelForCausalLM.from_pretrained(llm_source, dtype=dtype)
        logger.info("loading Whisper %s (%s)", whisper_source, perception_dtype)
        whisper = WhisperForConditionalGeneration.from_pretrained(whisper_source, dtype=perception_dtype)
        # the loaded models' configs are authoritative (the release re-fetches them from the ids too); copies, so
        # that settings made on the composite config (e.g. attention implementation) never reach the live models
        config_dict["llm_config"] = llm.config.to_dict()
        config_dict["encoder_config"] = whisper.config.to_dict()
        config = DeSTA25Config(**config_dict)
        model = cls(config, llm, whisper)
        model.perception.connector.to(perception_dtype)
        model.load_release_tensors(load_file(weights_path), source=str(weights_path))
        model.to(device)
        model.eval()
        return model

    def load_release_tensors(self, tensors: dict[str, torch.Tensor], source: str = "<tensors>") -> None:
        """Copy release-layout tensors in; raise naming missing/unexpected keys or shape mismatches."""
        own: dict[str, torch.Tensor] = dict(self.named_parameters())
        own.update(dict(self.named_buffers()))
        unexpected = sorted(k for k in tensors if k not in own)
        connector_names = [f"perception.connector.{k}" for k in self.perception.connector.state_dict()]
        missing = sorted(k for k in connector_names if k not in tensors)
        if unexpected or missing:
            raise DataError(
                f"{source}: state dict does not match DeSTA2.5 layout; missing={missing[:10]} "
                f"(+{max(0, len(missing) - 10)}), unexpected={unexpected[:10]} (+{max(0, len(unexpected) - 10)})"
            )
        with torch.no_grad():
            for name, value in tensors.items():
                target = own[name]
                if tuple(target.shape) != tuple(value.shape):
                    raise DataError(
                        f"{source}: {name} has shape {tuple(value.shape)}, model has {tuple(target.shape)}"
                    )
                target.copy_(value.to(device=target.device, dtype=target.dtype))


def _as_config(value: dict | PreTrainedConfig | None, model_id: str) -> PreTrainedConfig:
    """A sub-config from a config instance (copied), a dict with ``model_type``, or the model id (Hub/dir)."""
    if value is None:
        return AutoConfig.from_pretrained(model_id)
    if isinstance(value, PreTrainedConfig):
        value = value.to_dict()
    if not isinstance(value, dict) or value.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(f"sub-config for {model_id!r} must be a dict with a known model_type, got {value!r:.80}")
    value = {k: v for k, v in value.items() if k != "transformers_version"}
    return CONFIG_MAPPING[value["model_type"]](**value)


def _resolve_file(name_or_path: str | os.PathLike, filename: str, revision: str | None) -> Path:
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (a DeSTA2.5 release dir holds {CONFIG_NAME} and {WEIGHTS_NAME})")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(name_or_path), filename=filename, revision=revision))


