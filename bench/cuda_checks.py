"""CUDA-only code paths checked on the lent GPU before a bench runs (tiny model, a few seconds; prints one line each).

The CPU tests cannot reach these paths: torch's fused Adam kernel as both training loops take it on CUDA
(``editors.batching.fused_adam``), the batched loop's early stops decided on the device
(``editors.batching.early_stop_on_device``), and the kernels that return log-sum-exps for the graph engine's prefix
attended in two parts (``editors.models.generation.graph.attention_lse``: flash attention without a mask,
memory-efficient attention with an additive bias), and the batched training steps of FT-Audio and FT-LLM without a
host sync and replayed as a CUDA graph, the fused decoder-layer forward (``editors.models.fused_layer``)
against the Hugging Face layer's, and a routed per-edit RMSNorm (UnKE's layer copies) on the fused norm against the
Hugging Face module, and the graph engine capturing a new shape after it dropped another in the same call.
``bench/gpu_run.sh`` runs this after its probe; a failed check is
reported, not fatal, so the bench still runs on the library's defaults.

    python -m bench.cuda_checks          # on a CUDA machine; exit status 1 if a check failed
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class FusedAdamRuns:
    """Four Adam steps (lr 0.1, weight decay 0.01) of three edits, edit 1 frozen after the second: once as K edits'
    stacked copy through ``masked_update``, once per edit through ``torch.optim.Adam(fused=True)``."""

    start: torch.Tensor
    grads: list[torch.Tensor]
    active: list[torch.Tensor]
    stacked: torch.Tensor  # the stacked copy after the masked steps
    state: dict[str, Any]  # its optimizer state
    alone: list[torch.Tensor]  # each edit's parameter after its own optimizer's steps
    alone_exp_avg: list[torch.Tensor]


def fused_adam_runs(device: str) -> FusedAdamRuns:
    """The two ways of :class:`FusedAdamRuns` on ``device`` (both take the fused kernel where
    ``editors.batching.fused_adam`` says so: on CUDA, or where a test forces it)."""
    from editors.batching import masked_update

    gen = torch.Generator(device=device).manual_seed(0)
    start = torch.randn(3, 64, 33, device=device, generator=gen)
    grads = [torch.randn(3, 64, 33, device=device, generator=gen) for _ in range(4)]
    active = [torch.tensor(a, device=device) for a in ([True] * 3, [True] * 3, [True, False, True],
                                                       [True, False, True])]
    stacked, state = start.clone(), [{}]
    for step, (g, mask) in enumerate(zip(grads, active), start=1):
        masked_update([stacked], [g], state, mask, step, optimizer="adam", lr=0.1, weight_decay=0.01,
                      all_active=bool(mask.all()))
    alone, alone_exp_avg = [], []
    for k in range(3):
        param = start[k].clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=0.1, weight_decay=0.01, fused=True)
        for g, mask in zip(grads, active):
            if bool(mask[k]):
                param.grad = g[k].clone()
                opt.step()
        alone.append(param.detach())
        alone_exp_avg.append(opt.state[param]["exp_avg"])
    return FusedAdamRuns(start, grads, active, stacked, state[0], alone, alone_exp_avg)


def check_fused_adam() -> str:
    """K edits' masked fused steps equal one ``torch.optim.Adam(fused=True)`` per edit, bit for bit."""
    runs = fused_adam_runs("cuda")
    for k, alone in enumerate(runs.alone):
        if not torch.equal(runs.stacked[k], alone):
            raise AssertionError(f"edit {k}: max difference {float((runs.stacked[k] - alone).abs().max()):.3g}")
    return "K masked fused Adam steps equal one fused optimizer per edit, bit for bit"


def check_early_stop_on_device() -> str:
    """``finetune_many``'s early stops decided on the device (CUDA's path: no host sync per step) give the results
    and copies of the loop that reads the losses every step, bit for bit (fused Adam skipping the stopped edits)."""
    import editors.batching as batching

    targets = torch.tensor([[0.6, 0.0], [2.0, -1.0], [1e4, 3.0]], device="cuda")
    start = torch.zeros(2, device="cuda")
    runs = []
    for on_device in (False, True):
        saved = batching.early_stop_on_device
        batching.early_stop_on_device = lambda device, chosen=on_device: chosen  # type: ignore[assignment]
        try:
            copies = batching.StackedCopies({"w": start}, 3)
            results = batching.finetune_many(copies, lambda w: ((w["w"] - targets) ** 2).sum(-1), lr=0.25,
                                             max_steps=60, early_stop_loss=1e-2, optimizer="adam")
        finally:
            batching.early_stop_on_device = saved  # type: ignore[assignment]
        runs.append((copies.masters["w"].detach(), [(r.steps, r.loss, r.stopped_early) for r in results]))
    (w_host, r_host), (w_dev, r_dev) = runs
    if not (torch.equal(w_host, w_dev) and r_host == r_dev):
        raise AssertionError(f"host loop {r_host}, device loop {r_dev}")
    return f"early stops decided on the device equal the host loop's, bit for bit (steps {[r[0] for r in r_host]})"


