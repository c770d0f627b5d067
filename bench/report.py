"""The Markdown report: tables, issue goals, identical rows, profile lines, and the DeSTA section merge of RESULTS.md."""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import platform
from pathlib import Path
from typing import Any

import torch


from bench.models import Scale
from bench.paper import MODEL_TITLES, PAPER_MODEL_NAMES, PAPER_TABLE7_DESTA_SINGLE

from sake_core.atomic import atomic_write

LOG = logging.getLogger(__name__)


def render_identical(rows: list[dict[str, Any]]) -> list[str]:
    """One line per method: shares of identical rows for each compared pair."""
    lines = []
    for r in rows:
        pairs = r.get("identical") or {}
        if pairs:
            cells = [f"{name}: {v['identical']:.0%} of {v['rows']} rows (pre-edit {_fmt(v['pre_edit'], '.0%')}, "
                     f"post-edit {v['post_edit']:.0%})" for name, v in pairs.items() if v.get("rows")]
            lines.append(f"- `{r['method']}`: " + "; ".join(cells))
        legacy = [(b["k"], b.get("s_per_edit"), b.get("legacy_s_per_edit")) for b in r.get("batched", [])
                  if b.get("legacy_s_per_edit")]
        for k, fast, old in legacy:
            lines.append(f"- `{r['method']}` K={k}: default engine {fast:.3f} s/edit, eager engine {old:.3f} "
                         f"s/edit ({old / fast:.2f}x)")
    return lines


#: Issue 18's goals on one H200 (cold pre-edit cache, default K): s/edit ceilings, or multiples of the paper's rate.
GOAL_SECONDS = {"ft_audio": 0.45, "ft_llm": 0.39, "i_ike": 0.45}


GOAL_PAPER_MULTIPLE = {"ie_ike": 10, "ke": 10, "mend": 10, "unke": 5, "wise": 5}


GOAL_NAIVE_MULTIPLE = {"ft_audio": 20, "ft_llm": 20}


def best_seconds(row: dict[str, Any]) -> tuple[float | None, str]:
    """The method's fastest cold s/edit of this run and where it comes from (``K=16`` or ``K=1``)."""
    options = [(b["s_per_edit"], f"K={b.get('k_used', b['k'])}") for b in row.get("batched", [])
               if b.get("s_per_edit")]
    if row.get("ours"):
        options.append((row["ours"], "K=1"))
    return min(options) if options else (None, "")


