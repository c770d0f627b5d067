"""Normalized source records: what every reader in `sake_dataset.sources` returns.

A reader turns one source layout (SAKURA, Dynamic-SUPERB, MMLU, a labelled-audio pool) into these plain, frozen
records; the builder (`sake_dataset.construction`) only ever sees records, never files or source layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sake_core.errors import DataError


class SourceError(DataError):
    """A source does not have the expected layout; the message names the file, the field and what was expected."""


class ConstructionError(DataError):
    """The sources or the requested sizes cannot satisfy a construction rule (message says which and why)."""


@dataclass(frozen=True)
class AudioRef:
    """One audio file: where it lives (or its bytes, for Hub rows), its content hash and its duration.

    `sha256` hashes the file's bytes, so the same recording under two names is recognised as the same audio.
    """

    path: str
    sha256: str
    duration: float
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.replace("\\", "/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class LabelledClip:
    """An audio clip with its canonical attribute label (a SAKURA track row or a pool clip).

    `question`/`options`/`answer` are SAKURA's single-hop attribute question (options inline in the question,
    `answer` the option text of the true label); pool clips have none (`question == ""`): the builder makes
    them from the question banks.
    """

    attribute: str
    label: str
    audio: AudioRef
    source: str  # provenance id, e.g. "sakura:Emotion/1078_IEO_ANG_HI.wav"
    origin: str  # "sakura" or a pool preset name ("crema_d", "esc50", ...)
    question: str = ""
    options: tuple[str, ...] = ()
    answer: str = ""
    multi_question: str = ""
    multi_answer: str = ""
    multi_category: str = ""  # knowledge category of the multi-hop question when the source names it


@dataclass(frozen=True)
class TaskClip:
    """A Dynamic-SUPERB Phase-2 row: task name, instruction (the question), audio and reference label."""

    task: str
    instruction: str
    label: str
    audio: AudioRef
    source: str


@dataclass(frozen=True)
class TextQuestion:
    """An MMLU row (cais/mmlu columns): question, subject, choices, index of the right choice."""

    subject: str
    question: str
    choices: tuple[str, ...]
    answer_index: int
    source: str
