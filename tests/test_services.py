"""The app-wide services: closed by one exit stack where a failing close never skips the others,
``/readyz`` that asks each part, and one registration that walks store → Redis tier once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import aiohttp
import pytest

from live.audio import canonicalize
from live.encoder import EncoderWorker, SpeakerEncoder
from live.redis_tier import RedisTier
from live.services import close_logged
from live.values import VoiceSource
from live.voices import VoiceStore
from tests.clips import reference_clip, wav_bytes
from tests.fakes import GatedEngine
from tests.redis_server import RedisServer
from tests.server import live_server

BOUND_S = 60.0


async def test_a_failing_close_is_logged_and_the_others_still_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As ``aservices`` registers its parts: each close on the stack through ``close_logged``.
    Before, ``Services.aclose`` closed its parts in a loop, and the first to raise left the rest
    (the embedded redis-server, the encoder thread) open."""
    closed: list[str] = []

    def part(name: str, *, fails: bool = False) -> Any:
        async def aclose() -> None:
            closed.append(name)
            if fails:
                raise RuntimeError(f"{name} would not close")

        return aclose

    async with contextlib.AsyncExitStack() as stack:
        for name, fails in [("encoder", False), ("engine", True), ("tier", False)]:
            stack.push_async_callback(close_logged, name, part(name, fails=fails))
    assert closed == ["tier", "engine", "encoder"]  # in reverse, none skipped, nothing raised
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and "closing engine failed" in failures[0].getMessage()


async def readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as response:
        return response.status, await response.json()


async def test_readyz_asks_each_service_and_names_the_one_that_failed(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    """Before, ``/readyz`` answered 200 with fixed fields whatever became of the parts."""
    worker = EncoderWorker(speaker_encoder)
    async with (
        asyncio.timeout(BOUND_S),
        live_server(embedder=worker, engine=GatedEngine(), redis_url=redis_server.url) as srv,
    ):
        assert await readyz(srv.url) == (
            200,
            {"status": "ready", "checks": {"encoder": "ok", "redis": "ok"}},
        )
        # Redis is a cache: without it the server still serves, and says Redis is down.
        redis_server.kill()
        assert await readyz(srv.url) == (
            200,
            {"status": "ready", "checks": {"encoder": "ok", "redis": "failed"}},
        )
        # Without its encoder worker no voice can be registered: not ready, and which part.
        await worker.aclose()
        assert await readyz(srv.url) == (
            503,
            {
                "status": "unavailable",
                "checks": {"encoder": "failed", "redis": "failed"},
                "failed": ["encoder"],
            },
        )


class _RecordingTier:
    """Forwards to a real ``RedisTier``, noting which of its methods the store calls."""

    def __init__(self, tier: RedisTier) -> None:
        self.tier = tier
        self.called: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.called.append(name)
        return getattr(self.tier, name)


async def test_one_registration_walks_store_to_tier_once(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    """The cross-server single-flight lives in the tier: the store asks it once per registration
    instead of calling get, lock, put and unlock (or wait for the value) in turn."""
    clip = canonicalize(wav_bytes(*reference_clip("piper")))
    tier = RedisTier(redis_server.url)
    recording = _RecordingTier(tier)
    worker = EncoderWorker(speaker_encoder)
    store = VoiceStore(worker, tier=cast(RedisTier, recording), l1_capacity=0)
    other = VoiceStore(worker, tier=tier)
    try:
        async with asyncio.timeout(BOUND_S):
            first = await store.aresolve(clip)
            assert first.source is VoiceSource.ENCODER
            assert recording.called == ["aget_or_compute"]
            # The value it stored before unlocking is what another server finds.
            assert (await other.aresolve(clip)).source is VoiceSource.REDIS
            recording.called.clear()
            assert (await store.aresolve(clip)).source is VoiceSource.REDIS
            assert recording.called == ["aget_or_compute"]
    finally:
        await worker.aclose()
        await tier.aclose()
