"""The two arms of the bench: ours (the runner's own single-editing path, one edit or K edits per pass) and the naive loop, their shared instrumentation, the identical-row shares, the profile of one edit and the static-decode what-if."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from bench import identity

from bench.models import Scale, _sync, generation_owner
from bench.paper import MODEL_NAMES
from bench.report import _fmt
from bench.synthetic import ATTRIBUTES, SAMPLE_RATE, SyntheticDataset

LOG = logging.getLogger(__name__)


def forget_audio(adapter: Any, transcripts: bool = True) -> None:
    """Drop the adapter's cached encoder states and, with ``transcripts``, DeSTA2.5's in-memory Whisper
    transcripts (the bench starts every arm without them; its naive DeSTA loop recomputes them per question)."""
    adapter.clear_audio_cache()
    if transcripts and isinstance(getattr(adapter, "_transcripts", None), dict):
        adapter._transcripts.clear()


class GenerateCounter:
    """Counts ``model.generate`` calls, rows and new tokens (wraps the bound method; no device sync)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original = model.generate
        model.generate = self
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.sequences = 0
        self.new_tokens: set[int] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.original(*args, **kwargs)
        prompt = kwargs.get("input_ids")
        new = out.shape[1] - (prompt.shape[1] if prompt is not None else 0)
        self.calls += 1
        self.sequences += int(out.shape[0])
        self.new_tokens.add(int(new))
        return out

    def summary(self, edits: int) -> dict[str, Any]:
        return {"generate_calls_per_edit": round(self.calls / max(edits, 1), 2),
                "sequences_per_edit": round(self.sequences / max(edits, 1), 2),
                "new_tokens": sorted(self.new_tokens)}


#: The CUDA caching allocator's counters a run reports (``torch.cuda.memory_stats``): retries are allocations that
#: found no cached block and no free device memory, so the allocator freed every cached block (a device sync) and
#: tried again; device allocations and frees are ``cudaMalloc`` / ``cudaFree`` calls (host time, no kernel).
ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")


def allocator_counts(device: str) -> dict[str, int]:
    """The allocator's counters now (:data:`ALLOCATOR_COUNTERS`); empty off CUDA."""
    if device != "cuda" or not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {name: int(stats.get(name, 0)) for name in ALLOCATOR_COUNTERS}


def allocator_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What the counters of :func:`allocator_counts` grew by between two readings."""
    return {name: after[name] - before.get(name, 0) for name in after}



def add_pre_edit_items(parser: Any) -> None:
    """The bench's ``--pre-edit-items`` option (the runs' ``RunConfig.pre_edit_items``)."""
    parser.add_argument("--pre-edit-items", choices=("locality", "all"), default="locality",
                        help="items whose unedited output the runs generate: locality (the library's default: "
                             "the items whose score reads it) or all (every item, as the runs before 2026-12-05 "
                             "did)")

@dataclasses.dataclass
class ArmResult:
    """Per-edit wall-clock seconds of the timed edits of one arm, its peak GPU memory and counters."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def per_edit(self) -> float | None:
        return float(np.mean(self.seconds)) if self.seconds else None


@dataclasses.dataclass
class Bench:
    """What both arms share in one process."""

    scale: Scale
    adapter: Any
    dataset: SyntheticDataset
    counter: GenerateCounter
    max_new_tokens: int
    seed: int
    workdir: Path
    model: str = "qwen2_audio"  # the --model choice: qwen2_audio or desta25
    extra: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # method -> more KEY=VALUE overrides
    pre_edit_items: str = "locality"  # the runs' RunConfig.pre_edit_items (--pre-edit-items)

    @property
    def model_name(self) -> str:
        return MODEL_NAMES[self.model][self.scale.name]

    def overrides(self, method: str) -> list[str]:
        """The scale's KEY=VALUE overrides that ``method``'s hparams file defines (both arms get them)."""
        from editors.registry import hparams_keys

        known = hparams_keys(method, self.adapter.family)
        return [o for o in self.scale.hparam_overrides if o.split("=", 1)[0] in known] + self.extra.get(method, [])

    def hparams(self, method: str) -> Any:
        """The typed hyperparameters of ``method`` with the scale's overrides."""
        from editors.registry import load_hparams

        return load_hparams(method, self.adapter.family, tiny=self.adapter.is_tiny, overrides=self.overrides(method))

    def editor(self, method: str) -> Any:
        """A fresh editor of ``method`` (the runner's registry), with this dataset's rows for IE-IKE."""
        from editors.base import RunContext
        from editors.registry import get_editor_class

        context = RunContext(seed=self.seed, cache_dir=str(self.workdir / "naive-cache"),
                             load_rows=lambda config, split: self.dataset.load(str(self.dataset.root), config, split),
                             model_name=self.model_name)
        editor = get_editor_class(method)(self.adapter, self.hparams(method), context)
        editor.setup()
        return editor

    def start_arm(self, keep_transcripts: bool = False) -> None:
        """Same starting state for every arm: no cached audio states (nor DeSTA2.5 transcripts, unless
        ``keep_transcripts``), empty allocator cache, peak reset."""
        forget_audio(self.adapter, transcripts=not keep_transcripts)
        self.counter.reset()
        if self.scale.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.scale.device == "cuda" else None


