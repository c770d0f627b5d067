"""Dynamic-SUPERB Phase-2 reader (Huang et al., 2025): task rows with an instruction, audio and reference label.

Phase-2 releases each task as its own dataset, named `{Task}_{Dataset}[-{Subset}]` (Hub id
`DynamicSuperb/<name>`, split `test`). `--dynamic-superb SPEC` takes one of:

- a folder of task folders (the folder name is the task name), or a single task folder;
- a task-list file (`.txt`): one entry per line (`#` comments), each a task folder (relative to the list file) or a
  Hub id; Hub ids need network access;
- a Hub id.

A local task folder holds its table in the release layout, `data/test-*.parquet` (other `data/*.parquet` files
when no test file exists), or a table with the audio files beside it: `metadata.csv` / `data/metadata.csv`
(Hugging Face audio-folder style). Every table, local or Hub, follows one set of rules:

- `instruction` (non-empty) and `label` columns;
- audio from an `audio` column holding the datasets `Audio` struct (`bytes` and/or `path`) or a path string, or,
  without one, from a `file` / `file_name` column; a path is looked up beside the table, then in its `audio/`
  subfolder, then in the task folder;
- the row's name: `file`, else the audio path's last part, else its row number; provenance `dsuperb:<Task>/<name>`;
- a multi-utterance task (a second audio column `audio2`) is skipped with a warning: a SAKE item has one audio.

Which tasks are about an edited attribute is the builder's business (`sake_dataset.dsuperb_tasks`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow.parquet as pq
from sake_dataset.progress import bar

from ..audio import probe_audio
from ..records import SourceError, TaskClip
from .common import is_hub_id, read_table, read_text

log = logging.getLogger(__name__)
CSV_TABLES = ("metadata.csv", "data/metadata.csv")
LAYOUT = ("ROOT/<Task>/data/test-*.parquet (columns file, audio, instruction, label), or ROOT/<Task>/metadata.csv "
          "with the audio files beside it")


def read_dynamic_superb(spec: str | Path) -> list[TaskClip]:
    """All rows of all tasks named by `spec` (a folder of task folders, a task folder, a task list or a Hub id),
    tasks sorted by name, rows in table order."""
    text = str(spec)
    path = Path(spec)
    if path.is_file():
        entries = _task_list(path)
    elif path.is_dir():
        entries = [("dir", path)] if _table_files(path) else [
            ("dir", p) for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        if not entries:
            raise SourceError(f"{path}: no Dynamic-SUPERB task folder found (expected {LAYOUT})")
    elif is_hub_id(text):
        entries = [("hub", text)]
    else:
        raise SourceError(f"{path}: Dynamic-SUPERB source not found (expected a folder, {LAYOUT}; a task-list .txt "
                          "file; or a Hub id such as DynamicSuperb/SpeechTextMatching_LJSpeech)")
    clips: list[TaskClip] = []
    tasks = sorted(entries, key=lambda e: _task_name(e))
    for kind, where in bar(tasks, desc="Dynamic-SUPERB tasks", leave=False):
        clips += _read_hub_task(str(where)) if kind == "hub" else _read_local_task(Path(where))
    log.info("Dynamic-SUPERB %s: %d rows in %d tasks", spec, len(clips), len(tasks))
    return clips


def _task_name(entry: tuple[str, Any]) -> str:
    kind, where = entry
    return str(where).rstrip("/").rsplit("/", 1)[-1] if kind == "hub" else Path(where).name


def _task_list(listing: Path) -> list[tuple[str, Any]]:
    entries: list[tuple[str, Any]] = []
    for n, line in enumerate(read_text(listing, "a Dynamic-SUPERB task list").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        local = (listing.parent / line) if not Path(line).is_absolute() else Path(line)
        if local.is_dir():
            entries.append(("dir", local))
        elif is_hub_id(line):
            entries.append(("hub", line))
        else:
            raise SourceError(f"{listing}:{n}: entry {line!r} is neither a task folder nor a Hub id "
                              "(expected OWNER/TASK, e.g. DynamicSuperb/SpeechTextMatching_LJSpeech)")
    if not entries:
        raise SourceError(f"{listing}: the task list names no task (one task folder or Hub id per line)")
    return entries


def _table_files(task_dir: Path) -> list[Path]:
    data = task_dir / "data"
    parquet = sorted(data.glob("test-*.parquet")) or sorted(data.glob("*.parquet")) or sorted(
        task_dir.glob("*.parquet"))
    if parquet:
        return parquet
    return [task_dir / rel for rel in CSV_TABLES if (task_dir / rel).is_file()][:1]


def _read_local_task(task_dir: Path) -> list[TaskClip]:
    tables = _table_files(task_dir)
    if not tables:
        raise SourceError(f"{task_dir}: missing file (expected a Dynamic-SUPERB task table: {LAYOUT})")
    clips: list[TaskClip] = []
    for table in tables:
        for where, row in _table_rows(table):
            if row.get("audio2") is not None:
                log.warning("%s: multi-utterance task (column audio2) skipped: a SAKE item has one audio", task_dir)
                return []
            clips.append(task_clip(task_dir.name, row, where, (table.parent, table.parent / "audio", task_dir),
                                   index=len(clips)))
    return clips


def _table_rows(table: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if table.suffix == ".csv":
        for line, row in read_table(table, ("instruction", "label")):
            yield f"{table}:{line}", row
        return
    try:
        rows = pq.read_table(table).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise SourceError(f"{table}: not a readable Parquet file: {exc}") from None
    if rows:
        _require_columns(table, rows[0].keys())
    for i, row in enumerate(rows):
        yield f"{table} row {i}", row


def _require_columns(where: Any, columns: Iterable[str]) -> None:
    columns = list(columns)
    missing = [c for c in ("instruction", "label") if c not in columns]
    if not {"audio", "file", "file_name"} & set(columns):
        missing.append("audio (or file)")
    if missing:
        raise SourceError(f"{where}: missing column(s) {missing} (expected columns file, audio, instruction, label; "
                          f"found {columns})")


def task_clip(task: str, row: dict[str, Any], where: str, search: tuple[Path, ...] = (), index: int = 0,
              hub_id: str = "") -> TaskClip:
    """One table row -> TaskClip, under the rules of the module docstring (local and Hub rows alike)."""
    instruction = str(row.get("instruction") or "").strip()
    if not instruction:
        raise SourceError(f"{where}: field 'instruction' is empty")
    label = row.get("label")
    if label is None or not str(label).strip():
        raise SourceError(f"{where}: field 'label' is empty")
    audio = row.get("audio")
    data = path = None
    rate = row.get("sampling_rate")  # a source that declares the rate (column, or the audio struct) gets it checked
    if isinstance(audio, dict):
        data, path = audio.get("bytes"), audio.get("path")
        rate = audio.get("sampling_rate", rate)
    elif isinstance(audio, str) and audio.strip():
        path = audio.strip()
    file = str(row.get("file") or row.get("file_name") or "").strip()
    name = (file or (path or "").replace("\\", "/").rsplit("/", 1)[-1] or f"{index:06d}.wav")
    if data:
        base = str(search[0]) if search else (hub_id or task)
        ref = probe_audio(f"{base}/{name}", data=bytes(data), field=f"audio of {where}", declared_rate=rate)
    else:
        wanted = path or file
        if not wanted:
            raise SourceError(f"{where}: field 'audio' has neither bytes nor a path, and field 'file' is empty")
        found = next((d / wanted for d in search if (d / wanted).is_file()), None)
        if found is None:
            tried = ", ".join(str(d / wanted) for d in search) or wanted
            raise SourceError(f"{where}: audio file named in field '{'audio' if path else 'file'}' not found "
                              f"(looked for {tried})")
        ref = probe_audio(found, field=f"{where} file", declared_rate=rate)
    return TaskClip(task=task, instruction=instruction, label=str(label).strip(), audio=ref,
                    source=f"dsuperb:{task}/{name}")


def _read_hub_task(hub_id: str) -> list[TaskClip]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split="test")
    except Exception as exc:  # noqa: BLE001 - the Hub client raises many types
        raise SourceError(f"{hub_id}: Dynamic-SUPERB task could not be loaded from the Hub (split test; needs "
                          f"network access): {exc}") from None
    _require_columns(hub_id, ds.column_names)
    if "audio2" in ds.column_names:
        log.warning("%s: multi-utterance task (column audio2) skipped: a SAKE item has one audio", hub_id)
        return []
    if "audio" in ds.column_names and isinstance(ds.features["audio"], datasets.Audio):
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    task = hub_id.rsplit("/", 1)[-1]
    return [task_clip(task, row, f"{hub_id}[test] row {i}", index=i, hub_id=hub_id)
            for i, row in enumerate(bar(ds, desc=task, leave=False))]
