"""Channels on one server: a producer speaks, listeners hear, one synthesis per message.

The rules that are the protocol's (R12-R14) are tested on ``ServerProtocol`` / ``ClientProtocol``
in memory; the fan-out, the queue controls and the slow listener over real sockets, with the real
Piper where the audio matters and ``GatedEngine`` where the test needs the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohappyeyeballs import AddrInfoType

from clients.client import LivevoiceClient
from live.channels import LocalChannels
from live.encoder import EncoderWorker
from live.shared_channels import SharedChannels
from live.speech import PiperEngine, SpeechEngine
from live.voices import Embedding
from protocol import ClientProtocol, ServerProtocol
from protocol.client import (
    ChannelHeardEnded,
    ChannelHeardStarted,
    ChannelStateChanged,
    SpeechAudio,
    SpeechEnded,
)
from protocol.codec import AudioFrame
from protocol.messages import (
    AudioEnd,
    AudioStart,
    Cancelled,
    ChannelJoin,
    ChannelJoined,
    ChannelState,
    Error,
    Hello,
    Message,
    Queued,
    Speak,
)
from tests.clips import reference_wav
from tests.fakes import GatedEngine
from tests.server import (
    LiveServer,
    RawClient,
    live_server,
    raw_client,
    until_message,
    until_true,
)

pytestmark = pytest.mark.usefixtures("channel_store")


class CountingEngine:
    """The real engine, counting its calls: one synthesis per channel message."""

    def __init__(self, engine: SpeechEngine) -> None:
        self._engine = engine
        self.name = engine.name
        self.sample_rate = engine.sample_rate
        self.calls: list[str] = []

    def stream(self, text: str, voice: Embedding) -> AsyncGenerator[np.ndarray, None]:
        self.calls.append(text)
        return self._engine.stream(text, voice)

    async def aclose(self) -> None:
        pass


def state(waiting: int, paused: bool) -> Callable[[Message], bool]:
    """Matches the ``channel.state`` with this queue length and pause."""
    return lambda m: isinstance(m, ChannelState) and (m.waiting, m.paused) == (waiting, paused)


def is_type(kind: type[Message], id: str | None = None) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, kind) and (id is None or getattr(m, "id", None) == id)


async def join(client: RawClient, role: str, sample_rate: int | None = None) -> None:
    message: dict[str, Any] = {"type": "channel.join", "channel": "main", "role": role}
    if sample_rate is not None:
        message["sample_rate"] = sample_rate
    await client.asend(message)
    joined = await client.await_type("channel.joined")
    assert isinstance(joined, ChannelJoined) and joined.role == role


async def producer(client: RawClient) -> None:
    await client.aregister(reference_wav())
    await join(client, "speak")


@contextlib.asynccontextmanager
async def bot_and_overlay(
    embedder: EncoderWorker, engine: SpeechEngine
) -> AsyncIterator[tuple[RawClient, RawClient]]:
    """A server with a producer in channel ``main`` (a voice pinned) and a listener there at
    the engine's rate."""
    async with (
        live_server(embedder=embedder, engine=engine) as srv,
        raw_client(srv) as bot,
        raw_client(srv) as overlay,
    ):
        await producer(bot)
        await join(overlay, "listen")
        yield bot, overlay


def heard(client: RawClient) -> list[tuple[AudioStart, AudioEnd | None, bytes]]:
    """Each channel message this listener heard: its start, its end (None while it goes on),
    its PCM."""
    out: list[tuple[AudioStart, AudioEnd | None, bytes]] = []
    streams: dict[int, int] = {}
    pcm: dict[int, bytearray] = {}
    for event in client.events:
        if isinstance(event, ChannelHeardStarted):
            streams[event.start.stream] = len(out)
            out.append((event.start, None, b""))
            pcm[event.start.stream] = bytearray()
        elif isinstance(event, SpeechAudio) and event.channel is not None:
            assert isinstance(event.message, AudioFrame)
            pcm[event.message.stream] += event.pcm
        elif isinstance(event, ChannelHeardEnded):
            i = streams[event.end.stream]
            out[i] = (out[i][0], event.end, bytes(pcm[event.end.stream]))
    for stream, i in streams.items():  # still being heard: what came so far
        if out[i][1] is None:
            out[i] = (out[i][0], None, bytes(pcm[stream]))
    return out


