"""End to end: the real server on a free port, a real socket, the real GE2E encoder and Piper."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import numpy as np
import pytest
from aiohappyeyeballs import AddrInfoType

from live.encoder import EncoderWorker
from live.speech import PiperEngine
from protocol import AudioFrame
from protocol.messages import (
    AudioEnd,
    AudioStart,
    Cancelled,
    Error,
    Pong,
    Queued,
    VoiceReady,
)
from tests.clips import (
    espeak_speech,
    flac_bytes,
    quantize,
    reference_clip,
    reference_wav,
    wav_bytes,
)
from tests.fakes import GatedEngine
from tests.server import LiveServer, RawClient, live_server, raw_client

pytestmark = pytest.mark.timeout(180)


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


# Long enough that each sentence is several seconds of audio (dozens of frames), and many of
# them: a cancel that waited for a sentence boundary would let dozens of frames through.
LONG_MESSAGE = " ".join(
    f"This is sentence number {n} of a long chat message, and it goes on for quite a while "
    "so that the streamer has plenty of time to decide that it should stop right now."
    for n in range(1, 9)
)
FRAMES_AFTER_CANCEL = 1
"""Audio frames the server may send after it has handled ``cancel``. The speaker checks the
flag before every frame and races it against the engine's next sentence, so none is expected;
one allows for a frame already being written when the cancel was read."""


async def anext_frame(client: RawClient) -> AudioFrame:
    """The next audio frame; it and control messages met on the way are kept in ``seen``."""
    return await client.anext_frame(30)


async def acancel_fenced(
    client: RawClient,
    stream: int,
    cancel: dict[str, object],
    then: Callable[[], None] | None = None,
) -> tuple[AudioEnd, int]:
    """Send ``cancel`` and a ping right behind it (then call ``then``); the ``audio.end`` of
    ``stream``, and how many of its frames arrived after the pong.

    The server reads a session's messages in order and answers the ping only after it has
    handled the cancel, on the same ordered socket as the audio: a frame behind the pong was
    sent after the cancel took effect. (Frames ahead of the pong were already on their way: the
    server synthesizes faster than real time and does not pace the audio.)
    """
    await client.asend(cancel)
    await client.asend({"type": "ping", "id": "fence"})
    if then is not None:
        then()
    assert await client.await_type("pong") == Pong(id="fence")
    at_pong = len(client.seen.frames.get(stream, []))
    end = await client.await_type("audio.end")
    assert isinstance(end, AudioEnd) and end.stream == stream
    frames = client.seen.frames.get(stream, [])
    assert [f.seq for f in frames] == list(range(len(frames))) and end.frames == len(frames)
    return end, len(frames) - at_pong


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

        # A third message, cancelled while it is spoken: no audio after the cancel took effect.
        await c.asend({"type": "speak", "id": "m3", "text": LONG_MESSAGE})
        start3 = await c.await_type("audio.start")
        assert isinstance(start3, AudioStart)
        await anext_frame(c)
        end3, late = await acancel_fenced(c, start3.stream, {"type": "cancel", "id": "m3"})
        assert end3.id == "m3" and end3.cancelled
        assert late <= FRAMES_AFTER_CANCEL
        assert sum(len(f.pcm) // 2 for f in c.seen.frames[start3.stream]) == end3.samples

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
        await register(c, reference_wav())
        await c.asend({"type": "speak", "id": "m", "text": "One. Two. Three. Four."})
        assert isinstance(await c.anext(), Queued)
        assert isinstance(await c.anext(), AudioStart)
        engine.release(1)  # only the first sentence may be synthesized
        frame = await c.anext_frame(10)
        assert frame.seq == 0 and engine.produced == 1
        engine.release(3)
        end = await c.await_type("audio.end")
        assert isinstance(end, AudioEnd) and end.samples == 4 * 11025


async def test_messages_play_in_order_and_the_queue_is_bounded(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine()
    async with live_server(embedder=encoder_worker, engine=engine) as srv, raw_client(srv) as c:
        await register(c, reference_wav())
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


SMALL_BUFFER = 16 * 1024


def _small_receive_buffer(addr_info: AddrInfoType) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    # Before connecting: a fixed buffer, which the kernel then never grows (no autotuning).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    return sock


@contextlib.asynccontextmanager
async def slow_listener(server: LiveServer) -> AsyncIterator[RawClient]:
    """A client past hello whose connection buffers only a few frames, like a listener on a
    thin link: small fixed socket buffers at both ends. (On loopback the kernel otherwise
    grows them to megabytes: whole sentences fit, and the server never waits to write.)"""
    connector = aiohttp.TCPConnector(socket_factory=_small_receive_buffer)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.ws_connect(server.ws_url, max_msg_size=0) as ws,
    ):
        client = RawClient(ws)
        await client.asend({"type": "hello", "client": "slow-listener"})
        assert (await client.anext()).TYPE == "ready"
        assert server.runner is not None and server.runner.server is not None
        (connection,) = server.runner.server.connections  # ours: the only one
        assert connection.transport is not None
        sending = connection.transport.get_extra_info("socket")
        sending.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        yield client


async def test_cancel_stops_a_slow_listeners_audio_mid_sentence(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    """A listener that reads slower than the server writes (an overlay on a busy machine) holds
    the server mid-sentence, waiting for the socket. A cancel must cut that sentence at the next
    frame, not let the rest of it (dozens of frames at 48 kHz) through."""
    async with live_server(embedder=encoder_worker, engine=piper) as srv, slow_listener(srv) as c:
        await register(c, reference_wav())
        await c.asend({"type": "speak", "id": "long", "text": LONG_MESSAGE, "sample_rate": 48000})
        start = await c.await_type("audio.start")
        assert isinstance(start, AudioStart)
        await anext_frame(c)
        # Stop reading from the socket for a while: its small buffers fill within a few frames
        # and the server's next write waits, mid-sentence. (Staging only: were the server not
        # blocked yet, the cancel would land between sentences and the bound holds the same.)
        connection = c.ws._conn  # aiohttp's own reader would otherwise buffer ~128 KB more
        assert connection is not None and connection.transport is not None
        connection.transport.pause_reading()
        await asyncio.sleep(1.0)
        end, late = await acancel_fenced(
            c, start.stream, {"type": "cancel", "id": "long"}, connection.transport.resume_reading
        )
        assert end.cancelled
        assert late <= FRAMES_AFTER_CANCEL


async def test_cancel_all_drops_the_queue_and_stops_the_current_message(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine()
    async with live_server(embedder=encoder_worker, engine=engine) as srv, raw_client(srv) as c:
        await register(c, reference_wav())
        for i in range(4):
            await c.asend({"type": "speak", "id": f"m{i}", "text": "A. B. C. D."})
        start = await c.await_type("audio.start")
        assert isinstance(start, AudioStart)
        engine.release(1)  # sentence A only; the engine then waits at B's gate
        await anext_frame(c)
        # The gate stays shut: the message must end without waiting for sentence B.
        end, late = await acancel_fenced(c, start.stream, {"type": "cancel"})
        assert end.id == "m0" and end.cancelled and late <= FRAMES_AFTER_CANCEL
        assert engine.produced == 1
        cancelled = {m.id for m in c.seen.messages if isinstance(m, Cancelled)}
        assert cancelled == {"m1", "m2", "m3"}
        # Nothing else was synthesized since: the next message is the next thing the engine sees.
        await c.asend({"type": "speak", "id": "after", "text": "E."})
        engine.release(1)
        after = await c.await_type("audio.end")
        assert isinstance(after, AudioEnd) and after.id == "after" and not after.cancelled
        assert engine.started == ["A. B. C. D.", "E."]


async def test_disconnect_stops_synthesis(encoder_worker: EncoderWorker) -> None:
    engine = GatedEngine(auto=True, delay_s=0.05)
    async with live_server(embedder=encoder_worker, engine=engine) as srv:
        store = srv.services.store
        async with raw_client(srv) as c:
            await register(c, reference_wav())
            await c.asend(
                {"type": "speak", "id": "long", "text": " ".join(f"x{n}." for n in range(200))}
            )
            await c.asend(
                {"type": "speak", "id": "next", "text": " ".join(f"y{n}." for n in range(200))}
            )
            await c.await_type("audio.start")
            assert store.l1.pinned
        # The socket is gone. The session unpins its voice only after its speaker has ended:
        # wait for that (bounded), rather than for a guess at how long it takes.
        for _ in range(500):
            if not store.l1.pinned:
                break
            await asyncio.sleep(0.02)
        assert store.l1.pinned == set()
        produced = engine.produced
        await asyncio.sleep(0.3)
        assert engine.produced == produced, "synthesis went on after the session ended"
        assert produced < 200, "the whole message was synthesized for nobody"
        assert engine.started and all("y" not in text for text in engine.started)
