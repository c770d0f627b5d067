"""Editing throughput at full model scale: our runner's single-editing path against a naive loop.

Builds Qwen2-Audio-7B-Instruct's real architecture from its published config with random bf16 weights on the
GPU (no download), or with ``--model desta25`` DeSTA2.5-Audio's (Llama-3.1-8B in bf16 + Whisper-large-v3 and the
Q-Former connector in fp32, ``DeSTA25Adapter.random_full_size``), makes SAKE-shaped edit instances with
synthetic 5-16 s audio (1 edit + 10 linked items, ~30-token questions), and times, per method, on the same instances with the same hyperparameters
(``editors/hparams/<method>.yaml``) and the same ``max_new_tokens`` (EOS disabled in both arms, so every
generation runs to the bound):

* ours: ``editors.run.Runner(args, adapter=...).run()``, the object ``python -m editors.run`` builds, in single
  mode (pre-edit outputs through its cache, apply, one batched evaluation, exact restore, predictions JSONL);
  only the dataset loader is swapped for in-memory rows (``InMemoryRows``), as ``datasets`` would hand them over;
* naive: pre-edit and post-edit outputs with one ``generate`` per question from processor inputs (the audio
  encoder runs in every prefill), the edit with Adam on the method's touched parameters where every step runs
  the whole model from the audio features (encoder recomputed), and restore by ``load_state_dict`` of a deep
  copy of the touched tensors. Prompts come from the same adapter/method, so both arms see the same tokens.
  DeSTA2.5 has no HF processor: its naive question runs the adapter on that one question with every audio cache
  dropped first (Whisper transcript + encoder taps recomputed per call, as the release's ``generate`` does), its
  naive FT step drops the encoder states (taps recomputed, transcript kept) and takes the LLM's full-sequence
  HF loss.

It also measures the device ceilings (bf16 matmul 8192^3, device-to-device copy), estimates a floor per method
(training FLOPs / matmul rate + generation bytes / bandwidth) and writes ``bench/RESULTS.md``.

``--tiny`` runs the same code on CPU with the adapter's tiny random model (smoke mode for tests)::

    python -m bench.edit_throughput --tiny --edits 1 --methods ft_audio,i_ike --out /tmp/RESULTS.md
    python -m bench.edit_throughput --tiny --model desta25 --edits 1 --methods ft_audio --out /tmp/RESULTS.md

On a GPU::

    python -m bench.edit_throughput --methods ft_audio,ft_llm,i_ike --edits 8 --max-new-tokens 32
    python -m bench.edit_throughput --model desta25 --methods ft_audio,ft_llm,i_ike --edits 2

``--model desta25`` writes its results as a DeSTA section appended to ``--out`` (replacing an earlier DeSTA
section, keeping everything else); the Qwen2-Audio writer keeps an existing DeSTA section.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import logging
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from sake.atomic import atomic_write
from sake.protocol import ATTRIBUTES, FAMILY_NAMES, SAMPLING_RATE
from sake.protocol import LABELS as PROTOCOL_LABELS

LOG = logging.getLogger("bench.edit_throughput")

# --------------------------------------------------------------------------------------------------------------
# Published figures
# --------------------------------------------------------------------------------------------------------------

#: Paper Table 7, Qwen2-Audio, single editing: wall-clock of the whole test split on one H100.
PAPER_TABLE7_QWEN_SINGLE: dict[str, str] = {
    "ft_llm": "2h35m",
    "ft_audio": "3h00m",
    "ke": "4h50m",
    "mend": "2h10m",
    "unke": "1h35m",
    "i_ike": "3h00m",
    "ie_ike": "2h00m",
    "wise": "3h00m",
}
#: Paper Table 7, DeSTA2.5-Audio, single editing (same 1,200 edits, one H100).
PAPER_TABLE7_DESTA_SINGLE: dict[str, str] = {
    "ft_llm": "5h50m",
    "ft_audio": "4h20m",
    "ke": "8h40m",
    "mend": "4h00m",
    "unke": "3h00m",
    "i_ike": "6h00m",
    "ie_ike": "3h20m",
    "wise": "6h10m",
}
#: --model choice -> its Table 7 single-editing rows.
PAPER_TABLE7_SINGLE: dict[str, dict[str, str]] = {"qwen2_audio": PAPER_TABLE7_QWEN_SINGLE,
                                                   "desta25": PAPER_TABLE7_DESTA_SINGLE}
#: Single edits those times cover (300 test instances x 4 attributes).
PAPER_EDITS = 1200


def paper_seconds_per_edit(method: str, model: str = "qwen2_audio") -> float | None:
    """Table 7's wall-clock for ``method`` on ``model`` over the 1,200 edits it covers, or None if not listed."""
    text = PAPER_TABLE7_SINGLE[model].get(method)
    if text is None:
        return None
    hours, minutes = text.rstrip("m").split("h")
    return (int(hours) * 3600 + int(minutes) * 60) / PAPER_EDITS


#: Qwen2-Audio-7B-Instruct config.json (public model card). Its text_config leaves the geometry that equals
#: Qwen2Config's historical defaults implicit (hidden 4096, 32 layers, 32 heads, 32 KV heads); written out here.
QWEN2_AUDIO_7B: dict[str, Any] = {
    "audio_token_index": 151646,
    "audio_config": {
        "num_mel_bins": 128,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "d_model": 1280,
        "activation_function": "gelu",
        "scale_embedding": False,
        "max_source_positions": 1500,
    },
    "text_config": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 156032,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "pad_token_id": 151643,
    },
}

#: Qwen2-Audio's chat special tokens in id order from <|endoftext|> = 151643.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
SAMPLE_RATE = SAMPLING_RATE
#: The runner's --model name per bench model and scale (family_of() resolves each without network access).
MODEL_NAMES = {"qwen2_audio": {"full": "Qwen/Qwen2-Audio-7B-Instruct", "tiny": "tiny-qwen2-audio"},
               "desta25": {"full": "DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B", "tiny": "tiny-desta25"}}
#: Words for the report.
MODEL_TITLES = {"qwen2_audio": {"full": "Qwen2-Audio-7B-Instruct architecture", "tiny": "tiny Qwen2-Audio"},
                "desta25": {"full": "DeSTA2.5-Audio architecture (Llama-3.1-8B-Instruct + Whisper-large-v3 + "
                                    "2-layer Q-Former, 64 prompts on encoder layers 7/15/23/31)",
                            "tiny": "tiny DeSTA2.5-Audio"}}
PAPER_MODEL_NAMES = FAMILY_NAMES


@dataclasses.dataclass(frozen=True)
class Scale:
    """What differs between the full-size GPU run and the CPU smoke mode."""

    name: str  # "full" or "tiny"
    device: str
    dtype: torch.dtype
    audio_seconds: tuple[float, float]  # clip length range
    hparam_overrides: tuple[str, ...] = ()  # KEY=VALUE for both arms (tiny: few steps)


def full_scale() -> Scale:
    """Qwen2-Audio-7B-Instruct in bf16 on the GPU, 5-16 s clips, the hparams files' values."""
    return Scale("full", "cuda", torch.bfloat16, (5.0, 16.0))


def tiny_scale() -> Scale:
    """The adapter's tiny random model in fp32 on the CPU, 0.5-1.9 s clips, 3 training steps."""
    return Scale("tiny", "cpu", torch.float32, (0.5, 1.9), ("max_steps=3",))


# --------------------------------------------------------------------------------------------------------------
# Model, tokenizer, processor, adapter (all offline)
# --------------------------------------------------------------------------------------------------------------


def model_config(values: dict[str, Any]) -> Any:
    """A ``Qwen2AudioConfig`` from plain values such as :data:`QWEN2_AUDIO_7B`."""
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2Config

    text = dict(values["text_config"])
    rope_theta = text.pop("rope_theta")
    text_config = Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    audio_config = Qwen2AudioEncoderConfig(**values["audio_config"])
    return Qwen2AudioConfig(audio_config=audio_config.to_dict(), text_config=text_config.to_dict(),
                            audio_token_index=values["audio_token_index"])


