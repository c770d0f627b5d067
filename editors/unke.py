"""UnKE (Deng et al., 2025): unstructured knowledge editing of one LLM layer (paper §4.1, App. D, Table 6).

Stage 1 (v_step steps at v_lr, Adam): find a new *key* — the output of the chosen layer ``L`` at the last prompt
token — by optimising a residual ``delta`` added to that hidden state so that the layers above produce the target
answer (teacher-forced target loss, a small ``v_weight_decay * |delta| / |key|^2`` term, ``delta`` projected into an
L2 ball of radius ``clamp_norm_factor * |key|``).

Stage 2 (optim_step steps at optim_lr, Adam): update *all* parameters of layer ``L`` (attention and FFN: UnKE treats
the whole layer as the key generator) so that, on the edit prompt, its output equals the original output with the
new key at the last prompt token, and, on preservation prompts, its output stays the original one (mean squared
error over the valid positions of each batch, the two terms summed).

Preservation data (Table 6: 20 text + 5 audio prompts per edit, :func:`editors.preservation.preservation_prompts`): locality items of
*other instances of the train split* (text locality = MMLU questions, audio locality = other audio/attributes),
drawn with a per-edit seeded RNG from every attribute config (``preserve_source: train``). Audio items whose label
is the edit's original or target label are skipped. The train split keeps the test split's evaluated items out of
the edit; without dataset access (``RunContext.load_rows`` is None) that is an error. With ``preserve_source:
instance`` the edit instance's own locality items are used (out of scope by construction, but scored for locality).

Both stages run only what changes: the hidden states entering the edited layer are computed once per edit
(``adapter.hidden_entering``); stage 1 runs the layers above ``L`` over the columns from the last prompt token on
(``adapter.tail_state``: the residual cannot change the earlier ones, whose keys and values are computed once),
stage 2 runs layer ``L`` alone.

Several edits per pass (:meth:`UnKE.apply_many`, ``--edits-per-pass K``): the K edits' stage 1 is one batch (a delta
per edit, each edit's loss from its own row, per-edit early stop and norm clamp) and stage 2 trains one fp32 copy of
layer ``L`` per edit (``editors/batching.py``: the edit's rows run its copy; each edit's loss is its own two MSE
terms over its own rows, as alone); the model is unchanged and generation routes each item to its edit's copy.
Batches have canonical shapes (``editors/models/buckets.py``), so on the CPU each edit gets the same result whatever
K is. On CUDA stage 1 puts every edit's row in one batch (its steps are launch-bound) and stage 2 lays each edit's
26 sequences back to back, running on from row to row, in rows of its own (``packed_layer_rows``: one sequence per
row left the short text prompts half padding, and sequences kept within rows still ~1.2x), which attend through
the variable-length flash kernel (``PackedSequences.over_rows``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence, cast

import torch

from editors.base import EditRequest, Editor, finetune
from editors.batching import (LayerRows, RowRouting, StackedCopies, StepNumber, finetune_many, masked_update,
                              packed_layer_rows, routed_copies, runs_of)
from editors.hparams import Hparams
from editors.models.base import LayerState, PerEdit, Prompt, PromptBatch
from editors.preservation import editor_preservation
from editors.registry import register

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Small tensor helpers
# ----------------------------------------------------------------------------------------------------------------


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the valid (mask=1) positions of [B, T, H] tensors, in fp32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    diff = (pred.float() - target.float()) ** 2 * m
    return diff.sum() / (m.sum() * pred.shape[-1]).clamp(min=1.0)


def _valid(batch: PromptBatch) -> torch.Tensor:
    """``[B, T, 1]`` fp32: 1 on the batch's valid (non-padding) positions."""
    return batch.attention_mask.to(torch.float32).unsqueeze(-1)


