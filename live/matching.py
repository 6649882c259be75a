"""Voice matching: the engine's voice moved toward the registered clip's pitch, formants and pace.

Not cloning: three things the ear notices first are measured from the clip once
(:func:`analyse`, a :class:`VoiceProfile` cached with the embedding) and applied to the
engine's own output on the CPU — pitch level and range and formants by PSOLA (Praat's "Change
gender" through parselmouth), pace through the engine's ``length_scale``. Measured against
WORLD (pyworld) on the same line (issue 14, and ``python -m bench --scenario matching``):
PSOLA kept more words recognisable (recall 0.82 against 0.77) at a fifth of the CPU (0.01
against 0.055 CPU seconds per audio second), with the speaker encoder's score as close or
closer. The parameters come from acoustic measurements of the clip only, never from the
speaker encoder's score of the output: tuning to that would tune to the metric.

Praat and parselmouth are GPL-3.0-or-later, like piper-tts (see the README).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import math
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from .values import VoiceProfile

__all__ = [
    "JOE",
    "LIMITS",
    "OWN_VOICE_TEXT",
    "ChunkMatcher",
    "Match",
    "MatchLimits",
    "VoiceMatching",
    "VoiceProfile",
    "analyse",
    "plan",
]

_PITCH_FLOOR_HZ: Final = 60.0
_PITCH_CEILING_HZ: Final = 500.0
_FORMANT_CEILING_HZ: Final = 5500.0
"""Praat's standard ceiling for a speaker of unknown sex: the same for clip and engine, so
the ratio of the two measurements is what counts, not the absolute bias."""
_SILENCE_DB: Final = 25.0
"""Speech is what lies within this of the loudest frames (99th percentile of intensity)."""
_MIN_DIP_DB: Final = 2.0
"""A syllable nucleus is an intensity peak with at least this dip before it (de Jong and
Wempe, Behav. Res. Methods 41, 2009)."""

OWN_VOICE_TEXT: Final = (
    "The quick brown fox jumps over the lazy dog. Every morning I read the news by the window. "
    "Thanks for the follow, welcome to the stream. The next game starts in five minutes, so "
    "grab a snack and get comfy."
)
"""What an engine says to measure its own voice (``live.testing.clips.REFERENCE_TEXT`` and the
bench's line)."""

JOE: Final = VoiceProfile(
    f0_hz=89.0,
    f0_range_st=6.5,
    formants_hz=(1533.0, 2546.0, 3460.0),
    syllables_per_s=4.9,
)
"""Piper ``en_US-joe-medium``'s own voice, measured once by :func:`analyse` on its output (at
16 kHz) for ``live.testing.clips.REFERENCE_TEXT`` followed by the bench's line: F0 88.9 Hz,
range 6.5 st, F2-F4 1533/2546/3460 Hz; the syllable rate is the mean over the two texts apart
and together (4.8, 4.4, 5.4: pace is the noisiest measure, hence its wide dead zone).
``tests/test_voice_matching.py`` measures Piper again and fails when these drift."""


@dataclass(frozen=True, slots=True)
class MatchLimits:
    """How far matching may move the engine's voice: beyond these a clip is clamped, and
    ``voice.ready.matched.clamped`` says what was limited. A child's voice must not turn the
    engine into a chipmunk, nor a very deep one into a growl."""

    f0_hz: tuple[float, float] = (75.0, 250.0)
    """The target pitch median stays within the adult speaking range."""
    range_ratio: tuple[float, float] = (0.6, 1.6)
    formant_ratio: tuple[float, float] = (0.87, 1.2)
    """About the span between adult voices; PSOLA past it sounds processed."""
    length_scale: tuple[float, float] = (0.8, 1.25)
    pitch_dead_st: float = 1.0
    """Differences below these are left alone: they are within what the measurements vary
    by between two texts of one speaker (Piper's own median F0 moves by ~1 st, its range by
    ~20 %, its syllable rate by ~15 %), so the engine's own voice passes through untouched."""
    range_dead: float = 0.25
    formant_dead: float = 0.03
    length_dead: float = 0.15


LIMITS: Final = MatchLimits()


@dataclass(frozen=True, slots=True)
class Match:
    """What the engine does to its output to match one profile."""

    pitch_ratio: float
    """F0 multiplier (1.0: pitch untouched)."""
    range_ratio: float
    """Multiplier of the pitch's spread around its median."""
    formant_ratio: float
    """Formant frequencies multiplier (1.0: untouched)."""
    length_scale: float
    """Multiplier of the engine's ``length_scale`` (above 1: slower)."""
    pitch_hz: float
    """The pitch median the engine aims at."""
    clamped: tuple[str, ...]
    """What the limits held back: ``pitch``, ``pitch_range``, ``formants``, ``pace``."""

    @property
    def reshapes(self) -> bool:
        """Whether the output goes through PSOLA at all (pace alone is the engine's)."""
        return self.pitch_ratio != 1.0 or self.range_ratio != 1.0 or self.formant_ratio != 1.0

    def to_wire(self) -> dict[str, Any]:
        """``voice.ready.matched``."""
        return {
            "pitch_hz": round(self.pitch_hz, 1),
            "pitch_range": round(self.range_ratio, 3),
            "formants": round(self.formant_ratio, 3),
            "pace": round(1.0 / self.length_scale, 3),
            "clamped": list(self.clamped),
        }


@runtime_checkable
class VoiceMatching(Protocol):
    """An engine that matches voices: it knows its own voice's profile, and its ``stream``
    takes ``profile=``. Engines without it (a zero-shot engine conditioned on the embedding)
    are left as they are."""

    voice_reference: VoiceProfile

    def match(self, profile: VoiceProfile) -> Match:
        """What the engine's ``stream(..., profile=profile)`` does (``voice.ready.matched``)."""
        ...


def _clamp(value: float, bounds: tuple[float, float]) -> tuple[float, bool]:
    low, high = bounds
    clamped = min(max(value, low), high)
    return clamped, clamped != value


def plan(profile: VoiceProfile, reference: VoiceProfile, limits: MatchLimits = LIMITS) -> Match:
    """How to move the engine's voice (``reference``) toward ``profile``, within ``limits``."""
    clamped: list[str] = []
    target_f0, hit = _clamp(profile.f0_hz, limits.f0_hz)
    if hit:
        clamped.append("pitch")
    pitch_ratio = target_f0 / reference.f0_hz
    if abs(12 * math.log2(pitch_ratio)) < limits.pitch_dead_st:
        pitch_ratio, target_f0 = 1.0, reference.f0_hz

    def ratio(value: float, bounds: tuple[float, float], dead: float, name: str) -> float:
        """``value`` within ``bounds`` (``name`` noted as clamped when it was not), and 1.0
        when that is within ``dead`` of it: a difference the ear would not notice."""
        kept, hit = _clamp(value, bounds)
        if hit:
            clamped.append(name)
        return 1.0 if abs(kept - 1.0) < dead else kept

    range_ratio = ratio(
        profile.f0_range_st / max(reference.f0_range_st, 0.5),
        limits.range_ratio,
        limits.range_dead,
        "pitch_range",
    )
    formants = [c / r for c, r in zip(profile.formants_hz, reference.formants_hz, strict=True)]
    formant_ratio = ratio(
        float(np.exp(np.mean(np.log(formants)))),
        limits.formant_ratio,
        limits.formant_dead,
        "formants",
    )
    length_scale = ratio(
        reference.syllables_per_s / max(profile.syllables_per_s, 0.5),
        limits.length_scale,
        limits.length_dead,
        "pace",
    )
    return Match(
        pitch_ratio=pitch_ratio,
        range_ratio=range_ratio,
        formant_ratio=formant_ratio,
        length_scale=length_scale,
        pitch_hz=target_f0,
        clamped=tuple(clamped),
    )


def analyse(pcm: npt.ArrayLike, sample_rate: int = 16_000) -> VoiceProfile | None:
    """The clip's pitch, formants and pace; None when it has too little voiced speech to say.

    About 20 ms per second of clip on one core (pitch, formants and intensity tracks).
    """
    import parselmouth

    x = np.asarray(pcm, dtype=np.float64)
    if x.size < sample_rate // 4 or not np.isfinite(x).all():
        return None
    sound = parselmouth.Sound(x, sampling_frequency=float(sample_rate))
    pitch = sound.to_pitch(
        time_step=0.01, pitch_floor=_PITCH_FLOOR_HZ, pitch_ceiling=_PITCH_CEILING_HZ
    )
    f0_track = pitch.selected_array["frequency"]
    voiced = f0_track > 0
    if voiced.sum() < 20:  # under 0.2 s voiced: nothing to measure
        return None
    f0 = f0_track[voiced]
    p10, p50, p90 = np.percentile(f0, [10, 50, 90])
    times = pitch.xs()[voiced]
    formant = sound.to_formant_burg(
        time_step=0.01, max_number_of_formants=5, maximum_formant=_FORMANT_CEILING_HZ
    )
    formants: list[float] = []
    for number in (2, 3, 4):
        track = np.array([formant.get_value_at_time(number, t) for t in times])
        track = track[np.isfinite(track)]
        if track.size == 0:
            return None
        formants.append(float(np.median(track)))
    return VoiceProfile(
        f0_hz=round(float(p50), 2),
        f0_range_st=round(float(12 * math.log2(p90 / p10)), 3),
        formants_hz=(round(formants[0], 1), round(formants[1], 1), round(formants[2], 1)),
        syllables_per_s=round(_syllable_rate(sound, pitch), 3),
    )


def _syllable_rate(sound: Any, pitch: Any) -> float:
    """Syllable nuclei per second of speech: intensity peaks that stand ``_MIN_DIP_DB`` above
    the dip before them, within ``_SILENCE_DB`` of the loudest frames, and voiced."""
    intensity = sound.to_intensity(minimum_pitch=50.0, time_step=0.01)
    db = intensity.values[0]
    times = intensity.xs()
    if db.size < 3:
        return 0.0
    floor = float(np.percentile(db, 99)) - _SILENCE_DB
    speech_s = float((db > floor).sum()) * 0.01
    if speech_s <= 0:
        return 0.0
    peaks = 0
    dip = math.inf
    for i in range(1, db.size - 1):
        dip = min(dip, db[i])
        peak = db[i] > floor and db[i] >= db[i - 1] and db[i] > db[i + 1]
        if peak and db[i] - dip >= _MIN_DIP_DB:
            f0 = pitch.get_value_at_time(float(times[i]))
            if f0 is not None and math.isfinite(f0) and f0 > 0:
                peaks += 1
                dip = db[i]
    return peaks / speech_s


class ChunkMatcher:
    """Applies a :class:`Match` to a stream of chunks, one at a time, without clicks at the
    joins.

    Each chunk is reshaped together with the last ``context_s`` of the chunk before it, and
    the first ``crossfade_s`` of the new output is blended into the held-back tail of the old
    one, so a join is the same audio reshaped twice and crossfaded, never two edges butted
    together. The tail is held back until the next chunk (or :meth:`flush`): ``crossfade_s``
    of latency, nothing more. Level: each reshaped block keeps its input's RMS, and its peak
    stays under full scale.
    """

    def __init__(
        self,
        match: Match,
        sample_rate: int,
        *,
        context_s: float = 0.1,
        crossfade_s: float = 0.01,
    ) -> None:
        self.match = match
        self.sample_rate = sample_rate
        self._context_n = int(context_s * sample_rate)
        self._fade_n = max(1, int(crossfade_s * sample_rate))
        self._context = np.zeros(0, dtype=np.float32)
        self._held = np.zeros(0, dtype=np.float32)
        fade = np.linspace(0.0, 1.0, self._fade_n + 2, dtype=np.float32)[1:-1]
        self._fade_in = np.sin(fade * np.pi / 2) ** 2  # raised cosine: fade in + out = 1

    def feed(self, chunk: npt.ArrayLike) -> np.ndarray:
        """The matched audio for ``chunk``, as far as it can be given out now."""
        x = np.asarray(chunk, dtype=np.float32).ravel()
        if x.size == 0:
            return x
        if not self.match.reshapes:
            return x
        context = self._context
        block = np.concatenate([context, x])
        y = self._reshape(block)
        self._context = block[-self._context_n :].copy()
        start = context.size
        out_parts: list[np.ndarray] = []
        held = self._held
        fade_n = min(held.size, start)
        if fade_n:
            blend_in = self._fade_in[-fade_n:] if fade_n < self._fade_n else self._fade_in
            new = y[start - fade_n : start]
            out_parts.append(held[:-fade_n] if held.size > fade_n else held[:0])
            out_parts.append(held[-fade_n:] * (1.0 - blend_in) + new * blend_in)
        else:
            out_parts.append(held)
        body = y[start:]
        keep = min(self._fade_n, body.size)
        out_parts.append(body[: body.size - keep])
        self._held = body[body.size - keep :].copy()
        return np.concatenate(out_parts).astype(np.float32, copy=False)

    def flush(self) -> np.ndarray:
        """What is still held back, at the end of the stream."""
        held, self._held = self._held, np.zeros(0, dtype=np.float32)
        self._context = np.zeros(0, dtype=np.float32)
        return held

    def _reshape(self, x: np.ndarray) -> np.ndarray:
        """PSOLA on one block, in the Praat process pool (see :func:`in_praat`)."""
        return in_praat(reshape_block, x, self.sample_rate, self.match)


def reshape_block(x: np.ndarray, sample_rate: int, m: Match) -> np.ndarray:
    """PSOLA with a constant pitch ratio (the engine's intonation kept) and formants
    moved by resampling, as Praat's "Change gender" does it."""
    import parselmouth
    from parselmouth.praat import call

    rms_in = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms_in < 1e-6 or x.size < sample_rate // 20:
        return x
    sound = parselmouth.Sound(x.astype(np.float64), sampling_frequency=float(sample_rate))
    pitch = sound.to_pitch(
        time_step=0.01, pitch_floor=_PITCH_FLOOR_HZ, pitch_ceiling=_PITCH_CEILING_HZ
    )
    median = call(pitch, "Get quantile", 0.0, 0.0, 0.5, "Hertz")
    new_median = median * m.pitch_ratio if math.isfinite(median) else 0.0
    changed = call([sound, pitch], "Change gender", m.formant_ratio, new_median, m.range_ratio, 1.0)
    y = np.asarray(changed.values[0], dtype=np.float32)
    if y.size != x.size:  # resampling may round the length by a sample
        y = y[: x.size] if y.size > x.size else np.pad(y, (0, x.size - y.size))
    rms_out = float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))
    gain = rms_in / rms_out if rms_out > 1e-9 else 1.0
    peak = float(np.max(np.abs(y))) * gain
    if peak > 0.99:
        gain *= 0.99 / peak
    return y * np.float32(gain)


