"""Portability questions (§3.3, App. I): built on SAKURA's multi-hop questions when the source carries them, with
the curated knowledge file (`portability_knowledge.yaml`) as the fallback.

A SAKURA multi-hop question about a clip labelled y carries a fact linked to y (e.g. "what does this animal eat?"
answered for a cow). Asked of the edited audio of an edit y_o -> y_e, a question taken from a y_e clip has the
answer the edit should produce.

Exclusion (paper: no "tail" when editing dog -> cat): a question is dropped for the pair (y_o, y_e) when the
knowledge for y_o answers it the same way. That knowledge is every answer SAKURA gives for y_o clips in the
question's knowledge category, plus the curated file's y_o answer (and alternatives) in that category; answers are
compared by meaning after `normalize_answer` (case, accents, punctuation, articles, plural, the synonyms of
`ANSWER_SYNONYMS`). A yes/no answer only states a fact together with its question, so it is compared with y_o's
answers to the same question only.

Categories are the paper's App. I.1 list (`CATEGORIES`), with no catch-all: the source's own category when it
names one of them, else the rule of `categorize` (what the question asks for: the noun after which/what/who, then
clue words of the whole question); a question that fits none is skipped and counted.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from .knowledge import PortabilityCategory
from .labels import LABELS, split_options
from .records import LabelledClip

ORIGIN_SAKURA = "sakura_multi_hop"
ORIGIN_CURATED = "curated_knowledge"
MULTI_HOP_MARK = " | multi-hop: "  # portability item `source` = audio provenance + this + question provenance
MODES = ("auto", "sakura", "curated")
NO_CATEGORY = "question fits no knowledge category of App. I.1"

# Paper App. I.1: the knowledge categories of each attribute (Tables 14-17 columns).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("behavior", "care_item", "diet", "family", "locomotion", "physical", "reproduction", "vocalization"),
    "emotion": ("descriptive_sentence", "facial_expression", "scenario", "social_interaction"),
    "gender": ("history", "celebrity", "cloth", "title", "vocal"),
    "language": ("iso", "city", "dish", "history", "language_family", "literary", "official_language", "test",
                 "translation"),
}

# The categorization rule, per attribute, in priority order: (category, ASKED, CLUE). ASKED is matched against the
# words right after each which/what/who of the question (the thing asked for: "which of the listed *sounds*");
# when no such phrase names a category, CLUE is matched against the whole question. Context words that every
# question of an attribute carries ("sound", "country", "voice", "emotion") are deliberately absent from CLUE.
CATEGORY_RULES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "animal": (
        ("care_item", r"\bitems?\b|\bsupplies\b|\bequipment\b|\btools?\b", r"\bcare\b|\bcaring\b|well-being"),
        ("diet", r"\bdiet|\bfoods?\b|\beat|\bconsum", r"\bdiet|\bfeeding\b|\beats?\b|\bconsum"),
        ("reproduction", r"reproduc", r"reproduc|offspring|\bgives? birth\b"),
        ("family", r"\banimals?\b|\brelatives?\b|\bspecies\b",
         r"taxonom|phylogen|linnaean|lineage|\bclosely related\b"),
        ("locomotion", r"locomotion|\bmovement|\bmode of", r"locomotion|\bmov(?:e|es|ing|ement)\b"),
        ("physical", r"physical|\bfeatures?\b|\btraits?\b|\battributes?\b|\bbody\b", r"physical|\bappearance\b"),
        ("vocalization", r"vocali[sz]|\bsounds?\b|\bcalls?\b|\bnoises?\b", r"vocali[sz]|\bcalls?\b"),
        ("behavior", r"behavio|\bactions?\b|\bhabits?\b", r"behavio|\bacts?\b|\bknown for\b"),
    ),
    "emotion": (
        ("facial_expression", r"\bfacial\b|\bexpressions?\b|\bfaces?\b", r"\bfacial\b"),
        ("social_interaction", r"\bsocial\b|\binteractions?\b|\bresponses?\b|\breactions?\b",
         r"\bsocial\b|\binteract|\brespond\b|\breact\b"),
        ("scenario", r"\bscenarios?\b|\bsituations?\b|\bevents?\b", r"\bscenarios?\b|\bsituations?\b|\bhappened\b"),
        ("descriptive_sentence", r"\bsentences?\b|\bstatements?\b|\bphrases?\b|\bquotes?\b",
         r"\bsentences?\b|\bsay\b|\bexpress themselves\b"),
    ),
    "gender": (
        ("title", r"\btitles?\b|\baddress\b|\bdesignations?\b|\blabels?\b|\bhonorifics?\b",
         r"\btitles?\b|\baddress(?:ed)?\b"),
        ("cloth", r"cloth|\battire\b|\bgarments?\b|\bdress", r"cloth|\battire\b"),
        ("vocal", r"\bvocal\b|\branges?\b|\bpitch\b|\bvoice types?\b|\bsinging\b",
         r"\bvocal ranges?\b|\bvoice types?\b"),
        ("history", r"histor", r"histor"),
        # a question asking "who among ..." that does not say historical asks for a well-known person
        ("celebrity", r"celebrit|\bfamous\b|\bactors?\b|\bactress|\bsingers?\b", r"celebrit|\bwho among\b"),
    ),
    "language": (
        ("iso", r"\biso\b|\bcodes?\b", r"\biso\b|\bcodes?\b"),
        ("translation", r"translat|\bwords?\b|\bphrases?\b", r"translat|(?<!\w)'[^']+'(?!\w)"),
        ("language_family", r"\bfamil(?:y|ies)\b", r"\bfamil(?:y|ies)\b"),
        ("test", r"\btests?\b|\bexams?\b", r"\btests?\b|\bexams?\b|\bproficiency\b"),
        ("literary", r"\bbooks?\b|literar|\bnovels?\b|\bclassics?\b|\bworks?\b",
         r"\bbooks?\b|literar|\bnovels?\b|\bauthored\b|\bwritten\b"),
        ("dish", r"\bdish(?:es)?\b|\bfoods?\b|\bcuisines?\b", r"\bdish(?:es)?\b|\bcuisine\b|\bculinary\b"),
        ("city", r"\bcit(?:y|ies)\b", r"\bcit(?:y|ies)\b"),
        ("history", r"histor|\bfigures?\b|\bpersons?\b|\bpeople\b", r"histor|\bfigures?\b|\bwho\b"),
        ("official_language", r"\bcountr(?:y|ies)\b|\bnations?\b", r"\bcountr(?:y|ies)\b|\bnations?\b|\bofficial"),
    ),
}
# "which|what|who", an optional "of/among the|these|those [following|listed|provided|given]", then up to three
# words (the thing asked for; a quoted word or a verb such as "is"/"does"/"would" ends it)
_ASKED = re.compile(r"\b(?:which|what|who)\b(?:\s+(?:of|among)\s+(?:the|these|those)\b"
                    r"(?:\s+(?:following|listed|provided|given)\b)?)?((?:\s+[\w-]+){0,3})")
_VERBS = {"is", "are", "was", "were", "be", "do", "does", "did", "would", "could", "should", "can", "will", "may",
          "might", "has", "have", "had", "best", "most", "more"}
_RULES = {a: tuple((name, re.compile(asked), re.compile(clue)) for name, asked, clue in rules)
          for a, rules in CATEGORY_RULES.items()}

# Spellings and synonyms met in SAKURA-style answers, per (attribute, category): canonical -> variants. Written in
# plain form; both sides go through the same normalization.
ANSWER_SYNONYMS: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    ("animal", "reproduction"): {
        "viviparous": ("live birth", "gives birth to live young", "bears live young", "viviparity"),
        "oviparous": ("lays eggs", "egg-laying", "oviparity")},
    ("animal", "diet"): {"herbivore": ("herbivorous", "plant-eater"), "carnivore": ("carnivorous", "meat-eater"),
                         "omnivore": ("omnivorous",), "insectivore": ("insectivorous", "insect-eater")},
    ("animal", "locomotion"): {"walking": ("walks", "walk"), "flying": ("flies", "fly", "flight"),
                               "swimming": ("swims", "swim"), "hopping": ("hops", "hop"),
                               "running": ("runs", "run"), "climbing": ("climbs", "climb"),
                               "slithering": ("slithers", "slither")},
    ("animal", "physical"): {"webbed feet": ("webbed foot",)},
    ("animal", "vocalization"): {"barking": ("bark", "woof"), "meowing": ("meow", "miaow"), "mooing": ("moo",),
                                 "crowing": ("crow", "cock-a-doodle-doo"), "clucking": ("cluck",),
                                 "bleating": ("bleat", "baa"), "croaking": ("croak", "ribbit"),
                                 "grunting": ("grunt", "oink"), "cawing": ("caw",), "chirping": ("chirp", "tweet")},
    ("gender", "title"): {"mr": ("mister",), "mrs": ("missus",), "madam": ("madame", "ma'am")},
    ("language", "iso"): {"de": ("deu", "ger"), "en": ("eng",), "es": ("spa",), "fr": ("fra", "fre"),
                          "it": ("ita",), "zh": ("zho", "chi"), "ja": ("jpn",), "ko": ("kor",)},
    ("language", "language_family"): {"indo-european": ("indo-european languages",),
                                      "sino-tibetan": ("sino-tibetan languages",)},
    ("language", "official_language"): {
        "ivory coast": ("côte d'ivoire",), "united kingdom": ("uk", "great britain", "britain"),
        "united states": ("usa", "us", "united states of america"), "south korea": ("republic of korea",),
        "north korea": ("dprk", "democratic people's republic of korea"),
        "china": ("people's republic of china", "prc")},
    ("language", "city"): {"seville": ("sevilla",), "naples": ("napoli",), "florence": ("firenze",),
                           "venice": ("venezia",), "rome": ("roma",), "munich": ("münchen",), "vienna": ("wien",),
                           "beijing": ("peking",)},
}
YES_NO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_ARTICLES = {"a", "an", "the"}


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


def categorize(attribute: str, stem: str, given: str = "") -> str | None:
    """Knowledge category (App. I.1) of a question: the source's own when it names one of `CATEGORIES`, else the
    rule of `CATEGORY_RULES`; None when the question fits no category."""
    named = re.sub(r"[\s-]+", "_", given.strip().lower())
    if named in CATEGORIES[attribute]:
        return named
    text = stem.lower().replace("’", "'")
    rules = _RULES[attribute]
    for match in _ASKED.finditer(text):
        words = match.group(1).split()
        asked = " ".join(words[:next((i for i, w in enumerate(words) if w in _VERBS), len(words))])
        for name, pattern, _ in rules:
            if pattern.search(asked):
                return name
    for name, _, clue in rules:
        if clue.search(text):
            return name
    return None


def _singular(word: str) -> str:
    """A plain English singular of one lower-case ASCII word ("hooves" -> "hoof", "cities" -> "city")."""
    if not word.isascii() or not word.isalpha() or len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("ves"):
        return word[:-3] + "f"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _plain(text: str) -> str:
    """Case, accents (Latin script only), punctuation, hyphens, articles and plurals folded away."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    if folded.isascii():
        text = folded
    text = re.sub(r"[-_/]", " ", text.replace("'", ""))
    words = re.sub(r"[^\w\s]", " ", text).split()
    return " ".join(_singular(w) for w in words if w not in _ARTICLES)


