"""Channels across servers, through Redis: the same channel on every server that shares it.

Why it is built this way is in ``docs/channels.md``; in short:

- **The queue lives in Redis** (a sorted set of keys in lane order, a hash of the lines), and
  every change to it is one Lua script: admission (``queue_full`` and the place included),
  drops, clear, pause. Any server with members changes it; nothing accepted lives only in one
  server's memory.
- **One server speaks a channel at a time**: the holder of a lease (``SET NX PX``, renewed
  every 0.5 s, fenced: a server that lost it can no longer pop or end a message). Every
  server with members of the channel tries to take it when it lapses, so a SIGKILLed speaker
  is replaced within the lease (2 s) plus one try (0.25 s). The message it was speaking is
  put back first in line and spoken again, marked ``replayed``; its cut stream ends
  ``cancelled``.
- **Everything that happens goes into one Redis Stream per channel** (``XADD`` with an
  approximate ``MAXLEN``): starts, audio (engine-rate s16le pieces of at most 0.5 s), ends,
  drops, queue state, the word filter. Each server with members reads it (``XREAD BLOCK``)
  and fans it out to its own listeners, resampled once per rate; the producer's server
  answers its producer from it. A stream, not pub/sub, because a reader that blinks or
  joins late reads on from where it was instead of losing audio, and because the stream's
  tail *is* the replay buffer a reconnecting listener resumes from (R18). Requests that need
  the speaking server (stop the current message, wake up) go into a second, short stream.
- **Marks** (R19): the speaking server writes each chunk's words and visemes (engine rate,
  from the message's first sample) as a ``marks`` entry ahead of that chunk's audio, whenever
  the engine has them; each reader computes the mouth from the audio it reads, so the stream
  carries no mouth values. The replay carries marks like audio.
- **Playback positions** (R20) go through Redis pub/sub, not the stream: they are ephemeral
  (a lost one is replaced by the next a few hundred ms later) and ten a second of them would
  push audio out of the replay buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgpack
import numpy as np
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from protocol.codec import decode_client, encode
from protocol.errors import (
    ChannelUnavailable,
    Expired,
    LivevoiceError,
    QueueFull,
    SynthesisFailed,
    all_codes,
)
from protocol.messages import ChannelFilter
from protocol.state import word_filter
from protocol.wordfilter import WordFilter

from .channels import LISTENER_BUFFER_S, ChannelMessage, Fanout, Line, Seat
from .loudness import MessageLoudness
from .marks import Marks, MouthEnvelope, VisemeMark, WordMark
from .pcm import AudioCap, PcmFramer, to_s16le
from .scheduler import HeardUntil
from .speech import MarkedChunk, SpeechEngine, anext_chunk, speak_marked_in
from .values import ResolvedVoice

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX: Final = "livevoice:v1:ch"
LEASE_MS: Final = 2000
"""How long a speaking server's lease lasts unrenewed: a dead one is replaced after this."""
RENEW_S: Final = 0.5
CLAIM_S: Final = 0.25
"""How often a server with members tries to take a lapsed lease."""
PIECE_S: Final = 0.5
"""Most audio in one stream entry: the replay's grain."""
REPLAY_ENTRIES: Final = 400
"""Stream entries kept (approximately): ~2-3 minutes of audio, the replay buffer (R18)."""
KEY_TTL_S: Final = 24 * 3600
"""A channel nobody touches for this long is forgotten, queue and all."""
VOICE_WAIT_S: Final = 60.0
"""How long the speaking server waits for a line whose voice is still being registered."""
BLOCK_MS: Final = 1000

# KEYS of every script: queue, lines, seq, current, state, events, requests, lease.
_COMMON: Final = """
local q, lines, seq, cur = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local state, ev, req, lease = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local maxlen, ttl = ARGV[1], tonumber(ARGV[2])
local function note(...)
  return redis.call('XADD', ev, 'MAXLEN', '~', maxlen, '*', ...)
end
local function note_state()
  local paused = redis.call('HGET', state, 'paused') or '0'
  note('t', 'state', 'waiting', redis.call('ZCARD', q), 'paused', paused)
end
local function ask(...)
  redis.call('XADD', req, 'MAXLEN', '~', 200, '*', ...)
end
local function touch()
  for i = 1, 7 do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# ARGV: maxlen, ttl, line, priority, interrupt, max_queue. Returns {place, key} or {-1, waiting}.
_PUT: Final = (
    _COMMON
    + """
local n = redis.call('ZCARD', q)
if n >= tonumber(ARGV[6]) then return {-1, n} end
local s = redis.call('INCR', seq)
local key = tostring(s)
local interrupt = ARGV[5] == '1'
local score = interrupt and -s or (9 - tonumber(ARGV[4])) * 1e12 + s
redis.call('ZADD', q, score, key)
redis.call('HSET', lines, key, ARGV[3])
local place = redis.call('ZRANK', q, key)
local current = redis.call('GET', cur)
if current and not interrupt then place = place + 1 end
note_state()
if interrupt and current then ask('op', 'stop', 'key', current) else ask('op', 'wake') end
touch()
return {place, key}
"""
)

# ARGV: maxlen, ttl, key, code, message, stop_current. Drops a waiting line (1); a current one
# is asked to stop when stop_current is '1' (2); 0 when it is neither.
_DROP: Final = (
    _COMMON
    + """
local key = ARGV[3]
if redis.call('ZREM', q, key) == 0 then
  if ARGV[6] == '1' and redis.call('GET', cur) == key then
    ask('op', 'stop', 'key', key)
    return 2
  end
  return 0
