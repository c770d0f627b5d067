"""LoRA (editors/lora.py), what is particular to it: kept adapters leave the weights alone, sequential edits stack
frozen adapters, merged adapters fold into the touched weights, K edits per pass equal one at a time. (Every
method's edit, restore, runner and resume: tests/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch

from _methods_helpers import (TINY_MODELS, assert_same_state, context, edit_request, first_answer_token, hparams,
                              model_state, one_token_words, tiny_adapter)
from editors.lora import LoRA, LoRALinear
from editors.session import EditSession


def _edits(adapter, n: int):
    """``n`` edits (different audios) whose targets are one-token words the unedited model does not answer."""
    probes = [edit_request(audio_seed=1 + 3 * i, instance=f"emotion/test/{i:06d}") for i in range(n)]
    words = one_token_words(adapter, n, exclude=tuple(first_answer_token(adapter, p) for p in probes))
    return [edit_request(target=w, audio_seed=1 + 3 * i, instance=f"emotion/test/{i:06d}")
            for i, w in enumerate(words)]


def test_lora_edit_takes_and_keeps_the_weights():
    adapter = tiny_adapter("tiny-qwen2-audio")
    (edit,) = _edits(adapter, 1)
    state = model_state(adapter)
    editor = LoRA(adapter, hparams("lora", adapter), context())
    assert editor.touched_parameters() == []  # kept adapters: the model's own weights never change
    with EditSession(editor).edit(edit) as stats:
        assert stats["steps"] > 0
        assert adapter.generate([edit.prompt()], max_new_tokens=1) == [edit.target]
        wrapped = [m for m in adapter.model.modules() if isinstance(m, LoRALinear)]
        assert len(wrapped) == 2 * adapter.num_llm_layers and all(len(w.frozen) == 1 for w in wrapped)
        params = dict(adapter.model.named_parameters())
        assert all(torch.equal(params[n], p) for n, p in state["params"].items() if n in params)
    assert_same_state(adapter, state)


def test_lora_sequential_edits_stack_frozen_adapters():
    adapter = tiny_adapter("tiny-desta25")
    first, second = _edits(adapter, 2)
    state = model_state(adapter)
    editor = LoRA(adapter, hparams("lora", adapter), context())
    with EditSession(editor) as session:
        session.apply(first)
        wrapped = [m for m in adapter.model.modules() if isinstance(m, LoRALinear)]
        after_first = [(a.clone(), b.clone()) for w in wrapped for a, b in w.frozen]
        session.apply(second)
        assert all(len(w.frozen) == 2 for w in wrapped)  # the second adapter is added on top of the first
        assert all(torch.equal(a, w.frozen[0][0]) and torch.equal(b, w.frozen[0][1])
                   for (a, b), w in zip(after_first, wrapped))  # and leaves the first one as it was
        assert adapter.generate([second.prompt()], max_new_tokens=1) == [second.target]
    assert_same_state(adapter, state)


def test_lora_merge_folds_the_adapter_into_the_touched_weights():
    adapter = tiny_adapter("tiny-audio-flamingo3")
    first, second = _edits(adapter, 2)
    state = model_state(adapter)
    editor = LoRA(adapter, hparams("lora", adapter, merge=True, target="connector"), context())
    touched = editor.touched_parameters()
    assert set(touched) == {n for n in adapter.parameter_groups()["connector"] if n.endswith("weight")}
    assert not editor.batches_edits  # merged weights would change every row of a shared pass
    with EditSession(editor) as session:
        session.apply(first)
        assert not any(isinstance(m, LoRALinear) for m in adapter.model.modules())  # no wrapper stays
        assert adapter.generate([first.prompt()], max_new_tokens=1) == [first.target]
        changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, state["params"][n])}
        assert changed == set(touched)
        after_first = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if n in changed}
        session.apply(second)  # sequential: the second low-rank update lands on top of the first
        assert all(not torch.equal(p, after_first[n]) for n, p in adapter.model.named_parameters() if n in changed)
    assert_same_state(adapter, state)


@pytest.mark.parametrize("model,target", [("tiny-qwen2-audio", "llm"), ("tiny-audio-flamingo3", "connector")])
def test_lora_edits_per_pass_equal_one_at_a_time(model, target):
    adapter = tiny_adapter(model)
    edits = _edits(adapter, 2)
    prompts = [[e.prompt()] + [it for it in (edit_request(audio_seed=9).prompt(),)] for e in edits]
    editor = LoRA(adapter, hparams("lora", adapter, target=target, max_steps=30), context())
    session = EditSession(editor)
    alone, alone_stats = [], []
    for edit, ps in zip(edits, prompts):
        with session.edit(edit) as one:
            alone_stats.append(one)
            alone.append(adapter.generate(ps, max_new_tokens=4))
    state = model_state(adapter)
    with session.edits(edits) as stats:
        together = editor.generate_many(prompts, max_new_tokens=4)
    assert together == alone
    assert [s["steps"] for s in stats] == [s["steps"] for s in alone_stats]
    assert all(abs(s["loss"] - t["loss"]) < 1e-4 for s, t in zip(stats, alone_stats))
    assert_same_state(adapter, state)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_lora_adapts_the_query_and_value_of_every_llm_layer_by_default(model):
    adapter = tiny_adapter(model)
    hp = hparams("lora", adapter)
    assert (hp.target, hp.modules, hp.layers, hp.rank, hp.lora_alpha) == ("llm", ["query", "value"], None, 8, 32)
    editor = LoRA(adapter, hp, context())
    expected = {adapter.module_name(adapter.llm_linear(layer, role))
                for layer in range(adapter.num_llm_layers) for role in ("query", "value")}
    assert set(editor._linears()) == expected and len(expected) == 2 * adapter.num_llm_layers
    assert all(name.endswith(("q_proj", "v_proj")) for name in expected)
    one_layer = LoRA(adapter, hparams("lora", adapter, layers=[-1]), context())  # the single-layer variant
    assert {n.rsplit(".", 1)[0] for n in one_layer._linears()} == \
        {adapter.module_name(adapter.llm_layer(-1)) + ".self_attn"}


def test_lora_settings_are_easyedits_for_every_family():
    from editors.models.registry import families
    from editors.registry import load_hparams

    steps = {"qwen2_audio": 60, "audio_flamingo3": 60, "desta25": 50}  # qwen2.5-7b.yaml / llama3.1-8b.yaml
    for family in families():
        hp = load_hparams("lora", family)
        assert (hp.layers, hp.modules, hp.rank, hp.lora_alpha, hp.lr, hp.max_steps) == \
            (None, ["query", "value"], 8, 32, 5e-3, steps[family]), family