# --- the protocol's rules, in memory --------------------------------------------------------------
def joined_protocol(role: str, sample_rate: int | None = None) -> ServerProtocol:
    proto = ServerProtocol()
    proto.receive_text(orjson.dumps({"type": "hello"}))
    join = proto.receive_text(
        orjson.dumps({"type": "channel.join", "channel": "main", "role": role, "id": "j"})
    )
    assert isinstance(join, ChannelJoin)
    proto.join_channel(join, sample_rate=sample_rate or 22050)
    return proto


def test_a_producer_gets_its_messages_completion_without_audio() -> None:
    """R13: queued at the channel's place, then audio.end on stream 0 with no frames."""
    proto = joined_protocol("speak")
    proto.receive_text(orjson.dumps({"type": "voice.use", "voice_id": "v"}))
    speak = proto.receive_text(orjson.dumps({"type": "speak", "id": "m1", "text": "hi"}))
    assert isinstance(speak, Speak)
    job = proto.accept_speak(speak, position=3)
    assert proto.busy and proto.channel_job("m1") is job and proto.current is None
    proto.channel_spoken(job, duration_ms=500.0, ttfa_ms=20.0)
    proto.channel_spoken(job, duration_ms=500.0, ttfa_ms=20.0)  # ends once (R10)
    sent = [orjson.loads(f) for f in proto.data_to_send()]
    assert [m["type"] for m in sent] == ["channel.joined", "queued", "audio.end"]
    assert sent[1]["position"] == 3
    assert sent[2] == {
        "type": "audio.end",
        "id": "m1",
        "stream": 0,
        "frames": 0,
        "samples": 0,
        "duration_ms": 500.0,
        "ttfa_ms": 20.0,
        "cancelled": False,
        "truncated": False,
    }
    assert proto.channel_job("m1") is None and not proto.busy


def test_a_both_member_hears_its_own_message_on_a_stream_apart_from_its_completion() -> None:
    """R14 with R8: the listener's stream numbers are the session's; the client matches channel
    audio by stream, so the same id as its own speak never confuses the two."""
    server = joined_protocol("both", 16000)
    client = ClientProtocol()
    client.track(Hello())
    client.track(ChannelJoin(channel="main", role="both"))
    server.receive_text(orjson.dumps({"type": "voice.use", "voice_id": "v"}))
    speak = Speak(id="m1", text="hi")
    client.send_speak(speak)
    job = server.accept_speak(speak, position=0)
    stream = server.listen_start(id="m1", text="hi", voice="v", user="ann", kind="sub")
    assert stream is not None and stream.stream == 1 and stream.sample_rate == 16000
    server.listen_audio(stream, b"\x01\x00" * 1600)
    server.listen_end(stream, ttfa_ms=1.0, cancelled=False)
    server.channel_spoken(job, duration_ms=100.0, ttfa_ms=1.0)
    events = [
        client.receive_text(f) if isinstance(f, str) else client.receive_binary(f)
        for f in server.data_to_send()
    ]
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "ChannelJoinAnswered",
        "SpeechQueued",
        "ChannelHeardStarted",
        "SpeechAudio",
        "ChannelHeardEnded",
        "SpeechEnded",
    ], kinds
    start = events[2]
    assert isinstance(start, ChannelHeardStarted)
    assert (start.start.channel, start.start.user, start.start.kind) == ("main", "ann", "sub")
    ended = events[-1]
    assert isinstance(ended, SpeechEnded) and ended.end is not None and ended.end.stream == 0
    assert client.speaking == []


