"""Run an editing method on SAKE and write predictions JSONL (ARCHITECTURE.md "Prediction rows").

    python -m editors.run --model tiny-qwen2-audio --method ft_audio --dataset /tmp/sake_demo \\
        --config emotion --split test --mode single --out runs/ --limit 4
    python -m editors.run --model Qwen/Qwen2-Audio-7B-Instruct --method ft_llm --dataset sake/sake \\
        --mode sequential --out runs/

Single mode: for each instance, apply the edit, evaluate the reliability item and all linked items in one batched
generation, then restore exactly the parameters the method touched. Sequential mode (§4.2): per sequence, apply
edits 1..T without restoring; after step t evaluate every edit s <= ``--eval-edits`` (5) with gap t - s <=
``--max-gap`` (5); restore after the sequence.

Pre-edit outputs are computed once per model and item and cached on disk (``--cache-dir``). A rerun with the same
arguments resumes: finished units (instances / sequence steps) are skipped and a unit cut short by a kill is
redone. Sequential resume replays the sequence's earlier edits (deterministic) without re-evaluating them.

Several processes (``torchrun --nproc-per-node N -m editors.run ...`` or ``accelerate launch --multi_gpu
--num_processes N -m editors.run ...``) share the instances (single) or sequences (sequential), one model replica
per process, and merge their part files into the same predictions file a one-process run writes (editors/shard.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch
from tqdm import tqdm

from editors.base import EditRequest, Editor, RunContext
from editors.registry import available_methods, get_editor_class, load_hparams, method_info
from editors.memory import (DeviceMemory, PassPeaks, PassSizer, drop_frames, gib, is_out_of_memory, raised_at,
                            requested_bytes)
from editors.data import EvalItem, dataset_fingerprint, eval_items
from editors.hparams import parse_overrides
from editors.models import TINY_MODELS, family_of, load_adapter
from editors.models.base import GeneratedText, GenerationSettings, LALMAdapter, Prompt
from editors.models.generation import release as release_generation
from editors.models.generation import token_budget
from editors.predictions import PredictionsFile, dumps
from editors.preedit_cache import PreEditCache
from editors.plan import RowsLoader, RunPlan, Unit
from editors.session import EditSession
from editors.shard import Shard, barrier, done_elsewhere, part_files
from sake_core.atomic import atomic_write
from sake_core.cache import cache_root
from editors.config import RunConfig
from sake_core.protocol import (MODES, PRE_EDIT_ITEMS, RUN_HEADER_FIELDS, SEQUENTIAL_EVAL_EDITS, SEQUENTIAL_MAX_GAP,
                                needs_pre_edit)
from sake_core.errors import DataError, ResourceError, user_errors
from sake_core.command import command_prog

logger = logging.getLogger("editors.run")

#: What a generation returns (the outputs of some prompts, or of each edit's prompts)
Outputs = TypeVar("Outputs")

#: Fewest padded tokens per generation chunk the out-of-memory back-off goes down to (about one long prompt).
MIN_GENERATION_TOKENS = 4096
#: Single editing generates the pre-edit outputs of at least this many edits ahead (or of the next pass, if larger) in
#: one generation, between passes while the model is unedited (a row does not depend on its batch,
#: editors/models/buckets.py; the pre-edit cache keeps them).
PRE_EDIT_AHEAD = 32
#: The ``.timing.json`` is rewritten at most this often while a run works (and at its end), so a killed run keeps
#: what it timed and its resumed run adds to it.
TIMING_EVERY_S = 30.0


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("python -m editors.run"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="Hub id (Qwen/Qwen2-Audio-7B-Instruct, nvidia/audio-flamingo-3-hf), a local model "
                        f"directory, or {' / '.join(sorted(TINY_MODELS))} (random-init, for tests)")
    p.add_argument("--method", required=True, help=f"editing method: {', '.join(available_methods())}")
    p.add_argument("--dataset", required=True, help="SAKE dataset: local directory (build_splits.py) or Hub id")
    p.add_argument("--config", action="append", default=None,
                   help="dataset config, repeatable (single: animal/emotion/gender/language, default all four; "
                        "sequential: sequential)")
    p.add_argument("--split", default="test", help="dataset split to edit and evaluate (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, default="single")
    p.add_argument("--out", required=True,
                   help="output directory (file named MODEL__METHOD__MODE__SPLIT.jsonl, with __CONFIG+CONFIG before "
                        ".jsonl for a run of some attributes) or a .jsonl path")
    p.add_argument("--limit", type=int, default=None,
                   help="first N instances per config (single) or first N sequences (sequential)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (and of tiny models' init)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length (default: the model family's, in "
                        "editors/models/generation/defaults.yaml; written to the run header)")
    p.add_argument("--engine", choices=("auto", "eager", "graph"), default="auto",
                   help="decode engine: eager (Hugging Face generate) or graph (static KV cache, decode step "
                        "captured as a CUDA graph per shape bucket); auto: graph on CUDA where the method allows "
                        "it, else eager. Written to the run header (outputs depend on it)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="prompts per generate call (0: all items of an edit in one call)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="cap on padded tokens per generation chunk (rows x (width + new tokens); a shared prefix "
                        "once): bounds the KV cache. Default: on CUDA what fits the memory available at each "
                        "generation (halved on an out-of-memory error), 32768 on CPU; 0: no cap on CPU, the memory "
                        "budget on CUDA")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter of editors/hparams/METHOD.yaml (value parsed as YAML)")
    p.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda / cuda:1 / cpu (default: cuda when available)")
    p.add_argument("--revision", default=None, help="Hub revision of the model")
    p.add_argument("--cache-dir", default=None, help="pre-edit cache root (default $SAKE_CACHE or ~/.cache/sake)")
    p.add_argument("--max-gap", type=int, default=SEQUENTIAL_MAX_GAP,
                   help="sequential: largest gap evaluated (paper: %(default)s; written to the header)")
    p.add_argument("--eval-edits", type=int, default=SEQUENTIAL_EVAL_EDITS,
                   help="sequential: evaluate the first N edits (paper: %(default)s; written to the header)")
    p.add_argument("--edits-per-pass", type=int, default=None, metavar="K",
                   help="single mode: apply K independent edits at once (per-edit parameter copies or prompts) "
                        "and evaluate their items in one batched generation, for methods that batch exactly "
                        "(their editor's batches_edits; others run one at a time). Default on CUDA: sized from the memory the first passes measure (1 edit, "
                        "then as many as its peak allows; at most 32), halved on an out-of-memory error; 1 on CPU")
    p.add_argument("--pre-edit-items", choices=PRE_EDIT_ITEMS, default="locality",
                   help="items whose unedited output is generated: locality (the items whose score compares "
                        "against it, as the paper's protocol; other rows carry pre_edit: null) or all (every "
                        "item, e.g. to see what an edit changed). Written to the run header")
    p.add_argument("--merge-only", action="store_true",
                   help="only merge the part files of a multi-process run into the predictions file (no model "
                        "is loaded); fails when units are missing")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The typed run configuration of parsed command-line arguments (``--hparam`` strings parsed as YAML)."""
    return RunConfig(model=args.model, method=args.method, dataset=args.dataset, out=args.out,
                     configs=tuple(args.config or ()), split=args.split, mode=args.mode, limit=args.limit,
                     seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     max_batch_tokens=args.max_batch_tokens, hparams=parse_overrides(args.hparam or []),
                     dtype=args.dtype, device=args.device, revision=args.revision, cache_dir=args.cache_dir,
                     eval_edits=args.eval_edits, max_gap=args.max_gap,
                     edits_per_pass=getattr(args, "edits_per_pass", None),
                     engine=getattr(args, "engine", "auto"),
                     pre_edit_items=getattr(args, "pre_edit_items", "locality"), progress=not args.no_progress)