def check_attention_lse() -> str:
    """``attention_lse`` on CUDA (flash, memory-efficient with a bias) against SDPA over both parts (bf16)."""
    from editors.models.generation.graph import attention_lse, merge_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 4, 64, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(3, 4, 192, 128, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(3, 1, 64, 64, dtype=torch.bool, device="cuda").tril()
    whole = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.cat([mask.new_ones(3, 1, 64, 128), mask], dim=-1), scale=0.1)
    out_p, lse_p = attention_lse(q, k[:, :, :128], v[:, :, :128], None, 0.1)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device="cuda").masked_fill_(~mask, float("-inf"))
    out_t, lse_t = attention_lse(q, k[:, :, 128:], v[:, :, 128:], bias, 0.1)
    merged = merge_attention(out_p, lse_p, out_t, lse_t)
    error = float((merged.float() - whole.float()).abs().max())
    if error > 2e-2:
        raise AssertionError(f"merged parts differ from attention over both by {error:.3g}")
    return f"prefix (flash) and tail (memory-efficient, bias) merged by log-sum-exp: max difference {error:.2g} (bf16)"


def check_split_prefix_engine() -> str:
    """The graph engine with every prefix attended in two parts gives the eager engine's greedy outputs (fp32)."""
    import numpy as np

    from editors.models.base import Prompt, Turn
    from editors.models.generation import graph
    from editors.models.qwen2_audio import Qwen2AudioAdapter

    adapter = Qwen2AudioAdapter.tiny(0, device="cuda")
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(16000) * 0.1).astype("float32")
    history = (Turn("What is the emotion here? (a) happy (b) sad", "happy", audio=clip),)
    prompts = [Prompt(f"Which animal is this? choice {j}", audio=(rng.standard_normal(8000 * (j + 1)) * 0.1)
                      .astype("float32"), system="Apply the update.", history=history) for j in range(4)]
    settings = adapter.generation_settings(6)
    eager = adapter.generate(prompts, settings=settings)
    saved = graph.SPLIT_PREFIX
    graph.SPLIT_PREFIX = 1
    try:
        split = adapter.generate(prompts, settings=settings.replace(engine="graph"))
    finally:
        graph.SPLIT_PREFIX = saved
    same = sum(a == b for a, b in zip(split, eager))
    if same != len(prompts):
        raise AssertionError(f"{same} of {len(prompts)} rows equal the eager engine's")
    return f"graph engine with SPLIT_PREFIX=1: {same} of {len(prompts)} rows equal the eager engine's (fp32)"


def three_edits(seed: int, samples: int) -> list[Any]:
    """Three emotion edits of the tiny models, edit k's clip ``samples * (k + 1)`` samples of noise."""
    import numpy as np

    from editors.base import EditRequest

    rng = np.random.default_rng(seed)
    return [EditRequest(instance_id=f"emotion/test/{k:06d}", attribute="emotion", original_label="happy",
                        target_label=target, question="What is the emotion of the speaker?",
                        options=["happy", "sad", "angry"], target=target,
                        audio=(rng.standard_normal(samples * (k + 1)) * 0.1).astype("float32"))
            for k, target in enumerate(("sad", "angry", "happy"))]


def training_syncs(method: str, steps: int, device: str = "cuda") -> int:
    """Host-device synchronizations of one ``apply_many`` of three edits with ``steps`` training steps (tiny
    Qwen2-Audio on CUDA, no early stop), counted with ``torch.cuda.set_sync_debug_mode``."""
    import warnings

    from editors.base import RunContext
    from editors.models.qwen2_audio import Qwen2AudioAdapter
    from editors.registry import get_editor_class, load_hparams

    adapter = Qwen2AudioAdapter.tiny(0, device=device)
    edits = three_edits(seed=0, samples=16000)
    hparams = load_hparams(method, adapter.family, tiny=True, overrides={"max_steps": steps, "early_stop_loss": 0.0})
    editor = get_editor_class(method)(adapter, hparams, RunContext(seed=0))
    editor.apply_many(edits)  # shapes seen once: lazily built state is not counted
    editor.reset()
    if device == "cuda":
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            editor.apply_many(edits)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    editor.reset()
    return sum("synchroniz" in str(w.message) for w in caught)


