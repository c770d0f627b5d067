"""I-IKE and IE-IKE: prompts only, no parameter change; retrieval of demonstrations from the train split."""

from __future__ import annotations

import dataclasses

import pytest

from _editor_helpers import changed_tensors, state_copy
from editors.base import EditRequest, RunContext
from editors.registry import get_editor_class
from editors.data import eval_items, load_instances
from editors.registry import load_hparams
from editors.models import load_adapter



@pytest.fixture(scope="module")
def adapter():
    return load_adapter("tiny-qwen2-audio", seed=0)


def make_editor(adapter, method, dataset, seed=0):
    context = RunContext(seed=seed, load_rows=lambda config, split: load_instances(str(dataset), config, split))
    return get_editor_class(method)(adapter, load_hparams(method, adapter.family, tiny=True), context)


def test_in_context_methods_change_no_parameter(adapter, demo_dataset):
    row = load_instances(str(demo_dataset), "emotion", "test")[0]
    edit, items = EditRequest.from_row(row), eval_items(row)
    for method in ("i_ike", "ie_ike"):
        editor = make_editor(adapter, method, demo_dataset)
        assert editor.touched_parameters() == [] and not editor.changes_parameters
        before = state_copy(adapter.model)
        editor.apply(edit)
        prompts = editor.rewrite_prompts([it.prompt() for it in items], edit)
        adapter.generate(prompts, max_new_tokens=4)
        assert changed_tensors(adapter.model, before) == []
        editor.reset()


def test_i_ike_states_every_active_edit_in_the_system_prompt(adapter, demo_dataset):
    rows = load_instances(str(demo_dataset), "sequential", "test")
    first, second = EditRequest.from_row(rows[0]), EditRequest.from_row(rows[1])
    editor = make_editor(adapter, "i_ike", demo_dataset)
    editor.apply(first)
    (p1,) = editor.rewrite_prompts([first.prompt()], first)
    assert f'"{first.original_label}"' in p1.system and f'"{first.target_label}"' in p1.system
    assert p1.question == first.question and p1.audio is first.audio and p1.history == ()
    editor.apply(second)
    (p2,) = editor.rewrite_prompts([first.prompt()], first)
    assert p2.system.startswith(p1.system) and f'"{second.target_label}"' in p2.system
    editor.reset()
    (p3,) = editor.rewrite_prompts([first.prompt()], first)
    assert first.target_label not in p3.system


@pytest.mark.parametrize("config", ["emotion", "gender"])
def test_ie_ike_demonstrations_follow_the_paper(adapter, demo_dataset, config):
    train = load_instances(str(demo_dataset), config, "train")
    pair = (train[0]["original_label"], train[0]["target_label"])
    row = load_instances(str(demo_dataset), config, "test")[0]
    edit = dataclasses.replace(EditRequest.from_row(row), original_label=pair[0], target_label=pair[1])
    editor = make_editor(adapter, "ie_ike", demo_dataset)
    source = editor.retrieve(edit)
    assert (source["original_label"], source["target_label"]) == (edit.original_label, edit.target_label)
    assert source["split"] == "train"
    turns = editor.demonstrations(edit)
    n_loc_audio = min(4, len(source["locality_audio"]))
    assert len(turns) == 1 + 3 + n_loc_audio + 1
    assert config != "gender" or n_loc_audio == 3
    assert turns[0].question == source["question"] and turns[0].answer == source["answer"]
    assert all(t.audio is not None for t in turns[:-1]) and turns[-1].audio is None  # text locality last
    assert turns[-1].answer == source["locality_text"][0]["answer"]
    editor.apply(edit)
    (prompt,) = editor.rewrite_prompts([edit.prompt()], edit)
    assert prompt.history == turns and edit.target_label in prompt.system
    assert len(adapter.generate([prompt], max_new_tokens=3)) == 1  # renders with all demonstration audio
    again = make_editor(adapter, "ie_ike", demo_dataset)
    assert again.retrieve(edit)["id"] == source["id"] and again.fallbacks == 0  # seeded, deterministic
    unknown = dataclasses.replace(edit, original_label="nothing-like-this")
    assert again.retrieve(unknown)["target_label"] == edit.target_label and again.fallbacks == 1


def test_ie_ike_without_train_split_is_a_clear_error(adapter, demo_dataset):
    row = load_instances(str(demo_dataset), "emotion", "test")[0]
    editor = get_editor_class("ie_ike")(adapter, load_hparams("ie_ike", adapter.family, tiny=True))
    with pytest.raises(ValueError, match="train split"):
        editor.apply(EditRequest.from_row(row))
