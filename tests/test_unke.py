"""UnKE (editors/unke.py), what is particular to it: a tiny edit takes moving only the chosen layer, and the
preservation data. (Every method's edit, restore, runner and resume: tests/test_methods.py.)"""

from __future__ import annotations

import datasets
import pytest
import torch

from _methods_helpers import (assert_same_state, audio_item, context, edit_request, hparams, model_state,
                              one_token_word, text_item, tiny_adapter)
from editors.session import EditSession
from editors.preservation import preservation_prompts
from editors.unke import UnKE
from sake_core.errors import ConfigError


def test_unke_edit_makes_the_greedy_answer_the_target_and_restores_exactly():
    """UnKE rewrites the key at the last prompt token, i.e. the first answer token; on a random tiny model the
    tokens after it come from the model itself, so the edit asks for a one-token answer and the test checks the
    greedy answer token (and that the target loss drops)."""
    adapter = tiny_adapter("tiny-audio-flamingo3")
    probe = edit_request()
    before_output = adapter.generate([probe.prompt()], max_new_tokens=8)[0]
    first = adapter.generate([probe.prompt()], max_new_tokens=1)[0]
    target = one_token_word(adapter, exclude=first)
    edit = edit_request(target=target)
    loss_before = float(adapter.target_loss([edit.prompt()], [target]))
    editor = UnKE(adapter, hparams("unke", adapter, preserve_source="instance"), context())
    state = model_state(adapter)
    touched = editor.touched_parameters()
    layer_names = set(adapter.parameter_groups()[f"llm_layer.{adapter.resolve_layer(editor.hparams.layer)}"])
    assert set(touched) == layer_names
    with EditSession(editor).edit(edit) as stats:
        assert adapter.generate([edit.prompt()], max_new_tokens=1) == [target]
        assert float(adapter.target_loss([edit.prompt()], [target])) < loss_before
        assert stats["v_steps"] > 0 and stats["optim_steps"] == editor.hparams.optim_steps
        changed = [n for n, p in adapter.model.named_parameters() if not torch.equal(p, state["params"][n])]
        assert changed and set(changed) <= layer_names  # only the chosen layer moved
    assert_same_state(adapter, state)
    assert adapter.generate([probe.prompt()], max_new_tokens=8)[0] == before_output


def _train_table(n: int, attribute: str) -> datasets.Dataset:
    rows = []
    for i in range(n):
        iid = f"{attribute}/train/{i:06d}"
        rows.append({"id": iid,
                     "locality_text": [text_item(f"{iid}/loc_text", f"Text question {attribute} {i}?", "a")],
                     "locality_audio": [audio_item(f"{iid}/loc_audio1", f"Audio question {attribute} {i}?", i,
                                                   "happy" if i % 2 else "dog")]})
    return datasets.Dataset.from_list(rows)


def test_preservation_prompts_come_from_other_train_instances_deterministically():
    tables = {c: _train_table(6, c) for c in ("animal", "emotion", "gender", "language")}
    calls = []

    def load_rows(config, split):
        calls.append((config, split))
        return tables[config]

    edit = edit_request()  # original label "happy", target "sad"
    ctx = context(load_rows=load_rows)
    prompts = preservation_prompts(edit, ctx, 5, 4, source="train", seed=0)
    assert {s for _, s in calls} == {"train"}
    assert len(prompts) == 9
    text, audio = prompts[:5], prompts[5:]
    assert all(p.audio is None and p.question.startswith("Text question") for p in text)
    assert all(p.audio is not None for p in audio)
    # audio items labelled with the edit's original label ("happy": odd indices) are never used
    assert all(int(p.question.rsplit(" ", 1)[1].rstrip("?")) % 2 == 0 for p in audio)
    again = preservation_prompts(edit, ctx, 5, 4, source="train", seed=0)
    assert [p.question for p in again] == [p.question for p in prompts]
    other = preservation_prompts(edit, ctx, 5, 4, source="train", seed=1)
    assert [p.question for p in other] != [p.question for p in prompts]
    # no dataset access: refused for the train source (the edit would train on the items its locality is scored
    # on); the instance source takes the instance's own locality items
    with pytest.raises(ConfigError, match="preserve_source: train needs the dataset's train split"):
        preservation_prompts(edit, context(), 2, 3, source="train", seed=0)
    own = preservation_prompts(edit, context(), 2, 3, source="instance", seed=0)
    assert [p.question for p in own[:2]] == [edit.row["locality_text"][0]["question"]] * 2
    assert len(own) == 5 and all(p.audio is not None for p in own[2:])


