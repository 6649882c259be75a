"""Tenants, limits, forgetting a voice, hostile clips and text, Redis over TLS."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from live.audio import canonicalize
from live.cli import guard_open_server
from live.encoder import EncoderWorker, SpeakerEncoder
from live.redis_tier import key, record_key
from live.settings import Limits, Settings
from live.speech import PiperEngine
from live.tenants import TenantDirectory, TokenBucket, hash_token, new_token, parse_entries
from protocol.errors import Unauthorized
from protocol.messages import AudioEnd, Cancelled, Error, Pong, Queued, VoiceDeleted, VoiceReady
from tests.clips import espeak_speech, reference_wav, wav_bytes
from tests.fakes import GatedEngine
from tests.hostile import corpus
from tests.redis_server import RedisServer, free_port
from tests.server import LiveServer, RawClient, live_server, raw_client

pytestmark = pytest.mark.timeout(180)

ALICE, BOB = new_token("alice"), new_token("bob")
TOKENS = f"{ALICE[1]},{BOB[1]}"


def clip() -> bytes:
    return reference_wav()


async def hello(c: RawClient, token: str | None) -> None:
    await c.asend({"type": "hello", "token": token} if token else {"type": "hello"})


async def closed_with(c: RawClient) -> int:
    msg = await asyncio.wait_for(c.ws.receive(), 10)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    return int(msg.data)


# --- tokens ---------------------------------------------------------------------------------------
def test_token_entries_are_hashed_and_checked() -> None:
    token, entry = new_token("alice")
    assert token not in entry and entry == f"alice={hash_token(token)}"
    directory = TenantDirectory(parse_entries(entry + "\n# comment\n" + BOB[1], source="t"))
    assert directory.authenticate(token) == "alice"
    assert directory.authenticate(BOB[0]) == "bob"
    for bad in (None, "", token + "x", BOB[1]):
        with pytest.raises(Unauthorized):
            directory.authenticate(bad)
    with pytest.raises(ValueError) as info:
        parse_entries("alice=plaintext-token", source="env")
    assert "plaintext-token" not in str(info.value)
    assert TenantDirectory({}).authenticate("anything") == "public"


def test_a_server_without_tokens_binds_to_loopback_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert guard_open_server(Settings(host="0.0.0.0")).host == "127.0.0.1"
    assert "no tokens configured" in caplog.text
    assert guard_open_server(Settings(host="0.0.0.0", tokens=ALICE[1])).host == "0.0.0.0"


def test_token_bucket_trips_and_recovers() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0


@pytest.fixture
async def secured(encoder_worker: EncoderWorker):  # type: ignore[no-untyped-def]
    limits = Limits(max_sessions_per_tenant=2)
    async with live_server(
        embedder=encoder_worker, engine=GatedEngine(auto=True), tokens=TOKENS, limits=limits
    ) as srv:
        yield srv


@pytest.mark.parametrize("token", [None, "wrong", ALICE[1]])
async def test_bad_tokens_are_refused_with_4401(secured: LiveServer, token: str | None) -> None:
    async with raw_client(secured, hello=False) as c:
        await hello(c, token)
        msg = await c.anext()
        assert isinstance(msg, Error) and msg.code == "unauthorized"
        assert await closed_with(c) == 4401


async def test_voice_ids_are_scoped_to_their_tenant(secured: LiveServer) -> None:
    async with raw_client(secured, hello=False) as a, raw_client(secured, hello=False) as b:
        await hello(a, ALICE[0])
        await hello(b, BOB[0])
        await a.anext()
        await b.anext()
        mine = await a.aregister(clip())
        for attempt in (
            {"type": "voice.use", "voice_id": mine.voice_id},
            {"type": "voice.delete", "voice_id": mine.voice_id},
        ):
            await b.asend(attempt)
            msg = await b.anext()
            assert isinstance(msg, Error) and msg.code == "voice_not_found", msg
        await b.asend({"type": "speak", "id": "x", "text": "Not with Alice's voice."})
        msg = await b.anext()
        assert isinstance(msg, Error) and msg.code in {"no_voice", "voice_failed"}
        # The same audio from Bob: his own id, and the shared cache spares the encoder.
        theirs = await b.aregister(clip())
        assert theirs.voice_id != mine.voice_id and theirs.source == "l1"
        assert secured.services.store.encoder_calls == 1
        await a.asend({"type": "voice.use", "voice_id": mine.voice_id})
        assert isinstance(await a.anext(), VoiceReady)


async def test_sessions_per_tenant_are_limited(secured: LiveServer) -> None:
    async with raw_client(secured, hello=False) as one, raw_client(secured, hello=False) as two:
        for c in (one, two):
            await hello(c, ALICE[0])
            await c.anext()
        async with raw_client(secured, hello=False) as three:
            await hello(three, ALICE[0])
            msg = await three.anext()
            assert isinstance(msg, Error) and msg.code == "too_many_sessions"
            assert await closed_with(three) == 4429
        async with raw_client(secured, hello=False) as bobs:  # other tenants are not affected
            await hello(bobs, BOB[0])
            assert (await bobs.anext()).TYPE == "ready"
    async with raw_client(secured, hello=False) as again:  # slots come back when sessions end
        await hello(again, ALICE[0])
        assert (await again.anext()).TYPE == "ready"


async def test_rate_limits_trip_and_recover(encoder_worker: EncoderWorker) -> None:
    # Slow refills (a speak every 2 s, a registration every 10 s): the burst is spent before a
    # token comes back even when a loaded machine stalls between messages.
    limits = Limits(
        speaks_per_minute=30, speak_burst=3, registrations_per_minute=6, registration_burst=1
    )
    async with (
        live_server(embedder=encoder_worker, engine=GatedEngine(auto=True), limits=limits) as srv,
        raw_client(srv) as c,
    ):
        await c.aregister(clip())
        await c.asend({"type": "voice.register"})
        await c.asend_bytes(clip())
        msg = await c.anext()
        assert isinstance(msg, Error) and msg.code == "rate_limited" and msg.id is None
        for i in range(4):
            await c.asend({"type": "speak", "id": f"m{i}", "text": "Hi."})
        limited = [m for m in [await c.await_type("error")] if isinstance(m, Error)]
        assert limited[0].code == "rate_limited" and limited[0].id == "m3"
        # It recovers: a token comes back within 2 s. Ask until one is there (bounded).
        for attempt in range(40):
            later = f"later{attempt}"
            await c.asend({"type": "speak", "id": later, "text": "Hi again."})
            while not isinstance(msg := await c.anext(), Queued | Error) or msg.id != later:
                pass  # audio of the messages before
            if isinstance(msg, Queued):
                break
            assert msg.code == "rate_limited", msg
            await asyncio.sleep(0.25)
        else:
            pytest.fail("the speak limit never recovered")
        while True:
            msg = await c.anext()
            assert not isinstance(msg, Error), msg
            if isinstance(msg, AudioEnd) and msg.id == f"later{attempt}":
                break


async def test_idle_sessions_close_with_4410(encoder_worker: EncoderWorker) -> None:
    # Pings every 0.2 s against a 2 s idle timeout: a loaded machine has 1.8 s of slack.
    limits = Limits(idle_timeout_s=2.0)
    async with (
        live_server(embedder=encoder_worker, engine=GatedEngine(), limits=limits) as srv,
        raw_client(srv) as c,
    ):
        for _ in range(3):  # pings keep it alive
            await asyncio.sleep(0.2)
            await c.asend({"type": "ping"})
            assert isinstance(await c.anext(), Pong)
        msg = await c.anext()
        assert isinstance(msg, Error) and msg.code == "idle_timeout"
        assert await closed_with(c) == 4410


# --- forgetting a voice ---------------------------------------------------------------------------
async def test_delete_purges_everywhere_within_a_second(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    data = clip()
    fp = canonicalize(data).fingerprint
    settings = {"redis_url": redis_server.url, "tokens": TOKENS}
    async with (
        live_server(embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), **settings) as a,
        live_server(embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), **settings) as b,
        raw_client(a, hello=False) as owner,
        raw_client(b, hello=False) as listener,
    ):
        await hello(owner, ALICE[0])
        await hello(listener, ALICE[0])
        await owner.anext()
        await listener.anext()
        mine = await owner.aregister(data)
        # voice.use works on the other server too: the voice id lives in Redis.
        await listener.asend({"type": "voice.use", "voice_id": mine.voice_id})
        used = await listener.anext()
        assert isinstance(used, VoiceReady) and used.source == "redis"
        await listener.asend({"type": "speak", "id": "q1", "text": "Queued. Behind."})
        await listener.asend({"type": "speak", "id": "q2", "text": "Also queued."})
        assert b.services.store.l1.get(fp) is not None

        started = time.monotonic()
        await owner.asend({"type": "voice.delete", "voice_id": mine.voice_id})
        deleted = await owner.await_type("voice.deleted")
        assert deleted == VoiceDeleted(voice_id=mine.voice_id, pinned=True)
        # Pub/sub, not a poll or a TTL: milliseconds here. The README's "within a second" is a
        # claim about an idle machine; this bound only has to tell a push from a 7-day TTL.
        told = await listener.await_type("voice.deleted", timeout=5.0)
        assert isinstance(told, VoiceDeleted) and told.pinned
        assert time.monotonic() - started < 5.0
        assert b.services.store.l1.get(fp) is None and a.services.store.l1.get(fp) is None
        dropped = [m for m in listener.seen.messages if isinstance(m, Cancelled | AudioEnd)]
        assert {m.id for m in dropped} >= {"q2"}

        raw = aioredis.from_url(redis_server.url)
        try:
            assert await raw.exists(key(speaker_encoder.encoder_id, fp)) == 0
            assert await raw.exists(record_key(mine.voice_id)) == 0
        finally:
            await raw.aclose()
        for c in (owner, listener):
            await c.asend({"type": "speak", "id": "after", "text": "Gone."})
            msg = await c.await_type("error")
            assert isinstance(msg, Error) and msg.code == "no_voice"
            await c.asend({"type": "voice.use", "voice_id": mine.voice_id})
            msg = await c.await_type("error")
            assert isinstance(msg, Error) and msg.code == "voice_not_found"


# --- hostile input --------------------------------------------------------------------------------
async def test_hostile_clips_are_accepted_or_refused_while_others_keep_talking(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    limits = Limits(registration_burst=100)
    async with (
        live_server(embedder=encoder_worker, engine=piper, limits=limits) as srv,
        raw_client(srv) as bystander,
        raw_client(srv) as attacker,
    ):
        await bystander.aregister(clip())
        talk = "Meanwhile the stream goes on. Nothing here should stop. " * 3
        for i in range(3):
            await bystander.asend({"type": "speak", "id": f"b{i}", "text": talk})
        outcomes: dict[str, str] = {}
        for name, (data, allowed) in corpus().items():
            await attacker.asend({"type": "voice.register", "name": name})
            await attacker.asend_bytes(data)
            msg = await attacker.anext()
            outcome = "ok" if isinstance(msg, VoiceReady) else getattr(msg, "code", "?")
            outcomes[name] = outcome
            assert outcome in allowed, (name, msg)
        ends = []
        while len(ends) < 3:
            msg = await bystander.anext()
            assert not isinstance(msg, Error), msg
            if isinstance(msg, AudioEnd):
                assert not msg.cancelled
                ends.append(msg.id)
        await attacker.asend({"type": "ping"})
        assert isinstance(await attacker.anext(), Pong)
    print(outcomes)


HOSTILE_TEXT = {
    "emoji": "I love this stream 😀🎉🔥 gg",
    "rtl": "مرحبا بالجميع welcome שלום",
    "zero width": "he\u200bllo\u200d wor\ufeffld",
    "control": "bell\x07 escape\x1b[31m null\x00 done",
    "ssml": "<speak><break time='100s'/>Hi <prosody rate='x-fast'>there</prosody></speak>",
    "repeated 2000": "a" * 2000,
    # Distinct words: chat cleaning says a repeated word once, as it would emote spam.
    "no punctuation": " ".join(["lol", "gg", "nice", "wow", "hype"] * 60),
    "emoji spam": "😀🎉🔥👍🏽🧑‍🚀" * 40,
    "only invisible": "\u200b\u200c\x00\u202e",
    "bidi override": "\u202egnirts desrever\u202c",
    "10000 repeated": "x" * 10000,
}


async def test_hostile_chat_text_is_spoken_or_cleanly_refused(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    async with live_server(embedder=encoder_worker, engine=piper) as srv, raw_client(srv) as c:
        await c.aregister(clip())
        results: dict[str, str] = {}
        for name, text in HOSTILE_TEXT.items():
            await c.asend({"type": "speak", "id": name, "text": text})
            while name not in results:
                msg = await c.anext(timeout=60)
                if isinstance(msg, Error):
                    assert msg.id == name, msg
                    results[name] = msg.code
                elif isinstance(msg, AudioEnd):
                    assert msg.id == name and msg.samples > 0 and not msg.truncated, msg
                    results[name] = "spoken"
                    if name == "no punctuation":  # segmenting keeps first audio fast
                        assert msg.ttfa_ms < 5000, msg
        assert results["only invisible"] == "empty_text"
        assert results["emoji spam"] == "empty_text"  # no emoji names read out
        assert results["10000 repeated"] == "text_too_long"
        assert results["ssml"] == "spoken" and results["control"] == "spoken"
        assert set(results.values()) <= {"spoken", "empty_text", "text_too_long"}
        await c.asend({"type": "ping", "id": "p"})
        assert await c.await_type("pong") == Pong(id="p")


async def test_random_frames_never_break_a_session(encoder_worker: EncoderWorker) -> None:
    rng = random.Random(1234)
    kinds = ["hello", "voice.register", "voice.use", "voice.delete", "speak", "cancel", "ping", "x"]
    values = [None, 0, -1, 2**70, 1.5, "", "a" * 300, [], {}, True, "v_1", "\u0000"]
    async with (
        live_server(embedder=encoder_worker, engine=GatedEngine(auto=True)) as srv,
        raw_client(srv) as fuzz,
        raw_client(srv) as calm,
    ):
        for _ in range(300):
            roll = rng.random()
            if roll < 0.15:
                await fuzz.asend_bytes(rng.randbytes(rng.randrange(0, 64)))
            elif roll < 0.3:
                await fuzz.asend(rng.randbytes(rng.randrange(1, 40)).decode("latin-1"))
            else:
                obj = {"type": rng.choice(kinds)}
                for field in rng.sample(
                    ["id", "text", "voice_id", "name", "format", "sample_rate", "token"], 3
                ):
                    obj[field] = rng.choice(values)
                await fuzz.asend(json.dumps(obj))
        await fuzz.asend({"type": "ping", "id": "end"})
        while True:  # everything before the ping was answered, and the session still works
            msg = await fuzz.anext()
            if isinstance(msg, Pong) and msg.id == "end":
                break
        await calm.asend({"type": "ping", "id": "calm"})
        assert await calm.anext() == Pong(id="calm")


# --- Redis over TLS, with a password --------------------------------------------------------------
def make_certs(tmp: Path) -> dict[str, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca_crt = tmp / "ca.key", tmp / "ca.crt"
    key_, csr, crt, ext = tmp / "redis.key", tmp / "redis.csr", tmp / "redis.crt", tmp / "ext.cnf"
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_crt),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key_),
        "-out",
        str(csr),
    )
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_crt),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )
    return {"ca": ca_crt, "crt": crt, "key": key_}


async def test_redis_over_tls_with_a_password(
    speaker_encoder: SpeakerEncoder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = make_certs(tmp_path)
    tls_port = free_port()
    config = {
        "tls-port": str(tls_port),
        "tls-cert-file": str(certs["crt"]),
        "tls-key-file": str(certs["key"]),
        "tls-ca-cert-file": str(certs["ca"]),
        "tls-auth-clients": "no",
    }
    caplog.set_level(logging.DEBUG)
    with RedisServer(password="tls-s3cret", extra_config=config):
        url = f"rediss://:tls-s3cret@127.0.0.1:{tls_port}/0?ssl_ca_certs={certs['ca']}"
        data = clip()
        async with (
            live_server(
                embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), redis_url=url
            ) as first,
            raw_client(first) as c,
        ):
            assert (await c.aregister(data)).source == "encoder"
            assert first.services.tier is not None and first.services.tier.writes == 1
        async with (
            live_server(
                embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), redis_url=url
            ) as second,
            raw_client(second) as c,
        ):
            assert (await c.aregister(data)).source == "redis"
        # Without trusting the CA the connection is refused, and the server degrades.
        untrusted = f"rediss://:tls-s3cret@127.0.0.1:{tls_port}/0"
        async with (
            live_server(
                embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), redis_url=untrusted
            ) as third,
            raw_client(third) as c,
        ):
            assert (await c.aregister(espeak_clip())).source == "encoder"
            assert third.services.tier is not None and third.services.tier.errors >= 1
    assert "tls-s3cret" not in caplog.text


def espeak_clip() -> bytes:
    pcm, sr = espeak_speech("A different speaker says hello to everyone in the chat today.")
    return wav_bytes(pcm, sr)
