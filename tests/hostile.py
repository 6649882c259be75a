"""A corpus of hostile reference clips, generated on the spot (nothing binary is committed)."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

from tests.clips import reference_clip


def _sf(pcm: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _speech(sr: int) -> np.ndarray:
    import soxr

    pcm, native = reference_clip("piper")
    return np.asarray(soxr.resample(pcm, native, sr), dtype=np.float32)


def _wav_header(*, channels: int, rate: int, bits: int, data_bytes: int) -> bytes:
    block = max(1, channels * bits // 8)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def corpus() -> dict[str, tuple[bytes, set[str]]]:
    """name → (clip bytes, the outcomes allowed: "ok" and/or error codes)."""
    speech16 = _speech(16000)
    pcm16 = np.round(speech16 * 32767).astype("<i2").tobytes()
    wav = _wav_header(channels=1, rate=16000, bits=16, data_bytes=len(pcm16)) + pcm16
    rng = np.random.default_rng(7)
    silence_10min = np.zeros(48000 * 600, dtype=np.int16)
    return {
        "truncated wav": (wav[: len(wav) // 3], {"ok", "clip_not_audio", "clip_too_short"}),
        "truncated header": (wav[:20], {"clip_not_audio"}),
        "header claims 2 GB": (
            _wav_header(channels=1, rate=16000, bits=16, data_bytes=2**31) + pcm16,
            {"ok", "clip_not_audio", "clip_too_long"},
        ),
        "zero channels": (
            _wav_header(channels=0, rate=16000, bits=16, data_bytes=len(pcm16)) + pcm16,
            {"clip_not_audio"},
        ),
        "zero sample rate": (
            _wav_header(channels=1, rate=0, bits=16, data_bytes=len(pcm16)) + pcm16,
            {"clip_not_audio"},
        ),
        "8-bit": (_sf(speech16, 16000, "WAV", "PCM_U8"), {"ok"}),
        "24-bit": (_sf(speech16, 16000, "WAV", "PCM_24"), {"ok"}),
        "32-bit int": (_sf(speech16, 16000, "WAV", "PCM_32"), {"ok"}),
        "32-bit float": (_sf(speech16, 16000, "WAV", "FLOAT"), {"ok"}),
        "float beyond full scale": (_sf(speech16 * 8, 16000, "WAV", "FLOAT"), {"ok"}),
        "96 kHz": (_sf(_speech(96000), 96000, "WAV", "PCM_16"), {"ok"}),
        "6 channels": (_sf(np.stack([speech16] * 6, axis=1), 16000, "WAV", "PCM_16"), {"ok"}),
        "mp3": (_sf(_speech(44100), 44100, "MP3"), {"ok"}),
        "ogg vorbis": (_sf(_speech(44100), 44100, "OGG", "VORBIS"), {"ok"}),
        "silence only": (_sf(np.zeros(16000 * 3), 16000, "WAV", "PCM_16"), {"clip_silent"}),
        "white noise": (_sf(rng.uniform(-0.5, 0.5, 16000 * 3), 16000, "WAV", "PCM_16"), {"ok"}),
        "ten minutes": (
            _sf(rng.uniform(-0.3, 0.3, 8000 * 600), 8000, "WAV", "PCM_U8"),
            {"clip_too_long"},
        ),
        "10 MB of junk": (rng.bytes(10 * 1024 * 1024), {"clip_not_audio"}),
        "just over 10 MB": (b"RIFF" + rng.bytes(10 * 1024 * 1024), {"clip_too_large"}),
        "flac bomb: 10 min of silence in a few KB": (
            _sf(silence_10min, 48000, "FLAC"),
            {"clip_too_long"},
        ),
        "nan floats": (
            _wav_float_nan(speech16),
            {"ok", "clip_not_audio"},
        ),
    }


def _wav_float_nan(speech: np.ndarray) -> bytes:
    data = speech.copy()
    data[1000:1010] = np.nan
    return _sf(data, 16000, "WAV", "FLOAT")
