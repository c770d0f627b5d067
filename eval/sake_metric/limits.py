"""The one set of limits on predictions files and judged text, shared by scoring and the leaderboard validator.

Every reader of a predictions file (`predictions_file.read_predictions_file`, used by `eval.score`, the metric,
`eval.leaderboard validate` and `add`) applies these numbers; change them here only.

Over-long outputs: an output is accepted at any length a line may hold (`MAX_LINE_BYTES`), but only its first
`MAX_JUDGED_CHARS` characters are judged -- by every stage (empty, exact, choice, LLM judge) and by the
degeneration detector. Text beyond the cap is never read, so scoring time and memory per item are bounded
whatever the output length. A model stopped by `max_new_tokens` writes far less (512 tokens are a few thousand
characters), so the cap only ever cuts runaway or padded outputs; results count the outputs it cut
(`judge.clipped_outputs`).
"""

from __future__ import annotations

#: Characters of an output (post-edit or pre-edit) that are judged; the rest is ignored (see module doc).
MAX_JUDGED_CHARS = 16_000

#: Largest predictions file read (bytes).
MAX_FILE_BYTES = 512 * 1024 * 1024
#: Longest line of a predictions file (bytes, newline excluded).
MAX_LINE_BYTES = 4 * 1024 * 1024
#: Most prediction rows in one file (a full single-editing run at paper size has about 16,000).
MAX_ROWS = 1_000_000
#: Deepest JSON nesting of a prediction row: the row object and its `options` list.
MAX_ROW_DEPTH = 2
#: Deepest JSON nesting of the run header (its `hparams` and `versions` hold small nested values).
MAX_HEADER_DEPTH = 8
#: Most digits of a JSON integer (types, gaps, seeds, counts; anything longer is not a SAKE value).
MAX_INT_DIGITS = 20


def judged_text(text: str | None) -> str:
    """The part of an output that is judged: its first `MAX_JUDGED_CHARS` characters ("" for None)."""
    if not text:
        return ""
    return text if len(text) <= MAX_JUDGED_CHARS else text[:MAX_JUDGED_CHARS]


def is_clipped(text: str | None) -> bool:
    """True when `judged_text` drops part of `text`."""
    return text is not None and len(text) > MAX_JUDGED_CHARS
