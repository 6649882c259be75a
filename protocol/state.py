"""The server side of a session as a state machine: frames in, messages or typed errors out.

No I/O: the server feeds each received frame to ``receive_text`` / ``receive_binary`` and acts on
what comes back. Every rejection is a ``LivevoiceError``; none changes the state except where the
docstrings say so, so a session survives any sequence of bad frames.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .codec import decode_client
from .errors import (
    ClipEmpty,
    ClipExpected,
    ClipTooLarge,
    EmptyText,
    HelloRequired,
    NoVoice,
    TextTooLong,
    UnexpectedBinary,
    UnexpectedMessage,
    Unsupported,
    UnsupportedSampleRate,
)
from .messages import PROTOCOL_VERSION, Hello, Message, Speak, VoiceRegister, VoiceUse

CLIP_FORMATS = ("wav", "flac", "ogg", "mp3")


class SessionState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    AWAIT_CLIP = "await_clip"
    """After ``voice.register``: the next frame must be the binary clip."""


@dataclass(frozen=True, slots=True)
class ClipUpload:
    """A ``voice.register`` together with the clip bytes that followed it."""

    register: VoiceRegister
    data: bytes


class ServerProtocol:
    """Validates the order and content of a client's frames for one session."""

    def __init__(
        self,
        *,
        max_clip_bytes: int = 10 * 1024 * 1024,
        max_text_chars: int = 2000,
        sample_rates: tuple[int, ...] = (16000, 22050, 24000, 48000),
    ) -> None:
        self.max_clip_bytes = max_clip_bytes
        self.max_text_chars = max_text_chars
        self.sample_rates = sample_rates
        self.state = SessionState.AWAIT_HELLO
        self.has_voice = False
        """True once a voice is pinned or on its way (a registration or ``voice.use`` accepted)."""
        self._pending_register: VoiceRegister | None = None

    def receive_text(self, frame: str | bytes) -> Message:
        """Decode and check one control frame."""
        if self.state is SessionState.AWAIT_CLIP:
            # The clip never came: drop the registration rather than guess what the client meant.
            register = self._pending_register
            self.state = SessionState.OPEN
            self._pending_register = None
            raise ClipExpected(
                "voice.register must be followed by the clip as one binary frame",
                message_id=register.id if register is not None else None,
            )
        message = decode_client(frame)
        if self.state is SessionState.AWAIT_HELLO:
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
            self.state = SessionState.AWAIT_CLIP
            self._pending_register = message
        elif isinstance(message, VoiceUse):
            self.has_voice = True
        elif isinstance(message, Speak):
            self._check_speak(message)
        return message

    def _check_speak(self, speak: Speak) -> None:
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
        if not self.has_voice:
            raise NoVoice("register or use a voice before speaking", message_id=speak.id)

    def receive_binary(self, frame: bytes) -> ClipUpload:
        """Check a binary frame: only a clip right after ``voice.register`` is expected."""
        if self.state is SessionState.AWAIT_HELLO:
            raise HelloRequired("the first message must be hello")
        if self.state is not SessionState.AWAIT_CLIP or self._pending_register is None:
            raise UnexpectedBinary("a binary frame is only expected right after voice.register")
        register = self._pending_register
        self.state = SessionState.OPEN
        self._pending_register = None
        if not frame:
            raise ClipEmpty("the clip is empty", message_id=register.id)
        if len(frame) > self.max_clip_bytes:
            raise ClipTooLarge(
                f"the clip is {len(frame)} bytes; the limit is {self.max_clip_bytes}",
                message_id=register.id,
            )
        self.has_voice = True
        return ClipUpload(register, bytes(frame))

    def voice_lost(self) -> None:
        """The server could not pin the voice and no earlier one is pinned."""
        self.has_voice = False
