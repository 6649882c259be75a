"""The server side of a session, sans-I/O: every session rule, in one place.

Frames in (``receive_text`` / ``receive_binary``), the client's requests out as messages (or a
typed ``LivevoiceError``); what the server learns meanwhile (a voice landed or failed, audio
synthesized, a voice purged) comes in through the methods below, and every frame the session
must send comes out of ``data_to_send()`` in the order it must be sent. The I/O layer only moves
frames and does the slow work (decoding clips, the voice store, synthesis); it decides nothing
this module decides.

The rules, numbered so code and tests can name them:

- **R1 hello.** In ``AWAIT_HELLO`` only ``hello`` is accepted (``hello_required``, keeping a
  speak's id); a protocol version other than ours is ``unsupported``. A second ``hello`` is
  ``unexpected_message``.
- **R2 clip.** ``voice.register`` moves to ``AWAIT_CLIP``: the next frame must be the clip as one
  binary frame — unless it carries ``sha256`` (64 lowercase hex digits, else ``bad_message``):
  then no clip follows, and it starts a voice request at once (R3), answered from the clip the
  tenant sent before or with ``clip_needed``. A text frame where the clip was expected drops
  the registration (``clip_expected``, with its id) and is not read. A binary frame anywhere
  else is ``unexpected_binary``. An unknown clip format is ``unsupported``; an empty clip
  ``clip_empty``; one over ``max_clip_bytes`` ``clip_too_large``.
- **R3 voice requests.** A clip that arrived, a ``voice.register`` by ``sha256``, or a
  ``voice.use``, starts a voice request; speaks accepted after it are spoken in its voice.
  Requests are answered as they complete, each with its
  ``id``: ``voice.ready`` (the voice is pinned) or an ``error``.
- **R4 fallback.** When a request fails, the speaks accepted under it are spoken in the voice
  requested before it, and so on back; only when none is left do they end ``voice_failed``, and
  the session has no voice.
- **R5 no voice.** ``speak`` needs a voice pinned or on its way (``no_voice``).
- **R6 purge.** A purge of the voice id pinned here drops the voice (R5 holds until another is
  requested), cancels every waiting speak and stops the current one, then says ``voice.deleted``
  with ``pinned: true`` — as the answer to this session's own ``voice.delete`` if one is in
  flight, else as a notice.
- **R7 admission.** A speak's checks, in order: blank text, ``max_text_chars``, sample rate, R5,
  nothing speakable after cleaning (``empty_text``), id already waiting or speaking
  (``duplicate_id``), ``max_queue`` waiting (``queue_full``). Admitted, it is answered
  ``queued`` with the number of messages ahead of it.
- **R8 order.** Speaks are spoken one at a time in the order admitted. Each started one gets the
  next stream number (from 1); its audio frames are numbered 0, 1, 2… within the stream.
- **R9 cancel.** ``cancel`` with an id drops that message, without one every message: a waiting
  one ends ``cancelled``; the current one stops, sends no more audio, and ends with ``audio.end``
  ``cancelled: true`` (or ``cancelled`` if its audio had not started).
- **R10 ends once.** Every admitted speak ends exactly once: ``audio.end``, ``cancelled``, or an
  ``error`` carrying its id. Nothing is sent for it after that.
- **R11 errors.** No rejection changes the state except where R2, R4 and R6 say so; an error
  with a close code (``LivevoiceError.close_code``) is the last frame: the session closes.
- **R12 join.** ``channel.join`` names a channel (1 to 64 of ``A-Z a-z 0-9 _ - .``, else
  ``bad_channel``), a role (``speak``, ``listen``, ``both``, else ``unsupported``) and, for a
  listener, a sample rate (``unsupported_sample_rate``). A session joins at most one channel
  (a second join is ``unexpected_message``); joined, it is answered ``channel.joined``. A
  session that joins nothing is bound by R1 to R11 alone.
- **R13 speakers.** In a channel, ``speak`` and the queue controls need the speak role (else
  ``not_a_speaker``; a control outside a channel is ``not_a_speaker`` too). A speaker's admitted
  speak goes to the channel's queue: R7 holds (its ``queue_full`` is the channel's), ``queued``
  carries its place in the channel, and it ends once (R10) on the producer's session: ``cancelled``
  before its audio started, an ``error``, or ``audio.end`` with ``stream: 0`` and no frames —
  its completion without the audio, which only listeners get.
- **R14 listeners.** A listener hears each channel message as a stream of its own session (R8's
  numbering): ``audio.start`` with ``channel``, ``text``, ``voice``, ``user`` and ``kind``, its
  frames, and ``audio.end`` with ``channel``; and ``channel.state`` whenever the queue changes.
- **R15 lanes.** A channel speak may carry ``priority`` (0 to ``MAX_PRIORITY``, default 0),
  ``interrupt`` and ``expire_s`` (above 0, at most ``MAX_EXPIRE_S``); out of range, or outside
  a channel, they are ``unsupported``. The channel's waiting
  messages are kept in lanes: a message goes behind every waiting one of its lane or a higher
  one and ahead of every lower one (``channel_place``), so a lane is never reordered and
  ``queued.position`` counts what is ahead of it. An ``interrupt`` goes ahead of everything
  waiting and stops the current message (``audio.end`` ``cancelled: true``, as a skip). One
  still waiting ``expire_s`` after it was queued ends with the error ``expired``.
- **R16 message voice.** A channel speak may name ``voice_id``, a voice of the tenant: it is
  spoken in that voice instead of the producer's pinned one, so it needs no pinned voice (R5).
  Resolved beside the queue; an id the tenant does not have ends that message with
  ``voice_not_found`` and the channel goes on. Outside a channel it is ``unsupported``. A
  waiting message whose ``voice_id`` is deleted (R6's purge) ends ``cancelled``, unspoken.
- **R17 word filter.** ``channel.filter`` (speak role, else ``not_a_speaker``) sets the
  channel's filter for messages admitted after it: at most ``MAX_WORDS`` patterns of
  ``MAX_WORD_CHARS``, each a literal word with at most one ``*``, an ``action`` (``mask`` or
  ``drop``) and ``links``; out of bounds it is ``unsupported``. Answered ``channel.filtered``.
  Off by default. Applied to a speak's cleaned text (``WordFilter.apply``): a matched word is
  spoken as "beep", or the speak is refused ``filtered`` (not queued); with ``links`` a URL is
  spoken as "link".
- **R18 resume.** A listener's ``audio.start`` names the channel's key for the message
  (``message``), the same on every server. A ``channel.join`` (listen or both) may pass back
  the last one it played and that frame's sequence number in the message (``resume_message``,
  ``resume_seq``; the two come together, else ``bad_message``): ``channel.joined`` says
  ``resumed``, and when true the rest of that message (``resumed_from`` on its ``audio.start``:
  the message's sequence number of the stream's frame 0) and every message after it are
  replayed from the channel's buffer of recent audio before it hears the channel live. A
  message spoken again because the server speaking it died mid-way comes with ``replayed``.
- **R19 marks.** A ``speak`` with ``marks: true`` (its own stream) or a ``channel.join`` with
  ``marks: true`` (each stream the listener hears) asks for marks: that stream's
  ``audio.start`` lists the kinds it carries in ``marks``, and ``audio.marks`` messages come
  in-band, each before the first frame it describes. Nothing changes for a session that did not
  ask.
- **R20 played.** A listener (else ``unexpected_message``) may send ``played`` (one of its
  last ``PLAYED_STREAMS`` streams of a channel message, samples played): the server passes it
  on as ``channel.played`` (the channel's key of the message, milliseconds) to the channel's
  other listeners, at most one per ``PLAYED_INTERVAL_S`` of each reporter; the rest are
  dropped, unanswered.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .codec import AudioFrame, decode_client, encode
from .errors import (
    BadChannel,
    BadMessage,
    ClipEmpty,
    ClipExpected,
    ClipTooLarge,
    DuplicateId,
    EmptyText,
    HelloRequired,
    LivevoiceError,
    NotASpeaker,
    NoVoice,
    QueueFull,
    TextTooLong,
    UnexpectedBinary,
    UnexpectedMessage,
    Unsupported,
    UnsupportedSampleRate,
    VoiceFailed,
)
from .messages import (
    FEATURES,
    PROTOCOL_VERSION,
    AudioEnd,
    AudioMarks,
    AudioStart,
    Cancel,
    Cancelled,
    ChannelClear,
    ChannelFilter,
    ChannelFiltered,
    ChannelJoin,
    ChannelJoined,
    ChannelPause,
    ChannelPlayed,
    ChannelResume,
    ChannelSkip,
    ChannelState,
    Error,
    Hello,
    Message,
    Ping,
    Played,
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
from .wordfilter import WordFilter

CLIP_FORMATS = ("wav", "flac", "ogg", "mp3")
SAMPLE_RATES = (16000, 22050, 24000, 48000)
"""Output rates a ``speak`` may ask for (``ready.formats.sample_rates``)."""


ROLES = ("speak", "listen", "both")
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
CHANNEL_CONTROLS = (ChannelPause, ChannelResume, ChannelSkip, ChannelClear)
MAX_PRIORITY = 9
"""The highest lane of a channel speak (R15): paid events, raids; 0 is plain chat."""
MAX_EXPIRE_S = 3600.0
"""The longest ``expire_s`` a channel speak may ask for (R15)."""
PLAYED_INTERVAL_S = 0.1
"""R20: at most one ``played`` per this many seconds of a reporter is relayed."""
PLAYED_STREAMS = 8
"""R20: a listener's most recent streams a ``played`` may name."""


