"""FT (LLM): fine-tune one LLM decoder layer on the edit (paper §4.1, Table 6: Qwen layer 31, AF3 layer 27,
DeSTA layer 31; Adam, at most 15 steps, early stop when the target loss < 1e-2).

The layers below the edited one are frozen and see the same input at every step, so the hidden states entering
the edited layer are computed once per edit (``adapter.hidden_entering``) and each step runs only the edited
layer and those above it (``../shared/perf/h100-figures.md``: 1.11 s -> 0.083 s at 7B).
"""

from __future__ import annotations

from typing import Any

from editors.base import EditRequest, Editor, finetune, register


@register("ft_llm")
class FTLLM(Editor):
    """Fine-tune LLM layer ``hparams['layer']`` (``params``: whole ``layer``, its ``mlp`` or ``mlp_out``)."""

    def _module(self):
        layer = int(self.hparams["layer"])
        which = self.hparams.get("params", "layer")
        if which == "layer":
            return self.adapter.llm_layer(layer)
        if which == "mlp":
            return self.adapter.mlp(layer)
        if which == "mlp_out":
            return self.adapter.mlp_out_proj(layer)
        raise ValueError(f"ft_llm: hparam params={which!r}; expected layer, mlp or mlp_out")

    def touched_parameters(self) -> list[str]:
        return self.adapter.parameter_names(self._module())

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        layer = self.adapter.resolve_layer(int(self.hparams["layer"]))
        batch = self.adapter.prepare([edit.prompt()], [edit.target])
        state = self.adapter.hidden_entering(batch, layer)  # frozen lower layers: once per edit
        names = self.touched_parameters()
        params = {n: p for n, p in self.adapter.model.named_parameters() if n in set(names)}
        result = finetune(params, lambda: self.adapter.loss_from(state), lr=float(self.hparams["lr"]),
                          max_steps=int(self.hparams["max_steps"]),
                          early_stop_loss=self.hparams.get("early_stop_loss"),
                          optimizer=self.hparams.get("optimizer", "adam"),
                          weight_decay=float(self.hparams.get("weight_decay", 0.0)))
        return {"steps": result.steps, "loss": result.loss}
