"""Dynamic-SUPERB Phase-2 reader (Huang et al., 2025): tasks with an instruction, audio and label per row.

Expected local layout (one folder per task; the folder name is the task name):

    ROOT/<Task>/metadata.csv    columns: file, instruction, label
    ROOT/<Task>/audio/<file>

Hub (needs network): a text file listing one Hub dataset id per line (e.g. `DynamicSuperb/SpeechTextMatching_...`);
each is loaded with `datasets.load_dataset(id, split="test")` and must have columns `audio`, `instruction`, `label`
(`file` optional); the task name is the part of the id after the slash.

Which tasks are about an edited attribute is the builder's business (`sake.task_attributes`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from ..audio import probe_audio
from ..records import SourceError, TaskClip
from .common import read_table

log = logging.getLogger(__name__)
COLUMNS = ("file", "instruction", "label")


def read_dynamic_superb(spec: str | Path) -> list[TaskClip]:
    """All rows of all task folders under ROOT (sorted by task name, then file order)."""
    root = Path(spec)
    if root.is_file() and root.suffix == ".txt":
        return _read_hub_list(root)
    if not root.is_dir():
        raise SourceError(f"{root}: Dynamic-SUPERB folder not found (expected ROOT/<Task>/metadata.csv)")
    tasks = sorted(p for p in root.iterdir() if p.is_dir())
    if not tasks:
        raise SourceError(f"{root}: no task folder found (expected ROOT/<Task>/metadata.csv)")
    clips = []
    for task_dir in tqdm(tasks, desc="Dynamic-SUPERB tasks", leave=False):
        meta = task_dir / "metadata.csv"
        for line, row in read_table(meta, COLUMNS):
            where = f"{meta}:{line}"
            for field in COLUMNS:
                if not row[field].strip():
                    raise SourceError(f"{where}: field '{field}' is empty")
            audio = probe_audio(task_dir / "audio" / row["file"], field=f"{where} file")
            clips.append(TaskClip(task=task_dir.name, instruction=row["instruction"].strip(),
                                  label=row["label"].strip(), audio=audio,
                                  source=f"dsuperb:{task_dir.name}/{row['file']}"))
    log.info("Dynamic-SUPERB %s: %d rows in %d tasks", root, len(clips), len(tasks))
    return clips


def _read_hub_list(listing: Path) -> list[TaskClip]:
    import datasets

    ids = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()
           if line.strip() and not line.startswith("#")]
    clips = []
    for hub_id in ids:
        try:
            ds = datasets.load_dataset(hub_id, split="test")
        except Exception as exc:
            raise SourceError(f"{listing}: Dynamic-SUPERB task {hub_id!r} could not be loaded from the Hub: "
                              f"{exc}") from exc
        missing = [c for c in ("audio", "instruction", "label") if c not in ds.column_names]
        if missing:
            raise SourceError(f"{hub_id}: missing column(s) {missing} (expected audio, instruction, label)")
        task = hub_id.rsplit("/", 1)[-1]
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
        for i, row in enumerate(tqdm(ds, desc=task, leave=False)):
            name = row.get("file") or (row["audio"].get("path") or f"{i:06d}.wav").rsplit("/", 1)[-1]
            audio = probe_audio(f"{hub_id}/{name}", data=row["audio"]["bytes"], field="audio")
            clips.append(TaskClip(task=task, instruction=str(row["instruction"]).strip(),
                                  label=str(row["label"]).strip(), audio=audio, source=f"dsuperb:{task}/{name}"))
    return clips