def _edits_and_context(demo_dataset, n: int):
    from editors.base import EditRequest, RunContext
    from editors.data import load_instances

    rows = [load_instances(str(demo_dataset), c, "test")[0] for c in ("emotion", "animal", "gender")][:n]
    ctx = RunContext(seed=0, load_rows=lambda config, split: load_instances(str(demo_dataset), config, split))
    return [EditRequest.from_row(r) for r in rows], ctx


def test_unke_edits_per_pass_equal_one_at_a_time(demo_dataset):
    """K UnKE edits in one pass (stage 1 batched, one layer copy per edit in stage 2): each edit's greedy outputs
    and step counts are those of editing it alone, the model's own weights untouched."""
    from editors.data import eval_items

    adapter = tiny_adapter("tiny-qwen2-audio")
    edits, ctx = _edits_and_context(demo_dataset, 3)
    editor = UnKE(adapter, hparams("unke", adapter, optim_steps=8, v_steps=6), ctx)
    session = EditSession(editor)
    prompts = [[it.prompt() for it in eval_items(e.row)][:4] for e in edits]
    alone, alone_stats = [], []
    for edit, ps in zip(edits, prompts):
        with session.edit(edit) as edit_stats:
            alone_stats.append(edit_stats)
            alone.append(adapter.generate(ps, max_new_tokens=5))
    state = model_state(adapter)
    with session.edits(edits) as stats:
        assert_same_state(adapter, state)  # the copies hold the edits
        together = editor.generate_many(prompts, max_new_tokens=5)
    assert together == alone and len({tuple(a) for a in alone}) > 1
    assert [(s["v_steps"], s["optim_steps"], s["n_preserve"]) for s in stats] == \
        [(s["v_steps"], s["optim_steps"], s["n_preserve"]) for s in alone_stats]
    assert all(abs(s["loss"] - t["loss"]) <= 1e-3 * max(1.0, abs(t["loss"])) for s, t in zip(stats, alone_stats))


def test_stage_one_over_the_tail_finds_the_keys_of_the_whole_width(monkeypatch):
    """Stage 1 recomputes only the columns from the last prompt token on (``adapter.tail_state``); the keys and
    stats it finds, for one edit and for K at once, are those of running the whole width at every step."""
    adapter = tiny_adapter("tiny-qwen2-audio")
    edits = [edit_request(target=t) for t in ("sad", "happy birthday to you", "dog")]
    found = {}
    for mode in ("tail", "whole width"):
        if mode == "whole width":
            monkeypatch.setattr(adapter, "tail_state", lambda state, first: state)
        editor = UnKE(adapter, hparams("unke", adapter, preserve_source="instance"), context())
        found[mode] = (editor.compute_key(edits[1]), editor.compute_keys(edits))
    (one, one_stats), (many, many_stats) = found["tail"]
    (one_w, one_stats_w), (many_w, many_stats_w) = found["whole width"]
    assert torch.equal(one, one_w) and torch.equal(many, many_w)
    assert one_stats == one_stats_w and many_stats == many_stats_w and one_stats["v_steps"] > 0