def channel_place(waiting: list[int], priority: int, *, interrupt: bool = False) -> int:
    """Where a new message goes among the channel's waiting ones, given their priorities in
    queue order (R15): behind its own lane and every higher one, ahead of every lower one; an
    interrupt goes first. The index is also the number of waiting messages ahead of it."""
    if interrupt:
        return 0
    for index, ahead in enumerate(waiting):
        if ahead < priority:
            return index
    return len(waiting)


def word_filter(message: ChannelFilter) -> WordFilter:
    """The filter a ``channel.filter`` sets (R17); ``unsupported`` out of bounds."""
    return WordFilter.compile(
        message.words, action=message.action, links=message.links, message_id=message.id
    )


@dataclass(frozen=True, slots=True)
class Membership:
    """The channel this session joined (R12)."""

    channel: str
    role: str
    sample_rate: int | None = None
    marks: bool = False

    @property
    def speaks(self) -> bool:
        return self.role in ("speak", "both")

    @property
    def listens(self) -> bool:
        return self.role in ("listen", "both")


@dataclass(slots=True, eq=False)
class ListenStream:
    """One channel message as a listener hears it: a stream of the listener's session (R14)."""

    id: str
    channel: str
    stream: int
    sample_rate: int
    frames: int = 0
    samples: int = 0
    ended: bool = False
    message: str | None = None
    marks: bool = False
    offset: int = 0
    """Samples of the message before this stream's first (a resumed listener's, R18): what a
    ``played`` position is counted from in the message (R20)."""


