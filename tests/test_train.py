"""Hypernetwork training (editors/train.py): a demo run completes, the saved network reloads identically, resume
continues from the checkpoint (step counter and optimizer state), gradients accumulate over ``accumulate_bs``
instances, validation instances are held out and early stop keeps the network of the lowest validation loss, and
the CLI works."""

from __future__ import annotations

import logging

import json
import math

import pytest
import torch

import editors.train as train_mod
from _methods_helpers import (SMALL_TRAINING, demo_dataset, hparams, load_train_split, session_tmp, tiny_adapter,
                              trained_network)
from editors.train import Trainer, TrainExample, load_network, main, plan_training, training_step
from sake_core.errors import ConfigError, TrainingDiverged


def _trainer(method, out, adapter=None, **kwargs):
    adapter = adapter or tiny_adapter("tiny-qwen2-audio")
    return Trainer(adapter, method, hparams(method, adapter, **SMALL_TRAINING), load_train_split(), out, seed=0,
                   model_name="tiny-qwen2-audio", limit=2, progress=False, **kwargs)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_saved_network_reloads_identically_and_resume_continues(method, monkeypatch, caplog):
    full_dir = trained_network(method)  # an uninterrupted run: 6 of the 8 instances train, 2 validate
    full, config = load_network(full_dir)
    assert config["method"] == method and config["steps_trained"] == 6 == config["steps_total"]
    assert len(config["validation_instances"]) == 2 and [v["step"] for v in config["validations"]] == [2, 4, 6]
    assert (full_dir / "hypernetwork.safetensors").is_file()

    out = session_tmp() / f"resume-{method}"
    # One adapter for the interrupted run and its resume, as in one process: its audio-state cache then holds
    # the encoder outputs computed in the same batches as the uninterrupted run's (the encoder is not batch
    # invariant in the last bits, so a cold cache could differ there).
    adapter = tiny_adapter("tiny-qwen2-audio")
    first = _trainer(method, out, adapter, checkpoint_every=1)
    with caplog.at_level(logging.WARNING, logger="editors.train"):
        first.train(max_steps=3)  # interrupted in the second group of 2: finishes the group (step 4)
    assert not (out / "config.json").exists()  # no final network before the end, and the log says so
    assert "stopped at 4 of 6 train instances (--max-steps): only a checkpoint is saved" in caplog.text
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["best"] is not None and state["train_seconds"] > 0

    calls = []
    real_step = train_mod.training_step
    monkeypatch.setattr(train_mod, "training_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    second = _trainer(method, out, adapter, checkpoint_every=1)
    assert second.try_resume() and second.step == 4
    steps_in_optimizer = {int(s["step"]) for s in second.optimizer.state_dict()["state"].values()}
    assert steps_in_optimizer == {2}  # optimizer state restored (2 steps of 2 instances), not fresh
    second.train()
    assert len(calls) == 2 + 2  # continued with training steps 5..6 only, then one validation of 2 instances
    resumed, resumed_config = load_network(out)
    # the training time (Table 7's hypernetwork column) sums the interrupted run and its resume
    assert resumed_config["train_seconds"] > state["train_seconds"] > 0
    assert config["train_seconds"] > 0
    # the saved file holds the trainer's (best) network in memory, and equals the uninterrupted run, bit for bit
    assert _same_state(resumed.state_dict(), {k: v.cpu() for k, v in second.net.state_dict().items()})
    assert _same_state(resumed.state_dict(), full.state_dict())
    assert [h["step"] for h in second.history] == list(range(1, 7))


def test_cli_trains_then_reports_already_trained(tmp_path, capsys):
    out = tmp_path / "ke-net"
    argv = ["--method", "ke", "--model", "tiny-qwen2-audio", "--dataset", str(demo_dataset()), "--out", str(out),
            "--limit", "1", "--config", "emotion", "--config", "gender", "--hparam", "val_size=0", "--no-progress"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["steps_trained"] == 2 and config["configs"] == ["emotion", "gender"]
    assert config["validations"] == [] and config["best"] is None
    before = (out / "hypernetwork.safetensors").read_bytes()
    assert main(argv) == 0  # resumes at the end: nothing retrained
    assert (out / "hypernetwork.safetensors").read_bytes() == before
    assert main(argv[:-1] + ["--config", "sequential"]) == 2
    assert "unknown attribute config" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_order(tmp_path):
    out = tmp_path / "mend-net"
    _trainer("mend", out, checkpoint_every=1).train(max_steps=1)
    adapter = tiny_adapter("tiny-qwen2-audio")
    other = Trainer(adapter, "mend", hparams("mend", adapter, **SMALL_TRAINING), load_train_split(), out, seed=1,
                    limit=2, progress=False)
    with pytest.raises(ValueError, match="another dataset/seed/limit"):
        other.try_resume()
    # other hyperparameters, or another model's weights, are refused too (the optimizer state and the best loss
    # so far belong to the checkpoint's)
    changed = Trainer(adapter, "mend", hparams("mend", adapter, **SMALL_TRAINING, lr=0.5, c_edit=5.0),
                      load_train_split(), out, seed=0, limit=2, progress=False)
    with pytest.raises(ValueError, match=r"other hyperparameters \(c_edit: .*, lr: "):
        changed.try_resume()
    seeded = tiny_adapter("tiny-qwen2-audio", seed=1)
    with pytest.raises(ValueError, match="the checkpoint was trained on"):
        Trainer(seeded, "mend", hparams("mend", seeded, **SMALL_TRAINING), load_train_split(), out, seed=0,
                limit=2, progress=False).try_resume()
    # the checkpoint folder is replaced whole: no staging folder is left beside it
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]


def test_validation_instances_are_held_out_of_a_seeded_training_order():
    sizes = {"animal": 5, "emotion": 4, "gender": 3, "language": 6}
    order, validation = plan_training(sizes, epochs=2, seed=3, val_size=4)
    assert (order, validation) == plan_training(sizes, epochs=2, seed=3, val_size=4)  # deterministic
    assert len(validation) == 4 and not set(validation) & set(order)
    assert len(order) == 2 * (18 - 4) and set(order[:14]) == set(order[14:])  # every epoch: the same instances
    assert plan_training(sizes, epochs=1, seed=4, val_size=4)[1] != validation  # the seed draws them
    with pytest.raises(ConfigError, match="val_size=18"):
        plan_training(sizes, epochs=1, seed=0, val_size=18)


def test_the_optimizer_steps_once_per_accumulate_bs_instances_with_their_mean_gradient(tmp_path, monkeypatch):
    method = "mend"  # the trainer's loop is the same for KE
    adapter = tiny_adapter("tiny-qwen2-audio")
    trainer = Trainer(adapter, method, hparams(method, adapter, val_size=0, accumulate_bs=3, grad_clip=None),
                      load_train_split(), tmp_path / "net", seed=0, limit=1, progress=False)
    assert len(trainer.order) == 4  # groups of 3 and 1
    # the expected gradient of the first group: the mean of each instance's own gradient, on a copy of the
    # initial network run over the same instances in the same order (MEND's running statistics included)
    reference = Trainer(adapter, method, trainer.hp, load_train_split(), tmp_path / "ref", seed=0, limit=1,
                        progress=False).net
    reference.train()
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]
    for config, index in trainer.order[:3]:
        example = TrainExample.from_row(trainer.datasets[config][index])
        loss, _ = reference.training_loss(*training_step(adapter, reference, example), trainer.hp)
        for g, part in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if part is not None:
                g += part / 3
    seen = []
    real_step = trainer.optimizer.step

    def spy_step(*args, **kwargs):
        seen.append([p.grad.clone() if p.grad is not None else None
                     for p in trainer.net.parameters() if p.requires_grad])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", spy_step)
    trainer.train()
    assert len(seen) == 2  # 4 instances in groups of 3 and 1
    for got, want in zip(seen[0], grads):
        assert got is not None and torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_early_stop_keeps_the_network_of_the_lowest_validation_loss(tmp_path, monkeypatch):
    adapter = tiny_adapter("tiny-qwen2-audio")
    hp = hparams("mend", adapter, val_size=2, val_interval=1, accumulate_bs=1, early_stop_patience=2)
    trainer = Trainer(adapter, "mend", hp, load_train_split(), tmp_path / "net", seed=0, limit=2, progress=False)
    assert len(trainer.order) == 6
    scripted = iter([0.5, 0.3, 0.4, 0.45, 0.1, 0.1])  # best at step 2; steps 3 and 4 not lower: stop at 4
    states = {}

    def scripted_validate():
        states[trainer.step] = {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}
        return {"step": trainer.step, "val_loss": next(scripted), "val_edit_loss": 0.0, "val_loc_loss": 0.0}

    monkeypatch.setattr(trainer, "validate", scripted_validate)
    trainer.train()
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    assert config["stopped_early"] and config["steps_trained"] == 4 == trainer.step
    assert config["best"] == {"step": 2, "val_loss": 0.3}
    saved, _ = load_network(tmp_path / "net")
    assert _same_state(saved.state_dict(), states[2]) and not _same_state(saved.state_dict(), states[4])
    # a rerun finds it finished (early stop) and trains nothing more
    again = Trainer(adapter, "mend", hp, load_train_split(), tmp_path / "net", seed=0, limit=2, progress=False)
    assert again.try_resume() and again.finished