def check_training_step_syncs() -> str:
    """FT-Audio's and FT-LLM's batched training steps wait for the device nowhere: a pass of 8 steps syncs the
    host no more often than a pass of 2 (the batches' setup and the results' read-back are once per pass; the
    count varies by one between runs, a sync per step would add six)."""
    found = []
    for method in ("ft_audio", "ft_llm"):
        short, long = training_syncs(method, 2), training_syncs(method, 8)
        if long > short:
            raise AssertionError(f"{method}: {short} syncs with 2 steps, {long} with 8")
        found.append(f"{method} {short} and {long}")
    return "syncs per apply_many at 2 and 8 steps: " + ", ".join(found)


def check_fused_layer() -> str:
    """The fused decoder-layer forward (``editors.models.fused_layer``, on by default on CUDA) against the Hugging
    Face layer's on the tiny models in bf16: per-row losses and the gradient of the connector's output, whole width
    and tail state (a padded batch of three rows with one clip)."""
    from editors.models import fused_layer, load_adapter
    from editors.models.base import Prompt
    from editors.models.buckets import training_groups

    clip = torch.Generator().manual_seed(0)
    prompts = [Prompt("What is the emotion of the speaker? (a) happy (b) sad",
                      audio=(0.1 * torch.randn(16000, generator=clip)).numpy()),
               Prompt("What orbits the Earth?"), Prompt("Which is right? " + " ".join(f"({i}) answer {i}"
                                                                                    for i in range(40)))]
    targets = ["sad", "the moon", "answer 7"]
    worst, worst_packed, worst_rows, kept = 0.0, 0.0, 0.0, dict(fused_layer.FUSED_LAYERS)
    try:
        for family in ("tiny-qwen2-audio", "tiny-desta25"):
            adapter = load_adapter(family, seed=0, dtype=torch.bfloat16, device="cuda")
            for _, batch in training_groups(adapter, prompts, targets):
                results = []
                for on in (False, True):
                    fused_layer.FUSED_LAYERS["cuda"] = on
                    state = adapter.hidden_entering(batch, 0)
                    tail = adapter.tail_state(state, adapter.first_audio_column(batch))
                    hidden = tail.hidden.detach().requires_grad_(True)
                    loss = adapter.loss_from(tail, hidden, reduction="none")
                    results.append((loss.detach().float(), torch.autograd.grad(loss.sum(), [hidden])[0].float()))
                (loss_hf, grad_hf), (loss_ours, grad_ours) = results
                worst = max(worst, float((loss_ours - loss_hf).abs().max() / loss_hf.abs().max().clamp(min=1e-6)),
                            float((grad_ours - grad_hf).abs().max() / grad_hf.abs().max().clamp(min=1e-12)))
            # a packed row (variable-length flash attention) against the width groups, both fused
            canonical = torch.zeros(len(prompts), device="cuda")
            for rows, batch in training_groups(adapter, prompts, targets):
                canonical[rows] = adapter.loss_from(adapter.hidden_entering(batch, 0), reduction="none").float()
            if not adapter.packs_sequences():
                raise AssertionError(f"{family}: the adapter does not pack sequences on CUDA")
            [(rows, packed)] = training_groups(adapter, prompts, targets, packable=True)
            losses = adapter.loss_from(adapter.hidden_entering(packed, 0), reduction="none").float()
            worst_packed = max(worst_packed, float((losses - canonical[rows]).abs().max() / canonical.abs().max()))
            worst_rows = max(worst_rows, _packed_rows_difference(adapter, prompts))
    finally:
        fused_layer.FUSED_LAYERS.update(kept)
    if worst > 2e-2 or worst_packed > 2e-2 or worst_rows > 2e-2:
        raise AssertionError(f"fused and Hugging Face layers differ by {worst:.3g}, packed and padded rows by "
                             f"{worst_packed:.3g}, sequences over rows and masked rows by {worst_rows:.3g} "
                             "(relative to the largest value)")
    return (f"fused decoder layers against Hugging Face's: largest relative difference {worst:.2g} (bf16 losses, "
            f"grads); packed rows against padded: {worst_packed:.2g} (losses); a layer over packed rows as "
            f"variable-length sequences, and over rows they run on across, against its boolean mask: {worst_rows:.2g} "
            "(outputs)")