def build_offline_tokenizer(vocab_size: int, first_special_id: int, words: Sequence[str]) -> Any:
    """A word-level fast tokenizer over exactly ``vocab_size`` ids, chat tokens at Qwen2-Audio's ids.

    Only ids and counts matter for timing: ``words`` (lower case) get their own ids, every other id is a filler
    token, so any generated id decodes to one whitespace-separated word.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if first_special_id + len(SPECIAL_TOKENS) > vocab_size:
        raise ValueError(f"special ids from {first_special_id} do not fit a vocab of {vocab_size}")
    vocab: dict[str, int] = {"<unk>": 0}
    for word in sorted(set(words)):
        if len(vocab) < first_special_id and word not in vocab:
            vocab[word] = len(vocab)
    for index in range(len(vocab), first_special_id):
        vocab[f"<t{index}>"] = index
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = first_special_id + offset
    for index in range(first_special_id + len(SPECIAL_TOKENS), vocab_size):
        vocab[f"<t{index}>"] = index
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>")
    tokenizer.padding_side = "left"
    return tokenizer


def build_processor(tokenizer: Any, chat_template: str) -> Any:
    """Qwen2-Audio's processor: 128-bin Whisper features over 30 s windows + the offline tokenizer."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, hop_length=160,
                                       chunk_length=30, n_fft=400)
    tokenizer.chat_template = chat_template
    return Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=chat_template)


def build_model_7b(seed: int) -> Any:
    """Random-weight Qwen2-Audio-7B built directly on the GPU in bf16."""
    from transformers import Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    config = model_config(QWEN2_AUDIO_7B)
    with torch.device("cuda"):
        model = Qwen2AudioForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model


def bench_adapter_class(model: str = "qwen2_audio") -> type:
    """The runner's adapter of ``model`` with EOS disabled: its stop id is one the model cannot emit (= the LLM's
    vocab size), so every generation of either arm runs to ``max_new_tokens``. Nothing else changes."""
    if model == "desta25":
        from editors.models.desta25 import DeSTA25Adapter

        class NoEosDeSTA25Adapter(DeSTA25Adapter):
            @property
            def stop_token_ids(self) -> list[int]:
                return [int(self.model.config.llm_config.vocab_size)]

        return NoEosDeSTA25Adapter
    from editors.models.qwen2_audio import Qwen2AudioAdapter

    class NoEosQwen2AudioAdapter(Qwen2AudioAdapter):
        @property
        def stop_token_ids(self) -> list[int]:
            return [int(self.model.config.text_config.vocab_size)]

    return NoEosQwen2AudioAdapter


def generation_owner(adapter: Any) -> Any:
    """The module whose ``generation_config`` the adapter's generation uses (DeSTA2.5: its Llama)."""
    return adapter.model.llm_model if getattr(adapter, "family", "") == "desta25" else adapter.model


def build_adapter(scale: Scale, seed: int, model: str = "qwen2_audio") -> Any:
    """The bench's adapter: the full-size architecture on the GPU, or the adapter's own tiny model on the CPU."""
    cls = bench_adapter_class(model)
    started = time.perf_counter()
    if scale.name == "tiny":
        adapter = cls.tiny(seed, dtype=scale.dtype, device=scale.device)
    elif model == "desta25":  # LLM in the scale's dtype, Whisper + connector fp32 (as the release)
        adapter = cls.random_full_size(seed, dtype=scale.dtype, device=scale.device)
    else:
        from editors.models.qwen2_audio import TINY_CHAT_TEMPLATE  # the Qwen2-Audio-Instruct chat format

        text = QWEN2_AUDIO_7B["text_config"]
        tokenizer = build_offline_tokenizer(text["vocab_size"], text["bos_token_id"], vocab_words())
        processor = build_processor(tokenizer, TINY_CHAT_TEMPLATE)
        model = build_model_7b(seed)
        adapter = cls(model, processor, model_id="Qwen2-Audio-7B-Instruct architecture (random bf16 weights)")
    generation_owner(adapter).generation_config.eos_token_id = None
    generation_owner(adapter).generation_config.pad_token_id = adapter.pad_token_id
    _sync(scale.device)
    LOG.info("built %s %s adapter: %.2f B parameters, %s on %s in %.1f s", scale.name,
             model, sum(p.numel() for p in adapter.model.parameters()) / 1e9, scale.dtype, scale.device,
             time.perf_counter() - started)
    return adapter


# --------------------------------------------------------------------------------------------------------------
# SAKE-shaped synthetic instances (ARCHITECTURE.md "Dataset")
# --------------------------------------------------------------------------------------------------------------

LABELS = {attribute: list(labels) for attribute, labels in PROTOCOL_LABELS.items()}  # sake.protocol
QUESTIONS = {
    "rel": "Listen to the recording carefully. What {attr} does the audio clip express? "
           "Choose the single best answer from these options: {opts}.",
    "gen1": "Based on what you hear in this clip, which {attr} best describes it? "
            "Pick one of the following options: {opts}.",
    "loc": "Listen to this audio clip carefully. Which of the following describes its {attr} best? "
           "Select one answer from the options: {opts}.",
    "port": "Think about the {attr} heard in this recording. Which option is most closely associated with it "
            "in the real world? Options: {opts}.",
    "mmlu": "Which of the following statements about the boiling point of water at sea level is correct? "
            "(a) it is 50 degrees Celsius (b) it is 100 degrees Celsius (c) it is 150 degrees Celsius "
            "(d) it is 200 degrees Celsius",
}


def vocab_words() -> list[str]:
    """Words of the synthetic prompts and the methods' templates (so prompts map to distinct ids)."""
    text = " ".join(list(QUESTIONS.values()) + [w for labels in LABELS.values() for w in labels]
                    + ["you are a helpful assistant apply the following knowledge updates when answering "
                       "questions about audio new fact speaker emotion animal sound gender spoken language "
                       "that used to perceive as must now be perceived whenever would answer for such instead "
                       "user system assistant"])
    return sorted(set(re.findall(r"\w+|[^\w\s]+", text.lower())))  # the pre-tokenizer's split


def _options(options: Sequence[str]) -> str:
    return " ".join(f"({chr(97 + i)}) {o}" for i, o in enumerate(options))


