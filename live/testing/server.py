"""The real server on a free loopback port, in the caller's own event loop (uvicorn's
``tests/utils.py`` style): for the tests and the bench, which read its services directly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from live.app import SERVICES, RouteSet, create_app
from live.connections import alisten
from live.redis_tier import RedisTier
from live.services import Services, StoreFactory, TierFactory
from live.settings import Settings
from live.speech import SpeechEngine
from live.voices import Embedder, VoiceStore

__all__ = ["TIMEOUT", "LiveServer", "free_port", "live_server"]

TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveServer:
    """``create_app`` listening on loopback; ``engine``, ``embedder``, ``store_factory`` and
    ``tier_factory`` replace the parts the settings would build, ``routes`` add pages (the
    browser widget)."""

    settings: Settings
    engine: SpeechEngine | None = None
    embedder: Embedder | None = None
    store_factory: StoreFactory = VoiceStore
    tier_factory: TierFactory = RedisTier
    routes: Iterable[RouteSet] = ()
    runner: web.AppRunner | None = None
    listener: asyncio.Server | None = None

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def services(self) -> Services:
        assert self.runner is not None
        return self.runner.app[SERVICES]

    async def astart(self) -> None:
        app = create_app(
            self.settings,
            engine=self.engine,
            embedder=self.embedder,
            store_factory=self.store_factory,
            tier_factory=self.tier_factory,
            routes=self.routes,
        )
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        self.listener = await alisten(
            self.runner, "127.0.0.1", self.port, max_connections=self.settings.max_connections
        )

    async def astop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@contextlib.asynccontextmanager
async def live_server(
    settings: Settings | None = None,
    *,
    engine: SpeechEngine | None = None,
    embedder: Embedder | None = None,
    store_factory: StoreFactory = VoiceStore,
    tier_factory: TierFactory = RedisTier,
    routes: Iterable[RouteSet] = (),
    **overrides: Any,
) -> AsyncIterator[LiveServer]:
    """A started server, stopped on exit; ``overrides`` are ``Settings`` fields (a free port
    unless one is given)."""
    if settings is None:
        overrides.setdefault("port", free_port())
        settings = Settings(**overrides)
    server = LiveServer(settings, engine, embedder, store_factory, tier_factory, tuple(routes))
    await asyncio.wait_for(server.astart(), TIMEOUT)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.astop(), TIMEOUT)
