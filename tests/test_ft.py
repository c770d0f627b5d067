"""FT-LLM and FT-Audio on tiny models, what is particular to them: convergence with the paper's early stop, what
they touch, the shared fine-tuning loop. (Every method's edit, restore, runner and resume: tests/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch

from _editor_helpers import changed_tensors, count_host_reads, state_copy, synthetic_audio
from editors.base import EditRequest, finetune
from editors.registry import get_editor_class
from editors.registry import load_hparams
from editors.models import load_adapter
from editors.models.base import Prompt
from editors.session import EditSession


TEXT_PROMPTS = [Prompt("Which of the following is a planet? (a) Mars (b) the Sun"),
                Prompt("What is the capital of France? (a) Paris (b) Rome", system="Answer briefly.")]


def make_edit(seed: int = 7) -> EditRequest:
    return EditRequest(instance_id="emotion/test/000001", attribute="emotion", original_label="happy",
                       target_label="sad", question="What is the emotion of the speaker? (a) happy (b) sad (c) angry",
                       options=["happy", "sad", "angry"], target="sad", audio=synthetic_audio(seed, 1.2))


def editor_for(adapter, method: str, **overrides):
    return get_editor_class(method)(adapter, load_hparams(method, adapter.family, tiny=True, overrides=overrides))


@pytest.mark.parametrize("model,method", [("tiny-qwen2-audio", "ft_audio"), ("tiny-audio-flamingo3", "ft_llm")])
def test_ft_reaches_target_and_stops_early(model, method):
    adapter = load_adapter(model, seed=0)
    edit = make_edit()
    editor = editor_for(adapter, method, max_steps=250)
    threshold = editor.hparams.early_stop_loss
    assert adapter.generate([edit.prompt()], max_new_tokens=8) != [edit.target]
    before = state_copy(adapter.model)
    session = EditSession(editor)
    with session.edit(edit) as stats:
        assert stats["loss"] < threshold and stats["steps"] < 250  # stopped early, below the paper's threshold
        assert adapter.target_loss([edit.prompt()], [edit.target]).item() < threshold
        assert adapter.generate([edit.prompt()], max_new_tokens=8) == [edit.target]
        changed = changed_tensors(adapter.model, before)
        assert changed and set(changed) <= set(editor.touched_parameters())
    assert changed_tensors(adapter.model, before) == [] and session.snapshot.max_abs_diff() == 0.0


def test_ft_audio_touches_only_the_connector_and_text_outputs_stay_identical():
    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    editor = editor_for(adapter, "ft_audio", max_steps=20)
    assert set(editor.touched_parameters()) == set(adapter.parameter_groups()["connector"])
    text_before = adapter.generate(TEXT_PROMPTS, max_new_tokens=10)
    audio_prompt = Prompt("Which animal is this? (a) dog (b) cat", audio=synthetic_audio(3))
    audio_before = adapter.generate([audio_prompt], max_new_tokens=10)
    loss_before = adapter.target_loss(TEXT_PROMPTS, ["Mars", "Paris"], reduction="none")
    editor.apply(make_edit())
    assert adapter.generate(TEXT_PROMPTS, max_new_tokens=10) == text_before
    assert torch.equal(adapter.target_loss(TEXT_PROMPTS, ["Mars", "Paris"], reduction="none"), loss_before)
    assert adapter.generate([audio_prompt], max_new_tokens=10) != audio_before  # audio inputs did change


def test_ft_llm_edits_only_the_configured_layer():
    adapter = load_adapter("tiny-audio-flamingo3", seed=0)
    editor = editor_for(adapter, "ft_llm", layer=1, max_steps=2, params="mlp_out")
    assert editor.touched_parameters() == adapter.parameter_groups()["llm_mlp_out.1"]
    before = state_copy(adapter.model)
    editor.apply(make_edit())
    assert set(changed_tensors(adapter.model, before)) == {"model.language_model.layers.1.mlp.down_proj.weight"}


def test_finetune_keeps_fp32_masters_for_bf16_parameters():
    layer = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    layer.weight.data.fill_(1.0)
    layer.weight.requires_grad_(False)  # frozen like every model parameter outside an edit
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    # d/dw (4w)^2 = 32 per weight; lr 3e-5 -> updates of 1e-3, below half of bf16's spacing at 1.0 (2**-8):
    # applied directly to the bf16 weight they would all round away; fp32 masters accumulate them.
    result = finetune({"weight": layer.weight}, lambda: (layer(x).float() ** 2).sum(), lr=3e-5, max_steps=12,
                      optimizer="sgd")
    assert result.steps == 12 and not result.stopped_early
    assert layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
    assert float(layer.weight.float().max()) < 1.0


def test_finetune_stops_early_and_rejects_unknown_optimizer():
    w = torch.nn.Parameter(torch.tensor([3.0]))
    result = finetune({"w": w}, lambda: (w ** 2).sum(), lr=0.5, max_steps=50, early_stop_loss=1e-2,
                      optimizer="sgd")
    assert result.stopped_early and result.loss < 1e-2 and result.steps < 50
    with pytest.raises(ValueError, match="optimizer"):
        finetune({"w": w}, lambda: (w ** 2).sum(), lr=0.1, max_steps=1, optimizer="lbfgs")


def test_finetune_without_an_early_stop_reads_the_loss_once(monkeypatch):
    """No early stop, nothing to decide per step: the loop reads the loss after its last step only (a read per step
    is a host sync on a GPU), and reports the last loss computed, as the checked loop does."""
    reads = count_host_reads(monkeypatch, "__float__")

    def run(early_stop):
        w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
        reads.clear()
        result = finetune({"w": w}, lambda: (w ** 2).sum(), lr=0.1, max_steps=6, early_stop_loss=early_stop,
                          optimizer="adam")
        return w.detach().clone(), result, len(reads)

    w_free, r_free, reads_free = run(None)
    w_checked, r_checked, reads_checked = run(-1.0)  # a threshold no loss reaches: the same steps, checked
    assert reads_free == 1 and reads_checked == 6
    assert torch.equal(w_free, w_checked) and r_free == r_checked and r_free.steps == 6


def test_ft_audio_over_the_columns_from_the_first_audio_trains_what_the_whole_width_trains(monkeypatch):
    """FT-Audio's steps compute only the columns from the first audio on (``adapter.tail_state``; the connector
    cannot change the earlier ones): the K edits' connector copies, one edit's connector and their stats equal
    those of running the whole width at every step. DeSTA2.5's tiny prompts put enough text before the audio for
    the CPU cut (tail_start) to fall after column 0."""
    import sys

    sys.path.insert(0, "tests")
    from _methods_helpers import context, edit_request, hparams, tiny_adapter
    from editors.ft_audio import FTAudio
    from editors.models.buckets import training_groups

    adapter = tiny_adapter("tiny-desta25")
    edits = [edit_request(target=t, audio_seed=s) for t, s in (("sad", 1), ("happy birthday to you", 2), ("dog", 3))]
    settings = {"max_steps": 12}  # enough Adam steps for last-bit differences to grow; a fast test
    editor = FTAudio(adapter, hparams("ft_audio", adapter, **settings), context())
    cuts = [editor._frame(batch).first_column for _, batch in
            training_groups(adapter, [e.prompt() for e in edits], [e.target for e in edits])]
    assert any(cuts)
    names = editor.touched_parameters()
    params = {n: p for n, p in adapter.model.named_parameters() if n in names}
    initial = {n: p.detach().clone() for n, p in params.items()}
    found = []
    for whole in (False, True):
        if whole:
            monkeypatch.setattr(adapter, "tail_state", lambda state, first: state)
        editor = FTAudio(adapter, hparams("ft_audio", adapter, **settings), context())
        many = editor.apply_many(edits)
        copies = {n: t.detach().clone() for n, t in editor._copies.current().items()}
        one = editor.apply(edits[1])
        found.append((many, copies, one, {n: p.detach().clone() for n, p in params.items()}))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(initial[n])
    (many, copies, one, weights), (many_w, copies_w, one_w, weights_w) = found
    assert many == many_w and one == one_w and one["steps"] > 0
    assert all(torch.equal(copies[n], copies_w[n]) for n in copies)
    assert all(torch.equal(weights[n], weights_w[n]) for n in weights)
