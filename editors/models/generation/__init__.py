"""The generation layer: every greedy generation of the toolkit (pre-edit, post-edit, the demo, the bench, the API)
goes through :func:`generate`.

* :mod:`.settings`: :class:`GenerationSettings`, resolved once per run from the family's defaults
  (``defaults.yaml``) by :func:`resolve_settings`;
* :mod:`.plan`: canonical chunks (width buckets, row buckets, batching limits);
* :mod:`.eager`: the eager engine (Hugging Face ``generate``, dynamic KV cache; shared prefill of a long common
  prefix when ``min_shared_prefix`` allows it);
* :mod:`.graph`: the graph engine (static KV cache, decode step captured as one CUDA graph per shape bucket, stop
  tokens handled on the device, each distinct system prompt + history prefilled once);
* :mod:`.memory`: what a generation needs in device memory (the token budget of a chunk on CUDA);
* :mod:`.per_edit`: the per-edit strategy (K edits' items in one generation, each under its own edit's weights);
* :mod:`.output`: :class:`GeneratedText`, decoding of new tokens;
* :mod:`.transcripts`: Whisper's greedy transcripts (DeSTA2.5 reads them) on a static cache, the step captured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ContextManager, Protocol, Sequence

from editors.models.generation.memory import token_budget
from editors.models.generation.output import GeneratedText, decode_new_tokens
from editors.models.generation.per_edit import PerEdit, per_edit_audio_embeds, runs_of
from editors.models.generation.settings import (ENGINES, GenerationSettings, family_defaults, resolve_engine,
                                                resolve_settings)
from editors.models.kernels import generation_attention

if TYPE_CHECKING:  # pragma: no cover
    from editors.models.adapter import LALMAdapter
    from editors.models.prompts import Prompt

__all__ = ["ENGINES", "GeneratedText", "GenerationSettings", "PerEdit", "PromptRouting", "decode_new_tokens",
           "family_defaults", "generate", "per_edit_audio_embeds", "release", "resolve_engine", "resolve_settings",
           "runs_of", "token_budget"]


class PromptRouting(Protocol):
    """A module installed in the model that decides from each prompt alone which weights its row computes with
    (WISE's side-memory router). Set as ``adapter.prompt_routing``, it is asked for the rows' plan before a plain
    generation, which then runs as a per-edit one: a row's "edit" is the weights it was routed to, so the engines
    share prefixes only between rows routed alike and a captured decode step gathers each row's weights."""

    def routed(self, prompts: Sequence["Prompt"]) -> ContextManager[PerEdit | None]:
        """The rows' plan for ``prompts`` (None: no row needs it), with the routed weights installed inside."""


def release(adapter: "LALMAdapter") -> None:
    """Drop what the engines keep on ``adapter`` between calls (the graph engine's captured shapes)."""
    from editors.models.generation.graph import release as release_graphs

    release_graphs(adapter)


def generate(adapter: "LALMAdapter", prompts: Sequence["Prompt"], settings: GenerationSettings,
             per_edit: PerEdit | None = None) -> list[GeneratedText]:
    """Greedy answers of ``prompts`` in order (decoded, special tokens removed, stripped), with ``settings``'
    engine; ``per_edit``: each prompt generated under its own edit's weights (without one, the adapter's
    :class:`PromptRouting`, if any, plans the rows). Settings without a ``max_batch_tokens`` get one from the device
    memory available now (CUDA; no limit on CPU). Attention runs under
    :func:`editors.models.kernels.generation_attention`."""
    prompts = list(prompts)
    if not prompts:
        return []
    if per_edit is None and adapter.prompt_routing is not None:
        with adapter.prompt_routing.routed(prompts) as planned:
            if planned is not None:
                return generate(adapter, prompts, settings, planned)
    if per_edit is not None and len(per_edit.edit_of) != len(prompts):
        raise ValueError(f"per-edit generation: {len(per_edit.edit_of)} edit indices for {len(prompts)} prompts")
    with generation_attention():  # never cuDNN's attention (editors/models/kernels.py)
        return _generate(adapter, prompts, settings, per_edit)


def _generate(adapter: "LALMAdapter", prompts: list["Prompt"], settings: GenerationSettings,
              per_edit: PerEdit | None) -> list[GeneratedText]:
    audios = [a for p in prompts for a in p.audios()]
    adapter.warm_audio(audios)
    adapter.encode_ahead(audios)
    token_ids = [adapter.prompt_token_ids(p) for p in prompts]
    if settings.max_batch_tokens is None:  # on CUDA: what fits the memory available now
        reclaimable = 0
        if settings.engine == "graph":
            from editors.models.generation.graph import kept_bytes

            reclaimable = kept_bytes(adapter)
        budget = token_budget(adapter, reclaimable=reclaimable, engine=settings.engine,
                              longest=max(len(t) for t in token_ids))
        if budget is not None:
            settings = settings.replace(max_batch_tokens=budget)
    if settings.engine == "graph":
        from editors.models.generation.graph import generate_graph

        return generate_graph(adapter, prompts, token_ids, settings, per_edit)
    from editors.models.generation.eager import generate_eager

    return generate_eager(adapter, prompts, token_ids, settings, per_edit)
