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
    retryable: ClassVar[bool] = False
    """Whether the same request, unchanged, may succeed later (after a pause, or in a new
    session for a :class:`SessionEnded`): clients retry these and give up on the others."""

    def __init__(self, message: str, *, message_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.message_id = message_id


class RequestRejected(LivevoiceError):
    """The server refused one request as sent; the session goes on."""


class ServerFailure(LivevoiceError):
    """The server could not do what was asked, through no fault of the request."""


class SessionEnded(LivevoiceError):
    """The server closes the socket after this error, with ``close_code``."""


# --- framing and schema -------------------------------------------------------------------------
class BadJson(RequestRejected):
    code = "bad_json"


class BadMessage(RequestRejected):
    """Valid JSON that is not a valid message: missing or mistyped fields."""

    code = "bad_message"


class UnknownType(RequestRejected):
    code = "unknown_type"


class UnexpectedBinary(RequestRejected):
    code = "unexpected_binary"


class BadAudioFrame(RequestRejected):
    code = "bad_audio_frame"


class FrameTooLarge(SessionEnded):
    code = "frame_too_large"
    close_code = 1009


class BadUtf8(SessionEnded):
    """A text frame that is not UTF-8: RFC 6455 requires failing the connection."""

    code = "bad_utf8"
    close_code = 1007


# --- session state ------------------------------------------------------------------------------
class HelloRequired(RequestRejected):
    code = "hello_required"


class UnexpectedMessage(RequestRejected):
    """A known message that is not allowed in the session's current state."""

    code = "unexpected_message"


class ClipExpected(RequestRejected):
    code = "clip_expected"


class Unauthorized(SessionEnded):
    code = "unauthorized"
    close_code = 4401


class HelloTimeout(SessionEnded):
    code = "hello_timeout"
    retryable = True
    close_code = 4408


class IdleTimeout(SessionEnded):
    code = "idle_timeout"
    retryable = True
    close_code = 4410


class TooManySessions(SessionEnded):
    code = "too_many_sessions"
    retryable = True
    close_code = 4429


class RateLimited(RequestRejected):
    """A per-tenant rate limit tripped; the message is refused, the session goes on."""

    code = "rate_limited"
    retryable = True


class Unsupported(RequestRejected):
    code = "unsupported"


# --- voices ------------------------------------------------------------------------------------
class NoVoice(RequestRejected):
    code = "no_voice"


class VoiceNotFound(RequestRejected):
    code = "voice_not_found"


class VoiceUnavailable(ServerFailure):
    """The voice store (Redis) did not answer: the voice may well exist. Retry; never forget it."""

    code = "voice_unavailable"
    retryable = True


class ChannelUnavailable(ServerFailure):
    """The store a channel's queue lives in (Redis) did not answer: nothing was queued. Retry."""

    code = "channel_unavailable"
    retryable = True


class ClipEmpty(RequestRejected):
    code = "clip_empty"


class ClipNeeded(RequestRejected):
    """A ``voice.register`` by ``sha256`` for bytes this tenant has no voice from (never sent,
    deleted, or expired): send the clip itself."""

    code = "clip_needed"


class ClipNotAudio(RequestRejected):
    code = "clip_not_audio"


class ClipTooShort(RequestRejected):
    code = "clip_too_short"


class ClipTooLong(RequestRejected):
    code = "clip_too_long"


class ClipTooLarge(RequestRejected):
    code = "clip_too_large"


class ClipSilent(RequestRejected):
    code = "clip_silent"


class ClipNotSpeech(RequestRejected):
    """Audio that decodes but is no usable voice: too little speech, clipped solid, a DC offset."""

    code = "clip_not_speech"


class EncoderFailed(ServerFailure):
    code = "encoder_failed"
    retryable = True


class EncoderBusy(ServerFailure):
    """Too many clips are being embedded at once; registering again later succeeds."""

    code = "encoder_busy"
    retryable = True


class VoiceFailed(RequestRejected):
    """A ``speak`` whose voice registration failed."""

    code = "voice_failed"


# --- speech ------------------------------------------------------------------------------------
class EmptyText(RequestRejected):
    code = "empty_text"


class TextTooLong(RequestRejected):
    code = "text_too_long"


class QueueFull(RequestRejected):
    code = "queue_full"
    retryable = True


class DuplicateId(RequestRejected):
    code = "duplicate_id"


class UnsupportedSampleRate(RequestRejected):
    code = "unsupported_sample_rate"


class SynthesisFailed(ServerFailure):
    code = "synthesis_failed"
    retryable = True


# --- channels ----------------------------------------------------------------------------------
class BadChannel(RequestRejected):
    """A channel name outside its alphabet (1 to 64 of ``A-Z a-z 0-9 _ - .``)."""

    code = "bad_channel"


class NotASpeaker(RequestRejected):
    """A ``speak`` or queue control from a session that has not joined a channel to speak
    (a listener, or a control without a channel)."""

    code = "not_a_speaker"


class ListenerTooSlow(SessionEnded):
    """A listener fell further behind the channel than its buffer holds: cut loose, so it never
    slows the channel. Reconnect and join again."""

    code = "listener_too_slow"
    retryable = True
    close_code = 4413


class InternalError(ServerFailure):
    code = "internal_error"


class Expired(RequestRejected):
    """A channel message still waiting ``expire_s`` after it was queued: dropped unspoken (a
    chat line that old is no longer worth hearing)."""

    code = "expired"


class Filtered(RequestRejected):
    """A channel speak with a word the channel's filter drops (R17): not queued."""

    code = "filtered"


def all_codes() -> dict[str, type[LivevoiceError]]:
    """Every wire code, mapped to its class (the spec test checks SPEC.md lists them all).

    Only classes that name a code of their own count: the base and its three branches are
    kinds of error, not errors the wire carries.
    """
    codes: dict[str, type[LivevoiceError]] = {}
    stack: list[type[LivevoiceError]] = [LivevoiceError]
    while stack:
        cls = stack.pop()
        if "code" in vars(cls) and cls is not LivevoiceError:
            codes[cls.code] = cls
        stack.extend(cls.__subclasses__())
    return codes
