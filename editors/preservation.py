"""Preservation prompts: what a method that trains an LLM layer keeps unchanged beside its edit (UnKE, WISE).

Per edit, ``preserve_text`` text prompts then ``preserve_audio`` audio prompts (the paper's Table 6: 20 + 5 for
UnKE): locality items of *other instances of the train split* drawn with a per-edit seeded RNG from every attribute
config (``preserve_source: train``; audio items labelled with the edit's original or target label skipped), or the
edit instance's own locality items (``preserve_source: instance``).
"""

from __future__ import annotations

import logging
import random
from typing import Protocol, runtime_checkable

from editors.base import EditRequest, Editor, RunContext
from editors.models.base import Prompt, as_audio_array
from sake_core.errors import ConfigError
from sake_core.protocol import ATTRIBUTES

logger = logging.getLogger(__name__)



def _label_set(edit: EditRequest) -> set[str]:
    return {edit.original_label.strip().lower(), edit.target_label.strip().lower()}


def _instance_items(edit: EditRequest) -> tuple[list[Prompt], list[Prompt]]:
    """(text prompts, audio prompts) of the edit instance's own locality items."""
    row = edit.row or {}
    text = [Prompt(question=it["question"]) for it in (row.get("locality_text") or [])]
    audio = [Prompt(question=it["question"], audio=as_audio_array(it["audio"], where=f"{it['id']}: audio"))
             for it in (row.get("locality_audio") or []) if it.get("audio") is not None]
    return text, audio


def preservation_prompts(edit: EditRequest, context: RunContext, n_text: int, n_audio: int, *,
                         source: str = "train", seed: int = 0) -> list[Prompt]:
    """``n_text`` text prompts then ``n_audio`` audio prompts that the edit should leave unchanged.

    ``source='train'``: locality items of random train-split instances of all attribute configs (deterministic per
    ``seed`` and instance id; audio items labelled with the edit's original or target label skipped);
    ``source='instance'``: the instance's own locality items, repeated cyclically when fewer than asked. Raises
    ConfigError for an unknown source, and for ``'train'`` without dataset access (``context.load_rows``): the edit
    would otherwise train on the very items its locality is scored on."""
    if source not in ("train", "instance"):
        raise ConfigError(f"preserve_source={source!r}; expected 'train' or 'instance'")
    load_rows = context.load_rows
    if source == "train" and load_rows is None:
        raise ConfigError("preserve_source: train needs the dataset's train split, and this edit has no dataset "
                          "access: pass dataset= to sake.editing (a run has it), or set preserve_source: instance "
                          "(the edit's own locality items: not the paper's protocol)")
    if source == "instance" or load_rows is None:  # (None only with source instance: refused above for train)
        text, audio = _instance_items(edit)
        return _cycle(text, n_text) + _cycle(audio, n_audio)
    rng = random.Random(f"{seed}:{edit.instance_id}")
    tables = []
    for config in ATTRIBUTES:
        try:
            tables.append(load_rows(config, "train"))
        except ValueError as exc:
            logger.warning("preservation data: cannot load %s/train (%s)", config, exc)
    refs = [(t, i) for t in tables for i in range(len(t))]
    if not refs:
        logger.warning("preservation data: no train rows; using the instance's own locality items")
        text, audio = _instance_items(edit)
        return _cycle(text, n_text) + _cycle(audio, n_audio)
    exclude = _label_set(edit)
    text_prompts: list[Prompt] = []
    order = list(range(len(refs)))
    rng.shuffle(order)
    for k in order:
        if len(text_prompts) >= n_text:
            break
        table, i = refs[k]
        for item in table.select_columns(["locality_text"])[i]["locality_text"] or []:
            text_prompts.append(Prompt(question=item["question"]))
            break
    audio_prompts: list[Prompt] = []
    rng.shuffle(order)
    for k in order:
        if len(audio_prompts) >= n_audio:
            break
        table, i = refs[k]
        items = [it for it in table.select_columns(["locality_audio"])[i]["locality_audio"] or []
                 if it.get("audio") is not None and str(it.get("label", "")).strip().lower() not in exclude]
        if items:
            item = items[rng.randrange(len(items))]
            audio_prompts.append(Prompt(question=item["question"],
                                        audio=as_audio_array(item["audio"], where=f"{item['id']}: audio")))
    return text_prompts[:n_text] + audio_prompts[:n_audio]


@runtime_checkable
class PreservationSettings(Protocol):
    """The hyperparameters of a method that trains on preservation prompts (its hparams dataclass has them)."""

    preserve_text: int
    preserve_audio: int
    preserve_source: str


def editor_preservation(editor: Editor, edit: EditRequest) -> list[Prompt]:
    """The preservation prompts ``editor`` trains ``edit`` with: its hparams' ``preserve_text``, ``preserve_audio``
    and ``preserve_source`` (:class:`PreservationSettings`), drawn from its run context with the run's seed."""
    hp = editor.hparams
    if not isinstance(hp, PreservationSettings):
        raise TypeError(f"{type(hp).__name__} has no preservation settings (preserve_text, preserve_audio, "
                        "preserve_source)")
    return preservation_prompts(edit, editor.context, hp.preserve_text, hp.preserve_audio,
                                source=hp.preserve_source, seed=editor.context.seed)


def _cycle(prompts: list[Prompt], n: int) -> list[Prompt]:
    if not prompts or n <= 0:
        return []
    return [prompts[i % len(prompts)] for i in range(n)] if n > len(prompts) else prompts[:n]
