"""Deterministic judging stages: normalization, exact match and the multiple-choice matcher.

`choose_option(output, options)` returns the index of the single option an output names, or None when it
names none, several, or only in negated form. It decides only where the choice is unambiguous; everything
else is left to the LLM judge (or counted as undecided by the offline judge).

An output names option k when
- it cites k's letter in a form that cannot be an English word: "(b)", or at the very start "b)", "B.",
  "b:" , or the whole output is the letter ("b", "B"); or "option b" / "choice b"; or "Answer: B" (with
  the colon, the letter followed by ")", ".", ",", ":" or the end);
- or it restates k's text as a whole-word phrase (after normalization), not inside a longer option's text
  that is also present, and not negated: a mention preceded within three words by a negation cue ("not a
  dog", "isn't a cat", "rather than", "instead of", "unlike", "except", "no", "never", "neither", "nor")
  does not count.
If letters and texts point to different options, or to two options, the result is None.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Sequence

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
_NON_WORD = re.compile(r"[^0-9a-z\u00c0-\uffff]+")
_LETTERS = string.ascii_lowercase

NEGATION_WORDS = frozenset({
    "not", "no", "never", "neither", "nor", "isnt", "arent", "wasnt", "werent", "doesnt", "dont", "didnt",
    "cannot", "cant", "wont", "without", "unlike", "except", "instead", "than", "hardly", "nothing", "none",
})
NEGATION_WINDOW = 3


def normalize(text: str | None) -> str:
    """Case-fold, NFKC, drop apostrophes, turn every other non-word character into one space, strip."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()
    text = text.replace("'", "")
    return _NON_WORD.sub(" ", text).strip()


def is_empty(text: str | None) -> bool:
    """True when an output has no word characters at all (empty, whitespace, punctuation only)."""
    return normalize(text) == ""


def exact_match(a: str | None, b: str | None) -> bool:
    """Equal after `normalize` (and neither empty)."""
    na, nb = normalize(a), normalize(b)
    return bool(na) and na == nb


def _strip_letter(option: str) -> str:
    """Drop a leading "(a)" / "a)" / "A." label some option lists carry."""
    return re.sub(r"^\s*\(?[a-zA-Z][\).:]\s+", "", option)


def option_index(answer: str, options: Sequence[str]) -> int | None:
    """Index of the option whose text equals `answer` after normalization (None if none or several)."""
    target = normalize(_strip_letter(answer))
    if not target:
        return None
    hits = [i for i, opt in enumerate(options) if normalize(_strip_letter(opt)) == target]
    if len(hits) == 1:
        return hits[0]
    letter = re.fullmatch(r"\s*\(?([a-zA-Z])\)?\s*", answer or "")
    if letter and not hits:
        index = _LETTERS.index(letter.group(1).lower())
        return index if index < len(options) else None
    return None


@dataclass(frozen=True)
class Choice:
    """The matcher's answer: `index` (None = undecided) and why."""

    index: int | None
    reason: str


def _letter_mentions(output: str, n_options: int) -> set[int]:
    """Option indices cited by letter in forms that cannot be ordinary words."""
    found: set[int] = set()
    stripped = unicodedata.normalize("NFKC", output).strip()
    patterns = [
        r"\(([a-zA-Z])\)",                                   # (b) anywhere
        r"^\s*\**([a-zA-Z])[\).:](?:\s|$|\*)",               # "b) ...", "B. ...", "b: ..." at the start
        r"^\s*\**\(?([a-zA-Z])\)?\**\s*[.!]?\s*$",           # the whole output is a letter
        r"\b(?:option|choice)\s*[:#]?\s*\(?([a-zA-Z])\b",    # "option b", "choice (c"
        r"\banswer(?:\s+is)?\s*:\s*\(?([a-zA-Z])(?:[\).,:]|\s*$)",  # "Answer: B", "answer is: (c),"
    ]
    for pattern in patterns:
        for match in re.finditer(pattern, stripped, flags=re.IGNORECASE):
            letter = match.group(1).lower()
            if letter not in _LETTERS:  # "ı", "İ": Unicode letters a case-insensitive [a-z] also matches
                continue
            index = _LETTERS.index(letter)
            if index < n_options:
                found.add(index)
            else:
                # A cited letter with no option: treat as unreadable, not as "none".
                found.add(-1)
    return found


