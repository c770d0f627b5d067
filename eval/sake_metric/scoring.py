"""Judge prediction rows stage by stage and aggregate them into SAKE's metrics (the results JSON).

Stages, in order; the first that decides an item records its name:
1. `empty`  - the post-edit output has no word characters -> incorrect / inconsistent;
2. `exact`  - equal after normalization (correctness: post-edit vs reference; consistency: post-edit vs
              pre-edit) -> correct / consistent;
3. `choice` - the multiple-choice matcher (`matching.choose_option`) decides unambiguously: correctness
              compares the chosen option with the reference's option; consistency compares the options the
              pre-edit and post-edit outputs choose (both must be unambiguous);
4. `llm`    - the LLM judge (`llm_judge.LLMJudge`); `llm_failed` when its verdict stays malformed (counted as
              incorrect / inconsistent and reported).
With the offline judge, items no stage decides are `undecided` and counted as incorrect / inconsistent.

Metrics (paper §3.2) are percentages of items judged correct (reliability, generality, portability) or
consistent (audio and text locality), pooled over items: averages over types are item-weighted, as in the
paper's tables. A metric with no items is null.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .degeneration import degeneration_kind
from .llm_judge import LLMJudge, consistency_prompt, correctness_prompt
from .matching import choose_option, exact_match, is_empty, option_index
from .protocol import METRIC_KEYS, TYPES
from .rows import PredictionRow

logger = logging.getLogger(__name__)

METRIC_VERSION = "1.0.0"
STAGES = ("empty", "exact", "choice", "llm", "llm_failed", "undecided")
TYPE_KEYS = {dim: TYPES[dim] for dim in ("generality", "locality_audio")}  # dimensions reported per type
UNCATEGORIZED = "uncategorized"


@dataclass(frozen=True)
class ItemVerdict:
    """How one row was judged: `passed` (correct / consistent), the deciding `stage`, degeneration."""

    row: PredictionRow
    passed: bool
    stage: str
    degeneration: str | None

    def as_dict(self) -> dict[str, Any]:
        r = self.row
        return {"item_id": r.item_id, "gap": r.gap, "dimension": r.dimension, "type": r.type,
                "attribute": r.attribute, "category": r.category, "passed": self.passed, "stage": self.stage,
                "degeneration": self.degeneration}


def deterministic_verdict(row: PredictionRow) -> tuple[str, bool] | None:
    """(stage, passed) from stages 1-3, or None when none of them decides."""
    if is_empty(row.post_edit):
        return "empty", False
    target = row.pre_edit if row.is_consistency else row.reference
    if exact_match(row.post_edit, target):
        return "exact", True
    if row.options:
        post = choose_option(row.post_edit, row.options)
        if post.index is not None:
            if row.is_consistency:
                pre = choose_option(row.pre_edit, row.options)
                if pre.index is not None:
                    return "choice", post.index == pre.index
            else:
                ref = option_index(row.reference, row.options)
                if ref is not None:
                    return "choice", post.index == ref
    return None


def judge_prompt(row: PredictionRow) -> str:
    """The LLM judge's prompt for a row (consistency for locality, correctness otherwise)."""
    if row.is_consistency:
        return consistency_prompt(row.question, row.pre_edit or "", row.post_edit)
    return correctness_prompt(row.question, row.reference, row.post_edit)


def judge_rows(rows: Sequence[PredictionRow], judge: str | LLMJudge = "offline") -> list[ItemVerdict]:
    """Judge every row through the stages; `judge` is "offline" or an `LLMJudge`."""
    if isinstance(judge, str) and judge != "offline":
        raise ValueError(f"judge must be 'offline' or an LLMJudge instance, got {judge!r}")
    decided: list[tuple[str, bool] | None] = [deterministic_verdict(r) for r in rows]
    pending = [i for i, d in enumerate(decided) if d is None]
    if pending and isinstance(judge, LLMJudge):
        verdicts = judge.judge([judge_prompt(rows[i]) for i in pending])
        for i, verdict in zip(pending, verdicts):
            decided[i] = ("llm", verdict) if verdict is not None else ("llm_failed", False)
    out = []
    for row, decision in zip(rows, decided):
        stage, passed = decision if decision is not None else ("undecided", False)
        out.append(ItemVerdict(row=row, passed=bool(passed), stage=stage,
                               degeneration=degeneration_kind(row.post_edit)))
    failed = sum(v.stage == "llm_failed" for v in out)
    if failed:
        logger.warning("%d item(s) got no well-formed LLM verdict; counted as incorrect/inconsistent", failed)
    return out


def _percent(flags: Sequence[bool]) -> float | None:
    return round(100.0 * sum(flags) / len(flags), 4) if flags else None


