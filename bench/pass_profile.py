"""Where one full pass's time goes: the runner at its default K, one pass profiled phase by phase.

For each method: the runner runs ``--edits`` single edits at its default K (cold pre-edit cache, the graph engine
where the method allows it), and the ``--pass``-th pass of that run (default: the third, the first at the measured
K) runs under ``torch.profiler``. For each phase of that pass (pre-edit outputs, apply, post-edit generation,
restore) and for the generation's parts inside them (audio encoder, the per-audio work before tokenization such as
DeSTA2.5's transcripts, prefix prefill, row prefill, decode and, inside it, the decode step's capture), it prints
the wall-clock, the GPU busy time (the union of kernel and copy intervals inside the phase), the kernel launches,
the captured-graph replays, the host's ``cudaMalloc``/``cudaFree`` calls and their seconds (with the pass's
caching-allocator counters: retries mean the device was full enough that cached blocks were freed and allocated
again) and the kernels that took longest; for the whole pass also the operators whose own kernels took longest
(which operators launch the elementwise and copy kernels). Inside the apply phase the training methods' parts are
labelled too: UnKE's stage 1 (``compute_keys``), its stage-2 rows packed (``packed_layer_rows``), the training loop
of stacked copies (``finetune_many``), its optimizer step (``masked_update``), the copies' cast to the model's dtype
and split per edit (``per_edit``), ``hidden_entering`` and the preservation prompts. The run's own per-phase totals
and the graph engine's counters (captures and their seconds) are printed beside them.

    BENCH_MODULE=bench.pass_profile bash bench/gpu_run.sh --methods ft_audio,ie_ike --edits 32 --out $OUT/profile.md

``--stacks`` profiles the pass with Python stacks (``with_stack``) and adds, per range, the GPU's idle time inside it
attributed to what the host was running meanwhile: the innermost operator or runtime call, the innermost library
frames where the trace holds Python calls (the GPU machine's torch 2.11 trace held none), else the innermost
labelled range. That is where the host keeps the GPU waiting (it found cuDNN's per-shape attention plans in
FT-LLM's generation, bench/NOTES.md). The tracer slows the host, so the idle figures are larger than an
unprofiled pass's; read them as shares.

``--python`` runs that pass under ``cProfile`` instead: the host's heaviest Python functions, by their own time and
(the library's) with their callees.

``--shapes`` records the operators' input shapes as well and adds the operators whose own kernels took longest by
input shape (which call of ``aten::index`` or ``aten::copy_`` it is, not only which operator).

``--syncs`` runs that pass without the profiler and counts its host-device synchronizations by call site instead
(``torch.cuda.set_sync_debug_mode``): what keeps the host from running ahead of the GPU.

``--tiny`` runs the same on the CPU with the tiny model (a smoke test of the script; no GPU intervals).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from bench.arms import (Bench, add_pre_edit_items, allocator_counts, allocator_delta, runner_pass,
                        synthetic_bench)
from bench.report import device_name
from sake_core.atomic import atomic_write

LOG = logging.getLogger(__name__)
PREFIX = "sake:"
#: CUDA runtime calls of the caching allocator (host time without a kernel: a range whose wall-clock exceeds its
#: launches' and syncs' share may be spending it here, when the device is nearly full and cached blocks are freed
#: and allocated again).
ALLOCATOR_CALLS = frozenset({"cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync"})
#: A Python frame of the library (``editors/models/adapter.py(494): forward``), as the profiler names it (the bench's
#: own wrappers are not library frames).
PROJECT_FRAME = re.compile(r"(^|/)(editors|eval|sake|sake_core|sake_dataset)/[^(]*\.py\(")


def _ranged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(PREFIX + name):
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def _patched_parts(adapter: Any) -> Iterator[None]:
    """Label the generation's and the training methods' parts (class- and module-level patches, undone on exit)."""
    from editors.models.generation import graph

    import editors.batching
    import editors.ft_audio
    import editors.ft_llm
    import editors.preservation
    import editors.unke
    import editors.wise

    owners: list[tuple[Any, str]] = [(graph._State, name) for name in ("prefill_prefixes", "prefill", "decode",
                                                                       "capture", "_split_attention")]
    owners += [(type(adapter), name) for name in ("audio_states", "warm_audio", "hidden_entering")]
    # the training methods' parts: UnKE's stage 1 (compute_keys), its stage-2 rows packed (packed_layer_rows), stage 2
    # (finetune_many), the optimizer step of stacked copies (masked_update), the copies cast to the model's dtype,
    # the preservation prompts
    owners += [(editors.unke.UnKE, "compute_keys"), (editors.unke, "packed_layer_rows"),
               (editors.batching.CopyValues, "per_edit"),
               (editors.batching, "masked_update"), (editors.wise, "masked_update")]
    owners += [(module, "finetune_many") for module in (editors.unke, editors.wise, editors.ft_llm, editors.ft_audio)]
    owners += [(editors.preservation, "preservation_prompts")]
    owners = [(owner, name) for owner, name in owners if hasattr(owner, name)]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name in owners]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, _ranged(name, getattr(owner, name)))
        yield
    finally:
        for owner, name, fn in saved:
            if fn is None:  # inherited: drop the patch
                delattr(owner, name)
            else:
                setattr(owner, name, fn)


def _merged(intervals: Sequence[tuple[float, float]]) -> list[list[float]]:
    """``intervals`` merged where they overlap, in order: ``[[start, end], ...]``."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _union(intervals: Sequence[tuple[float, float]]) -> float:
    """The length of the union of ``intervals``."""
    return sum(b - a for a, b in _merged(intervals))