def test_validation_runs_the_network_in_eval_mode_without_changing_it():
    adapter = tiny_adapter("tiny-qwen2-audio")
    trainer = Trainer(adapter, "mend", hparams("mend", adapter, **SMALL_TRAINING), load_train_split(),
                      session_tmp() / "val-eval", seed=0, limit=2, progress=False)
    trainer.net.train()
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    first = trainer.validate()
    assert trainer.net.training and _same_state(before, trainer.net.state_dict())  # normalisation not updated
    assert trainer.validate() == first and first["val_loss"] == pytest.approx(
        hparams("mend", adapter).c_edit * first["val_edit_loss"] + first["val_loc_loss"], abs=1e-5)


@pytest.mark.parametrize("val_size", [0, 2])
def test_a_diverging_run_stops_naming_the_step_and_saves_no_network(tmp_path, val_size):
    # KE's RMSprop moves every parameter by about 10 * lr on its first step: an infinite lr makes the network's
    # weights infinite or NaN, and so its edits and the losses after them (a finite lr of 1e30 did not: how the
    # model's norms treat huge inputs changed between transformers releases). A hparams file or --hparam refuses
    # a non-finite value; the dataclass built directly takes it, to stand for a diverging training.
    import dataclasses

    adapter = tiny_adapter("tiny-qwen2-audio")
    hp = dataclasses.replace(hparams("ke", adapter, val_size=val_size, val_interval=1, accumulate_bs=1,
                                     grad_clip=None), lr=float("inf"))
    trainer = Trainer(adapter, "ke", hp, load_train_split(), tmp_path / "net", seed=0, limit=2, progress=False,
                      checkpoint_every=10)
    with pytest.raises(TrainingDiverged) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith("ke: the loss is not finite at ") and "lr=inf" in message
    # the first non-finite loss, by the training instance's number and row or the validation's step
    assert (f"at training instance {trainer.step + 1} (" in message
            or (val_size and f"at validation after step {trainer.step}:" in message))
    assert all(math.isfinite(h["edit_loss"]) for h in trainer.history)  # no non-finite loss was recorded
    assert not (tmp_path / "net" / "config.json").exists()  # no network saved as trained


