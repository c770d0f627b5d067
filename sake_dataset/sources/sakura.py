"""SAKURA reader (Yang et al., 2025b): four attribute tracks with single-hop and multi-hop questions.

Expected local layout (the public release, one folder per track; track folder names matched case-insensitively):

    ROOT/Animal/metadata.csv      ROOT/Animal/audio/<file>
    ROOT/Emotion/metadata.csv     ROOT/Emotion/audio/<file>
    ROOT/Gender/metadata.csv      ROOT/Gender/audio/<file>
    ROOT/Language/metadata.csv    ROOT/Language/audio/<file>

ROOT may also be a clone of the public GitHub repository (`ckyang1124/SAKURA`), whose tracks sit under `data/`
(`ROOT/data/Animal/metadata.csv`, ...); its `metadata.json` files repeat the CSVs and are not read.

`metadata.csv` columns: `file` (audio file name under `audio/`), `attribute_label` (the track's label, e.g.
`Happy`, `German`), `single_instruction` (the single-hop attribute question with its options inline,
"... (a) x (b) y ..."), `single_answer` (the right option: its text, "(b) y" or "b"), `multi_instruction`,
`multi_answer` (the multi-hop question about the clip, options inline, and its answer: the builder's portability
questions, `sake_dataset.portability`); optional `multi_category` (the question's knowledge category).

Hub: a dataset id (e.g. `SLLM-multi-hop/SAKURA`) with configs `AnimalQA`, `EmotionQA`, `GenderQA`, `LanguageQA`
(split `test`) holding the same columns plus an `audio` column; needs network access.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

from sake_dataset.progress import bar

from ..audio import probe_audio
from ..records import LabelledClip, SourceError
from ..labels import ATTRIBUTES, canonical_label, option_for_label, split_options
from .common import find_dir, is_hub_id, read_table

log = logging.getLogger(__name__)

TRACKS = {"animal": "Animal", "emotion": "Emotion", "gender": "Gender", "language": "Language"}
COLUMNS = ("file", "attribute_label", "single_instruction", "single_answer", "multi_instruction", "multi_answer")


def _make_clip(attribute: str, row: dict, where: str, audio) -> LabelledClip:
    label = canonical_label(attribute, row["attribute_label"])
    if label is None:
        raise SourceError(f"{where}: field 'attribute_label' has unknown {attribute} label "
                          f"{row['attribute_label']!r} (expected one of the SAKE labels, App. C.1)")
    stem, options = split_options(row["single_instruction"])
    if not options:
        raise SourceError(f"{where}: field 'single_instruction' has no inline options '(a) ... (b) ...': "
                          f"{row['single_instruction']!r}")
    idx = option_for_label(attribute, options, label)
    if idx is None:
        raise SourceError(f"{where}: field 'single_instruction' has no option for the label {label!r}: {options}")
    answer = row["single_answer"].strip()
    m = re.match(r"^\(?([a-z])\)?(?:\s|$)", answer)
    given = options["abcdefghijklmnopqrstuvwxyz".index(m.group(1))] if m and "abcdefghijklmnopqrstuvwxyz".index(
        m.group(1)) < len(options) else answer
    if canonical_label(attribute, given) not in (None, label):
        raise SourceError(f"{where}: field 'single_answer' {answer!r} disagrees with attribute_label {label!r}")
    return LabelledClip(attribute=attribute, label=label, audio=audio, source=f"sakura:{TRACKS[attribute]}/"
                        f"{row['file']}", origin="sakura", question=row["single_instruction"].strip(),
                        options=options, answer=options[idx], multi_question=row.get("multi_instruction", ""),
                        multi_answer=row.get("multi_answer", ""), multi_category=row.get("multi_category", ""))


def read_sakura(spec: str | Path, attributes: Sequence[str] = ATTRIBUTES) -> list[LabelledClip]:
    """All clips of the SAKURA tracks (local folder or Hub id), labels canonical, audio probed and hashed."""
    if is_hub_id(str(spec)):
        return _read_hub(str(spec), attributes)
    root = Path(spec)
    if not root.is_dir():
        raise SourceError(f"{root}: SAKURA folder not found (expected ROOT/<Track>/metadata.csv)")
    clips = []
    data = find_dir(root, "data")
    if data is not None and not any(find_dir(root, TRACKS[a]) for a in attributes):
        root = data  # a clone of the GitHub repository: ROOT/data/<Track>/
    for attribute in attributes:
        track = find_dir(root, TRACKS[attribute])
        if track is None:
            raise SourceError(f"{root / TRACKS[attribute]}: missing SAKURA track folder "
                              f"(expected {TRACKS[attribute]}/metadata.csv and {TRACKS[attribute]}/audio/)")
        rows = list(read_table(track / "metadata.csv", COLUMNS))
        for line, row in bar(rows, desc=f"SAKURA {TRACKS[attribute]}", leave=False):
            where = f"{track / 'metadata.csv'}:{line}"
            if not row["file"]:
                raise SourceError(f"{where}: field 'file' is empty (expected an audio file name)")
            audio = probe_audio(track / "audio" / row["file"], field=f"{track / 'metadata.csv'}:{line} file")
            clips.append(_make_clip(attribute, row, where, audio))
    log.info("SAKURA %s: %d clips", root, len(clips))
    return clips


def _read_hub(hub_id: str, attributes) -> list[LabelledClip]:
    import datasets

    clips = []
    for attribute in attributes:
        config = f"{TRACKS[attribute]}QA"
        try:
            ds = datasets.load_dataset(hub_id, config, split="test")
        except Exception as exc:
            raise SourceError(f"{hub_id}: not a local SAKURA folder, and loading it as a Hub dataset (config "
                              f"{config}, split test) failed: {exc}") from exc
        missing = [c for c in ("attribute_label", "single_instruction", "single_answer", "audio")
                   if c not in ds.column_names]
        if missing:
            raise SourceError(f"{hub_id}[{config}]: missing column(s) {missing}")
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
        for i, row in enumerate(bar(ds, desc=f"SAKURA {config}", leave=False)):
            audio_field = row["audio"]
            name = row.get("file") or (audio_field.get("path") or f"{i:06d}.wav").rsplit("/", 1)[-1]
            row = {c: str(row.get(c) or "") for c in COLUMNS + ("multi_category",)} | {"file": name}
            audio = probe_audio(f"{hub_id}/{config}/{name}", data=audio_field["bytes"], field="audio")
            clips.append(_make_clip(attribute, row, f"{hub_id}[{config}] row {i}", audio))
    return clips
