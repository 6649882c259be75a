"""Loudness: every message at one target loudness, under a true-peak ceiling.

A quiet voice must not follow a loud one, and no message may clip in the OBS mix. Three parts:

- :class:`LoudnessEngine`, a ``SpeechEngine`` around another: the gain that brings a voice (an
  engine, an embedding, a voice profile) to the target is measured once, on a reference
  synthesis of :data:`REFERENCE_TEXT` in that voice, kept in process, and applied as one
  constant gain to every message in that voice (no per-chunk loudness riding: Piper already
  peak-normalises each sentence, and riding the gain on top of that would pump).
- :class:`TruePeakLimiter`: what the gain pushes over the ceiling is brought under it. Piper's
  sentences peak at 0 dBFS while measuring about -18 to -21 LUFS, so reaching -16 LUFS needs
  +3 to +5 dB and puts its peaks above 0 dBTP: capping the gain at what the peaks allow would
  miss the target by 4-6 LU. The limiter looks ahead within the audio it already holds (an
  engine's chunk is a whole sentence) plus a few milliseconds held back across chunk borders,
  so it adds no latency to the first audio of a chunk and never overshoots; the gain is
  calibrated through it, so what it takes off the peaks is given back to the loudness.
- :func:`integrated_lufs`: a message's measured loudness as sent, for ``audio.end``.

Measuring is pyloudnorm's (ITU-R BS.1770-4), never a meter written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncGenerator
from functools import partial
from typing import Final

import numpy as np
import pyloudnorm
from scipy.ndimage import minimum_filter1d, uniform_filter1d
from scipy.signal import resample_poly

from .marks import VisemeMark, WordMark
from .speech import MarkedChunk, SpeechEngine, marked_stream_of, stream_of, unmarked
from .values import Embedding, ResolvedVoice, VoiceProfile
from .wrapped import WrappedEngine

__all__ = [
    "REFERENCE_TEXT",
    "LoudnessEngine",
    "MessageLoudness",
    "TruePeakLimiter",
    "integrated_lufs",
    "true_peak_dbtp",
]

log = logging.getLogger(__name__)

REFERENCE_TEXT: Final = (
    "Thanks for the follow, and welcome to the stream! "
    "We are about to start the next round, so grab a drink and get comfortable. "
    "Did anyone see that last play? Absolutely incredible."
)
"""What a voice's gain is measured on: chat-like sentences of the lengths chat has (an
exclamation, a long statement, a question, a short remark), ~9.6 s of Piper's speech. Measured
with Piper joe on nine chat lines: calibrated on this, they land at -14.8 to -17.0 LUFS, and
two measurements of the gain (two syntheses) differ by 0.2 dB; a 5 s reference put them
0.3-0.5 LU lower and further from the target. It costs ~0.7-1.3 s of synthesis once per voice
(when the voice is pinned, not in its first message's time to audio).
"""

OVERSAMPLING: Final = 4
"""True peak as BS.1770-4 Annex 2 estimates it: the signal oversampled four times."""
LIMITER_MARGIN_DB: Final = 0.3
"""The limiter aims this far under the ceiling: what a 4x estimate of the sent stream (after
resampling to the listener's rate and rounding to 16 bits) may read above the limiter's own."""
HOLD_S: Final = 0.010
"""The limiter's gain stays at a peak's level this long on either side of it: over a pitch
period or two, so the gain does not move inside each period of a loud vowel (distortion)."""
SMOOTH_S: Final = 0.005
"""And moves to and from it over this long (a linear ramp: no click)."""
MAX_GAIN_DB: Final = 24.0
"""A near-silent reference would ask for any gain; more than this only lifts noise."""
_FIR_REACH: Final = 12
"""Input samples on either side that ``resample_poly``'s interpolation filter (half-length 10
input samples at 4x) reaches: held as context so chunk borders change nothing."""
_SILENCE_LUFS: Final = -70.0
"""BS.1770's absolute gate: below this a message has no loudness to report."""


def _db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def true_peak_dbtp(pcm: np.ndarray) -> float:
    """The true peak of ``pcm`` in dBTP (4x oversampling); -inf for silence."""
    if not pcm.size:
        return -math.inf
    peak = float(np.max(np.abs(resample_poly(pcm.astype(np.float64), OVERSAMPLING, 1))))
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def integrated_lufs(pcm: np.ndarray, sample_rate: int) -> float | None:
    """Integrated loudness of ``pcm`` (mono) in LUFS, by pyloudnorm; None for silence.

    BS.1770 measures in 400 ms blocks. Audio shorter than one block (a one-word message) is
    measured as one block of its own length: the mean square of all of it, K-weighted, which
    is what a block of 400 ms would give for a sound that long, padded with nothing.
    """
    if not pcm.size:
        return None
    block_s = min(0.4, len(pcm) / sample_rate)
    meter = pyloudnorm.Meter(sample_rate, block_size=block_s)
    with np.errstate(divide="ignore"):  # silence: log10(0), reported as None below
        lufs = float(meter.integrated_loudness(pcm.astype(np.float64)))
    return None if not math.isfinite(lufs) or lufs < _SILENCE_LUFS else round(lufs, 2)


class MessageLoudness:
    """One message's audio as it is sent, kept to be measured at its end (``audio.end``).

    Kept at the engine's rate: loudness does not depend on the rate a listener resamples to.
    Float32 at 22.05 kHz is 88 KB per second: a message at the 180 s cap holds 16 MB.
    """

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._chunks: list[np.ndarray] = []

    def feed(self, chunk: np.ndarray) -> None:
        if chunk.size:
            self._chunks.append(chunk)

    async def alufs(self) -> float | None:
        """The loudness of everything fed; measured off the event loop (~1.3 ms per second of
        audio)."""
        if not self._chunks:
            return None
        pcm = np.concatenate(self._chunks)
        self._chunks.clear()
        return await asyncio.to_thread(integrated_lufs, pcm, self.sample_rate)


class TruePeakLimiter:
    """A constant gain, and a limiter that keeps its output's true peak under ``ceiling_dbtp``.

    For each sample, the gain that keeps the 4x-oversampled signal around it (half a sample on
    either side) under the ceiling is computed; that gain is held (minimum) over ``HOLD_S``
    either side, then averaged over ``SMOOTH_S`` either side. Every average is over held values
    whose hold covers the sample itself, so the smoothed gain never exceeds what the sample
    needs: no overshoot, and no lookahead beyond the last ``HOLD_S + SMOOTH_S`` (+ a dozen
    samples) of each chunk, which wait for the next chunk or the end. Where the signal stays
    under the ceiling the gain is the constant one, exactly.
    """

    def __init__(self, sample_rate: int, *, gain_db: float, ceiling_dbtp: float) -> None:
        self.gain = _db_to_gain(gain_db)
        self.ceiling = _db_to_gain(ceiling_dbtp - LIMITER_MARGIN_DB)
        self._hold = max(1, round(HOLD_S * sample_rate))
        self._smooth = max(1, round(SMOOTH_S * sample_rate))
        self._reach = self._hold + self._smooth + _FIR_REACH
        """Samples on either side of one output sample that its gain depends on."""
        self._context = np.zeros(0, dtype=np.float64)
        """The last ``_reach`` samples already sent (gain applied before limiting)."""
        self._pending = np.zeros(0, dtype=np.float64)
        """Samples not sent yet: their gain depends on samples still to come."""
        self.limited_samples = 0
        """Samples whose gain the limiter lowered (metrics, tests)."""

    def feed(self, chunk: np.ndarray) -> np.ndarray:
        """The samples of ``chunk`` (and of earlier ones) whose gain is now known."""
        self._pending = np.concatenate((self._pending, chunk.astype(np.float64) * self.gain))
        return self._emit(final=False)

    def flush(self) -> np.ndarray:
        """The rest, at the end of the message."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> np.ndarray:
        ready = len(self._pending) if final else len(self._pending) - self._reach
        if ready <= 0:
            return np.zeros(0, dtype=np.float32)
        after = np.zeros(self._reach) if final else np.zeros(0)  # the message ends: silence
        window = np.concatenate((self._context, self._pending, after))
        start = len(self._context)
        gains = self._gains(window)[start : start + ready]
        out = self._pending[:ready]
        limited = gains < 1.0
        self.limited_samples += int(np.count_nonzero(limited))
        sent = np.where(limited, out * gains, out)
        self._context = np.concatenate((self._context, out))[-self._reach :]
        self._pending = self._pending[ready:]
        result: np.ndarray = sent.astype(np.float32)
        return result

    def _gains(self, x: np.ndarray) -> np.ndarray:
        if not x.size or float(np.max(np.abs(x))) * 1.5 < self.ceiling:
            # Intersample peaks of a band-limited signal stay within ~1.5x its sample peak
            # in practice: far under the ceiling there is nothing to limit (the common case).
            return np.ones(len(x))
        up = np.abs(resample_poly(x, OVERSAMPLING, 1))[: len(x) * OVERSAMPLING]
        around = up.reshape(len(x), OVERSAMPLING).max(axis=1)  # [n, n+1) at 4x
        around = np.maximum(around, np.concatenate(([0.0], around[:-1])))  # and (n-1, n)
        need = np.minimum(1.0, self.ceiling / np.maximum(around, 1e-12))
        held = minimum_filter1d(need, 2 * self._hold + 1, mode="nearest")
        smoothed: np.ndarray = uniform_filter1d(held, 2 * self._smooth + 1, mode="nearest")
        gains: np.ndarray = np.minimum(smoothed, need)  # the average's rounding: never above
        return gains


class LoudnessEngine(WrappedEngine):
    """A ``SpeechEngine`` whose every message reaches ``target_lufs``, under ``ceiling_dbtp``.

    Wraps ``inner`` (does not own it). A voice's gain is measured when a session pins the
    voice (:meth:`prepare`), or else when it first speaks; once, however many messages ask at
    once, and kept in an in-process LRU keyed by engine, rate, embedding and profile. It is
    not stored in Redis: with the rendered-audio cache (``live.rendered``) inside this engine,
    the reference synthesis itself is a cached line, so another server measures a voice from
    Redis' PCM in a few milliseconds without synthesizing it.
    """

    def __init__(
        self,
        inner: SpeechEngine,
        *,
        target_lufs: float = -16.0,
        ceiling_dbtp: float = -1.0,
        reference_text: str = REFERENCE_TEXT,
        capacity: int = 4096,
    ) -> None:
        super().__init__(inner)
        self.target_lufs = target_lufs
        self.ceiling_dbtp = ceiling_dbtp
        self.reference_text = reference_text
        self.capacity = capacity
        self._gains: OrderedDict[str, asyncio.Future[float]] = OrderedDict()
        self.measurements = 0
        """Reference syntheses measured (one per voice while it stays in the LRU)."""

    def gain_key(self, voice: Embedding, profile: VoiceProfile | None) -> str:
        """What a voice's loudness depends on: the engine, its rate, what conditions it."""
        h = hashlib.blake2b(digest_size=16)
        for part in (
            self.name.encode(),
            str(self.sample_rate).encode(),
            voice.encoder_id.encode(),
            np.ascontiguousarray(voice.vector, dtype="<f4").tobytes(),
            repr(profile).encode(),
        ):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()

    async def again_db(self, voice: Embedding, profile: VoiceProfile | None = None) -> float:
        """The constant gain, in dB, for messages in this voice (measured once)."""
        return await asyncio.shield(self._measuring(voice, profile))

    def prepare(self, voice: ResolvedVoice) -> None:
        """Start measuring a voice's gain now (it was just pinned), so that its first message
        finds it measured instead of waiting for the reference synthesis."""
        self._measuring(voice.embedding, voice.profile)

    def _measuring(self, voice: Embedding, profile: VoiceProfile | None) -> asyncio.Future[float]:
        key = self.gain_key(voice, profile)
        known = self._gains.get(key)
        if known is not None:
            self._gains.move_to_end(key)
            return known
        known = asyncio.ensure_future(self._ameasure(voice, profile))
        known.add_done_callback(partial(self._measured, key))
        self._gains[key] = known
        while len(self._gains) > self.capacity:
            self._gains.popitem(last=False)
        return known

    def _measured(self, key: str, measuring: asyncio.Future[float]) -> None:
        """A failed measurement is not kept: the next message in that voice measures again."""
        if measuring.cancelled() or measuring.exception() is not None:
            if not measuring.cancelled():
                log.warning("loudness: measuring a voice failed: %r", measuring.exception())
            if self._gains.get(key) is measuring:
                del self._gains[key]

    async def _ameasure(self, voice: Embedding, profile: VoiceProfile | None) -> float:
        self.measurements += 1
        chunks = []
        async with contextlib.aclosing(
            stream_of(self.inner, self.reference_text, voice, profile)
        ) as s:
            async for chunk in s:
                chunks.append(chunk)
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        gain = await asyncio.to_thread(self._calibrate, pcm)
        log.info("loudness: gain %+.2f dB for a voice of %s", gain, self.name)
        return gain

    def _calibrate(self, pcm: np.ndarray) -> float:
        """The gain that brings ``pcm`` to the target *after* the limiter: the first guess
        from its loudness, then corrected by what the limiter took off (two steps bring it
        within a few hundredths of an LU)."""
        measured = integrated_lufs(pcm, self.sample_rate)
        if measured is None:
            return 0.0
        gain = min(MAX_GAIN_DB, self.target_lufs - measured)
        for _ in range(2):
            limiter = TruePeakLimiter(
                self.sample_rate, gain_db=gain, ceiling_dbtp=self.ceiling_dbtp
            )
            out = np.concatenate((limiter.feed(pcm), limiter.flush()))
            after = integrated_lufs(out, self.sample_rate)
            if after is None or abs(self.target_lufs - after) < 0.05:
                break
            gain = min(MAX_GAIN_DB, gain + self.target_lufs - after)
        return round(gain, 3)

    async def _chunks(
        self, text: str, voice: Embedding, profile: VoiceProfile | None, marked: bool
    ) -> AsyncGenerator[MarkedChunk, None]:
        """The line at the target loudness. Marks pass through: the gain moves no sample, and
        what the limiter holds back (~15 ms) leaves a chunk's marks just ahead of its audio."""
        gain = await self.again_db(voice, profile)
        limiter = TruePeakLimiter(self.sample_rate, gain_db=gain, ceiling_dbtp=self.ceiling_dbtp)
        if marked:
            inner, _ = marked_stream_of(self.inner, text, voice, profile)
        else:
            inner = unmarked(stream_of(self.inner, text, voice, profile))
        words: tuple[WordMark, ...] = ()
        visemes: tuple[VisemeMark, ...] = ()
        async with contextlib.aclosing(inner) as chunks:
            async for chunk in chunks:
                words, visemes = words + chunk.words, visemes + chunk.visemes
                out = limiter.feed(chunk.pcm)
                if out.size:
                    yield MarkedChunk(out, words, visemes)
                    words, visemes = (), ()
        # Reached only when the inner stream ended (a cancelled message stops at a yield).
        if (tail := limiter.flush()).size or words or visemes:
            yield MarkedChunk(tail, words, visemes)

    async def aclose(self) -> None:
        """Nothing of its own to close: ``inner`` is closed by its owner."""
        for measuring in self._gains.values():
            measuring.cancel()
