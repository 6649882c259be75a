"""One WebSocket session: moves frames between its transport and the sans-I/O protocol.

The rules are ``protocol.state.ServerProtocol``'s. The session reads frames in order (with the
hello and idle timeouts), does the slow work a request needs (authentication, the voice store,
rate limits), and sends whatever the protocol has to send, under one lock, in order. The speaking
loop (``live.speaker``), the pinned voice (``live.pinned``) and PCM framing (``live.pcm``) are
units of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from protocol import LivevoiceError, ServerProtocol, SessionState
from protocol.errors import HelloTimeout, IdleTimeout, InternalError, Unauthorized
from protocol.messages import Hello, Ready, Speak, VoiceDelete, VoiceReady, VoiceUse
from protocol.state import CLIP_FORMATS, SAMPLE_RATES, ClipUpload, VoiceRequest

from .audio import canonicalize
from .pinned import PinnedVoice
from .speaker import Speaker
from .text import clean_text
from .values import Purge, ResolvedVoice, VoiceRecord

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What a session needs of its socket (``live.connections.SessionSocket`` in the server)."""

    @property
    def closed(self) -> bool: ...

    async def areceive(self, timeout: float) -> str | bytes | LivevoiceError | None:
        """Text, binary, the typed error of a frame that ends the connection (RFC 6455), or
        None once it ended; ``TimeoutError`` when nothing came in time."""
        ...

    async def send_str(self, data: str) -> None: ...
    async def send_bytes(self, data: bytes) -> None: ...
    async def close(self, *, code: int, message: bytes) -> bool: ...

    def admit(self) -> None:
        """The client authenticated: its frames may be as large as any session's."""
        ...


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the session id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '?'}] {msg}", kwargs


