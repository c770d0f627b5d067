"""FT (Encoder) (editors/ft_encoder.py), what is particular to it: trains only the last audio-encoder layers,
text-only outputs stay bit-identical, sequential edits accumulate, DeSTA2.5 transcripts stay the released
encoder's. (Every method's edit, restore, runner and resume: tests/test_methods.py; the audio-state cache
following the edited encoder: tests/test_session.py.)"""

from __future__ import annotations

import pytest
import torch

from _editor_helpers import synthetic_audio
from _methods_helpers import (TINY_MODELS, assert_same_state, context, edit_request, first_answer_token, hparams,
                              model_state, one_token_words, tiny_adapter)
from editors.ft_encoder import FTEncoder
from editors.models.base import Prompt
from editors.session import EditSession

TEXT = [Prompt("Which data structure is last-in first-out? (a) queue (b) stack"),
        Prompt("What is the capital of France? (a) Paris (b) Rome", system="Answer briefly.")]
#: Fast settings for the tiny encoders (the YAML's tiny section takes up to 200 steps at lr 1e-2).
FAST = {"lr": 3.0e-2, "max_steps": 60, "early_stop_loss": 0.5}


def _edits(adapter, n: int):
    probes = [edit_request(audio_seed=1 + 3 * i, instance=f"emotion/test/{i:06d}") for i in range(n)]
    words = one_token_words(adapter, n, exclude=tuple(first_answer_token(adapter, p) for p in probes))
    return [edit_request(target=w, audio_seed=1 + 3 * i, instance=f"emotion/test/{i:06d}")
            for i, w in enumerate(words)]


@pytest.mark.parametrize("model", TINY_MODELS)
def test_ft_encoder_edits_the_last_encoder_layers_and_text_outputs_stay_bit_identical(model):
    adapter = tiny_adapter(model)
    (edit,) = _edits(adapter, 1)
    editor = FTEncoder(adapter, hparams("ft_encoder", adapter, **FAST), context())
    touched = editor.touched_parameters()
    assert touched == adapter.parameter_names(adapter.audio_encoder_layers()[-1])
    assert set(touched) <= set(adapter.parameter_groups()["audio_encoder"])
    editor.setup()
    text_before = adapter.generate(TEXT, max_new_tokens=8)
    text_loss = adapter.target_loss(TEXT, ["stack", "Paris"], reduction="none")
    audio_before = adapter.generate([edit.prompt()], max_new_tokens=4)
    loss_before = float(adapter.target_loss([edit.prompt()], [edit.target]))
    state = model_state(adapter)
    with EditSession(editor).edit(edit) as stats:  # restores the weights and drops their audio states after
        changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, state["params"][n])}
        assert changed == set(touched)
        assert adapter.generate(TEXT, max_new_tokens=8) == text_before
        assert torch.equal(adapter.target_loss(TEXT, ["stack", "Paris"], reduction="none"), text_loss)
        loss_after = float(adapter.target_loss([edit.prompt()], [edit.target]))  # evaluation sees the edit
        if model != "tiny-desta25":
            assert loss_after < 0.5 * loss_before
            assert adapter.generate([edit.prompt()], max_new_tokens=4)[0].startswith(edit.target)
        else:  # its random Q-Former averages one Whisper layer's change over frames and taps: a smaller step
            assert loss_after < 0.95 * loss_before
        assert loss_after == pytest.approx(stats["loss"], rel=0.2)
    assert_same_state(adapter, state)
    assert adapter.generate([edit.prompt()], max_new_tokens=4) == audio_before


def test_ft_encoder_sequential_edits_accumulate():
    adapter = tiny_adapter("tiny-audio-flamingo3")
    first, second = _edits(adapter, 2)
    editor = FTEncoder(adapter, hparams("ft_encoder", adapter, lr=3.0e-2, max_steps=8, early_stop_loss=None),
                       context())
    editor.setup()
    state = model_state(adapter)
    params = dict(adapter.model.named_parameters())
    with EditSession(editor) as session:
        session.apply(first)
        after_first = {n: params[n].detach().clone() for n in editor.touched_parameters()}
        loss_first = float(adapter.target_loss([first.prompt()], [first.target]))
        session.apply(second)  # starts from the first edit's weights
        assert all(not torch.equal(params[n], after_first[n]) for n in after_first)
        assert all(not torch.equal(after_first[n], state["params"][n]) for n in after_first)
        assert float(adapter.target_loss([first.prompt()], [first.target])) != loss_first
    assert_same_state(adapter, state)


def test_desta_transcripts_come_from_the_released_encoder_while_it_is_edited():
    adapter = tiny_adapter("tiny-desta25")
    (edit,) = _edits(adapter, 1)
    editor = FTEncoder(adapter, hparams("ft_encoder", adapter, lr=0.5, max_steps=3, early_stop_loss=None), context())
    editor.setup()
    fresh = synthetic_audio(41, 0.9)  # never seen before
    with EditSession(editor).edit(edit):
        with torch.no_grad():
            edited_feats = adapter.model.perception.whisper.model.encoder(adapter._features([fresh]))
        edited_transcript = adapter.transcripts([fresh])[0]
    adapter._transcripts.clear()
    with torch.no_grad():
        released_feats = adapter.model.perception.whisper.model.encoder(adapter._features([fresh]))
    assert not torch.equal(edited_feats.last_hidden_state, released_feats.last_hidden_state)  # the edit was real
    assert adapter.transcripts([fresh])[0] == edited_transcript

