"""KE and MEND editors (editors/ke.py, editors/mend.py): edits with a trained hypernetwork, exact restore, a clear
error without one, and the runner CLI in single and sequential mode."""

from __future__ import annotations

import json

import pytest
import torch

from _editor_helpers import cli_args, run_config
from _methods_helpers import (assert_same_state, context, demo_dataset, edit_request, hparams, model_state,
                              tiny_adapter, trained_network)
from editors.base import ParameterSnapshot
from editors.registry import get_editor_class
from editors.models.base import Prompt
from editors.run import main as run_main

FAR = Prompt("Question: which of the following is correct? Answer: A B C D. Choose the best answer.")


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
    snapshot = ParameterSnapshot(adapter.model, touched)
    for target, audio_seed in (("sad", 1), ("dog", 7)):
        edit = edit_request(target=target, audio_seed=audio_seed)
        before = adapter.generate([edit.prompt()], max_new_tokens=8)[0]
        assert before != target
        try:
            stats = editor.apply(edit)
            assert adapter.generate([edit.prompt()], max_new_tokens=8) == [target]
            assert stats["steps"] == 1 and all(stats[f"delta_norm.{layer}"] > 0 for layer in (1, 2, 3))
            # the network's training time (editors.train) rides along for the runner's .timing.json / Table 7
            assert stats["hypernetwork_train_s"] == editor.network_config["train_seconds"] > 0
            changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, state["params"][n])}
            assert changed == out_proj_weights
        finally:
            snapshot.restore()
            editor.reset()
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


@pytest.mark.parametrize("method,mode", [("ke", "single"), ("mend", "sequential")])
def test_runner_cli_with_a_trained_hypernetwork(method, mode, tmp_path):
    out = tmp_path / "preds.jsonl"
    args = cli_args(run_config(demo_dataset(), out, tmp_path / "cache", method=method, mode=mode, limit=1,
                               configs=("sequential",) if mode == "sequential" else ("emotion",),
                               hparams={"hypernetwork_path": str(trained_network(method))}))
    assert run_main(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["kind"] == "header" and lines[0]["method"] == method
    rows = lines[1:]
    assert rows and all(r["kind"] == "prediction" and r["post_edit"] is not None for r in rows)
    if mode == "sequential":
        assert {r["gap"] for r in rows} >= {0, 1}
