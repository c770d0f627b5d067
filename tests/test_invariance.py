"""Batch invariance (issue 18, editors/models/buckets.py): a row never depends on which clips, items or edits shared its
batch, on a warm pre-edit cache or on where a run was interrupted; CPU fp32, byte-identical prediction rows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _editor_helpers import run_config, synthetic_audio
from editors.models.buckets import (MIN_ROWS, TRAINING_WIDTH_STEP, chunk_rows, group_by_width, padded_rows, row_bucket,
                                    tail_start, training_groups, width_bucket)
from editors.models import load_adapter
from editors.models.generation.plan import plan_chunks
from editors.models.base import Prompt
from editors.predictions import read_predictions
from editors.run import Runner


def test_bucket_rules():
    assert [width_bucket(n, "cpu") for n in (1, 32, 33, 100)] == [32, 32, 64, 128]
    assert width_bucket(300, "cuda") == 512
    assert [row_bucket(n) for n in (1, 16, 17, 40)] == [MIN_ROWS, 16, 32, 64]
    assert group_by_width([10, 40, 20, 70, 33], "cpu") == [(32, [0, 2]), (64, [1, 4]), (96, [3])]
    assert chunk_rows(list(range(10)), 64, max_batch_tokens=64 * 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_rows([3, 5], 64, batch_size=1) == [[3], [5]]
    # the padded batch (dummy rows of the row bucket included) stays within the token budget: 65 real rows of
    # 512 tokens under a 40k budget were a 128 x 512 batch (the H200 run's 19 GiB of prefill logits)
    for budget in (40_000, 26_500, 512 * MIN_ROWS, 512 * MIN_ROWS * 3):
        chunks = chunk_rows(list(range(300)), 512, max_batch_tokens=budget)
        assert sum(len(c) for c in chunks) == 300
        assert all(row_bucket(len(c)) * 512 <= budget for c in chunks)
        assert max(len(c) for c in chunks) * 2 * 512 > budget  # no smaller than the budget asks
    assert chunk_rows(list(range(5)), 512, max_batch_tokens=512 * 3) == [[0, 1, 2], [3, 4]]  # under MIN_ROWS
    # the chunks a generation computes: on CUDA the copies filling a chunk to its row bucket stay within the budget
    # too (sequential IE-IKE's ~3,700-token prompts under a 16k budget: 4 rows, not 16); on CPU a chunk is always
    # filled to MIN_ROWS (a row's bits do not depend on its batch)
    for budget in (4096, 8192, 16384, 30000):
        chunks = plan_chunks([3700] * 10, "cuda", 256, max_batch_tokens=budget)
        assert sorted(i for c in chunks for i in c.rows[:c.real]) == list(range(10))
        assert all(len(c.rows) * (c.width + 256) <= max(budget, c.width + 256) for c in chunks)
    assert [len(c.rows) for c in plan_chunks([37000], "cuda", 256, max_batch_tokens=4096)] == [1]
    assert [len(c.rows) for c in plan_chunks([3700] * 3, "cuda", 256, max_batch_tokens=10**6)] == [MIN_ROWS]
    assert [(len(c.rows), c.real) for c in plan_chunks([3700] * 10, "cpu", 256, max_batch_tokens=16384)] == [
        (MIN_ROWS, 4), (MIN_ROWS, 4), (MIN_ROWS, 2)]
    # a tail state starts at the first changed column on CUDA (at least MIN_ROWS columns before the end); on the
    # CPU where the whole width's attention starts a block of queries of the same size
    assert [tail_start(f, 512, "cuda") for f in (0, 300, 505)] == [0, 300, 512 - MIN_ROWS]
    assert [tail_start(f, 160, "cpu") for f in (31, 70, 150)] == [0, 64, 128]
    assert [tail_start(f, 512, "cpu") for f in (100, 300, 500)] == [64, 256, 320]
    assert [tail_start(f, 1024, "cpu") for f in (100, 300, 1000)] == [0, 256, 256]


def test_few_rows_take_the_path_of_many():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64)
    x = torch.randn(40, 256)
    many = linear(x)
    assert all(torch.equal(padded_rows(linear, x[:n]), many[:n]) for n in (1, 2, 5, 15))


@pytest.fixture(scope="module")
def qwen():
    return load_adapter("tiny-qwen2-audio", seed=0)


class _ReportsCuda:
    """The adapter, except that it says it runs on CUDA (its tensors stay on the CPU)."""

    device = torch.device("cuda")

    def __init__(self, adapter):
        self._adapter = adapter

    def __getattr__(self, name):
        return getattr(self._adapter, name)


def test_training_batches_pad_to_the_devices_training_step(qwen):
    """Training batches are left-padded to their longest row rounded up to the device's training step
    (``TRAINING_WIDTH_STEP``: 32 on the CPU, 256 on CUDA, where fewer, wider groups measured faster); rows of one
    CPU group share a CUDA group."""
    prompts = [Prompt("What is the emotion of the speaker? (a) happy (b) sad", audio=synthetic_audio(s, 0.4 + 0.5 * s))
               for s in range(4)] + [Prompt("What is the capital of France? (a) Paris (b) Rome")]
    targets = ["happy", "sad", "happy", "sad", "Paris"]
    lengths = [len(qwen.prompt_token_ids(p)) + len(qwen.target_token_ids(t)) for p, t in zip(prompts, targets)]
    for adapter, step in ((qwen, TRAINING_WIDTH_STEP["cpu"]), (_ReportsCuda(qwen), TRAINING_WIDTH_STEP["cuda"])):
        groups = training_groups(adapter, prompts, targets)
        assert sorted(i for rows, _ in groups for i in rows) == list(range(len(prompts)))
        for rows, batch in groups:
            assert batch.input_ids.shape[1] == -(-max(lengths[i] for i in rows) // step) * step
    cpu = [set(rows) for rows, _ in training_groups(qwen, prompts, targets)]
    cuda = [set(rows) for rows, _ in training_groups(_ReportsCuda(qwen), prompts, targets)]
    assert all(any(c <= g for g in cuda) for c in cpu) and len(cuda) < len(cpu)


def test_a_clips_encoder_states_do_not_depend_on_the_other_clips(qwen):
    clips = [synthetic_audio(s, 0.5 + 0.4 * s) for s in range(4)]
    together = qwen.audio_states(clips)
    for clip, state in zip(clips, together):
        qwen.clear_audio_cache()
        assert torch.equal(qwen.audio_states([clip])[0], state)


def test_an_items_output_does_not_depend_on_its_batch(qwen):
    prompts = [Prompt("What is the emotion of the speaker? (a) happy (b) sad", audio=synthetic_audio(s, 0.4 + 0.5 * s))
               for s in range(5)] + [Prompt("What is the capital of France? (a) Paris (b) Rome")]
    together = qwen.generate(prompts, max_new_tokens=24)
    assert [qwen.generate([p], max_new_tokens=24)[0] for p in prompts] == together
    assert qwen.generate(prompts[::-1], max_new_tokens=24) == together[::-1]


def unbucketed(adapter, prompts, max_new_tokens: int) -> list[str]:
    """The greedy outputs of one plain Hugging Face ``generate`` over all prompts padded to the longest (the
    generation path before issue 18), as reference."""
    from editors.models.generation import decode_new_tokens
    from editors.models.generation.eager import hf_generation_config

    with torch.no_grad():
        batch = adapter.prepare(prompts)
        new = adapter.model.generate(inputs_embeds=adapter.input_embeds(batch), attention_mask=batch.attention_mask,
                                     generation_config=hf_generation_config(adapter, max_new_tokens))
    return decode_new_tokens(adapter, new, max_new_tokens)


@pytest.mark.parametrize("family", ["tiny-qwen2-audio", "tiny-audio-flamingo3", "tiny-desta25"])
def test_canonical_generation_gives_the_unbucketed_greedy_outputs(family):
    adapter = load_adapter(family, seed=0)
    prompts = [Prompt("Which animal makes this sound? (a) dog (b) cat", audio=synthetic_audio(s, 0.5 + 0.3 * s))
               for s in range(3)] + [Prompt("What is the gender of the speaker? (a) male (b) female")]
    assert adapter.generate(prompts, max_new_tokens=6) == unbucketed(adapter, prompts, 6)


# 4 instances (2 per config): K=3 gives a pass of 3 then one of 1, so several passes with K edits each occur
INSTANCES_PER_CONFIG, K = 2, 3


def _run(demo, out, cache, k: int, method: str) -> list[dict]:
    """A run in a fresh process as far as the model is concerned: a new adapter (empty audio-state cache)."""
    config = run_config(demo, out, cache, method=method, configs=("animal", "emotion"), limit=INSTANCES_PER_CONFIG,
                        edits_per_pass=k, max_new_tokens=32)
    runner = Runner(config, adapter=load_adapter("tiny-qwen2-audio", seed=0))
    return read_predictions(runner.run())[1]


def test_rows_do_not_depend_on_k_warm_cache_or_resume(demo_dataset, tmp_path):
    """FT-Audio, 32 new tokens (on all four configs before issue 18, these pairs differed in 6-18 % of the rows:
    the edit audio encoded alone or with other clips, K edits' prompts padded to the longest, few-row products)."""
    base = _run(demo_dataset, tmp_path / "cold.jsonl", tmp_path / "cache", 1, "ft_audio")
    assert len(base) > 30 and len({r["instance_id"] for r in base}) == 2 * INSTANCES_PER_CONFIG > K
    warm = _run(demo_dataset, tmp_path / "warm.jsonl", tmp_path / "cache", 1, "ft_audio")
    assert warm == base
    # killed in the middle of the 3rd of 4 instances, resumed by a new process with the cache the first run filled
    lines = (tmp_path / "cold.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    seen: list[str] = []
    for cut, line in enumerate(lines[1:], start=1):
        seen = list(dict.fromkeys(seen + [json.loads(line)["instance_id"]]))
        if len(seen) == 3:
            break
    (tmp_path / "resumed.jsonl").write_text("".join(lines[:cut + 3]) + lines[cut + 3][:20], encoding="utf-8")
    shutil.copytree(tmp_path / "cache", tmp_path / "cache-resumed")
    assert _run(demo_dataset, tmp_path / "resumed.jsonl", tmp_path / "cache-resumed", 1, "ft_audio") == base
    assert _run(demo_dataset, tmp_path / "kK.jsonl", tmp_path / "cache-kK", K, "ft_audio") == base


def test_ft_llm_rows_do_not_depend_on_k(demo_dataset, tmp_path, monkeypatch):
    one = _run(demo_dataset, tmp_path / "k1.jsonl", tmp_path / "c1", 1, "ft_llm")
    assert _run(demo_dataset, tmp_path / "kK.jsonl", tmp_path / "cK", K, "ft_llm") == one
    # the comparison can fail: with every row of a chunk routed to its first row's edit, K=3 differs from K=1
    from editors.models.generation.per_edit import PerEdit, runs_of

    def crossed(self: PerEdit, rows: list[int]) -> None:
        if self.routing is not None:
            self.routing.runs = runs_of([self.edit_of[rows[0]]] * len(rows))

    monkeypatch.setattr(PerEdit, "before_chunk", crossed)
    assert _run(demo_dataset, tmp_path / "kK-crossed.jsonl", tmp_path / "cKx", K, "ft_llm") != one


def test_padding_rows_leave_outputs_alone(qwen):
    """Dummy rows (copies of a chunk's last prompt) are dropped: the outputs are those of the real prompts."""
    prompts = [Prompt("Is the speaker a man or a woman?", audio=synthetic_audio(7, 0.6))]
    out = qwen.generate(prompts * 3, max_new_tokens=5)
    assert out == qwen.generate(prompts, max_new_tokens=5) * 3


def test_a_desta_transcript_does_not_depend_on_its_batch():
    adapter = load_adapter("tiny-desta25", seed=0)
    adapter.vad = False
    clips = [synthetic_audio(s, 0.6 + 0.3 * s) for s in range(3)]
    together, _ = adapter._run_whisper_asr(clips)
    assert [adapter._run_whisper_asr([c])[0][0] for c in clips] == together
