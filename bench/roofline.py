"""Device ceilings (matmul rate, copy bandwidth) and the floor of one edit: training + prefill FLOPs over the matmul rate, generation bytes over the bandwidth."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import numpy as np
import torch


from bench.arms import Bench
from bench.models import Scale, _sync
from editors.preservation import PreservationSettings, editor_preservation

LOG = logging.getLogger(__name__)


def _median_seconds(device: str, fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up (CUDA events on the GPU, host clock on the CPU)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return float(np.median(times))


def _matmul_seconds(device: str, dtype: torch.dtype, n: int, generator: torch.Generator) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    return _median_seconds(device, lambda: a @ b, 20 if device == "cuda" else 3)


def _copy_seconds(device: str, nbytes: int, generator: torch.Generator) -> float:
    src = torch.randn(nbytes // 4, device=device, generator=generator)
    dst = torch.empty_like(src)
    return _median_seconds(device, lambda: dst.copy_(src), 20 if device == "cuda" else 3)


def measure_ceilings(scale: Scale) -> dict[str, float]:
    """Matmul rate (bf16 8192^3 on the GPU; fp32 512^3 on the CPU), fp32 matmul rate (torch's default precision:
    DeSTA2.5's Whisper and connector) and device copy bandwidth (read + write), on random data."""
    device = scale.device
    n = 8192 if device == "cuda" else 512
    nbytes = (2 << 30) if device == "cuda" else (32 << 20)
    generator = torch.Generator(device=device).manual_seed(0)
    matmul_s = _matmul_seconds(device, scale.dtype, n, generator)
    fp32_s = matmul_s if scale.dtype == torch.float32 else _matmul_seconds(device, torch.float32, n, generator)
    copy_s = _copy_seconds(device, nbytes, generator)
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"matmul_n": n, "matmul_flops_per_s": 2 * n**3 / matmul_s, "matmul_fp32_flops_per_s": 2 * n**3 / fp32_s,
            "copy_bytes_per_s": 2 * nbytes / copy_s}


@dataclasses.dataclass
class Shapes:
    """Token counts of one edit as the runner's adapter renders it."""

    edit_tokens: int  # reliability prompt + target (+ end of turn)
    target_tokens: int
    audio_tokens: int  # placeholder tokens of the edit audio
    pre_tokens: list[int]  # prompt length of each question given a pre-edit output (RunConfig.pre_edit_items)
    post_tokens: list[int]  # prompt length of each post-edit question (method's rewrite applied)
    distinct_clips: int  # audios the encoder must see at least once for this edit
    clip_frames: list[int] = dataclasses.field(default_factory=list)  # valid mel frames of each distinct clip
    pre_shared: int = 0  # tokens every pre-edit question of the edit begins with (prefilled and cached once)
    post_shared: int = 0  # likewise for the post-edit questions (IE-IKE's demonstrations, I-IKE's instruction)
    preserve_tokens: list[int] = dataclasses.field(default_factory=list)  # UnKE / WISE: each preservation prompt
    template_tokens: int = 0  # the edit prompt's columns before its first audio (no connector change reaches them)


