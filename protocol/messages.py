"""Message types of the livevoice protocol, one frozen dataclass each.

Control frames are JSON objects with a ``type`` field; every other field is named here. Unknown
fields are ignored so that either side can grow the protocol without breaking the other.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import BadMessage

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        """The JSON object for this message; ``None`` fields are left out."""
        out: dict[str, Any] = {"type": self.TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Message:
        """Build the message from a decoded JSON object, checking every field's type."""
        kwargs: dict[str, Any] = {}
        hints = _hints(cls)
        message_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name not in obj or obj[f.name] is None:
                if required:
                    raise BadMessage(f"{cls.TYPE}: missing field {f.name!r}", message_id=message_id)
                continue
            value = obj[f.name]
            if not _matches(value, hints[f.name]):
                raise BadMessage(
                    f"{cls.TYPE}: field {f.name!r} has the wrong type", message_id=message_id
                )
            kwargs[f.name] = value
        return cls(**kwargs)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field annotation (str, int, float, bool, dict, optionals)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is not None:
        hint = origin
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is Any:
        return True
    return isinstance(value, hint)


# --- client to server ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of every session."""

    TYPE: ClassVar[str] = "hello"
    token: str | None = None
    """Bearer token naming the tenant; optional when the server has no tokens configured."""
    client: str | None = None
    """Free-form client name and version, for the server's logs."""
    protocol: int | None = None
    """Protocol version the client speaks; the server answers ``unsupported`` if it can't."""


@dataclass(frozen=True, slots=True)
class VoiceRegister(Message):
    """Announces a reference clip; the next frame must be the clip itself, as one binary frame.
    With ``sha256`` no clip follows: the server answers from the clip it was sent before."""

    TYPE: ClassVar[str] = "voice.register"
    name: str | None = None
    """Display name of the voice."""
    format: str | None = None
    """Container hint: wav, flac, ogg or mp3. The server sniffs the bytes either way."""
    id: str | None = None
    """Optional request id, echoed in the answer (or the error) so requests can overlap."""
    match: bool | None = None
    """False: speak in the engine's own voice, not matched to this clip (default: matched)."""
    sha256: str | None = None
    """Hex SHA-256 (64 lowercase digits) of a clip's exact bytes this tenant registered before:
    answered ``voice.ready`` without the upload, or ``clip_needed`` (send the clip)."""


@dataclass(frozen=True, slots=True)
class VoiceUse(Message):
    """Pins a voice this tenant registered before, by id, without uploading the clip again."""

    TYPE: ClassVar[str] = "voice.use"
    voice_id: str
    id: str | None = None
    """Optional request id, echoed in the answer (or the error) so requests can overlap."""
    match: bool | None = None
    """False: speak in the engine's own voice, not matched to this clip (default: matched)."""


@dataclass(frozen=True, slots=True)
class VoiceDelete(Message):
    """Forgets a voice of this tenant and purges its embedding from every cache tier."""

    TYPE: ClassVar[str] = "voice.delete"
    voice_id: str
    id: str | None = None
    """Optional request id, echoed in the answer (or the error) so requests can overlap."""


@dataclass(frozen=True, slots=True)
class Speak(Message):
    """A chat message to speak, queued behind those sent before it."""

    TYPE: ClassVar[str] = "speak"
    id: str
    """Client-chosen message id, unique among this session's queued messages."""
    text: str
    sample_rate: int | None = None
    """Output rate: the engine's native rate when absent, else one of ``ready.formats``. In a
    channel the listeners' rates apply (``channel.join``) and this one is not used."""
    user: str | None = None
    """Display name of who wrote the message (a chat user); passed through to listeners."""
    kind: str | None = None
    """What the message is (``chat``, ``sub``, ``bits``, ``raid``, ``redeem``...); passed through
    to listeners."""
    priority: int | None = None
    """Channel messages only: its lane, 0 (plain chat, the default) to 9; higher lanes are
    spoken first, each lane in the order sent."""
    interrupt: bool | None = None
    """Channel messages only: cut the message being spoken at its next frame and speak this one
    next."""
    expire_s: float | None = None
    """Channel messages only: dropped (``expired``) if still waiting this many seconds after it
    was queued."""
    voice_id: str | None = None
    """Channel messages only: speak it in this voice of the tenant (a viewer's own voice)
    instead of the producer's pinned one."""
    marks: bool | None = None
    """True: this message's own stream carries ``audio.marks`` (words, visemes, mouth)."""


@dataclass(frozen=True, slots=True)
class ChannelJoin(Message):
    """Joins the tenant's channel ``channel`` (one per session): speak, listen or both."""

    TYPE: ClassVar[str] = "channel.join"
    channel: str
    role: str
    """``speak`` (sends ``speak`` and the queue controls), ``listen`` (receives the channel's
    audio and events) or ``both``."""
    sample_rate: int | None = None
    """The rate this listener hears the channel at: the engine's native rate when absent."""
    id: str | None = None
    resume_message: str | None = None
    """A listener coming back: the channel message (``audio.start``'s ``message``) it last
    played; what followed is replayed from the channel's buffer of recent audio."""
    resume_seq: int | None = None
    """The sequence number, in that message, of the last frame it played (see ``resumed_from``)."""
    marks: bool | None = None
    """True: this listener's streams carry ``audio.marks``."""


