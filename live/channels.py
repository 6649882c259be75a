"""Channels: a tenant's named queue that producers speak into and listeners hear.

One synthesis per message, fanned out: the channel resamples the engine's chunks once per
listening rate and offers each listener's :class:`Seat` its frames without waiting for it. Each
seat sends from a bounded buffer of its own; one that falls further behind than that buffer is
cut loose (``listener_too_slow``), so a stalled listener never slows the channel, the other
listeners or the producer.

:class:`ChannelHub` is what a session needs of the channels; :class:`LocalChannels` keeps them in
this process. A Redis-backed hub (a lease per channel, requests and audio across servers) is
meant to implement the same interface.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from protocol.errors import Expired, LivevoiceError, QueueFull, SynthesisFailed
from protocol.messages import ChannelFilter
from protocol.state import (
    ListenStream,
    Membership,
    ServerProtocol,
    SpeakJob,
    channel_place,
    word_filter,
)
from protocol.wordfilter import WordFilter

from .loudness import MessageLoudness
from .marks import Marks, MouthEnvelope, MouthMarks, VisemeMark, WordMark
from .pcm import AudioCap, PcmFramer
from .scheduler import HeardUntil
from .speech import MarkedChunk, SpeechEngine, anext_chunk, speak_in, speak_marked_in
from .values import ResolvedVoice

log = logging.getLogger(__name__)

LISTENER_BUFFER_S = 10.0
"""Seconds of audio a listener may fall behind its channel before it is cut loose."""


@dataclass(eq=False)
class Line:
    """A channel message as it is queued, stored and heard: what any server needs to speak it
    and what its listeners are shown."""

    id: str
    """The producer's message id."""
    text: str
    """Cleaned (and filtered): what the engine speaks."""
    voice: str | None = None
    """The voice id it is spoken in, when known at admission: the speak's ``voice_id`` (R16)
    or the producer's pinned voice (R6). A delete of that voice drops it while it waits."""
    user: str | None = None
    kind: str | None = None
    priority: int = 0
    """Its lane (R15): higher lanes are spoken first, each lane in order."""
    interrupt: bool = False
    """Cut the current message and be spoken next (R15)."""
    expire_s: float | None = None
    """Dropped with ``expired`` if still waiting this long after it was queued (R15)."""
    key: str = ""
    """The channel's key for it (R18), given at admission: the same on every server."""
    replayed: bool = False
    """Spoken again from its start after the server speaking it died mid-way."""


@dataclass(eq=False)
class ChannelMessage:
    """A producer's admitted speak in its channel's queue, on the producer's server."""

    line: Line
    seat: Seat
    """The producer's seat: where its ending goes."""
    job: SpeakJob
    voice: asyncio.Future[ResolvedVoice]
    """The producer's voice for it, resolving beside the queue."""
    cancelled: bool = False
    expiry: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Start:
    line: Line
    resumed_from: int
    marks: tuple[str, ...] = ()
    """The mark kinds the message's audio carries (issue 13; for listeners that asked)."""


@dataclass(eq=False)
class _Marks:
    key: str
    marks: Marks
    """At the engine's rate: each listener gets them at its own."""


@dataclass(eq=False)
class _Pcm:
    key: str
    pcm: bytes
    seconds: float


@dataclass(eq=False)
class _End:
    key: str
    ttfa_ms: float
    cancelled: bool
    truncated: bool
    loudness_lufs: float | None = None


