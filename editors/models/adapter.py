"""The LALM adapter interface: the only way editing methods and the runner talk to a model.

An adapter wraps one large audio-language model (audio encoder -> modality connector -> decoder-only LLM) and
offers, in model-neutral words:

* prompts: :class:`Prompt` (optional 16 kHz audio, a question, an optional system prompt and an optional multi-turn
  history of :class:`Turn` s for in-context examples);
* :meth:`LALMAdapter.generate`: batched greedy generation (left padding) -> decoded strings;
* :meth:`LALMAdapter.target_loss`: teacher-forced cross-entropy over the target answer's tokens only;
* structure: :meth:`connector`, :meth:`audio_encoder`, :meth:`llm_layers`, :meth:`mlp_out_proj`,
  :attr:`num_llm_layers`, :meth:`parameter_groups` (named groups of parameter names);
* the frozen-prefix fast paths (measured in ``bench/NOTES.md``):
  - :meth:`audio_states` runs the (frozen) audio encoder once per distinct audio and caches the result, and
    :meth:`project_audio` maps those states through the connector (differentiable), so FT-Audio trains the
    connector without recomputing the encoder and every generation starts from ``inputs_embeds``;
  - :meth:`hidden_entering` computes the hidden states entering LLM layer ``i`` once (no grad), and
    :meth:`logits_from` / :meth:`loss_from` run the model from there, so FT-LLM (and UnKE, WISE, ...) recompute
    only the layers they edit;
  - :meth:`tail_state` cuts such a state to the columns a method can change (from a residual's column, or from
    :meth:`first_audio_column` for the connector): the earlier columns' keys and values are computed once.

A model family (Qwen2-Audio, Audio Flamingo 3, DeSTA2.5-Audio) subclasses :class:`LALMAdapter` and implements
the abstract members: where its modules live, how a conversation is rendered to text with audio placeholders,
how many placeholder tokens an audio takes, how the frozen encoder runs and how the connector maps its output.
Everything generic (tokenizing, padding, embedding, masks, losses, generation) lives here.

Conventions
-----------
* Audio: 1-D float32 numpy arrays at :data:`SAMPLING_RATE` (16 kHz), values in [-1, 1].
* Layer indices may be negative (``-1`` = last LLM layer); :meth:`resolve_layer` normalises them.
* A target answer is scored as its tokens followed by the model's end-of-turn token, so that "greedy output equals
  the target" includes stopping after it.
* Parameter names are those of ``adapter.model.named_parameters()``.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from editors.models.batch import (IGNORE_INDEX, FrozenColumns, LayerState, PackedSequences, PromptBatch,
                                  continued_rows, to_device)
from editors.models.fused_layer import RotaryTables, fused_layers_on, layer_forward, rms_norm, supports
from editors.models.generation import GeneratedText, GenerationSettings, PerEdit, PromptRouting, resolve_settings
from editors.models.generation import generate as _generate
from editors.models.kernels import generation_attention
from editors.models.prompts import Prompt, audio_digest
from editors.models.weights import weights_digest
from sake_core.errors import ConfigError

logger = logging.getLogger(__name__)


def _mask_cache_arg() -> str:
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


_CACHE_ARG = _mask_cache_arg()


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` bool: query ``i`` of a row may attend to key ``j`` when ``j <= i`` and ``j`` is not padding
    (the boolean mask transformers builds for SDPA, on the rows' valid queries)."""
    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def _tail_builds_mask(device: torch.device) -> bool:
    """Whether a tail state of a batch without padding (transformers passed no mask: causal attention) builds its
    own mask. Not on the CPU: there the masked kernel's gradient is not the unmasked one's bit for bit, so such a
    batch runs whole (tests compare the CPU's tail states with the whole width bit for bit)."""
    return device.type == "cuda"


