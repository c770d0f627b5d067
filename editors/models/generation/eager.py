"""The eager engine: Hugging Face ``generate`` (greedy, dynamic KV cache) over canonical chunks, and one shared
prefill when every prompt of a call starts with the same long prefix.

* Canonical chunks (:mod:`editors.models.generation.plan`): each chunk is one ``generate`` from ``inputs_embeds``
  (per-edit embeddings and routing through :class:`~editors.models.generation.per_edit.PerEdit`).
* Logits at the last position only: ``generate`` reads nothing else, and a family whose forward takes no
  ``logits_to_keep`` (Qwen2-Audio's) would otherwise compute the prefill's logits at every position of every row
  ([rows, width, vocabulary]: 16.7 GiB for 16 rows of 3.7k tokens at 7B, so IE-IKE's long prompts ran out of memory
  on an 80 GB card even one edit at a time; 2026-12-07). :func:`last_position_logits` cuts the head's input.
* Shared prefix (``settings.min_shared_prefix`` > 0, no per-edit weights): when all prompts share a token prefix of
  at least that many tokens (system prompt + in-context demonstrations), it runs once, its KV cache is repeated over
  the chunk's rows, then each prompt's tail and the new tokens follow in a small decode loop
  (:func:`generate_after_prefix`). Chunks are then consecutive spans (``batch_spans``), as before issue 18.

On the tiny fp32 models the greedy outputs of every path here are those of unbucketed per-chunk ``generate``
(tests/test_invariance.py).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from editors.models.batch import batch_spans, to_device
from editors.models.buckets import left_pad
from editors.models.generation.output import GeneratedText, decode_new_tokens
from editors.models.generation.per_edit import PerEdit
from editors.models.generation.plan import plan_chunks
from editors.models.generation.settings import GenerationSettings
from editors.models.prompts import Prompt, audio_digest

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GenerationConfig

    from editors.models.adapter import LALMAdapter


def hf_generation_config(adapter: "LALMAdapter", max_new_tokens: int) -> "GenerationConfig":
    """Greedy decoding of at most ``max_new_tokens`` that stops at the adapter's stop tokens (HF ``generate``)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=adapter.pad_token_id, eos_token_id=adapter.stop_token_ids,
                            repetition_penalty=1.0)


@contextlib.contextmanager
def last_position_logits(adapter: "LALMAdapter") -> Iterator[None]:
    """Within: the LM head sees only the last position of a [rows, positions, hidden] input, as greedy decoding
    reads only the last position's logits (the same rows of the same matmul)."""

    def last(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[1] == 1:
            return None
        return (hidden[:, -1:], *args[1:])

    handle = adapter.lm_head().register_forward_pre_hook(last)
    try:
        yield
    finally:
        handle.remove()


def hf_generate(adapter: "LALMAdapter", embeds: torch.Tensor, attention_mask: torch.Tensor,
                config: "GenerationConfig") -> torch.Tensor:
    """The family's transformers ``generate`` from ``embeds`` (the new token ids), its head cut to the last position
    (:func:`last_position_logits`)."""
    model: Any = adapter.model  # the family's transformers model (its generate)
    with last_position_logits(adapter):
        return model.generate(inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config)


@torch.no_grad()
def generate_eager(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]],
                   settings: GenerationSettings, per_edit: PerEdit | None = None) -> list[GeneratedText]:
    """Greedy outputs of ``prompts`` (their ``prompt_token_ids`` given, audio warmed), in order."""
    n = settings.max_new_tokens
    config = hf_generation_config(adapter, n)
    if per_edit is None:
        prefix = shared_prefix_length(adapter, prompts, token_ids, settings.min_shared_prefix)
        if prefix:
            return _generate_with_prefix(adapter, prompts, token_ids, prefix, settings, config)
    outputs: list[GeneratedText | None] = [None] * len(prompts)
    chunks = plan_chunks([len(t) for t in token_ids], adapter.device, n, batch_size=settings.batch_size,
                         max_batch_tokens=settings.max_batch_tokens)
    for chunk in chunks:
        rows = chunk.rows
        batch = left_pad(adapter.prepare([prompts[i] for i in rows], token_ids=[token_ids[i] for i in rows]),
                         chunk.width, adapter.pad_token_id)
        if per_edit is not None:
            per_edit.before_chunk(rows)
            embeds = per_edit.embeds(adapter, batch, rows, [len(prompts[i].audios()) for i in rows])
        else:
            embeds = adapter.input_embeds(batch)
        new_tokens = hf_generate(adapter, embeds, batch.attention_mask, config)
        for i, text in zip(rows[:chunk.real], decode_new_tokens(adapter, new_tokens, n)):
            outputs[i] = text
    return outputs  # type: ignore[return-value]


