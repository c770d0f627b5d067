"""Hypernetwork training (editors/train.py): a demo run completes, the saved network reloads identically, resume
continues from the checkpoint (step counter and optimizer state), and the CLI works."""

from __future__ import annotations

import json

import pytest
import torch

import editors.train as train_mod
from _methods_helpers import demo_dataset, hparams, load_train_split, session_tmp, tiny_adapter, trained_network
from editors.train import Trainer, load_network, main


def _trainer(method, out, adapter=None, **kwargs):
    adapter = adapter or tiny_adapter("tiny-qwen2-audio")
    return Trainer(adapter, method, hparams(method, adapter), load_train_split(), out, seed=0,
                   model_name="tiny-qwen2-audio", limit=2, progress=False, **kwargs)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_saved_network_reloads_identically_and_resume_continues(method, monkeypatch):
    full_dir = trained_network(method)  # an uninterrupted run over 8 demo train instances (2 per config)
    full, config = load_network(full_dir)
    assert config["method"] == method and config["steps_trained"] == 8 == config["steps_total"]
    assert (full_dir / "hypernetwork.safetensors").is_file()

    out = session_tmp() / f"resume-{method}"
    # One adapter for the interrupted run and its resume, as in one process: its audio-state cache then holds
    # the encoder outputs computed in the same batches as the uninterrupted run's (the encoder is not batch
    # invariant in the last bits, so a cold cache could differ there).
    adapter = tiny_adapter("tiny-qwen2-audio")
    first = _trainer(method, out, adapter, checkpoint_every=3)
    first.train(max_steps=5)  # interrupted after 5 of 8 steps (checkpoints at 3 and 5)
    assert not (out / "config.json").exists()  # no final network before the end
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["train_seconds"] > 0

    calls = []
    real_step = train_mod.training_step
    monkeypatch.setattr(train_mod, "training_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    second = _trainer(method, out, adapter, checkpoint_every=3)
    assert second.try_resume() and second.step == 5
    steps_in_optimizer = {int(s["step"]) for s in second.optimizer.state_dict()["state"].values()}
    assert steps_in_optimizer == {5}  # optimizer state restored, not fresh
    second.train()
    assert len(calls) == 3  # continued with steps 6..8 only
    resumed, resumed_config = load_network(out)
    # the training time (Table 7's hypernetwork column) sums the interrupted run and its resume
    assert resumed_config["train_seconds"] > state["train_seconds"] > 0
    assert config["train_seconds"] > 0
    # the saved file holds the trainer's network in memory, and equals the uninterrupted run, bit for bit
    assert _same_state(resumed.state_dict(), {k: v.cpu() for k, v in second.net.state_dict().items()})
    assert _same_state(resumed.state_dict(), full.state_dict())
    assert [h["step"] for h in second.history] == list(range(1, 9))


def test_cli_trains_then_reports_already_trained(tmp_path, capsys):
    out = tmp_path / "ke-net"
    argv = ["--method", "ke", "--model", "tiny-qwen2-audio", "--dataset", str(demo_dataset()), "--out", str(out),
            "--limit", "1", "--config", "emotion", "--config", "gender", "--no-progress"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["steps_trained"] == 2 and config["configs"] == ["emotion", "gender"]
    before = (out / "hypernetwork.safetensors").read_bytes()
    assert main(argv) == 0  # resumes at the end: nothing retrained
    assert (out / "hypernetwork.safetensors").read_bytes() == before
    assert main(argv[:-1] + ["--config", "sequential"]) == 2
    assert "unknown attribute config" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_order(tmp_path):
    out = tmp_path / "mend-net"
    _trainer("mend", out, checkpoint_every=1).train(max_steps=1)
    adapter = tiny_adapter("tiny-qwen2-audio")
    other = Trainer(adapter, "mend", hparams("mend", adapter), load_train_split(), out, seed=1, limit=2,
                    progress=False)
    with pytest.raises(ValueError, match="another dataset/seed/limit"):
        other.try_resume()
