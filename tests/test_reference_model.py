"""The shipped reference model (models/sake-reference-qwen2-audio): loads like a Hub checkpoint, knows the demo
attributes before any edit, and FT-Audio edits it (issue 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editors.models import load_adapter
from editors.models.base import Prompt
from tools.train_reference_model import evaluate_preedit, preedit_expectations

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "sake-reference-qwen2-audio"

assert (MODEL_DIR / "config.json").is_file(), "the reference model ships with the repository"


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return load_adapter(str(MODEL_DIR))


def test_loads_like_a_hub_checkpoint(adapter) -> None:
    from transformers import Qwen2AudioForConditionalGeneration

    assert type(adapter.model) is Qwen2AudioForConditionalGeneration
    assert adapter.family == "qwen2_audio"
    n_params = sum(p.numel() for p in adapter.model.parameters())
    assert n_params <= 50_000_000
    shipped = sum(f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file())
    assert shipped <= 30 * 1024 * 1024, f"{MODEL_DIR} holds {shipped} bytes (> 30 MB)"
    # the tokenizer round-trips label and portability texts
    for text in ("Male", "German", "wagging its tail", "I can't stop smiling, today is wonderful!"):
        ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert adapter.tokenizer.decode(ids) == text


def test_preedit_expectations_use_the_true_label(demo_dataset) -> None:
    from editors.data import load_instances

    row = load_instances(str(demo_dataset), "emotion", "test")[0]
    expected = {item_id: ok for item_id, _, _, ok in preedit_expectations(row)}
    rel = expected[f"{row['id']}/rel"]
    assert rel and all(o.lower() == row["original_label"].lower() for o in rel)
    assert row["answer"] not in rel  # the edit target is not what the unedited model should say
    text = expected[f"{row['id']}/loc_text"]
    assert text == [row["locality_text"][0]["answer"]]


def test_preedit_accuracy_on_demo_attribute_questions(adapter, demo_dataset) -> None:
    """Before any edit the model answers the demo test split's attribute questions (reliability, generality, audio
    locality) and the text questions with >= 90% accuracy, judged against what the unedited model should say."""
    result = evaluate_preedit(adapter, demo_dataset, progress=False)
    acc = result["accuracy"]
    assert acc["n_items"] >= 200
    assert acc["attribute_and_locality"] >= 90.0, result["misses"][:10]
    assert acc["reliability"] >= 90.0 and acc["generality"] >= 90.0 and acc["locality_audio"] >= 90.0
    assert acc["locality_text"] >= 90.0
    assert acc["portability"] >= 75.0, result["misses"][:10]


def test_ft_audio_edits_the_reference_model(adapter, demo_dataset, tmp_path) -> None:
    """FT-Audio on a small demo slice: reliability >= 90% and text locality exactly 100% (offline judge)."""
    from sake import RunConfig, run, score

    path = run(RunConfig(model=str(MODEL_DIR), method="ft_audio", dataset=str(demo_dataset), split="test",
                         mode="single", out=str(tmp_path / "runs"), limit=1, cache_dir=str(tmp_path / "cache"),
                         pre_edit_items="all", progress=False), adapter=adapter)
    metrics = score(path, judge="offline")["metrics"]["overall"]
    assert metrics["reliability"] >= 90.0
    assert metrics["locality_text"] == 100.0
    # every edit was restored: the model answers the pre-edit rows as before
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    rel = [r for r in rows if r["dimension"] == "reliability"]
    prompts = [Prompt(question=r["question"], audio=_audio_of(demo_dataset, r["instance_id"])) for r in rel]
    assert adapter.generate(prompts, max_new_tokens=8) == [r["pre_edit"] for r in rel]


def _audio_of(dataset: Path, instance_id: str):
    from editors.data import load_instances
    from editors.models.base import as_audio_array

    config, split, _ = instance_id.split("/")
    ds = load_instances(str(dataset), config, split)
    row = next(r for r in ds if r["id"] == instance_id)
    return as_audio_array(row["audio"])


def test_training_examples_answer_with_the_true_label() -> None:
    """The training data generator: attribute questions hold the true label among the options and answer it as
    spelled there; portability questions answer the true label's knowledge; text answers are option texts."""
    from sake_dataset.sake import ATTRIBUTES, canonical_label, load_portability, split_options
    from tools.train_reference_model import ExampleSampler, load_material

    material = load_material()
    sampler = ExampleSampler(material, seed=0)
    knowledge = load_portability()
    for attribute in ATTRIBUTES:
        for clip in material.clips_with(attribute)[:6]:
            label = clip.labels[attribute]
            question, answer = sampler.attribute_question(clip, attribute)
            _, options = split_options(question)
            assert answer in options and canonical_label(attribute, answer) == label
            question, answer = sampler.portability_question(clip, attribute)
            _, options = split_options(question)
            true_answers = {c.answers[label] for c in knowledge[attribute].values()}
            true_answers |= {a for c in knowledge[attribute].values() for a in c.alternatives.get(label, ())}
            assert answer in options and answer in true_answers
    prompts, targets, kinds = sampler.batch(64)
    assert set(kinds) >= {"attribute", "portability", "mmlu"}
    for prompt, target, kind in zip(prompts, targets, kinds):
        assert (prompt.audio is None) == (kind == "mmlu")
        if kind != "task":
            assert target in split_options(prompt.question)[1]
    # same seed, same examples
    first, again = ExampleSampler(material, seed=1).batch(32), ExampleSampler(material, seed=1).batch(32)
    assert [p.question for p in again[0]] == [p.question for p in first[0]] and again[1] == first[1]