def _category(name: str) -> str:
    """A kernel's kind, from its name."""
    low = name.lower()
    for kind, keys in (("attention", ("sdpa", "flash", "fmha", "attention")), ("matmul", ("gemm", "nvjet", "cutlass", "matmul", "gemv")),
                       ("softmax", ("softmax",)), ("cat", ("cat",)), ("index", ("index", "gather", "scatter")),
                       ("reduce", ("reduce",)), ("copy", ("memcpy", "memset", "copy")),
                       ("elementwise", ("elementwise",))):
        if any(k in low for k in keys):
            return kind
    return "other"


def summarize(prof: Any, shapes: bool = False) -> dict[str, Any]:
    """Per labelled range: wall, GPU busy (union of kernel and copy intervals inside it; the labels' own device-side
    spans excluded), launches, top kernels; ``_kernels``: the whole trace's kernel time by kind and by name."""
    import bisect

    from torch.autograd import DeviceType

    events = list(prof.events())
    device = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.device_type == DeviceType.CUDA and not e.name.startswith(PREFIX))
    starts = [d[0] for d in device]
    ranges = [e for e in events if e.name.startswith(PREFIX) and e.device_type == DeviceType.CPU]
    cpu = sorted((e.time_range.start, e.name, e.time_range.end) for e in events
                 if e.device_type == DeviceType.CPU and not e.name.startswith(PREFIX))
    cpu_starts = [c[0] for c in cpu]
    longest = max((t - s for s, t, _ in device), default=0.0)
    out: dict[str, Any] = {}
    for r in ranges:
        a, b = r.time_range.start, r.time_range.end
        lo, hi = bisect.bisect_left(starts, a - longest), bisect.bisect_right(starts, b)
        inside = [(max(s, a), min(t, b), n) for s, t, n in device[lo:hi] if t > a and s < b]
        per_kernel: dict[str, float] = {}
        for s, t, n in inside:
            per_kernel[n[:70]] = per_kernel.get(n[:70], 0.0) + (t - s)
        host = cpu[bisect.bisect_left(cpu_starts, a):bisect.bisect_right(cpu_starts, b)]
        names = [n for _, n, _ in host]
        allocs = [(s, t) for s, n, t in host if n in ALLOCATOR_CALLS]
        entry = out.setdefault(r.name[len(PREFIX):], {"count": 0, "wall_s": 0.0, "gpu_busy_s": 0.0,
                                                      "kernel_launches": 0, "graph_launches": 0, "syncs": 0,
                                                      "alloc_calls": 0, "alloc_s": 0.0, "kernels": {}})
        entry["count"] += 1
        entry["wall_s"] += (b - a) / 1e6
        entry["gpu_busy_s"] += _union([(s, t) for s, t, _ in inside]) / 1e6
        entry["kernel_launches"] += sum(1 for n in names if "LaunchKernel" in n)
        entry["graph_launches"] += sum(1 for n in names if "GraphLaunch" in n)
        entry["syncs"] += sum(1 for n in names if "Synchronize" in n)
        entry["alloc_calls"] += len(allocs)
        entry["alloc_s"] += sum(t - s for s, t in allocs) / 1e6
        for n, us in per_kernel.items():
            entry["kernels"][n] = entry["kernels"].get(n, 0.0) + us
    for entry in out.values():
        entry["top_kernels"] = [[n, round(us / 1e3, 1)] for n, us in
                                sorted(entry.pop("kernels").items(), key=lambda kv: -kv[1])[:8]]
        entry["wall_s"] = round(entry["wall_s"], 4)
        entry["gpu_busy_s"] = round(entry["gpu_busy_s"], 4)
        entry["alloc_s"] = round(entry["alloc_s"], 4)
    kinds: dict[str, float] = {}
    names_total: dict[str, list[float]] = {}
    for s, t, n in device:
        kinds[_category(n)] = kinds.get(_category(n), 0.0) + (t - s)
        entry_n = names_total.setdefault(n[:90], [0.0, 0])
        entry_n[0] += t - s
        entry_n[1] += 1
    out["_kernels"] = {"by_kind_ms": {k: round(v / 1e3, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                       "top": [[n, round(v[0] / 1e3, 1), int(v[1])] for n, v in
                               sorted(names_total.items(), key=lambda kv: -kv[1][0])[:15]],
                       "ops": top_ops(prof)}
    if shapes:
        out["_kernels"]["ops_by_shape"] = top_ops(prof, 40, shapes=True)
    return out


def idle_by_host(prof: Any, step_us: float = 20.0, top: int = 12) -> dict[str, dict[str, Any]]:
    """Per labelled range: the GPU's idle time inside it (no kernel or copy running), sampled every ``step_us`` and
    attributed to the innermost host event on the ranges' thread at that moment, with the library frames around it
    where the trace (taken ``with_stack``) holds Python calls: ``{range: {"idle_s", "top": [[key, ms], ...]}}``.
    Idle time while no operator or Python call was recorded reads ``(no operator in <the innermost labelled
    range>)``: the host's own Python, where the trace holds no Python calls."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    busy = _merged([(e.time_range.start, e.time_range.end) for e in events
                    if e.device_type == DeviceType.CUDA and not e.name.startswith(PREFIX)])
    labelled = [e for e in events if e.name.startswith(PREFIX) and e.device_type == DeviceType.CPU]
    if not labelled:
        return {}
    thread = labelled[0].thread
    host = sorted((e for e in events if e.device_type == DeviceType.CPU and e.thread == thread),
                  key=lambda e: (e.time_range.start, -e.time_range.end))
    samples: list[tuple[float, str]] = []
    for r in labelled:
        a, b = r.time_range.start, r.time_range.end
        cursor = a
        for s, t in busy:
            if t <= cursor or s >= b:
                continue
            samples += [(x, r.name[len(PREFIX):]) for x in _points(cursor, min(s, b), step_us)]
            cursor = max(cursor, t)
        samples += [(x, r.name[len(PREFIX):]) for x in _points(cursor, b, step_us)]
    samples.sort()
    out: dict[str, dict[str, Any]] = {}
    stack: list[Any] = []
    i = 0
    for t, name in samples:
        while i < len(host) and host[i].time_range.start <= t:
            e = host[i]
            while stack and stack[-1].time_range.end <= e.time_range.start:
                stack.pop()
            stack.append(e)
            i += 1
        while stack and stack[-1].time_range.end <= t:
            stack.pop()
        entry = out.setdefault(name, {"idle_s": 0.0, "keys": {}})
        entry["idle_s"] += step_us / 1e6
        key = _host_key(stack)
        entry["keys"][key] = entry["keys"].get(key, 0.0) + step_us / 1e3
    for entry in out.values():
        entry["idle_s"] = round(entry["idle_s"], 4)
        entry["top"] = [[k, round(ms, 1)] for k, ms in sorted(entry.pop("keys").items(), key=lambda kv: -kv[1])[:top]]
    return out


def _points(a: float, b: float, step: float) -> list[float]:
    """Sample times every ``step`` in ``[a, b)``, each in the middle of its step."""
    n = int((b - a) // step)
    return [a + (k + 0.5) * step for k in range(max(0, n))]


def _host_key(stack: Sequence[Any]) -> str:
    """``leaf [in op] <- frame <- frame <- frame``: the innermost host event (with the innermost ``aten::`` operator
    around it, where the leaf is a runtime call such as ``cudaLaunchKernel``) and the three innermost library
    frames; with nothing but labelled ranges running, the innermost of those."""
    inner = [e for e in stack if not e.name.startswith(PREFIX)]
    if not inner:
        label = next((e.name[len(PREFIX):] for e in reversed(stack)), None)
        return f"(no operator in {label})" if label else "(no host event)"
    leaf = inner[-1].name[:80]
    op = next((e.name for e in reversed(inner) if e.name.startswith("aten::")), None)
    if op is not None and op != inner[-1].name:
        leaf += f" in {op}"
    frames = [e.name for e in reversed(inner) if PROJECT_FRAME.search(e.name)][:3]
    return " <- ".join([leaf] + [f for f in frames if f != inner[-1].name])


def python_functions(prof: Any, top: int = 25) -> dict[str, list[list[Any]]]:
    """A ``cProfile`` run's heaviest functions: ``self`` by their own time, ``library`` (the library's functions)
    by their time with callees: ``[function, calls, seconds]``."""
    import pstats

    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def name(key: tuple[str, int, str]) -> str:
        path, line, func = key
        match = PROJECT_FRAME.search(f"{path}(")
        short = path[match.start():].lstrip("/") if match else "/".join(Path(path).parts[-2:])
        return f"{short}:{line} {func}" if line else func

    rows = [(name(k), v[1], v[2], v[3], bool(PROJECT_FRAME.search(f"{k[0]}("))) for k, v in stats.items()]
    return {"self": [[n, calls, round(own, 4)] for n, calls, own, _, _ in sorted(rows, key=lambda r: -r[2])[:top]],
            "library": [[n, calls, round(cum, 4)] for n, calls, _, cum, mine in
                        sorted(rows, key=lambda r: -r[3]) if mine][:top]}


def top_ops(prof: Any, n: int = 15, shapes: bool = False) -> list[list[Any]]:
    """The operators (``aten::mul``, ``aten::cat``, ...) whose own kernels took the most device time in the trace:
    [name, ms, calls] (``shapes``: [name, input shapes, ms, calls], operators only, for a trace recorded with
    shapes). Which operators launch the elementwise and copy kernels a kernel name does not tell."""
    ops = []
    for avg in prof.key_averages(group_by_input_shape=shapes):
        device_us = getattr(avg, "self_device_time_total", None)
        if device_us is None:  # older torch
            device_us = getattr(avg, "self_cuda_time_total", 0)
        if not device_us or avg.key.startswith(PREFIX):
            continue
        if shapes:
            if re.fullmatch(r"\w+::\w+", avg.key):  # an operator (``aten::index``), not a kernel's own event
                ops.append([avg.key, str(avg.input_shapes)[:160], round(device_us / 1e3, 1), int(avg.count)])
        else:
            ops.append([avg.key, round(device_us / 1e3, 1), int(avg.count)])
    return sorted(ops, key=lambda op: -op[-2])[:n]


@contextlib.contextmanager
def _counting_syncs(sites: dict[str, int]) -> Iterator[None]:
    """Count every host-device synchronization (``torch.cuda.set_sync_debug_mode``) by the project's innermost
    frames that led to it."""
    import traceback
    import warnings

    root = str(Path(__file__).resolve().parents[1])
    original = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" not in str(message).lower():
            return original(message, category, filename, lineno, *args, **kwargs)
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root)
                  and not f.filename.endswith("pass_profile.py")]
        site = " <- ".join(f"{Path(f.filename).relative_to(root)}:{f.lineno} {f.name}" for f in frames[::-1][:3])
        sites[site or filename] = sites.get(site or filename, 0) + 1

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # type: ignore[assignment]
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = original


def profiled_run(bench: Bench, method: str, edits: int, profile_pass: int,
                 sync_sites: dict[str, int] | None = None, stacks: bool = False,
                 python: bool = False, shapes: bool = False) -> dict[str, Any]:
    """The runner at default K over ``edits`` edits; pass number ``profile_pass`` (1-based) under the profiler, from
    the generation of its pre-edit outputs (each pass generates its own just before it here: the runner's
    ``PRE_EDIT_AHEAD`` set to 0) to its last row. ``sync_sites``: count the pass's host syncs instead; ``python``:
    run it under ``cProfile`` instead (the host's Python functions); ``shapes``: record the operators' input shapes."""
    import editors.run as run_module
    from editors.models.generation import graph, release
    from editors.run import Runner

    original, original_ahead = Runner._run_pass, Runner._pre_edit_ahead
    state: dict[str, Any] = {"passes": 0, "aheads": 0}
    window = contextlib.ExitStack()  # open from the profiled pass's pre-edit generation to the end of the pass

    def pre_edit_ahead(self: Any, units: Sequence[Any]) -> Any:
        state["aheads"] += 1
        if state["aheads"] != profile_pass:
            return original_ahead(self, units)
        if sync_sites is not None:  # count host syncs by where they happen instead of profiling
            window.enter_context(_counting_syncs(sync_sites))
        elif python:
            import cProfile

            state["cprofile"] = cProfile.Profile()
            state["cprofile"].enable()
            window.callback(state["cprofile"].disable)
            state["started"] = time.perf_counter()
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if bench.scale.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            state["captures"] = (graph.STATS["captures"], graph.STATS["capture_s"])
            state["allocator"] = allocator_counts(bench.scale.device)
            window.enter_context(_patched_parts(bench.adapter))
            state["prof"] = window.enter_context(torch.profiler.profile(activities=activities, with_stack=stacks,
                                                                               record_shapes=shapes))
            state["started"] = time.perf_counter()
        with torch.profiler.record_function(PREFIX + "pre_edit"):
            return original_ahead(self, units)

    def run_pass(self: Any, units: Sequence[Any], out: Any, bar: Any, ahead: Any, peaks: Any) -> None:
        state["passes"] += 1
        if state["passes"] != profile_pass:
            return original(self, units, out, bar, ahead, peaks)
        self.session.apply_many = _ranged("apply", self.session.apply_many)
        self.session.restore = _ranged("restore", self.session.restore)
        self.editor.generate_many = _ranged("evaluate", self.editor.generate_many)
        try:
            with torch.profiler.record_function(PREFIX + "pass"):
                original(self, units, out, bar, ahead, peaks)
            if bench.scale.device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - state["started"] if "started" in state else None
        finally:
            window.close()
            del self.session.apply_many, self.session.restore, self.editor.generate_many
        if python:
            state["profile"] = {"edits": len(units), "wall_s": round(wall or 0.0, 3),
                                "python": python_functions(state["cprofile"])}
        elif sync_sites is None:
            captures = state["captures"]
            state["profile"] = {"edits": len(units), "wall_s": round(wall or 0.0, 3),
                                "captures": graph.STATS["captures"] - captures[0],
                                "capture_s": round(graph.STATS["capture_s"] - captures[1], 3),
                                "allocator": allocator_delta(state["allocator"], allocator_counts(bench.scale.device)),
                                "ranges": summarize(state["prof"], shapes=shapes)}
            if stacks:
                state["profile"]["idle_by_host"] = idle_by_host(state["prof"])

    cache = bench.workdir / f"cache-profile-{method}"
    release(bench.adapter)
    graph.reset_stats()
    Runner._run_pass, Runner._pre_edit_ahead = run_pass, pre_edit_ahead  # type: ignore[method-assign]
    ahead, run_module.PRE_EDIT_AHEAD = run_module.PRE_EDIT_AHEAD, 0
    try:
        result, runner = runner_pass(bench, method, edits, 0, cache, bench.workdir / f"profile-{method}.jsonl",
                                     None if bench.scale.device == "cuda" else 4)
    finally:
        Runner._run_pass, Runner._pre_edit_ahead = original, original_ahead  # type: ignore[method-assign]
        run_module.PRE_EDIT_AHEAD = ahead
        window.close()
    units = len(runner.stats.per_unit)
    return {"method": method, "engine": runner.generation.engine, "edits": units,
            "s_per_edit": round(runner.stats.total_s / max(units, 1), 4),
            "passes": [p["edits"] for p in runner.sizer.history],
            "peak_gib_per_pass": [round((p["peak_bytes"] or 0) / 2**30, 2) for p in runner.sizer.history],
            "split_s_per_edit": result.info.get("per_edit_split_s_incl_warmup"),
            "audio_encoder_calls_per_edit": result.info.get("audio_encoder_calls_per_edit"),
            "graph": {k: round(v, 3) if isinstance(v, float) else v for k, v in graph.STATS.items()},
            "profile": state.get("profile"),
            "sync_sites": sorted(sync_sites.items(), key=lambda kv: -kv[1])[:25] if sync_sites is not None else None}


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["## One pass, phase by phase (written by `bench/pass_profile.py`)", ""]
    for row in rows:
        lines += [f"### `{row['method']}` ({row['engine']} engine): {row['s_per_edit']} s/edit over {row['edits']} "
                  f"edits, passes {row['passes']}, peak GiB per pass {row['peak_gib_per_pass']}", "",
                  f"- run split per edit: {row['split_s_per_edit']}; audio encoder calls per edit "
                  f"{row['audio_encoder_calls_per_edit']}; graph engine: {row['graph']}"]
        if row.get("sync_sites") is not None:
            lines += ["", "| host syncs | where (innermost project frames) |", "|---|---|"]
            lines += [f"| {n} | `{site}` |" for site, n in row["sync_sites"]]
        prof = row.get("profile")
        if not prof:
            lines += ["- (no pass profiled)", ""]
            continue
        if prof.get("python"):
            lines += [f"- pass under cProfile: {prof['edits']} edits, {prof['wall_s']} s", ""]
            for part, what in (("self", "own time"), ("library", "time with callees, the library's functions")):
                lines += ["", f"| function ({what}) | calls | s |", "|---|---|---|"]
                lines += [f"| `{n}` | {calls} | {sec} |" for n, calls, sec in prof["python"][part]]
            lines.append("")
            continue
        lines += [f"- profiled pass: {prof['edits']} edits, {prof['wall_s']} s, captures {prof['captures']} "
                  f"({prof['capture_s']} s); allocator counters over the pass: {prof.get('allocator') or '-'}", "",
                  "| range | count | wall s | GPU busy s | busy % | launches | graph replays | syncs "
                  "| cudaMalloc/Free (s) | top kernels (ms) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        kernels = prof["ranges"].get("_kernels", {})
        for name, r in prof["ranges"].items():
            if name == "_kernels":
                continue
            busy = 100 * r["gpu_busy_s"] / r["wall_s"] if r["wall_s"] else 0
            top = "; ".join(f"{n} {ms}" for n, ms in r["top_kernels"][:5])
            lines.append(f"| {name} | {r['count']} | {r['wall_s']} | {r['gpu_busy_s']} | {busy:.0f} | "
                         f"{r['kernel_launches']} | {r['graph_launches']} | {r['syncs']} | "
                         f"{r.get('alloc_calls', 0)} ({r.get('alloc_s', 0.0)}) | {top} |")
        if kernels:
            lines += ["", f"- kernel time by kind (ms, whole pass): {kernels['by_kind_ms']}", "",
                      "| kernel | ms | calls |", "|---|---|---|"]
            lines += [f"| `{n}` | {ms} | {calls} |" for n, ms, calls in kernels["top"]]
            if kernels.get("ops"):
                lines += ["", "| operator (its own kernels) | ms | calls |", "|---|---|---|"]
                lines += [f"| `{n}` | {ms} | {calls} |" for n, ms, calls in kernels["ops"]]
            if kernels.get("ops_by_shape"):
                lines += ["", "| operator | input shapes | ms | calls |", "|---|---|---|---|"]
                lines += [f"| `{n}` | `{sh}` | {ms} | {calls} |" for n, sh, ms, calls in kernels["ops_by_shape"]]
        for name, idle in (prof.get("idle_by_host") or {}).items():
            lines += ["", f"GPU idle in `{name}`: {idle['idle_s']} s, by what the host ran meanwhile (under the Python "
                      "tracer):", "", "| host event <- library frames | ms |", "|---|---|"]
            lines += [f"| `{k}` | {ms} |" for k, ms in idle["top"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pass_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="ft_audio,ie_ike")
    p.add_argument("--edits", type=int, default=32)
    p.add_argument("--pass", dest="profile_pass", type=int, default=3, help="which pass to profile (1-based)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode with the tiny model")
    p.add_argument("--syncs", action="store_true",
                   help="count the pass's host-device syncs by call site instead of profiling it (CUDA)")
    p.add_argument("--stacks", action="store_true",
                   help="profile with Python stacks and attribute each range's GPU idle time to the host's work")
    p.add_argument("--shapes", action="store_true",
                   help="record input shapes too: the operators whose kernels took longest, by input shape")
    p.add_argument("--python", action="store_true",
                   help="run the pass under cProfile instead: the host's heaviest Python functions")
    p.add_argument("--model", default="qwen2_audio", choices=("qwen2_audio", "desta25"),
                   help="the model family at full size (default: Qwen2-Audio-7B)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="generation bound, EOS disabled (default: %(default)s, bench.goals' protocol)")
    add_pre_edit_items(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = []
    with synthetic_bench(tiny=args.tiny, seed=args.seed, model=args.model, units=args.edits + 1,
                         max_new_tokens=args.max_new_tokens, prefix="sake-profile-") as bench:
        bench.pre_edit_items = args.pre_edit_items
        for method in [m for m in args.methods.split(",") if m]:
            row = profiled_run(bench, method, args.edits, args.profile_pass, {} if args.syncs else None,
                               stacks=args.stacks, python=args.python, shapes=args.shapes)
            # what `bench.goals --combine --pass-profiles` needs to put the pass's busy shares beside a card's table
            rows.append({**row, "model": args.model, "device": device_name(bench.scale),
                         "measured": time.strftime("%m-%d %H:%M", time.gmtime()),
                         "command": " ".join(["python -m bench.pass_profile", *(sys.argv[1:] if argv is None
                                                                                  else argv)])})
            text = render(rows)
            if args.out:
                atomic_write(args.out, text)
            if args.json:
                atomic_write(args.json, json.dumps(rows, indent=1, default=str) + "\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