def test_stage_one_in_one_batch_finds_the_keys_of_the_width_groups(monkeypatch):
    """On CUDA stage 1 runs every edit's row in one batch at the widest row's width (its steps are launch-bound);
    in exact arithmetic the left padding changes nothing, so in float64 the keys and step counts are those of the
    canonical width groups."""
    from dataclasses import replace

    from _editor_helpers import synthetic_audio
    from editors.models import buckets

    adapter = tiny_adapter("tiny-qwen2-audio")
    adapter.model.to(torch.float64)
    edits = [replace(edit_request(target=t, audio_seed=i), audio=synthetic_audio(i, seconds))
             for i, (t, seconds) in enumerate((("sad", 0.3), ("happy birthday to you", 1.9), ("dog", 1.0)))]
    groups = {}
    keys = {}
    for one_batch in (False, True):
        monkeypatch.setitem(buckets.TAIL_ONE_BATCH, "cpu", one_batch)
        groups[one_batch] = buckets.training_groups(adapter, [e.prompt() for e in edits], [e.target for e in edits],
                                                    tail_only=True)
        unke = UnKE(adapter, hparams("unke", adapter, preserve_source="instance"), context())
        keys[one_batch] = unke.compute_keys(edits)
    assert len(groups[False]) > 1 and [rows for rows, _ in groups[True]] == [[0, 1, 2]]
    assert groups[True][0][1].input_ids.shape[1] == max(b.input_ids.shape[1] for _, b in groups[False])
    (grouped, grouped_stats), (together, together_stats) = keys[False], keys[True]
    assert float((together - grouped).norm() / grouped.norm()) < 1e-9
    assert [s["v_steps"] for s in together_stats] == [s["v_steps"] for s in grouped_stats]


def _three_sequences(family: str, packs: bool, monkeypatch) -> tuple:
    """A tiny ``family`` adapter (packing sequences where ``packs``), the states of three prompts entering layer 1,
    their outputs of layer 1 alone and their lengths."""
    from editors.models import buckets, fused_layer
    from editors.models.base import Prompt

    monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", packs)
    monkeypatch.setitem(buckets.PACK_SEQUENCES, "cpu", packs)
    adapter = tiny_adapter(family)
    batch = adapter.prepare([Prompt("What is the emotion?"), Prompt("Which animal makes this sound? (a) dog (b) cat"),
                             Prompt("Is it a man?")])
    state = adapter.hidden_entering(batch, 1)
    with torch.no_grad():
        alone = adapter.run_layers(state)
    return adapter, state, alone, batch.attention_mask.sum(-1).tolist()


@pytest.mark.parametrize("kernel", ["mask", "sequences"])
@pytest.mark.parametrize("family", ["tiny-qwen2-audio", "tiny-audio-flamingo3", "tiny-desta25"])
def test_a_layer_runs_packed_sequences_as_their_own_rows(family, kernel, monkeypatch):
    """``adapter.packed_state``: sequences entering a layer, packed back to back into rows (each attending within
    itself at its own positions), get the layer outputs of their own left-padded rows (the three families), under a
    boolean mask or as variable-length sequences over the rows (CUDA's path; here its dense fallback)."""
    from bench.cuda_checks import two_packed_rows
    from editors.models.batch import PackedSequences

    packs = kernel == "sequences"
    adapter, state, alone, lengths = _three_sequences(family, packs, monkeypatch)
    # row 0: padding, sequence 0, sequence 1; row 1: padding, sequence 2
    hidden, segments, positions, place = two_packed_rows(state.hidden, lengths, pad=3)
    packed = adapter.packed_state(1, hidden, segments, positions)
    assert isinstance(packed.masks["full_attention"], PackedSequences) == packs
    with torch.no_grad():
        together = adapter.run_layers(packed)
    for i, (n, (row, column)) in enumerate(zip(lengths, place)):
        torch.testing.assert_close(together[row, column:column + n], alone[i, -n:], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(together).all()


@pytest.mark.parametrize("family", ["tiny-qwen2-audio", "tiny-desta25"])
def test_a_layer_runs_sequences_that_go_on_from_row_to_row(family, monkeypatch):
    """``adapter.packed_state`` with sequences laid back to back over rows narrower than they are (CUDA's stream
    layout of UnKE's stage 2): each still gets the layer outputs of its own left-padded row through the
    variable-length path (here its dense fallback); the boolean-mask path, which attends row by row, refuses it."""
    from bench.cuda_checks import stream_rows
    from editors.models import buckets

    adapter, state, alone, lengths = _three_sequences(family, True, monkeypatch)
    hidden, segments, positions, starts = stream_rows(state.hidden, lengths)
    assert all(n > segments.shape[1] for n in lengths)  # every sequence runs over at least two rows
    with torch.no_grad():
        together = adapter.run_layers(adapter.packed_state(1, hidden, segments, positions))
    together = together.reshape(-1, together.shape[-1])
    for i, (n, at) in enumerate(zip(lengths, starts)):
        torch.testing.assert_close(together[at:at + n], alone[i, -n:], rtol=1e-5, atol=1e-5)
    monkeypatch.setitem(buckets.PACK_SEQUENCES, "cpu", False)
    with pytest.raises(ValueError, match="goes on from one row to the next"):
        adapter.packed_state(1, hidden, segments, positions)


def test_sequences_over_rows_are_the_runs_of_each_row():
    """``PackedSequences.over_rows``: each row's runs of like columns (its padding one of them), rows one after
    another, a sequence that ends a row going on where the next row begins with its number; a sequence split
    within its row is refused."""
    from editors.models.batch import PackedSequences

    segments = torch.tensor([[-1, -1, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1], [-1, 0, 0, 1, 1, 2]])
    sequences = PackedSequences.over_rows(segments, "cpu")
    assert sequences.lengths == (2, 3, 1, 4, 2, 1, 2, 2, 1) and sequences.total == segments.numel()
    assert sequences.starts.tolist() == [0, 2, 5, 6, 10, 12, 13, 15, 17, 18]
    streamed = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 2, 2, 2, 2], [2, 3, -1, -1, -1, -1], [4, 4, 4, 4, 4, 4]])
    assert PackedSequences.over_rows(streamed, "cpu").lengths == (3, 5, 5, 1, 4, 6)
    with pytest.raises(ValueError, match="row 0: a sequence's columns are not contiguous"):
        PackedSequences.over_rows(torch.tensor([[0, 0, 1, 0]]), "cpu")


