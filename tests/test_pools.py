"""Labelled-audio pools (issue 13): presets on fixtures of their public layouts, builds that use them, shortfall."""

from __future__ import annotations

import hashlib
import random

import pyarrow.parquet as pq
import pytest
from _dataset_helpers import tree_digest, write_csv, write_sources, write_wav

from sake_dataset import ATTRIBUTES
from sake_dataset.audio import probe_audio
from sake_dataset.builder import ShortfallError, build
from sake_dataset.records import LabelledClip, SourceError
from sake_dataset.sake import LABELS, partition_clips
from sake_dataset.sources.pools import read_pool

CREMA = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "SAD": "sad"}


def make_crema_d(root, per_code=3, demographics=True):
    actors = ["1001", "1002", "1003"]
    for code in list(CREMA) + ["NEU"]:
        for i in range(per_code):
            name = f"{actors[i % 3]}_IEO_{code}_{['LO', 'MD', 'HI'][i % 3]}.wav"
            write_wav(root / "AudioWAV" / name, f"crema/{name}")
    if demographics:
        write_csv(root / "VideoDemographics.csv", ["ActorID", "Age", "Sex", "Race", "Ethnicity"],
                  [["1001", "51", "Male", "Caucasian", "Not Hispanic"], ["1002", "21", "Female", "Caucasian",
                                                                         "Not Hispanic"],
                   ["1003", "21", "Female", "Asian", "Not Hispanic"]])
    return root


def make_esc50(root, per_class=3):
    rows = []
    for category in list(LABELS["animal"]) + ["rain", "chirping_birds"]:
        for i in range(per_class):
            name = f"{i + 1}-{100 + len(rows)}-A-0.wav"
            write_wav(root / "audio" / name, f"esc/{name}")
            rows.append([name, str(i + 1), "0", category, "False", "1", "A"])
    write_csv(root / "meta" / "esc50.csv", ["filename", "fold", "target", "category", "esc10", "src_file", "take"],
              rows)
    return root


CV_LOCALES = {"English": "en", "German": "de", "Spanish": "es", "French": "fr", "Italian": "it",
              "Chinese": "zh-CN", "Japanese": "ja", "Korean": "ko"}


