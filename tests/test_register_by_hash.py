"""Registering by hash: ``voice.register`` with the SHA-256 of a clip's bytes and no upload.

Answered from the clip the tenant sent before, never from a hash alone: another tenant, a deleted
voice, bytes never sent and a Redis that does not answer all get ``clip_needed``. Against the real
speaker encoder, real redis-servers and real sockets; the engine is a gated fake (speech is not
what these tests are about).
"""

from __future__ import annotations

import dataclasses
import hashlib

import aiohttp
import orjson
import pytest
from aiohttp import web

from clients.client import LivevoiceClient
from live.encoder import EncoderWorker, SpeakerEncoder
from live.metrics import Metrics
from live.redis_tier import RedisTier
from live.tenants import new_token
from live.testing.server import free_port
from live.values import VoiceSource
from live.voices import VoiceStore
from protocol.codec import encode
from protocol.errors import ClipNeeded
from protocol.messages import AudioEnd, Error, Ready, VoiceDeleted, VoiceReady
from tests.clips import reference_wav
from tests.fakes import GatedEngine
from tests.redis_server import RedisServer
from tests.server import RawClient, live_server, raw_client

pytestmark = pytest.mark.timeout(120)

ALICE, BOB = new_token("alice"), new_token("bob")
LIMITS = {"min_s": 1.0, "max_s": 30.0}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def by_hash(client: RawClient, digest: str, request_id: str, **fields: object) -> object:
    """``voice.register`` by ``sha256`` (no clip); its answer, ``voice.ready`` or ``error``."""
    await client.asend({"type": "voice.register", "id": request_id, "sha256": digest, **fields})
    while True:
        msg = await client.anext()
        if isinstance(msg, VoiceReady | Error) and msg.id == request_id:
            return msg


async def test_a_clip_sent_before_is_registered_by_its_hash_and_only_by_its_tenant(
    encoder_worker: EncoderWorker,
) -> None:
    data = reference_wav()
    digest = sha256(data)
    async with (
        live_server(
            embedder=encoder_worker,
            engine=GatedEngine(auto=True),
            tokens=f"{ALICE[1]},{BOB[1]}",
        ) as srv,
        raw_client(srv, hello=False) as alice,
        raw_client(srv, hello=False) as bob,
    ):
        for client, token in ((alice, ALICE[0]), (bob, BOB[0])):
            await client.asend({"type": "hello", "token": token})
            assert (await client.anext()).TYPE == "ready"

        # Never sent: send the clip. The session goes on.
        missed = await by_hash(alice, digest, "r0")
        assert isinstance(missed, Error) and missed.code == "clip_needed"

        uploaded = await alice.aregister(data, name="me", id="r1")
        again = await by_hash(alice, digest, "r2", name="me")
        assert isinstance(again, VoiceReady)
        assert again.voice_id == uploaded.voice_id and again.source == "l1"
        assert (again.quality, again.duration_s) == (uploaded.quality, uploaded.duration_s)
        assert again.matched == uploaded.matched  # matched by default, as the upload was
        await alice.asend({"type": "speak", "id": "m1", "text": "Spoken in the hashed voice."})
        assert isinstance(await alice.await_type("audio.end"), AudioEnd)

        # Bob knows the hash, not the audio: the same answer as for bytes never sent.
        theirs = await by_hash(bob, digest, "b1")
        assert isinstance(theirs, Error) and theirs.code == "clip_needed"
        await bob.asend({"type": "speak", "id": "b2", "text": "Not in Alice's voice."})
        refused = await bob.anext()
        assert isinstance(refused, Error) and refused.code == "no_voice"

        malformed = await by_hash(alice, digest.upper(), "r3")
        assert isinstance(malformed, Error) and malformed.code == "bad_message"

        # Deleted: the hash no longer reaches it (the upload does, and computes it again).
        await alice.asend({"type": "voice.delete", "voice_id": uploaded.voice_id, "id": "d1"})
        assert isinstance(await alice.await_type("voice.deleted"), VoiceDeleted)
        gone = await by_hash(alice, digest, "r4")
        assert isinstance(gone, Error) and gone.code == "clip_needed"
        assert srv.services.store.encoder_calls == 1
        back = await alice.aregister(data, id="r5")
        assert back.voice_id == uploaded.voice_id and back.source == "encoder"


