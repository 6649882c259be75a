"""App-wide services: built once per app, frozen, and closed by one ``AsyncExitStack``.

Like svcs' ``Registry``: each part that is built registers its own close as it is built, so a
failure halfway through building closes what was already built; on shutdown the closes run in
reverse, and one that fails is logged and skipped, never stopping the others. A part is
replaced by passing another to :func:`aservices` (the bench's cache-free store, the tests'
fake engine), never by patching a running app. Each part also says how to ask it whether it
is ready (:class:`ReadinessCheck`), which ``/readyz`` does on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, runtime_checkable

from aiohttp import WSCloseCode, web

from .channels import ChannelHub, LocalChannels
from .connections import Lobby
from .embedded import EmbeddedRedis
from .loudness import LoudnessEngine
from .matching import VoiceMatching
from .metrics import Metrics
from .redis_tier import RedisTier
from .rendered import RenderedSpeech
from .settings import Limits, Settings
from .shared_channels import SharedChannels
from .speech import PiperEngine, SpeechEngine
from .tenants import TenantDirectory, TenantLimits
from .values import ResolvedVoice
from .voices import Embedder, VoiceStore

__all__ = [
    "Alive",
    "ReadinessCheck",
    "Services",
    "StoreFactory",
    "TierFactory",
    "aservices",
    "close_logged",
]

log = logging.getLogger(__name__)

StoreFactory = Callable[..., VoiceStore]
"""Builds the voice store from ``VoiceStore``'s own arguments (``VoiceStore`` itself, or a
subclass such as the bench's cache-free baseline)."""
TierFactory = Callable[..., RedisTier]
"""Builds the Redis tier from ``RedisTier``'s own arguments (the bench gives it a breaker whose
transitions it times)."""


