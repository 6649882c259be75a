"""The rendered-audio cache (``live.rendered``) against a real redis-server: a repeated line is
streamed from Redis with no engine call and the same PCM; anything that changes the audio misses;
a cancelled line is not stored; Redis down means plain synthesis; the byte budget holds.

The real Piper engine where the test is about the audio; a tone engine where it is about sizes,
and the gated engine where it is about cancelling mid-line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np
import pytest

from live.encoder import EncoderWorker, SpeakerEncoder
from live.loudness import LoudnessEngine
from live.metrics import Metrics
from live.pcm import to_s16le
from live.redis_tier import RedisTier, rendered_key
from live.rendered import RenderedSpeech, encode_rendered
from live.settings import Settings
from live.speech import PiperEngine, SpeechEngine, anext_chunk
from live.values import Embedding
from protocol.messages import AudioEnd
from tests.clips import reference_wav
from tests.fakes import GatedEngine
from tests.redis_server import RedisServer
from tests.server import live_server, raw_client, until_true

pytestmark = pytest.mark.timeout(120)

ALERT = "Thanks for the follow!"


class CountingEngine:
    """An engine as it is, counting ``stream`` calls (the cache must make none on a hit)."""

    def __init__(self, inner: SpeechEngine, *, sample_rate: int | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.sample_rate = sample_rate or inner.sample_rate
        self.calls: list[str] = []

    async def stream(self, text: str, voice: Embedding) -> AsyncGenerator[np.ndarray, None]:
        self.calls.append(text)
        async with contextlib.aclosing(self.inner.stream(text, voice)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def aclose(self) -> None:
        pass


class ToneEngine:
    """``seconds`` of a tone per line, whatever its text: for sizes, not for sound."""

    name = "tone"
    sample_rate = 22050

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self.calls = 0

    async def stream(self, text: str, voice: Embedding) -> AsyncGenerator[np.ndarray, None]:
        self.calls += 1
        t = np.arange(int(self.sample_rate * self.seconds)) / self.sample_rate
        yield (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)

    async def aclose(self) -> None:
        pass


def a_voice(seed: int) -> Embedding:
    vector = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
    return Embedding(vector / np.linalg.norm(vector), "test-encoder", 5.0, 0.0)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def cached(
    engine: SpeechEngine, redis_url: str, **sizes: int
) -> AsyncIterator[RenderedSpeech]:
    tier = RedisTier(redis_url)
    speech = RenderedSpeech(
        engine,
        tier,
        metrics=Metrics(),
        ttl_s=3600,
        budget_bytes=sizes.get("budget_bytes", 1 << 24),
        max_entry_bytes=sizes.get("max_entry_bytes", 1 << 22),
    )
    try:
        yield speech
    finally:
        await speech.aclose()
        await tier.aclose()


async def spoken(engine: SpeechEngine, text: str, voice: Embedding) -> bytes:
    """A whole line as the wire carries it at the engine's rate."""
    async with contextlib.aclosing(engine.stream(text, voice)) as chunks:
        return b"".join([to_s16le(chunk) async for chunk in chunks])


async def say(speech: RenderedSpeech, text: str, voice: Embedding) -> bytes:
    """A line to its end, and its store landed."""
    pcm = await spoken(speech, text, voice)
    await speech.adrain()
    return pcm


async def test_a_repeated_line_comes_from_the_cache_over_the_socket(
    piper: PiperEngine, encoder_worker: EncoderWorker, redis_server: RedisServer
) -> None:
    engine = CountingEngine(piper)
    async with (
        live_server(embedder=encoder_worker, engine=engine, redis_url=redis_server.url) as srv,
        raw_client(srv) as client,
    ):
        await client.aregister(reference_wav())
        metrics = srv.services.metrics

        async def line(mid: str, **fields: object) -> tuple[AudioEnd, bytes]:
            await client.asend({"type": "speak", "id": mid, "text": ALERT, **fields})
            end = await client.await_type("audio.end")
            assert isinstance(end, AudioEnd) and end.id == mid and not end.cancelled
            return end, b"".join(f.pcm for f in client.seen.frames[end.stream])

        _, synthesized = await line("m1")
        await until_true(
            lambda: _value(metrics, "livevoice_rendered_stores_total", outcome="stored") == 1,
            "the first line stored",
        )
        _, replayed = await line("m2")
        assert replayed == synthesized  # sample-exact at the engine's rate
        _, resampled = await line("m3", sample_rate=48000)  # one entry serves every rate
        assert abs(len(resampled) / 48000 - len(synthesized) / piper.sample_rate) < 0.01
        assert engine.calls == [ALERT]
        assert _value(metrics, "livevoice_rendered_lookups_total", outcome="hit") == 2
        assert _value(metrics, "livevoice_rendered_lookups_total", outcome="miss") == 1
        served = _value(metrics, "livevoice_rendered_served_bytes_total")
        assert served == 2 * len(synthesized)


