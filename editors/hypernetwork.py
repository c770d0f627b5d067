"""The hypernetwork library of KE and MEND: gradient factors of an edit, functional weight updates, the
:class:`HyperNetwork` interface, saving/loading trained networks, and :class:`HypernetEditor` (the editor base
that applies a trained network). Training lives in :mod:`editors.train` (library + CLI of the trainer), the
networks themselves in ``editors/ke.py`` and ``editors/mend.py``.

Both methods edit the FFN output projections of the LLM layers in ``hparams.layers`` from the *fine-tuning
gradient* of the edit. For a linear map ``y = W u`` the gradient of the edit loss is ``sum_t g_t u_t^T`` (``u_t``
the layer input at token t, ``g_t`` the loss gradient at its output): these rank-1 factors are collected in one
forward/backward pass on the edit (:func:`edit_factors`), and the method's network maps them to a weight update
per layer.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence, cast

import torch
from torch import nn
from torch.nn import functional as F

from editors.base import EditRequest, Editor
from editors.hparams import Hparams
from editors.models.base import LALMAdapter, PromptBatch, as_linear
from sake_core.atomic import atomic_write
from sake_core.cache import cache_root
from sake_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

HYPERNET_FILE = "hypernetwork.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 1



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

    def __init__(self, original: nn.Linear, delta: torch.Tensor) -> None:
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
def replaced_out_projs(adapter: LALMAdapter, modules: Mapping[int, nn.Module]) -> Iterator[None]:
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
        outputs = [captures[layer].y for layer in layers]
        inputs = [captures[layer].x for layer in layers]
        if any(t is None for t in outputs + inputs):
            raise RuntimeError("edit_factors: an edited layer's projection did not run")
        grads = torch.autograd.grad(loss, cast(list[torch.Tensor], outputs))
    valid = batch.attention_mask.bool()
    factors = {layer: Factors(u=x[valid].detach().float(), g=grad[valid].detach().float())
               for layer, x, grad in zip(layers, cast(list[torch.Tensor], inputs), grads)}
    return factors, float(loss.detach())


def condition_embeddings(adapter: LALMAdapter, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit's input embeddings (text tokens and connector outputs of its audio) and its valid-token mask."""
    with torch.no_grad():
        return adapter.input_embeds(batch).float(), batch.attention_mask.bool()


# ----------------------------------------------------------------------------------------------------------------
# Hypernetworks (KE, MEND)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HypernetHparams(Hparams):
    """What KE and MEND share: the edited ``layers``, training (``epochs``, ``lr``, ``grad_clip``), the initial
    edit step ``edit_lr`` and where the trained network is (``hypernetwork_path``; null: the default location)."""

    layers: list[int]
    epochs: int
    lr: float
    grad_clip: float | None
    edit_lr: float
    hypernetwork_path: str | None