_SYNONYMS = {key: {_plain(v): _plain(canonical) for canonical, variants in table.items() for v in variants}
             for key, table in ANSWER_SYNONYMS.items()}


@functools.lru_cache(maxsize=65536)
def normalize_answer(text: str, attribute: str, category: str) -> str:
    """The comparable form of an answer: `_plain`, then "yes"/"no" for yes/no answers ("Yes, it does."), then the
    canonical form of a synonym of that (attribute, category)."""
    plain = _plain(text)
    if plain in YES_NO:
        return YES_NO[plain]
    lead = re.match(r"\s*(yes|no|true|false)\s*[,.;:!]", text, re.IGNORECASE)
    if lead:
        return YES_NO[lead.group(1).lower()]
    return _SYNONYMS.get((attribute, category), {}).get(plain, plain)


def _answer_text(answer: str, options: Sequence[str]) -> str | None:
    """The option text a SAKURA answer names: "(b) text", "(b)", "b" or the text itself."""
    answer = answer.strip()
    m = re.match(r"^\(?([a-z])\)?(?:\s|$)", answer)
    if m and "abcdefghijklmnopqrstuvwxyz".index(m.group(1)) < len(options):
        return options["abcdefghijklmnopqrstuvwxyz".index(m.group(1))]
    return next((o for o in options if _key(o) == _key(answer)), None)


