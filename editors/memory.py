"""Edits per pass sized from measured memory, and what the runner does when a pass runs out of memory (issue 29).

Sizing (:class:`PassSizer`): each phase of a pass of K edits (the edit, ``apply``; the generation under the
edits, ``evaluate``) needs ``fixed + K * per_edit`` bytes (``fixed``: what the phase needs whatever the pass's size,
e.g. the generation's logits and the audio encoder; ``per_edit``: one edit's parameter copies, optimizer state,
training activations and its items' KV cache at their real lengths, prefixes included). On CUDA, with
``--edits-per-pass`` left unset, the runner measures it (:class:`PassPeaks`: the peak of each phase above the pass's
start): the first pass runs one edit (its peak is ``fixed + per_edit``, so it bounds one edit's cost), the second as
many edits as fit at that bound (at least :data:`PROBE_EDITS`; per phase, the difference of the two peaks is
``per_edit``); every later pass holds as many edits as every phase fits in :data:`PASS_FRACTION` of the memory
available, at most :data:`MAX_EDITS_PER_PASS` and at most :data:`GROWTH` times the largest pass measured so far.
So the K a method gets depends on its own cost on this model and device, not on a flat constant, and only the
first pass is a small one. When a phase's peak at the larger pass is no higher than at the first (the generation's
chunks grow with the memory left, so its peak need not grow with K), its peak over its K bounds one edit instead.

Why phases, and why the growth cap (DeSTA2.5's FT-LLM on an 80 GB card, `bench/NOTES.md`): the pass's peak moves
from the generation (a large fixed cost) at few edits to the edits' training state at many, so one line through
the passes' peaks took the first's slope (1.9 GiB per edit from 1 and 4 edits; 3.9 measured at 8; out of memory at
17). Fitted per phase, the apply phase still gave 2.45 GiB per edit from 1 and 4 edits and ran out at 14: memory a
first pass allocates and later passes reuse (the audio-state cache filling up) makes small passes look costlier per
pass and cheaper per edit, so a line is trusted only up to twice the passes it was measured on, and each larger
pass corrects it.

Back-off: when a pass raises an out-of-memory error, the runner frees what it holds, halves K (or, at one edit,
the generation batch) and redoes the same units, logging one line; rows are those of a run started at the smaller
size. Later passes are sized by the fit again, but hold at most :data:`BACK_OFF_SHARE` of the edits of the pass
that ran out (UnKE on an 80 GB card ran out at 10 edits where the fit allowed 10, and halving for good then ran
its other 20 edits 5 at a time: 1.88 s/edit against 1.65 at 9, `bench/NOTES.md`). A unit that does not fit alone
ends the run with a :class:`~sake_core.errors.ResourceError` naming the method, the unit and the memory it needed.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Most edits one pass holds by default (more adds little once a pass's decode steps are shared by all its edits).
MAX_EDITS_PER_PASS = 32
#: Share of the memory available at the start of a pass that the default K fills.
PASS_FRACTION = 0.8
#: Fewest edits of the second, measuring pass (its difference to the first gives one edit's memory).
PROBE_EDITS = 2
#: A pass holds at most this many times the edits of the largest pass measured so far.
GROWTH = 2
#: After an out-of-memory error at K edits, no later pass holds more than this share of K.
BACK_OFF_SHARE = 0.8


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device (or host allocator) running out of memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "alloc_failed" in text)


def requested_bytes(error: BaseException) -> int | None:
    """The allocation an out-of-memory error reports ("Tried to allocate 1.89 GiB"), in bytes."""
    match = re.search(r"tried to allocate ([\d.]+) ?([kmgt]?i?b)", str(error), re.IGNORECASE)
    if not match:
        return None
    unit = match.group(2).lower().rstrip("b").rstrip("i")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(unit or " "))


#: The attribute :func:`drop_frames` leaves on an error: where it was raised.
RAISED_AT = "sake_raised_at"


def raised_at(error: BaseException) -> str:
    """Where ``error`` was raised: the innermost frame of its traceback outside torch (``file:line in function``),
    so that a back-off line says which allocation did not fit; the place :func:`drop_frames` kept, if any."""
    kept = getattr(error, RAISED_AT, None)
    if kept is not None:
        return str(kept)
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = traceback.extract_tb(error.__traceback__)
    outside = [f for f in frames if not f.filename.startswith(torch_dir)] or frames
    if not outside:
        return "?"
    frame = outside[-1]
    parts = Path(frame.filename).parts
    return f"{'/'.join(parts[-2:])}:{frame.lineno} in {frame.name}"


def drop_frames(error: BaseException) -> BaseException:
    """``error`` without the frames of the call that raised it (its traceback, and those of the errors it chains),
    where it was raised kept (:func:`raised_at` reads it). Those frames hold the failed call's tensors: while the
    error keeps them, their device memory is not free, and memory measured then (the budget of the next try) reads
    too little."""
    setattr(error, RAISED_AT, raised_at(error))
    seen: set[int] = set()
    chained: BaseException | None = error
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__
    return error


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


@dataclass
class DeviceMemory:
    """Where the runner reads memory: the CUDA allocator of ``device``, or nothing (CPU: every reading is None)."""

    device: torch.device

    def __post_init__(self) -> None:
        if self.device.type == "cuda" and torch.cuda.is_available():
            from editors.models.generation.memory import cuda_device

            self.device = cuda_device(self.device)

    @property
    def measured(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def available(self) -> int | None:
        """Bytes still allocatable (free + cached but unused)."""
        if not self.measured:
            return None
        from editors.models.generation.memory import available_bytes

        return available_bytes(self.device)

    def allocated(self) -> int | None:
        return int(torch.cuda.memory_allocated(self.device)) if self.measured else None

    def start(self) -> int | None:
        """Reset the peak; returns the bytes allocated now (the baseline of :meth:`peak`)."""
        if not self.measured:
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self, baseline: int | None) -> int | None:
        """Bytes above ``baseline`` at the peak since :meth:`start`."""
        if not self.measured or baseline is None:
            return None
        return max(0, int(torch.cuda.max_memory_allocated(self.device)) - baseline)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes allocated now (the next phase of a pass)."""
        if self.measured:
            torch.cuda.reset_peak_memory_stats(self.device)

    def free(self) -> None:
        """Return what nothing references any more to the device."""
        gc.collect()
        if self.measured:
            torch.cuda.empty_cache()