def check_routed_norm() -> str:
    """A routed RMSNorm (UnKE's per-edit layer copies: one weight per edit, rows run per edit) on the fused RMSNorm
    against the Hugging Face module's forward, both on CUDA in bf16: outputs and the gradients of the input and
    the stacked weights, per-run and gathered paths."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from editors.batching import RowRouting
    from editors.models import fused_layer

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), Qwen2RMSNorm(512, eps=1e-6)).to("cuda", torch.bfloat16)
    weights = (model[1].weight.detach().cpu() + 0.1 * torch.randn(3, 512, generator=gen)).to("cuda", torch.bfloat16)
    x = torch.randn(7, 40, 64, generator=gen).to("cuda", torch.bfloat16)
    results, kept = [], dict(fused_layer.FUSED_LAYERS)
    try:
        for on in (False, True):
            fused_layer.FUSED_LAYERS["cuda"] = on
            stacked = {"1.weight": weights.clone().requires_grad_()}
            inputs = x.clone().requires_grad_()
            routing = RowRouting(model, ["1.weight"])
            with routing.installed():
                routing.set_weights(stacked)
                routing.runs = [(0, 0, 2), (2, 2, 3), (0, 3, 5), (1, 5, 7)]
                out = model(inputs)
                routing.row_edit = torch.tensor([2, 0, 1, 1, 0, 2, 0], device="cuda")
                gathered = model(inputs)
            loss = out.float().pow(2).mean() + gathered.float().pow(2).mean()
            grads = torch.autograd.grad(loss, [inputs, stacked["1.weight"]])
            results.append([t.detach().float() for t in (out, gathered, *grads)])
    finally:
        fused_layer.FUSED_LAYERS.update(kept)
    worst = max(float((ours - hf).abs().max() / hf.abs().max().clamp(min=1e-12))
                for hf, ours in zip(*results))
    if worst > 2e-2:
        raise AssertionError(f"routed fused RMSNorm and the Hugging Face module differ by {worst:.3g}")
    return (f"routed RMSNorm, fused against the Hugging Face module: largest relative difference {worst:.2g} "
            "(bf16 outputs, input and weight gradients)")


def check_linear_runs() -> str:
    """Routed Linears over several runs written in place (``editors.batching.linear_runs``: FT-LLM's and UnKE's
    training steps, per-edit prefills) against the per-run path with its join (``linear_per_run``), on CUDA in bf16:
    outputs and the gradients of the input, the weights and the biases (the CPU's tests find the same bits)."""
    from editors.batching import linear_per_run, linear_runs, per_edit_views

    gen = torch.Generator().manual_seed(0)
    cases = [((6, 256, 512), [(0, 0, 2), (2, 2, 3), (1, 3, 6)]),  # training-like rows
             ((9, 5, 64), [(1, 0, 4), (0, 4, 5), (2, 5, 7), (1, 7, 9)])]  # runs of fewer than MIN_ROWS tokens
    equal, worst = 0, 0.0
    compared = 0
    for shape, runs in cases:
        for bias in (True, False):
            x = torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)
            weight = torch.randn(3, 384, shape[-1], generator=gen).to("cuda", torch.bfloat16)
            biases = torch.randn(3, 384, generator=gen).to("cuda", torch.bfloat16) if bias else None
            results = []
            for linear in (linear_per_run, linear_runs):
                stacked = {"weight": weight.clone().requires_grad_()}
                if biases is not None:
                    stacked["bias"] = biases.clone().requires_grad_()
                inputs = x.clone().requires_grad_()
                views = per_edit_views(stacked)
                out = linear(inputs, runs, views["weight"], views.get("bias"))
                grads = torch.autograd.grad(out.float().pow(2).mean(), [inputs, *stacked.values()])
                results.append([t.detach() for t in (out, *grads)])
            for reference, ours in zip(*results):
                compared += 1
                equal += bool(torch.equal(reference, ours))
                worst = max(worst, float((ours.float() - reference.float()).abs().max()
                                         / reference.float().abs().max().clamp(min=1e-12)))
    if worst > 2e-2:
        raise AssertionError(f"linear_runs and the per-run path differ by {worst:.3g}")
    return (f"routed Linear runs written in place against the per-run path and its join: {equal} of {compared} "
            f"tensors bit for bit, largest relative difference {worst:.2g} (bf16 outputs, input, weight and bias "
            "gradients)")


