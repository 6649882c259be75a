"""Reference clips: decode any supported container to canonical PCM and fingerprint it.

A clip is untrusted: a few hundred kilobytes of FLAC can declare minutes of audio at 655 kHz in
eight channels. So the header is checked before anything is decoded (container, rate, channels,
declared length), the decode runs in blocks of about a second that are mixed down to mono as they
come (peak memory is the mono result, not frames times channels), and it stops at ``max_s``. What
decodes is then checked to be a voice (speech the VAD hears, not a tone, a DC offset or a clipped
square) and measured, so a streamer learns that a clip is poor before relying on it.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, Final, NewType

import msgpack
import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from protocol.errors import (
    ClipNotAudio,
    ClipNotSpeech,
    ClipSilent,
    ClipTooLong,
    ClipTooShort,
    Unsupported,
)

from .values import Fingerprint as Fingerprint  # its old home, still imported from here

CANONICAL_RATE = 16000

# The spec's formats (wav, flac, ogg, mp3) as libsndfile names them. WAVEX is a WAV with
# WAVE_FORMAT_EXTENSIBLE (what most tools write for more than two channels or 24 bits); RF64
# is the EBU's WAV for long recordings. AIFF, CAF, AU and the rest decode, but are not ours.
_CONTAINERS: Final = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3"})
_MP3_SUBTYPE: Final = "MPEG_LAYER_III"  # libsndfile's "MP3" also reads MPEG layers I and II
MIN_SOURCE_RATE: Final = 8_000
"""Telephone speech; below it there is no voice band to hear (a 1 Hz "20 s" WAV is 84 bytes)."""
MAX_SOURCE_RATE: Final = 192_000
"""The highest rate recorders and audio interfaces offer; FLAC allows 655,350 Hz."""
MAX_SOURCE_CHANNELS: Final = 8
"""7.1 surround; every channel is decoded before the mix-down, so this bounds a block's size."""
MIN_SPEECH_S: Final = 1.0
"""Voiced seconds a reference needs: the encoder embeds 1.6 s partials of what the VAD keeps."""

_FINGERPRINT_DOMAIN = b"livevoice:pcm:v1:f32le:16000:"
# An upload's bytes map to the fingerprint their decode gave: the domain names the decode too,
# so a change to canonical PCM (a new fingerprint domain) never follows an old alias.
_UPLOAD_DOMAIN = b"livevoice:upload:v1:" + _FINGERPRINT_DOMAIN
_ALIAS_VERSION: Final = 1
_SILENCE_PEAK = 1e-4
# libsndfile reports SF_COUNT_MAX frames for a FLAC whose STREAMINFO says "length unknown";
# a declared length beyond a day is no length either. Both mean: trust only the decode.
_UNKNOWN_FRAMES: Final = 2**62
_PLAUSIBLE_S: Final = 24 * 3600.0
# Declared lengths of MP3 are estimates: only one well beyond the limit is refused undecoded.
_DECLARED_SLACK: Final = 1.5
_BLOCK_S: Final = 1.0  # at most 192,000 frames, 8 channels, 4 B: 6 MB decoded at a time
# A float file may run a few dB over full scale (an unlimited mix bus); +24 dB is no recording
# level but garbage, or integers stored as floats (±32767).
_MAX_ABS_SAMPLE: Final = 16.0
_FULL_SCALE: Final = 0.999
_CLIPPED_SOLID: Final = 0.5  # even speech 32 times too loud keeps under half its samples at ±1
_VAD_WINDOW: Final = 480  # 30 ms at 16 kHz, webrtcvad's frame
_WARN_SPEECH_S: Final = 3.0
_WARN_LEVEL_DBFS: Final = -40.0
_WARN_CLIPPED: Final = 0.001
_WARN_DC: Final = 0.05


