"""The speaking loop: a session's admitted messages, one at a time, in order, into audio frames.

For each message the protocol hands out (``ServerProtocol.next_speak``): wait for its voice, stream
the engine's chunks through PCM framing into the protocol, and stop at the next chunk border once
the message is cancelled. What is sent, and when a message ends, is the protocol's; the speaker
supplies the audio and the timing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import numpy as np

from protocol.errors import LivevoiceError, SynthesisFailed
from protocol.state import ServerProtocol, SpeakJob

from .loudness import MessageLoudness
from .marks import Marks, MouthEnvelope
from .pcm import AudioCap, PcmFramer
from .pinned import PinnedVoice
from .scheduler import HeardUntil
from .speech import MarkedChunk, SpeechEngine, anext_chunk, speak_in, speak_marked_in


class Speaker:
    def __init__(
        self,
        protocol: ServerProtocol,
        voice: PinnedVoice,
        engine: SpeechEngine,
        *,
        flush: Callable[[], Awaitable[None]],
        frame_ms: int,
        max_message_audio_s: float,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        on_ttfa: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self._protocol = protocol
        self._voice = voice
        self._engine = engine
        self._flush = flush
        """Sends what the protocol has to send; awaited after each frame (back-pressure)."""
        self.frame_ms = frame_ms
        self.max_message_audio_s = max_message_audio_s
        self._log = log
        self._on_ttfa = on_ttfa
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._playback = HeardUntil()

    def wake(self) -> None:
        """Something changed: a message was admitted, or the current one cancelled."""
        self._wake.set()
        current = self._protocol.current
        if current is not None and current.cancelled:
            self._stop.set()

    async def arun(self) -> None:
        while True:
            job = self._protocol.next_speak()
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._stop.clear()
            try:
                await self._aspeak(job)
            except LivevoiceError as exc:
                self._protocol.fail_speak(job, exc)
            except Exception:
                self._log.exception("synthesis failed for message %s", job.id[:64])
                self._protocol.fail_speak(job, SynthesisFailed("synthesis failed"))
            await self._flush()

    async def _aspeak(self, job: SpeakJob) -> None:
        voice = await self._voice.avoice_of(self._protocol, job)
        engine = self._engine
        self._playback.begin()  # not due before the last message's audio ends
        rate = job.sample_rate or engine.sample_rate
        if job.marks:
            marked, kinds = speak_marked_in(engine, job.text, voice)
            chunks = _pcm_of(marked, kinds, engine.sample_rate, rate, job, self._protocol)
        else:
            kinds, chunks = (), speak_in(engine, job.text, voice)
        if not self._protocol.start_audio(job, rate, marks=kinds):
            await chunks.aclose()
            return  # cancelled while it waited for its voice
        await self._flush()
        framer = PcmFramer(engine.sample_rate, rate, self.frame_ms)
        cap = AudioCap(self.max_message_audio_s, engine.sample_rate)
        loudness = MessageLoudness(engine.sample_rate)
        started = time.perf_counter()
        ttfa: float | None = None

        async def send(frame: bytes) -> bool:
            nonlocal ttfa
            if not self._protocol.audio(job, frame):
                return False
            self._playback.sent(len(frame) / 2 / rate)
            await self._flush()
            if ttfa is None:
                ttfa = time.perf_counter() - started
            return True

        try:
            while (chunk := await self._anext_chunk(chunks, job)) is not None:
                loudness.feed(chunk := cap.take(chunk))
                for frame in framer.feed(chunk):
                    if not await send(frame):
                        break
                if cap.reached:
                    self._log.info("message %s reached the audio cap", job.id[:64])
                    break
        finally:
            await chunks.aclose()
        if not job.cancelled and (tail := framer.flush()):
            await send(tail)
        if ttfa is not None:
            self._on_ttfa(ttfa)
        self._protocol.end_audio(
            job,
            ttfa_ms=round((ttfa or 0.0) * 1000, 3),
            truncated=cap.reached,
            loudness_lufs=await loudness.alufs(),
        )

    async def _anext_chunk(
        self, chunks: AsyncGenerator[np.ndarray, None], job: SpeakJob
    ) -> np.ndarray | None:
        """The engine's next chunk, or None at its end or as soon as the job is cancelled."""
        if job.cancelled:
            return None
        chunk = await anext_chunk(chunks, self._stop)
        return None if job.cancelled else chunk


async def _pcm_of(
    marked: AsyncGenerator[MarkedChunk, None],
    kinds: tuple[str, ...],
    engine_rate: int,
    rate: int,
    job: SpeakJob,
    protocol: ServerProtocol,
) -> AsyncGenerator[np.ndarray, None]:
    """A marked engine stream as bare chunks, each chunk's ``audio.marks`` (at the stream's
    rate) handed to the protocol before the chunk goes to framing: so before its frames (R19).
    The mouth is the chunk's own envelope (any engine)."""
    mouth = MouthEnvelope(engine_rate)
    try:
        async for chunk in marked:
            marks = Marks(engine_rate, chunk.words, chunk.visemes, mouth.feed(chunk.pcm))
            if marks and not protocol.audio_marks(job, marks.rescaled(rate).to_wire(kinds)):
                return
            yield chunk.pcm
        tail = Marks(engine_rate, mouth=mouth.feed(np.zeros(0, dtype=np.float32), last=True))
        if tail:
            protocol.audio_marks(job, tail.rescaled(rate).to_wire(kinds))
    finally:
        await marked.aclose()
