"""MEND — Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022) for LALMs (paper §4.1, App. D,
Table 6: layers Qwen/DeSTA 29-31, AF3 25-27; trained 1 epoch with Adam lr 1e-6).

Edited matrices: the LLM Linears of ``roles`` in ``layers`` (:mod:`editors.hypernetwork`; EasyEdit's MEND settings
for Qwen-family 7B multimodal models edit the up and down projections of three layers). The fine-tuning gradient
of a linear layer is a sum of rank-1 terms ``g_t u_t^T`` (``u_t`` the layer input at token t, ``g_t`` the loss
gradient at its output). MEND never forms it: an editor network maps each token's pair ``(u_t, g_t)``, normalised
by running statistics gathered during training, to a pseudo pair ``(u~_t, g~_t)`` through ``n_hidden + 1``
low-rank residual blocks ``z + relu(B (A z) + b)`` (rank ``rank``; ``B = 0`` at the start, so the network starts
as the identity), and the update is

    dW = -lr_W * sum_t g~_t u~_t^T

with ``lr_W`` a learned step size per edited matrix (starting at ``edit_lr``, trained with ``lr_lr``). With
``shared: true`` (MEND's and EasyEdit's setting) the matrices of one shape share one editor network (and its
normalisation statistics); each block then scales and shifts its pre-activation per matrix
(``relu((B (A z) + b) * scale_m + shift_m)``, scale 1 and shift 0 at the start), as MEND's shared editor does.
``shared: false`` gives every matrix its own network. Training minimises ``c_edit * edit loss + c_loc * KL``
(MEND's edit and locality losses). The editor base lives in :mod:`editors.hypernetwork` (training:
:mod:`editors.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from editors.registry import register
from editors.hypernetwork import Factors, HypernetEditor, HypernetHparams, HyperNetwork


class LowRankResidual(nn.Module):
    """``z + relu(B (A z) + b)`` with A: d -> rank, B: rank -> d (B starts at zero: identity). With ``n_modes``,
    the pre-activation of mode ``m`` is scaled and shifted by learned per-mode vectors (1 and 0 at the start)."""

    def __init__(self, dim: int, rank: int, n_modes: int | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.n_modes = n_modes
        if n_modes is not None:
            self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
            self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: int | None = None) -> torch.Tensor:
        pre = self.up(self.down(z))
        if mode is not None:
            if self.n_modes is None or not 0 <= mode < self.n_modes:
                raise ValueError(f"mend: mode {mode} for a block with {self.n_modes} modes")
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return z + torch.relu(pre)


class RunningNorm(nn.Module):
    """Per-feature running mean/variance (Welford), updated in training mode; normalises with them."""

    count: torch.Tensor  # buffers (registered below)
    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                xd = x.detach().double()
                n = xd.shape[0]
                batch_mean = xd.mean(0)
                batch_m2 = ((xd - batch_mean) ** 2).sum(0)
                total = self.count + n
                diff = batch_mean - self.mean
                self.mean.add_(diff * n / total)
                self.m2.add_(batch_m2 + diff ** 2 * self.count * n / total)
                self.count.fill_(total)
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt().clamp(min=1e-6).to(x.dtype)
        return (x - self.mean.to(x.dtype)) / std


class EditorNet(nn.Module):
    """MEND's editor network for matrices of one shape: normalised [u; g] -> low-rank residual MLP -> [u~; g~]
    (``n_modes``: how many matrices share it; None for a network of one matrix)."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, n_modes: int | None = None) -> None:
        super().__init__()
        self.d_in = d_in
        self.norm_u = RunningNorm(d_in)
        self.norm_g = RunningNorm(d_out)
        dim = d_in + d_out
        self.blocks = nn.ModuleList([LowRankResidual(dim, min(rank, dim), n_modes) for _ in range(n_hidden + 1)])

    def forward(self, u: torch.Tensor, g: torch.Tensor, mode: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([self.norm_u(u), self.norm_g(g)], dim=-1)
        for block in self.blocks:
            z = block(z, mode)
        return z[:, :self.d_in], z[:, self.d_in:]


def shape_key(shape: tuple[int, int]) -> str:
    """The name of the shared network of matrices of ``shape`` ([d_out, d_in])."""
    return f"{shape[0]}x{shape[1]}"


class MENDHyperNetwork(HyperNetwork):
    """Editor networks (one per matrix shape with ``shared``, else one per matrix) and one learned step size per
    edited matrix."""

    method = "mend"
    net_keys: ClassVar[tuple[str, ...]] = ("rank", "n_hidden", "edit_lr", "shared")

    def __init__(self, spec: dict[str, Any], net: dict[str, Any]) -> None:
        super().__init__(spec, net)
        rank, n_hidden, shared = int(self.net["rank"]), int(self.net["n_hidden"]), bool(self.net["shared"])
        #: matrix key -> (network name, mode within that network or None)
        self.routes: dict[str, tuple[str, int | None]] = {}
        groups: dict[str, list[str]] = {}
        for key in self.matrices:
            name = shape_key(self.shape(key)) if shared else key
            groups.setdefault(name, []).append(key)
        self.editors = nn.ModuleDict()
        for name, keys in groups.items():
            d_out, d_in = self.shape(keys[0])
            self.editors[name] = EditorNet(d_in, d_out, rank, n_hidden, n_modes=len(keys) if shared else None)
            for mode, key in enumerate(keys):
                self.routes[key] = (name, mode if shared else None)
        self.edit_lrs = nn.Parameter(torch.full((len(self.matrices),), float(self.net["edit_lr"])))

    def deltas(self, factors: dict[str, Factors], condition: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, key in enumerate(self.matrices):
            f = factors[key]
            name, mode = self.routes[key]
            u, g = self.editors[name](f.u, f.g, mode)
            out[key] = -self.edit_lrs[i] * (g.T @ u)
        return out

    def make_optimizer(self, hp: "MENDHparams") -> torch.optim.Optimizer:
        net_params = [p for n, p in self.named_parameters() if n != "edit_lrs"]
        return torch.optim.Adam([{"params": net_params, "lr": hp.lr},
                                 {"params": [self.edit_lrs], "lr": hp.lr_lr}])

    def training_loss(self, edit_loss: torch.Tensor, loc_loss: torch.Tensor, hp: "MENDHparams"
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = hp.c_edit * edit_loss + hp.c_loc * loc_loss
        return loss, {"edit_lr_mean": float(self.edit_lrs.detach().mean())}


@dataclass
class MENDHparams(HypernetHparams):
    """The shared hypernetwork settings plus the editor networks (``rank``, ``n_hidden``, ``shared``: one network
    per matrix shape) and the step sizes' learning rate ``lr_lr``."""

    bounds = {**HypernetHparams.bounds, "lr_lr": "non_negative", "rank": "positive", "n_hidden": "positive"}

    lr_lr: float
    rank: int
    n_hidden: int
    shared: bool


@register("mend")
class MEND(HypernetEditor):
    """MEND editing with a network trained by ``python -m editors.train --method mend``."""

    hparams_class = MENDHparams
    hparams: MENDHparams
    network_class = MENDHyperNetwork
    network_keys = HypernetEditor.network_keys + ("rank", "n_hidden", "shared")
