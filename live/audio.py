"""Reference clips: decode any supported container to canonical PCM and fingerprint it."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import NewType

import numpy as np
import soundfile as sf
import soxr

from protocol.errors import ClipNotAudio, ClipSilent, ClipTooLong, ClipTooShort

CANONICAL_RATE = 16000
Fingerprint = NewType("Fingerprint", str)
"""Hex BLAKE2b-256 of a clip's canonical PCM: the same audio in any container has the same one."""

_FINGERPRINT_DOMAIN = b"livevoice:pcm:v1:f32le:16000:"
_SILENCE_PEAK = 1e-4


@dataclass(frozen=True, slots=True)
class CanonicalClip:
    pcm: np.ndarray
    """Mono float32 at 16 kHz."""
    fingerprint: Fingerprint
    source_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / CANONICAL_RATE


def fingerprint(pcm16k: np.ndarray) -> Fingerprint:
    data = np.ascontiguousarray(pcm16k, dtype="<f4").tobytes()
    return Fingerprint(hashlib.blake2b(_FINGERPRINT_DOMAIN + data, digest_size=32).hexdigest())


def canonicalize(data: bytes, *, min_s: float = 1.0, max_s: float = 30.0) -> CanonicalClip:
    """Decode WAV/FLAC/OGG/MP3 bytes to mono 16 kHz float32, checking duration before decoding."""
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        raise ClipNotAudio(
            "the clip is not audio in a supported format (wav, flac, ogg, mp3)"
        ) from None
    if info.channels < 1 or info.samplerate < 1:
        raise ClipNotAudio("the clip declares no channels or no sample rate")
    # The header's frame count can lie (or be unknown for MP3); it only guards the decode's size.
    declared_s = info.frames / info.samplerate if info.frames > 0 else 0.0
    if declared_s > max_s * 1.5:
        raise ClipTooLong(f"the clip is {declared_s:.1f} s; the limit is {max_s:g} s")
    max_frames = int((max_s + 1) * info.samplerate)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            pcm = f.read(frames=max_frames, dtype="float32", always_2d=True)
    except Exception:
        raise ClipNotAudio("the clip could not be decoded") from None
    duration_s = pcm.shape[0] / info.samplerate
    if duration_s > max_s:
        raise ClipTooLong(f"the clip is longer than {max_s:g} s")
    if duration_s < min_s:
        raise ClipTooShort(f"the clip is {duration_s:.2f} s; at least {min_s:g} s is needed")
    mono = pcm.mean(axis=1, dtype=np.float32) if pcm.shape[1] > 1 else pcm[:, 0]
    if not np.all(np.isfinite(mono)):
        raise ClipNotAudio("the clip holds non-finite samples")
    if float(np.max(np.abs(mono))) < _SILENCE_PEAK:
        raise ClipSilent("the clip is silent")
    if info.samplerate != CANONICAL_RATE:
        mono = soxr.resample(mono, info.samplerate, CANONICAL_RATE, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    return CanonicalClip(mono, fingerprint(mono), info.samplerate, info.channels)


def to_s16le(pcm: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as signed 16-bit little-endian bytes."""
    clipped = np.clip(pcm, -1.0, 1.0)
    return bytes(np.round(clipped * 32767.0).astype("<i2").tobytes())
