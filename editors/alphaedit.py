"""AlphaEdit (Fang et al., 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models"): a
MEMIT-style locate-then-edit update of the FFN output projections ``W_l`` of the LLM layers ``layers``, each
projected onto the null space of the keys whose outputs must be preserved.

Preserved keys. The inputs ``k`` of each ``W_l`` (FFN inner activations) at every token of preservation prompts
drawn from the SAKE **train split**: ``preserve_audio`` audio prompts (each instance's own question about its
audio and its audio-locality items) and ``preserve_text`` text prompts (its text-locality items, MMLU questions),
drawn with the run seed from all four attribute configs. AlphaEdit estimates them on 100,000 Wikipedia samples;
SAKE edits audio-language behaviour and ships no Wikipedia, so the train split's own audio and text prompts stand
in for it (the defaults take every prompt of the split: on the demo's train split 190 audio and 40 text prompts,
16,870 tokens on the reference model; the count of keys is logged and returned with every edit as
``preserved_keys``). Their second moment
``C0_l = mean k k^T`` is eigen-decomposed and ``P_l = U0 U0^T`` over the eigenvectors with eigenvalue below
``nullspace_threshold`` (AlphaEdit's rule; ``nullspace_fraction`` instead takes that fraction of the directions
with the smallest eigenvalues, for models whose keys have no eigenvalue below the threshold, such as the small
ones): ``P_l k0 ~ 0`` for preserved keys. ``C0_l`` and ``P_l`` are computed once (all layers in one pass) and
cached on disk per model key, layer and prompt set: ``CACHE/alphaedit/MODEL_KEY/layer{l}-{digest}.safetensors``
(digest of the prompts' content hashes and the null-space rule), written atomically; later runs load them.

Context templates (MEMIT / AlphaEdit). The edit is learned under ``n_context`` contexts besides the plain prompt:
texts the model itself generates (greedy, ``context_length`` new tokens) from the words AlphaEdit starts from
("The", "Therefore", "Because", "I", "You"), each placed as the system turn of the edit prompt, i.e. before the
audio and the question (AlphaEdit writes them before the subject). Keys are averaged as AlphaEdit does: the plain
prompt's key and the mean key of the generated contexts, averaged.

One edit. The fact token is the last audio embedding position (``fact_token: audio_last``: the audio plays the
subject's role of AlphaEdit's ``subject_last``) or the last prompt token (``prompt_last``).

1. The target hidden state ``z`` at the output of the last edited layer ``L = max(layers)``: a residual ``delta``
   added there at the fact token of every context's prompt is optimised (``v_num_grad_steps`` Adam steps at
   ``v_lr``, stop below ``v_early_stop_loss``) on the target's cross-entropy averaged over the contexts
   + ``kl_factor`` * KL(unedited || edited) of the next-token distribution at the fact token of a neutral prompt
   about the edit's audio (:data:`KL_QUESTION`; AlphaEdit's ``"{subject} is a"``) + ``v_weight_decay *
   ||delta|| / ||h||^2``, with ``||delta|| <= clamp_norm_factor * ||h||`` (``h``: that hidden state before the
   edit); ``z = h + delta``.
2. For each edited layer ``l`` in ascending order (the ``i``-th of ``n``): ``K`` = the layer's key (averaged over
   the contexts), ``R = (z - current output of L at the fact token) / (n - i)`` (MEMIT spreads the residual over
   the remaining layers), and AlphaEdit's closed form

       Delta_l^T = (P_l (K K^T + C_past_l) + L2 I)^{-1} P_l K R^T,     W_l <- W_l + Delta_l

   (solved in fp64). ``Delta_l k0 = 0`` exactly for every ``k0`` with ``P_l k0 = 0``, so a preserved key's output
   moves by at most ``||Delta_l||_2 * ||P_l k0||`` (``tests/test_alphaedit.py`` checks this tolerance per layer).
3. ``C_past_l += K K^T`` with the keys after the update (AlphaEdit's ``cache_c``): later edits of a sequence leave
   the earlier edits' keys alone; :meth:`AlphaEdit.reset` clears it and the runner restores the weights.

``layers: [L]``, ``n_context: 0`` and ``kl_factor: 0`` give the simpler single-layer variant (one key, no
context templates, no KL term).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from editors.base import EditRequest, Editor
from editors.registry import register
from editors.hparams import Hparams
from editors.models.base import IGNORE_INDEX, Prompt, PromptBatch, as_audio_array
from sake_core.atomic import atomic_write
from sake_core.cache import cache_root
from sake_core.protocol import ATTRIBUTES
from sake_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: The words AlphaEdit's context templates start from.
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")
#: The neutral prompt about the edit's audio whose next-token distribution at the fact token the KL term keeps
#: (AlphaEdit: "{subject} is a").
KL_QUESTION = "What do you hear?"


def preserved_prompts(context: Any, n_audio: int, n_text: int, seed: int) -> list[Prompt]:
    """``n_audio`` audio prompts then ``n_text`` text prompts from the train split of every attribute config (see
    the module docstring); deterministic per ``seed``. ValueError when no train split can be loaded."""
    if context.load_rows is None:
        raise ConfigError("alphaedit: the preserved-key statistics need the dataset's train split: pass dataset= "
                          "to sake.editing (a run has it)")
    tables = []
    for config in ATTRIBUTES:
        try:
            tables.append((config, context.load_rows(config, "train")))
        except ValueError as exc:
            logger.warning("alphaedit: cannot load %s/train (%s)", config, exc)
    refs = [(config, table, i) for config, table, in tables for i in range(len(table))]
    if not refs:
        raise DataError("alphaedit: the dataset has no train split to draw preserved keys from "
                         f"(configs {list(ATTRIBUTES)}, split train)")
    rng = random.Random(f"alphaedit:{seed}")
    order = list(range(len(refs)))
    rng.shuffle(order)
    audio: list[Prompt] = []
    text: list[Prompt] = []
    for k in order:
        if len(audio) >= n_audio and len(text) >= n_text:
            break
        config, table, i = refs[k]
        row = table[i]
        where = f"{config}/train row {i}"
        candidates = [Prompt(question=row["question"], audio=as_audio_array(row["audio"], where=where))]
        candidates += [Prompt(question=it["question"], audio=as_audio_array(it["audio"], where=where))
                       for it in row["locality_audio"] or []]
        for prompt in candidates:
            if len(audio) < n_audio:
                audio.append(prompt)
        for it in row["locality_text"] or []:
            if len(text) < n_text:
                text.append(Prompt(question=it["question"]))
    return audio + text


@dataclass
class AlphaEditHparams(Hparams):
    """AlphaEdit's settings (see the module docstring and editors/hparams/alphaedit.yaml)."""

    bounds = {"n_context": "non_negative", "context_length": "positive", "v_num_grad_steps": "positive",
              "v_lr": "positive", "v_weight_decay": "non_negative", "clamp_norm_factor": "positive",
              "v_early_stop_loss": "non_negative", "nullspace_fraction": "fraction", "preserve_audio": "non_negative",
              "preserve_text": "non_negative", "stats_batch_size": "positive"}

    layers: list[int]
    fact_token: str  # audio_last | prompt_last
    n_context: int
    context_length: int
    v_num_grad_steps: int
    v_lr: float
    v_weight_decay: float
    clamp_norm_factor: float
    v_early_stop_loss: float | None
    kl_factor: float
    nullspace_threshold: float
    nullspace_fraction: float | None
    L2: float
    preserve_audio: int
    preserve_text: int
    stats_batch_size: int


