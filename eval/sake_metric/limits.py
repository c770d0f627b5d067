"""The one set of limits on predictions files and judged text, shared by scoring and the leaderboard validator.

Every reader of a predictions file (`predictions_file.read_predictions_file`, used by `eval.score`, the metric,
`eval.leaderboard validate` and `add`) applies these numbers; change them here only.

Over-long outputs: an output is accepted at any length a line may hold (`MAX_LINE_BYTES`), but only its first
`MAX_JUDGED_CHARS` characters are judged -- by every stage (empty, exact, choice, LLM judge) and by the
degeneration detector. Text beyond the cap is never read, so scoring time and memory per item are bounded
whatever the output length. A model stopped by `max_new_tokens` writes far less (512 tokens are a few thousand
characters), so the cap only ever cuts runaway or padded outputs; results count the outputs it cut
(`judge.clipped_outputs`).

The other texts of a row are capped the same way: a row lists at most `MAX_OPTIONS` options (the matcher names
options by letter, a-z; a longer list is refused by the reader and by `rows.validate_row`), and only the first
`MAX_OPTION_CHARS` characters of an option or of the reference and the first `MAX_QUESTION_CHARS` of the question
are judged (the LLM prompt shows no more). A dataset's options, references and questions are far shorter, so
the caps change no verdict of a real run; they bound the matcher's work on a hostile row.
"""

from __future__ import annotations

#: Characters of an output (post-edit or pre-edit) that are judged; the rest is ignored (see module doc).
MAX_JUDGED_CHARS = 16_000

#: Most options of one row (the multiple-choice matcher cites options by the letters a-z).
MAX_OPTIONS = 26
#: Characters of an option text or of the reference that are judged.
MAX_OPTION_CHARS = 1_000
#: Characters of the question that are judged (shown to the LLM judge).
MAX_QUESTION_CHARS = 4_000

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
#: Most values (object members and array entries) in one prediction row: about 14 fields and <= 26 options.
MAX_ROW_ITEMS = 1_000
#: Most values in the run header (its fields and the small `hparams` and `versions` objects).
MAX_HEADER_ITEMS = 10_000
#: Most digits of a JSON integer (types, gaps, seeds, counts; anything longer is not a SAKE value).
MAX_INT_DIGITS = 20


def judged_text(text: str | None, limit: int = MAX_JUDGED_CHARS) -> str:
    """The part of a text that is judged: its first `limit` characters ("" for None); outputs by default."""
    if not text:
        return ""
    return text if len(text) <= limit else text[:limit]


def judged_options(options: "tuple[str, ...] | list[str]") -> tuple[str, ...]:
    """The option texts as judged: each cut to its first `MAX_OPTION_CHARS` characters."""
    return tuple(judged_text(option, MAX_OPTION_CHARS) for option in options)


def is_clipped(text: str | None, limit: int = MAX_JUDGED_CHARS) -> bool:
    """True when `judged_text(text, limit)` drops part of `text`."""
    return text is not None and len(text) > limit


def options_problem(options: object) -> str | None:
    """Why an `options` value is over the limit (a list of more than `MAX_OPTIONS` entries), else None."""
    if isinstance(options, (list, tuple)) and len(options) > MAX_OPTIONS:
        return f"{len(options)} options; at most {MAX_OPTIONS} allowed (one per letter a-z)"
    return None
