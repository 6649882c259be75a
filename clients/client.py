"""An async client for the livevoice protocol, on aiohttp's WebSocket and ``protocol/`` alone.

One reader task per socket feeds what the server sends to a :class:`protocol.ClientProtocol`,
which says what each frame means (a speak queued, started, given audio, ended or failed; a voice
request answered or failed; a pong) and checks the server's promises (frames numbered without a
gap, ``audio.end`` counting what arrived). Voice requests carry ids, so several can be in flight:
each is answered as it completes.

**Reconnect.** When the socket drops, everything in flight on it fails with
:class:`ConnectionLost` — nothing is re-sent, because a message may already have been partly
spoken and only the caller knows whether to say it again. The client then reconnects with
bounded, jittered exponential backoff, says hello again and re-pins its voice with ``voice.use``
and the id from the last ``voice.ready``. If the server no longer knows that id
(``voice_not_found``: a restarted server with an in-process voice directory) it uploads the clip it
kept from :meth:`LivevoiceClient.aregister` again. Calls made while reconnecting wait for it.

**Listening resumes.** A channel listener keeps :attr:`LivevoiceClient.listen_position`: the
channel's key of the last message heard and the message's sequence number of its last frame
(``resumed_from + seq``), as received, or as the caller reports it played
(``played_reports=True`` and :meth:`LivevoiceClient.played`). Every join after a drop passes it
back (``resume_message``, ``resume_seq``), so the server can replay what followed from its
buffer of recent audio; :attr:`LivevoiceClient.resumed` is its answer.

**Unavailable is not absent.** ``voice_unavailable`` (the server's voice store did not answer)
never makes the client forget a voice: :meth:`LivevoiceClient.ause` and the re-pin after a
reconnect try again with backoff, and the voice id is kept for the next reconnect either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import aiohttp

from protocol import PROTOCOL_VERSION, AudioFrame, ClientProtocol, LivevoiceError
from protocol.client import (
    ChannelHeardEnded,
    ChannelHeardStarted,
    ChannelJoinAnswered,
    ChannelStateChanged,
    Event,
    HeardMarks,
    HelloRefused,
    PongReceived,
    PositionHeard,
    SessionReady,
    SpeechAudio,
    SpeechEnded,
    SpeechFailed,
    SpeechQueued,
    SpeechStarted,
    Unmatched,
    VoiceAnswered,
    VoiceLost,
    VoiceRequestFailed,
    error_code,
    error_from_wire,
)
from protocol.errors import (
    ClipNeeded,
    ClipTooLarge,
    Unauthorized,
    Unsupported,
    VoiceNotFound,
    VoiceUnavailable,
    all_codes,
)
from protocol.messages import (
    AudioEnd,
    AudioMarks,
    AudioStart,
    Cancel,
    ChannelClear,
    ChannelJoin,
    ChannelJoined,
    ChannelPause,
    ChannelResume,
    ChannelSkip,
    Hello,
    Message,
    Ping,
    Played,
    Queued,
    Ready,
    Speak,
    VoiceDelete,
    VoiceDeleted,
    VoiceReady,
    VoiceRegister,
    VoiceUse,
)
from protocol.state import CLIP_FORMATS

log = logging.getLogger(__name__)

CLIENT_NAME = "livevoice-python/0.1"
# Close codes after which trying again cannot help (see the error table in protocol/SPEC.md).
FATAL_CLOSE_CODES = frozenset(
    cls.close_code
    for cls in all_codes().values()
    if cls.close_code is not None and not cls.retryable
)
"""Close codes after which reconnecting cannot help (unauthorized, protocol violations)."""


class ConnectionLost(ConnectionError):
    """The socket dropped while this request was in flight; it was not re-sent.

    Deliberately not a ``LivevoiceError``: those are wire errors with a code the server sends.
    """


class ClientClosed(ConnectionError):
    """The client was closed, or gave up reconnecting."""


class VoiceRestoreFailed(ConnectionError):
    """After a reconnect the voice could not be pinned again yet; the next try will."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial * factor**n`` capped at ``maximum``, each scaled by a random
    factor in ``[1 - jitter, 1]`` so that many clients dropped at once do not return in step."""

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None
    """Give up (and fail every later call with ``ClientClosed``) after this many failed tries."""

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor**attempt)
        return base * (1.0 - self.jitter * random.random())


@dataclass(frozen=True, slots=True)
class ListenPosition:
    """Where a channel listener is: what it passes back in ``channel.join`` to resume (R18)."""

    message: str
    """The channel's key of the message (``audio.start``'s ``message``)."""
    seq: int
    """The message's sequence number of the last frame (``resumed_from`` + the frame's ``seq``);
    -1 when none of it."""


@dataclass(frozen=True, slots=True)
class HeardAudio(SpeechAudio):
    """One audio frame of a channel's message heard as a listener, with its place in the
    message (None when the server names no message key: it cannot resume)."""

    position: ListenPosition | None = None


ChannelEvent = (
    ChannelHeardStarted
    | HeardMarks
    | HeardAudio
    | ChannelHeardEnded
    | ChannelStateChanged
    | PositionHeard
)
"""What a channel listener hears (:attr:`LivevoiceClient.heard`). A started message's
``start`` carries ``message``, ``replayed``, ``resumed_from`` and ``marks``; a listener that
joined with ``marks=True`` gets each stream's ``audio.marks`` (:class:`HeardMarks`) before the
frames they describe; :class:`PositionHeard` is another listener's playback position."""