def _audio_end(
    message_id: str,
    stream: int,
    frames: int,
    samples: int,
    sample_rate: int,
    *,
    ttfa_ms: float,
    cancelled: bool,
    truncated: bool,
    channel: str | None = None,
    loudness_lufs: float | None = None,
) -> AudioEnd:
    """The ``audio.end`` of a stream, its duration counted from the samples sent (R10)."""
    return AudioEnd(
        id=message_id,
        stream=stream,
        frames=frames,
        samples=samples,
        duration_ms=round(samples * 1000 / sample_rate, 3),
        ttfa_ms=ttfa_ms,
        cancelled=cancelled,
        truncated=truncated,
        channel=channel,
        loudness_lufs=loudness_lufs,
    )


class SessionState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    AWAIT_CLIP = "await_clip"
    """After ``voice.register``: the next frame must be the binary clip."""
    CLOSED = "closed"
    """An error with a close code was sent (R11): nothing more is read or sent."""


@dataclass(slots=True, eq=False, weakref_slot=True)
class VoiceRequest:
    """A ``voice.register`` whose clip arrived, or a ``voice.use`` (R3)."""

    id: str | None
    """The client's request id, echoed in the answer."""
    fallback: VoiceRequest | None
    """The request before it: its speaks' voice if this one fails (R4)."""
    voice_id: str | None = None
    """Set when the voice is pinned."""
    failed: bool = False

    @property
    def pending(self) -> bool:
        return self.voice_id is None and not self.failed


@dataclass(frozen=True, slots=True)
class ClipUpload:
    """A ``voice.register`` together with the clip bytes that followed it (R2)."""

    register: VoiceRegister
    data: bytes
    request: VoiceRequest | None = field(default=None, compare=False)
    """The voice request the clip started (R3)."""


@dataclass(slots=True, eq=False)
class SpeakJob:
    """An admitted ``speak``, from ``queued`` to its one ending (R10)."""

    id: str
    text: str
    """Cleaned: what the engine speaks."""
    sample_rate: int | None
    voice: VoiceRequest
    """The voice request that was newest when the message was admitted (R3)."""
    marks: bool = False
    """R19: its own stream carries ``audio.marks``."""
    stream: int | None = None
    frames: int = 0
    samples: int = 0
    cancelled: bool = False
    ended: bool = False


@dataclass(slots=True, eq=False)
class PendingDelete:
    """A ``voice.delete`` in flight; ``hit`` once it purged this session's pinned voice (R6)."""

    message: VoiceDelete
    hit: bool = False