@register("alphaedit")
class AlphaEdit(Editor):
    """AlphaEdit on the FFN output projections of the LLM layers ``hparams.layers`` (see the module docstring)."""

    hparams_class = AlphaEditHparams
    hparams: AlphaEditHparams
    display_name = "AlphaEdit"
    display_order = 11  # after the paper's eight methods

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.projectors: dict[int, torch.Tensor] = {}  # layer -> P [in, in] fp32
        self.second_moments: dict[int, torch.Tensor] = {}  # layer -> C0 [in, in] fp32
        self.past_keys: dict[int, torch.Tensor] | None = None  # layer -> C_past [in, in] fp64
        self.stats_paths: dict[int, Path] = {}
        self.preserved_keys = 0
        self.contexts: list[str] | None = None

    def _layers(self) -> list[int]:
        layers = [self.adapter.resolve_layer(x) for x in self.hparams.layers]
        if not layers or len(set(layers)) != len(layers):
            raise ConfigError(f"alphaedit: hparam layers={self.hparams.layers}: expected distinct LLM layers")
        return sorted(layers)

    def touched_parameters(self) -> list[str]:
        return [name for layer in self._layers()
                for name in self.adapter.parameter_names(self.adapter.mlp_out_proj(layer))]

    def reset(self) -> None:
        self.past_keys = None

    # ---- preserved-key statistics -------------------------------------------------------------------------------

    def setup(self) -> None:
        hp = self.hparams
        if hp.fact_token not in ("audio_last", "prompt_last"):
            raise ConfigError(f"alphaedit: fact_token={hp.fact_token!r}; expected audio_last or prompt_last")
        prompts = preserved_prompts(self.context, hp.preserve_audio, hp.preserve_text, self.context.seed)
        rule = [hp.nullspace_threshold, hp.nullspace_fraction]
        digest = hashlib.sha256(json.dumps([p.digest() for p in prompts] + rule).encode()).hexdigest()[:20]
        root = Path(self.context.cache_dir or cache_root()) / "alphaedit" / self.adapter.model_key()
        layers = self._layers()
        self.stats_paths = {layer: root / f"layer{layer}-{digest}.safetensors" for layer in layers}
        device = self.adapter.device
        from safetensors import safe_open
        from safetensors.torch import load_file, save

        missing = [layer for layer in layers if not self.stats_paths[layer].is_file()]
        if missing:
            moments, count = self._second_moments(prompts, missing)
            for layer in missing:
                values, vectors = torch.linalg.eigh(moments[layer].double())  # ascending eigenvalues
                if hp.nullspace_fraction is not None:  # the quietest fraction of directions (scale-free)
                    null = vectors[:, : int(round(hp.nullspace_fraction * len(values)))]
                else:
                    null = vectors[:, values < hp.nullspace_threshold]
                projector = (null @ null.t()).float()
                logger.info("alphaedit: layer %d: %d preserved keys from %d prompts; null space %d of %d dims", layer,
                            count, len(prompts), null.shape[1], moments[layer].shape[0])
                atomic_write(self.stats_paths[layer], save(
                    {"second_moment": moments[layer].float().cpu().contiguous(),
                     "projector": projector.cpu().contiguous()}, metadata={"keys": str(count)}))
        for layer in layers:
            path = self.stats_paths[layer]
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                self.preserved_keys = int((handle.metadata() or {}).get("keys", 0))
            self.second_moments[layer] = tensors["second_moment"].to(device)
            self.projectors[layer] = tensors["projector"].to(device)
        logger.info("alphaedit: preserved-key statistics of layers %s in %s (%d keys)", layers, root,
                    self.preserved_keys)

    @torch.no_grad()
    def _second_moments(self, prompts: list[Prompt], layers: list[int]) -> tuple[dict[int, torch.Tensor], int]:
        """``mean k k^T`` per layer over every non-padding token of ``prompts`` (fp64 sums, one pass for all
        layers) and the number of keys per layer."""
        size = self.hparams.stats_batch_size
        totals: dict[int, torch.Tensor | None] = {layer: None for layer in layers}
        count = 0
        for start in tqdm(range(0, len(prompts), size), desc="alphaedit: preserved keys", unit="batch",
                          disable=None, leave=False):
            batch = self.adapter.prepare(prompts[start:start + size])
            keys = self._keys(batch, layers)
            valid = batch.attention_mask.bool()
            for layer in layers:
                k = keys[layer][valid].double()
                total = totals[layer]
                totals[layer] = k.t() @ k if total is None else total + k.t() @ k
            count += int(valid.sum())
        return {layer: total / max(count, 1) for layer, total in totals.items() if total is not None}, count

    def _keys(self, batch: PromptBatch, layers: list[int], upto: int | None = None) -> dict[int, torch.Tensor]:
        """Inputs of ``W_l`` at every position [B, T, in] for each layer of ``layers`` (no grad); with ``upto``
        also the output of LLM layer ``upto`` under key ``-1``."""
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.adapter.mlp_out_proj(layer).register_forward_hook(
            lambda m, args, out, layer=layer: captured.__setitem__(layer, args[0].detach().float()))
            for layer in layers]
        last = max(layers) if upto is None else max(max(layers), upto)
        try:
            with torch.no_grad():
                state = self.adapter.hidden_entering(batch, min(layers))
                out = self.adapter.run_layers(state, start=min(layers), stop=last + 1)
        finally:
            for hook in hooks:
                hook.remove()
        if upto is not None:
            captured[-1] = out.float()  # the output of layer `last` = `upto`
        return captured

    # ---- one edit -----------------------------------------------------------------------------------------------

    def _context_prefixes(self) -> list[str]:
        """The model's own continuations of AlphaEdit's starting words (greedy, generated once per editor)."""
        if self.contexts is None:
            n, length = self.hparams.n_context, self.hparams.context_length
            starts = [CONTEXT_STARTS[i % len(CONTEXT_STARTS)] for i in range(n)]
            settings = self.generation_settings(max_new_tokens=length)
            texts = self.adapter.generate([Prompt(question=s) for s in starts], settings=settings) if n else []
            self.contexts = [(start + " " + str(text).strip()).strip().replace("{", " ").replace("}", " ") + "."
                             for start, text in zip(starts, texts)]
            logger.info("alphaedit: context templates %s", self.contexts)
        return self.contexts

    def _fact_positions(self, batch: PromptBatch) -> torch.Tensor:
        """Column of the fact token in each row: the last audio embedding, or the last prompt token (the one before
        the first target token; the last column when the batch has no targets; rows are left-padded)."""
        rows = []
        for r in range(batch.batch_size):
            audio = batch.audio_token_mask[r]
            if self.hparams.fact_token == "audio_last" and bool(audio.any()):
                rows.append(int(audio.nonzero()[-1, 0]))
            elif batch.labels is not None:
                rows.append(int((batch.labels[r] != IGNORE_INDEX).nonzero()[0, 0]) - 1)
            else:
                rows.append(batch.input_ids.shape[1] - 1)
        return torch.tensor(rows, device=batch.input_ids.device)

    def _target_hidden(self, edit: EditRequest, batch: PromptBatch, positions: torch.Tensor, top: int
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Step 1 of the module docstring: ``z`` (fp32 [hidden]) at the output of layer ``top``."""
        a, hp = self.adapter, self.hparams
        rows = torch.arange(batch.batch_size, device=positions.device)
        full = a.hidden_entering(batch, top + 1)  # hidden states leaving layer `top`
        init = full.hidden[0, positions[0]].detach().float()
        # the residual changes nothing before the fact token: only the columns from there on are recomputed
        state = a.tail_state(full, int(positions.min()))
        positions = positions - state.first_column
        kl_ref: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # state, rows, positions, logp
        if hp.kl_factor > 0 and edit.audio is not None:
            kl_batch = a.prepare([Prompt(question=KL_QUESTION, audio=edit.audio)])
            kl_pos = self._fact_positions(kl_batch)
            kl_rows = torch.arange(kl_batch.batch_size, device=kl_pos.device)
            kl_state = a.tail_state(a.hidden_entering(kl_batch, top + 1), int(kl_pos.min()))
            kl_pos = kl_pos - kl_state.first_column
            with torch.no_grad():
                final = a.final_hidden_from(kl_state)
                kl_init = F.log_softmax(a.lm_head()(final[kl_rows, kl_pos]).float(), dim=-1)
            kl_ref = (kl_state, kl_rows, kl_pos, kl_init)
        delta = torch.zeros_like(init, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        max_norm = hp.clamp_norm_factor * float(init.norm())

        def shifted(hidden: torch.Tensor, where_rows: torch.Tensor, where_pos: torch.Tensor) -> torch.Tensor:
            out = hidden.clone()
            out[where_rows, where_pos] = out[where_rows, where_pos] + delta.to(out.dtype)
            return out

        nll = kl = float("nan")
        steps = 0
        for _ in range(hp.v_num_grad_steps):
            nll_t = a.loss_from(state, hidden=shifted(state.hidden, rows, positions))
            loss = nll_t + hp.v_weight_decay * delta.norm() / init.norm().pow(2).clamp(min=1e-12)
            kl_t = None
            if kl_ref is not None:
                kl_state, kl_rows, kl_pos, kl_init = kl_ref
                final = a.final_hidden_from(kl_state, hidden=shifted(kl_state.hidden, kl_rows, kl_pos))
                logp = F.log_softmax(a.lm_head()(final[kl_rows, kl_pos]).float(), dim=-1)
                kl_t = (kl_init.exp() * (kl_init - logp)).sum(-1).mean()
                loss = loss + hp.kl_factor * kl_t
            nll, kl = float(nll_t.detach()), float(kl_t.detach()) if kl_t is not None else 0.0
            if hp.v_early_stop_loss is not None and float(loss.detach()) < hp.v_early_stop_loss:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                norm = float(delta.norm())
                if norm > max_norm > 0:
                    delta.mul_(max_norm / norm)
        return (init + delta.detach()), {"steps": steps, "loss": nll, "kl": kl, "delta_norm": float(delta.detach().norm())}

    def _context_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One key [in] from the rows' keys [B, T, in]: row 0 (the plain prompt) and the mean of the context rows,
        averaged (AlphaEdit's mean over context types)."""
        at = keys[torch.arange(keys.shape[0], device=keys.device), positions]  # [B, in]
        return at[0] if at.shape[0] == 1 else 0.5 * (at[0] + at[1:].mean(0))

    def edit_batch(self, edit: EditRequest) -> tuple[PromptBatch, torch.Tensor]:
        """The edit under every context (row 0: the plain prompt; then one row per context template, its text as
        the system turn), with the target teacher-forced, and each row's fact-token column."""
        plain = edit.prompt()
        prompts = [plain] + [Prompt(question=plain.question, audio=plain.audio, system=prefix, history=plain.history)
                             for prefix in self._context_prefixes()]
        batch = self.adapter.prepare(prompts, [edit.target] * len(prompts))
        return batch, self._fact_positions(batch)

    def edit_key(self, edit: EditRequest, layer: int) -> torch.Tensor:
        """The key [in] (fp32) an edit writes at ``layer`` and later preserves: averaged over the contexts."""
        batch, positions = self.edit_batch(edit)
        return self._context_keys(self._keys(batch, [layer])[layer], positions)

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        if not self.projectors:
            self.setup()
        a, hp = self.adapter, self.hparams
        layers = self._layers()
        top = max(layers)
        batch, positions = self.edit_batch(edit)
        z, stats = self._target_hidden(edit, batch, positions, top)
        if self.past_keys is None:
            self.past_keys = {layer: torch.zeros_like(self.projectors[layer], dtype=torch.float64)
                              for layer in layers}
        residual_norms, update_norm = [], 0.0
        for i, layer in enumerate(layers):
            captured = self._keys(batch, [layer], upto=top)
            key = self._context_keys(captured[layer], positions).double()[:, None]  # K [in, 1]
            current = captured[-1][0, positions[0]].double()
            residual = (z.double() - current) / (len(layers) - i)
            residual_norms.append(float(residual.norm()))
            P = self.projectors[layer].double()
            lhs = P @ (key @ key.t() + self.past_keys[layer]) + hp.L2 * torch.eye(P.shape[0], dtype=P.dtype,
                                                                                   device=P.device)
            update_t = torch.linalg.solve(lhs, P @ key @ residual[None, :])  # Delta^T [in, out]
            with torch.no_grad():
                w = cast(nn.Linear, a.mlp_out_proj(layer)).weight
                w.copy_((w.double() + update_t.t()).to(w.dtype))
            update_norm += float(update_t.norm()) ** 2
        captured = self._keys(batch, layers, upto=top)
        for layer in layers:  # the edit's keys after the update join the preserved ones (AlphaEdit's cache_c)
            key = self._context_keys(captured[layer], positions).double()[:, None]
            self.past_keys[layer] = self.past_keys[layer] + key @ key.t()
        final_gap = float((z.double() - captured[-1][0, positions[0]].double()).norm())
        start_gap = residual_norms[0] * len(layers)
        return {**stats, "residual_norm": start_gap, "update_norm": update_norm ** 0.5,
                "residual_fraction": 1.0 - final_gap / max(start_gap, 1e-12), "preserved_keys": self.preserved_keys,
                "layers": len(layers)}