def two_packed_rows(hidden: torch.Tensor, lengths: Sequence[int], pad: int = 5
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Three left-padded sequences (``hidden`` ``[3, T, H]``, their ``lengths``) packed as ``adapter.packed_state``
    takes them: row 0 padding, sequence 0, sequence 1; row 1 padding, sequence 2 (at least ``pad`` padding columns
    in one row). Returns the rows' hidden states, segments and positions (host), and each sequence's (row, first
    column)."""
    width = max(lengths[0] + lengths[1], lengths[2]) + pad
    place = [(0, width - lengths[0] - lengths[1]), (0, width - lengths[1]), (1, width - lengths[2])]
    rows = hidden.new_zeros(2, width, hidden.shape[-1])
    segments = torch.full((2, width), -1)
    positions = torch.zeros(2, width, dtype=torch.long)
    for i, (n, (row, column)) in enumerate(zip(lengths, place)):
        rows[row, column:column + n] = hidden[i, -n:]
        segments[row, column:column + n] = i
        positions[row, column:column + n] = torch.arange(n)
    return rows, segments, positions, place


def stream_rows(hidden: torch.Tensor, lengths: Sequence[int], short: int = 3
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Left-padded sequences (``hidden`` ``[S, T, H]``, their ``lengths``) back to back over rows ``short`` columns
    narrower than the shortest, so every sequence goes on from one row to the next (UnKE's stage-2 layout on CUDA),
    padding after the last. Returns the rows' hidden states, segments and positions (host), and each sequence's
    first column in the rows read as one stream."""
    width = max(1, min(lengths) - short)
    rows = -(-sum(lengths) // width)
    flat = hidden.new_zeros(rows * width, hidden.shape[-1])
    numbers = torch.full((rows * width,), -1)
    columns = torch.zeros(rows * width, dtype=torch.long)
    starts, at = [], 0
    for i, n in enumerate(lengths):
        flat[at:at + n], numbers[at:at + n], columns[at:at + n] = hidden[i, -n:], i, torch.arange(n)
        starts.append(at)
        at += n
    return flat.view(rows, width, -1), numbers.view(rows, width), columns.view(rows, width), starts


def _packed_rows_difference(adapter: Any, prompts: Sequence[Any]) -> float:
    """UnKE's stage-2 rows (``adapter.packed_state``: several sequences per row, left padding): layer 0's outputs
    over the valid columns with the variable-length kernel over the rows against the boolean mask's."""
    from editors.models import buckets

    batch = adapter.prepare(list(prompts))
    state = adapter.hidden_entering(batch, 0)
    lengths = batch.attention_mask.sum(-1).tolist()
    hidden, segments, positions, place = two_packed_rows(state.hidden, lengths)
    # the same sequences back to back over rows narrower than each (the stream layout of UnKE's stage 2 on CUDA)
    stream, numbers, columns, starts = stream_rows(state.hidden, lengths)
    outputs = []
    kept = dict(buckets.PACK_SEQUENCES)
    try:
        for on in (False, True):
            buckets.PACK_SEQUENCES["cuda"] = on
            with torch.no_grad():
                outputs.append(adapter.run_layers(adapter.packed_state(0, hidden, segments, positions)).float())
                if on:
                    streamed = adapter.run_layers(adapter.packed_state(0, stream, numbers, columns)).float()
    finally:
        buckets.PACK_SEQUENCES.update(kept)
    valid = (segments >= 0).to(hidden.device)
    masked, varlen = outputs[0][valid], outputs[1][valid]
    worst = float((varlen - masked).abs().max() / masked.abs().max())
    # each sequence's outputs over the stream rows against its outputs under the mask
    streamed = streamed.reshape(-1, streamed.shape[-1])
    for n, at, (row, first) in zip(lengths, starts, place):
        reference = outputs[0][row, first:first + n]
        worst = max(worst, float((streamed[at:at + n] - reference).abs().max() / reference.abs().max()))
    return worst


def check_whisper_transcripts() -> str:
    """Transcripts decoded with the captured step (``editors.models.generation.transcripts``) against
    ``whisper.generate`` on the GPU and against the same engine uncaptured on the CPU (tiny fp32 Whisper with the
    releases' generation rules: language detection, suppressed tokens, early ends)."""
    from transformers.modeling_outputs import BaseModelOutput

    from editors.models.generation.transcripts import STATS, transcribe
    from editors.models.tiny import tiny_whisper

    whisper = tiny_whisper(0, release_rules=True, eos_scale=3.0)
    encoded = torch.randn(12, 24, 32, generator=torch.Generator().manual_seed(1))
    on_cpu = transcribe(whisper, encoded, 24)
    whisper.to("cuda")
    captures = STATS["captures"]
    captured = transcribe(whisper, encoded.cuda(), 24).cpu()
    if STATS["captures"] != captures + 1:
        raise AssertionError("the decode step was not captured")
    generated = whisper.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.cuda()),
                                 max_new_tokens=24).cpu()
    width = max(captured.shape[1], generated.shape[1], on_cpu.shape[1])
    rows = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (captured, generated, on_cpu)]
    if not (torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])):
        same = [int((rows[0] == r).all(1).sum()) for r in rows[1:]]
        raise AssertionError(f"identical transcripts of 12: generate {same[0]}, CPU {same[1]}")
    ended = int((captured == 0).any(1).sum())
    return f"12 of 12 transcripts equal generate's and the CPU's, token for token ({ended} ended early)"


