"""Audio helpers: probe a file (content hash, duration, checks) and encode it as 16 kHz mono PCM WAV.

Every source clip is checked when read (one SourceError line naming the file and field otherwise):
- decodable: the whole signal decodes (WAV/FLAC/OGG/MP3 through libsndfile), not only its header;
- complete: a WAV whose header declares more audio bytes than the file holds is rejected as truncated;
- long enough: at least `MIN_SECONDS` (0.1 s; the shortest clips of the paper's sources are about 0.11 s, paper
  Table 4), so a file cut to its header plus a few samples is not taken for a clip;
- its sampling rate: the rate its header declares must lie in `RATE_RANGE` (8-192 kHz; every clip is resampled to
  16 kHz), and must equal the rate a source declares for it (`declared_rate`) when the source declares one.
"""

from __future__ import annotations

import hashlib
import io
import re
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from sake_core.protocol import SAMPLING_RATE

from .records import AudioRef, SourceError

MIN_SECONDS = 0.1
RATE_RANGE = (8000, 192000)
_OPENING = re.compile(r"^Error opening <[^>]*>: ")


def _decode_failure(exc: Exception, data: bytes) -> str:
    """Why bytes are not audio, in words: libsndfile's reason without the in-memory buffer it names, and the
    size (a file cut to its first bytes says so)."""
    if not data:
        return "the file is empty (0 bytes)"
    reason = _OPENING.sub("", " ".join(str(exc).split())).rstrip(".") or type(exc).__name__
    return f"{reason} ({len(data)} bytes)"


def _wav_truncation(data: bytes) -> str | None:
    """For RIFF/WAVE bytes: a message when the `data` chunk declares more bytes than the file holds."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            have = len(data) - pos - 8
            if size != 0xFFFFFFFF and size > have:
                return f"truncated WAV: its header declares {size} bytes of audio, the file holds {have}"
            return None
        pos += 8 + size + (size & 1)
    return "WAV without a data chunk"


def probe_audio(path: str | Path, data: bytes | None = None, field: str = "file",
                declared_rate: int | None = None) -> AudioRef:
    """Read an audio file (or in-memory bytes) once and check it (module docstring): sha256 of its bytes and its
    duration.

    Raises SourceError naming the file and field when it is missing, not decodable, truncated, too short or at a
    sampling rate other than the declared one.
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
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        if len(wave) == 0:
            raise ValueError("no audio frames")
    except Exception as exc:  # soundfile raises several types for bad data
        raise SourceError(f"{path}: field '{field}' does not point to readable audio "
                          f"(expected WAV/FLAC/OGG/MP3): {_decode_failure(exc, data)}") from None
    problem = _wav_truncation(data)
    if problem:
        raise SourceError(f"{path}: field '{field}': {problem}")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise SourceError(f"{path}: field '{field}': sampling rate {rate} Hz outside the supported "
                          f"{RATE_RANGE[0]}-{RATE_RANGE[1]} Hz")
    if declared_rate is not None and int(declared_rate) != int(rate):
        raise SourceError(f"{path}: field '{field}': sampling rate {rate} Hz, but the source declares "
                          f"{declared_rate} Hz")
    duration = len(wave) / float(rate)
    if duration < MIN_SECONDS:
        raise SourceError(f"{path}: field '{field}': audio is {duration * 1000:.1f} ms long (expected at least "
                          f"{MIN_SECONDS} s)")
    return AudioRef(path=path, sha256=hashlib.sha256(data).hexdigest(), duration=duration, data=keep)


def load_mono_16k(ref: AudioRef) -> np.ndarray:
    """Decode to mono float32 at 16 kHz (polyphase resampling, deterministic)."""
    try:
        raw = ref.data if ref.data is not None else Path(ref.path).read_bytes()
        wave, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except OSError as exc:
        raise SourceError(f"{ref.path}: audio cannot be read ({exc.strerror})") from None
    except Exception as exc:
        raise SourceError(f"{ref.path}: audio cannot be decoded: {_decode_failure(exc, raw)}") from None
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