@dataclass(frozen=True, slots=True)
class ClipQuality:
    """What a registered clip holds, for ``voice.ready.quality``: a poor clip still registers
    (the streamer decides), but says why it may sound wrong."""

    speech_s: float
    """Seconds the VAD hears as speech: what the speaker encoder keeps of the clip."""
    level_dbfs: float
    """RMS of the voiced part, DC removed, in dB to full scale (a full-scale sine is -3)."""
    clipped: float
    """Fraction of samples at full scale (|x| ≥ 0.999), before resampling."""
    warnings: tuple[str, ...] = ()
    """Short human-readable findings, empty for a good clip."""

    def to_wire(self) -> dict[str, Any]:
        return {
            "speech_s": round(self.speech_s, 2),
            "level_dbfs": round(self.level_dbfs, 1),
            "clipped": round(self.clipped, 5),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True, slots=True)
class CanonicalClip:
    pcm: np.ndarray
    """Mono float32 at 16 kHz."""
    fingerprint: Fingerprint
    source_rate: int
    source_channels: int
    quality: ClipQuality

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / CANONICAL_RATE


UploadDigest = NewType("UploadDigest", str)
"""The key of an upload's alias (:class:`UploadAlias`), derived from the SHA-256 of its exact
bytes (:func:`upload_digest`, or :func:`alias_digest` of the ``sha256`` a client sent)."""


def upload_digest(data: bytes) -> UploadDigest:
    """The alias key of an upload's exact bytes.

    SHA-256, not BLAKE2b as the fingerprint: an alias is looked up on every registration, and
    with the SHA extensions of any recent x86 or ARM core it hashes an 830 KB clip in ~0.5 ms
    against BLAKE2b's ~1 ms; and it is the hash a client can send instead of the bytes
    (``voice.register`` with ``sha256``), which browsers compute natively. Cryptographic either
    way: the alias lives in a cache shared by tenants, and a collision would hand one tenant's
    bytes another's voice.
    """
    return alias_digest(hashlib.sha256(data).digest())


def alias_digest(sha256: bytes) -> UploadDigest:
    """The alias key of the bytes whose SHA-256 is ``sha256`` (32 bytes): that hash under the
    upload domain, which names the decode, so a new decode never follows an old alias."""
    return UploadDigest(hashlib.sha256(_UPLOAD_DOMAIN + sha256).hexdigest())


