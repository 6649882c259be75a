"""Voice ids are records, embeddings are cache: deletion, eviction, outages and pins (issue 9,
items 1, 2, 4 and 8), against real redis-server processes and real servers on loopback."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from clients.client import Backoff, LivevoiceClient
from live.audio import Fingerprint
from live.encoder import EncoderWorker, SpeakerEncoder
from live.redis_tier import PURGE_CHANNEL, RedisTier, key, record_key, refs_key
from live.settings import Limits
from live.speech import PiperEngine
from live.voices import Embedding, Purge, VoiceRecord
from protocol.messages import AudioEnd, Error, Pong, Queued, VoiceDeleted, VoiceReady
from tests.clips import reference_clip, wav_bytes
from tests.fakes import GatedEngine
from tests.redis_server import RedisServer
from tests.server import LiveServer, RawClient, live_server, raw_client, until_true
from tests.test_security import ALICE, BOB, TOKENS, clip

pytestmark = pytest.mark.timeout(180)
WAIT_S = 20.0
"""Bound on each wait for an event seen from outside."""


def a_server(encoder: SpeakerEncoder, **overrides: Any) -> AbstractAsyncContextManager[LiveServer]:
    """A real server with the real encoder; speech from a tone engine that never waits."""
    overrides.setdefault("engine", GatedEngine(auto=True))
    return live_server(embedder=EncoderWorker(encoder), **overrides)


async def hello(c: RawClient, token: str) -> None:
    await c.asend({"type": "hello", "token": token})
    ready = await c.anext()
    assert ready.TYPE == "ready", ready


async def expect(c: RawClient, kind: str) -> object:
    msg = await c.anext()
    assert kind == msg.TYPE, msg
    return msg


async def first_audio(c: RawClient) -> None:
    """Read until an audio frame arrives (control messages on the way are kept in ``seen``)."""
    await c.anext_frame(30)


# --- item 1: a tenant's delete never touches another tenant's voice ------------------------------
async def test_deleting_your_voice_leaves_another_tenants_same_audio_alone(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    gated = GatedEngine()
    async with (
        a_server(
            speaker_encoder,
            redis_url=redis_server.url,
            tokens=TOKENS,
        ) as s1,
        live_server(
            embedder=EncoderWorker(speaker_encoder),
            engine=gated,
            redis_url=redis_server.url,
            tokens=TOKENS,
        ) as s2,
        raw_client(s1, hello=False) as alice,
        raw_client(s2, hello=False) as alice_on_s2,
        raw_client(s2, hello=False) as bob,
    ):
        for c, token in ((alice, ALICE[0]), (alice_on_s2, ALICE[0]), (bob, BOB[0])):
            await hello(c, token)
        mine = await alice.aregister(clip())
        theirs = await bob.aregister(clip())
        assert theirs.source == "redis" and theirs.voice_id != mine.voice_id
        await alice_on_s2.asend({"type": "voice.use", "voice_id": mine.voice_id})
        assert isinstance(await alice_on_s2.anext(), VoiceReady)

        # Bob is mid-message when Alice deletes her voice on the other server.
        await bob.asend({"type": "speak", "id": "b1", "text": "One. Two. Three."})
        await expect(bob, "queued")
        await expect(bob, "audio.start")
        gated.release(1)
        await first_audio(bob)
        await alice.asend({"type": "voice.delete", "voice_id": mine.voice_id, "id": "d"})
        deleted = await alice.await_type("voice.deleted")
        assert isinstance(deleted, VoiceDeleted) and deleted.pinned and deleted.id == "d"
        # Alice's other session (on bob's server) hears of it: the purge reached s2.
        notice = await alice_on_s2.await_type("voice.deleted")
        assert isinstance(notice, VoiceDeleted) and notice.pinned

        gated.release(2)
        end = await bob.await_type("audio.end")
        assert isinstance(end, AudioEnd) and not end.cancelled and end.id == "b1"
        await bob.asend({"type": "ping", "id": "p"})
        assert isinstance(await bob.anext(), Pong)  # no voice.deleted came before it
        assert not [m for m in bob.seen.messages if isinstance(m, VoiceDeleted | Error)]
        await bob.asend({"type": "speak", "id": "b2", "text": "Still mine."})
        assert isinstance(await bob.anext(), Queued)
        gated.release(1)
        assert isinstance(await bob.await_type("audio.end"), AudioEnd)

    raw = aioredis.from_url(redis_server.url)
    try:
        assert not await raw.exists(record_key(mine.voice_id))
        assert await raw.exists(record_key(theirs.voice_id))
        emb_keys = [k async for k in raw.scan_iter(match="livevoice:v1:emb:*")]
        assert len(emb_keys) == 1, "bob's embedding must survive alice's delete"
    finally:
        await raw.aclose()

    # Bob's own id still works on either server (a fresh one: nothing in its memory).
    async with (
        a_server(
            speaker_encoder,
            redis_url=redis_server.url,
            tokens=TOKENS,
        ) as s3,
        raw_client(s3, hello=False) as bob_again,
        raw_client(s3, hello=False) as alice_again,
    ):
        await hello(bob_again, BOB[0])
        await bob_again.asend({"type": "voice.use", "voice_id": theirs.voice_id})
        used = await bob_again.anext()
        assert isinstance(used, VoiceReady) and used.source == "redis", used
        await hello(alice_again, ALICE[0])
        await alice_again.asend({"type": "voice.use", "voice_id": mine.voice_id})
        gone = await alice_again.anext()
        assert isinstance(gone, Error) and gone.code == "voice_not_found", gone
        # The last reference goes: now the embedding is purged for good.
        await bob_again.asend({"type": "voice.delete", "voice_id": theirs.voice_id})
        assert isinstance(await bob_again.await_type("voice.deleted"), VoiceDeleted)
    raw = aioredis.from_url(redis_server.url)
    try:
        assert [k async for k in raw.scan_iter(match="livevoice:v1:emb:*")] == []
        assert [k async for k in raw.scan_iter(match="livevoice:v1:refs:*")] == []
    finally:
        await raw.aclose()


async def test_without_redis_a_delete_keeps_content_other_tenants_registered(
    speaker_encoder: SpeakerEncoder,
) -> None:
    async with (
        a_server(speaker_encoder, tokens=TOKENS) as server,
        raw_client(server, hello=False) as alice,
        raw_client(server, hello=False) as bob,
    ):
        await hello(alice, ALICE[0])
        await hello(bob, BOB[0])
        mine = await alice.aregister(clip())
        theirs = await bob.aregister(clip())
        assert theirs.source == "l1"
        await alice.asend({"type": "voice.delete", "voice_id": mine.voice_id})
        assert isinstance(await alice.await_type("voice.deleted"), VoiceDeleted)
        await bob.asend({"type": "speak", "id": "b", "text": "Hello."})
        assert isinstance(await bob.anext(), Queued)
        assert isinstance(await bob.await_type("audio.end"), AudioEnd)
        assert not [m for m in bob.seen.messages if isinstance(m, VoiceDeleted | Error)]
        # A second session of bob's pins his id from memory: the shared entry is still there.
        async with raw_client(server, hello=False) as bob2:
            await hello(bob2, BOB[0])
            await bob2.asend({"type": "voice.use", "voice_id": theirs.voice_id})
            assert isinstance(await bob2.anext(), VoiceReady)


# --- item 2: under memory pressure only embeddings are evicted ----------------------------------
def embedding(seed: int) -> Embedding:
    v = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
    return Embedding(v / np.linalg.norm(v), "ge2e-test", 5.0, 0.0)


def fingerprint(n: int) -> Fingerprint:
    return Fingerprint(f"{n:064x}")


async def test_voice_ids_survive_memory_pressure_and_pinned_voices_come_back(
    speaker_encoder: SpeakerEncoder,
) -> None:
    # Room for every voice id (about 450 B each with its reference set) but not every embedding.
    policy = {"maxmemory": "4mb", "maxmemory-policy": "volatile-lru"}
    with RedisServer(extra_config=policy) as redis_server:
        async with (
            a_server(
                speaker_encoder,
                redis_url=redis_server.url,
            ) as s1,
            raw_client(s1) as streamer,
        ):
            pinned = await streamer.aregister(clip())
            # 3,000 other voices registered meanwhile (written as a server writes them).
            tier = RedisTier(redis_server.url)
            try:
                for n in range(3000):
                    fp = fingerprint(n)
                    assert await tier.aput(fp, embedding(n)) or True  # a refused write is fine
                    record = VoiceRecord(f"v_pressure{n:05d}", fp, None, 5.0)
                    assert await tier.aput_record("public", record), f"record {n} refused"
            finally:
                await tier.aclose()
            raw = aioredis.from_url(redis_server.url)
            try:
                records = [k async for k in raw.scan_iter(match="livevoice:v1:voice:*", count=1000)]
                embeddings = [
                    k async for k in raw.scan_iter(match="livevoice:v1:emb:*", count=1000)
                ]
                assert len(records) == 3001, "every voice id survives"
                assert len(embeddings) < 3001, "memory pressure evicted some embeddings"
                encoder_id = speaker_encoder.encoder_id
                pinned_record = await raw.get(record_key(pinned.voice_id))
                assert pinned_record is not None
                fp = s1.services.store.record("public", pinned.voice_id)
                assert fp is not None
                pinned_key = key(encoder_id, fp.fingerprint)
                await raw.delete(pinned_key)  # as if evicted: make it certain
                assert await s1.services.store.arefresh_pinned() == 1
                assert await raw.exists(pinned_key)
                assert await raw.ttl(record_key(pinned.voice_id)) == -1  # no TTL: a record
                assert await raw.exists(refs_key(fp.fingerprint))
            finally:
                await raw.aclose()
            # Another server, knowing nothing in memory, pins the streamer's voice by id.
            async with (
                a_server(
                    speaker_encoder,
                    redis_url=redis_server.url,
                ) as s2,
                raw_client(s2) as overlay,
            ):
                # The overlay's session counts in Redis (a write, which evicts under pressure,
                # maybe the pinned embedding): s1's pin refresh writes it back, as it does.
                await s1.services.store.arefresh_pinned()
                await overlay.asend({"type": "voice.use", "voice_id": pinned.voice_id})
                used = await overlay.anext()
                assert isinstance(used, VoiceReady) and used.source == "redis", used


async def test_records_redis_refused_are_written_when_it_returns(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    async with (
        a_server(
            speaker_encoder,
            redis_url=redis_server.url,
            redis_poll_s=0.1,
        ) as s1,
        raw_client(s1) as c,
    ):
        redis_server.stop()
        ready = await c.aregister(clip())  # Redis is down: the voice still registers
        store = s1.services.store
        assert store._unsaved, "the record waits for Redis"
        redis_server.start()
        await until_true(lambda: not store._unsaved, "the record written back", WAIT_S)
        raw = aioredis.from_url(redis_server.url)
        try:
            assert await raw.exists(record_key(ready.voice_id))
        finally:
            await raw.aclose()


# --- item 4: a hung Redis is "unavailable", never "no such voice" -------------------------------
async def test_a_hung_redis_answers_voice_unavailable_and_clients_keep_the_voice(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    async with a_server(
        speaker_encoder,
        redis_url=redis_server.url,
    ) as s1:
        async with raw_client(s1) as c:
            ready = await c.aregister(clip())
        async with a_server(
            speaker_encoder,
            redis_url=redis_server.url,
            redis_poll_s=0.1,
        ) as s2:
            redis_server.pause()  # SIGSTOP: connections hang, nothing answers
            try:
                async with raw_client(s2) as c:
                    await c.asend({"type": "voice.use", "voice_id": ready.voice_id, "id": "u"})
                    answer = await c.anext()
                    assert isinstance(answer, Error), answer
                    assert answer.code == "voice_unavailable" and answer.id == "u", answer
                # The client library retries and pins it once Redis answers again.
                client = LivevoiceClient(
                    s2.ws_url, timeout=20.0, backoff=Backoff(initial=0.2, maximum=0.5)
                )
                async with client:
                    use = asyncio.create_task(client.ause(ready.voice_id))
                    await until_true(
                        lambda: client.voice_retries >= 1, "a retried voice.use", WAIT_S
                    )
                    redis_server.resume()
                    pinned = await asyncio.wait_for(use, 20)
                    assert pinned.voice_id == ready.voice_id and client.voice is not None
            finally:
                if redis_server.running:
                    redis_server.resume()


# --- item 8: a client that drops mid-audio leaks nothing ----------------------------------------
async def test_clients_dropping_mid_audio_leave_no_pins(
    speaker_encoder: SpeakerEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    """A client stops reading (the server's sends back up until the speaker waits in drain),
    then its connection resets: the speaker's send fails as the reader sees the close."""
    caplog.set_level(logging.INFO)
    async with a_server(speaker_encoder) as server:
        services = server.services
        async with raw_client(server) as first:
            voice = await first.aregister(clip())
        # 450 half-second tones at 48 kHz: ~21 MB of PCM, far more than socket buffers hold.
        # (Numbered: chat cleaning collapses a repeated word, as it would emote spam.)
        text = ".".join(str(n) for n in range(450)) + "."
        for n in range(3):
            async with raw_client(server) as c:
                await c.asend({"type": "voice.use", "voice_id": voice.voice_id})
                assert isinstance(await c.anext(), VoiceReady)
                await c.asend({"type": "speak", "id": f"m{n}", "text": text, "sample_rate": 48000})
                await c.await_type("audio.start")
                server_ws = next(ws for ws in services.sockets if not ws.closed)
                assert server_ws._writer is not None
                protocol = server_ws._writer.protocol
                await until_true(
                    lambda p=protocol: p._paused, "the server's sends backed up", WAIT_S
                )
                connection = c.ws._response.connection
                assert connection is not None and connection.transport is not None
                connection.transport.abort()  # unread data: the kernel answers with a reset
                await until_true(
                    lambda: services.metrics.sessions._value.get() == 0,
                    "the session closed",
                    WAIT_S,
                )
        assert services.store.l1.pinned == set()
        assert services.metrics.pinned_voices._value.get() == 0
        assert services.metrics.messages.labels("failed")._value.get() == 0
    assert "never retrieved" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- item 5's last line of defence: a cap on the audio of one message ---------------------------
async def test_a_message_stops_at_the_audio_cap(
    speaker_encoder: SpeakerEncoder, piper: PiperEngine
) -> None:
    limits = Limits(max_message_audio_s=2.0)
    async with (
        live_server(embedder=EncoderWorker(speaker_encoder), engine=piper, limits=limits) as s,
        raw_client(s) as c,
    ):
        await c.aregister(clip())
        text = " ".join(f"Sentence number {n} keeps the synthesizer busy." for n in range(10))
        await c.asend({"type": "speak", "id": "long", "text": text, "sample_rate": 16000})
        end = await c.await_type("audio.end")
        assert isinstance(end, AudioEnd) and end.truncated and not end.cancelled, end
        assert 1.5 <= end.samples / 16000 <= 2.0 + 0.01, end.samples
        await c.asend({"type": "speak", "id": "short", "text": "Short one."})
        short = await c.await_type("audio.end")
        assert isinstance(short, AudioEnd) and not short.truncated


async def test_purge_notices_reach_other_servers_but_not_their_origin(
    redis_server: RedisServer,
) -> None:
    """A server applies its own deletions when it makes them; its echo, arriving after the same
    audio was registered again, must not undo that registration."""
    origin, other = RedisTier(redis_server.url), RedisTier(redis_server.url)
    heard: dict[str, list[Purge]] = {"origin": [], "other": []}
    listeners = [
        asyncio.create_task(origin.alisten_purges(heard["origin"].append)),
        asyncio.create_task(other.alisten_purges(heard["other"].append)),
    ]
    try:
        fp = fingerprint(7)
        record = VoiceRecord("v_echo", fp, None, 5.0)
        assert await origin.aput_record("alice", record)
        raw = aioredis.from_url(redis_server.url)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (await raw.pubsub_numsub(PURGE_CHANNEL))[0][1] < 2:
                assert loop.time() < deadline, "listeners did not subscribe"
                await asyncio.sleep(0.02)
        finally:
            await raw.aclose()
        assert await origin.adelete_voice("ge2e-test", Purge("alice", "v_echo", fp, False))
        await until_true(lambda: bool(heard["other"]), "the other server's notice", WAIT_S)
        assert heard["other"] == [Purge("alice", "v_echo", fp, True)]
        assert heard["origin"] == []
    finally:
        for task in listeners:
            task.cancel()
        await origin.aclose()
        await other.aclose()
        await asyncio.gather(*listeners, return_exceptions=True)


# --- item 12's report: a streamer learns a clip is poor -----------------------------------------
async def test_voice_ready_reports_what_the_clip_holds(speaker_encoder: SpeakerEncoder) -> None:
    pcm, sr = reference_clip("piper")
    async with (
        a_server(speaker_encoder) as s,
        raw_client(s) as c,
    ):
        good = await c.aregister(wav_bytes(pcm, sr))
        assert good.quality is not None and good.quality["warnings"] == [], good
        assert good.quality["speech_s"] > 3.0 and -30 < good.quality["level_dbfs"] < -10
        quiet = await c.aregister(wav_bytes(np.asarray(pcm) * 0.003, sr))
        assert quiet.quality is not None and quiet.quality["level_dbfs"] < -40, quiet
        assert any("quiet" in w for w in quiet.quality["warnings"]), quiet
        await c.asend({"type": "voice.use", "voice_id": good.voice_id})
        used = await c.anext()
        assert isinstance(used, VoiceReady) and used.quality is None  # no clip, no report
