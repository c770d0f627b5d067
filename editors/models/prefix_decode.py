"""Greedy decoding after one shared prefill: when every prompt of a batch starts with the same long prefix
(system prompt + in-context demonstrations), the prefix runs once, its KV cache is repeated over the batch, and
each prompt's tail and the new tokens follow in a small decode loop of our own. Used by
:meth:`editors.models.adapter.LALMAdapter.generate` when :attr:`~LALMAdapter.min_shared_prefix` allows it."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Sequence

import torch

from editors.models.prompts import Prompt, audio_digest

if TYPE_CHECKING:
    from editors.models.adapter import LALMAdapter


def shared_prefix_length(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]]) -> int:
    """Length of the token prefix (system prompt + dialogue history) that every prompt shares, audio included;
    0 when there is a single prompt or the prefix is shorter than :attr:`min_shared_prefix`."""
    if len(token_ids) < 2 or adapter.min_shared_prefix <= 0:
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
        n = adapter.num_audio_tokens(audio)
        if used + n > len(positions) or any(len(a) <= j or audio_digest(a[j]) != digest
                                            for a in audio_lists[1:]):
            k = positions[used]
            break
        used += n
    return k if k >= adapter.min_shared_prefix else 0


def generate_after_prefix(adapter: "LALMAdapter", prompts: Sequence[Prompt], token_ids: Sequence[list[int]], prefix: int,
                           max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of prompts that share their first ``prefix`` tokens: the prefix is run once, its KV
    cache repeated over the batch, then each prompt's tail (left-padded after the prefix) and the new tokens.
    Returns the new token ids [B, <= max_new_tokens] (stop tokens, then padding, after a row finishes)."""
    lm, head = adapter.language_model(), adapter.lm_head()
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
    stop_ids = torch.tensor(adapter.stop_token_ids, device=adapter.device)
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
