"""Labelled-audio pools: the corpora SAKURA was built from (and any labelled folder/CSV/Hub dataset), used for the
audio SAKURA alone cannot give (train, extra generality/locality audio).

Presets and the exact layout each expects (PATH is what `--pool PRESET=PATH` names):

- `crema_d`: `PATH/AudioWAV/{ActorID}_{Sentence}_{EMO}_{Level}.wav` (or the .wav files directly in PATH).
  Emotion from EMO: ANG angry, DIS disgust, FEA fear, HAP happy, SAD sad; NEU (neutral) is not a SAKE label and
  is dropped and counted. When `PATH/VideoDemographics.csv` (columns `ActorID`, `Sex`) exists, every clip also
  counts for gender (Male/Female).
- `esc50`: `PATH/meta/esc50.csv` (columns `filename`, `category`) + `PATH/audio/{filename}`; the nine SAKE
  animals are ESC-50 categories, every other category is dropped and counted.
- `commonvoice`: `PATH/validated.tsv` (tab-separated, columns `path`, `gender`, `locale`; a PATH that is a .tsv
  file is read directly, its clips next to it) + `PATH/clips/{path}`. A clip counts for gender only when its
  `gender` field is set (male*/female*; other values dropped and counted) and for language by `locale`
  (en, de, es, fr, it, zh-*, ja, ko; other locales dropped and counted).
- `animal_sound_dataset`: class folders `PATH/{Class}/*.wav` (Şaşmaz & Tek, 2018); class names are mapped to SAKE
  labels (Chicken -> hen, Dog -> dog, ...), other classes (Bird, Donkey, Lion, Monkey, ...) dropped and counted.
- `folder`: PATH is a mapping YAML `{root, attribute, labels: {folder name: SAKE label}}`; audio in
  `root/{folder name}/*`.
- `csv`: PATH is a mapping YAML `{table, audio_dir, file_column, label_column, attribute | attribute_column,
  labels: {raw: SAKE label}, delimiter}`; or `{hub, config, split, audio_column, label_column, attribute,
  labels}` for a Hub dataset (needs network). Paths in the YAML are relative to the YAML file.
In `labels`, a raw label mapped to null is dropped; unmapped raw labels are matched case-insensitively to the
SAKE labels, else dropped and counted. At most `limit_per_label` clips per label are kept (first in sorted file
order), so a large corpus is not probed in full.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import yaml
from sake_dataset.progress import bar

from ..audio import probe_audio
from ..records import LabelledClip, SourceError
from ..labels import ATTRIBUTES, LABELS
from .common import read_table, read_text, require_file

log = logging.getLogger(__name__)

PRESETS = ("crema_d", "esc50", "commonvoice", "animal_sound_dataset", "folder", "csv")
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg"}
CREMA_EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "SAD": "sad", "NEU": None}
CREMA_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
CV_LOCALES = {"en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian", "zh": "Chinese",
              "ja": "Japanese", "ko": "Korean"}
ANIMAL_SOUND_CLASSES = {"chicken": "hen", "hen": "hen", "rooster": "rooster", "dog": "dog", "cat": "cat",
                        "cow": "cow", "frog": "frog", "sheep": "sheep", "pig": "pig", "crow": "crow"}
DEFAULT_LIMIT = 5000


@dataclass
class PoolReport:
    """What a pool gave: clips with canonical labels, and the dropped raw labels with their counts."""

    preset: str
    path: str
    clips: list[LabelledClip] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    def counts(self) -> dict[tuple[str, str], int]:
        return dict(Counter((c.attribute, c.label) for c in self.clips))


def strict_label(attribute: str, raw: str) -> str | None:
    """Exact, case-insensitive match of a raw label to a SAKE label of `attribute`."""
    key = raw.strip().lower()
    return next((label for label in LABELS[attribute] if label.lower() == key), None)


class _Collector:
    """Accumulates (attribute, label, file) candidates, applies the per-label limit, then probes the audio."""

    def __init__(self, preset: str, path: Path, limit: int):
        self.report = PoolReport(preset, str(path))
        self.limit = limit
        self.candidates: dict[tuple[str, str], list[tuple[str, Path]]] = defaultdict(list)

    def add(self, attribute: str, label: str | None, raw: str, file: Path, rel: str) -> None:
        if label is None:
            self.report.dropped[f"{attribute}:{raw}"] += 1
        else:
            self.candidates[(attribute, label)].append((rel, file))

    def finish(self) -> PoolReport:
        todo = []
        for key in sorted(self.candidates):
            todo += [(key, rel, file) for rel, file in sorted(self.candidates[key])[: self.limit]]
        for (attribute, label), rel, file in bar(todo, desc=f"pool {self.report.preset}", leave=False):
            audio = probe_audio(file, field=f"{self.report.preset} audio file")
            self.report.clips.append(LabelledClip(attribute=attribute, label=label, audio=audio,
                                                  source=f"{self.report.preset}:{rel}", origin=self.report.preset))
        if self.report.dropped:
            log.info("pool %s: dropped (not SAKE labels) %s", self.report.preset, dict(self.report.dropped))
        log.info("pool %s %s: %d clips", self.report.preset, self.report.path, len(self.report.clips))
        return self.report


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def read_crema_d(path: Path, limit: int = DEFAULT_LIMIT) -> PoolReport:
    folder = path / "AudioWAV" if (path / "AudioWAV").is_dir() else path
    if not folder.is_dir():
        raise SourceError(f"{path}: missing folder (expected CREMA-D AudioWAV/ with {{Actor}}_{{Sentence}}_{{EMO}}_"
                          "{Level}.wav files)")
    files = _audio_files(folder)
    if not files:
        raise SourceError(f"{folder}: no audio file found (expected CREMA-D AudioWAV/*.wav)")
    sex: dict[str, str] = {}
    demo = path / "VideoDemographics.csv"
    if demo.is_file():
        for _line, row in read_table(demo, ("ActorID", "Sex")):
            sex[row["ActorID"].strip()] = row["Sex"].strip()
    col = _Collector("crema_d", path, limit)
    for file in files:
        m = CREMA_NAME.match(file.stem)
        if not m:
            raise SourceError(f"{file}: file name field does not match CREMA-D '{{ActorID}}_{{Sentence}}_{{EMO}}_"
                              "{Level}' (e.g. 1001_DFA_ANG_XX.wav)")
        actor, _, code, _ = m.groups()
        if code not in CREMA_EMOTIONS:
            raise SourceError(f"{file}: emotion code field {code!r} is not a CREMA-D code "
                              f"({', '.join(CREMA_EMOTIONS)})")
        rel = f"AudioWAV/{file.name}" if folder != path else file.name
        col.add("emotion", CREMA_EMOTIONS[code], code, file, rel)
        if actor in sex:
            col.add("gender", strict_label("gender", sex[actor]), sex[actor], file, rel)
    return col.finish()


def read_esc50(path: Path, limit: int = DEFAULT_LIMIT) -> PoolReport:
    meta = require_file(path / "meta" / "esc50.csv", "ESC-50 meta/esc50.csv with columns filename, category")
    col = _Collector("esc50", path, limit)
    for line, row in read_table(meta, ("filename", "category")):
        if not row["filename"].strip():
            raise SourceError(f"{meta}:{line}: field 'filename' is empty")
        file = path / "audio" / row["filename"].strip()
        raw = row["category"].strip()
        label = strict_label("animal", raw)
        if label is not None and not file.is_file():
            raise SourceError(f"{file}: missing audio file named in {meta}:{line} field 'filename'")
        col.add("animal", label, raw, file, f"audio/{row['filename'].strip()}")
    return col.finish()


def _cv_gender(raw: str) -> str | None:
    key = raw.strip().lower()
    if key.startswith("male"):
        return "male"
    if key.startswith("female"):
        return "female"
    return None


def read_commonvoice(path: Path, limit: int = DEFAULT_LIMIT) -> PoolReport:
    table = path if path.is_file() else path / "validated.tsv"
    clips_dir = table.parent / "clips"
    require_file(table, "a Common Voice validated.tsv with columns path, gender, locale")
    col = _Collector("commonvoice", path, limit)
    for line, row in read_table(table, ("path", "gender", "locale"), delimiter="\t"):
        name = row["path"].strip()
        if not name:
            raise SourceError(f"{table}:{line}: field 'path' is empty")
        file = clips_dir / name
        gender_raw, locale = row["gender"].strip(), row["locale"].strip()
        if gender_raw:
            col.add("gender", _cv_gender(gender_raw), gender_raw, file, f"clips/{name}")
        language = CV_LOCALES.get(locale.split("-")[0].lower()) if locale else None
        col.add("language", language, locale or "<empty locale>", file, f"clips/{name}")
    return col.finish()


def read_animal_sound_dataset(path: Path, limit: int = DEFAULT_LIMIT) -> PoolReport:
    if not path.is_dir():
        raise SourceError(f"{path}: missing folder (expected Animal-Sound Dataset class folders {{Class}}/*.wav)")
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    if not classes:
        raise SourceError(f"{path}: no class folder found (expected {{Class}}/*.wav, e.g. Dog/, Chicken/)")
    col = _Collector("animal_sound_dataset", path, limit)
    for cls in classes:
        label = ANIMAL_SOUND_CLASSES.get(cls.name.strip().lower())
        for file in _audio_files(cls):
            col.add("animal", label, cls.name, file, f"{cls.name}/{file.name}")
    return col.finish()


def _load_mapping(path: Path) -> dict:
    try:
        data = yaml.safe_load(read_text(path, "a pool mapping YAML")) or {}
    except yaml.YAMLError as exc:
        raise SourceError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a YAML mapping")
    return data


def _mapper(mapping: dict, where: Path) -> Callable[[str, str], str | None]:
    labels = mapping.get("labels") or {}
    for raw, target in labels.items():
        if target is not None:
            attrs = [a for a in ATTRIBUTES if target in LABELS[a]]
            if not attrs:
                raise SourceError(f"{where}: field 'labels' maps {raw!r} to {target!r}, which is not a SAKE label")

    def apply(attribute: str, raw: str) -> str | None:
        if raw in labels:
            target = labels[raw]
            return target if target in LABELS[attribute] else None
        return strict_label(attribute, raw)

    return apply


def _attribute(value, where: Path, field_name: str = "attribute") -> str:
    if value not in ATTRIBUTES:
        raise SourceError(f"{where}: field '{field_name}' must be one of {list(ATTRIBUTES)}, got {value!r}")
    return value


def read_folder_pool(mapping_path: Path, limit: int = DEFAULT_LIMIT) -> PoolReport:
    mapping = _load_mapping(mapping_path)
    root = (mapping_path.parent / str(mapping.get("root", "."))).resolve()
    attribute = _attribute(mapping.get("attribute"), mapping_path)
    if not root.is_dir():
        raise SourceError(f"{mapping_path}: field 'root' points to {root}, which is not a folder")
    to_label = _mapper(mapping, mapping_path)
    col = _Collector("folder", root, limit)
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        label = to_label(attribute, cls.name)
        for file in _audio_files(cls):
            col.add(attribute, label, cls.name, file, f"{cls.name}/{file.name}")
    return col.finish()


def read_csv_pool(mapping_path: Path, limit: int = DEFAULT_LIMIT) -> PoolReport:
    mapping = _load_mapping(mapping_path)
    to_label = _mapper(mapping, mapping_path)
    if mapping.get("hub"):
        return _read_hub_pool(mapping, mapping_path, to_label, limit)
    for key in ("table", "file_column", "label_column"):
        if not mapping.get(key):
            raise SourceError(f"{mapping_path}: missing field '{key}'")
    table = (mapping_path.parent / str(mapping["table"])).resolve()
    audio_dir = (mapping_path.parent / str(mapping.get("audio_dir", Path(mapping["table"]).parent))).resolve()
    attr_col = str(mapping.get("attribute_column") or "")
    fixed = None if attr_col else _attribute(mapping.get("attribute"), mapping_path)
    required = [mapping["file_column"], mapping["label_column"]] + ([attr_col] if attr_col else [])
    col = _Collector("csv", table.parent, limit)
    for line, row in read_table(table, required, delimiter=str(mapping.get("delimiter", ","))):
        attribute = fixed or _attribute(row[attr_col].strip().lower(), Path(f"{table}:{line}"), attr_col)
        raw = row[mapping["label_column"]].strip()
        name = row[mapping["file_column"]].strip()
        if not name:
            raise SourceError(f"{table}:{line}: field '{mapping['file_column']}' is empty")
        col.add(attribute, to_label(attribute, raw), raw, audio_dir / name, name)
    return col.finish()


def _read_hub_pool(mapping: dict, where: Path, to_label, limit: int) -> PoolReport:
    import datasets

    attribute = _attribute(mapping.get("attribute"), where)
    ds = datasets.load_dataset(mapping["hub"], mapping.get("config"), split=mapping.get("split", "train"))
    audio_col, label_col = mapping.get("audio_column", "audio"), mapping.get("label_column", "label")
    ds = ds.cast_column(audio_col, datasets.Audio(decode=False))
    report = PoolReport("csv", str(mapping["hub"]))
    per_label: Counter = Counter()
    for i, row in enumerate(ds):
        raw = str(row[label_col])
        label = to_label(attribute, raw)
        if label is None:
            report.dropped[f"{attribute}:{raw}"] += 1
            continue
        if per_label[label] >= limit:
            continue
        per_label[label] += 1
        name = (row[audio_col].get("path") or f"{i:08d}.wav").rsplit("/", 1)[-1]
        audio = probe_audio(f"{mapping['hub']}/{name}", data=row[audio_col]["bytes"], field=audio_col)
        report.clips.append(LabelledClip(attribute, label, audio, f"hub:{mapping['hub']}/{name}", "csv"))
    return report


READERS: dict[str, Callable[[Path, int], PoolReport]] = {
    "crema_d": read_crema_d, "esc50": read_esc50, "commonvoice": read_commonvoice,
    "animal_sound_dataset": read_animal_sound_dataset, "folder": read_folder_pool, "csv": read_csv_pool,
}


def read_pool(preset: str, path: str | Path, limit_per_label: int = DEFAULT_LIMIT) -> PoolReport:
    """Read one pool with a preset (see the module docstring for each layout)."""
    if preset not in READERS:
        raise SourceError(f"--pool {preset}={path}: unknown preset {preset!r} (expected one of {list(PRESETS)})")
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: missing pool path for preset {preset!r}")
    return READERS[preset](path, limit_per_label)


def read_pools(specs: Iterable[tuple[str, str]], limit_per_label: int = DEFAULT_LIMIT) -> list[PoolReport]:
    return [read_pool(preset, path, limit_per_label) for preset, path in specs]