def last_prompt_positions(batch: PromptBatch) -> torch.Tensor:
    """Column of the last prompt token of each row of a batch prepared with targets (it predicts the first target
    token)."""
    if batch.target_rows is None or batch.target_cols is None:
        raise ValueError("last_prompt_positions needs a batch prepared with targets")
    first = torch.full((batch.batch_size,), batch.input_ids.shape[1], dtype=torch.long, device=batch.input_ids.device)
    return first.scatter_reduce(0, batch.target_rows, batch.target_cols, reduce="amin")


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class UnKEHparams(Hparams):
    """See the module docstring: stage 1 (``v_*``, ``clamp_norm_factor``), stage 2 (``optim_*``,
    ``weight_decay``), preservation prompts (``preserve_*``) and the edited ``layer``."""

    bounds = {"v_steps": "positive", "v_lr": "positive", "v_weight_decay": "non_negative",
              "clamp_norm_factor": "positive", "v_early_stop_loss": "non_negative", "optim_steps": "positive",
              "optim_lr": "positive", "optim_early_stop_loss": "non_negative", "weight_decay": "non_negative",
              "preserve_text": "non_negative", "preserve_audio": "non_negative"}

    v_steps: int
    v_lr: float
    v_weight_decay: float
    clamp_norm_factor: float
    v_early_stop_loss: float | None
    optim_steps: int
    optim_lr: float
    optim_early_stop_loss: float | None
    weight_decay: float
    preserve_text: int
    preserve_audio: int
    preserve_source: str
    layer: int


