"""SAKE dataset: construction rules, composition, determinism, round trip (demo build, built once per session)."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from sake_dataset import ATTRIBUTES, LABELS, features, item_rows
from sake_dataset.builder import DEMO_SIZES, build_demo
from sake_dataset.sake import (ConstructionError, expected_kinds, expected_totals, load_portability,
                               make_edit_pairs, sample_sequences, split_options, task_attributes)


@pytest.fixture(scope="session")
def demo():
    """The demo build (embedded synthetic sources) of the whole session: rows, manifest and folder."""
    from _editor_helpers import shared_demo_build

    return shared_demo_build()


def _single(demo, split):
    return [r for a in ATTRIBUTES for r in demo.rows[a][split]]


# ---------------------------------------------------------------------------------------------- label sets, schema

def test_label_sets_are_app_c1():
    assert LABELS["gender"] == ("male", "female")
    assert LABELS["emotion"] == ("happy", "disgust", "sad", "fear", "angry")
    assert LABELS["language"] == ("English", "German", "Spanish", "French", "Italian", "Chinese", "Japanese",
                                  "Korean")
    assert LABELS["animal"] == ("dog", "cat", "pig", "cow", "frog", "hen", "rooster", "sheep", "crow")


def test_features_nest_audio_items_and_text_items_without_audio():
    f = features()
    assert f["audio"].sampling_rate == 16000
    assert f["generality"].feature["audio"].sampling_rate == 16000
    assert "audio" not in f["locality_text"].feature
    assert {"sequence_id", "step", "source_instance"} <= set(features(sequential=True))


def test_paper_table1_identities():
    assert expected_totals(300, "test") == (1200, 10500, 11700)
    assert expected_totals(1000, "train") == (4000, 31000, 35000)


# ---------------------------------------------------------------------------------------------- edit pairs

@pytest.mark.parametrize("attribute", ATTRIBUTES)
@pytest.mark.parametrize("n", [1, 7, 23, 300])
def test_edit_pairs_balanced_within_one(attribute, n):
    pairs = make_edit_pairs(attribute, n, random.Random(f"t{n}{attribute}"))
    assert len(pairs) == n and all(o != e for o, e in pairs)
    for side in (0, 1):
        counts = Counter(p[side] for p in pairs)
        full = [counts.get(label, 0) for label in LABELS[attribute]]
        assert max(full) - min(full) <= 1, (side, counts)


def test_demo_pairs_balanced_and_composition(demo):
    for split in ("train", "test"):
        for attribute in ATTRIBUTES:
            rows = demo.rows[attribute][split]
            assert len(rows) == DEMO_SIZES[f"{split}_per_attribute"]
            for side in ("original_label", "target_label"):
                counts = Counter(r[side] for r in rows)
                full = [counts.get(label, 0) for label in LABELS[attribute]]
                assert max(full) - min(full) <= 1
            for r in rows:
                kinds = tuple(it["id"].rsplit("/", 1)[1] for it in item_rows(r))
                assert kinds == expected_kinds(attribute, split)
        assert demo.stats["totals"][split] == expected_totals(DEMO_SIZES[f"{split}_per_attribute"], split)


# ---------------------------------------------------------------------------------------------- item rules

def test_generality_items(demo):
    for r in _single(demo, "test") + _single(demo, "train"):
        g1, g2, g3 = r["generality"]
        assert [g["type"] for g in (g1, g2, g3)] == [1, 2, 3]
        assert g1["audio"] == r["audio"] and g1["question"] != r["question"]
        assert g2["audio"].sha256 != r["audio"].sha256 and g2["label"] == r["original_label"]
        assert g2["question"] == r["question"]
        assert g3["audio"] == g2["audio"] and g3["question"] == g1["question"]
        for g in (g1, g2, g3):
            assert g["options"] == r["options"] and g["answer"] == r["answer"]
        assert r["answer"] in r["options"]
        stem, options = split_options(r["question"])
        assert list(options) == r["options"]


def test_audio_locality_rules(demo):
    seen_types = Counter()
    for r in _single(demo, "test") + _single(demo, "train"):
        attribute, y_o, y_e = r["attribute"], r["original_label"], r["target_label"]
        by_type = {it["type"]: it for it in r["locality_audio"]}
        seen_types.update(by_type.keys())
        assert by_type[1]["attribute"] in ATTRIBUTES and by_type[1]["attribute"] != attribute
        if attribute == "gender":
            assert 2 not in by_type
        else:
            assert by_type[2]["attribute"] == attribute and by_type[2]["label"] not in (y_o, y_e)
        assert by_type[3]["attribute"] == attribute and by_type[3]["label"] == y_e
        assert by_type[3]["answer"] in by_type[3]["options"]
        task = by_type[4]["attribute"].split(":", 1)[1]
        assert attribute not in task_attributes(task, by_type[4]["question"])
        for it in r["locality_audio"]:
            assert it["audio"].sha256 != r["audio"].sha256
    assert set(seen_types) == {1, 2, 3, 4}


def test_type4_task_attribute_keywords():
    assert task_attributes("EmotionRecognition") == {"emotion"}
    assert task_attributes("SpokenLanguageIdentification") == {"language"}
    assert task_attributes("SpeakerGenderClassification") == {"gender"}
    assert task_attributes("NoiseDetection", "Does it contain noise? Answer yes or no.") == frozenset()
    assert "animal" in task_attributes("SoundClassification", "Which animal makes this sound?")


def test_demo_type4_excludes_tasks_about_the_edited_attribute(demo):
    for r in _single(demo, "test") + _single(demo, "train"):
        task = r["locality_audio"][-1]["attribute"]
        if r["attribute"] == "emotion":
            assert task != "dsuperb:EmotionRecognition"
        if r["attribute"] == "language":
            assert task != "dsuperb:SpokenLanguageIdentification"


def test_portability_in_test_only_and_excludes_shared_answers(demo):
    knowledge = load_portability()
    assert all(r["portability"] == [] for r in _single(demo, "train"))
    for r in _single(demo, "test"):
        (p,) = r["portability"]
        cat = knowledge[r["attribute"]][p["category"]]
        assert p["answer"] == cat.answers[r["target_label"]]
        assert cat.answers[r["original_label"]].lower() != p["answer"].lower()
        assert p["options"].count(p["answer"]) == 1 and len(p["options"]) >= 2
        assert p["audio"] == r["audio"]


def test_portability_never_picks_a_category_shared_by_both_labels(demo):
    # dog -> pig share "omnivore" (diet): over many draws, diet must never be used for that pair
    from sake_dataset.sake import InstanceBuilder, SplitPool, load_question_banks

    clip = next(r for r in _single(demo, "test") if r["attribute"] == "animal")
    builder = InstanceBuilder(SplitPool("test", {}, [], []), load_question_banks(), load_portability(),
                              random.Random(0))
    from sake_dataset.records import LabelledClip

    fake = LabelledClip("animal", "dog", clip["audio"], "x", "sakura")
    cats = {builder.portability_item("i", "animal", fake, "dog", "pig")["category"] for _ in range(60)}
    assert "diet" not in cats and len(cats) > 1


def test_text_locality_is_mmlu_without_audio(demo):
    for r in _single(demo, "test"):
        (t,) = r["locality_text"]
        assert "audio" not in t and t["attribute"].startswith("mmlu:") and t["answer"] in t["options"]


# ---------------------------------------------------------------------------------------------- splits

def _parquet_audio_hashes(folder, config, split):
    table = pq.read_table(folder / config / f"{split}-00000-of-00001.parquet")
    hashes = set()
    for row in table.to_pylist():
        hashes.add(hashlib.sha256(row["audio"]["bytes"]).hexdigest())
        for col in ("generality", "locality_audio", "portability"):
            hashes |= {hashlib.sha256(it["audio"]["bytes"]).hexdigest() for it in row[col]}
    return hashes


def test_train_test_disjoint(demo):
    test_h = set().union(*(_parquet_audio_hashes(demo.out, c, "test") for c in ATTRIBUTES + ("sequential",)))
    train_h = set().union(*(_parquet_audio_hashes(demo.out, c, "train") for c in ATTRIBUTES + ("sequential",)))
    assert test_h and train_h and not (test_h & train_h)
    test_text = {r["locality_text"][0]["question"] for r in _single(demo, "test")}
    train_text = {r["locality_text"][0]["question"] for r in _single(demo, "train")}
    assert not (test_text & train_text)
    test_edits = {(r["audio"].sha256, r["target_label"]) for r in _single(demo, "test")}
    assert not test_edits & {(r["audio"].sha256, r["target_label"]) for r in _single(demo, "train")}


def test_edit_audio_distinct_within_split(demo):
    for split in ("train", "test"):
        hashes = [r["audio"].sha256 for r in _single(demo, split)]
        assert len(hashes) == len(set(hashes))


# ---------------------------------------------------------------------------------------------- sequential

def test_sequences_follow_both_rules(demo):
    for split in ("train", "test"):
        singles = {r["id"]: r for r in _single(demo, split)}
        by_seq = defaultdict(list)
        for r in demo.rows["sequential"][split]:
            by_seq[r["sequence_id"]].append(r)
        assert len(by_seq) == DEMO_SIZES["sequences"]
        for seq in by_seq.values():
            assert [r["step"] for r in seq] == list(range(1, DEMO_SIZES["sequence_length"] + 1))
            labels = [x for r in seq for x in (r["original_label"], r["target_label"])]
            assert len(labels) == len(set(labels))  # editing-pair independence
            originals = {r["original_label"] for r in seq}
            for r in seq:
                src = singles[r["source_instance"]]
                assert (src["original_label"], src["target_label"], src["audio"]) == (
                    r["original_label"], r["target_label"], r["audio"])
                assert r["id"] == f"sequential/{split}/{r['sequence_id']}/step{r['step']:02d}"
                assert all(it["id"].startswith(r["id"] + "/") for it in item_rows(r))
                for it in r["locality_audio"]:  # audio-locality independence
                    assert it["label"] not in originals
                by_type = {it["type"]: it for it in r["locality_audio"]}
                assert by_type[3]["label"] == r["target_label"]


def test_impossible_sequence_request_is_a_clear_error(demo):
    with pytest.raises(ConstructionError, match="editing-pair independence"):
        sample_sequences(_single(demo, "test"), 1, 12, random.Random(0))  # 24 labels -> at most 11 edits
    only_gender = demo.rows["gender"]["test"]
    with pytest.raises(ConstructionError, match="Lower --sequence-length"):
        sample_sequences(only_gender, 1, 2, random.Random(0))


# ---------------------------------------------------------------------------------------------- release files

def test_manifest_and_card(demo):
    manifest = json.loads((demo.out / "sake_manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["fingerprint"] == demo.manifest["fingerprint"]
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((demo.out / rel).read_bytes()).hexdigest() == digest
    table = pq.read_table(demo.out / "emotion" / "test-00000-of-00001.parquet")
    ids = []
    for row in table.to_pylist():
        ids.append(row["id"] + "/rel")
        ids += [it["id"] for col in ("generality", "locality_audio", "locality_text", "portability")
                for it in row[col]]
    assert manifest["item_ids"]["emotion"]["test"] == ids
    card = (demo.out / "README.md").read_text()
    assert "config_name: sequential" in card and "synthetic" in card
    n_inst, n_audio, n_qa = expected_totals(DEMO_SIZES["test_per_attribute"], "test")
    assert f"| Test | {n_inst} | {n_audio} | {n_qa} |" in card.replace(",", "")
    assert "| Portability |" in card and "| Audio locality type 4 |" in card


def test_round_trip_load_dataset(demo, tmp_path):
    import datasets

    for config in ("emotion", "sequential"):
        ds = datasets.load_dataset(str(demo.out), config, cache_dir=str(tmp_path / "cache"))
        assert set(ds) == {"train", "test"}
        row = ds["test"][0]
        rows = demo.rows[config]["test"]
        assert row["id"] == rows[0]["id"]
        audio = row["audio"]
        assert audio["sampling_rate"] == 16000 and audio["array"].ndim == 1
        assert abs(len(audio["array"]) / 16000 - rows[0]["audio"].duration) < 0.01
        gen2 = row["generality"][1]["audio"]
        assert gen2["sampling_rate"] == 16000
        assert abs(len(gen2["array"]) / 16000 - rows[0]["generality"][1]["audio"].duration) < 0.01
        assert "audio" not in row["locality_text"][0]


# ---------------------------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_other_seed_other_pairs(demo, tmp_path):
    again = build_demo(tmp_path / "again", seed=0)
    assert again.manifest["files"] == demo.manifest["files"]
    other = build_demo(tmp_path / "other", seed=1)
    pairs = lambda res: [(r["original_label"], r["target_label"]) for r in _single(res, "test")]  # noqa: E731
    assert pairs(other) != pairs(demo)
    assert other.manifest["fingerprint"] != demo.manifest["fingerprint"]


# ---------------------------------------------------------------------------------------------- paper size

def _fake_records(per_label: int):
    """Normalized records without files (construction is a pure function of records + seed)."""
    from sake_dataset.records import AudioRef, LabelledClip, TaskClip, TextQuestion

    def ref(key):
        return AudioRef(path=f"{key}.wav", sha256=hashlib.sha256(key.encode()).hexdigest(), duration=1.0)

    clips = [LabelledClip(a, label, ref(f"{a}/{label}/{i}"), f"sakura:{a}/{label}_{i}.wav", "sakura")
             for a in ATTRIBUTES for label in LABELS[a] for i in range(per_label)]
    tasks = [TaskClip(task, "Answer yes or no.", "yes", ref(f"{task}/{i}"), f"dsuperb:{task}/{i}")
             for task in ("NoiseDetection_LJSpeech_MUSAN-Gaussian", "SpeakerCounting_LibriTTS-TestClean",
                          "EmotionRecognition_MultimodalEmotionlinesDataset") for i in range(200)]
    texts = [TextQuestion("math", f"What is {i}+1?", (str(i + 1), str(i), "x", "y"), 0, f"mmlu:math/{i}")
             for i in range(500)]
    return clips, tasks, texts


def test_paper_size_construction_reproduces_table1():
    from sake_dataset.builder import construct

    clips, tasks, texts = _fake_records(per_label=760)  # gender needs (150 + 500) clips per label
    rows = construct(clips, [], tasks, texts, seed=0)  # paper defaults: 300 / 1000, 10 x 10
    from sake_dataset.sake import count_totals

    assert count_totals(r for a in ATTRIBUTES for r in rows[a]["test"]) == (1200, 10500, 11700)
    assert count_totals(r for a in ATTRIBUTES for r in rows[a]["train"]) == (4000, 31000, 35000)
    assert len(rows["sequential"]["test"]) == 100 and len(rows["sequential"]["train"]) == 100
    assert all(r["locality_audio"][-1]["attribute"] != "dsuperb:EmotionRecognition_MultimodalEmotionlinesDataset"
               for r in rows["emotion"]["test"])


def test_paper_size_without_enough_audio_names_the_shortfall():
    from sake_dataset.builder import ShortfallError, construct

    clips, tasks, texts = _fake_records(per_label=200)
    with pytest.raises(ShortfallError) as err:
        construct(clips, [], tasks, texts, seed=0)
    assert err.value.table[("train", "gender", "male")] == (500, 50)  # 200 - 150 test clips left for 500 train edits
    assert "--pool commonvoice=PATH" in str(err.value)


def test_card_yaml_parses_as_hub_metadata(demo):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(demo.out / "README.md")
    configs = {c["config_name"]: c for c in card.data.configs}
    assert set(configs) == {"animal", "emotion", "gender", "language", "sequential"}
    assert configs["emotion"]["data_files"][1] == {"split": "test", "path": "emotion/test-00000-of-00001.parquet"}
    infos = {i["config_name"]: i for i in card.data.dataset_info}
    assert {s["name"]: s["num_examples"] for s in infos["sequential"]["splits"]} == {
        "train": DEMO_SIZES["sequences"] * DEMO_SIZES["sequence_length"],
        "test": DEMO_SIZES["sequences"] * DEMO_SIZES["sequence_length"]}


def test_card_names_and_links_the_licenses_of_the_sources(demo):
    """`license: other` comes with a name and a link (LICENSE.md of the build), and every source the build used is
    named with its license and a link, in the card's Licenses section and in LICENSE.md."""
    import re

    from huggingface_hub import DatasetCard

    from sake_dataset.builder import LICENSES

    card = DatasetCard.load(demo.out / "README.md")
    assert (card.data.license, card.data.license_name, card.data.license_link) == ("other", "sake-source-licenses",
                                                                                   "LICENSE.md")
    licenses = (demo.out / "LICENSE.md").read_text(encoding="utf-8")
    section = card.text[card.text.index("### Licenses"):card.text.index("## Citation")]
    origins = ("sakura", "dsuperb", "crema_d", "esc50")  # the origins the demo sources imitate
    for origin in origins:
        assert LICENSES[origin] in licenses and LICENSES[origin] in section
    for origin, text in LICENSES.items():
        assert re.search(r"\]\(https://[^)\s]+\)", text), origin  # every entry links its release or license
    assert "CC BY-NC 3.0](https://creativecommons.org/licenses/by-nc/3.0/)" in licenses


def test_push_to_hub_uploads_the_built_folder(demo, monkeypatch):
    import huggingface_hub

    from sake_dataset.release import push_to_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, repo_type, exist_ok):
            calls.append(("create", repo_id, repo_type, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            calls.append(("upload", folder_path, repo_id, repo_type))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    push_to_hub(demo.out, "org/sake")
    assert calls == [("token", "hf_test_token"), ("create", "org/sake", "dataset", True),
                     ("upload", str(demo.out), "org/sake", "dataset")]
