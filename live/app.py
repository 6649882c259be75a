"""The aiohttp application: app-wide services under typed keys, thin routes, cleanup on exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiohttp import WSCloseCode, web

from clients.web import add_widget_routes

from .connections import Lobby, SessionSocket, handler_args, upgrade_tenant
from .metrics import Metrics
from .session import Session
from .settings import Limits, Settings
from .speech import PiperEngine, SpeechEngine
from .tenants import TenantDirectory, TenantLimits
from .voices import Embedder, VoiceStore

if TYPE_CHECKING:
    from .redis_tier import RedisTier

log = logging.getLogger(__name__)


class Closeable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(eq=False)
class Services:
    """Everything a session needs, built once per app and closed on cleanup."""

    settings: Settings
    metrics: Metrics
    store: VoiceStore
    engine: SpeechEngine
    tier: RedisTier | None = None
    owned: list[Closeable] = field(default_factory=list)
    """What ``abuild_services`` built and so closes; injected models belong to the caller."""
    sockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    _background: list[asyncio.Task[None]] = field(default_factory=list)

    tenants: TenantDirectory = field(default_factory=lambda: TenantDirectory({}))
    tenant_limits: TenantLimits = field(default_factory=lambda: TenantLimits(Limits()))
    lobby: Lobby = field(default_factory=lambda: Lobby(Settings().max_unauthenticated))
    """WebSockets that have not authenticated yet."""

    def start_background(self) -> None:
        if self.tier is not None:
            self.metrics.watch_tier(self.tier)
            self._background.append(asyncio.create_task(self._amaintain_tier(self.tier)))
            self._background.append(
                asyncio.create_task(self.tier.alisten_purges(self.store.purged))
            )

    async def _amaintain_tier(self, tier: RedisTier) -> None:
        """Probe a tripped breaker, keep pinned voices from expiring, poll Redis memory."""
        settings = self.settings
        last_refresh = asyncio.get_running_loop().time()
        policy = await tier.aeviction_policy()
        if policy is not None and policy.startswith("allkeys"):
            log.warning(
                "redis maxmemory-policy is %s: it may evict voice ids, which are records; "
                "use volatile-lru (only embeddings carry a TTL)",
                policy,
            )
        while True:
            await asyncio.sleep(settings.redis_poll_s)
            if not tier.available:
                await tier.aping()
            if not tier.available:
                continue
            await self.store.aflush_records()
            used = await tier.aused_memory()
            if used is not None:
                self.metrics.redis_used_memory.set(used)
            now = asyncio.get_running_loop().time()
            if now - last_refresh >= settings.pin_refresh_s:
                last_refresh = now
                await self.store.arefresh_pinned()

    async def aclose_sockets(self) -> None:
        """Close every session's socket (on shutdown, before aiohttp waits for handlers)."""
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def aclose(self) -> None:
        for task in self._background:
            task.cancel()
        # redis-py's pub/sub reader can absorb a cancellation; closing the tier's pool below
        # ends it for sure, so wait only briefly here.
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)
        await self.aclose_sockets()
        for resource in reversed(self.owned):
            await resource.aclose()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)


SERVICES = web.AppKey("services", Services)


async def abuild_services(
    settings: Settings,
    *,
    engine: SpeechEngine | None = None,
    embedder: Embedder | None = None,
) -> Services:
    """Load the models (off the event loop) and connect the tiers the settings ask for."""
    metrics = Metrics()
    owned: list[Closeable] = []
    if embedder is None:
        from .encoder import EncoderWorker, SpeakerEncoder

        encoder = await asyncio.to_thread(SpeakerEncoder.load, device=settings.device)
        embedder = EncoderWorker(encoder, max_batch=settings.encoder_max_batch)
        owned.append(embedder)
        log.info("speaker encoder %s on %s", encoder.encoder_id, encoder.device)
    if engine is None:
        engine = await asyncio.to_thread(
            PiperEngine, workers=settings.tts_workers, use_cuda=settings.device == "cuda"
        )
        owned.append(engine)
        log.info("speech engine %s at %d Hz", engine.name, engine.sample_rate)
    tier = None
    redis_url = settings.redis_url
    if redis_url is None and settings.data_dir:
        from .embedded import EmbeddedRedis

        embedded = EmbeddedRedis(settings.data_dir)
        redis_url = await embedded.astart()
        if redis_url is not None:
            owned.append(embedded)
    if redis_url:
        from .redis_tier import RedisTier

        tier = RedisTier(redis_url, ttl_s=settings.embedding_ttl_s)
        log.info("redis tier at %s", tier.display_url)
        owned.append(tier)
    store = VoiceStore(
        embedder,
        l1_capacity=settings.l1_voices,
        tier=tier,
        metrics=metrics,
        max_encoder_jobs=settings.limits.max_encoder_jobs,
    )
    tenants = TenantDirectory.from_config(settings.tokens, settings.tokens_file)
    return Services(
        settings,
        metrics,
        store,
        engine,
        tier,
        owned,
        tenants=tenants,
        tenant_limits=TenantLimits(settings.limits),
        lobby=Lobby(settings.max_unauthenticated),
    )


def create_app(
    settings: Settings,
    *,
    engine: SpeechEngine | None = None,
    embedder: Embedder | None = None,
) -> web.Application:
    # Through handler_args so that every runner of this app (serve, the tests, the bench) gets
    # the header timeout and an access log that never shows a ?token=.
    app = web.Application(handler_args=handler_args(settings.header_timeout_s))

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SERVICES] = await abuild_services(settings, engine=engine, embedder=embedder)
        app[SERVICES].start_background()
        yield
        await app[SERVICES].aclose()

    async def close_sockets(app: web.Application) -> None:
        await app[SERVICES].aclose_sockets()

    app.cleanup_ctx.append(services_ctx)
    # Before aiohttp's graceful shutdown waits for handlers: open sessions would hold it.
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    add_widget_routes(app)
    return app


async def websocket(request: web.Request) -> web.WebSocketResponse:
    services = request.app[SERVICES]
    limits = services.settings.limits
    tenant = upgrade_tenant(request, services.tenants)
    # Not authenticated yet: one of a capped few, reading only small frames until hello.
    leave_lobby = services.lobby.enter() if tenant is None else None
    try:
        # PCM does not compress; deflating an 800 KB clip costs a client ~50 ms for nothing.
        ws = SessionSocket(
            frame_limit=limits.max_frame_bytes if tenant else limits.max_hello_frame_bytes,
            admitted_frame_limit=limits.max_frame_bytes,
            on_admit=leave_lobby,
            compress=False,
            heartbeat=30.0,
        )
        await ws.prepare(request)
        services.sockets.add(ws)
        try:
            await Session(ws, services, tenant=tenant).arun()
        finally:
            services.sockets.discard(ws)
            if not ws.closed:
                await ws.close()
    finally:
        if leave_lobby is not None:
            leave_lobby()
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body: dict[str, object] = {
        "status": "ready",
        "encoder": services.store.embedder.encoder_id,
        "engine": services.engine.name,
        "redis": "off" if services.tier is None else services.tier.breaker.state.value,
    }
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.Response(
        body=services.metrics.render(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )
