"""Degeneration detector (paper App. J): repetitive collapse of a model's output.

An output is degenerate when it contains any of
- `char_run`: one non-space character repeated >= 10 times in a row ("!!!!!!!!!!", "aaaaaaaaaa");
- `word_repeat`: one word of 3-64 letters said >= 3 times in a row ("catholic catholic catholic"), up to 8
  spaces or punctuation marks between the copies;
- `substring_repeat`: a unit of 2-40 characters (starting with a letter) repeated back to back >= 4 times,
  up to 8 spaces or punctuation marks between copies ("dogdogdogdog", "I am sad. I am sad. I am sad. I am sad.");
- `newline_run`: >= 4 line breaks in a row, blank space between them allowed.
Ordinary text (a word said twice, a paragraph break, "1000000") is not degenerate.

Every pattern asks for exactly the minimum number of copies (a match of the minimum exists whenever a longer
run does) and bounds its gaps, so a search keeps no growing backtracking state: time is linear in the text's
length (at most 40 unit lengths tried per position) and memory constant. Scoring passes only the judged text
(`limits.judged_text`) anyway.
"""

from __future__ import annotations

import re
from typing import Iterable

CHAR_RUN = re.compile(r"(\S)\1{9}")
WORD_REPEAT = re.compile(r"\b([^\W\d_]{3,64})\b(?:[\s,.;:!?\-]{1,8}\1\b){2}", re.IGNORECASE)
SUBSTRING_REPEAT = re.compile(r"([^\W\d_][^\n]{1,39}?)(?:[\s,.;:!?\-]{0,8}\1){3}", re.IGNORECASE)
NEWLINE_RUN = re.compile(r"(?:\r?\n[ \t]*){4}")


def degeneration_kind(text: str | None) -> str | None:
    """Name of the first degeneration pattern found in `text` (see module doc), or None."""
    if not text:
        return None
    if NEWLINE_RUN.search(text):
        return "newline_run"
    if CHAR_RUN.search(text):
        return "char_run"
    if WORD_REPEAT.search(text):
        return "word_repeat"
    if SUBSTRING_REPEAT.search(text):
        return "substring_repeat"
    return None


def is_degenerate(text: str | None) -> bool:
    """True when `text` shows one of the degeneration patterns."""
    return degeneration_kind(text) is not None


def degeneration_rate(texts: Iterable[str | None]) -> float | None:
    """Percent (0-100) of degenerate texts; None for no texts."""
    flags = [is_degenerate(t) for t in texts]
    return 100.0 * sum(flags) / len(flags) if flags else None
