"""LoRA (Hu et al., 2022, "LoRA: Low-Rank Adaptation of Large Language Models"): low-rank adapters trained on the
edit, as EasyEdit's LoRA editor does for text LLMs.

Target (``target``): ``llm`` (default) puts one on the Linears with the roles ``modules`` (``query``, ``value``,
... : :meth:`LALMAdapter.llm_linear`, EasyEdit's q_proj / v_proj) of the LLM layers ``layers`` (null: every layer, as
LoRA and EasyEdit's ``layers: []``; a list: those layers only, e.g. ``[31]``, the earlier single-layer variant),
trained from the hidden states entering the lowest of them (computed once per edit); ``connector`` puts an adapter
on every Linear of the modality connector (the audio-side counterpart, trained like FT-Audio on the cached encoder
output).

Each adapted Linear ``W`` becomes ``W x + (alpha / rank) * B A x`` with ``A`` [rank, in] drawn from a generator seeded
by the run seed and the instance id (Kaiming-uniform bound, as is usual for LoRA) and ``B`` [out, rank] zero, so the
model is unchanged before training; Adam on ``A, B`` with the target loss and FT's early stop. ``merge: true`` folds
``(alpha / rank) * B A`` into ``W`` after the edit (then :meth:`touched_parameters` names the adapted weights and the
runner restores them); ``merge: false`` (default, as EasyEdit keeps a PEFT model) keeps the adapters as modules until
:meth:`LoRA.reset`, and the model's parameters are never changed. Sequential mode: every edit trains a new adapter
on top of the earlier ones (kept: stacked, frozen; merged: already in ``W``).

Several edits per pass (``merge: false`` only): K fresh adapters, their factors stacked ``[K, ...]``
(``editors/batching.py``); row k of the training batch (edit k) runs adapter k (:class:`LoRALinear` routes runs of
rows), the connector projects edit k's audio through adapter k; evaluation is one batched generation in which each
item uses its edit's adapter. The base output ``W x`` is shared and the adapter term is per row, so each edit is
exactly its own single edit (up to the last bits of batched matmuls). With ``merge: true`` the merged weight would
change every row's base output, so that mode runs one edit at a time.

Why not ``peft``: its injection renames the adapted modules' parameters (``base_layer.weight``), which the
runner's name-based snapshot/restore and the adapters' parameter groups rely on, and it offers no K-adapters-per-
pass training; the adapter here is a few lines of plain tensors with the same math.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from editors.base import EditRequest, Editor, FinetuneHparams, finetune, finetune_settings
from editors.registry import register
from editors.batching import StackedCopies, finetune_many, per_edit_audio_embeds, per_edit_views
from editors.models.base import PerEdit, Prompt, as_linear
from sake_core.errors import ConfigError, DataError


@dataclass
class LoRAHparams(FinetuneHparams):
    """Fine-tuning settings plus where the adapters go and their shape (see the module docstring)."""

    bounds = {**FinetuneHparams.bounds, "rank": "positive", "lora_alpha": "positive"}

    target: str  # llm | connector
    modules: list[str]  # LLM Linear roles (target llm)
    layers: list[int] | None  # LLM layers (target llm); None: every layer
    rank: int
    lora_alpha: float
    merge: bool


class LoRALinear(nn.Module):
    """A Linear plus low-rank adapters: the trainable ``lora_A``/``lora_B`` (if set), frozen earlier ones, and, in a
    pass of K edits, stacked per-edit factors applied to runs of rows (``runs``: (edit, start, stop))."""

    def __init__(self, base: nn.Linear, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = float(scale)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.frozen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self.runs: list[tuple[int, int, int]] = []
        self.row_edit: torch.Tensor | None = None  # the graph engine's decode step: the edit of each row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for a, b in self.frozen:
            out = out + self.scale * ((x @ a.t()) @ b.t())
        if self.lora_A is not None and self.lora_B is not None:
            out = out + self.scale * ((x @ self.lora_A.t()) @ self.lora_B.t())
        if self.stacked is not None and self.row_edit is not None:  # gathered per-row adapters: static shapes
            a, b = self.stacked
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            low = torch.bmm(rows, a[self.row_edit].transpose(1, 2))
            out = out + self.scale * torch.bmm(low, b[self.row_edit].transpose(1, 2)).reshape(out.shape)
        elif self.stacked is not None and self.runs:
            a_views, b_views = (t.unbind(0) for t in self.stacked)  # not a[k]: see editors/batching.py
            pieces = x.split([e - s for _, s, e in self.runs])  # not x[s:e]: its backward writes all of x's gradient
            parts = [(piece @ a_views[k].t()) @ b_views[k].t() for (k, _, _), piece in zip(self.runs, pieces)]
            out = out + self.scale * (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
        return out

    def delta(self) -> torch.Tensor:
        """``scale * B A`` of the trainable adapter (fp32), for merging."""
        a, b = self.trained()
        return self.scale * (b.float() @ a.float())

    def trained(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable adapter's factors ``(A, B)``, detached."""
        if self.lora_A is None or self.lora_B is None:
            raise RuntimeError("LoRALinear: no trainable adapter")
        return self.lora_A.detach(), self.lora_B.detach()


