"""Portability questions (§3.3, App. I): built on SAKURA's multi-hop questions when the source carries them, with
the curated knowledge file (`portability_knowledge.yaml`) as the fallback.

A SAKURA multi-hop question about a clip labelled y carries a fact linked to y (e.g. "what does this animal eat?"
answered for a cow). Asked of the edited audio of an edit y_o -> y_e, a question taken from a y_e clip has the
answer the edit should produce. Questions whose answer also holds for y_o are excluded (paper: no "tail" when
editing dog -> cat): evidence is SAKURA's own answer to the same question for y_o clips, and the curated file's
y_o answer in the same knowledge category. Each question gets a knowledge category of App. I.1: the source's own
category when it names one, else the category of the curated question with the same wording, else keywords of
the question (`CATEGORY_KEYWORDS`), else "other".
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from .knowledge import PortabilityCategory
from .labels import split_options
from .records import LabelledClip

ORIGIN_SAKURA = "sakura_multi_hop"
ORIGIN_CURATED = "curated_knowledge"
MULTI_HOP_MARK = " | multi-hop: "  # portability item `source` = audio provenance + this + question provenance
MODES = ("auto", "sakura", "curated")

# App. I.1 categories, checked in this order; the first whose keyword occurs in the question wins.
CATEGORY_KEYWORDS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "animal": (("reproduction", ("reproduc", "offspring", "lay eggs", "give birth", " young")),
               ("diet", ("diet", " eat", " food", " feed", "herbivor", "carnivor", "omnivor")),
               ("locomotion", ("locomotion", " move", " moving", " walk", " fly", " swim", " hop")),
               ("care_item", (" care", " owner", " item", "supplies")),
               ("family", ("family", "related", "relative", "taxonom", "closest")),
               ("vocalization", ("vocaliz", "what sound", "which sound", " call", "noise it", "sound it makes")),
               ("physical", ("physical", " body", " trait", "feature", "claws", "hooves", "feathers")),
               ("behavior", ("behavio", "habit", "typically", "known for"))),
    "emotion": (("facial_expression", ("facial", " face", "expression")),
                ("social_interaction", (" react", "respond", "response", "interact", "should you")),
                ("scenario", ("happened", "situation", "scenario", " event")),
                ("descriptive_sentence", ("statement", "sentence", " say", "likely make"))),
    "gender": (("title", (" title", " address", "honorific")),
               ("cloth", ("cloth", " wear", "garment", " dress", "attire")),
               ("vocal", ("vocal", "voice type", " range", " pitch")),
               ("history", ("histor",)),
               ("celebrity", ("celebrit", "famous", " actor", "actress", " singer"))),
    "language": (("iso", (" iso", " code")), ("city", (" city", " cities")), ("dish", (" dish", "cuisine", " food")),
                 ("history", ("histor",)), ("literary", (" book", " novel", "literar", "literature", "written")),
                 ("test", (" test", " exam", "proficiency")), ("translation", ("translat", "word for", "how do you say")),
                 ("language_family", ("family",)), ("official_language", ("official", "country"))),
}


@dataclass(frozen=True)
class MultiHopQuestion:
    """One SAKURA multi-hop question: asked about a clip labelled `label`, `answer` is its right option text."""

    attribute: str
    label: str
    stem: str
    options: tuple[str, ...]
    answer: str
    category: str
    source: str


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def categorize(attribute: str, stem: str, curated: dict[str, PortabilityCategory] | None = None,
               given: str = "") -> str:
    """Knowledge category of a question: the source's, the curated question's, the keywords', or "other"."""
    if given.strip():
        return given.strip().lower().replace(" ", "_")
    for name, cat in sorted((curated or {}).items()):
        if any(_key(q) == _key(stem) for q in cat.questions):
            return name
    text = " " + stem.lower() + " "
    for name, words in CATEGORY_KEYWORDS[attribute]:
        if any(w in text for w in words):
            return name
    return "other"


def _answer_text(answer: str, options: Sequence[str]) -> str | None:
    """The option text a SAKURA answer names: "(b) text", "(b)", "b" or the text itself."""
    answer = answer.strip()
    m = re.match(r"^\(?([a-z])\)?(?:\s|$)", answer)
    if m and "abcdefghijklmnopqrstuvwxyz".index(m.group(1)) < len(options):
        return options["abcdefghijklmnopqrstuvwxyz".index(m.group(1))]
    return next((o for o in options if _key(o) == _key(answer)), None)


def multi_hop_questions(clips: Iterable[LabelledClip], curated: dict[str, dict[str, PortabilityCategory]]
                        ) -> tuple[list[MultiHopQuestion], Counter]:
    """The usable multi-hop questions of SAKURA clips, and a count of skipped ones by reason."""
    out: list[MultiHopQuestion] = []
    skipped: Counter[str] = Counter()
    for clip in clips:
        if not clip.multi_question.strip():
            continue
        stem, options = split_options(clip.multi_question)
        answer = _answer_text(clip.multi_answer, options) if len(options) >= 2 else None
        if answer is None:
            skipped["no inline options or answer not among them"] += 1
            continue
        category = categorize(clip.attribute, stem, curated.get(clip.attribute), clip.multi_category)
        out.append(MultiHopQuestion(clip.attribute, clip.label, stem, options, answer, category, clip.source))
    return out, skipped


class PortabilityBank:
    """SAKURA multi-hop questions by (attribute, label), with what each question's answer is for every label."""

    def __init__(self, questions: Sequence[MultiHopQuestion], curated: dict[str, dict[str, PortabilityCategory]]):
        self.curated = curated
        self.by_label: dict[tuple[str, str], list[MultiHopQuestion]] = defaultdict(list)
        self.answers: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for q in sorted(questions, key=lambda q: q.source):
            self.by_label[(q.attribute, q.label)].append(q)
            self.answers[(q.attribute, _key(q.stem))][q.label].add(_key(q.answer))

    def attributes(self) -> set[str]:
        return {a for a, _ in self.by_label}

    def holds_for(self, q: MultiHopQuestion, label: str) -> bool:
        """Is q's answer also right for `label` (SAKURA's answer for label's clips, or the curated answer)?"""
        answer = _key(q.answer)
        if answer in self.answers[(q.attribute, _key(q.stem))].get(label, set()):
            return True
        cat = self.curated.get(q.attribute, {}).get(q.category)
        if cat is not None and label in cat.answers:
            same = {_key(cat.answers[label]), *(_key(a) for a in cat.alternatives.get(label, ()))}
            return answer in same
        return False

    def eligible(self, attribute: str, y_o: str, y_e: str) -> list[MultiHopQuestion]:
        """Questions about y_e clips whose answer does not also hold for y_o."""
        return [q for q in self.by_label.get((attribute, y_e), []) if not self.holds_for(q, y_o)]
