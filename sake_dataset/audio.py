"""Audio helpers: probe a file (content hash, duration, readability) and encode it as 16 kHz mono PCM WAV."""

from __future__ import annotations

import hashlib
import io
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from sake.protocol import SAMPLING_RATE

from .records import AudioRef, SourceError


def probe_audio(path: str | Path, data: bytes | None = None, field: str = "file") -> AudioRef:
    """Read an audio file (or in-memory bytes) once: sha256 of its bytes and its duration.

    Raises SourceError naming the file and field when it is missing or not decodable audio.
    """
    path = str(path)
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SourceError(f"{path}: audio file named in field '{field}' cannot be read ({exc.strerror})") from exc
        keep = None
    else:
        keep = data
    try:
        info = sf.info(io.BytesIO(data))
        duration = float(info.frames) / float(info.samplerate)
        if info.frames <= 0:
            raise ValueError("no audio frames")
    except Exception as exc:  # soundfile raises several types for bad data
        raise SourceError(f"{path}: field '{field}' does not point to readable audio "
                          f"(expected WAV/FLAC/OGG/MP3): {exc}") from exc
    return AudioRef(path=path, sha256=hashlib.sha256(data).hexdigest(), duration=duration, data=keep)


def load_mono_16k(ref: AudioRef) -> np.ndarray:
    """Decode to mono float32 at 16 kHz (polyphase resampling, deterministic)."""
    try:
        raw = ref.data if ref.data is not None else Path(ref.path).read_bytes()
        wave, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as exc:
        raise SourceError(f"{ref.path}: audio cannot be decoded: {exc}") from exc
    wave = wave.mean(axis=1)
    if rate != SAMPLING_RATE:
        from scipy.signal import resample_poly

        g = gcd(int(rate), SAMPLING_RATE)
        wave = resample_poly(wave, SAMPLING_RATE // g, int(rate) // g).astype(np.float32)
    return wave


def encode_wav_16k(ref: AudioRef) -> tuple[bytes, float]:
    """(16 kHz mono 16-bit PCM WAV bytes, duration in seconds) of an audio file."""
    wave = np.clip(load_mono_16k(ref), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLING_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue(), len(wave) / SAMPLING_RATE
