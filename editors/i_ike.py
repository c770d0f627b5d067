"""I-IKE: the edit stated as a natural-language instruction in the system prompt (paper §4.1, App. D.2).

No parameter changes. In sequential mode the system prompt lists every edit applied so far, one instruction per
edit, oldest first; :meth:`reset` forgets them.
"""

from __future__ import annotations

from typing import Any, Sequence

from editors.base import EditRequest, Editor, register
from editors.models.base import Prompt


@register("i_ike")
class IIKE(Editor):
    """Instruction-based in-context editing (hparams: ``system_header``, ``instruction``, ``attribute_phrases``)."""

    changes_parameters = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active: list[EditRequest] = []

    def touched_parameters(self) -> list[str]:
        return []

    def instruction(self, edit: EditRequest) -> str:
        phrases = self.hparams.get("attribute_phrases") or {}
        phrase = phrases.get(edit.attribute, f"a {edit.attribute}")
        return self.hparams["instruction"].format(attribute_phrase=phrase, original=edit.original_label,
                                                  target=edit.target_label, answer=edit.target,
                                                  attribute=edit.attribute)

    def system_prompt(self) -> str:
        lines = [self.hparams.get("system_header", "").strip()] + [self.instruction(e) for e in self.active]
        return "\n".join(line for line in lines if line)

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        self.active.append(edit)
        return {"steps": 0, "loss": None}

    def rewrite_prompts(self, prompts: Sequence[Prompt], edit: EditRequest) -> list[Prompt]:
        system = self.system_prompt()
        return [p.with_system(system) for p in prompts]

    def reset(self) -> None:
        self.active.clear()