def metric_set(verdicts: Iterable[ItemVerdict]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(M, counts): the metric dict of ARCHITECTURE.md and the number of items behind each value."""
    groups: dict[str, list[bool]] = {k: [] for k in METRIC_KEYS}
    by_category: dict[str, list[bool]] = {}
    for v in verdicts:
        dim = v.row.dimension
        groups[dim].append(v.passed)
        if dim in TYPE_KEYS:
            groups[f"{dim}_type{v.row.type}"].append(v.passed)
        if dim == "portability":
            by_category.setdefault(v.row.category or UNCATEGORIZED, []).append(v.passed)
    metrics: dict[str, Any] = {k: _percent(groups[k]) for k in METRIC_KEYS}
    metrics["portability_by_category"] = {c: _percent(by_category[c]) for c in sorted(by_category)}
    counts: dict[str, Any] = {k: len(groups[k]) for k in METRIC_KEYS}
    counts["portability_by_category"] = {c: len(by_category[c]) for c in sorted(by_category)}
    return metrics, counts


def aggregate(verdicts: Sequence[ItemVerdict]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, counts), each `{"overall", "per_attribute", "per_gap"}`; per_gap empty in single mode."""
    metrics: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    metrics["overall"], counts["overall"] = metric_set(verdicts)
    metrics["per_attribute"], counts["per_attribute"] = {}, {}
    for attribute in sorted({v.row.attribute for v in verdicts}):
        m, c = metric_set(v for v in verdicts if v.row.attribute == attribute)
        metrics["per_attribute"][attribute], counts["per_attribute"][attribute] = m, c
    metrics["per_gap"], counts["per_gap"] = {}, {}
    for gap in sorted({v.row.gap for v in verdicts if v.row.gap is not None}):
        m, c = metric_set(v for v in verdicts if v.row.gap == gap)
        metrics["per_gap"][str(gap)], counts["per_gap"][str(gap)] = m, c
    return metrics, counts


def stage_summary(verdicts: Sequence[ItemVerdict]) -> tuple[dict[str, float], dict[str, int]]:
    """(share of items decided by each stage, counts), every stage listed, shares summing to 1."""
    counter = Counter(v.stage for v in verdicts)
    total = len(verdicts)
    share = {s: (round(counter[s] / total, 6) if total else 0.0) for s in STAGES}
    return share, {s: counter[s] for s in STAGES}


def degeneration_summary(verdicts: Sequence[ItemVerdict]) -> dict[str, Any]:
    """Degeneration rate (percent of post-edit outputs) overall, per gap, per dimension, and pattern counts."""
    def rate(vs: list[ItemVerdict]) -> float | None:
        return _percent([v.degeneration is not None for v in vs])

    verdicts = list(verdicts)
    gaps = sorted({v.row.gap for v in verdicts if v.row.gap is not None})
    dims = sorted({v.row.dimension for v in verdicts})
    return {
        "rate": rate(verdicts),
        "n_degenerate": sum(v.degeneration is not None for v in verdicts),
        "per_gap": {str(g): rate([v for v in verdicts if v.row.gap == g]) for g in gaps},
        "per_dimension": {d: rate([v for v in verdicts if v.row.dimension == d]) for d in dims},
        "kinds": dict(sorted(Counter(v.degeneration for v in verdicts if v.degeneration).items())),
    }


def judge_info(judge: str | LLMJudge, verdicts: Sequence[ItemVerdict]) -> dict[str, Any]:
    """The results JSON's `judge` block."""
    share, counts = stage_summary(verdicts)
    info: dict[str, Any] = {"name": "offline", "model": None, "version": METRIC_VERSION,
                            "stage_share": share, "stage_counts": counts}
    if isinstance(judge, LLMJudge):
        from .llm_judge import PROMPT_VERSION

        info.update({"name": judge.name, "model": judge.config.model, "prompt_version": PROMPT_VERSION,
                     "seed": judge.config.seed, "reasoning_effort": judge.config.reasoning_effort,
                     "llm_calls": judge.calls, "cache_hits": judge.cache_hits})
    info["failed_items"] = [v.row.item_id for v in verdicts if v.stage == "llm_failed"][:50]
    info["note"] = ("offline judge: items no deterministic stage decides are 'undecided' and counted as "
                    "incorrect/inconsistent") if not isinstance(judge, LLMJudge) else (
                    "'llm_failed' items (malformed verdict after retries) are counted as incorrect/inconsistent")
    return info


def build_results(
    header: Mapping[str, Any] | None, verdicts: Sequence[ItemVerdict], judge: str | LLMJudge,
) -> dict[str, Any]:
    """The results JSON (ARCHITECTURE.md) for judged rows and their run header."""
    header = dict(header or {})
    metrics, counts = aggregate(verdicts)
    mode = header.get("mode") or ("sequential" if any(v.row.gap is not None for v in verdicts) else "single")
    degeneration = degeneration_summary(verdicts)
    versions = dict(header.get("versions") or {})
    versions["sake_metric"] = METRIC_VERSION
    return {
        "model": header.get("model"),
        "method": header.get("method"),
        "mode": mode,
        "dataset_fingerprint": header.get("dataset_fingerprint"),
        "n_rows": len(verdicts),
        "metrics": metrics,
        "counts": counts,
        "judge": judge_info(judge, verdicts),
        "degeneration_rate": degeneration["rate"],
        "degeneration": degeneration,
        "versions": versions,
        "date": header.get("date"),
    }