class ServerProtocol:
    """The rules of one session (see the module docstring), with no I/O."""

    def __init__(
        self,
        *,
        max_clip_bytes: int = 10 * 1024 * 1024,
        max_text_chars: int = 2000,
        max_queue: int = 32,
        sample_rates: tuple[int, ...] = SAMPLE_RATES,
        clean_text: Callable[[str], str] = str.strip,
    ) -> None:
        self.max_clip_bytes = max_clip_bytes
        self.max_text_chars = max_text_chars
        self.max_queue = max_queue
        self.sample_rates = sample_rates
        self.clean_text = clean_text
        """Chat text as it will be spoken (R7): empty when nothing in it is speakable."""
        self.state = SessionState.AWAIT_HELLO
        self.close_code: int | None = None
        """Set with the error that ends the session (R11)."""
        self.close_reason = ""
        self._register: VoiceRegister | None = None
        self._voice: VoiceRequest | None = None
        """The request new speaks are bound to; None: no voice (R5)."""
        self.pinned_voice_id: str | None = None
        """The voice id pinned last: purges are matched by it, never by content (R6)."""
        self._deletes: list[PendingDelete] = []
        self.membership: Membership | None = None
        """The channel joined (R12); None: the session is on its own."""
        self._channel_jobs: dict[str, SpeakJob] = {}
        """This session's speaks in its channel's queue, until each ends (R13)."""
        self._waiting: deque[SpeakJob] = deque()
        self.current: SpeakJob | None = None
        self._streams = 0
        self._heard: dict[int, ListenStream] = {}
        """R20: the listener's recent streams, by number, for ``played``."""
        self._played_at = float("-inf")
        self._frame_ms = 100
        """The frame length `ready` announced (a resumed stream's offset counts in frames)."""
        self._out: list[str | bytes] = []
        self._ended: list[tuple[SpeakJob, str]] = []
        self._errors: list[str] = []

    # --- output -------------------------------------------------------------------------------
    def data_to_send(self) -> list[str | bytes]:
        """Frames to send, in order, since the last call: text frames as ``str``, audio as
        ``bytes``."""
        out, self._out = self._out, []
        return out

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def speaks_ended(self) -> list[tuple[SpeakJob, str]]:
        """Speaks that ended since the last call, each with ``spoken``, ``cancelled`` or
        ``failed`` (for the server's metrics)."""
        ended, self._ended = self._ended, []
        return ended

    def errors_sent(self) -> list[str]:
        """Codes of the errors sent since the last call (for the server's metrics)."""
        codes, self._errors = self._errors, []
        return codes

    def _send(self, message: Message) -> None:
        if self.state is not SessionState.CLOSED:
            self._out.append(encode(message))
            if isinstance(message, Error):
                self._errors.append(message.code)

    def reject(self, exc: LivevoiceError) -> None:
        """Send ``exc`` as an ``error`` with the id it was built with; an error with a close code
        closes the session (R11)."""
        self._send(Error(code=exc.code, message=exc.message, id=exc.message_id))
        if exc.close_code is not None and self.state is not SessionState.CLOSED:
            self.close_code = exc.close_code
            self.close_reason = exc.code
            self.state = SessionState.CLOSED

    def _reject_for(self, message_id: str | None, exc: LivevoiceError) -> None:
        """``exc`` as the answer to the request ``message_id``, whatever id it was raised with."""
        self._send(Error(code=exc.code, message=exc.message, id=message_id))

    # --- frames in ----------------------------------------------------------------------------
    def receive_text(self, frame: str | bytes) -> Message:
        """Decode and check one control frame (R1, R2, R5, R7, R9); ping and cancel are
        answered here."""
        if self.state is SessionState.AWAIT_CLIP:  # R2
            register = self._register
            self.state = SessionState.OPEN
            self._register = None
            raise ClipExpected(
                "voice.register must be followed by the clip as one binary frame",
                message_id=register.id if register is not None else None,
            )
        message = decode_client(frame)
        if self.state is SessionState.AWAIT_HELLO:  # R1
            if not isinstance(message, Hello):
                raise HelloRequired(
                    f"the first message must be hello, not {message.TYPE}",
                    message_id=getattr(message, "id", None),
                )
            if message.protocol is not None and message.protocol != PROTOCOL_VERSION:
                raise Unsupported(f"protocol version {message.protocol} is not supported")
            self.state = SessionState.OPEN
            return message
        if isinstance(message, Hello):
            raise UnexpectedMessage("hello was already received")
        if isinstance(message, VoiceRegister):
            if message.format is not None and message.format.lower() not in CLIP_FORMATS:
                raise Unsupported(
                    f"clip format must be one of {', '.join(CLIP_FORMATS)}", message_id=message.id
                )
            if message.sha256 is not None:
                if not _SHA256.fullmatch(message.sha256):
                    raise BadMessage(
                        "voice.register: sha256 must be 64 lowercase hex digits",
                        message_id=message.id,
                    )
                self._start_voice(message.id)  # R3: no clip follows
                return message
            self.state = SessionState.AWAIT_CLIP
            self._register = message
        elif isinstance(message, VoiceUse):
            self._start_voice(message.id)
        elif isinstance(message, VoiceDelete):
            self._deletes.append(PendingDelete(message))
        elif isinstance(message, Speak):
            if self.membership is not None and not self.membership.speaks:  # R13
                raise NotASpeaker(
                    "this session joined its channel to listen", message_id=message.id
                )
            return self._check_speak(message)
        elif isinstance(message, ChannelJoin):
            self._check_join(message)
        elif isinstance(message, ChannelFilter):
            if self.membership is None or not self.membership.speaks:  # R17
                raise NotASpeaker(
                    f"{message.TYPE} needs a channel joined to speak", message_id=message.id
                )
            rules = word_filter(message)
            self._send(
                ChannelFiltered(
                    channel=self.membership.channel,
                    words=len(rules.literals) + len(rules.wildcards),
                    action=rules.action,
                    links=rules.links,
                    id=message.id,
                )
            )
        elif isinstance(message, CHANNEL_CONTROLS):
            if self.membership is None or not self.membership.speaks:  # R13
                raise NotASpeaker(
                    f"{message.TYPE} needs a channel joined to speak", message_id=message.id
                )
        elif isinstance(message, Played):
            if self.membership is None or not self.membership.listens:  # R20
                raise UnexpectedMessage("played is for a channel's listeners")
        elif isinstance(message, Cancel):
            self.cancel(message.id)
        elif isinstance(message, Ping):
            self._send(Pong(id=message.id))
        return message

    def receive_binary(self, frame: bytes) -> ClipUpload:
        """Check a binary frame: only a clip right after ``voice.register`` (R2). The clip
        starts a voice request (R3)."""
        if self.state is SessionState.AWAIT_HELLO:
            raise HelloRequired("the first message must be hello")
        if self.state is not SessionState.AWAIT_CLIP or self._register is None:
            raise UnexpectedBinary("a binary frame is only expected right after voice.register")
        register = self._register
        self.state = SessionState.OPEN
        self._register = None
        if not frame:
            raise ClipEmpty("the clip is empty", message_id=register.id)
        if len(frame) > self.max_clip_bytes:
            raise ClipTooLarge(
                f"the clip is {len(frame)} bytes; the limit is {self.max_clip_bytes}",
                message_id=register.id,
            )
        return ClipUpload(register, bytes(frame), self._start_voice(register.id))

    # --- hello --------------------------------------------------------------------------------
    def accept_hello(
        self, *, session_id: str, limits: dict[str, Any], default_sample_rate: int, frame_ms: int
    ) -> None:
        """The server admitted the client: ``ready``, with the limits and formats it serves."""
        formats = {
            "clip": list(CLIP_FORMATS),
            "encoding": ["s16le"],
            "sample_rates": list(self.sample_rates),
            "default_sample_rate": default_sample_rate,
            "frame_ms": frame_ms,
        }
        self._frame_ms = frame_ms
        self._send(
            Ready(session_id=session_id, limits=limits, formats=formats, features=list(FEATURES))
        )

    # --- voices (R3, R4, R6) ------------------------------------------------------------------
    def _start_voice(self, request_id: str | None) -> VoiceRequest:
        request = VoiceRequest(request_id, self._voice)
        self._voice = request
        return request

    def voice_pinned(self, request: VoiceRequest, ready: VoiceReady) -> None:
        """The request's voice is pinned: answer ``voice.ready`` with the request's id."""
        request.voice_id = ready.voice_id
        request.fallback = None  # R4 asks for it only if this request fails
        self.pinned_voice_id = ready.voice_id
        self._send(dataclasses.replace(ready, id=request.id))

    def voice_failed(self, request: VoiceRequest, exc: LivevoiceError) -> None:
        """The request failed: answer its error; new speaks fall back (R4)."""
        request.failed = True
        self._reject_for(request.id, exc)
        if self._voice is request:
            self._voice = self._usable(request.fallback)

    @staticmethod
    def _usable(request: VoiceRequest | None) -> VoiceRequest | None:
        while request is not None and request.failed:
            request = request.fallback
        return request

    def voice_of(self, job: SpeakJob) -> VoiceRequest:
        """The request whose voice ``job`` is spoken in now (R4): pinned, or still pending (wait
        for it, then ask again). ``VoiceFailed`` when none is left."""
        request = self._usable(job.voice)
        if request is None:
            raise VoiceFailed("this message's voice could not be registered", message_id=job.id)
        return request

    def purge(self, voice_id: str) -> bool:
        """A voice id of this session's tenant was deleted (here or on another server). True if
        it was the one pinned here (R6)."""
        if voice_id != self.pinned_voice_id:
            return False
        self.pinned_voice_id = None
        # The history is gone: a pending request stays the voice of later speaks, with nothing
        # to fall back to; with none pending the session has no voice.
        pending = self._voice if self._voice is not None and self._voice.pending else None
        if pending is not None:
            pending.fallback = None
        self._voice = pending
        self.cancel(None)
        own = next((d for d in self._deletes if d.message.voice_id == voice_id), None)
        if own is not None:
            own.hit = True  # answered by voice_deleted, after the delete completes
        else:
            self._send(VoiceDeleted(pinned=True))
        return True

    def voice_deleted(self, delete: VoiceDelete) -> None:
        """This session's ``voice.delete`` completed: answer it."""
        own = self._take_delete(delete)
        self._send(VoiceDeleted(voice_id=delete.voice_id, pinned=own.hit, id=delete.id))

    def delete_failed(self, delete: VoiceDelete, exc: LivevoiceError) -> None:
        self._take_delete(delete)
        self._reject_for(delete.id, exc)

    def _take_delete(self, delete: VoiceDelete) -> PendingDelete:
        own = next(d for d in self._deletes if d.message is delete)
        self._deletes.remove(own)
        return own

    @property
    def newest_voice_request(self) -> VoiceRequest | None:
        """The request new speaks are bound to: after ``voice.use`` or a ``voice.register`` by
        ``sha256``, the one it started."""
        return self._voice

    # --- speaks (R7, R9, R10) -----------------------------------------------------------------
    def _check_speak(self, speak: Speak) -> Speak:
        if not speak.text.strip():
            raise EmptyText("text is empty", message_id=speak.id)
        if len(speak.text) > self.max_text_chars:
            raise TextTooLong(
                f"text is {len(speak.text)} characters; the limit is {self.max_text_chars}",
                message_id=speak.id,
            )
        if speak.sample_rate is not None and speak.sample_rate not in self.sample_rates:
            raise UnsupportedSampleRate(
                f"sample_rate must be one of {', '.join(map(str, self.sample_rates))}",
                message_id=speak.id,
            )
        self._check_lanes(speak)
        if self._voice is None and speak.voice_id is None:  # R5, R16
            raise NoVoice("register or use a voice before speaking", message_id=speak.id)
        text = self.clean_text(speak.text)
        if not text:
            raise EmptyText("nothing speakable in this text", message_id=speak.id)
        if (
            (self.current is not None and self.current.id == speak.id)
            or any(j.id == speak.id for j in self._waiting)
            or speak.id in self._channel_jobs
        ):
            raise DuplicateId(
                f"message id {speak.id[:64]!r} is already queued", message_id=speak.id
            )
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(
                f"{len(self._waiting)} messages are already waiting; the limit is {self.max_queue}",
                message_id=speak.id,
            )
        return speak if text == speak.text else dataclasses.replace(speak, text=text)

    def _check_lanes(self, speak: Speak) -> None:
        """R15: lanes, interrupt and expiry are a channel's, within their bounds."""
        options = (speak.priority, speak.interrupt, speak.expire_s, speak.voice_id)
        if self.membership is None and any(o is not None for o in options):
            raise Unsupported(
                "priority, interrupt, expire_s and voice_id are for channel messages "
                "(join a channel)",
                message_id=speak.id,
            )
        if speak.priority is not None and not 0 <= speak.priority <= MAX_PRIORITY:
            raise Unsupported(f"speak: priority must be 0 to {MAX_PRIORITY}", message_id=speak.id)
        if speak.expire_s is not None and not 0 < speak.expire_s <= MAX_EXPIRE_S:
            raise Unsupported(
                f"speak: expire_s must be above 0 and at most {MAX_EXPIRE_S:g}",
                message_id=speak.id,
            )

    def accept_speak(self, speak: Speak, *, position: int | None = None) -> SpeakJob:
        """Admit a speak ``receive_text`` returned (the server's own checks, such as a rate
        limit, passed): answer ``queued`` (R7). In a channel (R13) the job goes to the channel's
        queue, not this session's, and ``position`` is its place there."""
        voice = self._voice
        if speak.voice_id is not None:  # R16: its own voice, as if pinned
            voice = VoiceRequest(None, None, voice_id=speak.voice_id)
        if voice is None:
            # receive_text checked it, but the server may have awaited its own checks since
            # (a rate limit in Redis) while a purge took the voice: the same answer, not a crash.
            raise NoVoice("the voice was deleted; register or use another", message_id=speak.id)
        job = SpeakJob(speak.id, speak.text, speak.sample_rate, voice, marks=bool(speak.marks))
        if self.membership is not None:
            assert position is not None, "a channel speak is placed by its channel"
            self._channel_jobs[job.id] = job
            self._send(Queued(id=job.id, position=position))
            return job
        self._send(Queued(id=job.id, position=self.ahead_of_next()))
        self._waiting.append(job)
        return job

    # --- channels (R12, R13, R14) -------------------------------------------------------------
    def _check_join(self, join: ChannelJoin) -> None:
        if self.membership is not None:
            raise UnexpectedMessage(
                f"this session already joined channel {self.membership.channel!r}",
                message_id=join.id,
            )
        if not CHANNEL_NAME.fullmatch(join.channel):
            raise BadChannel("channel: 1-64 letters, digits, '_', '-' or '.'", message_id=join.id)
        if join.role not in ROLES:
            raise Unsupported(f"role must be one of {', '.join(ROLES)}", message_id=join.id)
        if join.sample_rate is not None and join.sample_rate not in self.sample_rates:
            raise UnsupportedSampleRate(
                f"sample_rate must be one of {', '.join(map(str, self.sample_rates))}",
                message_id=join.id,
            )
        if (join.resume_message is None) != (join.resume_seq is None):  # R18
            raise BadMessage("resume_message and resume_seq come together", message_id=join.id)
        if join.resume_message is not None and join.resume_seq is not None:
            if join.role == "speak":
                raise BadMessage("only a listener resumes", message_id=join.id)
            if not 0 < len(join.resume_message) <= 64 or join.resume_seq < -1:
                raise BadMessage(
                    "resume_message: 1-64 characters; resume_seq: -1 or more", message_id=join.id
                )

    def join_channel(
        self, join: ChannelJoin, *, sample_rate: int, resumed: bool | None = None
    ) -> Membership:
        """The server seated the session in the channel ``receive_text`` checked: answer
        ``channel.joined`` (R12), saying whether the resume it asked for (R18) follows."""
        self.membership = Membership(
            join.channel, join.role, join.sample_rate or sample_rate, marks=bool(join.marks)
        )
        self._send(ChannelJoined(channel=join.channel, role=join.role, id=join.id, resumed=resumed))
        return self.membership

    def channel_job(self, message_id: str) -> SpeakJob | None:
        """This session's channel speak ``message_id``, until it ended."""
        return self._channel_jobs.get(message_id)

    @property
    def channel_jobs(self) -> list[SpeakJob]:
        return list(self._channel_jobs.values())

    def channel_spoken(
        self,
        job: SpeakJob,
        *,
        duration_ms: float,
        ttfa_ms: float,
        truncated: bool = False,
        loudness_lufs: float | None = None,
    ) -> None:
        """The producer's completion of a channel message whose audio went to the listeners:
        ``audio.end`` with ``stream: 0`` and no frames (R13)."""
        if job.ended:
            return
        end = AudioEnd(
            id=job.id,
            stream=0,
            frames=0,
            samples=0,
            duration_ms=duration_ms,
            ttfa_ms=ttfa_ms,
            cancelled=job.cancelled,
            truncated=truncated,
            loudness_lufs=loudness_lufs,
        )
        self._end(job, end, "cancelled" if job.cancelled else "spoken")

    def channel_dropped(self, job: SpeakJob) -> None:
        """A channel message ended before its audio started: ``cancelled`` (R9, R13)."""
        if not job.ended:
            job.cancelled = True
            self._end(job, Cancelled(id=job.id), "cancelled")

    def listen_start(
        self,
        *,
        id: str,
        text: str,
        voice: str | None,
        user: str | None,
        kind: str | None,
        message: str | None = None,
        replayed: bool = False,
        resumed_from: int = 0,
        marks: tuple[str, ...] = (),
    ) -> ListenStream | None:
        """A channel message starts for this listener: its ``audio.start`` on the next stream
        (R14, R8). None when the session is not a listener."""
        member = self.membership
        if member is None or not member.listens or member.sample_rate is None:
            return None
        self._streams += 1
        heard = ListenStream(
            id,
            member.channel,
            self._streams,
            member.sample_rate,
            message=message,
            marks=member.marks and bool(marks),
            offset=resumed_from * (member.sample_rate * self._frame_ms // 1000),
        )
        self._heard[heard.stream] = heard
        while len(self._heard) > PLAYED_STREAMS:
            del self._heard[next(iter(self._heard))]
        self._send(
            AudioStart(
                id=id,
                stream=heard.stream,
                sample_rate=heard.sample_rate,
                channel=member.channel,
                text=text,
                voice=voice,
                user=user,
                kind=kind,
                message=message,
                replayed=replayed or None,
                resumed_from=resumed_from or None,
                marks=list(marks) if heard.marks else None,
            )
        )
        return heard

    def listen_marks(self, heard: ListenStream, marks: dict[str, Any]) -> None:
        """A listener's ``audio.marks`` (R19), before the frames they describe; nothing when it
        did not ask for marks. ``marks``: ``words``, ``visemes``, ``mouth`` as on the wire."""
        if heard.ended or not heard.marks:
            return
        self._send(AudioMarks(id=heard.id, stream=heard.stream, **marks))

    def played(self, played: Played, now: float) -> tuple[str, float] | None:
        """R20: a listener's ``played``, as the channel's key of that message and the
        milliseconds of it played, to relay; None to drop it (not a stream this listener
        heard recently, or within ``PLAYED_INTERVAL_S`` of the last one relayed)."""
        heard = self._heard.get(played.stream)
        if heard is None or heard.message is None or played.samples < 0:
            return None
        if now - self._played_at < PLAYED_INTERVAL_S:
            return None
        self._played_at = now
        return heard.message, round((heard.offset + played.samples) * 1000 / heard.sample_rate, 1)

    def channel_played(self, message: str, ms: float) -> None:
        """Another listener's position in a channel message (R20)."""
        member = self.membership
        if member is not None and member.listens:
            self._send(ChannelPlayed(channel=member.channel, message=message, ms=ms))

    def listen_audio(self, heard: ListenStream, pcm: bytes) -> None:
        if heard.ended:
            return
        self._send_audio(AudioFrame(heard.stream, heard.frames, pcm))
        heard.frames += 1
        heard.samples += len(pcm) // 2

    def listen_end(
        self,
        heard: ListenStream,
        *,
        ttfa_ms: float,
        cancelled: bool,
        truncated: bool = False,
        loudness_lufs: float | None = None,
    ) -> None:
        if heard.ended:
            return
        heard.ended = True
        self._send(
            _audio_end(
                heard.id,
                heard.stream,
                heard.frames,
                heard.samples,
                heard.sample_rate,
                ttfa_ms=ttfa_ms,
                cancelled=cancelled,
                truncated=truncated,
                channel=heard.channel,
                loudness_lufs=loudness_lufs,
            )
        )

    def channel_state(self, *, waiting: int, paused: bool) -> None:
        """The channel's queue changed (R14)."""
        if self.membership is not None:
            self._send(
                ChannelState(channel=self.membership.channel, waiting=waiting, paused=paused)
            )

    def ahead_of_next(self) -> int:
        """How many messages a newly admitted one would wait behind."""
        return len(self._waiting) + (1 if self.current is not None else 0)

    @property
    def busy(self) -> bool:
        """A message is being spoken or waits: the client is listening, not idling."""
        return (
            self.current is not None
            or bool(self._waiting)
            or bool(self._channel_jobs)
            or (self.membership is not None and self.membership.listens)
        )

    def cancel(self, message_id: str | None) -> list[SpeakJob]:
        """Drop waiting messages (``cancelled`` each) and stop the current one (R9); the
        dropped ones are returned."""
        current = self.current
        if current is not None and message_id in (None, current.id):
            current.cancelled = True
        dropped = [j for j in self._waiting if message_id in (None, j.id)]
        for job in dropped:
            self._waiting.remove(job)
            job.cancelled = True
            self._end(job, Cancelled(id=job.id), "cancelled")
        return dropped

    def next_speak(self) -> SpeakJob | None:
        """The next message to speak, now current (R8); None while nothing waits or one is
        still being spoken."""
        if self.current is not None or not self._waiting:
            return None
        self.current = self._waiting.popleft()
        return self.current

    def start_audio(self, job: SpeakJob, sample_rate: int, *, marks: tuple[str, ...] = ()) -> bool:
        """Announce the job's audio on the next stream (R8). False if it was cancelled before
        (it ends ``cancelled``, R9)."""
        if job.ended:
            return False
        if job.cancelled:
            self._end(job, Cancelled(id=job.id), "cancelled")
            return False
        self._streams += 1
        job.stream = self._streams
        job.sample_rate = sample_rate
        kinds = list(marks) if job.marks else None
        self._send(AudioStart(id=job.id, stream=job.stream, sample_rate=sample_rate, marks=kinds))
        return True

    def audio_marks(self, job: SpeakJob, marks: dict[str, Any]) -> bool:
        """The job's ``audio.marks`` (R19), before the frames they describe. False (nothing
        sent) once it is cancelled; True without sending when it did not ask for marks."""
        if job.cancelled or job.ended or job.stream is None:
            return False
        if job.marks:
            self._send(AudioMarks(id=job.id, stream=job.stream, **marks))
        return True

    def audio(self, job: SpeakJob, pcm: bytes) -> bool:
        """One frame of s16le PCM. False (and nothing sent) once the job is cancelled (R9)."""
        if job.cancelled or job.ended or job.stream is None:
            return False
        self._send_audio(AudioFrame(job.stream, job.frames, pcm))
        job.frames += 1
        job.samples += len(pcm) // 2
        return True

    def _send_audio(self, frame: AudioFrame) -> None:
        if self.state is not SessionState.CLOSED:
            self._out.append(frame.encode())

    def end_audio(
        self,
        job: SpeakJob,
        *,
        ttfa_ms: float,
        truncated: bool = False,
        loudness_lufs: float | None = None,
    ) -> None:
        """The job's audio is complete (or stopped by cancel): ``audio.end`` (R10)."""
        if job.ended or job.stream is None or job.sample_rate is None:
            return
        end = _audio_end(
            job.id,
            job.stream,
            job.frames,
            job.samples,
            job.sample_rate,
            ttfa_ms=ttfa_ms,
            cancelled=job.cancelled,
            truncated=truncated,
            loudness_lufs=loudness_lufs,
        )
        self._end(job, end, "cancelled" if job.cancelled else "spoken")

    def fail_speak(self, job: SpeakJob, exc: LivevoiceError) -> None:
        """The job failed (its voice, or synthesis): its ``error`` is its end (R10)."""
        if not job.ended:
            self._end(job, Error(code=exc.code, message=exc.message, id=job.id), "failed")

    def _end(self, job: SpeakJob, message: Message, outcome: str) -> None:
        job.ended = True
        if self.current is job:
            self.current = None
        if self._channel_jobs.get(job.id) is job:
            del self._channel_jobs[job.id]
        self._send(message)
        self._ended.append((job, outcome))