def make_commonvoice(root, per_locale=3):
    rows = []
    genders = ["male_masculine", "female_feminine", "", "other"]
    for language, locale in list(CV_LOCALES.items()) + [("Portuguese", "pt")]:
        for i in range(per_locale):
            name = f"common_voice_{locale}_{1000 + len(rows)}.wav"
            write_wav(root / "clips" / name, f"cv/{name}")
            rows.append(["client", name, "sentence", "2", "0", "", genders[len(rows) % 4], "", locale])
    with open(root / "validated.tsv", "w", encoding="utf-8") as f:
        f.write("\t".join(["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents",
                           "locale"]) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    return root


def make_animal_sound(root):
    for cls in ("Chicken", "Dog", "Cat", "Lion", "Donkey"):
        for i in range(2):
            write_wav(root / cls / f"{cls.lower()}_{i}.wav", f"asd/{cls}/{i}")
    return root


# ---------------------------------------------------------------------------------------------- presets

def test_crema_d_preset(tmp_path):
    report = read_pool("crema_d", make_crema_d(tmp_path / "crema"))
    emotion = [c for c in report.clips if c.attribute == "emotion"]
    assert {c.label for c in emotion} == set(LABELS["emotion"]) and len(emotion) == 15
    assert report.dropped["emotion:NEU"] == 3
    gender = [c for c in report.clips if c.attribute == "gender"]
    assert len(gender) == 18 and {c.label for c in gender} == {"male", "female"}
    one = next(c for c in emotion if c.source.endswith("1001_IEO_ANG_LO.wav"))
    assert one.label == "angry" and one.origin == "crema_d" and one.question == ""


def test_crema_d_malformed_name(tmp_path):
    root = make_crema_d(tmp_path / "crema", demographics=False)
    write_wav(root / "AudioWAV" / "not_a_crema_name.wav", "bad")
    with pytest.raises(SourceError, match="not_a_crema_name.wav.*file name"):
        read_pool("crema_d", root)


def test_esc50_preset(tmp_path):
    report = read_pool("esc50", make_esc50(tmp_path / "esc"))
    assert {c.label for c in report.clips} == set(LABELS["animal"]) and len(report.clips) == 27
    assert report.dropped == {"animal:rain": 3, "animal:chirping_birds": 3}


def test_esc50_malformed(tmp_path):
    root = make_esc50(tmp_path / "esc", per_class=1)
    write_csv(root / "meta" / "esc50.csv", ["filename", "fold", "target"], [["1-100-A-0.wav", "1", "0"]])
    with pytest.raises(SourceError, match="esc50.csv.*category"):
        read_pool("esc50", root)


def test_commonvoice_preset(tmp_path):
    report = read_pool("commonvoice", make_commonvoice(tmp_path / "cv"))
    language = [c for c in report.clips if c.attribute == "language"]
    assert {c.label for c in language} == set(LABELS["language"]) and len(language) == 24
    assert report.dropped["language:pt"] == 3
    gender = [c for c in report.clips if c.attribute == "gender"]
    # rows cycle male/female/""/other: only set genders count; "other" is dropped, "" is not a gender claim
    assert len(gender) == 14 and {c.label for c in gender} == {"male", "female"}
    assert report.dropped["gender:other"] == 6
    assert any(c.label == "Chinese" and "zh-CN" in c.source for c in language)


def test_commonvoice_malformed(tmp_path):
    root = tmp_path / "cv"
    root.mkdir()
    (root / "validated.tsv").write_text("path\tgender\nx.wav\tmale\n")
    with pytest.raises(SourceError, match="validated.tsv.*locale"):
        read_pool("commonvoice", root)


def test_animal_sound_dataset_preset(tmp_path):
    report = read_pool("animal_sound_dataset", make_animal_sound(tmp_path / "asd"))
    assert sorted(c.label for c in report.clips) == ["cat", "cat", "dog", "dog", "hen", "hen"]
    assert report.dropped == {"animal:Lion": 2, "animal:Donkey": 2}
    with pytest.raises(SourceError, match="class folder"):
        (tmp_path / "empty").mkdir()
        read_pool("animal_sound_dataset", tmp_path / "empty")


def test_generic_csv_and_folder_pools(tmp_path):
    for i, raw in enumerate(["joyful", "joyful", "grumpy", "meh"]):
        write_wav(tmp_path / "clips" / f"c{i}.wav", f"gen/{i}")
    write_csv(tmp_path / "labels.csv", ["wav", "mood"], [[f"c{i}.wav", r] for i, r in
                                                        enumerate(["joyful", "joyful", "grumpy", "meh"])])
    (tmp_path / "map.yaml").write_text("table: labels.csv\naudio_dir: clips\nfile_column: wav\nlabel_column: mood\n"
                                       "attribute: emotion\nlabels: {joyful: happy, grumpy: angry}\n")
    report = read_pool("csv", tmp_path / "map.yaml")
    assert sorted(c.label for c in report.clips) == ["angry", "happy", "happy"] and report.dropped == {
        "emotion:meh": 1}
    (tmp_path / "bad.yaml").write_text("table: labels.csv\nfile_column: wav\nlabel_column: mood\nattribute: colour\n")
    with pytest.raises(SourceError, match="bad.yaml.*'attribute'"):
        read_pool("csv", tmp_path / "bad.yaml")
    (tmp_path / "folder.yaml").write_text("root: asd\nattribute: animal\nlabels: {Chicken: hen, Lion: null}\n")
    make_animal_sound(tmp_path / "asd")
    report = read_pool("folder", tmp_path / "folder.yaml")
    assert sorted({c.label for c in report.clips}) == ["cat", "dog", "hen"]
    with pytest.raises(SourceError, match="unknown preset"):
        read_pool("nope", tmp_path)


# ---------------------------------------------------------------------------------------------- partition

def test_partition_blocks_same_recording_under_other_bytes(tmp_path):
    """SAKURA re-encodes corpus clips: the same CommonVoice recording must not land in both splits."""
    write_wav(tmp_path / "en_test_0_common_voice_en_777.wav", "a")
    write_wav(tmp_path / "common_voice_en_777.wav", "b")  # other bytes, same recording id
    sak = LabelledClip("language", "English", probe_audio(tmp_path / "en_test_0_common_voice_en_777.wav"),
                       "sakura:x", "sakura")
    pool = LabelledClip("language", "English", probe_audio(tmp_path / "common_voice_en_777.wav"), "cv:x",
                        "commonvoice")
    test, train, short = partition_clips([sak], [pool], {"language": {"English": 1}}, {}, random.Random(0))
    assert test["language"]["English"] == [sak] and train["language"]["English"] == []


# ---------------------------------------------------------------------------------------------- builds

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool_sources")
    src = write_sources(root, per_label=3)
    src["pools"] = [("crema_d", str(make_crema_d(root / "crema"))), ("esc50", str(make_esc50(root / "esc"))),
                    ("commonvoice", str(make_commonvoice(root / "cv")))]
    return src


SIZES = {"test_per_attribute": 2, "train_per_attribute": 8, "sequences": 1, "sequence_length": 3}


def _hashes(folder, split):
    out = set()
    for config in ATTRIBUTES + ("sequential",):
        for row in pq.read_table(folder / config / f"{split}-00000-of-00001.parquet").to_pylist():
            out.add(hashlib.sha256(row["audio"]["bytes"]).hexdigest())
            for col in ("generality", "locality_audio", "portability"):
                out |= {hashlib.sha256(it["audio"]["bytes"]).hexdigest() for it in row[col]}
    return out


def test_build_with_pools_reaches_train_size_disjoint(sources, tmp_path):
    res = build(sources["sakura"], sources["dynamic_superb"], sources["mmlu"], tmp_path / "out", seed=0,
                pools=sources["pools"], **SIZES)
    for attribute in ATTRIBUTES:
        assert len(res.rows[attribute]["train"]) == 8
    assert not _hashes(res.out, "train") & _hashes(res.out, "test")
    test_origins = {o for cfg in res.stats["provenance"]["test"].values() for o in cfg if cfg[o]}
    train_origins = {o for cfg in res.stats["provenance"]["train"].values() for o in cfg if cfg[o]}
    assert "sakura" in test_origins and {"crema_d", "esc50", "commonvoice"} <= train_origins
    # test edit audio comes from SAKURA first (it has enough for the test quota)
    assert all(r["source"].startswith("sakura:") for a in ATTRIBUTES for r in res.rows[a]["test"])
    pool_rows = [r for r in res.rows["emotion"]["train"] if r["source"].startswith("crema_d:")]
    assert pool_rows and all(r["answer"] in r["options"] and "(a)" in r["question"] for r in pool_rows)
    card = (res.out / "README.md").read_text()
    assert "| train | emotion |" in card and "CREMA-D" in card and "emotion:NEU x3" in card


def test_build_without_pools_reports_shortfall_and_keeps_output(sources, tmp_path):
    out = tmp_path / "out"
    build(sources["sakura"], sources["dynamic_superb"], sources["mmlu"], out, seed=0, pools=sources["pools"],
          test_per_attribute=1, train_per_attribute=1, sequences=1, sequence_length=2)
    digest = tree_digest(out)
    with pytest.raises(ShortfallError) as err:
        build(sources["sakura"], sources["dynamic_superb"], sources["mmlu"], out, seed=0, **SIZES)
    message = str(err.value)
    # gender: 8 train instances -> 4 per label needed, 3 SAKURA clips per label - 2 taken by test = 1 left
    assert err.value.table[("train", "gender", "male")] == (4, 1)
    assert "gender" in message and "--pool commonvoice=PATH" in message and "--pool crema_d=PATH" in message
    assert "--train-per-attribute" in message
    assert tree_digest(out) == digest


def test_build_with_the_other_presets(sources, tmp_path):
    """animal_sound_dataset, folder and csv pools fill what SAKURA leaves short for train."""
    asd = make_animal_sound(tmp_path / "asd")
    for label in ("pig", "cow", "frog", "rooster", "sheep", "crow"):
        for i in range(2):
            write_wav(tmp_path / "animals" / label.upper() / f"{label}{i}.wav", f"folder/{label}/{i}")
    (tmp_path / "folder.yaml").write_text("root: animals\nattribute: animal\n")
    rows = [[f"{attr}_{label}_{i}.wav", attr, label] for attr in ("emotion", "gender", "language")
            for label in LABELS[attr] for i in range(2)]
    for name, _, _ in rows:
        write_wav(tmp_path / "csvclips" / name, f"csv/{name}")
    write_csv(tmp_path / "table.csv", ["wav", "attr", "label"], rows)
    (tmp_path / "csv.yaml").write_text("table: table.csv\naudio_dir: csvclips\nfile_column: wav\nlabel_column: label\n"
                                       "attribute_column: attr\n")
    pools = [("animal_sound_dataset", str(asd)), ("folder", str(tmp_path / "folder.yaml")),
             ("csv", str(tmp_path / "csv.yaml"))]
    res = build(sources["sakura"], sources["dynamic_superb"], sources["mmlu"], tmp_path / "out", seed=0, pools=pools,
                test_per_attribute=2, train_per_attribute=2, sequences=1, sequence_length=3)
    train_origins = {o for cfg in res.stats["provenance"]["train"].values() for o, n in cfg.items() if n}
    assert {"animal_sound_dataset", "folder", "csv"} <= train_origins
    assert not _hashes(res.out, "train") & _hashes(res.out, "test")