def plan_units(edits: int, warmup: int) -> tuple[list[str], int]:
    """Configs and per-config limit so the runner's plan has at least ``warmup + edits`` units."""
    total = warmup + edits
    limit = math.ceil(total / len(ATTRIBUTES))
    return list(ATTRIBUTES[: math.ceil(total / limit)]), limit


@contextlib.contextmanager
def synthetic_bench(*, tiny: bool, seed: int, model: str, units: int, max_new_tokens: int, prefix: str
                    ) -> Iterator[Bench]:
    """A :class:`Bench` over a synthetic dataset of at least ``units`` instances in a temporary folder (the tiny
    model on the CPU with ``tiny``, else the full-size ``model``); the folder goes on leaving."""
    import tempfile

    from bench.models import build_adapter, full_scale, tiny_scale

    scale = tiny_scale() if tiny else full_scale()
    adapter = build_adapter(scale, seed, model)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        _, limit = plan_units(units, 0)
        dataset = SyntheticDataset.make(workdir / "dataset", limit + 1, 3, seed, scale.audio_seconds)
        yield Bench(scale=scale, adapter=adapter, dataset=dataset, counter=GenerateCounter(adapter.model),
                    max_new_tokens=max_new_tokens, seed=seed, workdir=workdir, model=model)


def runner_pass(bench: Bench, method: str, edits: int, warmup: int, cache: Path, out: Path,
                edits_per_pass: int | None = None, keep_transcripts: bool = False,
                engine: str = "auto", mode: str = "single") -> tuple[ArmResult, Any]:
    """One ``Runner(config, adapter, rows_loader).run()`` in single mode over the synthetic dataset (predictions
    to ``out``, pre-edit cache under ``cache``, rows served from memory); per-edit seconds are the runner's own
    per-unit wall-clock (row fetch -> predictions appended), the first ``warmup`` units untimed.
    ``keep_transcripts``: DeSTA2.5's transcripts of an earlier pass stay (as its on-disk transcript cache would
    give a later run). Returns the result and the runner."""
    from editors.hparams import parse_overrides
    from editors.run import Runner
    from editors.config import RunConfig

    configs, limit = plan_units(edits, warmup) if mode == "single" else (["sequential"], 1)
    out.unlink(missing_ok=True)  # a leftover file would make the runner resume (skip units)
    config = RunConfig(model=bench.model_name, method=method, dataset=str(bench.dataset.root), out=str(out),
                       configs=tuple(configs), split="test", mode=mode, limit=limit,
                       max_new_tokens=bench.max_new_tokens, cache_dir=str(cache), seed=bench.seed,
                       hparams=parse_overrides(bench.overrides(method)), edits_per_pass=edits_per_pass,
                       engine=engine, pre_edit_items=bench.pre_edit_items, progress=False)
    result = ArmResult()
    runner = Runner(config, adapter=bench.adapter, rows_loader=bench.dataset.load)
    bench.start_arm(keep_transcripts)
    encoder_before = bench.adapter.audio_encoder_calls
    allocator_before = allocator_counts(bench.scale.device)
    runner.run()
    _sync(bench.scale.device)
    allocator = allocator_delta(allocator_before, allocator_counts(bench.scale.device))
    result.peak_bytes = bench.peak()
    units = runner.stats.per_unit
    result.seconds = [float(u["seconds"]) for u in units[warmup: warmup + edits]]
    n = max(len(units), 1)
    s = runner.stats
    with open(out, encoding="utf-8") as handle:
        prediction_rows = sum(1 for line in handle if '"kind": "prediction"' in line)
    result.info = {
        "timed_edits": len(result.seconds),
        "units_run": len(units),
        "steps": sorted({u.get("steps") for u in units if u.get("steps") is not None}),
        "mean_steps": float(np.mean([u["steps"] for u in units if u.get("steps") is not None] or [0])),
        "per_edit_split_s_incl_warmup": {"pre_edit": round(s.preedit_s / n, 4), "apply": round(s.apply_s / n, 4),
                             "evaluate": round(s.eval_s / n, 4),
                             "other": round((sum(float(u["seconds"]) for u in units) - s.preedit_s - s.apply_s
                                             - s.eval_s) / n, 4)},
        "audio_encoder_calls_per_edit": round((bench.adapter.audio_encoder_calls - encoder_before) / n, 2),
        "prediction_rows": prediction_rows,
        "preedit_cache_hits": runner.preedit.hits,
        "allocator": allocator,
        **bench.counter.summary(len(units)),
    }
    return result, runner