def render_goals(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 18's goals, met or missed, from this run's fastest cold s/edit per method."""
    lines = []
    for r in rows:
        s, where = best_seconds(r)
        if s is None:
            continue
        m, paper = r["method"], r.get("paper")
        parts = [f"{s:.3f} s/edit ({where})"]
        if m in GOAL_SECONDS:
            parts.append(f"goal <= {GOAL_SECONDS[m]} s/edit: {'met' if s <= GOAL_SECONDS[m] else 'missed'}")
        if paper:
            want = GOAL_PAPER_MULTIPLE.get(m)
            parts.append(f"{paper / s:.1f}x the paper's rate" + (f" (goal >= {want}x: "
                                                                 f"{'met' if paper / s >= want else 'missed'})"
                                                                 if want else ""))
        if m in GOAL_NAIVE_MULTIPLE:
            naive = r.get("naive")
            parts.append(f"{naive / s:.1f}x the naive loop of this run (goal >= {GOAL_NAIVE_MULTIPLE[m]}x: "
                         f"{'met' if naive / s >= GOAL_NAIVE_MULTIPLE[m] else 'missed'})" if naive
                         else "naive loop not run here")
        lines.append(f"- `{m}`: " + "; ".join(parts))
    return lines


def render_profile(rows: list[dict[str, Any]]) -> list[str]:
    """``--profile`` summary, one line per method: GPU busy share of the profiled edit's wall-clock (all phases and
    evaluation alone), kernel launches (and CUDA graph launches) per edit."""
    lines = []
    for r in rows:
        phases = (r.get("info_ours") or {}).get("profile")
        if not phases:
            continue
        wall = sum(p["wall_s"] for p in phases.values())
        busy = sum(p["gpu_busy_s"] for p in phases.values())
        ev = phases.get("evaluate", {})
        ev_share = ev["gpu_busy_s"] / ev["wall_s"] if ev.get("wall_s") else float("nan")
        launches = sum(p["kernel_launches"] for p in phases.values())
        graphs = sum(p.get("graph_launches", 0) for p in phases.values())
        lines.append(f"- `{r['method']}`: GPU busy {busy / wall:.0%} of {wall:.2f} s (evaluation {ev_share:.0%}); "
                     f"{launches:,} kernel launches and {graphs:,} CUDA graph launches per edit")
    return lines


def render_batched(rows: list[dict[str, Any]]) -> list[str]:
    """The edits-per-pass table (K = 1 and the larger K of each method)."""
    names = ["method", "edits per pass K", "s/edit", "edits/hour", "K=1 / this", "paper s/edit", "paper/ours",
             "peak GiB", "per edit: pre-edit / apply / evaluate s"]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(["---"] * len(names)) + "|"]
    for r in rows:
        base = next((b.get("s_per_edit") for b in r.get("batched", []) if b["k"] == 1), None)
        for b in r.get("batched", []):
            s = b.get("s_per_edit")
            if s is None:
                lines.append(f"| {r['method']} | {b['k']} | {b.get('error', 'n/a')} |" + " |" * (len(names) - 3))
                continue
            split = b["info"].get("per_edit_split_s_incl_warmup", {})
            cells = [r["method"], f"{b['k']}" + (f" (ran {b['k_used']})" if b.get("k_used") != b["k"] else ""),
                     _fmt(s, ".3f"), _fmt(3600 / s, ".0f"), _fmt(base / s if base else None, ".1f", "x"),
                     _fmt(r["paper"], ".2f"), _fmt(r["paper"] / s if r["paper"] else None, ".1f", "x"),
                     _fmt(b.get("peak_gib"), ".1f"),
                     " / ".join(_fmt(split.get(x), ".3f") for x in ("pre_edit", "apply", "evaluate"))]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec) + suffix


def render_table(rows: list[dict[str, Any]]) -> str:
    """The results table (Markdown)."""
    names = ["method", "s/edit ours", "s/edit naive", "naive/ours", "edits/hour ours", "paper s/edit",
             "paper/ours", "peak GiB ours", "peak GiB naive", "floor s/edit", "ours/floor",
             "s/edit ours, warm pre-edit cache", "paper/ours warm"]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(["---"] * len(names)) + "|"]
    for r in rows:
        ours, naive, paper, floor = r["ours"], r["naive"], r["paper"], r["floor"]
        ratio = lambda a, b: a / b if a and b else None  # noqa: E731
        cells = [r["method"], _fmt(ours, ".3f"), _fmt(naive, ".3f"), _fmt(ratio(naive, ours), ".1f", "x"),
                 _fmt(3600 / ours if ours else None, ".0f"), _fmt(paper, ".2f"), _fmt(ratio(paper, ours), ".1f", "x"),
                 _fmt(r["peak_ours"], ".1f"), _fmt(r["peak_naive"], ".1f"), _fmt(floor, ".3f"),
                 _fmt(ratio(ours, floor), ".1f", "x"), _fmt(r.get("warm"), ".3f"),
                 _fmt(ratio(paper, r.get("warm")), ".1f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(scale: Scale) -> str:
    if scale.device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _arm_text(info: dict[str, Any]) -> str:
    """One arm's counters in words."""
    parts = [f"{info.get('timed_edits', 0)} timed edits"]
    if info.get("steps") is not None:
        parts.append(f"steps {info['steps']}")
    for key, label in (("per_edit_split_s", "per timed edit"), ("per_edit_split_s_incl_warmup",
                                                                  "per edit (runner totals, warm-up included)")):
        if info.get(key):
            parts.append(f"{label}: " + ", ".join(f"{k} {v:.3f} s" for k, v in info[key].items()))
    if "generate_calls_per_edit" in info:
        parts.append(f"{info['generate_calls_per_edit']:g} generate calls / {info['sequences_per_edit']:g} sequences "
                     f"per edit, new tokens {info['new_tokens']}")
    if "audio_encoder_calls_per_edit" in info:
        parts.append(f"audio encoder {info['audio_encoder_calls_per_edit']:g} clips per edit")
    if "prediction_rows" in info:
        parts.append(f"{info['prediction_rows']} prediction rows, pre-edit cache hits {info.get('preedit_cache_hits')}")
    return "; ".join(parts)