@pytest.mark.parametrize("kernel", ["mask", "sequences"])
def test_stage_two_on_packed_rows_trains_the_copies_of_one_sequence_per_row(kernel, monkeypatch):
    """On CUDA UnKE's stage 2 packs each edit's prompt and preservation prompts into few rows
    (``editors.batching.packed_layer_rows``); in float64 each edit's trained layer copy is that of one sequence per
    row, and the rows are fewer; the same whether the packed rows attend under a boolean mask or as
    variable-length sequences (CUDA's path; here its dense fallback)."""
    from editors import batching
    from editors.models import buckets, fused_layer

    adapter = tiny_adapter("tiny-qwen2-audio")
    adapter.model.to(torch.float64)
    edits = [edit_request(target=t, audio_seed=i, instance=f"emotion/test/{i:06d}")
             for i, t in enumerate(("sad", "happy birthday to you", "dog"))]
    packed_rows = []
    original = batching.packed_layer_rows

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        packed_rows.append((sum(len(g.owner) for g in args[2]), sum(len(g.owner) for g in out)))
        return out

    monkeypatch.setattr("editors.unke.packed_layer_rows", recording)
    copies = {}
    for pack in (False, True):
        monkeypatch.setitem(buckets.PACK_TRAINING, "cpu", pack)
        monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", kernel == "sequences")  # both arms (float64 norms)
        monkeypatch.setitem(buckets.PACK_SEQUENCES, "cpu", pack and kernel == "sequences")
        if pack:  # rows of CUDA's training width: the tiny prompts (62-81 tokens here) fit three to a row
            monkeypatch.setitem(buckets.TRAINING_WIDTH_STEP, "cpu", 256)
        editor = UnKE(adapter, hparams("unke", adapter, preserve_source="instance", optim_steps=8, v_steps=4),
                      context())
        stats = editor.apply_many(edits)
        copies[pack] = ({n: t.clone() for n, t in editor._copies.masters.items()}, [s["loss"] for s in stats])
        editor.reset()
    (one_per_row, row_losses), (packed, packed_losses) = copies[False], copies[True]
    (sequences, rows_unpacked), (_, rows_packed) = packed_rows
    assert rows_unpacked == sequences and rows_packed < sequences
    start = dict(adapter.model.named_parameters())
    for name, reference in one_per_row.items():
        moved = float((reference - start[name].detach().float()[None]).norm() / reference.norm())
        assert moved > 1e-4 and float((packed[name] - reference).norm() / reference.norm()) < 1e-6, name
    # the squared errors are summed in fp32 (in another order when packed)
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(packed_losses, row_losses))
