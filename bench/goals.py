"""The goal run of issues 24 and 29: every method at the runner's default edits per pass with both decode engines
side by side, the naive loop, GPU busy share, sequential editing, hypernetwork training steps, a memory sweep and a
projection of the paper's whole compute. Writes ``bench/RESULTS.md`` (``--out``) and the raw numbers (``--json``).

    python -m bench.goals --tiny --methods i_ike --edits 2 --out /tmp/R.md          # CPU smoke
    bash bench/gpu_run.sh ... (BENCH_MODULE=bench.goals)                           # on the H200

Per method (``--methods``) and engine (``--engines``; a method that allows only eager runs eager once):

* default K: ``editors.run.Runner`` with ``--edits-per-pass`` unset, a fresh pre-edit cache (cold) and the whole
  run timed (the first, measuring passes and every capture counted in): s/edit over ``--edits`` edits (the eager
  engine over ``--eager-edits``), the passes the runner chose (edits, peak memory of each), the graph engine's
  counters, and the share of rows both engines wrote identically;
* ``--naive-methods``: the naive loop of the same run (``bench.arms.run_naive``: one ``generate`` per question,
  the whole model per training step, deep-copy restore) over ``--naive-edits`` edits after ``--naive-warmup``
  untimed ones (a process's first naive edit took 2.5x a warm one of the same instance on an H100);
* ``--profile-methods``: the runner's phases of one more edit alone (K=1) under the profiler; the goal's busy
  share (evaluation at the runner's default K) comes from ``bench/pass_profile.py``, whose ``--json`` joins a card's
  table through ``--combine ... --pass-profiles P.json``;
* ``--sequential-methods``: one 10-edit sequence in sequential mode (the paper evaluates edits 1-5 at gaps 0-5);
* KE / MEND: ``--hypernet-steps`` optimizer steps of the untrained hypernetwork (timed: s per train instance), whose
  network then makes the edits (an untrained network times an edit like a trained one);
* ``--sweep K,...`` (``--sweep-methods``): one pass at each forced K: peak memory per edit; with the runner's
  fitted cost, the K it picks on an 80 GB and a 139 GB card and the peak that gives;
* ``--emulate-gib G`` (``--emulate-methods``): a default-K run under a memory cap of G GiB
  (``torch.cuda.set_per_process_memory_fraction``): it must complete (back-off counted).

The parts run inside the loop over ``--methods``, so each part's methods must be among them (an error otherwise).

``--time-limit`` seconds: parts that would start after it are skipped and say so (the device lease is short).
The raw numbers of the table in ``bench/RESULTS.md`` are kept beside it (``bench/RESULTS.json``; DeSTA2.5:
``bench/RESULTS-desta25.json``): carry one to the device and pass it as ``--merge-json`` so that a call re-measuring
some methods keeps the others' rows (a method's runs are replaced engine by engine). The file records the card its
rows were timed on, and a run on another card refuses to merge it: an H100's rows go to ``bench/RESULTS-h100.json``
and ``bench/RESULTS-h100.md``. Raw files of several calls on one card become one table off the device with
``python -m bench.goals --combine A.json B.json:ie_ike,i_ike --out bench/RESULTS-h100.md --json
bench/RESULTS-h100.json`` (in order: a later file's parts replace an earlier one's; ``:methods`` takes only those);
``--refloor`` computes the runs' recorded floors again with today's ``bench/roofline.py`` (Qwen2-Audio rows).

Each run records the floor of its edits on its card (``bench.roofline.mean_floor``), and the table says, for every
missed goal, where the run's seconds went beside that floor.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.arms import (Bench, GenerateCounter, add_pre_edit_items, plan_units, profile_unit, run_naive,
                        runner_pass)
from bench.identity import identical_share
from bench.models import build_adapter, full_scale, tiny_scale
from bench.paper import PAPER_TABLE7_SINGLE, paper_seconds_per_edit
from bench.report import device_name, write_results
from bench.roofline import mean_floor, measure_ceilings, run_shapes
from bench.synthetic import SyntheticDataset
from sake_core.atomic import atomic_write
from sake_core.protocol import ATTRIBUTES

LOG = logging.getLogger(__name__)

#: Issue 24's goals (one H200, default K, cold): s/edit ceilings, or multiples of the paper's rate.
GOAL_SECONDS = {"ft_audio": 0.45, "ft_llm": 0.39, "i_ike": 0.45, "ie_ike": 0.60, "unke": 0.95, "wise": 1.80}
GOAL_PAPER_MULTIPLE = {"ke": 10, "mend": 10}
GOAL_NAIVE_MULTIPLE = {"ft_audio": 20, "ft_llm": 20, "i_ike": 20}
#: Issue 29's IE-IKE goals: s/edit at its default K, GiB per batched edit.
IE_IKE_SECONDS, IE_IKE_GIB = 1.0, 4.0
#: Paper Table 7 (H100): sequential editing and hypernetwork training, per model (single editing: bench.paper).
PAPER_SEQUENTIAL = {
    "qwen2_audio": {"ft_llm": "1h15m", "ft_audio": "1h30m", "ke": "3h20m", "mend": "1h50m", "unke": "0h30m",
                    "i_ike": "2h00m", "ie_ike": "3h50m", "wise": "1h10m"},
    "desta25": {"ft_llm": "2h00m", "ft_audio": "2h00m", "ke": "9h45m", "mend": "4h10m", "unke": "1h05m",
                "i_ike": "3h45m", "ie_ike": "8h00m", "wise": "2h00m"},
    "audio_flamingo3": {"ft_llm": "0h40m", "ft_audio": "0h40m", "ke": "2h15m", "mend": "0h25m", "unke": "0h25m",
                        "i_ike": "0h45m", "ie_ike": "4h00m", "wise": "1h45m"}}
PAPER_TRAINING = {"qwen2_audio": {"ke": "2h10m", "mend": "2h20m"}, "desta25": {"ke": "4h10m", "mend": "4h10m"},
                  "audio_flamingo3": {"ke": "2h10m", "mend": "2h20m"}}
PAPER_SINGLE_AF3 = {"ft_llm": "2h00m", "ft_audio": "1h30m", "ke": "3h00m", "mend": "2h00m", "unke": "1h45m",
                    "i_ike": "1h20m", "ie_ike": "2h10m", "wise": "7h00m"}
#: Paper Table 7, single editing, per model (the hours of 1,200 edits).
PAPER_SINGLE = {**PAPER_TABLE7_SINGLE, "audio_flamingo3": PAPER_SINGLE_AF3}
#: The paper's scale: 1,200 single edits per method and model, 10 sequences of 10 edits, one epoch over the 4,000
#: train instances for a hypernetwork (Table 1, §4.2, App. D.2).
PAPER_EDITS, PAPER_SEQUENCES, PAPER_TRAIN_STEPS = 1200, 10, 4000
#: Train rows the hypernetwork timing holds out for validation, and the largest ``accumulate_bs`` of KE / MEND's
#: hparams (KE: 10): the synthetic train split gets enough rows for one warm-up step + the timed steps.
HYPERNET_VAL_ROWS, HYPERNET_MAX_GROUP = 2, 10


def hours(text: str) -> float:
    h, m = text.rstrip("m").split("h")
    return int(h) + int(m) / 60


class Clock:
    """``--time-limit``: whether a part may still start."""

    def __init__(self, limit: float | None) -> None:
        self.start, self.limit = time.perf_counter(), limit

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - (time.perf_counter() - self.start)

    def allows(self, what: str, needs: float = 0.0) -> bool:
        if self.left() > needs:
            return True
        LOG.warning("skipped (time limit): %s", what)
        return False


def _pass_cell(p: dict[str, Any]) -> str:
    """A pass in the table: its edits, and its seconds where the row recorded them (rows timed since 2026-12-05)."""
    return f"{p['edits']} ({p['seconds']:.1f} s)" if p.get("seconds") is not None else str(p["edits"])


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def default_k(bench: Bench, method: str, edits: int, engine: str, ceilings: dict[str, float] | None = None,
              tag: str = "") -> dict[str, Any]:
    """The runner at its default K with ``engine``, cold pre-edit cache, the whole run timed; with ``ceilings``, the
    floor of its edits on this card (:func:`bench.roofline.mean_floor`)."""
    from editors.models.generation import graph, release

    cache = bench.workdir / f"cache-{method}-{engine}{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    release(bench.adapter)
    graph.reset_stats()
    out = bench.workdir / f"default-{method}-{engine}{tag}.jsonl"
    started = time.perf_counter()
    try:
        result, runner = runner_pass(bench, method, edits, 0, cache, out, None, engine=engine)
    except Exception as error:  # noqa: BLE001 - recorded (e.g. out of memory), the bench goes on
        LOG.warning("%s/%s: %s", method, engine, error)
        release(bench.adapter)
        if bench.scale.device == "cuda":
            torch.cuda.empty_cache()
        return {"engine": engine, "error": f"{type(error).__name__}: {str(error)[:200]}"}
    wall = time.perf_counter() - started
    units = len(runner.stats.per_unit)
    seconds = [u["seconds"] for u in runner.stats.per_unit]  # a pass's wall-clock shared evenly by its units
    passes, first = [], 0
    for p in runner.sizer.history:
        passes.append({"edits": p["edits"], "peak_gib": _gib(p["peak_bytes"]), "seconds": round(sum(
            seconds[first:first + p["edits"]]), 2), "gib_per_edit": _gib(p["peak_bytes"] / p["edits"])
            if p["peak_bytes"] else None})
        first += p["edits"]
    row = {"engine": runner.generation.engine, "edits": units, "s_per_edit": runner.stats.total_s / max(units, 1),
           "pre_edit_items": runner.config.pre_edit_items, "wall_s": round(wall, 2), "passes": passes,
           "k_final": runner.sizer.k, "backoffs": runner.sizer.backoffs,
           "per_edit_fit_gib": _gib(runner.sizer.per_edit), "per_pass_fit_gib": _gib(runner.sizer.fixed),
           "peak_gib": _gib(result.peak_bytes), "out": str(out), "info": result.info,
           "graph": {k: round(v, 3) if isinstance(v, float) else v for k, v in graph.STATS.items()}}
    if ceilings is not None:  # after the timed run: the shapes re-render its prompts (DeSTA2.5: cached transcripts)
        try:
            row["floor"] = run_floor(bench, method, row, ceilings)
        except Exception as error:  # noqa: BLE001 - the floor is a model: its failure must not cost the timed run
            LOG.warning("%s: no floor (%s: %s)", method, type(error).__name__, error)
    LOG.info("%s default K, %s engine: %.3f s/edit over %d edits; passes %s; allocator %s; floor %s", method,
             row["engine"], row["s_per_edit"], units, [p["edits"] for p in passes],
             result.info.get("allocator") or "-", _f((row.get("floor") or {}).get("floor_s"), ".3f"))
    return row


def sequential(bench: Bench, method: str) -> dict[str, Any]:
    """One 10-edit sequence in sequential mode (cold pre-edit cache): seconds for the sequence."""
    from editors.models.generation import release

    cache = bench.workdir / f"cache-seq-{method}"
    shutil.rmtree(cache, ignore_errors=True)
    release(bench.adapter)
    started = time.perf_counter()
    try:
        _, runner = runner_pass(bench, method, 1, 0, cache, bench.workdir / f"seq-{method}.jsonl", mode="sequential")
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return {"seconds": round(time.perf_counter() - started, 2), "steps": len(runner.stats.per_unit)}


def hypernetwork(bench: Bench, method: str, steps: int) -> dict[str, Any]:
    """``steps`` optimizer steps of ``method``'s hypernetwork on the synthetic train rows, timed after one warm-up
    step (a step = ``accumulate_bs`` train instances, as the trainer groups them): seconds per train instance,
    which the paper's one epoch over 4,000 instances (less the trainer's held-out rows) multiplies. The trainer's checkpoint writes and validations
    that fall in the timed steps are timed apart and left out of that rate (the train split here is a few rows, so
    they would weigh on a few instances what they weigh on thousands in a real epoch); one more validation over the
    held-out rows, timed alone, gives seconds per validated instance, which the projection multiplies by the
    validations of the method's own hyperparameters (``val_size`` every ``val_interval`` instances). The network
    then makes the edits (``bench.extra``). Training that diverges (the trainer's :class:`TrainingDiverged`, raised
    before an optimizer step takes a non-finite gradient) ends the timing there: the rate covers the instances done
    before it, the row carries the message, and the network as it stood (finite) makes the edits."""
    from editors.hypernetwork import CHECKPOINT_DIR
    from editors.train import Trainer
    from sake_core.errors import TrainingDiverged

    full = bench.hparams(method)  # before the held-out override below: the validations of a real training run
    data = {c: bench.dataset.load(str(bench.dataset.root), c, "train") for c in ATTRIBUTES}
    out = bench.workdir / f"hypernet-{method}"
    shutil.rmtree(out, ignore_errors=True)
    held_out = [f"val_size={HYPERNET_VAL_ROWS}"]  # the synthetic train split is a few rows, not the paper's thousands
    bench.extra[method] = held_out
    trainer = Trainer(bench.adapter, method, bench.hparams(method), data, out, seed=bench.seed,
                      model_name=bench.model_name, progress=False, checkpoint_every=10**9)
    aside = {"save_checkpoint": 0.0, "validate": 0.0}  # seconds the trainer spent in each, timed apart

    def timed_apart(name: str) -> Any:
        inner = getattr(trainer, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            _sync(bench)
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                _sync(bench)
                aside[name] += time.perf_counter() - began
        return call

    for name in aside:
        setattr(trainer, name, timed_apart(name))
    group = trainer.hp.accumulate_bs
    diverged: str | None = None
    first, started = 0, None  # started: when the timed steps began (None: the warm-up step did not finish)
    try:
        trainer.train(max_steps=group)  # warm-up: one optimizer step
        _sync(bench)
        aside.update(save_checkpoint=0.0, validate=0.0)
        first, started = trainer.step, time.perf_counter()
        trainer.train(max_steps=group * (1 + steps))
    except TrainingDiverged as error:
        diverged = str(error)
        LOG.warning("%s hypernetwork training: %s", method, diverged)
        trainer.save_checkpoint()  # the network as it stood before the non-finite step makes the edits
    _sync(bench)
    ended = time.perf_counter()
    bench.extra[method] = held_out + [f"hypernetwork_path={out / CHECKPOINT_DIR}"]
    timing = {"accumulate_bs": group, "diverged": diverged, "val_size": full.val_size,
              "val_interval": full.val_interval}
    if started is None:
        return {"s_per_instance": None, "instances": 0, **timing}
    seconds, instances = ended - started - sum(aside.values()), trainer.step - first
    if diverged is None and instances < group * steps:
        raise RuntimeError(f"{method}: the synthetic train split allowed {instances} timed instances, not "
                           f"{group * steps} ({steps} steps of {group}); raise train rows per attribute")
    set_aside = {k: round(v, 3) for k, v in aside.items()}
    if trainer.validation and diverged is None:  # one validation alone, timed by the same wrapper
        before = aside["validate"]
        trainer.validate()
        timing["s_per_validated_instance"] = round((aside["validate"] - before) / len(trainer.validation), 4)
    rate = round(seconds / instances, 4) if instances else None
    return {"s_per_instance": rate, "instances": instances, "set_aside_s": set_aside, **timing}


def hypernet_hours(h: dict[str, Any]) -> float | None:
    """One epoch of the paper's train instances at the measured rate, with the validations the method's own
    hyperparameters run in it (``val_size`` instances every ``val_interval``, the last at the epoch's end) where a
    validation was timed."""
    if not h.get("s_per_instance"):
        return None
    trained = epoch_instances(h)
    seconds = h["s_per_instance"] * trained
    if h.get("s_per_validated_instance") and h.get("val_interval"):
        seconds += h["s_per_validated_instance"] * h["val_size"] * -(-trained // h["val_interval"])
    return seconds / 3600


def epoch_instances(h: dict[str, Any]) -> int:
    """Train instances of one epoch: the paper's train split less the ``val_size`` rows the trainer holds out for
    its validations."""
    return PAPER_TRAIN_STEPS - int(h.get("val_size") or 0)


def _sync(bench: Bench) -> None:
    if bench.scale.device == "cuda":
        torch.cuda.synchronize()


def run_floor(bench: Bench, method: str, run: dict[str, Any], ceilings: dict[str, float]) -> dict[str, float]:
    """The floor of a default-K run's edits on the card of ``ceilings`` (:func:`bench.roofline.mean_floor`): the
    run's first ``run["edits"]`` edits in the runner's order, its passes and its mean training steps."""
    edits = run["edits"]
    timed = bench.dataset.ordered(*plan_units(edits, 0))[:edits]
    steps = run["info"].get("steps") and run["info"]["mean_steps"]
    floor = mean_floor(bench, method, run_shapes(bench, method, timed), ceilings, steps,
                       [p["edits"] for p in run["passes"]])
    return {k: round(v, 4) for k, v in floor.items()}


def sweep(bench: Bench, method: str, ks: Sequence[int]) -> dict[str, Any]:
    """One pass at each forced K: peak bytes (per phase too); the runner's fit (each phase's bytes per edit and per
    pass, ``editors.memory.fit_phase``) and the K it picks on an 80 GB and a 139 GB card."""
    from editors.memory import fit_phase
    from editors.models.generation import release

    out: dict[str, Any] = {"k": {}}
    phases: dict[str, dict[int, int]] = {}
    for k in ks:
        release(bench.adapter)
        cache = bench.workdir / f"cache-sweep-{method}-{k}"
        shutil.rmtree(cache, ignore_errors=True)
        try:
            _, runner = runner_pass(bench, method, k, 0, cache, bench.workdir / f"sweep-{method}-{k}.jsonl", k)
            first = runner.sizer.history[0]
            peak = first["peak_bytes"]
            out["k"][k] = {"peak_gib": _gib(peak), "gib_per_edit": _gib(peak / k) if peak else None,
                           "phase_peak_gib": {name: _gib(b) for name, b in first["phase_peak_bytes"].items()}}
            for name, b in first["phase_peak_bytes"].items():
                phases.setdefault(name, {})[k] = b
        except Exception as error:  # noqa: BLE001
            out["k"][k] = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
            release(bench.adapter)
    lines = {name: fit_phase(runs) for name, runs in phases.items() if len(runs) >= 2}
    if lines and bench.scale.device == "cuda":
        out.update(picked_on_cards(lines, torch.cuda.memory_allocated()))  # resident: model + kept captures
    return out


def picked_on_cards(lines: dict[str, tuple[int, int]], resident: int) -> dict[str, Any]:
    """The K the runner's fit (``lines``: phase -> bytes per edit, per pass) picks on an 80 GB and a 139 GB card with
    ``resident`` bytes already held, the phase that bounds it and the peak it predicts; the fit in GiB."""
    from editors.memory import MAX_EDITS_PER_PASS, edits_that_fit

    out: dict[str, Any] = {}
    for card in (80, 139):
        k, bound_by = edits_that_fit(lines, card * 2**30 - resident, MAX_EDITS_PER_PASS)
        per_edit, fixed = lines[bound_by]
        out[f"k_on_{card}gb"] = {"k": k, "bound_by": bound_by,
                                 "predicted_peak_gib": round((resident + fixed + k * per_edit) / 2**30, 1)}
    out["fit_gib"] = {name: {"per_edit": _gib(pe), "per_pass": _gib(fx)} for name, (pe, fx) in lines.items()}
    out["resident_gib"] = round(resident / 2**30, 1)
    return out


def emulate(bench: Bench, method: str, edits: int, gib: float) -> dict[str, Any]:
    """A default-K run while the process may use at most ``gib`` GiB (an 80 GB card on the H200)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
    try:
        return {**default_k(bench, method, edits, "auto", tag=f"-cap{int(gib)}"), "cap_gib": gib}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