async def test_a_hash_reaches_the_voice_on_another_server_through_redis(
    encoder_worker: EncoderWorker, redis_server: RedisServer
) -> None:
    data = reference_wav()
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine, redis_url=redis_server.url) as a,
        live_server(embedder=encoder_worker, engine=engine, redis_url=redis_server.url) as b,
        raw_client(a) as on_a,
        raw_client(b) as on_b,
    ):
        uploaded = await on_a.aregister(data, match=False)
        there = await by_hash(on_b, sha256(data), "r1", match=False)
        assert isinstance(there, VoiceReady)
        assert (there.voice_id, there.source) == (uploaded.voice_id, "redis")
        assert there.quality == uploaded.quality and there.matched is None
        assert b.services.store.encoder_calls == 0


async def test_without_redis_answering_a_hash_is_clip_needed(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    """A store whose Redis is gone cannot tell the tenant sent the bytes: send them."""
    data = reference_wav()
    worker = EncoderWorker(speaker_encoder)
    up, down = RedisTier(redis_server.url), RedisTier(f"redis://127.0.0.1:{free_port()}/0")
    try:
        first = VoiceStore(worker, tier=up, metrics=Metrics())
        resolved, _ = await first.aresolve_upload(data, **LIMITS)
        await first.aremember("public", resolved, None)
        answered, _ = await VoiceStore(worker, tier=up, metrics=Metrics()).aresolve_sent(
            "public", hashlib.sha256(data).digest(), **LIMITS
        )
        assert answered.source is VoiceSource.REDIS
        with pytest.raises(ClipNeeded):
            await VoiceStore(worker, tier=down, metrics=Metrics()).aresolve_sent(
                "public", hashlib.sha256(data).digest(), **LIMITS
            )
        with pytest.raises(ClipNeeded):  # out of this server's limits now
            await first.aresolve_sent("public", hashlib.sha256(data).digest(), min_s=1.0, max_s=2.0)
    finally:
        for tier in (up, down):
            await tier.aclose()
        await worker.aclose()


async def test_the_python_client_uploads_a_clip_only_when_the_server_needs_it(
    encoder_worker: EncoderWorker, redis_server: RedisServer
) -> None:
    data = reference_wav()
    async with live_server(
        embedder=encoder_worker, engine=GatedEngine(auto=True), redis_url=redis_server.url
    ) as srv:
        async with LivevoiceClient(srv.ws_url, timeout=30) as first:
            new = await first.aregister(data, name="me")
            again = await first.aregister(data, name="me")
            assert (new.source, again.source, again.voice_id) == ("encoder", "l1", new.voice_id)
            assert first.clip_uploads == 1
            await first.aregister(data, name="me", by_sha256=False)
            assert first.clip_uploads == 2
        # A client started later (a restarted bot) is answered by the hash alone too.
        async with LivevoiceClient(srv.ws_url, timeout=30) as later:
            ready = await later.aregister(data, name="me")
            assert ready.voice_id == new.voice_id and later.clip_uploads == 0
            utterance = await later.aspeak("Back with the same voice.")
            assert (await utterance.aresult()).samples > 0


async def test_against_a_server_without_the_feature_the_client_uploads_at_once() -> None:
    """A server older than registering by hash ignores ``sha256`` and waits for the clip: the
    client must not ask it by hash. Played here by a minimal protocol-1 server that says no
    ``features`` in ``ready`` and fails the test if a register comes without its clip."""
    data = reference_wav()
    seen: list[dict[str, object]] = []

    async def old_server(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = orjson.loads(msg.data)
                seen.append(frame)
                if frame["type"] == "hello":
                    await ws.send_str(encode(Ready(session_id="old", limits={}, formats={})))
            elif msg.type is aiohttp.WSMsgType.BINARY:
                register = seen[-1]
                assert register["type"] == "voice.register" and "sha256" not in register
                ready = VoiceReady(voice_id="v_old", source="encoder", ms=1.0, duration_s=5.0)
                await ws.send_str(encode(dataclasses.replace(ready, id=str(register["id"]))))
        return ws

    app = web.Application()
    app.router.add_get("/ws", old_server)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with LivevoiceClient(f"ws://127.0.0.1:{port}/ws", timeout=10) as client:
            ready = await client.aregister(data, name="me")
            assert ready.voice_id == "v_old" and client.clip_uploads == 1
        assert [frame["type"] for frame in seen] == ["hello", "voice.register"]
    finally:
        await runner.cleanup()
