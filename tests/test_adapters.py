"""Adapters (editors/models): tiny models of the real classes, prompts, batching, losses, fast paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _editor_helpers import synthetic_audio
from editors.models import adapter_class, family_of, load_adapter, save_tiny
from editors.models.base import Prompt, Turn, batch_spans, whisper_encoder_tokens, whisper_mel_frames
from editors.models.generation.eager import shared_prefix_length

FAMILIES = ["tiny-qwen2-audio", "tiny-audio-flamingo3"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return load_adapter(request.param, seed=0)


def prompts() -> list[Prompt]:
    return [
        Prompt("What is the emotion of the speaker? (a) happy (b) sad", audio=synthetic_audio(1, 1.0)),
        Prompt("Which of the following is a planet? (a) Mars (b) the Sun"),
        Prompt("Which animal makes this sound? (a) dog (b) cat", audio=synthetic_audio(2, 1.7),
               system="Answer briefly.",
               history=(Turn("What is the gender of the speaker?", "male", audio=synthetic_audio(3, 0.6)),
                        Turn("Is the sky blue?", "yes"))),
    ]


def test_tiny_uses_real_classes_and_is_deterministic(adapter):
    from transformers import AudioFlamingo3ForConditionalGeneration, Qwen2AudioForConditionalGeneration

    assert isinstance(adapter.model, (Qwen2AudioForConditionalGeneration, AudioFlamingo3ForConditionalGeneration))
    again = type(adapter).tiny(0)
    assert adapter.tokenizer.get_vocab() == again.tokenizer.get_vocab()
    state, state2 = adapter.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    other = type(adapter).tiny(1)
    assert not torch.equal(other.lm_head().weight, adapter.lm_head().weight)


def test_audio_length_config_matches_feature_extractor(adapter):
    fe = adapter.processor.feature_extractor
    assert adapter.audio_encoder().config.max_source_positions * 2 == fe.nb_max_frames
    for n in (100, 16000, 16161, 27000, 40000):
        # clips longer than the chunk are cut to it (as the adapters' processors do): 40000 > n_samples here
        feats = fe(np.zeros(n, np.float32), sampling_rate=16000, return_attention_mask=True, padding="max_length",
                   truncation=True)
        assert whisper_mel_frames(n, fe) == int(np.asarray(feats["attention_mask"]).sum())
    assert 40000 > fe.n_samples and whisper_mel_frames(40000, fe) == whisper_mel_frames(fe.n_samples, fe)
    audio = synthetic_audio(5, 1.3)
    (state,) = adapter.audio_states([audio])
    assert state.shape[0] == adapter.num_audio_tokens(audio)


def test_batched_generation_equals_one_by_one(adapter):
    batch = adapter.generate(prompts(), max_new_tokens=6)
    single = [adapter.generate([p], max_new_tokens=6)[0] for p in prompts()]
    assert batch == single
    assert all(isinstance(s, str) for s in batch)
    assert adapter.generate(prompts(), max_new_tokens=6, batch_size=2) == single
    assert adapter.generate(prompts(), max_new_tokens=6, max_batch_tokens=1) == single  # one prompt per call


def test_shared_prefix_generation_equals_plain_generation(adapter):
    history = tuple(Turn(f"Example {i}: what is the emotion here? (a) happy (b) sad", "happy" if i % 2 else "sad",
                         audio=synthetic_audio(i, 0.8) if i != 3 else None) for i in range(6))
    batch = [Prompt(f"Which animal is this? option {j}", audio=synthetic_audio(20 + j, 0.5 + 0.3 * j) if j != 2
                    else None, system="Apply the update.", history=history) for j in range(4)]
    token_ids = [adapter.prompt_token_ids(p) for p in batch]
    settings = adapter.generation_settings(8)
    assert settings.engine == "eager" and settings.min_shared_prefix == 256  # tiny models on CPU
    prefix = shared_prefix_length(adapter, batch, token_ids, settings.min_shared_prefix)
    assert prefix >= settings.min_shared_prefix and prefix < min(len(t) for t in token_ids)
    shared = adapter.generate(batch, settings=settings)
    assert adapter.generate(batch, settings=settings.replace(min_shared_prefix=0)) == shared
    # the same placeholder tokens standing for another audio end the shared prefix before that audio
    other = Prompt(batch[1].question, batch[1].audio, batch[1].system,
                   (Turn(history[0].question, history[0].answer, synthetic_audio(99, 0.8)),) + history[1:])
    ids = [token_ids[0], adapter.prompt_token_ids(other)]
    assert ids[0][:prefix] == ids[1][:prefix]
    assert shared_prefix_length(adapter, [batch[0], other], ids, settings.min_shared_prefix) == 0


def test_batch_spans_respect_rows_and_tokens():
    assert batch_spans([10, 10, 10, 50, 5], None, 40) == [(0, 3), (3, 4), (4, 5)]
    assert batch_spans([10, 10, 10, 50, 5], 2, None) == [(0, 2), (2, 4), (4, 5)]
    assert batch_spans([10, 20], None, None) == [(0, 2)]
    assert batch_spans([], 4, 4) == []


def test_layer_fast_path_equals_full_forward(adapter):
    ps, targets = prompts(), ["sad", "Mars", "dog"]
    full = adapter.target_loss(ps, targets, reduction="none")
    batch = adapter.prepare(ps, targets)
    for layer in (0, adapter.num_llm_layers - 1):
        state = adapter.hidden_entering(batch, layer)
        torch.testing.assert_close(adapter.loss_from(state, reduction="none"), full, rtol=1e-5, atol=1e-5)
    assert full.shape == (3,)
    assert torch.isclose(adapter.target_loss(ps, targets), full.mean())


@pytest.mark.parametrize("family", FAMILIES + ["tiny-desta25"])
def test_tail_state_gives_the_whole_widths_loss_and_gradient_bit_for_bit(family):
    """A residual added at each row's last prompt token: the loss and its gradient computed over the columns from
    the earliest of them on (the earlier columns' keys and values computed once) equal the whole width's exactly."""
    from editors.models.buckets import training_groups
    from editors.unke import last_prompt_positions

    a = load_adapter(family, seed=0)
    long = Prompt("Which of these is right? " + " ".join(f"({i}) the answer number {i}" for i in range(40)))
    ps, targets = prompts() + [long], ["sad", "Mars and the moon", "dog", "the answer number 7"]
    cut_widths = []
    for _, batch in training_groups(a, ps, targets):
        full = a.hidden_entering(batch, 1)
        pos = last_prompt_positions(batch)
        tail = a.tail_state(full, int(pos.min()))
        assert 0 <= tail.first_column <= int(pos.min())
        assert tail.hidden.shape[1] == full.hidden.shape[1] - tail.first_column
        if tail.first_column:
            cut_widths.append(full.hidden.shape[1])
        torch.manual_seed(0)
        delta = torch.randn(batch.batch_size, full.hidden.shape[-1], requires_grad=True)
        results = []
        for state in (full, tail):
            onehot = torch.zeros(state.hidden.shape[:2])
            onehot[torch.arange(batch.batch_size), pos - state.first_column] = 1.0
            loss = a.loss_from(state, state.hidden + onehot[..., None] * delta[:, None, :], reduction="none")
            results.append((loss, *torch.autograd.grad(loss.sum(), [delta])))
        assert all(torch.equal(x, y) for x, y in zip(*results))
        assert tail.first_column == 0 or (tail.frozen is not None and tail.frozen.keys)  # computed once, kept
    # cut at both block sizes of the CPU attention (32 queries per block below 192 columns, 64 from there)
    assert min(cut_widths) < 192 <= max(cut_widths)


def test_connector_outputs_go_to_the_placeholders_by_index_as_a_masked_scatter_would(adapter):
    """The placeholders' flat indices are found on the host (so neither the scatter nor its backward syncs on a
    GPU), stay right when a batch is left-padded, and give a masked scatter's embeddings and gradients bit for bit."""
    from editors.models.buckets import left_pad

    batch = adapter.prepare(prompts())
    for b in (batch, left_pad(batch, batch.input_ids.shape[1] + 5, adapter.pad_token_id)):
        assert torch.equal(b.audio_positions, b.audio_token_mask.flatten().nonzero().squeeze(1))
        assert b.audio_positions.numel() == b.n_audio_slots > 0
        audio = adapter.project_audio(b.audio_states).detach().requires_grad_(True)
        ours = adapter.input_embeds(b, audio)
        expected = adapter.language_model().embed_tokens(b.input_ids).masked_scatter(
            b.audio_token_mask.unsqueeze(-1).expand_as(ours), audio)
        assert torch.equal(ours, expected)
        weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(0))
        grads = [torch.autograd.grad((x * weights).sum(), [audio])[0] for x in (ours, expected)]
        assert torch.equal(grads[0], grads[1])


