"""Whisper transcripts on a static cache (editors.models.generation.transcripts) against transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from editors.models.generation.transcripts import TranscriptRules, transcribe
from editors.models.tiny import tiny_whisper


def encoder_outputs(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 24, 32, generator=torch.Generator().manual_seed(seed))


def generated(whisper: torch.nn.Module, encoded: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return whisper.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), max_new_tokens=new_tokens)


@pytest.mark.parametrize("release_rules", [False, True])
@pytest.mark.parametrize("eos_scale", [1.0, 3.0])
def test_transcripts_are_generates_tokens(release_rules: bool, eos_scale: float) -> None:
    whisper = tiny_whisper(0, release_rules=release_rules, eos_scale=eos_scale)
    encoded = encoder_outputs(6)
    expected = generated(whisper, encoded, 12)
    ours = transcribe(whisper, encoded, 12)
    assert torch.equal(ours, expected)
    assert len({tuple(row) for row in ours.tolist()}) == 6  # the transcripts depend on the audio
    stopped = (ours == 0).any(1)
    if eos_scale > 1:  # some transcripts end early, the others run to the limit
        assert bool(stopped.any()) and not bool(stopped.all())
    if release_rules:  # the language is detected per audio, not once for the batch
        languages = whisper.detect_language(encoder_outputs=BaseModelOutput(last_hidden_state=encoded))
        assert len(set(languages.tolist())) > 1


def test_release_rules_read_from_the_generation_config() -> None:
    rules = TranscriptRules.of(tiny_whisper(0, release_rules=True))
    assert rules is not None
    assert rules.prompt == (1, None, 5, 61) and rules.languages == (2, 3, 4)
    assert rules.suppress == (8, 9, 10, 62, 63) and rules.begin_suppress == (0, 11)
    assert (rules.eos, rules.pad, rules.timestamp_begin) == (0, 0, 62)
    plain = TranscriptRules.of(tiny_whisper(0))
    assert plain is not None and plain.prompt == (1,) and plain.timestamp_begin is None


@pytest.mark.parametrize("field, value", [("return_timestamps", True), ("num_beams", 2), ("do_sample", True),
                                          ("repetition_penalty", 1.3), ("language", "en"), ("task", "translate"),
                                          ("no_speech_threshold", 0.6)])
def test_unmodelled_generation_configs_go_back_to_generate(field: str, value: object) -> None:
    whisper = tiny_whisper(0, release_rules=True)
    setattr(whisper.generation_config, field, value)
    assert TranscriptRules.of(whisper) is None
    with pytest.raises(ValueError, match="not modelled"):
        transcribe(whisper, encoder_outputs(2), 4)


def test_timestamp_tokens_before_the_end_are_found() -> None:
    rules = TranscriptRules.of(tiny_whisper(0, release_rules=True))
    assert rules is not None
    assert rules.has_timestamps(torch.tensor([[5, 62, 0], [7, 7, 7]]))
    assert not rules.has_timestamps(torch.tensor([[5, 0, 63], [7, 7, 7]]))  # after the end token: ignored


def test_a_prompt_longer_than_the_decoder_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        transcribe(tiny_whisper(0, release_rules=True), encoder_outputs(1), 37)


@pytest.mark.parametrize("shared_encoder", [False, True])
def test_desta25_transcripts_are_the_same_with_either_engine(shared_encoder: bool) -> None:
    from editors.models.desta25 import DeSTA25Adapter

    rng = np.random.default_rng(0)
    audios = [(rng.standard_normal(int(16000 * rng.uniform(0.5, 2.0))) * 0.1).astype(np.float32) for _ in range(5)]
    texts = {}
    for engine in ("graph", "eager"):
        adapter = DeSTA25Adapter.tiny(0)
        adapter.transcript_engine = engine
        adapter.share_transcript_encoder = shared_encoder
        texts[engine] = adapter.transcripts(audios)
        assert adapter.transcribed_audios == 5
    assert texts["graph"] == texts["eager"]


def test_desta25_records_its_transcript_engine() -> None:
    from editors.models.desta25 import DeSTA25Adapter

    adapter = DeSTA25Adapter.tiny(0)
    audio = np.zeros(8000, dtype=np.float32)
    graph_key, graph_model = adapter._transcript_key(audio), adapter.model_key()
    assert adapter.describe()["transcript_engine"] == "graph"
    adapter.transcript_engine = "eager"
    assert adapter._transcript_key(audio) != graph_key and adapter.model_key() != graph_model
    with pytest.raises(ValueError, match="transcript_engine"):
        DeSTA25Adapter(adapter.model, adapter.processor, model_id="x", transcript_engine="fast")
