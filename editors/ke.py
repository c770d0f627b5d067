"""KE — Knowledge Editor (De Cao et al., 2021) for LALMs (paper §4.1, App. D, Table 6: layers Qwen/DeSTA 29-31,
AF3 25-27; trained 1 epoch with RMSprop lr 3e-4).

Edited matrices: the LLM Linears of ``roles`` in ``layers`` (:mod:`editors.hypernetwork`); EasyEdit's KE settings
edit the FFN input and output projections of the top three layers (``fc_in`` + ``fc_out``: here ``mlp_up`` +
``mlp_out``). The edit is read by a bidirectional LSTM over its input embeddings (the question's tokens and the
connector outputs of its audio, followed by the target answer's tokens): the final states of both directions,
concatenated, are the condition ``h``. For each edited matrix ``W`` ([d_out, d_in]) a small feed-forward head maps
``h`` to ``alpha, beta`` (d_out), ``gamma, delta`` (d_in) and a scalar ``eta``, and the update is KE's constrained
(gated, rank-1-modulated) transform of the fine-tuning gradient ``G = sum_t g_t u_t^T``:

    dW = -edit_lr * sigmoid(eta) * ( (sigmoid(alpha) gamma^T) * G + sigmoid(beta) delta^T )

The head starts so that ``dW ~ -edit_lr * G`` (a gradient step; our initialisation choice). Training minimises the
edit loss subject to the locality constraint ``KL <= kl_margin`` through a Lagrangian ``edit + lambda * KL`` whose
multiplier follows dual ascent (``log lambda += dual_lr * (KL - kl_margin)``), as KE's constrained optimisation.
The editor base lives in :mod:`editors.hypernetwork`, training (accumulation, validation, early stop) in
:mod:`editors.train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from editors.registry import register
from sake_core.errors import ConfigError
from editors.hypernetwork import Factors, HypernetEditor, HypernetHparams, HyperNetwork


#: |log lambda| stays below this (the Lagrange multiplier within e^-10 .. e^10)
LOG_LAMBDA_BOUND = 10.0


class KEHyperNetwork(HyperNetwork):
    """Bidirectional-LSTM condition + one gating head per edited matrix."""

    log_lambda: torch.Tensor  # buffer: log of the Lagrange multiplier of the KL constraint

    method = "ke"
    needs_condition = True
    net_keys: ClassVar[tuple[str, ...]] = ("lstm_input", "lstm_hidden", "head_hidden", "edit_lr")

    def __init__(self, spec: dict[str, Any], net: dict[str, Any]) -> None:
        super().__init__(spec, net)
        hidden = int(self.spec["hidden_size"])
        lstm_in, lstm_hidden, head_hidden = (int(self.net["lstm_input"]), int(self.net["lstm_hidden"]),
                                             int(self.net["head_hidden"]))
        self.project = nn.Linear(hidden, lstm_in)
        self.lstm = nn.LSTM(lstm_in, lstm_hidden, batch_first=True, bidirectional=True)
        self.heads = nn.ModuleDict()
        for key in self.matrices:
            d_out, d_in = self.shape(key)
            head = nn.Sequential(nn.Linear(2 * lstm_hidden, head_hidden), nn.Tanh(),
                                 nn.Linear(head_hidden, 2 * d_out + 2 * d_in + 1))
            last = cast(nn.Linear, head[-1])
            nn.init.normal_(last.weight, std=1e-3)
            with torch.no_grad():  # alpha, beta, gamma, delta, eta such that dW ~ -edit_lr * G at the start
                last.bias.zero_()
                last.bias[:d_out] = 4.0  # alpha: sigmoid ~ 1
                last.bias[d_out:2 * d_out] = -4.0  # beta: sigmoid ~ 0
                last.bias[2 * d_out:2 * d_out + d_in] = 1.0  # gamma
                last.bias[-1] = 4.0  # eta: sigmoid ~ 1
            self.heads[key] = head
        self.register_buffer("log_lambda", torch.zeros(()))

    def condition(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The edit's condition vector [2 * lstm_hidden] from its input embeddings [1, T, H] (valid tokens only)."""
        seq = self.project(embeds[valid].unsqueeze(0).to(self.project.weight.dtype))  # [1, N, lstm_in]
        _, (h_n, _) = self.lstm(seq)
        return torch.cat([h_n[0, 0], h_n[1, 0]], dim=-1)

    def deltas(self, factors: dict[str, Factors], condition: tuple[torch.Tensor, torch.Tensor] | None
               ) -> dict[str, torch.Tensor]:
        if condition is None:
            raise ValueError("KE needs the edit's input embeddings as condition")
        h = self.condition(*condition)
        lr = float(self.net["edit_lr"])
        out: dict[str, torch.Tensor] = {}
        for key in self.matrices:
            d_out, d_in = self.shape(key)
            params = self.heads[key](h)
            alpha, beta = params[:d_out], params[d_out:2 * d_out]
            gamma, delta = params[2 * d_out:2 * d_out + d_in], params[2 * d_out + d_in:2 * d_out + 2 * d_in]
            eta = params[-1]
            grad = factors[key].gradient()
            update = (torch.sigmoid(alpha)[:, None] * gamma[None, :] * grad
                      + torch.sigmoid(beta)[:, None] * delta[None, :])
            out[key] = -lr * torch.sigmoid(eta) * update
        return out

    def make_optimizer(self, hp: "KEHparams") -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=hp.lr)
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr)
        raise ConfigError(f"ke: optimizer={hp.optimizer!r}; expected rmsprop or adam")

    def training_loss(self, edit_loss: torch.Tensor, loc_loss: torch.Tensor, hp: "KEHparams"
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        lam = self.log_lambda.exp()
        return edit_loss + lam * loc_loss, {"lambda": float(lam)}

    def after_step(self, edit_loss: float, loc_loss: float, hp: "KEHparams") -> None:
        with torch.no_grad():  # dual ascent on the Lagrange multiplier of KL <= kl_margin
            step = hp.dual_lr * (loc_loss - hp.kl_margin)
            self.log_lambda.add_(step).clamp_(min=-LOG_LAMBDA_BOUND, max=LOG_LAMBDA_BOUND)


@dataclass
class KEHparams(HypernetHparams):
    """The shared hypernetwork settings plus the network's sizes, its optimizer and the KL constraint
    ``kl_margin`` with the multiplier's step ``dual_lr``."""

    bounds = {**HypernetHparams.bounds, "lstm_input": "positive", "lstm_hidden": "positive",
              "head_hidden": "positive", "kl_margin": "non_negative", "dual_lr": "non_negative"}

    optimizer: str  # rmsprop | adam
    lstm_input: int
    lstm_hidden: int
    head_hidden: int
    kl_margin: float
    dual_lr: float


@register("ke")
class KE(HypernetEditor):
    """KE editing with a network trained by ``python -m editors.train --method ke``."""

    hparams_class = KEHparams
    hparams: KEHparams
    network_class = KEHyperNetwork
    network_keys = HypernetEditor.network_keys + ("lstm_input", "lstm_hidden", "head_hidden")
