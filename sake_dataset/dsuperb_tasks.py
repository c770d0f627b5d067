"""Which SAKE attributes a Dynamic-SUPERB Phase-2 task is about: the checked-in table `dsuperb_tasks.yaml` first,
keywords in the task name and instruction only for tasks missing from it (reported as "unlisted").

Type-4 audio locality (§3.3) never draws a task about the edited attribute; unlisted tasks are left out of every
type-4 pool unless the build allows them (then their keyword guess decides).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from .labels import ATTRIBUTES
from .records import SourceError
from .sources.common import read_text

TASK_TABLE_PATH = Path(__file__).resolve().parent / "dsuperb_tasks.yaml"

# Fallback only (tasks missing from the table): keywords in the task name or instruction.
TASK_ATTRIBUTE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "gender": ("gender", "male", "female", "sex"),
    "emotion": ("emotion", "emotional", "sentiment", "affect", "mood"),
    "language": ("language", "lingual", "lid", "accent", "dialect"),
    "animal": ("animal", "bird", "species", "dog", "cat", "frog", "insect", "esc50", "esc-50",
               "environmental sound", "sound event", "vocalization"),
}


def keyword_attributes(task: str, instruction: str = "") -> frozenset[str]:
    """Attributes guessed from keywords in a task's name (CamelCase split) or instruction."""
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", task).lower().replace("_", " ")
    text = f" {name} {instruction.lower()} "
    found = set()
    for attribute, words in TASK_ATTRIBUTE_KEYWORDS.items():
        for word in words:
            if re.search(r"(?<![a-z])" + re.escape(word) + r"(?![a-z])", text):
                found.add(attribute)
    return frozenset(found)


@dataclass(frozen=True)
class TaskTable:
    """Task name -> attributes it is about; `allow_unlisted` lets keyword-guessed tasks into type-4 pools."""

    entries: Mapping[str, frozenset[str]]
    allow_unlisted: bool = False
    sources: tuple[str, ...] = ()
    _folded: dict[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._folded.update({name.lower(): attrs for name, attrs in self.entries.items()})

    def lookup(self, task: str) -> frozenset[str] | None:
        """The table's attributes of `task` (exact, then case-insensitive name), None when unlisted."""
        if task in self.entries:
            return self.entries[task]
        return self._folded.get(task.lower())

    def attributes(self, task: str, instruction: str = "") -> frozenset[str]:
        """The table's entry, or the keyword guess for an unlisted task."""
        listed = self.lookup(task)
        return listed if listed is not None else keyword_attributes(task, instruction)

    def allowed(self, task: str, instruction: str, attribute: str) -> bool:
        """May a row of `task` be a type-4 item for an edit of `attribute`?"""
        listed = self.lookup(task)
        if listed is None:
            return self.allow_unlisted and attribute not in keyword_attributes(task, instruction)
        return attribute not in listed

    def unlisted(self, tasks: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        """{task: keyword-guessed attributes} of the (task, instruction) pairs missing from the table."""
        out: dict[str, set[str]] = {}
        for task, instruction in tasks:
            if self.lookup(task) is None:
                out.setdefault(task, set()).update(keyword_attributes(task, instruction))
        return {task: sorted(attrs) for task, attrs in sorted(out.items())}


def _read_entries(path: Path) -> dict[str, frozenset[str]]:
    try:
        data = yaml.safe_load(read_text(path, "a Dynamic-SUPERB task table (YAML)"))
    except yaml.YAMLError as exc:
        raise SourceError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise SourceError(f"{path}: field 'tasks' missing (expected a mapping task name -> list of attributes)")
    entries = {}
    for name, attrs in tasks.items():
        attrs = [] if attrs is None else attrs
        if isinstance(attrs, str):
            attrs = [attrs]
        bad = [a for a in attrs if a not in ATTRIBUTES] if isinstance(attrs, list) else [attrs]
        if bad:
            raise SourceError(f"{path}: field 'tasks.{name}' must be a list of attributes from {list(ATTRIBUTES)}, "
                              f"got {bad}")
        entries[str(name)] = frozenset(attrs)
    return entries


@functools.lru_cache(maxsize=8)
def load_task_table(extra: tuple[str, ...] = (), allow_unlisted: bool = False) -> TaskTable:
    """The checked-in table, updated by each file in `extra` in order (later entries override earlier ones)."""
    entries = _read_entries(TASK_TABLE_PATH)
    for path in extra:
        entries.update(_read_entries(Path(path)))
    return TaskTable(entries, allow_unlisted, (str(TASK_TABLE_PATH), *map(str, extra)))


def task_attributes(task: str, instruction: str = "", table: TaskTable | None = None) -> frozenset[str]:
    """Attributes a Dynamic-SUPERB task is about: the table's entry, else the keyword guess."""
    return (table or load_task_table()).attributes(task, instruction)
