"""SAKE dataset core: attributes, label sets, the `datasets.Features` schema, and the construction rules.

Everything here is a pure function of normalized records (`sake_dataset.records`) and a seed; no file I/O except
reading the two data files the rules depend on (`question_banks.yaml`, `portability_knowledge.yaml`).
Paper references: §3.3 (editing pairs, generality, locality, portability, train/test), §4.2 (sequential editing),
App. C.1 (label sets), Table 1 (composition).
"""

from __future__ import annotations

import functools
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from datasets import Audio, Features, List, Value

from sake.protocol import (ATTRIBUTES, COLUMN_OF_KIND, CONFIGS, DIMENSION_OF_KIND, ITEM_KINDS, LABELS,  # noqa: F401 (re-exported)
                           SAMPLING_RATE, SPLITS)

from .records import LabelledClip, TaskClip, TextQuestion

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
QUESTION_BANKS_PATH = PACKAGE_DIR / "question_banks.yaml"
PORTABILITY_PATH = PACKAGE_DIR / "portability_knowledge.yaml"

# Spellings met in source corpora, mapped to the canonical label (keys are lower-case).
LABEL_ALIASES: dict[str, dict[str, str]] = {
    "animal": {"dogs": "dog", "cats": "cat", "pigs": "pig", "cows": "cow", "frogs": "frog", "hens": "hen",
               "chicken": "hen", "roosters": "rooster", "sheeps": "sheep", "crows": "crow"},
    "emotion": {"happiness": "happy", "joy": "happy", "disgusted": "disgust", "sadness": "sad", "fearful": "fear",
                "afraid": "fear", "anger": "angry", "hap": "happy", "dis": "disgust", "fea": "fear", "ang": "angry"},
    "gender": {"man": "male", "woman": "female", "m": "male", "f": "female"},
    "language": {"en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian",
                 "zh": "Chinese", "zh-cn": "Chinese", "mandarin": "Chinese", "ja": "Japanese", "ko": "Korean"},
}

item_kinds = ITEM_KINDS

# Dynamic-SUPERB task -> auditory attributes it is about, found by keywords in the task name or instruction.
TASK_ATTRIBUTE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "gender": ("gender", "male", "female", "sex"),
    "emotion": ("emotion", "emotional", "sentiment", "affect", "mood"),
    "language": ("language", "lingual", "lid", "accent", "dialect"),
    "animal": ("animal", "bird", "species", "dog", "cat", "frog", "insect", "esc50", "esc-50",
               "environmental sound", "sound event", "vocalization"),
}


class ConstructionError(ValueError):
    """The sources or the requested sizes cannot satisfy a construction rule (message says which and why)."""


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

# --------------------------------------------------------------------------------------------------- labels


def canonical_label(attribute: str, text: str) -> str | None:
    """Canonical label for a spelling met in a source (case-insensitive, known aliases), or None."""
    key = re.sub(r"[\s_]+", " ", str(text).strip().strip(".").lower())
    for label in LABELS[attribute]:
        if key == label.lower():
            return label
    alias = LABEL_ALIASES[attribute].get(key)
    if alias is not None:
        return alias
    # "a dog", "the cat", "dog sound", "male voice"
    words = re.findall(r"[a-z]+", key)
    hits = {label for label in LABELS[attribute] if label.lower() in words}
    hits |= {LABEL_ALIASES[attribute][w] for w in words if w in LABEL_ALIASES[attribute] and len(w) > 2}
    return hits.pop() if len(hits) == 1 else None


def attribute_of_label(label: str) -> str:
    for attribute, labels in LABELS.items():
        if label in labels:
            return attribute
    raise KeyError(label)


# --------------------------------------------------------------------------------------------------- questions

_OPTION_RE = re.compile(r"\(([a-z])\)\s*")


