"""Construction rules (§3.3, §4.2): balanced edit pairs, the items of one edit instance (generality types 1-3,
audio locality types 1-4, text locality, portability), sequences, and the per-instance checks.

Everything here is a pure function of normalized records (`sake_dataset.records`) and seeded random generators.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import AbstractSet, Any, Sequence

from .dsuperb_tasks import TaskTable, load_task_table
from .knowledge import PortabilityCategory, QuestionBank
from .labels import ATTRIBUTES, LABELS, canonical_label, format_question, option_for_label, split_options
from .partition import SplitPool
from .portability import MULTI_HOP_MARK, PortabilityBank
from .records import ConstructionError, LabelledClip, TaskClip
from .schema import expected_kinds, item_rows

log = logging.getLogger(__name__)

def make_edit_pairs(attribute: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n (y_o, y_e) pairs with y_o != y_e, every label within ±1 of n/K both as y_o and as y_e (§3.3).

    Built from cycles: a random permutation of the K labels gives y_o, the same permutation rotated by a random
    offset gives y_e, so each full cycle uses each label once on each side; the last partial cycle takes r
    consecutive labels as y_o and the next r as y_e. The pairs are then shuffled.
    """
    labels = list(LABELS[attribute])
    k = len(labels)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        perm = labels[:]
        rng.shuffle(perm)
        r = min(k, n - len(pairs))
        if r == k:
            shift = rng.randrange(1, k)
            pairs += [(perm[i], perm[(i + shift) % k]) for i in range(k)]
        else:
            pairs += [(perm[i], perm[(i + 1) % k]) for i in range(r)]
    rng.shuffle(pairs)
    return pairs



def clip_question(clip: LabelledClip, banks: dict[str, QuestionBank],
                  rng: random.Random) -> tuple[str, tuple[str, ...], str]:
    """(stem, options, answer option text) of a clip's attribute question: SAKURA's own, or for pool clips the
    bank question with SAKURA-style options (true label + random other labels, shuffled)."""
    if clip.question:
        stem, options = split_options(clip.question)
        if options:
            return stem, options, clip.answer or clip.label
    bank = banks[clip.attribute]
    others = [label for label in LABELS[clip.attribute] if label != clip.label]
    choices = [clip.label] + rng.sample(others, min(len(others), bank.n_options - 1))
    rng.shuffle(choices)
    return bank.question, tuple(choices), clip.label


def edit_options(clip: LabelledClip, target: str, banks: dict[str, QuestionBank],
                 rng: random.Random) -> tuple[str, tuple[str, ...], str]:
    """The edit question for clip (label y_o) and target y_e: the clip's question, its options made to contain
    y_e (a distractor that is neither y_o nor y_e is replaced in place when needed). Returns (stem, options,
    answer) with answer = y_e as spelled in the options."""
    stem, given, _ = clip_question(clip, banks, rng)
    options = list(given)
    if option_for_label(clip.attribute, options, clip.label) is None:
        raise ConstructionError(f"{clip.source}: field 'single_instruction' has no option for its label "
                                f"{clip.label!r}: {options}")
    idx = option_for_label(clip.attribute, options, target)
    if idx is None:
        free = [i for i, o in enumerate(options) if canonical_label(clip.attribute, o) != clip.label]
        spelled = target
        if options and all(o[:1].isupper() for o in options):
            spelled = target[:1].upper() + target[1:]
        if free:
            idx = rng.choice(free)
            options[idx] = spelled
        else:
            options.append(spelled)
            idx = len(options) - 1
    return stem, tuple(options), options[idx]


def _item(kind: str, inst_id: str, *, audio, question: str, options: Sequence[str], answer: str, attribute: str,
          label: str = "", category: str = "", source: str = "", type_: int = 0) -> dict[str, Any]:
    item = {"id": f"{inst_id}/{kind}", "type": type_}
    if audio is not None:
        item["audio"] = audio
    item.update({"question": question, "options": list(options), "answer": answer, "attribute": attribute,
                 "label": label, "category": category, "source": source})
    return item


