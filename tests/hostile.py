"""A corpus of hostile reference clips, generated on the spot (nothing binary is committed)."""

from __future__ import annotations

import functools
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


def streamed(
    sr: int, channels: int, seconds: float, fmt: str, subtype: str, block: np.ndarray | None = None
) -> bytes:
    """``seconds`` of ``block`` (1 s of silence by default) repeated, written a second at a time,
    so a decoding bomb of gigabytes of samples is built in a few megabytes."""
    buf = io.BytesIO()
    one_second = np.zeros((sr, channels), dtype=np.int16) if block is None else block
    with sf.SoundFile(buf, "w", sr, channels, format=fmt, subtype=subtype) as f:
        whole, rest = divmod(int(seconds * sr), sr)
        for _ in range(whole):
            f.write(one_second)
        f.write(one_second[:rest])
    return buf.getvalue()


@functools.cache
def flac_bomb_655khz() -> bytes:
    """The bomb of issue 9 item 7: 30 s at 655,350 Hz (FLAC's largest rate) in 8 channels, ~170 KB
    of FLAC that decodes to 157 M samples (630 MB as float32)."""
    return streamed(655_350, 8, 30.0, "FLAC", "PCM_16")


@functools.cache
def flac_192khz_8ch(seconds: float = 29.0) -> bytes:
    """Within the rate and channel limits, under ``max_clip_s``: decoded whole as float32 frames
    this is 178 MB; decoded in mono blocks it is the 22 MB of its mono mix."""
    return streamed(192_000, 8, seconds, "FLAC", "PCM_16")


@functools.cache
def ogg_channels(channels: int = 255, seconds: float = 1.0) -> bytes:
    """Vorbis in ``channels`` channels (255 is the most Ogg Vorbis allows)."""
    return streamed(44_100, channels, seconds, "OGG", "VORBIS", np.zeros((44_100, channels)))


def flac_length_unknown(flac: bytes) -> bytes:
    """The same FLAC with STREAMINFO's total-samples field set to 0, which the FLAC format
    defines as "unknown" (a streaming encoder writes it so); every frame is left intact."""
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0, "STREAMINFO must be the first block"
    # STREAMINFO starts at byte 8; its bytes 10..17 hold rate (20 bits), channels - 1 (3),
    # bits per sample - 1 (5) and the total samples (the low 36 bits), big-endian.
    start = 8 + 10
    (packed,) = struct.unpack(">Q", flac[start : start + 8])
    packed &= ~((1 << 36) - 1)
    return flac[:start] + struct.pack(">Q", packed) + flac[start + 8 :]


def wav_1hz() -> bytes:
    """84 bytes that declare 20 s of 16-bit audio at 1 Hz: a "20 s voice" before the fix."""
    samples = np.array([0, 20000, -20000] * 6 + [0, 0], dtype="<i2").tobytes()
    return _wav_header(channels=1, rate=1, bits=16, data_bytes=len(samples)) + samples


def aiff(speech: np.ndarray) -> bytes:
    """Real speech in AIFF: audio, but not a container the spec accepts."""
    return _sf(speech, 16000, "AIFF", "PCM_16")


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
        # Issue 9 items 7, 11 and 12: decoding bombs, an unknown length, degenerate clips.
        "flac 655 kHz 8 channels 30 s": (flac_bomb_655khz(), {"unsupported"}),
        "ogg vorbis 255 channels": (ogg_channels(255), {"unsupported"}),
        "flac length unknown": (flac_length_unknown(_sf(speech16, 16000, "FLAC")), {"ok"}),
        "flac length unknown, 10 min": (
            flac_length_unknown(streamed(8000, 1, 600.0, "FLAC", "PCM_16")),
            {"clip_too_long"},
        ),
        "wav 1 Hz, 84 bytes": (wav_1hz(), {"unsupported"}),
        "aiff": (aiff(speech16), {"clip_not_audio"}),
        "dc offset only": (_sf(np.full(16000 * 3, 0.5), 16000, "WAV", "PCM_16"), {"clip_silent"}),
        "float ±1e30": (
            _sf(np.where(rng.random(16000 * 3) < 0.5, -1e30, 1e30), 16000, "WAV", "FLOAT"),
            {"clip_not_speech"},
        ),
        "tone 180 Hz": (_sf(_tone(180.0, 3.0), 16000, "WAV", "PCM_16"), {"clip_not_speech"}),
        "square wave, clipped solid": (
            _sf(np.sign(_tone(200.0, 3.0)), 16000, "WAV", "PCM_16"),
            {"clip_not_speech"},
        ),
        "half a second of speech in 4 s": (
            _sf(_padded(speech16[8000:16000], 4.0), 16000, "WAV", "PCM_16"),
            {"clip_not_speech"},
        ),
    }


def _tone(hz: float, seconds: float, sr: int = 16000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _padded(pcm: np.ndarray, seconds: float, sr: int = 16000) -> np.ndarray:
    out = np.zeros(int(seconds * sr), dtype=np.float32)
    out[: len(pcm)] = pcm
    return out


def _wav_float_nan(speech: np.ndarray) -> bytes:
    data = speech.copy()
    data[1000:1010] = np.nan
    return _sf(data, 16000, "WAV", "FLOAT")
