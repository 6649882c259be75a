"""One WebSocket session: moves frames between its transport and the sans-I/O protocol.

The rules are ``protocol.state.ServerProtocol``'s. The session reads frames in order (with the
hello and idle timeouts), does the slow work a request needs (authentication, the voice store,
rate limits), and sends whatever the protocol has to send, under one lock, in order. The speaking
loop (``live.speaker``), the pinned voice (``live.pinned``) and PCM framing (``live.pcm``) are
units of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from protocol import LivevoiceError, ServerProtocol, SessionState
from protocol.errors import (
    ChannelUnavailable,
    Filtered,
    HelloTimeout,
    IdleTimeout,
    InternalError,
    ListenerTooSlow,
    Unauthorized,
    Unsupported,
)
from protocol.messages import (
    Cancel,
    ChannelClear,
    ChannelFilter,
    ChannelJoin,
    ChannelPause,
    ChannelResume,
    ChannelSkip,
    Hello,
    Played,
    Speak,
    VoiceDelete,
    VoiceRegister,
    VoiceUse,
)
from protocol.state import CHANNEL_CONTROLS, SAMPLE_RATES, Membership

from .channels import Channel, ChannelMessage, Line, Seat
from .loudness import LoudnessEngine
from .pinned import PinnedVoice
from .speaker import Speaker
from .tenants import PUBLIC_TENANT
from .text import clean_text
from .transport import Transport, asend_frames
from .values import Purge, ResolvedVoice
from .voice_requests import VoiceRequests

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger(__name__)


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
        engine = services.engine
        self.voice = PinnedVoice(
            services.store, on_pin=engine.prepare if isinstance(engine, LoudnessEngine) else None
        )
        self.requests = VoiceRequests(
            self.protocol,
            self.voice,
            services.store,
            limits,
            self.log,
            matching=services.matching,
        )
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
        self.tenant = PUBLIC_TENANT
        self._upgrade_tenant = tenant
        """The tenant a token in the HTTP upgrade authenticated (None: hello must carry one)."""
        self._counted = False
        """Whether this session holds one of its tenant's session slots."""
        self._send_lock = asyncio.Lock()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.seat: Seat | None = None
        """This session's place in its channel, once it joined one."""
        self.channel: Channel | None = None
        self.filter_speaks = True
        """Whether this producer's speaks go through the channel's word filter (R17); the
        Speaker.bot endpoint clears it for a request without ``badWordFilter``."""

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
            if self.channel is not None and self.seat is not None:
                self.channel.leave(self.seat)
            store.purge_listeners.discard(self._on_purge)
            if self._counted:
                self.services.tenant_limits.close_session(self.tenant, self.id)
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
                await self._aon_binary(frame)
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
                if not await asend_frames(self.ws, frames):
                    self.log.info("client went away mid-send")
                    self.protocol.cancel(None)
                    self.speaker.wake()
            metrics = self.services.metrics
            for code in self.protocol.errors_sent():
                metrics.errors.labels(code).inc()
            for _, outcome in self.protocol.speaks_ended():
                metrics.messages.labels(outcome).inc()
        if self.protocol.close_code is not None and not self._closing:
            self._closing = True
            reason = self.protocol.close_reason.encode()
            await self.ws.close(code=self.protocol.close_code, message=reason)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Slow work beside the reader (a voice request); what it leaves to send is sent."""

        async def run() -> None:
            await work
            await self._aflush()

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Cancelled before it ran (the session closing): ``work`` was never started; closing
        # it says so, instead of a "never awaited" warning. A no-op once it ran.
        task.add_done_callback(lambda _: work.close())

    # --- dispatch ---------------------------------------------------------------------------
    async def _aon_text(self, data: str) -> None:
        message = self.protocol.receive_text(data)
        if isinstance(message, Hello):
            await self._ahello(message)
        elif isinstance(message, Speak):
            await self.services.tenant_limits.atake_speak(self.tenant, message.id)
            await self._aadmit(message)
        elif isinstance(message, ChannelJoin):
            await self._ajoin(message)
        elif isinstance(message, ChannelFilter) and self.channel is not None:
            await self.channel.afilter(message)  # R17: the protocol checked and answered it
        elif isinstance(message, (*CHANNEL_CONTROLS, Cancel)):
            await self._acontrol(message)
        elif isinstance(message, VoiceUse):
            request = self.protocol.newest_voice_request
            assert request is not None
            self._spawn(self.requests.ause(self.tenant, message, request))
        elif isinstance(message, VoiceRegister) and message.sha256 is not None:
            # R2: no clip follows; like voice.use it decodes nothing and computes nothing, so
            # it takes no registration token.
            request = self.protocol.newest_voice_request
            assert request is not None
            self._spawn(self.requests.aregister_sent(self.tenant, message, request))
        elif isinstance(message, VoiceDelete):
            await self.requests.adelete(self.tenant, message)
        elif isinstance(message, Played):
            self._on_played(message)
            return  # a position changes nothing of this session's own speech
        self.speaker.wake()  # a message admitted, or the current one cancelled

    async def _aon_binary(self, data: bytes) -> None:
        upload = self.protocol.receive_binary(data)
        assert upload.request is not None
        try:
            await self.services.tenant_limits.atake_registration(self.tenant)
        except LivevoiceError as exc:
            self.requests.failed(upload.request, exc)
            return
        self._spawn(self.requests.aregister(self.tenant, upload, upload.request))

    async def _ahello(self, hello: Hello) -> None:
        upgraded = self._upgrade_tenant
        if upgraded is None or hello.token is not None:
            self.tenant = self.services.tenants.authenticate(hello.token)
            if upgraded is not None and self.tenant != upgraded:
                raise Unauthorized("the token in hello names another tenant than the upgrade's")
        else:
            self.tenant = upgraded
        await self.services.tenant_limits.aopen_session(self.tenant, self.id)
        self._counted = True
        self.ws.admit()  # before ready: a client may send its clip as soon as it reads ready
        self.log.info("hello from %s", (hello.client or "unnamed client")[:80])
        settings = self.services.settings
        self.protocol.accept_hello(
            session_id=self.id,
            limits=settings.limits.to_wire(),
            default_sample_rate=self.services.engine.sample_rate,
            frame_ms=settings.frame_ms,
        )

    # --- channels ---------------------------------------------------------------------------
    async def _ajoin(self, join: ChannelJoin) -> None:
        hub = self.services.channels
        if hub is None:
            raise Unsupported("this server serves no channels", message_id=join.id)
        rate = join.sample_rate or self.services.engine.sample_rate
        # With its marks (R19) already: what a resume replays is offered before the join's answer.
        membership = Membership(join.channel, join.role, rate, marks=bool(join.marks))
        seat = Seat(
            self.protocol,
            membership,
            flush=self._aflush,
            kick=lambda: self._spawn(self._aflush()),
            on_cut_loose=self._cut_loose,
        )
        resume = None
        if join.resume_message is not None and join.resume_seq is not None:
            resume = (join.resume_message, join.resume_seq)
        # Seated before joined is answered: what the channel replays (R18) and offers from now
        # waits in the seat, which sends only once the answer has gone.
        self.channel, resumed = await hub.ajoin(self.tenant, join.channel, seat, resume)
        self.seat = seat
        seat.membership = self.protocol.join_channel(join, sample_rate=rate, resumed=resumed)
        seat.start()
        self.log.info("joined channel %s to %s", join.channel, join.role)

    async def _aadmit(self, speak: Speak) -> None:
        """A speak the protocol and the tenant's limits admitted: into this session's queue, or
        its channel's (R13), where its voice resolves beside the queue."""
        if self.channel is None or self.seat is None:
            self.protocol.accept_speak(speak)
            return
        rules = self.channel.word_filter
        if rules is not None and self.filter_speaks:  # R17, on the cleaned text
            text = rules.apply(speak.text)
            if text is None:
                raise Filtered("the channel's word filter drops this message", message_id=speak.id)
            speak = dataclasses.replace(speak, text=text)
        line = Line(
            speak.id,
            speak.text,
            # A pending registration's id is not known yet: such a message is not matched.
            voice=speak.voice_id or self.protocol.pinned_voice_id,
            user=speak.user,
            kind=speak.kind,
            priority=speak.priority or 0,
            interrupt=bool(speak.interrupt),
            expire_s=speak.expire_s,
        )
        position = await self.channel.aadmit(line)
        job = self.protocol.accept_speak(speak, position=position)
        if speak.voice_id is not None:  # R16: a voice of its own, resolved beside the queue
            voice = asyncio.ensure_future(self._amessage_voice(speak.voice_id))
        else:
            voice = asyncio.ensure_future(self.voice.avoice_of(self.protocol, job))
        voice.add_done_callback(_retrieved)
        self.channel.put(ChannelMessage(line, self.seat, job, voice))

    async def _amessage_voice(self, voice_id: str) -> ResolvedVoice:
        """A channel message's own voice (R16), without pinning it: ``voice_not_found`` for an
        id this tenant does not have ends that message alone."""
        try:
            _, resolved = await self.services.store.ause(self.tenant, voice_id)
        except LivevoiceError:
            raise
        except Exception as exc:
            self.log.error("failed to resolve a message's voice", exc_info=exc)
            raise InternalError("the server failed to resolve this message's voice") from exc
        if self.services.matching is None:  # an engine that does not match takes no profile
            return dataclasses.replace(resolved, profile=None)
        return resolved

    async def _acontrol(
        self, message: ChannelPause | ChannelResume | ChannelSkip | ChannelClear | Cancel
    ) -> None:
        """The protocol checked the role (R13); a cancel also reaches this session's own
        messages in its channel."""
        channel, seat = self.channel, self.seat
        if channel is None or seat is None:
            return  # a cancel outside a channel: the protocol handled it
        try:
            await self._acontrol_channel(channel, seat, message)
        except ChannelUnavailable as exc:  # answered for the request it was
            raise ChannelUnavailable(exc.message, message_id=message.id) from exc

    async def _acontrol_channel(
        self,
        channel: Channel,
        seat: Seat,
        message: ChannelPause | ChannelResume | ChannelSkip | ChannelClear | Cancel,
    ) -> None:
        if isinstance(message, Cancel):
            if seat.membership.speaks:
                await channel.acancel(seat, message.id)
        elif isinstance(message, ChannelPause):
            await channel.apause()
        elif isinstance(message, ChannelResume):
            await channel.aresume()
        elif isinstance(message, ChannelSkip):
            await channel.askip()
        else:
            await channel.aclear()

    def _on_played(self, played: Played) -> None:
        """A listener's playback position (R20; the protocol checked it is a listener): to
        the channel's other listeners, unless it is dropped (too soon after the last one, or
        a stream this listener did not hear)."""
        relay = self.protocol.played(played, time.monotonic())
        if relay is not None and self.channel is not None and self.seat is not None:
            self.channel.played(self.seat, *relay)

    def _cut_loose(self) -> None:
        """The channel let this listener go (it fell too far behind): say so and close; the
        session's send waits for the client alone, never for the channel."""
        self.protocol.reject(
            ListenerTooSlow("this listener fell too far behind its channel; join again")
        )
        self._spawn(self._aflush())

    def _on_purge(self, purge: Purge) -> None:
        """A voice was deleted, here or on another server (R6). Matched by tenant and voice id,
        never by content: another tenant deleting the same audio deletes their voice, not ours.
        The protocol orders the frames; a purge this session's own delete caused is answered
        by that delete."""
        if purge.tenant != self.tenant or purge.voice_id is None:
            return
        if self.channel is not None:  # R16: messages waiting in that voice go with it
            self.channel.purge(purge.voice_id)
        if self.protocol.purge(purge.voice_id):
            self.voice.release()
            self.speaker.wake()
            self._spawn(self._aflush())  # the frames R6 queued


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A channel message's voice that failed after the message was dropped is not an error
    nobody saw: the message's own ending said what happened."""
    if not future.cancelled():
        future.exception()
