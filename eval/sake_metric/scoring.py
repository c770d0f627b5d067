"""Judge prediction rows stage by stage and aggregate them into SAKE's metrics (the results JSON).

Two protocols (recorded as `judge.protocol` in every results JSON):
- `paper` (App. E of the paper): `empty` -> `exact` -> `llm`. An empty output is incorrect / inconsistent, an
  exact match (correctness: with the reference; consistency: with the pre-edit output) is correct /
  consistent, every other item goes to the LLM judge. With the opt-in prefilter `choice` the multiple-choice
  matcher decides before the LLM where it can (`paper+choice`; fewer requests, not the paper's protocol).
- `offline` (no key, the demo's and CI's): `empty` -> `exact` -> `choice` -> `undecided`; undecided items are
  counted as incorrect / inconsistent.

Stages (the first that decides an item records its name):
1. `empty`  - the post-edit output has no word characters -> incorrect / inconsistent;
2. `exact`  - equal after normalization -> correct / consistent;
3. `choice` - the multiple-choice matcher (`matching.choose_option`) decides unambiguously: correctness
              compares the chosen option with the reference's option; consistency compares the options the
              pre-edit and post-edit outputs choose (both must be unambiguous);
4. `llm`    - the LLM judge (`llm_judge.LLMJudge`); `llm_failed` when its verdict stays malformed (counted as
              incorrect / inconsistent only when the caller allows failures: see `check_failures`).
Every stage, and the degeneration detector, reads only the judged text of an output (`limits.judged_text`:
its first `MAX_JUDGED_CHARS` characters), of each option and of the reference (`MAX_OPTION_CHARS`) and of the
question (`MAX_QUESTION_CHARS`, the LLM prompt only).

Metrics (paper §3.2) are percentages of items judged correct (reliability, generality, portability) or
consistent (audio and text locality), pooled over items: averages over types are item-weighted, as in the
paper's tables. A metric with no items is null.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .degeneration import degeneration_kind
from .limits import (MAX_JUDGED_CHARS, MAX_OPTION_CHARS, MAX_QUESTION_CHARS, is_clipped, judged_options,
                     judged_text)
from .llm_judge import LLMJudge, consistency_prompt, correctness_prompt
from .matching import choose_option, exact_match, is_empty, option_index
from .protocol import METRIC_KEYS, TYPES
from .rows import PredictionRow

logger = logging.getLogger(__name__)

METRIC_VERSION = "1.1.0"
STAGES = ("empty", "exact", "choice", "llm", "llm_failed", "undecided")
PROTOCOLS = ("paper", "offline")
#: The one line every table of offline-protocol numbers carries (report, `sake score`, the demo and its README block).
NOT_COMPARABLE_LINE = ("Offline protocol (no LLM judge; undecided items count as wrong): these numbers are not "
                       "comparable with the paper's. Set OPENAI_API_KEY to score with the paper's protocol.")


def default_protocol() -> str:
    """The protocol a caller gets without choosing one: "paper" when `OPENAI_API_KEY` is set, else "offline"."""
    return "paper" if os.environ.get("OPENAI_API_KEY") else "offline"


def comparability_note(protocols: Iterable[str]) -> str | None:
    """`NOT_COMPARABLE_LINE` when any of `protocols` is "offline", else None."""
    return NOT_COMPARABLE_LINE if "offline" in set(protocols) else None
PREFILTERS = ("choice",)
#: One character per stage / dimension in the results' compact per-item record (`items`).
STAGE_CODES = {"empty": "e", "exact": "x", "choice": "c", "llm": "l", "llm_failed": "f", "undecided": "u"}
DIMENSION_CODES = {"reliability": "r", "generality": "g", "locality_audio": "a", "locality_text": "t",
                   "portability": "p"}
TYPE_KEYS = {dim: TYPES[dim] for dim in ("generality", "locality_audio")}  # dimensions reported per type
UNCATEGORIZED = "uncategorized"


class JudgeFailures(RuntimeError):
    """More items than allowed got no well-formed LLM verdict; one-line message with the count and first id."""

    def __init__(self, failed: Sequence["ItemVerdict"], allowed: int):
        self.failed = [v.row.item_id for v in failed]
        first = failed[0].row
        gap = f" at gap {first.gap}" if first.gap is not None else ""
        super().__init__(
            f"{len(failed)} item(s) got no well-formed verdict from the LLM judge after its retries (first: "
            f"{first.item_id}{gap}); {allowed} allowed (--max-failed). Nothing of them was cached: rerun to ask "
            "again for those items only")


@dataclass(frozen=True)
class ItemVerdict:
    """How one row was judged: `passed` (correct / consistent), the deciding `stage`, degeneration."""

    row: PredictionRow
    passed: bool
    stage: str
    degeneration: str | None
    clipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        r = self.row
        return {"item_id": r.item_id, "gap": r.gap, "dimension": r.dimension, "type": r.type,
                "attribute": r.attribute, "category": r.category, "passed": self.passed, "stage": self.stage,
                "degeneration": self.degeneration}


def protocol_name(protocol: str, prefilter: str | None = None) -> str:
    """`judge.protocol` of the results: "paper", "paper+choice" or "offline"; ValueError for anything else."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if prefilter is not None and prefilter not in PREFILTERS:
        raise ValueError(f"prefilter must be one of {', '.join(PREFILTERS)} or None, got {prefilter!r}")
    if protocol == "offline":
        return "offline"  # the choice stage is part of the offline protocol
    return "paper+choice" if prefilter == "choice" else "paper"


