"""Loudness: voices at very different levels all reach the target, under the true-peak ceiling.

Loudness and true peak are measured here as a listener would: pyloudnorm (BS.1770-4) on the
audio, the true peak on the audio oversampled 4x (``scipy.signal.resample_poly``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncGenerator, Iterator

import numpy as np
import pyloudnorm
import pytest
from scipy.signal import resample_poly

from live.encoder import EncoderWorker
from live.loudness import REFERENCE_TEXT, LoudnessEngine, TruePeakLimiter, integrated_lufs
from live.services import aservices
from live.settings import Settings
from live.speech import PiperEngine
from live.values import Embedding, VoiceProfile
from protocol.messages import AudioEnd, AudioStart, VoiceReady
from tests.clips import quantize, reference_clip, wav_bytes
from tests.server import RawClient, live_server, raw_client

pytestmark = pytest.mark.timeout(180)

TARGET = -16.0
CEILING = -1.0
RATE = 22050
MESSAGE = "Hey chat, how is everybody doing today? I hope you are all having a great time."
"""Not the reference text: what is measured is a message the gain was not computed on."""


def lufs(pcm: np.ndarray, rate: int = RATE) -> float:
    """The test's own meter: pyloudnorm as documented, 400 ms blocks."""
    return float(pyloudnorm.Meter(rate).integrated_loudness(pcm.astype(np.float64)))


def true_peak(pcm: np.ndarray) -> float:
    """dBTP, 4x oversampled."""
    return 20 * math.log10(float(np.max(np.abs(resample_poly(pcm.astype(np.float64), 4, 1)))))


def voice(seed: int) -> Embedding:
    vector = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
    return Embedding(vector / np.linalg.norm(vector), "test-encoder", 5.0, 0.0)


class LevelEngine:
    """A voice at a chosen level: per sentence, a buzz at a speaking pitch (harmonics of
    140 Hz) with a syllable-rate envelope, scaled by ``scale``. Counts its streams per text."""

    name = "level"
    sample_rate = RATE

    def __init__(self, scale: float, *, envelope: bool = True, harmonics: int = 11) -> None:
        self.scale = scale
        self.envelope = envelope
        self.harmonics = harmonics
        self.streams: dict[str, int] = {}

    def sentence(self, n: int) -> np.ndarray:
        t = np.arange(int(0.9 * RATE)) / RATE
        buzz = sum(np.sin(2 * np.pi * 140 * k * t + k) / k for k in range(1, self.harmonics + 1))
        shape = 0.55 - 0.45 * np.cos(2 * np.pi * (4 + n % 3) * t) if self.envelope else 1.0
        pcm = self.scale * buzz * shape / 2.0
        assert float(np.max(np.abs(pcm))) <= 1.0, "an engine yields [-1, 1]"
        return pcm.astype(np.float32)

    async def stream(
        self, text: str, voice: Embedding, *, profile: VoiceProfile | None = None
    ) -> AsyncGenerator[np.ndarray, None]:
        self.streams[text] = self.streams.get(text, 0) + 1
        for n, _ in enumerate(s for s in text.split(".") if s.strip()):
            await asyncio.sleep(0)
            yield self.sentence(n)

    async def aclose(self) -> None:
        pass


def level_engine(level_lufs: float, *, envelope: bool = True, harmonics: int = 11) -> LevelEngine:
    """A ``LevelEngine`` whose reference measures ``level_lufs``."""
    engine = LevelEngine(1.0, envelope=envelope, harmonics=harmonics)
    pcm = np.concatenate([engine.sentence(n) for n in range(3)])
    engine.scale = 10 ** ((level_lufs - lufs(pcm)) / 20)
    return engine


async def spoken(
    engine: LoudnessEngine | LevelEngine | PiperEngine, text: str, v: Embedding
) -> np.ndarray:
    return np.concatenate([chunk async for chunk in engine.stream(text, v)])


@pytest.fixture(scope="module")
def raw_piper() -> Iterator[PiperEngine]:
    """Piper as the server runs it under a loudness target: its own level, not peak-normalised."""
    engine = PiperEngine(workers=1, peak_normalize=False)
    yield engine
    engine.close()


async def test_voices_far_apart_all_end_at_the_target_under_the_ceiling(
    raw_piper: PiperEngine,
) -> None:
    # Quiet (-30), at the target already (-16) and loud with little crest (-6: two harmonics,
    # no envelope, peaks near 0 dBFS), and Piper's own voice (about -24 LUFS).
    voices = {
        "quiet": level_engine(-30.0),
        "even": level_engine(-16.0),
        "loud": level_engine(-6.0, envelope=False, harmonics=2),
        "piper": raw_piper,
    }
    before, after = {}, {}
    for name, inner in voices.items():
        engine = LoudnessEngine(inner, target_lufs=TARGET, ceiling_dbtp=CEILING)
        before[name] = lufs(await spoken(inner, MESSAGE, voice(1)))
        out = await spoken(engine, MESSAGE, voice(1))
        after[name] = lufs(out)
        assert abs(after[name] - TARGET) <= 1.0, (name, before[name], after[name])
        assert true_peak(out) <= CEILING, (name, true_peak(out))
    print(f"loudness before {before} after {after}")
    assert max(before.values()) - min(before.values()) > 20, "the voices were far apart"
    assert max(after.values()) - min(after.values()) <= 2.0