def edit_shapes(bench: Bench, editor: Any, row: dict[str, Any]) -> Shapes:
    from editors.base import EditRequest
    from editors.data import eval_items
    from editors.models.base import audio_digest, whisper_mel_frames
    from editors.models.generation.eager import shared_prefix_length

    from sake_core.protocol import needs_pre_edit

    adapter = bench.adapter
    edit = EditRequest.from_row(row)
    items = eval_items(row)
    prompts = [it.prompt() for it in items]
    post = prompts
    if not editor.changes_parameters:
        from editors.session import EditSession

        with EditSession(editor).edit(edit):
            post = editor.rewrite_prompts(prompts, edit)
    target = len(adapter.target_token_ids(edit.target))
    clips = {audio_digest(a): a for p in list(prompts) + list(post) for a in p.audios()}
    fe = getattr(getattr(adapter, "processor", None), "feature_extractor", None)
    frames = [whisper_mel_frames(len(a), fe) for a in clips.values()] if fe is not None else []
    pre = [p for p, it in zip(prompts, items) if needs_pre_edit(it.dimension, bench.pre_edit_items)]
    pre_ids = [adapter.prompt_token_ids(p) for p in pre]
    # UnKE and WISE train on preservation prompts, drawn as in the run
    preserve = editor_preservation(editor, edit) if isinstance(editor.hparams, PreservationSettings) else []
    post_ids = [adapter.prompt_token_ids(p) for p in post]
    edit_ids = adapter.prompt_token_ids(edit.prompt())
    slot = adapter.audio_placeholder_id
    # the prefix the generation layer shares (placeholders of different clips are not shared)
    return Shapes(edit_tokens=len(edit_ids) + target, target_tokens=target,
                  audio_tokens=adapter.num_audio_tokens(edit.audio), pre_tokens=[len(i) for i in pre_ids],
                  post_tokens=[len(i) for i in post_ids], distinct_clips=len(clips), clip_frames=frames,
                  pre_shared=shared_prefix_length(adapter, pre, pre_ids, 1),
                  post_shared=shared_prefix_length(adapter, post, post_ids, 1),
                  preserve_tokens=[len(adapter.prompt_token_ids(p)) for p in preserve],
                  template_tokens=edit_ids.index(slot) if slot in edit_ids else 0)


def run_shapes(bench: Bench, method: str, rows: list[dict[str, Any]]) -> list[Shapes]:
    """:func:`edit_shapes` of each of ``rows`` under ``method``."""
    editor = bench.editor(method)
    return [edit_shapes(bench, editor, row) for row in rows]


def _llm_sizes(t: Any) -> dict[str, int]:
    """Matmul parameter counts of a decoder-only LLM config (Qwen2 / Llama: GQA, gated MLP)."""
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    qkv = t.hidden_size * head_dim * (t.num_attention_heads + 2 * t.num_key_value_heads)
    attention = qkv + t.hidden_size * head_dim * t.num_attention_heads
    layer = attention + 3 * t.hidden_size * t.intermediate_size
    return {"layers": t.num_hidden_layers, "layer": layer, "head": t.hidden_size * t.vocab_size, "qkv": qkv,
            "mlp_out": t.hidden_size * t.intermediate_size,
            "llm_weights": layer * t.num_hidden_layers + 2 * t.hidden_size * t.vocab_size,
            "kv_elements_per_token": 2 * t.num_hidden_layers * t.num_key_value_heads * head_dim}


def _encoder_flops(a: Any, layers: int, positions: int | None = None) -> int:
    """Forward FLOPs of ``layers`` Whisper encoder layers over ``positions`` (default: the padded 30 s window)."""
    n = a.max_source_positions if positions is None else positions
    encoder_layer = 4 * a.d_model**2 + 2 * a.d_model * a.encoder_ffn_dim
    return layers * (2 * encoder_layer * n + 4 * n**2 * a.d_model)


