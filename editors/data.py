"""Reading SAKE instance rows (ARCHITECTURE.md "Dataset") for the runner and the methods.

:func:`load_instances` loads one config/split (local directory or Hub id) and checks its columns;
:func:`eval_items` flattens an instance into the items that evaluate it (reliability first, then generality,
audio locality, text locality, portability), each with its dimension, type, reference and prompt.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from editors.models.base import Prompt, as_audio_array
from sake_core.protocol import CONFIGS, INSTANCE_COLUMNS, ITEM_COLUMNS, ITEM_FIELDS, SEQUENTIAL_COLUMNS, SEQUENTIAL_CONFIG
from sake_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class EvalItem:
    """One evaluated item of an instance, ready to prompt the model and to become a prediction row."""

    item_id: str
    dimension: str
    type: int
    question: str
    options: list[str]
    reference: str
    category: str
    audio: np.ndarray | None

    def prompt(self) -> Prompt:
        return Prompt(question=self.question, audio=self.audio)


def _is_local(dataset: str) -> bool:
    return Path(dataset).exists()


def load_instances(dataset: str, config: str, split: str) -> Any:
    """The instance rows of ``config``/``split`` as a ``datasets.Dataset`` (audio decoded on access).

    Raises ValueError for an unknown config, a missing split or missing columns (naming the dataset)."""
    import datasets

    if config not in CONFIGS:
        raise ConfigError(f"unknown config {config!r}; expected one of {list(CONFIGS)}")
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except FileNotFoundError as exc:
        raise DataError(f"{dataset}: dataset not found ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; report them uniformly
        raise DataError(f"{dataset}: cannot load config {config!r} split {split!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    expected = SEQUENTIAL_COLUMNS if config == SEQUENTIAL_CONFIG else INSTANCE_COLUMNS
    missing = [c for c in expected if c not in ds.column_names]
    if missing:
        raise DataError(f"{dataset} [{config}/{split}]: missing column(s) {missing}; expected the SAKE instance "
                         f"schema (ARCHITECTURE.md) with columns {list(expected)}")
    return ds


def dataset_fingerprint(dataset: str) -> str | None:
    """The release fingerprint from ``sake_manifest.json`` (local directory), None when unavailable."""
    path = Path(dataset) / "sake_manifest.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()).get("fingerprint")
        except json.JSONDecodeError:
            logger.warning("%s: unreadable manifest", path)
            return None
    if not _is_local(dataset):
        try:
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(dataset, "sake_manifest.json", repo_type="dataset")
            return json.loads(Path(local).read_text()).get("fingerprint")
        except Exception:  # noqa: BLE001 - the fingerprint is optional provenance
            return None
    return None


def _item(entry: dict[str, Any], dimension: str, where: str) -> EvalItem:
    missing = [f for f in ITEM_FIELDS if f not in entry]
    if missing:
        raise DataError(f"{where}: item lacks field(s) {missing}")
    audio = entry.get("audio")
    return EvalItem(item_id=entry["id"], dimension=dimension, type=int(entry["type"] or 0),
                    question=entry["question"], options=list(entry["options"] or []), reference=entry["answer"],
                    category=entry.get("category") or "",
                    audio=as_audio_array(audio, where=f"{entry['id']}: audio") if audio is not None else None)


def eval_items(row: dict[str, Any]) -> list[EvalItem]:
    """All items that evaluate an instance: reliability (``{id}/rel``) then its linked items in column order."""
    items = [EvalItem(item_id=f"{row['id']}/rel", dimension="reliability", type=0, question=row["question"],
                      options=list(row["options"]), reference=row["answer"], category="",
                      audio=as_audio_array(row["audio"], where=f"{row['id']}: audio"))]
    for column in ITEM_COLUMNS:  # each column holds the items of the dimension of the same name
        for entry in row[column] or []:
            items.append(_item(entry, column, f"{row['id']}.{column}"))
    return items


def group_sequences(rows: Iterable[dict[str, Any]]) -> list[tuple[str, list[int]]]:
    """Sequential config: (sequence_id, row indices sorted by step) in order of first appearance.

    ``rows`` needs only ``sequence_id`` and ``step`` (pass ``ds.select_columns([...])`` to skip audio decoding)."""
    order: dict[str, list[tuple[int, int]]] = {}
    for index, row in enumerate(rows):
        order.setdefault(row["sequence_id"], []).append((int(row["step"]), index))
    out = []
    for seq, steps in order.items():
        steps.sort()
        numbers = [s for s, _ in steps]
        if numbers != list(range(1, len(numbers) + 1)):
            raise DataError(f"sequence {seq}: steps {numbers} are not 1..{len(numbers)}")
        out.append((seq, [i for _, i in steps]))
    return out