_HASH_MOD = (1 << 61) - 1  # rolling hash of word sequences (word ids in order of first appearance)
_HASH_BASE = 1_000_003


def _longest_mentions(words: list[str], targets: dict[tuple[str, ...], list[int]]) -> dict[int, tuple[int, list[int]]]:
    """start word -> (end word, option indices) of the longest option phrase starting there, for every start.

    One rolling hash per (start, distinct phrase length): O(words x lengths) arithmetic, and one word-by-word
    comparison per start to confirm a hash, so repetitive outputs and options cost no more than others.
    """
    ids: dict[str, int] = {}
    codes = [ids.setdefault(word, len(ids) + 1) for word in words]
    by_length: dict[int, dict[int, list[tuple[str, ...]]]] = {}
    for target in targets:
        if all(word in ids for word in target):  # a phrase with a word the output lacks never matches
            code = 0
            for word in target:
                code = (code * _HASH_BASE + ids[word]) % _HASH_MOD
            by_length.setdefault(len(target), {}).setdefault(code, []).append(target)
    prefix = [0]
    for code in codes:
        prefix.append((prefix[-1] * _HASH_BASE + code) % _HASH_MOD)
    found: dict[int, tuple[int, list[int]]] = {}
    for length in sorted(by_length, reverse=True):  # the longest phrase at a start wins
        table, power = by_length[length], pow(_HASH_BASE, length, _HASH_MOD)
        hits = [start for start in range(len(words) - length + 1)
                if start not in found and (prefix[start + length] - prefix[start] * power) % _HASH_MOD in table]
        for start in hits:
            window = tuple(words[start:start + length])
            code = (prefix[start + length] - prefix[start] * power) % _HASH_MOD
            matched = next((t for t in table[code] if t == window), None)  # the hash confirmed word by word
            if matched is not None:
                found[start] = (start + length, targets[matched])
    return found


def _text_mentions(output: str, options: Sequence[str]) -> tuple[set[int], set[int]]:
    """(positively mentioned option indices, negated-only option indices) by whole-phrase text match.

    At each word only the longest option phrase starting there counts (a mention inside a longer one -- "sad"
    inside "very sad" -- does not), and not when a mention that started earlier reaches as far. Time grows
    with (output words) x (distinct option lengths), whatever words the output and the options repeat.
    """
    words = normalize(output).split()
    targets: dict[tuple[str, ...], list[int]] = {}
    for index, option in enumerate(options):
        target = tuple(normalize(_strip_letter(option)).split())
        if target:
            targets.setdefault(target, []).append(index)
    positive: set[int] = set()
    negated: set[int] = set()
    reach = 0  # furthest end of the mentions starting before the current word
    for start, (end, indices) in sorted(_longest_mentions(words, targets).items()):
        if reach < end:
            window = words[max(0, start - NEGATION_WINDOW):start]
            (negated if any(w in NEGATION_WORDS for w in window) else positive).update(indices)
        reach = max(reach, end)
    return positive, negated - positive


def choose_option(output: str | None, options: Sequence[str]) -> Choice:
    """Return the single option `output` names unambiguously, else `Choice(None, reason)`."""
    if not options or is_empty(output):
        return Choice(None, "no options" if not options else "empty output")
    letters = _letter_mentions(output or "", len(options))
    if -1 in letters:
        return Choice(None, "cites a letter with no option")
    positive, negated = _text_mentions(output or "", options)
    named = letters | positive
    if len(named) == 1:
        return Choice(next(iter(named)), "letter" if letters else "text")
    if not named:
        return Choice(None, "only negated options" if negated else "names no option")
    return Choice(None, "names several options")