@dataclass
class ReadUnit:
    """A single-mode unit read ahead of its pass: its edit, its items, their pre-edit outputs (None where the run
    generates none) and its share of the seconds they took."""

    edit: EditRequest
    items: list[EvalItem]
    pre: list[str | None]
    pre_seconds: float


def split_like(flat: Sequence[Outputs], groups: Sequence[Sequence[Any]]) -> list[list[Outputs]]:
    """``flat`` (one entry per member of ``groups``, in order) cut into one list per group."""
    out, pos = [], 0
    for group in groups:
        out.append(list(flat[pos:pos + len(group)]))
        pos += len(group)
    if pos != len(flat):
        raise ValueError(f"split_like: {len(flat)} entries for {pos} members")
    return out


def output_path(out: str, model: str, method: str, mode: str, split: str) -> Path:
    """Where a run writes its predictions (see :meth:`editors.config.RunConfig.output_path`)."""
    return RunConfig(model=model, method=method, dataset="-", out=out, mode=mode, split=split).output_path()


def versions() -> dict[str, str]:
    import datasets
    import numpy
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "datasets": datasets.__version__, "numpy": numpy.__version__}
    try:
        from importlib.metadata import version

        out["sake-toolkit"] = version("sake-toolkit")
    except Exception:  # noqa: BLE001 - not installed as a package
        pass
    return out