@register("lora")
class LoRA(Editor):
    """Low-rank adapters on ``target`` (connector or LLM layers), trained on the edit (see the module docstring)."""

    hparams_class = LoRAHparams
    hparams: LoRAHparams
    display_name = "LoRA"
    display_order = 9  # after the paper's eight methods

    batches_edits = True  # per instance: False with merge: true (set in __init__)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.merge = self.hparams.merge
        self.batches_edits = not self.merge
        self.wrappers: dict[str, LoRALinear] = {}  # dotted name of the adapted Linear -> its wrapper
        self._stacked: StackedCopies | None = None

    # ---- targets ------------------------------------------------------------------------------------------------

    def _target(self) -> str:
        target = self.hparams.target
        if target not in ("connector", "llm"):
            raise ConfigError(f"lora: hparam target={target!r}; expected connector or llm")
        return target

    def _linears(self) -> dict[str, nn.Linear]:
        """Dotted name -> the Linear modules the adapters go on (the originals, also while wrapped)."""
        a = self.adapter
        modules: list[nn.Module]
        if self._target() == "connector":
            modules = [m for m in a.connector().modules() if isinstance(m, nn.Linear)]
        else:
            roles = self.hparams.modules
            layers = self._layers()
            if not roles or not layers:
                raise ConfigError("lora: target llm needs non-empty hparams 'layers' (or null: every layer) and "
                                  "'modules'")
            modules = [a.llm_linear(i, role) for i in layers for role in roles]
        out: dict[str, nn.Linear] = {}
        for module in modules:
            linear = as_linear(module.base if isinstance(module, LoRALinear) else module)
            out[self._name_of(linear)] = linear
        if not out:
            raise ConfigError(f"lora: no Linear module found for target {self._target()!r}")
        return out

    def _name_of(self, module: nn.Module) -> str:
        for name, wrapper in self.wrappers.items():
            if wrapper.base is module:
                return name
        return self.adapter.module_name(module)

    def _layers(self) -> list[int]:
        """The adapted LLM layers (resolved): ``hparams.layers``, or every layer when it is null."""
        if self.hparams.layers is None:
            return list(range(self.adapter.num_llm_layers))
        return [self.adapter.resolve_layer(i) for i in self.hparams.layers]

    def _lowest_layer(self) -> int:
        return min(self._layers())

    def touched_parameters(self) -> list[str]:
        if not self.merge:
            return []  # adapters live in wrapper modules; the model's parameters never change
        return [f"{name}.weight" for name in self._linears()]

    # ---- wrappers -----------------------------------------------------------------------------------------------

    def _install(self) -> dict[str, LoRALinear]:
        if not self.wrappers:
            scale = self.hparams.lora_alpha / self.hparams.rank
            for name, linear in self._linears().items():
                wrapper = LoRALinear(linear, scale)
                path, _, attr = name.rpartition(".")
                setattr(self.adapter.model.get_submodule(path), attr, wrapper)
                self.wrappers[name] = wrapper
        return self.wrappers

    def reset(self) -> None:
        for name, wrapper in self.wrappers.items():
            path, _, attr = name.rpartition(".")
            setattr(self.adapter.model.get_submodule(path), attr, wrapper.base)
        self.wrappers = {}
        self._stacked = None

    def _initial_factors(self, edit: EditRequest, name: str, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (Kaiming-uniform bound 1/sqrt(in), from a generator seeded by run seed, instance and module) and
        ``B = 0``, in the Linear's dtype and device."""
        rank = self.hparams.rank
        key = hashlib.sha256(f"{self.context.seed}:{edit.instance_id}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
        bound = 1.0 / math.sqrt(linear.in_features)
        a = (torch.rand(rank, linear.in_features, generator=gen) * 2 - 1) * bound
        w = linear.weight
        return a.to(w.device, w.dtype), torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype)

    # ---- one edit -----------------------------------------------------------------------------------------------

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        a = self.adapter
        if self._target() == "connector" and edit.audio is None:
            raise DataError(f"{edit.instance_id}: LoRA on the connector needs an edit audio")
        wrappers = self._install()
        params: dict[str, nn.Parameter] = {}
        for name, wrapper in wrappers.items():
            init_a, init_b = self._initial_factors(edit, name, wrapper.base)
            wrapper.lora_A, wrapper.lora_B = nn.Parameter(init_a, False), nn.Parameter(init_b, False)
            params[f"{name}.lora_A"], params[f"{name}.lora_B"] = wrapper.lora_A, wrapper.lora_B
        batch = a.prepare([edit.prompt()], [edit.target])
        if self._target() == "connector":
            frame = a.hidden_entering(batch, 0)  # masks + rotary once; audio embeddings recomputed per step

            def loss() -> torch.Tensor:
                return a.loss_from(frame, hidden=a.input_embeds(batch))
        else:
            state = a.hidden_entering(batch, self._lowest_layer())  # frozen lower layers: once per edit

            def loss() -> torch.Tensor:
                return a.loss_from(state)

        result = finetune(params, loss, **finetune_settings(self.hparams))
        with torch.no_grad():
            for wrapper in wrappers.values():
                if self.merge:
                    w = wrapper.base.weight
                    w.copy_((w.float() + wrapper.delta()).to(w.dtype))
                else:
                    wrapper.frozen.append(wrapper.trained())
                wrapper.lora_A = wrapper.lora_B = None
        if self.merge:
            self.reset()  # the adapters are in the weights now; no wrapper stays
        return {"steps": result.steps, "loss": result.loss}

    # ---- K edits per pass (merge: false) ------------------------------------------------------------------------

    def apply_many(self, edits: Sequence[EditRequest]) -> list[dict[str, Any]]:
        if self.merge:
            raise NotImplementedError("lora: several edits per pass need merge: false")
        if self.wrappers:
            raise RuntimeError("lora: apply_many needs a model without adapters (call reset first)")
        a = self.adapter
        connector = self._target() == "connector"
        for edit in edits:
            if connector and edit.audio is None:
                raise DataError(f"{edit.instance_id}: LoRA on the connector needs an edit audio")
        wrappers = self._install()
        factors: dict[str, torch.Tensor] = {}
        for name, wrapper in wrappers.items():
            init_a, init_b = self._initial_factors(edits[0], name, wrapper.base)
            factors[f"{name}.lora_A"], factors[f"{name}.lora_B"] = init_a, init_b
        copies = StackedCopies(factors, len(edits))
        with torch.no_grad():
            for k, edit in enumerate(edits):
                for name, wrapper in wrappers.items():
                    init_a, _ = self._initial_factors(edit, name, wrapper.base)
                    copies.masters[f"{name}.lora_A"][k].copy_(init_a.float())
        prompts = [e.prompt() for e in edits]
        batch = a.prepare(prompts, [e.target for e in edits])
        if connector:
            frame = a.hidden_entering(batch, 0)
            counts = [len(p.audios()) for p in prompts]
            for wrapper in wrappers.values():  # registered so that per-edit swaps find them by name
                wrapper.lora_A = nn.Parameter(torch.empty(0), False)
                wrapper.lora_B = nn.Parameter(torch.empty(0), False)

            def losses(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
                embeds = per_edit_audio_embeds(a, batch.audio_states, counts, per_edit_views(weights))
                return a.loss_from(frame, hidden=a.input_embeds(batch, embeds), reduction="none")
        else:
            state = a.hidden_entering(batch, self._lowest_layer())
            runs = [(k, k, k + 1) for k in range(len(edits))]

            def losses(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
                for name, wrapper in wrappers.items():
                    wrapper.stacked = (weights[f"{name}.lora_A"], weights[f"{name}.lora_B"])
                    wrapper.runs = runs
                return a.loss_from(state, reduction="none")

        results = finetune_many(copies, losses, **finetune_settings(self.hparams))
        for wrapper in wrappers.values():
            wrapper.stacked, wrapper.runs = None, []
        self._stacked = copies
        return [{"steps": r.steps, "loss": r.loss} for r in results]

    @contextlib.contextmanager
    def per_edit(self, prompts_per_edit: Sequence[Sequence[Prompt]]) -> Iterator[PerEdit]:
        if self._stacked is None:
            raise RuntimeError("lora: generate_many before apply_many")
        weights = {n: m.detach() for n, m in self._stacked.current().items()}
        if self._target() == "connector":
            yield PerEdit.of(prompts_per_edit, connector_weights=weights)
        else:
            yield PerEdit.of(prompts_per_edit, routing=_Runs(self.wrappers, weights))


class _Runs:
    """The routing object of LoRA's per-edit strategy: what the engines set per chunk (``runs``, and ``row_edit``
    in the graph engine's decode step), handed to every wrapper."""

    def __init__(self, wrappers: dict[str, LoRALinear], weights: dict[str, torch.Tensor]) -> None:
        self.wrappers = wrappers
        for name, wrapper in wrappers.items():
            wrapper.stacked = (weights[f"{name}.lora_A"], weights[f"{name}.lora_B"])

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        return next(iter(self.wrappers.values())).runs

    @runs.setter
    def runs(self, value: list[tuple[int, int, int]]) -> None:
        for wrapper in self.wrappers.values():
            wrapper.runs = value

    @property
    def row_edit(self) -> torch.Tensor | None:
        return next(iter(self.wrappers.values())).row_edit

    @row_edit.setter
    def row_edit(self, value: torch.Tensor | None) -> None:
        for wrapper in self.wrappers.values():
            wrapper.row_edit = value
