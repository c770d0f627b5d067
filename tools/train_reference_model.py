"""Train the SAKE reference LALM: a small ``Qwen2AudioForConditionalGeneration`` that knows the demo attributes.

The model, its tokenizer and its processor are built from scratch (no download) and trained on data generated
from the embedded demo sources (``sake_dataset/demo_sources``):

* attribute questions: every labelled clip (SAKURA tracks and the CREMA-D / ESC-50 pools) x the question
  phrasings of ``sake_dataset/question_banks.yaml`` and of SAKURA's own questions, options sampled and shuffled
  like the builder makes them -> the true label as option text;
* multi-hop portability questions for the clip's true label (``sake_dataset/portability_knowledge.yaml``, options
  made like the builder's) and SAKURA's own multi-hop questions;
* Dynamic-SUPERB instructions -> labels; MMLU questions -> answer text, without audio and with an unrelated audio
  (so that text answers do not depend on audio).

Two stages, both on CPU in minutes:

1. the audio encoder learns the clip labels (a linear probe per attribute / Dynamic-SUPERB task on its mean
   output), so that its states separate the classes;
2. with the encoder frozen (its states cached through the adapter), the connector and the LLM learn to answer, with
   the adapter's own :meth:`~editors.models.base.LALMAdapter.target_loss` (the exact chat prompt of inference).

The result is saved with ``save_pretrained`` (fp32 safetensors, tokenizer, processor) plus ``TRAINING.md`` (command,
data, seed, wall time, pre-edit accuracy on the demo test split), and loads with
``editors.models.load_adapter(DIR)`` like a Hub checkpoint.

    python -m tools.train_reference_model --out models/sake-reference-qwen2-audio --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from editors.models.base import SAMPLING_RATE, Prompt
from editors.models.qwen2_audio import SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, Qwen2AudioAdapter
from sake_core.atomic import replace_dir, staging_dir
from sake_dataset.sake import (ATTRIBUTES, LABELS, canonical_label, format_question, load_portability,
                               load_question_banks, split_options)

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_DIR / "models" / "sake-reference-qwen2-audio"
MODEL_NAME = "sake-reference-qwen2-audio"

#: Architecture of the reference model (the real Qwen2-Audio class, small sizes).
@dataclass(frozen=True)
class Sizes:
    vocab_size: int = 2048
    num_mel_bins: int = 64
    chunk_seconds: int = 2
    enc_dim: int = 128
    enc_layers: int = 2
    enc_heads: int = 4
    enc_ffn: int = 256
    hop_length: int = 320
    n_fft: int = 640
    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2


@dataclass(frozen=True)
class Schedule:
    encoder_steps: int = 300
    encoder_batch: int = 64
    encoder_lr: float = 2e-3
    llm_steps: int = 1000
    llm_batch: int = 32
    llm_lr: float = 2e-3
    warmup: int = 60
    weight_decay: float = 0.01


# ----------------------------------------------------------------------------------------------------------------
# Demo sources -> training material
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """One distinct audio (by content hash) with every label the sources give it."""

    sha: str
    audio: np.ndarray
    labels: dict[str, str] = field(default_factory=dict)  # attribute -> canonical label
    sakura_questions: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)  # (stem, options, ans)
    multi_hop: list[tuple[str, str]] = field(default_factory=list)  # (question with options, answer text)
    tasks: list[tuple[str, str, str]] = field(default_factory=list)  # (task, instruction, label)


@dataclass
class Material:
    clips: list[Clip]
    texts: list[Any]  # sake_dataset.records.TextQuestion
    task_instructions: dict[str, list[str]]
    stems: dict[str, list[str]]  # attribute -> question stems (banks + SAKURA)
    banks: dict[str, Any]
    knowledge: dict[str, dict[str, Any]]
    corpus: list[str]

    def clips_with(self, attribute: str) -> list[Clip]:
        return [c for c in self.clips if attribute in c.labels]


def _answer_text(answer: str, options: Sequence[str]) -> str:
    """SAKURA answers are "(b) text", "b" or the text: the option text."""
    import re

    m = re.match(r"^\(?([a-z])\)?(?:\s|$)", answer.strip())
    if m and "abcdefghijklmnopqrstuvwxyz".index(m.group(1)) < len(options):
        return options["abcdefghijklmnopqrstuvwxyz".index(m.group(1))]
    return answer.strip()


def load_material() -> Material:
    """Read the demo sources with the project's own readers and collect everything training needs."""
    from sake_dataset.audio import load_mono_16k
    from sake_dataset.builder import demo_sources
    from sake_dataset.sources import read_dynamic_superb, read_mmlu, read_sakura
    from sake_dataset.sources.pools import read_pools

    src = demo_sources()
    sakura = read_sakura(src["sakura"])
    pools = [c for r in read_pools(src["pools"]) for c in r.clips]
    tasks = read_dynamic_superb(src["dynamic_superb"])
    texts = read_mmlu(src["mmlu"])
    banks = load_question_banks()
    knowledge = load_portability()

    by_sha: dict[str, Clip] = {}

    def clip_of(ref) -> Clip:
        if ref.sha256 not in by_sha:
            by_sha[ref.sha256] = Clip(sha=ref.sha256, audio=load_mono_16k(ref))
        return by_sha[ref.sha256]

    stems: dict[str, list[str]] = {a: [banks[a].question, *banks[a].paraphrases] for a in ATTRIBUTES}
    for rec in list(sakura) + list(pools):
        clip = clip_of(rec.audio)
        clip.labels[rec.attribute] = rec.label
        if rec.question:
            stem, options = split_options(rec.question)
            clip.sakura_questions.append((stem, options, rec.answer))
            if stem not in stems[rec.attribute]:
                stems[rec.attribute].append(stem)
        if rec.multi_question:
            _, mopts = split_options(rec.multi_question)
            if mopts:
                clip.multi_hop.append((rec.multi_question, _answer_text(rec.multi_answer, mopts)))
    task_instructions: dict[str, list[str]] = defaultdict(list)
    for t in tasks:
        clip = clip_of(t.audio)
        clip.tasks.append((t.task, t.instruction, t.label))
        if t.instruction not in task_instructions[t.task]:
            task_instructions[t.task].append(t.instruction)
        for attribute in ATTRIBUTES:  # Dynamic-SUPERB attribute tasks (emotion / language recognition)
            label = canonical_label(attribute, t.label)
            if label is not None and label == t.label.strip() and attribute not in clip.labels:
                clip.labels[attribute] = label
    clips = [by_sha[k] for k in sorted(by_sha)]

    corpus: list[str] = []
    for a in ATTRIBUTES:
        corpus += stems[a] + list(LABELS[a]) + [label.capitalize() for label in LABELS[a]]
        for name, cat in knowledge[a].items():
            corpus += list(cat.questions) + list(cat.answers.values())
            corpus += [x for alts in cat.alternatives.values() for x in alts]
    for c in clips:
        corpus += [format_question(s, o) for s, o, _ in c.sakura_questions] + [q for q, _ in c.multi_hop]
        corpus += [f"{i} {label}" for _, i, label in c.tasks]
    for q in texts:
        corpus.append(format_question(q.question, q.choices))
    corpus += _ike_corpus()
    logger.info("material: %d distinct clips, %d MMLU questions, %d Dynamic-SUPERB tasks", len(clips), len(texts),
                len(task_instructions))
    return Material(clips=clips, texts=list(texts), task_instructions=dict(task_instructions), stems=stems,
                    banks=banks, knowledge=knowledge, corpus=corpus)