def test_causal_padding_mask_is_the_mask_transformers_builds_on_valid_queries(adapter):
    """A tail state builds this mask on CUDA where transformers passed none (no padding)."""
    from editors.models.adapter import causal_padding_mask

    batch = adapter.prepare(prompts(), ["sad", "Mars", "dog"])
    state = adapter.hidden_entering(batch, 1)
    theirs = state.masks["full_attention"]
    assert theirs is not None and theirs.dtype == torch.bool  # padded rows: transformers builds one
    valid = batch.attention_mask.bool()[:, None, :, None].expand_as(theirs)
    assert torch.equal(causal_padding_mask(batch.attention_mask)[valid], theirs[valid])


def test_a_tail_of_a_batch_without_padding_builds_its_mask_and_computes_the_same_loss(adapter, monkeypatch):
    """What a tail state does on CUDA for a batch transformers gives no mask (no padding), run on the CPU: it
    builds the causal mask, cuts, and gives the whole width's loss and (to rounding) its gradient. On the CPU itself
    such a batch runs whole."""
    import editors.models.adapter as adapter_module
    from editors.unke import last_prompt_positions

    batch = adapter.prepare([Prompt("Which of these is right? " + " ".join(f"({i}) answer {i}" for i in range(30)))],
                            ["answer 7"])
    full = adapter.hidden_entering(batch, 1)
    assert full.masks["full_attention"] is None
    pos = last_prompt_positions(batch)
    assert adapter.tail_state(full, int(pos.min())).first_column == 0  # the CPU's rule
    monkeypatch.setattr(adapter_module, "_tail_builds_mask", lambda device: True)
    tail = adapter.tail_state(full, int(pos.min()))
    assert tail.first_column > 0 and tail.masks["full_attention"].shape[-2:] == (
        full.hidden.shape[1] - tail.first_column, full.hidden.shape[1])
    delta = torch.randn(1, full.hidden.shape[-1], generator=torch.Generator().manual_seed(0), requires_grad=True)
    results = []
    for state in (full, tail):
        onehot = torch.zeros(state.hidden.shape[:2])
        onehot[0, pos - state.first_column] = 1.0
        loss = adapter.loss_from(state, state.hidden + onehot[..., None] * delta[:, None, :])
        results.append((loss, *torch.autograd.grad(loss, [delta])))
    (loss_whole, grad_whole), (loss_tail, grad_tail) = results
    torch.testing.assert_close(loss_tail, loss_whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_tail, grad_whole, rtol=1e-4, atol=1e-6)


