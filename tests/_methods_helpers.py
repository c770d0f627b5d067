"""Shared fixtures of the KE / MEND / UnKE / WISE tests: tiny adapters, edit requests, exact-restore checks."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from _editor_helpers import shared_demo_build, synthetic_audio
from editors.base import EditRequest, RunContext
from editors.hparams import Hparams
from editors.registry import load_hparams
from editors.models import load_adapter
from editors.models.base import LALMAdapter
from editors.models.registry import families


EMOTION_QUESTION = "What is the emotion of the speaker? (a) happy (b) sad (c) angry (d) neutral"
#: The tiny random-init model of every family (editors/models/registry.py), in family order.
TINY_MODELS = tuple(info.tiny_name for info in families().values())


def tiny_adapter(name: str = "tiny-qwen2-audio", seed: int = 0) -> LALMAdapter:
    """A fresh tiny adapter (same seed, same weights) for each caller: no test sees another test's edits, whatever
    the order they run in (building one takes well under a second)."""
    return load_adapter(name, seed=seed)


def audio_item(item_id: str, question: str, audio_seed: int, label: str) -> dict[str, Any]:
    return {"id": item_id, "type": 1, "audio": {"array": synthetic_audio(audio_seed, 0.8), "sampling_rate": 16000},
            "question": question, "options": [], "answer": label, "attribute": "animal", "label": label,
            "category": "", "source": "test"}


def text_item(item_id: str, question: str, answer: str) -> dict[str, Any]:
    return {"id": item_id, "type": 0, "question": question, "options": [], "answer": answer,
            "attribute": "mmlu:test", "label": "", "category": "", "source": "test"}


def edit_request(target: str = "sad", audio_seed: int = 1, instance: str = "emotion/test/000000") -> EditRequest:
    """A tiny emotion edit (audio of 1 s) with its own locality items (two audio, one text)."""
    row = {
        "id": instance,
        "locality_audio": [audio_item(f"{instance}/loc_audio1", "Which animal makes this sound? (a) dog (b) cat",
                                      audio_seed + 10, "dog"),
                           audio_item(f"{instance}/loc_audio2", "What is the gender of the speaker? (a) male",
                                      audio_seed + 11, "male")],
        "locality_text": [text_item(f"{instance}/loc_text", "Which data structure is last-in first-out? (a) queue "
                                    "(b) stack", "stack")],
        "generality": [], "portability": [],
    }
    return EditRequest(instance_id=instance, attribute="emotion", original_label="happy", target_label=target,
                       question=EMOTION_QUESTION, options=["happy", "sad", "angry", "neutral"], target=target,
                       audio=synthetic_audio(audio_seed, 1.0), row=row)


def hparams(method: str, adapter: LALMAdapter, **overrides: Any) -> Hparams:
    return load_hparams(method, adapter.family, tiny=True, overrides=overrides)


def context(**kwargs: Any) -> RunContext:
    return RunContext(seed=0, **kwargs)


def model_state(adapter: LALMAdapter) -> dict[str, Any]:
    """Everything an exact restore must bring back: parameter values, the module tree and hooks."""
    return {"params": {n: p.detach().clone() for n, p in adapter.model.named_parameters()},
            "modules": [(n, id(m)) for n, m in adapter.model.named_modules()],
            "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in adapter.model.modules())}


def assert_same_state(adapter: LALMAdapter, before: dict[str, Any]) -> None:
    after = model_state(adapter)
    assert after["modules"] == before["modules"], "module tree differs from the original"
    assert after["hooks"] == before["hooks"], "hooks left behind"
    assert after["params"].keys() == before["params"].keys()
    changed = [n for n, p in after["params"].items() if not torch.equal(p, before["params"][n])]
    assert not changed, f"parameters not restored bit-exactly: {changed[:5]}"


def one_token_word(adapter: LALMAdapter, exclude: str) -> str:
    """A word (>= 3 letters) that the tokenizer encodes as one token on its own, other than ``exclude``: the
    lowest such token id (deterministic)."""
    for token_id in range(len(adapter.tokenizer)):
        word = adapter.tokenizer.decode([token_id])
        if len(word) >= 3 and word.isalpha() and word != exclude \
                and adapter.target_token_ids(word)[:-1] == [token_id]:
            return word
    raise AssertionError("the tokenizer has no one-token word")


_TMP_ROOT: list[Path] = []


def session_tmp() -> Path:
    """A temporary folder for the whole test session (removed at exit)."""
    if not _TMP_ROOT:
        root = Path(tempfile.mkdtemp(prefix="sake_methods_"))
        atexit.register(shutil.rmtree, root, True)
        _TMP_ROOT.append(root)
    return _TMP_ROOT[0]


def demo_dataset() -> Path:
    """The offline demo dataset, built once per session (the same build as the `demo_dataset` fixture)."""
    return shared_demo_build().out


@lru_cache(maxsize=1)
def load_train_split() -> dict[str, Any]:
    """The demo train split of every attribute config (loaded once; rows are read, never written)."""
    from editors.data import load_instances
    from sake_core.protocol import ATTRIBUTES

    return {c: load_instances(str(demo_dataset()), c, "train") for c in ATTRIBUTES}


#: Small-run training settings of the KE/MEND tests: 2 of the 8 instances (limit 2 per config) validate, the other
#: 6 train in 3 optimizer steps of 2
SMALL_TRAINING = {"val_size": 2, "val_interval": 2, "accumulate_bs": 2}


@lru_cache(maxsize=None)
def trained_network(method: str, model: str = "tiny-qwen2-audio", limit: int = 2) -> Path:
    """A KE/MEND hypernetwork trained on the first ``limit`` demo train instances of every config with
    :data:`SMALL_TRAINING` (cached)."""
    from editors.train import Trainer

    adapter = tiny_adapter(model)
    out = session_tmp() / f"hn-{method}-{model}-{limit}"
    Trainer(adapter, method, hparams(method, adapter, **SMALL_TRAINING), load_train_split(), out, seed=0,
            model_name=model, limit=limit, checkpoint_every=100, progress=False).train()
    return out


def one_token_words(adapter: LALMAdapter, n: int, exclude: tuple[str, ...] = ()) -> list[str]:
    """``n`` different one-token words (as :func:`one_token_word`), none in ``exclude``, lowest token ids first."""
    words: list[str] = []
    for token_id in range(len(adapter.tokenizer)):
        word = adapter.tokenizer.decode([token_id])
        if len(word) >= 3 and word.isalpha() and word not in exclude and word not in words \
                and adapter.target_token_ids(word)[:-1] == [token_id]:
            words.append(word)
            if len(words) == n:
                return words
    raise AssertionError(f"the tokenizer has fewer than {n} one-token words")


def first_answer_token(adapter: LALMAdapter, edit: EditRequest) -> str:
    """The unedited model's first greedy answer token to the edit's prompt."""
    return adapter.generate([edit.prompt()], max_new_tokens=1)[0]