def run_ours(bench: Bench, method: str, edits: int, warmup: int, profile: bool) -> tuple[ArmResult, ArmResult]:
    """The runner twice over the same instances: with a fresh pre-edit cache (cold: pays the unedited outputs,
    as a first method on a model does) and again with that cache filled (warm: every later method on the same
    model; DeSTA2.5's transcripts of the cold pass kept, as its transcript cache on disk keeps them). With
    ``profile``, one more instance's phases run under the profiler (``profile_unit``)."""
    cache = bench.workdir / f"cache-{method}"
    shutil.rmtree(cache, ignore_errors=True)
    one = 1  # one edit at a time (the runner's CUDA default batches; see run_batched)
    cold, _ = runner_pass(bench, method, edits, warmup, cache, bench.workdir / f"ours-{method}.jsonl", one)
    LOG.info("ours/%s cold cache: %s s/edit", method, _fmt(cold.per_edit, ".3f"))
    warm, runner = runner_pass(bench, method, edits, warmup, cache, bench.workdir / f"ours-warm-{method}.jsonl",
                               one, keep_transcripts=True)
    LOG.info("ours/%s warm cache: %s s/edit", method, _fmt(warm.per_edit, ".3f"))
    if profile and bench.scale.device == "cuda":
        configs, limit = plan_units(edits, warmup)
        extra = bench.dataset.rows[(configs[0], "test")][limit]  # an instance no pass has seen
        cold.info["profile"] = profile_unit(bench, runner, extra)
    return cold, warm


def batched_plan(edits: int, k: int) -> tuple[int, int]:
    """(warm-up, timed edits) of a ``--edits-per-pass k`` arm: one untimed pass, then whole passes covering at
    least ``edits`` edits."""
    return k, k * math.ceil(max(edits, k) / k)


def run_batched(bench: Bench, method: str, edits: int, k: int, mode: str = "auto") -> dict[str, Any]:
    """The runner with ``--edits-per-pass k`` and a fresh pre-edit cache (cold, as the ``ours`` column): one
    untimed pass, then whole timed passes (a unit's seconds = its pass's wall-clock / k). ``mode``: the decode
    engine (``RunConfig.engine``: auto, eager or graph; ``editors.models.generation``)."""
    warmup, timed = batched_plan(edits, k)
    tag = "" if mode == "auto" else f"-{mode}"
    cache = bench.workdir / f"cache-{method}-k{k}{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        result, runner = runner_pass(bench, method, timed, warmup, cache,
                                     bench.workdir / f"ours-{method}-k{k}{tag}.jsonl", k, engine=mode)
        used = runner.edits_per_pass
    except Exception as error:  # noqa: BLE001 - e.g. out of memory at a large K: record it, go on
        LOG.warning("%s, %d edits per pass: %s", method, k, error)
        if bench.scale.device == "cuda":
            torch.cuda.empty_cache()
        return {"k": k, "error": f"{type(error).__name__}: {str(error)[:160]}"}
    LOG.info("ours/%s, %d edits per pass: %s s/edit", method, k, _fmt(result.per_edit, ".3f"))
    return {"k": k, "k_used": used, "s_per_edit": result.per_edit, "timed_edits": len(result.seconds),
            "peak_gib": result.peak_bytes / 2**30 if result.peak_bytes else None, "info": result.info}


