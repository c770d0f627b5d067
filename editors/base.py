"""The editor interface: what an editing method is and what it receives.

A method is one module ``editors/<name>.py`` defining a subclass of :class:`Editor` decorated with
:func:`register`, plus ``editors/hparams/<name>.yaml``; both are discovered from the files (:mod:`editors.registry`). The runner (``editors/run.py``) owns loops, caching, restore, resume and output; a method owns
only "apply this edit":

* :meth:`Editor.touched_parameters` names every model parameter :meth:`Editor.apply` may change, *before* any
  edit is applied. The runner snapshots exactly those tensors once and copies them back after each single edit
  (bit-exact, no deepcopy, no reload) or after each sequence in sequential mode.
* :meth:`Editor.apply` applies one edit in place and returns a small stats dict (steps, final loss, ...).
* :meth:`Editor.rewrite_prompts` lets prompt methods (I-IKE, IE-IKE) rewrite evaluation prompts; parametric
  methods leave them unchanged.
* :meth:`Editor.reset` drops every other state a method keeps between edits (the instructions/demonstrations of
  IKE, a WISE side memory, replaced modules, ...). Hypernetwork methods load their trained networks in
  :meth:`Editor.setup`.

Several edits per pass (issue 12, ``--edits-per-pass K``): a method whose :attr:`Editor.batches_edits` is True
implements :meth:`Editor.apply_many` (K independent single edits at once, each exactly as :meth:`apply` alone
would make it, the model's own parameters left unchanged) and :meth:`Editor.generate_many` (each edit's prompts
generated under that edit alone, all in one batched generation); the runner then calls :meth:`reset`. Other
methods run one edit at a time. The single-edit ``apply`` stays the reference (``editors/batching.py``).

The helpers :class:`ParameterSnapshot` (save/restore touched tensors) and :func:`finetune` (Adam/SGD steps with
fp32 master copies of low-precision parameters and loss-threshold early stopping) are shared by the methods.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from editors.batching import fused_adam
from editors.hparams import Hparams
from editors.models.base import EditableModel, GeneratedText, GenerationSettings, PerEdit, Prompt, as_audio_array
from editors.models.generation import resolve_engine
from sake_core.errors import ConfigError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# What a method receives
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EditRequest:
    """One edit, taken from a dataset instance row (ARCHITECTURE.md): make the model answer ``target`` to
    ``question`` about ``audio`` (whose true label is ``original_label``)."""

    instance_id: str
    attribute: str
    original_label: str
    target_label: str
    question: str
    options: list[str]
    target: str  # the answer to train towards (y_e as spelled in the options)
    audio: np.ndarray | None
    row: dict[str, Any] = field(repr=False, default_factory=dict)  # the full instance row (items included)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "EditRequest":
        return cls(instance_id=row["id"], attribute=row["attribute"], original_label=row["original_label"],
                   target_label=row["target_label"], question=row["question"], options=list(row["options"]),
                   target=row["answer"], audio=as_audio_array(row["audio"], where=f"{row['id']}: audio"), row=row)

    def prompt(self) -> Prompt:
        """The reliability prompt: the edit audio with its question."""
        return Prompt(question=self.question, audio=self.audio)


@dataclass
class RunContext:
    """What the runner offers a method besides the model: seed, device, a cache folder and dataset access
    (e.g. IE-IKE retrieves demonstrations from the train split; hypernetwork methods find their checkpoints)."""

    seed: int = 0
    cache_dir: str | None = None
    load_rows: Callable[[str, str], Any] | None = None  # (config, split) -> instance rows (e.g. datasets.Dataset)
    model_name: str = ""
    #: the run's generation settings (what a method that generates for itself starts from: AlphaEdit's context
    #: prefixes); None outside a run: the adapter's defaults for the method
    generation: GenerationSettings | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Editor(abc.ABC):
    """Base class of an editing method (see the module docstring)."""

    name: ClassVar[str] = ""
    #: How reports and the board show a method outside the paper's list (sake_core.protocol.METHOD_NAMES), and its
    #: place among methods (the paper's eight take 0..7); read from the source by editors.registry, so write literals.
    display_name: ClassVar[str] = ""
    display_order: ClassVar[float] = 100.0
    #: False for methods that change no parameter (I-IKE, IE-IKE): the runner then snapshots nothing.
    changes_parameters: ClassVar[bool] = True

    #: The method's typed hyperparameters (a dataclass subclassing editors.hparams.Hparams, fields without
    #: defaults), read from editors/hparams/<name>.yaml by editors.registry.load_hparams. A method annotates
    #: ``hparams: ItsHparams`` so that its attribute reads (``self.hparams.lr``) are typed.
    hparams_class: ClassVar[type[Hparams]] = Hparams
    hparams: Hparams

    def __init__(self, adapter: EditableModel, hparams: Hparams | Mapping[str, Any],
                 context: RunContext | None = None) -> None:
        self.adapter: EditableModel = adapter
        if isinstance(hparams, self.hparams_class):
            self.hparams = hparams
        else:
            values = hparams.as_dict() if isinstance(hparams, Hparams) else dict(hparams)
            self.hparams = self.hparams_class.from_mapping(values, where=f"{self.name or type(self).__name__} hparams")
        self.context = context or RunContext()

    def setup(self) -> None:
        """One-time preparation before the first edit (load a hypernetwork, index a train split, ...)."""

    def trained_state(self) -> str | None:
        """A digest of what the method loaded in :meth:`setup` besides its hyperparameters that changes its edits
        (a trained hypernetwork's files), or None. The runner writes it into the run header (``method_state``) and
        a rerun resumes a file only when it agrees, so one file never mixes rows of two trainings."""
        return None

    @abc.abstractmethod
    def touched_parameters(self) -> list[str]:
        """Names (``model.named_parameters()``) of every parameter :meth:`apply` may modify; [] for none."""

    @abc.abstractmethod
    def apply(self, edit: EditRequest) -> dict[str, Any]:
        """Apply one edit to the model in place; returns stats (e.g. ``{"steps": 7, "loss": 0.004}``)."""

    def rewrite_prompts(self, prompts: Sequence[Prompt], edit: EditRequest) -> list[Prompt]:
        """Evaluation prompts as the edited system sees them (prompt methods add instructions/examples)."""
        return list(prompts)

    def reset(self) -> None:
        """Forget all state kept between edits other than parameters (the runner restores those)."""

    #: True when :meth:`apply_many` / :meth:`generate_many` are implemented and exact (see the module docstring);
    #: a class attribute that a method may set per instance (LoRA: not when merging).
    batches_edits: bool = False

    def apply_many(self, edits: Sequence[EditRequest]) -> list[dict[str, Any]]:
        """Apply K independent single edits at once, each as if alone (per-edit parameter copies or prompts),
        without changing the model's parameters; returns one stats dict per edit. Evaluate with
        :meth:`generate_many`, then :meth:`reset`."""
        raise NotImplementedError(f"{self.name}: several edits per pass are not supported (one at a time)")

    #: Decode engines the method's edited model can generate with, preferred first on CUDA
    #: (``editors.models.generation``): a method whose modules take decisions on the host while decoding (GRACE's
    #: codebook) lists ``eager`` only; the others prefer the graph engine where the bench measured it at least as
    #: fast (bench/NOTES.md), and list it second until then (WISE).
    generation_engines: ClassVar[tuple[str, ...]] = ("graph", "eager")

    def generate_many(self, prompts_per_edit: Sequence[Sequence[Prompt]], settings: GenerationSettings | None = None,
                      **limits: Any) -> list[list[GeneratedText]]:
        """After :meth:`apply_many`: greedy outputs of each edit's (rewritten) prompts under that edit alone, in
        one batched generation with ``settings`` (default: the adapter's, with ``limits`` such as
        ``max_new_tokens``). Each edit's weights reach the model through :meth:`per_edit` (none for methods whose
        edits live in the prompts: I-IKE, IE-IKE)."""
        settings = settings or self.generation_settings(**limits)
        flat = [p for ps in prompts_per_edit for p in ps]
        with self.per_edit(prompts_per_edit) as per_edit:
            outputs = self.adapter.generate(flat, settings=settings, per_edit=per_edit)
        result, pos = [], 0
        for ps in prompts_per_edit:
            result.append(outputs[pos:pos + len(ps)])
            pos += len(ps)
        return result

    def generation_settings(self, **limits: Any) -> GenerationSettings:
        """The settings this method generates with: the run's (``RunContext.generation``) with ``limits`` such as
        ``max_new_tokens`` set, else the adapter's defaults for the method's engines (:attr:`generation_engines`)."""
        if self.context.generation is not None:
            # as resolve_settings reads them: None keeps the run's value, a batching limit of 0 is no limit, and an
            # engine ("auto" included) is resolved for this method on the model's device
            changes: dict[str, Any] = {k: (None if k in ("batch_size", "max_batch_tokens") and v == 0 else v)
                                       for k, v in limits.items() if v is not None}
            if "engine" in changes:
                changes["engine"] = resolve_engine(changes["engine"], self.adapter.device.type,
                                                   type(self).generation_engines, self.name)
            return self.context.generation.replace(**changes)
        return self.adapter.generation_settings(method_engines=type(self).generation_engines, method=self.name,
                                                **limits)

    @contextlib.contextmanager
    def per_edit(self, prompts_per_edit: Sequence[Sequence[Prompt]]) -> Iterator[PerEdit | None]:
        """The per-edit strategy of a generation after :meth:`apply_many` (``editors.models.generation.PerEdit``:
        per-edit connector copies and/or routed modules, installed for the block); None when the prompts carry
        the edits."""
        yield None

    def stats_keys(self) -> tuple[str, ...]:
        return ("steps", "loss")


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


class ParameterSnapshot:
    """Copies of named parameters, restorable bit-exactly in place (no deepcopy of the model)."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str]) -> None:
        params = dict(model.named_parameters())
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"unknown parameter names: {missing[:5]}")
        self._params = {n: params[n] for n in names}
        self._saved = {n: p.detach().clone() for n, p in self._params.items()}

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self._params.items():
            param.copy_(self._saved[name])

    @torch.no_grad()
    def max_abs_diff(self) -> float:
        """Largest absolute difference between current and saved values (0.0 after :meth:`restore`)."""
        diffs = [(p.detach().float() - self._saved[n].float()).abs().max() for n, p in self._params.items()]
        return float(torch.stack(diffs).max()) if diffs else 0.0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._saved.values())