def deterministic_verdict(row: PredictionRow, *, use_choice: bool = True) -> tuple[str, bool] | None:
    """(stage, passed) from stages 1-2 (and 3 with `use_choice`), or None when none of them decides."""
    post = judged_text(row.post_edit)
    if is_empty(post):
        return "empty", False
    reference = judged_text(row.reference, MAX_OPTION_CHARS)
    target = judged_text(row.pre_edit) if row.is_consistency else reference
    if exact_match(post, target):
        return "exact", True
    if use_choice and row.options:
        options = judged_options(row.options)
        chosen = choose_option(post, options)
        if chosen.index is not None:
            if row.is_consistency:
                pre = choose_option(judged_text(row.pre_edit), options)
                if pre.index is not None:
                    return "choice", chosen.index == pre.index
            else:
                ref = option_index(reference, options)
                if ref is not None:
                    return "choice", chosen.index == ref
    return None


def judge_prompt(row: PredictionRow) -> str:
    """The LLM judge's prompt for a row (consistency for locality, correctness otherwise), on judged text."""
    question = judged_text(row.question, MAX_QUESTION_CHARS)
    if row.is_consistency:
        return consistency_prompt(question, judged_text(row.pre_edit), judged_text(row.post_edit))
    return correctness_prompt(question, judged_text(row.reference, MAX_OPTION_CHARS), judged_text(row.post_edit))