@dataclass(frozen=True, slots=True)
class Played(Message):
    """A listener's playback position: samples of ``stream`` it has actually played. The
    server passes the latest to the channel's other listeners (``channel.played``)."""

    TYPE: ClassVar[str] = "played"
    stream: int
    samples: int


@dataclass(frozen=True, slots=True)
class ChannelPause(Message):
    """Holds the channel's queue after the current message."""

    TYPE: ClassVar[str] = "channel.pause"
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelResume(Message):
    TYPE: ClassVar[str] = "channel.resume"
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelSkip(Message):
    """Stops the message being spoken now; the next one follows (unless paused)."""

    TYPE: ClassVar[str] = "channel.skip"
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelClear(Message):
    """Drops every message waiting in the channel (the current one plays on)."""

    TYPE: ClassVar[str] = "channel.clear"
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelFilter(Message):
    """Sets the channel's word filter for messages admitted after it (R17); an empty list
    without ``links`` turns it off."""

    TYPE: ClassVar[str] = "channel.filter"
    words: list[str]
    """Literal words, each with at most one ``*`` (any run of letters or digits), matched
    case-insensitively as whole words."""
    action: str = "mask"
    """``mask`` (a matched word is spoken as "beep") or ``drop`` (the message is refused
    ``filtered``)."""
    links: bool = False
    """Speak URLs as "link"."""
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Stops one message (``id``) or, without ``id``, the current one and everything queued."""

    TYPE: ClassVar[str] = "cancel"
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    id: str | None = None


# --- server to client ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready(Message):
    TYPE: ClassVar[str] = "ready"
    session_id: str
    protocol: int = PROTOCOL_VERSION
    limits: dict[str, Any] = field(default_factory=dict)
    """The limits this server enforces (clip bytes/seconds, text length, queue depth...)."""
    formats: dict[str, Any] = field(default_factory=dict)
    """Accepted clip containers, output encodings and sample rates."""
    features: list[str] | None = None
    """Parts of protocol 1 added after its first form that this server speaks (``FEATURES``);
    absent from an older server, which ignores the fields they add."""


FEATURES = ("register_sha256",)
"""``ready.features`` of this version: ``register_sha256``, a ``voice.register`` by ``sha256``
without the clip (a server without it would wait for the clip that never comes)."""


@dataclass(frozen=True, slots=True)
class VoiceReady(Message):
    TYPE: ClassVar[str] = "voice.ready"
    voice_id: str
    source: str
    """Where the embedding came from: ``l1``, ``redis`` or ``encoder``."""
    ms: float
    """Server-side milliseconds from the clip's arrival (or voice.use) to the pinned voice."""
    name: str | None = None
    duration_s: float | None = None
    """Duration of the reference clip."""
    id: str | None = None
    """The ``id`` of the ``voice.register`` or ``voice.use`` this answers."""
    quality: dict[str, Any] | None = None
    """What the server found in a newly registered clip: ``speech_s`` (voiced seconds),
    ``level_dbfs`` (RMS of the speech), ``clipped`` (fraction of clipped samples) and
    ``warnings`` (list of short strings, empty for a good clip). Absent for ``voice.use``."""
    matched: dict[str, Any] | None = None
    """What the engine matches of this voice — *matched*, not cloned: ``pitch_hz`` (the pitch
    median it aims at), ``pitch_range``, ``formants`` (ratio to the engine's own), ``pace``
    (ratio of speaking rate), ``clamped`` (which of ``pitch``, ``pitch_range``, ``formants``,
    ``pace`` the limits held back). Absent when the request said ``match: false``, the
    engine does not match voices, or no profile is known for the voice."""


@dataclass(frozen=True, slots=True)
class VoiceDeleted(Message):
    """A voice was deleted: the answer to ``voice.delete``, and a notice to every session that
    had it pinned (which then has no voice until it registers or uses another)."""

    TYPE: ClassVar[str] = "voice.deleted"
    voice_id: str | None = None
    """The deleted voice's id, for sessions of the tenant that owned it (else absent)."""
    pinned: bool = False
    """True when this session had the voice pinned and has lost it."""
    id: str | None = None
    """The ``id`` of the ``voice.delete`` this answers."""


@dataclass(frozen=True, slots=True)
class Queued(Message):
    """Acknowledges an accepted ``speak``; every accepted message later ends in exactly one of
    ``audio.end``, ``cancelled`` or an ``error`` carrying its id."""

    TYPE: ClassVar[str] = "queued"
    id: str
    position: int
    """Messages ahead of this one (0: it starts now)."""