@dataclass
class FinetuneResult:
    steps: int  # optimizer updates made
    loss: float  # the last loss computed (before the last update; below the threshold when stopped early)
    stopped_early: bool


@dataclass
class FinetuneHparams(Hparams):
    """Hyperparameters of gradient fine-tuning (FT-LLM, FT-Audio, FT (Encoder), LoRA): see :func:`finetune`."""

    bounds = {"lr": "positive", "max_steps": "positive", "early_stop_loss": "non_negative",
              "weight_decay": "non_negative"}

    lr: float
    max_steps: int
    optimizer: str  # adam | sgd | rmsprop
    early_stop_loss: float | None
    weight_decay: float


def finetune_settings(hparams: FinetuneHparams) -> dict[str, Any]:
    """The keyword arguments of :func:`finetune` / ``finetune_many`` taken from a method's hparams."""
    return {"lr": hparams.lr, "max_steps": hparams.max_steps, "early_stop_loss": hparams.early_stop_loss,
            "optimizer": hparams.optimizer, "weight_decay": hparams.weight_decay}


def finetune(params: Mapping[str, torch.Tensor], loss_fn: Callable[[], torch.Tensor], *, lr: float,
             max_steps: int, early_stop_loss: float | None = None, optimizer: str = "adam",
             weight_decay: float = 0.0) -> FinetuneResult:
    """Minimise ``loss_fn()`` over ``params``: at most ``max_steps`` forward passes, each followed by an update
    unless the loss is already below ``early_stop_loss`` (as EasyEdit's FT loop).

    Before each update the loss is compared with ``early_stop_loss`` (paper App. D: stop when below 1e-2); this is
    the one host sync per step. Without an early stop the loss is read once, after the last step. Parameters stored
    in 16-bit get an fp32 master copy that the optimizer updates and that is cast back after each step (a 1e-5
    update would vanish in bf16 otherwise).
    Gradients of all other parameters are never allocated (only ``params`` require grad during the loop).
    """
    if not params:
        raise ValueError("finetune needs at least one parameter")
    plist = list(params.values())
    masters = [p.detach().float().clone() if p.dtype != torch.float32 else None for p in plist]
    opt_tensors = [m if m is not None else p for p, m in zip(plist, masters)]
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        # on CUDA the fused kernel, as K edits' masked_update: the same arithmetic per element either way
        opt = torch.optim.Adam(opt_tensors, lr=lr, weight_decay=weight_decay,
                               fused=all(fused_adam(optimizer, t) for t in opt_tensors) or None)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(opt_tensors, lr=lr, weight_decay=weight_decay)
    elif optimizer == "rmsprop":
        opt = torch.optim.RMSprop(opt_tensors, lr=lr, weight_decay=weight_decay)
    else:
        raise ConfigError(f"unknown optimizer {optimizer!r}; expected adam, sgd or rmsprop")
    previous = [p.requires_grad for p in plist]
    for p in plist:
        p.requires_grad_(True)
    steps, last, stopped = 0, float("nan"), False
    latest: torch.Tensor | None = None  # without an early stop: the last loss, read once at the end
    try:
        for _ in range(max_steps):
            loss = loss_fn()
            if early_stop_loss is None:
                latest = loss.detach()
            else:
                last = float(loss.detach())  # host sync: the early-stop check (one per step)
                if last < early_stop_loss:
                    stopped = True
                    break
            grads = torch.autograd.grad(loss, plist, allow_unused=True)
            for p, m, g in zip(plist, masters, grads):
                if g is not None:
                    (m if m is not None else p).grad = g.float() if m is not None else g
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(plist, masters):
                    if m is not None:
                        p.copy_(m)
            steps += 1
    finally:
        for p, flag in zip(plist, previous):
            p.requires_grad_(flag)
    if latest is not None:
        last = float(latest)
    return FinetuneResult(steps=steps, loss=last, stopped_early=stopped)