def test_a_listener_is_busy_and_never_idles_out() -> None:
    assert joined_protocol("listen").busy
    assert not joined_protocol("speak").busy


# --- end to end ---------------------------------------------------------------------------------
async def test_one_synthesis_reaches_listeners_at_48_and_16_khz(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    engine = CountingEngine(piper)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as bot,
        raw_client(srv) as overlay,
        raw_client(srv) as captions,
    ):
        await producer(bot)
        await join(overlay, "listen", 48000)
        await join(captions, "listen", 16000)
        text = "Thanks for the sub, friend!"
        await bot.asend({"type": "speak", "id": "m1", "text": text, "user": "Ann", "kind": "sub"})
        queued = await bot.await_type("queued")
        assert isinstance(queued, Queued) and queued.position == 0
        done = await until_message(bot, lambda m: isinstance(m, AudioEnd))
        assert isinstance(done, AudioEnd) and done.stream == 0 and done.frames == 0
        assert not done.cancelled and done.duration_ms > 500
        for listener in (overlay, captions):
            await until_message(listener, lambda m: isinstance(m, AudioEnd))
        assert engine.calls == [text]  # one synthesis, two listeners
        (hi,) = heard(overlay)
        (lo,) = heard(captions)
        for (start, end, pcm), rate in ((hi, 48000), (lo, 16000)):
            assert start.sample_rate == rate and start.channel == "main"
            assert (start.text, start.user, start.kind) == (text, "Ann", "sub")
            assert start.voice is not None and start.voice.startswith("v")
            assert end is not None and not end.cancelled and end.channel == "main"
            assert len(pcm) // 2 == end.samples
            # The same speech: as long as the producer was told, at either rate.
            assert abs(end.samples / rate * 1000 - done.duration_ms) < 25, (end, done)
            assert np.abs(np.frombuffer(pcm, "<i2")).max() > 1000  # speech, not silence
        # Same audio at both rates: the 48 kHz stream brought down to 16 kHz matches.
        a = np.frombuffer(hi[2], "<i2").astype(np.float32)[::3]
        b = np.frombuffer(lo[2], "<i2").astype(np.float32)
        n = min(len(a), len(b))
        assert np.corrcoef(a[:n], b[:n])[0, 1] > 0.9


async def test_pause_resume_skip_clear_and_cancel_by_id(encoder_worker: EncoderWorker) -> None:
    engine = GatedEngine()
    async with bot_and_overlay(encoder_worker, engine) as (bot, overlay):

        def state(waiting: int, paused: bool) -> Callable[[Message], bool]:
            return lambda m: (
                isinstance(m, ChannelState)
                and (m.waiting, m.paused)
                == (
                    waiting,
                    paused,
                )
            )

        await bot.asend({"type": "channel.pause"})
        await until_message(overlay, state(0, True))
        for i in range(1, 4):
            await bot.asend({"type": "speak", "id": f"m{i}", "text": f"Message {i}. Again."})
        await until_message(overlay, state(3, True))
        assert engine.started == []  # paused: nothing is spoken
        await bot.asend({"type": "channel.resume"})
        start = await until_message(overlay, lambda m: isinstance(m, AudioStart))
        assert isinstance(start, AudioStart) and start.id == "m1"
        engine.release(1)
        await overlay.anext_frame()
        await bot.asend({"type": "channel.skip"})  # the gate stays shut: skip must not wait
        end = await until_message(overlay, lambda m: isinstance(m, AudioEnd))
        assert isinstance(end, AudioEnd) and end.id == "m1" and end.cancelled
        done = await until_message(bot, lambda m: isinstance(m, AudioEnd))
        assert isinstance(done, AudioEnd) and done.id == "m1" and done.cancelled
        start = await until_message(overlay, lambda m: isinstance(m, AudioStart))
        assert isinstance(start, AudioStart) and start.id == "m2"
        await bot.asend({"type": "channel.clear"})
        dropped = await until_message(bot, lambda m: isinstance(m, Cancelled))
        assert isinstance(dropped, Cancelled) and dropped.id == "m3"
        await until_message(overlay, state(0, False))
        engine.release(2)
        end = await until_message(overlay, lambda m: isinstance(m, AudioEnd))
        assert isinstance(end, AudioEnd) and end.id == "m2" and not end.cancelled
        assert end.samples == 2 * 11025  # two sentences at the engine's rate, nothing lost
        # cancel by id: a waiting message, then the current one.
        await bot.asend({"type": "speak", "id": "m4", "text": "Four. Four again."})
        await bot.asend({"type": "speak", "id": "m5", "text": "Five."})
        start = await until_message(overlay, lambda m: isinstance(m, AudioStart))
        assert isinstance(start, AudioStart) and start.id == "m4"
        await bot.asend({"type": "cancel", "id": "m5"})
        dropped = await until_message(bot, lambda m: isinstance(m, Cancelled))
        assert isinstance(dropped, Cancelled) and dropped.id == "m5"
        await bot.asend({"type": "cancel", "id": "m4"})
        end = await until_message(overlay, lambda m: isinstance(m, AudioEnd))
        assert isinstance(end, AudioEnd) and end.id == "m4" and end.cancelled
        assert engine.started == ["Message 1. Again.", "Message 2. Again.", "Four. Four again."]
        # A listener may not steer the queue.
        await overlay.asend({"type": "channel.skip", "id": "s"})
        refused = await until_message(overlay, lambda m: isinstance(m, Error))
        assert isinstance(refused, Error) and refused.code == "not_a_speaker"


