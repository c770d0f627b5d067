"""Model inputs in model-neutral words: :class:`Prompt` (optional 16 kHz audio, a question, an optional system
prompt and dialogue history of :class:`Turn` s), the chat messages a family's template renders, and audio helpers
(content hash, normalising decoded dataset audio)."""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sake_core.protocol import SAMPLING_RATE
from sake_core.errors import DataError


#: Digests of read-only arrays that own their data, by ``id`` (with a weak reference that proves it is the same
#: array; the entry goes when the array does).
_DIGESTS: dict[int, tuple[weakref.ref, str]] = {}


def _forget(key: int) -> Callable[[Any], None]:
    def forget(_ref: Any) -> None:
        _DIGESTS.pop(key, None)
    return forget


def audio_digest(audio: np.ndarray | None) -> str:
    """A content hash of an audio array ('' for no audio): the key of the audio-state cache. An array that cannot
    change (read-only and owning its data, as :func:`as_audio_array` returns) is hashed once: every generation
    looks up each clip of each prompt several times, and hashing a 16 s clip takes about half a millisecond."""
    if audio is None:
        return ""
    frozen = isinstance(audio, np.ndarray) and not audio.flags.writeable and audio.flags.owndata
    if frozen:
        hit = _DIGESTS.get(id(audio))
        if hit is not None and hit[0]() is audio:
            return hit[1]
    arr = np.ascontiguousarray(np.asarray(audio, dtype=np.float32))
    digest = hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()
    if frozen:
        _DIGESTS[id(audio)] = (weakref.ref(audio, _forget(id(audio))), digest)
    return digest


def as_audio_array(audio: Any, *, where: str = "audio") -> np.ndarray | None:
    """Normalise a decoded dataset audio value (dict with array/sampling_rate, AudioDecoder, array) to float32 mono:
    a read-only array that owns its data (a copy unless it already is one), so its content hash is computed once.

    Raises ValueError naming ``where`` when the sampling rate is not 16 kHz or the value is not audio.
    """
    if audio is None:
        return None
    sampling_rate = SAMPLING_RATE
    if isinstance(audio, np.ndarray):
        array = audio
    elif isinstance(audio, torch.Tensor):
        array = audio.detach().cpu().numpy()
    else:
        try:
            array = audio["array"]
            sampling_rate = int(audio["sampling_rate"])
        except (TypeError, KeyError) as exc:
            raise DataError(f"{where}: expected decoded audio with 'array' and 'sampling_rate', got "
                             f"{type(audio).__name__}") from exc
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:  # (channels, samples) -> mono
        array = array.mean(axis=0)
    if array.ndim != 1:
        raise DataError(f"{where}: expected a 1-D waveform, got shape {array.shape}")
    if sampling_rate != SAMPLING_RATE:
        raise DataError(f"{where}: expected {SAMPLING_RATE} Hz audio, got {sampling_rate} Hz")
    if array.flags.writeable or not array.flags.owndata:  # an array of its own that cannot change: hashed once
        array = np.array(array, dtype=np.float32)
        array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Turn:
    """One earlier exchange of a multi-turn dialogue (an in-context example): user audio + question, assistant answer."""

    question: str
    answer: str
    audio: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Prompt:
    """One model input: an optional audio (16 kHz float32 mono), a question, an optional system prompt and an
    optional dialogue history rendered before the question (oldest first)."""

    question: str
    audio: np.ndarray | None = None
    system: str | None = None
    history: tuple[Turn, ...] = ()

    def audios(self) -> list[np.ndarray]:
        """All audios of the prompt in the order they appear in the rendered text."""
        out = [t.audio for t in self.history if t.audio is not None]
        if self.audio is not None:
            out.append(self.audio)
        return out

    def digest(self) -> str:
        """A stable content hash of everything that reaches the model (text, audio, system, history)."""
        h = hashlib.sha256()
        parts: list[Any] = [self.system or "", self.question, audio_digest(self.audio)]
        for t in self.history:
            parts += [t.question, t.answer, audio_digest(t.audio)]
        h.update(json.dumps(parts, ensure_ascii=False).encode())
        return h.hexdigest()

    def with_system(self, system: str | None) -> "Prompt":
        return Prompt(question=self.question, audio=self.audio, system=system, history=self.history)

    def with_history(self, history: Sequence[Turn]) -> "Prompt":
        return Prompt(question=self.question, audio=self.audio, system=self.system, history=tuple(history))


def chat_messages(prompt: "Prompt") -> list[dict[str, Any]]:
    """The prompt as transformers chat messages: an optional system turn, the history's user/assistant turns, then
    the question; a user turn with audio lists an audio item before its text (as Qwen2-Audio's and AF3's model
    cards do), and each family's chat template renders the audio item as its placeholder."""
    def user(question: str, audio: np.ndarray | None) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "audio", "audio": "<audio>"}] if audio is not None else []
        content.append({"type": "text", "text": question})
        return {"role": "user", "content": content}

    messages: list[dict[str, Any]] = []
    if prompt.system is not None:
        messages.append({"role": "system", "content": prompt.system})
    for turn in prompt.history:
        messages.append(user(turn.question, turn.audio))
        messages.append({"role": "assistant", "content": turn.answer})
    messages.append(user(prompt.question, prompt.audio))
    return messages