def test_a_non_finite_validation_loss_stops_before_the_network_is_kept_as_best(tmp_path, monkeypatch):
    adapter = tiny_adapter("tiny-qwen2-audio")
    hp = hparams("mend", adapter, val_size=2, val_interval=1, accumulate_bs=1)
    trainer = Trainer(adapter, "mend", hp, load_train_split(), tmp_path / "net", seed=0, limit=2, progress=False)
    real_step = train_mod.training_step

    def nan_in_validation(adapter, net, example):  # validation runs the network in eval mode
        edit, loc = real_step(adapter, net, example)
        return (edit, loc) if net.training else (edit * float("nan"), loc)

    monkeypatch.setattr(train_mod, "training_step", nan_in_validation)
    with pytest.raises(TrainingDiverged, match=r"mend: the loss is not finite at validation after step 1: edit loss nan"):
        trainer.train()
    assert trainer.step == 1 and trainer.best is None and not trainer.validations
    assert not (tmp_path / "net" / "config.json").exists()


def test_a_non_finite_gradient_stops_before_the_optimizer_step_naming_the_instance(tmp_path, monkeypatch):
    adapter = tiny_adapter("tiny-qwen2-audio")
    hp = hparams("ke", adapter, val_size=0, accumulate_bs=3)
    trainer = Trainer(adapter, "ke", hp, load_train_split(), tmp_path / "net", seed=0, limit=2, progress=False)
    real_step = train_mod.training_step
    calls = []

    def nan_gradient_on_the_second(adapter, net, example):  # finite losses, a NaN gradient from the second call on
        edit, loc = real_step(adapter, net, example)
        calls.append(1)
        if len(calls) >= 2:
            z = next(p for p in net.parameters() if p.requires_grad).sum()
            z = z - z.detach()  # 0, with a gradient path into the network
            edit = edit + 0 * torch.sqrt(z * z)  # d sqrt(z^2) / dz at 0 is NaN
        return edit, loc

    monkeypatch.setattr(train_mod, "training_step", nan_gradient_on_the_second)
    stepped = []
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: stepped.append(1))
    config, index = trainer.order[1]
    with pytest.raises(TrainingDiverged, match=rf"ke: the gradient of training instance 2 \({config} row {index}\) "
                                               r"is not finite \(in 1 parameter tensor\(s\): ") as caught:
        trainer.train()
    traced = str(caught.value).split("Traced again: ", 1)[1]  # the same instance run again under the trace
    assert "first non-finite forward output" not in traced  # the forward pass was finite, as in training
    assert "anomaly mode: Function 'SqrtBackward0' returned nan values" in traced
    assert "test_train.py" in traced and "torch.sqrt(z * z)" in traced  # the forward line that made it
    assert not stepped and trainer.step == 1 and all(math.isfinite(h["edit_loss"]) for h in trainer.history)
    assert not (tmp_path / "net" / "config.json").exists()


def test_training_forward_passes_never_may_pick_cudnn_attention(tmp_path, monkeypatch):
    """Its backward returns NaN for some masked shapes on H100/H200 (editors/models/kernels.py)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    under_gradient: list[bool] = []  # cuDNN's kernel allowed, for each attention call a gradient flows through

    def recording(query, *args, **kwargs):
        if torch.is_grad_enabled() and query.requires_grad:
            under_gradient.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    _trainer("mend", tmp_path / "net").train(max_steps=1)
    assert under_gradient and not any(under_gradient)
    assert torch.backends.cuda.cudnn_sdp_enabled()
