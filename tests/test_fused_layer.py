"""The decoder layer's forward in fewer kernels (editors/models/fused_layer.py): the Hugging Face layer's function."""

from __future__ import annotations

import pytest
import torch

from _editor_helpers import synthetic_audio
from editors.models import fused_layer, load_adapter
from editors.models.base import Prompt
from editors.models.buckets import training_groups

FAMILIES = ["tiny-qwen2-audio", "tiny-audio-flamingo3", "tiny-desta25"]


def _prompts() -> tuple[list[Prompt], list[str]]:
    long = Prompt("Which of these is right? " + " ".join(f"({i}) the answer number {i}" for i in range(40)))
    return ([Prompt("What is the emotion of the speaker? (a) happy (b) sad", audio=synthetic_audio(1, 1.0)),
             Prompt("What orbits the Earth?"), long], ["sad", "Mars and the moon", "the answer number 7"])


def _losses_and_gradients(adapter, batch, dtype):
    """Per-row losses and the gradient of their sum for a residual at each row's last prompt token, over the whole
    width and over a tail state (frozen columns), plus the hidden states entering layer 1."""
    from editors.unke import last_prompt_positions

    full = adapter.hidden_entering(batch, 1)
    pos = last_prompt_positions(batch)
    tail = adapter.tail_state(full, int(pos.min()))
    delta = torch.randn(batch.batch_size, full.hidden.shape[-1], generator=torch.Generator().manual_seed(0),
                        dtype=dtype).requires_grad_(True)
    out = [full.hidden]
    for state in (full, tail):
        onehot = torch.zeros(state.hidden.shape[:2], dtype=dtype)
        onehot[torch.arange(batch.batch_size), pos - state.first_column] = 1.0
        loss = adapter.loss_from(state, state.hidden + onehot[..., None] * delta[:, None, :], reduction="none")
        out += [loss, *torch.autograd.grad(loss.sum(), [delta])]
    return out, tail.first_column