def model_sizes(config: Any) -> dict[str, Any]:
    """Matmul parameter counts and per-clip FLOPs the floor needs (Qwen2-Audio or DeSTA2.5 config).

    ``connector_flops_per_token`` (Qwen2-Audio: one Linear per audio embedding) or ``connector_flops_per_clip``
    (DeSTA2.5: the Q-Former over the tapped layers, fixed per clip) is the connector's forward; its update costs
    ``connector_backward_factor`` more forwards. DeSTA2.5's perception (Whisper, connector) runs in fp32:
    ``perception_fp32`` puts its FLOPs on the fp32 matmul rate. ``transcript_*``: Whisper's decoder writing one
    transcript per distinct clip (compute per clip; weight bytes per decode step of one batched call)."""
    if hasattr(config, "llm_config"):  # DeSTA2.5
        t, a = config.llm_config, config.encoder_config
        q = config.qformer_config()
        sizes: dict[str, Any] = _llm_sizes(t)
        frames, queries, h = a.max_source_positions, config.prompt_size, q.hidden_size
        per_qformer_layer = (2 * 4 * h * h * queries + 4 * queries * queries * h  # self-attention
                             + 2 * 2 * h * h * queries + 2 * 2 * h * a.d_model * frames  # cross Q/O, K/V
                             + 4 * queries * frames * h  # cross-attention scores
                             + 2 * 2 * h * q.intermediate_size * queries)  # FFN
        taps = len(config.target_layer_ids)
        sizes["connector_flops_per_clip"] = taps * q.num_hidden_layers * per_qformer_layer \
            + 2 * a.d_model * t.hidden_size * queries
        sizes["connector_backward_factor"] = 2  # input gradients between Q-Former layers + weight gradients
        sizes["encoder_flops_per_clip"] = _encoder_flops(a, max(config.target_layer_ids) + 1)
        d = a.d_model
        decoder_layer = 8 * d * d + 2 * d * a.decoder_ffn_dim  # self Q/K/V/O + cross Q/O (+ K/V once) + FFN
        steps = int(config.transcript_max_new_tokens)
        sizes["transcript_steps"] = steps
        sizes["transcript_flops_per_clip"] = a.decoder_layers * 2 * 2 * d * d * frames + steps * (
            2 * a.decoder_layers * decoder_layer + 4 * a.decoder_layers * frames * d + 2 * d * a.vocab_size)
        sizes["transcript_bytes_per_step"] = (a.decoder_layers * (decoder_layer + 2 * d * d) + d * a.vocab_size) * 4
        sizes["perception_fp32"] = True
        return sizes
    t, a = config.text_config, config.audio_config
    sizes = _llm_sizes(t)
    sizes.update({"encoder_flops_per_clip": _encoder_flops(a, a.encoder_layers),
                  # the adapter runs the encoder only as wide as a clip needs: the floor counts its valid positions
                  "encoder_flops_at_frames": lambda frames: _encoder_flops(a, a.encoder_layers, (frames - 1) // 2 + 1),
                  "connector_flops_per_token": 2 * a.d_model * t.hidden_size, "connector_backward_factor": 1,
                  "perception_fp32": False})
    return sizes


def floor_seconds(method: str, shapes: Shapes, sizes: dict[str, Any], ceilings: dict[str, float],
                  new_tokens: int, dtype_bytes: int, hp: dict[str, Any], pre_share: float = 1,
                  post_share: float = 1) -> dict[str, float]:
    """A lower bound for one edit (see bench/NOTES.md); ``pre_share`` / ``post_share``: the edits whose questions
    one pre-edit / post-edit generation holds (a pass of K edits: its decode steps read the weights once for K).

    compute = training FLOPs (every frozen upstream part once: the encoder per clip, the layers below an edited
    layer once; per update the forward above the edited part with the LM head at target positions only, input
    gradients through the layers above it, weight gradients of the edited part; UnKE's two stages and WISE's side
    memory with their preservation prompts, below) + prefill FLOPs of the pre- and
    post-edit questions + the encoder once per distinct clip (DeSTA2.5: also one Whisper transcript per distinct
    clip; its perception FLOPs at the fp32 rate), a prefix all of an edit's questions share counted once; memory =
    per decode step of one batched pre-edit and one batched post-edit generation, the edit's share of every LLM
    weight and its KV cache (a shared prefix once) read once (DeSTA2.5: plus Whisper's decoder weights per step of
    one batched transcription of the edit's clips); optimizer = the optimizer's state traffic per step over the trained
    fp32 parameters (FT-LLM's and UnKE's layer with Adam, WISE's side memory with SGD; FT-Audio's connector is
    negligible), at the copy rate and counted in ``train_s``.

    FT-Audio: per step all layers over the edit row's columns from its first audio on (the chat template before
    it is the same whatever the connector).
    UnKE: stage 1 runs the layers above the edited one over the last prompt token and the target (``v_steps``),
    stage 2 the edited layer over the edit prompt and the preservation prompts (``optim_steps``: forward, weight
    gradients and the gradients inside the layer). WISE (``n_iter`` steps): the side memory and the layers above it
    over the edit row, and the memory's activations on the preservation prompts.
    """
    L, T, A = shapes.edit_tokens, shapes.target_tokens, shapes.audio_tokens
    layers, P, H = sizes["layers"], sizes["layer"], sizes["head"]
    steps = int(hp.get("max_steps", 0))
    connector = sizes.get("connector_flops_per_clip") or sizes.get("connector_flops_per_token", 0) * A
    train = perception = optimizer_bytes = 0.0
    R = sum(shapes.preserve_tokens)
    if method == "ft_audio":  # the columns from the first audio on (those before it never change)
        tail = L - shapes.template_tokens
        train = steps * ((2 * layers * P * tail + 2 * H * T) + (2 * layers * P * tail + 2 * H * T))
        perception = steps * (1 + sizes["connector_backward_factor"]) * connector
    elif method == "ft_llm":
        edited = int(hp.get("layer", layers - 1)) % layers
        above = layers - edited
        train = 2 * edited * P * L + steps * ((2 * above * P * L + 2 * H * T)
                                              + (2 * (above - 1) * P * L + 2 * H * T) + 2 * P * L)
        trained = {"layer": P, "mlp": 3 * sizes["mlp_out"], "mlp_out": sizes["mlp_out"]}[hp.get("params", "layer")]
        optimizer_bytes = steps * trained * ADAM_BYTES
    elif method == "unke":
        edited = int(hp["layer"]) % layers
        above, E = layers - edited - 1, L - T
        # once: the edit row (prompt + target) and the preservation prompts up to and through the edited layer, the
        # layers above over the edit prompt's columns before its last token (their keys and values)
        train = 2 * (edited + 1) * P * (L + R) + 2 * above * P * max(E - 1, 0)
        # stage 1 per step: the layers above over the last prompt token and the target, forward and input gradients
        train += int(hp["v_steps"]) * 2 * (2 * above * P * (T + 1) + 2 * H * T)
        # stage 2 per step: the edited layer over the edit prompt and the preservation prompts: forward, weight
        # gradients, and input gradients inside the layer (none to its input: it is fixed)
        train += int(hp["optim_steps"]) * 2 * (3 * P - sizes["qkv"]) * (E + R)
        optimizer_bytes = int(hp["optim_steps"]) * P * ADAM_BYTES
    elif method == "wise":
        edited = int(hp["layer"]) % layers
        above, D = layers - edited - 1, sizes["mlp_out"]
        wise_steps = int(hp.get("max_steps") or hp["n_iter"])
        # once: the edit row and the preservation prompts up to the edited layer's FFN inner activations
        train = 2 * (edited + 1) * P * (L + R)
        # per step: the side memory and the layers above over the edit row (forward, input gradients, the memory's
        # weight gradient); the memory's activations on the preservation prompts (forward, weight gradient)
        train += wise_steps * (2 * (D + above * P) * L + 2 * H * T + 2 * (above * P + D) * L + 2 * H * T + 4 * D * R)
        optimizer_bytes = wise_steps * D * SGD_BYTES
    groups = ((shapes.pre_tokens, shapes.pre_shared, pre_share), (shapes.post_tokens, shapes.post_shared, post_share))
    prefill = 2 * layers * P * sum(sum(t) - max(len(t) - 1, 0) * shared for t, shared, _ in groups)
    at_frames = sizes.get("encoder_flops_at_frames")
    if at_frames is not None and shapes.clip_frames:
        perception += sum(at_frames(frames) for frames in shapes.clip_frames)
    else:
        perception += sizes["encoder_flops_per_clip"] * shapes.distinct_clips
    perception += sizes.get("transcript_flops_per_clip", 0) * shapes.distinct_clips
    perception_rate = ceilings["matmul_fp32_flops_per_s"] if sizes["perception_fp32"] else ceilings[
        "matmul_flops_per_s"]
    compute_s = (train + prefill) / ceilings["matmul_flops_per_s"] + perception / perception_rate
    kv_bytes = sizes["kv_elements_per_token"] * dtype_bytes
    generate_bytes = sizes.get("transcript_bytes_per_step", 0) * sizes.get("transcript_steps", 0) * float(
        shapes.distinct_clips > 0)
    for prompts, shared, share in groups:
        if not prompts:
            continue
        for step in range(new_tokens):
            generate_bytes += sizes["llm_weights"] * dtype_bytes / share + kv_bytes * (
                shared + sum(p - shared + step for p in prompts))
    memory_s = generate_bytes / ceilings["copy_bytes_per_s"]
    optimizer_s = optimizer_bytes / ceilings["copy_bytes_per_s"]
    modelled = method in TRAINING_MODELLED or not steps  # no steps: no training (IKE methods)
    return {"train_flops": train, "prefill_flops": prefill, "perception_flops": perception,
            "generate_bytes": generate_bytes, "optimizer_bytes": optimizer_bytes, "compute_s": compute_s,
            "memory_s": memory_s, "optimizer_s": optimizer_s,
            "train_s": train / ceilings["matmul_flops_per_s"] + optimizer_s,
            "prefill_s": prefill / ceilings["matmul_flops_per_s"], "perception_s": perception / perception_rate,
            "floor_s": compute_s + memory_s + optimizer_s, "train_modelled": float(modelled)}


#: the methods whose training :func:`floor_seconds` models (KE and MEND: their hypernetworks are not)
TRAINING_MODELLED = ("ft_audio", "ft_llm", "unke", "wise")
#: bytes an optimizer step moves per trained fp32 parameter: Adam reads the weight, its gradient and two moments and
#: writes the weight and the moments (7 x 4); SGD reads the weight and its gradient and writes the weight (3 x 4)
ADAM_BYTES, SGD_BYTES = 28, 12

FLOOR_KEYS = ("train_flops", "prefill_flops", "perception_flops", "generate_bytes", "optimizer_bytes", "compute_s",
              "memory_s", "optimizer_s", "train_s", "prefill_s", "perception_s", "floor_s", "train_modelled")


def generation_shares(passes: list[int], ahead: int) -> tuple[list[int], list[int]]:
    """Per edit of a run whose passes held ``passes`` edits: how many edits its pre-edit generation held (the runner
    generates the pre-edit outputs of the next max(pass, ``ahead``) edits whenever a pass lacks them;
    ``editors.run.PRE_EDIT_AHEAD``) and how many its post-edit generation held (its pass)."""
    total, pre, post, covered, start = sum(passes), [], [], 0, 0
    for k in passes:
        if start + k > covered:
            group = min(max(k, ahead), total - start)
            pre += [group] * (start + group - covered)
            covered = start + group
        post += [k] * k
        start += k
    return pre, post


def mean_floor(bench: Bench, method: str, shapes: list[Shapes], ceilings: dict[str, float],
               mean_steps: float | None = None, passes: list[int] | None = None) -> dict[str, float]:
    """:func:`floor_seconds` averaged over the edits of ``shapes`` (:func:`run_shapes`; ``mean_steps``: the updates
    the runner made, early stops included, in place of the hparams' ``max_steps``; ``passes``: the edits of each
    pass the runner made, default one edit at a time)."""
    from editors.run import PRE_EDIT_AHEAD

    pre_shares, post_shares = generation_shares(passes or [1] * len(shapes), PRE_EDIT_AHEAD)
    hp = bench.hparams(method).as_dict()
    if mean_steps:
        hp["max_steps"] = mean_steps
    sizes = model_sizes(bench.adapter.model.config)
    dtype_bytes = torch.finfo(bench.scale.dtype).bits // 8
    floors = [floor_seconds(method, sh, sizes, ceilings, bench.max_new_tokens, dtype_bytes, hp, pre, post)
              for sh, pre, post in zip(shapes, pre_shares, post_shares)]
    return {k: float(np.mean([f[k] for f in floors])) for k in FLOOR_KEYS}
