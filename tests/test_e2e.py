"""End to end: the real server on a free port, a real socket, the real GE2E encoder and Piper."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from live.encoder import EncoderWorker
from live.speech import PiperEngine
from protocol import AudioFrame
from protocol.messages import AudioEnd, AudioStart, Error, Pong, Queued, VoiceReady
from tests.clips import espeak_speech, flac_bytes, quantize, reference_clip, wav_bytes
from tests.fakes import GatedEngine
from tests.server import RawClient, live_server, raw_client

pytestmark = pytest.mark.timeout(180)


def clip_wav() -> bytes:
    pcm, sr = reference_clip("piper")
    return wav_bytes(pcm, sr)


async def register(
    client: RawClient, data: bytes, name: str = "me", fmt: str = "wav"
) -> VoiceReady:
    await client.asend({"type": "voice.register", "name": name, "format": fmt})
    await client.asend_bytes(data)
    ready = await client.anext()
    assert isinstance(ready, VoiceReady), ready
    return ready


async def speak_and_collect(
    client: RawClient, message_id: str, text: str, **extra: object
) -> tuple[AudioStart, AudioEnd, np.ndarray]:
    await client.asend({"type": "speak", "id": message_id, "text": text, **extra})
    start = await client.await_type("audio.start")
    assert isinstance(start, AudioStart) and start.id == message_id
    end = await client.await_type("audio.end")
    assert isinstance(end, AudioEnd) and end.id == message_id
    frames = client.seen.frames[start.stream]
    assert [f.seq for f in frames] == list(range(len(frames))), "frames out of order or lost"
    pcm = np.frombuffer(b"".join(f.pcm for f in frames), dtype="<i2")
    return start, end, pcm


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pcm.astype(np.float64) / 32768) ** 2)))


async def test_register_reregister_speak_and_cancel(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    pcm, sr = reference_clip("piper")
    pcm = quantize(pcm)
    async with live_server(embedder=encoder_worker, engine=piper) as srv, raw_client(srv) as c:
        first = await register(c, wav_bytes(pcm, sr))
        assert first.source == "encoder"
        assert abs(first.duration_s - len(pcm) / sr) < 0.01
        # The same samples in another container, under another name: no second encoder call.
        again = await register(c, flac_bytes(pcm, sr), name="renamed", fmt="flac")
        assert again.source == "l1"
        assert again.voice_id == first.voice_id
        assert srv.services.store.encoder_calls == 1
        assert encoder_worker.calls == 1

        short = "Hello chat, thanks for the follow!"
        start, end, audio = await speak_and_collect(c, "m1", short)
        assert start.sample_rate == piper.sample_rate == 22050
        assert end.samples == len(audio) and not end.cancelled
        assert end.duration_ms == pytest.approx(len(audio) * 1000 / 22050, abs=1)
        assert 0.8 < len(audio) / 22050 < 6.0, "a short sentence is about 1-4 s of speech"
        assert rms(audio) > 0.02, "speech is not silent"

        long = "This is the second message. It has three sentences. Each one is spoken in turn."
        start2, _end2, audio2 = await speak_and_collect(c, "m2", long, sample_rate=48000)
        assert start2.sample_rate == 48000 and start2.stream == start.stream + 1
        assert len(audio2) / 48000 > len(audio) / 22050, "three sentences outlast one"
        assert rms(audio2) > 0.02
        # Frames are ~100 ms each except the last.
        frames = c.seen.frames[start2.stream]
        assert all(len(f.pcm) == 2 * 4800 for f in frames[:-1])

        # A third message, cancelled while it is spoken: it ends early, marked cancelled.
        await c.asend({"type": "speak", "id": "m3", "text": long * 6})
        start3 = await c.await_type("audio.start")
        await c.asend({"type": "cancel", "id": "m3"})
        end3 = await c.await_type("audio.end")
        assert isinstance(end3, AudioEnd) and end3.id == "m3" and end3.cancelled
        assert end3.samples < 0.5 * len(audio2) / 48000 * 22050 * 6
        assert sum(len(f.pcm) // 2 for f in c.seen.frames.get(start3.stream, [])) == end3.samples

        # The session goes on after all that.
        await c.asend({"type": "ping", "id": "after"})
        assert await c.await_type("pong") == Pong(id="after")
        assert srv.services.store.encoder_calls == 1


async def test_two_voices_are_different_embeddings(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    a_pcm, a_sr = reference_clip("piper")
    b_pcm, b_sr = espeak_speech(
        "Hello everyone, welcome back to the stream. Today we are going to play something new."
    )
    async with live_server(embedder=encoder_worker, engine=piper) as srv, raw_client(srv) as c:
        a = await register(c, wav_bytes(a_pcm, a_sr))
        b = await register(c, wav_bytes(b_pcm, b_sr))
        assert a.voice_id != b.voice_id
        assert (a.source, b.source) == ("encoder", "encoder")
        store = srv.services.store
        vectors = []
        for ready in (a, b):
            record = store.record("public", ready.voice_id)
            assert record is not None
            emb = store.l1.get(record.fingerprint)
            assert emb is not None
            vectors.append(emb.vector)
        assert float(np.dot(vectors[0], vectors[1])) < 0.8


async def test_first_audio_leaves_before_the_last_sentence_is_synthesized(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine()
    async with live_server(embedder=encoder_worker, engine=engine) as srv, raw_client(srv) as c:
        await register(c, clip_wav())
        await c.asend({"type": "speak", "id": "m", "text": "One. Two. Three. Four."})
        assert isinstance(await c.anext(), Queued)
        assert isinstance(await c.anext(), AudioStart)
        engine.release(1)  # only the first sentence may be synthesized
        msg = await asyncio.wait_for(c.ws.receive(), 10)
        frame = AudioFrame.decode(msg.data)
        assert frame.seq == 0 and engine.produced == 1
        engine.release(3)
        end = await c.await_type("audio.end")
        assert isinstance(end, AudioEnd) and end.samples == 4 * 11025


async def test_messages_play_in_order_and_the_queue_is_bounded(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine()
    async with live_server(embedder=encoder_worker, engine=engine) as srv, raw_client(srv) as c:
        await register(c, clip_wav())
        limit = srv.settings.limits.max_queue
        for i in range(limit + 1):  # one is spoken now, `limit` wait
            await c.asend({"type": "speak", "id": f"m{i}", "text": f"Message {i}."})
        await c.asend({"type": "speak", "id": "overflow", "text": "Too many."})
        await c.asend({"type": "speak", "id": "m3", "text": "Duplicate id."})
        errors: list[Error] = []
        while len(errors) < 2:
            msg = await c.anext()
            if isinstance(msg, Error):
                errors.append(msg)
        assert {(e.code, e.id) for e in errors} == {
            ("queue_full", "overflow"),
            ("duplicate_id", "m3"),
        }
        engine.release(limit + 1)
        ends = []
        while len(ends) < limit + 1:
            msg = await c.anext()
            if isinstance(msg, AudioEnd):
                ends.append(msg.id)
        assert ends == [f"m{i}" for i in range(limit + 1)]


async def test_cancel_all_drops_the_queue_and_stops_the_current_message(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine()
    async with live_server(embedder=encoder_worker, engine=engine) as srv, raw_client(srv) as c:
        await register(c, clip_wav())
        for i in range(4):
            await c.asend({"type": "speak", "id": f"m{i}", "text": "A. B. C. D."})
        await c.await_type("audio.start")
        engine.release(1)
        await c.asend({"type": "cancel"})
        engine.release(1)  # lets the in-flight sentence return so the speaker sees the flag
        seen: dict[str, str] = {}
        while len(seen) < 4:
            msg = await c.anext()
            if msg.TYPE in ("audio.end", "cancelled"):
                seen[msg.id] = msg.TYPE  # type: ignore[attr-defined]
        assert seen == {"m0": "audio.end", "m1": "cancelled", "m2": "cancelled", "m3": "cancelled"}
        assert engine.produced <= 2
        # Nothing else is synthesized afterwards.
        await asyncio.sleep(0.2)
        assert engine.started == ["A. B. C. D."]


async def test_disconnect_stops_synthesis(encoder_worker: EncoderWorker) -> None:
    engine = GatedEngine(auto=True, delay_s=0.05)
    async with live_server(embedder=encoder_worker, engine=engine) as srv:
        async with raw_client(srv) as c:
            await register(c, clip_wav())
            await c.asend({"type": "speak", "id": "long", "text": "x. " * 200})
            await c.asend({"type": "speak", "id": "next", "text": "y. " * 200})
            await c.await_type("audio.start")
        # The socket is gone: within a few sentences synthesis stops and nothing new starts.
        await asyncio.sleep(0.3)
        produced = engine.produced
        await asyncio.sleep(0.5)
        assert engine.produced - produced <= 1
        assert engine.produced < 30
        assert engine.started == [("x. " * 200).strip()]
        assert srv.services.store.l1.pinned == set()