def identical_shares(bench: Bench, method: str, args: argparse.Namespace, batched: list[dict[str, Any]],
                     ours: ArmResult) -> dict[str, Any]:
    """Shares of identical rows (issue 18): cold vs warm pre-edit cache (the ``ours`` arm), K=1 vs each larger K
    (the items both passes ran), and with ``--compare-decoding`` the run's engine vs the eager engine at each K
    (the eager pass is timed too)."""
    work = bench.workdir
    out: dict[str, Any] = {}
    if ours.seconds:
        out["cold_vs_warm"] = identity.identical_share(work / f"ours-{method}.jsonl", work / f"ours-warm-{method}.jsonl")
    ok = [b for b in batched if b.get("s_per_edit") is not None]
    one = next((b for b in ok if b["k"] == 1), None)
    for b in ok:
        if one is not None and b["k"] > 1:
            out[f"k1_vs_k{b['k']}"] = identity.identical_share(work / f"ours-{method}-k1.jsonl",
                                                               work / f"ours-{method}-k{b['k']}.jsonl")
        if args.compare_decoding:
            legacy = run_batched(bench, method, args.edits, b["k"], mode="eager")
            b["legacy_s_per_edit"] = legacy.get("s_per_edit")
            if legacy.get("s_per_edit") is not None:
                out[f"fast_vs_legacy_k{b['k']}"] = identity.identical_share(
                    work / f"ours-{method}-k{b['k']}.jsonl", work / f"ours-{method}-k{b['k']}-eager.jsonl")
    LOG.info("%s identical rows: %s", method, out)
    return out


def profile_unit(bench: Bench, runner: Any, row: dict[str, Any]) -> dict[str, Any]:
    """The runner's four steps of one single edit (``pre_edit_outputs``, the edit session's ``apply``,
    ``evaluate``, the session's ``restore``, as ``Runner._run_unit`` runs them) each under ``torch.profiler``:
    wall-clock, GPU busy time (sum of kernel and copy times), kernel launches, host synchronisations, device-to-host
    copies, top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from editors.base import EditRequest
    from editors.data import eval_items

    edit = EditRequest.from_row(row)
    items = eval_items(row)
    phases: dict[str, Any] = {}

    def measure(name: str, fn: Callable[[], Any]) -> None:
        _sync(bench.scale.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            fn()
            _sync(bench.scale.device)
            wall = time.perf_counter() - started
        events = prof.key_averages()

        def device_us(e: Any) -> float:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

        gpu = [e for e in events if e.device_type == DeviceType.CUDA]
        count = lambda pred: int(sum(e.count for e in events if pred(e.key)))  # noqa: E731
        phases[name] = {
            "wall_s": round(wall, 4),
            "gpu_busy_s": round(sum(device_us(e) for e in gpu) / 1e6, 4),
            "kernel_launches": count(lambda k: "LaunchKernel" in k),
            "graph_launches": count(lambda k: "GraphLaunch" in k),  # captured decode steps (CUDA graphs)
            "host_syncs": count(lambda k: k in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                "cudaEventSynchronize")),
            "d2h_copies": count(lambda k: "DtoH" in k or "Device -> Pageable" in k),
            "top_kernels": [[e.key[:60], round(device_us(e) / 1e3, 1)]
                            for e in sorted(gpu, key=device_us, reverse=True)[:3]],
        }

    measure("pre_edit", lambda: runner.pre_edit_outputs(items))
    measure("apply", lambda: runner.session.apply(edit, seed=runner.seed(10_000)))
    measure("evaluate", lambda: runner.evaluate(edit, items))
    measure("restore", runner.session.restore)
    for name, values in phases.items():
        LOG.info("profile %s/%s: %s", runner.config.method, name, values)
    return phases


def processor_inputs(bench: Bench, prompt: Any, target: str | None = None) -> dict[str, Any]:
    """Model inputs for one prompt through the HF processor (audio features for the encoder, no cache); with
    ``target``, its token ids (as the adapter scores them) appended and labelled."""
    adapter = bench.adapter
    kwargs: dict[str, Any] = {"text": [adapter.render(prompt)], "return_tensors": "pt"}
    audios = prompt.audios()
    if audios:
        kwargs["audio"] = audios
        kwargs["sampling_rate"] = SAMPLE_RATE
    encoded = adapter.processor(**kwargs)
    inputs = {k: v for k, v in encoded.items() if torch.is_tensor(v)}
    if target is not None:
        target_ids = torch.tensor([adapter.target_token_ids(target)], dtype=torch.long)
        prompt_len = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], target_ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, prompt_len:] = target_ids
        inputs["labels"] = labels
    return {k: v.to(bench.scale.device) for k, v in inputs.items()}


def naive_generate_each(bench: Bench, prompts: Sequence[Any]) -> list[Any]:
    """One ``generate`` per prompt, the audio encoder inside each prefill; returns the new token ids (DeSTA2.5:
    the decoded answers)."""
    adapter = bench.adapter
    outputs = []
    if bench.model == "desta25":  # no HF processor: the adapter on one question, every audio cache dropped first
        for prompt in prompts:
            forget_audio(adapter)
            outputs.append(adapter.generate([prompt], max_new_tokens=bench.max_new_tokens))
        return outputs
    with torch.no_grad():
        for prompt in prompts:
            inputs = processor_inputs(bench, prompt)
            generated = adapter.model.generate(**inputs, max_new_tokens=bench.max_new_tokens, do_sample=False,
                                               num_beams=1, eos_token_id=adapter.stop_token_ids,
                                               pad_token_id=adapter.pad_token_id)
            outputs.append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    return outputs


def naive_finetune(bench: Bench, params: dict[str, torch.nn.Parameter], edit: Any, hp: Any) -> int:
    """Adam on ``params`` (in their dtype) for at most ``max_steps`` updates; every step runs the whole model
    from the audio features (encoder recomputed) with HF's full-sequence loss and checks early stop on the host."""
    adapter = bench.adapter
    if bench.model == "desta25":
        def loss_of_step() -> torch.Tensor:  # taps recomputed (transcript kept), the LLM's full-sequence HF loss
            forget_audio(adapter, transcripts=False)
            batch = adapter.prepare([edit.prompt()], [edit.target])
            return generation_owner(adapter)(inputs_embeds=adapter.input_embeds(batch),
                                             attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                                             labels=batch.labels, use_cache=False).loss
    else:
        inputs = processor_inputs(bench, edit.prompt(), target=edit.target)

        def loss_of_step() -> torch.Tensor:
            return adapter.model(**inputs).loss
    plist = list(params.values())
    for p in plist:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(plist, lr=hp.lr)
    threshold = hp.early_stop_loss
    steps = 0
    try:
        for _ in range(hp.max_steps):
            loss = loss_of_step()
            if threshold is not None and loss.item() < float(threshold):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    finally:
        for p in plist:
            p.requires_grad_(False)
            p.grad = None
    return steps


