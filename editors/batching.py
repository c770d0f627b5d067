"""Several independent single edits in one pass (issue 12): per-edit parameter copies, per-edit forwards, per-edit
early stop, and one generation over all edits' items.

K single edits are independent problems. Each gets its own copy of the touched parameters, stacked on a leading
edit axis (:class:`StackedCopies`, fp32 masters ``[K, *shape]``); the model's own parameters are never changed.
The loss of the pass is the sum of the K per-edit losses, so the gradient with respect to copy k is exactly edit
k's own gradient; Adam (and SGD, RMSprop) are elementwise, so one optimizer step over the stacked copies equals K
separate steps. Early stopping is per edit (:func:`finetune_many`): once an edit's loss is below the threshold its
copy and its optimizer state stop changing (masked update) while the others go on. Every edit that is still
active has made the same number of updates, so one step counter serves all of them.

How a forward uses per-edit weights:

* :func:`~editors.models.generation.per_edit_audio_embeds` (FT-Audio): the connector runs once per edit, with that
  edit's copy swapped in, on that edit's audio states; the results go to ``adapter.input_embeds(batch,
  audio_embeds=...)``.
* :class:`RowRouting` (FT-LLM): every leaf module that owns touched parameters (the Linear and norm layers of the
  edited decoder layer) is temporarily wrapped so that each contiguous run of batch rows is computed with its
  edit's weights. Leaves act row by row, so this is exact, and it works inside ``model.generate`` (the KV cache
  sees the full batch as usual). A routed Linear writes its runs' outputs, and backward their input gradients,
  in place into one tensor (:func:`linear_runs`: the per-run kernels and bits, no join copied). Inside the graph
  engine's captured decode step (``row_edit`` set) a routed Linear computes every edit's output for all rows and
  keeps each row's own (each copy read once per step, one graph for every chunk).

Under autograd, a forward reads edit k's copy from the K views of one ``unbind(0)`` per step
(:func:`per_edit_views`), never as ``stacked[k]``: the backward of indexing writes a zero gradient of the whole
``[K, *shape]`` stack for every use and adds it to the others, so a step whose rows form R runs would move R full
stacks (quadratic in K). A step's copies in the model's dtype are cast and split in one autograd step
(:class:`CopyValues`), whose backward copies each view's gradient into its slice of the fp32 master's: the bits of
stacking the views' gradients and casting the stack, in one pass over them instead of two.

Generation of all K edits' items is the generation layer's per-edit strategy
(:class:`editors.models.generation.PerEdit`, through ``Editor.generate_many``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from editors.models import buckets
from editors.models.batch import LayerState, StopFlags, to_device
from editors.models.buckets import padded_rows
from editors.models.fused_layer import fused_layers_on, plain_rms_norm_eps, weighted_rms_norm
from editors.models.generation import PerEdit, per_edit_audio_embeds, runs_of  # noqa: F401 (the methods' per-edit helpers)
from editors.models.parameters import owner_of
from sake_core.errors import ConfigError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Per-edit copies and their optimisation
# ----------------------------------------------------------------------------------------------------------------


class StackedCopies:
    """Per-edit fp32 copies of named model parameters, stacked as ``[K, *shape]`` (all start at the current value).

    :meth:`current` gives the copies in the model's dtype (differentiable with respect to the fp32 masters), as
    :func:`editors.base.finetune` casts its fp32 masters back to 16-bit parameters after each step."""

    def __init__(self, params: Mapping[str, torch.Tensor], k: int) -> None:
        if not params:
            raise ValueError("StackedCopies needs at least one parameter")
        if k < 1:
            raise ValueError(f"StackedCopies needs k >= 1, got {k}")
        self.k = k
        self.dtypes = {n: p.dtype for n, p in params.items()}
        self.masters = {n: p.detach().float().unsqueeze(0).repeat(k, *([1] * p.dim())).requires_grad_(True)
                        for n, p in params.items()}

    @property
    def names(self) -> list[str]:
        return list(self.masters)

    def current(self) -> "CopyValues":
        """The copies in the model's dtype: ``[K, *shape]`` per name, and per edit (:class:`CopyValues`)."""
        return CopyValues(self)

    def edit(self, k: int) -> dict[str, torch.Tensor]:
        """Edit ``k``'s copy (model dtype, detached)."""
        return {n: m[k].detach().to(self.dtypes[n]) for n, m in self.masters.items()}

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.masters.values())