@register("unke")
class UnKE(Editor):
    """UnKE on LLM layer ``hparams.layer`` (see the module docstring for the hyperparameters)."""

    hparams_class = UnKEHparams
    hparams: UnKEHparams
    batches_edits = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._copies: StackedCopies | None = None

    def _layer(self) -> int:
        return self.adapter.resolve_layer(self.hparams.layer)

    def touched_parameters(self) -> list[str]:
        return self.adapter.parameter_names(self.adapter.llm_layer(self._layer()))

    def _stage_one_frame(self, batch: PromptBatch) -> tuple[LayerState, torch.Tensor, torch.Tensor]:
        """What stage 1 optimises from, for a batch prepared with targets: the state leaving the edited layer cut to
        the columns from the rows' last prompt token on (``adapter.tail_state``: the residual changes nothing
        before it), the residual's position ``[B, T, 1]`` (1 at each row's last prompt token) and the keys there
        ``[B, hidden]`` (fp32)."""
        a = self.adapter
        full = a.hidden_entering(batch, self._layer() + 1)  # the edited layer's output = what enters the next one
        pos = last_prompt_positions(batch)
        rows = torch.arange(batch.batch_size, device=pos.device)
        keys = full.hidden[rows, pos].detach().float()
        state = a.tail_state(full, int(pos.min()))
        onehot = torch.zeros(state.hidden.shape[:2], dtype=torch.float32, device=state.hidden.device)
        onehot[rows, pos - state.first_column] = 1.0
        return state, onehot.unsqueeze(-1), keys

    def compute_key(self, edit: EditRequest) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage 1: the new key (layer output at the last prompt token) that makes the model produce the target."""
        a, hp = self.adapter, self.hparams
        state, onehot, keys = self._stage_one_frame(a.prepare([edit.prompt()], [edit.target]))
        key0 = keys[0]
        delta = torch.zeros_like(key0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        max_norm = hp.clamp_norm_factor * float(key0.norm())
        wd = hp.v_weight_decay
        nll = torch.tensor(float("nan"))
        steps = 0
        for _ in range(hp.v_steps):
            hidden = state.hidden + (onehot * delta).to(state.hidden.dtype)
            nll = a.loss_from(state, hidden)
            if hp.v_early_stop_loss is not None and float(nll.detach()) < hp.v_early_stop_loss:
                break
            loss = nll + wd * delta.norm() / key0.norm().clamp(min=1e-6) ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
        with torch.no_grad():
            final = a.loss_from(state, state.hidden + (onehot * delta).to(state.hidden.dtype))
        stats = {"v_steps": steps, "v_loss": float(final), "delta_norm": float(delta.detach().norm())}
        return key0 + delta.detach(), stats

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        a, hp, layer = self.adapter, self.hparams, self._layer()
        key, stats = self.compute_key(edit)
        # Stage 2 inputs: the edit prompt (no target) and the preservation prompts, entering layer L.
        prompt_batch = a.prepare([edit.prompt()])
        edit_state = a.hidden_entering(prompt_batch, layer)
        with torch.no_grad():
            edit_target = a.run_layers(edit_state).detach().clone()
        edit_target[0, -1] = key.to(edit_target.dtype)  # left padding: the last column is the last prompt token
        preserve = editor_preservation(self, edit)
        terms: list[tuple[LayerState, torch.Tensor, torch.Tensor]] = [
            (edit_state, edit_target, prompt_batch.attention_mask)]
        if preserve:
            pres_batch = a.prepare(preserve)
            pres_state = a.hidden_entering(pres_batch, layer)
            with torch.no_grad():
                terms.append((pres_state, a.run_layers(pres_state).detach(), pres_batch.attention_mask))

        def loss_fn() -> torch.Tensor:
            return cast(torch.Tensor, sum(masked_mse(a.run_layers(st), target, mask) for st, target, mask in terms))

        names = set(self.touched_parameters())
        params = {n: p for n, p in a.model.named_parameters() if n in names}
        result = finetune(params, loss_fn, lr=hp.optim_lr, max_steps=hp.optim_steps,
                          early_stop_loss=hp.optim_early_stop_loss, optimizer="adam", weight_decay=hp.weight_decay)
        return {"steps": stats["v_steps"] + result.steps, "loss": result.loss, **stats,
                "optim_steps": result.steps, "n_preserve": len(preserve)}

    # ---- several edits per pass ---------------------------------------------------------------------------------

    def compute_keys(self, edits: Sequence[EditRequest]) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """Stage 1 of K edits at once: ``[K, hidden]`` keys (each as :meth:`compute_key` alone finds it)."""
        a, hp = self.adapter, self.hparams
        k = len(edits)
        groups = []
        for rows, batch in a.training_groups([e.prompt() for e in edits], [e.target for e in edits], tail_only=True):
            state, onehot, key0 = self._stage_one_frame(batch)
            groups.append((torch.tensor(rows, device=key0.device), state, onehot, key0))
        device = groups[0][3].device
        key0 = torch.zeros(k, groups[0][3].shape[-1], device=device)
        for group_rows, _, _, keys in groups:
            key0[group_rows] = keys
        delta = torch.zeros_like(key0, requires_grad=True)
        max_norm = hp.clamp_norm_factor * key0.norm(dim=-1)
        wd = hp.v_weight_decay
        threshold = float("-inf") if hp.v_early_stop_loss is None else hp.v_early_stop_loss

        def nll(d: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(k, device=device)
            for rows, state, onehot, _ in groups:
                hidden = state.hidden + (onehot * d[rows][:, None, :]).to(state.hidden.dtype)
                out = out.index_copy(0, rows, a.loss_from(state, hidden, reduction="none").float())
            return out

        active = torch.ones(k, dtype=torch.bool, device=device)
        # counted on the device: with an early stop one host sync per step (may every edit stop?), without none
        steps = torch.zeros(k, dtype=torch.long, device=device)
        early_stop = hp.v_early_stop_loss is not None
        state_opt: list[dict[str, Any]] = [{}]  # the optimizer state of masked_update
        number = StepNumber("adam", [delta])

        for _ in range(hp.v_steps):
            losses = nll(delta)
            if early_stop:  # per edit: stop before the update, as alone (one host sync per step)
                active &= ~(losses.detach() < threshold)
                if not bool(active.any()):
                    break
            total = losses + wd * delta.norm(dim=-1) / key0.norm(dim=-1).clamp(min=1e-6) ** 2
            # stopped edits weighted 0 rather than dropped by a boolean index (a host sync): the same gradient
            (grad,) = torch.autograd.grad((total * active).sum(), [delta])
            with torch.no_grad():
                masked_update([delta], [grad], state_opt, active, number.next(), optimizer="adam",
                              lr=hp.v_lr, weight_decay=0.0, all_active=not early_stop)
                norm = delta.norm(dim=-1)
                scale = torch.where(active & (norm > max_norm), max_norm / norm.clamp(min=1e-30),
                                    torch.ones_like(norm))
                delta.mul_(scale[:, None])
            steps.add_(active)
        with torch.no_grad():
            final = nll(delta.detach())
        stats = [{"v_steps": s_, "v_loss": float(f), "delta_norm": float(n)}
                 for s_, f, n in zip(steps.tolist(), final.tolist(), delta.detach().norm(dim=-1).tolist())]
        return key0 + delta.detach(), stats

    def apply_many(self, edits: Sequence[EditRequest]) -> list[dict[str, Any]]:
        """K independent UnKE edits, each on its own copy of layer ``L`` (the model unchanged); evaluate with
        :meth:`generate_many`."""
        a, hp, layer = self.adapter, self.hparams, self._layer()
        k = len(edits)
        keys, stats = self.compute_keys(edits)
        preserve = [editor_preservation(self, e) for e in edits]
        # stage 2: the rows entering layer L (the edit prompts: term 0, their preservation prompts: term 1) and the
        # layer's target output on them, per canonical batch; on CUDA each edit's sequences packed into rows
        groups = []
        with torch.no_grad():
            for rows, batch in a.training_groups([e.prompt() for e in edits], None):
                state = a.hidden_entering(batch, layer)
                target = a.run_layers(state).detach().clone()
                target[:, -1] = keys[rows].to(target.dtype)  # left padding: last column = last prompt token
                groups.append(LayerRows(list(rows), state, target.float(), [(0, _valid(batch))]))
            owners = [j for j, ps in enumerate(preserve) for _ in ps]
            flat = [p for ps in preserve for p in ps]
            if flat:
                for rows, batch in a.training_groups(flat, None):
                    state = a.hidden_entering(batch, layer)
                    groups.append(LayerRows([owners[i] for i in rows], state, a.run_layers(state).detach().float(),
                                            [(1, _valid(batch))]))
            # what every step reuses: each batch's row runs and owners on the device, each edit's count of values
            device = keys.device
            counts = torch.zeros(2, k, device=device)
            steady = []
            for group in packed_layer_rows(a, layer, groups):
                who = torch.tensor(group.owner, device=device)
                for term, m in group.terms:
                    counts[term] = counts[term].index_add(0, who, m.sum(dim=(1, 2)) * group.target.shape[-1])
                steady.append((runs_of(group.owner), who, group.state, group.target, group.terms))
            del groups  # packed: the unpacked states and targets are not needed any more
            present = counts > 0
        names = self.touched_parameters()
        copies = StackedCopies({n: p for n, p in a.model.named_parameters() if n in set(names)}, k)
        routing = RowRouting(a.model, names)

        def losses(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
            routing.set_weights(weights)
            sums = torch.zeros(2, k, device=device)
            for runs, who, state, target, terms in steady:
                routing.runs = runs  # row i runs edit owner[i]'s copy
                squared = (a.run_layers(state).float() - target) ** 2
                for term, m in terms:
                    sums[term] = sums[term].index_add(0, who, (squared * m).sum(dim=(1, 2)))
            return torch.where(present, sums / counts.clamp(min=1.0), torch.zeros_like(sums)).sum(0)

        with routing.installed():
            results = finetune_many(copies, losses, lr=hp.optim_lr, max_steps=hp.optim_steps,
                                    early_stop_loss=hp.optim_early_stop_loss, optimizer="adam",
                                    weight_decay=hp.weight_decay)
        self._copies = copies
        return [{"steps": st["v_steps"] + r.steps, "loss": r.loss, **st, "optim_steps": r.steps,
                 "n_preserve": len(ps)} for st, r, ps in zip(stats, results, preserve)]

    @contextlib.contextmanager
    def per_edit(self, prompts_per_edit: Sequence[Sequence[Prompt]]) -> Iterator[PerEdit]:
        with routed_copies(self.adapter.model, self._copies, "unke", prompts_per_edit) as per_edit:
            yield per_edit

    def reset(self) -> None:
        self._copies = None