def naive_edit(bench: Bench, editor: Any, row: dict[str, Any], phases: dict[str, float]) -> int:
    """One edit the naive way (seconds of each phase added to ``phases``); returns the training steps made."""
    from editors.base import EditRequest
    from editors.data import eval_items

    from sake_core.protocol import needs_pre_edit

    clock = _PhaseClock(bench.scale.device, phases)
    edit = EditRequest.from_row(row)
    items = eval_items(row)
    prompts = [it.prompt() for it in items]
    with clock("pre_edit"):  # pre-edit outputs of the items the runner's setting covers, no cache
        naive_generate_each(bench, [p for it, p in zip(items, prompts)
                                    if needs_pre_edit(it.dimension, bench.pre_edit_items)])
    steps = 0
    names = set(editor.touched_parameters())
    params = {n: p for n, p in bench.adapter.model.named_parameters() if n in names}
    with clock("apply"):
        saved = copy.deepcopy({n: p.detach() for n, p in params.items()})
        if editor.name in NAIVE_FINETUNE:
            steps = naive_finetune(bench, params, edit, editor.hparams)
        else:  # other methods: their own apply inside the naive loop
            stats = editor.apply(edit) or {}
            steps = int(stats.get("steps") or 0)
    with clock("evaluate"):
        naive_generate_each(bench, editor.rewrite_prompts(prompts, edit))
    with clock("restore"):
        if saved:
            bench.adapter.model.load_state_dict(saved, strict=False)
        editor.reset()
    return steps


class _PhaseClock:
    """``with clock("name"):`` adds the block's wall-clock (device synced at both ends) to ``totals[name]``."""

    def __init__(self, device: str, totals: dict[str, float]) -> None:
        self.device, self.totals = device, totals

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started


