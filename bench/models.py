"""What differs between the full-size GPU run and the CPU smoke mode, and the bench adapters: the runner's own adapters built by their full-size (random weights) or tiny builders, with EOS disabled."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch




LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Scale:
    """What differs between the full-size GPU run and the CPU smoke mode."""

    name: str  # "full" or "tiny"
    device: str
    dtype: torch.dtype
    audio_seconds: tuple[float, float]  # clip length range
    hparam_overrides: tuple[str, ...] = ()  # KEY=VALUE for both arms (tiny: few steps)


def full_scale() -> Scale:
    """Qwen2-Audio-7B-Instruct in bf16 on the GPU, 5-16 s clips, the hparams files' values."""
    return Scale("full", "cuda", torch.bfloat16, (5.0, 16.0))


def tiny_scale() -> Scale:
    """The adapter's tiny random model in fp32 on the CPU, 0.5-1.9 s clips, 3 training steps."""
    return Scale("tiny", "cpu", torch.float32, (0.5, 1.9), ("max_steps=3",))


def bench_adapter_class(model: str = "qwen2_audio") -> type:
    """The runner's adapter of ``model`` with EOS disabled: its stop id is one the model cannot emit (= the LLM's
    vocab size), so every generation of either arm runs to ``max_new_tokens``. Nothing else changes."""
    if model == "desta25":
        from editors.models.desta25 import DeSTA25Adapter

        class NoEosDeSTA25Adapter(DeSTA25Adapter):
            @property
            def stop_token_ids(self) -> list[int]:
                return [int(self.model.config.llm_config.vocab_size)]

        return NoEosDeSTA25Adapter
    from editors.models.qwen2_audio import Qwen2AudioAdapter

    class NoEosQwen2AudioAdapter(Qwen2AudioAdapter):
        @property
        def stop_token_ids(self) -> list[int]:
            return [int(self.model.config.text_config.vocab_size)]

    return NoEosQwen2AudioAdapter


def generation_owner(adapter: Any) -> Any:
    """The module whose ``generation_config`` the adapter's generation uses (DeSTA2.5: its Llama)."""
    return adapter.model.llm_model if getattr(adapter, "family", "") == "desta25" else adapter.model


def show_token_ids(adapter: Any) -> None:
    """Decode generated ids as their numbers: the full-size random models emit ids across the real vocabulary,
    which the adapters' small offline tokenizers cannot spell (they would decode to ''), so rows of two runs stay
    comparable (identical-row shares) and one word = one token."""
    def batch_decode(ids: Any, skip_special_tokens: bool = True, **_: Any) -> list[str]:
        rows = ids.tolist() if hasattr(ids, "tolist") else ids  # one device read, not one per token
        return [" ".join(str(int(i)) for i in row) for row in rows]

    adapter.tokenizer.batch_decode = batch_decode


def build_adapter(scale: Scale, seed: int, model: str = "qwen2_audio") -> Any:
    """The bench's adapter: the full-size architecture on the GPU, or the adapter's own tiny model on the CPU."""
    cls = bench_adapter_class(model)
    started = time.perf_counter()
    if scale.name == "tiny":
        adapter = cls.tiny(seed, dtype=scale.dtype, device=scale.device)
    else:  # the adapters' own full-size builders (random weights, offline tokenizer, the real feature extractor;
        # DeSTA2.5: the LLM in the scale's dtype, Whisper + connector fp32 as in the release)
        adapter = cls.random_full_size(seed, dtype=scale.dtype, device=scale.device)
    if scale.name == "full":
        show_token_ids(adapter)
    generation_owner(adapter).generation_config.eos_token_id = None
    generation_owner(adapter).generation_config.pad_token_id = adapter.pad_token_id
    _sync(scale.device)
    LOG.info("built %s %s adapter: %.2f B parameters, %s on %s in %.1f s", scale.name,
             model, sum(p.numel() for p in adapter.model.parameters()) / 1e9, scale.dtype, scale.device,
             time.perf_counter() - started)
    return adapter


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