end
local line = redis.call('HGET', lines, key) or ''
redis.call('HDEL', lines, key)
note('t', 'drop', 'key', key, 'code', ARGV[4], 'message', ARGV[5], 'line', line)
note_state()
return 1
"""
)

# ARGV: maxlen, ttl. Every waiting line dropped ``cancelled``.
_CLEAR: Final = (
    _COMMON
    + """
local keys = redis.call('ZRANGE', q, 0, -1)
for _, key in ipairs(keys) do
  local line = redis.call('HGET', lines, key) or ''
  redis.call('HDEL', lines, key)
  note('t', 'drop', 'key', key, 'code', 'cancelled', 'message', 'cleared', 'line', line)
end
redis.call('DEL', q)
note_state()
return #keys
"""
)

# ARGV: maxlen, ttl, op ('pause', 'resume', 'skip'), filter (for 'filter').
_CONTROL: Final = (
    _COMMON
    + """
local op = ARGV[3]
if op == 'pause' then redis.call('HSET', state, 'paused', '1')
elseif op == 'resume' then redis.call('HSET', state, 'paused', '0'); ask('op', 'wake')
elseif op == 'skip' then
  local current = redis.call('GET', cur)
  if current then ask('op', 'stop', 'key', current) end
elseif op == 'filter' then
  redis.call('HSET', state, 'filter', ARGV[4])
  note('t', 'filter', 'rules', ARGV[4])
  touch()
  return 1
end
note_state()
touch()
return 1
"""
)

# ARGV: maxlen, ttl, key, line. A waiting line's voice became known (or failed).
_UPDATE: Final = (
    _COMMON
    + """
if redis.call('HEXISTS', lines, ARGV[3]) == 1 then
  redis.call('HSET', lines, ARGV[3], ARGV[4])
  ask('op', 'wake')
  return 1
end
return 0
"""
)

# Fenced by the lease (ARGV[3]: this server): nothing happens for a server that lost it.
_FENCE: Final = """
if redis.call('GET', lease) ~= ARGV[3] then return false end
"""

# ARGV: maxlen, ttl, me. The next line {key, line, replayed}, now current; false if none.
_POP: Final = (
    _COMMON
    + _FENCE
    + """
if redis.call('HGET', state, 'paused') == '1' then return false end
while true do
  local first = redis.call('ZRANGE', q, 0, 0)
  if #first == 0 then return false end
  local key = first[1]
  redis.call('ZREM', q, key)
  local line = redis.call('HGET', lines, key)
  if line then
    redis.call('SET', cur, key)
    local replayed = redis.call('HGET', state, 'replayed:' .. key) or '0'
    redis.call('HDEL', state, 'replayed:' .. key)
    note_state()
    touch()
    return {key, line, replayed}
  end
end
"""
)

# ARGV: maxlen, ttl, me, key, event fields... The current line ends (or starts, when the
# event is a start: then nothing is removed).
_NOTE: Final = (
    _COMMON
    + _FENCE
    + """
