"""Train the hypernetworks of KE and MEND on the SAKE train split (the networks, their loading and the editor base
that applies them are the library :mod:`editors.hypernetwork`; this module is the trainer and its CLI).

    python -m editors.train --method mend --model Qwen/Qwen2-Audio-7B-Instruct --dataset sake/sake --out hn/mend-qwen
    python -m editors.train --method ke --model tiny-qwen2-audio --dataset /tmp/sake_demo --limit 8

Both methods edit the LLM Linears of ``hparams.roles`` in ``hparams.layers`` (paper Table 6: Qwen and DeSTA
29-31, AF3 25-27; EasyEdit's settings: the up and down projections) from the *fine-tuning gradient* of the edit
(:func:`editors.hypernetwork.edit_factors`); the method's network (:class:`HyperNetwork`: ``editors/ke.py``,
``editors/mend.py``) maps its rank-1 factors to a weight update per matrix.

Data. ``val_size`` instances of the train split (a seeded draw over all attribute configs) are held out for
validation; the others are the training instances, ``epochs`` passes in a seeded order.

One training instance:

1. factors of the edit (reliability prompt -> target answer) on the unedited model;
2. updates ``dW = net(factors)`` (differentiable in the network's parameters), applied functionally (a forward hook
   computes each edited Linear with ``W + dW``; the model's weights never change);
3. edit loss: target cross-entropy on the edit and its generality items (answers = the edit-linked answers);
   locality loss: KL(pre-edit || post-edit) of the next-token distributions at the reference answer tokens of the
   instance's audio and text locality items;
4. the method combines them (:meth:`HyperNetwork.training_loss`); the gradient of ``loss / accumulate_bs`` is
   accumulated, and the optimizer steps after every ``accumulate_bs`` instances (EasyEdit's ``accumulate_bs``; the
   last group of the order may be shorter).

Validation and early stop (EasyEdit's trainer): every ``val_interval`` training instances (at the next optimizer
step) and at the end, the validation loss ``c_edit * edit + c_loc * KL`` (EasyEdit's ``loss/total_edit_val``) is
the mean over the held-out instances, the network in eval mode (MEND's normalisation statistics frozen). Training
stops early when ``early_stop_patience`` training instances passed since the lowest validation loss; the saved
network is the one with the lowest validation loss (``val_size: 0``: no validation, the last network). A loss
(training or validation) or an accumulated gradient that is NaN or infinite stops the run with
:class:`sake_core.errors.TrainingDiverged` naming the instance (or validation step) and, for a gradient, the
parameter tensors, before the optimizer step (after running the instance again under
:class:`editors.nonfinite.NonFiniteTrace`, whose findings the message carries); the last checkpoint and any saved
network stay as they were. Every forward pass of :func:`training_step` runs under
:func:`editors.models.kernels.training_attention` (never cuDNN's attention, whose backward returns NaN for some
masked shapes on H100/H200).

The layers below the first edited one are frozen, so every batch's hidden states entering it are computed once per
instance (``adapter.hidden_entering``); each loss runs only the edited layers and those above.

Output (``--out``, default ``CACHE/hypernetworks/METHOD/MODEL``): ``hypernetwork.safetensors`` + ``config.json``
(method, model, matrices, shapes, hyperparameters, training and validation summary, ``train_seconds``: the
wall-clock seconds of the training loop, summed over resumed runs; the editor reports it with every edit, so the
runner's ``.timing.json`` and the report's Table 7 carry it). ``--out/checkpoint/`` holds the latest checkpoint
(network + optimizer state + step counter + the best network so far in ``checkpoint/best/``) every
``--checkpoint-every`` steps, at optimizer-step boundaries, replaced whole (a kill leaves the old one or the new
one); rerunning the same command resumes from it (the same seeded order, continuing at the saved step with the saved
optimizer state), and a rerun with another order, other hyperparameters or another model's weights is refused.
Editing loads the network from ``hparams.hypernetwork_path`` or the default location, and raises a clear error when
none exists or when the default location holds a network trained on other weights than the model's.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.nn import functional as F
from tqdm import tqdm

from editors.base import EditRequest
from editors.hypernetwork import (CHECKPOINT_DIR, CONFIG_FILE, HypernetHparams, HyperNetwork, _atomic_json,
                                  build_network, condition_embeddings, default_hypernet_dir, edit_factors,
                                  hypernetwork_methods, load_network, parse_matrix_key, save_network,
                                  shifted_matrices)
from editors.models.base import LALMAdapter, Prompt, as_audio_array
from editors.models.kernels import training_attention
from editors.nonfinite import NonFiniteTrace
from sake_core.atomic import atomic_write, replace_dir, staging_dir
from sake_core.errors import ConfigError, DataError, TrainingDiverged, user_errors
from sake_core.command import command_prog

logger = logging.getLogger("editors.train")

# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainExample:
    """What one training step needs from an instance row."""

    edit: EditRequest
    equivalent: list[tuple[Prompt, str]]  # generality items: prompt -> edit-linked answer
    locality: list[tuple[Prompt, str]]  # audio + text locality items: prompt -> reference answer

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TrainExample":
        def prompt(item: dict[str, Any]) -> Prompt:
            audio = item.get("audio")
            return Prompt(question=item["question"],
                          audio=as_audio_array(audio, where=f"{item['id']}: audio") if audio is not None else None)

        equivalent = [(prompt(it), it["answer"]) for it in row.get("generality") or []]
        locality = [(prompt(it), it["answer"]) for it in (row.get("locality_audio") or [])
                    + (row.get("locality_text") or [])]
        return cls(edit=EditRequest.from_row(row), equivalent=equivalent, locality=locality)


def _kl_at_targets(adapter: LALMAdapter, state: Any, pre_logp: torch.Tensor) -> torch.Tensor:
    """KL(pre || post) of the next-token distributions at the target positions of ``state.batch``."""
    batch = state.batch
    final = adapter.final_hidden_from(state)
    post_logp = F.log_softmax(adapter.lm_head()(final[batch.target_rows, batch.target_cols]).float(), dim=-1)
    return (pre_logp.exp() * (pre_logp - post_logp)).sum(-1).mean()


def _target_logp(adapter: LALMAdapter, state: Any) -> torch.Tensor:
    batch = state.batch
    with torch.no_grad():
        final = adapter.final_hidden_from(state)
        return F.log_softmax(adapter.lm_head()(final[batch.target_rows, batch.target_cols]).float(), dim=-1)


def training_step(adapter: LALMAdapter, net: HyperNetwork, example: TrainExample
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-edit edit loss and locality KL of one example (differentiable in the network's parameters). Its
    attention kernels are picked here for the backward too: never cuDNN's (:func:`training_attention`)."""
    with training_attention():
        return _training_step(adapter, net, example)


