"""Train the hypernetworks of KE and MEND on the SAKE train split, and the editor base class that uses them.

    python -m editors.train --method mend --model Qwen/Qwen2-Audio-7B-Instruct --dataset sake/sake --out hn/mend-qwen
    python -m editors.train --method ke --model tiny-qwen2-audio --dataset /tmp/sake_demo --limit 8

Both methods edit the FFN output projections of the LLM layers in ``hparams['layers']`` (paper Table 6: Qwen and
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
the network from ``hparams['hypernetwork_path']`` or the default location, and raises a clear error when none exists.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import importlib
import io
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from editors.base import EditRequest, Editor
from editors.models.base import LALMAdapter, Prompt, PromptBatch, as_audio_array
from sake.atomic import atomic_write

logger = logging.getLogger("editors.train")

HYPERNET_FILE = "hypernetwork.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 1

#: method -> "module:class" of its hypernetwork
NETWORKS: dict[str, str] = {"ke": "editors.ke:KEHyperNetwork", "mend": "editors.mend:MENDHyperNetwork"}


# ----------------------------------------------------------------------------------------------------------------
# Gradient factors and functional weight updates
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Factors:
    """Rank-1 gradient factors of one linear layer over the valid tokens of a batch (fp32)."""

    u: torch.Tensor  # [N, d_in] layer inputs
    g: torch.Tensor  # [N, d_out] loss gradients at the layer outputs

    def gradient(self) -> torch.Tensor:
        """The fine-tuning gradient ``sum_t g_t u_t^T``: [d_out, d_in]."""
        return self.g.T @ self.u


class _Capture(nn.Module):
    """Stand-in for an output projection that records its input and output (for the gradient factors)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.original(x)
        self.x, self.y = x, y
        return y


class _Shifted(nn.Module):
    """Stand-in for a linear output projection computing with ``W + delta`` (delta fp32, differentiable)."""

    def __init__(self, original: nn.Module, delta: torch.Tensor) -> None:
        super().__init__()
        self.original = original
        self.delta = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.original.weight
        bias = getattr(self.original, "bias", None)
        if weight.dtype == torch.float32:
            return F.linear(x, weight + self.delta, bias)
        out = F.linear(x.float(), weight.float() + self.delta, None if bias is None else bias.float())
        return out.to(x.dtype)


@contextlib.contextmanager
def replaced_out_projs(adapter: LALMAdapter, modules: dict[int, nn.Module]) -> Iterator[None]:
    """Temporarily install ``modules`` as the FFN output projections of their layers (always put back)."""
    old: dict[int, nn.Module] = {}
    try:
        for layer, module in modules.items():
            old[layer] = adapter.set_mlp_out_proj(layer, module)
        yield
    finally:
        for layer, module in old.items():
            adapter.set_mlp_out_proj(layer, module)


def edit_factors(adapter: LALMAdapter, layers: Sequence[int], batch: PromptBatch
                 ) -> tuple[dict[int, Factors], float]:
    """One forward/backward of the target loss of ``batch``: the gradient factors of each edited layer's output
    projection (valid tokens only) and the loss value. The model's parameters get no gradients."""
    state = adapter.hidden_entering(batch, min(layers))
    captures = {layer: _Capture(adapter.mlp_out_proj(layer)) for layer in layers}
    with replaced_out_projs(adapter, captures), torch.enable_grad():
        hidden = state.hidden.detach().requires_grad_(True)  # so that every layer output carries a graph
        loss = adapter.loss_from(state, hidden)
        grads = torch.autograd.grad(loss, [captures[layer].y for layer in layers])
    valid = batch.attention_mask.bool()
    factors = {layer: Factors(u=captures[layer].x[valid].detach().float(), g=grad[valid].detach().float())
               for layer, grad in zip(layers, grads)}
    return factors, float(loss.detach())


