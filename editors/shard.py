"""Multi-process runs: each process edits its share of the units and writes its own part file; the parts merge
into the one predictions file a one-process run writes (same rows, same order).

    torchrun --nproc-per-node 2 -m editors.run ARGS
    accelerate launch --multi_gpu --num_processes 2 -m editors.run ARGS

The launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; nothing else is needed. Rank ``r`` of ``W`` takes
the units whose group number ``g`` has ``g % W == r`` (single mode: the instance's position in the one-process
order; sequential mode: the sequence number, so a sequence stays on one process), runs on ``cuda:LOCAL_RANK`` and
writes ``OUT.jsonl.rank{r}-of{W}.part``, an ordinary predictions file (header + rows, resumable unit by unit).

Merging: when every rank is done (a ``torch.distributed`` gloo barrier when the launcher provides a rendezvous,
else each rank tries when it finishes) the complete units of the final file and of every part are written to
``OUT.jsonl`` in the one-process order (atomic replace, raw row bytes kept), the ranks' timing files are summed
into ``OUT.jsonl.timing.json`` (``total_s``: the slowest rank) and the parts are deleted. With units
missing (a rank died) nothing is merged: rerun the same command (each rank resumes its part; units complete in
any part or in ``OUT.jsonl`` are skipped), or ``python -m editors.run ARGS --merge-only`` once all are there.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence, TypeVar

from sake_core.run_header import resume_differences
from sake_core.atomic import atomic_write
from sake_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a finished rank waits at the barrier for the slowest one before giving up (then the merge is lazy).
BARRIER_TIMEOUT = timedelta(hours=48)


# ----------------------------------------------------------------------------------------------------------------
# This process's place in the launch
# ----------------------------------------------------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer") from exc


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world_size`` processes (``local_rank``: its index on this host, picks the GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Shard":
        """From ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun and ``accelerate launch`` set them."""
        env = os.environ if environ is None else environ
        world = _env_int(env, "WORLD_SIZE", 1)
        rank = _env_int(env, "RANK", 0)
        local = _env_int(env, "LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ConfigError(f"bad launch environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                             "(expected 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def select(self, units: Sequence[T], groups: Sequence[int]) -> list[T]:
        """The units this rank runs: those whose group number is ``rank`` modulo ``world_size``."""
        if len(units) != len(groups):
            raise ValueError(f"{len(units)} units but {len(groups)} group numbers")
        return [u for u, g in zip(units, groups) if g % self.world_size == self.rank]

    def device(self, requested: str | None, cuda_available: bool) -> str:
        """The device of this rank: ``--device`` when it names one, else ``cuda:LOCAL_RANK`` (or cpu)."""
        if requested not in (None, "", "cuda"):
            if self.sharded and str(requested).startswith("cuda:"):
                logger.warning("rank %d: --device %s given explicitly; every rank uses it", self.rank, requested)
            return str(requested)
        if requested == "cuda" or (requested in (None, "") and cuda_available):
            return f"cuda:{self.local_rank}" if self.sharded else "cuda"
        return "cpu"

    def part_path(self, final: Path) -> Path:
        """This rank's part file next to ``final`` (``final`` itself when there is one process)."""
        if not self.sharded:
            return final
        return final.with_name(f"{final.name}.rank{self.rank}-of{self.world_size}.part")


def part_files(final: Path) -> list[Path]:
    """Every part file of ``final`` (any world size), sorted by name."""
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.glob(f"{glob_escape(final.name)}.rank*-of*.part") if p.is_file())


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# ----------------------------------------------------------------------------------------------------------------
# Reading complete units (read-only: a part may belong to a rank that is still running)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """The header line and the complete units of one predictions file (raw bytes of their rows)."""

    path: Path
    header: dict[str, Any]
    header_line: bytes
    units: dict[Hashable, bytes]


def scan(path: Path, header: Mapping[str, Any] | None, unit_of: Callable[[dict[str, Any]], Hashable],
         expected_rows: Mapping[Hashable, int]) -> Scan | None:
    """Complete units of ``path`` (None when it has no header line yet). A unit counts when its rows are
    consecutive and as many as ``expected_rows`` says; a partial trailing line or unit is ignored. ValueError when
    ``header`` is given and the file's header differs on a resume key (another run's file)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    end = raw.find(b"\n")
    if end < 0:
        return None
    try:
        file_header = json.loads(raw[:end])
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line 1 is not a JSON run header") from exc
    if not isinstance(file_header, dict) or file_header.get("kind") != "header":
        raise DataError(f"{path}: line 1 is not a run header (kind: header)")
    if header is not None:
        diff = resume_differences(file_header, header)
        if diff:
            details = ", ".join(f"{k}: {file_header.get(k)!r} != {header.get(k)!r}" for k in diff)
            raise DataError(f"{path} was written by a different run ({details}); use another --out or delete it")
    units: dict[Hashable, bytes] = {}
    pos = start = end + 1
    current: Hashable | None = None
    count = 0
    while True:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            break
        try:
            unit = unit_of(json.loads(raw[pos:nl]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s: unreadable row at byte %d; ignoring the rest of the file", path, pos)
            break
        if unit != current:
            current, count, start = unit, 0, pos
        count += 1
        pos = nl + 1
        if count == expected_rows.get(current, -1) and current not in units:
            units[current] = raw[start:pos]
    return Scan(path=path, header=file_header, header_line=raw[:end + 1], units=units)


def done_elsewhere(final: Path, own: Path, header: Mapping[str, Any], unit_of: Callable[[dict[str, Any]], Hashable],
                   expected_rows: Mapping[Hashable, int]) -> set[Hashable]:
    """Units complete in the final file or in another rank's part (so this rank need not run them)."""
    done: set[Hashable] = set()
    for path in [final, *part_files(final)]:
        if path == own:
            continue
        found = scan(path, header, unit_of, expected_rows)
        if found is not None:
            done.update(found.units)
    return done


