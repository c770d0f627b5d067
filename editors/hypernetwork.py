"""The hypernetwork library of KE and MEND: gradient factors of an edit, functional weight updates, the
:class:`HyperNetwork` interface, saving/loading trained networks, and :class:`HypernetEditor` (the editor base
that applies a trained network). Training lives in :mod:`editors.train` (library + CLI of the trainer), the
networks themselves in ``editors/ke.py`` and ``editors/mend.py``.

Both methods edit a set of *matrices*: the LLM Linears with the roles ``hparams.roles`` (``mlp_up``, ``mlp_out``,
... : :meth:`LALMAdapter.llm_linear`) of the layers ``hparams.layers``, named ``"{layer}_{role}"`` (e.g.
``29_mlp_out``); EasyEdit's settings for 7B Qwen-family models edit the up and down projections of three layers.
Each update comes from the *fine-tuning gradient* of the edit: for a linear map ``y = W u`` the gradient of the
edit loss is ``sum_t g_t u_t^T`` (``u_t`` the layer input at token t, ``g_t`` the loss gradient at its output):
these rank-1 factors are collected in one forward/backward pass on the edit (:func:`edit_factors`, forward hooks
on the Linears), and the method's network maps them to a weight update per matrix.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from editors.base import EditRequest, Editor
from editors.batching import routed_weights
from editors.hparams import Hparams
from editors.models.base import EditableModel, PerEdit, Prompt, PromptBatch, weights_digest
from sake_core.atomic import atomic_write
from sake_core.cache import cache_root
from sake_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

HYPERNET_FILE = "hypernetwork.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
#: 2: matrices named by layer and role (format 1 edited only the FFN output projections)
FORMAT_VERSION = 2


# ----------------------------------------------------------------------------------------------------------------
# Edited matrices, gradient factors and functional weight updates
# ----------------------------------------------------------------------------------------------------------------


def matrix_key(layer: int, role: str) -> str:
    """The name of an edited matrix: ``"{layer}_{role}"`` (no dots: it names network modules too)."""
    return f"{int(layer)}_{role}"


def parse_matrix_key(key: str) -> tuple[int, str]:
    layer, _, role = key.partition("_")
    return int(layer), role


def edited_matrices(adapter: EditableModel, layers: Sequence[int], roles: Sequence[str]) -> list[str]:
    """The matrix keys of ``roles`` in ``layers`` (resolved, layer-major), checked through the adapter."""
    if not layers or not roles:
        raise ConfigError(f"hypernetwork: hparams layers={list(layers)} and roles={list(roles)} must be non-empty")
    resolved = [adapter.resolve_layer(int(x)) for x in layers]
    if len(set(resolved)) != len(resolved) or len(set(roles)) != len(roles):
        raise ConfigError(f"hypernetwork: duplicate layers {list(layers)} or roles {list(roles)}")
    keys = []
    for layer in resolved:
        for role in roles:
            key = matrix_key(layer, role)
            matrix_module(adapter, key)  # ValueError naming the known roles; ConfigError when not a Linear
            keys.append(key)
    return keys


def matrix_module(adapter: EditableModel, key: str) -> nn.Linear:
    """The Linear of matrix ``key`` (``"{layer}_{role}"``), reached through the adapter."""
    layer, role = parse_matrix_key(key)
    module = adapter.llm_linear(layer, role)
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"hypernetwork: LLM layer {layer} role {role!r} is a {type(module).__name__}, "
                          "not a Linear")
    return module


@dataclass
class Factors:
    """Rank-1 gradient factors of one linear layer over the valid tokens of a batch (fp32)."""

    u: torch.Tensor  # [N, d_in] layer inputs
    g: torch.Tensor  # [N, d_out] loss gradients at the layer outputs

    def gradient(self) -> torch.Tensor:
        """The fine-tuning gradient ``sum_t g_t u_t^T``: [d_out, d_in]."""
        return self.g.T @ self.u


@contextlib.contextmanager
def _forward_hooks(modules: Mapping[str, nn.Module], make_hook: Any) -> Iterator[None]:
    """Forward hooks ``make_hook(key)`` on ``modules`` for the duration of the block (always removed)."""
    handles = []
    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(key)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def shifted_matrices(adapter: EditableModel, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block each matrix ``key`` of ``deltas`` computes with ``W + delta`` (delta fp32, may carry a
    graph): a forward hook replaces the Linear's output; the model's weights never change."""
    modules = {key: matrix_module(adapter, key) for key in deltas}

    def make_hook(key: str) -> Any:
        def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x, weight, bias = args[0], module.weight, module.bias
            delta = deltas[key]
            if weight.dtype == torch.float32:
                return F.linear(x, weight + delta, bias)
            out = F.linear(x.float(), weight.float() + delta, None if bias is None else bias.float())
            return out.to(output.dtype)
        return hook

    with _forward_hooks(modules, make_hook):
        yield