class Session:
    def __init__(self, ws: Transport, services: Services, *, tenant: str | None = None) -> None:
        self.ws = ws
        self.services = services
        self.id = uuid.uuid4().hex[:16]
        self.log = SessionLog(log, {"session": self.id})
        settings = services.settings
        limits = settings.limits
        self.protocol = ServerProtocol(
            max_clip_bytes=limits.max_clip_bytes,
            max_text_chars=limits.max_text_chars,
            max_queue=limits.max_queue,
            sample_rates=SAMPLE_RATES,
            clean_text=clean_text,
        )
        self.voice = PinnedVoice(services.store)
        self.speaker = Speaker(
            self.protocol,
            self.voice,
            services.engine,
            flush=self._aflush,
            frame_ms=settings.frame_ms,
            max_message_audio_s=limits.max_message_audio_s,
            log=self.log,
            on_ttfa=services.metrics.ttfa_seconds.observe,
        )
        self.tenant = "public"
        self._upgrade_tenant = tenant
        """The tenant a token in the HTTP upgrade authenticated (None: hello must carry one)."""
        self._counted = False
        """Whether this session holds one of its tenant's session slots."""
        self._send_lock = asyncio.Lock()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle --------------------------------------------------------------------------
    async def arun(self) -> None:
        speaker = asyncio.create_task(self.speaker.arun(), name=f"speaker-{self.id}")
        metrics = self.services.metrics
        metrics.sessions.inc()
        store = self.services.store
        store.purge_listeners.add(self._on_purge)
        try:
            await self._aread()
        finally:
            metrics.sessions.dec()
            store.purge_listeners.discard(self._on_purge)
            if self._counted:
                self.services.tenant_limits.close_session(self.tenant)
            # Nothing keeps working for a socket that is gone.
            for task in (speaker, *self._tasks):
                task.cancel()
            try:
                await speaker
            except asyncio.CancelledError:
                pass
            except Exception:
                self.log.exception("the speaker ended with an error")
            finally:
                self.voice.release()
            self.log.info("session closed")

    async def _aread(self) -> None:
        limits = self.services.settings.limits
        hello_deadline = time.monotonic() + limits.hello_timeout_s
        while not self.ws.closed and self.protocol.state is not SessionState.CLOSED:
            awaiting_hello = self.protocol.state is SessionState.AWAIT_HELLO
            if awaiting_hello:
                timeout = max(0.0, hello_deadline - time.monotonic())
            else:
                timeout = limits.idle_timeout_s
            try:
                frame = await self.ws.areceive(timeout)
            except TimeoutError:
                if awaiting_hello:
                    await self._areject(HelloTimeout("no hello within the time limit"))
                elif not self.protocol.busy:  # listening to queued speech is not idling
                    await self._areject(
                        IdleTimeout(f"no message for {limits.idle_timeout_s:g} s; closing")
                    )
                continue
            if frame is None:
                return
            if isinstance(frame, LivevoiceError):  # a frame RFC 6455 says ends it
                await self._areject(frame)
                return
            await self._ahandle(frame)

    async def _ahandle(self, frame: str | bytes) -> None:
        try:
            if isinstance(frame, str):
                await self._aon_text(frame)
            else:
                self._on_binary(frame)
        except LivevoiceError as exc:
            self.protocol.reject(exc)
        except Exception:
            self.log.exception("unexpected error handling a frame")
            self.protocol.reject(InternalError("the server failed to handle this frame"))
        await self._aflush()

    async def _areject(self, exc: LivevoiceError) -> None:
        self.protocol.reject(exc)
        await self._aflush()

    async def _aflush(self) -> None:
        """Send what the protocol has to send, in order, unless the socket is gone. A client
        that drops mid-audio is not an error of ours: the frames are lost with the socket, and
        nothing queued is spoken into the void."""
        if not self.protocol.has_data_to_send:
            return  # never wait behind a send held up by a slow reader for nothing
        async with self._send_lock:
            while frames := self.protocol.data_to_send():
                for frame in frames:
                    if self.ws.closed:
                        break
                    try:
                        if isinstance(frame, str):
                            await self.ws.send_str(frame)
                        else:
                            await self.ws.send_bytes(frame)
                    except (ConnectionError, RuntimeError) as exc:
                        # aiohttp raises ClientConnectionResetError (a ConnectionResetError)
                        # or, on a closing transport, RuntimeError: the peer is gone.
                        self.log.info("client went away mid-send: %s", type(exc).__name__)
                        self.protocol.cancel(None)
                        self.speaker.wake()
                        break
            self._count()
        if self.protocol.close_code is not None and not self._closing:
            self._closing = True
            reason = self.protocol.close_reason.encode()
            await self.ws.close(code=self.protocol.close_code, message=reason)

    def _count(self) -> None:
        metrics = self.services.metrics
        for code in self.protocol.errors_sent():
            metrics.errors.labels(code).inc()
        for _, outcome in self.protocol.speaks_ended():
            metrics.messages.labels(outcome).inc()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- dispatch ---------------------------------------------------------------------------
    async def _aon_text(self, data: str) -> None:
        message = self.protocol.receive_text(data)
        if isinstance(message, Hello):
            self._hello(message)
        elif isinstance(message, Speak):
            self.services.tenant_limits.take_speak(self.tenant, message.id)
            self.protocol.accept_speak(message)
        elif isinstance(message, VoiceUse):
            request = self.protocol.newest_voice_request
            assert request is not None
            self._spawn(self._ause(message, request))
        elif isinstance(message, VoiceDelete):
            await self._adelete(message)
        self.speaker.wake()  # a message admitted, or the current one cancelled

    def _on_binary(self, data: bytes) -> None:
        upload = self.protocol.receive_binary(data)
        assert upload.request is not None
        try:
            self.services.tenant_limits.take_registration(self.tenant)
        except LivevoiceError as exc:
            self._voice_failed(upload.request, exc)
            return
        self._spawn(self._aregister(upload, upload.request))

    def _hello(self, hello: Hello) -> None:
        upgraded = self._upgrade_tenant
        if upgraded is None or hello.token is not None:
            self.tenant = self.services.tenants.authenticate(hello.token)
            if upgraded is not None and self.tenant != upgraded:
                raise Unauthorized("the token in hello names another tenant than the upgrade's")
        else:
            self.tenant = upgraded
        self.services.tenant_limits.open_session(self.tenant)
        self._counted = True
        self.ws.admit()  # before ready: a client may send its clip as soon as it reads ready
        self.log.info("hello from %s", (hello.client or "unnamed client")[:80])
        settings = self.services.settings
        formats = {
            "clip": list(CLIP_FORMATS),
            "encoding": ["s16le"],
            "sample_rates": list(SAMPLE_RATES),
            "default_sample_rate": self.services.engine.sample_rate,
            "frame_ms": settings.frame_ms,
        }
        limits = settings.limits.to_wire()
        self.protocol.accept_hello(Ready(session_id=self.id, limits=limits, formats=formats))

    # --- voices -----------------------------------------------------------------------------
    async def _aregister(self, upload: ClipUpload, request: VoiceRequest) -> None:
        """Runs beside the reader: speaks admitted meanwhile wait for this voice (R3, R4)."""
        limits = self.services.settings.limits
        start = time.perf_counter()
        store = self.services.store
        try:
            clip = await asyncio.to_thread(
                canonicalize, upload.data, min_s=limits.min_clip_s, max_s=limits.max_clip_s
            )
            resolved = await store.aresolve(clip)
            record = await store.aremember(self.tenant, resolved, upload.register.name)
        except Exception as exc:
            self._voice_failed(request, exc)
        else:
            self._pin(request, record, resolved, start, quality=clip.quality.to_wire())
        await self._aflush()

    async def _ause(self, use: VoiceUse, request: VoiceRequest) -> None:
        start = time.perf_counter()
        try:
            record, resolved = await self.services.store.ause(self.tenant, use.voice_id)
        except Exception as exc:
            self._voice_failed(request, exc)
        else:
            self._pin(request, record, resolved, start)
        await self._aflush()

    def _voice_failed(self, request: VoiceRequest, exc: Exception) -> None:
        if not isinstance(exc, LivevoiceError):
            self.log.error("voice request failed", exc_info=exc)
            exc = InternalError("the server failed to resolve this voice")
        self.protocol.voice_failed(request, exc)
        self.voice.failed()

    def _pin(
        self,
        request: VoiceRequest,
        record: VoiceRecord,
        resolved: ResolvedVoice,
        start: float,
        *,
        quality: dict[str, Any] | None = None,
    ) -> None:
        self.voice.pin(request, resolved)
        ready = VoiceReady(
            voice_id=record.voice_id,
            source=resolved.source.value,
            ms=round((time.perf_counter() - start) * 1000, 3),
            name=record.name,
            duration_s=round(record.duration_s, 3),
            quality=quality,
        )
        self.protocol.voice_pinned(request, ready)
        self.log.info(
            "voice %s pinned from %s in %.1f ms",
            record.voice_id,
            resolved.source.value,
            resolved.seconds * 1000,
        )

    async def _adelete(self, delete: VoiceDelete) -> None:
        try:
            await self.services.store.adelete(self.tenant, delete.voice_id)
        except Exception as exc:
            if not isinstance(exc, LivevoiceError):
                self.log.exception("deleting a voice failed")
                exc = InternalError("the server failed to delete this voice")
            self.protocol.delete_failed(delete, exc)
            return
        self.log.info("voice %s deleted", delete.voice_id[:40])
        self.protocol.voice_deleted(delete)

    def _on_purge(self, purge: Purge) -> None:
        """A voice was deleted, here or on another server (R6). Matched by tenant and voice id,
        never by content: another tenant deleting the same audio deletes their voice, not ours.
        The protocol orders the frames; a purge this session's own delete caused is answered
        by that delete."""
        if purge.tenant != self.tenant or purge.voice_id is None:
            return
        if self.protocol.purge(purge.voice_id):
            self.voice.release()
            self.speaker.wake()
            self._spawn(self._aflush())