local key = ARGV[4]
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local kind = fields[2]
if kind ~= 'start' and kind ~= 'pcm' then
  if redis.call('GET', cur) == key then redis.call('DEL', cur) end
  fields[#fields + 1] = 'line'
  fields[#fields + 1] = redis.call('HGET', lines, key) or ''
  redis.call('HDEL', lines, key)
end
note(unpack(fields))
return 1
"""
)

# ARGV: maxlen, ttl, me. A new speaker takes over: the line its predecessor was speaking
# goes back first in line, to be spoken again (replayed); its cut stream ends cancelled.
_TAKEOVER: Final = (
    _COMMON
    + _FENCE
    + """
local key = redis.call('GET', cur)
if not key then return 0 end
redis.call('DEL', cur)
local line = redis.call('HGET', lines, key)
if not line then return 0 end
redis.call('ZADD', q, -1e15, key)
redis.call('HSET', state, 'replayed:' .. key, '1')
note('t', 'end', 'key', key, 'cancelled', '1', 'cut', '1', 'truncated', '0',
     'ttfa_ms', '0', 'duration_ms', '0', 'line', line)
note_state()
ask('op', 'wake')
return 1
"""
)

_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _keys(tenant: str, name: str) -> list[str]:
    base = f"{PREFIX}:{{{tenant}:{name}}}"  # one hash slot: the scripts touch them all
    return [
        f"{base}:{part}" for part in ("q", "lines", "seq", "cur", "state", "ev", "req", "lease")
    ]


def _played_topic(tenant: str, name: str) -> str:
    """The pub/sub channel of a channel's playback positions (R20)."""
    return f"{PREFIX}:{{{tenant}:{name}}}:played"


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _str(fields: dict[bytes, bytes], name: str) -> str:
    return fields.get(name.encode(), b"").decode()


def _lufs(fields: dict[bytes, bytes]) -> float | None:
    """An end's ``loudness_lufs``: empty when nothing audible was sent (or an older server
    wrote it)."""
    raw = _str(fields, "loudness_lufs")
    return float(raw) if raw else None


@dataclass
class _Stored:
    """A line as the queue keeps it: what any server needs to speak it and answer for it."""

    line: Line
    origin: str
    """The server whose producer queued it: it answers the producer."""
    expire_at: float | None = None
    voice_error: tuple[str, str] | None = None
    """The producer's voice failed (code, message): the line ends with that error."""

    def pack(self) -> bytes:
        line = self.line
        return bytes(
            msgpack.packb(
                {
                    "v": 1,
                    "id": line.id,
                    "text": line.text,
                    "voice": line.voice,
                    "user": line.user,
                    "kind": line.kind,
                    "priority": line.priority,
                    "origin": self.origin,
                    "expire_at": self.expire_at,
                    "voice_error": list(self.voice_error) if self.voice_error else None,
                }
            )
        )

    @classmethod
    def unpack(cls, raw: bytes, key: str) -> _Stored | None:
        try:
            value = msgpack.unpackb(raw)
            line = Line(
                str(value["id"]),
                str(value["text"]),
                voice=value.get("voice"),
                user=value.get("user"),
                kind=value.get("kind"),
                priority=int(value.get("priority") or 0),
                key=key,
            )
            error = value.get("voice_error")
            return cls(
                line,
                str(value["origin"]),
                value.get("expire_at"),
                (str(error[0]), str(error[1])) if error else None,
            )
        except Exception:
            log.warning("channel line %s could not be read; dropped", key)
            return None


def _pack_marks(chunk: MarkedChunk, before: int) -> bytes | None:
    """A ``marks`` entry's payload: the chunk's words and visemes that start before sample
    ``before`` (the message's audio cap), at the engine's rate; None when it has none."""
    words = [[w.text, w.start, w.end] for w in chunk.words if w.start < before]
    visemes = [[v.v, v.start, v.end] for v in chunk.visemes if v.start < before]
    if not words and not visemes:
        return None
    return bytes(msgpack.packb({"v": 1, "words": words, "visemes": visemes}))


def _kinds(fields: dict[bytes, bytes]) -> tuple[str, ...]:
    """The mark kinds a ``start`` entry says its message carries."""
    return tuple(kind for kind in _str(fields, "marks").split(",") if kind)


@dataclass
class _MarkReading:
    """One message's marks as a server reads them from the channel's stream: words and
    visemes from its ``marks`` entries, the mouth from its audio (computed here, on every
    server, from the same pcm: the stream carries no mouth values). Each piece of audio is
    preceded by one :class:`Marks` of what came before it and its own mouth values."""

    rate: int
    mouth: MouthEnvelope | None
    words: tuple[WordMark, ...] = ()
    visemes: tuple[VisemeMark, ...] = ()

    @classmethod
    def of(cls, kinds: tuple[str, ...], rate: int) -> _MarkReading | None:
        if not kinds:
            return None
        return cls(rate, MouthEnvelope(rate) if "mouth" in kinds else None)

    def take(self, raw: bytes) -> None:
        """A ``marks`` entry: held until the audio it precedes."""
        try:
            value = msgpack.unpackb(raw)
            words = tuple(WordMark(str(t), int(a), int(b)) for t, a, b in value["words"])
            visemes = tuple(VisemeMark(str(v), int(a), int(b)) for v, a, b in value["visemes"])
        except Exception:
            log.warning("channel marks could not be read; skipped")
            return
        self.words += words
        self.visemes += visemes

    def before(self, pcm: np.ndarray, *, last: bool = False) -> Marks | None:
        """The marks to offer ahead of ``pcm`` (with ``last``: the message's end, the mouth's
        last partial window); None when there are none."""
        mouth = self.mouth.feed(pcm, last=last) if self.mouth is not None else None
        marks = Marks(self.rate, self.words, self.visemes, mouth)
        self.words, self.visemes = (), ()
        return marks if marks else None


def _error(code: str, message: str, message_id: str) -> LivevoiceError:
    cls = all_codes().get(code, SynthesisFailed)
    return cls(message, message_id=message_id)


class SharedChannels:
    """The channels of every tenant, shared through Redis with every server on it."""

    def __init__(
        self,
        url: str,
        engine: SpeechEngine,
        resolve: Callable[[str, str], Awaitable[ResolvedVoice]],
        *,
        frame_ms: int,
        max_message_audio_s: float,
        max_queue: int,
        max_listener_buffer_s: float = LISTENER_BUFFER_S,
        op_timeout_s: float = 1.0,
        matching: bool = False,
    ) -> None:
        self.matching = matching
        """Whether the engine matches voices (lines are spoken matched when their voice has a
        profile)."""
        # Bounded by socket timeouts, never by cancelling a call: redis-py can turn a task's
        # cancellation into a connection error and leave the caller's task cancelled later (see
        # RedisTier._run). Blocking reads get a client of their own with a longer timeout.
        self._redis: redis.asyncio.Redis = redis.asyncio.from_url(
            url,
            socket_timeout=op_timeout_s,
            socket_connect_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 0),
            client_name="livevoice-channels",
        )
        self._reader: redis.asyncio.Redis = redis.asyncio.from_url(
            url,
            socket_timeout=BLOCK_MS / 1000 + 5,
            socket_connect_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 0),
            client_name="livevoice-channel-reader",
        )
        self._scripts = {
            name: self._redis.register_script(lua)
            for name, lua in (
                ("put", _PUT),
                ("drop", _DROP),
                ("clear", _CLEAR),
                ("control", _CONTROL),
                ("update", _UPDATE),
                ("pop", _POP),
                ("note", _NOTE),
                ("takeover", _TAKEOVER),
                ("renew", _RENEW),
                ("release", _RELEASE),
            )
        }
        self.engine = engine
        self.resolve = resolve
        """A tenant's voice by id (the voice store's ``ause``): how the speaking server finds
        the voice of a line queued on another server."""
        self.frame_ms = frame_ms
        self.max_message_audio_s = max_message_audio_s
        self.max_queue = max_queue
        self.max_listener_buffer_s = max_listener_buffer_s
        self.op_timeout_s = op_timeout_s
        self.server = uuid.uuid4().hex
        self._channels: dict[tuple[str, str], SharedChannel] = {}
        self.engine_calls = 0
        """Messages this server synthesized, all channels together."""
        self.takeovers = 0

    async def ajoin(
        self, tenant: str, name: str, seat: Seat, resume: tuple[str, int] | None = None
    ) -> tuple[SharedChannel, bool | None]:
        key = (tenant, name)
        channel = self._channels.get(key)
        if channel is None or channel.closing:
            channel = SharedChannel(self, tenant, name)
            self._channels[key] = channel
            await channel.astart()
        seat.max_buffer_s = self.max_listener_buffer_s
        seat.frame_ms = self.frame_ms
        resumed = await channel.aseat(seat, resume)
        return channel, resumed

    def channel(self, tenant: str, name: str) -> SharedChannel | None:
        return self._channels.get((tenant, name))

    def _forget(self, channel: SharedChannel) -> None:
        if self._channels.get(channel.ident) is channel:
            del self._channels[channel.ident]

    async def arun(
        self, name: str, keys: list[str], args: list[Any], *, message_id: str | None = None
    ) -> Any:
        """One script, bounded: ``ChannelUnavailable`` (for ``message_id``) when Redis does
        not answer."""
        try:
            return await self._scripts[name](keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise ChannelUnavailable(
                "the channel's store did not answer; retry", message_id=message_id
            ) from exc

    async def aclose(self) -> None:
        for channel in list(self._channels.values()):
            await channel.astop()
        self._channels.clear()
        for client in (self._redis, self._reader):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


@dataclass(eq=False)
class _Speaking:
    key: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class SharedChannel:
    """One channel as this server takes part in it: its members here, the reader of the
    channel's stream, and (while it holds the lease) the speaker."""

    def __init__(self, hub: SharedChannels, tenant: str, name: str) -> None:
        self.hub = hub
        self.ident = (tenant, name)
        self.tenant = tenant
        self._name = name
        self.keys = _keys(tenant, name)
        self.seats: list[Seat] = []
        self._live_after: dict[Seat, tuple[int, int]] = {}
        """Resumed listeners: stream entries up to this one were replayed to them already."""
        self.word_filter: WordFilter | None = None
        self.waiting = 0
        self.paused = False
        self._mine: dict[str, ChannelMessage] = {}
        """This server's producers' lines, by key: their endings are answered from here."""
        self._early: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        self._fanouts: dict[str, Fanout] = {}
        self._readings: dict[str, _MarkReading] = {}
        """Marks of the messages being read, by key (those that carry any)."""
        self._positions: dict[int, tuple[str, float]] = {}
        """Playback positions of this server's listeners not yet published, by reporter."""
        self._publishing: asyncio.Task[None] | None = None
        self._gone: set[str] = set()
        """This server's lines answered before their drop went by (a purge, R6)."""
        self._started: set[str] = set()
        """Lines of this server's producers whose start went by (bounded by ``_mine``)."""
        self._feeding = asyncio.Lock()
        self._wake = asyncio.Event()
        self._speaking: _Speaking | None = None
        self._playback = HeardUntil()
        self.leading = False
        self.closing = False
        self._cursor = (b"0-0", b"0-0")
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def name(self) -> str:
        return self._name

    def _args(self, *rest: Any) -> list[Any]:
        return [REPLAY_ENTRIES, KEY_TTL_S, *rest]

    # --- taking part ----------------------------------------------------------------------------
    async def astart(self) -> None:
        """Read the channel from its newest entries on, and stand for its lease."""
        r = self.hub._redis
        try:
            events: Any = await r.xrevrange(self.keys[5], count=1)
            requests: Any = await r.xrevrange(self.keys[6], count=1)
            rules: Any = await r.hget(self.keys[4], "filter")
            paused = await r.hget(self.keys[4], "paused")
        except (RedisError, OSError) as exc:
            raise ChannelUnavailable("the channel's store did not answer; retry") from exc
        self._cursor = (events[0][0] if events else b"0-0", requests[0][0] if requests else b"0-0")
        self.paused = paused == b"1"
        if rules:
            self._set_filter(rules)
        self._tasks = [
            asyncio.create_task(self._aread_forever(), name=f"channel-read-{self._name}"),
            asyncio.create_task(self._astand_forever(), name=f"channel-lead-{self._name}"),
            asyncio.create_task(self._aplayed_forever(), name=f"channel-played-{self._name}"),
        ]

    async def aseat(self, seat: Seat, resume: tuple[str, int] | None) -> bool | None:
        if resume is None or not seat.membership.listens:
            self.seats.append(seat)
            return None
        async with self._feeding:  # the reader waits: nothing is offered twice or skipped
            try:
                entries: Any = await self.hub._reader.xrange(self.keys[5])
            except (RedisError, OSError):
                entries = []
            resumed = self._replay(seat, entries, *resume)
            if entries:
                self._live_after[seat] = _stream_id(entries[-1][0])
            self.seats.append(seat)
        return resumed

    def _replay(
        self, seat: Seat, entries: list[tuple[bytes, dict[bytes, bytes]]], key: str, seq: int
    ) -> bool:
        """Offer ``seat`` what followed frame ``seq`` of message ``key`` (R18); False when
        that message is no longer in the stream."""
        starts = [
            i
            for i, (_, f) in enumerate(entries)
            if f.get(b"t") == b"start" and _str(f, "key") == key
        ]
        if not starts:
            return False
        engine_rate = self.hub.engine.sample_rate
        framers: dict[str, PcmFramer] = {}
        skip: dict[str, int] = {}
        readings: dict[str, _MarkReading | None] = {}
        for _, fields in entries[starts[0] :]:
            kind, k = fields.get(b"t"), _str(fields, "key")
            if kind == b"start":
                stored = _Stored.unpack(fields.get(b"line", b""), k)
                if stored is None:
                    continue
                stored.line.replayed = fields.get(b"replayed") == b"1"
                stored.line.voice = _str(fields, "voice") or None
                framers[k] = PcmFramer(engine_rate, seat.sample_rate, self.hub.frame_ms)
                skip[k] = seq + 1 if k == key else 0
                kinds = _kinds(fields)
                readings[k] = _MarkReading.of(kinds, engine_rate)
                # The seat drops the marks of what it skips and counts the rest from its
                # stream's sample 0 (``resumed_from`` frames into the message).
                seat.offer_start(stored.line, resumed_from=skip[k], marks=kinds)
            elif kind == b"marks" and (reading := readings.get(k)) is not None:
                reading.take(fields.get(b"marks", b""))
            elif kind == b"pcm" and k in framers:
                samples = _samples(fields.get(b"pcm", b""))
                if (reading := readings.get(k)) and (marks := reading.before(samples)):
                    seat.offer_marks(k, marks)
                for pcm in framers[k].feed(samples):
                    if skip[k] > 0:
                        skip[k] -= 1
                    elif not seat.offer_pcm(k, pcm):
                        seat.cut_loose()
                        return True
            elif kind == b"end" and k in framers:
                framer = framers.pop(k)
                reading = readings.pop(k, None)
                cancelled = fields.get(b"cancelled") == b"1"
                if not cancelled and reading and (marks := reading.before(_NO_PCM, last=True)):
                    seat.offer_marks(k, marks)
                if not cancelled and (tail := framer.flush()) and skip[k] <= 0:
                    seat.offer_pcm(k, tail)
                seat.offer_end(
                    k,
                    ttfa_ms=float(_str(fields, "ttfa_ms") or 0),
                    cancelled=cancelled,
                    truncated=fields.get(b"truncated") == b"1",
                    loudness_lufs=_lufs(fields),
                )
        for k, framer in framers.items():  # still being spoken: heard live from here
            fanout = self._fanouts.get(k)
            if fanout is not None and entries:
                fanout.join_mid_way(seat, framer, _stream_id(entries[-1][0]))
        return True

    def leave(self, seat: Seat) -> None:
        seat.close()
        self._live_after.pop(seat, None)
        for message in list(self._mine.values()):
            if message.seat is seat and not message.voice.done():
                message.voice.cancel()
        if seat in self.seats:
            self.seats.remove(seat)
        if not self.seats:
            self.closing = True
            self.hub._forget(self)
            task = asyncio.ensure_future(self._aretire())
            self._tasks.append(task)

    async def _aretire(self) -> None:
        """Nobody here any more: stop reading and standing; a line being spoken here is
        spoken to its end first, then the lease goes to a server that still has members."""
        if self.leading and self._speaking is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.hub.max_message_audio_s + 5):
                    while self._speaking is not None:
                        await asyncio.sleep(0.05)
        await self.astop(keep=asyncio.current_task())

    async def astop(self, keep: asyncio.Task[Any] | None = None) -> None:
        self.closing = True
        for task in self._tasks:
            if task is not keep:
                task.cancel()
        for task in self._tasks:
            if task is not keep:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.leading:
            self.leading = False
            with contextlib.suppress(ChannelUnavailable):
                await self.hub.arun("release", [self.keys[7]], [self.hub.server])
        for message in self._mine.values():
            message.voice.cancel()
            if message.expiry is not None:
                message.expiry.cancel()

    # --- members' requests ----------------------------------------------------------------------
    async def aadmit(self, line: Line) -> int:
        expire_at = time.time() + line.expire_s if line.expire_s is not None else None
        stored = _Stored(line, self.hub.server, expire_at)
        answer = await self.hub.arun(
            "put",
            self.keys,
            self._args(stored.pack(), line.priority, int(line.interrupt), self.hub.max_queue),
            message_id=line.id,
        )
        place, second = int(answer[0]), answer[1]
        if place < 0:
            raise QueueFull(
                f"{int(second)} messages are already waiting in channel {self._name!r}; "
                f"the limit is {self.hub.max_queue}",
                message_id=line.id,
            )
        line.key = second.decode() if isinstance(second, bytes) else str(second)
        return place

    def put(self, message: ChannelMessage) -> None:
        line = message.line
        self._mine[line.key] = message
        if line.expire_s is not None:
            message.expiry = asyncio.get_running_loop().call_later(
                line.expire_s, lambda: self._spawn(self._aexpire(message))
            )
        if line.voice is None:  # a registration still on its way: its id comes later
            message.voice.add_done_callback(lambda f: self._spawn(self._apublish_voice(message)))
        for entry_id, fields in self._early.pop(line.key, []):
            self._answer(entry_id, fields)

    async def _apublish_voice(self, message: ChannelMessage) -> None:
        """The producer's voice for a line queued while it was being registered."""
        line, voice = message.line, message.voice
        stored = _Stored(line, self.hub.server)
        if voice.cancelled():
            await self._adrop(line.key, "cancelled", "its producer left", stop=True)
            return
        if (exc := voice.exception()) is not None:
            error = exc if isinstance(exc, LivevoiceError) else SynthesisFailed("voice failed")
            stored.voice_error = (error.code, error.message)
        else:
            try:
                line.voice = message.seat.protocol.voice_of(message.job).voice_id
            except LivevoiceError as error:
                stored.voice_error = (error.code, error.message)
            if line.voice is None and stored.voice_error is None:
                stored.voice_error = ("voice_failed", "its voice has no id")
        with contextlib.suppress(ChannelUnavailable):
            await self.hub.arun("update", self.keys, self._args(line.key, stored.pack()))

    async def _aexpire(self, message: ChannelMessage) -> None:
        seconds = message.line.expire_s or 0
        await self._adrop(message.line.key, "expired", f"still waiting after {seconds:g} s")

    async def _adrop(self, key: str, code: str, text: str, *, stop: bool = False) -> int:
        try:
            return int(
                await self.hub.arun("drop", self.keys, self._args(key, code, text, int(stop)))
            )
        except ChannelUnavailable:
            log.warning("channel %s: could not drop %s (redis did not answer)", self._name, key)
            return 0

    async def afilter(self, request: ChannelFilter) -> None:
        await self.hub.arun("control", self.keys, self._args("filter", encode(request)))
        self._set_filter(encode(request).encode())

    def _set_filter(self, raw: bytes) -> None:
        request = decode_client(raw.decode())
        if isinstance(request, ChannelFilter):
            rules = word_filter(request)
            self.word_filter = rules if rules.active else None

    async def acancel(self, seat: Seat, message_id: str | None) -> None:
        for key, message in list(self._mine.items()):
            if message.seat is seat and message_id in (None, message.job.id):
                await self._adrop(key, "cancelled", "cancelled", stop=True)

    async def apause(self) -> None:
        await self.hub.arun("control", self.keys, self._args("pause"))

    async def aresume(self) -> None:
        await self.hub.arun("control", self.keys, self._args("resume"))

    async def askip(self) -> None:
        await self.hub.arun("control", self.keys, self._args("skip"))

    async def aclear(self) -> None:
        await self.hub.arun("clear", self.keys, self._args())

    def purge(self, voice_id: str) -> None:
        """R6 orders a purge's ``cancelled`` before its ``voice.deleted``: this server's own
        producers' lines in that voice that have not started are answered now; the queue in
        Redis forgets them (and the other servers' lines) beside."""
        for key, message in list(self._mine.items()):
            if message.line.voice == voice_id and key not in self._started:
                del self._mine[key]
                self._gone.add(key)
                if message.expiry is not None:
                    message.expiry.cancel()
                message.voice.cancel()
                message.seat.dropped(message.job)
        self._spawn(self._apurge(voice_id))

    async def _apurge(self, voice_id: str) -> None:
        """The tenant deleted ``voice_id`` (R16, R6): lines waiting in it end ``cancelled``.
        Every server of the channel hears of the delete and tries: a drop is idempotent."""
        try:
            lines: Any = await self.hub._redis.hgetall(self.keys[1])
        except (RedisError, OSError):
            return
        for raw_key, raw in lines.items():
            key = raw_key.decode()
            stored = _Stored.unpack(raw, key)
            if stored is not None and stored.line.voice == voice_id:
                await self._adrop(key, "cancelled", "its voice was deleted")

    # --- playback positions (R20) ----------------------------------------------------------------
    def played(self, seat: Seat, message: str, ms: float) -> None:
        """Relayed at once to this server's other listeners, and published for the other
        servers' (pub/sub: a position is worth nothing a few hundred ms later, so it is not
        kept in the stream, whose entries are the replay buffer's audio)."""
        for other in self.seats:
            if other is not seat:
                other.played(message, ms)
        self._positions[id(seat)] = (message, ms)
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self._apublish_positions())
            self._tasks.append(self._publishing)
            self._publishing.add_done_callback(self._done)

    async def _apublish_positions(self) -> None:
        """Publish the latest position of each reporter; one publish at a time, so a slow
        Redis holds back only positions (the newest one wins), never a session."""
        topic = _played_topic(self.tenant, self._name)
        while self._positions:
            positions, self._positions = self._positions, {}
            for message, ms in positions.values():
                try:
                    await self.hub._redis.publish(
                        topic, msgpack.packb([self.hub.server, message, ms])
                    )
                except (RedisError, OSError) as exc:
                    log.debug("channel %s: a position was not published (%s)", self._name, exc)

    async def _aplayed_forever(self) -> None:
        """The other servers' listeners' positions, to this server's listeners."""
        topic = _played_topic(self.tenant, self._name)
        while True:
            pubsub = self.hub._reader.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(topic)
                while True:
                    got: Any = await pubsub.get_message(timeout=1.0)
                    if got is not None and got.get("type") == "message":
                        self._on_position(got.get("data", b""))
            except (RedisError, OSError) as exc:
                await self._aretry_after("positions unavailable", exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _aretry_after(self, what: str, exc: BaseException) -> None:
        """A background reader's Redis call failed: a cancellation redis-py turned into that
        error is honoured (see ``RedisTier._run``); anything else is said, then tried again."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from exc
        log.info("channel %s: %s (%s); retrying", self._name, what, exc)
        await asyncio.sleep(0.5)

    def _on_position(self, raw: bytes) -> None:
        try:
            server, message, ms = msgpack.unpackb(raw)
            if server == self.hub.server:
                return  # relayed here when it was reported
            message, ms = str(message), float(ms)
        except Exception:
            log.warning("channel %s: a position could not be read; dropped", self._name)
            return
        for seat in self.seats:
            seat.played(message, ms)

    # --- the stream -----------------------------------------------------------------------------
    async def _aread_forever(self) -> None:
        r = self.hub._reader
        events, requests = self.keys[5], self.keys[6]
        while True:
            try:
                batch: Any = await r.xread(
                    {events: self._cursor[0], requests: self._cursor[1]}, block=BLOCK_MS
                )
            except (RedisError, OSError) as exc:
                await self._aretry_after("reading its stream failed", exc)
                continue
            async with self._feeding:
                for stream, entries in batch or []:
                    is_events = (stream.decode() if isinstance(stream, bytes) else stream) == events
                    for entry_id, fields in entries:
                        try:
                            if is_events:
                                self._cursor = (entry_id, self._cursor[1])
                                self._on_event(entry_id, fields)
                            else:
                                self._cursor = (self._cursor[0], entry_id)
                                self._on_request(fields)
                        except Exception:  # one entry must not stop the channel here
                            log.exception("channel %s: entry %r failed", self._name, entry_id)

    def _on_request(self, fields: dict[bytes, bytes]) -> None:
        op = fields.get(b"op")
        if op == b"stop":
            speaking = self._speaking
            if speaking is not None and speaking.key == _str(fields, "key"):
                speaking.stop.set()
        self._wake.set()

    def _on_event(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        kind, key = fields.get(b"t"), _str(fields, "key")
        if kind == b"pcm":
            fanout = self._fanouts.get(key)
            if fanout is not None:
                at, samples = _stream_id(entry_id), _samples(fields.get(b"pcm", b""))
                if (reading := self._readings.get(key)) and (marks := reading.before(samples)):
                    fanout.mark(marks, at)
                fanout.feed(samples, at)
        elif kind == b"marks":
            if (reading := self._readings.get(key)) is not None:
                reading.take(fields.get(b"marks", b""))
        elif kind == b"start":
            stored = _Stored.unpack(fields.get(b"line", b""), key)
            if stored is None:
                return
            line = stored.line
            if key in self._mine:
                self._started.add(key)
            line.replayed = fields.get(b"replayed") == b"1"
            line.voice = _str(fields, "voice") or None
            after = _stream_id(entry_id)
            listeners = [
                s
                for s in self.seats
                if s.listens and (s not in self._live_after or self._live_after[s] < after)
            ]
            kinds = _kinds(fields)
            reading = _MarkReading.of(kinds, self.hub.engine.sample_rate)
            if reading is not None:
                self._readings[key] = reading
            self._fanouts[key] = Fanout(
                line,
                listeners,
                engine_rate=self.hub.engine.sample_rate,
                frame_ms=self.hub.frame_ms,
                cut_loose=self._cut_loose,
                marks=kinds,
            )
        elif kind == b"end":
            fanout = self._fanouts.pop(key, None)
            reading = self._readings.pop(key, None)
            cancelled = fields.get(b"cancelled") == b"1"
            # the mouth's last partial window, ahead of the audio's tail
            if fanout is not None and reading is not None and not cancelled:
                marks = reading.before(_NO_PCM, last=True)
                if marks is not None:
                    fanout.mark(marks, _stream_id(entry_id))
            if fanout is not None:
                fanout.end(
                    ttfa_ms=float(_str(fields, "ttfa_ms") or 0),
                    cancelled=fields.get(b"cancelled") == b"1",
                    truncated=fields.get(b"truncated") == b"1",
                    at=_stream_id(entry_id),
                    loudness_lufs=_lufs(fields),
                )
            self._answer(entry_id, fields)
        elif kind == b"drop":
            self._answer(entry_id, fields)
        elif kind == b"state":
            self.waiting = int(_str(fields, "waiting") or 0)
            self.paused = fields.get(b"paused") == b"1"
            for seat in self.seats:
                seat.state(waiting=self.waiting, paused=self.paused)
        elif kind == b"filter":
            self._set_filter(fields.get(b"rules", b""))

    def _answer(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """An end or a drop of one of this server's producers' lines: answer the producer."""
        key = _str(fields, "key")
        if fields.get(b"cut") == b"1":
            return  # cut by its speaker's death: it is spoken again, and answered then
        message = self._mine.pop(key, None)
        self._started.discard(key)
        if message is None and key in self._gone:
            self._gone.discard(key)
            return
        if message is None:
            stored = _Stored.unpack(fields.get(b"line", b""), key)
            if stored is not None and stored.origin == self.hub.server:
                self._early.setdefault(key, []).append((entry_id, fields))  # not put yet
            return
        if message.expiry is not None:
            message.expiry.cancel()
        job = message.job
        if fields.get(b"t") == b"end":
            job.cancelled = job.cancelled or fields.get(b"cancelled") == b"1"
            message.seat.spoken(
                job,
                duration_ms=float(_str(fields, "duration_ms") or 0),
                ttfa_ms=float(_str(fields, "ttfa_ms") or 0),
                truncated=fields.get(b"truncated") == b"1",
                loudness_lufs=_lufs(fields),
            )
            return
        code, text = _str(fields, "code"), _str(fields, "message")
        message.voice.cancel()
        if code == "cancelled":
            message.seat.dropped(job)
        elif code == "expired":
            message.seat.failed(job, Expired(text, message_id=job.id))
        else:
            message.seat.failed(job, _error(code, text, job.id))

    def _cut_loose(self, seat: Seat) -> None:
        log.info(
            "channel %s: a listener fell %.1f s behind; cut loose", self._name, seat.buffered_s
        )
        if seat in self.seats:
            self.seats.remove(seat)
        seat.cut_loose()

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("channel %s: background work failed", self._name, exc_info=exc)

    # --- speaking (the lease holder) ------------------------------------------------------------
    async def _astand_forever(self) -> None:
        r, lease, me = self.hub._redis, self.keys[7], self.hub.server
        while not self.closing:
            try:
                got = await r.set(lease, me, nx=True, px=LEASE_MS)
            except (RedisError, OSError):
                got = False
            if got:
                self.leading = True
                log.debug("channel %s: this server speaks it", self._name)
                try:
                    await self._alead()
                except Exception:
                    log.exception("channel %s: speaking failed; standing again", self._name)
                finally:
                    self.leading = False
            await asyncio.sleep(CLAIM_S)

    async def _alead(self) -> None:
        """Speak the channel while the lease holds."""
        me = self.hub.server
        lost = asyncio.Event()
        renew = asyncio.create_task(self._arenew(lost))
        try:
            if await self.hub.arun("takeover", self.keys, self._args(me)):
                self.hub.takeovers += 1
                log.info("channel %s: took over a line cut by its speaker's death", self._name)
            while not lost.is_set() and not self.closing:
                popped = await self.hub.arun("pop", self.keys, self._args(me))
                if not popped:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self._wake.wait()
                    continue
                raw_key, raw_line, replayed = popped
                key = raw_key.decode()
                await self._aspeak(key, raw_line, replayed == b"1", lost)
        except ChannelUnavailable:
            log.info("channel %s: redis did not answer; standing again", self._name)
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew

    async def _arenew(self, lost: asyncio.Event) -> None:
        lease, me = self.keys[7], self.hub.server
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                held = await self.hub.arun("renew", [lease], [me, LEASE_MS])
            except ChannelUnavailable:
                held = 0
            if not held:
                log.warning("channel %s: lost its lease; stopping", self._name)
                lost.set()
                if self._speaking is not None:
                    self._speaking.stop.set()
                return

    async def _anote(self, key: str, *fields: Any) -> bool:
        return bool(
            await self.hub.arun("note", self.keys, self._args(self.hub.server, key, *fields))
        )

    async def _aspeak(self, key: str, raw: bytes, replayed: bool, lost: asyncio.Event) -> None:
        stored = _Stored.unpack(raw, key)
        if stored is None:
            await self._anote(key, "t", "drop", "key", key, "code", "internal_error", "message", "")
            return
        speaking = self._speaking = _Speaking(key)
        try:
            await self._aspeak_line(stored, replayed, speaking, lost)
        finally:
            self._speaking = None

    async def _aspeak_line(
        self, stored: _Stored, replayed: bool, speaking: _Speaking, lost: asyncio.Event
    ) -> None:
        line, key = stored.line, stored.line.key

        async def drop(code: str, text: str) -> None:
            await self._anote(key, "t", "drop", "key", key, "code", code, "message", text)

        if stored.expire_at is not None and time.time() > stored.expire_at:
            await drop("expired", "still waiting after its expire_s")
            return
        try:
            voice = await self._avoice(stored, speaking)
        except LivevoiceError as exc:
            await drop(exc.code, exc.message)
            return
        if voice is None:
            await drop("cancelled", "stopped before it started")
            return
        engine = self.hub.engine
        self.hub.engine_calls += 1
        started = time.perf_counter()
        # Marks are always taken from an engine that has them (cheap: ~0.6 ms of CPU a second
        # of audio): listeners on any server may ask for them, and a replay carries them.
        self._playback.begin()  # not due before the last line's audio ends
        chunks, kinds = speak_marked_in(engine, line.text, voice)  # runs when read
        if not await self._anote(
            key, "t", "start", "key", key, "replayed", int(replayed),
            "voice", line.voice or "", "marks", ",".join(kinds), "line", stored.pack(),
        ):  # fmt: skip
            return  # the lease went meanwhile: the new speaker speaks it
        cap = AudioCap(self.hub.max_message_audio_s, engine.sample_rate)
        spoken, ttfa, piece = 0, None, int(PIECE_S * engine.sample_rate)
        loudness = MessageLoudness(engine.sample_rate)
        try:
            while not speaking.stop.is_set():
                marked = await anext_chunk(chunks, speaking.stop)
                if marked is None or speaking.stop.is_set():
                    break
                chunk = cap.take(marked.pcm)
                if (raw := _pack_marks(marked, spoken + len(chunk))) is not None:
                    await self.hub._redis.xadd(
                        self.keys[5],
                        {"t": "marks", "key": key, "marks": raw},
                        maxlen=REPLAY_ENTRIES,
                        approximate=True,
                    )
                spoken += len(chunk)
                loudness.feed(chunk)
                self._playback.sent(len(chunk) / engine.sample_rate)
                for at in range(0, len(chunk), piece):
                    pcm = to_s16le(chunk[at : at + piece])
                    await self.hub._redis.xadd(
                        self.keys[5],
                        {"t": "pcm", "key": key, "pcm": pcm},
                        maxlen=REPLAY_ENTRIES,
                        approximate=True,
                    )
                if ttfa is None and spoken:
                    ttfa = time.perf_counter() - started
                if cap.reached:
                    break
        except (RedisError, OSError) as exc:
            log.warning(
                "channel %s: redis failed mid-line (%s); it is spoken again", self._name, exc
            )
            return
        finally:
            await chunks.aclose()
        if lost.is_set():
            return  # the next speaker speaks it again, replayed
        await self._anote(
            key, "t", "end", "key", key,
            "cancelled", int(speaking.stop.is_set()),
            "truncated", int(cap.reached),
            "ttfa_ms", round((ttfa or 0.0) * 1000, 3),
            "duration_ms", round(spoken * 1000 / engine.sample_rate, 3),
            "loudness_lufs", "" if (lufs := await loudness.alufs()) is None else lufs,
        )  # fmt: skip

    async def _avoice(self, stored: _Stored, speaking: _Speaking) -> ResolvedVoice | None:
        """The line's voice: by its id, from any server's registration; a line queued while
        its producer's voice was being registered waits for the id (VOICE_WAIT_S)."""
        deadline = time.monotonic() + VOICE_WAIT_S
        while stored.line.voice is None and stored.voice_error is None:
            if speaking.stop.is_set():
                return None
            if time.monotonic() > deadline:
                raise SynthesisFailed("its voice was never registered", message_id=stored.line.id)
            await asyncio.sleep(0.1)
            raw: Any = await self.hub._redis.hget(self.keys[1], stored.line.key)
            if raw is None:
                return None
            fresh = _Stored.unpack(raw, stored.line.key)
            if fresh is not None:
                stored.line.voice, stored.voice_error = fresh.line.voice, fresh.voice_error
        if stored.voice_error is not None:
            raise _error(*stored.voice_error, stored.line.id)
        assert stored.line.voice is not None
        voice = await self.hub.resolve(self.tenant, stored.line.voice)
        if not self.hub.matching:  # an engine that does not match takes no profile
            voice = dataclasses.replace(voice, profile=None)
        return voice


_NO_PCM: Final = np.zeros(0, dtype=np.float32)


def _samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