class LALMAdapter(abc.ABC):
    """Base class of every model family's adapter (see the module docstring).

    Subclasses set :attr:`family` (the key of the hparams YAML entries, e.g. ``qwen2_audio``) and implement the
    abstract members. Construct with :meth:`from_pretrained` (Hub id or local dir) or :meth:`tiny` (random-init
    small config of the real class with an offline tokenizer and processor, for tests and CI).
    """

    family: ClassVar[str] = ""
    #: Hub id of the full-size model, for messages and defaults.
    default_hub_id: ClassVar[str] = ""
    #: Bytes of cached encoder states (LRU; the audios of the current call always stay): a pass of K edits reads
    #: each clip in its pre-edit and again in its post-edit generation, and IE-IKE's demonstrations add ~8 clips per
    #: edit, ~400 distinct clips at K=26. A count of 256 evicted the pre-edit clips before the post-edit generation
    #: read them (bench/NOTES.md); Qwen2-Audio's states are ~1 MB per clip (bf16, up to 750 x 1280).
    audio_cache_bytes: int = 4 * 2**30
    #: The family's transformers model. Typed Any: its children (audio tower, connector, LLM) differ per family and
    #: only the family module navigates them, while torch types every attribute of a Module as ``Tensor | Module``.
    model: Any

    def __init__(self, model: nn.Module, processor: Any, *, model_id: str, revision: str = "",
                 is_tiny: bool = False) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.revision = revision
        self.is_tiny = is_tiny
        self.model.eval()
        self.model.requires_grad_(False)
        self._audio_cache: OrderedDict[str, Any] = OrderedDict()
        self._audio_cache_held = 0  # bytes of the cached states
        self._weights_digest: str | None = None  # of a local model directory's weight files (model_key)
        self.audio_encoder_calls = 0  # how many audios the encoder has processed (tests/bench read it)
        #: An installed module that decides from each prompt which weights its row computes with (WISE's router):
        #: a plain generation asks it for the rows' plan (``editors.models.generation.PromptRouting``).
        self.prompt_routing: PromptRouting | None = None

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, id_or_dir: str, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                        revision: str | None = None, is_tiny: bool = False) -> "LALMAdapter":
        """Load the real checkpoint (Hub id or local directory) in ``dtype`` on ``device``."""

    @classmethod
    @abc.abstractmethod
    def tiny(cls, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "LALMAdapter":
        """A random-init tiny model of the real class, with a tokenizer and processor built offline."""

    def save_pretrained(self, directory: str | Path) -> None:
        """Save model + processor so that :meth:`from_pretrained` on the directory gives the same model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    # ---- structure (family-specific) ----------------------------------------------------------------------------

    @abc.abstractmethod
    def connector(self) -> nn.Module:
        """The modality connector between the audio encoder and the LLM (FT-Audio trains it)."""

    @abc.abstractmethod
    def audio_encoder(self) -> nn.Module:
        """The audio encoder (frozen under every method)."""

    @abc.abstractmethod
    def language_model(self) -> Any:
        """The decoder stack (a transformers module): has ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb`` and
        ``config``."""

    @abc.abstractmethod
    def lm_head(self) -> nn.Linear:
        """The output projection to the vocabulary."""

    def llm_layers(self) -> nn.ModuleList:
        """The LLM decoder layers, bottom first."""
        return self.language_model().layers

    @property
    def num_llm_layers(self) -> int:
        return len(self.llm_layers())

    def resolve_layer(self, layer: int) -> int:
        """Normalise a (possibly negative) LLM layer index; ValueError when out of range."""
        n = self.num_llm_layers
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ConfigError(f"LLM layer {layer} out of range for {self.model_id} ({n} layers)")
        return idx

    def llm_layer(self, layer: int) -> Any:
        """LLM decoder layer ``layer`` (a transformers module: ``self_attn``, ``mlp``, ...)."""
        return self.llm_layers()[self.resolve_layer(layer)]

    def mlp(self, layer: int) -> nn.Module:
        """The feed-forward block of LLM layer ``layer``."""
        return self.llm_layer(layer).mlp

    def mlp_out_proj_name(self) -> str:
        """Attribute name of the FFN output projection inside :meth:`mlp` (``down_proj`` for Qwen2/Llama)."""
        return "down_proj"

    def mlp_out_proj(self, layer: int) -> nn.Module:
        """The FFN output projection (a Linear: intermediate -> hidden) of LLM layer ``layer``."""
        return getattr(self.mlp(layer), self.mlp_out_proj_name())

    def set_mlp_out_proj(self, layer: int, module: nn.Module) -> nn.Module:
        """Replace the FFN output projection of ``layer`` (e.g. by a WISE side-memory router); returns the old one."""
        mlp = self.mlp(layer)
        old = getattr(mlp, self.mlp_out_proj_name())
        setattr(mlp, self.mlp_out_proj_name(), module)
        return old

    #: Role of a Linear inside an LLM decoder layer -> its attribute path (Qwen2 / Llama names; a family with other
    #: names overrides this mapping).
    LLM_LINEAR_PATHS: ClassVar[dict[str, str]] = {
        "query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj", "mlp_gate": "mlp.gate_proj", "mlp_up": "mlp.up_proj",
        "mlp_out": "mlp.down_proj",
    }

    def llm_linear(self, layer: int, role: str) -> nn.Module:
        """The Linear of LLM layer ``layer`` with ``role`` (a key of :attr:`LLM_LINEAR_PATHS`: query, key, value,
        attn_out, mlp_gate, mlp_up, mlp_out)."""
        if role not in self.LLM_LINEAR_PATHS:
            raise ConfigError(f"unknown LLM linear role {role!r}; expected one of {sorted(self.LLM_LINEAR_PATHS)}")
        return self.llm_layer(layer).get_submodule(self.LLM_LINEAR_PATHS[role])

    def module_name(self, module: nn.Module) -> str:
        """The dotted name of a submodule of :attr:`model`."""
        for name, mod in self.model.named_modules():
            if mod is module:
                return name
        raise KeyError("module is not part of this model")

    def parameter_names(self, module: nn.Module) -> list[str]:
        """Full parameter names (as in ``model.named_parameters()``) of a submodule's parameters."""
        prefix = self.module_name(module)
        return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named groups of parameter names: ``connector``, ``audio_encoder``, ``embeddings``, ``lm_head``,
        ``llm_layer.{i}``, ``llm_mlp.{i}`` and ``llm_mlp_out.{i}`` for every LLM layer i."""
        groups: dict[str, list[str]] = {
            "connector": self.parameter_names(self.connector()),
            "audio_encoder": self.parameter_names(self.audio_encoder()),
            "embeddings": self.parameter_names(self.language_model().embed_tokens),
            "lm_head": self.parameter_names(self.lm_head()),
        }
        for i in range(self.num_llm_layers):
            groups[f"llm_layer.{i}"] = self.parameter_names(self.llm_layer(i))
            groups[f"llm_mlp.{i}"] = self.parameter_names(self.mlp(i))
            groups[f"llm_mlp_out.{i}"] = self.parameter_names(self.mlp_out_proj(i))
        return groups

    def named_parameter_dict(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    @property
    def device(self) -> torch.device:
        return self.lm_head().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head().weight.dtype

    # ---- prompt rendering (family-specific) ---------------------------------------------------------------------

    @abc.abstractmethod
    def render(self, prompt: Prompt) -> str:
        """The prompt as model text, ending with the assistant turn's opening, with exactly one
        :attr:`audio_placeholder` per audio (in :meth:`Prompt.audios` order)."""

    @property
    @abc.abstractmethod
    def audio_placeholder(self) -> str:
        """The special token that stands for one audio embedding position (repeated n times per audio)."""

    @property
    @abc.abstractmethod
    def end_of_turn(self) -> str:
        """The token that ends an assistant turn; appended to targets and used as a stop token."""

    @abc.abstractmethod
    def num_audio_tokens(self, audio: np.ndarray) -> int:
        """How many placeholder tokens (= connector outputs) the audio takes."""

    @abc.abstractmethod
    def _encode_audios(self, audios: list[np.ndarray]) -> list[Any]:
        """Run the audio encoder on a list of audios; one state object per audio (callers choose the grad mode:
        :meth:`audio_states` runs it without grad, :meth:`audio_states_with_grad` with)."""

    @abc.abstractmethod
    def project_audio(self, states: list[Any]) -> torch.Tensor:
        """Connector outputs of a list of audio states, concatenated: [sum of num_audio_tokens, hidden].
        Differentiable with respect to the connector's parameters."""

    # ---- trainable audio encoder (FT-Encoder) ---------------------------------------------------------------------

    def audio_encoder_layers(self) -> list[nn.Module]:
        """The audio encoder's transformer layers whose outputs reach the connector, bottom first (FT-Encoder
        trains the last N). A family without this capability raises NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its audio encoder layers")

    def audio_states_with_grad(self, audios: Sequence[np.ndarray]) -> list[Any]:
        """Encoder states of ``audios`` computed now, with autograd (gradients reach encoder parameters that
        require grad) and without the cache; same layout as :meth:`audio_states`."""
        with torch.enable_grad():
            return self._encode_audios(list(audios))

    def before_audio_encoder_edit(self, names: Sequence[str]) -> None:
        """Called once by a method that will change the audio-encoder parameters ``names``, before any change. A
        family whose other audio-derived inputs must stay those of the released encoder (DeSTA2.5's Whisper
        transcripts) keeps what it needs here; the default does nothing."""

    # ---- audio states -------------------------------------------------------------------------------------------

    #: Clips per audio-encoder call on CUDA (on CPU: one, see :meth:`audio_states`).
    encoder_batch_cuda: int = 16

    def audio_states(self, audios: Sequence[np.ndarray], batch_size: int | None = None) -> list[Any]:
        """Frozen encoder output for each audio, computed once per distinct audio content and cached (LRU).

        One clip per encoder call on CPU (default): a clip's states then never depend on which clips it was encoded
        with (editors/models/buckets.py), so a warm cache, a resume or another pass grouping give the same features
        (byte-identical rows in fp32). On CUDA :attr:`encoder_batch_cuda` clips per call: bf16 kernels choose by the
        whole shape there anyway, and one clip per call left the encoder launch-bound (about 0.25 s per edit of a
        cold pass of 10-item edits at 7B on an H200, bench/NOTES.md)."""
        if batch_size is None:
            batch_size = self.encoder_batch_cuda if self.device.type == "cuda" else 1
        keys = [audio_digest(a) for a in audios]
        missing: dict[str, np.ndarray] = {}
        for key, audio in zip(keys, audios):
            if key not in self._audio_cache and key not in missing:
                missing[key] = audio
        if missing:
            self.warm_audio(list(missing.values()))  # a family's per-audio work may cache their states on the way
            missing = {k: a for k, a in missing.items() if k not in self._audio_cache}
        if missing:  # longest first: a batch's clips are of like length (an encoder may run only as wide as needed)
            todo = sorted(missing.items(), key=lambda item: -len(item[1]))
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                with torch.no_grad(), generation_attention():  # never cuDNN's attention (its plan per shape)
                    states = self._encode_audios([a for _, a in chunk])
                self.audio_encoder_calls += len(chunk)
                for (key, _), state in zip(chunk, states):
                    self._cache_audio_state(key, state)
        out = []
        for key in keys:
            self._audio_cache.move_to_end(key)
            out.append(self._audio_cache[key])
        self._evict_audio_states(keep=len(set(keys)))
        return out

    #: Clips :meth:`encode_ahead` hands to :meth:`audio_states` at a time.
    encode_ahead_clips: int = 64

    def encode_ahead(self, audios: Sequence[np.ndarray]) -> None:
        """Encode a generation's ``audios`` before its batches reach them, :attr:`encode_ahead_clips` at a time:
        :meth:`audio_states` then sorts many clips into encoder batches of like length (an encoder may run only as
        wide as a batch's longest clip needs) instead of each prefill batch's few of mixed lengths. It stops once
        the states it encoded fill :attr:`audio_cache_bytes`; the batches encode the rest as they reach them. Outputs
        do not change (on CPU every clip is encoded alone)."""
        distinct = list({audio_digest(a): a for a in audios}.values())
        held = 0
        for start in range(0, len(distinct), self.encode_ahead_clips):
            if held >= self.audio_cache_bytes:
                break
            held += sum(_nbytes(s) for s in self.audio_states(distinct[start:start + self.encode_ahead_clips]))

    def keep_audio_state(self, audio: np.ndarray, state: Any) -> None:
        """Cache ``state`` as ``audio``'s encoder output, for a family whose other per-audio work (DeSTA2.5's
        transcripts) runs the encoder anyway; the cache keeps at most :attr:`audio_cache_bytes`."""
        self._cache_audio_state(audio_digest(audio), state)
        self._evict_audio_states(keep=1)

    def _cache_audio_state(self, key: str, state: Any) -> None:
        if key in self._audio_cache:
            self._audio_cache_held -= _nbytes(self._audio_cache[key])
        self._audio_cache[key] = state
        self._audio_cache.move_to_end(key)
        self._audio_cache_held += _nbytes(state)

    def _evict_audio_states(self, keep: int) -> None:
        """Drop the least recently used states beyond :attr:`audio_cache_bytes`, never the ``keep`` most recent."""
        while len(self._audio_cache) > keep and self._audio_cache_held > self.audio_cache_bytes:
            _, state = self._audio_cache.popitem(last=False)
            self._audio_cache_held -= _nbytes(state)

    def clear_audio_cache(self) -> None:
        """Forget cached encoder states (call after anything changes the audio encoder's parameters)."""
        self._audio_cache.clear()
        self._audio_cache_held = 0

    # ---- tokenization -------------------------------------------------------------------------------------------

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def target_token_ids(self, target: str) -> list[int]:
        """Token ids a target answer is scored on: the answer's tokens then the end-of-turn token."""
        return self._token_ids(target) + self._token_ids(self.end_of_turn)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = {int(i) for i in self._token_ids(self.end_of_turn)}
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    @property
    def audio_placeholder_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.audio_placeholder))

    def warm_audio(self, audios: Sequence[np.ndarray]) -> None:
        """Hook called with every audio of a :meth:`generate` / :meth:`prepare` call before tokenization, and with
        the audios :meth:`audio_states` is about to encode; a family whose placeholder count needs per-audio work
        (DeSTA2.5's transcripts) batches that work here, and may cache the audios' states on the way
        (:meth:`keep_audio_state`)."""

    def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids with each audio placeholder expanded to its embedding count.

        The rendered text is tokenized with one placeholder per audio and each placeholder id then repeated: the
        placeholder is an added token, which the tokenizer splits out before anything else, so this equals
        tokenizing the text with every placeholder repeated (tests/test_generation.py), at a fraction of the cost
        for prompts with many clips."""
        audios = prompt.audios()
        ids = self._token_ids(self.render(prompt))
        slot = self.audio_placeholder_id
        positions = [i for i, token in enumerate(ids) if token == slot]
        if len(positions) != len(audios):
            raise ValueError(f"rendered prompt has {len(positions)} audio placeholders for {len(audios)} audios")
        out: list[int] = []
        previous = 0
        for position, audio in zip(positions, audios):
            out.extend(ids[previous:position])
            out.extend([slot] * self.num_audio_tokens(audio))
            previous = position + 1
        out.extend(ids[previous:])
        return out

    def prepare(self, prompts: Sequence[Prompt], targets: Sequence[str] | None = None,
                token_ids: Sequence[list[int]] | None = None, *, packed: bool = False) -> PromptBatch:
        """Tokenize and left-pad prompts (+ targets for teacher forcing) and fetch their audio states.

        ``token_ids`` (optional) are the prompts' :meth:`prompt_token_ids`, when already computed. ``packed``: one
        row holding the prompts back to back without padding, each attending within itself only (for the layer runs
        of :meth:`packs_sequences`; generation takes left-padded batches)."""
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if token_ids is None:
            self.warm_audio([a for p in prompts for a in p.audios()])
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        all_audios: list[np.ndarray] = []
        prompt_lengths: list[int] = []
        for i, prompt in enumerate(prompts):
            ids = list(token_ids[i]) if token_ids is not None else self.prompt_token_ids(prompt)
            prompt_lengths.append(len(ids))
            labels = [IGNORE_INDEX] * len(ids)
            if targets is not None:
                tgt = self.target_token_ids(targets[i])
                ids = ids + tgt
                labels = labels + tgt
            rows.append(ids)
            label_rows.append(labels)
            all_audios.extend(prompt.audios())
        if packed:
            shared = self._shared_prefix(rows, prompt_lengths)
            lengths = [len(r) - shared for r in rows]
            if shared:
                lengths = [shared] + lengths
            return self._collate([rows[0][:shared] + [t for r in rows for t in r[shared:]]], all_audios,
                                 [label_rows[0][:shared] + [t for lab in label_rows for t in lab[shared:]]]
                                 if targets is not None else None, lengths=lengths, shared_prefix=shared)
        return self._collate(rows, all_audios, label_rows if targets is not None else None)

    def _shared_prefix(self, rows: list[list[int]], prompt_lengths: list[int]) -> int:
        """The columns a packed row computes once for all its prompts: their common first tokens (the chat
        template's) before any audio placeholder, leaving each prompt at least its last prompt token; 0 for one
        prompt. Those columns' hidden states depend on nothing else (causal attention), so each prompt attending to
        the one copy computes what it computes alone."""
        if len(rows) < 2:
            return 0
        limit = min(prompt_lengths) - 1
        slot = self.audio_placeholder_id
        shared = 0
        while shared < limit and rows[0][shared] != slot and all(r[shared] == rows[0][shared] for r in rows):
            shared += 1
        return shared

    def _collate(self, rows: list[list[int]], audios: list[np.ndarray], label_rows: list[list[int]] | None = None,
                 lengths: list[int] | None = None, shared_prefix: int = 0) -> PromptBatch:
        """Left-pad token rows into a :class:`PromptBatch` (``audios``: every audio of the rows, in order).
        ``lengths``: the one row holds sequences of these lengths back to back (a packed batch), the first of them
        a prefix of every later one where ``shared_prefix`` (its length) is set."""
        all_audios = audios
        targets = label_rows
        if label_rows is None:
            label_rows = [[IGNORE_INDEX] * len(r) for r in rows]
        width = max(len(r) for r in rows)
        pad = self.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, labels) in enumerate(zip(rows, label_rows)):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids):] = 1
            labels_t[i, width - len(ids):] = torch.tensor(labels, dtype=torch.long)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        if lengths is not None:  # each sequence's positions from 0 (after a shared prefix: from its end)
            position_ids = torch.cat([torch.arange(n) + (shared_prefix if i else 0)
                                      for i, n in enumerate(lengths)])[None]
        device = self.device
        states = self.audio_states(all_audios) if all_audios else []
        audio_mask = input_ids == self.audio_placeholder_id
        batch = PromptBatch(
            input_ids=to_device(input_ids, device),
            attention_mask=to_device(attention_mask, device),
            position_ids=to_device(position_ids, device),
            audio_token_mask=to_device(audio_mask, device),
            audio_states=states,
            n_audio_slots=int(audio_mask.sum()),
            audio_positions=to_device(audio_mask.flatten().nonzero().squeeze(1), device),
        )
        if targets is not None:
            next_labels = labels_t[:, 1:]
            target_rows, target_cols = (next_labels != IGNORE_INDEX).nonzero(as_tuple=True)
            batch.labels = to_device(labels_t, device)
            batch.target_rows = to_device(target_rows, device)
            batch.target_cols = to_device(target_cols, device)
            batch.target_ids = to_device(next_labels[target_rows, target_cols], device)
            batch.target_counts = to_device((next_labels != IGNORE_INDEX).sum(-1), device)
        if lengths is not None:
            # a sequence's first token is never a target (a prompt precedes it), so no position predicts a target
            # of the next sequence
            ends = torch.tensor(lengths).cumsum(0)
            batch.sequences = PackedSequences.of(lengths, device, shared_prefix)
            if targets is not None:  # the prompt of column + 1 (a shared prefix holds no target)
                items = torch.searchsorted(ends, target_cols + 1, right=True) - (1 if shared_prefix else 0)
                batch.target_items = to_device(items, device)
                batch.target_counts = to_device(torch.bincount(items, minlength=batch.sequences.prompts), device)
        return batch

    # ---- forward paths ------------------------------------------------------------------------------------------

    def input_embeds(self, batch: PromptBatch, audio_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the connector outputs scattered into the audio placeholders.

        ``audio_embeds`` (optional) replaces :meth:`project_audio` of the batch's states, e.g. per-edit connector
        copies when several edits share one pass."""
        embeds = self.language_model().embed_tokens(batch.input_ids)
        if batch.audio_states or audio_embeds is not None:
            if audio_embeds is None:
                audio_embeds = self.project_audio(batch.audio_states)
            if audio_embeds.shape[0] != batch.n_audio_slots:
                raise ValueError(f"{audio_embeds.shape[0]} audio embeddings for {batch.n_audio_slots} placeholder "
                                 "tokens")
            positions = batch.audio_positions
            if positions is None:  # a batch built elsewhere: found from the mask (a host sync)
                positions = batch.audio_token_mask.flatten().nonzero().squeeze(1)
            # each placeholder's row of the connector outputs copied in, in row-major order (as a masked scatter
            # would; the backward gathers the same rows by index, with no host sync)
            embeds = embeds.flatten(0, 1).index_copy(0, positions, audio_embeds.to(embeds.dtype)).view_as(embeds)
        return embeds

    def _masks(self, hidden: torch.Tensor, batch: PromptBatch) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if batch.sequences is not None:  # a packed batch: only layer_forward runs it (packs_sequences)
            return {"full_attention": batch.sequences}
        cfg = self.language_model().config
        kwargs: dict[str, Any] = dict(config=cfg, inputs_embeds=hidden, attention_mask=batch.attention_mask,
                                      position_ids=batch.position_ids)
        kwargs[_CACHE_ARG] = None  # transformers < 5.2x calls it past_key_values
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def training_groups(self, prompts: Sequence[Prompt], targets: Sequence[str] | None, *, tail_only: bool = False,
                        packable: bool = False) -> list[tuple[list[int], PromptBatch]]:
        """A training step's teacher-forcing batches in canonical shapes, ``(row indices, batch)`` each
        (:func:`editors.models.buckets.training_groups`: its ``tail_only`` and ``packable``)."""
        from editors.models import buckets

        return buckets.training_groups(self, prompts, targets, tail_only=tail_only, packable=packable)

    def packs_sequences(self) -> bool:
        """Whether this adapter's layer runs take packed batches (``prepare(..., packed=True)``) on its device:
        :data:`~editors.models.buckets.PACK_SEQUENCES` says so there, and every LLM layer runs
        :func:`~editors.models.fused_layer.layer_forward` (on CUDA in bf16 or fp16: variable-length attention)."""
        from editors.models.buckets import PACK_SEQUENCES

        device = self.device
        if not (PACK_SEQUENCES.get(device.type, False) and fused_layers_on(device)):
            return False
        if device.type == "cuda" and self.dtype not in (torch.bfloat16, torch.float16):
            return False
        return all(supports(layer, self._layer_type(i)) for i, layer in enumerate(self.llm_layers()))

    def _layer_type(self, i: int) -> str:
        types = getattr(self.language_model().config, "layer_types", None)
        return types[i] if types else "full_attention"

    def _run_layers(self, hidden: torch.Tensor, start: int, stop: int, masks: dict[str, Any],
                    position_ids: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                    frozen: FrozenColumns | None = None) -> torch.Tensor:
        layers = self.llm_layers()
        cache = {} if frozen is None else {_CACHE_ARG: frozen}
        fused = fused_layers_on(hidden.device)
        rotary: RotaryTables | None = None
        for i in range(start, stop):
            layer, kind = layers[i], self._layer_type(i)
            mask = masks[kind]
            if fused and supports(layer, kind):  # fewer kernels, the same function (fused_layer.py)
                rotary = rotary or RotaryTables.for_layer(layer, position_embeddings)
                hidden = layer_forward(layer, hidden, mask, rotary, frozen, i)
                continue
            if isinstance(mask, PackedSequences):
                raise RuntimeError(f"LLM layer {i} cannot run a packed row (it has hooks, or the fused forward is "
                                   "off): build the batch with packs_sequences() false")
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings, **cache)
        return hidden

    def run_layers(self, state: LayerState, hidden: torch.Tensor | None = None, start: int | None = None,
                   stop: int | None = None) -> torch.Tensor:
        """Output of LLM layers ``start``..``stop - 1`` (default: ``state.layer`` alone) for the hidden states
        ``hidden`` (default ``state.hidden``) entering layer ``start``, with ``state``'s masks and positions."""
        start = state.layer if start is None else start
        stop = start + 1 if stop is None else stop
        if not 0 <= start <= stop <= self.num_llm_layers:
            raise ValueError(f"run_layers: need 0 <= start ({start}) <= stop ({stop}) <= {self.num_llm_layers}")
        h = state.hidden if hidden is None else hidden
        return self._run_layers(h, start, stop, state.masks, state.position_ids, state.position_embeddings,
                                state.frozen)

    def hidden_entering(self, batch: PromptBatch, layer: int, *, grad: bool = False) -> LayerState:
        """Hidden states entering LLM layer ``layer`` (0 = the input embeddings), no grad unless ``grad``."""
        layer = self.resolve_layer(layer) if layer != self.num_llm_layers else layer
        with torch.set_grad_enabled(grad):
            hidden = self.input_embeds(batch)
            lm = self.language_model()
            masks = self._masks(hidden, batch)
            pos_emb = lm.rotary_emb(hidden, batch.position_ids)
            hidden = self._run_layers(hidden, 0, layer, masks, batch.position_ids, pos_emb)
        return LayerState(layer=layer, hidden=hidden, masks=masks, position_ids=batch.position_ids,
                          position_embeddings=pos_emb, batch=batch)

    def tail_state(self, state: LayerState, first: int) -> LayerState:
        """``state`` cut to its columns from ``first`` on (every target column included, and where
        :func:`~editors.models.buckets.tail_start` puts the cut), for a caller that changes the hidden states
        entering ``state.layer`` only there.

        The layers from ``state.layer`` run once over the whole width (no grad), keeping each layer's keys and
        values of the earlier columns; :meth:`loss_from`, :meth:`final_hidden_from` and :meth:`run_layers` on the
        returned state then compute only its columns, attending over those keys and values (causal attention: the
        earlier columns cannot see the later ones). Its ``first_column`` says where it starts; its batch's target
        columns are shifted to it. On CPU fp32 its losses and their gradients equal the whole width's bit for bit
        (tests/test_adapters.py). The whole state comes back unchanged when there is nothing to cut, when its masks
        are not boolean tensors of one attention type, and on the CPU when transformers passed no mask (no
        padding; see :func:`_tail_builds_mask`)."""
        from dataclasses import replace

        from editors.models.buckets import tail_start

        masks = state.masks
        width = state.hidden.shape[1]
        if state.batch.target_cols is not None and state.batch.target_cols.numel():
            first = min(int(first), int(state.batch.target_cols.min()))
        first = tail_start(first, width, state.hidden.device)
        if first <= 0 or state.frozen is not None or set(masks) != {"full_attention"}:
            return state
        mask = masks["full_attention"]
        if mask is None and _tail_builds_mask(state.hidden.device):
            # no padding: the whole width ran causal attention without a mask; the tail needs one (its queries
            # start later than its keys)
            mask = causal_padding_mask(state.batch.attention_mask)
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4):
            return state
        frozen = FrozenColumns(first)
        with torch.no_grad():
            self._run_layers(state.hidden, state.layer, self.num_llm_layers, masks, state.position_ids,
                             state.position_embeddings, frozen)
        frozen.recording = False
        cos, sin = state.position_embeddings
        batch = state.batch
        if batch.target_cols is not None:
            batch = replace(batch, target_cols=batch.target_cols - first)
        tail_mask = mask[:, :, first:, :].contiguous()
        return replace(state, hidden=state.hidden[:, first:], masks={"full_attention": tail_mask},
                       position_ids=state.position_ids[:, first:], position_embeddings=(cos[:, first:], sin[:, first:]),
                       batch=batch, first_column=first, frozen=frozen)

    def packed_state(self, layer: int, hidden: torch.Tensor, segments: torch.Tensor, positions: torch.Tensor
                     ) -> LayerState | None:
        """Hidden states entering LLM layer ``layer`` that hold several sequences per row (``hidden``
        ``[R, W, H]``; ``segments`` ``[R, W]``: each column's sequence number, -1 on padding; a sequence may go on
        from a row's end to the next row's start only where :meth:`packs_sequences`;
        ``positions`` ``[R, W]``: each column's position in its own sequence, from 0; both on the host or the
        device). Each sequence attends causally within itself only, so :meth:`run_layers` gives each sequence's
        columns the outputs of its own left-padded row (in exact arithmetic); a padding column's output is finite
        and nobody's input. Where :meth:`packs_sequences` (CUDA) the layers attend through the variable-length
        kernel (:meth:`PackedSequences.over_rows`), elsewhere under a boolean mask (a padding column sees itself).
        None where the layers take neither (not SDPA over one attention type: the caller then keeps one sequence
        per row)."""
        cfg = self.language_model().config
        if getattr(cfg, "_attn_implementation", None) != "sdpa" or \
                {self._layer_type(i) for i in range(self.num_llm_layers)} != {"full_attention"}:
            return None
        device = hidden.device
        mask: Any
        packs = self.packs_sequences()
        if packs:
            mask = PackedSequences.over_rows(segments, device)  # read on the host
        elif any(continued_rows(segments.cpu())):
            raise ValueError("packed_state: a sequence goes on from one row to the next, which only the "
                             "variable-length kernel reads (packs_sequences)")
        segments, positions = to_device(segments, device), to_device(positions, device)
        if not packs:
            columns = torch.arange(hidden.shape[1], device=device)
            mask = (segments[:, :, None] == segments[:, None, :]) & (columns[None, :, None] >= columns[None, None, :])
            mask &= segments[:, None, :] >= 0
            mask |= (segments[:, :, None] < 0) & (columns[:, None] == columns[None, :])[None]
            mask = mask[:, None]
        valid = (segments >= 0).long()
        batch = PromptBatch(input_ids=torch.full_like(segments, self.pad_token_id), attention_mask=valid,
                            position_ids=positions, audio_token_mask=torch.zeros_like(segments, dtype=torch.bool),
                            audio_states=[])
        pos_emb = self.language_model().rotary_emb(hidden, positions)
        return LayerState(layer=self.resolve_layer(layer), hidden=hidden, masks={"full_attention": mask},
                          position_ids=positions, position_embeddings=pos_emb, batch=batch)

    def first_audio_column(self, batch: PromptBatch) -> int:
        """The first column of ``batch`` that holds a connector output (its width when it holds none): changing the
        connector changes nothing before it (a tail state can start there)."""
        columns = batch.audio_token_mask.any(dim=0).nonzero()
        return int(columns[0, 0]) if columns.numel() else int(batch.input_ids.shape[1])

    def final_hidden_from(self, state: LayerState, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run layers ``state.layer``.. and the final norm from ``hidden`` (default ``state.hidden``)."""
        h = state.hidden if hidden is None else hidden
        h = self._run_layers(h, state.layer, self.num_llm_layers, state.masks, state.position_ids,
                             state.position_embeddings, state.frozen)
        norm = self.language_model().norm
        return rms_norm(norm, h) if fused_layers_on(h.device) else norm(h)

    def logits_from(self, state: LayerState, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits [B, T, V] computed from the hidden states entering ``state.layer``."""
        return self.lm_head()(self.final_hidden_from(state, hidden))

    def loss_from(self, state: LayerState, hidden: torch.Tensor | None = None, reduction: str = "mean"
                  ) -> torch.Tensor:
        """Teacher-forced target loss from the hidden states entering ``state.layer`` (labels required)."""
        return self._target_ce(self.final_hidden_from(state, hidden), state.batch, reduction)

    def _target_ce(self, final_hidden: torch.Tensor, batch: PromptBatch, reduction: str) -> torch.Tensor:
        """Per-item mean CE over target tokens; logits computed only at the positions that predict them
        (indices precomputed in :meth:`prepare`: no host sync)."""
        if batch.target_rows is None or batch.target_ids is None or batch.target_counts is None:
            raise ValueError("a target loss needs a batch prepared with targets")
        from editors.models.buckets import padded_rows

        # [N, V]; over >= MIN_ROWS rows so that one edit's few target tokens take the kernel path of K edits'
        logits = padded_rows(self.lm_head(), final_hidden[batch.target_rows, batch.target_cols]).float()
        token_ce = nn.functional.cross_entropy(logits, batch.target_ids, reduction="none")
        counts = batch.target_counts.clamp(min=1).to(token_ce.dtype)
        items = batch.target_rows if batch.target_items is None else batch.target_items
        per_item = torch.zeros(batch.items, dtype=token_ce.dtype, device=token_ce.device)
        per_item = per_item.index_add(0, items, token_ce) / counts
        if reduction == "none":
            return per_item
        if reduction == "mean":
            return per_item.mean()
        if reduction == "sum":
            return per_item.sum()
        raise ValueError(f"unknown reduction {reduction!r}")

    def batch_loss(self, batch: PromptBatch, reduction: str = "mean", audio_embeds: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Teacher-forced target loss of a prepared batch through the whole LLM (grad follows torch's mode)."""
        hidden = self.input_embeds(batch, audio_embeds)
        out = self.language_model()(inputs_embeds=hidden, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, use_cache=False)
        return self._target_ce(out.last_hidden_state, batch, reduction)

    def target_loss(self, prompts: Sequence[Prompt], targets: Sequence[str], reduction: str = "mean"
                    ) -> torch.Tensor:
        """Teacher-forced CE of each target given its prompt, over target tokens only (+ end of turn).

        ``reduction``: ``mean`` (mean of per-item means), ``sum`` or ``none`` (one value per item)."""
        return self.batch_loss(self.prepare(prompts, targets), reduction)

    # ---- generation ---------------------------------------------------------------------------------------------

    def generation_settings(self, max_new_tokens: int | None = None, *, engine: str = "auto",
                            method_engines: tuple[str, ...] = ("graph", "eager"), method: str = "",
                            batch_size: int | None = None, max_batch_tokens: int | None = None
                            ) -> GenerationSettings:
        """This model's :class:`GenerationSettings`: its family's defaults (``editors/models/generation/
        defaults.yaml``) on its device, with the given fields set (see
        :func:`editors.models.generation.resolve_settings`)."""
        return resolve_settings(self.family, tiny=self.is_tiny, device_type=self.device.type,
                                dtype=str(self.dtype), max_new_tokens=max_new_tokens, engine=engine,
                                method_engines=method_engines, method=method, batch_size=batch_size,
                                max_batch_tokens=max_batch_tokens)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None, batch_size: int | None = None,
                 max_batch_tokens: int | None = None, *, settings: GenerationSettings | None = None,
                 per_edit: PerEdit | None = None) -> list[GeneratedText]:
        """Greedy answers of ``prompts`` (decoded, special tokens removed, stripped), in order, through the
        generation layer (:func:`editors.models.generation.generate`). ``settings`` (default: this model's
        :meth:`generation_settings` with the given ``max_new_tokens`` / batching limits, else the family's
        defaults); ``per_edit``: each prompt under its own edit's weights (several edits per pass)."""
        if settings is None:
            settings = self.generation_settings(max_new_tokens, batch_size=batch_size,
                                                max_batch_tokens=max_batch_tokens)
        return _generate(self, prompts, settings, per_edit)

    # ---- identity -----------------------------------------------------------------------------------------------

    def model_key(self) -> str:
        """A short hash identifying model weights + revision + config + dtype (key of the pre-edit cache).

        Hub models are pinned by their id and revision; a local directory by a digest of its weight files, not by
        how its path is spelled (so ``models/x`` and its absolute path share a key, and a retrained model gets a
        new one; a directory without weight files falls back to its resolved path); in-memory tiny models are
        identified by their seed-based id."""
        cfg = self.model.config.to_json_string(use_diff=False)
        identity = self.model_id
        if Path(self.model_id).is_dir():
            if self._weights_digest is None:
                self._weights_digest = weights_digest(self.model_id)
            config = self.model.config.to_dict()
            config.pop("_name_or_path", None)  # the folder's path: the weights' digest says what it holds
            cfg = json.dumps(config, sort_keys=True, default=str)
            identity = f"weights:{self._weights_digest}" if self._weights_digest else \
                str(Path(self.model_id).resolve())
        payload = json.dumps([identity, self.revision, cfg, str(self.dtype)], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """Model identity for run headers."""
        return {"model": self.model_id, "model_revision": self.revision, "family": self.family,
                "dtype": str(self.dtype).replace("torch.", ""), "model_key": self.model_key()}


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as the Linear it is (an FFN output projection, a role Linear of :meth:`LALMAdapter.llm_linear`),
    checked: a stand-in a method installed in its place (a codebook, a router) is no Linear."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected a Linear, got {type(module).__name__}")
    return module


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'float32' / torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(table)}")
    return table[dtype]


def _nbytes(state: Any) -> int:
    """Bytes of the tensors in a cached audio state (a tensor, a sequence of them, or a dataclass holding them)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(s) for s in state)
    if dataclasses.is_dataclass(state):
        return sum(_nbytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    return 0
