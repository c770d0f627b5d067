"""KE and MEND editors (editors/ke.py, editors/mend.py), what is particular to them: a trained hypernetwork's edit
gives the target on the layers it names, and a clear error without one. (Every method's edit, restore, runner and
resume: tests/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch

from _methods_helpers import (assert_same_state, context, edit_request, hparams, model_state, tiny_adapter,
                              trained_network)
from editors.registry import get_editor_class
from editors.session import EditSession


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_trained_hypernetwork_edit_gives_the_target_and_restores_exactly(method):
    adapter = tiny_adapter("tiny-qwen2-audio")
    editor = get_editor_class(method)(adapter, hparams(method, adapter,
                                                       hypernetwork_path=str(trained_network(method))), context())
    editor.setup()
    touched = editor.touched_parameters()
    out_proj_weights = {adapter.parameter_names(adapter.mlp_out_proj(layer))[0] for layer in (1, 2, 3)}
    assert set(touched) == out_proj_weights
    state = model_state(adapter)
    session = EditSession(editor)
    for target, audio_seed in (("sad", 1), ("dog", 7)):
        edit = edit_request(target=target, audio_seed=audio_seed)
        before = adapter.generate([edit.prompt()], max_new_tokens=8)[0]
        assert before != target
        with session.edit(edit) as stats:
            assert adapter.generate([edit.prompt()], max_new_tokens=8) == [target]
            assert stats["steps"] == 1 and all(stats[f"delta_norm.{layer}"] > 0 for layer in (1, 2, 3))
            changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, state["params"][n])}
            assert changed == out_proj_weights
        assert_same_state(adapter, state)


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_editing_without_a_trained_hypernetwork_is_a_clear_error(method, tmp_path):
    adapter = tiny_adapter("tiny-qwen2-audio")
    editor = get_editor_class(method)(adapter, hparams(method, adapter),
                                      context(cache_dir=str(tmp_path), model_name="tiny-qwen2-audio"))
    with pytest.raises(ValueError, match=f"no trained hypernetwork.*python -m editors.train --method {method}"):
        editor.setup()
    other = "mend" if method == "ke" else "ke"
    editor = get_editor_class(method)(adapter, hparams(method, adapter,
                                                       hypernetwork_path=str(trained_network(other))), context())
    with pytest.raises(ValueError, match=f"'{other}' hypernetwork"):
        editor.setup()