def judge_rows(rows: Sequence[PredictionRow], judge: str | LLMJudge = "offline", *, protocol: str | None = None,
               prefilter: str | None = None) -> list[ItemVerdict]:
    """Judge every row under a protocol (module doc): `paper` needs an `LLMJudge`, `offline` takes "offline".

    `protocol` defaults to "paper" for an `LLMJudge` and "offline" otherwise. Items whose LLM verdict stays
    malformed come back as `llm_failed`; `check_failures` decides whether that is acceptable.
    """
    if protocol is None:
        protocol = "paper" if isinstance(judge, LLMJudge) else "offline"
    protocol_name(protocol, prefilter)
    if protocol == "paper" and not isinstance(judge, LLMJudge):
        raise ValueError("the paper protocol needs an LLM judge (judge='openai'); use protocol='offline' without one")
    if protocol == "offline" and not (isinstance(judge, str) and judge == "offline"):
        raise ValueError(f"the offline protocol takes judge='offline', got {judge!r}")
    use_choice = protocol == "offline" or prefilter == "choice"
    decided: list[tuple[str, bool] | None] = [deterministic_verdict(r, use_choice=use_choice) for r in rows]
    pending = [i for i, d in enumerate(decided) if d is None]
    if pending and isinstance(judge, LLMJudge):
        verdicts = judge.judge([judge_prompt(rows[i]) for i in pending])
        for i, verdict in zip(pending, verdicts):
            decided[i] = ("llm", verdict) if verdict is not None else ("llm_failed", False)
    out = []
    for row, decision in zip(rows, decided):
        stage, passed = decision if decision is not None else ("undecided", False)
        out.append(ItemVerdict(row=row, passed=bool(passed), stage=stage,
                               degeneration=degeneration_kind(judged_text(row.post_edit)),
                               clipped=is_clipped(row.post_edit) or is_clipped(row.pre_edit)))
    return out


def check_failures(verdicts: Sequence[ItemVerdict], max_failed: int = 0) -> None:
    """Raise `JudgeFailures` when more than `max_failed` items are `llm_failed`; else log them."""
    failed = [v for v in verdicts if v.stage == "llm_failed"]
    if len(failed) > max_failed:
        raise JudgeFailures(failed, max_failed)
    if failed:
        logger.warning("%d item(s) got no well-formed LLM verdict (allowed by max_failed=%d); counted as "
                       "incorrect/inconsistent and listed in judge.failed_items", len(failed), max_failed)


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


def items_record(verdicts: Sequence[ItemVerdict]) -> dict[str, Any]:
    """Compact per-item verdicts in row order (what `eval.agreement` compares): one character per item.

    `keys_sha256` identifies the (item_id, gap) sequence, so two results are comparable item by item only when
    it matches; `dimension` uses `DIMENSION_CODES`, `stage` `STAGE_CODES`, `passed` is "1" / "0".
    """
    digest = hashlib.sha256()
    for v in verdicts:
        digest.update(f"{v.row.item_id}\t{'' if v.row.gap is None else v.row.gap}\n".encode("utf-8"))
    return {
        "keys_sha256": digest.hexdigest(),
        "dimension": "".join(DIMENSION_CODES[v.row.dimension] for v in verdicts),
        "stage": "".join(STAGE_CODES[v.stage] for v in verdicts),
        "passed": "".join("1" if v.passed else "0" for v in verdicts),
    }


def generation_summary(verdicts: Sequence[ItemVerdict], header: Mapping[str, Any]) -> dict[str, Any]:
    """How many post-edit (`hit_max_new_tokens`) and pre-edit (`pre_edit_hit_max_new_tokens`) outputs stopped at
    the run's `max_new_tokens` (truncated answers), when rows say (None when no row carries the flag)."""
    known = [v for v in verdicts if v.row.hit_limit is not None]
    hit = [v for v in known if v.row.hit_limit]
    pre_known = [v for v in verdicts if v.row.pre_hit_limit is not None]
    pre_hit = [v for v in pre_known if v.row.pre_hit_limit]
    return {
        "max_new_tokens": header.get("max_new_tokens"),
        "hit_max_new_tokens": len(hit) if known else None,
        "rows_with_flag": len(known),
        "per_dimension": {d: sum(v.row.dimension == d for v in hit) for d in DIMENSION_CODES} if known else {},
        "pre_edit_hit_max_new_tokens": len(pre_hit) if pre_known else None,
        "pre_edit_rows_with_flag": len(pre_known),
        "pre_edit_per_dimension": ({d: sum(v.row.dimension == d for v in pre_hit) for d in DIMENSION_CODES}
                                   if pre_known else {}),
    }


