"""GRACE (Hartvigsen et al., 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors"):
a codebook of (key, value, radius) entries at the FFN output projection of one LLM layer.

Codebook. :class:`GraceCodebook` replaces the FFN output projection of layer ``layer``
(``adapter.set_mlp_out_proj``, EasyEdit's GRACE wraps ``mlp.down_proj`` too). Its query is the projection's input
at the last prompt token; when the nearest key (Euclidean distance, EasyEdit's ``dist_fn: euc``) lies within that
entry's deferral radius, the projection's output at the last prompt token is replaced by the entry's value
(``replacement: last``, EasyEdit's ``replace_last``); with ``replacement: answer`` also at every position after it
(the answer's tokens: teacher-forced targets while editing, each decoding step of that row while generating).
Every other position, and every row whose query matches no entry, gets exactly the original projection's output.
The decision is taken in the prefill (a call of two or more positions) and kept for the row's decoding steps (one
new token per call), which continue from the KV cache.

Editing. The key is the edit prompt's query; the value starts as the original output there (so training starts
from the unedited model) and is trained with SGD (``optimizer``, ``edit_lr``, at most ``n_iter`` steps, stop when the target loss
is below ``early_stop_loss``: EasyEdit's ``reg: early_stop``) on the teacher-forced target loss, running only the
edited layer and those above it. Deferral radius: with ``radius: relative`` (default) a new entry's radius is
``eps * ||key||``, relative to the layer's activation norm at the edit, so that it means the same on models whose
activations run on different scales (on the reference model's demo train split the keys of paraphrased questions
about the edit's audio lie within 0.2 ||key|| of the edit's key, those of locality prompts beyond 0.59 ||key||);
``radius: absolute`` is EasyEdit's plain Euclidean ``eps``. Codebook update (GRACE's ``eps_expand: coverage``): a
query outside every radius adds a new entry with the initial radius; inside the nearest entry's radius (plus the
initial radius) with the same target label, that entry's radius grows to cover the query and its value is retrained
on the new edit; with a different label, both radii shrink to half their distance and a new entry is added (no
overlap of conflicting entries).

Sequential mode: entries accumulate in the codebook over a sequence; :meth:`GRACE.reset` removes the codebook and
puts the original projection back, so the model's parameters are never changed (:meth:`touched_parameters` = []).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editors.base import EditRequest, Editor, finetune
from editors.registry import register
from editors.hparams import Hparams
from editors.models.base import IGNORE_INDEX
from sake_core.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Entry:
    key: torch.Tensor  # [in] fp32
    value: torch.Tensor  # [out] in the projection's dtype
    radius: float
    label: str


class GraceCodebook(nn.Module):
    """Stand-in for an FFN output projection: the original module plus a codebook applied at the last prompt token."""

    def __init__(self, original: nn.Module, replacement: str = "last") -> None:
        super().__init__()
        if replacement not in ("last", "answer"):
            raise ConfigError(f"grace: replacement={replacement!r}; expected last or answer")
        self.original = original
        self.replacement = replacement
        self.entries: list[Entry] = []
        self.train_value: torch.Tensor | None = None  # while editing: replaces the output from train_position on
        self.train_position: int = -1
        self.last_hits: list[int] = []  # entry index per row of the last prefill (-1: none), for tests/stats

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the nearest key and its distance for each query [B, in] (fp32); empty codebook -> -1, inf."""
        if not self.entries:
            n = queries.shape[0]
            return (torch.full((n,), -1, dtype=torch.long, device=queries.device),
                    torch.full((n,), float("inf"), device=queries.device))
        keys = torch.stack([e.key for e in self.entries]).to(queries.device)
        dist = torch.cdist(queries.float(), keys.float())  # [B, K]
        best, index = dist.min(dim=-1)
        return index, best

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)
        if self.train_value is not None:  # editing: the value under training replaces the output
            out = out.clone()
            stop = self.train_position + 1 if self.replacement == "last" else out.shape[1]
            out[:, self.train_position:stop] = self.train_value.to(out.dtype)
            return out
        if not self.entries:
            return out
        if x.shape[1] < 2:  # a decoding step: the prefill decided; "answer" keeps replacing for its hit rows
            if self.replacement == "last" or len(self.last_hits) != x.shape[0] or max(self.last_hits) < 0:
                return out
        else:
            index, dist = self.nearest(x[:, -1])
            radii = torch.tensor([e.radius for e in self.entries], device=dist.device)
            hit = dist <= radii[index.clamp(min=0)]
            self.last_hits = torch.where(hit, index, torch.full_like(index, -1)).tolist()
            if not bool(hit.any()):
                return out
        out = out.clone()
        for row, k in enumerate(self.last_hits):
            if k >= 0:
                out[row, -1] = self.entries[k].value.to(out.dtype)
        return out


