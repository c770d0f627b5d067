"""DeSTA2.5-Audio rebuild + adapter on a tiny random-init model (offline): release layout, forward, caches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from editors.models.base import Prompt
from editors.models.desta25 import END_AUDIO, START_AUDIO, DeSTA25Adapter
from editors.models.desta25_model import CONFIG_NAME, WEIGHTS_NAME, DeSTA25Model


def _audio(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)


@pytest.fixture(scope="module")
def adapter() -> DeSTA25Adapter:
    return DeSTA25Adapter.tiny(seed=0)


def _release_names(n_qformer_layers: int, n_tapped: int) -> set[str]:
    """Tensor names of the release's model.safetensors, written from its module tree (QformerConnector:
    ParameterList layer_prompts, layer_weights, BertEncoder qformer with cross-attention, Sequential proj)."""
    names = {f"perception.connector.layer_prompts.{k}" for k in range(n_tapped)}
    names.add("perception.connector.layer_weights")
    linear_ln = []
    for block in ("attention", "crossattention"):
        linear_ln += [f"{block}.self.{p}" for p in ("query", "key", "value")]
        linear_ln += [f"{block}.output.dense", f"{block}.output.LayerNorm"]
    linear_ln += ["intermediate.dense", "output.dense", "output.LayerNorm"]
    for i in range(n_qformer_layers):
        for module in linear_ln:
            for t in ("weight", "bias"):
                names.add(f"perception.connector.qformer.layer.{i}.{module}.{t}")
    for module in ("proj.0", "proj.1"):
        for t in ("weight", "bias"):
            names.add(f"perception.connector.{module}.{t}")
    return names


def _write_release(adapter: DeSTA25Adapter, tmp_path) -> tuple:
    """Base LLM and Whisper saved on their own (as on the Hub), plus a release-layout dir naming them."""
    llm_dir, whisper_dir, release_dir = tmp_path / "llm_src", tmp_path / "whisper_src", tmp_path / "release"
    adapter.model.llm_model.save_pretrained(llm_dir)
    adapter.tokenizer.save_pretrained(llm_dir)
    adapter.model.perception.whisper.save_pretrained(whisper_dir)
    adapter.processor.feature_extractor.save_pretrained(whisper_dir)
    adapter.processor.whisper_tokenizer.save_pretrained(whisper_dir)
    adapter.model.save_release_layout(release_dir)
    cfg_path = release_dir / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg["llm_model_id"], cfg["encoder_model_id"] = str(llm_dir), str(whisper_dir)
    for key in ("llm_config", "encoder_config"):  # the release re-reads these from the ids
        cfg.pop(key)
    # keys a release config.json written by the desta trainer also carries
    cfg.update({"architectures": ["DeSTA25AudioModel"], "torch_dtype": "bfloat16", "train_id": 30678,
                "trainer_version": "0" * 64, "commit": "0" * 40, "info": "DeSTA2.5 Audio"})
    cfg_path.write_text(json.dumps(cfg))
    return release_dir, llm_dir, whisper_dir


def _logits(adapter: DeSTA25Adapter, prompts: list[Prompt]) -> torch.Tensor:
    batch = adapter.prepare(prompts)
    with torch.no_grad():
        return adapter.logits_from(adapter.hidden_entering(batch, 0))


def test_release_layout_roundtrip(adapter, tmp_path):
    release_dir, _, _ = _write_release(adapter, tmp_path)
    tensors = load_file(release_dir / WEIGHTS_NAME)
    cfg = adapter.config
    assert set(tensors) == _release_names(cfg.qformer_num_hidden_layers, len(cfg.target_layer_ids))
    d_whisper, d_llm = cfg.encoder_config.d_model, cfg.llm_config.hidden_size
    assert tensors["perception.connector.layer_prompts.0"].shape == (1, cfg.prompt_size, d_whisper)
    assert tensors["perception.connector.layer_weights"].shape == (cfg.prompt_size, len(cfg.target_layer_ids))
    assert tensors["perception.connector.proj.1.weight"].shape == (d_llm, d_whisper)

    reloaded = DeSTA25Adapter.from_pretrained(str(release_dir), dtype=torch.float32, device="cpu", is_tiny=True)
    assert reloaded.config.target_layer_ids == cfg.target_layer_ids
    for name, value in adapter.model.state_dict().items():
        assert torch.equal(value, reloaded.model.state_dict()[name]), name
    prompts = [Prompt("What is the emotion of the speaker? (a) happy (b) sad", audio=_audio(1)),
               Prompt("Which is correct? Answer: A B C D")]
    assert torch.equal(_logits(adapter, prompts), _logits(reloaded, prompts))


def test_release_layout_rejects_missing_and_unexpected(adapter, tmp_path):
    release_dir, _, _ = _write_release(adapter, tmp_path)
    tensors = load_file(release_dir / WEIGHTS_NAME)
    missing = dict(tensors)
    missing.pop("perception.connector.layer_weights")
    with pytest.raises(ValueError, match="missing=.*layer_weights"):
        adapter.model.load_release_tensors(missing)
    extra = dict(tensors)
    extra["perception.connector.qformer.layer.9.output.dense.weight"] = torch.zeros(1)
    save_file(extra, release_dir / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="unexpected=.*layer.9"):
        DeSTA25Model.from_pretrained(release_dir, dtype=torch.float32)


def test_save_pretrained_bundle_roundtrip(adapter, tmp_path):
    from editors.models import load_adapter, save_tiny

    save_tiny(adapter, tmp_path / "bundle")  # what the runner does; load_adapter picks the family from config.json
    reloaded = load_adapter(str(tmp_path / "bundle"), dtype="float32")
    assert isinstance(reloaded, DeSTA25Adapter) and reloaded.is_tiny and not reloaded.vad
    prompts = [Prompt("Which animal makes this sound? (a) dog (b) cat", audio=_audio(2))]
    assert reloaded.config.llm_model_id == adapter.config.llm_model_id  # the ids stay; weights come from the dir
    assert reloaded.render(prompts[0]) == adapter.render(prompts[0])
    assert reloaded.generate(prompts, max_new_tokens=4) == adapter.generate(prompts, max_new_tokens=4)


def _reference_connector(sd: dict[str, torch.Tensor], tapped: list[torch.Tensor], heads: int, n_layers: int,
                         eps: float = 1e-12) -> torch.Tensor:
    """The release's connector written out with tensor ops: post-LN BERT layers (unmasked self-attention over
    the prompts, cross-attention to the tapped layer), per-query softmax mix over layers, LayerNorm + Linear."""
    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def ln(x, name, e=eps):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], e)

    def attend(x, memory, prefix):
        b, n, d = x.shape
        split = lambda t: t.view(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = (split(lin(src, f"{prefix}.self.{p}")) for src, p in ((x, "query"), (memory, "key"),
                                                                         (memory, "value")))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(b, n, d)
        return ln(lin(out, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")

    outs = []
    for k, states in enumerate(tapped):
        h = sd[f"layer_prompts.{k}"].expand(states.shape[0], -1, -1)
        for i in range(n_layers):
            p = f"qformer.layer.{i}"
            h = attend(h, h, f"{p}.attention")
            h = attend(h, states, f"{p}.crossattention")
            ffn = lin(torch.nn.functional.gelu(lin(h, f"{p}.intermediate.dense")), f"{p}.output.dense")
            h = ln(ffn + h, f"{p}.output.LayerNorm")
        outs.append(h)
    weights = torch.softmax(sd["layer_weights"], dim=-1)  # (prompt, layer)
    mixed = sum(outs[k] * weights[:, k, None] for k in range(len(outs)))
    return lin(ln(mixed, "proj.0", 1e-5), "proj.1")


def test_connector_matches_release_math_and_is_bidirectional(adapter):
    cfg = adapter.config
    connector = adapter.connector()
    g = torch.Generator().manual_seed(3)
    tapped = [torch.randn(2, 100, cfg.encoder_config.d_model, generator=g) for _ in cfg.target_layer_ids]
    with torch.no_grad():
        ours = connector(tapped)
        ref = _reference_connector(connector.state_dict(), tapped, cfg.encoder_config.encoder_attention_heads,
                                   cfg.qformer_num_hidden_layers)
        assert ours.shape == (2, cfg.prompt_size, cfg.llm_config.hidden_size)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        # the first query's output depends on the last query (no causal mask in the Q-Former)
        q_out = connector.qformer(connector.layer_prompts[0], encoder_hidden_states=tapped[0][:1]).last_hidden_state
        bumped = connector.layer_prompts[0].detach().clone()
        bumped[:, -1] += 1.0
        q_out2 = connector.qformer(bumped, encoder_hidden_states=tapped[0][:1]).last_hidden_state
        assert not torch.allclose(q_out[:, 0], q_out2[:, 0])


def test_audio_span_is_connector_outputs_then_transcript_embeddings(adapter):
    audio = _audio(4)
    prompt = Prompt("What is the gender of the speaker? (a) male (b) female", audio=audio)
    text = adapter.render(prompt)
    assert f"{START_AUDIO}{adapter.audio_placeholder}{END_AUDIO}\nWhat is the gender" in text
    transcript = adapter.transcript_ids(audio)
    assert len(transcript) > 0
    batch = adapter.prepare([prompt, Prompt("Is this text only?")])
    slots = batch.audio_token_mask[0].nonzero().flatten()
    p = adapter.config.prompt_size
    assert len(slots) == p + len(transcript) and not batch.audio_token_mask[1].any()
    assert torch.equal(slots, torch.arange(int(slots[0]), int(slots[0]) + len(slots)))  # one contiguous span
    with torch.no_grad():
        embeds = adapter.input_embeds(batch)
        table = adapter.language_model().embed_tokens
        span = embeds[0, slots]
        state = adapter.audio_states([audio])[0]
        connector_out = adapter.connector()([t[None] for t in state.tapped])[0]
        torch.testing.assert_close(span[:p], connector_out, rtol=0, atol=0)
        assert torch.equal(span[p:], table(torch.tensor(transcript)))
        # the model-level forward (release-style: audio embeddings written at (row, start)) gives the same logits
        direct = adapter.model(batch.input_ids, batch.attention_mask,
                               audio_embeds=adapter.project_audio(batch.audio_states)[None],
                               audio_positions=[(0, int(slots[0]))]).logits
        torch.testing.assert_close(direct, adapter.logits_from(adapter.hidden_entering(batch, 0)))
    # around the span: the text tokens of <start_audio> ... <end_audio>
    before = adapter.tokenizer.decode(batch.input_ids[0, : int(slots[0])])
    after = adapter.tokenizer.decode(batch.input_ids[0, int(slots[-1]) + 1:])
    assert before.endswith(START_AUDIO) and after.startswith(END_AUDIO)


def test_tiny_chat_template_is_llama31_format(adapter):
    text = adapter.render(Prompt("Hi there ", system="Be brief."))
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_ft_audio_changes_only_connector_and_keeps_text_outputs(tmp_path):
    from editors.base import EditRequest
    from editors.ft_audio import FTAudio

    adapter = DeSTA25Adapter.tiny(seed=1)
    text_prompts = [Prompt("Which is correct? Answer: A B C D"), Prompt("the of and to in", system="Be brief.")]
    audio = _audio(5)
    before_params = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    text_logits = _logits(adapter, text_prompts)
    text_out = adapter.generate(text_prompts, max_new_tokens=6)
    edit = EditRequest(instance_id="emotion/test/000000", attribute="emotion", original_label="happy",
                       target_label="sad", question="What is the emotion of the speaker? (a) happy (b) sad",
                       options=["happy", "sad"], target="sad", audio=audio)
    loss_before = float(adapter.target_loss([edit.prompt()], ["sad"]))
    stats = FTAudio(adapter, {"lr": 1e-2, "max_steps": 5, "early_stop_loss": 1e-2,
                                "optimizer": "adam", "weight_decay": 0.0}).apply(edit)
    assert stats["steps"] > 0
    assert float(adapter.target_loss([edit.prompt()], ["sad"])) < loss_before
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before_params[n])}
    connector = set(adapter.parameter_groups()["connector"])
    assert changed and changed <= connector
    assert all(n.startswith("perception.connector.") for n in connector)
    assert torch.equal(_logits(adapter, text_prompts), text_logits)
    assert adapter.generate(text_prompts, max_new_tokens=6) == text_out


def test_transcript_cache_skips_whisper_decoder(tmp_path):
    adapter = DeSTA25Adapter.tiny(seed=2, cache_dir=tmp_path / "cache", encoder_states_on_disk=True)
    calls = []
    decoder = adapter.model.perception.whisper.model.decoder  # every decode (either engine) embeds its tokens
    decoder.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    audio = _audio(6)
    prompts = [Prompt("What is the emotion of the speaker? (a) happy (b) sad", audio=audio),
               Prompt("Which animal makes this sound? (a) dog (b) cat", audio=audio.copy())]
    first = adapter.generate(prompts, max_new_tokens=3)
    assert len(calls) > 0 and adapter.transcribed_audios == 1  # same content: transcribed once
    calls.clear()
    assert adapter.generate([Prompt(p.question, audio=np.array(p.audio)) for p in prompts], max_new_tokens=3) == first
    adapter.target_loss(prompts, ["sad", "dog"])
    assert calls == []
    # a new process (fresh adapter, same weights) reads transcript and encoder states from the disk cache
    again = DeSTA25Adapter.tiny(seed=2, cache_dir=tmp_path / "cache", encoder_states_on_disk=True)
    whisper = again.model.perception.whisper.model
    whisper.decoder.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    whisper.encoder.conv1.register_forward_hook(lambda *args: calls.append(2))
    assert again.generate(prompts, max_new_tokens=3) == first
    assert calls == [] and again.transcribed_audios == 0
    for ours, theirs in zip(again.audio_states([audio])[0].tapped, adapter.audio_states([audio])[0].tapped):
        assert torch.equal(ours, theirs)


def test_non_speech_audio_gets_blank_transcript_without_decoding(monkeypatch):
    adapter = DeSTA25Adapter.tiny(seed=3)
    adapter.vad = True
    monkeypatch.setattr(adapter, "_has_speech", lambda audio: False)
    audio = _audio(7)
    assert adapter.transcripts([audio]) == [" "]
    assert adapter.transcribed_audios == 0
    assert adapter.num_audio_tokens(audio) == adapter.config.prompt_size + len(adapter.tokenizer(" ")["input_ids"])


def test_voice_activity_detection_is_decided_once_and_keys_the_outputs(monkeypatch, caplog):
    """VAD changes the transcripts the LLM reads: the model key and the description (run header) carry it, and a
    machine without silero-vad turns it off when the adapter is made (with a warning), not in the middle of a run."""
    import importlib.util
    import logging

    tiny = DeSTA25Adapter.tiny(seed=3)

    def make(vad):
        return DeSTA25Adapter(tiny.model, tiny.processor, model_id=tiny.model_id, is_tiny=True, vad=vad)

    on, off = make(True), make(False)
    assert on.vad and not off.vad and on.model_key() != off.model_key()
    assert on.describe()["vad"] is True and off.describe()["vad"] is False
    assert off.model_key() == tiny.model_key()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "silero_vad"
                        else find_spec(name, *a))
    with caplog.at_level(logging.WARNING):
        missing = make(True)
    assert not missing.vad and missing.model_key() == off.model_key() and "silero-vad is not installed" in caplog.text


def test_transcription_batches_are_sized_from_the_memory_a_row_holds(monkeypatch):
    """CPU: the fixed batch (the demo's transcripts do not move). CUDA: as many audios per Whisper call as half the
    available memory holds at one row's cross-attention cache + encoder output, a power of two, at most 64."""
    import editors.models.generation.memory as memory
    from editors.models import load_adapter
    from editors.models.desta25 import MAX_TRANSCRIPT_BATCH, TRANSCRIPT_BATCH

    adapter = load_adapter("tiny-desta25", seed=0)
    assert adapter.transcript_batch_size() == TRANSCRIPT_BATCH
    cfg = adapter.model.perception.whisper.config
    row = 4 * cfg.d_model * (cfg.max_source_positions * (2 * cfg.decoder_layers + 8)
                             + 2 * cfg.decoder_layers * adapter.config.transcript_max_new_tokens)
    for rows_that_fit, expected in ((0, 1), (1, 1), (5, 4), (16, 16), (40, 32), (10_000, MAX_TRANSCRIPT_BATCH)):
        monkeypatch.setattr(memory, "available_bytes", lambda device, n=rows_that_fit: 2 * n * row + 1)
        assert adapter.transcript_batch_size() == expected, rows_that_fit


def test_one_encoder_run_gives_each_audio_its_transcript_and_its_states():
    """With sharing on (the default on CUDA; set here on the CPU), Whisper's encoder runs once per audio: the
    transcript is decoded from the run whose tapped layers become the audio's states. Transcripts, states and
    outputs match two separate runs; once an encoder edit is set up, states come from their own run again."""
    from editors.models.buckets import row_bucket

    audios = [_audio(20 + i, 1.0 + 0.5 * i) for i in range(3)]
    prompts = [Prompt("What is the emotion of the speaker? (a) happy (b) sad", audio=a) for a in audios]
    results = {}
    for share in (True, False):
        adapter = DeSTA25Adapter.tiny(seed=4)
        adapter.share_transcript_encoder = share
        encoded_rows: list[int] = []
        encoder = adapter.model.perception.whisper.model.encoder
        encoder.conv1.register_forward_hook(lambda module, args, out: encoded_rows.append(out.shape[0]))
        outputs = adapter.generate(prompts, max_new_tokens=3)
        results[share] = (outputs, adapter.transcripts(audios), adapter.audio_states(audios), sum(encoded_rows))
        if share:
            adapter.before_audio_encoder_edit(["perception.whisper.model.encoder.layers.0.fc1.weight"])
            encoded_rows.clear()
            adapter.transcripts([_audio(30)])
            assert adapter.audio_states([_audio(30)]) and sum(encoded_rows) == row_bucket(1) + 1
    (out_s, text_s, states_s, rows_s), (out_p, text_p, states_p, rows_p) = results[True], results[False]
    assert rows_s == row_bucket(3) and rows_p == row_bucket(3) + 3  # the transcript batch, + one run per clip
    assert text_s == text_p and out_s == out_p
    for shared, own in zip(states_s, states_p):
        assert shared.transcript_ids == own.transcript_ids
        for a, b in zip(shared.tapped, own.tapped):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_whisper_features_are_the_release_processors(adapter):
    """DeSTA2.5's Whisper features (computed where the model is, no host spectrogram) are the values of the
    release's feature-extractor call, bit for bit on the CPU."""
    clips = [_audio(3, 0.7), _audio(4, 1.6)]
    theirs = adapter.processor.feature_extractor(clips, sampling_rate=16000, return_tensors="pt")["input_features"]
    ours = adapter._features(clips)
    assert ours.device == adapter.device and torch.equal(ours, theirs)
