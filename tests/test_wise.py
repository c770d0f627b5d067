"""WISE (editors/wise.py): side memory edit, routing (bit-identical outputs off scope), gate stats, shards,
exact restore."""

from __future__ import annotations

import torch

from _methods_helpers import assert_same_state, context, edit_request, hparams, model_state, tiny_adapter
from editors.models.base import Prompt
from editors.wise import WISE, WiseRouter, ties_merge

FAR = Prompt("Question: which of the following is correct? Answer: A B C D. Choose the best answer.")


def _logits(adapter, prompts):
    with torch.no_grad():
        batch = adapter.prepare(prompts)
        return adapter.logits_from(adapter.hidden_entering(batch, 0))


def test_wise_edit_routes_in_scope_to_side_memory_and_far_inputs_to_original_weights():
    adapter = tiny_adapter("tiny-qwen2-audio")
    edit = edit_request(target="sad")
    prompts = [edit.prompt(), FAR]
    before_out = adapter.generate(prompts, max_new_tokens=8)
    assert before_out[0] != "sad"
    before_far_logits = _logits(adapter, [FAR])
    state = model_state(adapter)
    editor = WISE(adapter, hparams("wise", adapter), context())
    assert editor.touched_parameters() == []
    try:
        stats = editor.apply(edit)
        router = adapter.mlp_out_proj(editor.hparams.layer)
        assert isinstance(router, WiseRouter)
        after_out = adapter.generate(prompts, max_new_tokens=8)
        assert after_out[0] == "sad"
        _logits(adapter, prompts)  # one forward over both rows: per-row routing
        assert router.decisions.tolist() == [0, -1]
        scores = router.last_scores[:, 0].tolist()
        assert after_out[1] == before_out[1]
        assert torch.equal(_logits(adapter, [FAR]), before_far_logits)  # bit-identical off scope
        # gate statistics: returned with the edit and kept on the editor
        for key in ("in_scope_act", "out_scope_act_max", "threshold", "act_ratio", "gate"):
            assert key in stats
        assert stats["gate"] == stats["threshold"] * stats["act_ratio"]
        assert stats["in_scope_act"] > stats["gate"]
        assert editor.gate_stats == [stats]
        assert scores[1] < stats["gate"] < scores[0]
        # the original weights were never touched
        assert all(torch.equal(p, state["params"][n]) for n, p in adapter.model.named_parameters()
                   if n in state["params"])
    finally:
        editor.reset()
    assert_same_state(adapter, state)
    assert adapter.generate(prompts, max_new_tokens=8) == before_out


def test_wise_sequential_edits_use_shards_routed_by_activation():
    adapter = tiny_adapter("tiny-qwen2-audio")
    edits = [edit_request(target="sad", audio_seed=1, instance="emotion/test/000000"),
             edit_request(target="angry", audio_seed=4, instance="emotion/test/000001")]
    state = model_state(adapter)
    editor = WISE(adapter, hparams("wise", adapter, save_freq=1, merge_freq=0), context())
    try:
        stats = [editor.apply(e) for e in edits]
        assert [s["shard"] for s in stats] == [0, 1] and stats[-1]["n_shards"] == 2
        outputs = adapter.generate([e.prompt() for e in edits] + [FAR], max_new_tokens=8)
        router = adapter.mlp_out_proj(editor.hparams.layer)
        _logits(adapter, [e.prompt() for e in edits] + [FAR])  # one forward over the three rows
        assert router.decisions.tolist() == [0, 1, -1]
        assert outputs[:2] == ["sad", "angry"]
    finally:
        editor.reset()
    assert_same_state(adapter, state)