# ----------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunStats:
    units: int = 0
    apply_s: float = 0.0
    eval_s: float = 0.0
    preedit_s: float = 0.0
    total_s: float = 0.0
    per_unit: list[dict[str, Any]] = field(default_factory=list)


def progress_label(method: str, mode: str, model: str) -> str:
    """The runner's progress-bar label: which run it is (``method mode, model``; a local model folder by its
    name)."""
    path = Path(str(model))
    return f"{method} {mode}, {path.name if path.is_dir() else model}"


def writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed; an ``OSError`` naming it when it cannot be written (a read-only file system,
    permissions), which a command reports in one line (``sake_core.errors.user_errors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise OSError(errno.EACCES, "cannot write here (permissions or a read-only file system)", str(folder))


class Runner:
    """Owns the loops, caching, restore, resume and output of one run (see the module docstring)."""

    def __init__(self, config: RunConfig, adapter: LALMAdapter | None = None,
                 rows_loader: RowsLoader | None = None) -> None:
        """``adapter``: an already loaded model to edit. ``rows_loader(dataset, config, split)``: where instance
        rows come from (default :func:`editors.data.load_instances`; e.g. rows held in memory)."""
        self.config = args = config
        family_of(args.model)  # clear error for an unknown model before anything heavy
        get_editor_class(args.method)  # clear error for a method that does not import
        self.shard = Shard.from_env()  # rank / world size of a torchrun or accelerate launch (else 0 of 1)
        self.plan = RunPlan(config, rows_loader, self.shard)  # the units and the output files (no model)
        writable_folder(self.plan.part_path.parent)  # before anything heavy: an output that cannot be written
        self.mode = args.mode
        device = self.shard.device(args.device, torch.cuda.is_available())
        if self.shard.sharded and device.startswith("cuda:"):
            torch.cuda.set_device(device)  # code that says plain "cuda" lands on this rank's GPU too
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        self.adapter = adapter or load_adapter(args.model, dtype=dtype, device=device, seed=args.seed,
                                               revision=args.revision)
        self.hparams = load_hparams(args.method, self.adapter.family, tiny=self.adapter.is_tiny,
                                    overrides=args.hparams)
        # how every generation of the run is made, resolved once from the family's defaults (header, resume
        # check and pre-edit cache key carry it)
        self.generation = self.adapter.generation_settings(
            args.max_new_tokens, engine=args.engine, method_engines=get_editor_class(args.method).generation_engines,
            method=args.method, batch_size=args.batch_size or None,
            max_batch_tokens=args.max_batch_tokens)
        self.config = args = args.replace(max_new_tokens=self.generation.max_new_tokens)
        cache_dir = args.cache_dir or cache_root()
        context = RunContext(seed=args.seed, cache_dir=str(cache_dir),
                             load_rows=self.plan.load_rows, model_name=args.model, generation=self.generation)
        self.session = EditSession.start(self.adapter, args.method, self.hparams, context)
        self.editor: Editor = self.session.editor
        self.preedit = PreEditCache(cache_dir, self.adapter.model_key(), self.generation.output_key())
        self._edits_per_pass(device)
        self.stats = RunStats()

    @property
    def units(self) -> list[Unit]:
        """This process's units (:attr:`RunPlan.units`)."""
        return self.plan.units

    @property
    def path(self) -> Path:
        """The predictions file (:attr:`RunPlan.path`)."""
        return self.plan.path

    @property
    def part_path(self) -> Path:
        """This process's file (:attr:`RunPlan.part_path`: ``path`` with one process)."""
        return self.plan.part_path

    def _edits_per_pass(self, device: str) -> int:
        """The first pass's size: ``--edits-per-pass`` (fixed), else sized from measured memory on CUDA
        (``editors.memory.PassSizer``), else 1; 1 when the method or mode does not batch."""
        k = self.config.edits_per_pass  # >= 1 or None (RunConfig checks)
        self.memory = DeviceMemory(torch.device(device))
        if self.mode != "single" or not self.editor.batches_edits:
            if k and k > 1:
                logger.info("%s: --edits-per-pass %d ignored (%s); one edit at a time", self.config.method, k,
                            "sequential mode" if self.mode != "single" else "the method does not batch")
            k = 1
        self.sizer = PassSizer(k, self.memory)
        if self.sizer.auto:
            logger.info("edits per pass: measured from the first passes (1 edit, then as many as its peak allows)")
        return self.sizer.k

    def header(self) -> dict[str, Any]:
        """The run header: every field of :data:`sake_core.protocol.RUN_HEADER_FIELDS`, in its order."""
        a = self.config
        desc = self.adapter.describe()
        sequential = a.mode == "sequential"
        info = method_info(a.method)
        values = {"kind": "header", "model": a.model, "model_revision": desc["model_revision"] or None,
                  "method": a.method, "method_display_name": info.display_name,
                  "method_display_order": info.display_order,
                  "hparams": self.hparams.as_dict(), "method_state": self.editor.trained_state(),
                  "mode": a.mode, "dataset": a.dataset,
                  "dataset_fingerprint": dataset_fingerprint(a.dataset), "configs": list(a.configs), "split": a.split,
                  "seed": a.seed, "limit": a.limit, "max_new_tokens": a.max_new_tokens,
                  "generation": self.generation.output_key(), "batching": self.generation.batching(),
                  "pre_edit_items": a.pre_edit_items,
                  # rows of the complete run: a reader refuses a file with fewer (cut or unfinished)
                  "expected_rows": sum(u.expected_rows for u in self.plan.all_units),
                  "model_key": desc["model_key"], "dtype": desc["dtype"], "family": desc["family"],
                  "eval_edits": a.eval_edits if sequential else None, "max_gap": a.max_gap if sequential else None,
                  "versions": versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if set(values) != set(RUN_HEADER_FIELDS):  # the protocol lists the fields; this only fills them in
            raise RuntimeError("run header fields differ from RUN_HEADER_FIELDS: "
                               f"{sorted(set(values) ^ set(RUN_HEADER_FIELDS))}")
        return {name: values[name] for name in RUN_HEADER_FIELDS}

    # ---- pieces of a unit ---------------------------------------------------------------------------------------

    def _generate(self, prompts: Sequence[Prompt]) -> list[GeneratedText]:
        return self._generating(lambda settings: self.adapter.generate(prompts, settings=settings))

    def _generating(self, generate: Callable[[GenerationSettings], Outputs]) -> Outputs:
        """``generate(settings)``; on an out-of-memory error: free, halve the generation batch, again (outputs do
        not depend on the batch: editors/models/buckets.py)."""
        while True:
            try:
                return generate(self.generation)
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
                if not is_out_of_memory(error):
                    raise
                failed = drop_frames(error)
            # here the failed call's frames are gone, and with them the tensors they held: the memory is measured
            # as the next try finds it (measured inside the handler, it read the failed call's caches as in use)
            if not self._halve_generation_batch(failed):
                raise failed

    def _halve_generation_batch(self, error: BaseException) -> bool:
        """Free what the run holds and halve the padded tokens per generation chunk (of the budget the memory now
        available allows, where none was set); False at one row a chunk."""
        self._free_generation()
        current = self.generation.max_batch_tokens or token_budget(self.adapter, engine=self.generation.engine) or 0
        if current <= MIN_GENERATION_TOKENS:
            return False
        self.generation = self.generation.replace(max_batch_tokens=max(MIN_GENERATION_TOKENS, current // 2))
        logger.warning("%s: out of memory while generating (%s; at %s); freed, generating again with at most %d "
                       "tokens per chunk", self.config.method, str(error).splitlines()[0][:120], raised_at(error),
                       self.generation.max_batch_tokens)
        return True

    def pre_edit_outputs(self, items: list[EvalItem]) -> list[str | None]:
        """Unedited outputs of the items the run's ``pre_edit_items`` covers (from the cache; missing ones generated
        in one batch and stored); None for the others."""
        wanted = [i for i, it in enumerate(items) if needs_pre_edit(it.dimension, self.config.pre_edit_items)]
        prompts = {i: items[i].prompt() for i in wanted}
        outputs: dict[int, str | None] = {i: self.preedit.get(items[i].item_id, prompts[i]) for i in wanted}
        missing = [i for i in wanted if outputs[i] is None]
        if missing:
            t0 = time.perf_counter()
            generated = self._generate([prompts[i] for i in missing])
            outputs.update(zip(missing, generated))
            self.preedit.put_many((items[i].item_id, prompts[i], o) for i, o in zip(missing, generated))
            self.stats.preedit_s += time.perf_counter() - t0
        return [outputs.get(i) for i in range(len(items))]

    def rows(self, edit: EditRequest, items: list[EvalItem], pre: Sequence[str | None], post: Sequence[str],
             gap: int | None) -> list[dict[str, Any]]:
        return [{"kind": "prediction", "instance_id": edit.instance_id, "item_id": it.item_id,
                 "dimension": it.dimension, "type": it.type, "attribute": edit.attribute, "question": it.question,
                 "options": it.options, "reference": it.reference, "pre_edit": p, "post_edit": o, "gap": gap,
                 "category": it.category,
                 # True when the post-edit / pre-edit answer stopped at --max-new-tokens (it may be cut); null if
                 # unknown (the pre-edit flag comes from the generation or from the pre-edit cache entry)
                 "post_edit_hit_limit": getattr(o, "hit_limit", None),
                 "pre_edit_hit_limit": getattr(p, "hit_limit", None)}
                for it, p, o in zip(items, pre, post)]

    def evaluate(self, edit: EditRequest, items: list[EvalItem]) -> list[GeneratedText]:
        """Post-edit outputs of one edit's items (one batched generation)."""
        return self.evaluate_many([edit], [items])[0]

    def evaluate_many(self, edits: Sequence[EditRequest], items: Sequence[list[EvalItem]]
                      ) -> list[list[GeneratedText]]:
        """Post-edit outputs of several edits' items under the model as it is now (sequential mode: the edits
        evaluated after a step), in one batched generation; one list per edit."""
        t0 = time.perf_counter()
        prompts = [p for edit, its in zip(edits, items)
                   for p in self.editor.rewrite_prompts([it.prompt() for it in its], edit)]
        flat = self._generate(prompts)
        self.stats.eval_s += time.perf_counter() - t0
        return split_like(flat, items)

    @property
    def edits_per_pass(self) -> int:
        """Edits the next pass holds (see :class:`editors.memory.PassSizer`)."""
        return self.sizer.k

    def seed(self, offset: int) -> int:
        """Torch's seed before an edit: the same randomness on a resumed run."""
        return self.config.seed * 1_000_003 + offset

    def apply(self, edit: EditRequest, seed_offset: int) -> dict[str, Any]:
        """One edit on top of the current state (timed); :meth:`EditSession.restore` undoes it."""
        t0 = time.perf_counter()
        stats = self.session.apply(edit, seed=self.seed(seed_offset))
        self.stats.apply_s += time.perf_counter() - t0
        return stats

    # ---- loops --------------------------------------------------------------------------------------------------

    def run(self) -> Path | None:
        """Run the units still to do; returns the predictions file (or, in a multi-process run, see
        :meth:`merge_parts`)."""
        header = self.header()
        plan = self.plan
        out = PredictionsFile(plan.part_path, header, unit_of=plan.unit_of,
                              expected_rows=plan.expected_rows(plan.units))
        done = out.open()
        if self.shard.sharded or part_files(plan.path):  # units finished by other ranks (or a one-process run)
            done |= done_elsewhere(plan.path, plan.part_path, header, plan.unit_of, plan.expected_rows())
        todo = [u for u in self.units if u.key not in done]
        logger.info("%s: %d units, %d done, %d to run -> %s", self.config.method, len(self.units),
                    len(self.units) - len(todo), len(todo), self.part_path)
        bar = tqdm(total=len(self.units), initial=len(self.units) - len(todo), unit="edit" if self.mode == "single"
                   else "step", disable=not self.config.progress, dynamic_ncols=True,
                   desc=progress_label(self.config.method, self.mode, self.config.model))
        self._timing_start(done)
        start = self._session_start  # set by _timing_start, just above
        try:
            if self.mode == "single":
                self._run_single(todo, out, bar)
            else:
                self._run_sequential(done, out, bar)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed: keep the timing of the units it finished
            if self.stats.units:
                self.stats.total_s = time.perf_counter() - start
                with contextlib.suppress(OSError):
                    self._write_timing()
                logger.warning("%s: stopped after %d unit(s) of this session (kept in %s); the same command resumes",
                               self.config.method, self.stats.units, self.part_path)
            raise
        finally:
            bar.close()
            out.close()
        self.stats.total_s = time.perf_counter() - start
        self._report()
        return self.merge_parts()

    def merge_parts(self) -> Path | None:
        """Merge the part files into ``self.path`` once every unit is done (after a barrier when the launcher
        offers one, by rank 0; else by whichever rank finishes last). Returns the merged file, this rank's part
        while units are missing, or None on a rank that leaves the merge to rank 0."""
        if not self.shard.sharded and not part_files(self.path):
            return self.path
        if barrier(self.shard) and self.shard.rank != 0:
            return None
        result = self.plan.merge()
        return result.path if result.merged else self.part_path

    def _run_single(self, todo: list[Unit], out: PredictionsFile, bar: tqdm) -> None:
        """Passes of ``self.sizer.k`` edits (one edit at a time for methods that do not batch), their pre-edit
        outputs generated ahead between passes (:data:`PRE_EDIT_AHEAD`); on an out-of-memory error the same units
        again with half as many edits per pass (the session has restored the model: every pass applies inside
        it)."""
        batched = self.editor.batches_edits and (self.sizer.auto or self.sizer.k > 1)
        ahead: dict[Hashable, ReadUnit] = {}  # the units ahead: read, with their pre-edit outputs
        pos = 0
        while pos < len(todo):
            units = todo[pos:pos + self.sizer.k]
            if any(u.key not in ahead for u in units):  # the model is unedited here: the next units' pre-edit outputs
                ahead.update(self._pre_edit_ahead([u for u in todo[pos:pos + max(len(units), PRE_EDIT_AHEAD)]
                                                   if u.key not in ahead]))
            if batched and self.memory.measured:
                self._free_generation()  # the pass is sized against memory nothing else holds
            available, peaks = self.memory.available(), PassPeaks(self.memory)
            try:
                if batched:
                    self._run_pass(units, out, bar, [ahead[u.key] for u in units], peaks)
                else:
                    self._run_unit(units[0], out, bar, ahead[units[0].key], peaks)
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
                if not is_out_of_memory(error):
                    raise
                self._back_off(error, units)
                continue
            peaks.phase_done("evaluate")
            self.sizer.record(len(units), peaks.phases, available)
            for unit in units:
                del ahead[unit.key]
            pos += len(units)

    def _free_generation(self) -> None:
        """Drop what the generation layer keeps between calls (the graph engine's captured shapes and their
        caches) and the allocator's unused cache: within a pass of K edits, memory the sizer measured as the
        pass's must not be held by shapes an earlier generation kept (and after an out-of-memory error)."""
        release_generation(self.adapter)
        self.memory.free()

    def _back_off(self, error: BaseException, units: list[Unit]) -> None:
        """After an out-of-memory error in a pass of ``units``: free, halve the edits per pass; a unit alone that
        does not fit is a ResourceError naming the method, the unit and the memory it needed."""
        allocated = self.memory.allocated()
        self._free_generation()
        k = self.sizer.back_off()
        if k is not None:
            logger.warning("%s: out of memory with %d edits per pass (%s; at %s); freed, redoing these units with %d "
                           "per pass", self.config.method, len(units), str(error).splitlines()[0][:120],
                           raised_at(error), k)
            return
        requested = requested_bytes(error)
        needed = None if allocated is None or requested is None else allocated + requested
        raise ResourceError(f"{self.config.method}: unit {units[0].key} does not fit in device memory even alone: "
                            f"it needed at least {gib(needed)} ({gib(allocated)} allocated + {gib(requested)} "
                            f"requested); {str(error).splitlines()[0][:160]}") from error

    def _pre_edit_ahead(self, units: list[Unit]) -> dict[Hashable, ReadUnit]:
        """The next ``units`` read (their rows fetched and audio decoded once) and their pre-edit outputs in one
        generation, while the model is unedited (between passes); each unit's seconds are its share."""
        t0 = time.perf_counter()
        rows = [self.plan.datasets[u.config][u.index] for u in units]
        items = [eval_items(row) for row in rows]
        try:
            pre = split_like(self.pre_edit_outputs([it for its in items for it in its]), items)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(error):
                raise
            # the generation already went down to chunks of MIN_GENERATION_TOKENS (Runner._generating)
            raise ResourceError(f"{self.config.method}: the pre-edit outputs of units {units[0].key} .. "
                                f"{units[-1].key} do not fit in device memory even at {MIN_GENERATION_TOKENS} tokens "
                                f"per generation chunk; {str(error).splitlines()[0][:160]}") from error
        share = (time.perf_counter() - t0) / len(units)
        return {u.key: ReadUnit(EditRequest.from_row(row), its, p, share)
                for u, row, its, p in zip(units, rows, items, pre)}

    def _run_unit(self, unit: Unit, out: PredictionsFile, bar: tqdm, read: ReadUnit, peaks: PassPeaks) -> None:
        """One single edit: apply, evaluate, restore (the session), rows (``read``: the unit from
        :meth:`_pre_edit_ahead`; ``peaks`` closes its ``apply`` phase after the edit)."""
        t0 = time.perf_counter()
        with self.session:  # restores on leaving
            stats = self.apply(read.edit, unit.index)
            peaks.phase_done("apply")
            post = self.evaluate(read.edit, read.items)
        out.append_unit(unit.key, self.rows(read.edit, read.items, read.pre, post, None))
        self._unit_done(unit, stats, read.pre_seconds + time.perf_counter() - t0)
        bar.update(1)

    def _run_pass(self, units: list[Unit], out: PredictionsFile, bar: tqdm, read: list[ReadUnit],
                  peaks: PassPeaks) -> None:
        """K single edits in one pass: ``editor.apply_many`` (per-edit copies, the model unchanged), one batched
        generation of every edit's items under its own edit, restore (``read``: the units from
        :meth:`_pre_edit_ahead`; ``peaks`` closes its ``apply`` phase after the edits). Rows are written unit by
        unit, as one edit at a time writes them."""
        t0 = time.perf_counter()
        edits = [r.edit for r in read]
        items = [r.items for r in read]
        t1 = time.perf_counter()
        with self.session.edits(edits, seed=self.seed(units[0].index)) as stats:
            self.stats.apply_s += time.perf_counter() - t1
            peaks.phase_done("apply")
            t2 = time.perf_counter()
            prompts = [self.editor.rewrite_prompts([it.prompt() for it in its], e) for e, its in zip(edits, items)]
            post = self._generating(lambda settings: self.editor.generate_many(prompts, settings))
            self.stats.eval_s += time.perf_counter() - t2
        seconds = (time.perf_counter() - t0) / len(units)
        for unit, r, o, st in zip(units, read, post, stats):
            out.append_unit(unit.key, self.rows(r.edit, r.items, r.pre, o, None))
            self._unit_done(unit, st, seconds + r.pre_seconds)
            bar.update(1)

    def _run_sequential(self, done: set[Hashable], out: PredictionsFile, bar: tqdm) -> None:
        ds = self.plan.datasets[self.config.configs[0]]
        for seq_no, (_, row_indices) in enumerate(self.plan.sequences):
            steps = [u for u in self.units if u.index == seq_no]
            if all(u.key in done for u in steps):
                continue
            last_step = max(u.step for u in steps)
            edits: list[EditRequest] = []
            items: list[list[EvalItem]] = []
            for row_index in row_indices[:last_step]:
                row = ds[row_index]
                edits.append(EditRequest.from_row(row))
                items.append(eval_items(row))
            # the unedited outputs of the evaluated edits' items, in one generation
            evaluated_items = items[:self.config.eval_edits]
            pre = split_like(self.pre_edit_outputs([it for its in evaluated_items for it in its]), evaluated_items)
            by_step = {u.step: u for u in steps}
            with self.session:  # the sequence's edits accumulate; restored after the sequence
                for t in range(1, last_step + 1):
                    t0 = time.perf_counter()
                    stats = self.apply(edits[t - 1], seq_no * 1000 + t)
                    unit = by_step.get(t)
                    if unit is None or unit.key in done:
                        continue  # replaying an edit that was already evaluated
                    # the items of every edit evaluated after this step in one generation (a row does not depend
                    # on the others of its batch: editors/models/buckets.py)
                    evaluated = self.plan.evaluated(t, len(row_indices))
                    posts = self.evaluate_many([edits[s - 1] for s in evaluated], [items[s - 1] for s in evaluated])
                    rows: list[dict[str, Any]] = []
                    for s, post in zip(evaluated, posts):
                        rows.extend(self.rows(edits[s - 1], items[s - 1], pre[s - 1], post, t - s))
                    out.append_unit(unit.key, rows)
                    self._unit_done(unit, stats, time.perf_counter() - t0)
                    bar.update(1)

    def _unit_done(self, unit: Unit, stats: dict[str, Any], seconds: float) -> None:
        self.stats.units += 1
        scalars = {k: v for k, v in stats.items() if v is None or isinstance(v, (bool, int, float, str))}
        self.stats.per_unit.append({"unit": str(unit.key), "seconds": round(seconds, 4), **scalars})
        if time.perf_counter() - self._timing_written >= TIMING_EVERY_S:  # a killed run keeps what it timed
            self.stats.total_s = time.perf_counter() - self._session_start
            self._write_timing()

    @property
    def timing_path(self) -> Path:
        """The ``.timing.json`` beside this process's predictions (part) file."""
        return self.part_path.with_name(self.part_path.name + ".timing.json")

    def _timing_start(self, done: set[Hashable]) -> None:
        """What earlier sessions of this file timed (a resumed run adds to it): their totals, and the per-unit
        entries of the units the file holds complete."""
        self._timing_written = time.perf_counter()
        self._session_start = time.perf_counter()
        try:
            earlier = json.loads(self.timing_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or not done:
            self._earlier_timing: dict[str, Any] = {}
            return
        kept = {str(key) for key in done}
        self._earlier_timing = {
            "total_s": float(earlier.get("total_s") or 0.0), "apply_s": float(earlier.get("apply_s") or 0.0),
            "eval_s": float(earlier.get("eval_s") or 0.0), "preedit_s": float(earlier.get("preedit_s") or 0.0),
            "sessions": int(earlier.get("sessions") or 1),
            "per_unit": [u for u in earlier.get("per_unit") or [] if isinstance(u, dict) and u.get("unit") in kept]}

    def _write_timing(self) -> None:
        """This file's timing over every session that worked on it: seconds summed, the per-unit entries of the
        complete units (``units``: how many are timed)."""
        s, earlier = self.stats, self._earlier_timing
        per_unit = list(earlier.get("per_unit", [])) + s.per_unit
        atomic_write(self.timing_path, dumps({
            "units": len(per_unit), "total_s": round(earlier.get("total_s", 0.0) + s.total_s, 4),
            "apply_s": round(earlier.get("apply_s", 0.0) + s.apply_s, 4),
            "eval_s": round(earlier.get("eval_s", 0.0) + s.eval_s, 4),
            "preedit_s": round(earlier.get("preedit_s", 0.0) + s.preedit_s, 4),
            "sessions": earlier.get("sessions", 0) + 1, "per_unit": per_unit}) + "\n")
        self._timing_written = time.perf_counter()

    def _report(self) -> None:
        s = self.stats
        if s.units:
            logger.info("ran %d units in %.2f s (%.3f s/unit: apply %.3f, eval %.3f, pre-edit %.3f); pre-edit "
                        "cache %d hits / %d misses", s.units, s.total_s, s.total_s / s.units, s.apply_s / s.units,
                        s.eval_s / s.units, s.preedit_s / s.units, self.preedit.hits, self.preedit.misses)
        if not s.units:
            return  # nothing ran (a finished run rerun): keep the timing of the run that did the work
        self._write_timing()


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m editors.run``: a user-facing error (:class:`SakeError`) is one line on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if args.merge_only:
        plan = RunPlan(config)  # no model: the units and the files are all a merge needs
        result = plan.merge()
        if not result.merged and not result.missing:
            raise DataError(f"{plan.path}: no predictions file and no part files to merge")
        if not result.merged:
            raise DataError(f"{plan.path}: cannot merge, {len(result.missing)} unit(s) missing (first: "
                            f"{result.missing[0]}); rerun the same command without --merge-only")
        path: Path | None = result.path
    else:
        # a TERM (a scheduler's time limit, a launcher stopping its workers) ends the run as Ctrl-C does: through
        # its cleanup, which keeps the timing of the finished units
        previous = signal.signal(signal.SIGTERM, _exit_on_term)
        try:
            path = Runner(config).run()
        finally:
            signal.signal(signal.SIGTERM, previous)
        if path is None:  # a rank > 0: rank 0 prints the merged file
            return 0
    print(path)
    return 0


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