def edit_factors(adapter: EditableModel, matrices: Sequence[str], batch: PromptBatch
                 ) -> tuple[dict[str, Factors], float]:
    """One forward/backward of the target loss of ``batch``: the gradient factors of each edited matrix (valid
    tokens only) and the loss value. The model's parameters get no gradients."""
    modules = {key: matrix_module(adapter, key) for key in matrices}
    first = min(parse_matrix_key(key)[0] for key in matrices)
    state = adapter.hidden_entering(batch, first)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(key: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen[key] = (args[0], output)
        return hook

    with _forward_hooks(modules, make_hook), torch.enable_grad():
        hidden = state.hidden.detach().requires_grad_(True)  # so that every layer output carries a graph
        loss = adapter.loss_from(state, hidden)
        grads = torch.autograd.grad(loss, [seen[key][1] for key in matrices])
    valid = batch.attention_mask.bool()
    factors = {key: Factors(u=seen[key][0][valid].detach().float(), g=grad[valid].detach().float())
               for key, grad in zip(matrices, grads)}
    return factors, float(loss.detach())


def condition_embeddings(adapter: EditableModel, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit's input embeddings (text tokens and connector outputs of its audio) and its valid-token mask."""
    with torch.no_grad():
        return adapter.input_embeds(batch).float(), batch.attention_mask.bool()


# ----------------------------------------------------------------------------------------------------------------
# Hypernetworks (KE, MEND)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HypernetHparams(Hparams):
    """What KE and MEND share: the edited ``layers`` and ``roles`` (LLM Linear roles), training (``epochs``,
    ``lr``, ``grad_clip``, ``accumulate_bs`` instances per optimizer step), validation on ``val_size`` train
    instances held out of training every ``val_interval`` training instances with early stop after
    ``early_stop_patience`` instances without a lower validation loss ``c_edit * edit + c_loc * KL`` (EasyEdit's
    ``loss/total_edit_val``), the initial edit step ``edit_lr`` and where the trained network is
    (``hypernetwork_path``; null: the default location)."""

    bounds = {"epochs": "positive", "lr": "positive", "grad_clip": "positive", "accumulate_bs": "positive",
              "val_size": "non_negative", "val_interval": "positive", "early_stop_patience": "positive",
              "c_edit": "non_negative", "c_loc": "non_negative", "edit_lr": "positive"}

    layers: list[int]
    roles: list[str]
    epochs: int
    lr: float
    grad_clip: float | None
    accumulate_bs: int
    val_size: int
    val_interval: int
    early_stop_patience: int
    c_edit: float
    c_loc: float
    edit_lr: float
    hypernetwork_path: str | None


class HyperNetwork(nn.Module, abc.ABC):
    """Maps the gradient factors of the edited matrices to weight updates.

    ``spec``: ``{"matrices": ["{layer}_{role}", ...], "shapes": {key: [d_out, d_in]}, "hidden_size": int}``
    (model side) and ``net``: the method's network hyperparameters (its ``net_keys``); both go into
    ``config.json``. The training hooks get the method's typed hyperparameters (a :class:`HypernetHparams`
    subclass)."""

    method: ClassVar[str] = ""
    needs_condition: ClassVar[bool] = False
    #: hparams keys that define the network (saved with it)
    net_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: dict[str, Any], net: dict[str, Any]) -> None:
        super().__init__()
        matrices = [str(k) for k in spec["matrices"]]
        self.spec: dict[str, Any] = {
            "matrices": matrices,
            "shapes": {k: [int(spec["shapes"][k][0]), int(spec["shapes"][k][1])] for k in matrices},
            "hidden_size": int(spec["hidden_size"])}
        self.net = {k: net[k] for k in self.net_keys}

    @property
    def matrices(self) -> list[str]:
        return list(self.spec["matrices"])

    @property
    def layers(self) -> list[int]:
        """The LLM layers holding an edited matrix (ascending)."""
        return sorted({parse_matrix_key(k)[0] for k in self.matrices})

    def shape(self, key: str) -> tuple[int, int]:
        d_out, d_in = self.spec["shapes"][key]
        return d_out, d_in

    @abc.abstractmethod
    def deltas(self, factors: dict[str, Factors], condition: tuple[torch.Tensor, torch.Tensor] | None
               ) -> dict[str, torch.Tensor]:
        """Weight update (fp32, [d_out, d_in]) per edited matrix."""

    @abc.abstractmethod
    def make_optimizer(self, hp: Any) -> torch.optim.Optimizer:
        """The training optimizer (paper Table 6: KE RMSprop 3e-4, MEND Adam 1e-6)."""

    @abc.abstractmethod
    def training_loss(self, edit_loss: torch.Tensor, loc_loss: torch.Tensor, hp: Any
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """Combine the post-edit edit loss and locality KL into the loss to minimise (+ values to log)."""

    def after_step(self, edit_loss: float, loc_loss: float, hp: Any) -> None:
        """Hook after each optimizer step, with the step's mean losses (KE: dual ascent on its multiplier)."""


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


def model_spec(adapter: EditableModel, layers: Sequence[int], roles: Sequence[str]) -> dict[str, Any]:
    """The model side of a network: the edited matrices of ``roles`` in ``layers``, their shapes, the hidden size."""
    matrices = edited_matrices(adapter, layers, roles)
    shapes = {key: list(matrix_module(adapter, key).weight.shape) for key in matrices}
    config: Any = adapter.language_model().config
    return {"matrices": matrices, "shapes": shapes, "hidden_size": int(config.hidden_size)}


def build_network(method: str, adapter: EditableModel, hp: HypernetHparams, seed: int) -> HyperNetwork:
    """A freshly initialised network for ``adapter`` (deterministic in ``seed``), on the adapter's device."""
    cls = network_class(method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(model_spec(adapter, hp.layers, hp.roles), hp.as_dict())
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
        if config.get("format") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: hypernetwork format {config.get('format')!r}, expected "
                             f"{FORMAT_VERSION} (trained by an earlier version of editors.train: train it again)")
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
    """Apply an edit with a trained hypernetwork: factors of the edit -> updates -> added to the weights in place
    (one edit), or kept as per-edit copies of the edited matrices (K single edits per pass). A subclass names its
    network class in :attr:`network_class`."""

    batches_edits = True

    network_class: ClassVar[type[HyperNetwork]]
    #: The hyperparameters that shape the trained network (which matrices it edits, its sizes): a run must give the
    #: values the network was trained with, so that its header describes the network it applied.
    network_keys: ClassVar[tuple[str, ...]] = ("layers", "roles")
    hparams: HypernetHparams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.network: HyperNetwork | None = None
        self.network_config: dict[str, Any] = {}
        self._copies: dict[str, torch.Tensor] | None = None  # apply_many's per-edit matrices, by parameter name

    def network_dir(self) -> Path:
        path = self.hparams.hypernetwork_path
        if path:
            return Path(path)
        model = self.context.model_name or self.adapter.model_id
        return default_hypernet_dir(self.context.cache_dir or cache_root(), self.name, model)

    def trained_state(self) -> str | None:
        """sha256 over the network's ``config.json`` and its weight files (see :meth:`Editor.trained_state`)."""
        directory = self.network_dir()
        config = hashlib.sha256((directory / CONFIG_FILE).read_bytes()).hexdigest()
        return hashlib.sha256(f"{config}:{weights_digest(directory)}".encode()).hexdigest()

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
        matrices = net.matrices
        try:
            expected = {key: list(matrix_module(self.adapter, key).weight.shape) for key in matrices}
        except (ValueError, AttributeError) as exc:
            raise DataError(f"{directory}: trained for another model ({config.get('model')!r}): {exc}") from exc
        config_lm: Any = self.adapter.language_model().config
        hidden = int(config_lm.hidden_size)
        if expected != net.spec["shapes"] or hidden != net.spec["hidden_size"]:
            raise DataError(f"{directory}: trained for another model ({config.get('model')!r}); its matrix shapes "
                             f"{net.spec['shapes']} do not match {self.adapter.model_id}'s {expected}")
        trained = config.get("hparams") or {}
        run = self.hparams.as_dict()
        differ = [k for k in self.network_keys if k in trained and trained[k] != run.get(k)]
        if differ:
            raise ConfigError(f"{directory}: the network was trained with "
                              + ", ".join(f"{k}={trained[k]!r}" for k in differ) + "; this run gives "
                              + ", ".join(f"{k}={run.get(k)!r}" for k in differ)
                              + " (pass the network's values with --hparam, so the run header describes it)")
        if config.get("model_key") not in (None, self.adapter.model_key()):
            if not self.hparams.hypernetwork_path:  # found by model name: the name does not say which weights
                raise DataError(f"{directory}: a network trained on {config.get('model')!r} (model key "
                                f"{config.get('model_key')}), not on the weights of {self.adapter.model_id} (model key "
                                f"{self.adapter.model_key()}); train one for this model (sake train --out DIR), or "
                                "name this one with --hparam hypernetwork_path=DIR to use it anyway")
            logger.warning("%s: trained on %s (model key %s), editing %s (model key %s)", directory,
                           config.get("model"), config.get("model_key"), self.adapter.model_id,
                           self.adapter.model_key())
        net.eval()
        net.requires_grad_(False)
        self.network, self.network_config = net, config

    def _matrices(self) -> list[str]:
        if self.network is not None:
            return self.network.matrices
        return edited_matrices(self.adapter, self.hparams.layers, self.hparams.roles)

    def touched_parameters(self) -> list[str]:
        return [self.adapter.module_name(matrix_module(self.adapter, key)) + ".weight" for key in self._matrices()]

    def _network(self) -> HyperNetwork:
        if self.network is None:
            self.setup()
        if self.network is None:
            raise RuntimeError(f"{self.name}: setup() loaded no hypernetwork")
        return self.network

    def _edited_weights(self, edit: EditRequest) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The edited matrices' new values (model dtype, keyed by matrix) and the edit's stats; the model's
        weights are only read, so K edits computed one after the other each see the unedited model."""
        net = self._network()
        batch = self.adapter.prepare([edit.prompt()], [edit.target])
        factors, loss = edit_factors(self.adapter, net.matrices, batch)
        condition = condition_embeddings(self.adapter, batch) if net.needs_condition else None
        with torch.no_grad():
            deltas = net.deltas(factors, condition)
            weights, norms = {}, {}
            for key, delta in deltas.items():
                weight = matrix_module(self.adapter, key).weight
                weights[key] = (weight.float() + delta).to(weight.dtype)
                norms[f"delta_norm.{key}"] = float(delta.norm())
        # the network's training time (editors.train), so the runner's .timing.json and Table 7 carry it
        stats = {"steps": 1, "loss": loss, "hypernetwork_train_s": self.network_config.get("train_seconds"), **norms}
        return weights, stats

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        weights, stats = self._edited_weights(edit)
        with torch.no_grad():
            for key, value in weights.items():
                matrix_module(self.adapter, key).weight.copy_(value)
        return stats

    def apply_many(self, edits: Sequence[EditRequest]) -> list[dict[str, Any]]:
        """K single edits: each edit's updates computed from the unedited model exactly as :meth:`apply` computes
        them, kept as per-edit copies of the edited matrices (``[K, d_out, d_in]``, model dtype); generation routes
        each row through its own edit's copies (:meth:`per_edit`). The model's weights stay unchanged."""
        self._network()
        stacked: dict[str, torch.Tensor] = {}  # filled edit by edit (no second copy of all K edits' matrices)
        names = {key: self.adapter.module_name(matrix_module(self.adapter, key)) for key in self._matrices()}
        stats = []
        for k, edit in enumerate(edits):
            weights, one = self._edited_weights(edit)
            for key, value in weights.items():
                name = f"{names[key]}.weight"
                if name not in stacked:
                    stacked[name] = value.new_empty((len(edits), *value.shape))
                stacked[name][k] = value
            stats.append(one)
        for key, name in names.items():
            bias = matrix_module(self.adapter, key).bias
            if bias is not None:  # unchanged, but routed with its Linear
                stacked[f"{name}.bias"] = bias.detach().unsqueeze(0).expand(len(edits), -1)
        self._copies = stacked
        return stats

    @contextlib.contextmanager
    def per_edit(self, prompts_per_edit: Sequence[Sequence[Prompt]]) -> Iterator[PerEdit]:
        with routed_weights(self.adapter.model, self._copies, self.name, prompts_per_edit) as per_edit:
            yield per_edit

    def reset(self) -> None:
        self._copies = None