def _f(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def best(row: dict[str, Any]) -> dict[str, Any] | None:
    """The method's default-engine run (graph where allowed), else its eager one."""
    runs = [r for r in row["runs"] if r.get("s_per_edit")]
    return (next((r for r in runs if r["engine"] == "graph"), None) or (runs[0] if runs else None))


def projection(rows: list[dict[str, Any]], model: str) -> list[str]:
    """The paper's compute for ``model`` from the measured rates beside Table 7 (hours)."""
    lines = ["| method | single: ours h (paper h) | sequential: ours h (paper h) | hypernetwork training: ours h "
             "(paper h) |", "|---|---|---|---|"]
    ours_total = paper_total = 0.0
    single_paper = PAPER_SINGLE[model]
    pre_edit: list[float] = []  # each projected method's pre-edit seconds per edit (the runner's split)
    for row in rows:
        m = row["method"]
        run = best(row)
        cells = [m]
        split = ((run or {}).get("info") or {}).get("per_edit_split_s_incl_warmup") or {}
        if run and single_paper.get(m) and split.get("pre_edit") is not None:
            pre_edit.append(split["pre_edit"])
        for ours_h, paper in ((run["s_per_edit"] * PAPER_EDITS / 3600 if run else None, single_paper.get(m)),
                              (row.get("sequential", {}).get("seconds", 0) * PAPER_SEQUENCES / 3600
                               if row.get("sequential", {}).get("seconds") else None, PAPER_SEQUENTIAL[model].get(m)),
                              (hypernet_hours(row.get("hypernet", {})), PAPER_TRAINING[model].get(m))):
            paper_h = hours(paper) if paper else None
            if ours_h is not None and paper_h is not None:
                ours_total += ours_h
                paper_total += paper_h
            cells.append(f"{_f(ours_h, '.2f')} ({_f(paper_h, '.2f')})")
        lines.append("| " + " | ".join(cells) + " |")
    whole = {m: paper_table7_hours(m) for m in PAPER_SEQUENTIAL}
    lines += ["", (f"Measured parts: ours {ours_total:.2f} h against the paper's {paper_total:.2f} h for the same parts "
                   f"({paper_total / ours_total:.1f}x). " if ours_total else "No part measured yet. ")
              + f"The paper's Table 7 adds up to {sum(whole.values()):.1f} H100-hours over its three models (single "
              f"editing, sequential editing and hypernetwork training), {whole[model]:.1f} h of them for this model; "
              f"the measured parts are {paper_total / sum(whole.values()):.0%} of the whole and "
              f"{paper_total / whole[model]:.0%} of this model's. The parts not measured here are not projected."]
    if len(pre_edit) > 1:
        shared = (sum(pre_edit) - max(pre_edit)) * PAPER_EDITS / 3600
        lines += ["", f"The rates are cold: each method generates its own pre-edit outputs ({min(pre_edit):.2f}-"
                  f"{max(pre_edit):.2f} s/edit of them). One model's methods share them through the pre-edit cache "
                  f"(`--cache-dir`; keyed by model and generation settings), so a run of all {len(pre_edit)} methods "
                  f"here computes them once: {shared:.2f} h less single editing ({ours_total - shared:.2f} h for the "
                  "measured parts)."]
    return lines


def paper_table7_hours(model: str) -> float:
    """Hours of the paper's Table 7 for ``model``: single and sequential editing of every method, hypernetwork
    training."""
    parts = (PAPER_SINGLE[model], PAPER_SEQUENTIAL[model], PAPER_TRAINING[model])
    return sum(hours(t) for part in parts for t in part.values())


#: The parts of a method's row besides its timed runs, each measured by a call of its own (``row["stamps"]``).
PARTS = ("identical", "naive", "profile", "pass_busy", "sequential", "sweep", "emulated", "hypernet")


def part_stamp(row: dict[str, Any], part: str, unstamped: str = " (measured by an earlier call, not stamped)"
               ) -> str:
    """`` (measured <stamp>)`` for a part of ``row``: its call's time and matmul ceiling; ``unstamped`` for a part
    merged from a call before 2026-12-06, which recorded none."""
    stamp = row.get("stamps", {}).get(part)
    return f" (measured {stamp})" if stamp else unstamped


def measured_stamp(ceilings: dict[str, float]) -> str:
    """When a run was timed and the matmul ceiling of its call: rows merged from several calls can come from
    machines of different pace (the same code moved 18-27 % between calls of one day)."""
    return f"{time.strftime('%m-%d %H:%M', time.gmtime())}, {ceilings['matmul_flops_per_s'] / 1e12:.0f}"


def run_header(scale: Any) -> dict[str, Any]:
    """What a call ran on, kept in its raw JSON so that :func:`combine` can render the table off the device."""
    import transformers

    return {"device": device_name(scale), "audio_seconds": list(scale.audio_seconds),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}


def goal_of(model: str, method: str, s_per_edit: float) -> tuple[str, str]:
    """The issue's goal for ``method`` on ``model`` and whether ``s_per_edit`` meets it ("", "" where none)."""
    paper = paper_seconds_per_edit(method, model)
    if model == "qwen2_audio" and method in GOAL_SECONDS:
        return f"<= {GOAL_SECONDS[method]}", "met" if s_per_edit <= GOAL_SECONDS[method] else "missed"
    if model == "qwen2_audio" and method in GOAL_PAPER_MULTIPLE and paper:
        multiple = GOAL_PAPER_MULTIPLE[method]
        return f">= {multiple}x paper", "met" if paper / s_per_edit >= multiple else "missed"
    if model == "desta25" and paper:
        return ">= 5x paper", "met" if paper / s_per_edit >= 5 else "missed"
    return "", ""


def bound_lines(rows: list[dict[str, Any]], model: str) -> list[str]:
    """For each method whose default-engine run (:func:`best`; an eager comparison run is no goal's measure)
    misses its goal: where its seconds went (the runner's split) against the floor of its edits on the card it ran on
    (``bench.roofline.floor_seconds``), part by part."""
    lines = []
    for row in rows:
        m, run = row["method"], best(row)
        if run is None:
            continue
        s = run["s_per_edit"]
        goal, met = goal_of(model, m, s)
        if met != "missed":
            continue
        split = (run.get("info") or {}).get("per_edit_split_s_incl_warmup") or {}
        g = run.get("graph") or {}
        captures = (g.get("capture_s") or 0) / max(run["edits"], 1)
        text = (f"- `{m}` ({run['engine']}, {s:.3f} s/edit; goal {goal}): measured pre-edit "
                f"{_f(split.get('pre_edit'))} + apply {_f(split.get('apply'))} + evaluate "
                f"{_f(split.get('evaluate'))} + other {_f(split.get('other'))} s/edit"
                + (f" (graph captures {captures:.2f} of them)" if captures else ""))
        fl = run.get("floor")
        if not fl:
            lines.append(text + "; no floor recorded (a call before the floor was computed per run).")
            continue
        generation = (split.get("pre_edit") or 0) + (split.get("evaluate") or 0)
        generation_floor = fl["prefill_s"] + fl["perception_s"] + fl["memory_s"]
        text += (f". Floor on its card {fl['floor_s']:.3f} s/edit: training "
                 + (f"{fl['train_s']:.3f}" if fl["train_modelled"] else "not modelled")
                 + (f" (its optimizer's state traffic {fl['optimizer_s']:.3f})" if fl.get("optimizer_s") else "")
                 + f" + prefill {fl['prefill_s']:.3f} + audio encoder {fl['perception_s']:.3f} + decode reads "
                 f"{fl['memory_s']:.3f}. Generation (pre-edit + evaluate) {generation:.2f} s/edit is "
                 f"{_f(generation / generation_floor if generation_floor else None, '.1f', 'x')} its floor")
        if fl["train_modelled"] and fl["train_s"] and split.get("apply") is not None:
            text += f"; apply {split['apply']:.2f} is {split['apply'] / fl['train_s']:.1f}x its training floor"
        elif fl["train_modelled"] and split.get("apply") is not None:
            text += f"; apply {split['apply']:.2f} (no training: the edit rewrites the prompts)"
        elif split.get("apply") is not None:
            text += f"; apply {split['apply']:.2f} (the method's training is not in the floor)"
        limit = GOAL_SECONDS.get(m) if model == "qwen2_audio" else None
        if limit is not None and fl["floor_s"] > limit:
            text += f". The floor alone is above the goal ({limit}): out of reach on this card for this work"
        lines.append(text + ".")
    if not lines:
        return []
    return ["", "What bounds each missed goal (the runner's split of the measured seconds against the floor of the "
            "same edits on the same card: training and prefill FLOPs at the measured matmul rate, the decode steps' "
            "weight and cache reads at the measured copy rate; `bench/roofline.py`):", ""] + lines


def render(args: argparse.Namespace, rows: list[dict[str, Any]], ceilings: dict[str, float],
           header: dict[str, Any]) -> str:
    model = args.model
    title = {"qwen2_audio": "Qwen2-Audio-7B", "desta25": "DeSTA2.5-Audio (Llama-3.1-8B + Whisper-large-v3)"}[model]
    seconds = header["audio_seconds"]
    lines = [f"## Issues 24 and 29: {title} (written by `bench/goals.py`)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- device: {header['device']}; {header.get('versions') or 'torch / transformers versions not recorded'}",
             f"- command: `python -m bench.goals {' '.join(args.argv)}`"
             + ("; merged with the rows of earlier calls: "
                + "; ".join(f"`python -m bench.goals {' '.join(a)}`" for a in args.previous_argv)
                if args.previous_argv else ""),
             f"- ceilings measured here: matmul {ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s, copy "
             f"{ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s",
             f"- protocol: random weights, synthetic SAKE instances (1 edit + 10 items, 5 of them locality items: the "
             "pre-edit outputs cover those under `pre-edit items` locality, all 10 under all; clips "
             f"{seconds[0]:g}-{seconds[1]:g} s), max_new_tokens {args.max_new_tokens} with EOS "
             "disabled, cold pre-edit cache (a call with `--warmup-method` first runs one untimed 1-edit pass: the process's warm-up), the runner's default edits per pass (measured: 1 edit, then as many as its peak allows, then what fits), "
             "s/edit = the run's whole wall-clock / its edits (measuring passes and captures included)", "",
             "| method | engine | edits | pre-edit items | s/edit | passes: edits (seconds) | GiB per edit (largest "
             "pass) | GiB per edit + per pass (runner's fit) | captures (s) | paper s/edit | paper/ours | goal | met | measured (UTC, its call's "
             "matmul TFLOP/s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m, paper = row["method"], paper_seconds_per_edit(row["method"], model)
        for run in row["runs"]:
            if run.get("error"):
                lines.append(f"| {m} | {run['engine']} | - | - | {run['error'][:80]} | | | | | | | | | "
                             f"{run.get('measured', '-')} |")
                continue
            s = run["s_per_edit"]
            largest = max(run["passes"], key=lambda p: p["edits"]) if run["passes"] else {}
            goal, met = goal_of(model, m, s)
            g = run.get("graph") or {}
            cap = f"{g.get('captures', 0)} ({g.get('capture_s', 0):.1f})" if run["engine"] == "graph" else "-"
            # rows measured before the runner generated pre-edit outputs for the locality items only carry no field
            lines.append(f"| {m} | {run['engine']} | {run['edits']} | {run.get('pre_edit_items', 'all')} | {s:.3f} | "
                         f"{', '.join(_pass_cell(p) for p in run['passes'])} | {_f(largest.get('gib_per_edit'))} | "
                         f"{_f(run.get('per_edit_fit_gib'))} + {_f(run.get('per_pass_fit_gib'))} | {cap} | {_f(paper)} | {_f(paper / s if paper else None, '.1f', 'x')} | {goal} | {met} | "
                         f"{run.get('measured', '-')} |")
    lines += ["", "Identical rows between the engines (bf16; pre- and post-edit outputs both equal):", ""]
    for row in rows:
        if row.get("identical"):
            v = row["identical"]
            lines.append(f"- `{row['method']}`: {_f(v.get('identical'), '.0%')} of {v['rows']} rows (pre-edit "
                         f"{_f(v.get('pre_edit'), '.0%')}, post-edit {_f(v.get('post_edit'), '.0%')})"
                         + part_stamp(row, "identical"))
    lines += bound_lines(rows, model)
    naive = [r for r in rows if r.get("naive")]
    if naive:
        lines += ["", "Against the naive loop (goal >= 20x; the naive loop and our run each as measured, by the "
                  "call stamped where it was recorded):", ""]
        for row in naive:
            run, n = best(row), row["naive"]
            ratio = n / run["s_per_edit"] if run and n else None
            ours = f" ({run['measured']})" if run and run.get("measured") else ""
            counted = row.get("naive_edits")
            n_timed = len(counted["timed"]) if counted else 0
            over = (f" over {n_timed} edit{'s' * (n_timed != 1)} after {counted['warmup']} untimed" if counted else
                    " (no untimed warm-up edit)")
            lines.append(f"- `{row['method']}`: naive {_f(n, '.2f')} s/edit{over}{part_stamp(row, 'naive')}, ours "
                         f"{_f(run and run['s_per_edit'], '.3f')} s/edit{ours}: {_f(ratio, '.1f', 'x')}"
                         + (f" ({'met' if ratio >= 20 else 'missed'})" if ratio else ""))
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "GPU busy of one more edit alone (`--profile-methods`: K=1, each of the runner's phases under "
                  "the profiler; a pass of one edit generates for 10 items, far fewer rows than the runner's passes):",
                  ""]
        for row in profiled:
            ph = row["profile"]
            ev = ph.get("evaluate", {})
            share = ev["gpu_busy_s"] / ev["wall_s"] if ev.get("wall_s") else None
            lines.append(f"- `{row['method']}`: evaluation {_f(share, '.0%')} busy of {_f(ev.get('wall_s'), '.3f')} s, "
                         f"{ev.get('kernel_launches', 0):,} kernel launches, {ev.get('graph_launches', 0):,} graph "
                         f"launches, {ev.get('host_syncs', 0)} host syncs; all phases: " +
                         ", ".join(f"{k} {v['wall_s']:.3f} s ({v['gpu_busy_s'] / v['wall_s']:.0%} busy)"
                                   for k, v in ph.items() if v.get("wall_s")) + part_stamp(row, "profile"))
    passes = [r for r in rows if r.get("pass_busy")]
    if passes:
        lines += ["", "GPU busy in one pass at the runner's default K (`bench/pass_profile.py`, joined by "
                  "`--pass-profiles`; goal >= 70 % during evaluation):", ""]
        for row in passes:
            part = row["pass_busy"]
            # a phase of a few milliseconds (I-IKE's apply: nothing to train) has no meaningful share
            shares = {name: ph["gpu_busy_s"] / ph["wall_s"] for name, ph in part["phases"].items()
                      if ph["wall_s"] >= 0.05}
            evaluation = shares.get("evaluate")
            verdict = "" if evaluation is None else f": {'met' if evaluation >= 0.70 else 'missed'}"
            lines.append(f"- `{row['method']}`: a {part['edits']}-edit pass ({part['wall_s']:.2f} s): "
                         + ", ".join(f"{name} {shares[name]:.0%} busy of {ph['wall_s']:.2f} s"
                                     for name, ph in part["phases"].items() if name in shares)
                         + verdict + part_stamp(row, "pass_busy"))
        commands = dict.fromkeys(r["pass_busy"]["command"] for r in passes)
        lines += ["", "Profiled by " + "; ".join(f"`{c}`" for c in commands)]
    swept = [r for r in rows if r.get("sweep")]
    if swept:
        lines += ["", "Memory per edit (one pass at each forced K) and the K the runner picks:", "",
                  "| method | GiB per edit at K | per edit / per pass (fit, GiB; per phase) | K on 80 GB (peak) | K on 139 GB (peak) |",
                  "|---|---|---|---|---|"]
        for row in swept:
            sw = row["sweep"]
            ks = ", ".join(f"K={k}: {_f(v.get('gib_per_edit'))}" if not v.get("error") else f"K={k}: {v['error'][:40]}"
                           for k, v in sw["k"].items())
            cards = [f"{sw[c]['k']} ({sw[c]['predicted_peak_gib']} GiB" +
                     (f", {sw[c]['bound_by']} bounds it)" if sw[c].get("bound_by") else ")") if c in sw else "n/a"
                     for c in ("k_on_80gb", "k_on_139gb")]
            fit = ("; ".join(f"{name} {_f(v['per_edit'])} / {_f(v['per_pass'])}" for name, v in sw["fit_gib"].items())
                   if "fit_gib" in sw else f"{_f(sw.get('per_edit_gib'))} / {_f(sw.get('per_pass_gib'))}")
            lines.append(f"| {row['method']}{part_stamp(row, 'sweep', '')} | {ks} | {fit} | {cards[0]} | {cards[1]} |")
    emulated = [r for r in rows if r.get("emulated")]
    for row in emulated:
        e = row["emulated"]
        lines += ["", f"- `{row['method']}` under an {row['emulated'].get('cap_gib', args.emulate_gib):g} GiB cap at its default K: "
                  + (e["error"] if e.get("error") else
                     f"completed, {e['s_per_edit']:.3f} s/edit, passes {[p['edits'] for p in e['passes']]}, "
                     f"{e['backoffs']} back-off(s), peak {e['peak_gib']} GiB") + part_stamp(row, "emulated")]
    seq = [r for r in rows if r.get("sequential")]
    if seq:
        lines += ["", "Sequential editing (one sequence of 10 edits; edits 1-5 evaluated at gaps 0-5):", ""]
        for row in seq:
            sq = row["sequential"]
            lines.append(f"- `{row['method']}`: " + (sq["error"] if sq.get("error") else
                                                     f"{sq['seconds']:.1f} s for the sequence ({sq['steps']} steps)")
                         + part_stamp(row, "sequential"))
    hyper = [r for r in rows if r.get("hypernet")]
    if hyper:
        lines += ["", "Hypernetwork training (untrained network, the train split's synthetic rows):", ""]
        for row in hyper:
            h = row["hypernet"]
            aside = h.get("set_aside_s") or {}
            validation = (f"; validation {h['s_per_validated_instance']:.3f} s per held-out instance, "
                          f"{h['val_size']} of them every {h['val_interval']} train instances"
                          if h.get("s_per_validated_instance") else "; validation not timed")
            rate = (f"{h['s_per_instance']:.3f} s per train instance over {h['instances']} instances "
                    f"({h['accumulate_bs']} per optimizer step"
                    + (f"; checkpoint writes {aside.get('save_checkpoint', 0):.1f} s and validations "
                       f"{aside.get('validate', 0):.1f} s in those steps timed apart" if aside else
                       "; checkpoint writes and validations in those steps counted in: an older call")
                    + f"){validation}; one epoch of the paper's 4,000 train instances ({epoch_instances(h):,} "
                    f"trained, the rest held out for validation): {hypernet_hours(h):.2f} h") \
                if h.get("s_per_instance") else "no timed instance"
            lines.append(f"- `{row['method']}`: {rate}" + (f" (stopped: {h['diverged']})" if h.get("diverged") else "")
                         + part_stamp(row, "hypernet"))
    lines += ["", "Projection of the paper's compute for this model (Table 7 rows with a measured rate here):", ""]
    lines += projection(rows, model)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------------------------


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.goals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2_audio", choices=sorted(PAPER_TABLE7_SINGLE))
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode with the tiny model")
    p.add_argument("--methods", default="ft_audio,ft_llm,i_ike,ie_ike,unke,wise,ke,mend")
    p.add_argument("--engines", default="graph,eager", help="decode engines to run each method with")
    p.add_argument("--default-k-methods", default=None,
                   help="methods that run at the default K (default: all of --methods; 'none' or '' for none)")
    p.add_argument("--merge-json", type=Path, default=None,
                   help="raw JSON of an earlier run of this script on the same model and card: its rows are kept, "
                        "this run's parts replace or add to them (one RESULTS.md from several device calls)")
    p.add_argument("--edits", type=int, default=32, help="edits of a default-K run (graph engine)")
    p.add_argument("--eager-edits", type=int, default=None, help="edits of the eager engine's run (default: --edits)")
    p.add_argument("--naive-methods", default="", help="methods that also run the naive loop")
    p.add_argument("--naive-edits", type=int, default=2, help="timed edits of the naive loop")
    p.add_argument("--naive-warmup", type=int, default=1,
                   help="untimed naive edits first (the process's first eager generate and training steps cost "
                        "several times a warm edit's)")
    p.add_argument("--profile-methods", default="", help="methods whose phases run under the profiler")
    p.add_argument("--sequential-methods", default="", help="methods timed on one 10-edit sequence")
    p.add_argument("--hypernet-steps", type=int, default=3,
                   help="optimizer steps timed for KE / MEND (each accumulate_bs train instances)")
    p.add_argument("--sweep", default="", help="forced K values of the memory sweep, e.g. 1,4,16")
    p.add_argument("--sweep-methods", default="")
    p.add_argument("--emulate-gib", type=float, default=0.0, help="memory cap (GiB) of an emulated smaller card")
    p.add_argument("--emulate-methods", default="")
    p.add_argument("--warmup-method", default="ft_llm",
                   help="on CUDA, one untimed pass of 1 edit of this method before any timed run (the process's "
                        "first kernels and allocations, paid once per process, not per method); '' for none")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="the bench's generation bound, EOS disabled (default: %(default)s, the issue's protocol; not "
                        "the model family's default of a run, which random weights would fill to the end)")
    p.add_argument("--training-width", type=int, default=None,
                   help="the training batches' width step in tokens for this run (an A/B of "
                        "editors.models.buckets.TRAINING_WIDTH_STEP; default: the library's)")
    p.add_argument("--batch-policies", choices=("library", "cpu"), default="library",
                   help="'cpu': run the CPU's training batch policies on CUDA too (UnKE's stage 1 in width groups, "
                        "stage 2 one sequence per row: an A/B of editors.models.buckets.TAIL_ONE_BATCH and "
                        "PACK_TRAINING); default: the library's")
    p.add_argument("--split-prefix", type=int, default=None,
                   help="the graph engine's row prefill attends over prefixes of at least this many tokens in two "
                        "parts merged by their log-sum-exps instead of gathering them (an A/B of "
                        "editors.models.generation.graph.SPLIT_PREFIX; 0: never; default: the library's)")
    p.add_argument("--encoder-batch", type=int, default=None,
                   help="clips per audio-encoder call on CUDA (an A/B of LALMAdapter.encoder_batch_cuda); default: "
                        "the library's")
    p.add_argument("--generation-cudnn", choices=("library", "allowed"), default="library",
                   help="'allowed': generation and the audio encoders may pick cuDNN's attention (an A/B of "
                        "editors.models.kernels.GENERATION_BACKENDS); default: the library's (never)")
    p.add_argument("--encoder-conv-cudnn", choices=("library", "allowed"), default="library",
                   help="'allowed': the audio encoders' convolutions may run cuDNN's kernels (an A/B of "
                        "editors.models.kernels.CONVOLUTION_CUDNN); default: the library's (torch's own kernels)")
    p.add_argument("--decoder-layers", choices=("library", "hf"), default="library",
                   help="'hf': the adapters' own runs of LLM layers (training) and the graph engine's layer loop use "
                        "the Hugging Face norms and rotary products on CUDA too (an A/B of "
                        "editors.models.fused_layer.FUSED_LAYERS); default: the library's (fused)")
    p.add_argument("--pack-sequences", choices=("library", "off"), default="library",
                   help="'off': FT-Audio's training rows in padded width groups and UnKE's packed stage-2 rows "
                        "under a boolean mask on CUDA too (an A/B of editors.models.buckets.PACK_SEQUENCES); "
                        "default: the library's (variable-length sequences)")
    p.add_argument("--capture", choices=("library", "torch"), default="library",
                   help="'torch': the graph engine records its decode steps through torch.cuda.graph (a device sync "
                        "and emptied caches before each capture; an A/B of "
                        "editors.models.generation.graph.CAPTURE_VIA_TORCH); default: the library's")
    p.add_argument("--share-clips", choices=("library", "off"), default="library",
                   help="'off': the graph engine does not share a clip asked about by several rows as a prefix (an "
                        "A/B of editors.models.generation.graph.SHARE_CLIPS); default: the library's")
    p.add_argument("--transcript-engine", choices=("library", "eager"), default="library",
                   help="'eager': DeSTA2.5's Whisper transcripts through transformers' generate (an A/B of "
                        "DeSTA25Adapter.transcript_engine); default: the library's (static cache, captured step)")
    add_pre_edit_items(p)
    p.add_argument("--time-limit", type=float, default=None, help="seconds after which no part starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--combine", nargs="+", default=None, metavar="RAW_JSON[:METHODS]",
                   help="no run: merge these raw JSON files of earlier calls on one card, in order (later parts "
                        "replace earlier ones; FILE:m1,m2 takes only those methods' rows of FILE), and write their "
                        "table to --out (and --json)")
    p.add_argument("--pass-profiles", nargs="+", default=None, metavar="PASS_PROFILE_JSON",
                   help="with --combine: the --json files of bench/pass_profile.py calls on the same card and model; "
                        "each method's profiled pass gives its row the GPU busy share of its phases (the goal's "
                        "measure: evaluation at the runner's default K)")
    p.add_argument("--refloor", action="store_true",
                   help="with --combine: compute each recorded floor again with today's bench/roofline.py (the "
                        "same edits, passes and ceilings; the model's shapes on the meta device)")
    args = p.parse_args(argv)
    if not args.combine:
        _check_parts(p, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.previous_argv = None
    return args


def _check_parts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each part's methods (``--sequential-methods`` and the like) run inside ``--methods``' loop: a method named
    there but not in ``--methods`` would be skipped without a word, so it is an error."""
    methods = set(_list(args.methods))
    parts = {"--naive-methods": _list(args.naive_methods), "--profile-methods": _list(args.profile_methods),
             "--sequential-methods": _list(args.sequential_methods), "--sweep-methods": _list(args.sweep_methods),
             "--emulate-methods": _list(args.emulate_methods), "--default-k-methods": default_k_methods(args)}
    for flag, named in parts.items():
        outside = [m for m in named if m not in methods]
        if outside:
            parser.error(f"{flag} names {', '.join(outside)}, which --methods ({args.methods}) does not run; "
                         "a part runs only for the methods of --methods")


def default_k_methods(args: argparse.Namespace) -> list[str]:
    """The methods of ``--default-k-methods``: all of ``--methods`` when unset, none for ``none`` or ''."""
    if args.default_k_methods is None:
        return _list(args.methods)
    return [] if args.default_k_methods.strip().lower() == "none" else _list(args.default_k_methods)


def earlier_rows(path: Path | None, device: str) -> tuple[list[dict[str, Any]], list[list[str]] | None]:
    """The rows of an earlier call's raw JSON (``--merge-json``) and the chain of commands that made them; none
    when ``path`` is unset or absent. Rows timed on another card than ``device`` are refused: timings of different
    cards never share a table."""
    if path is None or not path.is_file():
        return [], None
    earlier = json.loads(path.read_text())
    timed_on = earlier.get("device") or "an unrecorded device"
    if timed_on != device:
        raise SystemExit(f"--merge-json {path}: its rows were timed on {timed_on}, this run is on {device}; write "
                         "this card's rows to a file of their own (e.g. bench/RESULTS-h100.json)")
    return earlier.get("rows", []), _commands(earlier)


def _commands(data: dict[str, Any]) -> list[list[str]]:
    """The commands that made a raw JSON's rows, earliest first (its own last)."""
    chain = data.get("previous_argv") or []
    if chain and isinstance(chain[0], str):  # an older file: one earlier call
        chain = [chain]
    return chain + [data.get("argv")]


#: The runner's phases whose busy shares a pass profile gives a row (its labelled parts inside them stay in its file).
PASS_PHASES = ("pre_edit", "apply", "evaluate")


def join_pass_profiles(rows: list[dict[str, Any]], path: Path, device: str, model: str) -> None:
    """Give each method's row of ``rows`` the ``pass_busy`` part of its profiled pass in ``path`` (the ``--json`` of
    ``bench/pass_profile.py``): the pass's edits and wall-clock, each phase's wall-clock and GPU busy seconds, the
    profile's command, stamped with its time. A file of another card or model, or of a method without a row, is
    refused."""
    try:
        profiled = json.loads(path.read_text())
        if not isinstance(profiled, list):
            raise ValueError("expected a list of rows")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--pass-profiles {path}: not a --json of bench.pass_profile ({exc})") from exc
    by_method = {r["method"]: r for r in rows}
    for entry in profiled:
        method = entry.get("method")
        where = f"--pass-profiles {path}: {method}"
        if entry.get("device") != device or entry.get("model", "qwen2_audio") != model:
            raise SystemExit(f"{where}: profiled on {entry.get('device') or 'an unrecorded device'} with "
                             f"{entry.get('model', 'qwen2_audio')}, this table is {model} on {device}")
        ranges = (entry.get("profile") or {}).get("ranges")
        if not ranges:
            raise SystemExit(f"{where}: no profiled pass (a --syncs or --python run?)")
        if method not in by_method:
            raise SystemExit(f"{where}: the table has no row of this method")
        row = by_method[method]
        row["pass_busy"] = {"edits": entry["profile"]["edits"], "wall_s": entry["profile"]["wall_s"],
                            "command": entry.get("command", "python -m bench.pass_profile"),
                            "phases": {name: {"wall_s": ranges[name]["wall_s"],
                                              "gpu_busy_s": ranges[name]["gpu_busy_s"]}
                                       for name in PASS_PHASES if name in ranges}}
        row.setdefault("stamps", {})["pass_busy"] = entry.get("measured")


def combine(args: argparse.Namespace) -> int:
    """``--combine``: the raw JSON of several calls on one card, merged in the order given (a later call's parts
    replace an earlier one's, as ``--merge-json`` does on the device), rendered into ``--out`` (and ``--json``) on
    any machine: the rows of several device calls become one table without another call."""
    rows: list[dict[str, Any]] = []
    commands: list[list[str]] = []
    data: dict[str, Any] = {}
    header: dict[str, Any] | None = None
    for spec in args.combine:
        name, colon, only = spec.rpartition(":")  # FILE:methods
        if not colon or "/" in only:  # a FILE alone
            name, only = spec, ""
        path = Path(name)
        try:
            data = json.loads(path.read_text())
            device = data["device"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"--combine {path}: not a raw JSON of bench.goals ({exc})") from exc
        if header is not None and device != header["device"]:
            raise SystemExit(f"--combine {path}: its rows were timed on {device}, the files before it on "
                             f"{header['device']}; timings of different cards never share a table")
        if data.get("model", args.model) != args.model:
            raise SystemExit(f"--combine {path}: rows of --model {data['model']}, this table is --model {args.model}")
        header = data.get("header") or {"device": device, "versions": None, "audio_seconds": list(
            (tiny_scale() if device.startswith("CPU") else full_scale()).audio_seconds)}
        if args.refloor:
            LOG.info("%s: the floors of %d runs computed again", path, refloor(data))
        kept = [r for r in data.get("rows", []) if not only or r["method"] in _list(only)]
        if only and len(kept) != len(_list(only)):
            raise SystemExit(f"--combine {spec}: {path} has rows of {', '.join(r['method'] for r in data['rows'])}")
        rows = merge_rows(rows, kept)
        commands += [c for c in _commands(data) if c not in commands]
    assert header is not None  # argparse: at least one file
    for path in args.pass_profiles or ():
        join_pass_profiles(rows, Path(path), header["device"], args.model)
    args.argv, args.previous_argv = commands[-1], commands[:-1]
    write_results(args.out, render(args, rows, data["ceilings"], header), args.model)
    if args.json:
        atomic_write(args.json, json.dumps({"device": header["device"], "model": args.model, "header": header,
                                            "ceilings": data["ceilings"], "rows": rows, "argv": args.argv,
                                            "previous_argv": args.previous_argv}, indent=1, default=str) + "\n")
    print(render(args, rows, data["ceilings"], header))
    return 0


def units_per_config(args: argparse.Namespace) -> int:
    """Edits the call's largest run needs (default K, the eager engine's run, the sweep's largest K)."""
    return max(args.edits, args.eager_edits or args.edits, max([int(k) for k in _list(args.sweep)] or [1]))


def goals_dataset(args: argparse.Namespace, workdir: Path, audio_seconds: tuple[float, float]) -> SyntheticDataset:
    """The call's synthetic SAKE instances (test rows for its largest run and one more, train rows for the
    hypernetworks' steps): the same bytes for the same arguments."""
    _, limit = plan_units(units_per_config(args), 1)
    train_rows = -(-(HYPERNET_VAL_ROWS + HYPERNET_MAX_GROUP * (1 + args.hypernet_steps)) // len(ATTRIBUTES))
    return SyntheticDataset.make(workdir / "dataset", limit + 1, max(3, train_rows), args.seed, audio_seconds)


def refloor(data: dict[str, Any]) -> int:
    """``--combine --refloor``: the floor of each run of ``data`` that records one, computed again by today's
    ``bench.roofline`` from the same edits (the call's synthetic instances, rebuilt from its arguments), the run's
    passes and training steps, and the ceilings its call measured; the model's full-size architecture is built on
    the meta device (shapes only, no weights). KE's and MEND's runs keep the floor their call recorded (their
    editors need the hypernetwork the call trained; their training is not in the floor). Returns the runs updated."""
    from bench.models import Scale, bench_adapter_class
    from editors.hypernetwork import hypernetwork_methods

    call = parse_args(data["argv"])
    if call.model != "qwen2_audio":
        raise SystemExit(f"--refloor: the prompts of --model {call.model} hold Whisper transcripts, which need the "
                         "model's weights; its floors are computed on the device only")
    seconds = tuple(data["header"]["audio_seconds"])
    adapter = bench_adapter_class(call.model).random_full_size(call.seed, dtype=torch.bfloat16, device="meta")
    done = 0
    with tempfile.TemporaryDirectory(prefix="sake-refloor-") as tmp:
        dataset = goals_dataset(call, Path(tmp), seconds)  # type: ignore[arg-type]
        bench = Bench(scale=Scale("full", "meta", torch.bfloat16, seconds), adapter=adapter,  # type: ignore[arg-type]
                      dataset=dataset, counter=GenerateCounter(adapter.model), max_new_tokens=call.max_new_tokens,
                      seed=call.seed, workdir=Path(tmp), model=call.model)
        untrained = set(hypernetwork_methods())  # their editors need the network the device call trained
        for row in data["rows"]:
            if row["method"] in untrained:
                LOG.info("%s: the floor measured on the device kept (its editor needs a trained hypernetwork)",
                         row["method"])
                continue
            for run in row["runs"]:
                if not run.get("floor"):
                    continue
                bench.pre_edit_items = run.get("pre_edit_items", "all")
                run["floor"] = run_floor(bench, row["method"], run, run_ceilings(run, data["ceilings"]))
                done += 1
    return done


def run_ceilings(run: dict[str, Any], latest: dict[str, float]) -> dict[str, float]:
    """The ceilings of the call that timed ``run``: recorded with it, or (runs merged before they were) ``latest``
    (the file's newest call) with the matmul rate its stamp records; a merged file's header holds only the newest
    call's."""
    if run.get("ceilings"):
        return dict(run["ceilings"])
    stamp = str(run.get("measured") or "")
    _, _, rate = stamp.rpartition(", ")
    if not rate.isdigit():
        return dict(latest)
    return {**latest, "matmul_flops_per_s": float(rate) * 1e12}


def apply_ab_switches(args: argparse.Namespace) -> None:
    """Set the library's module switches that the call's A/B arguments name (each left as the library has it unless
    asked): training width and batch policies, the graph engine's prefix split, clip sharing and capture, the
    kernels allowed in generation and in the audio encoders' convolutions, the decoder layers' forward and packing."""
    from torch.nn.attention import SDPBackend

    from editors.models import buckets, fused_layer, kernels
    from editors.models.generation import graph

    if args.training_width:
        buckets.TRAINING_WIDTH_STEP.update(cpu=args.training_width, cuda=args.training_width)
    if args.batch_policies == "cpu":
        buckets.TAIL_ONE_BATCH.update(cuda=buckets.TAIL_ONE_BATCH["cpu"])
        buckets.PACK_TRAINING.update(cuda=buckets.PACK_TRAINING["cpu"])
    if args.split_prefix is not None:
        graph.SPLIT_PREFIX = args.split_prefix or None
    if args.share_clips == "off":
        graph.SHARE_CLIPS = False
    if args.capture == "torch":
        graph.CAPTURE_VIA_TORCH = True
    if args.generation_cudnn == "allowed":
        kernels.GENERATION_BACKENDS = [b for name, b in SDPBackend.__members__.items() if name != "ERROR"]
    if args.encoder_conv_cudnn == "allowed":
        kernels.CONVOLUTION_CUDNN = True
    if args.pack_sequences == "off":
        buckets.PACK_SEQUENCES.update(cuda=False)
    if args.decoder_layers == "hf":
        fused_layer.FUSED_LAYERS.update(cuda=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.combine:
        return combine(args)
    if args.pass_profiles:
        raise SystemExit("--pass-profiles joins a table with --combine (a pass profile is a call of its own)")
    clock = Clock(args.time_limit)
    apply_ab_switches(args)
    scale = tiny_scale() if args.tiny else full_scale()
    header = run_header(scale)
    device = header["device"]
    previous, previous_argv = earlier_rows(args.merge_json, device)
    args.previous_argv = previous_argv
    ceilings = measure_ceilings(scale)
    adapter = build_adapter(scale, args.seed, args.model)
    if args.transcript_engine == "eager":
        if not hasattr(adapter, "transcript_engine"):
            raise SystemExit(f"--transcript-engine eager: --model {args.model} decodes no transcripts")
        adapter.transcript_engine = "eager"
    if args.encoder_batch:
        adapter.encoder_batch_cuda = args.encoder_batch
    methods = _list(args.methods)
    default_methods = default_k_methods(args)
    engines = _list(args.engines)
    eager_edits = args.eager_edits or args.edits
    per = units_per_config(args)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sake-goals-") as tmp:
        workdir = args.workdir or Path(tmp)
        configs, limit = plan_units(per, 1)
        dataset = goals_dataset(args, workdir, scale.audio_seconds)
        bench = Bench(scale=scale, adapter=adapter, dataset=dataset, counter=GenerateCounter(adapter.model),
                      max_new_tokens=args.max_new_tokens, seed=args.seed, workdir=workdir, model=args.model,
                      pre_edit_items=args.pre_edit_items)
        if args.warmup_method and scale.device == "cuda":
            started = time.perf_counter()
            runner_pass(bench, args.warmup_method, 1, 0, workdir / "cache-warmup", workdir / "warmup.jsonl", 1)
            LOG.info("process warm-up (%s, 1 edit, untimed): %.1f s", args.warmup_method,
                     time.perf_counter() - started)
        for method in methods:
            row: dict[str, Any] = {"method": method, "runs": []}
            rows.append(row)
            from editors.registry import get_editor_class

            allowed = get_editor_class(method).generation_engines
            if method in ("ke", "mend") and clock.allows(f"{method} hypernetwork training"):
                row["hypernet"] = hypernetwork(bench, method, args.hypernet_steps)
            for engine in dict.fromkeys(e if e in allowed else allowed[0] for e in engines):
                edits = args.edits if engine == allowed[0] else eager_edits
                if method in default_methods and clock.allows(f"{method} default K ({engine})"):
                    timed = default_k(bench, method, edits, engine, ceilings)
                    row["runs"].append({**timed, "measured": measured_stamp(ceilings), "ceilings": dict(ceilings)})
            done = [r for r in row["runs"] if r.get("out")]
            if len(done) == 2:
                row["identical"] = identical_share(Path(done[0]["out"]), Path(done[1]["out"]))
            if method in _list(args.naive_methods) and clock.allows(f"{method} naive"):
                total = args.naive_warmup + args.naive_edits
                order = dataset.ordered(*plan_units(total, 0))[:total]
                naive = run_naive(bench, method, order, args.naive_warmup)
                row["naive"] = naive.per_edit
                row["naive_edits"] = {"warmup": args.naive_warmup,
                                      "timed": dict(zip((r["id"] for r in order[args.naive_warmup:]),
                                                        (round(s, 3) for s in naive.seconds)))}
            if method in _list(args.profile_methods) and scale.device == "cuda" and clock.allows(f"{method} profile"):
                _, runner = runner_pass(bench, method, 1, 0, workdir / f"cache-prof-{method}",
                                        workdir / f"prof-{method}.jsonl", 1)
                extra = dataset.rows[(configs[0], "test")][limit]
                row["profile"] = profile_unit(bench, runner, extra)
            if method in _list(args.sequential_methods) and clock.allows(f"{method} sequential"):
                row["sequential"] = sequential(bench, method)
            if method in _list(args.sweep_methods) and clock.allows(f"{method} sweep"):
                row["sweep"] = sweep(bench, method, [int(k) for k in _list(args.sweep)])
            if method in _list(args.emulate_methods) and args.emulate_gib and scale.device == "cuda" \
                    and clock.allows(f"{method} emulated {args.emulate_gib:g} GiB"):
                row["emulated"] = emulate(bench, method, args.edits, args.emulate_gib)
            row["stamps"] = {part: measured_stamp(ceilings) for part in PARTS if row.get(part)}
            merged = merge_rows(previous, rows)
            write_results(args.out, render(args, merged, ceilings, header), args.model)  # after every method
            if args.json:
                atomic_write(args.json, json.dumps({"device": device, "model": args.model, "header": header,
                                                    "ceilings": ceilings, "rows": merged,
                                                    "argv": args.argv, "previous_argv": previous_argv},
                                                   indent=1, default=str) + "\n")
    print(render(args, merge_rows(previous, rows), ceilings, header))
    return 0


def merge_rows(previous: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``previous`` rows (an earlier device call) updated by this run's parts, in the earlier order, new methods
    last; a method's runs are replaced engine by engine."""
    out = [dict(r) for r in previous]
    index = {r["method"]: r for r in out}
    for row in rows:
        if row["method"] not in index:
            out.append(row)
            continue
        old = index[row["method"]]
        for key, value in row.items():
            if key == "runs":  # by engine: this call's run of an engine replaces that engine's only
                fresh = {r["engine"]: r for r in value}
                kept = [fresh.pop(r["engine"], r) for r in old.get("runs", [])]
                old["runs"] = kept + list(fresh.values())
            elif key == "stamps":  # each part keeps the stamp of the call that measured it
                old["stamps"] = {**old.get("stamps", {}), **value}
            elif key != "method" and value not in (None, [], {}):
                old[key] = value
    return out


if __name__ == "__main__":
    sys.exit(main())