class _Cycler:
    """Draws items from a list in a seeded shuffled order, reshuffling when exhausted (spreads reuse evenly)."""

    def __init__(self, items: Sequence[Any], rng: random.Random):
        self.items, self.rng = list(items), rng
        self.queue: list[Any] = []

    def draw(self, accept=lambda x: True) -> Any | None:
        for _ in range(2):
            for i, x in enumerate(self.queue):
                if accept(x):
                    return self.queue.pop(i)
            self.queue = self.items[:]
            self.rng.shuffle(self.queue)
        return None


@dataclass
class InstanceBuilder:
    """Builds instance rows of one split from its `SplitPool` (audio fields are `AudioRef`s until written)."""

    pool: SplitPool
    banks: dict[str, QuestionBank]
    knowledge: dict[str, dict[str, PortabilityCategory]]
    rng: random.Random
    tasks: TaskTable | None = None  # Dynamic-SUPERB task -> attributes (type-4 exclusion); None: the checked-in table
    multi_hop: PortabilityBank | None = None  # SAKURA multi-hop questions; None: curated knowledge only
    portability_mode: str = "auto"  # auto: SAKURA multi-hop when eligible, else curated; sakura; curated

    def __post_init__(self):
        self._label_cyclers = {(a, label): _Cycler(cs, self.rng)
                               for a, by_label in self.pool.clips.items() for label, cs in by_label.items()}
        self._texts = _Cycler(self.pool.texts, self.rng)
        self._tasks_for: dict[str, _Cycler] = {}
        self._multi_hop_for: dict[tuple[str, str, str], _Cycler] = {}
        if self.tasks is None:
            self.tasks = load_task_table()
        self._questions: dict[str, tuple[str, tuple[str, ...], str]] = {}

    # -- helpers
    def question_of(self, clip: LabelledClip) -> tuple[str, tuple[str, ...], str]:
        key = f"{clip.attribute}:{clip.source}"
        if key not in self._questions:
            self._questions[key] = clip_question(clip, self.banks, random.Random(key))
        return self._questions[key]

    def draw_clip(self, attribute: str, labels: Sequence[str], exclude: set[str], why: str) -> LabelledClip:
        labels = [label for label in labels if self.pool.clips[attribute].get(label)]
        if not labels:
            raise ConstructionError(f"{self.pool.split}: no {attribute} clip available for {why}")
        for label in self.rng.sample(labels, len(labels)):
            clip = self._label_cyclers[(attribute, label)].draw(lambda c: c.audio.sha256 not in exclude)
            if clip is not None:
                return clip
        raise ConstructionError(f"{self.pool.split}: every {attribute} clip with label in {labels} is excluded "
                                f"for {why}; add audio for these labels")

    def _audio_item(self, kind: str, inst_id: str, clip: LabelledClip, type_: int) -> dict[str, Any]:
        stem, options, answer = self.question_of(clip)
        return _item(kind, inst_id, audio=clip.audio, question=format_question(stem, options), options=options,
                     answer=answer, attribute=clip.attribute, label=clip.label, source=clip.source, type_=type_)

    def locality_audio(self, inst_id: str, attribute: str, y_o: str, y_e: str, edit_hash: str,
                       banned_labels: AbstractSet[str] = frozenset()) -> list[dict[str, Any]]:
        """Audio-locality items types 1-4; labels in `banned_labels` are never used (§4.2 rule 2)."""
        exclude = {edit_hash}
        items = []
        others = [a for a in ATTRIBUTES if a != attribute]
        for other in self.rng.sample(others, len(others)):
            ok = [label for label in LABELS[other] if label not in banned_labels and self.pool.clips[other][label]]
            if ok:
                clip = self.draw_clip(other, ok, exclude, "audio locality type 1")
                break
        else:
            raise ConstructionError(f"{inst_id}: no clip of another attribute is left for audio locality type 1")
        items.append(self._audio_item("loc_audio1", inst_id, clip, 1))
        if attribute != "gender":
            ok = [label for label in LABELS[attribute] if label not in {y_o, y_e} | set(banned_labels)]
            clip = self.draw_clip(attribute, ok, exclude, f"audio locality type 2 of {inst_id}")
            items.append(self._audio_item("loc_audio2", inst_id, clip, 2))
        clip = self.draw_clip(attribute, [y_e], exclude, f"audio locality type 3 of {inst_id}")
        items.append(self._audio_item("loc_audio3", inst_id, clip, 3))
        task = self.draw_task(attribute, banned_labels, inst_id)
        _, task_options = split_options(task.instruction)
        items.append(_item("loc_audio4", inst_id, audio=task.audio, question=task.instruction,
                           options=task_options, answer=task.label, attribute=f"dsuperb:{task.task}",
                           label=task.label, source=task.source, type_=4))
        return items

    def draw_task(self, attribute: str, banned_labels: AbstractSet[str], inst_id: str) -> TaskClip:
        if attribute not in self._tasks_for:
            tasks = self.tasks
            assert tasks is not None  # loaded when the constructor was built
            allowed = [t for t in self.pool.tasks if tasks.allowed(t.task, t.instruction, attribute)]
            self._tasks_for[attribute] = _Cycler(allowed, self.rng)
        banned = {b.lower() for b in banned_labels}
        task = self._tasks_for[attribute].draw(lambda t: t.label.strip().lower() not in banned)
        if task is None:
            raise ConstructionError(f"{self.pool.split}: no Dynamic-SUPERB task unrelated to '{attribute}' is "
                                    f"available for audio locality type 4 of {inst_id} (tasks missing from the "
                                    "task table are left out unless --allow-unlisted-tasks)")
        return task

    def text_item(self, inst_id: str) -> dict[str, Any]:
        q = self._texts.draw()
        if q is None:
            raise ConstructionError(f"{self.pool.split}: no MMLU question available for text locality")
        return _item("loc_text", inst_id, audio=None, question=format_question(q.question, q.choices),
                     options=q.choices, answer=q.choices[q.answer_index], attribute=f"mmlu:{q.subject}",
                     source=q.source)

    def portability_item(self, inst_id: str, attribute: str, clip: LabelledClip, y_o: str, y_e: str
                         ) -> dict[str, Any]:
        """A question probing y_e's linked knowledge, asked of the edit audio: a SAKURA multi-hop question about a
        y_e clip (modes auto/sakura), else the curated knowledge (modes auto/curated); answers that also hold for
        y_o are excluded."""
        if self.portability_mode != "curated" and self.multi_hop is not None:
            key = (attribute, y_o, y_e)
            if key not in self._multi_hop_for:
                self._multi_hop_for[key] = _Cycler(self.multi_hop.eligible(attribute, y_o, y_e), self.rng)
            q = self._multi_hop_for[key].draw()
            if q is not None:
                return _item("port", inst_id, audio=clip.audio, question=format_question(q.stem, q.options),
                             options=q.options, answer=q.answer, attribute=attribute, label=y_o,
                             category=q.category, source=clip.source + MULTI_HOP_MARK + q.source)
        if self.portability_mode == "sakura":
            raise ConstructionError(f"{inst_id}: SAKURA has no multi-hop question about a {y_e!r} clip whose answer "
                                    f"does not also hold for {y_o!r} (portability mode 'sakura'; 'auto' falls back "
                                    "to sake_dataset/portability_knowledge.yaml)")
        return self._curated_portability_item(inst_id, attribute, clip, y_o, y_e)

    def _curated_portability_item(self, inst_id: str, attribute: str, clip: LabelledClip, y_o: str, y_e: str
                                  ) -> dict[str, Any]:
        cats = self.knowledge[attribute]
        eligible = sorted(c for c, k in cats.items()
                          if k.answers[y_e].strip().lower() != k.answers[y_o].strip().lower())
        if not eligible:
            raise ConstructionError(f"portability_knowledge.yaml: no category of '{attribute}' separates "
                                    f"{y_o!r} from {y_e!r}")
        name = self.rng.choice(eligible)
        cat = cats[name]
        truth = cat.answers[y_e]
        true_set = {truth.lower(), *(a.lower() for a in cat.alternatives.get(y_e, ()))}
        pool = [cat.answers[y_o]]
        others = [label for label in LABELS[attribute] if label not in (y_o, y_e)]
        pool += [cat.answers[label] for label in self.rng.sample(others, len(others))]
        for label in sorted(cat.alternatives):
            if label != y_e:
                alts = list(cat.alternatives[label])
                pool += self.rng.sample(alts, len(alts))
        distractors: list[str] = []
        for text in pool:
            if text.lower() not in true_set and text.lower() not in {d.lower() for d in distractors}:
                distractors.append(text)
        options = [truth] + distractors[:3]
        self.rng.shuffle(options)
        question = self.rng.choice(cat.questions)
        return _item("port", inst_id, audio=clip.audio, question=format_question(question, options),
                     options=options, answer=truth, attribute=attribute, label=y_o, category=name,
                     source=clip.source)

    # -- instances
    def instance(self, inst_id: str, attribute: str, clip: LabelledClip, y_e: str, with_portability: bool
                 ) -> dict[str, Any]:
        y_o = clip.label
        stem, options, answer = edit_options(clip, y_e, self.banks, self.rng)
        question = format_question(stem, options)
        bank = self.banks[attribute]
        paraphrases = ([p for p in bank.paraphrases if p.strip().lower() != stem.strip().lower()]
                       or list(bank.paraphrases))
        para = format_question(self.rng.choice(paraphrases), options)
        alt = self.draw_clip(attribute, [y_o], {clip.audio.sha256}, f"generality type 2 of {inst_id}")
        gen = [
            _item("gen1", inst_id, audio=clip.audio, question=para, options=options, answer=answer,
                  attribute=attribute, label=y_o, source=clip.source, type_=1),
            _item("gen2", inst_id, audio=alt.audio, question=question, options=options, answer=answer,
                  attribute=attribute, label=y_o, source=alt.source, type_=2),
            _item("gen3", inst_id, audio=alt.audio, question=para, options=options, answer=answer,
                  attribute=attribute, label=y_o, source=alt.source, type_=3),
        ]
        row = {
            "id": inst_id, "attribute": attribute, "split": self.pool.split, "original_label": y_o,
            "target_label": y_e, "audio": clip.audio, "question": question, "options": list(options),
            "answer": answer, "source": clip.source, "generality": gen,
            "locality_audio": self.locality_audio(inst_id, attribute, y_o, y_e, clip.audio.sha256),
            "locality_text": [self.text_item(inst_id)],
            "portability": [self.portability_item(inst_id, attribute, clip, y_o, y_e)] if with_portability else [],
        }
        return row