@dataclass
class PassPeaks:
    """The peak of each phase of one pass, in bytes above the memory allocated at its start (see the module
    docstring): ``phase_done(name)`` closes a phase (empty on CPU, where nothing is measured)."""

    memory: DeviceMemory
    phases: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.baseline = self.memory.start()

    def phase_done(self, name: str) -> None:
        peak = self.memory.peak(self.baseline)
        if peak is not None:
            self.phases[name] = max(peak, self.phases.get(name, 0))
            self.memory.reset_peak()


Line = tuple[int, int]  # (bytes per edit, bytes per pass) of one phase


def fit_phase(peaks: dict[int, int]) -> Line:
    """One phase's line from its peaks at two or more pass sizes (``{edits: bytes}``): through the smallest and the
    largest pass; a phase that peaked no higher at the larger pass is bounded by that peak over its edits."""
    (k1, p1), (k2, p2) = min(peaks.items()), max(peaks.items())
    if p2 > p1 and k2 > k1:
        per_edit = max(1, (p2 - p1) // (k2 - k1))
        return per_edit, max(0, p1 - k1 * per_edit)
    return max(1, p2 // k2), 0


def edits_that_fit(lines: dict[str, Line], available: float, cap: int) -> tuple[int, str]:
    """The most edits (1 to ``cap``) whose every phase fits ``PASS_FRACTION * available`` bytes, and the phase that
    bounds it."""
    fits = {phase: int((PASS_FRACTION * available - fixed) // per_edit) for phase, (per_edit, fixed) in lines.items()}
    phase = min(fits, key=lambda name: fits[name])
    return max(1, min(cap, fits[phase])), phase


@dataclass
class PassSizer:
    """Edits per pass: ``requested`` (fixed), or measured (see the module docstring) when ``requested`` is None and
    memory is measured, else 1. :meth:`record` takes each finished pass's phase peaks; :meth:`back_off` halves K
    and caps later passes below the size that ran out."""

    requested: int | None
    memory: DeviceMemory
    cap: int = MAX_EDITS_PER_PASS
    k: int = 1
    measured: dict[str, dict[int, int]] = field(default_factory=dict)  # phase -> edits -> peak bytes
    per_edit: int | None = None  # the line of the phase that bounds K
    fixed: int | None = None
    bound_by: str | None = None
    history: list[dict] = field(default_factory=list)  # one entry per finished pass (the bench reports it)
    backoffs: int = 0

    def __post_init__(self) -> None:
        self.auto = self.requested is None and self.memory.measured
        self.k = self.requested or 1

    def record(self, edits: int, phases: dict[str, int], available: int | None) -> None:
        """A pass of ``edits`` edits peaked ``phases`` (bytes above its start, per phase); size the next pass."""
        peak = max(phases.values()) if phases else None
        self.history.append({"edits": edits, "peak_bytes": peak, "phase_peak_bytes": dict(phases),
                             "available_bytes": available})
        if not self.auto or peak is None or available is None:
            return
        for phase, bytes_ in phases.items():
            runs = self.measured.setdefault(phase, {})
            runs[edits] = max(bytes_, runs.get(edits, 0))
        if max(len(runs) for runs in self.measured.values()) < 2:  # one pass's peak bounds one edit: as many as fit
            bound = int(PASS_FRACTION * available) // max(1, peak)
            self.k = min(self.cap, max(PROBE_EDITS, bound))
            return
        lines = {phase: fit_phase(runs) for phase, runs in self.measured.items() if len(runs) >= 2}
        largest = max(k for runs in self.measured.values() for k in runs)
        new, self.bound_by = edits_that_fit(lines, available, min(self.cap, GROWTH * largest))
        self.per_edit, self.fixed = lines[self.bound_by]
        if new != self.k:
            logger.info("edits per pass: %d (measured, %s bounds it: %s per edit + %s per pass; %s available)", new,
                        self.bound_by, gib(self.per_edit), gib(self.fixed), gib(available))
        self.k = new

    def back_off(self) -> int | None:
        """Halve K after an out-of-memory error (the redone pass's size); later passes hold at most
        :data:`BACK_OFF_SHARE` of the K that ran out. None when K is 1 already."""
        if self.k <= 1:
            return None
        self.backoffs += 1
        failed = self.k
        self.k = failed // 2
        self.cap = min(self.cap, max(self.k, int(BACK_OFF_SHARE * failed)))
        return self.k