async def test_another_voice_text_or_engine_rate_misses(
    piper: PiperEngine, redis_server: RedisServer
) -> None:
    engine = CountingEngine(piper)
    alice, bob = a_voice(1), a_voice(2)
    async with cached(engine, redis_server.url) as speech:
        first = await say(speech, ALERT, alice)
        assert await say(speech, ALERT, alice) == first
        assert len(engine.calls) == 1
        await say(speech, ALERT, bob)  # Piper sounds the same; a cloning engine would not
        await say(speech, "Welcome to the raid!", alice)
        assert len(engine.calls) == 3
        assert speech.render_key(ALERT, alice, profile="calm") != speech.render_key(ALERT, alice)

        # The same model at another native rate is other audio.
        other_rate = CountingEngine(piper, sample_rate=16000)
        async with cached(other_rate, redis_server.url) as at_16k:
            await say(at_16k, ALERT, alice)
        assert len(other_rate.calls) == 1
        assert _value(speech.metrics, "livevoice_rendered_lookups_total", outcome="hit") == 1


async def test_a_cancelled_line_is_not_stored(redis_server: RedisServer) -> None:
    engine = GatedEngine()
    voice = a_voice(1)
    text = "One. Two. Three."
    async with cached(engine, redis_server.url) as speech:
        # Closed after its first chunk (a cancel, or the audio cap, between chunks).
        chunks = speech.stream(text, voice)
        engine.release()
        assert await anext(chunks) is not None
        await chunks.aclose()
        # Stopped while the engine works on a chunk (a cancel mid-sentence).
        chunks, stop = speech.stream(text, voice), asyncio.Event()
        pending = asyncio.ensure_future(anext_chunk(chunks, stop))
        await until_true(lambda: len(engine.started) == 2, "the second line started")
        stop.set()
        assert await pending is None
        await chunks.aclose()
        await speech.adrain()
        assert await speech.tier._client.exists(rendered_key(speech.render_key(text, voice))) == 0

        engine.auto = True
        await say(speech, text, voice)  # to its end: stored
        await say(speech, text, voice)
        assert len(engine.started) == 3
        assert _value(speech.metrics, "livevoice_rendered_stores_total", outcome="stored") == 1


async def test_redis_down_means_plain_synthesis(redis_server: RedisServer) -> None:
    engine = ToneEngine()
    voice = a_voice(1)
    async with cached(engine, redis_server.url) as speech:
        reference = await say(speech, ALERT, voice)
        redis_server.kill()
        for _ in range(3):
            assert await say(speech, ALERT, voice) == reference
        assert engine.calls == 4
        assert _value(speech.metrics, "livevoice_rendered_lookups_total", outcome="skipped") == 3
        assert not speech.tier.available

        redis_server.start()  # empty: it kept nothing
        deadline = time.monotonic() + 10
        while not speech.tier.available:
            assert time.monotonic() < deadline, "the breaker did not close"
            await speech.tier.aping()
            await asyncio.sleep(0.05)
        await say(speech, ALERT, voice)
        assert await say(speech, ALERT, voice) == reference
        assert engine.calls == 5


