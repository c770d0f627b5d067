"""Generated token ids -> answers: :class:`GeneratedText` (a ``str`` that also says whether generation stopped at
``max_new_tokens``) and :func:`decode_new_tokens`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from editors.models.batch import to_device

if TYPE_CHECKING:  # pragma: no cover
    from editors.models.adapter import LALMAdapter


class GeneratedText(str):
    """A generated answer (a plain ``str`` everywhere) that also says whether generation stopped at
    ``max_new_tokens`` rather than at a stop token (``hit_limit``); the runner records it per row."""

    hit_limit: bool

    def __new__(cls, text: str, hit_limit: bool = False) -> "GeneratedText":
        obj = super().__new__(cls, text)
        obj.hit_limit = hit_limit
        return obj


def decode_new_tokens(adapter: "LALMAdapter", new_tokens: torch.Tensor, max_new_tokens: int) -> list[GeneratedText]:
    """Decoded, stripped answers of generated token ids ``[B, <= max_new_tokens]``; each remembers whether its row
    stopped at ``max_new_tokens`` without a stop token (``hit_limit``: the answer may be cut)."""
    texts = adapter.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    if new_tokens.shape[-1] < max_new_tokens:  # every row stopped early
        return [GeneratedText(t.strip(), hit_limit=False) for t in texts]
    stopped = torch.isin(new_tokens, to_device(torch.tensor(adapter.stop_token_ids), new_tokens.device)).any(-1)
    return [GeneratedText(t.strip(), hit_limit=not bool(s)) for t, s in zip(texts, stopped.tolist())]
