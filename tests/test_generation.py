"""The generation layer (editors/models/generation): settings resolved once from the family's defaults, one entry,
no environment variable; engines agree on the tiny fp32 models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from editors.models.generation import GenerationSettings, family_defaults, resolve_settings
from editors.models.generation.settings import CPU_BATCH_TOKENS
from sake_core.errors import ConfigError

GENERATION = Path(__file__).resolve().parents[1] / "editors" / "models" / "generation"


def test_settings_come_from_the_family_defaults():
    assert family_defaults("qwen2_audio")["max_new_tokens"] == 256
    assert family_defaults("desta25")["max_new_tokens"] == 512
    cpu = resolve_settings("qwen2_audio", tiny=True, device_type="cpu", dtype="torch.float32")
    assert cpu == GenerationSettings(max_new_tokens=32, engine="eager", dtype="float32", min_shared_prefix=256,
                                     max_batch_tokens=CPU_BATCH_TOKENS)
    # the padded-token cap: on CPU a default, 0 for none; on CUDA sized at each generation unless given
    for device_type, asked, cap in (("cpu", 0, None), ("cpu", 4096, 4096), ("cuda", None, None), ("cuda", 0, None),
                                    ("cuda", 8192, 8192)):
        assert resolve_settings("qwen2_audio", tiny=False, device_type=device_type, dtype="bfloat16",
                                max_batch_tokens=asked).max_batch_tokens == cap
    full = resolve_settings("audio_flamingo3", tiny=False, device_type="cpu", dtype="bfloat16", max_new_tokens=7,
                            batch_size=4)
    assert (full.max_new_tokens, full.min_shared_prefix, full.batch_size) == (7, 0, 4)
    assert set(full.output_key()) == {"engine", "max_new_tokens", "dtype", "min_shared_prefix"}
    with pytest.raises(ConfigError, match="engine"):
        resolve_settings("qwen2_audio", tiny=True, device_type="cpu", dtype="float32", engine="fast")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_a_method_limited_to_eager_gets_eager_everywhere():
    assert resolve_settings("qwen2_audio", tiny=False, device_type="cuda", dtype="bfloat16",
                            method_engines=("eager",), method="wise").engine == "eager"


def test_a_method_generates_with_the_runs_settings_else_with_its_own_engines(monkeypatch):
    """Outside a run (no ``RunContext.generation``) an editor's generations resolve the adapter's defaults for the
    method's engines (GRACE: eager only), not the adapter's for any method."""
    from editors.base import RunContext
    from editors.models import load_adapter
    from editors.registry import get_editor_class, load_hparams

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    grace = get_editor_class("grace")
    assert grace.generation_engines == ("eager",)
    asked: dict = {}
    resolve = adapter.generation_settings
    monkeypatch.setattr(adapter, "generation_settings", lambda *a, **k: asked.update(k) or resolve(*a, **k))
    editor = grace(adapter, load_hparams("grace", adapter.family, tiny=True))
    assert editor.generation_settings(max_new_tokens=4).max_new_tokens == 4
    assert asked["method_engines"] == ("eager",) and asked["method"] == "grace"
    run = GenerationSettings(max_new_tokens=9, batch_size=3)
    editor = grace(adapter, load_hparams("grace", adapter.family, tiny=True), RunContext(generation=run))
    assert editor.generation_settings(max_new_tokens=4) == run.replace(max_new_tokens=4)
    # limits read as outside a run: None keeps the run's value, 0 is no batching limit, an engine is resolved
    assert editor.generation_settings(max_new_tokens=None, batch_size=0, max_batch_tokens=0, engine="auto") == \
        run.replace(batch_size=None, max_batch_tokens=None, engine="eager")
    with pytest.raises(ConfigError, match="eager engine only"):
        editor.generation_settings(engine="graph")


def test_no_environment_variable_reaches_generation():
    """Outputs depend on the settings only: no module of the generation layer reads the environment."""
    for path in GENERATION.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not names & {"environ", "getenv"}, path.name


def test_editing_and_run_resolve_the_same_defaults(demo_dataset):
    from editors.data import load_instances
    from editors.models import load_adapter
    from sake import editing

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    row = load_instances(str(demo_dataset), "emotion", "test")[0]
    with editing(adapter, "i_ike", row) as model:
        assert model.settings == adapter.generation_settings()
        assert model.settings.max_new_tokens == family_defaults("qwen2_audio", tiny=True)["max_new_tokens"]
        assert len(model.generate([model.edit.prompt()], max_new_tokens=2)) == 1


# ---- the graph engine on CPU (uncaptured): the eager engine's greedy outputs ------------------------------------


def _mixed_prompts():
    from _editor_helpers import synthetic_audio
    from editors.models.base import Prompt, Turn

    history = tuple(Turn(f"Example {i}: what is the emotion here? (a) happy (b) sad", "happy" if i % 2 else "sad",
                         audio=synthetic_audio(i, 0.8) if i != 1 else None) for i in range(3))
    plain = [Prompt("Which animal makes this sound? (a) dog (b) cat", audio=synthetic_audio(s, 0.5 + 0.3 * s))
             for s in range(3)] + [Prompt("What is the gender of the speaker? (a) male (b) female")]
    demos = [Prompt(f"Which animal is this? option {j}", audio=synthetic_audio(20 + j, 0.5 + 0.3 * j) if j != 2
                    else None, system="Apply the update.", history=history) for j in range(4)]
    instructed = [Prompt("Is it a cat?", audio=synthetic_audio(30, 0.7), system="The dog is now a cat.")]
    return plain + demos + instructed


@pytest.fixture(scope="module", params=["tiny-qwen2-audio", "tiny-audio-flamingo3", "tiny-desta25"])
def any_family(request):
    from editors.models import load_adapter

    return load_adapter(request.param, seed=0)


def test_prompt_token_ids_equal_tokenizing_the_expanded_text(any_family):
    """Placeholders expanded after tokenization give the ids of the text with every placeholder repeated."""
    adapter = any_family
    for prompt in _mixed_prompts():
        pieces = adapter.render(prompt).split(adapter.audio_placeholder)
        text = pieces[0] + "".join(adapter.audio_placeholder * adapter.num_audio_tokens(audio) + piece
                                   for audio, piece in zip(prompt.audios(), pieces[1:]))
        assert adapter.prompt_token_ids(prompt) == adapter._token_ids(text)


def test_graph_engine_gives_the_eager_greedy_outputs(any_family, monkeypatch):
    from editors.models.generation import graph

    adapter = any_family
    prompts = _mixed_prompts()
    eager = adapter.generation_settings(10).replace(min_shared_prefix=0)
    graph.reset_stats()
    seen: list[list[int]] = []  # the token ids the answers were decoded from
    decode = adapter.tokenizer.batch_decode
    monkeypatch.setattr(adapter.tokenizer, "batch_decode",
                        lambda ids, **kw: seen.extend(ids.tolist()) or decode(ids, **kw))
    reference = adapter.generate(prompts, settings=eager)
    assert adapter.generate(prompts, settings=eager.replace(engine="graph")) == reference
    # the four demo prompts' system prompt + history (most of their tokens) is prefilled once
    demo_prefix, _ = graph.prefix_split(adapter, prompts[4], adapter.prompt_token_ids(prompts[4]), {})
    assert demo_prefix > 0.8 * len(adapter.prompt_token_ids(prompts[4]))
    assert demo_prefix <= graph.STATS["prefix_tokens"] < 2 * demo_prefix
    # stop tokens on the device: stop at a token the model emits, both engines cut the same answers there
    stops = sorted(set(adapter.stop_token_ids) | {row[3] for row in seen[:3]})
    monkeypatch.setattr(type(adapter), "stop_token_ids", property(lambda self: stops))
    cut = adapter.generate(prompts, settings=eager)
    assert cut != reference and adapter.generate(prompts, settings=eager.replace(engine="graph")) == cut
    assert [t.hit_limit for t in adapter.generate(prompts, settings=eager.replace(engine="graph"))] == \
        [t.hit_limit for t in cut]


def test_rows_asking_about_one_clip_share_it_as_a_prefix(any_family):
    """Rows with the same clip and different questions (SAKE's reliability, type-1 generality and portability items)
    share the system prompt and that clip as one prefilled prefix, with the eager engine's outputs; a clip asked
    about once is not split off, and IE-IKE-like rows keep their long demonstrations as one prefix."""
    from _editor_helpers import synthetic_audio

    from editors.models.base import Prompt
    from editors.models.generation import graph

    adapter = any_family
    clip = synthetic_audio(40, 0.9)
    questions = ["Which animal makes this sound? (a) dog (b) cat", "What is the emotion here? (a) happy (b) sad",
                 "Is the speaker near the microphone?", "How many speakers are there? (a) one (b) two"]
    same = [Prompt(q, audio=clip.copy()) for q in questions]  # equal content, distinct arrays
    prompts = same + _mixed_prompts()
    ids = [adapter.prompt_token_ids(p) for p in prompts]
    groups = graph._prefix_groups(adapter, prompts, ids, None)
    through, audios = graph.prefix_split(adapter, same[0], ids[0], {}, own_audio=True)
    assert audios == 1 and through > graph.prefix_split(adapter, same[0], ids[0], {})[0]
    assert [(i, through, 1) for i in range(len(same))] in groups
    demo_rows = list(range(len(same) + 4, len(same) + 8))  # _mixed_prompts: 4 plain prompts, then 4 demo prompts
    assert any(sorted(i for i, _, _ in g) == demo_rows for g in groups)  # one group, not split by their clips
    eager = adapter.generation_settings(8).replace(min_shared_prefix=0)
    graph.reset_stats()
    assert adapter.generate(prompts, settings=eager.replace(engine="graph")) == adapter.generate(prompts,
                                                                                                settings=eager)
    assert graph.STATS["prefix_tokens"] >= through


def test_graph_engine_chunks_and_batch_limits_keep_outputs():
    from editors.models import load_adapter

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    prompts = _mixed_prompts()
    settings = adapter.generation_settings(6, engine="graph")
    together = adapter.generate(prompts, settings=settings)
    assert adapter.generate(prompts, settings=settings.replace(batch_size=2)) == together
    assert [adapter.generate([p], settings=settings)[0] for p in prompts] == together
    assert adapter.generate(prompts[::-1], settings=settings) == together[::-1]


def test_a_call_holds_no_more_shapes_than_the_keep_budget_beside_the_one_it_uses(monkeypatch):
    """Shapes are kept across calls up to the keep budget, counted as a call finishes with each one: a call over
    many shapes (a sequence's growing in-context prompts) once held them all until it ended and ran an 80 GB card
    out of memory. The next call reuses what is kept, with the same outputs."""
    import weakref

    from editors.models import load_adapter
    from editors.models.generation import graph

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    prompts = _mixed_prompts()
    settings = adapter.generation_settings(6, engine="graph").replace(batch_size=1)  # a chunk per prompt
    reference = adapter.generate(prompts, settings=settings)  # on the CPU nothing is kept
    made: list[weakref.ref] = []
    held: list[int] = []  # bytes of the states alive as each new one is made
    sizes: list[int] = []  # bytes of each state made
    init = graph._State.__init__

    def counting(self, *args, **kwargs):
        held.append(sum(s.nbytes() for s in (r() for r in made) if s is not None))
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))
        sizes.append(self.nbytes())

    budget = {"bytes": 0.0}
    monkeypatch.setattr(graph._State, "__init__", counting)
    monkeypatch.setattr(graph, "keeps_shapes", lambda device, per_edit: True)
    monkeypatch.setattr(graph, "_keep_budget", lambda device: budget["bytes"])
    assert adapter.generate(prompts, settings=settings) == reference  # budget 0: nothing kept
    assert len(made) >= 3 and max(held) == 0

    budget["bytes"] = float(max(sizes))  # room for one shape
    made.clear()
    held.clear()
    assert adapter.generate(prompts, settings=settings) == reference
    assert 0 < max(held) <= budget["bytes"] and graph.kept_bytes(adapter) <= budget["bytes"]
    shapes = len(made)
    budget["bytes"] = float(sum(sizes))  # room for all: the next call makes none
    adapter.generate(prompts, settings=settings)
    graph.reset_stats()
    made.clear()
    assert adapter.generate(prompts, settings=settings) == reference
    assert graph.STATS["reused"] == shapes and made == []
    graph.release(adapter)


def test_prefill_parts_split_rows_in_order_and_may_split_a_piece():
    from editors.models.generation.graph import _parts

    assert list(_parts([0, 1, 2], [3, 1, 4], 2)) == [([0], [2]), ([0, 1], [1, 1]), ([2], [2]), ([2], [2])]
    assert list(_parts([0, 1], [3, 1], 10)) == [([0, 1], [3, 1])]
    assert list(_parts(range(3), [1, 1, 1], 1)) == [([0], [1]), ([1], [1]), ([2], [1])]


@pytest.mark.parametrize("tokens", [1, 300])
def test_prefill_in_parts_keeps_outputs(tokens, monkeypatch):
    """The CUDA prefill in parts of a bounded token count (here forced on the CPU: one row or prefix per forward,
    or a few) gives the outputs of prefilling each chunk whole, shared prefixes included."""
    from editors.models import load_adapter
    from editors.models.generation import graph

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    prompts = _mixed_prompts()
    settings = adapter.generation_settings(6, engine="graph")
    whole = adapter.generate(prompts, settings=settings)
    forwards: list[int] = []
    prefill = graph._State.prefill
    monkeypatch.setattr(graph._State, "prefill", lambda self, embeds, *a: forwards.append(len(embeds)) or
                        prefill(self, embeds, *a))
    monkeypatch.setattr(graph, "prefill_tokens", lambda adapter: tokens)
    assert adapter.generate(prompts, settings=settings) == whole
    assert max(forwards) <= max(1, tokens // 32) and len(forwards) > 2


@pytest.mark.parametrize("split_prefix, attention_bytes, part_tokens",
                         [(1, 1 << 30, 1 << 62), (1, 1 << 30, 32), (100, 1 << 30, 1 << 62), (None, 1 << 30, 1 << 62),
                          (None, 1, 1 << 62), (None, 350_000, 32)])
def test_row_prefill_splits_or_gathers_prefixes_and_keeps_outputs(split_prefix, attention_bytes, part_tokens,
                                                                  monkeypatch):
    """The row prefill attends rows with a long prefix in two parts merged by their log-sum-exps (the prefix read in
    its lane once per piece, the rows' queries folded; each row's own tail) and other rows in groups with their
    prefixes gathered (shorter ones padded with masked columns): with rows of several pieces, prefix lengths and
    tail widths, whole or one row per forward, the eager engine's greedy outputs whichever way each prefix goes
    (``SPLIT_PREFIX``) and however rows are grouped (``ATTENTION_BYTES``)."""
    from _editor_helpers import synthetic_audio
    from editors.models import load_adapter
    from editors.models.base import Prompt, Turn
    from editors.models.generation import graph

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    short = (Turn("Example: what is the emotion here?", "sad", audio=synthetic_audio(40, 0.6)),)
    prompts = _mixed_prompts() + [Prompt(f"Which animal is this? choice {j}", audio=synthetic_audio(41 + j, 0.4 + j),
                                         system="Apply the update.", history=short) for j in range(3)]
    settings = adapter.generation_settings(6)
    reference = adapter.generate(prompts, settings=settings)
    runs_of = graph._State._runs
    kinds: list[tuple[str, int, int, int]] = []  # (how, rows, prefix lengths in the run, pieces in the run)

    def recording(self, prefixes, tail_mask):
        out = runs_of(self, prefixes, tail_mask)
        for run in out:
            a, b = run.rows
            kind = "split" if run.prefixes is not None else "gather" if run.gather is not None else "none"
            kinds.append((kind, b - a, len({s[2] for s in prefixes[a:b]} - {0}), len(run.prefixes or [])))
        return out

    monkeypatch.setattr(graph._State, "_runs", recording)
    monkeypatch.setattr(graph, "SPLIT_PREFIX", split_prefix)
    monkeypatch.setattr(graph, "ATTENTION_BYTES", attention_bytes)
    monkeypatch.setattr(graph, "prefill_tokens", lambda adapter: part_tokens)
    assert adapter.generate(prompts, settings=settings.replace(engine="graph")) == reference
    used = {kind for kind, _, _, _ in kinds}
    assert ("split" in used) == (split_prefix is not None) and ("gather" in used) == (split_prefix != 1)
    if split_prefix == 1 and part_tokens > 32:
        assert any(kind == "split" and rows > pieces for kind, rows, _, pieces in kinds)  # a piece's rows folded
        assert any(kind == "split" and lengths > 1 for kind, _, lengths, _ in kinds)  # pieces of two prefixes
    if split_prefix is None and attention_bytes > 1 and part_tokens > 32:
        assert any(kind == "gather" and lengths > 1 for kind, _, lengths, _ in kinds)  # prefixes of two lengths


def test_attention_in_two_parts_merged_by_log_sum_exp_equals_attention_over_both():
    """The split row prefill's arithmetic: attention over [prefix | tail] equals the prefix's and the tail's
    attentions weighed by their log-sum-exps (fp32, CPU; the CUDA kernels return the same quantities)."""
    from editors.models.generation.graph import attention_lse, merge_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for n in (5, 12, 12))
    mask = torch.rand(2, 1, 5, 12, generator=gen) > 0.3
    mask[..., -1] = True  # every query sees a key
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out_p, lse_p = attention_lse(q, k[:, :, :7], v[:, :, :7], bias[..., :7], 0.3)
    out_t, lse_t = attention_lse(q, k[:, :, 7:], v[:, :, 7:], bias[..., 7:], 0.3)
    assert torch.allclose(merge_attention(out_p, lse_p, out_t, lse_t), whole, atol=1e-6)
    out, lse = attention_lse(q, k, v, bias, 0.3)
    assert torch.allclose(out, whole, atol=1e-6) and torch.allclose(lse, torch.logaddexp(lse_p, lse_t), atol=1e-6)


def test_the_graph_budget_counts_one_prefill_part_not_activations_per_token(monkeypatch):
    """The graph engine prefills in parts: its token budget is the KV cache per token plus one part's activations;
    the eager engine's counts activations for every token."""
    from editors.models import load_adapter
    from editors.models.generation import memory

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    free = 64 * 2**30
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    kv, act = memory.kv_bytes_per_token(adapter), memory.activation_bytes_per_token(adapter)
    usable = int(memory.GENERATION_FRACTION * free)
    assert memory.token_budget(adapter, engine="graph") == (usable - memory.PREFILL_BYTES) // kv
    assert memory.token_budget(adapter, engine="eager") == usable // (kv + act)
    # a prompt longer than a part is prefilled in one forward (a prefix or tail is never split): its activations
    part = memory.PREFILL_BYTES // act
    assert memory.token_budget(adapter, engine="graph", longest=part) == (usable - memory.PREFILL_BYTES) // kv
    assert memory.token_budget(adapter, engine="graph", longest=3 * part) == (usable - 3 * part * act) // kv


def test_graph_plan_packs_shorter_rows_into_shared_lanes():
    """A chunk's lanes are as wide as its longest piece; shorter pieces fill lanes together (first fit, longest
    first) instead of each padding a lane of its own; a piece much shorter than the chunk's lanes, or one past a
    batching limit, starts the next chunk."""
    from editors.models.generation.graph import _Piece, _plan
    from editors.models.generation.settings import GenerationSettings

    cpu = torch.device("cpu")
    settings = GenerationSettings(max_new_tokens=8, engine="graph")
    long, mid, short, tiny = (_Piece([], [], [0], [473]), _Piece([], [], [1], [233]), _Piece([], [], [2], [201]),
                              _Piece([], [], [3], [20]))
    assert [p.length(8) for p in (long, mid, short, tiny)] == [480, 240, 208, 27]
    chunks = _plan([tiny, short, long, mid], settings, cpu)
    assert [(c.width, [[p.rows[0] for p in lane] for lane in c.lanes]) for c in chunks] == \
        [(512, [[0], [1, 2]]), (32, [[3]])]  # 240 + 208 share a lane; 27 tokens would read 512-token lanes
    assert chunks[0].shape(cpu) == (512, 2, 2, 16)  # rows: the canonical CPU count
    capped = _plan([long, mid, short], settings.replace(batch_size=2), cpu)
    assert [c.rows for c in capped] == [[0, 1], [2]]
    budget = _plan([long, mid, short], settings.replace(max_batch_tokens=512), cpu)
    assert [c.rows for c in budget] == [[0], [1, 2]]


def test_lanes_hold_a_shared_prefix_once_and_each_row_at_its_own_length():
    """Rows sharing a long prefix (IE-IKE's demonstrations) share one piece: the prefix once, then each row's own
    tail and new tokens, with no padding to the longest row; a short prefix is not worth sharing (each row then
    reads only its own prompt)."""
    from editors.models.generation.graph import LANE_ROWS, _Chunk, _Piece, rows_per_lane

    assert rows_per_lane(3000, 320, 10) == 10
    assert rows_per_lane(20, 320, 50) == 1
    assert 1 < rows_per_lane(300, 320, 50) < LANE_ROWS
    piece = _Piece([7] * 3000, [], [0, 1, 2], [119, 300, 481])
    assert piece.segments(32) == [3000, 3000 + 150, 3000 + 150 + 331]
    assert piece.length(32) == 3000 + 119 + 300 + 481 + 3 * 31
    chunk = _Chunk(4096, [[piece], [piece]])
    assert chunk.fit(piece, 32) is None and chunk.shape(torch.device("cuda")) == (4096, 2, 3, 8)


def test_graph_engine_outputs_do_not_depend_on_how_rows_are_packed(monkeypatch):
    """Rows packed several to a lane (other rows' tokens masked out of each row's attention) give the outputs of
    one row per lane."""
    from editors.models import load_adapter
    from editors.models.generation import graph

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    prompts = _mixed_prompts()
    settings = adapter.generation_settings(6, engine="graph")
    packed = adapter.generate(prompts, settings=settings)
    lanes = []
    plan = graph._plan
    monkeypatch.setattr(graph, "_plan", lambda *a: [lanes.append(len(c.lanes)) or c for c in plan(*a)])
    assert adapter.generate(prompts, settings=settings) == packed and sum(lanes) < len(prompts)
    monkeypatch.setattr(graph, "LANE_ROWS", 1)  # one row per lane (shared prefixes then each in a lane of their own)
    monkeypatch.setattr(graph, "rows_per_lane", lambda *a: 1)
    lanes.clear()
    assert adapter.generate(prompts, settings=settings) == packed and sum(lanes) == len(prompts)


@pytest.mark.parametrize("method,overrides", [("ft_llm", {"max_steps": 6}), ("ft_audio", {"max_steps": 6}),
                                              ("lora", {"max_steps": 20})])
def test_graph_engine_per_edit_weights_equal_one_edit_at_a_time(method, overrides):
    """K edits in one graph-engine generation (routed Linears / LoRA adapters gathered per row in the decode step,
    connector copies in the prefill) give each edit's own eager outputs."""
    import test_batching as tb

    from editors.base import ParameterSnapshot
    from editors.registry import load_hparams
    from editors.models import load_adapter
    from editors.registry import get_editor_class

    from editors.models.base import Prompt
    from editors.models.generation import graph

    def prompts_of(edit):  # the edit's clip asked about three times: a prefix through the clip, per edit
        return tb.eval_prompts(edit) + [Prompt(q, audio=edit.audio) for q in ("Describe the clip's emotion.",
                                                                              "Is the speaker calm? (a) yes (b) no")]

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    editor = get_editor_class(method)(adapter, load_hparams(method, adapter.family, tiny=True, overrides=overrides))
    snapshot = ParameterSnapshot(adapter.model, editor.touched_parameters() or [])
    edits = tb.make_edits()
    eager = adapter.generation_settings(6)
    alone = []
    for edit in edits:
        editor.apply(edit)
        alone.append(adapter.generate(prompts_of(edit), settings=eager))
        snapshot.restore()
        editor.reset()
    editor.apply_many(edits)
    graph.reset_stats()
    try:
        together = editor.generate_many([prompts_of(e) for e in edits], eager.replace(engine="graph"))
    finally:
        editor.reset()
    assert together == alone
    assert graph.STATS["prefix_groups"] >= len(edits)  # each edit's clip prefilled once, through its own weights
    assert len({tuple(a) for a in alone}) > 1  # the edits differ


def test_a_generation_encodes_its_clips_ahead_of_its_batches_longest_first(monkeypatch):
    """Before its batches, a generation hands all its clips to ``audio_states`` at once, which encodes the
    uncached ones longest first (batches of like length); the batches then find every clip cached, and the answers
    are those of a generation whose batches encode their own clips."""
    from _editor_helpers import synthetic_audio
    from editors.models import load_adapter
    from editors.models import adapter as adapter_module
    from editors.models.base import Prompt

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    prompts = [Prompt("Which animal makes this sound? (a) dog (b) cat", audio=synthetic_audio(70 + i, s))
               for i, s in enumerate((0.5, 1.6, 0.9, 1.2, 0.7))]
    settings = adapter.generation_settings(4, batch_size=2)
    calls: list[int] = []
    encoded: list[int] = []
    states, encode = adapter.audio_states, adapter._encode_audios
    monkeypatch.setattr(adapter, "audio_states", lambda audios, batch_size=None: calls.append(len(audios))
                        or states(audios, batch_size))
    monkeypatch.setattr(adapter, "_encode_audios", lambda audios: encoded.extend(len(a) for a in audios)
                        or encode(audios))
    adapter.clear_audio_cache()
    ahead = adapter.generate(prompts, settings=settings)
    assert calls[0] == len(prompts) and encoded == sorted(encoded, reverse=True) and len(encoded) == len(prompts)
    monkeypatch.setattr(adapter, "encode_ahead", lambda audios: None)
    adapter.clear_audio_cache()
    assert adapter.generate(prompts, settings=settings) == ahead
    calls.clear()
    encoded.clear()
    adapter.clear_audio_cache()
    monkeypatch.undo()
    one = adapter_module._nbytes(adapter.audio_states(prompts[0].audios())[0])
    adapter.clear_audio_cache()
    monkeypatch.setattr(adapter, "encode_ahead_clips", 2)
    monkeypatch.setattr(adapter, "audio_cache_bytes", one)  # full after the first two clips: the batches do the rest
    monkeypatch.setattr(adapter, "audio_states", lambda audios, batch_size=None: calls.append(len(audios))
                        or states(audios, batch_size))
    ahead_calls: list[int] = []
    encode_ahead = adapter.encode_ahead

    def spy(audios):
        before = len(calls)
        encode_ahead(audios)
        ahead_calls.extend(calls[before:])

    monkeypatch.setattr(adapter, "encode_ahead", spy)
    assert adapter.generate(prompts, settings=settings) == ahead
    assert ahead_calls == [2] and len(calls) > 1  # it stopped once its states filled the budget


def test_wide_views_share_bytes_and_keep_what_cannot_be_widened():
    from editors.models.generation.graph import wide

    x = torch.arange(3 * 4 * 10 * 32, dtype=torch.int16).view(torch.bfloat16).view(3, 4, 10, 32)
    for view in (x, x.transpose(1, 2)):  # the engine's keys are a transposed view
        w = wide(view)
        assert w.dtype == torch.complex128 and w.shape[-1] == 4
        assert w.data_ptr() == view.data_ptr() and torch.equal(w.view(torch.int16), view.view(torch.int16))
    assert wide(x[..., 4:]).dtype == torch.int64  # rows of 56 bytes starting 8 bytes in
    assert wide(x[..., 2:]).dtype == torch.int32  # rows of 60 bytes starting 4 bytes in
    odd = torch.zeros(2, 3, 31)  # 4-byte elements already: as it is
    assert wide(odd) is odd
    shifted = x[..., 1:]  # rows of 62 bytes starting 2 bytes in: as it is
    assert wide(shifted) is shifted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_keys_stored_and_gathered_as_wide_elements_are_the_elementwise_index_bits(dtype):
    from editors.models.generation import graph

    g = torch.Generator().manual_seed(0)
    lanes, heads, width, positions, d = 5, 3, 12, 40, 16
    bits = torch.randint(-2**15, 2**15, (lanes, width, heads, d * dtype.itemsize // 2), generator=g,
                         dtype=torch.int16)
    states = bits.view(dtype).transpose(1, 2)  # NaNs with payloads included: a copy keeps every bit
    spans = [(row, (row * 2) % lanes, 3 * row, count) for row, count in enumerate([12, 7, 1, 9, 4])]
    writes = graph._Writes.of(spans, width, torch.device("cpu"))
    cache, expected = (torch.zeros(lanes, heads, positions, d, dtype=dtype) for _ in range(2))
    graph.store_rows(cache, states, writes)
    expected[writes.lane, :, writes.position] = states[writes.batch_row, :, writes.column]
    assert torch.equal(cache.view(torch.int16), expected.view(torch.int16))
    rows, columns = writes.lane[:6, None], torch.stack([writes.position[:6], writes.position[1:7]], 1)
    gathered = graph.gather_rows(cache, rows, columns)
    assert torch.equal(gathered.view(torch.int16), expected[rows, :, columns].transpose(1, 2).view(torch.int16))
