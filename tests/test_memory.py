"""Memory-sized batching and out-of-memory back-off (editors/memory.py, the runner; issue 29): K from measured
passes, a pass that runs out of memory is redone at half the size with the rows of a run started there, a unit that
cannot fit alone is one ResourceError line; the generation's token budget counts the KV cache."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from _editor_helpers import run_config
from editors.memory import DeviceMemory, PassPeaks, PassSizer, is_out_of_memory, requested_bytes
from editors.models import load_adapter
from editors.predictions import read_predictions
from editors.run import Runner
from sake_core.errors import ResourceError

GIB = 2**30


class FakeMemory(DeviceMemory):
    """A measured device without a GPU: readings come from the test."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))

    @property
    def measured(self) -> bool:
        return True


def test_k_comes_from_the_measured_cost_of_an_edit():
    sizer = PassSizer(None, FakeMemory())
    assert sizer.auto and sizer.k == 1
    sizer.record(1, {"apply": 10 * GIB}, 100 * GIB)  # one edit: fixed + per edit, a bound on one edit's cost
    assert sizer.k == 8  # 0.8 * 100 / 10
    sizer.record(8, {"apply": 38 * GIB}, 100 * GIB)  # eight: 4 GiB per edit, 6 GiB per pass
    assert (sizer.per_edit, sizer.fixed, sizer.bound_by) == (4 * GIB, 6 * GIB, "apply")
    assert sizer.k == 16  # (0.8 * 100 - 6) / 4 = 18.5, but at most twice the largest pass measured
    sizer.record(16, {"apply": 70 * GIB}, 100 * GIB)
    assert sizer.k == 18
    sizer.record(18, {"apply": 78 * GIB}, 55 * GIB)  # less available (an 80 GB card): (44 - 6) / 4 -> 9
    assert sizer.k == 9
    assert sizer.back_off() == 4 and sizer.cap == 7  # the redo halves; later passes at most 0.8 of the 9
    sizer.record(4, {"apply": 22 * GIB}, 100 * GIB)
    assert sizer.k == 7  # the fit allows 18: capped below the size that ran out
    assert sizer.back_off() == 3 and sizer.cap == 5  # each back-off lowers the cap
    sizer.record(3, {"apply": 18 * GIB}, 100 * GIB)
    assert sizer.k == 5
    flat = PassSizer(None, FakeMemory())  # the larger pass peaks no higher: its peak / K bounds one edit
    flat.record(1, {"evaluate": 14 * GIB}, 100 * GIB)
    flat.record(5, {"evaluate": 12 * GIB}, 100 * GIB)
    assert (flat.per_edit, flat.fixed, flat.k) == (int(2.4 * GIB), 0, 10)  # 80 / 2.4 = 33; twice 5
    small = PassSizer(None, FakeMemory())
    small.record(1, {"apply": 60 * GIB}, 100 * GIB)
    assert small.k == 2  # at least two edits, to measure a difference
    fixed = PassSizer(8, FakeMemory())
    assert not fixed.auto and fixed.k == 8
    fixed.record(8, {"apply": 50 * GIB}, 60 * GIB)
    assert fixed.k == 8 and fixed.history[-1]["peak_bytes"] == 50 * GIB
    assert PassSizer(None, DeviceMemory(torch.device("cpu"))).k == 1  # CPU: nothing measured, one edit