def split_options(text: str) -> tuple[str, tuple[str, ...]]:
    """Split a SAKURA-style question "stem (a) x (b) y" into (stem, ("x", "y")); no options -> (text, ())."""
    marks = list(_OPTION_RE.finditer(text))
    expected = "abcdefghijklmnopqrstuvwxyz"
    if not marks or marks[0].group(1) != "a" or any(m.group(1) != expected[i] for i, m in enumerate(marks)):
        return text.strip(), ()
    stem = text[: marks[0].start()].strip()
    options = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        options.append(text[mark.end():end].strip().rstrip(",;").strip())
    return stem, tuple(options)


def format_question(stem: str, options: Sequence[str]) -> str:
    """SAKURA style: the options inline after the stem, "(a) x (b) y"."""
    if not options:
        return stem
    letters = "abcdefghijklmnopqrstuvwxyz"
    return stem + " " + " ".join(f"({letters[i]}) {o}" for i, o in enumerate(options))


@dataclass(frozen=True)
class QuestionBank:
    """Per attribute: the main question (pool clips), paraphrases (generality types 1/3), option count."""

    question: str
    paraphrases: tuple[str, ...]
    n_options: int


@functools.lru_cache(maxsize=4)
def load_question_banks(path: str = str(QUESTION_BANKS_PATH)) -> dict[str, QuestionBank]:
    """Read `question_banks.yaml` ({attribute: {question, paraphrases, n_options}})."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    banks = {}
    for attribute in ATTRIBUTES:
        entry = data.get(attribute) if isinstance(data, dict) else None
        if not isinstance(entry, dict) or not entry.get("question") or not entry.get("paraphrases"):
            raise ConstructionError(f"{path}: field '{attribute}' must hold 'question' and a non-empty "
                                    "'paraphrases' list")
        banks[attribute] = QuestionBank(str(entry["question"]), tuple(str(p) for p in entry["paraphrases"]),
                                        int(entry.get("n_options", min(4, len(LABELS[attribute])))))
    return banks


@dataclass(frozen=True)
class PortabilityCategory:
    questions: tuple[str, ...]
    answers: dict[str, str]
    alternatives: dict[str, tuple[str, ...]]


@functools.lru_cache(maxsize=4)
def load_portability(path: str = str(PORTABILITY_PATH)) -> dict[str, dict[str, PortabilityCategory]]:
    """Read `portability_knowledge.yaml`: {attribute: {categories: {cat: {questions, answers, alternatives}}}}."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    out: dict[str, dict[str, PortabilityCategory]] = {}
    for attribute in ATTRIBUTES:
        cats = ((data or {}).get(attribute) or {}).get("categories")
        if not isinstance(cats, dict) or not cats:
            raise ConstructionError(f"{path}: field '{attribute}.categories' missing or empty")
        out[attribute] = {}
        for name, entry in cats.items():
            answers = {str(k): str(v) for k, v in (entry.get("answers") or {}).items()}
            missing = [label for label in LABELS[attribute] if label not in answers]
            if missing or not entry.get("questions"):
                raise ConstructionError(f"{path}: field '{attribute}.categories.{name}' needs 'questions' and "
                                        f"an answer for every label; missing answers: {missing}")
            alts = {str(k): tuple(str(x) for x in v) for k, v in (entry.get("alternatives") or {}).items()}
            out[attribute][str(name)] = PortabilityCategory(tuple(str(q) for q in entry["questions"]), answers,
                                                            alts)
    return out


def task_attributes(task: str, instruction: str = "") -> frozenset[str]:
    """Auditory attributes a Dynamic-SUPERB task is about (keywords in its name or instruction)."""
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", task).lower().replace("_", " ")
    text = f" {name} {instruction.lower()} "
    found = set()
    for attribute, words in TASK_ATTRIBUTE_KEYWORDS.items():
        for word in words:
            if re.search(r"(?<![a-z])" + re.escape(word) + r"(?![a-z])", text):
                found.add(attribute)
    return frozenset(found)


# --------------------------------------------------------------------------------------------------- edit pairs

