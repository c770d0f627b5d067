"""WISE (Wang et al., 2024): a side memory for the FFN output projection of one LLM layer, with activation-based
routing (paper §4.1, App. D, Table 6).

Editing. The side memory ``W'`` starts as a copy of the chosen layer's FFN output projection ``W`` (Qwen layer 26,
AF3 26, DeSTA 29) and is trained with SGD (edit_lr, n_iter) on

    L = CE(target | edit prompt; W')                                    (edit loss)
      + mean_{o, i} [d(o) - d(i) + gamma]_+                             (margin between in- and out-of-scope)
      + mean_o [d(o) - alpha]_+                                         (out-of-scope activation bound)
      + mean_i [beta - d(i)]_+                                          (minimum in-scope activation)

where ``d(x) = mean over tokens of |act(W' a) - act(W a)|`` is the *activation* of input ``x`` (``a`` = the FFN's
inner activation at that layer, ``act`` the LLM's hidden activation function as in EasyEdit's implementation, or
the identity with ``distance_act: none`` as in the WISE paper), ``i`` ranges over the in-scope inputs (the edit
prompt) and ``o`` over the out-of-scope inputs: the preservation prompts (Table 6: 10 text + 10 audio, drawn as
for UnKE, see :func:`editors.preservation.preservation_prompts`). Each step's gradient is multiplied by the shard's random
mask (``mask_ratio`` of the entries; knowledge sharding) and ``W'`` is clamped to ``W +- norm_constraint``.
The inner activations ``a`` of the layer are fixed during the edit (lower layers are frozen), so they are computed
once; each step runs only the edited layer and those above it for the edit loss.

Routing (WISE's paper). :class:`WiseRouter` replaces the output projection (``adapter.set_mlp_out_proj``). For
each input row it computes the activation score of every side-memory shard on the prompt (mean over the row's
valid tokens, or the largest token value when the prompt has more than ``long_prompt_tokens`` tokens, as EasyEdit
at inference). A shard is eligible when its score exceeds ``act_ratio * threshold``, the threshold being the
smallest in-scope activation of its edits (with ``retrieve: false``, WISE-Merge, one threshold for every memory:
the smallest of all edits). The row uses the eligible shard with the largest score (WISE-Retrieve: the side
memory with the highest activation), else the original weights. The decision is taken on the prompt and kept for
that row's generated tokens. Rows routed to the original weights get exactly the original module's output
(bit-identical to the unedited model).

Generation plans the rows first (:meth:`WISE.routed`, installed as the adapter's ``prompt_routing``): the layers
below the edited one are unchanged, so one forward to that layer gives each prompt's scores and its memory
(:meth:`WISE.decide`, the rule above). The call then runs with the original projection put back and every memory
stacked beside it, each row routed to its own (``editors.batching.RowRouting``), so both decode engines run it: the
graph engine shares a prefix only between rows routed alike and its captured decode step gathers each row's
projection. A forward of the router itself (``adapter.logits_from`` and other direct paths) decides in place: a
forward pre-hook on the language model records the attention mask (padding ignored; no mask = every position
valid) and whether the call continues a KV cache (a decoding step, which reuses the prefill's decisions); a
forward hook clears both after each call, so paths that run layers directly decide afresh on every position.

Many edits (sequential mode), EasyEdit's schedule. Edits are written into the current shard until it holds
``save_freq`` edits; then a new shard starts from ``W`` with a new random mask. Every ``merge_freq`` edits the
shards finished since the last merge are merged with TIES (trim to ``merge_density`` by magnitude, elect signs,
disjoint mean of the task vectors ``W_k - W``) into one memory whose threshold is the smallest of theirs
(``retrieve: true``: the merged memories stay separate shards, retrieved by activation; ``retrieve: false``: every
finished shard, an earlier merge included, goes into one memory). EasyEdit's settings for 7B Qwen and Llama models
(``save_freq: 500``, ``merge_freq: 1000``, ``retrieve: True``) keep a whole 10-edit sequence in one shard: no
merge. Gate statistics of every edit are returned in the stats dict and kept in :attr:`WISE.gate_stats`.

The original weights are never modified: :meth:`WISE.touched_parameters` is empty and :meth:`WISE.reset` puts the
original module back and removes the hook.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from editors.base import EditRequest, Editor
from editors.batching import RowRouting, masked_update, runs_of
from editors.hparams import Hparams
from editors.models.base import IGNORE_INDEX, EditableModel, PerEdit, Prompt, as_linear
from editors.preservation import editor_preservation
from editors.registry import register
from sake_core.errors import ConfigError

logger = logging.getLogger(__name__)


def activation_fn(adapter: EditableModel, which: str) -> Any:
    """The activation applied before the distance: the LLM config's ``hidden_act`` or the identity."""
    if which == "none":
        return lambda t: t
    if which != "hidden_act":
        raise ConfigError(f"wise: distance_act={which!r}; expected hidden_act or none")
    from transformers.activations import ACT2FN

    name = getattr(adapter.language_model().config, "hidden_act", None)
    return ACT2FN[name] if name else (lambda t: t)