@dataclass
class GraceHparams(Hparams):
    """GRACE's settings (see the module docstring and editors/hparams/grace.yaml)."""

    bounds = {"edit_lr": "positive", "n_iter": "non_negative", "eps": "positive", "early_stop_loss": "non_negative"}

    layer: int
    edit_lr: float
    n_iter: int
    eps: float
    radius: str  # relative: eps * ||key|| | absolute: eps
    early_stop_loss: float | None
    replacement: str  # last | answer
    optimizer: str  # sgd | adam


@register("grace")
class GRACE(Editor):
    """GRACE codebook at the FFN output projection of LLM layer ``hparams.layer`` (see the module docstring)."""

    hparams_class = GraceHparams
    hparams: GraceHparams
    #: decides per row on the host while decoding (not capturable): the eager engine only
    generation_engines = ("eager",)
    display_name = "GRACE"
    display_order = 10  # after the paper's eight methods

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codebook: GraceCodebook | None = None

    def _layer(self) -> int:
        return self.adapter.resolve_layer(self.hparams.layer)

    def touched_parameters(self) -> list[str]:
        return []  # the codebook lives beside the original weights

    def reset(self) -> None:
        if self.codebook is not None:
            self.adapter.set_mlp_out_proj(self._layer(), self.codebook.original)
            self.codebook = None

    def _install(self) -> GraceCodebook:
        if self.codebook is None:
            layer = self._layer()
            self.codebook = GraceCodebook(self.adapter.mlp_out_proj(layer), self.hparams.replacement)
            self.adapter.set_mlp_out_proj(layer, self.codebook)
        return self.codebook

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        a, hp = self.adapter, self.hparams
        codebook = self._install()
        batch = a.prepare([edit.prompt()], [edit.target])
        assert batch.labels is not None  # prepared with a target
        state = a.hidden_entering(batch, self._layer())
        # the last prompt token: the position before the first target token (one row, left padding)
        position = int((batch.labels[0] != IGNORE_INDEX).nonzero()[0, 0]) - 1
        captured: list[torch.Tensor] = []
        hook = codebook.original.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
        saved_entries, codebook.entries = codebook.entries, []
        try:
            with torch.no_grad():
                a.run_layers(state)
        finally:
            hook.remove()
            codebook.entries = saved_entries
        x_in = captured[-1][0, position]
        query = x_in.float()
        with torch.no_grad():
            init_value = codebook.original(x_in[None])[0]
        label = edit.target
        index, dist = codebook.nearest(query[None])
        k, d = int(index[0]), float(dist[0])
        if hp.radius not in ("relative", "absolute"):
            raise ValueError(f"grace: radius={hp.radius!r}; expected relative or absolute")
        eps = hp.eps * float(query.norm()) if hp.radius == "relative" else hp.eps
        action = "add"
        entry: Entry | None = None
        if k >= 0 and d <= codebook.entries[k].radius + eps:
            near = codebook.entries[k]
            if near.label == label:
                action = "expand"
                near.radius = max(near.radius, d)
                entry = near
            else:
                action = "split"
                near.radius = d / 2
                entry = Entry(key=query, value=init_value, radius=d / 2, label=label)
        if entry is None:
            entry = Entry(key=query, value=init_value, radius=eps, label=label)
        value = entry.value.detach().float().clone().requires_grad_(True)
        optimizer = hp.optimizer
        if optimizer not in ("sgd", "adam"):
            raise ConfigError(f"grace: optimizer={optimizer!r}; expected sgd or adam")

        def loss_of_value() -> torch.Tensor:
            codebook.train_value = value
            return a.loss_from(state)

        codebook.train_position = position
        try:
            result = finetune({"value": value}, loss_of_value, lr=hp.edit_lr, max_steps=hp.n_iter,
                              early_stop_loss=hp.early_stop_loss, optimizer=optimizer)
        finally:
            codebook.train_value = None
        steps, loss_value = result.steps, result.loss
        entry.value = value.detach().to(init_value.dtype)
        if action != "expand":
            codebook.entries.append(entry)
        return {"steps": steps, "loss": loss_value, "codebook_size": len(codebook.entries), "action": action,
                "radius": entry.radius, "nearest_distance": d if k >= 0 else None}
