"""The SAKE schema: configs, splits, item kinds and dimensions, the `datasets.Features` of a row, and the Table 1
composition identities (what one instance carries, how totals are counted)."""

from __future__ import annotations

from typing import Any, Iterable

from datasets import Audio, Features, List, Value
from sake_core.protocol import (ATTRIBUTES, COLUMN_OF_KIND, CONFIGS, DIMENSION_OF_KIND, ITEM_KINDS,  # noqa: F401
                           SAMPLING_RATE, SPLITS)  # (re-exported: configs, splits, item kinds, dimensions)

item_kinds = ITEM_KINDS



# --------------------------------------------------------------------------------------------------- schema

def _item_fields(with_audio: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"id": Value("string"), "type": Value("int32")}
    if with_audio:
        fields["audio"] = Audio(sampling_rate=SAMPLING_RATE)
    fields.update({
        "question": Value("string"), "options": List(Value("string")), "answer": Value("string"),
        "attribute": Value("string"), "label": Value("string"), "category": Value("string"),
        "source": Value("string"),
    })
    return fields


def features(sequential: bool = False) -> Features:
    """The `datasets.Features` of one instance row (attribute configs, or `sequential=True`)."""
    item = _item_fields(with_audio=True)
    text_item = _item_fields(with_audio=False)
    fields: dict[str, Any] = {
        "id": Value("string"), "attribute": Value("string"), "split": Value("string"),
        "original_label": Value("string"), "target_label": Value("string"),
        "audio": Audio(sampling_rate=SAMPLING_RATE), "question": Value("string"),
        "options": List(Value("string")), "answer": Value("string"), "source": Value("string"),
        "generality": List(item), "locality_audio": List(item), "locality_text": List(text_item),
        "portability": List(item),
    }
    if sequential:
        fields.update({"sequence_id": Value("string"), "step": Value("int32"), "source_instance": Value("string")})
    return Features(fields)


def expected_kinds(attribute: str, split: str) -> tuple[str, ...]:
    """Item kinds one instance carries (Table 1): no type-2 locality for gender, portability in test only."""
    kinds = [k for k in ITEM_KINDS if not (attribute == "gender" and k == "loc_audio2")]
    if split != "test":
        kinds.remove("port")
    return tuple(kinds)


def expected_totals(instances_per_attribute: int, split: str) -> tuple[int, int, int]:
    """(instances, audio inputs, QA pairs) of one split of the single-editing configs (Table 1 identities)."""
    n_inst = n_audio = n_qa = 0
    for attribute in ATTRIBUTES:
        kinds = expected_kinds(attribute, split)
        n_inst += instances_per_attribute
        n_qa += instances_per_attribute * len(kinds)
        n_audio += instances_per_attribute * sum(1 for k in kinds if k != "loc_text")
    return n_inst, n_audio, n_qa


PAPER_TOTALS = {"test": (300, (1200, 10500, 11700)), "train": (1000, (4000, 31000, 35000))}


def item_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """All items of an instance row in ITEM_KINDS order, the reliability item first (as an Item dict)."""
    rel = {"id": f"{row['id']}/rel", "type": 0, "audio": row["audio"], "question": row["question"],
           "options": row["options"], "answer": row["answer"], "attribute": row["attribute"],
           "label": row["original_label"], "category": "", "source": row["source"]}
    return [rel] + row["generality"] + row["locality_audio"] + row["locality_text"] + row["portability"]


def count_totals(rows: Iterable[dict[str, Any]]) -> tuple[int, int, int]:
    """(instances, audio inputs, QA pairs) counted per item (Table 1)."""
    n_inst = n_audio = n_qa = 0
    for row in rows:
        n_inst += 1
        for it in item_rows(row):
            n_qa += 1
            n_audio += "audio" in it
    return n_inst, n_audio, n_qa
