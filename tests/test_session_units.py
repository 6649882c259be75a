"""The session's small units without a socket: PCM framing, the pinned voice, the speaking loop.

The speaker runs against the real ``ServerProtocol`` and its frames are read back through a
``ClientProtocol``, so what it sends is checked by the same rules a client applies.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncGenerator

import numpy as np
import pytest

from live.pcm import PcmFramer, to_s16le
from live.pinned import PinnedVoice
from live.speaker import Speaker
from live.values import Embedding, Fingerprint, ResolvedVoice, VoiceSource
from protocol import ClientProtocol, LivevoiceError, ServerProtocol
from protocol.client import Event, SpeechAudio, SpeechEnded, SpeechFailed
from protocol.errors import EncoderFailed
from protocol.messages import Speak, VoiceReady

TIMEOUT = 10.0
log = logging.getLogger(__name__)


def voice(name: str) -> ResolvedVoice:
    emb = Embedding(np.zeros(4, dtype=np.float32), "test", 5.0, 0.0)
    return ResolvedVoice(Fingerprint(name), emb, VoiceSource.L1, 0.0)


class Store:
    def __init__(self) -> None:
        self.pins: Counter[str] = Counter()

    def pin(self, fp: Fingerprint) -> None:
        self.pins[fp] += 1

    def unpin(self, fp: Fingerprint) -> None:
        self.pins[fp] -= 1


# --- PCM framing --------------------------------------------------------------------------------
def test_framer_cuts_fixed_frames_and_keeps_the_rest_for_the_end() -> None:
    framer = PcmFramer(16000, 16000, 100)  # 1,600 samples a frame
    assert framer.feed(np.full(1000, 0.25, dtype=np.float32)) == []
    frames = framer.feed(np.full(2500, 0.25, dtype=np.float32))
    assert [len(f) for f in frames] == [3200, 3200]
    assert len(framer.flush()) == 2 * 300
    assert framer.flush() == b""


def test_s16le_clips_and_rounds() -> None:
    pcm = np.array([2.0, -2.0, 0.5, 0.0], dtype=np.float32)
    assert np.frombuffer(to_s16le(pcm), "<i2").tolist() == [32767, -32767, 16384, 0]


def test_framer_resamples_a_stream_without_losing_samples() -> None:
    framer = PcmFramer(22050, 48000, 100)
    tone = np.sin(np.arange(22050) * 2 * np.pi * 440 / 22050).astype(np.float32)
    out = b"".join(f for i in range(0, 22050, 2205) for f in framer.feed(tone[i : i + 2205]))
    out += framer.flush()
    assert abs(len(out) // 2 - 48000) <= 2


# --- the pinned voice ---------------------------------------------------------------------------
def session_with_voice() -> tuple[ServerProtocol, PinnedVoice, Store]:
    protocol = ServerProtocol()
    protocol.receive_text('{"type":"hello"}')
    protocol.receive_text('{"type":"voice.use","voice_id":"v_a","id":"u1"}')
    store = Store()
    pinned = PinnedVoice(store)
    request = protocol.newest_voice_request
    assert request is not None
    pinned.pin(request, voice("a"))
    protocol.voice_pinned(request, VoiceReady(voice_id="v_a", source="l1", ms=0.0))
    return protocol, pinned, store


def test_one_voice_is_pinned_in_the_store_at_a_time() -> None:
    protocol, pinned, store = session_with_voice()
    protocol.receive_text('{"type":"voice.use","voice_id":"v_b"}')
    request = protocol.newest_voice_request
    assert request is not None
    pinned.pin(request, voice("b"))
    assert +store.pins == Counter({"b": 1})
    pinned.release()
    assert +store.pins == Counter()
    pinned.release()  # twice is harmless: the session's close always releases
    assert +store.pins == Counter()


async def test_a_message_waits_for_its_voice_then_falls_back() -> None:
    protocol, pinned, _ = session_with_voice()
    protocol.receive_text('{"type":"voice.use","voice_id":"v_b","id":"u2"}')
    pending = protocol.newest_voice_request
    assert pending is not None
    protocol.accept_speak(Speak(id="m1", text="hi"))
    job = protocol.next_speak()
    assert job is not None
    waiting = asyncio.ensure_future(pinned.avoice_of(protocol, job))
    await asyncio.sleep(0)
    assert not waiting.done()
    protocol.voice_failed(pending, EncoderFailed("no"))
    pinned.failed()
    assert (await asyncio.wait_for(waiting, TIMEOUT)).fingerprint == "a"


async def test_a_purged_voice_fails_the_messages_bound_to_it() -> None:
    protocol, pinned, _ = session_with_voice()
    protocol.accept_speak(Speak(id="m1", text="hi"))
    job = protocol.next_speak()
    assert job is not None
    protocol.purge("v_a")
    pinned.release()
    with pytest.raises(LivevoiceError) as info:
        await asyncio.wait_for(pinned.avoice_of(protocol, job), TIMEOUT)
    assert info.value.code == "voice_failed"


# --- the speaking loop --------------------------------------------------------------------------
class ChunkEngine:
    """Yields the given chunks; after ``hold_after`` of them waits until released."""

    name = "chunks"
    sample_rate = 16000

    def __init__(self, chunks: list[np.ndarray], hold_after: int | None = None) -> None:
        self.chunks = chunks
        self.hold_after = hold_after
        self.release = asyncio.Event()
        self.closed = 0

    async def stream(self, text: str, voice: Embedding) -> AsyncGenerator[np.ndarray, None]:
        try:
            for n, chunk in enumerate(self.chunks):
                if n == self.hold_after:
                    await self.release.wait()
                yield chunk
        finally:
            self.closed += 1

    async def aclose(self) -> None:
        pass


class Loop:
    """A speaker on a protocol; its frames read back by a client core."""

    def __init__(self, engine: ChunkEngine, *, max_message_audio_s: float = 180.0) -> None:
        self.protocol, self.pinned, _ = session_with_voice()
        self.protocol.data_to_send()
        self.client = ClientProtocol()
        self.events: list[Event] = []
        self.sent = asyncio.Event()
        self.speaker = Speaker(
            self.protocol,
            self.pinned,
            engine,
            flush=self.aflush,
            frame_ms=100,
            max_message_audio_s=max_message_audio_s,
            log=log,
        )

    async def aflush(self) -> None:
        for frame in self.protocol.data_to_send():
            if isinstance(frame, str):
                self.events.append(self.client.receive_text(frame))
            else:
                self.events.append(self.client.receive_binary(frame))
        self.sent.set()
        await asyncio.sleep(0)

    def speak(self, message_id: str) -> None:
        self.client.send_speak(Speak(id=message_id, text="x"))
        self.protocol.receive_text(self.client.data_to_send()[0])
        self.protocol.accept_speak(Speak(id=message_id, text="x"))
        self.speaker.wake()

    async def aended(self, count: int) -> list[Event]:
        async def wait() -> None:
            while (
                len([e for e in self.events if isinstance(e, SpeechEnded | SpeechFailed)]) < count
            ):
                self.sent.clear()
                await self.sent.wait()

        await asyncio.wait_for(wait(), TIMEOUT)
        return [e for e in self.events if isinstance(e, SpeechEnded | SpeechFailed)]


def ones(n: int) -> np.ndarray:
    return np.full(n, 0.1, dtype=np.float32)


async def test_speaker_speaks_messages_in_order_in_whole_frames() -> None:
    loop = Loop(ChunkEngine([ones(2000), ones(2000)]))
    task = asyncio.create_task(loop.speaker.arun())
    try:
        loop.speak("m1")
        loop.speak("m2")
        ended = await loop.aended(2)
    finally:
        task.cancel()
    assert [e.id for e in ended] == ["m1", "m2"]
    for e in ended:
        assert isinstance(e, SpeechEnded) and e.end is not None
        assert (e.end.frames, e.end.samples, e.end.cancelled) == (3, 4000, False)
    audio = [len(e.pcm) for e in loop.events if isinstance(e, SpeechAudio)]
    assert audio == [3200, 3200, 1600] * 2


async def test_speaker_stops_at_the_next_chunk_border_when_cancelled() -> None:
    engine = ChunkEngine([ones(1600), ones(1600), ones(1600)], hold_after=1)
    loop = Loop(engine)
    task = asyncio.create_task(loop.speaker.arun())
    try:
        loop.speak("m1")
        while not any(isinstance(e, SpeechAudio) for e in loop.events):
            loop.sent.clear()
            await asyncio.wait_for(loop.sent.wait(), TIMEOUT)
        loop.protocol.cancel(None)
        loop.speaker.wake()  # the engine is held: only the cancel can end the message
        (ended,) = await loop.aended(1)
    finally:
        task.cancel()
    assert isinstance(ended, SpeechEnded) and ended.end is not None
    assert ended.end.cancelled and ended.end.frames == 1
    assert engine.closed == 1


async def test_speaker_caps_the_audio_of_one_message() -> None:
    loop = Loop(ChunkEngine([ones(16000)] * 5), max_message_audio_s=1.5)
    task = asyncio.create_task(loop.speaker.arun())
    try:
        loop.speak("m1")
        (ended,) = await loop.aended(1)
    finally:
        task.cancel()
    assert isinstance(ended, SpeechEnded) and ended.end is not None
    assert ended.end.truncated and ended.end.samples == 24000


async def test_a_failing_engine_ends_its_message_with_its_error() -> None:
    class Broken(ChunkEngine):
        async def stream(self, text: str, voice: Embedding) -> AsyncGenerator[np.ndarray, None]:
            if text == "x":
                raise RuntimeError("model crashed")
            yield ones(10)

    loop = Loop(Broken([]))
    task = asyncio.create_task(loop.speaker.arun())
    try:
        loop.speak("m1")
        (failed,) = await loop.aended(1)
    finally:
        task.cancel()
    assert isinstance(failed, SpeechFailed) and failed.error.code == "synthesis_failed"
    assert loop.protocol.current is None and not loop.protocol.busy
