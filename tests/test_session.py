"""The edit session (editors/session.py): the one apply / restore sequence the runner, sake.editing and the bench
use. Restore is bit-exact also after an exception, accumulated edits are undone together, and a method that edits
the audio encoder gets the adapter's audio-state cache cleared after each apply and restore."""

from __future__ import annotations

import pytest
import torch

from _methods_helpers import assert_same_state, context, edit_request, hparams, model_state, tiny_adapter
from editors.session import EditSession


def test_an_edit_block_changes_only_declared_parameters_and_restores_them_even_on_error():
    adapter = tiny_adapter("tiny-qwen2-audio")
    state = model_state(adapter)
    session = EditSession.start(adapter, "ft_audio", hparams("ft_audio", adapter, max_steps=2,
                                                              early_stop_loss=None), context())
    assert session.snapshot is not None and not session.touches_encoder
    with session.edit(edit_request()) as stats:
        assert stats["steps"] == 2
        changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, state["params"][n])}
        assert changed and changed <= set(session.snapshot.names)
    assert_same_state(adapter, state)
    with pytest.raises(RuntimeError, match="inside"):
        with session.edit(edit_request(audio_seed=4)):
            raise RuntimeError("inside the block")
    assert_same_state(adapter, state)


def test_a_sequence_accumulates_until_the_session_block_ends():
    adapter = tiny_adapter("tiny-qwen2-audio")
    state = model_state(adapter)
    session = EditSession.start(adapter, "grace", hparams("grace", adapter, n_iter=2), context())
    assert session.snapshot is None  # GRACE replaces a module; reset() puts it back
    with session:
        session.apply(edit_request(), seed=1)
        session.apply(edit_request(target="angry", audio_seed=7), seed=2)
        assert len(session.editor.codebook.entries) == 2
    assert session.editor.codebook is None
    assert_same_state(adapter, state)


def test_an_encoder_edit_clears_the_audio_state_cache_after_apply_and_restore(monkeypatch):
    adapter = tiny_adapter("tiny-qwen2-audio")
    session = EditSession.start(adapter, "ft_encoder", hparams("ft_encoder", adapter, max_steps=1,
                                                                early_stop_loss=None), context())
    assert session.touches_encoder
    edit = edit_request()
    before = adapter.generate([edit.prompt()], max_new_tokens=3)  # fills the cache with released-encoder states
    clears = []
    original = adapter.clear_audio_cache
    monkeypatch.setattr(adapter, "clear_audio_cache", lambda: (clears.append(1), original())[1])
    with session.edit(edit, seed=0):
        assert clears == [1]  # cached states of the released encoder would be stale now
    assert clears == [1, 1]  # and states computed under the edit after it
    monkeypatch.setattr(adapter, "clear_audio_cache", original)
    assert adapter.generate([edit.prompt()], max_new_tokens=3) == before


def test_the_seed_makes_an_edit_repeatable():
    adapter = tiny_adapter("tiny-qwen2-audio")
    session = EditSession.start(adapter, "ft_llm", hparams("ft_llm", adapter, max_steps=2, early_stop_loss=None),
                                context())
    results = []
    for _ in range(2):
        torch.manual_seed(123 + len(results))  # whatever came before does not matter
        with session.edit(edit_request(), seed=5) as stats:
            results.append((stats["loss"], torch.rand(1).item()))
    assert results[0] == results[1]


def test_no_attention_call_of_an_edit_or_a_generation_may_pick_cudnn(monkeypatch):
    """cuDNN's attention backward returns NaN for some masked shapes on H100/H200, and its forward builds a host-side
    plan per new shape (editors/models/kernels.py): every attention call of an edit, in apply and apply_many, and
    of a generation after it (the audio encoder's included) runs with that backend disabled; torch's default is
    back outside."""
    import torch.nn.functional as F

    adapter = tiny_adapter("tiny-qwen2-audio")
    session = EditSession.start(adapter, "ft_llm", hparams("ft_llm", adapter, max_steps=2, early_stop_loss=None),
                                context())
    original = F.scaled_dot_product_attention
    calls: list[tuple[bool, bool]] = []  # (a gradient flows, cuDNN's kernel allowed)

    def recording(query, *args, **kwargs):
        calls.append((torch.is_grad_enabled() and query.requires_grad, torch.backends.cuda.cudnn_sdp_enabled()))
        return original(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with session.edit(edit_request(), seed=0):
        in_apply = list(calls)
        adapter.generate([edit_request().prompt()], max_new_tokens=2)
        generated = calls[len(in_apply):]
    before = len(calls)
    with session.edits([edit_request(), edit_request(target="angry", audio_seed=7)], seed=0):
        in_apply_many = calls[before:]
    assert any(grad for grad, _ in in_apply) and any(grad for grad, _ in in_apply_many)
    assert not any(allowed for _, allowed in in_apply + in_apply_many)
    assert generated and not any(allowed or grad for grad, allowed in generated)
    before = len(calls)
    adapter.clear_audio_cache()
    adapter.audio_states([edit_request(audio_seed=11).audio])  # the audio encoder alone, outside any generation
    assert len(calls) > before and not any(allowed for _, allowed in calls[before:])
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the default is back after the blocks