def synthetic_audio(rng: np.random.Generator, seconds: tuple[float, float]) -> dict[str, Any]:
    """A clip of random length in ``seconds``: three tones plus noise, float32 at 16 kHz, as ``datasets``
    decodes an Audio column."""
    duration = float(rng.uniform(*seconds))
    t = np.arange(int(duration * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    signal = sum(0.1 * np.sin(2 * np.pi * float(rng.uniform(100, 2000)) * t) for _ in range(3))
    signal = signal + 0.02 * rng.standard_normal(t.shape[0]).astype(np.float32)
    return {"array": np.asarray(signal, dtype=np.float32), "sampling_rate": SAMPLE_RATE}


def synthetic_instance(rng: np.random.Generator, attribute: str, split: str, index: int,
                       seconds: tuple[float, float]) -> dict[str, Any]:
    """One instance row: reliability + 3 generality + 4 audio locality + 1 text locality + 1 portability."""
    labels = LABELS[attribute]
    first, second = rng.choice(len(labels), size=2, replace=False)
    original, target = labels[int(first)], labels[int(second)]
    others = [a for a in ATTRIBUTES if a != attribute]
    instance_id = f"{attribute}/{split}/{index:06d}"

    def item(kind: str, template: str, probe: str, answer: str, item_type: int, audio: dict | None) -> dict:
        row = {"id": f"{instance_id}/{kind}", "type": item_type,
               "question": QUESTIONS[template].format(attr=probe, opts=_options(LABELS.get(probe, []))),
               "options": list(LABELS.get(probe, [])), "answer": answer, "attribute": probe, "label": answer,
               "category": "", "source": "synthetic"}
        if audio is not None:
            row["audio"] = audio
        return row

    edit_audio = synthetic_audio(rng, seconds)
    generality = [item("gen1", "gen1", attribute, target, 1, edit_audio)]
    generality += [item(f"gen{k}", "rel", attribute, target, k, synthetic_audio(rng, seconds)) for k in (2, 3)]
    locality_audio = []
    for k in (1, 2, 3, 4):
        probe = others[(k - 1) % len(others)]
        locality_audio.append(item(f"loc_audio{k}", "loc", probe, LABELS[probe][0], k, synthetic_audio(rng, seconds)))
    text_item = {"id": f"{instance_id}/loc_text", "type": 0, "question": QUESTIONS["mmlu"],
                 "options": ["50", "100", "150", "200"], "answer": "100", "attribute": "mmlu:physics", "label": "",
                 "category": "", "source": "synthetic"}
    portability = item("port", "port", attribute, target, 0, edit_audio)
    portability["category"] = "synthetic"
    return {"id": instance_id, "attribute": attribute, "split": split, "original_label": original,
            "target_label": target, "audio": edit_audio,
            "question": QUESTIONS["rel"].format(attr=attribute, opts=_options(labels)), "options": list(labels),
            "answer": target, "generality": generality, "locality_audio": locality_audio,
            "locality_text": [text_item], "portability": [portability] if split == "test" else []}


class InMemoryRows:
    """The slice of ``datasets.Dataset`` the runner uses (``.data`` Arrow table, ``len``, ``ds[i]``), over rows
    held in memory with decoded audio: what ``load_instances`` returns, minus decoding and disk."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        self.rows = rows
        columns: dict[str, Any] = {"id": pa.array([r["id"] for r in rows], type=pa.string())}
        for column in ("generality", "locality_audio", "locality_text", "portability"):
            columns[column] = pa.array([[{"id": it["id"]} for it in r[column]] for r in rows],
                                       type=pa.list_(pa.struct([("id", pa.string())])))
        self.data = pa.table(columns)
        self.column_names = list(rows[0]) if rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def select_columns(self, columns: Sequence[str]) -> "InMemoryRows":
        """Rows restricted to ``columns`` (as ``datasets.Dataset.select_columns``)."""
        view = InMemoryRows.__new__(InMemoryRows)
        view.rows = [{c: row[c] for c in columns} for row in self.rows]
        view.data, view.column_names = self.data, list(columns)
        return view


@dataclasses.dataclass
class SyntheticDataset:
    """Seeded test and train rows per attribute, served to the runner in place of ``load_instances``."""

    root: Path  # a local folder (holds sake_manifest.json) so the runner treats the dataset as local
    rows: dict[tuple[str, str], list[dict[str, Any]]]

    @classmethod
    def make(cls, root: Path, per_attribute: int, train_per_attribute: int, seed: int,
             seconds: tuple[float, float]) -> "SyntheticDataset":
        rng = np.random.default_rng(seed)
        rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for split, count in (("test", per_attribute), ("train", train_per_attribute)):
            for attribute in ATTRIBUTES:
                rows[(attribute, split)] = [synthetic_instance(rng, attribute, split, i, seconds)
                                            for i in range(count)]
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / "sake_manifest.json", json.dumps({"format": 1, "seed": seed,
                                                              "fingerprint": f"bench-synthetic-seed{seed}"}))
        return cls(root=root, rows=rows)

    def load(self, dataset: str, config: str, split: str) -> InMemoryRows:
        """Stand-in for ``editors.data.load_instances`` (same arguments)."""
        if Path(dataset) != self.root or (config, split) not in self.rows:
            raise ValueError(f"bench dataset has no {config}/{split} at {dataset}")
        return InMemoryRows(self.rows[(config, split)])

    def ordered(self, configs: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """Test rows in the runner's unit order (config by config, first ``limit`` rows each)."""
        return [row for config in configs for row in self.rows[(config, "test")][:limit]]

    @contextlib.contextmanager
    def serving(self, run_module: Any) -> Iterator[None]:
        """Route the runner module's dataset loader to these rows for the duration of the block."""
        original = run_module.load_instances
        run_module.load_instances = self.load
        try:
            yield
        finally:
            run_module.load_instances = original


# --------------------------------------------------------------------------------------------------------------
# Shared instrumentation
# --------------------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forget_audio(adapter: Any, transcripts: bool = True) -> None:
    """Drop the adapter's cached encoder states and, with ``transcripts``, DeSTA2.5's in-memory Whisper
    transcripts (the bench starts every arm without them; its naive DeSTA loop recomputes them per question)."""
    adapter.clear_audio_cache()
    if transcripts and isinstance(getattr(adapter, "_transcripts", None), dict):
        adapter._transcripts.clear()


class GenerateCounter:
    """Counts ``model.generate`` calls, rows and new tokens (wraps the bound method; no device sync)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original = model.generate
        model.generate = self
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.sequences = 0
        self.new_tokens: set[int] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.original(*args, **kwargs)
        prompt = kwargs.get("input_ids")
        new = out.shape[1] - (prompt.shape[1] if prompt is not None else 0)
        self.calls += 1
        self.sequences += int(out.shape[0])
        self.new_tokens.add(int(new))
        return out

    def summary(self, edits: int) -> dict[str, Any]:
        return {"generate_calls_per_edit": round(self.calls / max(edits, 1), 2),
                "sequences_per_edit": round(self.sequences / max(edits, 1), 2),
                "new_tokens": sorted(self.new_tokens)}


@dataclasses.dataclass
class ArmResult:
    """Per-edit wall-clock seconds of the timed edits of one arm, its peak GPU memory and counters."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def per_edit(self) -> float | None:
        return float(np.mean(self.seconds)) if self.seconds else None


@dataclasses.dataclass
class Bench:
    """What both arms share in one process."""

    scale: Scale
    adapter: Any
    dataset: SyntheticDataset
    counter: GenerateCounter
    max_new_tokens: int
    seed: int
    workdir: Path
    model: str = "qwen2_audio"  # the --model choice: qwen2_audio or desta25

    @property
    def model_name(self) -> str:
        return MODEL_NAMES[self.model][self.scale.name]

    def overrides(self, method: str) -> list[str]:
        """The scale's KEY=VALUE overrides that ``method``'s hparams file defines (both arms get them)."""
        from editors.hparams import load_hparams

        known = load_hparams(method, self.adapter.family, tiny=self.adapter.is_tiny)
        return [o for o in self.scale.hparam_overrides if o.split("=", 1)[0] in known]

    def hparams(self, method: str) -> dict[str, Any]:
        from editors.hparams import load_hparams

        return load_hparams(method, self.adapter.family, tiny=self.adapter.is_tiny, overrides=self.overrides(method))

    def editor(self, method: str) -> Any:
        """A fresh editor of ``method`` (the runner's registry), with this dataset's rows for IE-IKE."""
        from editors.base import RunContext, get_editor_class

        context = RunContext(seed=self.seed, cache_dir=str(self.workdir / "naive-cache"),
                             load_rows=lambda config, split: self.dataset.load(str(self.dataset.root), config, split),
                             model_name=self.model_name)
        editor = get_editor_class(method)(self.adapter, self.hparams(method), context)
        editor.setup()
        return editor

    def start_arm(self, keep_transcripts: bool = False) -> None:
        """Same starting state for every arm: no cached audio states (nor DeSTA2.5 transcripts, unless
        ``keep_transcripts``), empty allocator cache, peak reset."""
        forget_audio(self.adapter, transcripts=not keep_transcripts)
        self.counter.reset()
        if self.scale.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.scale.device == "cuda" else None


def plan_units(edits: int, warmup: int) -> tuple[list[str], int]:
    """Configs and per-config limit so the runner's plan has at least ``warmup + edits`` units."""
    total = warmup + edits
    limit = math.ceil(total / len(ATTRIBUTES))
    return list(ATTRIBUTES[: math.ceil(total / limit)]), limit


# --------------------------------------------------------------------------------------------------------------
# Our arm: the runner's single-editing path
# --------------------------------------------------------------------------------------------------------------


def runner_pass(bench: Bench, method: str, edits: int, warmup: int, cache: Path, out: Path,
                extra_argv: Sequence[str] = (), keep_transcripts: bool = False) -> tuple[ArmResult, Any]:
    """One ``Runner(args, adapter).run()`` in single mode over the synthetic dataset (predictions to ``out``,
    pre-edit cache under ``cache``); per-edit seconds are the runner's own per-unit wall-clock (row fetch ->
    predictions appended), the first ``warmup`` units untimed. ``keep_transcripts``: DeSTA2.5's transcripts of
    an earlier pass stay (as its on-disk transcript cache would give a later run). Returns the result and the
    runner."""
    from editors import run as run_module

    configs, limit = plan_units(edits, warmup)
    out.unlink(missing_ok=True)  # a leftover file would make the runner resume (skip units)
    argv = ["--model", bench.model_name, "--method", method, "--dataset", str(bench.dataset.root),
            "--split", "test", "--mode", "single", "--out", str(out), "--limit", str(limit),
            "--max-new-tokens", str(bench.max_new_tokens), "--cache-dir", str(cache),
            "--seed", str(bench.seed), "--no-progress"]
    for config in configs:
        argv += ["--config", config]
    for override in bench.overrides(method):
        argv += ["--hparam", override]
    args = run_module.build_parser().parse_args(argv + list(extra_argv))
    result = ArmResult()
    with bench.dataset.serving(run_module):
        runner = run_module.Runner(args, adapter=bench.adapter)
        bench.start_arm(keep_transcripts)
        encoder_before = bench.adapter.audio_encoder_calls
        runner.run()
        _sync(bench.scale.device)
    result.peak_bytes = bench.peak()
    units = runner.stats.per_unit
    result.seconds = [float(u["seconds"]) for u in units[warmup: warmup + edits]]
    n = max(len(units), 1)
    s = runner.stats
    with open(out, encoding="utf-8") as handle:
        prediction_rows = sum(1 for line in handle if '"kind": "prediction"' in line)
    result.info = {
        "timed_edits": len(result.seconds),
        "units_run": len(units),
        "steps": sorted({u.get("steps") for u in units if u.get("steps") is not None}),
        "mean_steps": float(np.mean([u["steps"] for u in units if u.get("steps") is not None] or [0])),
        "per_edit_split_s_incl_warmup": {"pre_edit": round(s.preedit_s / n, 4), "apply": round(s.apply_s / n, 4),
                             "evaluate": round(s.eval_s / n, 4),
                             "other": round((sum(float(u["seconds"]) for u in units) - s.preedit_s - s.apply_s
                                             - s.eval_s) / n, 4)},
        "audio_encoder_calls_per_edit": round((bench.adapter.audio_encoder_calls - encoder_before) / n, 2),
        "prediction_rows": prediction_rows,
        "preedit_cache_hits": runner.preedit.hits,
        **bench.counter.summary(len(units)),
    }
    return result, runner


def run_ours(bench: Bench, method: str, edits: int, warmup: int, profile: bool) -> tuple[ArmResult, ArmResult]:
    """The runner twice over the same instances: with a fresh pre-edit cache (cold: pays the unedited outputs,
    as a first method on a model does) and again with that cache filled (warm: every later method on the same
    model; DeSTA2.5's transcripts of the cold pass kept, as its transcript cache on disk keeps them). With
    ``profile``, one more instance's phases run under the profiler (``profile_unit``)."""
    cache = bench.workdir / f"cache-{method}"
    shutil.rmtree(cache, ignore_errors=True)
    one = ["--edits-per-pass", "1"]  # one edit at a time (the runner's CUDA default batches; see run_batched)
    cold, _ = runner_pass(bench, method, edits, warmup, cache, bench.workdir / f"ours-{method}.jsonl", one)
    LOG.info("ours/%s cold cache: %s s/edit", method, _fmt(cold.per_edit, ".3f"))
    warm, runner = runner_pass(bench, method, edits, warmup, cache, bench.workdir / f"ours-warm-{method}.jsonl",
                               one, keep_transcripts=True)
    LOG.info("ours/%s warm cache: %s s/edit", method, _fmt(warm.per_edit, ".3f"))
    if profile and bench.scale.device == "cuda":
        configs, limit = plan_units(edits, warmup)
        extra = bench.dataset.rows[(configs[0], "test")][limit]  # an instance no pass has seen
        cold.info["profile"] = profile_unit(bench, runner, extra)
    return cold, warm


def batched_plan(edits: int, k: int) -> tuple[int, int]:
    """(warm-up, timed edits) of a ``--edits-per-pass k`` arm: one untimed pass, then whole passes covering at
    least ``edits`` edits."""
    return k, k * math.ceil(max(edits, k) / k)


def run_batched(bench: Bench, method: str, edits: int, k: int) -> dict[str, Any]:
    """The runner with ``--edits-per-pass k`` and a fresh pre-edit cache (cold, as the ``ours`` column): one
    untimed pass, then whole timed passes (a unit's seconds = its pass's wall-clock / k)."""
    warmup, timed = batched_plan(edits, k)
    cache = bench.workdir / f"cache-{method}-k{k}"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        result, runner = runner_pass(bench, method, timed, warmup, cache, bench.workdir / f"ours-{method}-k{k}.jsonl",
                                     ["--edits-per-pass", str(k)])
        used = runner.edits_per_pass
    except Exception as error:  # noqa: BLE001 - e.g. out of memory at a large K: record it, go on
        LOG.warning("%s, %d edits per pass: %s", method, k, error)
        if bench.scale.device == "cuda":
            torch.cuda.empty_cache()
        return {"k": k, "error": f"{type(error).__name__}: {str(error)[:160]}"}
    LOG.info("ours/%s, %d edits per pass: %s s/edit", method, k, _fmt(result.per_edit, ".3f"))
    return {"k": k, "k_used": used, "s_per_edit": result.per_edit, "timed_edits": len(result.seconds),
            "peak_gib": result.peak_bytes / 2**30 if result.peak_bytes else None, "info": result.info}


def render_batched(rows: list[dict[str, Any]]) -> list[str]:
    """The edits-per-pass table (K = 1 and the larger K of each method)."""
    names = ["method", "edits per pass K", "s/edit", "edits/hour", "K=1 / this", "paper s/edit", "paper/ours",
             "peak GiB", "per edit: pre-edit / apply / evaluate s"]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(["---"] * len(names)) + "|"]
    for r in rows:
        base = next((b.get("s_per_edit") for b in r.get("batched", []) if b["k"] == 1), None)
        for b in r.get("batched", []):
            s = b.get("s_per_edit")
            if s is None:
                lines.append(f"| {r['method']} | {b['k']} | {b.get('error', 'n/a')} |" + " |" * (len(names) - 3))
                continue
            split = b["info"].get("per_edit_split_s_incl_warmup", {})
            cells = [r["method"], f"{b['k']}" + (f" (ran {b['k_used']})" if b.get("k_used") != b["k"] else ""),
                     _fmt(s, ".3f"), _fmt(3600 / s, ".0f"), _fmt(base / s if base else None, ".1f", "x"),
                     _fmt(r["paper"], ".2f"), _fmt(r["paper"] / s if r["paper"] else None, ".1f", "x"),
                     _fmt(b.get("peak_gib"), ".1f"),
                     " / ".join(_fmt(split.get(x), ".3f") for x in ("pre_edit", "apply", "evaluate"))]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def profile_unit(bench: Bench, runner: Any, row: dict[str, Any]) -> dict[str, Any]:
    """The runner's four steps of one single edit (``pre_edit_outputs``, ``apply``, ``evaluate``, ``restore``,
    as ``Runner._run_single`` calls them) each under ``torch.profiler``: wall-clock, GPU busy time (sum of kernel
    and copy times), kernel launches, host synchronisations, device-to-host copies, top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from editors.base import EditRequest
    from editors.data import eval_items

    edit = EditRequest.from_row(row)
    items = eval_items(row)
    phases: dict[str, Any] = {}

    def measure(name: str, fn: Callable[[], Any]) -> None:
        _sync(bench.scale.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            fn()
            _sync(bench.scale.device)
            wall = time.perf_counter() - started
        events = prof.key_averages()

        def device_us(e: Any) -> float:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

        gpu = [e for e in events if e.device_type == DeviceType.CUDA]
        count = lambda pred: int(sum(e.count for e in events if pred(e.key)))  # noqa: E731
        phases[name] = {
            "wall_s": round(wall, 4),
            "gpu_busy_s": round(sum(device_us(e) for e in gpu) / 1e6, 4),
            "kernel_launches": count(lambda k: "LaunchKernel" in k),
            "host_syncs": count(lambda k: k in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                "cudaEventSynchronize")),
            "d2h_copies": count(lambda k: "DtoH" in k or "Device -> Pageable" in k),
            "top_kernels": [[e.key[:60], round(device_us(e) / 1e3, 1)]
                            for e in sorted(gpu, key=device_us, reverse=True)[:3]],
        }

    measure("pre_edit", lambda: runner.pre_edit_outputs(items))
    measure("apply", lambda: runner.apply(edit, 10_000))
    measure("evaluate", lambda: runner.evaluate(edit, items))
    measure("restore", runner.restore)
    for name, values in phases.items():
        LOG.info("profile %s/%s: %s", runner.args.method, name, values)
    return phases


# --------------------------------------------------------------------------------------------------------------
# The naive arm
# --------------------------------------------------------------------------------------------------------------


def processor_inputs(bench: Bench, prompt: Any, target: str | None = None) -> dict[str, Any]:
    """Model inputs for one prompt through the HF processor (audio features for the encoder, no cache); with
    ``target``, its token ids (as the adapter scores them) appended and labelled."""
    adapter = bench.adapter
    kwargs: dict[str, Any] = {"text": [adapter.render(prompt)], "return_tensors": "pt"}
    audios = prompt.audios()
    if audios:
        kwargs["audio"] = audios
        kwargs["sampling_rate"] = SAMPLE_RATE
    encoded = adapter.processor(**kwargs)
    inputs = {k: v for k, v in encoded.items() if torch.is_tensor(v)}
    if target is not None:
        target_ids = torch.tensor([adapter.target_token_ids(target)], dtype=torch.long)
        prompt_len = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], target_ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, prompt_len:] = target_ids
        inputs["labels"] = labels
    return {k: v.to(bench.scale.device) for k, v in inputs.items()}


def naive_generate_each(bench: Bench, prompts: Sequence[Any]) -> list[Any]:
    """One ``generate`` per prompt, the audio encoder inside each prefill; returns the new token ids (DeSTA2.5:
    the decoded answers)."""
    adapter = bench.adapter
    outputs = []
    if bench.model == "desta25":  # no HF processor: the adapter on one question, every audio cache dropped first
        for prompt in prompts:
            forget_audio(adapter)
            outputs.append(adapter.generate([prompt], max_new_tokens=bench.max_new_tokens))
        return outputs
    with torch.no_grad():
        for prompt in prompts:
            inputs = processor_inputs(bench, prompt)
            generated = adapter.model.generate(**inputs, max_new_tokens=bench.max_new_tokens, do_sample=False,
                                               num_beams=1, eos_token_id=adapter.stop_token_ids,
                                               pad_token_id=adapter.pad_token_id)
            outputs.append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    return outputs


def naive_finetune(bench: Bench, params: dict[str, torch.nn.Parameter], edit: Any, hp: dict[str, Any]) -> int:
    """Adam on ``params`` (in their dtype) for at most ``max_steps`` updates; every step runs the whole model
    from the audio features (encoder recomputed) with HF's full-sequence loss and checks early stop on the host."""
    adapter = bench.adapter
    if bench.model == "desta25":
        def loss_of_step() -> torch.Tensor:  # taps recomputed (transcript kept), the LLM's full-sequence HF loss
            forget_audio(adapter, transcripts=False)
            batch = adapter.prepare([edit.prompt()], [edit.target])
            return generation_owner(adapter)(inputs_embeds=adapter.input_embeds(batch),
                                             attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                                             labels=batch.labels, use_cache=False).loss
    else:
        inputs = processor_inputs(bench, edit.prompt(), target=edit.target)

        def loss_of_step() -> torch.Tensor:
            return adapter.model(**inputs).loss
    plist = list(params.values())
    for p in plist:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(plist, lr=float(hp["lr"]))
    threshold = hp.get("early_stop_loss")
    steps = 0
    try:
        for _ in range(int(hp["max_steps"])):
            loss = loss_of_step()
            if threshold is not None and loss.item() < float(threshold):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    finally:
        for p in plist:
            p.requires_grad_(False)
            p.grad = None
    return steps


def naive_edit(bench: Bench, editor: Any, row: dict[str, Any], phases: dict[str, float]) -> int:
    """One edit the naive way (seconds of each phase added to ``phases``); returns the training steps made."""
    from editors.base import EditRequest
    from editors.data import eval_items

    clock = _PhaseClock(bench.scale.device, phases)
    edit = EditRequest.from_row(row)
    items = eval_items(row)
    prompts = [it.prompt() for it in items]
    with clock("pre_edit"):
        naive_generate_each(bench, prompts)  # pre-edit outputs, no cache
    steps = 0
    names = set(editor.touched_parameters())
    params = {n: p for n, p in bench.adapter.model.named_parameters() if n in names}
    with clock("apply"):
        saved = copy.deepcopy({n: p.detach() for n, p in params.items()})
        if editor.name in NAIVE_FINETUNE:
            steps = naive_finetune(bench, params, edit, editor.hparams)
        else:  # other methods: their own apply inside the naive loop
            stats = editor.apply(edit) or {}
            steps = int(stats.get("steps") or 0)
    with clock("evaluate"):
        naive_generate_each(bench, editor.rewrite_prompts(prompts, edit))
    with clock("restore"):
        if saved:
            bench.adapter.model.load_state_dict(saved, strict=False)
        editor.reset()
    return steps


class _PhaseClock:
    """``with clock("name"):`` adds the block's wall-clock (device synced at both ends) to ``totals[name]``."""

    def __init__(self, device: str, totals: dict[str, float]) -> None:
        self.device, self.totals = device, totals

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started


def naive_global_warmup(bench: Bench) -> None:
    """Run the naive code paths once, untimed (first-call costs: processor, generate with audio features, the HF
    loss and its backward), then restore: one generation and one FT-Audio step on the first test instance."""
    from editors.base import EditRequest

    row = bench.dataset.rows[(ATTRIBUTES[0], "test")][0]
    edit = EditRequest.from_row(row)
    naive_generate_each(bench, [edit.prompt()])
    editor = bench.editor("ft_audio")
    names = set(editor.touched_parameters())
    params = {n: p for n, p in bench.adapter.model.named_parameters() if n in names}
    saved = copy.deepcopy({n: p.detach() for n, p in params.items()})
    naive_finetune(bench, params, edit, {**editor.hparams, "max_steps": 1})
    bench.adapter.model.load_state_dict(saved, strict=False)
    _sync(bench.scale.device)


#: Methods whose naive arm re-implements the edit the naive way (whole model per step, encoder recomputed);
#: every other method runs its own ``apply`` inside the naive loop (per-question generation, deep-copy restore,
#: no pre-edit cache), so its naive/ours ratio counts only what the runner's loop saves.
NAIVE_FINETUNE = ("ft_audio", "ft_llm")


def run_naive(bench: Bench, method: str, rows: Sequence[dict[str, Any]], warmup: int) -> ArmResult:
    """Time the naive loop over ``rows`` (the first of the runner's units, same order), first ``warmup`` untimed."""
    result = ArmResult()
    editor = bench.editor(method)
    bench.start_arm()
    steps, phases = set(), {}
    for index, row in enumerate(rows):
        _sync(bench.scale.device)
        started = time.perf_counter()
        timed_phases: dict[str, float] = {}
        steps.add(naive_edit(bench, editor, row, timed_phases))
        _sync(bench.scale.device)
        elapsed = time.perf_counter() - started
        LOG.info("naive/%s %s: %.3f s%s", method, row["id"], elapsed, " (warm-up)" if index < warmup else "")
        if index >= warmup:
            result.seconds.append(elapsed)
            for name, value in timed_phases.items():
                phases[name] = phases.get(name, 0.0) + value
    result.peak_bytes = bench.peak()
    n = max(len(result.seconds), 1)
    result.info = {"timed_edits": len(result.seconds), "steps": sorted(steps),
                   "per_edit_split_s": {k: round(v / n, 4) for k, v in phases.items()},
                   **bench.counter.summary(len(rows))}
    return result


# --------------------------------------------------------------------------------------------------------------
# What-if: the same batched evaluation with a static KV cache and a compiled decode step
# --------------------------------------------------------------------------------------------------------------


def whatif_static_decode(bench: Bench, row: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """Time one instance's 10 evaluation prompts through ``adapter.generate`` (the runner's path) and through
    HF ``generate`` with ``cache_implementation="static"`` (decode step compiled, CUDA graphs) on a Qwen2 causal-LM
    view sharing the same LLM weights and the same ``inputs_embeds``. Measures headroom; changes nothing."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    from editors.data import eval_items

    adapter = bench.adapter
    prompts = [it.prompt() for it in eval_items(row)]
    out: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": bench.max_new_tokens}

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        _sync(bench.scale.device)
        started = time.perf_counter()
        value = fn()
        _sync(bench.scale.device)
        return time.perf_counter() - started, value

    reference = adapter.generate(prompts, max_new_tokens=bench.max_new_tokens)  # warm; audio states now cached
    base = [timed(lambda: adapter.generate(prompts, max_new_tokens=bench.max_new_tokens))[0] for _ in range(repeats)]
    out["adapter_generate_s"] = round(float(np.median(base)), 4)
    batch = adapter.prepare(prompts)
    with torch.no_grad():
        embeds = adapter.input_embeds(batch)
    with torch.device("meta"):
        view = Qwen2ForCausalLM(adapter.language_model().config)
    view.model, view.lm_head = adapter.language_model(), adapter.lm_head()
    view.eval()
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=bench.max_new_tokens,
                              pad_token_id=adapter.pad_token_id, eos_token_id=adapter.stop_token_ids,
                              cache_implementation="static")

    def static_generate() -> Any:
        with torch.no_grad():
            return view.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, generation_config=config)

    try:
        first, ids = timed(static_generate)  # compiles the decode step
        texts = [t.strip() for t in adapter.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        out["same_output_fraction"] = round(sum(a == b for a, b in zip(texts, reference)) / len(prompts), 2)
        runs = [timed(static_generate)[0] for _ in range(repeats)]
        out["static_compiled_first_call_s"] = round(first, 2)
        out["static_compiled_generate_s"] = round(float(np.median(runs)), 4)
        out["speedup"] = round(out["adapter_generate_s"] / out["static_compiled_generate_s"], 2)
    except Exception as error:  # noqa: BLE001 - a what-if must not sink the benchmark
        out["static_compiled_error"] = repr(error)[:300]
    LOG.info("what-if static decode: %s", out)
    return out


# --------------------------------------------------------------------------------------------------------------
# Ceilings and floor
# --------------------------------------------------------------------------------------------------------------


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
    pre_tokens: list[int]  # prompt length of each pre-edit question
    post_tokens: list[int]  # prompt length of each post-edit question (method's rewrite applied)
    distinct_clips: int  # audios the encoder must see at least once for this edit


def prompt_tokens(adapter: Any, prompt: Any) -> int:
    """Tokens of a rendered prompt with every audio placeholder expanded."""
    audios = prompt.audios()
    text_ids = adapter.tokenizer(adapter.render(prompt), add_special_tokens=False)["input_ids"]
    return len(text_ids) - len(audios) + sum(adapter.num_audio_tokens(a) for a in audios)


def edit_shapes(bench: Bench, editor: Any, row: dict[str, Any]) -> Shapes:
    from editors.base import EditRequest
    from editors.data import eval_items
    from editors.models.base import audio_digest

    adapter = bench.adapter
    edit = EditRequest.from_row(row)
    prompts = [it.prompt() for it in eval_items(row)]
    post = prompts
    if not editor.changes_parameters:
        editor.apply(edit)
        post = editor.rewrite_prompts(prompts, edit)
        editor.reset()
    target = len(adapter.target_token_ids(edit.target))
    clips = {audio_digest(a) for p in list(prompts) + list(post) for a in p.audios()}
    return Shapes(edit_tokens=prompt_tokens(adapter, edit.prompt()) + target, target_tokens=target,
                  audio_tokens=adapter.num_audio_tokens(edit.audio),
                  pre_tokens=[prompt_tokens(adapter, p) for p in prompts],
                  post_tokens=[prompt_tokens(adapter, p) for p in post], distinct_clips=len(clips))


def _llm_sizes(t: Any) -> dict[str, int]:
    """Matmul parameter counts of a decoder-only LLM config (Qwen2 / Llama: GQA, gated MLP)."""
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    attention = t.hidden_size * head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    layer = attention + 3 * t.hidden_size * t.intermediate_size
    return {"layers": t.num_hidden_layers, "layer": layer, "head": t.hidden_size * t.vocab_size,
            "llm_weights": layer * t.num_hidden_layers + 2 * t.hidden_size * t.vocab_size,
            "kv_elements_per_token": 2 * t.num_hidden_layers * t.num_key_value_heads * head_dim}


def _encoder_flops(a: Any, layers: int) -> int:
    """Forward FLOPs of ``layers`` Whisper encoder layers over one padded 30 s clip."""
    encoder_layer = 4 * a.d_model**2 + 2 * a.d_model * a.encoder_ffn_dim
    return layers * (2 * encoder_layer * a.max_source_positions + 4 * a.max_source_positions**2 * a.d_model)


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
                  "connector_flops_per_token": 2 * a.d_model * t.hidden_size, "connector_backward_factor": 1,
                  "perception_fp32": False})
    return sizes


def floor_seconds(method: str, shapes: Shapes, sizes: dict[str, Any], ceilings: dict[str, float],
                  new_tokens: int, dtype_bytes: int, hp: dict[str, Any]) -> dict[str, float]:
    """A lower bound for one edit under the single-edit protocol (see bench/NOTES.md).

    compute = training FLOPs (every frozen upstream part once: the encoder per clip, the layers below an edited
    layer once; per update the forward above the edited part with the LM head at target positions only, input
    gradients through the layers above it, weight gradients of the edited part) + prefill FLOPs of the pre- and
    post-edit questions + the encoder once per distinct clip (DeSTA2.5: also one Whisper transcript per distinct
    clip; its perception FLOPs at the fp32 rate); memory = per decode step of one batched pre-edit and one batched
    post-edit generation, every LLM weight and the KV cache read once (DeSTA2.5: plus Whisper's decoder weights
    per step of one batched transcription of the edit's clips).
    """
    L, T, A = shapes.edit_tokens, shapes.target_tokens, shapes.audio_tokens
    layers, P, H = sizes["layers"], sizes["layer"], sizes["head"]
    steps = int(hp.get("max_steps", 0))
    connector = sizes.get("connector_flops_per_clip") or sizes.get("connector_flops_per_token", 0) * A
    train = perception = 0.0
    if method == "ft_audio":
        train = steps * ((2 * layers * P * L + 2 * H * T) + (2 * layers * P * L + 2 * H * T))
        perception = steps * (1 + sizes["connector_backward_factor"]) * connector
    elif method == "ft_llm":
        edited = int(hp.get("layer", layers - 1)) % layers
        above = layers - edited
        train = 2 * edited * P * L + steps * ((2 * above * P * L + 2 * H * T)
                                              + (2 * (above - 1) * P * L + 2 * H * T) + 2 * P * L)
    prefill = 2 * layers * P * (sum(shapes.pre_tokens) + sum(shapes.post_tokens))
    perception += (sizes["encoder_flops_per_clip"] + sizes.get("transcript_flops_per_clip", 0)) \
        * shapes.distinct_clips
    perception_rate = ceilings["matmul_fp32_flops_per_s"] if sizes["perception_fp32"] else ceilings[
        "matmul_flops_per_s"]
    compute_s = (train + prefill) / ceilings["matmul_flops_per_s"] + perception / perception_rate
    kv_bytes = sizes["kv_elements_per_token"] * dtype_bytes
    generate_bytes = sizes.get("transcript_bytes_per_step", 0) * sizes.get("transcript_steps", 0) * float(
        shapes.distinct_clips > 0)
    for prompts in (shapes.pre_tokens, shapes.post_tokens):
        for step in range(new_tokens):
            generate_bytes += sizes["llm_weights"] * dtype_bytes + kv_bytes * sum(p + step for p in prompts)
    memory_s = generate_bytes / ceilings["copy_bytes_per_s"]
    return {"train_flops": train, "prefill_flops": prefill, "perception_flops": perception,
            "generate_bytes": generate_bytes, "compute_s": compute_s, "memory_s": memory_s,
            "floor_s": compute_s + memory_s, "train_modelled": float(method in ("ft_audio", "ft_llm") or not steps)}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec) + suffix


def render_table(rows: list[dict[str, Any]]) -> str:
    """The results table (Markdown)."""
    names = ["method", "s/edit ours", "s/edit naive", "naive/ours", "edits/hour ours", "paper s/edit",
             "paper/ours", "peak GiB ours", "peak GiB naive", "floor s/edit", "ours/floor",
             "s/edit ours, warm pre-edit cache", "paper/ours warm"]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(["---"] * len(names)) + "|"]
    for r in rows:
        ours, naive, paper, floor = r["ours"], r["naive"], r["paper"], r["floor"]
        ratio = lambda a, b: a / b if a and b else None  # noqa: E731
        cells = [r["method"], _fmt(ours, ".3f"), _fmt(naive, ".3f"), _fmt(ratio(naive, ours), ".1f", "x"),
                 _fmt(3600 / ours if ours else None, ".0f"), _fmt(paper, ".2f"), _fmt(ratio(paper, ours), ".1f", "x"),
                 _fmt(r["peak_ours"], ".1f"), _fmt(r["peak_naive"], ".1f"), _fmt(floor, ".3f"),
                 _fmt(ratio(ours, floor), ".1f", "x"), _fmt(r.get("warm"), ".3f"),
                 _fmt(ratio(paper, r.get("warm")), ".1f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(scale: Scale) -> str:
    if scale.device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _arm_text(info: dict[str, Any]) -> str:
    """One arm's counters in words."""
    parts = [f"{info.get('timed_edits', 0)} timed edits"]
    if info.get("steps") is not None:
        parts.append(f"steps {info['steps']}")
    for key, label in (("per_edit_split_s", "per timed edit"), ("per_edit_split_s_incl_warmup",
                                                                  "per edit (runner totals, warm-up included)")):
        if info.get(key):
            parts.append(f"{label}: " + ", ".join(f"{k} {v:.3f} s" for k, v in info[key].items()))
    if "generate_calls_per_edit" in info:
        parts.append(f"{info['generate_calls_per_edit']:g} generate calls / {info['sequences_per_edit']:g} sequences "
                     f"per edit, new tokens {info['new_tokens']}")
    if "audio_encoder_calls_per_edit" in info:
        parts.append(f"audio encoder {info['audio_encoder_calls_per_edit']:g} clips per edit")
    if "prediction_rows" in info:
        parts.append(f"{info['prediction_rows']} prediction rows, pre-edit cache hits {info.get('preedit_cache_hits')}")
    return "; ".join(parts)


def render_details(row: dict[str, Any]) -> list[str]:
    """Markdown lines under the table for one method: counters of each arm, floor terms, profile."""
    lines = [f"### `{row['method']}`", ""]
    for label, key, info in (("ours (cold pre-edit cache)", "ours", row.get("info_ours")),
                             ("ours (warm pre-edit cache)", "warm", row["raw"].get("info_ours_warm")),
                             ("naive", "naive", row.get("info_naive"))):
        error = row.get(f"error_{key}") if key != "warm" else None
        if error:
            lines.append(f"- {label}: not run ({error})")
        elif info:
            lines.append(f"- {label}: {_arm_text(info)}")
    fl = row["floor_parts"]
    if row["floor"] is not None:
        perception = fl.get("perception_flops", 0.0)
        lines.append(f"- floor: training {fl['train_flops'] / 1e12:.1f} TFLOP + prefill "
                     f"{fl['prefill_flops'] / 1e12:.1f} TFLOP + audio encoder/connector"
                     f"{'/transcripts (fp32)' if row.get('perception_fp32') else ''} {perception / 1e12:.1f} TFLOP "
                     f"= {fl['compute_s']:.3f} s; generation "
                     f"{fl['generate_bytes'] / 1e9:.0f} GB = "
                     f"{fl['memory_s']:.3f} s" + ("" if fl["train_modelled"] else " (training not modelled)"))
    profile = (row.get("info_ours") or {}).get("profile")
    if profile:
        lines += ["", "| runner phase (1 edit, profiled) | wall s | GPU busy s | busy | kernel launches | host syncs "
                  "| D2H copies | top kernels (ms) |", "|---|---|---|---|---|---|---|---|"]
        for phase, p in profile.items():
            busy = p["gpu_busy_s"] / p["wall_s"] if p["wall_s"] else 0.0
            top = "; ".join(f"{name} {ms}" for name, ms in p["top_kernels"])
            lines.append(f"| {phase} | {p['wall_s']:.3f} | {p['gpu_busy_s']:.3f} | {busy:.0%} | {p['kernel_launches']} "
                         f"| {p['host_syncs']} | {p['d2h_copies']} | {top} |")
    lines.append("")
    return lines


#: Markers around the DeSTA2.5 section of RESULTS.md (the Qwen2-Audio run rewrites the rest of the file).
DESTA_BEGIN = "<!-- bench: desta25 section begin (written by bench/edit_throughput.py --model desta25) -->"
DESTA_END = "<!-- bench: desta25 section end -->"


def merge_results(existing: str, text: str, model: str) -> str:
    """The new RESULTS.md: a DeSTA2.5 run replaces the marked DeSTA section of ``existing`` (or appends it) and
    keeps everything else; a Qwen2-Audio run replaces everything but keeps an existing DeSTA section."""
    begin, end = existing.find(DESTA_BEGIN), existing.find(DESTA_END)
    has_section = begin >= 0 and end > begin
    if model == "desta25":
        section = f"{DESTA_BEGIN}\n{text.rstrip()}\n{DESTA_END}\n"
        if has_section:
            return existing[:begin] + section + existing[end + len(DESTA_END):].lstrip("\n")
        return (existing.rstrip("\n") + "\n\n" if existing.strip() else "") + section
    if has_section:
        return text.rstrip("\n") + "\n\n" + existing[begin:end + len(DESTA_END)] + "\n"
    return text


def write_results(path: Path, text: str, model: str) -> None:
    """Write ``text`` into ``path`` as :func:`merge_results` says (atomically)."""
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write(path, merge_results(existing, text, model))


def render_results(args: argparse.Namespace, scale: Scale, rows: list[dict[str, Any]], ceilings: dict[str, float],
                   params_b: float) -> str:
    """RESULTS.md (or its DeSTA2.5 section): setup, table, ceilings, per-method counters."""
    import transformers

    model = getattr(args, "model", "qwen2_audio")
    desta = model == "desta25"
    dtype = str(scale.dtype).replace("torch.", "")
    lines = [
        "## DeSTA2.5-Audio: editing throughput (written by `bench/edit_throughput.py --model desta25`)" if desta
        else "# Editing throughput (written by `bench/edit_throughput.py`)",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device_name(scale)}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- model: {MODEL_TITLES[model][scale.name]} ({params_b:.2f} B parameters, random weights, "
        + (f"LLM {dtype}, Whisper + connector float32)" if desta else f"{dtype})"),
        f"- command: `python -m bench.edit_throughput {' '.join(args.argv)}`",
        f"- protocol: single editing, {args.edits} timed edits (ours, each pass) and "
        f"{args.naive_edits or args.edits} (naive) after {args.warmup} / {args.naive_warmup} warm-up, the naive arm "
        f"timing the first of the same instances; an edit = apply + its 10 items (reliability, 3 generality, 4 audio "
        "locality, 1 "
        f"text locality, 1 portability) generated before and after the edit; audio "
        f"{scale.audio_seconds[0]:g}-{scale.audio_seconds[1]:g} s; max_new_tokens {args.max_new_tokens}, EOS "
        "disabled in both arms; hparams from `editors/hparams/<method>.yaml`"
        + (f" with {', '.join(scale.hparam_overrides)}" if scale.hparam_overrides else ""),
        "- ours: `editors.run.Runner(args, adapter).run()` in single mode with a fresh pre-edit cache per method "
        "(s/edit = the runner's per-unit wall-clock, rows held in memory instead of Parquet); naive: one "
        "`generate` per question from processor inputs, every FT step through the whole model (audio encoder "
        "recomputed), restore by `load_state_dict` of a deep copy of the touched tensors",
    ]
    if desta:
        lines += [
            "- DeSTA2.5 specifics: every arm starts without encoder states or transcripts (except the warm pass: it "
            "keeps the cold pass's transcripts, as the adapter's on-disk transcript cache would); ours transcribes "
            "each distinct clip once (Whisper's decoder, up to 128 tokens: random weights rarely stop early) and keeps "
            "transcript + tapped encoder states for the rest of the pass; naive drops both before every question "
            "(as the release's `generate` transcribes per call) and drops the encoder states before every FT step "
            "(transcript kept; loss = the Llama's full-sequence HF loss); audio tokens in the LLM = 64 connector "
            "outputs + the transcript's tokens",
        ]
    lines += [
        f"- ceilings measured here: matmul {ceilings['matmul_n']}^3 "
        f"{ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({dtype}), "
        + (f"{ceilings['matmul_fp32_flops_per_s'] / 1e12:.3g} TFLOP/s (float32), "
           if desta and scale.dtype != torch.float32 else "")
        + f"device copy {ceilings['copy_bytes_per_s'] / 1e12:.3g} TB/s (read + write)",
        f"- paper: Table 7, {PAPER_MODEL_NAMES[model]}, single editing wall-clock / 1,200 edits",
        "",
        render_table(rows),
        "",
        "Goals of issue 7 (>= 10x the paper's per-edit rate, >= 5x the naive loop of this run), cold pre-edit cache:",
        "",
    ]
    for r in rows:
        if r["ours"]:
            paper_x = r["paper"] / r["ours"] if r["paper"] else None
            naive_x = r["naive"] / r["ours"] if r["naive"] else None
            lines.append(f"- `{r['method']}`: paper/ours {_fmt(paper_x, '.1f', 'x')} "
                         f"({'met' if paper_x and paper_x >= 10 else 'missed'}), "
                         f"naive/ours {_fmt(naive_x, '.1f', 'x')} "
                         f"({'met' if naive_x and naive_x >= 5 else 'missed'})")
    lines += [
        "",
        "Floor = (training FLOPs with frozen upstream parts computed once + prefill FLOPs) / matmul rate + (one "
        "batched pre-edit and one batched post-edit generation: all LLM weights and the KV cache read per decode "
        "step) / copy bandwidth; see `bench/NOTES.md`.",
        "",
    ]
    if desta:
        lines += ["DeSTA2.5 floor: perception (Whisper encoder up to the last tapped layer once per distinct clip, "
                  "one Whisper transcript per distinct clip, the Q-Former per FT-Audio update) at the float32 rate; "
                  "the transcription's decode steps read Whisper's decoder weights (float32) once per step of one "
                  "batched call.", ""]
        paper_rows = ", ".join(f"{m} {t}" for m, t in PAPER_TABLE7_DESTA_SINGLE.items())
        lines += [f"Paper Table 7 DeSTA single editing (1,200 edits): {paper_rows}.", ""]
    if any(r.get("batched") for r in rows):
        lines += ["## Several edits per pass (`--edits-per-pass K`, issue 12)", "",
                  "The runner with K independent single edits per pass (per-edit parameter copies or prompts, one "
                  "batched generation of all K edits' items), fresh pre-edit cache, one untimed pass first; s/edit "
                  "= pass wall-clock / K (pre-edit outputs, apply, evaluation, rows).", ""]
        lines += render_batched(rows) + [""]
    for row in rows:
        lines.extend(render_details(row))
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.edit_throughput",
        description="Time single editing at full model scale (Qwen2-Audio-7B or DeSTA2.5-Audio, random weights): "
                    "the runner's path vs a naive loop, with the device ceilings and a floor estimate; writes a "
                    "Markdown table (issues 7, 11).")
    parser.add_argument("--model", choices=sorted(PAPER_TABLE7_SINGLE), default="qwen2_audio",
                        help="architecture to time (default: %(default)s); desta25 appends a DeSTA section to --out "
                             "(replacing an earlier one) and keeps the rest of the file")
    parser.add_argument("--methods", default="ft_audio,ft_llm,i_ike",
                        help="comma-separated methods of editors/ (default: %(default)s)")
    parser.add_argument("--edits", type=int, default=8, help="timed edits per arm and method (default: %(default)s)")
    parser.add_argument("--naive-edits", type=int, default=None,
                        help="timed edits of the naive arm (default: --edits; the first of the same instances)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed edits before each arm (default: 1)")
    parser.add_argument("--naive-warmup", type=int, default=None,
                        help="untimed naive edits before each naive arm (default: --warmup; with 0, one short "
                             "global naive warm-up runs before the first method)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation bound, EOS disabled (default: 32)")
    parser.add_argument("--arms", default="ours,naive",
                        help="arms to run: ours, naive (default: %(default)s; 'none' with --edits-per-pass to run "
                             "only the batched arms)")
    parser.add_argument("--edits-per-pass", default="",
                        help="comma-separated K values (e.g. 1,8,16): also run the runner with --edits-per-pass K "
                             "per method (one untimed pass, then whole passes covering --edits edits; fresh pre-edit "
                             "cache) and add the edits-per-pass table (issue 12)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode with the adapter's tiny random model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                        help="Markdown output (default: bench/RESULTS.md)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers as JSON here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder for predictions and caches (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU only: profile the runner's phases on one more instance per method")
    parser.add_argument("--whatif-decode", action="store_true",
                        help="GPU and qwen2_audio only: also time one instance's evaluation with a static KV cache + compiled decode")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.naive_warmup is None:
        args.naive_warmup = args.warmup
    if not 0 <= args.naive_warmup <= args.warmup:
        parser.error("--naive-warmup must be between 0 and --warmup")
    if args.naive_edits is not None and not 1 <= args.naive_edits <= args.edits:
        parser.error("--naive-edits must be between 1 and --edits (the naive arm times the first of the same edits)")
    try:
        args.edits_per_pass = [int(k) for k in args.edits_per_pass.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--edits-per-pass: expected comma-separated integers, got {args.edits_per_pass!r}")
    if any(k < 1 for k in args.edits_per_pass):
        parser.error("--edits-per-pass values must be >= 1")
    for name in ("edits", "warmup", "max_new_tokens"):
        if getattr(args, name) < (1 if name != "warmup" else 0):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


FLOOR_KEYS = ("train_flops", "prefill_flops", "perception_flops", "generate_bytes", "compute_s", "memory_s",
              "floor_s", "train_modelled")


def bench_method(bench: Bench, method: str, args: argparse.Namespace, ceilings: dict[str, float]) -> dict[str, Any]:
    """Both arms, the floor and the table row of one method."""
    arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    naive_edits = args.edits if args.naive_edits is None else args.naive_edits
    ours = warm = naive = ArmResult(error="not requested")
    try:
        editor = bench.editor(method)
    except ValueError as error:  # a method not written yet
        LOG.warning("%s: %s", method, error)
        editor = None
        ours = warm = naive = ArmResult(error=str(error))
    if editor is not None and "ours" in arms:
        ours, warm = run_ours(bench, method, args.edits, args.warmup, args.profile)
    floor = {k: float("nan") for k in FLOOR_KEYS}
    shapes: list[Shapes] = []
    if editor is not None:
        timed = bench.dataset.ordered(*plan_units(args.edits, args.warmup))[args.warmup: args.warmup + args.edits]
        shapes = [edit_shapes(bench, editor, row) for row in timed]
        hp = dict(bench.hparams(method))
        if ours.info.get("steps"):  # the floor counts the updates the runner made (early stop included)
            hp["max_steps"] = ours.info["mean_steps"]
        sizes = model_sizes(bench.adapter.model.config)
        dtype_bytes = torch.finfo(bench.scale.dtype).bits // 8
        floors = [floor_seconds(method, sh, sizes, ceilings, args.max_new_tokens, dtype_bytes, hp) for sh in shapes]
        floor = {k: float(np.mean([f[k] for f in floors])) for k in FLOOR_KEYS}
    # after the shapes: they read DeSTA2.5 transcripts still cached from ours (the naive arm drops them)
    if editor is not None and "naive" in arms:
        order = bench.dataset.ordered(*plan_units(args.edits, args.warmup))  # the runner's unit order
        skip = args.warmup - args.naive_warmup  # the naive arm times the same instances as ours
        naive = run_naive(bench, method, order[skip: args.warmup + naive_edits], args.naive_warmup)
    batched = [run_batched(bench, method, args.edits, k) for k in args.edits_per_pass] if editor is not None else []
    gib = lambda arm: arm.peak_bytes / 2**30 if arm.peak_bytes and arm.seconds else None  # noqa: E731
    row = {"method": method, "paper": paper_seconds_per_edit(method, bench.model), "ours": ours.per_edit,
           "warm": warm.per_edit, "naive": naive.per_edit,
           "floor": None if math.isnan(floor["floor_s"]) else floor["floor_s"], "floor_parts": floor,
           "perception_fp32": bench.model == "desta25", "peak_ours": gib(ours), "peak_naive": gib(naive),
           "error_ours": ours.error, "error_naive": naive.error, "info_ours": ours.info, "info_naive": naive.info,
           "batched": batched,
           "raw": {"ours_s": ours.seconds, "ours_warm_s": warm.seconds, "naive_s": naive.seconds,
                   "info_ours_warm": warm.info, "edit_tokens": [sh.edit_tokens for sh in shapes],
                   "post_tokens_mean": [float(np.mean(sh.post_tokens)) for sh in shapes],
                   "pre_tokens_mean": [float(np.mean(sh.pre_tokens)) for sh in shapes]}}
    LOG.info("%s: ours %s s/edit (warm cache %s), naive %s s/edit, floor %s s/edit", method,
             _fmt(ours.per_edit, ".3f"), _fmt(warm.per_edit, ".3f"), _fmt(naive.per_edit, ".3f"),
             _fmt(row["floor"], ".3f"))
    return row


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scale = tiny_scale() if args.tiny else full_scale()
    if scale.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --tiny for the CPU smoke mode")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    naive_edits = args.edits if args.naive_edits is None else args.naive_edits
    ceilings = measure_ceilings(scale)
    LOG.info("ceilings: %.1f TFLOP/s matmul, %.2f TB/s copy", ceilings["matmul_flops_per_s"] / 1e12,
             ceilings["copy_bytes_per_s"] / 1e12)
    adapter = build_adapter(scale, args.seed, args.model)
    needed = [(max(args.edits, naive_edits), args.warmup)] + [batched_plan(args.edits, k)[::-1]
                                                               for k in args.edits_per_pass]
    limit = max(plan_units(edits, warmup)[1] for edits, warmup in needed)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sake-bench-")))
        # one more test row per attribute than the plan needs: the profiled instance
        dataset = SyntheticDataset.make(workdir / "dataset", limit + 1, 2, args.seed, scale.audio_seconds)
        bench = Bench(scale=scale, adapter=adapter, dataset=dataset, counter=GenerateCounter(adapter.model),
                      max_new_tokens=args.max_new_tokens, seed=args.seed, workdir=workdir, model=args.model)
        params_b = sum(p.numel() for p in adapter.model.parameters()) / 1e9
        if "naive" in args.arms and args.naive_warmup == 0:
            naive_global_warmup(bench)
        rows = []
        for method in methods:
            rows.append(bench_method(bench, method, args, ceilings))
            # rewritten after every method, so a run cut short still leaves the rows it finished
            write_results(args.out, render_results(args, scale, rows, ceilings, params_b), args.model)
        whatif = None
        if args.whatif_decode and args.model != "qwen2_audio":
            LOG.warning("--whatif-decode is written for qwen2_audio only: skipped")
        elif args.whatif_decode and scale.device == "cuda":
            bench.adapter.clear_audio_cache()
            whatif = whatif_static_decode(bench, dataset.ordered(*plan_units(args.edits, args.warmup))[0])
        text = render_results(args, scale, rows, ceilings, params_b)
        if whatif is not None:
            text += ("\n## What-if: evaluation decode with a static KV cache + compiled step "
                     "(not the runner's path)\n\n"
                     f"`{json.dumps(whatif, sort_keys=True)}`\n")
        write_results(args.out, text, args.model)
        if args.json is not None:
            raw = {r["method"]: {k: v for k, v in r.items()} for r in rows}
            atomic_write(args.json, json.dumps({"ceilings": ceilings, "device": device_name(scale),
                                                "model": args.model, "methods": raw},
                                               indent=1, sort_keys=True, default=str) + "\n")
    print(render_table(rows))
    LOG.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