def _training_step(adapter: LALMAdapter, net: HyperNetwork, example: TrainExample
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    matrices = net.matrices
    first = min(parse_matrix_key(key)[0] for key in matrices)
    edit_batch = adapter.prepare([example.edit.prompt()], [example.edit.target])
    factors, _ = edit_factors(adapter, matrices, edit_batch)
    condition = condition_embeddings(adapter, edit_batch) if net.needs_condition else None
    eq = [(example.edit.prompt(), example.edit.target)] + example.equivalent
    eq_state = adapter.hidden_entering(adapter.prepare([p for p, _ in eq], [t for _, t in eq]), first)
    locality = None
    if example.locality:
        loc_batch = adapter.prepare([p for p, _ in example.locality], [t for _, t in example.locality])
        loc_state = adapter.hidden_entering(loc_batch, first)
        locality = (loc_state, _target_logp(adapter, loc_state))
    deltas = net.deltas(factors, condition)
    with shifted_matrices(adapter, deltas):
        edit_loss = adapter.loss_from(eq_state)
        loc_loss = _kl_at_targets(adapter, *locality) if locality is not None else edit_loss.new_zeros(())
    return edit_loss, loc_loss


Ref = tuple[str, int]  # (attribute config, row index)


def plan_training(sizes: dict[str, int], epochs: int, seed: int, limit: int | None = None, val_size: int = 0
                  ) -> tuple[list[Ref], list[Ref]]:
    """(training order of all epochs, validation instances). The first ``val_size`` of a seeded shuffle of every
    config's rows (first ``limit`` per config) are held out; each epoch is a seeded shuffle of the others.
    ConfigError when no training instance would remain."""
    refs = [(c, i) for c in sorted(sizes) for i in range(sizes[c] if limit is None else min(limit, sizes[c]))]
    if val_size < 0 or (refs and val_size >= len(refs)):
        raise ConfigError(f"hparam val_size={val_size}: expected 0 <= val_size < the {len(refs)} train instances "
                          "(lower it with --hparam val_size=N)")
    held = list(refs)
    random.Random(f"{seed}:validation").shuffle(held)
    validation = sorted(held[:val_size])
    chosen = set(validation)
    train_refs = [r for r in refs if r not in chosen]
    order: list[Ref] = []
    for epoch in range(epochs):
        epoch_refs = list(train_refs)
        random.Random(f"{seed}:{epoch}").shuffle(epoch_refs)
        order += epoch_refs
    return order, validation


class Trainer:
    """One training run of a hypernetwork, with accumulation, validation, early stop, checkpoints and resume (see
    the module docstring)."""

    def __init__(self, adapter: LALMAdapter, method: str, hp: HypernetHparams, datasets: dict[str, Any],
                 out_dir: str | Path, *, seed: int = 0, model_name: str = "", dataset_name: str = "",
                 limit: int | None = None, checkpoint_every: int = 50, progress: bool = True) -> None:
        self.adapter, self.method, self.hp = adapter, method, hp
        self.datasets = datasets
        self.out_dir = Path(out_dir)
        self.seed, self.limit = seed, limit
        self.model_name = model_name or adapter.model_id
        self.dataset_name = dataset_name
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.progress = progress
        if hp.accumulate_bs < 1 or hp.val_interval < 1 or hp.early_stop_patience < 1:
            raise ConfigError(f"{method}: accumulate_bs ({hp.accumulate_bs}), val_interval ({hp.val_interval}) and "
                              f"early_stop_patience ({hp.early_stop_patience}) must be >= 1")
        self.order, self.validation = plan_training({c: len(d) for c, d in datasets.items()}, hp.epochs, seed,
                                                    limit, hp.val_size)
        self.net = build_network(method, adapter, self.hp, seed)
        self.optimizer = self.net.make_optimizer(self.hp)
        self.step = 0  # training instances done (always at an optimizer-step boundary between calls)
        self.history: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []  # {"step", "val_loss", "val_edit_loss", "val_loc_loss"}
        self.best: dict[str, Any] | None = None  # {"step", "val_loss"} of the lowest validation loss
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_early = False
        self.train_seconds = 0.0  # training-loop wall clock of earlier (resumed) runs
        self._run_start: float | None = None

    # ---- checkpoints --------------------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    @property
    def finished(self) -> bool:
        return self.step >= len(self.order) or self.stopped_early

    def _run_info(self) -> dict[str, Any]:
        return {"model": self.model_name, "model_id": self.adapter.model_id, "family": self.adapter.family,
                "model_key": self.adapter.model_key(), "dataset": self.dataset_name, "seed": self.seed,
                "limit": self.limit, "configs": sorted(self.datasets), "hparams": self.hp.as_dict(),
                "steps_total": len(self.order), "validation_instances": [list(r) for r in self.validation]}

    def save_checkpoint(self) -> None:
        """The network, the best one so far, the optimizer and the trainer's state, built in a staging folder and
        put in place of the checkpoint at once (a kill leaves the old checkpoint or the new one, never a mix)."""
        ckpt = staging_dir(self.checkpoint_dir)
        save_network(self.net, ckpt, self._run_info())
        if self.best_state is not None:
            best = build_network(self.method, self.adapter, self.hp, self.seed)
            best.load_state_dict(self.best_state)
            save_network(best, ckpt / "best", {**self._run_info(), "best": self.best})
        buffer = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buffer)
        atomic_write(ckpt / "optimizer.pt", buffer.getvalue())
        _atomic_json(ckpt / "trainer_state.json", {
            "step": self.step, "order_length": len(self.order), "order_head": self.order[:5],
            "validation": [list(r) for r in self.validation], "history": self.history,
            "validations": self.validations, "best": self.best, "stopped_early": self.stopped_early,
            "train_seconds": round(self.seconds_so_far(), 3)})
        replace_dir(ckpt, self.checkpoint_dir)

    def seconds_so_far(self) -> float:
        """Training-loop wall clock: earlier runs (from the checkpoint) plus the current one."""
        running = time.perf_counter() - self._run_start if self._run_start is not None else 0.0
        return self.train_seconds + running

    def try_resume(self) -> bool:
        """Load the checkpoint of ``out_dir`` if there is one (same order required); True when resumed."""
        state_file = self.checkpoint_dir / "trainer_state.json"
        if not state_file.is_file():
            return False
        state = json.loads(state_file.read_text())
        if state.get("order_length") != len(self.order) or [list(x) for x in self.order[:5]] != \
                [list(x) for x in state.get("order_head", [])] or \
                state.get("validation", []) != [list(r) for r in self.validation]:
            raise DataError(f"{state_file}: the checkpoint was made with another dataset/seed/limit/val_size; use "
                             "another --out or --restart")
        net, config = load_network(self.checkpoint_dir, device=self.adapter.device)
        if config.get("method") != self.method or net.spec != self.net.spec:
            raise DataError(f"{self.checkpoint_dir}: checkpoint of another method or model")
        if config.get("model_key") not in (None, self.adapter.model_key()):
            raise DataError(f"{self.checkpoint_dir}: the checkpoint was trained on {config.get('model')!r} (model key "
                            f"{config.get('model_key')}), not {self.model_name!r} ({self.adapter.model_key()}); use "
                            "another --out or --restart")
        now = {k: v for k, v in self.hp.as_dict().items() if k != "hypernetwork_path"}
        then = {k: v for k, v in (config.get("hparams") or now).items() if k != "hypernetwork_path"}
        changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if changed:
            raise DataError(f"{self.checkpoint_dir}: the checkpoint was trained with other hyperparameters ("
                            + ", ".join(f"{k}: {then.get(k)!r} != {now.get(k)!r}" for k in changed)
                            + "); use another --out or --restart")
        self.net.load_state_dict(net.state_dict())
        opt_state = torch.load(self.checkpoint_dir / "optimizer.pt", map_location=self.adapter.device,
                               weights_only=True)
        self.optimizer.load_state_dict(opt_state)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.validations = list(state.get("validations", []))
        self.best = state.get("best")
        self.stopped_early = bool(state.get("stopped_early", False))
        if self.best is not None:
            best_net, _ = load_network(self.checkpoint_dir / "best", device=self.adapter.device)
            self.best_state = {k: v.detach().clone() for k, v in best_net.state_dict().items()}
        self.train_seconds = float(state.get("train_seconds") or 0.0)
        logger.info("resumed %s training from %s at step %d/%d", self.method, self.checkpoint_dir, self.step,
                    len(self.order))
        return True

    # ---- validation ---------------------------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Mean validation losses over the held-out instances (network in eval mode, no gradients)."""
        was_training = self.net.training
        self.net.eval()
        edit_sum = loc_sum = 0.0
        try:
            with torch.no_grad():
                for config, index in self.validation:
                    example = TrainExample.from_row(self.datasets[config][index])
                    edit_loss, loc_loss = training_step(self.adapter, self.net, example)
                    edit_sum += float(edit_loss)
                    loc_sum += float(loc_loss)
        finally:
            self.net.train(was_training)
        n = max(1, len(self.validation))
        edit, loc = edit_sum / n, loc_sum / n
        self._check_finite((edit, loc), f"validation after step {self.step}")
        return {"step": self.step, "val_loss": round(self.hp.c_edit * edit + self.hp.c_loc * loc, 6),
                "val_edit_loss": round(edit, 6), "val_loc_loss": round(loc, 6)}

    def _check_finite(self, losses: tuple[float, float], where: str) -> None:
        """Raise :class:`TrainingDiverged` when the (edit, locality) losses of ``where`` are not finite."""
        if all(math.isfinite(v) for v in losses):
            return
        raise TrainingDiverged(
            f"{self.method}: the loss is not finite at {where}: edit loss {losses[0]}, locality loss {losses[1]}; "
            f"training diverged and {self._kept()}. Lower the learning rate (lr={self.hp.lr}) or set grad_clip "
            f"(now {self.hp.grad_clip}) with --hparam")

    def _kept(self) -> str:
        """What a stopped run leaves behind (for :class:`TrainingDiverged`'s message)."""
        if (self.checkpoint_dir / "trainer_state.json").is_file():
            return f"the checkpoint in {self.checkpoint_dir} is kept"
        return "no checkpoint was written"

    def _check_finite_gradient(self, where: str, example: TrainExample) -> None:
        """Raise :class:`TrainingDiverged` when the gradient accumulated up to ``where`` holds a NaN or infinity
        (the optimizer step would carry it into every parameter, whatever the learning rate); one device sync.
        Before raising, ``example`` is run again under :class:`editors.nonfinite.NonFiniteTrace`, and the message
        says where the first non-finite value appeared."""
        grads = {n: p.grad for n, p in self.net.named_parameters() if p.grad is not None}
        finite = [torch.isfinite(g).all() for g in grads.values()]
        if not finite or bool(torch.stack(finite).all()):
            return
        names = [n for n, ok in zip(grads, finite) if not bool(ok)]
        traced = self._trace_non_finite(example)
        raise TrainingDiverged(
            f"{self.method}: the gradient of {where} is not finite (in {len(names)} parameter tensor(s): "
            f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) while its losses are; training stopped "
            f"before the optimizer step and {self._kept()}. Traced again: {traced}")

    def _trace_non_finite(self, example: TrainExample) -> str:
        """Run ``example``'s loss and backward again with every module of the model and the network hooked; what
        :meth:`NonFiniteTrace.summary` found (the accumulated gradient is discarded: the run stops)."""
        self.optimizer.zero_grad(set_to_none=True)
        trace = NonFiniteTrace({"model": self.adapter.model, "network": self.net})
        try:
            with trace:
                edit_loss, loc_loss = training_step(self.adapter, self.net, example)
                loss, _ = self.net.training_loss(edit_loss, loc_loss, self.hp)
                loss.backward()
        except Exception as error:  # the trace is a diagnosis: its own failure must not hide the divergence
            return f"the trace failed ({type(error).__name__}: {error})"
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return trace.summary() or "no non-finite value this time (the divergence did not repeat)"

    def _after_validation(self, result: dict[str, float]) -> None:
        self.validations.append(result)
        if self.best is None or result["val_loss"] < self.best["val_loss"]:
            self.best = {"step": result["step"], "val_loss": result["val_loss"]}
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        if self.step - self.best["step"] >= self.hp.early_stop_patience and self.step < len(self.order):
            self.stopped_early = True
            logger.info("%s: no lower validation loss for %d instances (best %.4f at step %d): early stop",
                        self.method, self.step - self.best["step"], self.best["val_loss"], self.best["step"])

    # ---- the loop -----------------------------------------------------------------------------------------------

    def _group_end(self, step: int) -> int:
        """The step at which the optimizer steps for the group holding instance ``step`` (0-based)."""
        acc = self.hp.accumulate_bs
        return min(len(self.order), (step // acc + 1) * acc)

    def train(self, max_steps: int | None = None) -> Path:
        """Train until the end of the order, an early stop, or ``max_steps`` instances in total (rounded up to the
        end of an accumulation group), then (at the end) save the final network."""
        end = len(self.order) if max_steps is None else min(len(self.order), int(max_steps))
        if 0 < end < len(self.order):
            end = self._group_end(end - 1)
        validating = bool(self.validation)
        self.net.train()
        params = [p for p in self.net.parameters() if p.requires_grad]
        clip = self.hp.grad_clip
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, unit="edit", dynamic_ncols=True,
                   desc=f"training {self.method}")
        start = self._run_start = time.perf_counter()
        last_checkpoint = self.step
        group: list[tuple[float, float]] = []
        self.optimizer.zero_grad(set_to_none=True)
        try:
            while self.step < end and not self.stopped_early:
                config, index = self.order[self.step]
                group_end = self._group_end(self.step)
                group_size = group_end - self.step // self.hp.accumulate_bs * self.hp.accumulate_bs
                example = TrainExample.from_row(self.datasets[config][index])
                edit_loss, loc_loss = training_step(self.adapter, self.net, example)
                losses = float(edit_loss.detach()), float(loc_loss.detach())
                where = f"training instance {self.step + 1} ({config} row {index})"
                self._check_finite(losses, where)
                loss, info = self.net.training_loss(edit_loss, loc_loss, self.hp)
                (loss / group_size).backward()
                self._check_finite_gradient(where, example)
                self.step += 1
                group.append(losses)
                self.history.append({"step": self.step, "edit_loss": round(group[-1][0], 6),
                                     "loc_loss": round(group[-1][1], 6),
                                     **{k: round(v, 6) for k, v in info.items()}})
                bar.update(1)
                if self.step < group_end:
                    continue
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.net.after_step(sum(e for e, _ in group) / len(group), sum(loc for _, loc in group) / len(group),
                                    self.hp)
                group = []
                last_val = self.validations[-1]["step"] if self.validations else 0
                if validating and (self.step - last_val >= self.hp.val_interval or self.step == len(self.order)):
                    self._after_validation(self.validate())
                if self.step - last_checkpoint >= self.checkpoint_every or self.step == end or self.stopped_early:
                    self.save_checkpoint()
                    last_checkpoint = self.step
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        total = self.seconds_so_far()
        self.train_seconds, self._run_start = total, None
        if self.finished:
            recent = self.history[-min(len(self.history), 20):]
            summary = {k: sum(h[k] for h in recent) / len(recent) for k in ("edit_loss", "loc_loss")} \
                if recent else {}
            if self.best_state is not None:
                self.net.load_state_dict(self.best_state)  # the network with the lowest validation loss
            save_network(self.net, self.out_dir, {**self._run_info(), "steps_trained": self.step,
                                                  "final_losses": summary, "validations": self.validations,
                                                  "best": self.best, "stopped_early": self.stopped_early,
                                                  "train_seconds": round(total, 3)})
            logger.info("%s: trained %d steps (%.1f s this run%s) -> %s", self.method, self.step, seconds,
                        f"; best validation loss {self.best['val_loss']:.4f} at step {self.best['step']}"
                        if self.best else "", self.out_dir)
        else:
            logger.warning("%s: stopped at %d of %d train instances (--max-steps): only a checkpoint is saved (%s); "
                           "the same command without --max-steps resumes it and saves the network", self.method,
                           self.step, len(self.order), self.checkpoint_dir)
        return self.out_dir


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("python -m editors.train"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=hypernetwork_methods())
    p.add_argument("--model", required=True, help="Hub id, local model directory or tiny-qwen2-audio / "
                                                  "tiny-audio-flamingo3")
    p.add_argument("--dataset", required=True, help="SAKE dataset: local directory or Hub id")
    p.add_argument("--config", action="append", default=None,
                   help="attribute config(s) to train on, repeatable (default: all four)")
    p.add_argument("--split", default="train")
    p.add_argument("--out", default=None,
                   help="output directory (default: CACHE/hypernetworks/METHOD/MODEL, where editing looks)")
    p.add_argument("--cache-dir", default=None, help="cache root (default $SAKE_CACHE or ~/.cache/sake)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter of editors/hparams/METHOD.yaml")
    p.add_argument("--seed", type=int, default=0, help="seed of the network init, data order and tiny models")
    p.add_argument("--limit", type=int, default=None, help="first N train instances per config")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps in total (resumable)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--revision", default=None)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--no-progress", action="store_true")
    return p