@runtime_checkable
class Alive(Protocol):
    """A part with a worker of its own that can stop (``live.encoder.EncoderWorker``)."""

    @property
    def alive(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class ReadinessCheck:
    """How ``/readyz`` asks one service whether it can serve."""

    name: str
    aprobe: Callable[[], Awaitable[bool]]
    required: bool = True
    """False for a part the server works without (Redis is a cache, never a dependency): its
    failure is reported, but the server stays ready."""


@dataclass(frozen=True, eq=False)
class Services:
    """Everything a session needs, built once per app by :func:`aservices`."""

    settings: Settings
    metrics: Metrics
    store: VoiceStore
    engine: SpeechEngine
    tier: RedisTier | None = None
    embedded_redis: EmbeddedRedis | None = None
    """The private Redis this app started (no ``redis_url``, a ``data_dir``), if it did."""
    tenants: TenantDirectory = field(default_factory=lambda: TenantDirectory({}))
    tenant_limits: TenantLimits = field(default_factory=lambda: TenantLimits(Limits()))
    lobby: Lobby = field(default_factory=lambda: Lobby(Settings().max_unauthenticated))
    """WebSockets that have not authenticated yet."""
    sockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    """Open session sockets, closed on shutdown before aiohttp waits for their handlers."""
    checks: tuple[ReadinessCheck, ...] = ()
    channels: ChannelHub | None = None
    """The tenants' channels (``channel.join``); None: this app serves none."""
    matching: VoiceMatching | None = None
    """The engine, when it matches voices to their profile (under any cache around it)."""

    async def aclose_sockets(self) -> None:
        """Close every session's socket (on shutdown, before aiohttp waits for handlers)."""
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def aready(self) -> dict[str, bool]:
        """Ask every part at once; per check, whether it answered that it is ready. A check
        that raises or takes over a second counts as not ready."""

        async def ask(check: ReadinessCheck) -> bool:
            try:
                async with asyncio.timeout(1.0):
                    return await check.aprobe()
            except Exception:
                log.warning("readiness check %s failed", check.name, exc_info=True)
                return False

        answers = await asyncio.gather(*(ask(check) for check in self.checks))
        return {check.name: answer for check, answer in zip(self.checks, answers, strict=True)}


async def close_logged(name: str, aclose: Callable[[], Awaitable[object]]) -> None:
    """Close one part; a failure is logged and swallowed so the stack closes the rest."""
    try:
        await aclose()
    except Exception:
        log.exception("closing %s failed; closing the other services anyway", name)


@contextlib.asynccontextmanager
async def aservices(
    settings: Settings,
    *,
    engine: SpeechEngine | None = None,
    embedder: Embedder | None = None,
    store_factory: StoreFactory = VoiceStore,
    tier_factory: TierFactory = RedisTier,
) -> AsyncIterator[Services]:
    """Load the models (off the event loop), connect the tiers the settings ask for, run the
    tier's background loops; close all of it, in reverse, on exit.

    Injected ``engine`` and ``embedder`` belong to the caller, who closes them; an injected
    engine is used as it is (no loudness target: wrap it in ``LoudnessEngine`` to have one).
    """
    async with contextlib.AsyncExitStack() as stack:
        # Pushed first so it runs last: after the tier's pool is closed, which ends a pub/sub
        # reader that absorbed its cancellation.
        background: list[asyncio.Task[None]] = []
        stack.push_async_callback(close_logged, "background tasks", partial(_astopped, background))

        checks: list[ReadinessCheck] = []
        if embedder is None:
            from .encoder import EncoderWorker, SpeakerEncoder

            encoder = await asyncio.to_thread(SpeakerEncoder.load, device=settings.device)
            embedder = EncoderWorker(encoder, max_batch=settings.encoder_max_batch)
            stack.push_async_callback(close_logged, "speaker encoder", embedder.aclose)
            log.info("speaker encoder %s on %s", encoder.encoder_id, encoder.device)
        if isinstance(embedder, Alive):
            checks.append(ReadinessCheck("encoder", _alive(embedder)))
        loudness = engine is None and settings.loudness
        if engine is None:
            engine = await asyncio.to_thread(
                PiperEngine,
                workers=settings.tts_workers,
                use_cuda=settings.tts_device == "cuda",
                peak_normalize=not loudness,  # the loudness target sets the level instead
                first_audio_s=settings.first_audio_target_s,
                first_cut_words=settings.first_cut_words,
            )
            stack.push_async_callback(close_logged, "speech engine", engine.aclose)
            log.info(
                "speech engine %s at %d Hz on %s", engine.name, engine.sample_rate, engine.device
            )
        if isinstance(engine, Alive):
            checks.append(ReadinessCheck("engine", _alive(engine)))

        embedded = None
        redis_url = settings.redis_url
        if redis_url is None and settings.data_dir:
            candidate = EmbeddedRedis(settings.data_dir)
            redis_url = await candidate.astart()
            if redis_url is not None:
                embedded = candidate
                stack.push_async_callback(close_logged, "embedded redis", embedded.aclose)
        tier = None
        if redis_url:
            tier = tier_factory(redis_url, ttl_s=settings.embedding_ttl_s)
            stack.push_async_callback(close_logged, "redis tier", tier.aclose)
            checks.append(ReadinessCheck("redis", tier.aping, required=False))
            log.info("redis tier at %s", tier.display_url)

        metrics = Metrics()
        matching = engine if isinstance(engine, VoiceMatching) else None
        if tier is not None and settings.rendered_cache and settings.rendered_budget_bytes > 0:
            engine = RenderedSpeech(
                engine,
                tier,
                metrics=metrics,
                ttl_s=settings.rendered_ttl_s,
                budget_bytes=settings.rendered_budget_bytes,
                max_entry_bytes=settings.rendered_max_entry_bytes,
            )
            # Closed before the tier's pool (pushed after it): its last stores land.
            stack.push_async_callback(close_logged, "rendered-audio cache", engine.aclose)
        if loudness:  # outside the rendered cache: its lines are kept before the gain
            engine = LoudnessEngine(
                engine, target_lufs=settings.loudness_lufs, ceiling_dbtp=settings.true_peak_dbtp
            )
            stack.push_async_callback(close_logged, "loudness", engine.aclose)
        store = store_factory(
            embedder,
            l1_capacity=settings.l1_voices,
            tier=tier,
            metrics=metrics,
            max_encoder_jobs=settings.limits.max_encoder_jobs,
        )
        channels: ChannelHub
        if tier is not None and redis_url:  # shared with every server on this Redis
            voices = store

            async def avoice(tenant: str, voice_id: str) -> ResolvedVoice:
                _, resolved = await voices.ause(tenant, voice_id)
                return resolved

            channels = SharedChannels(
                redis_url,
                engine,
                avoice,
                frame_ms=settings.frame_ms,
                max_message_audio_s=settings.limits.max_message_audio_s,
                max_queue=settings.limits.max_queue,
                matching=matching is not None,
            )
        else:
            channels = LocalChannels(
                engine,
                frame_ms=settings.frame_ms,
                max_message_audio_s=settings.limits.max_message_audio_s,
                max_queue=settings.limits.max_queue,
            )
        stack.push_async_callback(close_logged, "channels", channels.aclose)
        services = Services(
            settings,
            metrics,
            store,
            engine,
            tier,
            embedded,
            tenants=TenantDirectory.from_config(settings.tokens, settings.tokens_file),
            tenant_limits=TenantLimits(
                settings.limits,
                tier,
                expiry_s=settings.session_expiry_s,
                refresh_s=settings.session_refresh_s,
            ),
            lobby=Lobby(settings.max_unauthenticated),
            channels=channels,
            checks=tuple(checks),
            matching=matching,
        )
        # After the sockets close (before the tier's pool does): their slots' removals land.
        stack.push_async_callback(close_logged, "tenant limits", services.tenant_limits.aclose)
        stack.push_async_callback(close_logged, "session sockets", services.aclose_sockets)
        if tier is not None:
            metrics.watch_tier(tier)
            background.append(asyncio.create_task(amaintain_tier(services, tier)))
            background.append(asyncio.create_task(tier.alisten_purges(store.purged)))
            background.append(asyncio.create_task(services.tenant_limits.arefresh_forever()))
            stack.push_async_callback(
                close_logged, "background tasks", lambda: _acancel(background)
            )
        yield services


async def amaintain_tier(services: Services, tier: RedisTier) -> None:
    """Probe a tripped breaker, keep pinned voices from expiring, poll Redis memory."""
    settings, store = services.settings, services.store
    loop = asyncio.get_running_loop()
    last_refresh = loop.time()
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
        await store.aflush_records()
        used = await tier.aused_memory()
        if used is not None:
            services.metrics.redis_used_memory.set(used)
        now = loop.time()
        if now - last_refresh >= settings.pin_refresh_s:
            last_refresh = now
            await store.arefresh_pinned()


def _alive(part: Alive) -> Callable[[], Awaitable[bool]]:
    async def aprobe() -> bool:
        return part.alive

    return aprobe


async def _acancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    # redis-py's pub/sub reader can absorb a cancellation; closing the tier's pool (next on
    # the stack) ends it for sure, so wait only briefly here.
    if tasks:
        await asyncio.wait(tasks, timeout=1.0)


async def _astopped(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)
