"""SAKURA's public metadata (`tests/fixtures/sakura`: the four `data/<Track>/metadata.csv` of the GitHub release,
text only, see its README): the reader takes the release's layout, every multi-hop question gets one of the
paper's App. I.1 categories by the rule, and portability drops the items whose answer SAKURA also gives for the
original label (issue 25, item 5)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
from _dataset_helpers import TRACKS, write_dynamic_superb, write_mmlu

from sake_dataset.builder import build
from sake_dataset.knowledge import load_portability
from sake_dataset.labels import LABELS
from sake_dataset.portability import (CATEGORIES, MultiHopQuestion, PortabilityBank, categorize, multi_hop_questions,
                                      normalize_answer)
from sake_dataset.sources import read_sakura
from sake_dataset.sources.common import read_table

FIXTURES = Path(__file__).parent / "fixtures"
SAKURA = FIXTURES / "sakura"
# Usable multi-hop questions per category on the fixture (500 per track; SAKURA balances its categories).
CATEGORY_COUNTS = {
    "animal": {"behavior": 63, "care_item": 63, "diet": 62, "family": 63, "locomotion": 62, "physical": 63,
               "reproduction": 62, "vocalization": 62},
    "emotion": {"descriptive_sentence": 125, "facial_expression": 125, "scenario": 125, "social_interaction": 125},
    "gender": {"history": 100, "celebrity": 100, "cloth": 100, "title": 100, "vocal": 100},
    "language": {"iso": 56, "city": 56, "dish": 55, "history": 56, "language_family": 55, "literary": 55,
                 "official_language": 56, "test": 56, "translation": 55},
}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The fixture laid out as a clone of the GitHub repository (`data/<Track>/metadata.csv`), with a short
    unique WAV written for every row's `file` under `data/<Track>/audio/` (the release's audio is not kept)."""
    root = tmp_path_factory.mktemp("sakura_clone")
    shutil.copytree(SAKURA / "data", root / "data")
    for track in TRACKS.values():
        (root / "data" / track / "audio").mkdir()
        for i, (_, row) in enumerate(read_table(root / "data" / track / "metadata.csv", ["file"])):
            (root / "data" / track / "audio" / row["file"]).write_bytes(_tiny_wav(f"{track}/{i}"))
    return root


def _tiny_wav(key: str) -> bytes:
    """0.1 s of 8 kHz 16-bit PCM, its samples derived from `key` (every file its own content hash)."""
    digest = hashlib.sha256(key.encode()).digest()
    pcm = (digest * 50)[:1600]
    return (b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000,
                                                                                  2, 16)
            + b"data" + struct.pack("<I", len(pcm)) + pcm)


@pytest.fixture(scope="module")
def questions(clone) -> list[MultiHopQuestion]:
    found, skipped = multi_hop_questions(read_sakura(clone))
    assert not skipped
    return found


@pytest.fixture(scope="module")
def bank(questions) -> PortabilityBank:
    return PortabilityBank(questions, load_portability())


def reviewed_categories() -> list[tuple[str, str, str]]:
    """(attribute, category, question stem) of `fixtures/sakura_question_categories.tsv` (reviewed by hand)."""
    lines = (FIXTURES / "sakura_question_categories.tsv").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


# ------------------------------------------------------------------------------------------------ reader

def test_reader_takes_the_release_layout(clone):
    clips = read_sakura(clone)  # the repository root: tracks under data/
    tracks = read_sakura(clone / "data", attributes=("gender",))  # or the folder of the tracks
    assert [c.source for c in clips if c.attribute == "gender"] == [c.source for c in tracks]
    assert Counter(c.attribute for c in clips) == {a: 500 for a in TRACKS}
    for attribute in TRACKS:
        assert {c.label for c in clips if c.attribute == attribute} == set(LABELS[attribute])
    assert all(c.multi_question and c.multi_answer and c.answer in c.options for c in clips)
    dog = next(c for c in clips if c.source == "sakura:Animal/dog28.wav")
    assert dog.label == "dog" and dog.answer == "dog" and dog.multi_answer == "(c) Claws"


# ------------------------------------------------------------------------------------------------ categories