def multi_hop_questions(clips: Iterable[LabelledClip]) -> tuple[list[MultiHopQuestion], Counter]:
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
        category = categorize(clip.attribute, stem, clip.multi_category)
        if category is None:
            skipped[NO_CATEGORY] += 1
            continue
        out.append(MultiHopQuestion(clip.attribute, clip.label, stem, options, answer, category, clip.source))
    return out, skipped


class PortabilityBank:
    """SAKURA multi-hop questions by (attribute, label), and what the knowledge of every label answers.

    `knowledge[(attribute, label, category)]`: the normalized answers SAKURA gives for `label` clips in that
    category, plus the curated file's answer and alternatives; `yes_no[(attribute, label, question)]`: yes/no
    answers, kept with their question."""

    def __init__(self, questions: Sequence[MultiHopQuestion], curated: dict[str, dict[str, PortabilityCategory]]):
        self.by_label: dict[tuple[str, str], list[MultiHopQuestion]] = defaultdict(list)
        self.knowledge: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self.yes_no: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        for q in sorted(questions, key=lambda q: q.source):
            self.by_label[(q.attribute, q.label)].append(q)
            answer = normalize_answer(q.answer, q.attribute, q.category)
            if answer in YES_NO.values():
                self.yes_no[(q.attribute, q.label, _key(q.stem))].add(answer)
            else:
                self.knowledge[(q.attribute, q.label, q.category)].add(answer)
        for attribute, categories in curated.items():
            for name, cat in categories.items():
                for label, answer in cat.answers.items():
                    for text in (answer, *cat.alternatives.get(label, ())):
                        self.knowledge[(attribute, label, name)].add(normalize_answer(text, attribute, name))

    def attributes(self) -> set[str]:
        return {a for a, _ in self.by_label}

    def holds_for(self, q: MultiHopQuestion, label: str) -> bool:
        """Does the knowledge for `label` answer q the same way as q's own answer?"""
        answer = normalize_answer(q.answer, q.attribute, q.category)
        if answer in YES_NO.values():
            return answer in self.yes_no.get((q.attribute, label, _key(q.stem)), set())
        return answer in self.knowledge.get((q.attribute, label, q.category), set())

    def eligible(self, attribute: str, y_o: str, y_e: str) -> list[MultiHopQuestion]:
        """Questions about y_e clips whose answer does not also hold for y_o."""
        return [q for q in self.by_label.get((attribute, y_e), []) if not self.holds_for(q, y_o)]

    def category_counts(self) -> dict[str, dict[str, int]]:
        """Usable questions per attribute and category (every category of App. I.1 listed, zeros included)."""
        counts = Counter((a, q.category) for (a, _), qs in self.by_label.items() for q in qs)
        return {a: {c: counts[(a, c)] for c in CATEGORIES[a]} for a in sorted(self.attributes())}

    def exclusion_counts(self) -> dict[str, dict[str, int]]:
        """Per attribute, over every ordered label pair (y_o, y_e) and every question about a y_e clip: the
        candidate items, the ones dropped (the knowledge for y_o answers them the same way) and the ones kept."""
        out = {}
        for attribute in sorted(self.attributes()):
            total = kept = 0
            for y_o in LABELS[attribute]:
                for y_e in LABELS[attribute]:
                    if y_o != y_e:
                        total += len(self.by_label.get((attribute, y_e), []))
                        kept += len(self.eligible(attribute, y_o, y_e))
            out[attribute] = {"candidates": total, "dropped": total - kept, "kept": kept}
        return out
