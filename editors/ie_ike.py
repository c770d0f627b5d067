"""IE-IKE: I-IKE's instruction plus demonstrations from the train split (paper §4.1, App. D.2).

For an edit (y_o -> y_e) of attribute a, a train instance with the same attribute and the same (y_o, y_e) pair is
retrieved (ties broken by a seeded draw; if none exists and ``fallback`` is on: same target label, then any
instance of the attribute). Its reliability item, 3 generality items, 4 audio-locality items (3 for gender) and 1
text-locality item become a multi-turn dialogue before the question: edited items answered with their (edited)
reference, locality items with their ground truth. In sequential mode the demonstrations of all active edits are
concatenated, oldest first. Several edits per pass: each edit's prompts carry its own demonstrations only
(:meth:`editors.i_ike.IIKE.apply_many`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence

from editors.base import EditRequest
from editors.registry import register
from editors.data import eval_items
from editors.i_ike import IIKE, IIKEHparams
from editors.models.base import Prompt, Turn
from sake_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class IEIKEHparams(IIKEHparams):
    """I-IKE's settings plus where demonstrations come from and how many of each dimension an edit gets."""

    bounds = {"demo_reliability": "non_negative", "demo_generality": "non_negative",
              "demo_locality_audio": "non_negative", "demo_locality_text": "non_negative"}

    train_split: str
    demo_reliability: int
    demo_generality: int
    demo_locality_audio: int
    demo_locality_text: int
    fallback: bool


@register("ie_ike")
class IEIKE(IIKE):
    """Instruction + example in-context editing."""

    hparams_class = IEIKEHparams
    hparams: IEIKEHparams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._train: dict[str, Any] = {}  # attribute -> train rows (a datasets.Dataset: audio decoded on access)
        self._demos: dict[str, tuple[Turn, ...]] = {}  # edit instance id -> its demonstration turns
        self.fallbacks = 0

    def _train_rows(self, attribute: str) -> Any:
        if attribute not in self._train:
            if self.context.load_rows is None:
                raise ConfigError("ie_ike needs the dataset's train split for its demonstrations: pass dataset= to "
                                  "sake.editing (a run has it)")
            self._train[attribute] = self.context.load_rows(attribute, self.hparams.train_split)
        return self._train[attribute]

    def retrieve(self, edit: EditRequest) -> dict[str, Any]:
        """The train instance whose demonstrations teach this edit (see the module docstring)."""
        rows = self._train_rows(edit.attribute)
        labels = rows.select_columns(["original_label", "target_label"]) if hasattr(rows, "select_columns") \
            else rows
        same_pair, same_target, any_row = [], [], []
        for index, row in enumerate(labels):
            any_row.append(index)
            if row["target_label"] == edit.target_label:
                same_target.append(index)
                if row["original_label"] == edit.original_label:
                    same_pair.append(index)
        for tier, candidates in enumerate((same_pair, same_target, any_row)):
            if candidates:
                if tier > 0:
                    if not self.hparams.fallback:
                        break
                    self.fallbacks += 1
                    logger.info("%s: no train instance with pair (%s, %s); using tier-%d fallback",
                                edit.instance_id, edit.original_label, edit.target_label, tier)
                rng = random.Random(f"{self.context.seed}:{edit.instance_id}")
                return rows[candidates[rng.randrange(len(candidates))]]
        raise DataError(f"{edit.instance_id}: no train instance of attribute {edit.attribute!r} with pair "
                         f"({edit.original_label}, {edit.target_label})")

    def demonstrations(self, edit: EditRequest) -> tuple[Turn, ...]:
        if edit.instance_id not in self._demos:
            row = self.retrieve(edit)
            hp = self.hparams
            quota = {"reliability": hp.demo_reliability, "generality": hp.demo_generality,
                     "locality_audio": hp.demo_locality_audio, "locality_text": hp.demo_locality_text,
                     "portability": 0}
            used = {k: 0 for k in quota}
            turns = []
            for item in eval_items(row):
                if used[item.dimension] < quota[item.dimension]:
                    used[item.dimension] += 1
                    turns.append(Turn(question=item.question, answer=item.reference, audio=item.audio))
            self._demos[edit.instance_id] = tuple(turns)
        return self._demos[edit.instance_id]

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        self.demonstrations(edit)
        return super().apply(edit)

    def rewrite_prompts(self, prompts: Sequence[Prompt], edit: EditRequest) -> list[Prompt]:
        active_edits = self.active_for(edit)
        system = self.system_prompt(active_edits)
        history: list[Turn] = []
        for active in active_edits:
            history.extend(self.demonstrations(active))
        return [p.with_system(system).with_history(history) for p in prompts]

    def reset(self) -> None:
        super().reset()
        self._demos.clear()