def build_attribute_split(builder: InstanceBuilder, attribute: str, pairs: Sequence[tuple[str, str]]
                          ) -> list[dict[str, Any]]:
    """Instance rows of one attribute and split: one distinct edit clip (label y_o) per pair."""
    split = builder.pool.split
    queues = {}
    for label in LABELS[attribute]:
        clips = list(builder.pool.clips[attribute][label])
        queues[label] = clips
    rows = []
    for index, (y_o, y_e) in enumerate(pairs):
        if not queues[y_o]:
            raise ConstructionError(f"{split}: not enough distinct '{attribute}' clips labelled {y_o!r} for the "
                                    f"edit audio of {len(pairs)} instances")
        clip = queues[y_o].pop(0)
        inst_id = f"{attribute}/{split}/{index:06d}"
        rows.append(builder.instance(inst_id, attribute, clip, y_e, with_portability=(split == "test")))
    return rows


# --------------------------------------------------------------------------------------------------- sequences

def sample_sequences(instances: Sequence[dict[str, Any]], n_sequences: int, length: int, rng: random.Random,
                     max_nodes: int = 200_000) -> list[list[dict[str, Any]]]:
    """Pick `n_sequences` sequences of `length` instances with editing-pair independence (§4.2 rule 1): within a
    sequence every label appears at most once over all y_o and y_e. Instances not used by an earlier sequence are
    preferred. Raises ConstructionError when no such sequence exists (or none is found in the search budget)."""
    used: set[str] = set()
    sequences = []
    for s in range(n_sequences):
        order = list(instances)
        rng.shuffle(order)
        order.sort(key=lambda r: r["id"] in used)  # stable: unused first, random within
        chosen: list[dict[str, Any]] = []
        nodes = 0

        def search(start: int, labels: set[str]) -> bool:
            nonlocal nodes
            if len(chosen) == length:
                return True
            for i in range(start, len(order)):
                nodes += 1
                if nodes > max_nodes:
                    return False
                row = order[i]
                pair = {row["original_label"], row["target_label"]}
                if pair & labels:
                    continue
                chosen.append(row)
                if search(i + 1, labels | pair):
                    return True
                chosen.pop()
            return False

        if not search(0, set()):
            distinct = {(r["original_label"], r["target_label"]) for r in instances}
            raise ConstructionError(
                f"cannot sample sequence {s + 1} of {n_sequences}: no {length} edits with all labels distinct "
                f"(editing-pair independence) among {len(instances)} instances ({len(distinct)} distinct pairs); "
                f"24 labels allow at most 11 edits per sequence. Lower --sequence-length or change --seed.")
        rng.shuffle(chosen)
        used.update(r["id"] for r in chosen)
        sequences.append(chosen)
    return sequences