def _ike_corpus() -> list[str]:
    """The editing methods' prompt texts (so that the tokenizer encodes them compactly)."""
    import yaml

    out = []
    for path in sorted((REPO_DIR / "editors" / "hparams").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for section in data.values():
            if isinstance(section, dict):
                for value in section.values():
                    if isinstance(value, str):
                        out.append(value)
                    elif isinstance(value, dict):
                        out += [v for v in value.values() if isinstance(v, str)]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer, processor, model
# ----------------------------------------------------------------------------------------------------------------


def build_tokenizer(corpus: Sequence[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on the demo texts (encodes any text), with the Qwen2-Audio chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    others = [t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=others, padding_side="left")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_adapter(corpus: Sequence[str], sizes: Sizes, seed: int) -> Qwen2AudioAdapter:
    """A fresh reference model (random init) wrapped in the Qwen2-Audio adapter."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)

    tokenizer = build_tokenizer(corpus, sizes.vocab_size)
    fe = WhisperFeatureExtractor(feature_size=sizes.num_mel_bins, sampling_rate=SAMPLING_RATE,
                                 hop_length=sizes.hop_length, chunk_length=sizes.chunk_seconds, n_fft=sizes.n_fft,
                                 return_attention_mask=True)
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    config = Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", "d_model": sizes.enc_dim,
                      "encoder_layers": sizes.enc_layers, "encoder_attention_heads": sizes.enc_heads,
                      "encoder_ffn_dim": sizes.enc_ffn, "num_mel_bins": sizes.num_mel_bins,
                      "max_source_positions": fe.nb_max_frames // 2, "dropout": 0.0},
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": sizes.hidden,
                     "intermediate_size": sizes.intermediate, "num_hidden_layers": sizes.layers,
                     "num_attention_heads": sizes.heads, "num_key_value_heads": sizes.kv_heads,
                     "max_position_embeddings": 1024, "tie_word_embeddings": False,
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "bos_token_id": None, "rope_theta": 10000.0},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).float()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    adapter = Qwen2AudioAdapter(model, processor, model_id=MODEL_NAME, revision="")
    adapter.audio_cache_bytes = 1 << 62
    return adapter


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the audio encoder learns the labels
# ----------------------------------------------------------------------------------------------------------------


def mel_features(adapter: Qwen2AudioAdapter, audios: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features [B, mel, frames] (padded to the window) and valid frame counts [B], as the adapter makes
    them."""
    fe = adapter.processor.feature_extractor
    feats = fe([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=SAMPLING_RATE,
               return_attention_mask=True, padding="max_length", return_tensors="pt")
    return feats["input_features"].float(), feats["attention_mask"].sum(-1)


def encoder_outputs(adapter: Qwen2AudioAdapter, features: torch.Tensor, mel_valid: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output [B, T, D] with grad and the valid-length mask [B, T], computed exactly as the adapter's
    frozen path (``Qwen2AudioAdapter._encode_audios``) does."""
    from transformers.masking_utils import create_bidirectional_mask

    encoder = adapter.audio_encoder()
    conv_len = (mel_valid - 1) // 2 + 1
    out_len = (conv_len - 2) // 2 + 1
    width = (features.shape[-1] - 2) // 2 + 1
    mask_2d = (torch.arange(width)[None, :] < conv_len[:, None]).long()
    dummy = torch.zeros((features.shape[0], width, 1), dtype=features.dtype)
    attn = create_bidirectional_mask(config=encoder.config, inputs_embeds=dummy, attention_mask=mask_2d)
    hidden = encoder(features, attention_mask=attn).last_hidden_state
    valid = torch.arange(hidden.shape[1])[None, :] < out_len[:, None]
    return hidden, valid


def train_encoder(adapter: Qwen2AudioAdapter, material: Material, schedule: Schedule, seed: int) -> dict[str, float]:
    """Train the audio encoder with one linear probe per attribute / task on its mean output; returns the final
    training accuracy per probe."""
    heads_classes: dict[str, list[str]] = {a: list(LABELS[a]) for a in ATTRIBUTES}
    for clip in material.clips:
        for task, _, label in clip.tasks:
            if any(canonical_label(a, label) == label for a in ATTRIBUTES):
                continue
            heads_classes.setdefault(f"task:{task}", [])
            if label not in heads_classes[f"task:{task}"]:
                heads_classes[f"task:{task}"].append(label)
    targets: list[dict[str, int]] = []
    for clip in material.clips:
        t = {a: heads_classes[a].index(l) for a, l in clip.labels.items()}
        for task, _, label in clip.tasks:
            if f"task:{task}" in heads_classes and label in heads_classes[f"task:{task}"]:
                t[f"task:{task}"] = heads_classes[f"task:{task}"].index(label)
        targets.append(t)
    dim = adapter.audio_encoder().config.d_model
    torch.manual_seed(seed + 1)
    probes = nn.ModuleDict({k.replace(":", "_"): nn.Linear(dim, len(v)) for k, v in heads_classes.items()})
    encoder = adapter.audio_encoder()
    encoder.requires_grad_(True)
    encoder.train()
    params = list(encoder.parameters()) + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=schedule.encoder_lr, weight_decay=schedule.weight_decay)
    rng = random.Random(seed + 1)
    order = list(range(len(material.clips)))
    features, mel_valid = mel_features(adapter, [c.audio for c in material.clips])
    accuracy: dict[str, float] = {}
    bar = tqdm(range(schedule.encoder_steps), desc="stage 1: audio encoder", unit="step")
    for step in bar:
        lr = schedule.encoder_lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step /
                                                                                     schedule.encoder_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.sample(order, min(schedule.encoder_batch, len(order)))
        hidden, valid = encoder_outputs(adapter, features[idx], mel_valid[idx])
        pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        loss = torch.zeros(())
        hits: dict[str, list[bool]] = defaultdict(list)
        for head in heads_classes:
            rows = [j for j, i in enumerate(idx) if head in targets[i]]
            if not rows:
                continue
            logits = probes[head.replace(":", "_")](pooled[rows])
            gold = torch.tensor([targets[idx[j]][head] for j in rows])
            loss = loss + nn.functional.cross_entropy(logits, gold) * len(rows) / len(idx)
            hits[head] += (logits.argmax(-1) == gold).tolist()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        accuracy = {h: float(np.mean(v)) for h, v in hits.items()}
        bar.set_postfix(loss=f"{loss.item():.3f}")
    encoder.eval()
    encoder.requires_grad_(False)
    # final accuracy over every clip (eval mode)
    with torch.no_grad():
        correct: dict[str, list[bool]] = defaultdict(list)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            hidden, valid = encoder_outputs(adapter, features[idx], mel_valid[idx])
            pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
            for head in heads_classes:
                for j, i in enumerate(idx):
                    if head in targets[i]:
                        pred = int(probes[head.replace(":", "_")](pooled[j]).argmax())
                        correct[head].append(pred == targets[i][head])
        accuracy = {h: round(100 * float(np.mean(v)), 1) for h, v in correct.items()}
    adapter.clear_audio_cache()
    logger.info("stage 1 probe accuracy: %s", accuracy)
    return accuracy


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: question answering examples
# ----------------------------------------------------------------------------------------------------------------


def _spell(attribute: str, label: str, capital: bool) -> str:
    return label.capitalize() if capital and attribute == "gender" else label


class ExampleSampler:
    """Draws (Prompt, target) training examples from the demo material (seeded)."""

    #: mixture weights of the example kinds
    MIX = (("attribute", 0.46), ("portability", 0.2), ("sakura_multi", 0.04), ("task", 0.12), ("mmlu", 0.12),
           ("mmlu_audio", 0.06))

    def __init__(self, material: Material, seed: int) -> None:
        self.m = material
        self.rng = random.Random(seed)
        self.by_attribute = {a: material.clips_with(a) for a in ATTRIBUTES}
        self.with_multi = [c for c in material.clips if c.multi_hop]
        self.with_task = [c for c in material.clips if c.tasks]
        self.kinds = [k for k, _ in self.MIX]
        self.weights = [w for _, w in self.MIX]

    def sample(self) -> tuple[Prompt, str, str]:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        prompt, target = getattr(self, f"_{kind}")()
        return prompt, target, kind

    def batch(self, n: int) -> tuple[list[Prompt], list[str], list[str]]:
        out = [self.sample() for _ in range(n)]
        return [p for p, _, _ in out], [t for _, t, _ in out], [k for _, _, k in out]

    def attribute_question(self, clip: Clip, attribute: str) -> tuple[str, str]:
        """An attribute question about ``clip`` (options shuffled, the true label among them) and its answer."""
        rng = self.rng
        label = clip.labels[attribute]
        if clip.sakura_questions and rng.random() < 0.35:
            stem, options, answer = rng.choice(clip.sakura_questions)
            options = list(options)
            if rng.random() < 0.5:  # the builder replaces a distractor by the edit target
                free = [i for i, o in enumerate(options) if canonical_label(attribute, o) != label]
                others = [x for x in LABELS[attribute]
                          if all(canonical_label(attribute, o) != x for o in options)]
                if free and others:
                    options[rng.choice(free)] = _spell(attribute, rng.choice(others), options[0][:1].isupper())
            if rng.random() < 0.3:
                stem = rng.choice(self.m.stems[attribute])
        else:
            stem = rng.choice(self.m.stems[attribute])
            n = self.m.banks[attribute].n_options
            others = [x for x in LABELS[attribute] if x != label]
            chosen = [label] + rng.sample(others, min(len(others), max(1, n - 1 + rng.choice((0, 0, 0, 1, -1)))))
            rng.shuffle(chosen)
            capital = rng.random() < 0.5
            options = [_spell(attribute, x, capital) for x in chosen]
        answer = next(o for o in options if canonical_label(attribute, o) == label)
        return format_question(stem, options), answer

    def portability_question(self, clip: Clip, attribute: str) -> tuple[str, str]:
        """A multi-hop question about the clip's true label, options made like the builder's."""
        rng = self.rng
        label = clip.labels[attribute]
        name = rng.choice(sorted(self.m.knowledge[attribute]))
        cat = self.m.knowledge[attribute][name]
        if rng.random() < 0.5:
            return self._builder_portability(cat, attribute, label)
        true_set = [cat.answers[label], *cat.alternatives.get(label, ())]
        truth = cat.answers[label] if rng.random() < 0.6 or len(true_set) == 1 else rng.choice(true_set[1:])
        lowered = {t.lower() for t in true_set}
        pool = [cat.answers[x] for x in LABELS[attribute] if x != label]
        pool += [alt for x, alts in cat.alternatives.items() if x != label for alt in alts]
        distractors = sorted({p for p in pool if p.lower() not in lowered})
        options = [truth] + rng.sample(distractors, min(3, len(distractors)))
        rng.shuffle(options)
        return format_question(rng.choice(cat.questions), options), truth

    def _builder_portability(self, cat: Any, attribute: str, label: str) -> tuple[str, str]:
        """Options exactly as the builder makes them for an edit ``label -> y_e`` (the y_e answer, the true label's
        answer, other labels' answers and alternatives: for gender several options are true for ``label``);
        the answer stays the true label's own answer."""
        rng = self.rng
        others = [x for x in LABELS[attribute] if x != label
                  and cat.answers[x].strip().lower() != cat.answers[label].strip().lower()]
        if not others:
            return self.portability_question_simple(cat, label)
        y_e = rng.choice(others)
        true_e = {cat.answers[y_e].lower(), *(a.lower() for a in cat.alternatives.get(y_e, ()))}
        pool = [cat.answers[label]]
        rest = [x for x in LABELS[attribute] if x not in (label, y_e)]
        pool += [cat.answers[x] for x in rng.sample(rest, len(rest))]
        for x in sorted(cat.alternatives):
            if x != y_e:
                alts = list(cat.alternatives[x])
                pool += rng.sample(alts, len(alts))
        distractors: list[str] = []
        for text in pool:
            if text.lower() not in true_e and text.lower() not in {d.lower() for d in distractors}:
                distractors.append(text)
        options = [cat.answers[y_e]] + distractors[:3]
        rng.shuffle(options)
        return format_question(rng.choice(cat.questions), options), cat.answers[label]

    def portability_question_simple(self, cat: Any, label: str) -> tuple[str, str]:
        options = [cat.answers[label]]
        return format_question(self.rng.choice(cat.questions), options), cat.answers[label]

    def _attribute(self) -> tuple[Prompt, str]:
        attribute = self.rng.choice(ATTRIBUTES)
        clip = self.rng.choice(self.by_attribute[attribute])
        question, answer = self.attribute_question(clip, attribute)
        return Prompt(question=question, audio=clip.audio), answer

    def _portability(self) -> tuple[Prompt, str]:
        attribute = self.rng.choice(ATTRIBUTES)
        clip = self.rng.choice(self.by_attribute[attribute])
        question, answer = self.portability_question(clip, attribute)
        return Prompt(question=question, audio=clip.audio), answer

    def _sakura_multi(self) -> tuple[Prompt, str]:
        clip = self.rng.choice(self.with_multi)
        question, answer = self.rng.choice(clip.multi_hop)
        return Prompt(question=question, audio=clip.audio), answer

    def _task(self) -> tuple[Prompt, str]:
        clip = self.rng.choice(self.with_task)
        task, instruction, label = self.rng.choice(clip.tasks)
        if self.rng.random() < 0.4:
            instruction = self.rng.choice(self.m.task_instructions[task])
        return Prompt(question=instruction, audio=clip.audio), label

    def mmlu_question(self) -> tuple[str, str]:
        q = self.rng.choice(self.m.texts)
        choices = list(q.choices)
        answer = choices[q.answer_index]
        if self.rng.random() < 0.5:
            self.rng.shuffle(choices)
        return format_question(q.question, choices), answer

    def _mmlu(self) -> tuple[Prompt, str]:
        question, answer = self.mmlu_question()
        return Prompt(question=question), answer

    def _mmlu_audio(self) -> tuple[Prompt, str]:
        question, answer = self.mmlu_question()
        return Prompt(question=question, audio=self.rng.choice(self.m.clips).audio), answer


# ----------------------------------------------------------------------------------------------------------------
# Stage 2 training
# ----------------------------------------------------------------------------------------------------------------


def train_llm(adapter: Qwen2AudioAdapter, material: Material, schedule: Schedule, seed: int) -> list[float]:
    """Train connector + LLM (encoder frozen, its states cached) with the adapter's target loss."""
    sampler = ExampleSampler(material, seed + 2)
    adapter.audio_states([c.audio for c in material.clips])  # encoder once per clip
    trainable = [p for n, p in adapter.model.named_parameters()
                 if n not in set(adapter.parameter_names(adapter.audio_encoder()))]
    for p in trainable:
        p.requires_grad_(True)
    adapter.model.train()
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=schedule.llm_lr, betas=(0.9, 0.98))
    losses: list[float] = []
    bar = tqdm(range(schedule.llm_steps), desc="stage 2: connector + LLM", unit="step")
    for step in bar:
        warm = min(1.0, (step + 1) / schedule.warmup)
        lr = schedule.llm_lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / schedule.llm_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        prompts, targets, _ = sampler.batch(schedule.llm_batch)
        loss = adapter.target_loss(prompts, targets)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(float(loss.item()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    adapter.model.eval()
    adapter.model.requires_grad_(False)
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on the demo dataset (pre-edit)
# ----------------------------------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    import re

    return re.sub(r"\W+", " ", text.casefold()).strip()


def preedit_expectations(row: dict[str, Any]) -> list[tuple[str, str, Any, list[str]]]:
    """(item id, dimension, prompt, acceptable answers) of an instance's items for the UNEDITED model: the true
    label for reliability/generality (y_o as spelled in the options), the reference for locality, the true label's
    linked knowledge (any true option) for portability."""
    from editors.data import eval_items

    knowledge = load_portability()
    attribute, y_o = row["attribute"], row["original_label"]
    out = []
    entries = {it["id"]: it for col in ("generality", "locality_audio", "locality_text", "portability")
               for it in (row[col] or [])}
    for item in eval_items(row):
        if item.dimension in ("reliability", "generality"):
            ok = [o for o in item.options if canonical_label(attribute, o) == y_o]
        elif item.dimension == "portability":
            cat = knowledge[attribute][entries[item.item_id]["category"]]
            true_set = {_norm(cat.answers[y_o]), *(_norm(a) for a in cat.alternatives.get(y_o, ()))}
            ok = [o for o in item.options if _norm(o) in true_set]
        else:
            ok = [item.reference]
        out.append((item.item_id, item.dimension, item.prompt(), ok))
    return out


def evaluate_preedit(adapter: Any, dataset_dir: str | Path, split: str = "test", configs: Sequence[str] = ATTRIBUTES,
                     limit: int | None = None, batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Greedy pre-edit answers on the demo dataset's items, judged against what the unedited model should say
    (:func:`preedit_expectations`); returns accuracy per dimension (percent) and the misses."""
    from editors.data import load_instances

    expected: list[tuple[str, str, Any, list[str]]] = []
    for config in configs:
        ds = load_instances(str(dataset_dir), config, split)
        n = len(ds) if limit is None else min(limit, len(ds))
        for i in range(n):
            expected += preedit_expectations(ds[i])
    outputs = []
    bar = tqdm(range(0, len(expected), batch_size), desc="pre-edit evaluation", disable=not progress)
    for start in bar:
        outputs += adapter.generate([e[2] for e in expected[start:start + batch_size]], max_new_tokens=16)
    hits: dict[str, list[bool]] = defaultdict(list)
    misses = []
    for (item_id, dimension, prompt, ok), out in zip(expected, outputs):
        good = _norm(out) in {_norm(o) for o in ok}
        hits[dimension].append(good)
        if not good:
            misses.append({"item_id": item_id, "output": out, "expected": ok})
    acc = {d: round(100 * float(np.mean(v)), 2) for d, v in hits.items()}
    core = [g for d in ("reliability", "generality", "locality_audio", "locality_text") for g in hits.get(d, [])]
    acc["attribute_and_locality"] = round(100 * float(np.mean(core)), 2) if core else None
    acc["n_items"] = len(expected)
    return {"accuracy": acc, "misses": misses}


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------


def write_model(adapter: Qwen2AudioAdapter, out: Path, training_md: str, extra_files: dict[str, str]) -> None:
    """Save model + processor + TRAINING.md into ``out`` atomically (a staging folder next to it, swapped in by
    :func:`sake_core.atomic.replace_dir`)."""
    out = Path(out)
    tmp = staging_dir(out)
    try:
        adapter.save_pretrained(tmp)
        (tmp / "TRAINING.md").write_text(training_md, encoding="utf-8")
        for name, text in extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def training_markdown(*, command: str, seed: int, sizes: Sizes, schedule: Schedule, n_params: dict[str, int],
                      material: Material, probe_acc: dict[str, float], final_loss: float, times: dict[str, float],
                      evaluation: dict[str, Any] | None, threads: int) -> str:
    n_audio = sum(1 for c in material.clips if c.labels)
    lines = [
        f"# {MODEL_NAME}: how it was trained",
        "",
        "A small `Qwen2AudioForConditionalGeneration` (random init, trained from scratch) that knows the SAKE demo",
        "attributes. Made by `tools/train_reference_model.py`; rerun the command below to reproduce it.",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"- seed: {seed}; torch threads: {threads}; device: CPU ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f})",
        f"- wall time: stage 1 {times['encoder']:.0f} s, stage 2 {times['llm']:.0f} s, total {times['total']:.0f} s",
        f"- versions: torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"python {platform.python_version()}",
        "",
        "## Model",
        "",
        f"- parameters: {n_params['total']:,} (audio encoder {n_params['encoder']:,}, connector "
        f"{n_params['connector']:,}, LLM + head {n_params['llm']:,}); fp32 safetensors",
        f"- audio encoder: {sizes.enc_layers} layers, d_model {sizes.enc_dim}, {sizes.num_mel_bins} mel bins, "
        f"{sizes.chunk_seconds} s input window, hop {sizes.hop_length} "
        f"({SAMPLING_RATE // sizes.hop_length // 4} audio tokens per second)",
        f"- LLM (Qwen2): {sizes.layers} layers, hidden {sizes.hidden}, FFN {sizes.intermediate}, {sizes.heads} heads "
        f"({sizes.kv_heads} KV heads); tokenizer: byte-level BPE, {sizes.vocab_size} tokens, trained on the demo texts",
        "- chat format: Qwen2-Audio-Instruct (`<|im_start|>`, default system prompt, `Audio 1: <|audio_bos|>"
        "<|AUDIO|><|audio_eos|>`)",
        "",
        "## Data (all generated from `sake_dataset/demo_sources`, seeded)",
        "",
        f"- {len(material.clips)} distinct clips ({n_audio} with attribute labels: SAKURA tracks, CREMA-D and ESC-50 "
        f"pools; plus Dynamic-SUPERB tasks), {len(material.texts)} MMLU questions",
        "- stage 1 (audio encoder): one linear probe per attribute / Dynamic-SUPERB task on the mean encoder output, "
        f"{schedule.encoder_steps} steps x {schedule.encoder_batch} clips, AdamW lr {schedule.encoder_lr}; probe "
        f"accuracy on all clips: {json.dumps(probe_acc)}",
        f"- stage 2 (connector + LLM, encoder frozen): {schedule.llm_steps} steps x {schedule.llm_batch} examples, "
        f"AdamW lr {schedule.llm_lr} (warmup {schedule.warmup}, cosine), loss = the adapter's `target_loss` "
        f"(answer tokens + `<|im_end|>`); final loss (mean of last 50 steps) {final_loss:.4f}. Example mix: "
        + ", ".join(f"{k} {w:.0%}" for k, w in ExampleSampler.MIX),
        "  - attribute: a clip x a question stem (question bank question, paraphrases, SAKURA questions) with the "
        "true label among shuffled options -> the label as option text;",
        "  - portability: a knowledge category question of `portability_knowledge.yaml` with options made like the "
        "builder's -> the true label's answer; SAKURA's own multi-hop questions (sakura_multi);",
        "  - task: Dynamic-SUPERB instruction -> label; mmlu: question with (shuffled) choices -> answer text, "
        "without audio and with an unrelated clip (mmlu_audio).",
        "",
    ]
    if evaluation:
        acc = evaluation["accuracy"]
        lines += [
            "## Pre-edit accuracy on the demo test split",
            "",
            "`python build_splits.py --demo` (seed 0), all four attribute configs, greedy decoding, output judged "
            "against what the unedited model should answer: the true label for reliability and generality items, the "
            "reference for locality items, the true label's linked knowledge for portability items.",
            "",
            "| reliability | generality | audio locality | text locality | portability | rel+gen+loc | items |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {acc.get('reliability')} | {acc.get('generality')} | {acc.get('locality_audio')} | "
            f"{acc.get('locality_text')} | {acc.get('portability')} | {acc.get('attribute_and_locality')} | "
            f"{acc.get('n_items')} |",
            "",
        ]
    lines += [
        "## Editing hyperparameters",
        "",
        "The paper's Table 6 values are tuned for 7-8B models. This directory carries `sake_tiny.json`, so the",
        "runner uses the `tiny` entries of `editors/hparams/*.yaml` (larger learning rates, more steps, layers of a",
        "4-layer LLM) for it. `sake demo` edits this model with every method; its table is in the README.",
        "",
    ]
    return "\n".join(lines)


def count_parameters(adapter: Qwen2AudioAdapter) -> dict[str, int]:
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    total = count(adapter.model)
    enc, conn = count(adapter.audio_encoder()), count(adapter.connector())
    return {"total": total, "encoder": enc, "connector": conn, "llm": total - enc - conn}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.train_reference_model",
        description="Train the SAKE reference LALM (small Qwen2-Audio) on the embedded demo sources and save it.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="model directory to write (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the matrices are small; on 2 shared cores a second thread "
                             "made a step 7x slower in CPU time)")
    parser.add_argument("--encoder-steps", type=int, default=Schedule.encoder_steps)
    parser.add_argument("--llm-steps", type=int, default=Schedule.llm_steps)
    parser.add_argument("--llm-batch", type=int, default=Schedule.llm_batch)
    parser.add_argument("--llm-lr", type=float, default=Schedule.llm_lr)
    parser.add_argument("--no-eval", action="store_true", help="skip the pre-edit evaluation on the demo test split")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    sizes = Sizes()
    schedule = Schedule(encoder_steps=args.encoder_steps, llm_steps=args.llm_steps, llm_batch=args.llm_batch,
                        llm_lr=args.llm_lr)
    t0 = time.time()
    material = load_material()
    adapter = build_adapter(material.corpus, sizes, args.seed)
    n_params = count_parameters(adapter)
    logger.info("parameters: %s", n_params)
    t1 = time.time()
    probe_acc = train_encoder(adapter, material, schedule, args.seed)
    t2 = time.time()
    losses = train_llm(adapter, material, schedule, args.seed)
    t3 = time.time()
    evaluation = None
    if not args.no_eval:
        with tempfile.TemporaryDirectory() as tmp:
            from sake_dataset import build_demo

            build_demo(Path(tmp) / "demo", seed=0)
            evaluation = evaluate_preedit(adapter, Path(tmp) / "demo")
        logger.info("pre-edit accuracy: %s", evaluation["accuracy"])
        for miss in evaluation["misses"][:20]:
            logger.info("miss: %s", miss)
    command = "python -m tools.train_reference_model " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    md = training_markdown(command=command.strip(), seed=args.seed, sizes=sizes, schedule=schedule,
                           n_params=n_params, material=material, probe_acc=probe_acc,
                           final_loss=float(np.mean(losses[-50:])),
                           times={"encoder": t2 - t1, "llm": t3 - t2, "total": time.time() - t0},
                           evaluation=evaluation, threads=args.threads)
    marker = json.dumps({"family": "qwen2_audio", "model_id": MODEL_NAME,
                         "why": "small reference model: use the 'tiny' hparams entries"}) + "\n"
    metrics = json.dumps({"seed": args.seed, "probe_accuracy": probe_acc,
                          "final_loss": float(np.mean(losses[-50:])),
                          "preedit": evaluation["accuracy"] if evaluation else None}, indent=1) + "\n"
    write_model(adapter, Path(args.out), md, {"sake_tiny.json": marker, "training_metrics.json": metrics})
    logger.info("saved %s (%.0f s)", args.out, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