def test_audio_encoder_runs_once_per_audio(adapter):
    adapter.clear_audio_cache()
    before = adapter.audio_encoder_calls
    adapter.generate(prompts()[:1], max_new_tokens=2)
    adapter.generate(prompts()[:1], max_new_tokens=2)
    adapter.target_loss(prompts()[:1], ["sad"])
    assert adapter.audio_encoder_calls - before == 1


def test_audio_cache_is_bounded_by_bytes_and_keeps_the_current_call(adapter, monkeypatch):
    """Encoder states stay cached up to ``audio_cache_bytes`` (least recently used dropped first), so a pass whose
    clips fit is encoded once however many clips it has; the clips of the call at hand are kept even past the
    budget."""
    from editors.models import adapter as adapter_module

    clips = [synthetic_audio(40 + i, 0.5 + 0.1 * i) for i in range(6)]
    adapter.clear_audio_cache()
    one = adapter_module._nbytes(adapter.audio_states(clips[:1])[0])
    assert one > 0
    monkeypatch.setattr(adapter, "audio_cache_bytes", 100 * one)
    adapter.clear_audio_cache()
    before = adapter.audio_encoder_calls
    adapter.audio_states(clips[:3])
    adapter.audio_states(clips[3:])
    adapter.audio_states(clips)  # all six still cached: nothing encoded again
    assert adapter.audio_encoder_calls - before == 6
    monkeypatch.setattr(adapter, "audio_cache_bytes", 2 * one)  # about two clips (lengths differ a little)
    adapter.clear_audio_cache()
    before = adapter.audio_encoder_calls
    states = adapter.audio_states(clips)  # one call of six: all six kept while it runs
    assert len(states) == 6 and adapter.audio_encoder_calls - before == 6
    adapter.audio_states(clips[:1])  # the next call trims the cache to its budget, clip 0 (just read) kept
    assert 1 <= len(adapter._audio_cache) <= 2 and adapter.audio_encoder_calls - before == 6
    adapter.audio_states(clips[1:2])
    assert adapter.audio_encoder_calls - before == 7  # clip 1 was dropped by that trim
    assert adapter._audio_cache_held == sum(adapter_module._nbytes(v) for v in adapter._audio_cache.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_audio_encoder_cut_to_the_batch_gives_the_whole_windows_outputs(family, monkeypatch):
    """Qwen2-Audio's and AF3's encoders run only as wide as a batch's longest clip needs (plus the convolutions'
    reach, rounded up to ``encoder_width_step``), not the checkpoint's whole window: every clip's states equal those
    of the tower's own forward over the window, alone or batched with longer clips (AF3: a clip past the window
    is two windows), and gradients still reach the tower."""
    from transformers.masking_utils import create_bidirectional_mask

    from editors.models.whisper_tower import cut_width

    adapter = load_adapter(family, seed=0)
    tower = adapter.model.model.audio_tower
    fe = adapter.processor.feature_extractor
    window = int(fe.nb_max_frames)

    def whole_window(clip):  # the tower's own forward on each window of one clip
        pieces = adapter._windows(clip) if hasattr(adapter, "_windows") else [clip[: int(fe.n_samples)]]
        feats = fe(pieces, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
        if family == "tiny-audio-flamingo3":
            hidden = tower(feats["input_features"], input_features_mask=feats["attention_mask"]).last_hidden_state
        else:
            conv_len = (feats["attention_mask"].sum(-1) - 1) // 2 + 1
            valid = (torch.arange(window // 2)[None, :] < conv_len[:, None]).long()
            mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(len(pieces), window // 2, 1),
                                             attention_mask=valid)
            hidden = tower(feats["input_features"], attention_mask=mask).last_hidden_state
        frames = feats["attention_mask"].sum(-1).tolist()
        return torch.cat([hidden[i, : whisper_encoder_tokens(int(n))] for i, n in enumerate(frames)])

    clips = [synthetic_audio(60 + i, seconds) for i, seconds in enumerate((0.3, 0.9, 1.4, 2.5))]
    monkeypatch.setattr(adapter, "encoder_width_step", 16)
    widths = [cut_width([c], fe, 16) for c in clips]
    assert widths[0] < widths[1] < widths[2] < window and widths[3] == window  # 2.5 s is past the 2 s window
    assert all(w % 16 == 0 and w >= whisper_mel_frames(len(c), fe) + 2 for w, c in zip(widths[:3], clips))
    with torch.no_grad():
        reference = [whole_window(c) for c in clips]
        alone = [adapter._encode_audios([c])[0] for c in clips]
        batched = adapter._encode_audios(clips[:3])
    for ours, ref in zip(alone + batched, reference + reference[:3]):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    weight = tower.layers[-1].fc2.weight
    monkeypatch.setattr(weight, "requires_grad", True)
    adapter.audio_states_with_grad(clips[:1])[0].sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    weight.grad = None


@pytest.mark.parametrize("mels, seconds", [(16, 2), (128, 30)])
def test_log_mel_equals_the_whisper_feature_extractor(mels, seconds):
    """The spectrogram the cut encoder computes (and keeps on the device) is the Whisper feature extractor's, bit
    for bit, for widths that cut a clip, pad it, or hold the whole window (the tiny models' extractor and the
    released checkpoints' 128-mel, 30 s one)."""
    from editors.models.tiny import tiny_feature_extractor
    from editors.models.whisper_tower import log_mel

    fe = tiny_feature_extractor(num_mel_bins=mels, chunk_length=seconds)
    clips = [synthetic_audio(70 + i, s) for i, s in enumerate((0.4, 1.1, seconds + 0.5))]
    for width in (64, 144, int(fe.nb_max_frames)):
        ours = log_mel(clips, fe, width, "cpu")
        theirs = fe(clips, sampling_rate=16000, padding="max_length", max_length=width * fe.hop_length,
                    return_tensors="pt")["input_features"]
        assert ours.shape == theirs.shape == (3, mels, width) and ours.dtype == torch.float32
        assert torch.equal(ours, theirs)


def test_log_mel_of_a_dithering_extractor_is_the_extractors_own():
    """An extractor that adds dither noise is called itself (its noise, from torch's generator, included)."""
    from editors.models.tiny import tiny_feature_extractor
    from editors.models.whisper_tower import log_mel

    fe = tiny_feature_extractor()
    fe.dither = 1e-3
    clips = [synthetic_audio(80, 0.9), synthetic_audio(81, 1.5)]
    torch.manual_seed(5)
    ours = log_mel(clips, fe, 160, "cpu")
    torch.manual_seed(5)
    theirs = fe(clips, sampling_rate=16000, padding="max_length", max_length=160 * fe.hop_length,
                return_tensors="pt")["input_features"]
    fe.dither = 0.0
    assert torch.equal(ours, theirs) and not torch.equal(ours, log_mel(clips, fe, 160, "cpu"))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_cut_encoders_key_mask_is_the_one_transformers_builds(implementation, monkeypatch):
    """The padded keys' mask the cut encoder builds without asking the device (SDPA) gives the tower's layers the
    states of transformers' own mask; an unpadded batch and other attention implementations use transformers'."""
    from transformers.masking_utils import create_bidirectional_mask

    from editors.models.whisper_tower import _key_mask

    tower = load_adapter("tiny-qwen2-audio", seed=0).model.model.audio_tower
    monkeypatch.setattr(tower.config, "_attn_implementation", implementation)
    hidden = torch.randn(3, 20, tower.config.d_model, generator=torch.Generator().manual_seed(0))
    lengths = [20, 7, 13]
    valid = (torch.arange(20)[None, :] < torch.tensor(lengths)[:, None]).long()
    theirs = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=valid)
    ours = _key_mask(tower, hidden, lengths)
    def states(mask):
        out = hidden
        with torch.no_grad():
            for layer in tower.layers:
                out = layer(out, mask)
                out = out[0] if isinstance(out, tuple) else out
        return out

    assert not torch.equal(states(theirs), states(None))  # the padding matters to these rows
    torch.testing.assert_close(states(ours), states(theirs), rtol=0, atol=0)
    if implementation == "sdpa":
        assert ours.shape == (3, 1, 1, 20) and ours.dtype == torch.bool
    unpadded = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=None)
    assert (_key_mask(tower, hidden, [20, 20, 25]) is None) == (unpadded is None)


def test_parameter_groups_and_accessors(adapter):
    groups = adapter.parameter_groups()
    names = set(dict(adapter.model.named_parameters()))
    last = adapter.num_llm_layers - 1
    for key in ("connector", "audio_encoder", f"llm_layer.{last}", f"llm_mlp_out.{last}"):
        assert groups[key] and set(groups[key]) <= names
    assert not set(groups["connector"]) & set(groups["audio_encoder"])
    assert set(groups[f"llm_mlp_out.{last}"]) <= set(groups[f"llm_layer.{last}"])
    assert adapter.mlp_out_proj(-1).weight.shape == (adapter.lm_head().weight.shape[1],
                                                      adapter.mlp(-1).up_proj.weight.shape[0])
    with pytest.raises(ValueError, match="out of range"):
        adapter.resolve_layer(adapter.num_llm_layers)


def test_save_and_reload_round_trip(adapter, tmp_path):
    save_tiny(adapter, tmp_path / "m")
    assert family_of(str(tmp_path / "m")) == adapter.family
    again = load_adapter(str(tmp_path / "m"))
    assert again.is_tiny and type(again) is type(adapter)
    assert again.generate(prompts(), max_new_tokens=5) == adapter.generate(prompts(), max_new_tokens=5)
    assert again.render(prompts()[2]) == adapter.render(prompts()[2])


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        family_of("tiny-gpt")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not a supported LALM"):
        family_of(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model family"):
        adapter_class("llama")


def test_audio_digest_is_computed_once_only_for_clips_that_cannot_change():
    """A clip from ``as_audio_array`` is read-only and owns its data: its content hash is remembered (and forgotten
    with it). A writable array is hashed again each time, so changing it in place changes its key."""
    import gc

    import numpy as np

    from editors.models import prompts

    raw = np.linspace(-1, 1, 1600, dtype=np.float32)
    clip = prompts.as_audio_array(raw)
    assert clip is not raw and not clip.flags.writeable and clip.flags.owndata
    assert prompts.audio_digest(clip) == prompts.audio_digest(raw)
    assert id(clip) in prompts._DIGESTS
    before = prompts.audio_digest(raw)
    raw[0] = 0.5  # a writable array: its new content gets a new key
    assert prompts.audio_digest(raw) != before
    key = id(clip)
    del clip
    gc.collect()
    assert key not in prompts._DIGESTS


@pytest.mark.parametrize("family", FAMILIES + ["tiny-desta25"])
def test_the_audio_encoders_convolutions_never_run_cudnn_and_the_switch_comes_back(family, monkeypatch):
    """cuDNN builds a host-side plan per new (clips, frames) shape (editors/models/kernels.py): every audio-encoder
    convolution, with or without gradients, runs with cuDNN switched off; the switch is as it was outside, after an
    error too, and the bench's A/B (``CONVOLUTION_CUDNN``) leaves it alone."""
    from editors.models import kernels

    adapter = load_adapter(family, seed=0)
    seen: list[bool] = []
    original = torch.nn.Conv1d._conv_forward

    def recording(self, *args, **kwargs):
        seen.append(torch.backends.cudnn.enabled)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Conv1d, "_conv_forward", recording)
    assert torch.backends.cudnn.enabled
    adapter.audio_states([synthetic_audio(11, 1.1)])
    adapter.audio_states_with_grad([synthetic_audio(12, 0.9)])
    assert seen and not any(seen)
    assert torch.backends.cudnn.enabled
    with pytest.raises(RuntimeError), kernels.encoder_convolutions():
        raise RuntimeError("inside")
    assert torch.backends.cudnn.enabled
    monkeypatch.setattr(kernels, "CONVOLUTION_CUDNN", True)
    with kernels.encoder_convolutions():
        assert torch.backends.cudnn.enabled