def render_details(row: dict[str, Any]) -> list[str]:
    """Markdown lines under the table for one method: counters of each arm, floor terms, profile."""
    lines = [f"### `{row['method']}`", ""]
    for label, key, info in (("ours (cold pre-edit cache)", "ours", row.get("info_ours")),
                             ("ours (warm pre-edit cache)", "warm", row["raw"].get("info_ours_warm")),
                             ("naive", "naive", row.get("info_naive"))):
        error = row.get(f"error_{key}") if key != "warm" else None
        if error:
            lines.append(f"- {label}: not run ({error})")
        elif info:
            lines.append(f"- {label}: {_arm_text(info)}")
    fl = row["floor_parts"]
    if row["floor"] is not None:
        perception = fl.get("perception_flops", 0.0)
        lines.append(f"- floor: training {fl['train_flops'] / 1e12:.1f} TFLOP + prefill "
                     f"{fl['prefill_flops'] / 1e12:.1f} TFLOP + audio encoder/connector"
                     f"{'/transcripts (fp32)' if row.get('perception_fp32') else ''} {perception / 1e12:.1f} TFLOP "
                     f"= {fl['compute_s']:.3f} s; generation "
                     f"{fl['generate_bytes'] / 1e9:.0f} GB = "
                     f"{fl['memory_s']:.3f} s"
                     + (f"; optimizer state {fl['optimizer_bytes'] / 1e9:.0f} GB = {fl['optimizer_s']:.3f} s"
                        if fl.get("optimizer_bytes") else "")
                     + ("" if fl["train_modelled"] else " (training not modelled)"))
    profile = (row.get("info_ours") or {}).get("profile")
    if profile:
        lines += ["", "| runner phase (1 edit, profiled) | wall s | GPU busy s | busy | kernel launches | host syncs "
                  "| D2H copies | top kernels (ms) |", "|---|---|---|---|---|---|---|---|"]
        for phase, p in profile.items():
            busy = p["gpu_busy_s"] / p["wall_s"] if p["wall_s"] else 0.0
            top = "; ".join(f"{name} {ms}" for name, ms in p["top_kernels"])
            lines.append(f"| {phase} | {p['wall_s']:.3f} | {p['gpu_busy_s']:.3f} | {busy:.0%} | {p['kernel_launches']} "
                         f"| {p['host_syncs']} | {p['d2h_copies']} | {top} |")
    lines.append("")
    return lines


#: Markers around the DeSTA2.5 section of RESULTS.md (the Qwen2-Audio run rewrites the rest of the file).
DESTA_BEGIN = "<!-- bench: desta25 section begin (written by bench/edit_throughput.py --model desta25) -->"


DESTA_END = "<!-- bench: desta25 section end -->"


def merge_results(existing: str, text: str, model: str) -> str:
    """The new RESULTS.md: a DeSTA2.5 run replaces the marked DeSTA section of ``existing`` (or appends it) and
    keeps everything else; a Qwen2-Audio run replaces everything but keeps an existing DeSTA section."""
    begin, end = existing.find(DESTA_BEGIN), existing.find(DESTA_END)
    has_section = begin >= 0 and end > begin
    if model == "desta25":
        section = f"{DESTA_BEGIN}\n{text.rstrip()}\n{DESTA_END}\n"
        if has_section:
            return existing[:begin] + section + existing[end + len(DESTA_END):].lstrip("\n")
        return (existing.rstrip("\n") + "\n\n" if existing.strip() else "") + section
    if has_section:
        return text.rstrip("\n") + "\n\n" + existing[begin:end + len(DESTA_END)] + "\n"
    return text


def write_results(path: Path, text: str, model: str) -> None:
    """Write ``text`` into ``path`` as :func:`merge_results` says (atomically)."""
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write(path, merge_results(existing, text, model))