def condition_embeddings(adapter: LALMAdapter, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit's input embeddings (text tokens and connector outputs of its audio) and its valid-token mask."""
    with torch.no_grad():
        return adapter.input_embeds(batch).float(), batch.attention_mask.bool()


# ----------------------------------------------------------------------------------------------------------------
# Hypernetworks (KE, MEND)
# ----------------------------------------------------------------------------------------------------------------


class HyperNetwork(nn.Module, abc.ABC):
    """Maps the gradient factors of the edited layers to weight updates.

    ``spec``: ``{"layers": [int], "shapes": {"<layer>": [d_out, d_in]}, "hidden_size": int}`` (model side) and
    ``net``: the method's network hyperparameters; both go into ``config.json``."""

    method: ClassVar[str] = ""
    needs_condition: ClassVar[bool] = False
    #: hparams keys that define the network (saved with it)
    net_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: dict[str, Any], net: dict[str, Any]) -> None:
        super().__init__()
        self.spec = {"layers": [int(x) for x in spec["layers"]],
                     "shapes": {str(k): [int(v[0]), int(v[1])] for k, v in spec["shapes"].items()},
                     "hidden_size": int(spec["hidden_size"])}
        self.net = {k: net[k] for k in self.net_keys}

    @property
    def layers(self) -> list[int]:
        return list(self.spec["layers"])

    def shape(self, layer: int) -> tuple[int, int]:
        d_out, d_in = self.spec["shapes"][str(layer)]
        return d_out, d_in

    @abc.abstractmethod
    def deltas(self, factors: dict[int, Factors], condition: tuple[torch.Tensor, torch.Tensor] | None
               ) -> dict[int, torch.Tensor]:
        """Weight update (fp32, [d_out, d_in]) per edited layer."""

    @abc.abstractmethod
    def make_optimizer(self, hp: dict[str, Any]) -> torch.optim.Optimizer:
        """The training optimizer (paper Table 6: KE RMSprop 3e-4, MEND Adam 1e-6)."""

    @abc.abstractmethod
    def training_loss(self, edit_loss: torch.Tensor, loc_loss: torch.Tensor, hp: dict[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """Combine the post-edit edit loss and locality KL into the loss to minimise (+ values to log)."""

    def after_step(self, edit_loss: float, loc_loss: float, hp: dict[str, Any]) -> None:
        """Hook after each optimizer step (KE: dual ascent on its Lagrange multiplier)."""


def network_class(method: str) -> type[HyperNetwork]:
    if method not in NETWORKS:
        raise ValueError(f"no hypernetwork for method {method!r}; expected one of {sorted(NETWORKS)}")
    module, name = NETWORKS[method].split(":")
    return getattr(importlib.import_module(module), name)


def model_spec(adapter: LALMAdapter, layers: Sequence[int]) -> dict[str, Any]:
    resolved = [adapter.resolve_layer(int(x)) for x in layers]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"hparam layers={list(layers)}: duplicate layers")
    shapes = {str(layer): list(adapter.mlp_out_proj(layer).weight.shape) for layer in resolved}
    return {"layers": resolved, "shapes": shapes,
            "hidden_size": int(adapter.language_model().config.hidden_size)}


def build_network(method: str, adapter: LALMAdapter, hp: dict[str, Any], seed: int) -> HyperNetwork:
    """A freshly initialised network for ``adapter`` (deterministic in ``seed``), on the adapter's device."""
    cls = network_class(method)
    missing = [k for k in cls.net_keys if k not in hp]
    if missing:
        raise ValueError(f"{method}: hyperparameter(s) {missing} missing (editors/hparams/{method}.yaml)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(model_spec(adapter, hp["layers"]), hp)
    return net.to(adapter.device)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def model_slug(model: str) -> str:
    """A folder name for a ``--model`` argument (Hub id, local dir or tiny name)."""
    path = Path(model)
    return path.name if path.exists() else model.replace("/", "--")


def default_hypernet_dir(cache_dir: str | Path, method: str, model: str) -> Path:
    return Path(cache_dir) / "hypernetworks" / method / model_slug(model)


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def save_network(net: HyperNetwork, directory: str | Path, info: dict[str, Any]) -> Path:
    """Write ``hypernetwork.safetensors`` + ``config.json`` into ``directory`` (atomically, file by file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_tensors(directory / HYPERNET_FILE, net.state_dict(), {"method": net.method})
    config = {"format": FORMAT_VERSION, "method": net.method, "spec": net.spec, "net": net.net, **info}
    _atomic_json(directory / CONFIG_FILE, config)
    return directory


def load_network(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[HyperNetwork, dict[str, Any]]:
    """Load a saved hypernetwork and its config; ValueError naming the file when something is missing or wrong."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / HYPERNET_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{directory}: no trained hypernetwork ({CONFIG_FILE} + {HYPERNET_FILE} expected)")
    try:
        config = json.loads(config_path.read_text())
        method = config["method"]
        net = network_class(method)(config["spec"], config["net"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{config_path}: malformed hypernetwork config ({exc})") from exc
    state = load_file(str(weights_path))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_path}: weights do not match {config_path} ({exc})") from exc
    return net.to(device), config


# ----------------------------------------------------------------------------------------------------------------
# The editor side (KE and MEND editors subclass this)
# ----------------------------------------------------------------------------------------------------------------


class HypernetEditor(Editor):
    """Apply an edit with a trained hypernetwork: factors of the edit -> updates -> added to the weights in place."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.network: HyperNetwork | None = None
        self.network_config: dict[str, Any] = {}

    def network_dir(self) -> Path:
        path = self.hparams.get("hypernetwork_path")
        if path:
            return Path(str(path))
        from editors.preedit_cache import default_cache_dir

        model = self.context.model_name or self.adapter.model_id
        return default_hypernet_dir(self.context.cache_dir or default_cache_dir(), self.name, model)

    def setup(self) -> None:
        directory = self.network_dir()
        if not (directory / CONFIG_FILE).is_file():
            model = self.context.model_name or self.adapter.model_id
            raise ValueError(
                f"{self.name}: no trained hypernetwork for model {model!r} at {directory}. Train one first: "
                f"python -m editors.train --method {self.name} --model {model} --dataset DATASET --out {directory} "
                f"(or pass --hparam hypernetwork_path=DIR)")
        net, config = load_network(directory, device=self.adapter.device)
        if config.get("method") != self.name:
            raise ValueError(f"{directory}: a {config.get('method')!r} hypernetwork, not {self.name!r}")
        expected = model_spec(self.adapter, net.layers)
        if expected["shapes"] != net.spec["shapes"] or expected["hidden_size"] != net.spec["hidden_size"]:
            raise ValueError(f"{directory}: trained for another model ({config.get('model')!r}); its layer shapes "
                             f"{net.spec['shapes']} do not match {self.adapter.model_id}'s {expected['shapes']}")
        if config.get("model_key") not in (None, self.adapter.model_key()):
            logger.warning("%s: trained on %s (model key %s), editing %s (model key %s)", directory,
                           config.get("model"), config.get("model_key"), self.adapter.model_id,
                           self.adapter.model_key())
        net.eval()
        net.requires_grad_(False)
        self.network, self.network_config = net, config

    def _layers(self) -> list[int]:
        if self.network is not None:
            return self.network.layers
        return [self.adapter.resolve_layer(int(x)) for x in self.hparams["layers"]]

    def touched_parameters(self) -> list[str]:
        names: list[str] = []
        for layer in self._layers():
            module = self.adapter.mlp_out_proj(layer)
            names += [n for n in self.adapter.parameter_names(module) if n.endswith("weight")]
        return names

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        if self.network is None:
            self.setup()
        net = self.network
        batch = self.adapter.prepare([edit.prompt()], [edit.target])
        factors, loss = edit_factors(self.adapter, net.layers, batch)
        condition = condition_embeddings(self.adapter, batch) if net.needs_condition else None
        with torch.no_grad():
            deltas = net.deltas(factors, condition)
            norms = {}
            for layer, delta in deltas.items():
                weight = self.adapter.mlp_out_proj(layer).weight
                weight.copy_((weight.float() + delta).to(weight.dtype))
                norms[f"delta_norm.{layer}"] = float(delta.norm())
        return {"steps": 1, "loss": loss, **norms}


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
    loc_state = pre_logp = None
    if example.locality:
        loc_batch = adapter.prepare([p for p, _ in example.locality], [t for _, t in example.locality])
        loc_state = adapter.hidden_entering(loc_batch, first)
        pre_logp = _target_logp(adapter, loc_state)
    deltas = net.deltas(factors, condition)
    shifted = {layer: _Shifted(adapter.mlp_out_proj(layer), delta) for layer, delta in deltas.items()}
    with replaced_out_projs(adapter, shifted):
        edit_loss = adapter.loss_from(eq_state)
        loc_loss = (_kl_at_targets(adapter, loc_state, pre_logp) if loc_state is not None
                    else edit_loss.new_zeros(()))
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

    def __init__(self, adapter: LALMAdapter, method: str, hp: dict[str, Any], datasets: dict[str, Any],
                 out_dir: str | Path, *, seed: int = 0, model_name: str = "", dataset_name: str = "",
                 limit: int | None = None, checkpoint_every: int = 50, progress: bool = True) -> None:
        self.adapter, self.method, self.hp = adapter, method, dict(hp)
        self.datasets = datasets
        self.out_dir = Path(out_dir)
        self.seed, self.limit = seed, limit
        self.model_name = model_name or adapter.model_id
        self.dataset_name = dataset_name
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.progress = progress
        self.order = training_order({c: len(d) for c, d in datasets.items()}, int(hp.get("epochs", 1)), seed,
                                    limit)
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
                "limit": self.limit, "configs": sorted(self.datasets), "hparams": self.hp,
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
            raise ValueError(f"{state_file}: the checkpoint was made with another dataset/seed/limit; use another "
                             "--out or --restart")
        net, config = load_network(self.checkpoint_dir, device=self.adapter.device)
        if config.get("method") != self.method or net.spec != self.net.spec:
            raise ValueError(f"{self.checkpoint_dir}: checkpoint of another method or model")
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
        clip = self.hp.get("grad_clip")
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, unit="edit", dynamic_ncols=True)
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
                    torch.nn.utils.clip_grad_norm_(params, float(clip))
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
    p = argparse.ArgumentParser(prog="python -m editors.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted(NETWORKS))
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from editors.data import load_instances
        from sake.protocol import ATTRIBUTES
        from editors.hparams import load_hparams
        from editors.models import family_of, load_adapter
        from editors.preedit_cache import default_cache_dir

        family_of(args.model)
        configs = list(dict.fromkeys(args.config or ATTRIBUTES))
        bad = [c for c in configs if c not in ATTRIBUTES]
        if bad:
            raise ValueError(f"--config: unknown attribute config(s) {bad}; expected {list(ATTRIBUTES)}")
        data = {c: load_instances(args.dataset, c, args.split) for c in configs}
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        adapter = load_adapter(args.model, dtype=dtype, device=device, seed=args.seed, revision=args.revision)
        hp = load_hparams(args.method, adapter.family, tiny=adapter.is_tiny, overrides=args.hparam)
        out = Path(args.out) if args.out else default_hypernet_dir(args.cache_dir or default_cache_dir(),
                                                                   args.method, args.model)
        trainer = Trainer(adapter, args.method, hp, data, out, seed=args.seed, model_name=args.model,
                          dataset_name=args.dataset, limit=args.limit, checkpoint_every=args.checkpoint_every,
                          progress=not args.no_progress)
        if not args.restart:
            trainer.try_resume()
        if trainer.step >= len(trainer.order) and (out / CONFIG_FILE).is_file():
            logger.info("%s: already trained (%d steps) -> %s", args.method, trainer.step, out)
        else:
            trainer.train(args.max_steps)
    except ValueError as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