def train_hypernetwork(method: str, model: str, dataset: str, *, out: str | Path | None = None,
                       configs: Sequence[str] = (), split: str = "train", cache_dir: str | None = None,
                       hparams: Any = (), seed: int = 0, limit: int | None = None, max_steps: int | None = None,
                       checkpoint_every: int = 50, restart: bool = False, dtype: str | None = None,
                       device: str | None = None, revision: str | None = None, progress: bool = True) -> Path:
    """Train (or resume, or find already trained) the hypernetwork of ``method`` for ``model`` on ``dataset``
    and return its folder (default: where editing looks, ``CACHE/hypernetworks/METHOD/MODEL``). ``hparams``:
    overrides of the method's YAML (a mapping, or ``key=value`` strings)."""
    from editors.data import load_instances
    from editors.models import family_of, load_adapter
    from editors.registry import load_hparams
    from sake_core.cache import cache_root
    from sake_core.protocol import ATTRIBUTES

    family_of(model)
    chosen = list(dict.fromkeys(configs or ATTRIBUTES))
    bad = [c for c in chosen if c not in ATTRIBUTES]
    if bad:
        raise ConfigError(f"--config: unknown attribute config(s) {bad}; expected {list(ATTRIBUTES)}")
    data = {c: load_instances(dataset, c, split) for c in chosen}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    adapter = load_adapter(model, dtype=dtype, device=device, seed=seed, revision=revision)
    hp = load_hparams(method, adapter.family, tiny=adapter.is_tiny, overrides=hparams)
    if not isinstance(hp, HypernetHparams):
        raise ConfigError(f"--method {method}: not a hypernetwork method (expected one of {hypernetwork_methods()})")
    target = Path(out) if out else default_hypernet_dir(cache_dir or cache_root(), method, model)
    trainer = Trainer(adapter, method, hp, data, target, seed=seed, model_name=model, dataset_name=dataset,
                      limit=limit, checkpoint_every=checkpoint_every, progress=progress)
    if not restart:
        trainer.try_resume()
    if trainer.finished and (target / CONFIG_FILE).is_file():
        logger.info("%s: already trained (%d steps) -> %s", method, trainer.step, target)
    else:
        trainer.train(max_steps)
    return target


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m editors.train``: a user-facing error (:class:`SakeError`) is one line on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = train_hypernetwork(args.method, args.model, args.dataset, out=args.out, configs=args.config or (),
                             split=args.split, cache_dir=args.cache_dir, hparams=args.hparam, seed=args.seed,
                             limit=args.limit, max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                             restart=args.restart, dtype=args.dtype, device=args.device,
                             revision=args.revision, progress=not args.no_progress)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
