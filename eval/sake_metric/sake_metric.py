"""SAKE metric (`evaluate` module): reliability, generality, locality and portability of audio knowledge edits.

Load with `evaluate.load("eval/sake_metric")` (or `evaluate.load("sake/metric")` once published). The logic
lives in the helper modules next to this file (rows, matching, degeneration, llm_judge, scoring); `evaluate`
copies them because this script imports each of them directly with a relative import.
"""

from typing import Any

import datasets
import evaluate

# evaluate copies only modules this script imports directly, and reads anything after "#" on an import line
# as a download URL: keep one plain relative import per helper module, no trailing comments.
from .degeneration import degeneration_kind
from .limits import MAX_JUDGED_CHARS
from .llm_judge import DEFAULT_MODEL, JudgeConfig, LLMJudge, default_cache_dir
from .matching import choose_option
from .predictions_file import read_predictions_file
from .protocol import METRIC_KEYS
from .rows import PredictionsError, load_predictions
from .scoring import METRIC_VERSION, build_results, check_failures, judge_rows, protocol_name

__all__ = ["METRIC_KEYS", "SakeMetric", "choose_option", "degeneration_kind", "read_predictions_file",
           "MAX_JUDGED_CHARS"]

_CITATION = """\
@misc{sake,
  title = {SAKE: Towards Editing Auditory Attribute Knowledge of Large Audio-Language Models}
}
"""

_DESCRIPTION = """\
Scores knowledge edits of large audio-language models on the SAKE benchmark: reliability, generality
(types 1-3), audio locality (types 1-4), text locality and portability (per knowledge category), overall,
per edited attribute and, for sequential editing, per gap. Correctness dimensions compare the post-edit
output with the reference; locality compares the post-edit output with the pre-edit output. Items are judged
by deterministic stages (empty, exact match, multiple-choice matcher) and then, optionally, an LLM judge.
Values are percentages (0-100), null when no item of that kind exists.
"""

_KWARGS_DESCRIPTION = """
Args (one list entry per prediction row; all lists the same length):
    predictions (list[str]): post-edit outputs.
    references (list[str]): reference answers.
    item_id (list[str]): item ids (unique per gap).
    dimension (list[str]): reliability | generality | locality_audio | locality_text | portability.
    type (list[int]): generality 1-3, audio locality 1-4, else 0.
    attribute (list[str]): the edited attribute (animal, emotion, gender, language).
    pre_edit (list[str | None]): pre-edit outputs (required for locality items).
    gap (list[int | None]): sequential-editing gap, None in single editing.
    category (list[str]): portability knowledge category ("" otherwise).
    options (list[list[str]]): the item's option texts in order.
    questions (list[str], optional): the questions, shown to the LLM judge.
    judge (str): "offline" (default: the offline protocol, empty -> exact -> choice, undecided items count as
        incorrect/inconsistent) or "openai" (the paper protocol of App. E: empty -> exact -> LLM judge).
    protocol (str): "paper" or "offline"; default from `judge`.  prefilter (str): "choice" runs the
        multiple-choice matcher before the LLM (protocol "paper+choice").  max_failed (int): items allowed
        without a well-formed LLM verdict (default 0: more raise JudgeFailures).
    judge_model (str): default "gpt-5-mini-2025-08-07".  base_url (str): OpenAI-compatible endpoint.
    cache_dir (str): verdict cache.  max_workers (int): concurrent requests.  reasoning_effort (str|None).
    batch (bool), batch_state (str): Batch API mode.  header (dict): run header (model, method, mode, ...).
Returns:
    dict shaped like the results JSON: metrics {overall, per_attribute, per_gap} of
    {reliability, generality, generality_type1..3, locality_audio, locality_audio_type1..4, locality_text,
    portability, portability_by_category}, counts, judge {name, model, stage_share, ...}, degeneration_rate,
    degeneration, n_rows, mode.
Example:
    >>> metric = evaluate.load("eval/sake_metric")
    >>> metric.compute(predictions=["dog"], references=["dog"], item_id=["a/rel"], dimension=["reliability"],
    ...                type=[0], attribute=["animal"], pre_edit=["cat"], gap=[None], category=[""],
    ...                options=[["dog", "cat"]])["metrics"]["overall"]["reliability"]
    100.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SakeMetric(evaluate.Metric):
    """SAKE knowledge-editing metric."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Value("string"),
                "item_id": datasets.Value("string"),
                "dimension": datasets.Value("string"),
                "type": datasets.Value("int32"),
                "attribute": datasets.Value("string"),
                "pre_edit": datasets.Value("string"),
                "gap": datasets.Value("int32"),
                "category": datasets.Value("string"),
                "options": datasets.Sequence(datasets.Value("string")),
            }),
        )

    # evaluate checks that the first value of a string column is a str, so a null pre-edit output (allowed on
    # correctness rows) in row 0 would be refused before _compute sees it. Nulls travel as this sentinel instead
    # (it starts with a NUL character, which no model output carries) and are turned back in _compute.
    _NULL = "\x00sake:null"

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of rows (a null ``pre_edit`` is allowed anywhere)."""
        if kwargs.get("pre_edit") is not None:
            kwargs["pre_edit"] = [self._NULL if value is None else value for value in kwargs["pre_edit"]]
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one row (a null ``pre_edit`` is allowed)."""
        if "pre_edit" in kwargs and kwargs["pre_edit"] is None:
            kwargs["pre_edit"] = self._NULL
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(
        self, predictions, references, item_id, dimension, type, attribute, pre_edit, gap, category, options,
        questions=None, judge: str = "offline", judge_model: str = DEFAULT_MODEL, base_url=None, cache_dir=None,
        max_workers: int = 8, reasoning_effort="minimal", batch: bool = False, batch_state=None, header=None,
        protocol=None, prefilter=None, max_failed: int = 0, max_retries: int = 5, retry_backoff: float = 1.0,
    ) -> dict[str, Any]:
        n = len(predictions)
        if questions is not None and len(questions) != n:
            raise PredictionsError(f"questions has {len(questions)} entries, predictions {n}")
        rows = []
        for i in range(n):
            rows.append({
                "item_id": item_id[i], "dimension": dimension[i], "type": type[i], "attribute": attribute[i],
                "reference": references[i], "pre_edit": None if pre_edit[i] == self._NULL else pre_edit[i], "post_edit": predictions[i], "gap": gap[i],
                "category": category[i], "options": list(options[i] or []),
                "question": questions[i] if questions is not None else "",
            })
        run_header, parsed = load_predictions(rows, header=header)
        if protocol is None:
            protocol = "paper" if judge == "openai" else "offline"
        name = protocol_name(protocol, prefilter)
        if judge not in ("offline", "openai"):
            raise ValueError(f"judge must be 'offline' or 'openai', got {judge!r}")
        if protocol == "offline" and judge == "openai":
            raise ValueError("protocol 'offline' uses no LLM judge; drop judge='openai' or use protocol='paper'")
        the_judge: Any = "offline" if protocol == "offline" else LLMJudge(JudgeConfig(
            model=judge_model, base_url=base_url, max_workers=max_workers, reasoning_effort=reasoning_effort,
            cache_dir=cache_dir if cache_dir is not None else default_cache_dir(), batch=batch,
            batch_state=batch_state, max_retries=max_retries, retry_backoff=retry_backoff))
        verdicts = judge_rows(parsed, the_judge, protocol=protocol, prefilter=prefilter)
        check_failures(verdicts, max_failed)
        results = build_results(run_header, verdicts, the_judge, name)
        results["versions"]["sake_metric"] = METRIC_VERSION
        return results
