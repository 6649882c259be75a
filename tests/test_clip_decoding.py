"""Reference clip decoding: bombs refused from the header, bounded decodes, unknown lengths,
degenerate clips refused as no voice, and the quality report of a good clip (issue 9, items 7,
11 and 12).

Memory is measured in a fresh subprocess (``tests/clip_decode_probe.py``: VmHWM after resetting
it, minus VmRSS), so nothing else this test process holds is counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import soundfile as sf
import soxr

from live.audio import ClipQuality, canonicalize
from protocol.errors import LivevoiceError
from tests import hostile
from tests.clips import (
    flac_bytes,
    mp3_bytes,
    ogg_bytes,
    quantize,
    reference_clip,
    to_16k,
    wav_bytes,
)

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "clip_decode_probe.py"


def answer(data: bytes, **limits: float) -> str:
    try:
        canonicalize(data, **limits)
    except LivevoiceError as exc:
        assert exc.message
        return exc.code
    return "ok"


def probe(tmp_path: Path, data: bytes, *, copies: int = 1) -> dict[str, Any]:
    """Decode ``data`` (``copies`` at once, on threads) in a fresh process: its answer and cost."""
    clip, warm = tmp_path / "clip.bin", tmp_path / "warm.wav"
    clip.write_bytes(data)
    warm.write_bytes(wav_bytes(*reference_clip("piper")))
    done = subprocess.run(
        [sys.executable, str(PROBE), str(clip), "--warm", str(warm), "--copies", str(copies)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    print(result)
    assert result["same_answers"]
    return result


def speech_at(sr: int, seconds: float | None = None) -> np.ndarray:
    pcm, native = reference_clip("piper")
    out = np.asarray(soxr.resample(pcm, native, sr), dtype=np.float32)
    return out if seconds is None else out[: int(seconds * sr)]


def encode(pcm: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


# --- item 7: decoding bombs -----------------------------------------------------------------------
def test_four_655khz_8_channel_flac_bombs_at_once_are_refused_from_the_header(
    tmp_path: Path,
) -> None:
    # Before: each decoded 30 s x 655,350 Hz x 8 channels as float32 (+750 MB, 2.5 CPU s);
    # four at once peaked at +2.9 GB and 10 CPU s here, and answered clip_silent.
    bomb = hostile.flac_bomb_655khz()
    assert len(bomb) < 256 * 1024
    result = probe(tmp_path, bomb, copies=4)
    assert result["code"] == "unsupported" and "655350 Hz" in result["message"]
    assert result["peak_growth_mb"] < 64
    assert result["cpu_s"] < 1.0  # CPU seconds of the probe itself, not wall time


def test_a_255_channel_ogg_is_refused_from_the_header() -> None:
    assert answer(hostile.ogg_channels(255)) == "unsupported"
    assert answer(hostile.ogg_channels(9)) == "unsupported"
    assert answer(encode(np.stack([speech_at(16000)] * 8, axis=1), 16000, "WAV")) == "ok"


def test_a_clip_within_the_limits_decodes_in_mono_blocks(tmp_path: Path) -> None:
    # 29 s x 192 kHz x 8 channels: 178 MB as float32 frames, 22 MB as its mono mix. Before, the
    # whole file was decoded at once (+214 MB here); now a block at a time, mixed down as it comes.
    result = probe(tmp_path, hostile.flac_192khz_8ch(29.0))
    assert result["code"] == "clip_silent"
    assert result["peak_growth_mb"] < 110


def test_a_long_clip_of_unknown_length_stops_at_max_clip_s(tmp_path: Path) -> None:
    # Before: refused undecoded as "the clip is 48038396025285.3 s" (libsndfile's "unknown").
    two_minutes = hostile.flac_length_unknown(hostile.flac_192khz_8ch(120.0))
    assert sf.info(io.BytesIO(two_minutes)).frames >= 2**62
    result = probe(tmp_path, two_minutes)
    assert result["code"] == "clip_too_long"
    assert result["message"] == "the clip is longer than 30 s"
    assert result["peak_growth_mb"] < 110


def test_a_declared_length_well_over_the_limit_is_refused_undecoded() -> None:
    ten_minutes = hostile.streamed(48000, 1, 600.0, "FLAC", "PCM_16")
    with pytest.raises(LivevoiceError) as refused:
        canonicalize(ten_minutes)
    assert refused.value.code == "clip_too_long"
    assert refused.value.message == "the clip is 600.0 s; the limit is 30 s"


# --- item 11: a FLAC of unknown length ------------------------------------------------------------
def test_a_flac_declaring_its_length_unknown_is_decoded_like_the_same_flac() -> None:
    pcm, sr = reference_clip("piper")
    flac = flac_bytes(quantize(pcm), sr)
    unknown = hostile.flac_length_unknown(flac)
    assert sf.info(io.BytesIO(flac)).frames == len(pcm)
    assert sf.info(io.BytesIO(unknown)).frames >= 2**62  # libsndfile's SF_COUNT_MAX
    known_clip, unknown_clip = canonicalize(flac), canonicalize(unknown)
    assert unknown_clip.fingerprint == known_clip.fingerprint
    assert unknown_clip.duration_s == pytest.approx(len(pcm) / sr, abs=1e-3)


# --- item 12: degenerate clips ------------------------------------------------------------------
def _tone(hz: float) -> np.ndarray:
    return np.sin(2 * np.pi * hz * np.arange(16000 * 3) / 16000)


def _pm1e30() -> np.ndarray:
    return np.where(np.random.default_rng(3).random(48000) < 0.5, -1e30, 1e30)


DEGENERATE: dict[str, tuple[Callable[[], bytes], str]] = {
    "aiff (not a spec format)": (lambda: hostile.aiff(speech_at(16000)), "clip_not_audio"),
    "caf": (lambda: encode(speech_at(16000), 16000, "CAF", "PCM_16"), "clip_not_audio"),
    "84-byte WAV at 1 Hz": (hostile.wav_1hz, "unsupported"),
    "7,999 Hz": (lambda: encode(speech_at(7999), 7999, "WAV", "PCM_16"), "unsupported"),
    "9 channels": (
        lambda: encode(np.stack([speech_at(16000)] * 9, axis=1), 16000, "WAV"),
        "unsupported",
    ),
    "a DC offset only": (
        lambda: encode(np.full(48000, 0.5), 16000, "WAV", "PCM_16"),
        "clip_silent",
    ),
    "a DC offset and a faint ramp": (
        lambda: encode(0.5 + np.linspace(0, 0.01, 48000), 16000, "WAV", "PCM_16"),
        "clip_not_speech",
    ),
    "floats of ±1e30": (lambda: encode(_pm1e30(), 16000, "WAV", "FLOAT"), "clip_not_speech"),
    "int16 values stored as floats": (
        lambda: encode(speech_at(16000) * 32767, 16000, "WAV", "FLOAT"),
        "clip_not_speech",
    ),
    "a 180 Hz tone": (lambda: encode(0.3 * _tone(180), 16000, "WAV"), "clip_not_speech"),
    "a square wave at full scale": (
        lambda: encode(np.sign(_tone(200)), 16000, "WAV", "PCM_16"),
        "clip_not_speech",
    ),
    "half a second of speech in 4 s": (
        lambda: encode(
            np.concatenate([speech_at(16000)[8000:16000], np.zeros(56000)]), 16000, "WAV"
        ),
        "clip_not_speech",
    ),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_clips_are_refused(case: str) -> None:
    build, code = DEGENERATE[case]
    assert answer(build()) == code


def test_real_speech_in_every_format_passes_with_a_clean_report() -> None:
    for kind in ("piper", "espeak"):
        pcm, sr = reference_clip(kind)
        for data in (
            wav_bytes(pcm, sr),
            flac_bytes(pcm, sr),
            ogg_bytes(pcm, sr),
            mp3_bytes(pcm, sr),
            wav_bytes(speech_at(8000), 8000),
            wav_bytes(speech_at(192000), 192000, "PCM_24"),
        ):
            quality = canonicalize(data).quality
            assert quality.speech_s > 4.0, (kind, quality)
            assert -30 < quality.level_dbfs < -10, (kind, quality)
            assert quality.clipped < 0.001 and quality.warnings == (), (kind, quality)


def test_poor_clips_pass_with_warnings() -> None:
    speech = speech_at(16000)
    quiet = canonicalize(wav_bytes(speech * 0.01, 16000)).quality
    assert quiet.level_dbfs < -50 and quiet.speech_s > 4.0
    assert quiet.warnings == (f"quiet ({quiet.level_dbfs:.0f} dBFS)",)

    loud = canonicalize(wav_bytes(np.clip(speech * 4, -1, 1), 16000)).quality
    assert 0.01 < loud.clipped < 0.1
    assert loud.warnings == (f"clipping ({loud.clipped * 100:.1f} % of samples)",)

    short = canonicalize(wav_bytes(speech[: 16000 * 2], 16000)).quality
    assert 1.0 <= short.speech_s < 2.1
    assert short.warnings == (f"little speech ({short.speech_s:.1f} s)",)


def test_a_dc_offset_is_removed_before_the_analysis() -> None:
    speech = speech_at(16000)
    plain = canonicalize(wav_bytes(speech, 16000)).quality
    offset = canonicalize(wav_bytes(speech * 0.5 + 0.3, 16000)).quality
    assert offset.speech_s == pytest.approx(plain.speech_s, abs=0.2)
    assert offset.level_dbfs == pytest.approx(plain.level_dbfs - 6.0, abs=0.5)
    assert offset.warnings == ("DC offset (+0.30)",)


def test_the_quality_report_is_json_for_voice_ready() -> None:
    quality = canonicalize(wav_bytes(speech_at(16000, 2.0), 16000)).quality
    wire = orjson.loads(orjson.dumps(quality.to_wire()))
    assert set(wire) == {"speech_s", "level_dbfs", "clipped", "warnings"}
    assert wire["warnings"] == list(quality.warnings) and len(wire["warnings"]) == 1
    assert isinstance(quality, ClipQuality)
    with pytest.raises(AttributeError):
        quality.speech_s = 9.0  # type: ignore[misc]


# --- the fingerprint of a normal clip is unchanged ------------------------------------------------
def _fingerprint_as_before(data: bytes) -> str:
    """The decode the fingerprints in Redis were made with (live/audio.py before issue 9): one
    read of the whole file (``sf.read`` would seek first, which changes MP3 samples by an ulp),
    the mean over channels in float32, soxr HQ to 16 kHz, BLAKE2b of the float32 samples."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate = f.samplerate
        pcm = f.read(frames=31 * rate, dtype="float32", always_2d=True)
    mono = pcm.mean(axis=1, dtype=np.float32) if pcm.shape[1] > 1 else pcm[:, 0]
    if rate != 16000:
        mono = soxr.resample(mono, rate, 16000, quality="HQ")
    raw = np.ascontiguousarray(mono, dtype="<f4").tobytes()
    return hashlib.blake2b(b"livevoice:pcm:v1:f32le:16000:" + raw, digest_size=32).hexdigest()


def test_normal_clips_keep_the_fingerprint_they_had() -> None:
    pcm, sr = reference_clip("piper")
    at48k = speech_at(48000)
    for data in (
        wav_bytes(pcm, sr),
        wav_bytes(to_16k(pcm, sr), 16000),
        flac_bytes(pcm, sr),
        ogg_bytes(pcm, sr),
        mp3_bytes(pcm, sr),
        mp3_bytes(np.stack([at48k, at48k * 0.5], axis=1), 48000),
        wav_bytes(pcm, sr, "FLOAT"),
        wav_bytes(speech_at(96000), 96000, "PCM_24"),
        encode(np.stack([at48k, at48k * 0.5], axis=1), 48000, "FLAC"),
        encode(np.stack([at48k * (0.3 + 0.1 * i) for i in range(6)], axis=1), 48000, "WAV"),
    ):
        assert canonicalize(data).fingerprint == _fingerprint_as_before(data)
