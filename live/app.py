"""The aiohttp application: app-wide services under a typed key, thin routes, cleanup on exit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable

from aiohttp import web

from .connections import SessionSocket, handler_args, upgrade_tenant
from .redis_tier import RedisTier
from .services import Services, StoreFactory, TierFactory, aservices
from .session import Session
from .settings import Settings
from .speakerbot import SPEAKERBOT, Speakerbot, aserve, parse_voice_aliases
from .speech import SpeechEngine
from .voices import Embedder, VoiceStore

SERVICES = web.AppKey("services", Services)

RouteSet = Callable[[web.Application], None]
"""Adds routes to the app; how a layer above ``live`` (the browser widget in ``clients``)
mounts its pages without ``live`` importing it."""


def create_app(
    settings: Settings,
    *,
    engine: SpeechEngine | None = None,
    embedder: Embedder | None = None,
    store_factory: StoreFactory = VoiceStore,
    tier_factory: TierFactory = RedisTier,
    routes: Iterable[RouteSet] = (),
) -> web.Application:
    """The server's app: sessions at ``/ws``, probes, metrics, and whatever ``routes`` add.

    ``engine``, ``embedder``, ``store_factory`` and ``tier_factory`` replace the parts the
    settings would build (see ``live.services.aservices``).
    """
    # Through handler_args so that every runner of this app (serve, the tests, the bench) gets
    # the header timeout and an access log that never shows a ?token=.
    app = web.Application(handler_args=handler_args(settings.header_timeout_s))

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        async with aservices(
            settings,
            engine=engine,
            embedder=embedder,
            store_factory=store_factory,
            tier_factory=tier_factory,
        ) as services:
            app[SERVICES] = services
            yield

    async def close_sockets(app: web.Application) -> None:
        await app[SERVICES].aclose_sockets()

    app.cleanup_ctx.append(services_ctx)
    # Before aiohttp's graceful shutdown waits for handlers: open sessions would hold it.
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if settings.speakerbot_path:
        app[SPEAKERBOT] = Speakerbot(
            channel=settings.speakerbot_channel,
            aliases=parse_voice_aliases(settings.speakerbot_voices),
        )
        app.router.add_get(settings.speakerbot_path, speakerbot)
    for add_routes in routes:
        add_routes(app)
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


async def speakerbot(request: web.Request) -> web.StreamResponse:
    """Speaker.bot's request format, spoken into a channel (``live.speakerbot``)."""
    return await aserve(request, request.app[SERVICES], request.app[SPEAKERBOT])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Asks each service (models, encoder worker, Redis) now; 503 naming the parts that failed
    when a required one did. Redis is reported but not required: the server works without it."""
    services = request.app[SERVICES]
    answers = await services.aready()
    failed = [c.name for c in services.checks if c.required and not answers[c.name]]
    body: dict[str, object] = {
        "status": "unavailable" if failed else "ready",
        "checks": {name: "ok" if ok else "failed" for name, ok in answers.items()},
    }
    if failed:
        body["failed"] = failed
    return web.json_response(body, status=503 if failed else 200)


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.Response(
        body=services.metrics.render(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )
