"""Several single edits per pass (editors/batching.py, apply_many, --edits-per-pass): same outputs and parameter
updates as one edit at a time, per-edit early stop, same runner rows."""

from __future__ import annotations

import pytest
import torch

from _editor_helpers import changed_tensors, count_host_reads, run_config, state_copy, synthetic_audio
from editors.base import EditRequest, finetune
from editors.registry import get_editor_class
from editors.batching import StackedCopies, finetune_many
from editors.models.batch import StopFlags
from editors.registry import load_hparams
from editors.models import load_adapter
from editors.models.base import Prompt
from editors.predictions import read_predictions
from editors.run import Runner
from editors.session import EditSession

QUESTIONS = ["What is the emotion of the speaker? (a) happy (b) sad (c) angry",
             "Which animal makes this sound? (a) dog (b) cat (c) cow",
             "What is the gender of the speaker? (a) male (b) female"]
TARGETS = ["sad", "cow", "female"]


def make_edits() -> list[EditRequest]:
    return [EditRequest(instance_id=f"x/test/{i:06d}", attribute="emotion", original_label="happy",
                        target_label=t, question=q, options=[], target=t, audio=synthetic_audio(10 + i, 0.6 + 0.3 * i))
            for i, (q, t) in enumerate(zip(QUESTIONS, TARGETS))]


def eval_prompts(edit: EditRequest) -> list[Prompt]:
    return [edit.prompt(), Prompt("Which animal is this? (a) dog (b) cat", audio=synthetic_audio(3, 0.8)),
            Prompt("What is the capital of France? (a) Paris (b) Rome")]


@pytest.fixture(scope="module")
def qwen():
    return load_adapter("tiny-qwen2-audio", seed=0)


@pytest.fixture(scope="module")
def qwen64():
    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    adapter.model.to(torch.float64)
    return adapter


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def single_then_batched(adapter, method, overrides):
    """(single outputs, single parameter deltas, single stats, batched outputs, batched deltas, batched stats)."""
    editor = get_editor_class(method)(adapter, load_hparams(method, adapter.family, tiny=True, overrides=overrides))
    names = editor.touched_parameters()
    params = dict(adapter.model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    session = EditSession(editor)
    edits = make_edits()
    single_out, single_delta, single_stats = [], [], []
    for edit in edits:
        with session.edit(edit) as one:
            single_stats.append(one)
            single_delta.append({n: params[n].detach() - before[n] for n in names})
            single_out.append(adapter.generate(eval_prompts(edit), max_new_tokens=6))
    with session.edits(edits) as stats:
        assert changed_tensors(adapter.model, before) == []  # the model's own parameters are left unchanged
        outputs = editor.generate_many([eval_prompts(e) for e in edits], max_new_tokens=6)
        deltas = [{n: t.to(before[n].dtype) - before[n] for n, t in editor._copies.edit(k).items()}
                  for k in range(len(edits))]
    return single_out, single_delta, single_stats, outputs, deltas, stats


CASES = [("ft_audio", {"max_steps": 12}), ("ft_llm", {"max_steps": 10}),
         ("ft_llm", {"max_steps": 6, "params": "mlp_out"})]


@pytest.mark.parametrize("method,overrides", CASES)
def test_batched_edits_give_the_same_outputs_as_one_at_a_time(qwen, method, overrides):
    single_out, _, single_stats, outputs, _, stats = single_then_batched(qwen, method, overrides)
    assert outputs == single_out
    assert [s["steps"] for s in stats] == [s["steps"] for s in single_stats]
    assert any(s["steps"] > 0 for s in stats) and any(single_out[k][0] != single_out[0][0] for k in (1, 2))


@pytest.mark.parametrize("method,overrides", CASES)
def test_batched_parameter_updates_equal_one_at_a_time(qwen64, method, overrides):
    # float64: the math is exact; in fp32 a batch of 3 rounds its matmuls differently from a batch of 1 (~1e-7),
    # which Adam at the tiny models' lr (1e-2) grows to ~1e-3 relative over 12 steps (greedy outputs unchanged).
    _, single_delta, single_stats, _, deltas, stats = single_then_batched(qwen64, method, overrides)
    assert [s["steps"] for s in stats] == [s["steps"] for s in single_stats]
    for k, (delta, ref) in enumerate(zip(deltas, single_delta)):
        for n in ref:
            assert float(ref[n].norm()) > 0 and relative(delta[n], ref[n]) < 1e-5, (k, n)


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_hypernetwork_edits_batched_equal_one_at_a_time(qwen, method):
    """KE / MEND: each edit's matrices come from the unedited model (the same bits as one edit applied alone),
    kept per edit; every row generates with its own edit's matrices."""
    from _methods_helpers import trained_network

    hp = load_hparams(method, qwen.family, tiny=True, overrides={"hypernetwork_path": str(trained_network(method))})
    editor = get_editor_class(method)(qwen, hp)
    session = EditSession(editor)
    params = dict(qwen.model.named_parameters())
    names = editor.touched_parameters()
    before = state_copy(qwen.model)
    edits = make_edits()
    unedited = [qwen.generate(eval_prompts(e), max_new_tokens=6) for e in edits]
    single_out, single_weights, single_stats = [], [], []
    for edit in edits:
        with session.edit(edit) as one:
            single_stats.append(one)
            single_weights.append({n: params[n].detach().clone() for n in names})
            single_out.append(qwen.generate(eval_prompts(edit), max_new_tokens=6))
    with session.edits(edits) as stats:
        assert changed_tensors(qwen.model, before) == []
        outputs = editor.generate_many([eval_prompts(e) for e in edits], max_new_tokens=6)
        for k, ref in enumerate(single_weights):
            assert all(torch.equal(editor._copies[n][k], ref[n]) for n in names), k
    assert changed_tensors(qwen.model, before) == [] and editor._copies is None
    assert stats == single_stats
    assert outputs == single_out
    # the edits change outputs, differently per edit: rows routed to another edit's matrices would differ
    assert single_out != unedited
    assert any(single_weights[0][n].ne(single_weights[1][n]).any() for n in names)


def test_i_ike_batched_prompts_equal_one_at_a_time(qwen):
    editor = get_editor_class("i_ike")(qwen, load_hparams("i_ike", qwen.family, tiny=True))
    edits = make_edits()
    single = []
    for edit in edits:
        editor.apply(edit)
        single.append(editor.rewrite_prompts(eval_prompts(edit), edit))
        editor.reset()
    editor.apply_many(edits)
    batched = [editor.rewrite_prompts(eval_prompts(e), e) for e in edits]
    assert [[p.digest() for p in ps] for ps in batched] == [[p.digest() for p in ps] for ps in single]
    assert editor.generate_many(batched, max_new_tokens=5) == [qwen.generate(ps, max_new_tokens=5) for ps in single]
    editor.reset()
    assert not editor.independent and not editor.active


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop"])
def test_the_in_place_update_of_all_active_edits_gives_the_masked_updates_bits(optimizer):
    from editors.batching import masked_update

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 5, 7, generator=gen)
    grads = [torch.randn(3, 5, 7, generator=gen) for _ in range(4)]
    results = []
    for all_active in (False, True):
        p, state = start.clone(), [{}]
        for step, g in enumerate(grads, start=1):
            masked_update([p], [g], state, torch.ones(3, dtype=torch.bool), step, optimizer=optimizer, lr=0.1,
                          weight_decay=0.01, all_active=all_active)
        results.append((p, state[0]))
    (p0, s0), (p1, s1) = results
    assert not torch.equal(p0, start) and torch.equal(p0, p1)
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


@pytest.mark.parametrize("optimizer,moments", [("adam", 2), ("rmsprop", 1), ("sgd", 0)])
def test_optimizer_state_is_made_at_the_first_step_only(optimizer, moments, monkeypatch):
    """The stacked copies' optimizer state is zeroed once, at the first update: later steps make no new tensor the
    size of the copies (a zeroed copy per moment and step wrote as many bytes as the moments themselves)."""
    from editors import batching

    made = []
    real = torch.zeros_like
    monkeypatch.setattr(batching.torch, "zeros_like", lambda t, **kw: made.append(t.shape) or real(t, **kw))
    p, g, state = torch.randn(3, 4, 5), torch.randn(3, 4, 5), [{}]
    for step in range(1, 5):
        batching.masked_update([p], [g], state, torch.ones(3, dtype=torch.bool), step, optimizer=optimizer, lr=0.1,
                               weight_decay=0.0, all_active=True)
    assert made == [p.shape] * moments and len(state[0]) == moments


def test_fused_adam_steps_of_stacked_edits_equal_one_fused_optimizer_per_edit(monkeypatch):
    """On CUDA both loops take torch's fused Adam kernel (forced here on the CPU, where torch has it too): K edits'
    masked steps give each edit the bits of its own ``torch.optim.Adam(fused=True)``, a frozen edit keeps its
    values and state, and weight decay is applied inside the kernel as the optimizer does."""
    import editors.batching as batching
    from bench.cuda_checks import fused_adam_runs  # the same runs the lent GPU checks (bench/cuda_checks.py)

    monkeypatch.setattr(batching, "fused_adam", lambda optimizer, tensor: optimizer == "adam")
    runs = fused_adam_runs("cpu")
    start, grads, active = runs.start, runs.grads, runs.active
    for k in range(3):
        assert torch.equal(runs.stacked[k], runs.alone[k]), k
        assert torch.equal(runs.state["exp_avg"][k], runs.alone_exp_avg[k])
    # the formulas (the CPU's path) are another rounding of the same step
    plain, plain_state = start.clone(), [{}]
    monkeypatch.setattr(batching, "fused_adam", lambda optimizer, tensor: False)
    for step, g in enumerate(grads[:1], start=1):
        batching.masked_update([plain], [g], plain_state, active[0], step, optimizer="adam", lr=0.1,
                               weight_decay=0.01, all_active=True)
    decayed = grads[0] + 0.01 * start  # Adam's first step: lr * g / (|g| + eps)
    assert torch.allclose(plain, start - 0.1 * decayed / (decayed.abs() + 1e-8), atol=1e-6)


def _backward_nodes(tensor: torch.Tensor) -> list[tuple[str, tuple[int, ...] | None]]:
    """(node type, the sizes of the tensor it slices or selects from, where it saves them) of a backward graph."""
    seen, stack, nodes = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        nodes.append((type(node).__name__, None if sizes is None else tuple(int(n) for n in sizes)))
        stack.extend(fn for fn, _ in node.next_functions)
    return nodes


def test_routed_rows_read_each_edit_through_one_view_per_step_with_the_gradient_of_indexing_the_stack():
    # Indexing the [K, ...] stack per run (stack[k]) has a backward that writes a whole zero stack per use; the routed
    # leaves read the K views of one unbind instead. Same outputs, same gradient bits. Likewise the rows of a run are
    # a split of the input, not a slice x[a:b] (whose backward writes a zero gradient of all of x per run).
    from editors.batching import RowRouting

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(7, 3, 6, generator=gen, requires_grad=True)
    runs = [(0, 0, 2), (2, 2, 3), (0, 3, 5), (1, 5, 7)]  # edit 0's rows in two runs
    results = []
    for views in (True, False):
        stacked = {n: (p.detach() + 0.1 * torch.randn(3, *p.shape, generator=torch.Generator().manual_seed(1)))
                   .requires_grad_() for n, p in model.named_parameters()}
        routing = RowRouting(model, names)
        with routing.installed():
            routing.set_weights(stacked)
            routing.runs = runs
            if not views:  # the per-use indexing of the stack, as a reference
                routing.views = dict(stacked)  # type: ignore[assignment]
            out = model(x)
        loss = out.float().pow(2).sum()
        results.append((out, _backward_nodes(loss), torch.autograd.grad(loss, list(stacked.values()))))
    (out, nodes, grads), (ref_out, ref_nodes, ref_grads) = results
    kinds, ref_kinds = [kind for kind, _ in nodes], [kind for kind, _ in ref_nodes]
    assert kinds.count("UnbindBackward0") == len(names) and "SelectBackward0" not in kinds
    assert "SelectBackward0" in ref_kinds
    assert not [sizes for kind, sizes in nodes if kind == "SliceBackward0" and sizes and sizes[0] == x.shape[0]]
    assert torch.equal(out, ref_out)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads)) and all(g.abs().sum() > 0 for g in grads)


def test_a_steps_copies_send_their_gradients_to_the_fp32_masters_without_stacking_them():
    """A step's K copies in the model's dtype are cast and split in one autograd step (``CopyValues.per_edit``, what
    ``per_edit_views`` gives a forward), whose backward copies each copy's gradient into its slice of the fp32
    master's: the bits of ``master.to(dtype).unbind(0)``, whose backward stacks the K gradients and then casts the
    stack, without the stack. A copy no row read gets zeros."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from editors.batching import per_edit_views

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 4, generator=gen).bfloat16(), "b": torch.randn(5, generator=gen).bfloat16()}
    x = torch.randn(6, 4, generator=gen).bfloat16()

    def loss(views):  # edits 0 and 2 read their copies, edit 1 does not
        return sum((x @ views["w"][k].t() + views["b"][k]).float().square().sum() * (k + 1) for k in (0, 2))

    grads, ops = {}, {}
    for path in ("copies", "reference"):
        copies = StackedCopies(params, 3)
        values = copies.current()
        assert all(torch.equal(values[n], m.to(torch.bfloat16)) for n, m in copies.masters.items())
        views = (per_edit_views(values) if path == "copies"
                 else {n: m.to(torch.bfloat16).unbind(0) for n, m in copies.masters.items()})
        total = loss(views)
        with Ops() as mode:
            grads[path] = torch.autograd.grad(total, list(copies.masters.values()))
        ops[path] = mode.names
    assert all(torch.equal(g, r) for g, r in zip(grads["copies"], grads["reference"]))
    assert all(g.dtype == torch.float32 and g[1].abs().sum() == 0 and g[0].abs().sum() > 0 and g[2].abs().sum() > 0
               for g in grads["copies"])
    assert "aten.stack.default" in ops["reference"]
    assert not [op for op in ops["copies"] if "stack" in op or "cat" in op]
    fp32 = StackedCopies({"w": params["w"].float()}, 2)  # the model's dtype is the masters': views of them
    assert [v.data_ptr() for v in fp32.current().per_edit()["w"]] == [m.data_ptr() for m in fp32.masters["w"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_routed_linear_runs_write_into_one_output_with_the_bits_of_a_linear_per_run_and_a_join(dtype, bias):
    """A routed Linear computes its runs into one output and their input gradients into one tensor (no join copied
    forward or backward), with the bits of the per-run path: a split, ``F.linear`` per run over at least MIN_ROWS
    rows (``padded_rows``: a run of fewer gets zero rows appended) and a ``cat``; outputs and the gradients of the
    input, the weights and the biases."""
    from editors.batching import linear_per_run, linear_runs, per_edit_views
    from editors.models.buckets import MIN_ROWS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, 24, generator=gen).to(dtype)  # rows of 5 tokens: a one-row run is under MIN_ROWS tokens
    runs = [(1, 0, 4), (0, 4, 5), (2, 5, 7), (1, 7, 9)]  # edit 1 in two runs; edit 0's run of 5 < MIN_ROWS tokens
    assert 5 < MIN_ROWS <= 4 * 5
    weight = torch.randn(3, 40, 24, generator=gen).to(dtype)
    biases = torch.randn(3, 40, generator=gen).to(dtype) if bias else None
    results = []
    for linear in (linear_per_run, linear_runs):
        stacked = {"weight": weight.clone().requires_grad_(), **({"bias": biases.clone().requires_grad_()}
                                                                  if biases is not None else {})}
        inputs = x.clone().requires_grad_()
        views = per_edit_views(stacked)
        out = linear(inputs, runs, views["weight"], views.get("bias"))
        grads = torch.autograd.grad(out.float().pow(2).sum(), [inputs, *stacked.values()])
        results.append((out, *grads))
    for reference, result in zip(*results):
        assert reference.dtype == result.dtype and torch.equal(reference, result)
    assert all(g.abs().sum() > 0 for g in results[1][1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_routed_rms_norm_runs_the_fused_norm_where_the_layers_do_with_the_same_bits(monkeypatch, dtype):
    """UnKE's routed layer copies: a plain RMSNorm leaf computes each edit's rows by the fused layers' RMSNorm where
    those run (CUDA; forced here on the CPU), with the Hugging Face module's outputs and gradients bit for bit, in
    both the per-run path (training) and the gathered one (the graph engine's decode step); elsewhere its own
    forward."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from editors import batching
    from editors.batching import RowRouting
    from editors.models import fused_layer

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), Qwen2RMSNorm(16, eps=1e-6)).to(dtype)
    names = ["1.weight"]  # the norm routed alone
    base = model[1].weight.detach()
    stacked_values = torch.stack([base + 0.1 * torch.randn(16, generator=gen).to(dtype) for _ in range(3)])
    x = torch.randn(7, 3, 8, generator=gen).to(dtype)
    calls = []

    def counted(weight, eps, hidden):
        calls.append(hidden.shape[0])
        return fused_layer.weighted_rms_norm(weight, eps, hidden)

    monkeypatch.setattr(batching, "weighted_rms_norm", counted)
    results = {}
    for fused in (False, True):
        monkeypatch.setitem(fused_layer.FUSED_LAYERS, "cpu", fused)
        stacked = {"1.weight": stacked_values.clone().requires_grad_()}
        inputs = x.clone().requires_grad_()
        routing = RowRouting(model, names)
        with routing.installed():
            routing.set_weights(stacked)
            routing.runs = [(0, 0, 2), (2, 2, 3), (0, 3, 5), (1, 5, 7)]
            out = model(inputs)
            routing.row_edit = torch.tensor([2, 0, 1, 1, 0, 2, 0])
            gathered = model(inputs)
        loss = out.float().pow(2).sum() + gathered.float().pow(2).sum()
        results[fused] = (out, gathered, *torch.autograd.grad(loss, [inputs, stacked["1.weight"]]))
        assert len(calls) == (4 + 3 if fused else 0)  # four runs, then one per edit over every row
    for hf, ours in zip(results[False], results[True]):
        assert torch.equal(hf, ours)
    assert results[True][3].abs().sum() > 0


SHORT = {"ft_audio": {"max_steps": 2}, "ft_llm": {"max_steps": 2}, "lora": {"max_steps": 2},
         "unke": {"v_steps": 2, "optim_steps": 2, "preserve_source": "instance"},
         "wise": {"n_iter": 2, "preserve_source": "instance"}}


@pytest.mark.parametrize("method", sorted(SHORT))
def test_no_training_step_indexes_the_stack_of_edit_copies(qwen, monkeypatch, method):
    # Every gradient a K-edit apply takes: no select node picks one edit out of a stack of K copies along its edit
    # axis (its backward writes a zero stack per use); the per-edit views of one unbind are read instead.
    editor = get_editor_class(method)(qwen, load_hparams(method, qwen.family, tiny=True, overrides=SHORT[method]))
    k = len(make_edits())
    seen: list[tuple[int, ...]] = []
    original = torch.autograd.grad

    def recording_grad(outputs, inputs, *args, **kwargs):
        for out in (outputs if isinstance(outputs, (list, tuple)) else [outputs]):
            stack = [out.grad_fn]
            visited = set()
            while stack:
                node = stack.pop()
                if node is None or node in visited:
                    continue
                visited.add(node)
                if type(node).__name__ == "SelectBackward0" and node._saved_dim == 0:
                    seen.append(tuple(int(n) for n in node._saved_self_sym_sizes))
                stack.extend(fn for fn, _ in node.next_functions)
        return original(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    with EditSession(editor).edits(make_edits()):
        pass
    assert not [shape for shape in seen if shape[0] == k and len(shape) >= 2]


def test_early_stop_in_a_batch_freezes_only_the_converged_edit():
    # loss_k = (w_k - t_k)^2 with SGD lr 0.25 halves the distance per update: edit 0 (distance 0.6) is below 1e-2
    # after 3 updates, edit 1 (distance 1e4) not within 10 steps.
    start = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    targets = torch.tensor([[0.6], [1e4]])

    def run(max_steps: int, optimizer: str = "sgd"):
        copies = StackedCopies({"w": start}, 2)
        results = finetune_many(copies, lambda w: ((w["w"] - targets) ** 2).sum(-1), lr=0.25, max_steps=max_steps,
                                early_stop_loss=1e-2, optimizer=optimizer)
        return copies.masters["w"].detach().clone(), results

    w3, r3 = run(3)
    w10, r10 = run(10)
    assert r10[0].steps == 3 and r10[0].stopped_early and r10[0].loss < 1e-2
    assert r10[1].steps == 10 and not r10[1].stopped_early
    assert torch.equal(w10[0], w3[0])  # edit 0 stopped changing after its 3rd update
    assert not torch.equal(w10[1], w3[1])  # edit 1 went on
    # each edit equals its own single-edit finetune (Adam: elementwise state, frozen once stopped)
    wa, ra = run(20, "adam")
    for k in range(2):
        p = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        single = finetune({"w": p}, lambda: ((p - targets[k]) ** 2).sum(), lr=0.25, max_steps=20,
                          early_stop_loss=1e-2)
        assert single.steps == ra[k].steps and torch.allclose(p.detach(), wa[k], rtol=1e-6, atol=1e-7)


def test_without_an_early_stop_the_batched_loop_reads_the_losses_once(monkeypatch):
    """Every edit runs every step when no early stop is set, so the loop asks the device nothing until the end
    (a host sync per step left a GPU idle while the host waited); with an early stop, once per step. The results are
    those of the same loop reading every step."""
    start = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    targets = torch.tensor([[0.6, -1.0], [3.0, 2.0], [-5.0, 0.1]])
    reads = count_host_reads(monkeypatch)

    def run(early_stop):
        copies = StackedCopies({"w": start}, 3)
        reads.clear()
        results = finetune_many(copies, lambda w: ((w["w"] - targets) ** 2).sum(-1), lr=0.1, max_steps=7,
                                early_stop_loss=early_stop, optimizer="adam")
        return copies.masters["w"].detach().clone(), results, list(reads)

    w_free, r_free, reads_free = run(None)
    w_checked, r_checked, reads_checked = run(-1.0)  # a threshold no loss reaches: the same updates, checked
    assert reads_free == [(3,)] and len(reads_checked) == 7
    assert torch.equal(w_free, w_checked)
    assert [(r.steps, r.loss, r.stopped_early) for r in r_free] == [(r.steps, r.loss, r.stopped_early)
                                                                    for r in r_checked]
    assert all(r.steps == 7 for r in r_free)


@pytest.mark.parametrize("optimizer,fused", [("adam", True), ("adam", False), ("sgd", False)])
def test_early_stops_decided_on_the_device_give_the_host_loops_results(monkeypatch, optimizer, fused):
    """On CUDA the batched loop keeps which edits stopped on the device and reads it back once (no host sync per
    step); forced here on the CPU, with torch's fused Adam (whose kernel skips the stopped edits) or the formulas: the
    copies, optimizer state and results equal the loop that reads the losses every step, bit for bit, edits stopping
    at different steps, the loop ending when all have stopped."""
    import editors.batching as batching

    start = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    # distances 0.6, 2 and 1e4: the first two stop at different steps, the third never within max_steps
    targets = torch.tensor([[0.6, 0.0, 0.0], [2.0, -1.0, 0.5], [1e4, 3.0, -2.0]])
    monkeypatch.setattr(batching, "fused_adam", lambda opt, tensor: fused and opt == "adam")
    reads = count_host_reads(monkeypatch)

    def run(on_device: bool, max_steps: int, chosen=(0, 1, 2)):
        monkeypatch.setattr(batching, "early_stop_on_device", lambda device: on_device)
        copies = StackedCopies({"w": start}, len(chosen))
        rows = targets[list(chosen)]
        reads.clear()
        calls = []

        def losses(w):
            calls.append(1)
            return ((w["w"] - rows) ** 2).sum(-1)

        results = finetune_many(copies, losses, lr=0.25, max_steps=max_steps, early_stop_loss=1e-2,
                                optimizer=optimizer)
        return copies.masters["w"].detach().clone(), [(r.steps, r.loss, r.stopped_early) for r in results], \
            len(calls), list(reads)

    for max_steps in (40, 400):
        w_host, r_host, _, reads_host = run(False, max_steps)
        w_dev, r_dev, _, reads_dev = run(True, max_steps)
        assert torch.equal(w_host, w_dev) and r_host == r_dev
        assert len(reads_host) == min(max_steps, r_host[2][0] + 1) and len(reads_dev) == 3  # once, after the loop
    assert r_host[0][2] and r_host[1][2] and r_host[0][0] != r_host[1][0]  # stopped, at different steps
    # all stopped: the host loop ends at the step that finds it; the device loop at the first step that finds the
    # flag's copy arrived (here at once; on a GPU it may lag), and the steps run meanwhile change nothing
    w_host, r_host, calls_host, _ = run(False, 400, (0, 1))
    w_dev, r_dev, calls_dev, _ = run(True, 400, (0, 1))
    assert all(r[2] for r in r_host) and calls_host < 400 and calls_dev == calls_host
    assert torch.equal(w_host, w_dev) and r_host == r_dev
    looks = []
    # a copy that is there at every other look: the last one is seen after a forward, whose step then stops
    monkeypatch.setattr(StopFlags, "arrived", staticmethod(lambda event: looks.append(1) or len(looks) % 2 == 0))
    w_mid, r_mid, calls_mid, _ = run(True, 400, (0, 1))
    assert calls_mid == calls_host + 1 and torch.equal(w_host, w_mid) and r_host == r_mid
    monkeypatch.setattr(StopFlags, "arrived", staticmethod(lambda event: False))  # a copy that never arrives
    w_late, r_late, calls_late, _ = run(True, 400, (0, 1))
    assert calls_late == 400 and torch.equal(w_host, w_late) and r_host == r_late



def test_adams_formulas_take_the_step_number_from_the_host():
    """Adam's formulas (the CPU's path) read the update's number as a host number; a device tensor is refused
    (only the fused kernel reads it from the device: ``StepNumber``)."""
    import editors.batching as batching

    with pytest.raises(ValueError, match="number"):
        batching._step_in_place(torch.zeros(2), torch.ones(2), {"exp_avg": torch.zeros(2),
                                                                "exp_avg_sq": torch.zeros(2)},
                                torch.ones(()), optimizer="adam", lr=0.1)


def _rows(adapter, dataset, out, cache, k: str, method: str) -> list[dict]:
    from _methods_helpers import trained_network

    hparams = ({"max_steps": 30} if method.startswith("ft") else
               {"hypernetwork_path": str(trained_network(method))} if method == "ke" else {})
    config = run_config(dataset, out, cache, method=method, configs=("emotion", "gender"), limit=2,
                        edits_per_pass=int(k), hparams=hparams)
    runner = Runner(config, adapter=adapter)
    assert runner.edits_per_pass == int(k)
    return read_predictions(runner.run())[1]


@pytest.mark.parametrize("method", ["ft_audio", "ft_llm", "i_ike", "ie_ike", "ke"])
def test_runner_edits_per_pass_writes_the_same_rows(qwen, demo_dataset, tmp_path, method):
    before = state_copy(qwen.model)
    one = _rows(qwen, demo_dataset, tmp_path / "k1", tmp_path / "c1", "1", method)
    three = _rows(qwen, demo_dataset, tmp_path / "k3", tmp_path / "c3", "3", method)  # a pass of 3, then of 1
    assert changed_tensors(qwen.model, before) == []
    assert three == one and len({r["instance_id"] for r in one}) == 4


def test_methods_that_do_not_batch_run_one_at_a_time():
    from sake_core.protocol import METHOD_ORDER

    # the paper's methods (a method added later declares its own batching and tests it, e.g. tests/test_lora.py)
    batching = {m for m in METHOD_ORDER if get_editor_class(m).batches_edits}
    # UnKE and WISE: K edits per pass equal one at a time (tests/test_unke.py, tests/test_wise.py)
    # KE and MEND: tests/test_batching.py::test_hypernetwork_edits_batched_equal_one_at_a_time
    assert batching == {"ft_audio", "ft_llm", "i_ike", "ie_ike", "ke", "mend", "unke", "wise"}


@pytest.mark.parametrize("streams", [False, True])
def test_packed_layer_rows_hold_every_sequence_once_in_rows_of_its_edit(streams, monkeypatch):
    """``packed_layer_rows`` (UnKE's stage 2 on CUDA): each sequence's columns (the last ``length`` of its
    left-padded row) land once, contiguous, in the packed rows of its own edit, with its target, its term's valid
    marks, positions 0..n-1 and a segment number of its own; every other column is padding (zero, segment -1).
    Where the adapter reads rows through the variable-length kernel (``streams``) an edit's sequences run on from
    row to row and only its last row ends in padding; otherwise each sequence stays within one row."""
    import math
    from types import SimpleNamespace

    from editors import batching
    from editors.models import buckets

    monkeypatch.setitem(buckets.PACK_TRAINING, "cpu", True)
    monkeypatch.setitem(buckets.TRAINING_WIDTH_STEP, "cpu", 16 if not streams else 8)
    generator = torch.Generator().manual_seed(0)

    def group(owners, lengths, width, term):
        mask = torch.zeros(len(owners), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, width - n:] = 1
        hidden = torch.randn(len(owners), width, 4, generator=generator) * mask[..., None]
        state = SimpleNamespace(hidden=hidden, batch=SimpleNamespace(attention_mask=mask))
        target = torch.randn(len(owners), width, 4, generator=generator)
        return batching.LayerRows(list(owners), state, target, [(term, mask[..., None].float())])

    groups = [group([0, 1, 2], [5, 9, 3], 9, 0), group([0, 0, 1, 2, 2, 2, 1], [7, 2, 8, 4, 4, 1, 6], 8, 1)]
    seen = {}

    class Adapter:
        device = "cpu"

        def packs_sequences(self):
            return streams

        def packed_state(self, layer, hidden, segments, positions):
            seen.update(segments=segments, positions=positions)
            return SimpleNamespace(hidden=hidden)

    (packed,) = batching.packed_layer_rows(Adapter(), 3, groups)
    sources = {(g, row): (group.owner[row], group.terms[0][0], int(group.state.batch.attention_mask[row].sum()))
               for g, group in enumerate(groups) for row in range(len(group.owner))}
    segments, positions, valid = seen["segments"], seen["positions"], dict(packed.terms)
    width = segments.shape[1]
    flat = segments.reshape(-1)
    hidden, target = packed.state.hidden.reshape(-1, 4), packed.target.reshape(-1, 4)
    used = []
    for number in sorted(set(flat.tolist()) - {-1}):
        cols = (flat == number).nonzero().flatten()
        assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))  # contiguous
        rows = sorted({int(c) // width for c in cols})
        owner = packed.owner[rows[0]]
        assert all(packed.owner[r] == owner for r in rows) and (streams or len(rows) == 1)
        assert positions.reshape(-1)[cols].tolist() == list(range(len(cols)))
        (match,) = [key for key, (o, _, n) in sources.items()
                    if o == owner and n == len(cols) and torch.equal(groups[key[0]].state.hidden[key[1], -n:],
                                                                     hidden[cols])]
        g, row = match
        term = sources[match][1]
        assert torch.equal(target[cols], groups[g].target[row, -len(cols):])
        assert bool((valid[term].reshape(-1)[cols] == 1).all())
        assert all(float(v.reshape(-1)[cols].abs().sum()) == 0 for t, v in valid.items() if t != term)
        used.append(match)
    assert sorted(used) == sorted(sources)  # every sequence once
    padding = segments < 0
    assert float(packed.state.hidden[padding].abs().sum()) == 0 and float(packed.target[padding].abs().sum()) == 0
    assert all(float(v[padding].abs().sum()) == 0 for v in valid.values())
    assert len(packed.owner) < sum(len(g.owner) for g in groups)
    if streams:  # each edit in as few rows as its tokens fill, its padding at the end of its last row only
        for owner in set(packed.owner):
            rows = [r for r, o in enumerate(packed.owner) if o == owner]
            tokens = sum(n for o, _, n in sources.values() if o == owner)
            assert rows == list(range(rows[0], rows[0] + math.ceil(tokens / width)))
            assert flat[rows[0] * width:rows[0] * width + tokens].min() >= 0
            assert bool((flat[rows[0] * width + tokens:(rows[-1] + 1) * width] == -1).all())