# --- the Praat process pool ---------------------------------------------------------------------
PRAAT_APART = True
"""Whether Praat runs in the worker processes (the server) or in the caller's thread (a bench
that counts its own process's CPU: the workers' would not show in it)."""
_POOL: concurrent.futures.ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
T = TypeVar("T")


def in_praat(work: Callable[..., T], *args: Any) -> T:
    """Run ``work(*args)`` in the Praat worker processes and wait for it (from a worker thread:
    the wait releases the GIL).

    parselmouth holds the GIL for as long as Praat runs: in a thread, a 5 s clip's analysis
    (~60 ms) or a chunk's PSOLA (~10 ms per audio second) stalled the event loop for that long
    (a 1 ms sleep on the main thread took up to 45 ms). In processes of their own they stall
    nothing. One worker per core, started by a forkserver (never ``fork`` from a threaded
    server), on first use; they end with the process.
    """
    global _POOL
    if not PRAAT_APART:
        return work(*args)
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ProcessPoolExecutor(
                max_workers=max(1, len(os.sched_getaffinity(0))),
                mp_context=multiprocessing.get_context("forkserver"),
            )
            # Stopped before the interpreter tears its modules down (else its manager thread's
            # weakref callback fails noisily at exit).
            atexit.register(_POOL.shutdown, wait=True, cancel_futures=True)
        pool = _POOL
    return pool.submit(work, *args).result()


def analyse_apart(pcm: npt.ArrayLike, sample_rate: int = 16_000) -> VoiceProfile | None:
    """:func:`analyse` in the Praat worker processes (the voice store's profiler)."""
    return in_praat(analyse, np.asarray(pcm, dtype=np.float32), sample_rate)
