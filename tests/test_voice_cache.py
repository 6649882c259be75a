"""The voice cache against a real redis-server: sharing, single-flight, outages, TTLs, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis

from live.audio import canonicalize
from live.encoder import EncoderWorker, SpeakerEncoder
from live.redis_tier import key
from live.settings import Settings
from live.voices import VoiceStore
from protocol.messages import AudioEnd, Error
from tests.clips import espeak_speech, piper_speech, reference_clip, wav_bytes
from tests.fakes import GatedEngine
from tests.redis_server import RedisServer
from tests.server import LiveServer, free_port, live_server, raw_client

pytestmark = pytest.mark.timeout(120)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the riverbank this morning.",
    "Welcome back everyone, today we are trying a brand new strategy in this game.",
    "Thanks so much for the raid, please say hello to all of the new viewers here.",
    "Let me check the chat for a moment before we start the next round together.",
]


def clip(i: int) -> bytes:
    """A distinct spoken clip per index (different text, so different content)."""
    pcm, sr = piper_speech(SENTENCES[i % len(SENTENCES)] + " " + SENTENCES[(i + 1) % 4])
    return wav_bytes(pcm, sr)


class CountingEmbedder:
    """The real encoder worker, counting calls and optionally failing the next ones."""

    def __init__(self, inner: EncoderWorker) -> None:
        self.inner = inner
        self.calls = 0
        self.fail_next = 0

    @property
    def encoder_id(self) -> str:
        return self.inner.encoder_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    async def aembed(self, pcm16k: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail_next:
            self.fail_next -= 1
            await asyncio.sleep(0.05)  # let every concurrent waiter join the flight
            raise RuntimeError("injected encoder failure")
        return await self.inner.aembed(pcm16k)

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def server_on(
    encoder: SpeakerEncoder, redis_url: str, **overrides: object
) -> AsyncIterator[LiveServer]:
    settings = Settings(port=free_port(), redis_url=redis_url, redis_poll_s=0.1, **overrides)  # type: ignore[arg-type]
    async with live_server(
        settings, embedder=EncoderWorker(encoder), engine=GatedEngine(auto=True)
    ) as srv:
        yield srv


async def test_a_voice_registered_on_one_server_is_a_redis_hit_on_another(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    data = clip(0)
    async with (
        server_on(speaker_encoder, redis_server.url) as a,
        server_on(speaker_encoder, redis_server.url) as b,
    ):
        async with raw_client(a) as ca:
            assert (await ca.aregister(data)).source == "encoder"
        async with raw_client(b) as cb:
            ready = await cb.aregister(data)
        assert ready.source == "redis"
        assert b.services.store.encoder_calls == 0
        assert a.services.store.encoder_calls == 1

        fp = canonicalize(data).fingerprint
        raw = aioredis.from_url(redis_server.url)
        try:
            k = key(speaker_encoder.encoder_id, fp)
            assert await raw.keys("livevoice:v1:emb:*") == [k.encode()]
            ttl = await raw.ttl(k)
            assert 7 * 24 * 3600 - 60 < ttl <= 7 * 24 * 3600
            value = await raw.get(k)
        finally:
            await raw.aclose()
        assert value[0] != 0x80, "pickle protocol header"
        fields = msgpack.unpackb(value)
        assert fields["enc"] == speaker_encoder.encoder_id and fields["dim"] == 256
        vector = np.frombuffer(fields["data"], dtype="<f4")
        assert vector.shape == (256,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
        assert fields["dur"] == pytest.approx(canonicalize(data).duration_s)


async def test_concurrent_registrations_make_one_encoder_call(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    from live.redis_tier import RedisTier

    embedder = CountingEmbedder(EncoderWorker(speaker_encoder))
    tier = RedisTier(redis_server.url)
    store = VoiceStore(embedder, tier=tier)
    canonical = canonicalize(clip(1))
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(store.aresolve(canonical) for _ in range(100))), 30
        )
        assert embedder.calls == 1
        assert len({r.embedding.vector.tobytes() for r in results}) == 1

        # A failure reaches every waiter, caches nothing, and a retry computes again.
        other = canonicalize(clip(2))
        embedder.fail_next = 1
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(store.aresolve(other) for _ in range(20)), return_exceptions=True),
            30,
        )
        assert all(getattr(o, "code", None) == "encoder_failed" for o in outcomes), outcomes
        assert embedder.calls == 2
        assert store.l1.get(other.fingerprint) is None
        assert (await tier.aget(embedder.encoder_id, other.fingerprint, 256))[1] is None
        retried = await store.aresolve(other)
        assert retried.source.value == "encoder" and embedder.calls == 3
    finally:
        await tier.aclose()
        await embedder.aclose()


async def test_two_servers_registering_the_same_clip_at_once_compute_it_once(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    data = clip(3)
    async with (
        server_on(speaker_encoder, redis_server.url) as a,
        server_on(speaker_encoder, redis_server.url) as b,
        raw_client(a) as ca,
        raw_client(b) as cb,
    ):
        both = await asyncio.gather(ca.aregister(data), cb.aregister(data))
        calls = a.services.store.encoder_calls + b.services.store.encoder_calls
        assert calls == 1, [r.source for r in both]
        assert sorted(r.source for r in both) == ["encoder", "redis"]


async def test_redis_outage_mid_session_costs_nothing_but_encoder_time(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    async with server_on(speaker_encoder, redis_server.url) as srv, raw_client(srv) as c:
        await c.aregister(clip(0))
        for i in range(3):
            await c.asend({"type": "speak", "id": f"before{i}", "text": "One. Two. Three."})
        redis_server.kill()
        # New registrations succeed through the encoder while Redis is gone.
        outage = await c.aregister(clip(1))
        assert outage.source == "encoder"
        outage2 = await c.aregister(clip(2))
        assert outage2.source == "encoder"
        for i in range(3):
            await c.asend({"type": "speak", "id": f"during{i}", "text": "Four. Five."})

        def ended() -> list[AudioEnd]:
            return [m for m in c.seen.messages if isinstance(m, AudioEnd)]

        while len(ended()) < 6:
            assert not isinstance(await c.anext(), Error)
        assert sorted(e.id for e in ended()) == sorted(
            [f"before{i}" for i in range(3)] + [f"during{i}" for i in range(3)]
        )
        assert not any(e.cancelled for e in ended())
        tier = srv.services.tier
        assert tier is not None and not tier.available

        redis_server.start()
        deadline = time.monotonic() + 5
        while not tier.available:
            assert time.monotonic() < deadline, "breaker did not close within 5 s"
            await asyncio.sleep(0.05)
        back = await c.aregister(clip(3))
        assert back.source == "encoder"
        fp = canonicalize(clip(3)).fingerprint
        raw = aioredis.from_url(redis_server.url)
        try:
            assert await raw.exists(key(speaker_encoder.encoder_id, fp)) == 1
        finally:
            await raw.aclose()
        assert not any(isinstance(m, Error) for m in c.seen.messages)


async def test_corrupt_and_foreign_values_are_overwritten(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    raw = aioredis.from_url(redis_server.url)
    try:
        for i, bad in enumerate(
            [
                b"\x80\x04garbage",  # something pickle-shaped: never unpickled, just a miss
                msgpack.packb(
                    {
                        "v": 1,
                        "enc": "ge2e-other",
                        "dim": 256,
                        "dtype": "<f4",
                        "data": b"\0" * 1024,
                        "created": 0.0,
                        "dur": 5.0,
                    }
                ),
            ]
        ):
            data = clip(i)
            k = key(speaker_encoder.encoder_id, canonicalize(data).fingerprint)
            await raw.set(k, bad)
            async with server_on(speaker_encoder, redis_server.url) as srv, raw_client(srv) as c:
                assert (await c.aregister(data)).source == "encoder"
            value = msgpack.unpackb(await raw.get(k))
            assert value["enc"] == speaker_encoder.encoder_id
    finally:
        await raw.aclose()


async def test_ttl_is_refreshed_on_hit_and_while_pinned(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    raw = aioredis.from_url(redis_server.url)
    data = clip(0)
    k = key(speaker_encoder.encoder_id, canonicalize(data).fingerprint)
    try:
        async with server_on(
            speaker_encoder, redis_server.url, embedding_ttl_s=30, pin_refresh_s=0.2
        ) as srv:
            async with raw_client(srv) as c:
                await c.aregister(data)
                await raw.expire(k, 5)
                await asyncio.sleep(0.6)  # the pinned voice's TTL is put back to 30 s
                assert await raw.ttl(k) > 20
            await raw.expire(k, 5)
            await asyncio.sleep(0.6)  # no session pins it any more: nobody refreshes it
            assert await raw.ttl(k) <= 5
        async with server_on(speaker_encoder, redis_server.url, embedding_ttl_s=30) as other:
            async with raw_client(other) as c:
                assert (await c.aregister(data)).source == "redis"
            assert await raw.ttl(k) > 20  # GETEX on the hit
    finally:
        await raw.aclose()


async def test_password_in_url_works_and_a_wrong_one_degrades(
    speaker_encoder: SpeakerEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisServer(password="s3cret-pw") as secured:
        async with server_on(speaker_encoder, secured.url) as srv, raw_client(srv) as c:
            await c.aregister(clip(0))
            assert srv.services.tier is not None and srv.services.tier.writes == 1
        wrong = secured.url.replace("s3cret-pw", "wrong-pw")
        caplog.set_level(logging.DEBUG)
        async with server_on(speaker_encoder, wrong) as srv, raw_client(srv) as c:
            ready = await c.aregister(clip(1))
            assert ready.source == "encoder"
            await c.asend({"type": "speak", "id": "m", "text": "Still talking."})
            assert isinstance(await c.await_type("audio.end"), AudioEnd)
        assert "authentication" in caplog.text
        assert "wrong-pw" not in caplog.text and "s3cret-pw" not in caplog.text


async def test_metrics_and_readyz(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    async with server_on(speaker_encoder, redis_server.url) as srv:
        async with raw_client(srv) as c:
            await c.aregister(clip(0))
            await c.aregister(clip(0))
            async with aiohttp.ClientSession() as http:
                await asyncio.sleep(0.3)  # one used_memory poll
                text = await (await http.get(srv.url + "/metrics")).text()
                ready = await (await http.get(srv.url + "/readyz")).json()
        assert 'livevoice_voice_lookups_total{tier="encoder"} 1.0' in text
        assert 'livevoice_voice_lookups_total{tier="l1"} 1.0' in text
        assert "livevoice_encoder_calls_total 1.0" in text
        assert 'livevoice_redis_breaker_state{state="closed"} 1.0' in text
        assert "livevoice_sessions_active 1.0" in text
        assert "livevoice_pinned_voices 1.0" in text
        used = [
            ln for ln in text.splitlines() if ln.startswith("livevoice_redis_used_memory_bytes")
        ]
        assert used and float(used[0].split()[-1]) > 0
        assert ready == {"status": "ready", "checks": {"encoder": "ok", "redis": "ok"}}


async def test_a_different_voice_misses(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    pcm, sr = espeak_speech("Hello there, this is a completely different speaker for the test.")
    async with server_on(speaker_encoder, redis_server.url) as srv, raw_client(srv) as c:
        a = await c.aregister(clip(0))
        b = await c.aregister(wav_bytes(pcm, sr))
        assert (a.source, b.source) == ("encoder", "encoder")
        assert srv.services.store.encoder_calls == 2
    _ = reference_clip
