"""CPU smoke test of bench/edit_throughput.py on the adapter's tiny model (no timing assertions)."""

from __future__ import annotations

import json
import re

import pytest


from bench import edit_throughput as bench


def test_paper_rates_come_from_table7():
    assert bench.paper_seconds_per_edit("ft_audio") == pytest.approx(3 * 3600 / 1200)
    assert bench.paper_seconds_per_edit("ft_llm") == pytest.approx((2 * 3600 + 35 * 60) / 1200)
    assert bench.paper_seconds_per_edit("no_such_method") is None


def test_synthetic_instance_has_the_dataset_shape():
    import numpy as np

    row = bench.synthetic_instance(np.random.default_rng(0), "emotion", "test", 3, (5.0, 16.0))
    assert row["id"] == "emotion/test/000003"
    counts = [len(row[c]) for c in ("generality", "locality_audio", "locality_text", "portability")]
    assert counts == [3, 4, 1, 1]
    seconds = len(row["audio"]["array"]) / row["audio"]["sampling_rate"]
    assert 5.0 <= seconds <= 16.0
    assert row["answer"] == row["target_label"] != row["original_label"]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--methods", "--edits", "--max-new-tokens", "--tiny", "--out"):
        assert flag in out


def test_tiny_run_writes_a_well_formed_table(tmp_path):
    out = tmp_path / "RESULTS.md"
    raw = tmp_path / "raw.json"
    code = bench.main(["--tiny", "--methods", "ft_audio", "--edits", "1", "--warmup", "0", "--max-new-tokens", "1",
                       "--out", str(out), "--json", str(raw), "--workdir", str(tmp_path / "work"),
                       "--log-level", "WARNING"])
    assert code == 0
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:4] == ["method", "s/edit ours", "s/edit naive", "naive/ours"]
    assert set(table[1].replace("|", "")) == {"-"}
    row = [c.strip() for c in table[2].strip("|").split("|")]
    assert len(row) == len(header) and row[0] == "ft_audio"
    cells = dict(zip(header, row))
    for column in ("s/edit ours", "s/edit naive", "floor s/edit", "s/edit ours, warm pre-edit cache"):
        assert float(cells[column]) > 0
    assert re.fullmatch(r"\d+\.\dx", cells["naive/ours"])
    assert float(cells["paper s/edit"]) == pytest.approx(9.0)
    # both arms ran the same protocol: the 5 locality items before the edit, all 10 after, every generation to the
    # bound
    data = json.loads(raw.read_text())["methods"]["ft_audio"]
    assert data["info_ours"]["prediction_rows"] == 10
    assert data["info_naive"]["sequences_per_edit"] == 15
    # ours generates the same 15 outputs; its batches are filled up to canonical row counts (editors/models/buckets.py)
    assert data["info_ours"]["sequences_per_edit"] >= 15
    assert data["info_ours"]["new_tokens"] == data["info_naive"]["new_tokens"] == [1]
    assert data["info_ours"]["steps"] == data["info_naive"]["steps"] == [3]
    assert data["raw"]["info_ours_warm"]["preedit_cache_hits"] == 5


def test_desta_paper_rates_come_from_table7():
    assert bench.paper_seconds_per_edit("ft_audio", "desta25") == pytest.approx((4 * 3600 + 20 * 60) / 1200)
    assert bench.paper_seconds_per_edit("wise", "desta25") == pytest.approx((6 * 3600 + 10 * 60) / 1200)
    assert bench.paper_seconds_per_edit("ft_audio", "desta25") != bench.paper_seconds_per_edit("ft_audio")


def test_desta_section_is_appended_then_replaced_and_kept_by_qwen_runs():
    qwen = "# Editing throughput\n\n| method |\n|---|\n| ft_audio |\n"
    first = bench.merge_results(qwen, "## DeSTA run 1\n", "desta25")
    assert first.startswith(qwen.rstrip("\n")) and "DeSTA run 1" in first
    second = bench.merge_results(first + "\ntrailing note\n", "## DeSTA run 2\n", "desta25")
    assert "DeSTA run 1" not in second and second.count(bench.DESTA_BEGIN) == 1
    assert second.startswith(qwen.rstrip("\n")) and "trailing note" in second
    rerun = bench.merge_results(second, "# Editing throughput, new Qwen run\n", "qwen2_audio")
    assert rerun.startswith("# Editing throughput, new Qwen run") and "DeSTA run 2" in rerun
    assert "| ft_audio |" not in rerun  # the Qwen part is replaced


def test_tiny_desta_run_appends_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Editing throughput (Qwen2-Audio rows)\n\nkept line\n")
    raw = tmp_path / "raw.json"
    code = bench.main(["--tiny", "--model", "desta25", "--methods", "ft_audio", "--edits", "1", "--warmup", "0",
                       "--max-new-tokens", "1", "--out", str(out), "--json", str(raw),
                       "--workdir", str(tmp_path / "work"), "--log-level", "WARNING"])
    assert code == 0
    text = out.read_text()
    assert text.startswith("# Editing throughput (Qwen2-Audio rows)\n\nkept line\n")
    section = text[text.index(bench.DESTA_BEGIN):]
    assert "DeSTA2.5-Audio" in section and section.rstrip().endswith(bench.DESTA_END)
    table = [line for line in section.splitlines() if line.startswith("| ft_audio")]
    assert len(table) == 1
    header_line = next(line for line in section.splitlines() if line.startswith("| method"))
    header = [c.strip() for c in header_line.strip("|").split("|")]
    cells = dict(zip(header, [c.strip() for c in table[0].strip("|").split("|")]))
    assert float(cells["paper s/edit"]) == pytest.approx(13.0)  # DeSTA's FT-Audio row, not Qwen's 9.0
    for column in ("s/edit ours", "s/edit naive", "floor s/edit"):
        assert float(cells[column]) > 0
    data = json.loads(raw.read_text())
    assert data["model"] == "desta25"
    row = data["methods"]["ft_audio"]
    assert row["info_ours"]["prediction_rows"] == 10
    # 5 questions before the edit (the locality items), 10 after; generation batches are filled up to canonical row
    # counts (editors/models/buckets.py)
    assert row["info_naive"]["generate_calls_per_edit"] == 15
    assert row["info_ours"]["sequences_per_edit"] >= 15 and row["info_naive"]["sequences_per_edit"] >= 15
    assert row["info_ours"]["new_tokens"] == row["info_naive"]["new_tokens"] == [1]
    assert row["floor_parts"]["perception_flops"] > 0  # Whisper encoder + transcripts + Q-Former counted


