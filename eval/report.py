"""Tables and plots over many scored runs, shaped like the SAKE paper's.

    python -m eval.report RUN_DIR_OR_FILES... --out DIR [--judge offline|openai [--prefilter choice] ...]

Inputs: results JSON files (`eval.score`), predictions JSONL files (scored here: `--judge offline` = offline
protocol, `--judge openai` = paper protocol; default: openai when OPENAI_API_KEY is set, else offline), or folders (their results JSON files, searched recursively; a folder
without any is searched for predictions JSONL). Predictions files of one run written one attribute each (`sake run
--config X`) are scored as one run, and so is a results JSON that names them (`parts`: `sake score A.jsonl B.jsonl
--out F`). Two inputs with the same (model, method, mode, protocol) are an error. Every table row names the judge protocol that produced it (`paper`, `paper+choice`, `offline`; results
written before protocols were recorded: `paper+choice` for an LLM judge, `offline` otherwise).

Writes into DIR (markdown `.md` + `.csv` per table, PNG per plot, and `index.md` listing them):
- `table2_overall`            single editing, methods x metrics per model (paper Table 2);
- `table3_portability_spread` per model, the two methods with the best portability: standard deviation (sample,
                              n-1) and range of their portability over all knowledge categories (Table 3);
- `table7_wall_clock`         hypernetwork training time (KE, MEND) and wall-clock per method and mode from the
                              runs' `.timing.json` (Table 7);
- `table8_attributes`         per model: method x attribute (ALL + each) with generality / audio-locality
                              types (Tables 8-10);
- `table11_gaps`              sequential editing, per model: method x gap (Tables 11-13);
- `table14_portability_<attr>` portability per knowledge category, model x method (Tables 14-17);
- `table18_degeneration`      degeneration rate (%), model x method, per mode (Table 18);
- `judge_stages`              share of items each judge stage decided, per run, with the requests sent;
- `generation_limits`         post-edit and pre-edit outputs that stopped at `max_new_tokens` (truncated
                              answers), per run;
- `fig3_types_<model>.png`    generality / locality types per method (Figure 3);
- `fig4_gaps_<model>.png`     metrics vs gap in sequential editing, with the random baseline computed from the
                              items' option counts (dashed; Figure 4);
- `fig5_categories.png`       portability items per knowledge category, one panel per attribute (Figure 5).
Values are percentages with two decimals; "-" where a metric has no items. When any run was scored with the
offline protocol, every table (and `index.md`) ends with one line saying the numbers are not comparable with the
paper's (`eval.sake_metric.scoring.NOT_COMPARABLE_LINE`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from eval.sake_metric.scoring import comparability_note
from sake_core.atomic import atomic_write
from sake_core.protocol import SEQUENTIAL_EVAL_EDITS, SEQUENTIAL_MAX_GAP, method_display
from sake_core.run_header import resume_differences
from sake_core.errors import DataError, error_prefix, user_errors
from sake_core.command import command_prog

logger = logging.getLogger(__name__)

MAIN_METRICS = (("reliability", "Reliability"), ("generality", "Generality"),
                ("locality_audio", "Audio Locality"), ("locality_text", "Text Locality"),
                ("portability", "Portability"))
ATTRIBUTE_COLUMNS = (
    ("reliability", "Reliability"), ("generality", "Gen. Avg."), ("generality_type1", "Gen. T1"),
    ("generality_type2", "Gen. T2"), ("generality_type3", "Gen. T3"), ("locality_audio", "Audio Loc. Avg."),
    ("locality_audio_type1", "Audio Loc. T1"), ("locality_audio_type2", "Audio Loc. T2"),
    ("locality_audio_type3", "Audio Loc. T3"), ("locality_audio_type4", "Audio Loc. T4"),
    ("locality_text", "Text Loc."), ("portability", "Port."),
)
TYPE_BARS = (("generality_type1", "Gen. T1"), ("generality_type2", "Gen. T2"), ("generality_type3", "Gen. T3"),
             ("locality_audio_type1", "Loc. T1"), ("locality_audio_type2", "Loc. T2"),
             ("locality_audio_type3", "Loc. T3"), ("locality_audio_type4", "Loc. T4"),
             ("locality_text", "Text Loc."))


PROTOCOL_ORDER = {"paper": 0, "paper+choice": 1, "offline": 2}


def method_label(source: Mapping[str, Any] | str | None) -> str:
    """Display name of a method: from a results JSON's (or run header's) display fields, else the paper's name
    ("ft_llm" or "FT-LLM" -> "FT (LLM)"), else the name itself."""
    if isinstance(source, Mapping):
        name = method_display(source.get("method"), source.get("method_display_name"),
                              source.get("method_display_order"))[0]
        rule = (source.get("eval_edits"), source.get("max_gap"))
        if source.get("mode") == "sequential" and None not in rule and \
                rule != (SEQUENTIAL_EVAL_EDITS, SEQUENTIAL_MAX_GAP):  # not the paper's rule: said with the name
            name += f" [edits {rule[0]}, gaps 0-{rule[1]}]"
        return name
    return method_display(source)[0] if source else "?"


def method_sort_key(source: Mapping[str, Any] | str | None) -> tuple[float, str]:
    """Methods in display order (the paper's first, in its order; others by their recorded place), unknown ones
    last by name."""
    if isinstance(source, Mapping):
        name = str(source.get("method") or "")
        return (method_display(name, source.get("method_display_name"), source.get("method_display_order"))[1],
                name)
    return (method_display(source)[1], source or "")


def model_label(model: str | None) -> str:
    """Last component of a Hub id or path ("Qwen/Qwen2-Audio-7B-Instruct" -> "Qwen2-Audio-7B-Instruct")."""
    return (model or "?").rstrip("/").split("/")[-1]


def fmt(value: Any) -> str:
    """Two decimals, "-" for None."""
    return "-" if value is None else f"{float(value):.2f}"


def protocol_of(results: dict[str, Any]) -> str:
    """The judge protocol of a results JSON (older results: inferred from the judge's name)."""
    judge = results.get("judge") or {}
    if judge.get("protocol"):
        return str(judge["protocol"])
    return "paper+choice" if judge.get("name") == "openai" else "offline"


@dataclass
class Run:
    """One scored run, where it came from, and the runner's timing (`.timing.json`) when found."""

    results: dict[str, Any]
    source: str
    timing: dict[str, Any] | None = None

    @property
    def protocol(self) -> str:
        return protocol_of(self.results)

    @property
    def model(self) -> str:
        return model_label(self.results.get("model"))

    @property
    def method(self) -> str:
        return self.results.get("method") or "?"

    @property
    def mode(self) -> str:
        return self.results.get("mode") or "single"

    @property
    def label(self) -> str:
        """The method's display name (recorded in the results)."""
        return method_label(self.results)

    def metrics(self, scope: str = "overall", key: str | None = None) -> dict[str, Any]:
        m = self.results["metrics"]
        if scope == "overall":
            return m["overall"]
        return (m.get(scope) or {}).get(key) or {}


# -- loading ------------------------------------------------------------------------------------------------
def _is_results(obj: Any) -> bool:
    return isinstance(obj, dict) and "metrics" in obj and "judge" in obj


def _header(path: Path) -> dict[str, Any] | None:
    """The run header of a predictions file (its first line), or None when it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = json.loads(handle.readline())
    except (OSError, ValueError):
        return None
    return first if isinstance(first, dict) and first.get("kind") == "header" else None


def _is_predictions(path: Path) -> bool:
    return _header(path) is not None


def run_parts(paths: Sequence[Path]) -> list[list[Path]]:
    """Predictions files grouped by run: files whose headers agree on every resume field but ``configs`` (one run
    written one attribute each, ``sake run --config X``) form one group, scored as one run
    (:func:`eval.score.join_parts`); every other file is a group of its own. Groups in the order of their first
    file."""
    groups: list[tuple[dict[str, Any], list[Path]]] = []
    for path in paths:
        header = _header(path) or {}
        same = next((group for first, group in groups if header.get("configs") and first.get("configs") and
                     set(resume_differences(first, header)) <= {"configs"}), None)
        if same is not None:
            same.append(path)
        else:
            groups.append((header, [path]))
    return [group for _, group in groups]


def load_runs(inputs: Sequence[str | os.PathLike], score_kwargs: dict[str, Any] | None = None) -> list[Run]:
    """Results of every input (see module doc), sorted by model, mode, method."""
    from eval.score import score_predictions

    runs: list[Run] = []

    scored: set[Path] = set()  # predictions files whose results JSON was read

    def add_results(path: Path) -> None:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if not _is_results(obj):
            raise DataError(f"{path}: not a results JSON (expected keys 'metrics' and 'judge')")
        parts = obj.get("parts")
        if isinstance(parts, list) and parts and all(isinstance(p, str) and p == Path(p).name for p in parts):
            predictions: list[Path] = [path.with_name(p) for p in parts]  # several files scored as one run
            missing = [p.name for p in predictions if not p.is_file()]
            if missing:
                logger.warning("%s: its parts %s are not beside it: no wall-clock time (Table 7) for this run", path,
                               ", ".join(missing))
        else:
            beside = predictions_beside(path)
            predictions = [beside] if beside is not None else []
        scored.update(p.resolve() for p in predictions)
        runs.append(Run(obj, str(path), _joined_timing(predictions) if predictions else None))

    to_score: list[Path] = []

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            results = []
            for candidate in sorted(path.rglob("*.json")):
                try:
                    if _is_results(json.loads(candidate.read_text(encoding="utf-8"))):
                        results.append(candidate)
                except (OSError, ValueError):
                    continue
            if results:
                for candidate in results:
                    add_results(candidate)
                unscored = [p for p in sorted(path.rglob("*.jsonl"))
                            if _is_predictions(p) and p.resolve() not in scored]
                if unscored:
                    logger.warning("%s: using its results JSON only; predictions without a results file next to "
                                   "them are not scored: %s", path, ", ".join(map(str, unscored)))
            else:
                predictions = [p for p in sorted(path.rglob("*.jsonl")) if _is_predictions(p)]
                if not predictions:
                    raise DataError(f"{path}: no results JSON and no predictions JSONL found")
                to_score += predictions
        elif path.suffix == ".jsonl":
            to_score.append(path)
        elif path.is_file():
            add_results(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    for group in run_parts(to_score):
        scored_as = group[0] if len(group) == 1 else group
        runs.append(Run(score_predictions(scored_as, **(score_kwargs or {})), ", ".join(map(str, group)),
                        _joined_timing(group)))
    seen: dict[tuple[str, str, str, str], Run] = {}
    for run in runs:
        key = (run.results.get("model") or "?", run.method, run.mode, run.protocol)
        if key in seen:
            first = seen[key]
            configs = [r.results.get("configs") for r in (first, run)]
            rules = [(r.results.get("eval_edits"), r.results.get("max_gap")) for r in (first, run)]
            hint = ""
            if configs[0] and configs[1] and configs[0] != configs[1]:
                hint = (f" (runs of different attributes, {configs[0]} and {configs[1]}: a report row covers one "
                        "run; score the parts of one run as one, `sake score A.jsonl B.jsonl ... --out "
                        "RUN.results.json`, or report them in separate calls)")
            elif rules[0] != rules[1]:
                hint = (f" (sequential rules (eval_edits, max_gap) {rules[0]} and {rules[1]}: report each rule in "
                        "its own call)")
            raise DataError(f"two results for model {key[0]!r}, method {key[1]!r}, mode {key[2]!r}, protocol "
                             f"{key[3]!r}: {first.source} and {run.source}{hint}")
        seen[key] = run
    runs.sort(key=lambda r: (r.model, PROTOCOL_ORDER.get(r.protocol, 9), r.mode != "single", r.mode,
                             method_sort_key(r.results)))
    return runs


def predictions_beside(results: Path) -> Path | None:
    """The predictions file a results JSON scored, found beside it by name: ``X.results.json``, ``X.json``,
    ``X.offline.json`` or ``X.paper.json`` (any name that starts with ``X.``) for ``X.jsonl`` (present, or its
    runner's ``X.jsonl.timing.json`` alone); the longest such name wins. None when there is none."""
    stem = results.name[:-len(".json")] if results.name.endswith(".json") else results.name
    parts = stem.split(".")
    for end in range(len(parts), 0, -1):
        candidate = results.with_name(".".join(parts[:end]) + ".jsonl")
        if candidate.is_file() or candidate.with_name(candidate.name + ".timing.json").is_file():
            return candidate
    return None


def _joined_timing(parts: Sequence[Path]) -> dict[str, Any] | None:
    """The runner's timing of a run written as several predictions files: their seconds, units, sessions and
    per-unit entries added up; None unless every part has one."""
    timings = [_timing(p) for p in parts]
    if not timings or any(t is None for t in timings):
        return None
    if len(timings) == 1:
        return timings[0]
    joined: dict[str, Any] = {}
    for timing in timings:
        for key, value in (timing or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                joined[key] = round(joined.get(key, 0) + value, 4)
            elif isinstance(value, list):
                joined[key] = joined.get(key, []) + value
    return joined


def _timing(predictions: Path) -> dict[str, Any] | None:
    """The runner's `PREDICTIONS.jsonl.timing.json` next to a predictions file, or None."""
    path = predictions.with_name(predictions.name + ".timing.json")
    try:
        timing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return timing if isinstance(timing, dict) and isinstance(timing.get("total_s"), (int, float)) else None


# -- tables -------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A titled table: header row + body rows of strings, and an optional note line printed under it."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str | None = None

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buffer.getvalue()


def _methods(runs: Iterable[Run]) -> list[str]:
    """Method ids of ``runs`` in display order (each run's recorded place)."""
    keys: dict[str, tuple[float, str]] = {}
    for r in runs:
        keys.setdefault(r.method, method_sort_key(r.results))
    return sorted(keys, key=keys.__getitem__)


def _labels(runs: Iterable[Run]) -> dict[str, str]:
    """Method id -> display name, as the runs record it."""
    out: dict[str, str] = {}
    for r in runs:
        out.setdefault(r.method, r.label)
    return out


def _groups(runs: Iterable[Run]) -> list[tuple[str, str]]:
    """(model, protocol) pairs in report order: numbers of different protocols never share a row."""
    return sorted({(r.model, r.protocol) for r in runs}, key=lambda g: (g[0], PROTOCOL_ORDER.get(g[1], 9), g[1]))


def table_overall(runs: Sequence[Run]) -> Table | None:
    """Paper Table 2: rows (model, protocol, metric), columns methods; single editing."""
    single = [r for r in runs if r.mode == "single"]
    if not single:
        return None
    methods, labels = _methods(single), _labels(single)
    rows = []
    for model, protocol in _groups(single):
        by_method = {r.method: r for r in single if r.model == model and r.protocol == protocol}
        for key, label in MAIN_METRICS:
            rows.append([model, protocol, label] + [fmt(by_method[m].metrics()[key]) if m in by_method else "-"
                                                    for m in methods])
    return Table("table2_overall", "Table 2: single editing, overall (%)",
                 ["Model", "Protocol", "Metric"] + [labels[m] for m in methods], rows)


def _categories(run: Run) -> dict[str, float]:
    """Portability per knowledge category over all attributes ("Attribute/Category" -> %)."""
    out = {}
    for attr, m in sorted((run.results["metrics"].get("per_attribute") or {}).items()):
        for category, value in sorted((m.get("portability_by_category") or {}).items()):
            if value is not None:
                out[f"{attr}/{category}"] = float(value)
    return out


def table_portability_spread(runs: Sequence[Run]) -> Table | None:
    """Paper Table 3: per (model, protocol), the two single-editing methods with the best overall portability;
    standard deviation (sample, n-1, as the paper's) and range of their portability across knowledge categories
    (every (attribute, category) pair is one category)."""
    single = [r for r in runs if r.mode == "single" and r.metrics().get("portability") is not None]
    rows = []
    for model, protocol in _groups(single):
        group = [r for r in single if r.model == model and r.protocol == protocol]
        best = sorted(group, key=lambda r: (-float(r.metrics()["portability"]), method_sort_key(r.results)))[:2]
        for run in best:
            values = list(_categories(run).values())
            std = statistics.stdev(values) if len(values) >= 2 else None
            spread = max(values) - min(values) if values else None
            rows.append([model, protocol, run.label, fmt(run.metrics()["portability"]),
                         str(len(values)), fmt(std), fmt(spread)])
    if not rows:
        return None
    return Table("table3_portability_spread",
                 "Table 3: spread of portability across knowledge categories, two best methods per model (%)",
                 ["Model", "Protocol", "Method", "Portability", "Categories", "Std.", "Range"], rows)


def _duration(seconds: float | None) -> str:
    """Paper style "5h 50m" for long runs; minutes and seconds, or seconds, for short ones."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(round(seconds / 60))
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(round(seconds % 60)):02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def hypernetwork_training_s(run: Run) -> float | None:
    """Seconds the run's hypernetwork (KE / MEND) trained (`editors.train`'s `train_seconds`), as the editor
    reported it with each edit in the runner's `.timing.json`; None for other methods or older networks."""
    for unit in (run.timing or {}).get("per_unit") or []:
        value = unit.get("hypernetwork_train_s") if isinstance(unit, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def table_wall_clock(runs: Sequence[Run]) -> Table | None:
    """Paper Table 7: hypernetwork training (KE, MEND: `editors.train`'s time, carried by the runner's
    `.timing.json`) and wall-clock of each method's editing runs (the runner's `.timing.json`: the last
    invocation's total; a resumed run covers only the units it ran, shown as units)."""
    timed = [r for r in runs if r.timing is not None]
    if not timed:
        return None
    rows = []
    by_key: dict[tuple[str, str], dict[str, Run]] = {}
    for run in timed:
        by_key.setdefault((run.method, run.model), {}).setdefault(run.mode, run)
    first = {key: next(iter(modes.values())) for key, modes in by_key.items()}
    for (method, model), modes in sorted(by_key.items(),
                                         key=lambda kv: (method_sort_key(first[kv[0]].results), kv[0][1])):
        trained = [s for s in (hypernetwork_training_s(r) for r in modes.values()) if s is not None]
        row = [first[(method, model)].label, model, _duration(trained[0]) if trained else "-"]
        for mode in ("single", "sequential"):
            of_mode = modes.get(mode)
            if of_mode is None:
                row += ["-", "-", "-"]
                continue
            t = of_mode.timing or {}
            units = int(t.get("units") or 0)
            row += [_duration(t.get("total_s")), str(units),
                    f"{float(t['total_s']) / units:.2f}" if units else "-"]
        rows.append(row)
    return Table("table7_wall_clock", "Table 7: hypernetwork training and wall-clock time of the editing runs "
                 "(editors.train, runner .timing.json)",
                 ["Method", "Model", "Hypernetwork training", "Single: wall-clock", "Single: units", "Single: s/unit",
                  "Sequential: wall-clock", "Sequential: units", "Sequential: s/unit"], rows)


def table_attributes(runs: Sequence[Run]) -> Table | None:
    """Paper Tables 8-10: per model, rows (method, ALL + attributes), columns metrics with types."""
    single = [r for r in runs if r.mode == "single"]
    if not single:
        return None
    rows = []
    for run in single:
        attributes = sorted(run.results["metrics"].get("per_attribute") or {})
        for attr in ["ALL"] + attributes:
            m = run.metrics() if attr == "ALL" else run.metrics("per_attribute", attr)
            rows.append([run.model, run.protocol, run.label,
                         attr.capitalize() if attr != "ALL" else attr] + [fmt(m.get(k)) for k, _ in ATTRIBUTE_COLUMNS])
    return Table("table8_attributes", "Tables 8-10: single editing per attribute and type (%)",
                 ["Model", "Protocol", "Method", "Attr."] + [label for _, label in ATTRIBUTE_COLUMNS], rows)


def table_gaps(runs: Sequence[Run]) -> Table | None:
    """Paper Tables 11-13: sequential editing, rows (model, method, gap)."""
    sequential = [r for r in runs if r.mode == "sequential"]
    if not sequential:
        return None
    rows = []
    for run in sequential:
        per_gap = run.results["metrics"].get("per_gap") or {}
        for gap in sorted(per_gap, key=int):
            rows.append([run.model, run.protocol, run.label, gap]
                        + [fmt(per_gap[gap].get(k)) for k, _ in MAIN_METRICS])
    return Table("table11_gaps", "Tables 11-13: sequential editing per gap (%)",
                 ["Model", "Protocol", "Method", "Gap"] + [label for _, label in MAIN_METRICS], rows)


def tables_portability(runs: Sequence[Run]) -> list[Table]:
    """Paper Tables 14-17: one table per attribute, rows (model, method), columns knowledge categories."""
    single = [r for r in runs if r.mode == "single"]
    attributes = sorted({a for r in single for a in (r.results["metrics"].get("per_attribute") or {})})
    tables = []
    for attr in attributes:
        categories = sorted({c for r in single
                             for c in r.metrics("per_attribute", attr).get("portability_by_category", {})})
        if not categories:
            continue
        rows = []
        for run in single:
            by_cat = run.metrics("per_attribute", attr).get("portability_by_category") or {}
            if by_cat:
                rows.append([run.model, run.protocol, run.label]
                            + [fmt(by_cat.get(c)) for c in categories])
        tables.append(Table(f"table14_portability_{_slug(attr)}",
                            f"Tables 14-17: portability by knowledge category, {attr} (%)",
                            ["Model", "Protocol", "Method"] + categories, rows))
    return tables


def table_degeneration(runs: Sequence[Run]) -> Table | None:
    """Paper Table 18: degeneration rate (%), rows (model, protocol, mode), columns methods."""
    if not runs:
        return None
    methods, labels = _methods(runs), _labels(runs)
    rows = []
    for model, protocol in _groups(runs):
        for mode in ("single", "sequential"):
            by_method = {r.method: r for r in runs if r.model == model and r.mode == mode and r.protocol == protocol}
            if by_method:
                rows.append([model, protocol, mode] + [fmt(by_method[m].results.get("degeneration_rate"))
                                                       if m in by_method else "-" for m in methods])
    return Table("table18_degeneration", "Table 18: degeneration rate of post-edit outputs (%)",
                 ["Model", "Protocol", "Mode"] + [labels[m] for m in methods], rows)


def table_judge(runs: Sequence[Run]) -> Table | None:
    """Share of items each judge stage decided, per run, and the judge requests sent."""
    if not runs:
        return None
    stages: list[str] = []
    for run in runs:
        for stage in run.results["judge"].get("stage_share", {}):
            if stage not in stages:
                stages.append(stage)
    rows = []
    for run in runs:
        judge = run.results["judge"]
        sent = judge.get("requests_sent", judge.get("llm_calls"))
        rows.append([run.model, run.label, run.mode, run.protocol, judge.get("model") or "-"]
                    + [f"{100 * judge['stage_share'].get(s, 0.0):.2f}" for s in stages]
                    + ["-" if sent is None else str(sent)])
    return Table("judge_stages", "Judge: protocol and share of items decided by each stage (%)",
                 ["Model", "Method", "Mode", "Protocol", "Judge model"] + stages + ["Requests sent"], rows)


def table_generation(runs: Sequence[Run]) -> Table | None:
    """Post-edit and pre-edit outputs that stopped at max_new_tokens (their answer may be cut), per run."""
    rows = []
    for run in runs:
        gen = run.results.get("generation") or {}
        n_rows = int(run.results.get("n_rows") or 0)
        row = [run.model, run.label, run.mode, str(gen.get("max_new_tokens") or "-")]
        for key in ("hit_max_new_tokens", "pre_edit_hit_max_new_tokens"):
            hit = gen.get(key)
            row += ["-" if hit is None else str(hit), "-" if hit is None else fmt(100.0 * hit / max(1, n_rows))]
        rows.append(row + [str(n_rows)])
    if not rows:
        return None
    return Table("generation_limits", "Outputs that stopped at max_new_tokens (truncated answers), post- and pre-edit",
                 ["Model", "Method", "Mode", "max_new_tokens", "At the limit", "At the limit (%)",
                  "Pre-edit at the limit", "Pre-edit at the limit (%)", "Rows"], rows)


# -- plots --------------------------------------------------------------------------------------------------
#: Method colours: matplotlib's 10-colour cycle for display places 0-9, then ten more distinct ones, so the paper's
#: eight methods and the four beyond it never share a colour (a plain 10-colour cycle gave FT (LLM) and GRACE the
#: same blue).
METHOD_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#17becf", "#000000", "#800000", "#000075", "#f032e6", "#ffe119", "#46f0f0", "#aaffc3", "#fabebe",
                 "#808000", "#e6beff")


def method_color(source: Mapping[str, Any] | str | None) -> str:
    """The colour of a method in every figure, stable per method: its display place (the paper's Table 2 order,
    then the place a method beyond the paper records) picks from :data:`METHOD_COLORS`; a method without a whole
    place there gets a colour from a hash of its id (the same in every run and process)."""
    if isinstance(source, Mapping):
        method = source.get("method")
        order = method_display(method, source.get("method_display_name"), source.get("method_display_order"))[1]
    else:
        method, order = source, method_display(source)[1]
    if math.isfinite(order) and order == int(order) and 0 <= order < len(METHOD_COLORS):
        return METHOD_COLORS[int(order)]
    digest = hashlib.sha256(str(method or "").encode("utf-8")).digest()
    return METHOD_COLORS[int.from_bytes(digest[:4], "big") % len(METHOD_COLORS)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def plot_types(runs: Sequence[Run], model: str, path: Path, protocol: str = "") -> None:
    """Figure 3: grouped bars of generality / locality types, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in runs if r.mode == "single" and r.model == model]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(TYPE_BARS) + 0.4 * len(single)), 3.6))
    width = 0.8 / max(1, len(single))
    for i, run in enumerate(single):
        offset = (i - (len(single) - 1) / 2) * width
        points = [(j + offset, run.metrics().get(k)) for j, (k, _) in enumerate(TYPE_BARS)]
        points = [(x, v) for x, v in points if v is not None]  # no bar where a type has no items
        ax.bar([x for x, _ in points], [float(v) for _, v in points if v is not None], width, label=run.label,
               color=method_color(run.results))
    ax.set_xticks(range(len(TYPE_BARS)), [label for _, label in TYPE_BARS])
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(f"{model}: generality and locality by type (single editing{', ' + protocol if protocol else ''})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def random_baseline(runs: Sequence[Run], key: str) -> float | None:
    """Item-weighted random baseline (%) of a dimension over runs: from each run's `random_baseline`
    (the mean of 100 / number of options over its items), weighted by its item counts."""
    total = weight = 0.0
    for run in runs:
        value = (run.results.get("random_baseline") or {}).get(key)
        n = (run.results.get("counts") or {}).get("overall", {}).get(key) or 0
        if value is not None and n:
            total += float(value) * n
            weight += n
    return total / weight if weight else None


def plot_gaps(runs: Sequence[Run], model: str, path: Path, protocol: str = "") -> None:
    """Figure 4: one panel per metric, value vs gap, one line per method; dashed: the random baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sequential = [r for r in runs if r.mode == "sequential" and r.model == model]
    fig, axes = plt.subplots(1, len(MAIN_METRICS), figsize=(3.2 * len(MAIN_METRICS), 3.2), sharey=True)
    for ax, (key, label) in zip(axes, MAIN_METRICS):
        for run in sequential:
            per_gap = run.results["metrics"].get("per_gap") or {}
            gaps = sorted(per_gap, key=int)
            points = [(int(g), per_gap[g].get(key)) for g in gaps if per_gap[g].get(key) is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run.label,
                        color=method_color(run.results))
        baseline = random_baseline(sequential, key)
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", linewidth=1,
                       label=f"random ({baseline:.1f}%)")
            ax.text(0.02, baseline + 1.5, f"random {baseline:.1f}%", transform=ax.get_yaxis_transform(),
                    fontsize=7, color="grey")
        ax.set_title(label)
        ax.set_xlabel("gap")
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("%")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{model}: sequential editing{' (' + protocol + ' protocol)' if protocol else ''}")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def category_counts(runs: Sequence[Run]) -> dict[str, dict[str, int]]:
    """Portability items per knowledge category per attribute (from the single-editing run with most items)."""
    best: dict[str, dict[str, int]] = {}
    for run in runs:
        if run.mode != "single":
            continue
        for attr, counts in sorted(((run.results.get("counts") or {}).get("per_attribute") or {}).items()):
            by_cat = {c: int(n) for c, n in (counts.get("portability_by_category") or {}).items() if n}
            if sum(by_cat.values()) > sum(best.get(attr, {}).values()):
                best[attr] = dict(sorted(by_cat.items()))
    return best


def plot_categories(counts: dict[str, dict[str, int]], path: Path) -> None:
    """Figure 5: the knowledge categories of the portability items, one panel per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    attrs = list(counts)
    fig, axes = plt.subplots(1, len(attrs), figsize=(3.4 * len(attrs), 3.4), squeeze=False)
    for ax, attr in zip(axes[0], attrs):
        cats = counts[attr]
        total = sum(cats.values())
        ax.barh(list(cats), list(cats.values()), color="tab:blue")
        for y, n in enumerate(cats.values()):
            ax.text(n, y, f" {100 * n / total:.0f}%", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{attr} ({total} items)")
        ax.set_xlabel("portability items")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlim(0, max(cats.values()) * 1.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of items: whole numbers only
    fig.suptitle("Portability items per knowledge category")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


# -- writing ------------------------------------------------------------------------------------------------
def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    # Fixed metadata so the same results give the same bytes.
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    atomic_write(path, buffer.getvalue())


def write_report(runs: Sequence[Run], out_dir: str | os.PathLike) -> list[Path]:
    """Write every table (md + csv) and plot for `runs` into `out_dir`; return the written paths."""
    out = Path(out_dir)
    written: list[Path] = []
    tables = [t for t in [table_overall(runs), table_portability_spread(runs), table_wall_clock(runs),
                          table_attributes(runs), table_gaps(runs)] if t is not None]
    tables += tables_portability(runs)
    tables += [t for t in [table_degeneration(runs), table_judge(runs), table_generation(runs)] if t is not None]
    note = comparability_note(r.protocol for r in runs)
    for table in tables:
        table.note = note
        for suffix, text in ((".md", table.markdown()), (".csv", table.csv())):
            path = out / f"{table.name}{suffix}"
            atomic_write(path, text)
            written.append(path)
    figures = []
    groups = _groups(runs)
    for model, protocol in groups:
        in_group = [r for r in runs if r.model == model and r.protocol == protocol]
        # one protocol per model (the usual case): plain names; several: the protocol in the name
        name = _slug(model) + ("" if sum(g[0] == model for g in groups) == 1 else f"_{_slug(protocol)}")
        if any(r.mode == "single" for r in in_group):
            path = out / f"fig3_types_{name}.png"
            plot_types(in_group, model, path, protocol)
            figures.append(path)
        if any(r.mode == "sequential" for r in in_group):
            path = out / f"fig4_gaps_{name}.png"
            plot_gaps(in_group, model, path, protocol)
            figures.append(path)
    counts = category_counts(runs)
    if counts:
        path = out / "fig5_categories.png"
        plot_categories(counts, path)
        figures.append(path)
    written += figures
    index = ["# SAKE report", "",
             "Runs: " + ", ".join(f"{r.model}/{r.label}/{r.mode} ({r.protocol})" for r in runs), "",
             "Protocols: `paper` = empty -> exact -> LLM judge (the paper's App. E); `paper+choice` = the same with "
             "the multiple-choice matcher before the LLM; `offline` = empty -> exact -> choice, undecided items "
             "counted wrong (no LLM).", ""]
    index += [t.markdown() for t in tables]
    index += [f"![{p.stem}]({p.name})\n" for p in figures]
    index_path = out / "index.md"
    atomic_write(index_path, "\n".join(index))
    written.append(index_path)
    return written


@user_errors
def main(argv: list[str] | None = None) -> int:
    from eval.score import add_judge_arguments, judge_options

    p = argparse.ArgumentParser(prog=command_prog("python -m eval.report"), description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="results JSON, predictions JSONL, or run folders")
    p.add_argument("--out", required=True, help="output folder")
    add_judge_arguments(p)  # how predictions JSONL inputs are scored (as eval.score)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    score_kwargs = judge_options(args)
    from eval.sake_metric.llm_judge import JudgeError
    from eval.sake_metric.predictions_file import PredictionsError
    from eval.sake_metric.scoring import JudgeFailures

    try:
        runs = load_runs(args.inputs, score_kwargs)
    except PredictionsError as exc:  # the metric's own (self-contained) error for a bad predictions file
        print(f"{error_prefix()}error: {exc}", file=sys.stderr)
        return 2
    except (JudgeError, JudgeFailures) as exc:
        print(f"{error_prefix()}error: {exc}", file=sys.stderr)
        return 3
    written = write_report(runs, args.out)
    print(f"wrote {len(written)} files to {args.out} from {len(runs)} run(s)")
    note = comparability_note(r.protocol for r in runs)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