def _generate_with_prefix(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]],
                          prefix: int, settings: GenerationSettings, config) -> list[GeneratedText]:
    n = settings.max_new_tokens
    lengths = [len(t) + n for t in token_ids]
    outputs: list[GeneratedText] = []
    for start, stop in batch_spans(lengths, settings.batch_size, settings.max_batch_tokens):
        if stop - start >= 2:
            new_tokens = generate_after_prefix(adapter, prompts[start:stop], token_ids[start:stop], prefix, n)
        else:
            batch = adapter.prepare(prompts[start:stop], token_ids=token_ids[start:stop])
            new_tokens = hf_generate(adapter, adapter.input_embeds(batch), batch.attention_mask, config)
        outputs.extend(decode_new_tokens(adapter, new_tokens, n))
    return outputs


def shared_prefix_length(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]],
                         min_shared_prefix: int) -> int:
    """Length of the token prefix (system prompt + dialogue history) that every prompt shares, audio included;
    0 when there is a single prompt or the prefix is shorter than ``min_shared_prefix`` (0: never)."""
    if len(token_ids) < 2 or min_shared_prefix <= 0:
        return 0
    first = token_ids[0]
    limit = min(len(t) for t in token_ids) - 1  # every prompt keeps at least one token of its own
    k = 0
    while k < limit and all(t[k] == first[k] for t in token_ids[1:]):
        k += 1
    # Identical placeholder tokens may stand for different audios: cut before the first audio that differs.
    slot = adapter.audio_placeholder_id
    positions = [i for i in range(k) if first[i] == slot]
    audio_lists = [p.audios() for p in prompts]
    used = 0
    for j, audio in enumerate(audio_lists[0]):
        if used >= len(positions):
            break
        digest = audio_digest(audio)
        count = adapter.num_audio_tokens(audio)
        if used + count > len(positions) or any(len(a) <= j or audio_digest(a[j]) != digest
                                                for a in audio_lists[1:]):
            k = positions[used]
            break
        used += count
    return k if k >= min_shared_prefix else 0


def generate_after_prefix(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]],
                          prefix: int, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of prompts that share their first ``prefix`` tokens: the prefix is run once, its KV cache
    repeated over the batch, then each prompt's tail (left-padded after the prefix) and the new tokens. Returns the
    new token ids [B, <= max_new_tokens] (stop tokens, then padding, after a row finishes)."""
    lm: Any = adapter.language_model()  # the decoder stack (embed_tokens, layers, ...; per family)
    head = adapter.lm_head()
    slot = adapter.audio_placeholder_id
    n_prefix_slots = sum(1 for i in token_ids[0][:prefix] if i == slot)
    audios0, used, n_prefix_audios = prompts[0].audios(), 0, 0
    while used < n_prefix_slots:
        used += adapter.num_audio_tokens(audios0[n_prefix_audios])
        n_prefix_audios += 1
    head_batch = adapter._collate([list(token_ids[0][:prefix])], audios0[:n_prefix_audios])
    tail_audios = [a for p in prompts for a in p.audios()[n_prefix_audios:]]
    tail = adapter._collate([list(t[prefix:]) for t in token_ids], tail_audios)
    cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    out = lm(inputs_embeds=adapter.input_embeds(head_batch), attention_mask=head_batch.attention_mask,
             position_ids=head_batch.position_ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    rows = tail.batch_size
    cache.batch_repeat_interleave(rows)
    mask = torch.cat([torch.ones(rows, prefix, dtype=tail.attention_mask.dtype, device=adapter.device),
                      tail.attention_mask], dim=1)
    positions = prefix + tail.position_ids
    out = lm(inputs_embeds=adapter.input_embeds(tail), attention_mask=mask, position_ids=positions,
             use_cache=True, **{cache_arg: cache})
    last_pos = positions[:, -1:]
    stop_ids = to_device(torch.tensor(adapter.stop_token_ids), adapter.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=adapter.device)
    generated = []
    for step in range(max_new_tokens):
        logits = head(out.last_hidden_state[:, -1])
        token = logits.argmax(-1).masked_fill(finished, adapter.pad_token_id)
        generated.append(token)
        finished |= torch.isin(token, stop_ids)
        if step + 1 == max_new_tokens or bool(finished.all()):  # one host sync per token, as generate()
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=adapter.device)], dim=1)
        last_pos = last_pos + 1
        out = lm(inputs_embeds=lm.embed_tokens(token[:, None]), attention_mask=mask, position_ids=last_pos,
                 use_cache=True, **{cache_arg: cache})
    return torch.stack(generated, dim=1)