_SHARED_POOL_PROBE = """
import torch
x = torch.zeros(1024, device="cuda")
pool = torch.cuda.graph_pool_handle()

def capture():
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()):
        graph.capture_begin(pool=pool)
        x.copy_(x * 2 + 1)  # a temporary in the pool
        graph.capture_end()
    return graph

first = capture()
del first  # the pool's last graph: freeable, not yet freed
try:
    capture()
    print("no assert")
except RuntimeError as error:
    print("assert" if "use_count" in str(error) else f"other: {error}")
"""


def check_dropped_shapes() -> str:
    """The graph engine drops a shape in the middle of a call (here every shape: nothing kept) and captures the next
    in a pool of its own: a capture into a shared pool whose last graph was freed fails an assert of PyTorch's
    allocator (shown in a subprocess), which a sequential IE-IKE run met on an H100."""
    import subprocess

    from editors.models.base import Prompt
    from editors.models.generation import graph
    from editors.models.qwen2_audio import Qwen2AudioAdapter

    probe = subprocess.run([sys.executable, "-c", _SHARED_POOL_PROBE], capture_output=True, text=True, timeout=120)
    shared = (probe.stdout.strip().splitlines() or [probe.stderr.strip()[-200:]])[-1]
    adapter = Qwen2AudioAdapter.tiny(0, device="cuda")
    prompts = [Prompt("Which emotion? " * (1 + 60 * (j % 2))) for j in range(4)]  # two width buckets
    settings = adapter.generation_settings(6)
    eager = adapter.generate(prompts, settings=settings.replace(engine="eager"))
    saved, captures = graph.KEEP_FRACTION, graph.STATS["captures"]
    graph.KEEP_FRACTION = 0.0  # every shape dropped after its last chunk
    try:
        outputs = adapter.generate(prompts, settings=settings.replace(engine="graph"))
    finally:
        graph.KEEP_FRACTION = saved
    shapes = graph.STATS["captures"] - captures
    if shapes < 2:
        raise AssertionError(f"{shapes} shape(s) captured; the check needs two in one call")
    same = sum(a == b for a, b in zip(outputs, eager))
    return (f"{shapes} shapes captured in one call, each dropped after its chunks; {same} of {len(prompts)} rows equal "
            f"the eager engine's; a capture into a shared pool after its last graph was freed: {shared}")


CHECKS: dict[str, Callable[[], str]] = {"fused_adam": check_fused_adam,
                                        "fused_layer": check_fused_layer,
                                        "routed_norm": check_routed_norm,
                                        "linear_runs": check_linear_runs,
                                        "early_stop_on_device": check_early_stop_on_device,
                                        "attention_lse": check_attention_lse,
                                        "split_prefix_engine": check_split_prefix_engine,
                                        "training_step_syncs": check_training_step_syncs,
                                        "whisper_transcripts": check_whisper_transcripts,
                                        "dropped_shapes": check_dropped_shapes}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated: " + ", ".join(CHECKS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_checks: no CUDA device; nothing checked")
        return 0
    failed = 0
    for name in [c.strip() for c in args.checks.split(",") if c.strip()]:
        try:
            print(f"cuda check {name}: ok: {CHECKS[name]()}")
        except Exception as exc:  # noqa: BLE001 - reported, the bench goes on
            failed += 1
            print(f"cuda check {name}: FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
