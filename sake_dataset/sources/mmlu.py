"""MMLU reader (Hendrycks et al., 2021) in the cais/mmlu layout.

Accepted: a Parquet file; a folder holding `all/test-*.parquet` (the cais/mmlu repository layout) or any
`*.parquet`; or a Hub id (`cais/mmlu`, config `all`, split `test`; needs network access).
Columns: `question` (str), `subject` (str), `choices` (list of 4 str), `answer` (int index, or letter A-D).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from ..records import SourceError, TextQuestion
from .common import is_hub_id

log = logging.getLogger(__name__)
COLUMNS = ("question", "subject", "choices", "answer")


def _files(spec: Path) -> list[Path]:
    if spec.is_file():
        return [spec]
    if spec.is_dir():
        found = sorted((spec / "all").glob("test-*.parquet")) or sorted(spec.rglob("*.parquet"))
        if found:
            return found
    raise SourceError(f"{spec}: missing file (expected an MMLU Parquet file or a folder with all/test-*.parquet)")


def read_mmlu(spec: str | Path) -> list[TextQuestion]:
    """All MMLU rows as TextQuestion, in file order."""
    if is_hub_id(str(spec)):
        import datasets

        try:
            rows = datasets.load_dataset(str(spec), "all", split="test").to_list()
        except Exception as exc:
            raise SourceError(f"{spec}: not a local MMLU file/folder, and loading it as a Hub dataset (config all, "
                              f"split test) failed: {exc}") from exc
        return [_question(r, f"{spec}[all/test] row {i}", i) for i, r in enumerate(rows)]
    out: list[TextQuestion] = []
    for path in _files(Path(spec)):
        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise SourceError(f"{path}: not a readable Parquet file: {exc}") from exc
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise SourceError(f"{path}: missing column(s) {missing} (expected {list(COLUMNS)})")
        for i, row in enumerate(table.to_pylist()):
            out.append(_question(row, f"{path} row {i}", len(out)))
    log.info("MMLU %s: %d questions", spec, len(out))
    return out


def _question(row: dict, where: str, index: int) -> TextQuestion:
    choices = row.get("choices")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise SourceError(f"{where}: field 'choices' must be a list of at least 2 strings, got {choices!r}")
    answer = row.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in "ABCDEFGH":
        answer = "ABCDEFGH".index(answer.upper())
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise SourceError(f"{where}: field 'answer' must index 'choices' (0..{len(choices) - 1}), got {answer!r}")
    if not str(row.get("question") or "").strip():
        raise SourceError(f"{where}: field 'question' is empty")
    subject = str(row.get("subject") or "unknown")
    return TextQuestion(subject=subject, question=str(row["question"]).strip(),
                        choices=tuple(str(c) for c in choices), answer_index=answer,
                        source=f"mmlu:{subject}/{index}")