@dataclass(frozen=True, slots=True)
class SpeechResult:
    """How one ``speak`` ended: the ``audio.end`` fields and all of its PCM."""

    id: str
    stream: int | None
    """``None`` when the message was dropped (``cancelled``) before any audio."""
    sample_rate: int | None
    frames: int
    samples: int
    duration_ms: float
    ttfa_ms: float
    cancelled: bool
    pcm: bytes
    """Signed 16-bit little-endian mono samples at ``sample_rate``."""


class Utterance:
    """One accepted ``speak``: iterate it for PCM as it arrives, or await :meth:`aresult`."""

    def __init__(self, message_id: str) -> None:
        self.id = message_id
        self.queued: Queued | None = None
        self.start: AudioStart | None = None
        self.end: AudioEnd | None = None
        self.marks: list[AudioMarks] = []
        """``audio.marks`` of a speak sent with ``marks=True``, in order (R19)."""
        self._chunks: list[bytes] = []
        self._grew = asyncio.Event()
        self._queued_fut: asyncio.Future[Queued] = asyncio.get_running_loop().create_future()
        self._done: asyncio.Future[SpeechResult] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self._done.done()

    def __repr__(self) -> str:
        return f"<Utterance {self.id!r} frames={len(self._chunks)} done={self.done}>"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """PCM of each audio frame, in order. Raises the message's error if it failed."""
        i = 0
        while True:
            grew = self._grew
            while i < len(self._chunks):
                yield self._chunks[i]
                i += 1
            if self._done.done():
                self._done.result()  # raises the failure, if any
                return
            await grew.wait()

    async def aresult(self) -> SpeechResult:
        """Waits for ``audio.end`` (or ``cancelled``) and returns it with all the PCM."""
        return await asyncio.shield(self._done)

    # --- fed by the client's reader ---------------------------------------------------------
    def _signal(self) -> None:
        grew, self._grew = self._grew, asyncio.Event()
        grew.set()

    def _on_event(self, event: Event) -> None:
        """One event of this speak from the client's ``ClientProtocol``."""
        if isinstance(event, SpeechQueued):
            assert isinstance(event.message, Queued)
            self.queued = event.message
            if not self._queued_fut.done():
                self._queued_fut.set_result(event.message)
        elif isinstance(event, SpeechStarted):
            assert isinstance(event.message, AudioStart)
            self.start = event.message
        elif isinstance(event, SpeechAudio):
            if not self._done.done():
                self._chunks.append(event.pcm)
                self._signal()
        elif isinstance(event, HeardMarks):
            self.marks.append(event.marks)
        elif isinstance(event, SpeechEnded):
            self.end = event.end
            self._finish(event)
        elif isinstance(event, SpeechFailed):
            self._fail(event.error)

    def _finish(self, ended: SpeechEnded) -> None:
        end = ended.end
        if end is None:  # dropped before any audio
            result = SpeechResult(self.id, None, None, 0, 0, 0.0, 0.0, True, b"")
        else:
            result = SpeechResult(
                id=self.id,
                stream=end.stream,
                sample_rate=ended.sample_rate,
                frames=end.frames,
                samples=end.samples,
                duration_ms=end.duration_ms,
                ttfa_ms=end.ttfa_ms,
                cancelled=end.cancelled,
                pcm=b"".join(self._chunks),
            )
        if not self._done.done():
            self._done.set_result(result)
        self._signal()

    def _fail(self, exc: BaseException) -> None:
        if not self._queued_fut.done():
            self._queued_fut.set_exception(exc)
            self._queued_fut.exception()  # retrieved: aspeak may have stopped waiting
        if not self._done.done():
            self._done.set_exception(exc)
            self._done.exception()  # nobody may ever ask for it
        self._signal()


