"""Attributes and label sets (App. C.1), label spellings met in sources, and SAKURA-style questions with inline
options ("stem (a) x (b) y")."""

from __future__ import annotations

import re
from typing import Sequence

from sake_core.protocol import ATTRIBUTES, LABELS  # noqa: F401 (re-exported: App. C.1 attributes and label sets)

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


def option_for_label(attribute: str, options: Sequence[str], label: str) -> int | None:
    for i, text in enumerate(options):
        if canonical_label(attribute, text) == label:
            return i
    return None