@pytest.mark.parametrize("family,dtype", [(f, torch.float32) for f in FAMILIES] + [("tiny-desta25", torch.bfloat16)])
def test_the_fused_forward_gives_the_hf_layers_losses_and_gradients_bit_for_bit(family, dtype, monkeypatch):
    """Whole width and tail state, padded rows and grouped-query attention (the tiny models have 4 query heads and 2
    key/value heads): the same bits as the Hugging Face forward on the CPU, in fp32 and bf16."""
    adapter = load_adapter(family, seed=0, dtype=dtype)
    calls = []
    original = fused_layer.layer_forward
    monkeypatch.setattr("editors.models.adapter.layer_forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    cut = []
    for _, batch in training_groups(adapter, *_prompts()):
        monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", False)
        before = len(calls)
        theirs, _ = _losses_and_gradients(adapter, batch, dtype)
        assert len(calls) == before
        monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", True)
        ours, first = _losses_and_gradients(adapter, batch, dtype)
        cut.append(first)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert calls and max(cut) > 0  # the fused forward ran, and over a tail state's frozen columns too


def test_hooked_and_routed_modules_run_their_own_forward(monkeypatch):
    """A forward hook on a layer or its attention module keeps the layer's own forward (the hook fires); a hooked
    norm runs inside the fused forward as its module (the hook fires), and a layer whose every parameter is a
    routed per-edit copy (UnKE's stage 2) runs inside it with the routed weights (its norms by the fused RMSNorm
    with each edit's weight): the bits are the Hugging Face layer's."""
    from editors.batching import RowRouting

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    layer = adapter.llm_layer(2)
    assert fused_layer.supports(layer, "full_attention")
    assert not fused_layer.supports(layer, "sliding_attention")
    [(_, batch)] = training_groups(adapter, [Prompt("What orbits the Earth?")], ["the moon"])

    def loss(fused: bool) -> torch.Tensor:
        monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", fused)
        return adapter.loss_from(adapter.hidden_entering(batch, 1))

    for module, supported in ((layer, False), (layer.self_attn, False), (layer.post_attention_layernorm, True)):
        seen = []
        handle = module.register_forward_hook(lambda *_: seen.append(1))
        try:
            assert fused_layer.supports(layer, "full_attention") == supported
            loss(True)
        finally:
            handle.remove()
        assert seen == [1]

    names = [n for n, _ in adapter.model.named_parameters() if ".layers.2." in n]
    routing = RowRouting(adapter.model, names)
    params = dict(adapter.model.named_parameters())
    plain = loss(True)
    routing.set_weights({n: torch.stack([params[n].detach() * 1.5]) for n in names})
    routing.runs = [(0, 0, batch.batch_size)]
    with routing.installed():
        assert fused_layer.supports(adapter.llm_layer(2), "full_attention")
        routed = loss(True)
        assert torch.equal(routed, loss(False))
    assert not torch.equal(routed, plain)


def test_the_cpu_default_is_the_hf_forward(monkeypatch):
    """On the CPU the layers run their own forward unless :data:`FUSED_LAYERS` says otherwise, so the tiny models'
    outputs that the tests and the demo pin do not pass through the fused forward."""
    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    monkeypatch.setattr("editors.models.adapter.layer_forward", lambda *a, **k: pytest.fail("fused forward on CPU"))
    [(_, batch)] = training_groups(adapter, [Prompt("What orbits the Earth?")], ["the moon"])
    assert torch.isfinite(adapter.loss_from(adapter.hidden_entering(batch, 0)))
    assert fused_layer.fused_layers_on("cuda") and not fused_layer.fused_layers_on("cpu")


def _packing_on(monkeypatch) -> None:
    """What CUDA does, on the CPU: fused layers and packed training rows."""
    from editors.models import buckets

    monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", True)
    monkeypatch.setitem(buckets.PACK_SEQUENCES, "cpu", True)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_packed_row_gives_each_prompts_loss_and_gradient_as_its_padded_row(family, monkeypatch):
    """Prompts back to back in one row, each attending within itself (the dense block mask of the CPU stands for
    CUDA's variable-length kernel): every prompt's target loss and the gradient of its connector outputs are those
    of its padded row, to rounding, and the target positions count per prompt as there."""
    adapter = load_adapter(family, seed=0)
    prompts, targets = _prompts()
    prompts += [Prompt("Which sound is this?", audio=synthetic_audio(4, 0.7))]
    targets += ["a dog barking"]

    def losses_and_grads(groups):
        losses = torch.zeros(len(prompts))
        grads = {}
        for rows, batch in groups:
            state = adapter.hidden_entering(batch, 0)
            if not batch.audio_states:
                losses[rows] = adapter.loss_from(state, reduction="none")
                continue
            audio = adapter.project_audio(batch.audio_states).detach().requires_grad_(True)
            loss = adapter.loss_from(state, adapter.input_embeds(batch, audio), reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), [audio])
            losses[rows] = loss.detach()
            with_audio = [r for r in rows if prompts[r].audios()]
            for r, g in zip(with_audio, grad.split([adapter.num_audio_tokens(prompts[r].audios()[0])
                                                    for r in with_audio])):
                grads[r] = g
        return losses, grads

    padded = losses_and_grads(training_groups(adapter, prompts, targets))
    counts = {r: int(b.target_counts[rows.index(r)]) for rows, b in training_groups(adapter, prompts, targets)
              for r in rows}
    _packing_on(monkeypatch)
    assert adapter.packs_sequences()
    [(rows, batch)] = training_groups(adapter, prompts, targets, packable=True)
    assert rows == list(range(len(prompts))) and batch.batch_size == 1 and batch.items == len(prompts)
    assert batch.sequences is not None and sum(batch.sequences.lengths) == batch.input_ids.shape[1]
    # the chat template's first tokens computed once: every prompt's row attends to the one copy
    assert batch.sequences.shared_prefix > 0 and batch.sequences.prompts == len(prompts)
    assert batch.target_counts.tolist() == [counts[r] for r in rows]
    packed = losses_and_grads([(rows, batch)])
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    assert padded[1].keys() == packed[1].keys() and padded[1]
    for r in padded[1]:
        torch.testing.assert_close(packed[1][r], padded[1][r], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["tiny-qwen2-audio", "tiny-desta25"])
def test_ft_audio_trains_on_a_packed_row_what_it_trains_on_padded_rows(family, monkeypatch):
    """FT-Audio's K edits on one packed row (CUDA's layout, run on the CPU) take the steps and reach the losses of the
    padded width groups, to rounding; their connector copies differ by at most what Adam's normalised steps can make
    of rounding (an element whose gradient is near zero may step either way: at most 2 x lr per step)."""
    import sys

    sys.path.insert(0, "tests")
    from _methods_helpers import context, edit_request, hparams, tiny_adapter
    from editors.ft_audio import FTAudio

    adapter = tiny_adapter(family)
    edits = [edit_request(target=t, audio_seed=s) for t, s in (("sad", 1), ("happy birthday to you", 2), ("dog", 3))]
    results = []
    for packed in (False, True):
        if packed:
            _packing_on(monkeypatch)
        editor = FTAudio(adapter, hparams("ft_audio", adapter, max_steps=6), context())
        bound = 2 * editor.hparams.lr * 6
        stats = editor.apply_many(edits)
        results.append((stats, {n: t.detach().clone() for n, t in editor._copies.current().items()}))
    (padded, copies_padded), (packed, copies_packed) = results
    assert [s["steps"] for s in packed] == [s["steps"] for s in padded] == [6, 6, 6]
    for a, b in zip(packed, padded):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    for n in copies_padded:
        assert float((copies_packed[n].float() - copies_padded[n].float()).abs().max()) <= bound


