"""I-IKE: the edit stated as a natural-language instruction in the system prompt (paper §4.1, App. D.2).

No parameter changes. In sequential mode the system prompt lists every edit applied so far, one instruction per
edit, oldest first; :meth:`reset` forgets them.

Several edits per pass (:meth:`IIKE.apply_many`): the K edits are independent, so each edit's prompts carry only
that edit's instruction (exactly its single-edit prompts); all of them go to one batched generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from editors.base import EditRequest, Editor
from editors.registry import register
from editors.hparams import Hparams
from editors.models.base import Prompt


@dataclass
class IIKEHparams(Hparams):
    """The system prompt's header and the instruction template (``{attribute_phrase}``, ``{original}``,
    ``{target}``), with a phrase per attribute."""

    system_header: str
    instruction: str
    attribute_phrases: dict[str, str]


@register("i_ike")
class IIKE(Editor):
    """Instruction-based in-context editing (hparams: ``system_header``, ``instruction``, ``attribute_phrases``)."""

    changes_parameters = False
    batches_edits = True
    hparams_class: ClassVar[type[Hparams]] = IIKEHparams
    hparams: IIKEHparams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active: list[EditRequest] = []
        self.independent = False  # set by apply_many: each edit's prompts see that edit alone

    def touched_parameters(self) -> list[str]:
        return []

    def instruction(self, edit: EditRequest) -> str:
        phrase = self.hparams.attribute_phrases.get(edit.attribute, f"a {edit.attribute}")
        return self.hparams.instruction.format(attribute_phrase=phrase, original=edit.original_label,
                                                  target=edit.target_label, answer=edit.target,
                                                  attribute=edit.attribute)

    def active_for(self, edit: EditRequest) -> list[EditRequest]:
        """The edits an evaluation prompt of ``edit`` sees: all applied so far, or ``edit`` alone after
        :meth:`apply_many`."""
        return [edit] if self.independent else self.active

    def system_prompt(self, active: Sequence[EditRequest] | None = None) -> str:
        active = self.active if active is None else active
        lines = [self.hparams.system_header.strip()] + [self.instruction(e) for e in active]
        return "\n".join(line for line in lines if line)

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        self.active.append(edit)
        return {"steps": 0, "loss": None}

    def apply_many(self, edits: Sequence[EditRequest]) -> list[dict[str, Any]]:
        if self.active:
            raise RuntimeError(f"{self.name}: apply_many needs no edit applied before (call reset)")
        stats = [self.apply(edit) for edit in edits]
        self.independent = True
        return stats

    def rewrite_prompts(self, prompts: Sequence[Prompt], edit: EditRequest) -> list[Prompt]:
        system = self.system_prompt(self.active_for(edit))
        return [p.with_system(system) for p in prompts]

    def reset(self) -> None:
        self.active.clear()
        self.independent = False