@dataclass(frozen=True, slots=True)
class UploadAlias:
    """What decoding an upload's exact bytes gave: enough to answer ``voice.ready`` for the
    same bytes again without decoding them (the decode is deterministic)."""

    fingerprint: Fingerprint
    duration_s: float
    """Seconds of the canonical clip: checked against the limits in force at each use."""
    quality: ClipQuality

    @classmethod
    def of(cls, clip: CanonicalClip) -> UploadAlias:
        return cls(clip.fingerprint, clip.duration_s, clip.quality)

    def encode(self) -> bytes:
        """The msgpack map kept in Redis (never pickle)."""
        q = self.quality
        packed: bytes = msgpack.packb(
            {
                "v": _ALIAS_VERSION,
                "fp": self.fingerprint,
                "dur": self.duration_s,
                "q": [q.speech_s, q.level_dbfs, q.clipped, list(q.warnings)],
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, raw: bytes) -> UploadAlias | None:
        """The alias in ``raw``, or None for anything this version did not write (a miss)."""
        try:
            obj = msgpack.unpackb(raw, raw=False)
            if not isinstance(obj, dict) or obj.get("v") != _ALIAS_VERSION:
                return None
            fp, duration = obj["fp"], obj["dur"]
            speech_s, level, clipped, warnings = obj["q"]
            if not (isinstance(fp, str) and len(fp) == 64 and isinstance(warnings, list)):
                return None
            quality = ClipQuality(
                float(speech_s), float(level), float(clipped), tuple(str(w) for w in warnings)
            )
            return cls(Fingerprint(fp), float(duration), quality)
        except Exception:  # msgpack's zoo of errors, a wrong shape: all mean "not ours"
            return None


def fingerprint(pcm16k: np.ndarray) -> Fingerprint:
    data = np.ascontiguousarray(pcm16k, dtype="<f4").tobytes()
    return Fingerprint(hashlib.blake2b(_FINGERPRINT_DOMAIN + data, digest_size=32).hexdigest())


def canonicalize(
    data: bytes, *, min_s: float = 1.0, max_s: float = 30.0, min_speech_s: float = MIN_SPEECH_S
) -> CanonicalClip:
    """Decode WAV/FLAC/OGG/MP3 bytes to mono 16 kHz float32 and check that it is a voice.

    The fingerprint is of the canonical PCM exactly as decoded and resampled: DC removal and
    level normalisation are for the checks only, so a clip keeps the fingerprint it always had.
    """
    rate, channels, declared = _header(data, max_s=max_s)
    mono, at_full_scale = _decode_mono(data, rate, max_frames=int(max_s * rate), declared=declared)
    duration_s = len(mono) / rate
    if duration_s < min_s or not len(mono):
        raise ClipTooShort(f"the clip is {duration_s:.2f} s; at least {min_s:g} s is needed")
    dc = float(np.mean(mono, dtype=np.float64))
    swing = max(float(mono.max()) - dc, dc - float(mono.min()))
    if swing < _SILENCE_PEAK:
        offset = f" (only a constant offset of {dc:+.2f})" if abs(dc) >= _SILENCE_PEAK else ""
        raise ClipSilent(f"the clip is silent{offset}")
    clipped = at_full_scale / len(mono)
    if clipped >= _CLIPPED_SOLID:
        raise ClipNotSpeech(f"the clip is clipped solid: {clipped:.0%} of samples at full scale")
    if rate != CANONICAL_RATE:
        mono = soxr.resample(mono, rate, CANONICAL_RATE, quality="HQ")
    pcm = np.ascontiguousarray(mono, dtype=np.float32)
    quality = _assess(pcm, clipped=clipped, dc=dc, min_speech_s=min_speech_s)
    return CanonicalClip(pcm, fingerprint(pcm), rate, channels, quality)


def _header(data: bytes, *, max_s: float) -> tuple[int, int, int | None]:
    """The clip's sample rate, channels and declared frames (None: unknown), refused before
    decoding where they or the container are out of bounds."""
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        raise ClipNotAudio(
            "the clip is not audio in a supported format (wav, flac, ogg, mp3)"
        ) from None
    if info.format not in _CONTAINERS or (info.format == "MP3" and info.subtype != _MP3_SUBTYPE):
        raise ClipNotAudio(f"the clip is {info.format} {info.subtype}; send WAV, FLAC, OGG or MP3")
    if info.channels < 1 or info.samplerate < 1:
        raise ClipNotAudio("the clip declares no channels or no sample rate")
    if not MIN_SOURCE_RATE <= info.samplerate <= MAX_SOURCE_RATE:
        raise Unsupported(
            f"the clip's sample rate is {info.samplerate} Hz; "
            f"{MIN_SOURCE_RATE} to {MAX_SOURCE_RATE} Hz is supported"
        )
    if info.channels > MAX_SOURCE_CHANNELS:
        raise Unsupported(
            f"the clip has {info.channels} channels; at most {MAX_SOURCE_CHANNELS} are supported"
        )
    declared_s = info.frames / info.samplerate
    known = 0 < info.frames < _UNKNOWN_FRAMES and declared_s <= _PLAUSIBLE_S
    if known and declared_s > max_s * _DECLARED_SLACK:
        raise ClipTooLong(f"the clip is {declared_s:.1f} s; the limit is {max_s:g} s")
    return int(info.samplerate), int(info.channels), int(info.frames) if known else None


def _decode_mono(
    data: bytes, rate: int, *, max_frames: int, declared: int | None
) -> tuple[npt.NDArray[np.float32], int]:
    """The clip mixed down to mono at its own rate, a block at a time, up to ``max_frames``;
    and how many of those mono samples are at full scale.

    Each channel's samples are checked as they come: non-finite ones are no audio, ones far
    outside [-1, 1] no voice. The samples are those one whole-file read gave before (the
    fingerprints in Redis were made from it): the same per-frame mean over channels, and no
    more frames than the header declares (an MP3's count is an estimate; soundfile stopped
    there). The mono buffer is allocated for the most frames allowed, but only the pages
    written become resident.
    """
    limit = max_frames + 1 if declared is None else min(max_frames + 1, declared)
    mono = np.empty(limit, dtype=np.float32)
    total = at_full_scale = 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            block = np.empty((min(limit, max(1, int(rate * _BLOCK_S))), f.channels), np.float32)
            while total < limit:
                frames = block[: _read_frames(f, block[: limit - total])]
                if not len(frames):
                    break
                peak = float(np.max(np.abs(frames)))
                if not math.isfinite(peak):
                    raise ClipNotAudio("the clip holds non-finite samples")
                if peak > _MAX_ABS_SAMPLE:
                    raise ClipNotSpeech(f"the clip's samples reach {peak:.3g}, far outside [-1, 1]")
                into = mono[total : total + len(frames)]
                if frames.shape[1] > 1:
                    np.mean(frames, axis=1, dtype=np.float32, out=into)
                else:
                    into[:] = frames[:, 0]
                at_full_scale += int(np.count_nonzero(np.abs(into) >= _FULL_SCALE))
                total += len(frames)
    except (ClipNotAudio, ClipNotSpeech):
        raise
    except Exception:
        raise ClipNotAudio("the clip could not be decoded") from None
    if total > max_frames:
        raise ClipTooLong(f"the clip is longer than {max_frames / rate:g} s")
    return mono[:total], at_full_scale


def _read_frames(f: sf.SoundFile, out: npt.NDArray[np.float32]) -> int:
    """Decode up to ``len(out)`` frames into ``out`` (C-contiguous frames x channels floats).

    libsndfile's ``sf_readf_float`` through soundfile's own handle, because ``SoundFile.read``
    seeks to its new position after every read, and that seek fails at the end of a FLAC whose
    STREAMINFO declares its length unknown (0 samples, as streaming encoders write it): the
    clip's last block would be lost to an error.
    """
    if not len(out):
        return 0
    assert out.flags.c_contiguous and out.dtype == np.float32
    pointer = sf._ffi.cast("float *", out.__array_interface__["data"][0])
    read = int(sf._snd.sf_readf_float(f._file, pointer, len(out)))
    if sf._snd.sf_error(f._file) != 0:
        raise ClipNotAudio("the clip could not be decoded")
    return read


def _assess(
    pcm: npt.NDArray[np.float32], *, clipped: float, dc: float, min_speech_s: float
) -> ClipQuality:
    """Speech seconds, level and findings of a canonical clip; ClipNotSpeech if it is no voice.

    The VAD hears the clip as the encoder will (volume normalised, same webrtcvad, same
    windows), with the DC offset removed first: a constant offset is no sound.
    """
    # live.encoder brings torch: the server has it loaded already, while users of
    # Fingerprint alone (the Redis tier, the bench) should not pay for it.
    from live.encoder import normalize_volume, voice_flags

    usable = len(pcm) - len(pcm) % _VAD_WINDOW
    centred = pcm[:usable] - np.float32(np.mean(pcm, dtype=np.float64))
    flags = voice_flags(normalize_volume(centred)) if usable else np.zeros(0, dtype=bool)
    speech_s = float(np.count_nonzero(flags)) * _VAD_WINDOW / CANONICAL_RATE
    if speech_s < min_speech_s:
        raise ClipNotSpeech(
            f"the clip holds {speech_s:.2f} s of speech; at least {min_speech_s:g} s is needed"
        )
    voiced = centred[np.repeat(flags, _VAD_WINDOW)].astype(np.float64)
    rms = math.sqrt(float(np.mean(voiced * voiced)))
    level_dbfs = 20 * math.log10(max(rms, 1e-10))  # finite, so it stays JSON
    warnings = []
    if speech_s < _WARN_SPEECH_S:
        warnings.append(f"little speech ({speech_s:.1f} s)")
    if level_dbfs < _WARN_LEVEL_DBFS:
        warnings.append(f"quiet ({level_dbfs:.0f} dBFS)")
    if clipped >= _WARN_CLIPPED:
        warnings.append(f"clipping ({clipped * 100:.1f} % of samples)")
    if abs(dc) >= _WARN_DC:
        warnings.append(f"DC offset ({dc:+.2f})")
    return ClipQuality(speech_s, level_dbfs, clipped, tuple(warnings))