def test_packing_needs_every_layer_fused(monkeypatch):
    """An adapter packs training rows only where every layer runs the fused forward: not with the fused forward
    off, nor with a hooked layer (a packed row cannot run through the Hugging Face layer)."""
    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    assert not adapter.packs_sequences()  # the CPU's defaults
    _packing_on(monkeypatch)
    assert adapter.packs_sequences()
    [(_, packed)] = training_groups(adapter, [Prompt("What orbits the Earth?")], ["the moon"], packable=True)
    handle = adapter.llm_layer(0).self_attn.register_forward_pre_hook(lambda *_: None)
    try:
        with pytest.raises(RuntimeError, match="layer 0 cannot run a packed row"):
            adapter.loss_from(adapter.hidden_entering(packed, 0))
        assert not adapter.packs_sequences()
        [(rows, batch)] = training_groups(adapter, [Prompt("What orbits the Earth?")], ["the moon"], packable=True)
        assert batch.sequences is None
    finally:
        handle.remove()
    monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", False)
    assert not adapter.packs_sequences()


@pytest.mark.parametrize("api", ["2.11", "2.13"])
def test_packed_attention_calls_each_torchs_variable_length_kernel_as_it_takes_its_arguments(api, monkeypatch):
    """torch 2.11's ``varlen_attn`` takes ``is_causal`` (no scale, no grouped-query flag: the key/value heads are
    repeated), 2.13's ``window_size``, ``scale`` and ``enable_gqa``: both give the dense mask's attention (a CPU
    stand-in for the flash kernel, checked against SDPA under the packed row's mask)."""
    from torch.nn.attention import varlen

    from editors.models.batch import PackedSequences

    def reference(q, k, v, starts, starts_k, max_q, max_k, scale=None, **kwargs):
        assert torch.equal(starts, starts_k) and max_q == max_k == 5
        groups = q.shape[1] // k.shape[1]
        assert groups == 1 or kwargs.get("enable_gqa")
        causal = kwargs.get("window_size") == (-1, 0) or kwargs.get("is_causal") is True
        assert causal
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.repeat_interleave(groups, 1).transpose(0, 1)[None],
            v.repeat_interleave(groups, 1).transpose(0, 1)[None], attn_mask=sequences.dense_mask(), scale=scale)
        return out[0].transpose(0, 1)

    if api == "2.11":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                             window_size=window_size, enable_gqa=enable_gqa)

    sequences = PackedSequences(starts=torch.tensor([0, 3, 8, 10], dtype=torch.int32), lengths=(3, 5, 2))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 10, 4, 8, generator=gen)
    k, v = (torch.randn(1, 10, 2, 8, generator=gen) for _ in range(2))
    dense = fused_layer.packed_attention(q, k, v, sequences, 8 ** -0.5)
    monkeypatch.setattr(varlen, "varlen_attn", fake)
    monkeypatch.setattr(fused_layer, "VARLEN_DEVICES", {"cpu"})
    torch.testing.assert_close(fused_layer.packed_attention(q, k, v, sequences, 8 ** -0.5), dense)
    if api == "2.11":  # no scale argument: only the kernel's own 1/sqrt(head_dim)
        with pytest.raises(ValueError, match="no scale argument"):
            fused_layer.packed_attention(q, k, v, sequences, 0.5)


def test_the_prefix_stream_copies_the_prefix_before_each_sequence_and_sums_its_gradients():
    """``prefix_stream`` lays out ``[prefix, sequence 1, prefix, sequence 2, ...]`` as a gather of the row columns
    would, and its backward gives each sequence column its own gradient (bit for bit) and the prefix the sum of its
    copies' (in a fixed order: the same bits on every call); ``from_stream`` reads the prefix from its first copy."""
    from editors.models.batch import PackedSequences

    lengths = [3, 4, 1, 2]
    sequences = PackedSequences.of(lengths, "cpu", shared_prefix=3)
    starts = [0, 3, 7, 8, 10]
    gather = torch.cat([torch.cat([torch.arange(3), torch.arange(starts[i], starts[i + 1])]) for i in (1, 2, 3)])
    back = torch.tensor([0, 1, 2, 3, 4, 5, 6, 10, 14, 15])  # the row columns' places in the stream (first copy)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(10, 2, 4, generator=gen).to(dtype).requires_grad_()
        upstream = torch.randn(gather.numel(), 2, 4, generator=gen).to(dtype)
        stream = fused_layer.prefix_stream(x, sequences)
        assert torch.equal(stream, x.index_select(0, gather))
        (ours,) = torch.autograd.grad((stream * upstream).sum(), [x])
        (again,) = torch.autograd.grad((fused_layer.prefix_stream(x, sequences) * upstream).sum(), [x])
        (reference,) = torch.autograd.grad((x.index_select(0, gather) * upstream).sum(), [x])
        assert torch.equal(ours, again) and torch.equal(ours[3:], reference[3:])
        torch.testing.assert_close(ours[:3].double(), upstream.double()[sequences.prefix_in_stream].view(3, 3, 2, 4)
                                   .sum(0), rtol=1e-2 if dtype == torch.bfloat16 else 1e-12, atol=1e-2)
        y = torch.randn(gather.numel(), 2, 4, generator=gen).to(dtype).requires_grad_()
        rows = fused_layer.from_stream(y, sequences)
        assert torch.equal(rows, y.index_select(0, back))
        assert torch.equal(torch.autograd.grad(rows.sum(), [y])[0],
                           torch.autograd.grad(y.index_select(0, back).sum(), [y])[0])
    with pytest.raises(ValueError, match="share no prefix"):
        fused_layer.prefix_stream(x, PackedSequences.of(lengths, "cpu"))