def render_results(args: argparse.Namespace, scale: Scale, rows: list[dict[str, Any]], ceilings: dict[str, float],
                   params_b: float) -> str:
    """RESULTS.md (or its DeSTA2.5 section): setup, table, ceilings, per-method counters."""
    import transformers

    model = getattr(args, "model", "qwen2_audio")
    desta = model == "desta25"
    dtype = str(scale.dtype).replace("torch.", "")
    lines = [
        "## DeSTA2.5-Audio: editing throughput (written by `bench/edit_throughput.py --model desta25`)" if desta
        else "# Editing throughput (written by `bench/edit_throughput.py`)",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device_name(scale)}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- model: {MODEL_TITLES[model][scale.name]} ({params_b:.2f} B parameters, random weights, "
        + (f"LLM {dtype}, Whisper + connector float32)" if desta else f"{dtype})"),
        f"- command: `python -m bench.edit_throughput {' '.join(args.argv)}`",
        f"- protocol: single editing, {args.edits} timed edits (ours, each pass) and "
        f"{args.naive_edits or args.edits} (naive) after {args.warmup} / {args.naive_warmup} warm-up, the naive arm "
        f"timing the first of the same instances; an edit = apply + its 10 items (reliability, 3 generality, 4 audio "
        "locality, 1 "
        f"text locality, 1 portability) generated before and after the edit; audio "
        f"{scale.audio_seconds[0]:g}-{scale.audio_seconds[1]:g} s; max_new_tokens {args.max_new_tokens}, EOS "
        "disabled in both arms; hparams from `editors/hparams/<method>.yaml`"
        + (f" with {', '.join(scale.hparam_overrides)}" if scale.hparam_overrides else ""),
        "- ours: `editors.run.Runner(config, adapter, rows_loader).run()` in single mode with a fresh pre-edit cache per method "
        "(s/edit = the runner's per-unit wall-clock, rows held in memory instead of Parquet); naive: one "
        "`generate` per question from processor inputs, every FT step through the whole model (audio encoder "
        "recomputed), restore by `load_state_dict` of a deep copy of the touched tensors",
    ]
    if desta:
        lines += [
            "- DeSTA2.5 specifics: every arm starts without encoder states or transcripts (except the warm pass: it "
            "keeps the cold pass's transcripts, as the adapter's on-disk transcript cache would); ours transcribes "
            "each distinct clip once (Whisper's decoder, up to 128 tokens: random weights rarely stop early) and keeps "
            "transcript + tapped encoder states for the rest of the pass; naive drops both before every question "
            "(as the release's `generate` transcribes per call) and drops the encoder states before every FT step "
            "(transcript kept; loss = the Llama's full-sequence HF loss); audio tokens in the LLM = 64 connector "
            "outputs + the transcript's tokens",
        ]
    lines += [
        f"- ceilings measured here: matmul {ceilings['matmul_n']}^3 "
        f"{ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({dtype}), "
        + (f"{ceilings['matmul_fp32_flops_per_s'] / 1e12:.3g} TFLOP/s (float32), "
           if desta and scale.dtype != torch.float32 else "")
        + f"device copy {ceilings['copy_bytes_per_s'] / 1e12:.3g} TB/s (read + write)",
        f"- paper: Table 7, {PAPER_MODEL_NAMES[model]}, single editing wall-clock / 1,200 edits",
        "",
        render_table(rows),
        "",
        "Goals of issue 7 (>= 10x the paper's per-edit rate, >= 5x the naive loop of this run), cold pre-edit cache:",
        "",
    ]
    for r in rows:
        if r["ours"]:
            paper_x = r["paper"] / r["ours"] if r["paper"] else None
            naive_x = r["naive"] / r["ours"] if r["naive"] else None
            lines.append(f"- `{r['method']}`: paper/ours {_fmt(paper_x, '.1f', 'x')} "
                         f"({'met' if paper_x and paper_x >= 10 else 'missed'}), "
                         f"naive/ours {_fmt(naive_x, '.1f', 'x')} "
                         f"({'met' if naive_x and naive_x >= 5 else 'missed'})")
    lines += [
        "",
        "Floor = (training FLOPs with frozen upstream parts computed once + prefill FLOPs) / matmul rate + (one "
        "batched pre-edit and one batched post-edit generation: all LLM weights and the KV cache read per decode "
        "step) / copy bandwidth; see `bench/NOTES.md`.",
        "",
    ]
    if desta:
        lines += ["DeSTA2.5 floor: perception (Whisper encoder up to the last tapped layer once per distinct clip, "
                  "one Whisper transcript per distinct clip, the Q-Former per FT-Audio update) at the float32 rate; "
                  "the transcription's decode steps read Whisper's decoder weights (float32) once per step of one "
                  "batched call.", ""]
        paper_rows = ", ".join(f"{m} {t}" for m, t in PAPER_TABLE7_DESTA_SINGLE.items())
        lines += [f"Paper Table 7 DeSTA single editing (1,200 edits): {paper_rows}.", ""]
    if any(r.get("batched") for r in rows):
        lines += ["## Several edits per pass (`--edits-per-pass K`, issue 12)", "",
                  "The runner with K independent single edits per pass (per-edit parameter copies or prompts, one "
                  "batched generation of all K edits' items), fresh pre-edit cache, one untimed pass first; s/edit "
                  "= pass wall-clock / K (pre-edit outputs, apply, evaluation, rows).", ""]
        lines += render_batched(rows) + [""]
    goals = render_goals(rows)
    if goals:
        lines += ["## Goals of issue 18 (one H200, cold pre-edit cache, default K)", ""] + goals + [
            "- several GPUs: `torchrun --nproc-per-node 2` against one GPU is timed only where a 2-GPU machine is "
            "lent (see `bench/NOTES.md`)", ""]
    profiled = render_profile(rows)
    if profiled:
        lines += ["## Profile (`--profile`: one more edit per method, K=1, its four phases under torch.profiler)", ""]
        lines += profiled + [""]
    same = render_identical(rows)
    if same:
        lines += ["## Identical rows (issue 18: batch invariance; issue 24: default vs eager engine)", "",
                  "Share of items whose pre-edit and post-edit outputs are both identical between two runs of the "
                  "same instances (cold vs warm pre-edit cache: K=1; K=1 vs K: the items both ran; new vs legacy: "
                  "`--engine eager`, same K).", ""] + same + [""]
    for row in rows:
        lines.extend(render_details(row))
    return "\n".join(lines) + "\n"