async def test_the_byte_budget_holds_and_evicts_the_least_recently_played(
    redis_server: RedisServer,
) -> None:
    engine = ToneEngine(seconds=1.0)
    voice = a_voice(1)
    entry = len(encode_rendered(22050, b"\0" * 2 * 22050))  # one line's stored value
    async with cached(engine, redis_server.url, budget_bytes=3 * entry + entry // 2) as speech:
        client = speech.tier._client

        async def kept(text: str) -> bool:
            return bool(await client.exists(rendered_key(speech.render_key(text, voice))))

        for text in ("zero", "one", "two"):
            await say(speech, text, voice)
        assert [await kept(t) for t in ("zero", "one", "two")] == [True, True, True]
        await say(speech, "zero", voice)  # played again: now the most recent
        assert engine.calls == 3
        await say(speech, "three", voice)  # a fourth does not fit: "one" goes
        assert [await kept(t) for t in ("zero", "one", "two", "three")] == [
            True,
            False,
            True,
            True,
        ]
        held = int(await client.get("livevoice:v1:rendered-bytes"))
        lengths = [
            await client.strlen(k) async for k in client.scan_iter("livevoice:v1:rendered:*")
        ]
        assert held == sum(lengths) == 3 * entry <= speech.budget_bytes
        assert _value(speech.metrics, "livevoice_rendered_evictions_total") == 1
        assert _value(speech.metrics, "livevoice_rendered_bytes") == held

        # Longer than the per-entry cap: synthesized every time, never stored.
        engine.seconds = 5.0
        speech.max_entry_bytes = 2 * entry
        await say(speech, "a long one", voice)
        assert not await kept("a long one")
        assert _value(speech.metrics, "livevoice_rendered_stores_total", outcome="too_big") == 1


async def test_the_cache_is_on_with_redis_and_can_be_turned_off(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    engine = ToneEngine()
    assert Settings.from_env({"LIVEVOICE_RENDERED_CACHE": "off"}).rendered_cache is False
    assert Settings.from_env({"LIVEVOICE_RENDERED_CACHE": "1"}).rendered_cache is True
    with pytest.raises(ValueError):
        Settings.from_env({"LIVEVOICE_RENDERED_CACHE": "maybe"})
    url = redis_server.url
    for overrides, cached_here in (
        ({"redis_url": url}, True),
        ({"redis_url": url, "rendered_cache": False}, False),
        ({}, False),  # no Redis: nowhere to keep it
    ):
        worker = EncoderWorker(speaker_encoder)
        try:
            async with live_server(embedder=worker, engine=engine, **overrides) as srv:
                served = srv.services.engine
                assert isinstance(served, RenderedSpeech) is cached_here, overrides
                assert (served.inner if isinstance(served, RenderedSpeech) else served) is engine
        finally:
            await worker.aclose()


async def test_a_line_keeps_its_marks_in_the_cache_and_through_the_loudness_target(
    redis_server: RedisServer, piper: PiperEngine
) -> None:
    """Under the rendered-audio cache and the loudness wrapper (as ``livevoice serve`` composes
    them) a line still comes with Piper's word marks: synthesized, then from the cache (the
    same marks, no engine call); a line stored without marks is a miss for a marked stream."""
    assert piper.aligned
    voice = a_voice(7)
    text = "Thanks for the follow, welcome in."
    async with cached(piper, redis_server.url) as speech:
        levelled = LoudnessEngine(speech, target_lufs=-16.0, ceiling_dbtp=-1.0)

        async def marked() -> tuple[list[str], int]:
            async with contextlib.aclosing(levelled.stream_marked(text, voice)) as chunks:
                got = [chunk async for chunk in chunks]
            await speech.adrain()
            return [w.text for c in got for w in c.words], sum(len(c.pcm) for c in got)

        assert levelled.aligned and speech.aligned
        words, samples = await marked()
        assert words == ["Thanks", "for", "the", "follow", "welcome", "in"]
        misses = _value(speech.metrics, "livevoice_rendered_lookups_total", outcome="miss")
        again, samples_again = await marked()
        assert again == words and samples_again == samples
        hits = _value(speech.metrics, "livevoice_rendered_lookups_total", outcome="hit")
        assert hits >= 1
        assert _value(speech.metrics, "livevoice_rendered_lookups_total", outcome="miss") == misses
        # A line cached by a plain stream has no marks: a marked stream synthesizes it again.
        await say(speech, "A plain line.", voice)
        async with contextlib.aclosing(speech.stream_marked("A plain line.", voice)) as chunks:
            plain = [chunk async for chunk in chunks]
        assert [w.text for c in plain for w in c.words] == ["A", "plain", "line"]
