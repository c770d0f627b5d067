"""AlphaEdit (Fang et al., 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models"):
a locate-then-edit update of the FFN output projection ``W`` of one LLM layer, projected onto the null space of
the keys whose outputs must be preserved.

Preserved keys. The inputs ``k`` of ``W`` (FFN inner activations) at every token of preservation prompts drawn
from the SAKE **train split**: ``preserve_audio`` audio prompts (each instance's own question about its audio and
its audio-locality items) and ``preserve_text`` text prompts (its text-locality items), drawn with the run seed
from all four attribute configs (AlphaEdit draws Wikipedia text; SAKE edits audio-language behaviour, so the
train split's own audio and text prompts stand in for it). Their second moment ``C0 = mean k k^T`` is eigen-
decomposed and ``P = U0 U0^T`` over the eigenvectors with eigenvalue below ``nullspace_threshold`` (AlphaEdit's
rule; ``nullspace_fraction`` instead takes that fraction of the directions with the smallest eigenvalues, for
models whose keys have no eigenvalue below the threshold, such as the random tiny ones): ``P k0 ~ 0`` for
preserved keys. ``C0`` and ``P`` are computed once and cached on disk per model key, layer and prompt set:
``CACHE/alphaedit/MODEL_KEY/layer{l}-{digest}.safetensors`` (digest of the prompts' content hashes and the
null-space rule), written atomically; later runs (and other processes) load them.

One edit. The key ``k*`` is ``W``'s input at the fact token (``fact_token: audio_last``, the last audio embedding
position: the audio plays the subject's role of AlphaEdit's ``subject_last``; ``prompt_last``: the last prompt
token). A residual ``delta`` added to ``W k*`` is optimised (``v_num_grad_steps`` Adam steps at ``v_lr``, weight
decay ``v_weight_decay * |delta|^2 / |W k*|^2``, norm clamped to ``clamp_norm_factor * |W k*|``) so that the model
produces the target; then, with ``K = [k*]`` and ``R = [delta]``,

    Delta^T = (P (K K^T + C_past) + L2 I)^{-1} P K R^T,     W <- W + Delta

(AlphaEdit's closed form for one layer, solved in fp64). ``Delta k0 = 0`` exactly for every ``k0`` with ``P k0 = 0``,
so a preserved key's output moves by at most ``||Delta||_2 * ||P k0||``, its part in the null space, whose mean
square is the sum of the eigenvalues below the threshold (``tests/test_alphaedit.py`` checks this tolerance).

Sequential mode: ``C_past`` accumulates ``K K^T`` of the edits already made (AlphaEdit's ``cache_c``), so later edits
also leave the earlier edits' keys alone; :meth:`AlphaEdit.reset` clears it and the runner restores ``W``.
Deviation from AlphaEdit's release: one edited layer (it spreads the residual over layers 4-8, MEMIT-style), one
key per edit (no context-template averaging) and no KL term (``kl_factor``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from editors.base import EditRequest, Editor
from editors.registry import register
from editors.hparams import Hparams
from editors.models.base import Prompt, as_audio_array, as_linear
from sake_core.atomic import atomic_write
from sake_core.cache import cache_root
from sake_core.protocol import ATTRIBUTES
from sake_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def preserved_prompts(context: Any, n_audio: int, n_text: int, seed: int) -> list[Prompt]:
    """``n_audio`` audio prompts then ``n_text`` text prompts from the train split of every attribute config (see
    the module docstring); deterministic per ``seed``. ValueError when no train split can be loaded."""
    if context.load_rows is None:
        raise ConfigError("alphaedit: the preserved-key statistics need the dataset's train split (no loader given)")
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

    layer: int
    fact_token: str  # audio_last | prompt_last
    v_num_grad_steps: int
    v_lr: float
    v_weight_decay: float
    clamp_norm_factor: float
    v_early_stop_loss: float | None
    nullspace_threshold: float
    nullspace_fraction: float | None
    L2: float
    preserve_audio: int
    preserve_text: int
    stats_batch_size: int


@register("alphaedit")
class AlphaEdit(Editor):
    """AlphaEdit on the FFN output projection of LLM layer ``hparams.layer`` (see the module docstring)."""

    hparams_class = AlphaEditHparams
    hparams: AlphaEditHparams
    display_name = "AlphaEdit"
    display_order = 11  # after the paper's eight methods

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.projector: torch.Tensor | None = None  # P [in, in] fp32
        self.preserved_second_moment: torch.Tensor | None = None  # C0 [in, in] fp32
        self.past_keys: torch.Tensor | None = None  # C_past [in, in] fp64 (sum of K K^T of earlier edits)
        self.stats_path: Path | None = None

    def _layer(self) -> int:
        return self.adapter.resolve_layer(self.hparams.layer)

    def touched_parameters(self) -> list[str]:
        return self.adapter.parameter_names(self.adapter.mlp_out_proj(self._layer()))

    def reset(self) -> None:
        self.past_keys = None

    # ---- preserved-key statistics -------------------------------------------------------------------------------

    def setup(self) -> None:
        hp = self.hparams
        prompts = preserved_prompts(self.context, hp.preserve_audio, hp.preserve_text, self.context.seed)
        threshold = hp.nullspace_threshold
        rule = [threshold, hp.nullspace_fraction]
        digest = hashlib.sha256(json.dumps([p.digest() for p in prompts] + rule).encode()).hexdigest()[:20]
        root = Path(self.context.cache_dir or cache_root())
        path = root / "alphaedit" / self.adapter.model_key() / f"layer{self._layer()}-{digest}.safetensors"
        self.stats_path = path
        device = self.adapter.device
        if path.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            self.preserved_second_moment = tensors["second_moment"].to(device)
            self.projector = tensors["projector"].to(device)
            logger.info("alphaedit: preserved-key statistics loaded from %s", path)
            return
        second_moment, count = self._second_moment(prompts)
        values, vectors = torch.linalg.eigh(second_moment.double())  # ascending eigenvalues
        fraction = hp.nullspace_fraction
        if fraction is not None:  # the quietest fraction of directions (scale-free; used for the tiny models)
            null = vectors[:, : int(round(fraction * len(values)))]
        else:
            null = vectors[:, values < threshold]
        projector = (null @ null.t()).float()
        logger.info("alphaedit: %d preserved keys from %d prompts; null space %d of %d dims (threshold %g)", count,
                    len(prompts), null.shape[1], second_moment.shape[0], threshold)
        from safetensors.torch import save

        atomic_write(path, save({"second_moment": second_moment.float().cpu().contiguous(),
                                 "projector": projector.cpu().contiguous()}))
        self.preserved_second_moment = second_moment.float().to(device)
        self.projector = projector.to(device)

    @torch.no_grad()
    def _second_moment(self, prompts: list[Prompt]) -> tuple[torch.Tensor, int]:
        """``mean k k^T`` over every non-padding token of ``prompts`` (fp64 sum) and the number of keys."""
        layer, proj = self._layer(), as_linear(self.adapter.mlp_out_proj(self._layer()))
        size = self.hparams.stats_batch_size
        total = torch.zeros(proj.in_features, proj.in_features, dtype=torch.float64, device=self.adapter.device)
        count = 0
        for start in tqdm(range(0, len(prompts), size), desc="alphaedit: preserved keys", unit="batch",
                          disable=None, leave=False):
            batch = self.adapter.prepare(prompts[start:start + size])
            keys = self._keys(batch, layer)[batch.attention_mask.bool()].double()  # [N, in]
            total += keys.t() @ keys
            count += keys.shape[0]
        return total / max(count, 1), count

    def _keys(self, batch: Any, layer: int, state: Any = None) -> torch.Tensor:
        """Inputs of ``W`` at every position [B, T, in] (no grad)."""
        captured: list[torch.Tensor] = []
        hook = self.adapter.mlp_out_proj(layer).register_forward_hook(
            lambda m, args, out: captured.append(args[0].detach()))
        try:
            with torch.no_grad():
                self.adapter.run_layers(state if state is not None else self.adapter.hidden_entering(batch, layer))
        finally:
            hook.remove()
        return captured[-1].float()

    # ---- one edit -----------------------------------------------------------------------------------------------

    def _fact_position(self, batch: Any) -> int:
        """Column of the fact token in the one-row training batch."""
        which = self.hparams.fact_token
        if which not in ("audio_last", "prompt_last"):
            raise ConfigError(f"alphaedit: fact_token={which!r}; expected audio_last or prompt_last")
        if which == "audio_last" and bool(batch.audio_token_mask[0].any()):
            return int(batch.audio_token_mask[0].nonzero()[-1, 0])
        return int((batch.labels[0] != -100).nonzero()[0, 0]) - 1

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        if self.projector is None:
            self.setup()
        if self.projector is None:
            raise RuntimeError("alphaedit: setup() computed no null-space projector")
        projector = self.projector
        a, hp = self.adapter, self.hparams
        layer = self._layer()
        proj = as_linear(a.mlp_out_proj(layer))
        batch = a.prepare([edit.prompt()], [edit.target])
        state = a.hidden_entering(batch, layer)
        position = self._fact_position(batch)
        key = self._keys(batch, layer, state)[0, position]  # k* [in]
        with torch.no_grad():
            base_value = proj(key[None].to(proj.weight.dtype))[0].float()  # W k*
        delta = torch.zeros_like(base_value, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        max_norm = hp.clamp_norm_factor * float(base_value.norm())
        decay = hp.v_weight_decay

        def add_delta(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[:, position] = out[:, position] + delta.to(out.dtype)
            return out

        hook = proj.register_forward_hook(add_delta)
        target_loss = float("nan")
        steps = 0
        try:
            for _ in range(hp.v_num_grad_steps):
                nll = a.loss_from(state)
                target_loss = float(nll.detach())
                early = hp.v_early_stop_loss
                if early is not None and target_loss < early:
                    break
                loss = nll + decay * delta.pow(2).sum() / base_value.pow(2).sum().clamp(min=1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                with torch.no_grad():
                    norm = float(delta.norm())
                    if norm > max_norm > 0:
                        delta.mul_(max_norm / norm)
        finally:
            hook.remove()
        residual = delta.detach()  # target value (W k* + delta) minus the current output W k*
        # the solve in fp64: with a small L2 the system is ill-conditioned and fp32 would break the exact null-space
        # property (Delta k0 = 0 for every k0 with P k0 = 0)
        keys = key.double()[:, None]  # K [in, 1]
        P = projector.double()
        past = self.past_keys if self.past_keys is not None else torch.zeros_like(P)
        lhs = P @ (keys @ keys.t() + past) + hp.L2 * torch.eye(P.shape[0], device=P.device, dtype=P.dtype)
        update_t = torch.linalg.solve(lhs, P @ keys @ residual.double()[None, :])  # Delta^T [in, out]
        with torch.no_grad():
            w = proj.weight
            w.copy_((w.double() + update_t.t()).to(w.dtype))
            self.past_keys = past + keys @ keys.t()
            achieved = float((update_t.t() @ keys[:, 0]).norm() / residual.double().norm().clamp(min=1e-12))
        return {"steps": steps, "loss": target_loss, "residual_norm": float(residual.norm()),
                "update_norm": float(update_t.norm()), "residual_fraction": achieved}