def test_training_attention_bench_runs_both_arms_and_puts_the_backends_back(capsys):
    from bench import training_attention
    from editors.models import kernels

    kept = list(kernels.TRAINING_BACKENDS)
    assert training_attention.main(["--tiny", "--methods", "ft_llm", "--edits", "2", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "| ft_llm | 2 x 1 |" in table and "| 0, 0 |" in table
    assert kernels.TRAINING_BACKENDS == kept
    with training_attention.arm("cudnn"):
        assert any(b.name == "CUDNN_ATTENTION" for b in kernels.TRAINING_BACKENDS)
    assert kernels.TRAINING_BACKENDS == kept
    assert training_attention.non_finite_losses([{"loss": float("nan")}, {"loss": 0.5}, {"steps": 3}]) == 1


def test_decoder_layer_bench_times_both_arms_and_puts_the_switch_back(capsys):
    from bench import decoder_layer
    from editors.models import fused_layer

    kept = dict(fused_layer.FUSED_LAYERS)
    assert decoder_layer.main(["--tiny", "--rows", "3", "--width", "192", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "hf / fused:" in out and "output 0, input gradient 0" in out  # the CPU's bits are the same
    assert "hf / packed:" in out and "padding)" in out
    assert fused_layer.FUSED_LAYERS == kept


def test_decoder_layer_bench_compiled_arm_runs_the_layers_through_its_forward_and_puts_the_library_back(
        capsys, monkeypatch):
    from bench import decoder_layer
    from editors.models import adapter as adapter_module
    from editors.models import fused_layer

    calls = []

    def counted(*args, **kwargs):  # stands for the compiled forward (compiling costs ~20 s on the CPU)
        calls.append(1)
        return fused_layer.layer_forward(*args, **kwargs)

    monkeypatch.setattr(decoder_layer, "_compiled_layer_forward", lambda: counted)
    kept = adapter_module.layer_forward
    assert decoder_layer.main(["--tiny", "--rows", "2", "--width", "192", "--repeats", "1", "--compiled"]) == 0
    out = capsys.readouterr().out
    assert "compiled arm: first forward+backward" in out and "hf / compiled:" in out
    assert len(calls) == 2 * 4  # two steps (warm-up, one timed) through the tiny model's four layers
    assert adapter_module.layer_forward is kept


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rotary_by_cat_has_the_bits_of_the_librarys_roll_forward_and_backward(dtype):
    import torch

    from bench import decoder_layer
    from editors.models import fused_layer

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, 16, generator=gen).to(getattr(torch, dtype))
    cos, sin = (torch.randn(1, 7, 4, 16, generator=gen).to(x.dtype) for _ in range(2))
    upstream = torch.randn(2, 7, 4, 16, generator=gen).to(x.dtype)
    outs, grads = [], []
    for rotate in (fused_layer.rotate, decoder_layer.rotate_by_cat):
        leaf = x.clone().requires_grad_(True)
        out = rotate(leaf, cos, sin)
        (grad,) = torch.autograd.grad(out, [leaf], upstream)
        outs.append(out)
        grads.append(grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], (upstream * cos))  # the swap's gradient is in there


def test_decoder_layer_bench_rotary_cat_arm_patches_rotate_for_its_steps_alone(capsys):
    from bench import decoder_layer
    from editors.models import fused_layer

    kept = fused_layer.rotate
    assert decoder_layer.main(["--tiny", "--rows", "2", "--width", "192", "--repeats", "1", "--rotary-cat"]) == 0
    out = capsys.readouterr().out
    assert "hf / packed_cat:" in out and "packed_cat against packed: output and input gradient the same bits" in out
    assert fused_layer.rotate is kept


def test_goals_table_says_when_and_on_what_pace_of_machine_each_row_was_timed():
    """Rows merged from several device calls carry their own call's time and matmul ceiling; older rows read '-'."""
    import argparse

    from bench import goals
    from bench.models import tiny_scale

    def run(engine: str, seconds: float, **extra) -> dict:
        return {"engine": engine, "edits": 2, "s_per_edit": seconds, "passes": [{"edits": 2, "gib_per_edit": 1.0}],
                "per_edit_fit_gib": 1.0, "per_pass_fit_gib": 0.5, **extra}

    timed_passes = [{"edits": 1, "seconds": 0.9, "gib_per_edit": 1.0}, {"edits": 1, "seconds": 0.5, "gib_per_edit": 1.0}]

    stamp = goals.measured_stamp({"matmul_flops_per_s": 759.4e12})
    assert re.fullmatch(r"\d\d-\d\d \d\d:\d\d, 759", stamp)
    earlier = [{"method": "ft_llm", "runs": [run("graph", 0.6), run("eager", 1.5)]}]
    merged = goals.merge_rows(earlier, [{"method": "ft_llm", "runs": [run("graph", 0.7, measured=stamp,
                                                                           pre_edit_items="locality",
                                                                           passes=timed_passes)]}])
    args = argparse.Namespace(model="qwen2_audio", argv=["--tiny"], previous_argv=[], max_new_tokens=32)
    text = goals.render(args, merged, {"matmul_flops_per_s": 759.4e12, "copy_bytes_per_s": 4.1e12},
                        goals.run_header(tiny_scale()))
    rows = [line for line in text.splitlines() if line.startswith(("| ft_llm | graph |", "| ft_llm | eager |"))]
    # an older row (no pre_edit_items field) generated the unedited outputs of all ten items
    assert rows[0].startswith("| ft_llm | graph | 2 | locality | 0.700 | 1 (0.9 s), 1 (0.5 s) |")
    assert rows[0].endswith(f"| {stamp} |")
    assert rows[1].startswith("| ft_llm | eager | 2 | all | 1.500 | 2 |") and rows[1].endswith("| - |")
    header = next(line for line in text.splitlines() if line.startswith("| method | engine |"))
    assert len(rows) == 2 and all(line.count("|") == header.count("|") for line in rows)


def test_parts_merged_from_another_call_keep_that_calls_stamp():
    """A part measured by an earlier call (the naive loop, a sequence) keeps that call's stamp when a later call
    times the method again, so the naive ratio shows which calls it sets side by side; parts of rows written before
    stamps existed say so."""
    import argparse

    from bench import goals
    from bench.models import tiny_scale

    def run(seconds: float, measured: str) -> dict:
        return {"engine": "graph", "edits": 2, "s_per_edit": seconds, "measured": measured,
                "passes": [{"edits": 2, "gib_per_edit": 1.0}]}

    earlier = goals.merge_rows([], [{"method": "ft_llm", "runs": [run(0.8, "12-05 03:40, 778")], "naive": 16.0,
                                     "sequential": {"seconds": 20.0, "steps": 10},
                                     "stamps": {"naive": "12-05 03:40, 778", "sequential": "12-05 03:41, 778"}},
                                    {"method": "i_ike", "runs": [run(0.5, "12-05 03:42, 778")], "naive": 30.0}])
    later = goals.merge_rows(earlier, [{"method": "ft_llm", "runs": [run(0.4, "12-06 03:47, 784")],
                                        "sequential": {"seconds": 9.0, "steps": 10},
                                        "stamps": {"sequential": "12-06 03:58, 784"}}])
    assert later[0]["stamps"] == {"naive": "12-05 03:40, 778", "sequential": "12-06 03:58, 784"}
    args = argparse.Namespace(model="qwen2_audio", argv=["--tiny"], previous_argv=[], max_new_tokens=32)
    text = goals.render(args, later, {"matmul_flops_per_s": 7e14, "copy_bytes_per_s": 3e12},
                        goals.run_header(tiny_scale()))
    assert ("- `ft_llm`: naive 16.00 s/edit (no untimed warm-up edit) (measured 12-05 03:40, 778), ours 0.400 s/edit "
            "(12-06 03:47, 784): 40.0x (met)") in text
    assert ("- `i_ike`: naive 30.00 s/edit (no untimed warm-up edit) (measured by an earlier call, not stamped), ours "
            "0.500 s/edit "
            "(12-05 03:42, 778): 60.0x (met)") in text
    assert "- `ft_llm`: 9.0 s for the sequence (10 steps) (measured 12-06 03:58, 784)" in text


def test_missed_goal_lines_judge_the_default_engine_only():
    """An eager comparison run slower than the goal is not a missed goal when the method's graph run meets it."""
    from bench import goals

    def run(engine: str, seconds: float) -> dict:
        return {"engine": engine, "edits": 32, "s_per_edit": seconds,
                "info": {"per_edit_split_s_incl_warmup": {"pre_edit": 0.1, "apply": 0.5, "evaluate": 0.3}}}

    wise_met = {"method": "wise", "runs": [run("graph", 1.3), run("eager", 2.7)]}
    unke_missed = {"method": "unke", "runs": [run("graph", 1.8), run("eager", 0.5)]}
    lines = [line for line in goals.bound_lines([wise_met, unke_missed], "qwen2_audio") if line.startswith("- ")]
    assert len(lines) == 1 and lines[0].startswith("- `unke` (graph, 1.800 s/edit; goal <= 0.95)")
    assert "no floor recorded" in lines[0]


def test_the_sweep_reports_the_k_each_card_gets_and_the_phase_that_bounds_it():
    """The sweep's report from per-phase lines (its CUDA-only branch, fed synthetic lines): the K of each card and
    the phase bounding it, rendered in the memory table."""
    import argparse

    from bench import goals
    from bench.models import tiny_scale

    gib = 2**30
    lines = {"apply": (3 * gib, 2 * gib), "evaluate": (gib // 4, 10 * gib)}
    picked = goals.picked_on_cards(lines, 20 * gib)
    assert picked["k_on_80gb"] == {"k": 15, "bound_by": "apply", "predicted_peak_gib": 67.0}  # (0.8 * 60 - 2) / 3
    assert picked["k_on_139gb"]["k"] == 31 and picked["fit_gib"]["evaluate"] == {"per_edit": 0.25, "per_pass": 10.0}
    row = {"method": "ft_llm", "runs": [], "sweep": {"k": {1: {"peak_gib": 5.0, "gib_per_edit": 5.0}}, **picked}}
    args = argparse.Namespace(model="qwen2_audio", argv=["--tiny"], previous_argv=[], max_new_tokens=32)
    text = goals.render(args, [row], {"matmul_flops_per_s": 7e14, "copy_bytes_per_s": 3e12},
                        goals.run_header(tiny_scale()))
    assert "| ft_llm | K=1: 5.00 | apply 3.00 / 2.00; evaluate 0.25 / 10.00 | 15 (67.0 GiB, apply bounds it) |" in text


def test_cache_layout_plans_ie_ike_under_4_gib_per_edit_at_full_size(tmp_path):
    """Issue 29's memory goal at the plan level: the graph engine's cache for a pass of IE-IKE edits at Qwen2-Audio-7B's
    real shapes (the model on the meta device) holds each edit in under 4 GiB, and no kind of prompt gets a larger
    cache than the padded layout lanes replaced."""
    from bench import cache_layout
    from bench.synthetic import SyntheticDataset
    from editors.models.generation.memory import kv_bytes_per_token
    from editors.models.qwen2_audio import Qwen2AudioAdapter

    adapter = Qwen2AudioAdapter.random_full_size(0, device="meta")
    dataset = SyntheticDataset.make(tmp_path, 2, 4, 0, (5.0, 16.0))
    for method in ("plain", "i_ike", "ie_ike"):
        per_edit = cache_layout.method_prompts(adapter, dataset, method, 8)
        prompts = [p for ps in per_edit for p in ps]
        ids = [adapter.prompt_token_ids(p) for p in prompts]
        padded = cache_layout.padded_tokens(adapter, prompts, ids, 32)
        lanes, real, _ = cache_layout.lane_tokens(adapter, prompts, ids, 32)
        assert real <= lanes <= padded, method
        longest, own, tail_real = cache_layout.prefill_tail_tokens(adapter, prompts, ids, 32)
        assert tail_real <= own <= longest, method  # rows prefilled at their own tail's width: never more padding
        if method == "ie_ike":
            assert lanes / len(per_edit) * kv_bytes_per_token(adapter) < 4 * 2**30
            assert own < 0.85 * longest  # IE-IKE's ten tails of 119-481 tokens no longer pad to the longest


def test_encoder_width_bench_runs_its_arms_and_puts_the_settings_back(capsys):
    from bench import encoder_width
    from bench.models import build_adapter, tiny_scale

    assert encoder_width.main(["--tiny", "--clips", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {a} |" in out for a in encoder_width.ARMS)
    adapter = build_adapter(tiny_scale(), 0)
    kept = adapter.encoder_width_step, adapter.mel_device
    with encoder_width.arm(adapter, "window"):
        assert adapter.mel_device == "cpu"
        assert adapter.encoder_width_step == adapter.processor.feature_extractor.nb_max_frames
    assert (adapter.encoder_width_step, adapter.mel_device) == kept


def test_encoder_convolutions_bench_runs_both_arms_in_alternating_order_and_puts_the_switch_back(capsys):
    from bench import encoder_convolutions
    from editors.models import kernels

    assert encoder_convolutions.main(["--tiny", "--clips", "5", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [r.split("|")[3].strip() for r in rows] == ["cudnn", "native"]
    assert all(r.split("|")[-2].strip() == "0" for r in rows)  # on the CPU both arms run the same kernels
    assert kernels.CONVOLUTION_CUDNN is False


def test_encoder_width_bench_reports_the_clips_it_drew(capsys):
    from bench import encoder_width

    assert encoder_width.main(["--tiny", "--clips", "3", "--repeats", "1"]) == 0
    assert "3 clips on" in capsys.readouterr().out  # not the number of its arms


def test_pass_profile_labels_the_phases_and_puts_every_patch_back(tmp_path):
    """The profile script on the tiny model (CPU: no kernels, so GPU columns read 0): its ranges, the allocator
    column, the idle time attributed to the host's library frames (``--stacks``: on the CPU every moment is idle),
    and the classes and modules it labels restored afterwards."""
    import json

    from bench import pass_profile
    from editors.models.generation import graph

    before = dict(graph._State.__dict__)
    # 4 new tokens: the stack recording of every generated token made this the suite's slowest test (~70 s at 32)
    assert pass_profile.main(["--tiny", "--methods", "ft_audio", "--edits", "1", "--pass", "1", "--stacks",
                              "--max-new-tokens", "4", "--json", str(tmp_path / "p.json")]) == 0
    [row] = json.loads((tmp_path / "p.json").read_text())
    ranges = row["profile"]["ranges"]
    assert {"pass", "pre_edit", "apply", "evaluate", "finetune_many"} <= set(ranges)
    assert all("alloc_calls" in r for name, r in ranges.items() if name != "_kernels")
    idle = row["profile"]["idle_by_host"]
    assert idle["apply"]["idle_s"] <= ranges["apply"]["wall_s"] + 1e-3
    assert idle["apply"]["idle_s"] >= 0.9 * ranges["apply"]["wall_s"]  # no kernels on the CPU: idle throughout
    assert any("editors/ft_audio.py(" in key for key, _ in idle["apply"]["top"])
    assert dict(graph._State.__dict__) == before
    assert row["model"] == "qwen2_audio" and row["device"].startswith("CPU") and row["command"].startswith(
        "python -m bench.pass_profile --tiny --methods ft_audio")


def test_goals_combine_joins_a_pass_profile_of_the_same_card_and_model(tmp_path):
    """``--combine ... --pass-profiles``: each method's profiled pass gives its row the busy share of its phases,
    judged against the 70 % goal on the evaluation phase and stamped with the profile's time; a profile of another
    card or model, of a method the table lacks, or given without ``--combine`` is refused."""
    import json

    from bench import goals

    run = {"engine": "graph", "edits": 32, "s_per_edit": 0.5, "passes": [{"edits": 31, "gib_per_edit": 2.0}]}
    table = _raw(tmp_path / "a.json", "NVIDIA H200", ["--methods", "ft_llm,i_ike"],
                 [{"method": "ft_llm", "runs": [run]}, {"method": "i_ike", "runs": [run]}])

    def profiled(method: str, evaluate_busy: float, **over) -> dict:
        ranges = {"pre_edit": {"wall_s": 1.0, "gpu_busy_s": 0.8}, "apply": {"wall_s": 0.001, "gpu_busy_s": 0.0},
                  "evaluate": {"wall_s": 2.0, "gpu_busy_s": 2.0 * evaluate_busy}, "decode": {"wall_s": 1.0,
                                                                                           "gpu_busy_s": 0.9}}
        return {"method": method, "model": "qwen2_audio", "device": "NVIDIA H200", "measured": "12-06 22:35",
                "command": "python -m bench.pass_profile --methods ft_llm,i_ike", **over,
                "profile": {"edits": 15, "wall_s": 3.5, "ranges": ranges}}

    prof = tmp_path / "p.json"
    prof.write_text(json.dumps([profiled("ft_llm", 0.87), profiled("i_ike", 0.6)]))
    out, raw = tmp_path / "R.md", tmp_path / "R.json"
    assert goals.main(["--combine", str(table), "--pass-profiles", str(prof), "--out", str(out),
                       "--json", str(raw)]) == 0
    text = out.read_text()
    assert ("- `ft_llm`: a 15-edit pass (3.50 s): pre_edit 80% busy of 1.00 s, evaluate 87% busy of 2.00 s: met "
            "(measured 12-06 22:35)") in text  # the 1 ms apply phase is left out
    assert "- `i_ike`: a 15-edit pass (3.50 s): pre_edit 80% busy of 1.00 s, evaluate 60% busy of 2.00 s: missed" in text
    assert "Profiled by `python -m bench.pass_profile --methods ft_llm,i_ike`" in text
    # the part stays in the raw file: a later combine of that file alone renders it again
    assert goals.main(["--combine", str(raw), "--out", str(out)]) == 0
    assert "evaluate 87% busy of 2.00 s: met (measured 12-06 22:35)" in out.read_text()
    for bad, message in ((profiled("ft_llm", 0.9, device="NVIDIA H100 80GB HBM3"), "profiled on NVIDIA H100"),
                         (profiled("ft_llm", 0.9, model="desta25"), "with desta25, this table is qwen2_audio"),
                         (profiled("wise", 0.9), "wise: the table has no row of this method"),
                         ({**profiled("ft_llm", 0.9), "profile": None}, "no profiled pass")):
        prof.write_text(json.dumps([bad]))
        with pytest.raises(SystemExit, match=message):
            goals.main(["--combine", str(table), "--pass-profiles", str(prof), "--out", str(out)])
    with pytest.raises(SystemExit, match="joins a table with --combine"):
        goals.main(["--tiny", "--pass-profiles", str(prof)])


def test_goals_merges_only_rows_timed_on_the_same_card(tmp_path):
    import json

    from bench import goals

    path = tmp_path / "raw.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "rows": [{"method": "ft_llm", "runs": []}],
                                "argv": ["--methods", "ft_llm"], "previous_argv": []}))
    rows, chain = goals.earlier_rows(path, "NVIDIA H200")
    assert rows == [{"method": "ft_llm", "runs": []}] and chain == [["--methods", "ft_llm"]]
    with pytest.raises(SystemExit, match="timed on NVIDIA H200, this run is on NVIDIA H100 80GB HBM3"):
        goals.earlier_rows(path, "NVIDIA H100 80GB HBM3")
    path.write_text(json.dumps({"rows": [], "argv": []}))  # a file that does not say its card
    with pytest.raises(SystemExit, match="an unrecorded device"):
        goals.earlier_rows(path, "NVIDIA H200")
    assert goals.earlier_rows(tmp_path / "absent.json", "NVIDIA H200") == ([], None)


def _raw(path, device: str, argv: list[str], rows: list[dict], previous: list[list[str]] | None = None):
    import json

    path.write_text(json.dumps({"device": device, "ceilings": {"matmul_flops_per_s": 7e14, "copy_bytes_per_s": 3e12},
                                "header": {"device": device, "audio_seconds": [5.0, 16.0],
                                           "versions": "torch 9.9, transformers 9.9"},
                                "rows": rows, "argv": argv, "previous_argv": previous or []}))
    return path


def test_goals_combine_renders_one_table_from_several_calls_of_one_card(tmp_path):
    """--combine: later files' parts replace earlier ones, FILE:methods takes only those rows, another card's file
    is refused, and the table is rendered from the files alone (no model, no device)."""
    import json

    from bench import goals

    def run(seconds: float) -> dict:
        return {"engine": "graph", "edits": 32, "s_per_edit": seconds, "passes": [{"edits": 16, "gib_per_edit": 2.0}]}

    a = _raw(tmp_path / "a.json", "NVIDIA H100 80GB HBM3", ["--methods", "ie_ike,ft_llm"],
             [{"method": "ie_ike", "runs": [run(1.0)], "sequential": {"seconds": 70.0, "steps": 10}},
              {"method": "ft_llm", "runs": [run(0.6)]}])
    b = _raw(tmp_path / "b.json", "NVIDIA H100 80GB HBM3", ["--methods", "ie_ike,ft_llm", "--split-prefix", "1024"],
             [{"method": "ie_ike", "runs": [run(0.8)]}, {"method": "ft_llm", "runs": [run(0.9)]}],
             previous=[["--methods", "ie_ike,ft_llm"]])
    out, raw = tmp_path / "R.md", tmp_path / "R.json"
    assert goals.main(["--combine", str(a), f"{b}:ie_ike", "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text()
    assert "| ie_ike | graph | 32 | all | 0.800 |" in text and "| ft_llm | graph | 32 | all | 0.600 |" in text
    assert "- `ie_ike`: 70.0 s for the sequence" in text  # kept from the earlier file
    assert "torch 9.9, transformers 9.9" in text and "--split-prefix 1024" in text
    combined = json.loads(raw.read_text())
    assert combined["argv"] == ["--methods", "ie_ike,ft_llm", "--split-prefix", "1024"]
    assert combined["previous_argv"] == [["--methods", "ie_ike,ft_llm"]]  # each command once
    with pytest.raises(SystemExit, match="has rows of ie_ike, ft_llm"):
        goals.main(["--combine", str(a), f"{b}:wise", "--out", str(out)])
    other = _raw(tmp_path / "c.json", "NVIDIA H200", ["--methods", "ie_ike"], [{"method": "ie_ike", "runs": [run(0.5)]}])
    with pytest.raises(SystemExit, match="timed on NVIDIA H200, the files before it on NVIDIA H100"):
        goals.main(["--combine", str(a), str(other), "--out", str(out)])
    assert "| ie_ike | graph | 32 | all | 0.800 |" in out.read_text()  # a refused combine writes nothing


def test_goals_times_hypernetwork_steps_without_the_checkpoint_writes_and_validations(tmp_path, monkeypatch):
    """The per-instance rate of a few timed steps leaves out the trainer's checkpoint writes (a slow disk here), which
    the projection must not multiply by 4,000; one validation is timed alone and enters the projection as often as
    the method's hyperparameters validate."""
    import json
    import time

    from bench import goals
    from editors.train import Trainer

    slow = Trainer.save_checkpoint

    def save_slowly(self):
        time.sleep(1.0)
        slow(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_slowly)
    raw = tmp_path / "G.json"
    assert goals.main(["--tiny", "--methods", "mend", "--default-k-methods", "none", "--hypernet-steps", "1",
                       "--warmup-method", "", "--out", str(tmp_path / "G.md"), "--json", str(raw),
                       "--workdir", str(tmp_path / "w")]) == 0
    h = json.loads(raw.read_text())["rows"][0]["hypernet"]
    assert h["instances"] == 2 and h["set_aside_s"]["save_checkpoint"] >= 1.0
    assert h["s_per_instance"] * h["instances"] < 1.0  # the write is not in the rate
    assert h["s_per_validated_instance"] > 0 and h["val_interval"] >= 1
    # one epoch: the paper's 4,000 train instances less the trainer's held-out validation rows
    trained = 4000 - h["val_size"]
    validations = -(-trained // h["val_interval"])
    assert goals.hypernet_hours(h) == pytest.approx(
        (h["s_per_instance"] * trained + h["s_per_validated_instance"] * h["val_size"] * validations) / 3600)


def test_goals_projection_sets_the_measured_parts_beside_the_papers_whole_table_7():
    """Table 7's single, sequential and training hours over the three models add up to the ~161 H100-hours the
    whole paper took; a model's projection says what share of it (and of that model's) its measured rows cover."""
    from bench import goals

    whole = sum(goals.paper_table7_hours(m) for m in ("qwen2_audio", "desta25", "audio_flamingo3"))
    assert round(whole) == 161
    run = {"engine": "graph", "edits": 32, "s_per_edit": 0.5, "passes": []}
    lines = goals.projection([{"method": "ft_llm", "runs": [run]}], "qwen2_audio")
    assert "| ft_llm | 0.17 (2.58) |" in lines[2]  # 1,200 edits at 0.5 s; the paper's 2h35m
    share = 2.58 / goals.paper_table7_hours("qwen2_audio")
    assert "160.7 H100-hours" in lines[-1] and f"{2.5833 / whole:.0%} of the whole" in lines[-1]
    assert f"{share:.0%} of this model's" in lines[-1]


def test_projection_counts_the_pre_edit_outputs_once_where_methods_share_the_cache():
    """Cold rates generate each method's pre-edit outputs; the projection says what one model's methods save by
    sharing them (each method's pre-edit share, all but the largest, times the paper's edits)."""
    from bench import goals

    def row(method: str, seconds: float, pre: float) -> dict:
        return {"method": method, "runs": [{"engine": "graph", "s_per_edit": seconds,
                                            "info": {"per_edit_split_s_incl_warmup": {"pre_edit": pre}}}]}

    lines = goals.projection([row("ft_llm", 0.6, 0.25), row("i_ike", 0.5, 0.2)], "qwen2_audio")
    saved = 0.2 * goals.PAPER_EDITS / 3600
    text = "\n".join(lines)
    assert f"{saved:.2f} h less single editing" in text and "0.20-0.25 s/edit" in text
    assert "computes them once" not in "\n".join(goals.projection([row("ft_llm", 0.6, 0.25)], "qwen2_audio"))


def test_goals_says_what_bounds_each_missed_goal():
    """A run that misses its goal gets a line: the runner's split against the floor of its edits, part by part, and
    whether the floor alone is above the goal; a met goal gets none, a row from before floors were recorded says so."""
    import argparse

    from bench import goals
    from bench.models import tiny_scale

    split = {"pre_edit": 0.2, "apply": 0.6, "evaluate": 0.25, "other": 0.05}
    floor = {"floor_s": 0.5, "train_s": 0.2, "prefill_s": 0.15, "perception_s": 0.05, "memory_s": 0.1,
             "train_modelled": 1.0}

    def run(seconds: float, **extra) -> dict:
        return {"engine": "graph", "edits": 4, "s_per_edit": seconds, "passes": [{"edits": 4}],
                "info": {"per_edit_split_s_incl_warmup": split}, "graph": {"capture_s": 0.4}, **extra}

    rows = [{"method": "ft_audio", "runs": [run(1.1, floor=floor)]}, {"method": "ft_llm", "runs": [run(0.3)]},
            {"method": "unke", "runs": [run(2.0)]}]
    args = argparse.Namespace(model="qwen2_audio", argv=["--tiny"], previous_argv=[], max_new_tokens=32)
    text = goals.render(args, rows, {"matmul_flops_per_s": 7e14, "copy_bytes_per_s": 3e12},
                        goals.run_header(tiny_scale()))
    section = text[text.index("What bounds each missed goal"):].split("\n\n")[1].splitlines()
    assert [line.split("`")[1] for line in section] == ["ft_audio", "unke"]  # ft_llm met its 0.39
    ft_audio, unke = section
    assert "pre-edit 0.20 + apply 0.60 + evaluate 0.25 + other 0.05 s/edit (graph captures 0.10 of them)" in ft_audio
    assert "Floor on its card 0.500 s/edit: training 0.200 + prefill 0.150 + audio encoder 0.050" in ft_audio
    assert "Generation (pre-edit + evaluate) 0.45 s/edit is 1.5x its floor; apply 0.60 is 3.0x" in ft_audio
    assert "floor alone is above the goal (0.45)" in ft_audio
    assert "no floor recorded" in unke


def test_the_floor_counts_the_pre_edit_outputs_the_run_generates(tmp_path):
    """The floor's pre-edit generation holds the questions that get a pre-edit output (the locality items by
    default, all ten under --pre-edit-items all), and its parts add up to the floor."""
    from bench.arms import synthetic_bench
    from bench.roofline import mean_floor, run_shapes

    ceilings = {"matmul_flops_per_s": 1e12, "matmul_fp32_flops_per_s": 1e12, "copy_bytes_per_s": 1e11}
    with synthetic_bench(tiny=True, seed=0, model="qwen2_audio", units=2, max_new_tokens=4, prefix="floor-") as bench:
        rows = bench.dataset.ordered(["emotion"], 2)[:2]
        from bench.roofline import edit_shapes

        editor = bench.editor("ft_audio")
        locality = edit_shapes(bench, editor, rows[0])
        bench.pre_edit_items = "all"
        every = edit_shapes(bench, editor, rows[0])
        assert len(locality.post_tokens) == len(every.pre_tokens) == 10 and len(locality.pre_tokens) == 5
        floor = mean_floor(bench, "ft_audio", run_shapes(bench, "ft_audio", rows), ceilings)
        bench.pre_edit_items = "locality"
        assert mean_floor(bench, "ft_audio", run_shapes(bench, "ft_audio", rows), ceilings)["prefill_s"] < floor["prefill_s"]
    assert floor["train_s"] > 0 and floor["train_modelled"] == 1.0
    assert floor["floor_s"] == pytest.approx(floor["train_s"] + floor["prefill_s"] + floor["perception_s"]
                                             + floor["memory_s"])


def test_the_floor_models_unke_and_wise_training_with_their_preservation_prompts_and_optimizer_state(tmp_path):
    """UnKE's and WISE's training is in the floor: it grows with the preservation prompts the run draws for the edit
    (20 + 5 and 10 + 10 at full size; the tiny hparams' counts here), and the optimizer's state traffic (Adam over
    UnKE's layer, SGD over WISE's side memory) is part of the training floor, which the parts add up to."""
    import dataclasses

    from bench.arms import synthetic_bench
    from bench.roofline import ADAM_BYTES, SGD_BYTES, edit_shapes, floor_seconds, model_sizes

    ceilings = {"matmul_flops_per_s": 1e12, "matmul_fp32_flops_per_s": 1e12, "copy_bytes_per_s": 1e11}
    with synthetic_bench(tiny=True, seed=0, model="qwen2_audio", units=2, max_new_tokens=4, prefix="floor-") as bench:
        row = bench.dataset.ordered(["emotion"], 2)[0]
        sizes = model_sizes(bench.adapter.model.config)
        for method, per_param in (("unke", ADAM_BYTES), ("wise", SGD_BYTES)):
            hp = bench.hparams(method).as_dict()
            shapes = edit_shapes(bench, bench.editor(method), row)
            assert len(shapes.preserve_tokens) == hp["preserve_text"] + hp["preserve_audio"]
            assert min(shapes.preserve_tokens) > 0
            floor = floor_seconds(method, shapes, sizes, ceilings, 4, 4, hp)
            steps = hp["optim_steps"] if method == "unke" else hp["n_iter"]
            trained = sizes["layer"] if method == "unke" else sizes["mlp_out"]
            assert floor["train_modelled"] == 1.0 and floor["train_flops"] > 0
            assert floor["optimizer_bytes"] == steps * trained * per_param
            assert floor["train_s"] == pytest.approx(floor["train_flops"] / 1e12 + floor["optimizer_bytes"] / 1e11)
            assert floor["floor_s"] == pytest.approx(floor["train_s"] + floor["prefill_s"] + floor["perception_s"]
                                                     + floor["memory_s"])
            fewer = floor_seconds(method, dataclasses.replace(shapes, preserve_tokens=shapes.preserve_tokens[:1]),
                                  sizes, ceilings, 4, 4, hp)
            assert fewer["train_flops"] < floor["train_flops"]
            assert fewer["prefill_s"] == floor["prefill_s"] and fewer["memory_s"] == floor["memory_s"]
        # a method that does not draw preservation prompts has none in its shapes
        assert edit_shapes(bench, bench.editor("ft_llm"), row).preserve_tokens == []


def test_the_floor_of_a_batched_run_shares_weights_and_prefixes(tmp_path):
    """A pass of K edits reads the weights once per decode step for all K (the pre-edit outputs of the next 32
    edits in one generation), and a prefix all of an edit's questions share (IE-IKE's demonstrations) is prefilled
    once: the floor of a batched run is below the one-edit-at-a-time floor."""
    import dataclasses

    from bench.arms import synthetic_bench
    from bench.roofline import edit_shapes, floor_seconds, generation_shares, mean_floor, model_sizes, run_shapes
    from editors.data import eval_items

    assert generation_shares([1, 13, 13, 5], 32) == ([32] * 32, [1] + [13] * 26 + [5] * 5)
    assert generation_shares([1, 1, 1], 2) == ([2, 2, 1], [1, 1, 1])
    assert generation_shares([40, 40], 32) == ([40] * 80, [40] * 80)
    ceilings = {"matmul_flops_per_s": 1e12, "matmul_fp32_flops_per_s": 1e12, "copy_bytes_per_s": 1e11}
    with synthetic_bench(tiny=True, seed=0, model="qwen2_audio", units=4, max_new_tokens=4, prefix="floor-") as bench:
        rows = bench.dataset.ordered(["emotion"], 4)[:4]
        shapes = edit_shapes(bench, bench.editor("ie_ike"), rows[0])
        assert shapes.post_shared > 0.5 * min(shapes.post_tokens)  # the demonstrations, once per edit
        # plain questions about different clips share no placeholder: the prefix stops before the first audio
        plain = edit_shapes(bench, bench.editor("ft_llm"), rows[0])
        first_audio = min(ids.index(bench.adapter.audio_placeholder_id)
                          for ids in (bench.adapter.prompt_token_ids(it.prompt()) for it in eval_items(rows[0]))
                          if bench.adapter.audio_placeholder_id in ids)
        assert 0 < plain.pre_shared <= first_audio
        sizes, hp = model_sizes(bench.adapter.model.config), bench.hparams("ie_ike").as_dict()
        shared = floor_seconds("ie_ike", shapes, sizes, ceilings, 4, 4, hp)
        unshared = floor_seconds("ie_ike", dataclasses.replace(shapes, post_shared=0, pre_shared=0), sizes,
                                 ceilings, 4, 4, hp)
        assert shared["prefill_s"] < unshared["prefill_s"] and shared["memory_s"] < unshared["memory_s"]
        one_at_a_time = mean_floor(bench, "ft_llm", run_shapes(bench, "ft_llm", rows), ceilings)
        batched = mean_floor(bench, "ft_llm", run_shapes(bench, "ft_llm", rows), ceilings, passes=[4])
    assert batched["memory_s"] < one_at_a_time["memory_s"]
    assert batched["prefill_s"] == pytest.approx(one_at_a_time["prefill_s"])


def test_goals_computes_a_recorded_floor_again_from_the_calls_own_edits():
    """``--combine --refloor``: a run's floor from its call's arguments (the same synthetic edits), its passes, steps
    and the call's ceilings, on the full-size architecture's shapes; a run without a floor stays without one."""
    from bench import goals

    run = {"engine": "graph", "edits": 2, "s_per_edit": 1.0, "passes": [{"edits": 2}], "pre_edit_items": "locality",
           "info": {"steps": [3], "mean_steps": 3.0}, "floor": {"floor_s": 99.0}}
    data = {"device": "NVIDIA H100 80GB HBM3", "model": "qwen2_audio", "argv": ["--edits", "2", "--hypernet-steps", "1"],
            "header": {"device": "NVIDIA H100 80GB HBM3", "audio_seconds": [0.5, 1.9], "versions": None},
            "ceilings": {"matmul_flops_per_s": 7e14, "matmul_fp32_flops_per_s": 5e13, "copy_bytes_per_s": 3e12},
            "rows": [{"method": "ft_audio", "runs": [run, {**run, "engine": "eager", "floor": None}]}]}
    assert goals.refloor(data) == 1
    floor = data["rows"][0]["runs"][0]["floor"]
    assert 0 < floor["floor_s"] < 99 and floor["train_s"] > 0 and floor["train_modelled"] == 1.0
    assert floor["floor_s"] == pytest.approx(floor["train_s"] + floor["prefill_s"] + floor["perception_s"]
                                             + floor["memory_s"], rel=1e-3)
    assert data["rows"][0]["runs"][1]["floor"] is None
    with pytest.raises(SystemExit, match="transcripts"):  # DeSTA2.5's shapes need its weights
        goals.refloor({**data, "argv": ["--model", "desta25", "--edits", "2"]})


def test_a_run_is_refloored_at_its_own_calls_ceilings():
    """A merged file's header holds its newest call's ceilings; ``--refloor`` takes each run's own: recorded with
    the run, else the matmul rate its stamp records (the newest call's copy rate), else the newest call's."""
    from bench import goals

    latest = {"matmul_flops_per_s": 7.87e14, "matmul_fp32_flops_per_s": 5e13, "copy_bytes_per_s": 3e12}
    own = {"matmul_flops_per_s": 7.5e14, "matmul_fp32_flops_per_s": 4e13, "copy_bytes_per_s": 2.9e12}
    assert goals.run_ceilings({"ceilings": own, "measured": "12-06 16:15, 775"}, latest) == own
    assert goals.run_ceilings({"measured": "12-06 16:15, 775"}, latest) == {**latest, "matmul_flops_per_s": 7.75e14}
    assert goals.run_ceilings({"measured": None}, latest) == latest


def test_ft_audios_floor_counts_its_row_from_the_first_audio_on():
    """No connector change alters the chat template's columns before the audio: FT-Audio's training floor counts
    the edit row's columns from the first audio on (``Shapes.template_tokens``), which the edit prompt has."""
    import dataclasses

    from bench.arms import synthetic_bench
    from bench.roofline import edit_shapes, floor_seconds, model_sizes
    from editors.base import EditRequest

    ceilings = {"matmul_flops_per_s": 1e12, "matmul_fp32_flops_per_s": 1e12, "copy_bytes_per_s": 1e11}
    with synthetic_bench(tiny=True, seed=0, model="qwen2_audio", units=1, max_new_tokens=4, prefix="floor-") as bench:
        row = bench.dataset.ordered(["emotion"], 1)[0]
        sizes = model_sizes(bench.adapter.model.config)
        hp = bench.hparams("ft_audio").as_dict()
        shapes = edit_shapes(bench, bench.editor("ft_audio"), row)
        ids = bench.adapter.prompt_token_ids(EditRequest.from_row(row).prompt())
        assert 0 < shapes.template_tokens == ids.index(bench.adapter.audio_placeholder_id)
        whole = floor_seconds("ft_audio", dataclasses.replace(shapes, template_tokens=0), sizes, ceilings, 1, 1, hp)
        tail = floor_seconds("ft_audio", shapes, sizes, ceilings, 1, 1, hp)
        assert tail["train_flops"] < whole["train_flops"]
        assert tail["prefill_s"] == whole["prefill_s"]


def test_goals_naive_loop_times_its_edits_after_untimed_warm_up_ones(tmp_path, caplog):
    """``--naive-warmup``: the first naive edits of a method run untimed (a process's first eager edit cost 2.5x a
    warm one of the same instance on an H100); the row keeps which instances were timed and the report says so."""
    import json
    import logging

    from bench import goals

    raw = tmp_path / "N.json"
    with caplog.at_level(logging.INFO, logger="bench.arms"):
        assert goals.main(["--tiny", "--methods", "i_ike", "--default-k-methods", "none", "--naive-methods", "i_ike",
                           "--naive-edits", "1", "--naive-warmup", "1", "--warmup-method", "",
                           "--out", str(tmp_path / "N.md"), "--json", str(raw), "--workdir", str(tmp_path / "w")]) == 0
    [row] = json.loads(raw.read_text())["rows"]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("naive/i_ike")]
    assert len(logged) == 2 and logged[0].endswith("(warm-up)") and not logged[1].endswith("(warm-up)")
    warm_id = logged[0].split()[1].rstrip(":")
    timed = row["naive_edits"]["timed"]
    assert row["naive_edits"]["warmup"] == 1 and len(timed) == 1 and warm_id not in timed
    assert row["naive"] == pytest.approx(sum(timed.values()), abs=1e-3)
    assert "naive" in row["stamps"]
    assert f"- `i_ike`: naive {row['naive']:.2f} s/edit over 1 edit after 1 untimed (measured " in (
        tmp_path / "N.md").read_text()


def test_copy_kernels_bench_checks_its_arms_bits_and_prints_ratios(capsys):
    from bench import copy_kernels

    assert copy_kernels.main(["--lanes", "3", "--width", "16", "--cache-tokens", "40", "--heads", "2",
                              "--head-dim", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "bf16  store" in out and "wide  store" in out and "x)" in out


def test_goals_refuses_a_part_for_a_method_it_does_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    """--sequential-methods (and the other parts) run inside --methods' loop: naming another method is an error, not
    a silent skip."""
    from bench import goals

    with pytest.raises(SystemExit):
        goals.parse_args(["--tiny", "--methods", "ke,mend", "--sequential-methods", "unke,ke"])
    assert "--sequential-methods names unke, which --methods (ke,mend) does not run" in capsys.readouterr().err
    args = goals.parse_args(["--tiny", "--methods", "ke,mend", "--sequential-methods", "ke",
                             "--default-k-methods", "none"])
    assert goals._list(args.sequential_methods) == ["ke"]
    assert goals.default_k_methods(args) == []
    assert goals.default_k_methods(goals.parse_args(["--tiny", "--methods", "ke,mend"])) == ["ke", "mend"]


def test_ab_summary_pairs_each_arms_rounds_in_order_and_skips_a_process_that_wrote_nothing(tmp_path, capsys):
    from bench import ab_summary

    def write(name: str, rows: list[tuple[str, str, float | None]]) -> None:
        runs: dict[str, list] = {}
        for method, engine, s in rows:
            runs.setdefault(method, []).append({"engine": engine, "s_per_edit": s})
        (tmp_path / name).write_text(json.dumps({"rows": [{"method": m, "runs": r} for m, r in runs.items()]}))

    write("ab_new1.json", [("ke", "graph", 0.30), ("mend", "graph", 0.50)])
    write("ab_old1.json", [("ke", "graph", 0.40), ("mend", "graph", None)])  # a run that failed: no s/edit
    write("ab_new2.json", [("ke", "graph", 0.34)])
    write("ab_new10.json", [("ke", "graph", 0.32)])  # round 10 after round 2, not after round 1
    write("ab_old2.json", [("ke", "graph", 0.44)])
    (tmp_path / "ab_old3.log").write_text("timed out before writing its JSON")
    assert ab_summary.summary_lines(ab_summary.seconds_per_edit(tmp_path)) == [
        "ke graph: new 0.300 0.340 0.320 | old 0.400 0.440 | new/old (means) 0.762",
        "mend graph: new 0.500 | old -"]
    assert ab_summary.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("ke graph: new 0.300")


@pytest.mark.parametrize("args, message", [((), "A/B of `bench.goals`"), (("run", "two"), "ROUNDS must be a positive"),
                                           (("prepare", "no-such-rev"), "no-such-rev is not a commit")])
def test_ab_script_refuses_bad_arguments_before_doing_anything(tmp_path, args, message):
    import shutil
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "ab.sh"
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    done = subprocess.run(["bash", str(script), *args], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stdout + done.stderr
    assert not (tmp_path / ".ab_prev").exists()
