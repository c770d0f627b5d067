"""Train the hypernetworks of KE and MEND on the SAKE train split (the networks, their loading and the editor base
that applies them are the library :mod:`editors.hypernetwork`; this module is the trainer and its CLI).

    python -m editors.train --method mend --model Qwen/Qwen2-Audio-7B-Instruct --dataset sake/sake --out hn/mend-qwen
    python -m editors.train --method ke --model tiny-qwen2-audio --dataset /tmp/sake_demo --limit 8

Both methods edit the FFN output projections of the LLM layers in ``hparams.layers`` (paper Table 6: Qwen and
DeSTA 29-31, AF3 25-27) from the *fine-tuning gradient* of the edit. For a linear map ``y = W u`` the gradient of the
edit loss is ``sum_t g_t u_t^T`` (``u_t`` the layer input at token t, ``g_t`` the loss gradient at its output): these
rank-1 factors are collected in one forward/backward pass on the edit (:func:`edit_factors`), and the method's
network (:class:`HyperNetwork`: ``editors/ke.py``, ``editors/mend.py``) maps them to a weight update per layer.

Training (one step per train instance, ``epochs`` passes over all attribute configs in a seeded order):

1. factors of the edit (reliability prompt -> target answer) on the unedited model;
2. updates ``dW = net(factors)`` (differentiable in the network's parameters), applied functionally by replacing each
   output projection with ``W + dW`` (``adapter.set_mlp_out_proj``; the model's weights never change);
3. edit loss: target cross-entropy on the edit and its generality items (answers = the edit-linked answers);
   locality loss: KL(pre-edit || post-edit) of the next-token distributions at the reference answer tokens of the
   instance's audio and text locality items;
4. the method combines them (:meth:`HyperNetwork.training_loss`) and its optimizer takes one step.

The layers below the first edited one are frozen, so every batch's hidden states entering it are computed once per
step (``adapter.hidden_entering``); each loss runs only the edited layers and those above.

Output (``--out``, default ``CACHE/hypernetworks/METHOD/MODEL``): ``hypernetwork.safetensors`` + ``config.json``
(method, model, layers, shapes, hyperparameters, training summary). ``--out/checkpoint/`` holds the latest
checkpoint (network + optimizer state + step counter) every ``--checkpoint-every`` steps; rerunning the same command
resumes from it (the same seeded order, continuing at the saved step with the saved optimizer state). Editing loads
the network from ``hparams.hypernetwork_path`` or the default location, and raises a clear error when none exists.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
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
from editors.hypernetwork import (CHECKPOINT_DIR, CONFIG_FILE, HypernetHparams, HyperNetwork, _atomic_json, _Shifted,
                                  build_network, condition_embeddings, default_hypernet_dir, edit_factors,
                                  hypernetwork_methods, load_network, replaced_out_projs, save_network)
from editors.models.base import LALMAdapter, Prompt, as_audio_array, as_linear
from sake_core.atomic import atomic_write
from sake_core.errors import ConfigError, DataError, user_errors
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
    """Post-edit edit loss and locality KL of one example (differentiable in the network's parameters)."""
    layers = net.layers
    first = min(layers)
    edit_batch = adapter.prepare([example.edit.prompt()], [example.edit.target])
    factors, _ = edit_factors(adapter, layers, edit_batch)
    condition = condition_embeddings(adapter, edit_batch) if net.needs_condition else None
    eq = [(example.edit.prompt(), example.edit.target)] + example.equivalent
    eq_state = adapter.hidden_entering(adapter.prepare([p for p, _ in eq], [t for _, t in eq]), first)
    locality = None
    if example.locality:
        loc_batch = adapter.prepare([p for p, _ in example.locality], [t for _, t in example.locality])
        loc_state = adapter.hidden_entering(loc_batch, first)
        locality = (loc_state, _target_logp(adapter, loc_state))
    deltas = net.deltas(factors, condition)
    shifted = {layer: _Shifted(as_linear(adapter.mlp_out_proj(layer)), delta) for layer, delta in deltas.items()}
    with replaced_out_projs(adapter, shifted):
        edit_loss = adapter.loss_from(eq_state)
        loc_loss = _kl_at_targets(adapter, *locality) if locality is not None else edit_loss.new_zeros(())
    return edit_loss, loc_loss


def training_order(sizes: dict[str, int], epochs: int, seed: int, limit: int | None = None
                   ) -> list[tuple[str, int]]:
    """(config, row index) pairs of all epochs: each epoch a seeded shuffle of every config's rows."""
    refs = [(c, i) for c in sorted(sizes) for i in range(sizes[c] if limit is None else min(limit, sizes[c]))]
    order: list[tuple[str, int]] = []
    for epoch in range(epochs):
        epoch_refs = list(refs)
        random.Random(f"{seed}:{epoch}").shuffle(epoch_refs)
        order += epoch_refs
    return order


class Trainer:
    """One training run of a hypernetwork, with checkpoints and resume (see the module docstring)."""

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
        self.order = training_order({c: len(d) for c, d in datasets.items()}, hp.epochs, seed, limit)
        self.net = build_network(method, adapter, self.hp, seed)
        self.optimizer = self.net.make_optimizer(self.hp)
        self.step = 0
        self.history: list[dict[str, float]] = []

    # ---- checkpoints --------------------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    def _run_info(self) -> dict[str, Any]:
        return {"model": self.model_name, "model_id": self.adapter.model_id, "family": self.adapter.family,
                "model_key": self.adapter.model_key(), "dataset": self.dataset_name, "seed": self.seed,
                "limit": self.limit, "configs": sorted(self.datasets), "hparams": self.hp.as_dict(),
                "steps_total": len(self.order)}

    def save_checkpoint(self) -> None:
        ckpt = self.checkpoint_dir
        ckpt.mkdir(parents=True, exist_ok=True)
        save_network(self.net, ckpt, self._run_info())
        buffer = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buffer)
        atomic_write(ckpt / "optimizer.pt", buffer.getvalue())
        _atomic_json(ckpt / "trainer_state.json", {"step": self.step, "order_length": len(self.order),
                                                   "order_head": self.order[:5], "history": self.history})

    def try_resume(self) -> bool:
        """Load the checkpoint of ``out_dir`` if there is one (same order required); True when resumed."""
        state_file = self.checkpoint_dir / "trainer_state.json"
        if not state_file.is_file():
            return False
        state = json.loads(state_file.read_text())
        if state.get("order_length") != len(self.order) or [list(x) for x in self.order[:5]] != \
                [list(x) for x in state.get("order_head", [])]:
            raise DataError(f"{state_file}: the checkpoint was made with another dataset/seed/limit; use another "
                             "--out or --restart")
        net, config = load_network(self.checkpoint_dir, device=self.adapter.device)
        if config.get("method") != self.method or net.spec != self.net.spec:
            raise DataError(f"{self.checkpoint_dir}: checkpoint of another method or model")
        self.net.load_state_dict(net.state_dict())
        opt_state = torch.load(self.checkpoint_dir / "optimizer.pt", map_location=self.adapter.device,
                               weights_only=True)
        self.optimizer.load_state_dict(opt_state)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        logger.info("resumed %s training from %s at step %d/%d", self.method, self.checkpoint_dir, self.step,
                    len(self.order))
        return True

    # ---- the loop -----------------------------------------------------------------------------------------------

    def train(self, max_steps: int | None = None) -> Path:
        """Train until the end of the order (or ``max_steps`` steps in total), then save the final network."""
        end = len(self.order) if max_steps is None else min(len(self.order), int(max_steps))
        self.net.train()
        params = [p for p in self.net.parameters() if p.requires_grad]
        clip = self.hp.grad_clip
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, unit="edit", dynamic_ncols=True,
                   desc=f"training {self.method}")
        start = time.perf_counter()
        try:
            while self.step < end:
                config, index = self.order[self.step]
                example = TrainExample.from_row(self.datasets[config][index])
                edit_loss, loc_loss = training_step(self.adapter, self.net, example)
                loss, info = self.net.training_loss(edit_loss, loc_loss, self.hp)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                self.optimizer.step()
                self.net.after_step(float(edit_loss.detach()), float(loc_loss.detach()), self.hp)
                self.step += 1
                self.history.append({"step": self.step, "edit_loss": round(float(edit_loss.detach()), 6),
                                     "loc_loss": round(float(loc_loss.detach()), 6),
                                     **{k: round(v, 6) for k, v in info.items()}})
                bar.update(1)
                if self.step % self.checkpoint_every == 0 or self.step == end:
                    self.save_checkpoint()
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        if self.step >= len(self.order):
            recent = self.history[-min(len(self.history), 20):]
            summary = {k: sum(h[k] for h in recent) / len(recent) for k in ("edit_loss", "loc_loss")} \
                if recent else {}
            save_network(self.net, self.out_dir, {**self._run_info(), "steps_trained": self.step,
                                                  "final_losses": summary})
            logger.info("%s: trained %d steps (%.1f s this run) -> %s", self.method, self.step, seconds,
                        self.out_dir)
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
    if trainer.step >= len(trainer.order) and (target / CONFIG_FILE).is_file():
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
