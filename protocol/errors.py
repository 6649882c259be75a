"""One error hierarchy for everything the protocol can reject.

Every error carries a stable wire ``code`` (sent in ``error`` messages and listed in SPEC.md) and,
where the server closes the socket because of it, a WebSocket ``close_code``.
"""

from __future__ import annotations

from typing import ClassVar


class LivevoiceError(Exception):
    """Base of every error that reaches a client as an ``error`` message."""

    code: ClassVar[str] = "internal_error"
    close_code: ClassVar[int | None] = None

    def __init__(self, message: str, *, message_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.message_id = message_id


# --- framing and schema -------------------------------------------------------------------------
class BadJson(LivevoiceError):
    code = "bad_json"


class BadMessage(LivevoiceError):
    """Valid JSON that is not a valid message: missing or mistyped fields."""

    code = "bad_message"


class UnknownType(LivevoiceError):
    code = "unknown_type"


class UnexpectedBinary(LivevoiceError):
    code = "unexpected_binary"


class BadAudioFrame(LivevoiceError):
    code = "bad_audio_frame"


class FrameTooLarge(LivevoiceError):
    code = "frame_too_large"
    close_code = 1009


class BadUtf8(LivevoiceError):
    """A text frame that is not UTF-8: RFC 6455 requires failing the connection."""

    code = "bad_utf8"
    close_code = 1007


# --- session state ------------------------------------------------------------------------------
class HelloRequired(LivevoiceError):
    code = "hello_required"


class UnexpectedMessage(LivevoiceError):
    """A known message that is not allowed in the session's current state."""

    code = "unexpected_message"


class ClipExpected(LivevoiceError):
    code = "clip_expected"


class Unauthorized(LivevoiceError):
    code = "unauthorized"
    close_code = 4401


class HelloTimeout(LivevoiceError):
    code = "hello_timeout"
    close_code = 4408


class IdleTimeout(LivevoiceError):
    code = "idle_timeout"
    close_code = 4410


class TooManySessions(LivevoiceError):
    code = "too_many_sessions"
    close_code = 4429


class RateLimited(LivevoiceError):
    """A per-tenant rate limit tripped; the message is refused, the session goes on."""

    code = "rate_limited"


class Unsupported(LivevoiceError):
    code = "unsupported"


# --- voices ------------------------------------------------------------------------------------
class NoVoice(LivevoiceError):
    code = "no_voice"


class VoiceNotFound(LivevoiceError):
    code = "voice_not_found"


class VoiceUnavailable(LivevoiceError):
    """The voice store (Redis) did not answer: the voice may well exist. Retry; never forget it."""

    code = "voice_unavailable"


class ClipEmpty(LivevoiceError):
    code = "clip_empty"


class ClipNotAudio(LivevoiceError):
    code = "clip_not_audio"


class ClipTooShort(LivevoiceError):
    code = "clip_too_short"


class ClipTooLong(LivevoiceError):
    code = "clip_too_long"


class ClipTooLarge(LivevoiceError):
    code = "clip_too_large"


class ClipSilent(LivevoiceError):
    code = "clip_silent"


class ClipNotSpeech(LivevoiceError):
    """Audio that decodes but is no usable voice: too little speech, clipped solid, a DC offset."""

    code = "clip_not_speech"


class EncoderFailed(LivevoiceError):
    code = "encoder_failed"


class EncoderBusy(LivevoiceError):
    """Too many clips are being embedded at once; registering again later succeeds."""

    code = "encoder_busy"


class VoiceFailed(LivevoiceError):
    """A ``speak`` whose voice registration failed."""

    code = "voice_failed"


# --- speech ------------------------------------------------------------------------------------
class EmptyText(LivevoiceError):
    code = "empty_text"


class TextTooLong(LivevoiceError):
    code = "text_too_long"


class QueueFull(LivevoiceError):
    code = "queue_full"


class DuplicateId(LivevoiceError):
    code = "duplicate_id"


class UnsupportedSampleRate(LivevoiceError):
    code = "unsupported_sample_rate"


class SynthesisFailed(LivevoiceError):
    code = "synthesis_failed"


class InternalError(LivevoiceError):
    code = "internal_error"


def all_codes() -> dict[str, type[LivevoiceError]]:
    """Every wire code, mapped to its class (the spec test checks SPEC.md lists them all)."""
    codes: dict[str, type[LivevoiceError]] = {}
    stack: list[type[LivevoiceError]] = [LivevoiceError]
    while stack:
        cls = stack.pop()
        codes.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return codes