def _reid(items: list[dict[str, Any]], old: str, new: str) -> list[dict[str, Any]]:
    return [{**it, "id": new + it["id"][len(old):]} for it in items]


def build_sequential(builder: InstanceBuilder, instances: Sequence[dict[str, Any]], n_sequences: int,
                     length: int) -> list[dict[str, Any]]:
    """Sequential rows: sampled sequences, ids re-based, audio-locality items re-drawn so that none involves an
    original label of any edit in the sequence (§4.2 rule 2)."""
    split = builder.pool.split
    rows = []
    for s, seq in enumerate(sample_sequences(instances, n_sequences, length, builder.rng), start=1):
        originals = {r["original_label"] for r in seq}
        for step, inst in enumerate(seq, start=1):
            new_id = f"sequential/{split}/seq{s:02d}/step{step:02d}"
            old_id = inst["id"]
            loc = builder.locality_audio(new_id, inst["attribute"], inst["original_label"], inst["target_label"],
                                         inst["audio"].sha256, banned_labels=originals)
            rows.append({**inst, "id": new_id, "generality": _reid(inst["generality"], old_id, new_id),
                         "locality_audio": loc, "locality_text": _reid(inst["locality_text"], old_id, new_id),
                         "portability": _reid(inst["portability"], old_id, new_id), "sequence_id": f"seq{s:02d}",
                         "step": step, "source_instance": old_id})
    return rows