@dataclass(frozen=True, slots=True)
class AudioStart(Message):
    """Announces the audio format once per message; binary frames of ``stream`` follow."""

    TYPE: ClassVar[str] = "audio.start"
    id: str
    stream: int
    sample_rate: int
    channels: int = 1
    encoding: str = "s16le"
    channel: str | None = None
    """Set for a channel's message heard as a listener; the fields below come with it."""
    text: str | None = None
    """The text as spoken (after cleaning)."""
    voice: str | None = None
    """The id of the voice it is spoken in."""
    user: str | None = None
    kind: str | None = None
    message: str | None = None
    """The channel's own key for the message: the same on every server and across reconnects
    (what a listener passes back in ``channel.join``'s ``resume_message``)."""
    replayed: bool | None = None
    """True: spoken again from its start: the server speaking the channel stopped mid-way (it died)
    and another one took the channel over."""
    resumed_from: int | None = None
    """The message's own sequence number of this stream's frame 0 (absent: 0): a listener
    that resumed mid-way hears the rest of it from there."""
    marks: list[str] | None = None
    """Present when the session asked for marks: the kinds of ``audio.marks`` this stream
    carries (``words``, ``visemes``, ``mouth``; ``mouth`` alone for an engine without phoneme
    alignments)."""


@dataclass(frozen=True, slots=True)
class AudioMarks(Message):
    """What is said when, for the audio frames after it: times in samples of ``stream`` at its
    rate, start inclusive, end exclusive. Sent before the first frame it describes."""

    TYPE: ClassVar[str] = "audio.marks"
    id: str
    stream: int
    words: list[dict[str, Any]] | None = None
    """``{"text", "start", "end"}`` per word, in order."""
    visemes: list[dict[str, Any]] | None = None
    """``{"v", "start", "end"}``: one of the 15 Oculus visemes (``sil PP FF TH DD kk CH SS nn
    RR aa E ih oh ou``)."""
    mouth: dict[str, Any] | None = None
    """``{"start", "rate", "values"}``: mouth-open 0..1 at ``rate`` values a second, the first
    for the window from sample ``start``."""


@dataclass(frozen=True, slots=True)
class AudioEnd(Message):
    TYPE: ClassVar[str] = "audio.end"
    id: str
    stream: int
    frames: int
    samples: int
    duration_ms: float
    ttfa_ms: float
    """Milliseconds from the message leaving the queue to its first audio frame being sent."""
    cancelled: bool = False
    """True when the message was cut short by ``cancel``: the audio sent so far is all there is."""
    truncated: bool = False
    """True when the message reached the server's cap on audio per message
    (``max_message_audio_s``): the rest of its text was not spoken."""
    channel: str | None = None
    """Set on a listener's stream of a channel's message (as in its ``audio.start``)."""
    loudness_lufs: float | None = None
    """The message's integrated loudness as sent (ITU-R BS.1770, LUFS), measured on all of
    its audio; audio under 400 ms is measured as one block of its own length. Absent when
    nothing audible was sent, or the server does not measure."""


@dataclass(frozen=True, slots=True)
class ChannelJoined(Message):
    TYPE: ClassVar[str] = "channel.joined"
    channel: str
    role: str
    id: str | None = None
    resumed: bool | None = None
    """Set when the join asked to resume: true, the replay from there follows; false, that
    message is no longer in the channel's buffer of recent audio (live from now)."""


@dataclass(frozen=True, slots=True)
class ChannelState(Message):
    """The channel's queue changed: sent to every member."""

    TYPE: ClassVar[str] = "channel.state"
    channel: str
    waiting: int
    """Messages waiting, not counting the one being spoken."""
    paused: bool


@dataclass(frozen=True, slots=True)
class ChannelFiltered(Message):
    """The answer to ``channel.filter``: the filter in effect for messages admitted from now."""

    TYPE: ClassVar[str] = "channel.filtered"
    channel: str
    words: int
    """Patterns in the filter (0: no word filter)."""
    action: str
    links: bool
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelPlayed(Message):
    """Another listener of the channel has played ``ms`` milliseconds of ``message`` (the
    channel's key for it, as in ``audio.start``)."""

    TYPE: ClassVar[str] = "channel.played"
    channel: str
    message: str
    ms: float


@dataclass(frozen=True, slots=True)
class Cancelled(Message):
    """A queued message dropped by ``cancel`` before any of its audio was sent."""

    TYPE: ClassVar[str] = "cancelled"
    id: str


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    id: str | None = None
    """The message id this error concerns, when it concerns one."""


CLIENT_MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (
        Hello,
        VoiceRegister,
        VoiceUse,
        VoiceDelete,
        Speak,
        Cancel,
        Ping,
        ChannelJoin,
        ChannelPause,
        ChannelResume,
        ChannelSkip,
        ChannelClear,
        ChannelFilter,
        Played,
    )
}
SERVER_MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (
        Ready,
        VoiceReady,
        VoiceDeleted,
        Queued,
        AudioStart,
        AudioEnd,
        Cancelled,
        Pong,
        Error,
        ChannelJoined,
        ChannelState,
        ChannelFiltered,
        AudioMarks,
        ChannelPlayed,
    )
}