def test_each_phase_of_a_pass_is_fitted_apart():
    """The pass's peak moves from the generation (a large fixed cost) to the edits' training state (a large cost per
    edit) as K grows: one line through the passes' peaks would take the first's slope; the phases' lines do not
    (DeSTA2.5's FT-LLM on an 80 GB card ran out of memory at the K one line allowed)."""
    def apply_bytes(k: int) -> int:
        return 1 * GIB + k * 4 * GIB  # copies, optimizer state, activations

    def evaluate_bytes(k: int) -> int:
        return 10 * GIB + k * GIB // 4  # the generation's buffers, the copies' share of the cache

    sizer = PassSizer(None, FakeMemory())
    sizer.record(1, {"apply": apply_bytes(1), "evaluate": evaluate_bytes(1)}, 52 * GIB)
    assert sizer.k == 4  # 0.8 * 52 / 10.25
    sizer.record(4, {"apply": apply_bytes(4), "evaluate": evaluate_bytes(4)}, 52 * GIB)
    assert sizer.bound_by == "apply" and (sizer.per_edit, sizer.fixed) == (4 * GIB, 1 * GIB)
    assert sizer.k == 8  # the line allows (41.6 - 1) / 4 = 10; a pass grows at most twofold
    sizer.record(8, {"apply": apply_bytes(8), "evaluate": evaluate_bytes(8)}, 52 * GIB)
    k = sizer.k
    assert k == 10 and apply_bytes(k) <= 0.8 * 52 * GIB
    # one line through the peaks (max over the phases) would allow more than the memory holds
    peaks = {n: max(apply_bytes(n), evaluate_bytes(n)) for n in (1, 4)}
    slope = (peaks[4] - peaks[1]) // 3
    one_line = int((0.8 * 52 * GIB - (peaks[1] - slope)) // slope)
    assert apply_bytes(one_line) > 52 * GIB
    assert sizer.history[1]["phase_peak_bytes"] == {"apply": apply_bytes(4), "evaluate": evaluate_bytes(4)}
    assert sizer.history[1]["peak_bytes"] == apply_bytes(4)  # the pass's peak: the larger phase


def test_passes_grow_so_that_a_line_from_small_passes_never_runs_out_of_memory():
    """DeSTA2.5's FT-LLM on an 80 GB card, as measured: the first pass's apply phase peaked higher per pass than the
    later ones (memory it allocated that later passes reuse), so the line through 1 and 4 edits gave 2.45 GiB per
    edit where an edit costs 3.7; the 14 edits it allowed ran out of memory. Growing at most twofold, every pass the
    sizer picks fits."""
    available = 52 * GIB

    def apply_bytes(k: int) -> int:  # what the device really needs; the first pass pays 5 GiB more
        return int((4 + 3.7 * k + (5 if k == 1 else 0)) * GIB)

    sizer = PassSizer(None, FakeMemory())
    sizes = []
    for _ in range(6):
        k = sizer.k
        assert apply_bytes(k) <= available, f"{k} edits per pass need {apply_bytes(k) / GIB:.1f} GiB"
        sizes.append(k)
        sizer.record(k, {"apply": apply_bytes(k), "evaluate": 10 * GIB + k * GIB // 4}, available)
    assert sizes[-1] == 10  # (0.8 * 52 - 4) / 3.7, reached without running out of memory on the way


def test_pass_peaks_close_each_phase():
    class Counting(FakeMemory):
        def __init__(self) -> None:
            super().__init__()
            self.allocated_now, self.top = 5, 5

        def start(self) -> int:
            self.top = self.allocated_now
            return self.allocated_now

        def peak(self, baseline):
            return self.top - baseline

        def reset_peak(self) -> None:
            self.top = self.allocated_now

        def use(self, n: int) -> None:
            self.allocated_now += n
            self.top = max(self.top, self.allocated_now)

    memory = Counting()
    peaks = PassPeaks(memory)
    memory.use(30)  # the edit's training state
    memory.use(-20)  # freed after the edit; the copies (10) stay
    peaks.phase_done("apply")
    memory.use(4)
    memory.use(-4)
    peaks.phase_done("evaluate")
    assert peaks.phases == {"apply": 30, "evaluate": 14}
    assert PassPeaks(DeviceMemory(torch.device("cpu"))).phases == {}


def test_out_of_memory_errors_and_their_size():
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.89 GiB. GPU 0 has a total capacity of "
                                   "139.81 GiB of which 1.2 GiB is free.")
    assert is_out_of_memory(error) and not is_out_of_memory(ValueError("out of memory"))
    assert requested_bytes(error) == int(1.89 * GIB)
    assert requested_bytes(RuntimeError("CUDA error: out of memory")) is None


@pytest.fixture(scope="module")
def qwen():
    return load_adapter("tiny-qwen2-audio", seed=0)


def _rows(path):
    return read_predictions(path)[1]


def test_a_pass_that_runs_out_of_memory_is_redone_at_half_the_size(qwen, demo_dataset, tmp_path, monkeypatch,
                                                                   caplog):
    common = {"method": "ft_audio", "configs": ("emotion", "animal"), "limit": 3, "hparams": {"max_steps": 3}}
    reference = _rows(Runner(run_config(demo_dataset, tmp_path / "k2.jsonl", tmp_path / "c2", edits_per_pass=2,
                                        **common), adapter=qwen).run())
    runner = Runner(run_config(demo_dataset, tmp_path / "k8.jsonl", tmp_path / "c8", edits_per_pass=8, **common),
                    adapter=qwen)
    apply_many = runner.editor.apply_many

    def tight(edits):  # a device that holds two edits' copies, no more
        if len(edits) > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(edits)}.00 GiB")
        return apply_many(edits)

    monkeypatch.setattr(runner.editor, "apply_many", tight)
    with caplog.at_level(logging.WARNING, logger="editors.run"):
        rows = _rows(runner.run())
    assert rows == reference
    assert [p["edits"] for p in runner.sizer.history] == [2, 2, 2]
    halvings = [r.message for r in caplog.records if "out of memory with" in r.message]
    assert len(halvings) == 2 and "redoing these units with 4 per pass" in halvings[0]


def test_a_unit_that_does_not_fit_alone_is_one_clear_error(qwen, demo_dataset, tmp_path, monkeypatch):
    runner = Runner(run_config(demo_dataset, tmp_path / "x.jsonl", tmp_path / "c", method="ft_llm",
                               configs=("gender",), limit=1, hparams={"max_steps": 1}), adapter=qwen)

    def never(edit):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(runner.editor, "apply", never)
    with pytest.raises(ResourceError, match=r"ft_llm: unit gender/test/000000 does not fit .* 3\.00 GiB requested"):
        runner.run()


def test_a_generation_that_runs_out_of_memory_is_redone_in_smaller_chunks(qwen, demo_dataset, tmp_path,
                                                                          monkeypatch):
    common = {"configs": ("language",), "limit": 2}
    reference = _rows(Runner(run_config(demo_dataset, tmp_path / "a.jsonl", tmp_path / "ca", **common),
                             adapter=qwen).run())
    runner = Runner(run_config(demo_dataset, tmp_path / "b.jsonl", tmp_path / "cb", **common), adapter=qwen)
    generate = type(qwen).generate
    seen = []

    def small_chunks_only(self, prompts, *args, settings=None, **kwargs):
        seen.append(settings.max_batch_tokens)
        if settings.max_batch_tokens > 8192:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(self, prompts, *args, settings=settings, **kwargs)

    monkeypatch.setattr(type(qwen), "generate", small_chunks_only)
    assert _rows(runner.run()) == reference
    assert seen[:3] == [32768, 16384, 8192] and set(seen[3:]) == {8192}


def test_after_an_out_of_memory_error_the_budget_is_measured_without_the_failed_calls_tensors(
        qwen, demo_dataset, tmp_path, monkeypatch, caplog):
    """The failed generation's frames hold its caches; measured while the error kept them, the memory read as in use
    and the next try's budget came out too small (an H100's IE-IKE sequence: 39k tokens, then 19.6k, each row then
    prefilling its own 37k-token prompt). The budget is measured after they are gone; the line still says where the
    allocation failed."""
    import weakref

    import editors.run

    runner = Runner(run_config(demo_dataset, tmp_path / "b.jsonl", tmp_path / "cb", configs=("language",), limit=1,
                               max_batch_tokens=0), adapter=qwen)  # no set cap: measured from memory, as on CUDA
    generate = type(qwen).generate
    caches: list[weakref.ref] = []

    def fails_once_holding_a_cache(self, prompts, *args, settings=None, **kwargs):
        if not caches:
            cache = torch.zeros(4096)  # what a failed call's frame holds (on a GPU: its KV cache)
            caches.append(weakref.ref(cache))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(self, prompts, *args, settings=settings, **kwargs)

    alive_when_measured = []

    def budget(adapter, **kwargs):
        alive_when_measured.append(caches[0]() is not None)
        return 65536

    monkeypatch.setattr(type(qwen), "generate", fails_once_holding_a_cache)
    monkeypatch.setattr(editors.run, "token_budget", budget)
    with caplog.at_level(logging.WARNING, logger="editors.run"):
        runner.run()
    assert alive_when_measured == [False]
    assert runner.generation.max_batch_tokens == 32768
    line = next(r.message for r in caplog.records if "out of memory while generating" in r.message)
    assert "test_memory.py:" in line and "in fails_once_holding_a_cache" in line


def test_pre_edit_outputs_that_do_not_fit_even_in_the_smallest_chunks_end_with_one_clear_error(qwen, demo_dataset,
                                                                                               tmp_path, monkeypatch):
    runner = Runner(run_config(demo_dataset, tmp_path / "b.jsonl", tmp_path / "cb", configs=("language",), limit=2),
                    adapter=qwen)

    def never_fits(self, prompts, *args, settings=None, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(qwen), "generate", never_fits)
    with pytest.raises(ResourceError, match=r"i_ike: the pre-edit outputs of units language/test/000000 \.\. "
                                            r"language/test/000001 do not fit .* 4096 tokens per generation chunk"):
        runner.run()


def test_the_generation_token_budget_counts_the_kv_cache(qwen):
    from editors.models.generation.memory import activation_bytes_per_token, kv_bytes_per_token

    cfg = qwen.language_model().config
    assert kv_bytes_per_token(qwen) == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * \
        (cfg.hidden_size // cfg.num_attention_heads) * 4  # fp32
    assert activation_bytes_per_token(qwen) > 0


def test_a_back_off_line_says_where_the_allocation_failed():
    from editors.memory import raised_at

    def allocate_the_cache():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 19.05 GiB.")

    try:
        allocate_the_cache()
    except torch.OutOfMemoryError as error:
        where = raised_at(error)
    assert where.startswith("tests/test_memory.py:") and where.endswith(" in allocate_the_cache")


def test_cuda_readings_name_the_device_index(monkeypatch):
    """torch's per-process cap query refuses ``cuda`` without an index (seen on the H200): readings use ``cuda:N``."""
    from editors.models.generation.memory import cuda_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert cuda_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert cuda_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


@pytest.mark.parametrize("family", ["tiny-qwen2-audio", "tiny-audio-flamingo3", "tiny-desta25"])
def test_the_eager_prefill_computes_the_last_positions_logits_only(family, monkeypatch):
    """Qwen2-Audio's forward takes no ``logits_to_keep``, so ``generate`` had it compute the logits of every prompt
    position at prefill (16.7 GiB for one IE-IKE edit's chunk at 7B: out of memory on an 80 GB card). The eager
    engine's head now sees the last position of each row only, for every family, and its outputs are unchanged."""
    from editors.models.base import Prompt
    from editors.models.generation import eager
    from _editor_helpers import synthetic_audio

    adapter = load_adapter(family, seed=0)
    prompts = [Prompt("What is the emotion of the speaker?", audio=synthetic_audio(1, 0.5)),
               Prompt("Which language is spoken here, and by whom?", audio=synthetic_audio(2, 0.7))]
    settings = adapter.generation_settings(3, engine="eager")
    widths: list[int] = []
    hook = adapter.lm_head().register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    try:
        outputs = adapter.generate(prompts, settings=settings)
    finally:
        hook.remove()
    assert widths and set(widths) == {1}
    assert not adapter.lm_head()._forward_pre_hooks  # the cut is removed after the call

    monkeypatch.setattr(eager, "last_position_logits", lambda adapter: contextlib.nullcontext())  # no cut
    uncut = adapter.generate(prompts, settings=settings)
    assert outputs == uncut and [o.hit_limit for o in outputs] == [o.hit_limit for o in uncut]