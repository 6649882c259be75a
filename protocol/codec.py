"""Encoding and decoding of frames: JSON control frames and binary audio frames.

Pure functions, no I/O: bytes or text in, messages or a typed ``LivevoiceError`` out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import BadAudioFrame, BadJson, BadMessage, UnknownType
from .messages import CLIENT_MESSAGES, SERVER_MESSAGES, Message

AUDIO_MAGIC = b"LV"
AUDIO_VERSION = 1
AUDIO_KIND_PCM = 0
AUDIO_HEADER = struct.Struct("<2sBBII")
"""Magic ``LV``, version, kind (0: PCM), stream (u32), sequence (u32); little-endian, 12 bytes."""


def encode(message: Message) -> str:
    """A message as the text of one WebSocket frame."""
    return orjson.dumps(message.to_wire()).decode()


def _decode(frame: str | bytes, registry: dict[str, type[Message]]) -> Message:
    try:
        obj: Any = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise BadJson(f"control frame is not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise BadMessage("control frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise BadMessage("control frame has no string 'type'")
    cls = registry.get(kind)
    if cls is None:
        message_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        raise UnknownType(f"unknown message type {kind[:64]!r}", message_id=message_id)
    return cls.from_wire(obj)


def decode_client(frame: str | bytes) -> Message:
    """A control frame sent by a client (what the server reads)."""
    return _decode(frame, CLIENT_MESSAGES)


def decode_server(frame: str | bytes) -> Message:
    """A control frame sent by the server (what a client reads)."""
    return _decode(frame, SERVER_MESSAGES)


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """One binary frame of PCM for the message announced by ``audio.start`` on ``stream``."""

    stream: int
    seq: int
    """0, 1, 2... within the stream; a gap means a lost frame."""
    pcm: bytes
    """Signed 16-bit little-endian mono samples."""

    def encode(self) -> bytes:
        return AUDIO_HEADER.pack(
            AUDIO_MAGIC, AUDIO_VERSION, AUDIO_KIND_PCM, self.stream, self.seq
        ) + (self.pcm)

    @staticmethod
    def decode(frame: bytes) -> AudioFrame:
        if len(frame) < AUDIO_HEADER.size:
            raise BadAudioFrame(f"audio frame shorter than its {AUDIO_HEADER.size}-byte header")
        magic, version, kind, stream, seq = AUDIO_HEADER.unpack_from(frame)
        if magic != AUDIO_MAGIC or version != AUDIO_VERSION or kind != AUDIO_KIND_PCM:
            raise BadAudioFrame("audio frame header has a wrong magic, version or kind")
        pcm = bytes(frame[AUDIO_HEADER.size :])
        if len(pcm) % 2:
            raise BadAudioFrame("audio frame payload is not whole 16-bit samples")
        return AudioFrame(stream, seq, pcm)