class HyperNetwork(nn.Module, abc.ABC):
    """Maps the gradient factors of the edited layers to weight updates.

    ``spec``: ``{"layers": [int], "shapes": {"<layer>": [d_out, d_in]}, "hidden_size": int}`` (model side) and
    ``net``: the method's network hyperparameters (its ``net_keys``); both go into ``config.json``. The training
    hooks get the method's typed hyperparameters (a :class:`HypernetHparams` subclass)."""

    method: ClassVar[str] = ""
    needs_condition: ClassVar[bool] = False
    #: hparams keys that define the network (saved with it)
    net_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: dict[str, Any], net: dict[str, Any]) -> None:
        super().__init__()
        self.spec: dict[str, Any] = {"layers": [int(x) for x in spec["layers"]],
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
    def make_optimizer(self, hp: Any) -> torch.optim.Optimizer:
        """The training optimizer (paper Table 6: KE RMSprop 3e-4, MEND Adam 1e-6)."""

    @abc.abstractmethod
    def training_loss(self, edit_loss: torch.Tensor, loc_loss: torch.Tensor, hp: Any
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """Combine the post-edit edit loss and locality KL into the loss to minimise (+ values to log)."""

    def after_step(self, edit_loss: float, loc_loss: float, hp: Any) -> None:
        """Hook after each optimizer step (KE: dual ascent on its Lagrange multiplier)."""


def hypernetwork_methods() -> list[str]:
    """Methods whose editor applies a trained hypernetwork (a :class:`HypernetEditor` subclass)."""
    from editors.registry import available_methods, get_editor_class

    return [m for m in available_methods() if issubclass(get_editor_class(m), HypernetEditor)]


def network_class(method: str) -> type[HyperNetwork]:
    """The hypernetwork class of a method (its editor's ``network_class``)."""
    from editors.registry import get_editor_class

    cls = get_editor_class(method)
    if not (isinstance(cls, type) and issubclass(cls, HypernetEditor)):
        raise ConfigError(f"no hypernetwork for method {method!r}; expected one of {hypernetwork_methods()}")
    return cls.network_class


def model_spec(adapter: LALMAdapter, layers: Sequence[int]) -> dict[str, Any]:
    resolved = [adapter.resolve_layer(int(x)) for x in layers]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"hparam layers={list(layers)}: duplicate layers")
    shapes = {str(layer): list(as_linear(adapter.mlp_out_proj(layer)).weight.shape) for layer in resolved}
    config: Any = adapter.language_model().config
    return {"layers": resolved, "shapes": shapes, "hidden_size": int(config.hidden_size)}


def build_network(method: str, adapter: LALMAdapter, hp: HypernetHparams, seed: int) -> HyperNetwork:
    """A freshly initialised network for ``adapter`` (deterministic in ``seed``), on the adapter's device."""
    cls = network_class(method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(model_spec(adapter, hp.layers), hp.as_dict())
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
        raise DataError(f"{directory}: no trained hypernetwork ({CONFIG_FILE} + {HYPERNET_FILE} expected)")
    try:
        config = json.loads(config_path.read_text())
        method = config["method"]
        net = network_class(method)(config["spec"], config["net"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{config_path}: malformed hypernetwork config ({exc})") from exc
    state = load_file(str(weights_path))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{weights_path}: weights do not match {config_path} ({exc})") from exc
    return net.to(device), config


# ----------------------------------------------------------------------------------------------------------------
# The editor side (KE and MEND editors subclass this)
# ----------------------------------------------------------------------------------------------------------------


class HypernetEditor(Editor):
    """Apply an edit with a trained hypernetwork: factors of the edit -> updates -> added to the weights in place.
    A subclass names its network class in :attr:`network_class`."""

    network_class: ClassVar[type[HyperNetwork]]
    hparams: HypernetHparams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.network: HyperNetwork | None = None
        self.network_config: dict[str, Any] = {}

    def network_dir(self) -> Path:
        path = self.hparams.hypernetwork_path
        if path:
            return Path(path)
        model = self.context.model_name or self.adapter.model_id
        return default_hypernet_dir(self.context.cache_dir or cache_root(), self.name, model)

    def setup(self) -> None:
        directory = self.network_dir()
        if not (directory / CONFIG_FILE).is_file():
            model = self.context.model_name or self.adapter.model_id
            raise ConfigError(
                f"{self.name}: no trained hypernetwork for model {model!r} at {directory}. Train one first: "
                f"python -m editors.train --method {self.name} --model {model} --dataset DATASET --out {directory} "
                f"(or pass --hparam hypernetwork_path=DIR)")
        net, config = load_network(directory, device=self.adapter.device)
        if config.get("method") != self.name:
            raise DataError(f"{directory}: a {config.get('method')!r} hypernetwork, not {self.name!r}")
        expected = model_spec(self.adapter, net.layers)
        if expected["shapes"] != net.spec["shapes"] or expected["hidden_size"] != net.spec["hidden_size"]:
            raise DataError(f"{directory}: trained for another model ({config.get('model')!r}); its layer shapes "
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
        return [self.adapter.resolve_layer(x) for x in self.hparams.layers]

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
        if net is None:
            raise RuntimeError(f"{self.name}: setup() loaded no hypernetwork")
        batch = self.adapter.prepare([edit.prompt()], [edit.target])
        factors, loss = edit_factors(self.adapter, net.layers, batch)
        condition = condition_embeddings(self.adapter, batch) if net.needs_condition else None
        with torch.no_grad():
            deltas = net.deltas(factors, condition)
            norms = {}
            for layer, delta in deltas.items():
                weight = as_linear(self.adapter.mlp_out_proj(layer)).weight
                weight.copy_((weight.float() + delta).to(weight.dtype))
                norms[f"delta_norm.{layer}"] = float(delta.norm())
        return {"steps": 1, "loss": loss, **norms}