class Seat:
    """A session's place in a channel: its producer side (endings of its messages, queue state)
    and its listener side (a bounded buffer of what it has yet to send, and the task that sends
    it)."""

    def __init__(
        self,
        protocol: ServerProtocol,
        membership: Membership,
        *,
        flush: Callable[[], Awaitable[None]],
        kick: Callable[[], None],
        on_cut_loose: Callable[[], None],
    ) -> None:
        self.protocol = protocol
        self.membership = membership
        self._flush = flush
        """Sends what the protocol has to send (the session's, under its send lock)."""
        self._kick = kick
        """Has the session send what the protocol has to send, beside whoever calls."""
        self._on_cut_loose = on_cut_loose
        self.max_buffer_s = LISTENER_BUFFER_S
        """Set by the channel joined."""
        self.frame_ms = 100
        """The server's frame length, set by the channel joined: where a resumed stream's
        sample 0 is in its message (``resumed_from`` frames in)."""
        self.sample_rate = membership.sample_rate or 0
        self._feed: deque[_Start | _Marks | _Pcm | _End] = deque()
        self.buffered_s = 0.0
        """Seconds of audio offered to this listener and not yet handed to its socket."""
        self._streams: dict[str, ListenStream] = {}
        self._resumed_from: dict[str, int] = {}
        self._kinds: dict[str, tuple[str, ...]] = {}
        self.position: tuple[str, int] | None = None
        """The last message key and message-sequence number handed to this listener's socket
        (R18): where a listener resuming on another server would start."""
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def listens(self) -> bool:
        return self.membership.listens and not self.closed

    def start(self) -> None:
        """Send from now: the session answered the join (what was offered before waits)."""
        if self.membership.listens and not self.closed:
            self._task = asyncio.create_task(self._asend_forever(), name="channel-listener")

    def close(self) -> None:
        """The session left (or was cut loose): nothing more is offered or sent."""
        self.closed = True
        self._feed.clear()
        self.buffered_s = 0.0
        if self._task is not None:
            self._task.cancel()

    # --- producer side ------------------------------------------------------------------------
    def spoken(
        self,
        job: SpeakJob,
        *,
        duration_ms: float,
        ttfa_ms: float,
        truncated: bool,
        loudness_lufs: float | None = None,
    ) -> None:
        if not self.closed:
            self.protocol.channel_spoken(
                job,
                duration_ms=duration_ms,
                ttfa_ms=ttfa_ms,
                truncated=truncated,
                loudness_lufs=loudness_lufs,
            )
            self._kick()

    def dropped(self, job: SpeakJob) -> None:
        if not self.closed:
            self.protocol.channel_dropped(job)
            self._kick()

    def failed(self, job: SpeakJob, exc: LivevoiceError) -> None:
        if not self.closed:
            self.protocol.fail_speak(job, exc)
            self._kick()

    def state(self, *, waiting: int, paused: bool) -> None:
        if not self.closed:
            self.protocol.channel_state(waiting=waiting, paused=paused)
            self._kick()

    def played(self, message: str, ms: float) -> None:
        """Another listener's playback position in ``message`` (R20), for this listener."""
        if self.listens:
            self.protocol.channel_played(message, ms)
            self._kick()

    # --- listener side ------------------------------------------------------------------------
    def offer_start(
        self, line: Line, *, resumed_from: int = 0, marks: tuple[str, ...] = ()
    ) -> None:
        self._offer(_Start(line, resumed_from, marks))

    def offer_marks(self, key: str, marks: Marks) -> None:
        """Marks of the frames offered next (R19): only for a listener that asked for them."""
        if self.membership.marks:
            self._offer(_Marks(key, marks))

    def offer_pcm(self, key: str, pcm: bytes) -> bool:
        """Queue one frame; False (nothing queued) when it would overfill the buffer."""
        seconds = len(pcm) / 2 / self.sample_rate
        if self.buffered_s + seconds > self.max_buffer_s:
            return False
        self.buffered_s += seconds
        self._offer(_Pcm(key, pcm, seconds))
        return True

    def offer_end(
        self,
        key: str,
        *,
        ttfa_ms: float,
        cancelled: bool,
        truncated: bool,
        loudness_lufs: float | None = None,
    ) -> None:
        if cancelled:  # a skipped message stops now, not after what is still buffered
            kept = [i for i in self._feed if not (isinstance(i, _Pcm) and i.key == key)]
            self._feed = deque(kept)
            self.buffered_s = sum(i.seconds for i in kept if isinstance(i, _Pcm))
        self._offer(_End(key, ttfa_ms, cancelled, truncated, loudness_lufs))

    def cut_loose(self) -> None:
        self.close()
        self._on_cut_loose()

    def _offer(self, item: _Start | _Marks | _Pcm | _End) -> None:
        if not self.closed:
            self._feed.append(item)
            self._ready.set()

    async def _asend_forever(self) -> None:
        while True:
            while not self._feed:
                self._ready.clear()
                await self._ready.wait()
            item = self._feed.popleft()
            if isinstance(item, _Start):
                line = item.line
                heard = self.protocol.listen_start(
                    id=line.id,
                    text=line.text,
                    voice=line.voice,
                    user=line.user,
                    kind=line.kind,
                    message=line.key or None,
                    replayed=line.replayed,
                    resumed_from=item.resumed_from,
                    marks=item.marks,
                )
                if heard is not None:
                    self._streams[line.key] = heard
                    self._kinds[line.key] = item.marks
                    self._resumed_from[line.key] = item.resumed_from
                    self.position = (line.key, item.resumed_from - 1)
            elif isinstance(item, _Marks):
                if (heard := self._streams.get(item.key)) is not None:
                    marks = item.marks.rescaled(heard.sample_rate)
                    if resumed := self._resumed_from[item.key]:
                        frame = max(1, heard.sample_rate * self.frame_ms // 1000)
                        marks = marks_from(marks, resumed * frame)
                    if wire := marks.to_wire(self._kinds[item.key]):
                        self.protocol.listen_marks(heard, wire)
                continue  # sent with the frame behind it
            elif isinstance(item, _Pcm):
                self.buffered_s = max(0.0, self.buffered_s - item.seconds)
                if (heard := self._streams.get(item.key)) is not None:
                    self.protocol.listen_audio(heard, item.pcm)
                    self.position = (item.key, self._resumed_from[item.key] + heard.frames - 1)
            elif (heard := self._streams.pop(item.key, None)) is not None:
                self._resumed_from.pop(item.key, None)
                self._kinds.pop(item.key, None)
                self.protocol.listen_end(
                    heard,
                    ttfa_ms=item.ttfa_ms,
                    cancelled=item.cancelled,
                    truncated=item.truncated,
                    loudness_lufs=item.loudness_lufs,
                )
            await self._flush()


class Fanout:
    """One message's audio on its way to this server's listeners: resampled once per listening
    rate, each listener offered its frames without waiting for it; one whose buffer would
    overflow is cut loose."""

    def __init__(
        self,
        line: Line,
        listeners: list[Seat],
        *,
        engine_rate: int,
        frame_ms: int,
        cut_loose: Callable[[Seat], None],
        marks: tuple[str, ...] = (),
    ) -> None:
        self.line = line
        self.listeners = listeners
        self._cut_loose = cut_loose
        self._engine_rate, self._frame_ms = engine_rate, frame_ms
        self._framers = {
            rate: PcmFramer(engine_rate, rate, frame_ms)
            for rate in {s.sample_rate for s in listeners}
        }
        self._own: dict[Seat, tuple[PcmFramer, tuple[int, int]]] = {}
        """Listeners that resumed mid-way (R18): each frames the message itself, from the
        stream entry after the last one replayed to it."""
        for seat in listeners:
            seat.offer_start(line, marks=marks)

    def mark(self, marks: Marks, at: tuple[int, int] = (0, 0)) -> None:
        """Offer the marks of the chunk fed next (engine rate; stream entry ``at``), ahead of
        its frames (R19). A resumed listener was replayed those up to its entry already."""
        own = [seat for seat, (_, replayed_to) in self._own.items() if at > replayed_to]
        for seat in [*self.listeners, *own]:
            seat.offer_marks(self.line.key, marks)

    def join_mid_way(self, seat: Seat, framer: PcmFramer, replayed_to: tuple[int, int]) -> None:
        """A resumed listener that was replayed the message up to stream entry
        ``replayed_to``: it goes on from the next entry with its own framer, whose state is
        the one the message's audio so far left in it."""
        self._own[seat] = (framer, replayed_to)

    def feed(self, chunk: np.ndarray, at: tuple[int, int] = (0, 0)) -> bool:
        """Offer one chunk of the engine's audio (stream entry ``at``); True when it made
        frames."""
        frames = {rate: framer.feed(chunk) for rate, framer in self._framers.items()}
        self._offer(frames)
        for seat, (framer, replayed_to) in list(self._own.items()):
            if at > replayed_to:
                self._offer_to(seat, framer.feed(chunk))
        return any(frames.values())

    def end(
        self,
        *,
        ttfa_ms: float,
        cancelled: bool,
        truncated: bool,
        at: tuple[int, int] = (0, 0),
        loudness_lufs: float | None = None,
    ) -> None:
        own = [seat for seat, (_, replayed_to) in self._own.items() if at > replayed_to]
        if not cancelled:
            self._offer({r: [t] if (t := f.flush()) else [] for r, f in self._framers.items()})
            for seat in own:
                self._offer_to(seat, [t] if (t := self._own[seat][0].flush()) else [])
        for seat in [*self.listeners, *own]:
            seat.offer_end(
                self.line.key,
                ttfa_ms=ttfa_ms,
                cancelled=cancelled,
                truncated=truncated,
                loudness_lufs=loudness_lufs,
            )

    def _offer(self, frames: dict[int, list[bytes]]) -> None:
        for seat in list(self.listeners):
            self._offer_to(seat, frames[seat.sample_rate])

    def _offer_to(self, seat: Seat, frames: list[bytes]) -> None:
        for pcm in frames:
            if not seat.offer_pcm(self.line.key, pcm):
                if seat in self.listeners:
                    self.listeners.remove(seat)
                self._own.pop(seat, None)
                self._cut_loose(seat)
                return


class Channel(Protocol):
    """One channel as its members use it."""

    @property
    def name(self) -> str: ...

    word_filter: WordFilter | None
    """The streamer's filter for messages admitted from now (R17); None: off."""

    async def aadmit(self, line: Line) -> int:
        """Queue ``line`` (giving it its key): the place it takes (messages ahead of it, R15).
        ``QueueFull`` when the queue is full; ``ChannelUnavailable`` when its store is down."""
        ...

    def put(self, message: ChannelMessage) -> None:
        """The admitted line's producer side: where its ending goes, its voice."""
        ...

    async def afilter(self, request: ChannelFilter) -> None:
        """The streamer's word filter (R17), for messages admitted from now."""
        ...

    async def acancel(self, seat: Seat, message_id: str | None) -> None: ...
    async def apause(self) -> None: ...
    async def aresume(self) -> None: ...
    async def askip(self) -> None: ...
    async def aclear(self) -> None: ...
    def purge(self, voice_id: str) -> None: ...
    def leave(self, seat: Seat) -> None: ...

    def played(self, seat: Seat, message: str, ms: float) -> None:
        """``seat``'s listener has played ``ms`` of ``message`` (R20, already rate-limited):
        passed on to the channel's other listeners, on every server. Best effort."""
        ...


class ChannelHub(Protocol):
    """The channels of every tenant, as a session reaches them (a service of the app)."""

    async def ajoin(
        self, tenant: str, name: str, seat: Seat, resume: tuple[str, int] | None = None
    ) -> tuple[Channel, bool | None]:
        """Seat ``seat`` in the channel; with ``resume`` (R18), whether the replay follows."""
        ...

    async def aclose(self) -> None: ...


class LocalChannels:
    """Channels kept in this process (a server without Redis): each one's queue and its
    speaking task. It keeps no audio for listeners coming back (R18: ``resumed: false``)."""

    def __init__(
        self,
        engine: SpeechEngine,
        *,
        frame_ms: int,
        max_message_audio_s: float,
        max_queue: int,
        max_listener_buffer_s: float = LISTENER_BUFFER_S,
    ) -> None:
        self._engine = engine
        self.max_listener_buffer_s = max_listener_buffer_s
        self._frame_ms = frame_ms
        self._max_message_audio_s = max_message_audio_s
        self._max_queue = max_queue
        self._channels: dict[tuple[str, str], LocalChannel] = {}
        self._keys = itertools.count(1)
        self.engine_calls = 0
        """Messages synthesized, all channels together (one engine call each)."""

    async def ajoin(
        self, tenant: str, name: str, seat: Seat, resume: tuple[str, int] | None = None
    ) -> tuple[LocalChannel, bool | None]:
        key = (tenant, name)
        channel = self._channels.get(key)
        if channel is None:
            channel = LocalChannel(self, key)
            self._channels[key] = channel
        seat.max_buffer_s = self.max_listener_buffer_s
        seat.frame_ms = self._frame_ms
        channel.seats.append(seat)
        return channel, (False if resume is not None else None)

    def channel(self, tenant: str, name: str) -> LocalChannel | None:
        return self._channels.get((tenant, name))

    def _forget(self, channel: LocalChannel) -> None:
        if self._channels.get(channel.key) is channel:
            del self._channels[channel.key]

    async def aclose(self) -> None:
        for channel in list(self._channels.values()):
            channel.stop()
        self._channels.clear()


@dataclass(eq=False)
class LocalChannel:
    hub: LocalChannels
    key: tuple[str, str]
    seats: list[Seat] = field(default_factory=list)
    waiting: deque[ChannelMessage] = field(default_factory=deque)
    current: ChannelMessage | None = None
    paused: bool = False
    word_filter: WordFilter | None = None
    _task: asyncio.Task[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _playback: HeardUntil = field(default_factory=HeardUntil)

    @property
    def name(self) -> str:
        return self.key[1]

    # --- members' requests --------------------------------------------------------------------
    async def aadmit(self, line: Line) -> int:
        if len(self.waiting) >= self.hub._max_queue:
            raise QueueFull(
                f"{len(self.waiting)} messages are already waiting in channel {self.name!r}; "
                f"the limit is {self.hub._max_queue}",
                message_id=line.id,
            )
        line.key = str(next(self.hub._keys))
        place = self._place(line.priority, line.interrupt)
        return place + (1 if self.current is not None and not line.interrupt else 0)

    def _place(self, priority: int, interrupt: bool) -> int:
        return channel_place([m.line.priority for m in self.waiting], priority, interrupt=interrupt)

    def put(self, message: ChannelMessage) -> None:
        line = message.line
        self.waiting.insert(self._place(line.priority, line.interrupt), message)
        if line.interrupt:
            self._stop_current()
        if line.expire_s is not None:
            message.expiry = asyncio.get_running_loop().call_later(
                line.expire_s, self._expire, message
            )
        if self._task is None:
            self._task = asyncio.create_task(self._aspeak_forever(), name=f"channel-{self.name}")
        self._wake.set()
        self._broadcast()

    async def afilter(self, request: ChannelFilter) -> None:
        rules = word_filter(request)
        self.word_filter = rules if rules.active else None

    async def acancel(self, seat: Seat, message_id: str | None) -> None:
        """A producer cancels its own messages (one by id, or all)."""

        def mine(m: ChannelMessage) -> bool:
            return m.seat is seat and message_id in (None, m.job.id)

        self._drop([m for m in self.waiting if mine(m)])
        if self.current is not None and mine(self.current):
            self._stop_current()

    async def apause(self) -> None:
        self.paused = True
        self._broadcast()

    async def aresume(self) -> None:
        self.paused = False
        self._wake.set()
        self._broadcast()

    async def askip(self) -> None:
        self._stop_current()
        self._broadcast()

    async def aclear(self) -> None:
        self._drop(list(self.waiting))
        self._broadcast()

    def purge(self, voice_id: str) -> None:
        """The tenant deleted ``voice_id`` (R16, R6): a message waiting to be spoken in it,
        its own or its producer's pinned voice, is forgotten with it and ends ``cancelled``."""
        self._drop([m for m in self.waiting if m.line.voice == voice_id])

    def leave(self, seat: Seat) -> None:
        """The session is gone. Its messages whose voice has resolved stay queued; one whose
        voice was still on its way cannot be spoken any more."""
        seat.close()
        for message in [*self.waiting, *([self.current] if self.current else [])]:
            if message.seat is seat and not message.voice.done():
                message.voice.cancel()
        if seat in self.seats:
            self.seats.remove(seat)
        if not self.seats:  # nobody left to hear it or to be answered
            self.stop()
            self.hub._forget(self)

    def played(self, seat: Seat, message: str, ms: float) -> None:
        for other in self.seats:
            if other is not seat:
                other.played(message, ms)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for message in [*self.waiting, *([self.current] if self.current else [])]:
            message.voice.cancel()
            if message.expiry is not None:
                message.expiry.cancel()
        self.waiting.clear()

    # --- the queue ----------------------------------------------------------------------------
    def _expire(self, message: ChannelMessage) -> None:
        """A message waited longer than its ``expire_s`` (R15): it ends ``expired``, unspoken."""
        if message not in self.waiting:
            return  # started, dropped or gone meanwhile
        self.waiting.remove(message)
        message.cancelled = True
        message.voice.cancel()
        message.seat.failed(
            message.job,
            Expired(f"still waiting after {message.line.expire_s:g} s", message_id=message.job.id),
        )
        self._broadcast()

    def _drop(self, messages: list[ChannelMessage]) -> None:
        for message in messages:
            self.waiting.remove(message)
            if message.expiry is not None:
                message.expiry.cancel()
            message.cancelled = True
            message.voice.cancel()
            message.seat.dropped(message.job)
        if messages:
            self._broadcast()

    def _stop_current(self) -> None:
        if self.current is not None:
            self.current.cancelled = True
            self.current.job.cancelled = True
            self._stop.set()

    def _broadcast(self) -> None:
        for seat in self.seats:
            seat.state(waiting=len(self.waiting), paused=self.paused)

    def _cut_loose(self, seat: Seat) -> None:
        log.info("channel %s: a listener fell %.1f s behind; cut loose", self.name, seat.buffered_s)
        if seat in self.seats:
            self.seats.remove(seat)
        seat.cut_loose()

    async def _aspeak_forever(self) -> None:
        while True:
            if self.paused or not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            message = self.current = self.waiting.popleft()
            if message.expiry is not None:
                message.expiry.cancel()
            self._stop.clear()
            self._broadcast()
            try:
                await self._aspeak(message)
            except LivevoiceError as exc:
                message.seat.failed(message.job, exc)
            except Exception:
                log.exception("channel %s: synthesis failed", self.name)
                message.seat.failed(message.job, SynthesisFailed("synthesis failed"))
            finally:
                self.current = None

    async def _aspeak(self, message: ChannelMessage) -> None:
        voice = await self._until_stopped(message.voice)
        if voice is None or message.cancelled:
            message.seat.dropped(message.job)
            return
        line = message.line
        try:
            line.voice = message.seat.protocol.voice_of(message.job).voice_id
        except LivevoiceError:
            line.voice = None
        engine, hub = self.hub._engine, self.hub
        self.hub.engine_calls += 1
        listeners = [s for s in self.seats if s.listens]
        self._playback.begin()  # not due before the last line's audio ends
        kinds: tuple[str, ...] = ()
        if any(s.membership.marks for s in listeners):  # marks cost only when asked for
            marked, kinds = speak_marked_in(engine, line.text, voice)
        fanout = Fanout(
            line,
            listeners,
            engine_rate=engine.sample_rate,
            frame_ms=hub._frame_ms,
            cut_loose=self._cut_loose,
            marks=kinds,
        )
        cap = AudioCap(hub._max_message_audio_s, engine.sample_rate)
        loudness = MessageLoudness(engine.sample_rate)
        spoken = 0
        started = time.perf_counter()
        ttfa: float | None = None
        chunks = (
            _marking(marked, fanout, MouthEnvelope(engine.sample_rate), engine.sample_rate)
            if kinds
            else speak_in(engine, line.text, voice)
        )
        try:
            while (chunk := await self._next_chunk(chunks, message)) is not None:
                chunk = cap.take(chunk)
                spoken += len(chunk)
                loudness.feed(chunk)
                self._playback.sent(len(chunk) / engine.sample_rate)
                if fanout.feed(chunk) and ttfa is None:
                    ttfa = time.perf_counter() - started
                if cap.reached:
                    break
        finally:
            await chunks.aclose()
        ttfa_ms = round((ttfa or 0.0) * 1000, 3)
        lufs = await loudness.alufs()
        fanout.end(
            ttfa_ms=ttfa_ms, cancelled=message.cancelled, truncated=cap.reached, loudness_lufs=lufs
        )
        duration_ms = round(spoken * 1000 / engine.sample_rate, 3)
        message.seat.spoken(
            message.job,
            duration_ms=duration_ms,
            ttfa_ms=ttfa_ms,
            truncated=cap.reached,
            loudness_lufs=lufs,
        )

    async def _until_stopped(self, voice: asyncio.Future[ResolvedVoice]) -> ResolvedVoice | None:
        """The message's voice, or None when it is stopped (or its voice fails) first."""
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {voice, stop}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not voice.done() or voice.cancelled():
            return None
        return voice.result()  # raises the voice's error: the message fails with it

    async def _next_chunk(
        self, chunks: AsyncGenerator[np.ndarray, None], message: ChannelMessage
    ) -> np.ndarray | None:
        """The engine's next chunk, or None at its end or once the message is stopped."""
        if message.cancelled:
            return None
        chunk = await anext_chunk(chunks, self._stop)
        return None if message.cancelled else chunk


def marks_from(marks: Marks, sample: int) -> Marks:
    """``marks`` (in samples of a message at some rate) for a stream of that message that
    begins at its ``sample`` (a resumed listener, R18): what ends before it is dropped, the rest
    is counted from it. A word under way there starts at 0; mouth values keep their 20 ms grid,
    from the first window that starts inside the stream."""

    def kept(start: int, end: int) -> tuple[int, int] | None:
        return (max(0, start - sample), end - sample) if end > sample else None

    words = tuple(
        WordMark(w.text, *span) for w in marks.words if (span := kept(w.start, w.end)) is not None
    )
    visemes = tuple(
        VisemeMark(v.v, *span) for v in marks.visemes if (span := kept(v.start, v.end)) is not None
    )
    mouth = marks.mouth
    if mouth is not None:
        window = marks.sample_rate // mouth.rate
        late = max(0, -(-(sample - mouth.start) // window))
        mouth = MouthMarks(mouth.start + late * window - sample, mouth.rate, mouth.values[late:])
    return Marks(marks.sample_rate, words, visemes, mouth)


async def _marking(
    marked: AsyncGenerator[MarkedChunk, None], fanout: Fanout, mouth: MouthEnvelope, rate: int
) -> AsyncGenerator[np.ndarray, None]:
    """The engine's chunks, each one's marks offered to the fanout before its frames (R19)."""
    try:
        async for chunk in marked:
            marks = Marks(rate, chunk.words, chunk.visemes, mouth.feed(chunk.pcm))
            if marks:
                fanout.mark(marks)
            yield chunk.pcm
    finally:
        await marked.aclose()