async def test_a_channel_s_next_line_is_due_when_the_audio_it_sent_runs_out(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine(auto=True)  # 0.5 s of audio per sentence, made at once
    async with bot_and_overlay(encoder_worker, engine) as (bot, overlay):
        await bot.asend({"type": "speak", "id": "a", "text": "One. Two. Three. Four."})
        await bot.asend({"type": "speak", "id": "b", "text": "Five."})
        for line in ("a", "b"):
            await until_message(
                overlay, lambda m, line=line: isinstance(m, AudioEnd) and m.id == line
            )
    (first_at, first_hint), (second_at, second_hint) = engine.heard_until
    assert first_hint is None or first_hint <= first_at  # nothing was playing
    # "a" is 2 s of audio sent within milliseconds: its listeners have nearly all of it in hand.
    assert second_hint is not None and 1.5 < second_hint - second_at <= 2.0


SMALL_BUFFER = 16 * 1024


def _small_receive_buffer(addr_info: AddrInfoType) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    return sock


@contextlib.asynccontextmanager
async def stalled_listener(server: LiveServer) -> AsyncIterator[RawClient]:
    """A listener past hello with small fixed socket buffers at both ends, whose reading the
    test pauses (``ws._conn.transport.pause_reading()``)."""
    before = (
        set(server.runner.server.connections) if server.runner and server.runner.server else set()
    )
    connector = aiohttp.TCPConnector(socket_factory=_small_receive_buffer)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.ws_connect(server.ws_url, max_msg_size=0) as ws,
    ):
        client = RawClient(ws)
        await client.asend({"type": "hello", "client": "stalled-listener"})
        assert (await client.anext()).TYPE == "ready"
        assert server.runner is not None and server.runner.server is not None
        (connection,) = set(server.runner.server.connections) - before
        assert connection.transport is not None
        sending = connection.transport.get_extra_info("socket")
        sending.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        yield client