class LivevoiceClient:
    """A session with a livevoice server that survives dropped sockets.

    ::

        async with LivevoiceClient("ws://127.0.0.1:8765/ws") as client:
            await client.aregister(Path("me.wav").read_bytes(), name="me")
            utterance = await client.aspeak("Hello chat!")
            async for pcm in utterance:
                play(pcm)
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        client_name: str = CLIENT_NAME,
        reconnect: bool = True,
        backoff: Backoff = Backoff(),
        timeout: float = 30.0,
        played_reports: bool = False,
    ) -> None:
        self.url = url
        self.token = token
        self.client_name = client_name
        self.reconnect = reconnect
        self.backoff = backoff
        self.timeout = timeout
        """Bound on each wait for an answer (ready, voice.ready, queued, pong) or a reconnect."""
        self.ready: Ready | None = None
        self.voice: VoiceReady | None = None
        """The voice pinned by the last ``aregister`` / ``ause``; re-pinned on reconnect."""
        self.reconnects = 0
        """Sessions opened after a drop."""
        self.clip_uploads = 0
        """Clips sent (``aregister`` by ``sha256`` sends one only on ``clip_needed``)."""
        self.clip_reuploads = 0
        """Reconnects where the server no longer knew the voice id and the clip was sent again."""
        self.voice_retries = 0
        """``voice.use`` answers of ``voice_unavailable`` retried (the voice was kept)."""
        self._clip: tuple[str, bytes, str | None, str | None] | None = None
        """Voice id, clip, name and format of the last registration: the reconnect fallback."""
        self._match: bool | None = None
        """The pinned voice's ``match`` (None: the server's default, matched), kept for
        reconnects; changed only once a request with another one pinned its voice."""
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._online = asyncio.Event()
        self._fatal: BaseException | None = None
        self._closing = False
        self._send_lock = asyncio.Lock()
        self._ready_fut: asyncio.Future[Ready] | None = None
        self._wire = ClientProtocol()
        """What is in flight on the current socket, and what its frames mean."""
        self._voice_calls: dict[str, asyncio.Future[VoiceReady | VoiceDeleted]] = {}
        self._pings: dict[str, asyncio.Future[None]] = {}
        self.channel: ChannelJoin | None = None
        """The channel joined, joined again after a reconnect."""
        self._joins: dict[str, asyncio.Future[ChannelJoined]] = {}
        self.played_reports = played_reports
        """True: the caller reports what it played (:meth:`played`), and only that moves
        :attr:`listen_position`; False: every frame received moves it."""
        self.listen_position: ListenPosition | None = None
        """The last frame of a channel heard (received, or reported played): passed back in every
        join after a drop so the channel resumes from there."""
        self.resumed: bool | None = None
        """The last ``channel.joined``'s answer to a resume: True, what followed that position is
        replayed; False, it is gone and the channel is heard from now; None, none was asked
        (or the server does not resume)."""
        self._heard_streams: dict[int, tuple[str | None, int]] = {}
        """This socket's listener streams: the message key and ``resumed_from`` of each."""
        self.heard: asyncio.Queue[ChannelEvent] = asyncio.Queue()
        """What a channel listener hears, in order: each message's start (its text, user and
        kind), its audio, its end; and the queue's state. Unbounded: a listener reads it."""
        self._utterances: dict[str, Utterance] = {}

    # --- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> LivevoiceClient:
        await self.aconnect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def connected(self) -> bool:
        return self._online.is_set() and self._fatal is None

    async def aconnect(self) -> Ready:
        """Opens the first session. A failure here raises at once; only later drops reconnect."""
        if self._supervisor is not None:
            raise RuntimeError("already connected")
        self._http = aiohttp.ClientSession()
        try:
            ready = await self._aopen(restore=False)
        except BaseException:
            await self._http.close()
            self._http = None
            raise
        self._supervisor = asyncio.create_task(self._asupervise(), name="livevoice-supervisor")
        return ready

    async def aclose(self) -> None:
        self._closing = True
        self._fatal = self._fatal or ClientClosed("the client was closed")
        self._online.set()  # wake callers waiting for a reconnect; they see _fatal
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._adrop_socket()
        self._fail_in_flight(ClientClosed("the client was closed"))
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def aclosed(self) -> BaseException:
        """Waits until the client stops for good — closed, or given up reconnecting (a refused
        token, ``max_attempts``) — and returns why. A listener waits on it beside :attr:`heard`,
        which a stopped client never fills again."""
        if self._supervisor is not None:
            await asyncio.wait([self._supervisor])
        return self._fatal or ClientClosed("the client was closed")

    # --- requests -------------------------------------------------------------------------------
    async def aregister(
        self,
        clip: bytes,
        name: str | None = None,
        format: str | None = None,
        *,
        match: bool | None = None,
        by_sha256: bool = True,
    ) -> VoiceReady:
        """Uploads a reference clip and pins its voice. The bytes are kept for reconnects.
        ``match=False``: speak in the engine's own voice, not matched to the clip.

        ``by_sha256`` (the default): first ask by the SHA-256 of the bytes alone, and upload
        them only when the server answers ``clip_needed`` — a clip this tenant registered
        before (from this process or any other) is answered without sending ~1 MB again, a
        new one costs one extra round trip. Only with a server whose ``ready.features`` lists
        ``register_sha256``; an older one gets the upload. :attr:`clip_uploads` counts the
        uploads."""
        if format is not None and format not in CLIP_FORMATS:
            # Checked here: the server would answer twice (unsupported, then unexpected_binary).
            raise Unsupported(f"clip format {format!r} is not one of {', '.join(CLIP_FORMATS)}")
        await self._await_online()
        limit = self.ready.limits.get("max_clip_bytes") if self.ready else None
        if isinstance(limit, int) and len(clip) > limit:
            raise ClipTooLarge(f"the clip is {len(clip)} bytes; this server takes {limit}")
        ready = await self._aregister(clip, name, format, match, by_sha256=by_sha256)
        self._clip = (ready.voice_id, clip, name, format)
        self._match = match
        return ready

    async def ause(self, voice_id: str, *, match: bool | None = None) -> VoiceReady:
        """Pins a voice this tenant registered before, by id (``match`` as for :meth:`aregister`).

        ``voice_unavailable`` is retried with backoff for up to ``timeout`` seconds, then raised;
        ``voice_not_found`` is final.
        """
        await self._await_online()
        ready = await self._ause_retrying(voice_id, match)
        self._match = match
        self.voice = ready
        return ready

    async def _ause_retrying(self, voice_id: str, match: bool | None) -> VoiceReady:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        attempt = 0
        while True:
            try:
                ready = await self._avoice_request(VoiceUse(voice_id=voice_id, match=match))
            except VoiceUnavailable:
                delay = self.backoff.delay(attempt)
                if loop.time() + delay > deadline:
                    raise
                self.voice_retries += 1
                log.info("voice store unavailable for %s; retrying in %.2f s", voice_id, delay)
                await asyncio.sleep(delay)
                attempt += 1
                continue
            assert isinstance(ready, VoiceReady)
            return ready

    async def adelete(self, voice_id: str) -> VoiceDeleted:
        """Deletes a voice of this tenant everywhere. It is not re-pinned or re-uploaded later."""
        await self._await_online()
        self._forget(voice_id)
        deleted = await self._avoice_request(VoiceDelete(voice_id=voice_id))
        assert isinstance(deleted, VoiceDeleted)
        return deleted

    async def ajoin(
        self,
        channel: str,
        role: str,
        *,
        sample_rate: int | None = None,
        resume: ListenPosition | None = None,
        marks: bool = False,
    ) -> ChannelJoined:
        """Joins the tenant's ``channel`` to ``speak``, ``listen`` or ``both`` (once per
        session; joined again after a reconnect, resuming from :attr:`listen_position`). A
        listener reads :attr:`heard`; ``resume`` is a position kept from an earlier client
        (another process, a restart) to resume from now; ``marks``: each stream heard carries
        ``audio.marks`` (R19)."""
        await self._await_online()
        if resume is not None:
            self.listen_position = resume
        join = ChannelJoin(
            channel=channel, role=role, sample_rate=sample_rate, marks=True if marks else None
        )
        joined = await self._ajoin(join)
        self.channel = join
        return joined

    def played(self, position: ListenPosition) -> None:
        """A player says it has played up to ``position`` (a :class:`HeardAudio`'s), so that a
        rejoin resumes after what was heard, not after what was merely received."""
        self.listen_position = position

    async def areport_played(self, stream: int, samples: int) -> None:
        """Tells the server this listener has played ``samples`` of its ``stream`` (R20), so
        the channel's other listeners (an avatar bridge) follow what is actually heard. A few
        times a second is plenty: the server relays at most one per 100 ms."""
        await self._await_online()
        await self._asend(Played(stream=stream, samples=samples))

    async def _ajoin(self, join: ChannelJoin) -> ChannelJoined:
        join_id = uuid.uuid4().hex[:8]
        position = self.listen_position
        if join.role != "speak" and position is not None:  # R18: only a listener resumes
            join = dataclasses.replace(
                join, resume_message=position.message, resume_seq=position.seq
            )
        done: asyncio.Future[ChannelJoined] = asyncio.get_running_loop().create_future()
        self._joins[join_id] = done
        try:
            await self._asend(dataclasses.replace(join, id=join_id))
            joined = await asyncio.wait_for(asyncio.shield(done), self.timeout)
        finally:
            self._joins.pop(join_id, None)
        self.resumed = joined.resumed
        if joined.resumed is not None:
            log.info("rejoined %s: resumed=%s from %s", join.channel, joined.resumed, position)
        return joined

    async def acontrol(self, control: str) -> None:
        """A queue control of the channel joined to speak: ``pause`` (after the current
        message), ``resume``, ``skip`` (the current message) or ``clear`` (what waits)."""
        messages: dict[str, type[Message]] = {
            "pause": ChannelPause,
            "resume": ChannelResume,
            "skip": ChannelSkip,
            "clear": ChannelClear,
        }
        await self._await_online()
        await self._asend(messages[control]())

    async def aspeak(
        self,
        text: str,
        *,
        id: str | None = None,
        sample_rate: int | None = None,
        user: str | None = None,
        kind: str | None = None,
        marks: bool = False,
    ) -> Utterance:
        """Sends ``speak`` and returns once the server queued it (or raises its error). In a
        channel, ``user`` and ``kind`` reach its listeners; the utterance ends with the
        message's completion, without audio (listeners hear it). ``marks``: its own stream
        carries ``audio.marks`` (:attr:`Utterance.marks`)."""
        message_id = id if id is not None else uuid.uuid4().hex[:12]
        await self._await_online()
        utterance = Utterance(message_id)
        try:
            async with self._send_lock:
                # DuplicateId while one with this id is in flight: answers carry only the id.
                self._wire.send_speak(
                    Speak(
                        id=message_id,
                        text=text,
                        sample_rate=sample_rate,
                        user=user,
                        kind=kind,
                        marks=True if marks else None,
                    )
                )
                self._utterances[message_id] = utterance
                await self._aflush_locked()
            await asyncio.wait_for(asyncio.shield(utterance._queued_fut), self.timeout)
        except BaseException:
            # Rejected, or we stopped waiting before queued: either way it is not tracked further.
            if self._utterances.get(message_id) is utterance and utterance.queued is None:
                self._utterances.pop(message_id, None)
            raise
        return utterance

    async def acancel(self, id: str | None = None) -> None:
        """Cancels one message, or the current one and everything queued. The outcome arrives on
        each utterance (``cancelled`` results)."""
        await self._await_online()
        await self._asend(Cancel(id=id))

    async def aping(self) -> float:
        """Round-trip time in seconds."""
        await self._await_online()
        ping_id = uuid.uuid4().hex[:8]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = fut
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await self._asend(Ping(id=ping_id))
            await asyncio.wait_for(fut, self.timeout)
        finally:
            self._pings.pop(ping_id, None)
        return loop.time() - start

    # --- connection -----------------------------------------------------------------------------
    async def _aopen(self, *, restore: bool) -> Ready:
        """Connects, says hello and (after a drop) re-pins the voice; then lets callers in."""
        assert self._http is not None
        try:
            ws = await self._aconnect_socket()
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                # The token was refused at the upgrade: the same answer hello would give.
                raise Unauthorized("the server refused this token") from exc
            raise
        self._ws = ws
        self._wire = ClientProtocol()
        self._heard_streams = {}  # stream numbers start again with each session
        self._ready_fut = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._aread(ws), name="livevoice-reader")
        try:
            hello = Hello(token=self.token, client=self.client_name, protocol=PROTOCOL_VERSION)
            async with self._send_lock:
                self._wire.send_hello(hello)
                await self._aflush_locked()
            self.ready = await asyncio.wait_for(asyncio.shield(self._ready_fut), self.timeout)
            if restore:
                try:
                    await self._arestore_voice()
                except LivevoiceError as exc:
                    # Not the session's refusal: the voice could not be pinned yet.
                    raise VoiceRestoreFailed(f"{error_code(exc)}: {exc.message}") from exc
                if self.channel is not None:
                    await self._ajoin(self.channel)
        except BaseException:
            await self._adrop_socket()
            raise
        self._online.set()
        return self.ready

    async def _aconnect_socket(self) -> aiohttp.ClientWebSocketResponse:
        assert self._http is not None
        return await asyncio.wait_for(
            self._http.ws_connect(
                self.url,
                max_msg_size=0,
                compress=0,
                autoping=True,
                heartbeat=15.0,
                # Authenticated at the upgrade: the full frame limit applies from the first
                # frame, and the server's cap on unauthenticated sockets never counts us.
                headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
            ),
            self.timeout,
        )

    def _forget(self, voice_id: str | None) -> None:
        """Drops a deleted voice (``None``: the pinned one) so that no reconnect brings it back."""
        if self.voice is not None and voice_id in (None, self.voice.voice_id):
            self.voice = None
        if self._clip is not None and voice_id in (None, self._clip[0]):
            self._clip = None

    async def _arestore_voice(self) -> None:
        if self.voice is None:
            return
        voice_id = self.voice.voice_id
        try:
            # VoiceUnavailable after the retries propagates: the reconnect loop tries again
            # later, still holding the voice.
            self.voice = await self._ause_retrying(voice_id, self._match)
        except VoiceNotFound:
            if self._clip is None or self._clip[0] != voice_id:
                # Nothing to upload: go on without a voice; speak answers no_voice until one is set.
                log.warning("server no longer knows voice %s and no clip is kept", voice_id)
                self.voice = None
                return
            log.warning("server no longer knows voice %s; uploading the clip again", voice_id)
            self.clip_reuploads += 1
            await self._aregister(*self._clip[1:], self._match)

    async def _asupervise(self) -> None:
        """Waits for the socket to end, then reconnects until it works or the client gives up."""
        while not self._closing:
            assert self._reader is not None
            await asyncio.wait([self._reader])
            if self._closing:
                return
            if not self.reconnect or self._fatal is not None:
                self._give_up(self._fatal or ClientClosed("the connection dropped"))
                return
            attempt = 0
            while not self._closing:
                delay = self.backoff.delay(attempt)
                log.info("connection lost; reconnecting in %.2f s (try %d)", delay, attempt + 1)
                await asyncio.sleep(delay)
                try:
                    await self._aopen(restore=True)
                except (OSError, aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                    log.info("reconnect failed: %s", exc)
                except VoiceRestoreFailed as exc:
                    # Busy, rate limited or Redis unavailable while re-pinning: try again later.
                    log.info("voice not restored yet: %s", exc)
                except LivevoiceError as exc:
                    # The session itself was refused (hello): the error says if a retry can help.
                    if not exc.retryable:
                        self._give_up(exc)
                        return
                    log.info("reconnect refused: %s: %s", error_code(exc), exc.message)
                else:
                    self.reconnects += 1
                    log.info("reconnected (session %s)", self.ready and self.ready.session_id)
                    break
                attempt += 1
                if self.backoff.max_attempts is not None and attempt >= self.backoff.max_attempts:
                    self._give_up(ClientClosed(f"gave up reconnecting after {attempt} tries"))
                    return

    def _give_up(self, exc: BaseException) -> None:
        self._fatal = exc
        self._online.set()
        self._fail_in_flight(exc)

    async def _await_online(self) -> None:
        if self._supervisor is None and self._fatal is None:
            raise RuntimeError("call aconnect() first (or use 'async with')")
        if not self._online.is_set():
            await asyncio.wait_for(self._online.wait(), self.timeout * 2)
        if self._fatal is not None:
            raise ClientClosed(f"the client is not connected: {self._fatal}") from self._fatal

    async def _adrop_socket(self) -> None:
        if self._fatal is None:
            self._online.clear()
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _asend(self, message: Message) -> None:
        async with self._send_lock:
            self._wire.send(message)
            await self._aflush_locked()

    async def _aflush_locked(self) -> None:
        """Send what the wire has to send, in order (a clip right behind its register)."""
        frames = self._wire.data_to_send()
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionLost("not connected")
        try:
            for frame in frames:
                if isinstance(frame, str):
                    await ws.send_str(frame)
                else:
                    await ws.send_bytes(frame)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise ConnectionLost(f"sending failed: {exc}") from exc

    async def _aregister(
        self,
        clip: bytes,
        name: str | None,
        format: str | None,
        match: bool | None,
        *,
        by_sha256: bool = False,
    ) -> VoiceReady:
        register = VoiceRegister(name=name, format=format, match=match)
        ready: VoiceReady | VoiceDeleted | None = None
        # A server older than registering by hash would wait for a clip after it: ask it only
        # of one that says it speaks it.
        features = (self.ready.features if self.ready is not None else None) or ()
        if by_sha256 and "register_sha256" in features:
            sha256 = hashlib.sha256(clip).hexdigest()
            with contextlib.suppress(ClipNeeded):
                ready = await self._avoice_request(dataclasses.replace(register, sha256=sha256))
        if ready is None:
            self.clip_uploads += 1
            ready = await self._avoice_request(register, clip)
        assert isinstance(ready, VoiceReady)
        self.voice = ready
        return ready

    async def _avoice_request(
        self, message: VoiceRegister | VoiceUse | VoiceDelete, clip: bytes | None = None
    ) -> VoiceReady | VoiceDeleted:
        """Send a voice request and wait for its answer; several may be in flight (by id)."""
        done: asyncio.Future[VoiceReady | VoiceDeleted] = asyncio.get_running_loop().create_future()
        async with self._send_lock:
            if isinstance(message, VoiceRegister):
                request_id = self._wire.send_voice_register(message, clip)
            elif isinstance(message, VoiceUse):
                request_id = self._wire.send_voice_use(message)
            else:
                request_id = self._wire.send_voice_delete(message)
            self._voice_calls[request_id] = done
            try:
                await self._aflush_locked()
            except BaseException:
                self._voice_calls.pop(request_id, None)
                raise
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.timeout)
        finally:
            self._voice_calls.pop(request_id, None)

    # --- reading --------------------------------------------------------------------------------
    async def _aread(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        reason = "the server closed the connection"
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._on_event(self._wire.receive_text(msg.data))
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    self._on_event(self._wire.receive_binary(msg.data))
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    reason = f"socket error: {ws.exception()}"
                    break
            if ws.close_code in FATAL_CLOSE_CODES:
                self._fatal = self._fatal or ClientClosed(
                    f"the server closed the session ({ws.close_code})"
                )
        except LivevoiceError as exc:
            # A frame this client cannot read: nothing on this socket can be trusted after it.
            reason = f"unreadable frame from the server: {exc.code}: {exc.message}"
            log.error("%s", reason)
        finally:
            if self._ws is ws:
                self._ws = None
            if self._fatal is None:
                self._online.clear()
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
            self._fail_in_flight(ConnectionLost(reason))

    def _place(self, event: Event) -> ChannelEvent:
        """A listener's event, with audio placed in its message; moves :attr:`listen_position`
        unless the caller reports what it played."""
        if isinstance(event, ChannelHeardStarted):
            start = event.start
            resumed_from = start.resumed_from or 0
            self._heard_streams[start.stream] = (start.message, resumed_from)
            if start.message is not None and not self.played_reports:
                self.listen_position = ListenPosition(start.message, resumed_from - 1)
            return event
        if isinstance(event, SpeechAudio):
            frame = event.message
            assert isinstance(frame, AudioFrame)
            key, resumed_from = self._heard_streams.get(frame.stream, (None, 0))
            position = None if key is None else ListenPosition(key, resumed_from + frame.seq)
            if position is not None and not self.played_reports:
                self.listen_position = position
            return HeardAudio(event.message, event.id, event.pcm, event.channel, position)
        if isinstance(event, ChannelHeardEnded):
            self._heard_streams.pop(event.end.stream, None)
        assert isinstance(
            event, ChannelHeardEnded | ChannelStateChanged | HeardMarks | PositionHeard
        )
        return event

    def _fail_in_flight(self, exc: BaseException) -> None:
        self._wire.reset()
        if self._ready_fut is not None and not self._ready_fut.done():
            self._ready_fut.set_exception(exc)
            self._ready_fut.exception()
        for join in self._joins.values():
            if not join.done():
                join.set_exception(exc)
                join.exception()
        self._joins.clear()
        for waiters in (self._voice_calls, self._pings):
            for fut in waiters.values():
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: the caller may have stopped waiting
        self._voice_calls.clear()
        for utterance in self._utterances.values():
            utterance._fail(exc)
        self._utterances.clear()

    def _on_event(self, event: Event) -> None:
        """Hand one event of the wire to whoever waits for it."""
        if isinstance(
            event, ChannelHeardStarted | ChannelHeardEnded | ChannelStateChanged | PositionHeard
        ) or (isinstance(event, SpeechAudio | HeardMarks) and event.channel is not None):
            self.heard.put_nowait(self._place(event))
        elif isinstance(event, ChannelJoinAnswered):
            joining = self._joins.get(event.request_id or "")
            if joining is not None and not joining.done():
                if event.joined is not None:
                    joining.set_result(event.joined)
                else:
                    assert event.error is not None
                    joining.set_exception(event.error)
        elif isinstance(event, SpeechQueued | SpeechStarted | SpeechAudio | HeardMarks):
            if (u := self._utterances.get(event.id)) is not None:
                u._on_event(event)
        elif isinstance(event, SpeechEnded | SpeechFailed):
            if (u := self._utterances.pop(event.id, None)) is not None:
                u._on_event(event)
        elif isinstance(event, VoiceAnswered | VoiceRequestFailed):
            fut = self._voice_calls.pop(event.request_id or "", None)
            if fut is not None and not fut.done():
                if isinstance(event, VoiceAnswered):
                    fut.set_result(event.answer)
                else:
                    fut.set_exception(event.error)
        elif isinstance(event, VoiceLost):
            # Deleted by this tenant elsewhere: speak answers no_voice until another is set.
            log.warning("the pinned voice was deleted")
            self._forget(event.notice.voice_id)
        elif isinstance(event, PongReceived):
            ping = self._pings.get(event.id) if event.id is not None else None
            if ping is not None and not ping.done():
                ping.set_result(None)
        elif isinstance(event, SessionReady | HelloRefused):
            if self._ready_fut is not None and not self._ready_fut.done():
                if isinstance(event, SessionReady):
                    self._ready_fut.set_result(event.ready)
                else:  # unauthorized, unsupported
                    self._ready_fut.set_exception(event.error)
        elif isinstance(event, Unmatched):
            log.warning("%s", event.reason)


__all__ = [
    "Backoff",
    "ClientClosed",
    "ConnectionLost",
    "HeardAudio",
    "ListenPosition",
    "LivevoiceClient",
    "SpeechResult",
    "Utterance",
    "error_from_wire",
]
