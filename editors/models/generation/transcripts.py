"""Whisper transcripts without per-token host work: greedy decoding from encoder outputs over a static cache.

DeSTA2.5 reads each clip's Whisper transcript. Transformers' ``whisper.generate`` runs its token loop in Python with
a host sync per token; with random weights (the bench) no transcript stops early, so a call of 128 tokens spent
~11 ms per step on the host whatever its batch. Here (:func:`transcribe`):

1. **The decoder prompt** (:class:`TranscriptRules`, read from the model's generation config as ``generate`` reads
   it for a short-form call without ``language``/``task``): the start token, the forced tokens, the language token
   detected per audio where the config can detect one (a pass over the start token alone, the logits kept to the
   language tokens), ``<|notimestamps|>`` where the config has it. A config with anything this module does not
   model (timestamps, sampling or beams, a given language or task, thresholds, prompt ids, another logits
   processor) gets ``None`` from :meth:`TranscriptRules.of`, and the caller keeps ``generate``.
2. **Prefill** of that prompt: every decoder layer's cross-attention keys and values over the encoder output
   (once), the prompt's self-attention keys and values into a static cache as wide as prompt + new tokens; the
   first new token from the last position's logits with ``suppress_tokens`` and ``begin_suppress_tokens`` masked.
3. **Decode** one token per audio per step. The step reads and advances only static buffers (token, position,
   finished flags, caches), so on CUDA it is captured once per call as a CUDA graph and replayed for every later
   step: no Python per kernel, no host sync in the loop. Finished audios (their end token seen) emit padding; every
   few steps the loop looks, without waiting, at whether all have finished and stops (the graph engine's
   loop: ``editors.models.generation.graph.run_steps``).

Projections, norms, the MLP and the output head are the model's own modules; attention is computed as transformers'
eager attention computes it (the query scaled before the product, fp32 softmax), the self-attention over the whole
static cache with the positions not written yet masked. Keys are kept transposed (``[B, heads, head_dim, T]``), so
that a one-query step reads them at the memory's pace, as it reads the values. Exactness: on the tiny fp32 Whisper
the transcripts equal ``generate``'s token for token (tests/test_transcripts.py, with and without language detection and stops).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Generation-config fields :class:`TranscriptRules` models (or that do not change a greedy short-form decode).
#: Any other field set away from its default sends the call back to ``generate``.
MODELLED_FIELDS = frozenset({
    "alignment_heads", "begin_suppress_tokens", "bos_token_id", "decoder_start_token_id", "eos_token_id",
    "forced_decoder_ids", "is_multilingual", "lang_to_id", "max_initial_timestamp_index", "max_length",
    "max_new_tokens", "no_timestamps_token_id", "pad_token_id", "prev_sot_token_id", "return_timestamps",
    "suppress_tokens", "task_to_id", "transformers_version", "use_cache", "_from_model_config", "cache_implementation",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
})

STATS: dict[str, float] = {"calls": 0, "audios": 0, "steps": 0, "captures": 0, "capture_s": 0.0}


@dataclass(frozen=True)
class TranscriptRules:
    """How ``whisper.generate`` decodes a short-form transcript greedily, read from the model's generation config:
    the decoder prompt (``prompt``, with ``None`` where the language token detected per audio goes), the language
    tokens detection chooses among, the tokens masked at every step and at the first, the end and padding tokens."""

    prompt: tuple[int | None, ...]
    languages: tuple[int, ...]
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    eos: int
    pad: int
    #: the first timestamp token (``<|notimestamps|>`` + 1) where the config has one
    timestamp_begin: int | None = None

    def has_timestamps(self, new_tokens: torch.Tensor) -> bool:
        """Whether a transcript of ``new_tokens`` (:func:`transcribe`'s output) holds a timestamp token before its
        end. ``generate`` then cuts it into segments (and may decode the clip again from a later frame): rules this
        module does not model, so such a call goes back to ``generate``."""
        if self.timestamp_begin is None:
            return False
        ended = (new_tokens == self.eos).cumsum(1) > 0
        return bool(((new_tokens >= self.timestamp_begin) & ~ended).any())

    @classmethod
    def of(cls, whisper: Any) -> "TranscriptRules | None":
        """The rules of ``whisper`` (a ``WhisperForConditionalGeneration``), or None where its generation config
        asks for something this module does not model (the reason is logged at debug level)."""
        reason = cls._unmodelled(whisper)
        if reason:
            logger.debug("Whisper transcripts through generate: %s", reason)
            return None
        gen, config = whisper.generation_config, whisper.config
        eos = _end_token(gen)
        assert eos is not None  # _unmodelled says so otherwise
        forced = gen.forced_decoder_ids if getattr(gen, "forced_decoder_ids", None) is not None \
            else getattr(config, "forced_decoder_ids", None)
        prompt: list[int | None] = [int(gen.decoder_start_token_id)]
        for i, (index, token) in enumerate(forced or (), start=1):
            if index != i:
                return None  # generate raises on such a list; let it say so
            prompt.append(None if token is None else int(token))
        languages = tuple(int(t) for t in (getattr(gen, "lang_to_id", None) or {}).values())
        if languages and (len(prompt) == 1 or prompt[1] is None):
            prompt = prompt[:1] + [None] + prompt[2:]  # detected per audio
        if getattr(gen, "no_timestamps_token_id", None) is not None and prompt[-1] != gen.no_timestamps_token_id:
            prompt.append(int(gen.no_timestamps_token_id))
        if not languages:
            prompt = [t for t in prompt if t is not None]
        return cls(prompt=tuple(prompt), languages=languages,
                   suppress=tuple(int(t) for t in gen.suppress_tokens or ()),
                   begin_suppress=tuple(int(t) for t in gen.begin_suppress_tokens or ()), eos=eos,
                   pad=int(gen.pad_token_id if gen.pad_token_id is not None else eos),
                   timestamp_begin=None if getattr(gen, "no_timestamps_token_id", None) is None
                   else int(gen.no_timestamps_token_id) + 1)

    @staticmethod
    def _unmodelled(whisper: Any) -> str:
        gen, config = whisper.generation_config, whisper.config
        changed = set(gen.to_diff_dict()) - MODELLED_FIELDS
        if changed:
            return f"generation config sets {sorted(changed)}"
        if getattr(gen, "return_timestamps", False):
            return "timestamps"
        if getattr(gen, "language", None) is not None or getattr(gen, "task", None) is not None:
            return "a language or task in the generation config"
        eos = _end_token(gen)
        if eos is None:
            return f"end tokens {gen.eos_token_id}"
        if gen.pad_token_id is not None and gen.pad_token_id != eos:
            return "a padding token other than the end token (generate trims every padding token then)"
        if getattr(config, "scale_embedding", False):
            return "scaled embeddings"
        decoder = whisper.model.decoder
        if decoder.training:
            return "the decoder is in training mode"
        return ""


def _end_token(gen: Any) -> int | None:
    """The generation config's one end token (None where it has none or several)."""
    eos = gen.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if len(eos) == 1 else None
    return None if eos is None else int(eos)


def transcribe(whisper: Any, encoded: torch.Tensor, max_new_tokens: int,
               rules: TranscriptRules | None = None) -> torch.Tensor:
    """Greedy transcripts of a batch of encoder outputs ``encoded`` ``[B, frames, d]``: the new tokens ``[B, n]``
    (``n <= max_new_tokens``; after its end token an audio's row holds padding), as ``whisper.generate(
    encoder_outputs=..., max_new_tokens=...)`` decodes them (see the module docstring). ``rules`` default to
    :meth:`TranscriptRules.of` and must not be None."""
    rules = rules or TranscriptRules.of(whisper)
    if rules is None:
        raise ValueError("this Whisper's generation config is not modelled here: use whisper.generate")
    limit = int(whisper.config.max_target_positions)
    if len(rules.prompt) + max_new_tokens > limit:
        raise ValueError(f"a decoder prompt of {len(rules.prompt)} tokens + max_new_tokens {max_new_tokens} exceeds "
                         f"the decoder's {limit} positions")
    with torch.no_grad():
        decode = _Decode(whisper, encoded, rules, max_new_tokens)
        decode.prefill()
        steps = decode.run()
    STATS["calls"] += 1
    STATS["audios"] += encoded.shape[0]
    STATS["steps"] += steps
    return decode.out[:, :steps + 1]


class _Decode:
    """The static buffers of one :func:`transcribe` call and its prefill and decode step."""

    def __init__(self, whisper: Any, encoded: torch.Tensor, rules: TranscriptRules, new_tokens: int) -> None:
        self.whisper: Any = whisper
        self.rules, self.new_tokens = rules, new_tokens
        self.decoder: Any = self.whisper.model.decoder
        first = self.decoder.layers[0].self_attn
        self.heads, self.head_dim, self.scaling = first.num_heads, first.head_dim, first.scaling
        b, device = encoded.shape[0], encoded.device
        self.rows, self.device = b, device
        self.width = len(rules.prompt) + new_tokens
        dtype = self.decoder.embed_tokens.weight.dtype
        # keys transposed ([B, heads, head_dim, T]): a one-query step's scores then read them as its weighted sum
        # reads the values, along rows (cuBLAS's transposed matrix-vector kernel read [.., T, head_dim] keys at
        # ~0.45 TB/s on an H100)
        self.cross = [(self._heads(layer.encoder_attn.k_proj(encoded)).transpose(-1, -2).contiguous(),
                       self._heads(layer.encoder_attn.v_proj(encoded))) for layer in self.decoder.layers]
        self.keys = [torch.zeros(b, self.heads, self.head_dim, self.width, dtype=dtype, device=device)
                     for _ in self.decoder.layers]
        self.values = [torch.zeros(b, self.heads, self.width, self.head_dim, dtype=dtype, device=device)
                       for _ in self.decoder.layers]
        vocab = self.whisper.proj_out.out_features
        self.blocked = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.blocked[list(rules.suppress)] = True
        self.blocked_first = self.blocked.clone()
        self.blocked_first[list(rules.begin_suppress)] = True
        self.columns = torch.arange(self.width, device=device)
        self.token = torch.zeros(b, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.out = torch.full((b, new_tokens), rules.pad, dtype=torch.long, device=device)
        self.graph: Any = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` -> ``[B, heads, T, head_dim]`` (contiguous)."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2).contiguous()

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.heads * self.head_dim)

    def _layers(self, hidden: torch.Tensor, self_attend: Any) -> torch.Tensor:
        """The decoder layers over ``hidden`` ``[B, L, d]``; ``self_attend(i, q, k, v)`` is the self-attention of
        layer ``i`` (queries scaled), which writes its keys and values into the cache."""
        for i, layer in enumerate(self.decoder.layers):
            residual = hidden
            h = layer.self_attn_layer_norm(hidden)
            attn = layer.self_attn
            q = self._heads(attn.q_proj(h) * attn.scaling)
            out = self_attend(i, q, self._heads(attn.k_proj(h)), self._heads(attn.v_proj(h)))
            hidden = residual + attn.out_proj(self._merge(out))
            residual = hidden
            h = layer.encoder_attn_layer_norm(hidden)
            attn = layer.encoder_attn
            q = self._heads(attn.q_proj(h) * attn.scaling)
            keys, values = self.cross[i]
            probs = torch.softmax(torch.matmul(q, keys), dim=-1)
            hidden = residual + attn.out_proj(self._merge(torch.matmul(probs, values)))
            residual = hidden
            h = layer.final_layer_norm(hidden)
            hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(h)))
        return self.whisper.proj_out(self.decoder.layer_norm(hidden[:, -1]))

    def _prompt_logits(self, prompt: torch.Tensor) -> torch.Tensor:
        """Logits after the decoder prompt ``[B, L]`` (its keys and values written to cache columns ``[0, L)``)."""
        n = prompt.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.keys[i][..., :n] = k.transpose(-1, -2)
            self.values[i][:, :, :n] = v
            scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
            return torch.matmul(torch.softmax(scores, dim=-1), v)

        hidden = self.decoder.embed_tokens(prompt) + self.decoder.embed_positions.weight[:n]
        return self._layers(hidden, attend)

    def prefill(self) -> None:
        """The decoder prompt (the language detected first where the rules ask), then the first new token."""
        rules, b = self.rules, self.rows
        prompt = torch.tensor([t if t is not None else 0 for t in rules.prompt], device=self.device)
        prompt = prompt[None, :].repeat(b, 1)
        if None in rules.prompt:
            logits = self._prompt_logits(prompt[:, :1])
            keep = torch.zeros_like(self.blocked)
            keep[list(rules.languages)] = True
            prompt[:, rules.prompt.index(None)] = logits.masked_fill(~keep, float("-inf")).argmax(-1)
        logits = self._prompt_logits(prompt)
        token = logits.masked_fill(self.blocked_first, float("-inf")).argmax(-1)
        self.out[:, 0] = token
        self.token.copy_(token)
        self.finished.copy_(token == rules.eos)
        self.position.fill_(prompt.shape[1])
        self.step_index.fill_(1)

    def _attend_step(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.keys[i], self.values[i]
        keys.index_copy_(3, self.position, k.transpose(-1, -2))
        values.index_copy_(2, self.position, v)
        scores = torch.matmul(q, keys)
        scores = scores.masked_fill(self.columns > self.position, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), values)

    def step(self) -> None:
        """One new token per audio, reading and advancing only this call's buffers."""
        positions = self.decoder.embed_positions.weight.index_select(0, self.position)
        hidden = (self.decoder.embed_tokens(self.token) + positions)[:, None, :]
        logits = self._layers(hidden, self._attend_step)
        token = logits.masked_fill(self.blocked, float("-inf")).argmax(-1)
        token = torch.where(self.finished, torch.full_like(token, self.rules.pad), token)
        self.out.index_copy_(1, self.step_index, token[:, None])
        self.finished |= token == self.rules.eos
        self.token.copy_(token)
        self.position.add_(1)
        self.step_index.add_(1)

    def run(self) -> int:
        """Decode until every audio has finished or ``new_tokens`` are out; the number of steps after the prefill."""
        from editors.models.generation.graph import capture_step, run_steps

        def capture() -> Any:
            self.graph = capture_step(self.step, self.device, STATS)
            return self.graph

        return run_steps(self.new_tokens - 1, self.step, self.finished, None, capture)