# --------------------------------------------------------------------------------------------------- checks

def check_instance(row: dict[str, Any], tasks: TaskTable | None = None) -> None:
    """Per-instance identities (Table 1 composition and the construction rules); raises ConstructionError."""
    tasks = tasks or load_task_table()
    attribute, split = row["attribute"], row["split"]
    kinds = tuple(it["id"].rsplit("/", 1)[1] for it in item_rows(row))
    want = expected_kinds(attribute, split)
    problems = []
    if kinds != want:
        problems.append(f"item kinds {kinds} != {want}")
    y_o, y_e = row["original_label"], row["target_label"]
    if y_o == y_e or y_o not in LABELS[attribute] or y_e not in LABELS[attribute]:
        problems.append(f"bad pair {y_o!r}->{y_e!r}")
    for it in row["locality_audio"]:
        if it["type"] == 1 and (it["attribute"] == attribute or it["attribute"].startswith("dsuperb:")):
            problems.append("type-1 locality must probe another attribute")
        if it["type"] == 2 and it["label"] in (y_o, y_e):
            problems.append("type-2 locality label must differ from y_o and y_e")
        if it["type"] == 3 and it["label"] != y_e:
            problems.append("type-3 locality label must be y_e")
        if it["type"] == 4 and not tasks.allowed(it["attribute"].split(":", 1)[1], it["question"], attribute):
            problems.append("type-4 locality task is about the edited attribute (or missing from the task table)")
    if row["answer"] not in row["options"]:
        problems.append("answer not among options")
    if problems:
        raise ConstructionError(f"{row['id']}: " + "; ".join(problems))