@dataclass(eq=False)
class Shard:
    """One side memory: its weight, the in-scope activations of its edits and its gradient mask."""

    weight: torch.Tensor  # same shape/dtype as the original weight
    mask: torch.Tensor | None  # {0,1} gradient mask (float), None = all entries
    edit_acts: list[float] = field(default_factory=list)
    n_edits: int = 0
    merged_from: int = 1  # > 1 for a TIES merge of several shards
    closed: bool = False  # no further edits are written into it

    @property
    def threshold(self) -> float:
        return min(self.edit_acts) if self.edit_acts else float("inf")


class WiseRouter(nn.Module):
    """Stand-in for an FFN output projection: routes each input row to a side-memory shard or the original."""

    def __init__(self, original: nn.Linear, act: Any, act_ratio: float, long_prompt_tokens: int = 100,
                 retrieve: bool = True) -> None:
        super().__init__()
        self.original = original
        self.act = act
        self.act_ratio = float(act_ratio)
        self.long_prompt_tokens = int(long_prompt_tokens)
        self.retrieve = bool(retrieve)
        self.shards: list[Shard] = []
        self.train_weight: torch.Tensor | None = None  # set while editing: every row uses it
        self.capture: list[torch.Tensor] | None = None  # set while collecting inner activations
        self.call_mask: torch.Tensor | None = None  # [B, T_total] attention mask of the current LM call
        self.call_is_decode: bool = False
        self.decisions: torch.Tensor | None = None  # [B] shard index per row (-1: original), from the prefill
        self.last_scores: torch.Tensor | None = None  # [B, n_shards] scores of the last prefill
        # several edits per pass: while they train, edit k's memory computes the rows of each run (k, start, stop)
        # of ``runs``; afterwards each edit's memory is a shard of ``edit_shards`` (generated through WISE.routed)
        self.train_weights: Sequence[torch.Tensor] | None = None  # K memories [out, in] while K edits train
        self.edit_shards: list[Shard] | None = None
        self.runs: list[tuple[int, int, int]] = []

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.original, "bias", None)

    def thresholds(self) -> list[float]:
        """The routing threshold of each shard (before ``act_ratio``): its own edits' smallest in-scope
        activation, or with ``retrieve`` off the smallest over all edits (one threshold, WISE-Merge)."""
        own = [s.threshold for s in self.shards]
        return own if self.retrieve else [min(own)] * len(own)

    def side_output(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype), self.bias)

    def token_distance(self, x: torch.Tensor, weight: torch.Tensor, original_out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """|act(W' a) - act(W a)| per token: [B, T] (fp32)."""
        orig = self.original(x) if original_out is None else original_out
        side = self.side_output(x, weight)
        return (self.act(side.float()) - self.act(orig.float())).norm(dim=-1)

    def row_scores(self, dist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-row score of per-token distances: mean over valid tokens, max for long prompts."""
        valid = valid.to(dist.dtype)
        counts = valid.sum(-1).clamp(min=1.0)
        mean = (dist * valid).sum(-1) / counts
        top = dist.masked_fill(valid == 0, float("-inf")).amax(-1)
        return torch.where(counts > self.long_prompt_tokens, top, mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:  # collecting inner activations: the original output (no routing decided)
            self.capture.append(x.detach())
            return self.original(x)
        if self.train_weight is not None:
            return self.side_output(x, self.train_weight)
        if self.train_weights is not None:
            parts = [self.side_output(x[a:b], self.train_weights[k]) for k, a, b in self.runs]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.edit_shards is not None:  # K edits' memories answer through their planned generation only
            raise RuntimeError("wise: after apply_many, generate with generate_many (rows routed by WISE.routed)")
        out = self.original(x)
        if not self.shards:
            return out
        batch, length = x.shape[0], x.shape[1]
        if self.call_is_decode and self.decisions is not None and self.decisions.shape[0] == batch:
            decisions = self.decisions
        else:
            scores, decisions = self.route(x, out, self._valid(batch, length, x.device))
            self.decisions, self.last_scores = decisions, scores.detach()
        if bool((decisions >= 0).any()):
            out = out.clone()
            for k in sorted(set(decisions.tolist()) - {-1}):
                rows = decisions == k
                out[rows] = self.side_output(x[rows], self.shards[k].weight)
        return out

    def route(self, x: torch.Tensor, out: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """WISE-Retrieve on inner activations ``x`` (``out``: the original projection's output, ``valid``: the
        positions that count): every shard's row scores ``[B, shards]`` and each row's shard, the eligible one with
        the highest activation, or -1 (the original weights)."""
        scores = torch.stack([self.row_scores(self.token_distance(x, s.weight, out), valid)
                              for s in self.shards], dim=-1)
        eligible = scores > torch.tensor(self.thresholds(), device=scores.device) * self.act_ratio
        best = scores.masked_fill(~eligible, float("-inf")).argmax(-1)
        return scores, torch.where(eligible.any(-1), best, torch.full_like(best, -1))

    def _valid(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        valid = torch.ones(batch, length, device=device)
        if self.call_mask is not None and self.call_mask.shape[0] == batch and self.call_mask.shape[1] >= length:
            valid = self.call_mask[:, -length:].to(device).float()
        return valid


def ties_merge(base: torch.Tensor, weights: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging of task vectors ``w - base``: keep the top ``density`` fraction by magnitude of each, elect the
    sign of the summed trimmed vectors, average the entries that agree with it."""
    deltas = []
    for w in weights:
        d = (w.float() - base.float()).flatten()
        k = max(1, int(round(density * d.numel())))
        if k < d.numel():
            cut = d.abs().kthvalue(d.numel() - k + 1).values
            d = torch.where(d.abs() >= cut, d, torch.zeros_like(d))
        deltas.append(d)
    stacked = torch.stack(deltas)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return (base.float().flatten() + total / count).view_as(base).to(base.dtype)


@dataclass
class WISEHparams(Hparams):
    """See the module docstring: the edited ``layer``, the loss weights (``alpha``, ``beta``, ``gamma``), the
    router threshold (``act_ratio``), the optimisation, knowledge sharding and merging."""

    bounds = {"act_ratio": "non_negative", "edit_lr": "positive", "n_iter": "positive",
              "preserve_text": "non_negative", "preserve_audio": "non_negative", "mask_ratio": "fraction",
              "norm_constraint": "positive", "weight_decay": "non_negative", "early_stop_loss": "non_negative",
              "long_prompt_tokens": "non_negative", "save_freq": "positive", "merge_freq": "non_negative",
              "merge_density": "fraction"}

    layer: int
    alpha: float
    beta: float
    gamma: float
    act_ratio: float
    edit_lr: float
    n_iter: int
    preserve_text: int
    preserve_audio: int
    preserve_source: str
    mask_ratio: float
    norm_constraint: float | None
    weight_decay: float
    early_stop_loss: float | None
    distance_act: str
    long_prompt_tokens: int
    save_freq: int
    merge_freq: int
    merge_density: float
    retrieve: bool


@register("wise")
class WISE(Editor):
    """WISE side memory on the FFN output projection of LLM layer ``hparams.layer``."""

    hparams_class = WISEHparams
    hparams: WISEHparams
    #: generations are planned per prompt before they start (:meth:`routed`), so both engines can run them; the
    #: graph engine is the CUDA default (bench, one H100, 32 edits each: 1.74 s/edit against eager's 2.71)
    generation_engines = ("graph", "eager")
    batches_edits = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router: WiseRouter | None = None
        self._hooks: list[Any] = []
        self.gate_stats: list[dict[str, Any]] = []
        self.n_edits = 0

    # ---- interface ----------------------------------------------------------------------------------------------

    def _layer(self) -> int:
        return self.adapter.resolve_layer(self.hparams.layer)

    def touched_parameters(self) -> list[str]:
        return []  # the original weights are never modified; the side memory lives in the router

    def reset(self) -> None:
        if self.router is not None:
            self.adapter.set_mlp_out_proj(self._layer(), self.router.original)
            self.router = None
        if self.adapter.prompt_routing is self:
            self.adapter.prompt_routing = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.gate_stats = []
        self.n_edits = 0

    # ---- router installation ------------------------------------------------------------------------------------

    def _install(self) -> WiseRouter:
        if self.router is None:
            layer = self._layer()
            original = as_linear(self.adapter.mlp_out_proj(layer))
            router = WiseRouter(original, activation_fn(self.adapter, self.hparams.distance_act),
                                self.hparams.act_ratio, self.hparams.long_prompt_tokens, self.hparams.retrieve)
            self.adapter.set_mlp_out_proj(layer, router)
            self.router = router

            def record_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
                mask = kwargs.get("attention_mask")
                router.call_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                router.call_is_decode = _cached_tokens(kwargs) > 0

            def forget_mask(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                router.call_mask, router.call_is_decode = None, False  # other paths see no stale mask

            lm = self.adapter.language_model()
            self._hooks = [lm.register_forward_pre_hook(record_mask, with_kwargs=True),
                           lm.register_forward_hook(forget_mask, with_kwargs=True)]
            self.adapter.prompt_routing = self  # generations plan each row's memory first (routed)
        return self.router

    def _inner_activations(self, state) -> torch.Tensor:
        """The FFN inner activations (the output projection's input) of the edited layer: [B, T, I]."""
        router = self._install()
        router.capture = []
        try:
            with torch.no_grad():
                self.adapter.run_layers(state)
            return router.capture[-1]
        finally:
            router.capture = None

    # ---- editing ------------------------------------------------------------------------------------------------

    def _current_shard(self, router: WiseRouter) -> Shard:
        if router.shards and not router.shards[-1].closed:
            return router.shards[-1]
        weight = router.original.weight.detach().clone()
        ratio = self.hparams.mask_ratio
        mask = None
        if ratio < 1.0:
            gen = torch.Generator().manual_seed(int(self.context.seed) * 1_000_003 + len(router.shards) + 1)
            mask = (torch.rand(weight.shape, generator=gen) < ratio).to(weight.device, torch.float32)
        shard = Shard(weight=weight, mask=mask)
        router.shards.append(shard)
        return shard

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        a, hp = self.adapter, self.hparams
        layer = self._layer()
        router = self._install()
        shard = self._current_shard(router)
        # In-scope: the edit prompt (teacher-forced target for the edit loss); activations of its prompt tokens.
        batch = a.prepare([edit.prompt()], [edit.target])
        state = a.hidden_entering(batch, layer)
        x_in = self._inner_activations(state)
        # activations are scored on the prompt tokens: what the router sees before generating
        valid_in = ((batch.attention_mask > 0) & (batch.labels == IGNORE_INDEX)).float()
        preserve = editor_preservation(self, edit)
        if preserve:
            pbatch = a.prepare(preserve)
            x_out = self._inner_activations(a.hidden_entering(pbatch, layer))
            valid_out = pbatch.attention_mask.float()
        with torch.no_grad():
            orig_in = router.original(x_in)
            orig_out = router.original(x_out) if preserve else None
        base = router.original.weight.detach()
        master = shard.weight.detach().float().clone().requires_grad_(True)
        opt = torch.optim.SGD([master], lr=hp.edit_lr, weight_decay=hp.weight_decay)
        alpha, beta, gamma = hp.alpha, hp.beta, hp.gamma
        norm_c = hp.norm_constraint
        early = hp.early_stop_loss

        def distances(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            d_in = router.row_scores(router.token_distance(x_in, weight, orig_in), valid_in)
            d_out = (router.row_scores(router.token_distance(x_out, weight, orig_out), valid_out)
                     if preserve else None)
            return d_in, d_out

        def act_loss(d_in: torch.Tensor, d_out: torch.Tensor | None) -> torch.Tensor:
            return _activation_loss(d_in, d_out, alpha, beta, gamma)

        router.train_weight = master
        steps, ft, total = 0, float("nan"), float("nan")
        try:
            for _ in range(hp.n_iter):
                ft_loss = a.loss_from(state)
                loss = ft_loss + act_loss(*distances(master))
                ft, total = float(ft_loss.detach()), float(loss.detach())
                if early is not None and total < early:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if shard.mask is not None and master.grad is not None:
                    master.grad.mul_(shard.mask)
                opt.step()
                steps += 1
                if norm_c is not None:
                    with torch.no_grad():
                        lo, hi = base.float() - norm_c, base.float() + norm_c
                        master.copy_(torch.maximum(torch.minimum(master, hi), lo))
        finally:
            router.train_weight = None
        with torch.no_grad():
            shard.weight = master.detach().to(base.dtype)
            d_in, d_out = distances(shard.weight)
        shard.edit_acts.append(float(d_in.min()))
        shard.n_edits += 1
        self.n_edits += 1
        shard_index = router.shards.index(shard)
        self._maybe_close_and_merge(router, shard)
        stats = {
            "steps": steps, "loss": total, "ft_loss": ft, "in_scope_act": float(d_in.min()),
            "out_scope_act_max": float(d_out.max()) if d_out is not None else None,
            "out_scope_act_mean": float(d_out.mean()) if d_out is not None else None,
            "threshold": shard.threshold, "act_ratio": router.act_ratio,
            "gate": shard.threshold * router.act_ratio, "shard": shard_index, "n_shards": len(router.shards),
            "n_preserve": len(preserve),
        }
        self.gate_stats.append(stats)
        return stats

    def _maybe_close_and_merge(self, router: WiseRouter, shard: Shard) -> None:
        """Close the shard after ``save_freq`` edits; every ``merge_freq`` edits, TIES-merge the closed shards into
        one memory (threshold: the smallest of theirs): with ``retrieve`` the shards finished since the last merge,
        without it every closed shard, the earlier merge included."""
        save_freq = self.hparams.save_freq
        if save_freq > 0 and shard.n_edits >= save_freq:
            shard.closed = True
        merge_freq = self.hparams.merge_freq
        if self.hparams.retrieve:
            group = [s for s in router.shards if s.closed and s.merged_from == 1]
        else:
            group = [s for s in router.shards if s.closed]
        if merge_freq > 0 and self.n_edits % merge_freq == 0 and len(group) > 1:
            merged = Shard(weight=ties_merge(router.original.weight.detach(), [s.weight for s in group],
                                             self.hparams.merge_density),
                           mask=None, edit_acts=[min(s.threshold for s in group)],
                           n_edits=sum(s.n_edits for s in group),
                           merged_from=sum(s.merged_from for s in group), closed=True)
            router.shards = [s for s in router.shards if s not in group] + [merged]
            logger.info("wise: merged %d shards (TIES) into one memory", len(group))


    # ---- several edits per pass ---------------------------------------------------------------------------------

    def apply_many(self, edits: Sequence[EditRequest]) -> list[dict[str, Any]]:
        """K independent single edits at once, each with its own side memory (as :meth:`apply` writes one edit
        into a fresh router): the edit prompts and every edit's preservation prompts in canonical batches, one SGD
        step over the K stacked memories per iteration (each gets its own gradient: its loss is its own prompt's
        target loss through its own memory plus its own activation terms), per-edit early stop, the shard mask and
        norm bound elementwise. Evaluate with :meth:`generate_many` (each item routed by its own edit's memory)."""
        a, hp = self.adapter, self.hparams
        if self.router is not None and (self.router.shards or self.router.edit_shards):
            raise RuntimeError("wise: apply_many needs no edit applied before (call reset)")
        router = self._install()
        k = len(edits)
        template = self._current_shard(router)  # the first shard an edit alone writes into: its mask
        router.shards = []
        base = router.original.weight.detach()
        preserve = [editor_preservation(self, e) for e in edits]
        # (owner edit of each row, state or None, inner activations, original output, valid, owners on the device)
        ins, outs = [], []
        for rows, state, x, orig, valid in self._layer_inputs([e.prompt() for e in edits], [e.target for e in edits]):
            ins.append((list(rows), state, x, orig, valid, torch.tensor(rows, device=x.device)))
        owners = [j for j, ps in enumerate(preserve) for _ in ps]
        for rows, _, x, orig, valid in self._layer_inputs([p for ps in preserve for p in ps]):
            outs.append(([owners[i] for i in rows], None, x, orig, valid, None))
        master = base.float().unsqueeze(0).repeat(k, 1, 1).requires_grad_(True)
        alpha, beta, gamma = hp.alpha, hp.beta, hp.gamma
        norm_c, early = hp.norm_constraint, hp.early_stop_loss
        device = master.device

        def scores(groups: list, weights: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
            """Per edit: the row scores of its rows in ``groups``, through its own memory (``weights[e]``)."""
            per_edit: list[list[torch.Tensor]] = [[] for _ in range(k)]
            for owner, _, x, orig, valid, _ in groups:
                for e, lo, hi in runs_of(owner):
                    d = router.row_scores(router.token_distance(x[lo:hi], weights[e], orig[lo:hi]), valid[lo:hi])
                    per_edit[e].append(d)
            return per_edit

        def losses(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            weights = stacked.unbind(0)  # per-edit views taken once a step (indexing the stack: editors/batching.py)
            ft = torch.zeros(k, device=device)
            router.train_weights = weights
            try:
                for owner, state, _, _, _, who in ins:
                    router.runs = runs_of(owner)
                    ft = ft.index_copy(0, who, a.loss_from(state, reduction="none").float())
            finally:
                router.train_weights = None
            d_in, d_out = scores(ins, weights), scores(outs, weights)
            act = torch.stack([_activation_loss(torch.cat(d_in[e]), torch.cat(d_out[e]) if d_out[e] else None,
                                                alpha, beta, gamma) for e in range(k)])
            return ft, ft + act

        active = torch.ones(k, dtype=torch.bool, device=device)
        steps, ft_last, total_last = [0] * k, [float("nan")] * k, [float("nan")] * k
        opt_state: list[dict[str, Any]] = [{}]  # the optimizer state of masked_update
        latest: tuple[torch.Tensor, torch.Tensor] | None = None  # without an early stop: read after the last step
        for step in range(1, hp.n_iter + 1):
            ft, total = losses(master)
            if early is None:  # every edit runs every step: nothing to decide on the host
                latest = ft.detach(), total.detach()
            else:
                values_ft, values = ft.detach().tolist(), total.detach().tolist()  # host sync: the early-stop check
                was_active = active.tolist()
                for e in range(k):
                    if was_active[e]:
                        ft_last[e], total_last[e] = values_ft[e], values[e]
                active &= ~(total.detach() < early)
                if not bool(active.any()):
                    break
            # stopped edits weighted 0 rather than dropped by a boolean index (a host sync): the same gradient
            (grad,) = torch.autograd.grad((total * active).sum(), [master])
            with torch.no_grad():
                if template.mask is not None:
                    grad = grad * template.mask
                masked_update([master], [grad], opt_state, active, step, optimizer="sgd", lr=hp.edit_lr,
                              weight_decay=hp.weight_decay, all_active=early is None or bool(active.all()))
                if norm_c is not None:
                    lo, hi = base.float() - norm_c, base.float() + norm_c
                    master.copy_(torch.where(active.view(-1, 1, 1), torch.maximum(torch.minimum(master, hi), lo),
                                             master))
            if early is None:
                steps = [s_ + 1 for s_ in steps]
            else:
                for e, on in enumerate(active.tolist()):
                    steps[e] += on
        if latest is not None:
            ft_last, total_last = latest[0].tolist(), latest[1].tolist()
        with torch.no_grad():
            weights = master.detach().to(base.dtype).unbind(0)
            d_in, d_out = scores(ins, weights), scores(outs, weights)
        router.edit_shards, stats = [], []
        for e in range(k):
            di = torch.cat(d_in[e])
            do = torch.cat(d_out[e]) if d_out[e] else None
            shard = Shard(weight=weights[e], mask=template.mask, edit_acts=[float(di.min())], n_edits=1)
            router.edit_shards.append(shard)
            stats.append({"steps": steps[e], "loss": total_last[e], "ft_loss": ft_last[e],
                          "in_scope_act": float(di.min()),
                          "out_scope_act_max": float(do.max()) if do is not None else None,
                          "out_scope_act_mean": float(do.mean()) if do is not None else None,
                          "threshold": shard.threshold, "act_ratio": router.act_ratio,
                          "gate": shard.threshold * router.act_ratio, "shard": 0, "n_shards": 1,
                          "n_preserve": len(preserve[e])})
        self.gate_stats.extend(stats)
        return stats

    @contextlib.contextmanager
    def per_edit(self, prompts_per_edit: Sequence[Sequence[Prompt]]) -> Iterator[PerEdit | None]:
        if self.router is None or self.router.edit_shards is None:
            raise RuntimeError("wise: generate_many before apply_many")
        owners = [k for k, ps in enumerate(prompts_per_edit) for _ in ps]
        with self.routed([p for ps in prompts_per_edit for p in ps], owners) as per_edit:
            yield per_edit

    # ---- generation: each row's memory decided from its prompt --------------------------------------------------

    @contextlib.contextmanager
    def routed(self, prompts: Sequence[Prompt], owners: Sequence[int] | None = None) -> Iterator[PerEdit | None]:
        """The plan of a generation of ``prompts`` (``editors.models.generation.PromptRouting``): each row's memory,
        decided from its prompt as the router decides at prefill (:meth:`decide`), then the original projection put
        back for the call with every memory and the original weights stacked and routed per row
        (``editors.batching.RowRouting``: row i computes with ``weights[edit_of[i]]``). ``owners`` (several edits per
        pass): the edit of each prompt, whose own memory alone may answer it. None when no memory is installed."""
        router = self.router
        shards = None if router is None else (router.edit_shards if owners is not None else router.shards)
        if router is None or not shards:
            yield None
            return
        decisions = self.decide(prompts, owners)
        original = router.original
        layer = self._layer()
        self.adapter.set_mlp_out_proj(layer, original)
        try:
            names = self.adapter.parameter_names(original)
            stacked = {}
            for name, param in zip(names, original.parameters()):
                if param is original.weight:
                    stacked[name] = torch.stack([s.weight.to(param.dtype) for s in shards] + [param.detach()])
                else:  # the bias: the side memories use the original's
                    stacked[name] = param.detach().unsqueeze(0).expand(len(shards) + 1, *param.shape)
            routing = RowRouting(self.adapter.model, names)
            routing.set_weights(stacked)
            with routing.installed():
                yield PerEdit(edit_of=decisions, routing=routing)
        finally:
            self.adapter.set_mlp_out_proj(layer, router)

    def decide(self, prompts: Sequence[Prompt], owners: Sequence[int] | None = None) -> list[int]:
        """Each prompt's memory: an index into the router's shards (``owners`` given: into the per-edit memories,
        each prompt's own edit's only), or the number of them for the original weights. The rule is the router's at
        prefill (its scores over the prompt's tokens at the edited layer, the thresholds times ``act_ratio``); the
        layers below are unchanged, so one forward to the layer decides before generating."""
        router = self.router
        if router is None:
            raise RuntimeError("wise: decide before an edit")
        shards = router.edit_shards if owners is not None else router.shards
        if not shards:
            return [0] * len(prompts)
        n = len(shards)
        decisions = [n] * len(prompts)
        for rows, _, x, orig, valid in self._layer_inputs(prompts):
            if owners is None:  # WISE-Retrieve over every shard (the router's rule)
                chosen = router.route(x, orig, valid)[1].tolist()
            else:  # one memory per edit: its own gate
                chosen = []
                for e, lo, hi in runs_of([owners[i] for i in rows]):
                    score = router.row_scores(router.token_distance(x[lo:hi], shards[e].weight, orig[lo:hi]),
                                              valid[lo:hi])
                    chosen += torch.where(score > shards[e].threshold * router.act_ratio, e, -1).tolist()
            for i, choice in zip(rows, chosen):
                decisions[i] = n if choice < 0 else int(choice)
        return decisions

    def _layer_inputs(self, prompts: Sequence[Prompt], targets: Sequence[str] | None = None
                      ) -> Iterator[tuple[list[int], Any, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per canonical batch of ``prompts`` (teacher-forced on ``targets`` when given): its prompt indices, the
        state entering the edited layer, the inner activations there, the original projection's output and the
        positions whose activation counts (the prompt's tokens, targets excluded); no grad."""
        a, layer, router = self.adapter, self._layer(), self._install()
        for rows, batch in (a.training_groups(list(prompts), targets) if prompts else []):
            with torch.no_grad():  # (not around the yield: the caller's code keeps its own grad mode)
                state = a.hidden_entering(batch, layer)
                x = self._inner_activations(state)
                valid = batch.attention_mask > 0
                if targets is not None:
                    valid = valid & (batch.labels == IGNORE_INDEX)
                orig = router.original(x)
            yield list(rows), state, x, orig, valid.float()


def _activation_loss(d_in: torch.Tensor, d_out: torch.Tensor | None, alpha: float, beta: float,
                     gamma: float) -> torch.Tensor:
    """WISE's activation terms (see the module docstring) for one edit's in-scope and out-of-scope scores."""
    zero = d_in.new_zeros(())
    in_term = _positive_mean(beta - d_in, zero)
    if d_out is None:
        return in_term
    margin = _positive_mean(d_out.view(-1, 1) - d_in.view(1, -1) + gamma, zero)
    return margin + _positive_mean(d_out - alpha, zero) + in_term


def _cached_tokens(kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache of a language-model call (0 for a prefill or a call without cache)."""
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    mask, embeds = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(embeds, torch.Tensor):
        return max(0, mask.shape[1] - embeds.shape[1])
    return 0


def _positive_mean(values: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 when none), as in WISE's hinge terms; no host sync (the count stays on the
    device)."""
    positive = values > 0
    count = positive.sum()
    return torch.where(count > 0, torch.where(positive, values, zero).sum() / count.clamp(min=1), zero)
