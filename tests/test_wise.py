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
    editor = WISE(adapter, hparams("wise", adapter, preserve_source="instance"), context())
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
    editor = WISE(adapter, hparams("wise", adapter, preserve_source="instance", save_freq=1, merge_freq=0), context())
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
    editor = WISE(adapter, hparams("wise", adapter, preserve_source="instance", save_freq=1, merge_freq=2, n_iter=5),
                  context())
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


def test_wise_schedule_is_easyedits_for_every_family():
    from editors.models.registry import families
    from editors.registry import load_hparams

    for family in families():
        for tiny in (False, True):
            hp = load_hparams("wise", family, tiny=tiny)
            assert (hp.save_freq, hp.merge_freq, hp.retrieve) == (500, 1000, True), (family, tiny)


def test_wise_default_schedule_keeps_a_ten_edit_sequence_in_one_unmerged_side_memory():
    adapter = tiny_adapter("tiny-qwen2-audio")
    state = model_state(adapter)
    # the schedule, not the edit quality
    editor = WISE(adapter, hparams("wise", adapter, preserve_source="instance", n_iter=1), context())
    try:
        stats = [editor.apply(edit_request(target=t, audio_seed=k, instance=f"emotion/test/{k:06d}"))
                 for k, t in enumerate(["sad", "angry", "neutral", "happy", "sad"] * 2)]
        shards = adapter.mlp_out_proj(editor.hparams.layer).shards
        assert len(shards) == 1 and shards[0].n_edits == 10 and shards[0].merged_from == 1
        assert not shards[0].closed and [s["shard"] for s in stats] == [0] * 10
        assert shards[0].threshold == min(s["in_scope_act"] for s in stats)
    finally:
        editor.reset()
    assert_same_state(adapter, state)


def test_wise_small_schedule_merges_the_shards_finished_since_the_last_merge(monkeypatch):
    import editors.wise as wise_mod

    merges = []
    real_merge = wise_mod.ties_merge
    monkeypatch.setattr(wise_mod, "ties_merge", lambda base, weights, density: merges.append(
        ([w.clone() for w in weights], real_merge(base, weights, density))) or merges[-1][1])
    adapter = tiny_adapter("tiny-qwen2-audio")
    state = model_state(adapter)
    editor = WISE(adapter, hparams("wise", adapter, preserve_source="instance", save_freq=2, merge_freq=4, n_iter=2),
                  context())
    edits = [edit_request(target=t, audio_seed=k, instance=f"emotion/test/{k:06d}")
             for k, t in enumerate(["sad", "angry", "neutral", "happy", "sad"])]
    try:
        for edit in edits[:3]:
            editor.apply(edit)
        router = adapter.mlp_out_proj(editor.hparams.layer)
        assert [(s.closed, s.n_edits) for s in router.shards] == [(True, 2), (False, 1)] and not merges
        first_shard = router.shards[0].weight.clone()
        editor.apply(edits[3])  # closes shard 1 and merges the two
        assert len(merges) == 1 and len(router.shards) == 1
        inputs, result = merges[0]
        assert len(inputs) == 2 and torch.equal(inputs[0], first_shard)
        merged = router.shards[0]
        assert torch.equal(merged.weight, result) and merged.merged_from == 2 and merged.n_edits == 4
        assert merged.threshold == min(s["in_scope_act"] for s in editor.gate_stats)
        editor.apply(edits[4])  # a new shard beside the merged memory (retrieve: they stay apart)
        assert [(s.merged_from, s.n_edits) for s in router.shards] == [(2, 4), (1, 1)] and len(merges) == 1
    finally:
        editor.reset()
    assert_same_state(adapter, state)


def _toy_router(retrieve: bool) -> WiseRouter:
    """A router over a zero 4 -> 3 projection with three shards whose activations on the basis inputs are known."""
    from editors.wise import Shard

    original = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        original.weight.zero_()
    router = WiseRouter(original, act=lambda t: t, act_ratio=1.0, retrieve=retrieve)
    weights = [torch.zeros(3, 4) for _ in range(3)]
    weights[0][0, 0] = 5.0  # e0: activation 5 under shard 0
    weights[1][0, 0] = 3.0  # e0: 3 under shard 1; e1: 1
    weights[1][1, 1] = 1.0
    weights[2][2, 2] = 9.0  # e2: 9 under shard 2
    router.shards = [Shard(weight=weights[0], mask=None, edit_acts=[4.0]),
                     Shard(weight=weights[1], mask=None, edit_acts=[0.5]),
                     Shard(weight=weights[2], mask=None, edit_acts=[2.0])]
    return router


