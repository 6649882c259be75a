"""PCM framing: an engine's float chunks to the wire's audio frames.

Resampled to the message's rate (a streaming resampler: no clicks at chunk borders), converted to
signed 16-bit little-endian, and cut into frames of ``frame_ms`` each; the last one of a message
may be shorter.
"""

from __future__ import annotations

import numpy as np
import soxr


def to_s16le(pcm: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as signed 16-bit little-endian bytes."""
    clipped = np.clip(pcm, -1.0, 1.0)
    return bytes(np.round(clipped * 32767.0).astype("<i2").tobytes())


class Resampler:
    """Streaming resampler: chunk borders leave no clicks (soxr keeps its filter state)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.passthrough = in_rate == out_rate
        self._stream = (
            None if self.passthrough else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")
        )

    def feed(self, chunk: np.ndarray, *, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return chunk
        out: np.ndarray = self._stream.resample_chunk(chunk, last=last)
        return out


class PcmFramer:
    """One message's audio, from the engine's rate to frames at ``out_rate``."""

    def __init__(self, in_rate: int, out_rate: int, frame_ms: int) -> None:
        self._resampler = Resampler(in_rate, out_rate)
        self.frame_bytes = 2 * max(1, out_rate * frame_ms // 1000)
        self._pending = bytearray()

    def feed(self, chunk: np.ndarray) -> list[bytes]:
        """The whole frames this chunk completes."""
        self._pending += to_s16le(self._resampler.feed(chunk))
        cut = len(self._pending) - len(self._pending) % self.frame_bytes
        frames = [
            bytes(self._pending[i : i + self.frame_bytes]) for i in range(0, cut, self.frame_bytes)
        ]
        del self._pending[:cut]
        return frames

    def flush(self) -> bytes:
        """What is left at the message's end (the resampler's tail included): at most one
        short frame, empty when nothing is left."""
        self._pending += to_s16le(self._resampler.feed(np.zeros(0, dtype=np.float32), last=True))
        tail = bytes(self._pending)
        self._pending.clear()
        return tail


class AudioCap:
    """The engine samples one message may produce (``max_message_audio_s``): what one message
    can cost, however long its text expands."""

    def __init__(self, seconds: float, sample_rate: int) -> None:
        self._left = int(seconds * sample_rate)
        self.reached = False
        """True once a chunk was cut: the rest of the message is not spoken (``truncated``)."""

    def take(self, chunk: np.ndarray) -> np.ndarray:
        """The part of ``chunk`` within the cap."""
        if len(chunk) > self._left:
            chunk, self.reached = chunk[: self._left], True
        self._left -= len(chunk)
        return chunk
