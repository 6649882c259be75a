"""A tenant's limits hold across servers sharing one Redis (issue 11): sessions per tenant and the
speak rate, a dead server's sessions expiring, and per-server counting while Redis is down. Real
redis-server processes and real servers on loopback; a tone engine, since these are about limits."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from live.encoder import EncoderWorker, SpeakerEncoder
from live.settings import Limits, Settings
from live.tenants import sessions_key
from protocol.messages import AudioEnd, Error, Queued
from tests.fakes import GatedEngine
from tests.redis_server import RedisServer, free_port
from tests.server import LiveServer, RawClient, live_server, raw_client, until_true
from tests.test_security import ALICE, BOB, TOKENS, clip

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent


class NoEmbedder:
    """For tests that register no voice: the server never loads the speaker encoder."""

    encoder_id = "none"
    dim = 256

    async def aembed(self, pcm16k: np.ndarray) -> np.ndarray:
        raise AssertionError("this test registers no voice")


def a_server(redis: RedisServer, *, max_sessions: int = 2, **overrides: Any) -> Any:
    """A server on ``redis`` with tokens, a tone engine, short refresh and probe periods."""
    overrides.setdefault("embedder", NoEmbedder())
    overrides.setdefault("limits", Limits(max_sessions_per_tenant=max_sessions))
    return live_server(
        engine=GatedEngine(auto=True),
        redis_url=redis.url,
        tokens=TOKENS,
        redis_poll_s=0.1,
        session_refresh_s=0.2,
        session_expiry_s=5.0,
        **overrides,
    )


@contextlib.asynccontextmanager
async def session(srv: LiveServer, token: str) -> AsyncIterator[tuple[RawClient, str]]:
    """A client that sent hello with ``token``; the type of the first answer (``ready`` or the
    error's code)."""
    async with raw_client(srv, hello=False) as c:
        await c.asend({"type": "hello", "token": token})
        msg = await c.anext()
        yield c, (msg.code if isinstance(msg, Error) else msg.TYPE)


async def admitted(srv: LiveServer, token: str) -> str:
    """Open and close one session; what the server answered its hello."""
    async with session(srv, token) as (_, answer):
        return answer


async def test_a_tenants_sessions_limit_holds_across_servers(redis_server: RedisServer) -> None:
    async with a_server(redis_server) as a, a_server(redis_server) as b:
        async with session(a, ALICE[0]) as (_, first), session(b, ALICE[0]) as (_, second):
            assert (first, second) == ("ready", "ready")
            assert await admitted(a, ALICE[0]) == "too_many_sessions"
            assert await admitted(b, ALICE[0]) == "too_many_sessions"
            assert await admitted(b, BOB[0]) == "ready"  # other tenants are not affected
        # Both slots come back, on either server, as soon as the sessions end.
        async with session(b, ALICE[0]) as (_, first), session(b, ALICE[0]) as (_, second):
            assert (first, second) == ("ready", "ready")


def a_voiced_server(
    redis: RedisServer, encoder: SpeakerEncoder, **overrides: Any
) -> AbstractAsyncContextManager[LiveServer]:
    return a_server(redis, embedder=EncoderWorker(encoder), **overrides)  # type: ignore[no-any-return]


async def speak(c: RawClient, message_id: str) -> Queued | Error:
    await c.asend({"type": "speak", "id": message_id, "text": "Hi."})
    while not isinstance(msg := await c.anext(), Queued | Error) or msg.id != message_id:
        pass  # audio of the messages before
    return msg


async def test_the_speak_rate_limit_holds_across_servers(
    redis_server: RedisServer, speaker_encoder: SpeakerEncoder
) -> None:
    # A burst of 3 and one token a minute: nothing refills while the test runs.
    limits = Limits(speak_burst=3, speaks_per_minute=1)
    async with (
        a_voiced_server(redis_server, speaker_encoder, limits=limits) as a,
        a_voiced_server(redis_server, speaker_encoder, limits=limits) as b,
        session(a, ALICE[0]) as (on_a, _),
        session(b, ALICE[0]) as (on_b, _),
        session(b, BOB[0]) as (bobs, _),
    ):
        for c in (on_a, on_b, bobs):
            await c.aregister(clip())
        answers = [
            await speak(on_a, "m0"),
            await speak(on_a, "m1"),
            await speak(on_b, "m2"),
            await speak(on_b, "m3"),
            await speak(on_a, "m4"),
        ]
        assert [m.TYPE for m in answers] == ["queued"] * 3 + ["error"] * 2, answers
        assert all(m.code == "rate_limited" for m in answers[3:] if isinstance(m, Error))
        assert isinstance(await speak(bobs, "b0"), Queued)  # Bob's bucket is his own


# A server in a process of its own, to SIGKILL: it never closes its sessions.
_SERVER = """
import asyncio, sys
from live.settings import Limits, Settings
from live.testing.server import live_server
from tests.fakes import GatedEngine

class NoEmbedder:
    encoder_id = "none"
    dim = 256

async def main():
    port, url, tokens = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    async with live_server(
        port=port, redis_url=url, tokens=tokens, embedder=NoEmbedder(),
        engine=GatedEngine(auto=True), limits=Limits(max_sessions_per_tenant=2),
        session_refresh_s=0.2, session_expiry_s=1.5,
    ):
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_dead_servers_sessions_stop_counting_after_the_expiry(
    redis_server: RedisServer,
) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVER,
        str(port),
        redis_server.url,
        TOKENS,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"ready", line
        doomed = LiveServer(Settings(port=port))  # only its address: it runs in ``proc``
        async with (
            a_server(redis_server) as survivor,
            session(doomed, ALICE[0]) as (_, first),
            session(doomed, ALICE[0]) as (_, second),
        ):
            assert (first, second) == ("ready", "ready")
            assert await admitted(survivor, ALICE[0]) == "too_many_sessions"
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
            killed = time.monotonic()
            # Its two sessions hold their slots until the expiry (1.5 s after its last refresh),
            # then the survivor admits the tenant again. Bounded: never more than 30 s.
            for _ in range(300):
                if await admitted(survivor, ALICE[0]) == "ready":
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("a dead server's sessions kept counting")
            print(f"admitted {time.monotonic() - killed:.2f} s after SIGKILL (expiry 1.5 s)")
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


async def test_redis_down_falls_back_to_per_server_limits_and_back(
    redis_server: RedisServer, speaker_encoder: SpeakerEncoder
) -> None:
    async with (
        a_voiced_server(redis_server, speaker_encoder) as a,
        a_voiced_server(redis_server, speaker_encoder) as b,
        session(a, ALICE[0]) as (_, first),
        session(b, ALICE[0]) as (_, second),
    ):
        assert (first, second) == ("ready", "ready")
        assert await admitted(b, ALICE[0]) == "too_many_sessions"  # shared: 2 of 2

        redis_server.stop()
        # Each server counts for itself: one more on each, and requests are served.
        async with session(a, ALICE[0]) as (on_a, answer_a), session(b, ALICE[0]) as (_, answer_b):
            assert (answer_a, answer_b) == ("ready", "ready")
            await on_a.aregister(clip())
            assert isinstance(await speak(on_a, "during"), Queued)
            assert isinstance(await on_a.await_type("audio.end"), AudioEnd)
        assert a.services.tenant_limits.fallbacks > 0 and b.services.tenant_limits.fallbacks > 0

        redis_server.start()
        await until_true(
            lambda: all(s.services.tier is not None and s.services.tier.available for s in (a, b)),
            "both servers to use Redis again",
        )
        # Each server's live session reaches the new Redis at its next refresh.
        probe = aioredis.from_url(redis_server.url)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while await probe.zcard(sessions_key("alice")) < 2:
                assert loop.time() < deadline, "the live sessions never reached Redis again"
                await asyncio.sleep(0.05)
        finally:
            await probe.aclose()
        # Shared again: A alone has one session (it would admit another), but the tenant has two.
        assert await admitted(a, ALICE[0]) == "too_many_sessions"