# ----------------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` (serialises merges of ranks that finish together; no lock file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: merges are still atomic, only not serialised
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class MergeResult:
    path: Path
    merged: bool
    missing: list[Hashable]


def merge(final: Path, order: Sequence[Hashable], unit_of: Callable[[dict[str, Any]], Hashable],
          expected_rows: Mapping[Hashable, int], header: Mapping[str, Any] | None = None,
          expect: Mapping[str, Any] | None = None) -> MergeResult:
    """Write ``final`` from its complete units and those of its part files, in ``order``, once every unit is
    there; then delete the parts. Missing units: nothing is written (the result lists them). ``expect``: header
    fields every file must carry with these values (a merge without a model knows the run's settings, not its
    whole header); a file that differs, or that holds units outside ``order``, is an error and nothing is
    written or deleted."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(final.parent):
        parts = part_files(final)
        if not parts:
            return MergeResult(final, merged=final.is_file(), missing=[])
        scans = [s for s in (scan(p, header, unit_of, expected_rows) for p in [final, *parts]) if s is not None]
        if not scans:
            return MergeResult(final, merged=False, missing=list(order))
        reference = header if header is not None else scans[0].header
        for s in scans:
            diff = resume_differences(s.header, reference)
            if diff:
                raise DataError(f"{s.path} belongs to a different run than {scans[0].path} (differs in {diff}); "
                                 "delete the stale file")
            expected = expect or {}
            wrong = {k: s.header.get(k) for k, v in expected.items() if s.header.get(k) != v}
            if wrong:
                ours = {k: expected[k] for k in wrong}
                raise DataError(f"{s.path} was written with {wrong}, not this command's {ours}; give the arguments "
                                "of the run that wrote it (nothing merged or deleted)")
        rows: dict[Hashable, bytes] = {}
        known = set(order)
        for s in scans:
            for unit, data in s.units.items():
                if unit not in known:
                    raise DataError(f"{s.path} holds unit {unit}, which this command's run does not have; give the "
                                    "arguments of the run that wrote it (nothing merged or deleted)")
                rows.setdefault(unit, data)
        missing = [u for u in order if u not in rows]
        if missing:
            logger.info("%s: %d of %d units not finished yet (%s%s); parts kept", final, len(missing), len(order),
                        ", ".join(map(str, missing[:3])), ", ..." if len(missing) > 3 else "")
            return MergeResult(final, merged=False, missing=missing)
        data = scans[0].header_line + b"".join(rows[u] for u in order)
        atomic_write(final, data)
        merge_timings(final, parts)
        for part in parts:
            part.unlink(missing_ok=True)
        logger.info("merged %d part file(s) into %s (%d units)", len(parts), final, len(order))
        return MergeResult(final, merged=True, missing=[])


def merge_timings(final: Path, parts: Sequence[Path]) -> None:
    """``FINAL.timing.json`` from the parts' timing files (which are then removed): summed unit and stage times,
    ``total_s`` = the slowest rank's wall time, ``per_rank`` and the concatenated ``per_unit``."""
    target = final.with_name(final.name + ".timing.json")
    files = [p.with_name(p.name + ".timing.json") for p in parts]
    timings = []
    try:  # the work a one-process run did on the final file itself (not an earlier merge's sum)
        own = json.loads(target.read_text())
        if "per_rank" not in own:
            timings.append((target, own))
    except (OSError, json.JSONDecodeError):
        pass
    for path in files:
        try:
            timings.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    if not any(path != target for path, _ in timings):
        return
    sums = {k: round(sum(float(t.get(k) or 0) for _, t in timings), 4) for k in ("apply_s", "eval_s", "preedit_s")}
    merged = {"units": sum(int(t.get("units") or 0) for _, t in timings),
              "total_s": round(max(float(t.get("total_s") or 0) for _, t in timings), 4), **sums,
              "per_rank": [{"part": path.name[:-len(".timing.json")], "units": t.get("units"),
                            "total_s": t.get("total_s")} for path, t in timings],
              "per_unit": [u for _, t in timings for u in t.get("per_unit", [])]}
    atomic_write(target, json.dumps(merged, ensure_ascii=False) + "\n")
    for path, _ in timings:
        if path != target:
            path.unlink(missing_ok=True)


def barrier(shard: Shard) -> bool:
    """Wait for every rank (gloo; the launcher's ``MASTER_ADDR``/``MASTER_PORT`` rendezvous). False when there
    is no rendezvous or the barrier fails: the caller then merges lazily."""
    if not shard.sharded or not os.environ.get("MASTER_ADDR"):
        return False
    import torch.distributed as dist

    if not dist.is_available():
        return False
    created = False
    try:
        if not dist.is_initialized():
            # gloo even on GPUs: the barrier moves no tensor and needs no NCCL communicator on the devices
            dist.init_process_group(backend="gloo", rank=shard.rank, world_size=shard.world_size,
                                    timeout=BARRIER_TIMEOUT)
            created = True
        dist.barrier()
        return True
    except Exception as exc:  # noqa: BLE001 - a failed barrier only means the merge happens lazily
        logger.warning("rank %d: barrier failed (%s); merging lazily", shard.rank, exc)
        return False
    finally:
        if created:
            dist.destroy_process_group()
