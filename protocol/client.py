"""The client side of a session, sans-I/O: requests out, the server's frames in, events out.

The one way Python code reads the server's wire. ``send_*`` queue frames (``data_to_send()``)
and remember what is in flight; ``receive_text`` / ``receive_binary`` take the server's frames and
return what they mean as events: a speak queued, started, given audio, marks (R19), ended or
failed; a voice request answered or failed; another listener's playback position (R20); a
pong. The checks a client owes the server's promises are made here: frames of a stream
numbered 0, 1, 2… with no gap, ``audio.end`` counting what arrived, each speak ending once.

Voice requests carry ids (``voice.register``, ``voice.use``, ``voice.delete``), so several can be
in flight; they are answered as they complete.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from .codec import AudioFrame, decode_server, encode
from .errors import BadAudioFrame, DuplicateId, LivevoiceError, all_codes
from .messages import (
    AudioEnd,
    AudioMarks,
    AudioStart,
    Cancel,
    Cancelled,
    ChannelFiltered,
    ChannelJoin,
    ChannelJoined,
    ChannelPlayed,
    ChannelState,
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


class RemoteError(LivevoiceError):
    """An ``error`` whose code this client does not know (a newer server): the code is kept on
    the instance, the class is never changed."""

    def __init__(self, code: str, message: str, *, message_id: str | None = None) -> None:
        super().__init__(message, message_id=message_id)
        self.remote_code = code

    def __str__(self) -> str:
        return f"{self.remote_code}: {self.message}"


def error_from_wire(message: Error) -> LivevoiceError:
    """The typed exception for an ``error`` message, looked up by its code."""
    cls = all_codes().get(message.code)
    if cls is None:
        return RemoteError(message.code, message.message, message_id=message.id)
    return cls(message.message, message_id=message.id)


def error_code(exc: LivevoiceError) -> str:
    """The wire code of an error, also for codes this client does not know."""
    return exc.remote_code if isinstance(exc, RemoteError) else exc.code


_M = TypeVar("_M", VoiceRegister, VoiceUse, VoiceDelete)


# --- events -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Event:
    message: Message | AudioFrame
    """The frame this event comes from, decoded."""


@dataclass(frozen=True, slots=True)
class SessionReady(Event):
    ready: Ready


@dataclass(frozen=True, slots=True)
class HelloRefused(Event):
    error: LivevoiceError


@dataclass(frozen=True, slots=True)
class SpeechQueued(Event):
    id: str
    position: int


@dataclass(frozen=True, slots=True)
class SpeechStarted(Event):
    id: str
    stream: int
    sample_rate: int


@dataclass(frozen=True, slots=True)
class SpeechAudio(Event):
    id: str
    pcm: bytes
    """Signed 16-bit little-endian mono samples, the next ones of the message."""
    channel: str | None = None
    """Set for a channel's message heard as a listener."""


@dataclass(frozen=True, slots=True)
class SpeechEnded(Event):
    """``audio.end`` (``end``), or ``cancelled`` before any audio (``end`` is None)."""

    id: str
    end: AudioEnd | None
    sample_rate: int | None

    @property
    def cancelled(self) -> bool:
        return self.end is None or self.end.cancelled


@dataclass(frozen=True, slots=True)
class SpeechFailed(Event):
    """The speak's ``error``, or a broken promise of the server's audio (``bad_audio_frame``)."""

    id: str
    error: LivevoiceError


@dataclass(frozen=True, slots=True)
class VoiceAnswered(Event):
    """``voice.ready`` or ``voice.deleted`` answering the request with ``request_id``."""

    request_id: str | None
    answer: VoiceReady | VoiceDeleted


@dataclass(frozen=True, slots=True)
class VoiceRequestFailed(Event):
    request_id: str | None
    error: LivevoiceError


@dataclass(frozen=True, slots=True)
class VoiceLost(Event):
    """The pinned voice was deleted elsewhere (``voice.deleted`` with ``pinned``, no request):
    speaks answer ``no_voice`` until another voice is registered or used."""

    notice: VoiceDeleted


@dataclass(frozen=True, slots=True)
class ChannelJoinAnswered(Event):
    """``channel.joined``, or the ``error`` answering a ``channel.join``."""

    request_id: str | None
    joined: ChannelJoined | None
    error: LivevoiceError | None = None


