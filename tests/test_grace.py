"""GRACE (editors/grace.py), what is particular to it: codebook hits per row, other inputs bit-identical, codebook
growth rules (add / expand / split), sequential accumulation, the "last" replacement. (Every method's edit,
restore, runner and resume: tests/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch

from _methods_helpers import (TINY_MODELS, assert_same_state, context, demo_dataset, edit_request, first_answer_token,
                              hparams, model_state, one_token_words, tiny_adapter)
from editors.grace import GRACE, Entry, GraceCodebook
from editors.models.base import Prompt
from editors.session import EditSession

TEXT = Prompt("Question: which of the following is correct? Answer: A B C D. Choose the best answer.")


def _edits(adapter, n: int):
    probes = [edit_request(audio_seed=1 + 3 * i, instance=f"emotion/test/{i:06d}") for i in range(n)]
    words = one_token_words(adapter, n, exclude=tuple(first_answer_token(adapter, p) for p in probes))
    return [edit_request(target=w, audio_seed=1 + 3 * i, instance=f"emotion/test/{i:06d}")
            for i, w in enumerate(words)]


def _logits(adapter, prompts):
    with torch.no_grad():
        return adapter.logits_from(adapter.hidden_entering(adapter.prepare(prompts), 0))


#: Codebook hit expected for another audio with the same question: the 4-layer random LLMs of the tiny DeSTA2.5 and
#: AF3 barely mix the audio into the last prompt token, so that prompt's key lies within the edit's radius (half the
#: key's norm) there.
OTHER_AUDIO_HIT = {"tiny-qwen2-audio": -1, "tiny-audio-flamingo3": 0, "tiny-desta25": 0}


@pytest.mark.parametrize("model", TINY_MODELS)
def test_grace_edit_takes_other_inputs_stay_bit_identical_and_reset_restores(model):
    adapter = tiny_adapter(model)
    (edit,) = _edits(adapter, 1)
    other = edit_request(audio_seed=7)  # another audio, same question
    before_text = _logits(adapter, [TEXT])
    before_other = adapter.generate([other.prompt()], max_new_tokens=4)
    state = model_state(adapter)
    editor = GRACE(adapter, hparams("grace", adapter), context())
    assert editor.touched_parameters() == []
    with EditSession(editor).edit(edit) as stats:
        assert stats["codebook_size"] == 1 and stats["action"] == "add"
        out = adapter.generate([edit.prompt(), TEXT, other.prompt()], max_new_tokens=4)
        _logits(adapter, [edit.prompt(), TEXT, other.prompt()])  # one forward over the three rows: per-row hits
        assert out[0].startswith(edit.target)
        assert editor.codebook.last_hits == [0, -1, OTHER_AUDIO_HIT[model]]
        if OTHER_AUDIO_HIT[model] == -1:
            assert out[2] == before_other[0]
        assert torch.equal(_logits(adapter, [TEXT]), before_text)  # no hit: exactly the original projection
    assert_same_state(adapter, state)


def test_grace_sequential_edits_accumulate_in_the_codebook():
    adapter = tiny_adapter("tiny-desta25")
    first, second = _edits(adapter, 2)
    state = model_state(adapter)
    editor = GRACE(adapter, hparams("grace", adapter), context())
    with EditSession(editor) as session:
        session.apply(first)
        value = editor.codebook.entries[0].value.clone()
        stats = session.apply(second)
        assert stats["codebook_size"] == 2
        assert torch.equal(editor.codebook.entries[0].value, value)  # the first entry is left as it was
        out = adapter.generate([first.prompt(), second.prompt()], max_new_tokens=1)
        _logits(adapter, [first.prompt(), second.prompt()])  # one forward over both rows: per-row hits
        assert out == [first.target, second.target]  # both edits hold after the second
        assert editor.codebook.last_hits == [0, 1]
    assert_same_state(adapter, state)


def test_grace_codebook_expands_for_the_same_label_and_splits_for_another():
    adapter = tiny_adapter("tiny-qwen2-audio")
    a, b, c = (edit_request(target=t, audio_seed=s, instance=f"emotion/test/{i:06d}")
               for i, (t, s) in enumerate([("sad", 1), ("sad", 4), ("angry", 7)]))
    editor = GRACE(adapter, hparams("grace", adapter, radius="absolute", eps=1.0e6, n_iter=2), context())
    with EditSession(editor) as session:
        assert session.apply(a)["action"] == "add"
        stats = session.apply(b)  # within the (huge) radius, same label: the entry grows to cover it
        assert stats["action"] == "expand" and stats["codebook_size"] == 1
        assert editor.codebook.entries[0].radius == 1.0e6
        stats = session.apply(c)  # within the radius, another label: both radii shrink to half the distance
        assert stats["action"] == "split" and stats["codebook_size"] == 2
        radii = [e.radius for e in editor.codebook.entries]
        assert radii[0] == radii[1] == pytest.approx(stats["nearest_distance"] / 2)


def test_grace_replacement_last_only_changes_the_last_prompt_position():
    adapter = tiny_adapter("tiny-qwen2-audio")
    proj = adapter.mlp_out_proj(-2)
    codebook = GraceCodebook(proj, "last")
    x = torch.randn(2, 5, proj.in_features, generator=torch.Generator().manual_seed(0))
    codebook.entries.append(Entry(key=x[0, -1].float(), value=torch.zeros(proj.out_features), radius=1e-3,
                                  label="a"))  # row 0's last position hits, row 1's does not
    with torch.no_grad():
        original = proj(x)
        out = codebook(x)
    assert codebook.last_hits == [0, -1]
    assert torch.equal(out[0, -1], torch.zeros(proj.out_features))
    assert torch.equal(out[0, :-1], original[0, :-1]) and torch.equal(out[1], original[1])
    with torch.no_grad():
        assert torch.equal(codebook(x[:, -1:]), proj(x[:, -1:]))  # a decoding step is never replaced with "last"



def test_grace_fires_on_paraphrases_of_the_edit_prompt_on_the_reference_model():
    """On the shipped reference model the relative radius (half the key's norm) covers the paraphrased questions
    about the edit's audio (generality type 1) of every demo test instance, and no locality prompt; EasyEdit's
    absolute radius (1.0) misses paraphrases of the instances with large activations."""
    from editors.base import EditRequest
    from editors.data import load_instances
    from editors.models import load_adapter
    from editors.models.base import as_audio_array
    from sake.demo import DEFAULT_MODEL

    adapter = load_adapter(str(DEFAULT_MODEL))
    tables = [load_instances(str(demo_dataset()), config, "test") for config in ("animal", "emotion", "gender",
                                                                                  "language")]
    rows = [table[i] for table in tables for i in range(2)]  # 8 edits, 2 per attribute

    def prompts(row, column, types=None):
        return [Prompt(question=it["question"], audio=as_audio_array(it["audio"])) if it.get("audio") is not None
                else Prompt(question=it["question"]) for it in row[column] if types is None or it["type"] in types]

    hits = {"relative": [], "absolute": []}
    for radius, eps in (("relative", None), ("absolute", 1.0)):
        # n_iter 0: the entry's key and radius decide whether it fires, its value does not
        overrides = {"n_iter": 0, "radius": radius} | ({"eps": eps} if eps is not None else {})
        editor = GRACE(adapter, hparams("grace", adapter, **overrides), context())
        for row in rows:
            try:
                editor.apply(EditRequest.from_row(row))
                codebook = editor.codebook
                paraphrases = prompts(row, "generality", types=(1,))
                others = prompts(row, "locality_audio") + prompts(row, "locality_text")
                with torch.no_grad():
                    adapter.logits_from(adapter.hidden_entering(adapter.prepare(paraphrases + others), 0))
                hits[radius] += [(k == 0, i < len(paraphrases)) for i, k in enumerate(codebook.last_hits)]
            finally:
                editor.reset()
    relative = hits["relative"]
    assert len([h for h, para in relative if para]) == len(rows)  # every paraphrase fires
    assert all(h == para for h, para in relative)  # and no locality prompt
    assert sum(h for h, para in hits["absolute"] if para) < len(rows)  # the absolute radius misses some