def test_every_question_gets_a_paper_category_by_the_reviewed_rule(questions, bank):
    assert len(questions) == 2000
    assert all(q.category in CATEGORIES[q.attribute] for q in questions)  # no catch-all
    assert bank.category_counts() == CATEGORY_COUNTS
    reviewed = reviewed_categories()
    assert {(q.attribute, q.category, q.stem) for q in questions} == set(reviewed)
    assert len(reviewed) == 276
    for attribute, category, stem in reviewed:
        assert categorize(attribute, stem) == category, stem
    # the cases keywords got wrong: "corresponds" is no response; families and translations are categories
    assert categorize("emotion", "Which situation best corresponds to the emotion conveyed in the speech?") == \
        "scenario"
    assert categorize("language", "To what family does the language in the audio belong?") == "language_family"
    assert categorize("language", "Which option represents 'wisdom' in the language spoken in this audio clip?") \
        == "translation"


def test_the_curated_questions_get_their_own_category_by_the_rule():
    for attribute, categories in load_portability().items():
        assert sorted(categories) == sorted(CATEGORIES[attribute])
        for name, category in categories.items():
            for question in category.questions:
                assert categorize(attribute, question) == name, question


def test_a_question_that_fits_no_category_is_skipped_and_counted():
    from sake_dataset.records import AudioRef, LabelledClip

    ref = AudioRef("x.wav", hashlib.sha256(b"x").hexdigest(), 1.0)
    clip = LabelledClip("animal", "dog", ref, "sakura:Animal/x.wav", "sakura",
                        multi_question="Which is heavier? (a) A (b) B", multi_answer="(a) A")
    found, skipped = multi_hop_questions([clip])
    assert found == [] and skipped == {"question fits no knowledge category of App. I.1": 1}


# ------------------------------------------------------------------------------------------------ exclusion

def _answers(bank: PortabilityBank, attribute: str, y_o: str, y_e: str) -> set[str]:
    return {q.answer for q in bank.eligible(attribute, y_o, y_e)}


def test_answers_the_original_label_shares_are_dropped(bank):
    about_cat = {q.answer for q in bank.by_label[("animal", "cat")]}
    about_cow = {q.answer for q in bank.by_label[("animal", "cow")]}
    assert {"Claws", "Meowing"} <= about_cat and {"Viviparous", "Walking", "Mooing"} <= about_cow
    assert "Claws" not in _answers(bank, "animal", "dog", "cat")  # SAKURA: dogs have claws too
    assert "Claws" in _answers(bank, "animal", "frog", "cat")  # frogs do not
    assert not {"Viviparous", "Walking"} & _answers(bank, "animal", "dog", "cow")
    assert "Mooing" in _answers(bank, "animal", "dog", "cow")
    assert "Indo-European" not in _answers(bank, "language", "German", "Spanish")
    assert "Indo-European" in _answers(bank, "language", "Japanese", "Spanish")


def _old_string_rule_kept(bank: PortabilityBank, attribute: str, y_o: str, y_e: str) -> list[MultiHopQuestion]:
    """The rule before issue 25: dropped only when SAKURA gives the same answer string (case-folded) to the same
    question wording for y_o, or the curated y_o answer of the category is that string."""
    def key(text):
        return " ".join(text.lower().split())
    same_wording = {(key(q.stem), key(q.answer)) for q in bank.by_label[(attribute, y_o)]}
    curated = load_portability()[attribute]
    kept = []
    for q in bank.by_label[(attribute, y_e)]:
        cat = curated[q.category]
        if (key(q.stem), key(q.answer)) in same_wording or key(q.answer) in {
                key(cat.answers[y_o]), *map(key, cat.alternatives.get(y_o, ()))}:
            continue
        kept.append(q)
    return kept


def test_the_new_rule_drops_the_ambiguous_items_the_string_rule_kept(bank):
    pairs = {a: [(y_o, y_e) for y_o in LABELS[a] for y_e in LABELS[a] if y_o != y_e] for a in TRACKS}
    old_kept = {a: sum(len(_old_string_rule_kept(bank, a, *p)) for p in pairs[a]) for a in TRACKS}
    assert old_kept == {"animal": 3450, "emotion": 2000, "gender": 500, "language": 3410}
    # of those, items whose answer SAKURA also gives for y_o (in any of y_o's questions): the 216 and 50
    answers_for = {key: {q.answer.lower() for q in qs} for key, qs in bank.by_label.items()}
    ambiguous = {a: sum(q.answer.lower() in answers_for[(a, p[0])] for p in pairs[a]
                        for q in _old_string_rule_kept(bank, a, *p)) for a in TRACKS}
    assert ambiguous == {"animal": 216, "emotion": 0, "gender": 0, "language": 50}
    counts = bank.exclusion_counts()
    assert counts == {"animal": {"candidates": 4000, "dropped": 766, "kept": 3234},
                      "emotion": {"candidates": 2000, "dropped": 0, "kept": 2000},
                      "gender": {"candidates": 500, "dropped": 0, "kept": 500},
                      "language": {"candidates": 3500, "dropped": 140, "kept": 3360}}
    for a in TRACKS:  # exactly the ambiguous items go; no kept item keeps an answer SAKURA gives for y_o
        assert counts[a]["kept"] == old_kept[a] - ambiguous[a]
        for y_o, y_e in pairs[a]:
            eligible = bank.eligible(a, y_o, y_e)
            assert len(eligible) >= 10 and not {q.answer.lower() for q in eligible} & answers_for[(a, y_o)]