def test_wise_merges_finished_shards_every_merge_freq_edits():
    adapter = tiny_adapter("tiny-qwen2-audio")
    edits = [edit_request(target="sad", audio_seed=1, instance="emotion/test/000000"),
             edit_request(target="angry", audio_seed=4, instance="emotion/test/000001")]
    state = model_state(adapter)
    editor = WISE(adapter, hparams("wise", adapter, save_freq=1, merge_freq=2, n_iter=5), context())
    try:
        stats = [editor.apply(e) for e in edits]
        shards = adapter.mlp_out_proj(editor.hparams.layer).shards
        assert len(shards) == 1 and shards[0].merged_from == 2 and shards[0].n_edits == 2
        assert shards[0].threshold == min(s["in_scope_act"] for s in stats)
    finally:
        editor.reset()
    assert_same_state(adapter, state)


def test_ties_merge_keeps_agreeing_large_changes():
    base = torch.zeros(2, 3)
    a = torch.tensor([[1.0, -2.0, 0.1], [0.0, 3.0, 0.0]])
    b = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, -0.2]])
    merged = ties_merge(base, [a, b], density=0.5)
    # entry (0,0): both positive -> mean 2; (1,1): both positive -> mean 2; (0,1): signs conflict (sum 0)
    assert merged[0, 0] == 2.0 and merged[1, 1] == 2.0 and merged[0, 1] == 0.0
    assert merged[0, 2] == 0.0 and merged[1, 2] == 0.0  # trimmed (small magnitude)


def test_runner_cli_sequential_mode_keeps_shards_across_a_sequence(tmp_path):
    import json

    from _editor_helpers import cli_args, run_config
    from _methods_helpers import demo_dataset
    from editors.run import main as run_main

    out = tmp_path / "preds.jsonl"
    args = cli_args(run_config(demo_dataset(), out, tmp_path / "cache", method="wise", mode="sequential", limit=1,
                               hparams={"save_freq": 1, "merge_freq": 0}))
    assert run_main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()][1:]
    assert {r["gap"] for r in rows} == {0, 1, 2, 3, 4}
    timing = json.loads(out.with_name(out.name + ".timing.json").read_text())
    assert timing["units"] == 5
    fresh = [r for r in rows if r["gap"] == 0 and r["dimension"] == "reliability"]
    assert len(fresh) == 5 and all(r["post_edit"] == r["reference"] for r in fresh)  # each edit takes
    unchanged = [r for r in rows if r["dimension"] == "locality_text"]
    assert any(r["post_edit"] == r["pre_edit"] for r in unchanged)  # text far from the edits: original weights


def test_wise_edits_per_pass_equal_one_at_a_time(demo_dataset):
    """K WISE edits in one pass (one side memory per edit, trained together; each item routed by its own edit's
    memory): each edit's greedy outputs, steps and gate are those of editing it alone."""
    from editors.base import EditRequest, RunContext
    from editors.data import eval_items, load_instances

    adapter = tiny_adapter("tiny-qwen2-audio")
    rows = [load_instances(str(demo_dataset), c, "test")[0] for c in ("emotion", "animal", "gender")]
    ctx = RunContext(seed=0, load_rows=lambda config, split: load_instances(str(demo_dataset), config, split))
    edits = [EditRequest.from_row(r) for r in rows]
    editor = WISE(adapter, hparams("wise", adapter, n_iter=12), ctx)
    prompts = [[it.prompt() for it in eval_items(e.row)][:4] for e in edits]
    alone, alone_stats = [], []
    for edit, ps in zip(edits, prompts):
        try:
            alone_stats.append(editor.apply(edit))
            alone.append(adapter.generate(ps, max_new_tokens=5))
        finally:
            editor.reset()
    state = model_state(adapter)
    try:
        stats = editor.apply_many(edits)
        together = editor.generate_many(prompts, max_new_tokens=5)
    finally:
        editor.reset()
    assert_same_state(adapter, state)
    assert together == alone and len({tuple(a) for a in alone}) > 1
    assert [s["steps"] for s in stats] == [s["steps"] for s in alone_stats]
    for s, t in zip(stats, alone_stats):
        assert abs(s["gate"] - t["gate"]) <= 1e-3 * max(1.0, abs(t["gate"]))
        assert abs(s["loss"] - t["loss"]) <= 1e-3 * max(1.0, abs(t["loss"]))