async def test_a_voice_is_measured_once_however_many_messages_ask_at_once() -> None:
    inner = level_engine(-28.0)
    engine = LoudnessEngine(inner)
    a, b = voice(1), voice(2)
    first = await asyncio.gather(*(spoken(engine, f"Line {n}. Again.", a) for n in range(4)))
    await asyncio.gather(*(spoken(engine, f"Line {n}. Again.", b) for n in range(3)))
    await spoken(engine, "One more. For the first voice.", a)
    assert engine.measurements == 2, "one reference synthesis per voice"
    assert inner.streams[REFERENCE_TEXT] == 2
    # One constant gain per voice: the same sentence comes out the same in every message.
    assert all(np.array_equal(first[0], other) for other in first[1:])


async def test_the_limiter_never_overshoots_and_leaves_quiet_audio_alone() -> None:
    rng = np.random.default_rng(3)
    # Speech-like peaks far over the ceiling after +12 dB, cut into uneven chunks.
    pcm = (rng.standard_normal(RATE * 3) * 0.2 * np.sin(np.linspace(0, 40, RATE * 3)) ** 8).clip(
        -1, 1
    )
    limiter = TruePeakLimiter(RATE, gain_db=12.0, ceiling_dbtp=CEILING)
    cuts = [0, 7, 1000, 1001, 22050, 40000, len(pcm)]
    out = np.concatenate(
        [limiter.feed(pcm[a:b]) for a, b in itertools.pairwise(cuts)] + [limiter.flush()]
    )
    assert len(out) == len(pcm)
    assert true_peak(out) <= CEILING
    assert limiter.limited_samples > 0
    whole = TruePeakLimiter(RATE, gain_db=12.0, ceiling_dbtp=CEILING)
    assert np.array_equal(np.concatenate([whole.feed(pcm), whole.flush()]), out), (
        "chunk borders change nothing"
    )
    quiet = TruePeakLimiter(RATE, gain_db=-6.0, ceiling_dbtp=CEILING)
    gained = np.concatenate([quiet.feed(pcm), quiet.flush()])
    assert quiet.limited_samples == 0
    assert np.allclose(gained, pcm * 10 ** (-6 / 20), atol=1e-7), "a constant gain, exactly"


def test_short_and_silent_messages_report_what_they_can() -> None:
    rng = np.random.default_rng(4)
    short = (0.1 * rng.standard_normal(int(0.2 * RATE))).astype(np.float32)
    measured = integrated_lufs(short, RATE)
    assert measured is not None
    # One block of its own length: the same as a 400 ms meter on twice the same noise.
    assert abs(measured - lufs(np.tile(short, 2))) < 0.5
    assert integrated_lufs(np.zeros(RATE, dtype=np.float32), RATE) is None
    assert integrated_lufs(np.zeros(0, dtype=np.float32), RATE) is None


class _NoEmbedder:
    encoder_id = "none"
    dim = 256

    async def aembed(self, pcm16k: np.ndarray) -> np.ndarray:
        raise AssertionError("no voice is registered here")


async def test_off_serves_the_engine_exactly_as_before() -> None:
    """Off: no wrapper, and Piper peak-normalises each sentence as it always did (the code
    path that made every byte before loudness existed). On: the wrapper, Piper at its own
    level."""
    async with aservices(Settings(loudness=False), embedder=_NoEmbedder()) as off:
        assert isinstance(off.engine, PiperEngine)
        assert off.engine.peak_normalize and off.engine.name == "piper"
    async with aservices(Settings(), embedder=_NoEmbedder()) as on:
        assert isinstance(on.engine, LoudnessEngine)
        assert isinstance(on.engine.inner, PiperEngine) and not on.engine.inner.peak_normalize


async def _speak(
    client: RawClient, message_id: str, **extra: object
) -> tuple[AudioEnd, np.ndarray, int]:
    await client.asend({"type": "speak", "id": message_id, "text": MESSAGE, **extra})
    start = await client.await_type("audio.start")
    end = await client.await_type("audio.end")
    assert isinstance(start, AudioStart) and isinstance(end, AudioEnd) and end.id == message_id
    frames = client.seen.frames[start.stream]
    pcm = np.frombuffer(b"".join(f.pcm for f in frames), dtype="<i2").astype(np.float64) / 32767
    return end, pcm, start.sample_rate


async def test_over_the_socket_audio_end_reports_the_loudness_sent(
    encoder_worker: EncoderWorker,
) -> None:
    clip, rate = reference_clip("piper")
    async with live_server(embedder=encoder_worker) as srv, raw_client(srv) as c:
        await c.asend({"type": "voice.register", "name": "me", "format": "wav"})
        await c.asend_bytes(wav_bytes(quantize(clip), rate))
        assert isinstance(await c.anext(), VoiceReady)
        for message_id, extra in (("m1", {}), ("m2", {"sample_rate": 48000})):
            end, pcm, sent_rate = await _speak(c, message_id, **extra)
            assert end.loudness_lufs is not None
            assert abs(end.loudness_lufs - TARGET) <= 1.0, end
            assert abs(lufs(pcm, sent_rate) - end.loudness_lufs) <= 0.3, "what was sent"
            assert true_peak(pcm) <= CEILING
        engine = srv.services.engine
        assert isinstance(engine, LoudnessEngine) and engine.measurements == 1
