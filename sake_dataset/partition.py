"""Train/test partition: which labelled clips, Dynamic-SUPERB rows and MMLU questions each split may use.

Train and test are disjoint by audio content hash and by corpus recording id (a re-encoded copy of the same
recording is still recognised); test takes SAKURA first, train what is left (plus pools).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .labels import ATTRIBUTES, LABELS
from .records import LabelledClip, TaskClip, TextQuestion

@dataclass
class SplitPool:
    """The audio a split may use: labelled clips by attribute and label, Dynamic-SUPERB clips, MMLU questions."""

    split: str
    clips: dict[str, dict[str, list[LabelledClip]]]
    tasks: list[TaskClip]
    texts: list[TextQuestion]

    def hashes(self) -> set[str]:
        out = {c.audio.sha256 for by_label in self.clips.values() for cs in by_label.values() for c in cs}
        return out | {t.audio.sha256 for t in self.tasks}


# File-name patterns of the corpora SAKURA compiles: the same recording keeps its corpus id inside SAKURA's file
# names (e.g. "en_test_0_common_voice_en_22000163.wav"), so a re-encoded copy is still recognised.
_RECORDING_PATTERNS = (re.compile(r"common_voice_[A-Za-z-]+_\d+"), re.compile(r"\d{4}_[A-Z]{3}_[A-Z]{3}_[A-Z]{2}"),
                       re.compile(r"\d-\d+-[A-Z]-\d+"))


def clip_keys(clip: LabelledClip) -> tuple[str, ...]:
    """Identities of a clip's recording: its content hash, plus the corpus recording id found in its file name."""
    stem = clip.audio.name.rsplit(".", 1)[0]
    for pattern in _RECORDING_PATTERNS:
        m = pattern.search(stem)
        if m:
            return (clip.audio.sha256, "rec:" + m.group(0))
    return (clip.audio.sha256,)


def _unique_by_hash(clips: Iterable[LabelledClip]) -> list[LabelledClip]:
    seen: set[str] = set()
    out = []
    for clip in clips:
        keys = clip_keys(clip)
        if not seen.intersection(keys):
            seen.update(keys)
            out.append(clip)
    return out


def clip_quota(pairs: Sequence[tuple[str, str]], attribute: str) -> dict[str, int]:
    """Distinct clips a split needs per label: one edit audio per instance, and at least 2 per label (one more
    for generality types 2/3, and labels used by locality types 2/3)."""
    as_original = Counter(y_o for y_o, _ in pairs)
    return {label: max(as_original.get(label, 0), 2) for label in LABELS[attribute]}


def partition_clips(primary: Sequence[LabelledClip], extra: Sequence[LabelledClip],
                    test_quota: dict[str, dict[str, int]], train_quota: dict[str, dict[str, int]],
                    rng: random.Random) -> tuple[dict[str, dict[str, list[LabelledClip]]],
                                                 dict[str, dict[str, list[LabelledClip]]],
                                                 dict[tuple[str, str, str], tuple[int, int]]]:
    """Split labelled clips into test and train, strictly disjoint by content hash.

    Test takes its quota from `primary` (SAKURA) first, then from `extra` (pools) when SAKURA is short; train
    takes every remaining clip. Returns (test, train, shortfall) where shortfall maps (split, attribute, label)
    to (needed, available) for labels that cannot meet their quota.
    A clip counts as used by its content hash and by its corpus recording id (`clip_keys`).
    """
    test: dict[str, dict[str, list[LabelledClip]]] = {a: {label: [] for label in LABELS[a]} for a in ATTRIBUTES}
    train: dict[str, dict[str, list[LabelledClip]]] = {a: {label: [] for label in LABELS[a]} for a in ATTRIBUTES}
    shortfall: dict[tuple[str, str, str], tuple[int, int]] = {}
    by_key: dict[tuple[str, str], tuple[list[LabelledClip], list[LabelledClip]]] = defaultdict(lambda: ([], []))
    for clip in primary:
        by_key[(clip.attribute, clip.label)][0].append(clip)
    for clip in extra:
        by_key[(clip.attribute, clip.label)][1].append(clip)
    used: set[str] = set()
    for attribute in ATTRIBUTES:
        for label in LABELS[attribute]:
            first, second = by_key[(attribute, label)]
            first = _unique_by_hash(sorted(first, key=lambda c: c.audio.sha256))
            second = _unique_by_hash(sorted(second, key=lambda c: c.audio.sha256))
            rng.shuffle(first)
            rng.shuffle(second)
            want = test_quota.get(attribute, {}).get(label, 0)
            taken: list[Any] = []
            for clip in _unique_by_hash(first + second):
                if len(taken) == want:
                    break
                taken.append(clip)
                used.update(clip_keys(clip))
            test[attribute][label] = taken
            if len(taken) < want:
                shortfall[("test", attribute, label)] = (want, len(taken))
    for attribute in ATTRIBUTES:
        for label in LABELS[attribute]:
            first, second = by_key[(attribute, label)]
            rest = [c for c in _unique_by_hash(sorted(list(first) + list(second), key=lambda c: c.audio.sha256))
                    if not used.intersection(clip_keys(c))]
            rng.shuffle(rest)
            train[attribute][label] = rest
            want = train_quota.get(attribute, {}).get(label, 0)
            if len(rest) < want:
                shortfall[("train", attribute, label)] = (want, len(rest))
    return test, train, shortfall


def partition_by_hash(items: Sequence[Any], hash_of: Callable[[Any], str], assigned: dict[str, str], test_share: float,
                      rng: random.Random) -> tuple[list[Any], list[Any]]:
    """Split items (tasks clips, texts) into (test, train) by content hash, keeping hashes already assigned to a
    split there; new hashes go to test with probability ~test_share (exact proportion, seeded order)."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        groups[hash_of(item)].append(item)
    keys = sorted(groups)
    rng.shuffle(keys)
    free = [k for k in keys if k not in assigned]
    n_test = round(len(free) * test_share)
    if free and n_test == 0 and test_share > 0:
        n_test = 1
    if len(free) > 1 and n_test == len(free) and test_share < 1:
        n_test -= 1
    split_of = dict(assigned)
    for i, key in enumerate(free):
        split_of[key] = "test" if i < n_test else "train"
    test = [x for k in keys if split_of[k] == "test" for x in groups[k]]
    train = [x for k in keys if split_of[k] == "train" for x in groups[k]]
    return test, train