class CopyValues(Mapping[str, torch.Tensor]):
    """One step's values of :class:`StackedCopies` in the model's dtype, differentiable with respect to the fp32
    masters, in the two forms a forward reads them: as a mapping, name -> ``[K, *shape]`` (cast at first use);
    :meth:`per_edit`, name -> the K copies (what :func:`per_edit_views` hands a forward), whose backward writes each
    copy's gradient into its slice of the master's gradient (:class:`_CopiesInDtype`)."""

    def __init__(self, copies: StackedCopies) -> None:
        self._copies = copies
        self._stacked: dict[str, torch.Tensor] = {}
        self._per_edit: dict[str, tuple[torch.Tensor, ...]] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._stacked:
            master, dtype = self._copies.masters[name], self._copies.dtypes[name]
            self._stacked[name] = master if dtype == master.dtype else master.to(dtype)
        return self._stacked[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._copies.masters)

    def __len__(self) -> int:
        return len(self._copies.masters)

    def per_edit(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Name -> the K copies ``[*shape]`` in the model's dtype."""
        if self._per_edit is None:
            self._per_edit = {}
            for name, master in self._copies.masters.items():
                dtype = self._copies.dtypes[name]
                self._per_edit[name] = (master.unbind(0) if dtype == master.dtype
                                        else _CopiesInDtype.apply(master, dtype))
        return self._per_edit


class _CopiesInDtype(torch.autograd.Function):
    """The K copies of a stacked master ``[K, *shape]`` in ``dtype``: forward ``master.to(dtype).unbind(0)``;
    backward each copy's gradient copied into its slice of one gradient in the master's dtype (zeros where a copy
    got none). The bits are those of the cast and ``unbind`` under autograd, whose backward stacks the K gradients
    in ``dtype`` and then casts the stack: two passes over the gradients of every step where this takes one."""

    @staticmethod
    def forward(ctx: Any, master: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused copy's gradient stays None: its slice is zeroed, not copied
        ctx.master_dtype, ctx.shape = master.dtype, master.shape
        return master.to(dtype).unbind(0)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        given = next((g for g in grads if g is not None), None)
        if given is None:
            return None, None
        out = given.new_empty(ctx.shape, dtype=ctx.master_dtype)
        for k, grad in enumerate(grads):
            if grad is None:
                out[k].zero_()
            else:
                out[k].copy_(grad)
        return out, None


@dataclass
class EditResult:
    steps: int  # optimizer updates made to this edit's copy
    loss: float  # its last loss computed (below the threshold when stopped early)
    stopped_early: bool


def masked_update(masters: list[torch.Tensor], grads: list[torch.Tensor | None], states: list[dict[str, Any]],
                   mask: torch.Tensor, step: int | torch.Tensor, *, optimizer: str, lr: float, weight_decay: float,
                   all_active: bool = False) -> None:
    """One optimizer step applied only to the edits where ``mask`` is True (their state updated, others frozen).

    The formulas are torch.optim's defaults (Adam betas 0.9/0.999, eps 1e-8; RMSprop alpha 0.99, eps 1e-8; plain
    SGD), elementwise over the stacked copies, in place. The frozen edits' values are saved and put back, except
    where Adam runs as the fused kernel (:func:`fused_adam`), which skips them itself. ``all_active`` (the caller
    knows every entry of ``mask`` is True) skips both. ``step`` (the update's number, from 1) may be a device tensor
    where Adam runs fused (a captured step reads it there); the formulas take a number."""
    frozen = None
    for p, g, st in zip(masters, grads, states):
        if g is None:
            continue
        g = g.float()
        tensors = [p, *_optimizer_state(st, p, optimizer)]
        if fused_adam(optimizer, p):  # the kernel itself skips the frozen edits: nothing to save and restore
            if frozen is None and not all_active:
                frozen = (~mask).float()
            _fused_adam_step(p, g, st, step, lr=lr, weight_decay=weight_decay, frozen=frozen)
            continue
        saved = None if all_active else [t.clone() for t in tensors]
        if weight_decay:
            g = g.add(p, alpha=weight_decay)
        _step_in_place(p, g, st, step, optimizer=optimizer, lr=lr)
        if saved is not None:
            m = mask.view(-1, *([1] * (p.dim() - 1)))
            for t, old in zip(tensors, saved):
                t.copy_(torch.where(m, t, old))


def _optimizer_state(st: dict[str, Any], p: torch.Tensor, optimizer: str) -> list[torch.Tensor]:
    """The optimizer's per-entry state tensors of ``p`` (created at zero on the first step only: a zeroed copy of
    ``p`` made at every step, as ``setdefault``'s argument would be, costs a full write of the fp32 copies per
    moment and step)."""
    names = {"sgd": (), "adam": ("exp_avg", "exp_avg_sq"), "rmsprop": ("square_avg",)}.get(optimizer)
    if names is None:
        raise ConfigError(f"unknown optimizer {optimizer!r}; expected adam, sgd or rmsprop")
    for name in names:
        if name not in st:
            st[name] = torch.zeros_like(p)
    return [st[name] for name in names]


def fused_adam(optimizer: str, tensor: torch.Tensor) -> bool:
    """Whether Adam steps on ``tensor`` run as torch's fused kernel: on CUDA, where one kernel reads the parameter,
    gradient and both moments once and writes them once (the formulas below take ~3x the memory traffic). One edit's
    loop (``editors.base.finetune``: ``torch.optim.Adam(fused=True)``) and K edits' (:func:`masked_update`) take the
    same kernel there, so each element gets the same arithmetic either way. The CPU keeps the formulas below, which
    equal torch's single-tensor Adam bit for bit."""
    return optimizer == "adam" and tensor.device.type == "cuda"


def _fused_adam_step(p: torch.Tensor, g: torch.Tensor, st: dict[str, Any], step: int | torch.Tensor, *, lr: float,
                     weight_decay: float, frozen: torch.Tensor | None = None) -> None:
    """One fused Adam step (torch.optim's defaults) on every entry of ``p`` and its state, in place; with ``frozen``
    (``[K]`` floats on the device, 1 = frozen) one kernel per edit that skips a frozen edit's entries (the kernel's
    ``found_inf``, which a gradient scaler sets to skip a step): the host need not know which edits are frozen."""
    count = st.get("step")
    if count is None:
        count = st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    if isinstance(step, torch.Tensor):
        count.copy_(step)
    else:
        count.fill_(step)

    def step_of(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                skip: torch.Tensor | None) -> None:
        torch._fused_adam_([p], [g], [m], [v], [], [count], lr=lr, beta1=0.9, beta2=0.999, weight_decay=weight_decay,
                           eps=1e-8, amsgrad=False, maximize=False, found_inf=skip)

    if frozen is None:
        step_of(p, g, st["exp_avg"], st["exp_avg_sq"], None)
        return
    for k in range(p.shape[0]):
        step_of(p[k], g[k], st["exp_avg"][k], st["exp_avg_sq"][k], frozen[k])


def _step_in_place(p: torch.Tensor, g: torch.Tensor, st: dict[str, Any], step: int | torch.Tensor, *,
                   optimizer: str, lr: float) -> None:
    """One step of ``optimizer`` on every entry of ``p`` and its state, in place (Adam's ``step`` a number)."""
    if optimizer == "sgd":
        p.sub_(lr * g)
    elif optimizer == "adam":
        if isinstance(step, torch.Tensor):
            raise ValueError("Adam's formulas take the step number as a number, not a tensor")
        b1, b2, eps = 0.9, 0.999, 1e-8
        exp_avg = st["exp_avg"].lerp_(g, 1 - b1)
        exp_avg_sq = st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = lr / (1 - b1 ** step)
        denom = (exp_avg_sq.sqrt() / ((1 - b2 ** step) ** 0.5)).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
    else:  # rmsprop
        alpha, eps = 0.99, 1e-8
        square_avg = st["square_avg"].mul_(alpha).addcmul_(g, g, value=1 - alpha)
        p.addcdiv_(g, square_avg.sqrt().add_(eps), value=-lr)


def early_stop_on_device(device: torch.device) -> bool:
    """Whether :func:`finetune_many` decides its early stops on ``device`` (CUDA): which edits stopped is kept there
    and read back after the loop, so a step waits for no loss on the host and the host queues the next step's
    kernels while the GPU runs this one. On the CPU the losses are read each step (no device to wait for)."""
    return device.type == "cuda"


def finetune_many(copies: StackedCopies, losses_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], *, lr: float,
                  max_steps: int, early_stop_loss: float | None = None, optimizer: str = "adam",
                  weight_decay: float = 0.0) -> list[EditResult]:
    """K edits' :func:`editors.base.finetune` at once: ``losses_fn(copies.current())`` returns the K per-edit
    losses ``[K]``; each edit follows exactly the single-edit loop (loss, then stop if below ``early_stop_loss``,
    else one update), its own copy updated with its own gradient. Without an early stop no host sync per step (the
    losses are read after the last step); with one, see :func:`early_stop_on_device`."""
    if optimizer not in ("adam", "sgd", "rmsprop"):
        raise ConfigError(f"unknown optimizer {optimizer!r}; expected adam, sgd or rmsprop")
    masters = list(copies.masters.values())
    if early_stop_loss is not None and early_stop_on_device(masters[0].device):
        return _finetune_many_on_device(copies, losses_fn, lr=lr, max_steps=max_steps,
                                        early_stop_loss=early_stop_loss, optimizer=optimizer,
                                        weight_decay=weight_decay)
    k = copies.k
    states: list[dict[str, Any]] = [{} for _ in masters]
    active = [True] * k
    steps, last, stopped = [0] * k, [float("nan")] * k, [False] * k
    updates = 0
    latest: torch.Tensor | None = None  # without an early stop: the last losses, read once at the end
    mask: torch.Tensor | None = None  # ``active`` on the device, made again only when an edit stops
    for _ in range(max_steps):
        losses = _checked(losses_fn(copies.current()), k)
        if early_stop_loss is None:  # every edit runs every step: nothing to decide on the host
            latest = losses.detach()
        else:
            values = losses.detach().float().cpu().tolist()  # host sync: the early-stop check (one per step)
            for i in range(k):
                if active[i]:
                    last[i] = values[i]
                    if values[i] < early_stop_loss:
                        active[i], stopped[i], mask = False, True, None
            if not any(active):
                break
        if mask is None:
            mask = to_device(torch.tensor(active), losses.device)
        # the stopped edits' losses weighted 0, not dropped by a boolean index (a host sync): the same gradients
        objective = losses.sum() if all(active) else (losses * mask).sum()
        grads = torch.autograd.grad(objective, masters, allow_unused=True)
        updates += 1
        with torch.no_grad():
            masked_update(masters, list(grads), states, mask, updates, optimizer=optimizer, lr=lr,
                           weight_decay=weight_decay, all_active=all(active))
        for i in range(k):
            steps[i] += active[i]
    if latest is not None:
        last = latest.float().cpu().tolist()
    for m in masters:
        m.requires_grad_(False)
    return [EditResult(steps=s, loss=v, stopped_early=x) for s, v, x in zip(steps, last, stopped)]


def _checked(losses: torch.Tensor, k: int) -> torch.Tensor:
    if losses.shape != (k,):
        raise ValueError(f"losses_fn returned shape {tuple(losses.shape)}; expected ({k},)")
    return losses


def _finetune_many_on_device(copies: StackedCopies, losses_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], *,
                             lr: float, max_steps: int, early_stop_loss: float, optimizer: str,
                             weight_decay: float) -> list[EditResult]:
    """:func:`finetune_many` with its early stops decided on the device: each edit's active flag, update count and
    last loss are device tensors, a stopped edit's loss is weighted 0 and its update skipped (as on the host path),
    and whether any edit is still active is copied back without waiting; the loop ends at the first look (before
    and after each step's forward) that finds a copy arrived saying none is (the steps run after the last edit
    stopped change nothing). The results are the host path's, bit for bit."""
    k = copies.k
    masters = list(copies.masters.values())
    device = masters[0].device
    states: list[dict[str, Any]] = [{} for _ in masters]
    active = torch.ones(k, dtype=torch.bool, device=device)
    steps = torch.zeros(k, dtype=torch.long, device=device)
    last = torch.full((k,), float("nan"), device=device)
    number = StepNumber(optimizer, masters)
    stopped = StopFlags()  # "every edit has stopped", read back without waiting

    def forward() -> torch.Tensor:
        return _checked(losses_fn(copies.current()), k)

    def update(losses: torch.Tensor) -> None:  # in place on the tensors above
        values = losses.detach().float()
        last.copy_(torch.where(active, values, last))
        active.logical_and_(~(values < early_stop_loss))
        grads = torch.autograd.grad((losses * active).sum(), masters, allow_unused=True)
        with torch.no_grad():
            masked_update(masters, list(grads), states, active, number.next(), optimizer=optimizer, lr=lr,
                          weight_decay=weight_decay)
        steps.add_(active)

    for _ in range(max_steps):
        if stopped.seen():
            break
        losses = forward()
        if stopped.seen():  # arrived while this step's forward was queued: its backward and update are not needed
            break
        update(losses)
        stopped.push(~active.any())
    for m in masters:
        m.requires_grad_(False)
    ran, losses_out, active_out = steps.tolist(), last.tolist(), active.tolist()  # one host sync, after the loop
    return [EditResult(steps=s, loss=v, stopped_early=not a) for s, v, a in zip(ran, losses_out, active_out)]