@pytest.mark.parametrize("layout", ["shared prefix", "over rows"])
def test_the_variable_length_streams_attend_as_the_dense_mask(layout, monkeypatch):
    """The streams ``packed_attention`` hands the variable-length kernel (a shared prefix copied before each later
    sequence; several rows read as one stream) give the dense mask's attention, with a CPU stand-in for the kernel
    that attends causally within each ``cu_seq`` block and nowhere else."""
    from torch.nn.attention import varlen

    from editors.models.batch import PackedSequences

    def blocks(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False):
        assert torch.equal(cu_seq_q, cu_seq_k) and window_size == (-1, 0)
        cuts = cu_seq_q.tolist()
        assert cuts[-1] == query.shape[0] and max_q == max(b - a for a, b in zip(cuts, cuts[1:]))
        outs = []
        for a, b in zip(cuts, cuts[1:]):
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1), is_causal=True,
                scale=scale).transpose(0, 1))
        return torch.cat(outs)

    if layout == "shared prefix":  # a 3-column prefix, then sequences of 4, 1 and 2 columns
        sequences, shape = PackedSequences.of([3, 4, 1, 2], "cpu", shared_prefix=3), (1, 10)
        assert sequences.longest == 7 and sequences.prompts == 3
    else:
        segments = torch.tensor([[-1, -1, 0, 0, 0], [0, 0, 1, 1, 1], [-1, 0, 0, 0, 0]])
        sequences, shape = PackedSequences.over_rows(segments, "cpu"), (3, 5)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    dense = fused_layer.packed_attention(q, k, v, sequences, 8 ** -0.5)
    monkeypatch.setattr(varlen, "varlen_attn", blocks)
    monkeypatch.setattr(fused_layer, "_varlen_arguments", lambda kernel: frozenset(
        ("window_size", "scale", "enable_gqa")))
    monkeypatch.setattr(fused_layer, "VARLEN_DEVICES", {"cpu"})
    streamed = fused_layer.packed_attention(q, k, v, sequences, 8 ** -0.5)
    torch.testing.assert_close(streamed, dense)
    weights = torch.randn(streamed.shape, generator=gen)
    for a, b in zip(torch.autograd.grad((streamed * weights).sum(), [q, k, v]),
                    torch.autograd.grad((dense * weights).sum(), [q, k, v])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_graph_engine_generates_the_same_tokens_with_the_fused_norm_and_rotary(family, monkeypatch):
    """The graph engine's own layer loop (prefill and decode) with RMSNorm in one kernel and the rotary products over
    contiguous tables: the same greedy tokens as with the Hugging Face modules' (the CPU's bits are the same)."""
    from editors.models.generation import graph

    adapter = load_adapter(family, seed=0)
    prompts = [Prompt("What is the emotion of the speaker? (a) happy (b) sad", audio=synthetic_audio(s, 0.5 + 0.4 * s))
               for s in range(3)] + [Prompt("What orbits the Earth?", system="Answer briefly.")]
    settings = adapter.generation_settings(8, engine="graph")
    outputs = []
    for fused in (False, True):
        monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", fused)
        graph.release(adapter)  # the engine's kept states hold the layer loop built under the other setting
        seen: list[list[int]] = []
        decode = adapter.tokenizer.batch_decode
        monkeypatch.setattr(adapter.tokenizer, "batch_decode",
                            lambda ids, _decode=decode, **kw: seen.extend(ids.tolist()) or _decode(ids, **kw))
        outputs.append((adapter.generate(prompts, settings=settings), seen))
        monkeypatch.undo()
    graph.release(adapter)
    assert outputs[0] == outputs[1] and outputs[0][1]