async def test_a_stalled_listener_is_cut_loose_and_the_others_hear_everything(
    encoder_worker: EncoderWorker,
) -> None:
    # 60 half-second sentences: 30 s of audio, three times what a listener may fall behind.
    engine = GatedEngine(auto=True)
    sentences = 60
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as bot,
        raw_client(srv) as overlay,
        stalled_listener(srv) as stalled,
    ):
        await producer(bot)
        await join(overlay, "listen", 48000)
        await join(stalled, "listen", 48000)
        connection = stalled.ws._conn  # aiohttp's reader would otherwise buffer more
        assert connection is not None and connection.transport is not None
        connection.transport.pause_reading()
        text = ".".join(f"Line {n}" for n in range(sentences)) + "."
        await bot.asend({"type": "speak", "id": "long", "text": text})
        done = await until_message(bot, lambda m: isinstance(m, AudioEnd), timeout=60)
        assert isinstance(done, AudioEnd) and not done.cancelled
        assert done.duration_ms == sentences * 500
        end = await until_message(overlay, lambda m: isinstance(m, AudioEnd), timeout=60)
        assert isinstance(end, AudioEnd) and not end.cancelled
        ((_, _, pcm),) = heard(overlay)
        assert end.samples == len(pcm) // 2 and end.samples / 48000 >= sentences * 0.5 - 0.01
        channels = srv.services.channels
        assert isinstance(channels, LocalChannels | SharedChannels)
        channel = channels.channel("public", "main") or next(iter(channels._channels.values()))
        await until_true(lambda: len(channel.seats) == 2, "the stalled listener cut loose")
        # The stalled listener reads again: what was in its buffers, then why it was let go.
        connection.transport.resume_reading()
        refused = await until_message(stalled, lambda m: isinstance(m, Error), timeout=60)
        assert isinstance(refused, Error) and refused.code == "listener_too_slow"
        closed = await stalled.ws.receive(timeout=30)
        assert closed.type is aiohttp.WSMsgType.CLOSE, closed
        assert closed.data == 4413, closed
        assert len(engine.started) == 1


async def test_a_session_that_joins_nothing_is_unaffected(encoder_worker: EncoderWorker) -> None:
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as bot,
        raw_client(srv) as overlay,
        raw_client(srv) as alone,
    ):
        await producer(bot)
        await join(overlay, "listen")
        await alone.aregister(reference_wav())
        await bot.asend({"type": "speak", "id": "m1", "text": "For the channel."})
        await alone.asend(
            {"type": "speak", "id": "m1", "text": "Mine alone.", "sample_rate": 16000}
        )
        mine = await until_message(alone, lambda m: isinstance(m, AudioEnd))
        assert isinstance(mine, AudioEnd) and mine.stream == 1 and mine.channel is None
        assert mine.samples == 8000
        await until_message(overlay, lambda m: isinstance(m, AudioEnd))
        kinds = [m.TYPE for m in alone.seen.messages]
        assert kinds == ["ready", "voice.ready", "queued", "audio.start", "audio.end"], kinds


async def test_the_python_client_speaks_into_and_listens_to_a_channel(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        LivevoiceClient(srv.ws_url) as bot,
        LivevoiceClient(srv.ws_url) as overlay,
    ):
        await bot.aregister(reference_wav())
        joined = await bot.ajoin("main", "speak")
        assert joined.role == "speak"
        await overlay.ajoin("main", "listen", sample_rate=16000)
        utterance = await bot.aspeak("One. Two.", user="Ann", kind="raid")
        result = await asyncio.wait_for(utterance.aresult(), 30)
        assert result.stream == 0 and result.pcm == b"" and not result.cancelled
        assert result.duration_ms == 1000.0
        samples, start, end = 0, None, None
        while end is None:
            event = await asyncio.wait_for(overlay.heard.get(), 30)
            if isinstance(event, ChannelHeardStarted):
                start = event.start
            elif isinstance(event, SpeechAudio):
                samples += len(event.pcm) // 2
            elif isinstance(event, ChannelHeardEnded):
                end = event.end
        assert start is not None and (start.user, start.kind, start.sample_rate) == (
            "Ann",
            "raid",
            16000,
        )
        assert samples == end.samples == 16000
        await bot.acontrol("pause")
        state = await asyncio.wait_for(overlay.heard.get(), 30)
        while not (isinstance(state, ChannelStateChanged) and state.state.paused):
            state = await asyncio.wait_for(overlay.heard.get(), 30)