@dataclass(frozen=True, slots=True)
class ChannelHeardStarted(Event):
    """A channel's message starts for this listener: what to show beside it (``start``)."""

    start: AudioStart


@dataclass(frozen=True, slots=True)
class ChannelHeardEnded(Event):
    """A channel's message ended for this listener (``end.cancelled``: skipped or cancelled)."""

    end: AudioEnd


@dataclass(frozen=True, slots=True)
class HeardMarks(Event):
    """``audio.marks`` (R19) of a stream this client is receiving, before the frames they
    describe: of one of its speaks (``channel`` None) or of a channel's message it hears."""

    id: str
    marks: AudioMarks
    channel: str | None = None
    """Set for a channel's message heard as a listener."""


@dataclass(frozen=True, slots=True)
class PositionHeard(Event):
    """``channel.played`` (R20): another listener of the channel has played ``played.ms`` of
    the message ``played.message``."""

    played: ChannelPlayed


@dataclass(frozen=True, slots=True)
class ChannelStateChanged(Event):
    state: ChannelState


@dataclass(frozen=True, slots=True)
class ChannelFilterSet(Event):
    """``channel.filtered``: the channel's word filter now in effect (R17)."""

    filtered: ChannelFiltered


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    id: str | None


@dataclass(frozen=True, slots=True)
class Unmatched(Event):
    """A frame that answers nothing this client has in flight (logged, then ignored)."""

    reason: str


# --- state --------------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class _Speech:
    id: str
    channel: str | None = None
    """Set for a channel's message heard as a listener (not one of this client's speaks)."""
    queued: bool = False
    stream: int | None = None
    sample_rate: int | None = None
    frames: int = 0
    samples: int = 0


@dataclass(slots=True, eq=False)
class _VoiceCall:
    message: VoiceRegister | VoiceUse | VoiceDelete
    answers: tuple[type[Message], ...] = field(default=(VoiceReady,))