class StepNumber:
    """The number (from 1) of the update a training step makes, as the optimizer reads it: a device tensor where
    every parameter's Adam runs fused or the optimizer has no step count (:attr:`on_device`: no host number enters
    a step), else a host number (Adam's formulas)."""

    def __init__(self, optimizer: str, params: Sequence[torch.Tensor]) -> None:
        self.on_device = all(optimizer != "adam" or fused_adam(optimizer, p) for p in params)
        self._tensor = torch.zeros((), dtype=torch.float32, device=params[0].device)
        self._count = 0

    def next(self) -> int | torch.Tensor:
        """Count one update; its number."""
        if self.on_device:
            self._tensor.add_(1)
            return self._tensor
        self._count += 1
        return self._count


# ----------------------------------------------------------------------------------------------------------------
# Rows entering one trained layer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LayerRows:
    """Rows entering one LLM layer that is trained on them: each row's edit (``owner``), the state, the layer's
    target output (fp32) and, per loss term, the term's valid positions ``[R, W, 1]`` (fp32 0/1)."""

    owner: list[int]
    state: LayerState
    target: torch.Tensor
    terms: list[tuple[int, torch.Tensor]]


def packed_layer_rows(adapter: Any, layer: int, groups: Sequence[LayerRows]) -> list[LayerRows]:
    """``groups`` (left-padded rows of one sequence each) repacked where :data:`~editors.models.buckets.PACK_TRAINING`
    says so for the device and the adapter can (``adapter.packed_state``): each edit's sequences back to back in
    rows of its own (edits in order), each sequence attending within itself at its own positions. Where the adapter
    reads packed rows through the variable-length kernel (``adapter.packs_sequences()``: CUDA) an edit's sequences
    run on from one row into the next, in rows of the training width step, so only its last row ends in padding;
    elsewhere each sequence stays within a row as wide as the widest sequence's training bucket (first fit, longest
    first). A layer's output on a sequence is then its output in its own row, and a term's loss sums the same
    positions; otherwise ``groups`` come back as they are. (One host sync: the sequences' lengths.)"""
    device = torch.device(adapter.device)
    if not groups or not buckets.PACK_TRAINING.get(device.type, False):
        return list(groups)
    sequences: list[tuple[int, int, int, int, int]] = []  # (owner, term, group, row, length)
    for g, group in enumerate(groups):
        if len(group.terms) != 1:
            raise ValueError(f"packed_layer_rows: group {g} holds {len(group.terms)} terms; expected one")
        term = group.terms[0][0]
        lengths = group.state.batch.attention_mask.sum(-1).tolist()
        sequences += [(owner, term, g, row, int(n)) for row, (owner, n) in enumerate(zip(group.owner, lengths))]
    streams = adapter.packs_sequences()
    step = buckets.training_width_step(device)
    width = step if streams else buckets.width_bucket(max(s[4] for s in sequences), device, step)
    # where each edit's sequences (longest first) go: their first columns in the rows read as one stream
    rows: list[int] = []  # each row's edit
    laid: list[tuple[tuple[int, int, int, int, int], int]] = []  # (sequence, its first column)
    for owner in sorted({s[0] for s in sequences}):
        own = sorted((s for s in sequences if s[0] == owner), key=lambda s: -s[4])
        if streams:  # back to back from the edit's first row on; its last row ends in padding
            first_row, column = len(rows), 0
            for seq in own:
                laid.append((seq, first_row * width + column))
                column += seq[4]
            rows += [owner] * -(-column // width)
            continue
        bins: list[list[tuple[int, int, int, int, int]]] = []
        free: list[int] = []
        for seq in own:
            fits = next((b for b, room in enumerate(free) if room >= seq[4]), None)
            if fits is None:
                bins.append([seq])
                free.append(width - seq[4])
            else:
                bins[fits].append(seq)
                free[fits] -= seq[4]
        for seqs in bins:  # each row right-aligned: its padding first
            column = (len(rows) + 1) * width - sum(s[4] for s in seqs)
            for seq in seqs:
                laid.append((seq, column))
                column += seq[4]
            rows.append(owner)
    first = groups[0].state.hidden
    size, device = first.shape[-1], first.device
    segments = torch.full((len(rows) * width,), -1, dtype=torch.long)
    positions = torch.zeros(len(rows) * width, dtype=torch.long)
    terms = sorted({s[1] for s in sequences})
    # where each sequence's columns come from (its group's flattened rows) and go (the packed rows, flattened):
    # one gather and one scatter per group instead of a copy per sequence
    sources: dict[int, list[np.ndarray]] = {g: [] for g in range(len(groups))}
    places: dict[int, list[np.ndarray]] = {g: [] for g in range(len(groups))}
    marked: dict[int, list[np.ndarray]] = {t: [] for t in terms}
    for number, ((_, term, g, row, length), column) in enumerate(laid):  # numbers distinct over the pass
        source_width = groups[g].state.hidden.shape[1]
        sources[g].append(np.arange((row + 1) * source_width - length, (row + 1) * source_width))
        places[g].append(np.arange(column, column + length))
        marked[term].append(places[g][-1])
        segments[column:column + length] = number
        positions[column:column + length] = torch.arange(length)
    segments, positions = segments.view(len(rows), width), positions.view(len(rows), width)
    hidden = first.new_zeros(len(rows) * width, size)
    target = torch.zeros(len(rows) * width, size, dtype=torch.float32, device=device)
    for g, group in enumerate(groups):
        if sources[g]:
            taken = to_device(torch.from_numpy(np.concatenate(sources[g])), device)
            put = to_device(torch.from_numpy(np.concatenate(places[g])), device)
            hidden.index_copy_(0, put, group.state.hidden.reshape(-1, size).index_select(0, taken))
            target.index_copy_(0, put, group.target.reshape(-1, size).index_select(0, taken))
    valid = {t: torch.zeros(len(rows) * width, 1, dtype=torch.float32, device=device) for t in terms}
    for t in terms:
        valid[t].index_fill_(0, to_device(torch.from_numpy(np.concatenate(marked[t])), device), 1.0)
    hidden, target = hidden.view(len(rows), width, size), target.view(len(rows), width, size)
    valid = {t: v.view(len(rows), width, 1) for t, v in valid.items()}
    state = adapter.packed_state(layer, hidden, segments, positions)
    if state is None:
        return list(groups)
    return [LayerRows(owner=rows, state=state, target=target, terms=[(t, valid[t]) for t in terms])]


# ----------------------------------------------------------------------------------------------------------------
# Forwards with per-edit weights
# ----------------------------------------------------------------------------------------------------------------


def per_edit_views(stacked: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Name -> the K per-edit views of each ``[K, *shape]`` tensor (``unbind(0)``): how a forward under autograd
    reads edit k's copy (see the module docstring: indexing the stack per use is quadratic in K). For a step's
    :class:`CopyValues`, its per-edit copies (cast and split in one step whose backward writes the masters'
    gradients directly)."""
    if isinstance(stacked, CopyValues):
        return stacked.per_edit()
    return {name: tensor.unbind(0) for name, tensor in stacked.items()}


class _RoutedLeaf(nn.Module):
    """Runs ``leaf`` once per contiguous run of batch rows with that run's edit weights (see :class:`RowRouting`).

    A plain RMSNorm leaf computes, where the decoder layers run fused (``editors.models.fused_layer``: CUDA), by
    :func:`~editors.models.fused_layer.weighted_rms_norm` with the edit's weight, as the unrouted norms of those layers
    do (one normalising kernel instead of the Hugging Face module's eight over fp32 copies); elsewhere its own
    forward."""

    def __init__(self, leaf: nn.Module, names: dict[str, str], routing: "RowRouting") -> None:
        super().__init__()
        self.leaf = leaf
        self.names = names  # local parameter name -> full name
        self.routing = routing
        self.rms_eps = plain_rms_norm_eps(leaf)  # a plain RMSNorm leaf's epsilon, else None

    def _run(self, params: dict[str, torch.Tensor], x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The leaf's output for ``x`` with ``params`` (one edit's values of its parameters)."""
        if self.rms_eps is not None and not args and not kwargs and fused_layers_on(x.device):
            return weighted_rms_norm(params["weight"], self.rms_eps, x)
        return torch.func.functional_call(self.leaf, params, (x, *args), kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        row_edit = self.routing.row_edit
        if row_edit is not None:  # the graph engine's decode step: one captured graph for every chunk and K
            return self._gathered(x, row_edit, args, kwargs)
        runs = self.routing.runs
        if not runs or runs[-1][2] != x.shape[0]:
            raise RuntimeError(f"row routing covers {runs[-1][2] if runs else 0} rows, input has {x.shape[0]}")
        w = {local: self.routing.views[full] for local, full in self.names.items()}
        # Each run with its edit's weights through the op one edit alone uses (same bits); a Linear's runs written
        # in place where they can be (linear_runs), over at least MIN_ROWS rows each (editors/models/buckets.py)
        if isinstance(self.leaf, nn.Linear) and not args and not kwargs:
            linear = linear_runs if len(runs) > 1 and x.is_contiguous() else linear_per_run
            return linear(x, runs, w["weight"], w.get("bias"))
        outs = []
        for (k, _, _), piece in zip(runs, _run_pieces(x, runs)):
            outs.append(self._run({n: t[k] for n, t in w.items()}, piece, args, kwargs))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _gathered(self, x: torch.Tensor, row_edit: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Every edit's output over all rows (each edit's copy read once), then each row's own edit's: static
        shapes, no host work (row ``r`` belongs to edit ``row_edit[r]``)."""
        w = {local: self.routing.views[full] for local, full in self.names.items()}
        k = len(next(iter(w.values())))
        linear = isinstance(self.leaf, nn.Linear) and not args and not kwargs
        outs = []
        for e in range(k):
            params = {n: t[e] for n, t in w.items()}
            if linear:
                outs.append(nn.functional.linear(x, params["weight"], params.get("bias")))
            else:
                outs.append(self._run(params, x, args, kwargs))
        return torch.stack(outs)[row_edit, torch.arange(x.shape[0], device=x.device)]


def _run_pieces(x: torch.Tensor, runs: Sequence[tuple[int, int, int]]) -> Sequence[torch.Tensor]:
    """The rows of each run of ``x`` as one split, not ``x[a:b]`` per run (a slice's backward writes a zero
    gradient of all of ``x``)."""
    return x.split([b - a for _, a, b in runs]) if len(runs) > 1 else (x,)


def linear_per_run(x: torch.Tensor, runs: Sequence[tuple[int, int, int]], weights: Sequence[torch.Tensor],
                   biases: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """``F.linear`` of each run ``(k, a, b)`` of ``x``'s rows (its first dimension) with ``weights[k]`` (and
    ``biases[k]``), each run over at least ``MIN_ROWS`` flattened rows (:func:`~editors.models.buckets.padded_rows`:
    a decode step's few rows of one edit take the path of many), the runs' outputs joined."""
    outs = []
    for (k, _, _), piece in zip(runs, _run_pieces(x, runs)):
        weight, bias = weights[k], (biases[k] if biases is not None else None)
        outs.append(padded_rows(lambda rows: nn.functional.linear(rows, weight, bias), piece))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def linear_runs(x: torch.Tensor, runs: Sequence[tuple[int, int, int]], weights: Sequence[torch.Tensor],
                biases: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """:func:`linear_per_run` for a contiguous ``x``, with the same bits, each run's output written in place into
    one tensor and, backward, each run's input gradient into one tensor: no join copied forward, none backward
    (:class:`_LinearRuns`). Every routed Linear over several runs takes it: FT-LLM's and UnKE's training steps, and
    the prefill of generations routed per edit (their per-edit copies, WISE's memories)."""
    per_row = x[0].numel() // x.shape[-1] if x.shape[0] else 0
    bounds = tuple((a * per_row, b * per_row) for _, a, b in runs)
    params = [weights[k] for k, _, _ in runs] + ([biases[k] for k, _, _ in runs] if biases is not None else [])
    out = _LinearRuns.apply(x.reshape(-1, x.shape[-1]), bounds, biases is not None, *params)
    return out.view(*x.shape[:-1], out.shape[-1])


class _LinearRuns(torch.autograd.Function):
    """:func:`linear_runs` on flattened rows ``x`` [N, in]: runs ``bounds`` ((start, stop) row ranges), their
    weights, then (``has_bias``) their biases. Forward and backward call the kernels that ``F.linear`` and its
    autograd call on each run (``addmm`` or ``mm``; the input gradient ``grad @ W``, the weight's ``grad^T @ x``,
    the bias's ``grad.sum(0)``), so every value has the bits of the per-run path; only where they are written
    differs. A run of fewer than ``MIN_ROWS`` rows computes over its zero-padded rows, as that path does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bounds: tuple[tuple[int, int], ...], has_bias: bool,
                *params: torch.Tensor) -> torch.Tensor:
        n = len(bounds)
        weights, biases = params[:n], (params[n:] if has_bias else (None,) * n)
        out = x.new_empty(x.shape[0], weights[0].shape[0])
        for (a, b), weight, bias in zip(bounds, weights, biases):
            small = b - a < buckets.MIN_ROWS
            source = buckets.to_min_rows(x[a:b]) if small else x[a:b]
            target = None if small else out[a:b]  # a small run's product lands in a padded tensor, then its rows
            y = (torch.mm(source, weight.t(), out=target) if bias is None
                 else torch.addmm(bias, source, weight.t(), out=target))
            if small:
                out[a:b] = y[:b - a]
        ctx.bounds, ctx.has_bias = bounds, has_bias
        ctx.save_for_backward(x, *weights)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        bounds, has_bias = ctx.bounds, ctx.has_bias
        n = len(bounds)
        grad = grad.contiguous()
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        grad_w: list[torch.Tensor | None] = [None] * n
        grad_b: list[torch.Tensor | None] = [None] * n
        for i, ((a, b), weight) in enumerate(zip(bounds, weights)):
            small = b - a < buckets.MIN_ROWS
            g = buckets.to_min_rows(grad[a:b]) if small else grad[a:b]
            if grad_x is not None:
                if small:
                    grad_x[a:b] = g.mm(weight)[:b - a]
                else:
                    torch.mm(g, weight, out=grad_x[a:b])
            if ctx.needs_input_grad[3 + i]:
                grad_w[i] = g.t().mm(buckets.to_min_rows(x[a:b]) if small else x[a:b])
            if has_bias and ctx.needs_input_grad[3 + n + i]:
                grad_b[i] = g.sum(0)
        return (grad_x, None, None, *grad_w, *(grad_b if has_bias else []))


class RowRouting:
    """While installed (``with routing.installed():``), every leaf module of ``model`` owning one of ``names``
    computes batch rows ``a:b`` with edit k's weights (:meth:`set_weights`) for each run ``(k, a, b)`` of
    :attr:`runs`.

    Exact for leaves that act on each batch row independently (Linear, RMSNorm, LayerNorm: all parameters of a
    decoder layer); the weights and ``runs`` may be set again between forwards. While ``row_edit`` (a device tensor
    ``[rows]``) is set, rows are routed by it instead (the graph engine's decode step)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.views: dict[str, tuple[torch.Tensor, ...]] = {}  # full name -> edit k's value at [k]
        self.runs: list[tuple[int, int, int]] = []
        self.row_edit: torch.Tensor | None = None

    def set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """The K edits' stacked values (full name -> ``[K, ...]``) the routed leaves compute with, read through
        their per-edit views (:func:`per_edit_views`, taken here once)."""
        self.views = per_edit_views(weights)

    @contextlib.contextmanager
    def installed(self) -> Iterator["RowRouting"]:
        leaves: dict[str, dict[str, str]] = {}
        for name in self.names:
            path, _, attr = name.rpartition(".")
            leaves.setdefault(path, {})[attr] = name
        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for path, names in leaves.items():
                leaf = self.model.get_submodule(path)
                parent, attr = owner_of(self.model, path)
                if set(dict(leaf.named_parameters(recurse=True))) != set(names):
                    raise ValueError(f"row routing needs every parameter of {path} in the copies; it has "
                                     f"{sorted(dict(leaf.named_parameters()))}")
                replaced.append((parent, attr, leaf))
                setattr(parent, attr, _RoutedLeaf(leaf, names, self))
            yield self
        finally:
            for parent, attr, leaf in reversed(replaced):
                setattr(parent, attr, leaf)


@contextlib.contextmanager
def routed_weights(model: nn.Module, weights: Mapping[str, torch.Tensor] | None, method: str,
                   prompts_per_edit: Sequence[Sequence[Any]]) -> Iterator[PerEdit]:
    """Generation over K edits' prompts where each row computes with its own edit's ``weights`` (full parameter
    name -> ``[K, *shape]``, model dtype; every parameter of each routed leaf): the ``per_edit`` of a method whose
    ``apply_many`` keeps per-edit parameter values."""
    if weights is None:
        raise RuntimeError(f"{method}: generate_many before apply_many")
    routing = RowRouting(model, list(weights))
    routing.set_weights({n: w.detach() for n, w in weights.items()})
    with routing.installed():
        yield PerEdit.of(prompts_per_edit, routing=routing)


@contextlib.contextmanager
def routed_copies(model: nn.Module, copies: StackedCopies | None, method: str,
                  prompts_per_edit: Sequence[Sequence[Any]]) -> Iterator[PerEdit]:
    """:func:`routed_weights` with the current values of ``copies`` (the ``per_edit`` of a method whose
    ``apply_many`` trains :class:`StackedCopies`)."""
    if copies is None:
        raise RuntimeError(f"{method}: generate_many before apply_many")
    with routed_weights(model, copies.current(), method, prompts_per_edit) as per_edit:
        yield per_edit