def make_edit_pairs(attribute: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n (y_o, y_e) pairs with y_o != y_e, every label within ±1 of n/K both as y_o and as y_e (§3.3).

    Built from cycles: a random permutation of the K labels gives y_o, the same permutation rotated by a random
    offset gives y_e, so each full cycle uses each label once on each side; the last partial cycle takes r
    consecutive labels as y_o and the next r as y_e. The pairs are then shuffled.
    """
    labels = list(LABELS[attribute])
    k = len(labels)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        perm = labels[:]
        rng.shuffle(perm)
        r = min(k, n - len(pairs))
        if r == k:
            shift = rng.randrange(1, k)
            pairs += [(perm[i], perm[(i + shift) % k]) for i in range(k)]
        else:
            pairs += [(perm[i], perm[(i + 1) % k]) for i in range(r)]
    rng.shuffle(pairs)
    return pairs


# --------------------------------------------------------------------------------------------------- split pools

@dataclass
class SplitPool:
    """The audio a split may use: labelled clips by attribute and label, Dynamic-SUPERB clips, MMLU questions."""

    split: str
    clips: dict[str, dict[str, list[LabelledClip]]]
    tasks: list[TaskClip]
    texts: list[TextQuestion]

    def hashes(self) -> set[str]:
        out = {c.audio.sha256 for by_label in self.clips.values() for cs in by_label.values() for c in cs}
        return out | {t.audio.sha256 for t in self.tasks}


# File-name patterns of the corpora SAKURA compiles: the same recording keeps its corpus id inside SAKURA's file
# names (e.g. "en_test_0_common_voice_en_22000163.wav"), so a re-encoded copy is still recognised.
_RECORDING_PATTERNS = (re.compile(r"common_voice_[A-Za-z-]+_\d+"), re.compile(r"\d{4}_[A-Z]{3}_[A-Z]{3}_[A-Z]{2}"),
                       re.compile(r"\d-\d+-[A-Z]-\d+"))


def clip_keys(clip: LabelledClip) -> tuple[str, ...]:
    """Identities of a clip's recording: its content hash, plus the corpus recording id found in its file name."""
    stem = clip.audio.name.rsplit(".", 1)[0]
    for pattern in _RECORDING_PATTERNS:
        m = pattern.search(stem)
        if m:
            return (clip.audio.sha256, "rec:" + m.group(0))
    return (clip.audio.sha256,)


def _unique_by_hash(clips: Iterable[LabelledClip]) -> list[LabelledClip]:
    seen: set[str] = set()
    out = []
    for clip in clips:
        keys = clip_keys(clip)
        if not seen.intersection(keys):
            seen.update(keys)
            out.append(clip)
    return out


def clip_quota(pairs: Sequence[tuple[str, str]], attribute: str) -> dict[str, int]:
    """Distinct clips a split needs per label: one edit audio per instance, and at least 2 per label (one more
    for generality types 2/3, and labels used by locality types 2/3)."""
    as_original = Counter(y_o for y_o, _ in pairs)
    return {label: max(as_original.get(label, 0), 2) for label in LABELS[attribute]}


def partition_clips(primary: Sequence[LabelledClip], extra: Sequence[LabelledClip],
                    test_quota: dict[str, dict[str, int]], train_quota: dict[str, dict[str, int]],
                    rng: random.Random) -> tuple[dict[str, dict[str, list[LabelledClip]]],
                                                 dict[str, dict[str, list[LabelledClip]]],
                                                 dict[tuple[str, str, str], tuple[int, int]]]:
    """Split labelled clips into test and train, strictly disjoint by content hash.

    Test takes its quota from `primary` (SAKURA) first, then from `extra` (pools) when SAKURA is short; train
    takes every remaining clip. Returns (test, train, shortfall) where shortfall maps (split, attribute, label)
    to (needed, available) for labels that cannot meet their quota.
    A clip counts as used by its content hash and by its corpus recording id (`clip_keys`).
    """
    test: dict[str, dict[str, list[LabelledClip]]] = {a: {label: [] for label in LABELS[a]} for a in ATTRIBUTES}
    train: dict[str, dict[str, list[LabelledClip]]] = {a: {label: [] for label in LABELS[a]} for a in ATTRIBUTES}
    shortfall: dict[tuple[str, str, str], tuple[int, int]] = {}
    by_key: dict[tuple[str, str], tuple[list[LabelledClip], list[LabelledClip]]] = defaultdict(lambda: ([], []))
    for clip in primary:
        by_key[(clip.attribute, clip.label)][0].append(clip)
    for clip in extra:
        by_key[(clip.attribute, clip.label)][1].append(clip)
    used: set[str] = set()
    for attribute in ATTRIBUTES:
        for label in LABELS[attribute]:
            first, second = by_key[(attribute, label)]
            first = _unique_by_hash(sorted(first, key=lambda c: c.audio.sha256))
            second = _unique_by_hash(sorted(second, key=lambda c: c.audio.sha256))
            rng.shuffle(first)
            rng.shuffle(second)
            want = test_quota.get(attribute, {}).get(label, 0)
            taken = []
            for clip in _unique_by_hash(first + second):
                if len(taken) == want:
                    break
                taken.append(clip)
                used.update(clip_keys(clip))
            test[attribute][label] = taken
            if len(taken) < want:
                shortfall[("test", attribute, label)] = (want, len(taken))
    for attribute in ATTRIBUTES:
        for label in LABELS[attribute]:
            first, second = by_key[(attribute, label)]
            rest = [c for c in _unique_by_hash(sorted(list(first) + list(second), key=lambda c: c.audio.sha256))
                    if not used.intersection(clip_keys(c))]
            rng.shuffle(rest)
            train[attribute][label] = rest
            want = train_quota.get(attribute, {}).get(label, 0)
            if len(rest) < want:
                shortfall[("train", attribute, label)] = (want, len(rest))
    return test, train, shortfall


def partition_by_hash(items: Sequence[Any], hash_of, assigned: dict[str, str], test_share: float,
                      rng: random.Random) -> tuple[list[Any], list[Any]]:
    """Split items (tasks clips, texts) into (test, train) by content hash, keeping hashes already assigned to a
    split there; new hashes go to test with probability ~test_share (exact proportion, seeded order)."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        groups[hash_of(item)].append(item)
    keys = sorted(groups)
    rng.shuffle(keys)
    free = [k for k in keys if k not in assigned]
    n_test = round(len(free) * test_share)
    if free and n_test == 0 and test_share > 0:
        n_test = 1
    if len(free) > 1 and n_test == len(free) and test_share < 1:
        n_test -= 1
    split_of = dict(assigned)
    for i, key in enumerate(free):
        split_of[key] = "test" if i < n_test else "train"
    test = [x for k in keys if split_of[k] == "test" for x in groups[k]]
    train = [x for k in keys if split_of[k] == "train" for x in groups[k]]
    return test, train


# --------------------------------------------------------------------------------------------------- items

def clip_question(clip: LabelledClip, banks: dict[str, QuestionBank],
                  rng: random.Random) -> tuple[str, tuple[str, ...], str]:
    """(stem, options, answer option text) of a clip's attribute question: SAKURA's own, or for pool clips the
    bank question with SAKURA-style options (true label + random other labels, shuffled)."""
    if clip.question:
        stem, options = split_options(clip.question)
        if options:
            return stem, options, clip.answer or clip.label
    bank = banks[clip.attribute]
    others = [label for label in LABELS[clip.attribute] if label != clip.label]
    options = [clip.label] + rng.sample(others, min(len(others), bank.n_options - 1))
    rng.shuffle(options)
    return bank.question, tuple(options), clip.label


def option_for_label(attribute: str, options: Sequence[str], label: str) -> int | None:
    for i, text in enumerate(options):
        if canonical_label(attribute, text) == label:
            return i
    return None


def edit_options(clip: LabelledClip, target: str, banks: dict[str, QuestionBank],
                 rng: random.Random) -> tuple[str, tuple[str, ...], str]:
    """The edit question for clip (label y_o) and target y_e: the clip's question, its options made to contain
    y_e (a distractor that is neither y_o nor y_e is replaced in place when needed). Returns (stem, options,
    answer) with answer = y_e as spelled in the options."""
    stem, options, _ = clip_question(clip, banks, rng)
    options = list(options)
    if option_for_label(clip.attribute, options, clip.label) is None:
        raise ConstructionError(f"{clip.source}: field 'single_instruction' has no option for its label "
                                f"{clip.label!r}: {options}")
    idx = option_for_label(clip.attribute, options, target)
    if idx is None:
        free = [i for i, o in enumerate(options) if canonical_label(clip.attribute, o) != clip.label]
        spelled = target
        if options and all(o[:1].isupper() for o in options):
            spelled = target[:1].upper() + target[1:]
        if free:
            idx = rng.choice(free)
            options[idx] = spelled
        else:
            options.append(spelled)
            idx = len(options) - 1
    return stem, tuple(options), options[idx]


def _item(kind: str, inst_id: str, *, audio, question: str, options: Sequence[str], answer: str, attribute: str,
          label: str = "", category: str = "", source: str = "", type_: int = 0) -> dict[str, Any]:
    item = {"id": f"{inst_id}/{kind}", "type": type_}
    if audio is not None:
        item["audio"] = audio
    item.update({"question": question, "options": list(options), "answer": answer, "attribute": attribute,
                 "label": label, "category": category, "source": source})
    return item


class _Cycler:
    """Draws items from a list in a seeded shuffled order, reshuffling when exhausted (spreads reuse evenly)."""

    def __init__(self, items: Sequence[Any], rng: random.Random):
        self.items, self.rng, self.queue = list(items), rng, []

    def draw(self, accept=lambda x: True) -> Any | None:
        for _ in range(2):
            for i, x in enumerate(self.queue):
                if accept(x):
                    return self.queue.pop(i)
            self.queue = self.items[:]
            self.rng.shuffle(self.queue)
        return None


@dataclass
class InstanceBuilder:
    """Builds instance rows of one split from its `SplitPool` (audio fields are `AudioRef`s until written)."""

    pool: SplitPool
    banks: dict[str, QuestionBank]
    knowledge: dict[str, dict[str, PortabilityCategory]]
    rng: random.Random

    def __post_init__(self):
        self._label_cyclers = {(a, label): _Cycler(cs, self.rng)
                               for a, by_label in self.pool.clips.items() for label, cs in by_label.items()}
        self._texts = _Cycler(self.pool.texts, self.rng)
        self._tasks_for: dict[str, _Cycler] = {}
        self._questions: dict[str, tuple[str, tuple[str, ...], str]] = {}

    # -- helpers
    def question_of(self, clip: LabelledClip) -> tuple[str, tuple[str, ...], str]:
        key = f"{clip.attribute}:{clip.source}"
        if key not in self._questions:
            self._questions[key] = clip_question(clip, self.banks, random.Random(key))
        return self._questions[key]

    def draw_clip(self, attribute: str, labels: Sequence[str], exclude: set[str], why: str) -> LabelledClip:
        labels = [label for label in labels if self.pool.clips[attribute].get(label)]
        if not labels:
            raise ConstructionError(f"{self.pool.split}: no {attribute} clip available for {why}")
        for label in self.rng.sample(labels, len(labels)):
            clip = self._label_cyclers[(attribute, label)].draw(lambda c: c.audio.sha256 not in exclude)
            if clip is not None:
                return clip
        raise ConstructionError(f"{self.pool.split}: every {attribute} clip with label in {labels} is excluded "
                                f"for {why}; add audio for these labels")

    def _audio_item(self, kind: str, inst_id: str, clip: LabelledClip, type_: int) -> dict[str, Any]:
        stem, options, answer = self.question_of(clip)
        return _item(kind, inst_id, audio=clip.audio, question=format_question(stem, options), options=options,
                     answer=answer, attribute=clip.attribute, label=clip.label, source=clip.source, type_=type_)

    def locality_audio(self, inst_id: str, attribute: str, y_o: str, y_e: str, edit_hash: str,
                       banned_labels: set[str] = frozenset()) -> list[dict[str, Any]]:
        """Audio-locality items types 1-4; labels in `banned_labels` are never used (§4.2 rule 2)."""
        exclude = {edit_hash}
        items = []
        others = [a for a in ATTRIBUTES if a != attribute]
        for other in self.rng.sample(others, len(others)):
            ok = [label for label in LABELS[other] if label not in banned_labels and self.pool.clips[other][label]]
            if ok:
                clip = self.draw_clip(other, ok, exclude, "audio locality type 1")
                break
        else:
            raise ConstructionError(f"{inst_id}: no clip of another attribute is left for audio locality type 1")
        items.append(self._audio_item("loc_audio1", inst_id, clip, 1))
        if attribute != "gender":
            ok = [label for label in LABELS[attribute] if label not in {y_o, y_e} | set(banned_labels)]
            clip = self.draw_clip(attribute, ok, exclude, f"audio locality type 2 of {inst_id}")
            items.append(self._audio_item("loc_audio2", inst_id, clip, 2))
        clip = self.draw_clip(attribute, [y_e], exclude, f"audio locality type 3 of {inst_id}")
        items.append(self._audio_item("loc_audio3", inst_id, clip, 3))
        task = self.draw_task(attribute, banned_labels, inst_id)
        _, task_options = split_options(task.instruction)
        items.append(_item("loc_audio4", inst_id, audio=task.audio, question=task.instruction,
                           options=task_options, answer=task.label, attribute=f"dsuperb:{task.task}",
                           label=task.label, source=task.source, type_=4))
        return items

    def draw_task(self, attribute: str, banned_labels: set[str], inst_id: str) -> TaskClip:
        if attribute not in self._tasks_for:
            allowed = [t for t in self.pool.tasks if attribute not in task_attributes(t.task, t.instruction)]
            self._tasks_for[attribute] = _Cycler(allowed, self.rng)
        banned = {b.lower() for b in banned_labels}
        task = self._tasks_for[attribute].draw(lambda t: t.label.strip().lower() not in banned)
        if task is None:
            raise ConstructionError(f"{self.pool.split}: no Dynamic-SUPERB task unrelated to '{attribute}' is "
                                    f"available for audio locality type 4 of {inst_id}")
        return task

    def text_item(self, inst_id: str) -> dict[str, Any]:
        q = self._texts.draw()
        if q is None:
            raise ConstructionError(f"{self.pool.split}: no MMLU question available for text locality")
        return _item("loc_text", inst_id, audio=None, question=format_question(q.question, q.choices),
                     options=q.choices, answer=q.choices[q.answer_index], attribute=f"mmlu:{q.subject}",
                     source=q.source)

    def portability_item(self, inst_id: str, attribute: str, clip: LabelledClip, y_o: str, y_e: str
                         ) -> dict[str, Any]:
        """A question probing y_e's linked knowledge; categories where y_o and y_e share the answer are skipped."""
        cats = self.knowledge[attribute]
        eligible = sorted(c for c, k in cats.items()
                          if k.answers[y_e].strip().lower() != k.answers[y_o].strip().lower())
        if not eligible:
            raise ConstructionError(f"portability_knowledge.yaml: no category of '{attribute}' separates "
                                    f"{y_o!r} from {y_e!r}")
        name = self.rng.choice(eligible)
        cat = cats[name]
        truth = cat.answers[y_e]
        true_set = {truth.lower(), *(a.lower() for a in cat.alternatives.get(y_e, ()))}
        pool = [cat.answers[y_o]]
        others = [label for label in LABELS[attribute] if label not in (y_o, y_e)]
        pool += [cat.answers[label] for label in self.rng.sample(others, len(others))]
        for label in sorted(cat.alternatives):
            if label != y_e:
                alts = list(cat.alternatives[label])
                pool += self.rng.sample(alts, len(alts))
        distractors: list[str] = []
        for text in pool:
            if text.lower() not in true_set and text.lower() not in {d.lower() for d in distractors}:
                distractors.append(text)
        options = [truth] + distractors[:3]
        self.rng.shuffle(options)
        question = self.rng.choice(cat.questions)
        return _item("port", inst_id, audio=clip.audio, question=format_question(question, options),
                     options=options, answer=truth, attribute=attribute, label=y_o, category=name,
                     source=clip.source)

    # -- instances
    def instance(self, inst_id: str, attribute: str, clip: LabelledClip, y_e: str, with_portability: bool
                 ) -> dict[str, Any]:
        y_o = clip.label
        stem, options, answer = edit_options(clip, y_e, self.banks, self.rng)
        question = format_question(stem, options)
        bank = self.banks[attribute]
        paraphrases = ([p for p in bank.paraphrases if p.strip().lower() != stem.strip().lower()]
                       or list(bank.paraphrases))
        para = format_question(self.rng.choice(paraphrases), options)
        alt = self.draw_clip(attribute, [y_o], {clip.audio.sha256}, f"generality type 2 of {inst_id}")
        gen = [
            _item("gen1", inst_id, audio=clip.audio, question=para, options=options, answer=answer,
                  attribute=attribute, label=y_o, source=clip.source, type_=1),
            _item("gen2", inst_id, audio=alt.audio, question=question, options=options, answer=answer,
                  attribute=attribute, label=y_o, source=alt.source, type_=2),
            _item("gen3", inst_id, audio=alt.audio, question=para, options=options, answer=answer,
                  attribute=attribute, label=y_o, source=alt.source, type_=3),
        ]
        row = {
            "id": inst_id, "attribute": attribute, "split": self.pool.split, "original_label": y_o,
            "target_label": y_e, "audio": clip.audio, "question": question, "options": list(options),
            "answer": answer, "source": clip.source, "generality": gen,
            "locality_audio": self.locality_audio(inst_id, attribute, y_o, y_e, clip.audio.sha256),
            "locality_text": [self.text_item(inst_id)],
            "portability": [self.portability_item(inst_id, attribute, clip, y_o, y_e)] if with_portability else [],
        }
        return row


def build_attribute_split(builder: InstanceBuilder, attribute: str, pairs: Sequence[tuple[str, str]]
                          ) -> list[dict[str, Any]]:
    """Instance rows of one attribute and split: one distinct edit clip (label y_o) per pair."""
    split = builder.pool.split
    queues = {}
    for label in LABELS[attribute]:
        clips = list(builder.pool.clips[attribute][label])
        queues[label] = clips
    rows = []
    for index, (y_o, y_e) in enumerate(pairs):
        if not queues[y_o]:
            raise ConstructionError(f"{split}: not enough distinct '{attribute}' clips labelled {y_o!r} for the "
                                    f"edit audio of {len(pairs)} instances")
        clip = queues[y_o].pop(0)
        inst_id = f"{attribute}/{split}/{index:06d}"
        rows.append(builder.instance(inst_id, attribute, clip, y_e, with_portability=(split == "test")))
    return rows


# --------------------------------------------------------------------------------------------------- sequences

def sample_sequences(instances: Sequence[dict[str, Any]], n_sequences: int, length: int, rng: random.Random,
                     max_nodes: int = 200_000) -> list[list[dict[str, Any]]]:
    """Pick `n_sequences` sequences of `length` instances with editing-pair independence (§4.2 rule 1): within a
    sequence every label appears at most once over all y_o and y_e. Instances not used by an earlier sequence are
    preferred. Raises ConstructionError when no such sequence exists (or none is found in the search budget)."""
    used: set[str] = set()
    sequences = []
    for s in range(n_sequences):
        order = list(instances)
        rng.shuffle(order)
        order.sort(key=lambda r: r["id"] in used)  # stable: unused first, random within
        chosen: list[dict[str, Any]] = []
        nodes = 0

        def search(start: int, labels: set[str]) -> bool:
            nonlocal nodes
            if len(chosen) == length:
                return True
            for i in range(start, len(order)):
                nodes += 1
                if nodes > max_nodes:
                    return False
                row = order[i]
                pair = {row["original_label"], row["target_label"]}
                if pair & labels:
                    continue
                chosen.append(row)
                if search(i + 1, labels | pair):
                    return True
                chosen.pop()
            return False

        if not search(0, set()):
            distinct = {(r["original_label"], r["target_label"]) for r in instances}
            raise ConstructionError(
                f"cannot sample sequence {s + 1} of {n_sequences}: no {length} edits with all labels distinct "
                f"(editing-pair independence) among {len(instances)} instances ({len(distinct)} distinct pairs); "
                f"24 labels allow at most 11 edits per sequence. Lower --sequence-length or change --seed.")
        rng.shuffle(chosen)
        used.update(r["id"] for r in chosen)
        sequences.append(chosen)
    return sequences


def _reid(items: list[dict[str, Any]], old: str, new: str) -> list[dict[str, Any]]:
    return [{**it, "id": new + it["id"][len(old):]} for it in items]


def build_sequential(builder: InstanceBuilder, instances: Sequence[dict[str, Any]], n_sequences: int,
                     length: int) -> list[dict[str, Any]]:
    """Sequential rows: sampled sequences, ids re-based, audio-locality items re-drawn so that none involves an
    original label of any edit in the sequence (§4.2 rule 2)."""
    split = builder.pool.split
    rows = []
    for s, seq in enumerate(sample_sequences(instances, n_sequences, length, builder.rng), start=1):
        originals = {r["original_label"] for r in seq}
        for step, inst in enumerate(seq, start=1):
            new_id = f"sequential/{split}/seq{s:02d}/step{step:02d}"
            old_id = inst["id"]
            loc = builder.locality_audio(new_id, inst["attribute"], inst["original_label"], inst["target_label"],
                                         inst["audio"].sha256, banned_labels=originals)
            rows.append({**inst, "id": new_id, "generality": _reid(inst["generality"], old_id, new_id),
                         "locality_audio": loc, "locality_text": _reid(inst["locality_text"], old_id, new_id),
                         "portability": _reid(inst["portability"], old_id, new_id), "sequence_id": f"seq{s:02d}",
                         "step": step, "source_instance": old_id})
    return rows


# --------------------------------------------------------------------------------------------------- checks

def item_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """All items of an instance row in ITEM_KINDS order, the reliability item first (as an Item dict)."""
    rel = {"id": f"{row['id']}/rel", "type": 0, "audio": row["audio"], "question": row["question"],
           "options": row["options"], "answer": row["answer"], "attribute": row["attribute"],
           "label": row["original_label"], "category": "", "source": row["source"]}
    return [rel] + row["generality"] + row["locality_audio"] + row["locality_text"] + row["portability"]


def check_instance(row: dict[str, Any]) -> None:
    """Per-instance identities (Table 1 composition and the construction rules); raises ConstructionError."""
    attribute, split = row["attribute"], row["split"]
    kinds = tuple(it["id"].rsplit("/", 1)[1] for it in item_rows(row))
    want = expected_kinds(attribute, split)
    problems = []
    if kinds != want:
        problems.append(f"item kinds {kinds} != {want}")
    y_o, y_e = row["original_label"], row["target_label"]
    if y_o == y_e or y_o not in LABELS[attribute] or y_e not in LABELS[attribute]:
        problems.append(f"bad pair {y_o!r}->{y_e!r}")
    for it in row["locality_audio"]:
        if it["type"] == 1 and (it["attribute"] == attribute or it["attribute"].startswith("dsuperb:")):
            problems.append("type-1 locality must probe another attribute")
        if it["type"] == 2 and it["label"] in (y_o, y_e):
            problems.append("type-2 locality label must differ from y_o and y_e")
        if it["type"] == 3 and it["label"] != y_e:
            problems.append("type-3 locality label must be y_e")
        if it["type"] == 4 and attribute in task_attributes(it["attribute"].split(":", 1)[1], it["question"]):
            problems.append("type-4 locality task is about the edited attribute")
    if row["answer"] not in row["options"]:
        problems.append("answer not among options")
    if problems:
        raise ConstructionError(f"{row['id']}: " + "; ".join(problems))


def count_totals(rows: Iterable[dict[str, Any]]) -> tuple[int, int, int]:
    """(instances, audio inputs, QA pairs) counted per item (Table 1)."""
    n_inst = n_audio = n_qa = 0
    for row in rows:
        n_inst += 1
        for it in item_rows(row):
            n_qa += 1
            n_audio += "audio" in it
    return n_inst, n_audio, n_qa