def test_wise_routes_each_row_to_the_eligible_side_memory_with_the_highest_activation():
    router = _toy_router(retrieve=True)
    with torch.no_grad():
        router(torch.eye(4)[:2, None, :])  # two rows of one token: e0 and e1
    # e0: shard 0 scores 5 > its threshold 4, shard 1 scores 3 > 0.5 (relatively higher, 6x), shard 2 scores 0:
    # the highest activation (shard 0) answers, as WISE's retrieval; e1: only shard 1 (1 > 0.5) is eligible
    assert router.last_scores[0].tolist() == [5.0, 3.0, 0.0]
    assert router.decisions.tolist() == [0, 1]
    with torch.no_grad():
        router(torch.eye(4)[3:4, None, :])  # e3: no shard activates: the original weights
    assert router.decisions.tolist() == [-1]
    merge = _toy_router(retrieve=False)  # WISE-Merge: one threshold, the smallest edit activation (0.5)
    assert merge.thresholds() == [0.5, 0.5, 0.5]
    with torch.no_grad():
        merge(torch.eye(4)[:2, None, :])
    assert merge.decisions.tolist() == [0, 1]


def test_wise_merge_without_retrieve_folds_every_finished_shard_into_one_memory():
    adapter = tiny_adapter("tiny-qwen2-audio")
    edits = [edit_request(target=t, audio_seed=k, instance=f"emotion/test/{k:06d}")
             for k, t in enumerate(["sad", "angry", "neutral", "happy"])]
    layouts = {}
    for retrieve in (True, False):
        editor = WISE(adapter, hparams("wise", adapter, preserve_source="instance", save_freq=1, merge_freq=2, n_iter=1,
                                              retrieve=retrieve),
                      context())
        try:
            for edit in edits:
                editor.apply(edit)
            layouts[retrieve] = [s.merged_from for s in adapter.mlp_out_proj(editor.hparams.layer).shards]
        finally:
            editor.reset()
    assert layouts == {True: [2, 2], False: [4]}


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


def test_the_hinge_mean_keeps_its_count_on_the_device_with_the_masked_means_value_and_gradient():
    from editors.wise import _positive_mean

    gen = torch.Generator().manual_seed(0)
    for values in (torch.randn(37, generator=gen), -torch.rand(5, generator=gen), torch.randn(4, 6, generator=gen)):
        ours_in = values.clone().requires_grad_()
        ref_in = values.clone().requires_grad_()
        zero = values.new_zeros(())
        ours = _positive_mean(ours_in, zero)
        pos = ref_in[ref_in > 0]
        ref = pos.mean() if pos.numel() else zero + 0 * ref_in.sum()
        assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
        (ours * 3).backward()
        (ref * 3).backward()
        assert torch.equal(ours_in.grad, ref_in.grad)


def test_wise_generations_are_planned_per_prompt_and_the_graph_engine_gives_the_eager_outputs(demo_dataset):
    # Each row's memory is decided from its prompt before generating (the router's prefill rule), so the graph
    # engine (prefixes shared only by rows routed alike, a decode step that gathers each row's projection) gives
    # the eager engine's greedy outputs: after sequential edits (several shards) and for K edits in one pass.
    from editors.base import EditRequest, RunContext
    from editors.data import eval_items, load_instances

    adapter = tiny_adapter("tiny-qwen2-audio")
    eager = adapter.generation_settings(8, engine="eager", method_engines=WISE.generation_engines)
    graph = eager.replace(engine="graph")
    edits = [edit_request(target="sad", audio_seed=1, instance="emotion/test/000000"),
             edit_request(target="angry", audio_seed=4, instance="emotion/test/000001")]
    prompts = [e.prompt() for e in edits] + [FAR]
    editor = WISE(adapter, hparams("wise", adapter, preserve_source="instance", save_freq=1, merge_freq=0), context())
    try:
        for edit in edits:
            editor.apply(edit)
        assert editor.decide(prompts) == [0, 1, 2]  # shard 0, shard 1, the original weights
        outputs = adapter.generate(prompts, settings=eager)
        assert outputs[:2] == ["sad", "angry"]
        assert adapter.generate(prompts, settings=graph) == outputs
        assert isinstance(adapter.mlp_out_proj(editor.hparams.layer), WiseRouter)  # put back after each call
    finally:
        editor.reset()
    assert adapter.prompt_routing is None

    rows = [load_instances(str(demo_dataset), c, "test")[0] for c in ("emotion", "animal")]
    ctx = RunContext(seed=0, load_rows=lambda config, split: load_instances(str(demo_dataset), config, split))
    editor = WISE(adapter, hparams("wise", adapter, n_iter=12), ctx)
    per_edit = [[it.prompt() for it in eval_items(r)][:4] for r in rows]
    try:
        editor.apply_many([EditRequest.from_row(r) for r in rows])
        together = editor.generate_many(per_edit, settings=eager)
        assert editor.generate_many(per_edit, settings=graph) == together
    finally:
        editor.reset()