def naive_global_warmup(bench: Bench) -> None:
    """Run the naive code paths once, untimed (first-call costs: processor, generate with audio features, the HF
    loss and its backward), then restore: one generation and one FT-Audio step on the first test instance."""
    from editors.base import EditRequest

    row = bench.dataset.rows[(ATTRIBUTES[0], "test")][0]
    edit = EditRequest.from_row(row)
    naive_generate_each(bench, [edit.prompt()])
    editor = bench.editor("ft_audio")
    names = set(editor.touched_parameters())
    params = {n: p for n, p in bench.adapter.model.named_parameters() if n in names}
    saved = copy.deepcopy({n: p.detach() for n, p in params.items()})
    naive_finetune(bench, params, edit, editor.hparams.replace(max_steps=1))
    bench.adapter.model.load_state_dict(saved, strict=False)
    _sync(bench.scale.device)


#: Methods whose naive arm re-implements the edit the naive way (whole model per step, encoder recomputed);
#: every other method runs its own ``apply`` inside the naive loop (per-question generation, deep-copy restore,
#: no pre-edit cache), so its naive/ours ratio counts only what the runner's loop saves.
NAIVE_FINETUNE = ("ft_audio", "ft_llm")


def run_naive(bench: Bench, method: str, rows: Sequence[dict[str, Any]], warmup: int) -> ArmResult:
    """Time the naive loop over ``rows`` (the first of the runner's units, same order), first ``warmup`` untimed."""
    result = ArmResult()
    editor = bench.editor(method)
    bench.start_arm()
    steps, phases = set(), {}
    for index, row in enumerate(rows):
        _sync(bench.scale.device)
        started = time.perf_counter()
        timed_phases: dict[str, float] = {}
        steps.add(naive_edit(bench, editor, row, timed_phases))
        _sync(bench.scale.device)
        elapsed = time.perf_counter() - started
        LOG.info("naive/%s %s: %.3f s%s", method, row["id"], elapsed, " (warm-up)" if index < warmup else "")
        if index >= warmup:
            result.seconds.append(elapsed)
            for name, value in timed_phases.items():
                phases[name] = phases.get(name, 0.0) + value
    result.peak_bytes = bench.peak()
    n = max(len(result.seconds), 1)
    result.info = {"timed_edits": len(result.seconds), "steps": sorted(steps),
                   "per_edit_split_s": {k: round(v / n, 4) for k, v in phases.items()},
                   **bench.counter.summary(len(rows))}
    return result


def whatif_static_decode(bench: Bench, row: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """Time one instance's 10 evaluation prompts through ``adapter.generate`` (the runner's path) and through
    HF ``generate`` with ``cache_implementation="static"`` (decode step compiled, CUDA graphs) on a Qwen2 causal-LM
    view sharing the same LLM weights and the same ``inputs_embeds``. Measures headroom; changes nothing."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    from editors.data import eval_items

    adapter = bench.adapter
    prompts = [it.prompt() for it in eval_items(row)]
    out: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": bench.max_new_tokens}

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        _sync(bench.scale.device)
        started = time.perf_counter()
        value = fn()
        _sync(bench.scale.device)
        return time.perf_counter() - started, value

    reference = adapter.generate(prompts, max_new_tokens=bench.max_new_tokens)  # warm; audio states now cached
    base = [timed(lambda: adapter.generate(prompts, max_new_tokens=bench.max_new_tokens))[0] for _ in range(repeats)]
    out["adapter_generate_s"] = round(float(np.median(base)), 4)
    batch = adapter.prepare(prompts)
    with torch.no_grad():
        embeds = adapter.input_embeds(batch)
    with torch.device("meta"):
        view = Qwen2ForCausalLM(adapter.language_model().config)
    view.model, view.lm_head = adapter.language_model(), adapter.lm_head()
    view.eval()
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=bench.max_new_tokens,
                              pad_token_id=adapter.pad_token_id, eos_token_id=adapter.stop_token_ids,
                              cache_implementation="static")

    def static_generate() -> Any:
        with torch.no_grad():
            return view.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, generation_config=config)

    try:
        first, ids = timed(static_generate)  # compiles the decode step
        texts = [t.strip() for t in adapter.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        out["same_output_fraction"] = round(sum(a == b for a, b in zip(texts, reference)) / len(prompts), 2)
        runs = [timed(static_generate)[0] for _ in range(repeats)]
        out["static_compiled_first_call_s"] = round(first, 2)
        out["static_compiled_generate_s"] = round(float(np.median(runs)), 4)
        out["speedup"] = round(out["adapter_generate_s"] / out["static_compiled_generate_s"], 2)
    except Exception as error:  # noqa: BLE001 - a what-if must not sink the benchmark
        out["static_compiled_error"] = repr(error)[:300]
    LOG.info("what-if static decode: %s", out)
    return out