def random_baseline(verdicts: Sequence[ItemVerdict]) -> dict[str, float | None]:
    """Per dimension, the expected score (%) of answering each item with a uniformly random option: the mean of
    100 / (number of options) over the items that list options (the paper's random-baseline line, Figure 4).
    For locality it is the chance that a random answer equals the pre-edit answer, which is the same 1 / k."""
    sums: dict[str, list[float]] = {d: [] for d in DIMENSION_CODES}
    for v in verdicts:
        if v.row.options:
            sums[v.row.dimension].append(100.0 / len(v.row.options))
    return {d: (round(sum(x) / len(x), 4) if x else None) for d, x in sums.items()}


def judge_info(judge: str | LLMJudge, verdicts: Sequence[ItemVerdict], protocol: str) -> dict[str, Any]:
    """The results JSON's `judge` block."""
    share, counts = stage_summary(verdicts)
    info: dict[str, Any] = {"protocol": protocol, "name": "offline", "model": None, "host": None,
                            "prompt_version": None, "version": METRIC_VERSION, "stage_share": share,
                            "stage_counts": counts}
    if isinstance(judge, LLMJudge):
        from .llm_judge import PROMPT_VERSION

        info.update({"name": judge.name, "model": judge.config.model, "host": judge.host,
                     "prompt_version": PROMPT_VERSION,
                     "seed": judge.config.seed, "reasoning_effort": judge.config.reasoning_effort,
                     "paper_settings": judge.config.paper_settings,
                     "requests_sent": judge.requests_sent, "verdict_requests": judge.calls,
                     "malformed_verdicts": judge.malformed, "cache_hits": judge.cache_hits})
    failed = [v.row.item_id for v in verdicts if v.stage == "llm_failed"]
    info["n_failed"] = len(failed)
    info["failed_items"] = failed[:50]
    info["clipped_outputs"] = sum(v.clipped for v in verdicts)
    info["max_judged_chars"] = MAX_JUDGED_CHARS
    info["note"] = {
        "offline": "offline protocol: empty -> exact -> choice; items no stage decides are 'undecided' and "
                   "counted as incorrect/inconsistent",
        "paper": "paper protocol (App. E): empty -> exact -> LLM judge",
        "paper+choice": "paper protocol with the choice prefilter: empty -> exact -> choice -> LLM judge",
    }[protocol]
    return info


def build_results(
    header: Mapping[str, Any] | None, verdicts: Sequence[ItemVerdict], judge: str | LLMJudge,
    protocol: str | None = None,
) -> dict[str, Any]:
    """The results JSON (ARCHITECTURE.md) for judged rows and their run header.

    `protocol` is `protocol_name(...)`'s value; by default "paper" for an LLM judge, else "offline".
    """
    header = dict(header or {})
    if protocol is None:
        protocol = "paper" if isinstance(judge, LLMJudge) else "offline"
    metrics, counts = aggregate(verdicts)
    mode = header.get("mode") or ("sequential" if any(v.row.gap is not None for v in verdicts) else "single")
    degeneration = degeneration_summary(verdicts)
    versions = dict(header.get("versions") or {})
    versions["sake_metric"] = METRIC_VERSION
    return {
        "model": header.get("model"),
        "method": header.get("method"),
        "method_display_name": header.get("method_display_name"),
        "method_display_order": header.get("method_display_order"),
        "mode": mode,
        "dataset_fingerprint": header.get("dataset_fingerprint"),
        "configs": list(header["configs"]) if header.get("configs") else None,
        # the sequential rule the rows follow (edits evaluated, largest gap; the paper's: 5 and 5); null in single
        "eval_edits": header.get("eval_edits"), "max_gap": header.get("max_gap"),
        "n_rows": len(verdicts),
        "metrics": metrics,
        "counts": counts,
        "judge": judge_info(judge, verdicts, protocol),
        "degeneration_rate": degeneration["rate"],
        "degeneration": degeneration,
        "generation": generation_summary(verdicts, header),
        "random_baseline": random_baseline(verdicts),
        "items": items_record(verdicts),
        "versions": versions,
        "date": header.get("date"),
    }
