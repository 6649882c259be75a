"""One WebSocket session: feeds frames to the sans-I/O protocol and acts on what it returns.

The session owns three things: the protocol state, its speech queue, and the voice it pins.
A reader coroutine handles frames in order; one speaker task speaks queued messages in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import WSMsgType

from protocol import AudioFrame, ClipUpload, LivevoiceError, ServerProtocol, SessionState, encode
from protocol.errors import (
    EmptyText,
    HelloTimeout,
    IdleTimeout,
    InternalError,
    NoVoice,
    SynthesisFailed,
    Unauthorized,
    VoiceFailed,
)
from protocol.messages import (
    AudioEnd,
    AudioStart,
    Cancel,
    Cancelled,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Queued,
    Ready,
    Speak,
    VoiceDelete,
    VoiceDeleted,
    VoiceReady,
    VoiceRegister,
    VoiceUse,
)

from .audio import canonicalize, to_s16le
from .connections import SessionSocket
from .queue import SpeakJob, SpeechQueue
from .speech import Resampler
from .text import clean_text
from .voices import Purge, ResolvedVoice, VoiceRecord

if TYPE_CHECKING:
    from .app import Services

log = logging.getLogger(__name__)


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the session id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '?'}] {msg}", kwargs


SAMPLE_RATES = (16000, 22050, 24000, 48000)


class Session:
    def __init__(self, ws: SessionSocket, services: Services, *, tenant: str | None = None) -> None:
        self.ws = ws
        self.services = services
        self.id = uuid.uuid4().hex[:16]
        self.log = SessionLog(log, {"session": self.id})
        limits = services.settings.limits
        self.protocol = ServerProtocol(
            max_clip_bytes=limits.max_clip_bytes,
            max_text_chars=limits.max_text_chars,
            sample_rates=SAMPLE_RATES,
        )
        self.queue = SpeechQueue(limits.max_queue)
        self.tenant = "public"
        self._upgrade_tenant = tenant
        """The tenant a token in the HTTP upgrade authenticated (None: hello must carry one)."""
        self._voice: asyncio.Future[ResolvedVoice] | None = None
        self._pinned: ResolvedVoice | None = None
        self._pinned_id: str | None = None
        """The tenant's voice id of ``_pinned``: deletions are matched by it, never by content
        (another tenant's voice with the same audio is another voice)."""
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._streams = 0
        self._counted = False
        self._deleting = False
        self._purged_here: list[SpeakJob] | None = None
        """Messages dropped when this session's own ``voice.delete`` purged its pinned voice."""
        """Whether this session holds one of its tenant's session slots."""

    # --- lifecycle --------------------------------------------------------------------------
    async def arun(self) -> None:
        speaker = asyncio.create_task(self._aspeak_forever(), name=f"speaker-{self.id}")
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
            self.queue.cancel(None)
            speaker.cancel()
            for task in self._tasks:
                task.cancel()
            try:
                await speaker
            except asyncio.CancelledError:
                pass
            except Exception:
                self.log.exception("the speaker ended with an error")
            finally:
                # Always, whatever the speaker did: a leaked pin keeps a voice in memory forever.
                if self._pinned is not None:
                    self.services.store.unpin(self._pinned.fingerprint)
                    self._pinned = None
            self.log.info("session closed")

    async def _aread(self) -> None:
        limits = self.services.settings.limits
        hello_deadline = time.monotonic() + limits.hello_timeout_s
        while not self.ws.closed:
            awaiting_hello = self.protocol.state is SessionState.AWAIT_HELLO
            if awaiting_hello:
                timeout = max(0.0, hello_deadline - time.monotonic())
            else:
                timeout = limits.idle_timeout_s
            try:
                msg = await self.ws.receive(timeout=timeout)
            except TimeoutError:
                if awaiting_hello:
                    await self._areject(HelloTimeout("no hello within the time limit"))
                    return
                if self.queue.current is not None or len(self.queue):
                    continue  # listening to queued speech is not idling
                await self._areject(
                    IdleTimeout(f"no message for {limits.idle_timeout_s:g} s; closing")
                )
                return
            if msg.type is WSMsgType.TEXT:
                await self._guard(self._aon_text(msg.data))
            elif msg.type is WSMsgType.BINARY:
                await self._guard(self._aon_binary(msg.data))
            elif msg.type is WSMsgType.ERROR:
                if isinstance(msg.data, LivevoiceError):  # a frame RFC 6455 says ends it
                    await self._areject(msg.data)
                else:
                    self.log.info("socket error: %s", self.ws.exception())
                return
            else:  # CLOSE, CLOSING, CLOSED
                return

    async def _guard(self, work: Awaitable[None]) -> None:
        try:
            await work
        except LivevoiceError as exc:
            await self._areject(exc)
        except Exception:
            self.log.exception("unexpected error handling a frame")
            await self._areject(InternalError("the server failed to handle this frame"))

    async def _areject(self, exc: LivevoiceError, request_id: str | None = None) -> None:
        if exc.message_id is None:
            exc.message_id = request_id
        self.services.metrics.errors.labels(exc.code).inc()
        await self.asend(Error(code=exc.code, message=exc.message, id=exc.message_id))
        if exc.close_code is not None:
            await self.ws.close(code=exc.close_code, message=exc.code.encode())

    async def asend(self, message: Message) -> None:
        await self._asend(encode(message))

    async def _asend_bytes(self, data: bytes) -> None:
        await self._asend(data)

    async def _asend(self, data: str | bytes) -> None:
        """Send unless the socket is gone. A client that drops mid-audio is not an error of
        ours: the frame is lost with the socket, and nothing queued is spoken into the void."""
        async with self._send_lock:
            if self.ws.closed:
                return
            try:
                if isinstance(data, str):
                    await self.ws.send_str(data)
                else:
                    await self.ws.send_bytes(data)
            except (ConnectionError, RuntimeError) as exc:
                # aiohttp raises ClientConnectionResetError (a ConnectionResetError) or, on a
                # closing transport, RuntimeError; both mean the peer is gone.
                self.log.info("client went away mid-send: %s", type(exc).__name__)
                self.queue.cancel(None)

    # --- dispatch ---------------------------------------------------------------------------
    async def _aon_text(self, data: str) -> None:
        message = self.protocol.receive_text(data)
        if isinstance(message, Hello):
            await self._ahello(message)
        elif isinstance(message, Speak):
            await self._aspeak(message)
        elif isinstance(message, Cancel):
            await self._acancel(message)
        elif isinstance(message, VoiceUse):
            self._start_voice(self._ause(message))
        elif isinstance(message, VoiceDelete):
            await self._adelete(message)
        elif isinstance(message, Ping):
            await self.asend(Pong(id=message.id))
        elif isinstance(message, VoiceRegister):
            pass  # the clip follows as the next frame

    async def _aon_binary(self, data: bytes) -> None:
        upload = self.protocol.receive_binary(data)
        try:
            self.services.tenant_limits.take_registration(self.tenant)
        except LivevoiceError as exc:
            exc.message_id = upload.register.id
            raise
        self._start_voice(self._aregister(upload))

    async def _ahello(self, hello: Hello) -> None:
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
        await self.asend(
            Ready(
                session_id=self.id,
                limits=settings.limits.to_wire(),
                formats={
                    "clip": ["wav", "flac", "ogg", "mp3"],
                    "encoding": ["s16le"],
                    "sample_rates": list(SAMPLE_RATES),
                    "default_sample_rate": self.services.engine.sample_rate,
                    "frame_ms": settings.frame_ms,
                },
            )
        )

    # --- voices -----------------------------------------------------------------------------
    def _start_voice(self, work: Awaitable[ResolvedVoice]) -> None:
        """Registration runs beside the reader; speaks accepted meanwhile wait for its voice.

        If it fails, those speaks fall back to the voice pinned before (nothing accepted is
        lost); only a session that never had a voice is left without one.
        """
        previous = self._voice

        async def landed() -> ResolvedVoice:
            try:
                return await work
            except Exception:
                if previous is None:
                    raise
                return await asyncio.shield(previous)

        task = asyncio.ensure_future(landed())
        self._tasks.add(task)
        task.add_done_callback(self._voice_landed)
        self._voice = task

    def _voice_landed(self, task: asyncio.Future[ResolvedVoice]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None and self._voice is task:
            self._voice = None
            self.protocol.voice_lost()

    async def _aregister(self, upload: ClipUpload) -> ResolvedVoice:
        limits = self.services.settings.limits
        start = time.perf_counter()
        request = upload.register
        try:
            clip = await asyncio.to_thread(
                canonicalize, upload.data, min_s=limits.min_clip_s, max_s=limits.max_clip_s
            )
            resolved = await self.services.store.aresolve(clip)
            record = await self.services.store.aremember(self.tenant, resolved, request.name)
        except LivevoiceError as exc:
            await self._areject(exc, request.id)
            raise
        await self._apin(record, resolved, start, request.id, quality=clip.quality.to_wire())
        return resolved

    async def _ause(self, use: VoiceUse) -> ResolvedVoice:
        start = time.perf_counter()
        try:
            record, resolved = await self.services.store.ause(self.tenant, use.voice_id)
        except LivevoiceError as exc:
            await self._areject(exc, use.id)
            raise
        await self._apin(record, resolved, start, use.id)
        return resolved

    async def _apin(
        self,
        record: VoiceRecord,
        resolved: ResolvedVoice,
        start: float,
        request_id: str | None,
        *,
        quality: dict[str, Any] | None = None,
    ) -> None:
        """Pin the voice for this session's next messages and say so."""
        store = self.services.store
        store.pin(resolved.fingerprint)
        if self._pinned is not None:
            store.unpin(self._pinned.fingerprint)
        self._pinned = resolved
        self._pinned_id = record.voice_id
        await self.asend(
            VoiceReady(
                voice_id=record.voice_id,
                source=resolved.source.value,
                ms=round((time.perf_counter() - start) * 1000, 3),
                name=record.name,
                duration_s=round(record.duration_s, 3),
                id=request_id,
                quality=quality,
            )
        )
        self.log.info(
            "voice %s pinned from %s in %.1f ms",
            record.voice_id,
            resolved.source.value,
            resolved.seconds * 1000,
        )

    async def _adelete(self, delete: VoiceDelete) -> None:
        self._deleting = True  # this session answers for itself below, not as a bystander
        try:
            await self.services.store.adelete(self.tenant, delete.voice_id)
        except LivevoiceError as exc:
            exc.message_id = exc.message_id or delete.id
            raise
        finally:
            self._deleting = False
        self.log.info("voice %s deleted", delete.voice_id[:40])
        await self._atell_purged(self._purged_here, voice_id=delete.voice_id, request_id=delete.id)
        self._purged_here = None

    def _on_purge(self, purge: Purge) -> None:
        """A voice was deleted (here or on another server): drop it if it is this session's.

        Matched by tenant and voice id, never by content: another tenant deleting the same
        audio deletes their voice, not ours.
        """
        if self._pinned is None or purge.tenant != self.tenant or purge.voice_id != self._pinned_id:
            return
        self.services.store.unpin(self._pinned.fingerprint)
        self._pinned = None
        self._pinned_id = None
        self._voice = None
        self.protocol.voice_lost()
        dropped = self.queue.cancel(None)
        if self._deleting:
            self._purged_here = dropped
            return
        task = asyncio.ensure_future(self._atell_purged(dropped))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _atell_purged(
        self,
        dropped: list[SpeakJob] | None,
        *,
        voice_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """``cancelled`` for each dropped message, then ``voice.deleted``."""
        for job in dropped or []:
            await self.asend(Cancelled(id=job.id))
        await self.asend(VoiceDeleted(voice_id=voice_id, pinned=dropped is not None, id=request_id))

    # --- speech -----------------------------------------------------------------------------
    async def _aspeak(self, speak: Speak) -> None:
        text = clean_text(speak.text)
        if not text:
            raise EmptyText("nothing speakable in this text", message_id=speak.id)
        if self._voice is None:  # the protocol checked has_voice; a purge may have taken it
            raise NoVoice("register or use a voice before speaking", message_id=speak.id)
        self.queue.check(speak.id)
        self.services.tenant_limits.take_speak(self.tenant, speak.id)
        await self.asend(Queued(id=speak.id, position=self.queue.ahead_of_next()))
        self.queue.put(SpeakJob(speak.id, text, speak.sample_rate, self._voice))

    async def _acancel(self, cancel: Cancel) -> None:
        for job in self.queue.cancel(cancel.id):
            self.services.metrics.messages.labels("cancelled").inc()
            await self.asend(Cancelled(id=job.id))

    async def _aspeak_forever(self) -> None:
        while True:
            job = await self.queue.aget()
            try:
                await self._aspeak_one(job)
            except asyncio.CancelledError:
                raise
            except LivevoiceError as exc:
                self.services.metrics.messages.labels("failed").inc()
                exc.message_id = job.id
                await self._areject(exc)
            except Exception:
                self.services.metrics.messages.labels("failed").inc()
                self.log.exception("synthesis failed for message %s", job.id[:64])
                await self._areject(SynthesisFailed("synthesis failed", message_id=job.id))
            finally:
                self.queue.done()

    @staticmethod
    async def _anext_chunk(
        chunks: AsyncGenerator[np.ndarray, None], job: SpeakJob
    ) -> np.ndarray | None:
        """The engine's next chunk, or None at its end or as soon as the job is cancelled."""
        if job.cancelled:
            return None
        nxt = asyncio.ensure_future(anext(chunks))
        stop = asyncio.ensure_future(job.stop.wait())
        try:
            await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not nxt.done():
                # Interrupts the engine where it waits. Work already handed to a model thread
                # finishes there and is dropped; the engine closes itself after it.
                nxt.cancel()
                await asyncio.wait({nxt})  # the generator must be idle before aclose()
        if nxt.cancelled():
            return None
        try:
            chunk = nxt.result()  # retrieved even when cancelled: no "never retrieved" warning
        except StopAsyncIteration:
            return None
        return None if job.cancelled else chunk

    async def _aspeak_one(self, job: SpeakJob) -> None:
        try:
            voice = await asyncio.shield(job.voice)
        except asyncio.CancelledError:
            if job.voice.cancelled():
                raise VoiceFailed("the voice registration was abandoned") from None
            raise
        except Exception:
            raise VoiceFailed("this message's voice could not be registered") from None
        if job.cancelled:
            await self.asend(Cancelled(id=job.id))
            return
        services = self.services
        engine = services.engine
        rate = job.sample_rate or engine.sample_rate
        resampler = Resampler(engine.sample_rate, rate)
        frame_bytes = 2 * max(1, rate * services.settings.frame_ms // 1000)
        # Engine samples this message may produce: a cap on what one message can cost.
        budget = int(services.settings.limits.max_message_audio_s * engine.sample_rate)
        truncated = False
        self._streams += 1
        stream = self._streams
        await self.asend(AudioStart(id=job.id, stream=stream, sample_rate=rate))
        started = time.perf_counter()
        ttfa: float | None = None
        seq = 0
        samples = 0
        pending = b""

        async def flush(data: bytes) -> None:
            nonlocal seq, samples, ttfa
            await self._asend_bytes(AudioFrame(stream, seq, data).encode())
            seq += 1
            samples += len(data) // 2
            if ttfa is None:
                ttfa = time.perf_counter() - started

        chunks = engine.stream(job.text, voice.embedding)
        try:
            while (chunk := await self._anext_chunk(chunks, job)) is not None:
                if len(chunk) > budget:
                    chunk, truncated = chunk[:budget], True
                budget -= len(chunk)
                pending += to_s16le(resampler.feed(chunk))
                while len(pending) >= frame_bytes and not job.cancelled:
                    await flush(pending[:frame_bytes])
                    pending = pending[frame_bytes:]
                if truncated:
                    self.log.info("message %s reached the audio cap", job.id[:64])
                    break
        finally:
            await chunks.aclose()
        if not job.cancelled:
            pending += to_s16le(resampler.feed(np.zeros(0, dtype=np.float32), last=True))
            if pending:
                await flush(pending)
        if ttfa is not None:
            services.metrics.ttfa_seconds.observe(ttfa)
        services.metrics.messages.labels("cancelled" if job.cancelled else "spoken").inc()
        await self.asend(
            AudioEnd(
                id=job.id,
                stream=stream,
                frames=seq,
                samples=samples,
                duration_ms=round(samples * 1000 / rate, 3),
                ttfa_ms=round((ttfa or 0.0) * 1000, 3),
                cancelled=job.cancelled,
                truncated=truncated,
            )
        )