class ClientProtocol:
    """What one client has in flight on one socket, and what the server's frames mean to it."""

    ID_PREFIX: ClassVar[str] = "r"

    def __init__(self) -> None:
        self._out: list[str | bytes] = []
        self._hello_pending = False
        self._speeches: dict[str, _Speech] = {}
        self._streams: dict[int, _Speech] = {}
        self._voice_calls: dict[str, _VoiceCall] = {}
        self._joins: set[str] = set()
        """Ids of ``channel.join`` requests in flight."""
        self._request_ids = itertools.count(1)

    # --- requests out -------------------------------------------------------------------------
    def data_to_send(self) -> list[str | bytes]:
        """Frames to send, in order: text frames as ``str``, the clip as ``bytes``. A clip is
        always right after its ``voice.register``."""
        out, self._out = self._out, []
        return out

    def send_hello(self, hello: Hello) -> None:
        self._hello_pending = True
        self._out.append(encode(hello))

    def send_speak(self, speak: Speak) -> None:
        """Raises ``DuplicateId`` while a speak with that id is in flight: the server's answers
        carry only the id, so two would be indistinguishable."""
        if speak.id in self._speeches:
            raise DuplicateId(f"message id {speak.id!r} is still in flight", message_id=speak.id)
        self._speeches[speak.id] = _Speech(speak.id)
        self._out.append(encode(speak))

    def send_cancel(self, cancel: Cancel) -> None:
        self._out.append(encode(cancel))

    def send_ping(self, ping: Ping) -> None:
        self._out.append(encode(ping))

    def send_voice_register(self, register: VoiceRegister, clip: bytes | None) -> str:
        """``voice.register`` and the clip; the request id (one is given when absent). A
        register by ``sha256`` is sent alone (``clip`` None): no clip follows it."""
        if (register.sha256 is None) == (clip is None):
            raise ValueError("voice.register takes the clip, or its sha256 and no clip")
        register = self._with_id(register)
        assert register.id is not None
        self._voice_calls[register.id] = _VoiceCall(register)
        self._out.append(encode(register))
        if clip is not None:
            self._out.append(bytes(clip))
        return register.id

    def send_voice_use(self, use: VoiceUse) -> str:
        use = self._with_id(use)
        assert use.id is not None
        self._voice_calls[use.id] = _VoiceCall(use)
        self._out.append(encode(use))
        return use.id

    def send_voice_delete(self, delete: VoiceDelete) -> str:
        delete = self._with_id(delete)
        assert delete.id is not None
        self._voice_calls[delete.id] = _VoiceCall(delete, (VoiceDeleted,))
        self._out.append(encode(delete))
        return delete.id

    def track(self, message: Message) -> None:
        """Remember a message sent by other means (a raw test client sends frames exactly as
        written), so that its answers are matched and checked. A voice request without an id
        is not tracked: its answer carries none."""
        if isinstance(message, Hello):
            self._hello_pending = True
        elif isinstance(message, Speak):
            self._speeches.setdefault(message.id, _Speech(message.id))
        elif isinstance(message, ChannelJoin) and message.id:
            self._joins.add(message.id)
        elif isinstance(message, VoiceRegister | VoiceUse | VoiceDelete) and message.id:
            answers = (VoiceDeleted,) if isinstance(message, VoiceDelete) else (VoiceReady,)
            self._voice_calls.setdefault(message.id, _VoiceCall(message, answers))

    def send(self, message: Message, clip: bytes | None = None) -> None:
        """Any client message, through the method that tracks it."""
        if isinstance(message, VoiceRegister):
            self.send_voice_register(message, None if message.sha256 else clip or b"")
        elif isinstance(message, VoiceUse):
            self.send_voice_use(message)
        elif isinstance(message, VoiceDelete):
            self.send_voice_delete(message)
        elif isinstance(message, Speak):
            self.send_speak(message)
        elif isinstance(message, Hello):
            self.send_hello(message)
        else:
            self.track(message)
            self._out.append(encode(message))

    def _with_id(self, message: _M) -> _M:
        if message.id is not None:
            if message.id in self._voice_calls:
                raise DuplicateId(f"request id {message.id!r} is still in flight")
            return message
        while (request_id := f"{self.ID_PREFIX}{next(self._request_ids)}") in self._voice_calls:
            pass
        return dataclasses.replace(message, id=request_id)

    # --- what is in flight --------------------------------------------------------------------
    @property
    def speaking(self) -> list[str]:
        """Ids of the speaks sent and not yet ended."""
        return list(self._speeches)

    @property
    def voice_requests(self) -> list[str]:
        return list(self._voice_calls)

    def reset(self) -> None:
        """The socket is gone: nothing in flight will be answered."""
        self._out.clear()
        self._hello_pending = False
        self._speeches.clear()
        self._streams.clear()
        self._voice_calls.clear()
        self._joins.clear()

    # --- frames in ----------------------------------------------------------------------------
    def receive_text(self, frame: str | bytes) -> Event:
        """What one control frame from the server means. Raises a ``LivevoiceError`` only for a
        frame that does not decode: nothing after it on this socket can be trusted."""
        message = decode_server(frame)
        if isinstance(message, Ready):
            self._hello_pending = False
            return SessionReady(message, message)
        if isinstance(message, Error):
            return self._on_error(message)
        if isinstance(message, AudioStart | AudioEnd) and message.channel is not None:
            return self._on_heard(message)
        if isinstance(message, Queued | AudioStart | AudioEnd | Cancelled):
            return self._on_speech(message)
        if isinstance(message, ChannelJoined):
            if message.id is not None:
                self._joins.discard(message.id)
            return ChannelJoinAnswered(message, message.id, message)
        if isinstance(message, AudioMarks):
            speech = self._streams.get(message.stream)
            if speech is None:
                return Unmatched(message, f"audio.marks for unknown stream {message.stream}")
            return HeardMarks(message, speech.id, message, speech.channel)
        if isinstance(message, ChannelPlayed):
            return PositionHeard(message, message)
        if isinstance(message, ChannelState):
            return ChannelStateChanged(message, message)
        if isinstance(message, ChannelFiltered):
            return ChannelFilterSet(message, message)
        if isinstance(message, VoiceReady | VoiceDeleted):
            return self._on_voice(message)
        if isinstance(message, Pong):
            return PongReceived(message, message.id)
        return Unmatched(message, f"unexpected {message.TYPE}")

    def receive_binary(self, frame: bytes) -> Event:
        """One audio frame. Raises ``BadAudioFrame`` for a frame that does not decode."""
        audio = AudioFrame.decode(frame)
        speech = self._streams.get(audio.stream)
        if speech is None:
            return Unmatched(audio, f"audio frame for unknown stream {audio.stream}")
        if audio.seq != speech.frames:
            return self._fail(
                speech,
                audio,
                BadAudioFrame(
                    f"stream {audio.stream}: expected frame {speech.frames}, got {audio.seq}",
                    message_id=speech.id,
                ),
            )
        speech.frames += 1
        speech.samples += len(audio.pcm) // 2
        return SpeechAudio(audio, speech.id, audio.pcm, speech.channel)

    def _on_heard(self, message: AudioStart | AudioEnd) -> Event:
        """A channel's message heard as a listener: matched by stream, never by id (the id is
        its producer's)."""
        if isinstance(message, AudioStart):
            self._streams[message.stream] = _Speech(
                message.id, message.channel, True, message.stream, message.sample_rate
            )
            return ChannelHeardStarted(message, message)
        heard = self._streams.pop(message.stream, None)
        if heard is None or heard.channel is None:
            return Unmatched(message, f"audio.end for unknown stream {message.stream}")
        if message.frames != heard.frames or message.samples != heard.samples:
            return SpeechFailed(
                message,
                heard.id,
                BadAudioFrame(
                    f"audio.end announces {message.frames} frames / {message.samples} samples, "
                    f"received {heard.frames} / {heard.samples}",
                    message_id=heard.id,
                ),
            )
        return ChannelHeardEnded(message, message)

    def _on_speech(self, message: Queued | AudioStart | AudioEnd | Cancelled) -> Event:
        speech = self._speeches.get(message.id)
        if speech is None:
            return Unmatched(message, f"{message.TYPE} for unknown message {message.id[:64]!r}")
        if isinstance(message, Queued):
            speech.queued = True
            return SpeechQueued(message, message.id, message.position)
        if isinstance(message, AudioStart):
            speech.stream = message.stream
            speech.sample_rate = message.sample_rate
            self._streams[message.stream] = speech
            return SpeechStarted(message, message.id, message.stream, message.sample_rate)
        if isinstance(message, Cancelled):
            self._forget(speech)
            return SpeechEnded(message, message.id, None, None)
        if message.frames != speech.frames or message.samples != speech.samples:
            return self._fail(
                speech,
                message,
                BadAudioFrame(
                    f"audio.end announces {message.frames} frames / {message.samples} samples, "
                    f"received {speech.frames} / {speech.samples}",
                    message_id=speech.id,
                ),
            )
        self._forget(speech)
        return SpeechEnded(message, message.id, message, speech.sample_rate)

    def _fail(self, speech: _Speech, message: Message | AudioFrame, exc: LivevoiceError) -> Event:
        self._forget(speech)
        return SpeechFailed(message, speech.id, exc)

    def _forget(self, speech: _Speech) -> None:
        self._speeches.pop(speech.id, None)
        if speech.stream is not None:
            self._streams.pop(speech.stream, None)

    def _on_error(self, message: Error) -> Event:
        exc = error_from_wire(message)
        if message.id is not None:
            speech = self._speeches.get(message.id)
            if speech is not None:
                return self._fail(speech, message, exc)
            if self._voice_calls.pop(message.id, None) is not None:
                return VoiceRequestFailed(message, message.id, exc)
            if message.id in self._joins:
                self._joins.discard(message.id)
                return ChannelJoinAnswered(message, message.id, None, exc)
        if self._hello_pending:
            self._hello_pending = False
            return HelloRefused(message, exc)
        return Unmatched(message, f"error {message.code}: {message.message}")

    def _on_voice(self, message: VoiceReady | VoiceDeleted) -> Event:
        if message.id is not None:
            call = self._voice_calls.get(message.id)
            if call is not None and isinstance(message, call.answers):
                del self._voice_calls[message.id]
                return VoiceAnswered(message, message.id, message)
        if isinstance(message, VoiceDeleted) and message.pinned:
            return VoiceLost(message, message)
        return Unmatched(message, f"{message.TYPE} answering no request in flight")
