"""MEND — Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022) for LALMs (paper §4.1, App. D,
Table 6: layers Qwen/DeSTA 29-31, AF3 25-27; trained 1 epoch with Adam lr 1e-6).

The fine-tuning gradient of a linear layer is a sum of rank-1 terms ``g_t u_t^T`` (``u_t`` the layer input at token
t, ``g_t`` the loss gradient at its output). MEND never forms it: a per-layer editor network maps each token's pair
``(u_t, g_t)``, normalised by running statistics gathered during training, to a pseudo pair ``(u~_t, g~_t)``
through ``n_hidden + 1`` low-rank residual blocks ``z + relu(B (A z) + b)`` (rank ``rank``; ``B = 0`` at the start,
so the network starts as the identity), and the update is

    dW = -lr_layer * sum_t g~_t u~_t^T

with ``lr_layer`` a learned per-layer step size (starting at ``edit_lr``, trained with ``lr_lr``). Training
minimises ``c_edit * edit loss + c_loc * KL`` (MEND's edit and locality losses). The editor base lives
in :mod:`editors.hypernetwork` (training: :mod:`editors.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from editors.registry import register
from editors.hypernetwork import Factors, HypernetEditor, HypernetHparams, HyperNetwork


class LowRankResidual(nn.Module):
    """``z + relu(B (A z) + b)`` with A: d -> rank, B: rank -> d (B starts at zero: identity)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + torch.relu(self.up(self.down(z)))


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
    """MEND's editor network for one layer: normalised [u; g] -> low-rank residual MLP -> [u~; g~]."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int) -> None:
        super().__init__()
        self.d_in = d_in
        self.norm_u = RunningNorm(d_in)
        self.norm_g = RunningNorm(d_out)
        dim = d_in + d_out
        self.blocks = nn.Sequential(*[LowRankResidual(dim, min(rank, dim)) for _ in range(n_hidden + 1)])

    def forward(self, u: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([self.norm_u(u), self.norm_g(g)], dim=-1)
        z = self.blocks(z)
        return z[:, :self.d_in], z[:, self.d_in:]


class MENDHyperNetwork(HyperNetwork):
    """One :class:`EditorNet` and one learned step size per edited layer."""

    method = "mend"
    net_keys: ClassVar[tuple[str, ...]] = ("rank", "n_hidden", "edit_lr")

    def __init__(self, spec: dict[str, Any], net: dict[str, Any]) -> None:
        super().__init__(spec, net)
        self.editors = nn.ModuleDict()
        for layer in self.layers:
            d_out, d_in = self.shape(layer)
            self.editors[str(layer)] = EditorNet(d_in, d_out, int(self.net["rank"]), int(self.net["n_hidden"]))
        self.edit_lrs = nn.Parameter(torch.full((len(self.layers),), float(self.net["edit_lr"])))

    def deltas(self, factors: dict[int, Factors], condition: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            f = factors[layer]
            u, g = self.editors[str(layer)](f.u, f.g)
            out[layer] = -self.edit_lrs[i] * (g.T @ u)
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
    """The shared hypernetwork settings plus the editor networks (``rank``, ``n_hidden``), the step sizes'
    learning rate ``lr_lr`` and the loss weights ``c_edit``, ``c_loc``."""

    lr_lr: float
    rank: int
    n_hidden: int
    c_edit: float
    c_loc: float


@register("mend")
class MEND(HypernetEditor):
    """MEND editing with a network trained by ``python -m editors.train --method mend``."""

    hparams_class = MENDHparams
    hparams: MENDHparams
    network_class = MENDHyperNetwork
