"""Edits per pass sized from measured memory, and what the runner does when a pass runs out of memory (issue 29).

Sizing (:class:`PassSizer`): a pass of K edits needs ``fixed + K * per_edit`` bytes (``fixed``: what a pass needs
whatever its size, e.g. the generation's logits and the audio encoder; ``per_edit``: one edit's parameter copies,
optimizer state, training activations and its items' KV cache at their real lengths, prefixes included). On CUDA,
with ``--edits-per-pass`` left unset, the runner measures it: the first pass runs one edit (its peak is
``fixed + per_edit``, so it bounds one edit's cost), the second as many edits as fit at that bound (at least
:data:`PROBE_EDITS`; the difference of the two peaks is ``per_edit``); every later pass holds as many edits as fit
:data:`PASS_FRACTION` of the memory available (at most :data:`MAX_EDITS_PER_PASS`). So the K a method gets depends
on its own cost on this model and device, not on a flat constant, and only the first pass is a small one. When the
larger pass peaks no higher than the first (the generation's chunks grow with the memory left, so its peak need
not grow with K), its peak over its K bounds one edit instead.

Back-off: when a pass raises an out-of-memory error, the runner frees what it holds, halves K (or, at one edit,
the generation batch) and redoes the same units, logging one line; rows are those of a run started at the smaller
size. A unit that does not fit alone ends the run with a :class:`~sake_core.errors.ResourceError` naming the
method, the unit and the memory it needed.
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


def raised_at(error: BaseException) -> str:
    """Where ``error`` was raised: the innermost frame of its traceback outside torch (``file:line in function``),
    so that a back-off line says which allocation did not fit."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = traceback.extract_tb(error.__traceback__)
    outside = [f for f in frames if not f.filename.startswith(torch_dir)] or frames
    if not outside:
        return "?"
    frame = outside[-1]
    parts = Path(frame.filename).parts
    return f"{'/'.join(parts[-2:])}:{frame.lineno} in {frame.name}"


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

    def free(self) -> None:
        """Return what nothing references any more to the device."""
        gc.collect()
        if self.measured:
            torch.cuda.empty_cache()


@dataclass
class PassSizer:
    """Edits per pass: ``requested`` (fixed), or measured (see the module docstring) when ``requested`` is None and
    memory is measured, else 1. :meth:`record` takes each finished pass's peak; :meth:`back_off` halves K."""

    requested: int | None
    memory: DeviceMemory
    cap: int = MAX_EDITS_PER_PASS
    k: int = 1
    measured: dict[int, int] = field(default_factory=dict)  # edits -> peak bytes of a pass of that size
    per_edit: int | None = None
    fixed: int | None = None
    history: list[dict] = field(default_factory=list)  # one entry per finished pass (the bench reports it)
    backoffs: int = 0

    def __post_init__(self) -> None:
        self.auto = self.requested is None and self.memory.measured
        self.k = self.requested or 1

    def record(self, edits: int, peak: int | None, available: int | None) -> None:
        """A pass of ``edits`` edits peaked ``peak`` bytes above its start; size the next pass."""
        self.history.append({"edits": edits, "peak_bytes": peak, "available_bytes": available})
        if not self.auto or peak is None or available is None:
            return
        self.measured[edits] = max(peak, self.measured.get(edits, 0))
        if len(self.measured) < 2:  # one pass's peak bounds one edit (fixed + per edit): as many as fit that
            bound = int(PASS_FRACTION * available) // max(1, peak)
            self.k = min(self.cap, max(PROBE_EDITS, bound))
            return
        (k1, p1), (k2, p2) = sorted(self.measured.items())[:1] + sorted(self.measured.items())[-1:]
        if p2 > p1:
            self.per_edit = max(1, (p2 - p1) // max(1, k2 - k1))
            self.fixed = max(0, p1 - k1 * self.per_edit)
        else:  # the larger pass peaked no higher: its peak over its edits bounds one edit
            self.per_edit, self.fixed = max(1, p2 // k2), 0
        fits = int((PASS_FRACTION * available - self.fixed) // self.per_edit)
        new = max(1, min(self.cap, fits))
        if new != self.k:
            logger.info("edits per pass: %d (measured: %s per edit + %s per pass; %s available)", new,
                        gib(self.per_edit), gib(self.fixed), gib(available))
        self.k = new

    def back_off(self) -> int | None:
        """Halve K after an out-of-memory error (and stop growing it); None when it is 1 already."""
        if self.k <= 1:
            return None
        self.backoffs += 1
        self.k //= 2
        self.cap = self.k
        return self.k