def test_answers_are_compared_by_meaning():
    assert normalize_answer("Hooves", "animal", "physical") == normalize_answer("a hoof", "animal", "physical")
    assert normalize_answer("Lays eggs", "animal", "reproduction") == normalize_answer(
        "Oviparous", "animal", "reproduction")
    assert normalize_answer("Gives birth to live young.", "animal", "reproduction") == "viviparous"
    assert normalize_answer("Bogotá", "language", "city") == normalize_answer("bogota", "language", "city")
    assert normalize_answer("Côte d'Ivoire", "language", "official_language") == "ivory coast"
    assert normalize_answer("deu", "language", "iso") == normalize_answer("de", "language", "iso")
    assert normalize_answer("Yes, it does.", "animal", "behavior") == "yes"
    assert normalize_answer("True love", "gender", "celebrity") == "true love"  # not a yes/no answer
    assert normalize_answer("優しさ", "language", "translation") == "優しさ"  # no accent folding outside Latin script
    assert normalize_answer("Crow", "animal", "vocalization") != normalize_answer("Crow", "animal", "family")

    def q(label, stem, answer, category="physical"):
        return MultiHopQuestion("animal", label, stem, ("x", answer), answer, category, f"sakura:Animal/{label}.wav")
    bank = PortabilityBank([q("dog", "Which body part does it have?", "a hoof"),
                            q("cow", "What is a feature of this animal?", "Hooves"),
                            q("dog", "Does it bark?", "Yes", "vocalization"),
                            q("cat", "Does it purr?", "Yes", "vocalization"),
                            q("pig", "Does it bark?", "Yes.", "vocalization")], {})
    assert bank.eligible("animal", "dog", "cow") == []  # plural and article: the same fact
    assert [x.stem for x in bank.eligible("animal", "dog", "cat")] == ["Does it purr?"]  # yes to another question
    assert bank.eligible("animal", "dog", "pig") == []  # yes to the same question


# ------------------------------------------------------------------------------------------------ build

def test_build_prints_the_categories_in_the_log_and_the_card(clone, bank, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sake_dataset.builder")
    result = build(clone, write_dynamic_superb(tmp_path / "ds"), write_mmlu(tmp_path / "mmlu"), tmp_path / "out",
                   seed=0, test_per_attribute=6, train_per_attribute=0, sequences=1, sequence_length=3,
                   portability="sakura")
    assert ("SAKURA multi-hop questions, animal: behavior 63, care_item 63, diet 62, family 63, locomotion 62, "
            "physical 63, reproduction 62, vocalization 62; candidate items (y_o, y_e, question) 4000, dropped 766"
            in caplog.text)
    card = (result.out / "README.md").read_text(encoding="utf-8")
    assert "### Portability items by knowledge category: test" in card
    for attribute in TRACKS:
        rows = result.rows[attribute]["test"]
        counts = Counter(p["category"] for r in rows for p in r["portability"])
        assert set(counts) <= set(CATEGORIES[attribute]) and sum(counts.values()) == 6
        line = f"| {attribute} | " + ", ".join(f"{c} {counts.get(c, 0)}" for c in CATEGORIES[attribute]) + " |"
        assert line in card and f"test portability items, {attribute}: " in caplog.text
        for r in rows:  # every item is a question about a y_e clip that the knowledge for y_o answers otherwise
            (p,) = r["portability"]
            eligible = bank.eligible(attribute, r["original_label"], r["target_label"])
            assert any(p["source"].endswith(q.source) and q.answer == p["answer"] and q.category == p["category"]
                       for q in eligible)
