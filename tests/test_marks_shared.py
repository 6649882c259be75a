"""Marks and playback positions across servers (issue 13): two servers on one real
redis-server, real sockets.

A producer on server A, listeners on B at 16 and 48 kHz asking for marks: every word in order,
exact at each rate against the engine's positions (a listener on A at the engine's rate); a
listener coming back mid-line gets the marks of the rest, counted in its own stream; a ``played``
on B reaches the listeners on A (and B's other listeners) as ``channel.played``; the Python
client reads both message types.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from clients.client import HeardAudio, LivevoiceClient
from live.encoder import EncoderWorker, SpeakerEncoder
from live.marks import MOUTH_RATE, VISEMES, VisemeMark, WordMark, text_words
from live.speech import MarkedChunk, PiperEngine
from live.testing.redis_server import RedisServer
from protocol import AudioFrame, ClientProtocol
from protocol.client import ChannelHeardEnded, ChannelHeardStarted, HeardMarks, PositionHeard
from protocol.messages import (
    AudioEnd,
    AudioMarks,
    AudioStart,
    ChannelJoined,
    ChannelPlayed,
    Played,
)
from tests.fakes import GatedEngine
from tests.server import RawClient, live_server, raw_client, until_message
from tests.test_channels import is_type, joined_protocol, producer

pytestmark = pytest.mark.timeout(300)
Started = ChannelHeardStarted

TEXT = "Thanks for the follow, Ada! It's 1234 o'clock, isn't it? Supercalifragilistic."
ENGINE_RATE = 22050


class GatedMarkedEngine(GatedEngine):
    """``GatedEngine`` with alignments: each sentence (a 0.5 s tone) is one word mark and one
    viseme mark spanning it, so a test decides how far a line has been spoken."""

    aligned = True

    async def stream_marked(
        self, text: str, voice: Any, profile: Any = None
    ) -> AsyncGenerator[MarkedChunk, None]:
        at = 0
        words = [s.strip() for s in text.split(".") if s.strip()]
        async for pcm in self.stream(text, voice):
            word = words.pop(0)
            end = at + len(pcm)
            yield MarkedChunk(pcm, (WordMark(word, at, end),), (VisemeMark("aa", at, end),))
            at = end


async def join(client: RawClient, rate: int, *, marks: bool = True, **extra: Any) -> bool | None:
    await client.asend(
        {
            "type": "channel.join",
            "channel": "main",
            "role": "listen",
            "sample_rate": rate,
            **({"marks": True} if marks else {}),
            **extra,
        }
    )
    joined = await client.await_type("channel.joined")
    assert isinstance(joined, ChannelJoined)
    return joined.resumed


class Heard:
    """What one listener heard of each message: its start, each ``audio.marks`` with the
    samples of its stream received before it, its samples, its end."""

    def __init__(self, start: AudioStart) -> None:
        self.start = start
        self.marks: list[tuple[int, AudioMarks]] = []
        self.samples = 0
        self.end: AudioEnd | None = None

    @property
    def words(self) -> list[dict[str, Any]]:
        return [w for _, m in self.marks for w in (m.words or [])]

    @property
    def mouth(self) -> list[dict[str, Any]]:
        return [m.mouth for _, m in self.marks if m.mouth]


async def hear(client: RawClient, messages: int, timeout_s: float = 120) -> list[Heard]:
    """Read ``client`` until ``messages`` channel messages have ended, bounded."""
    out: list[Heard] = []
    streams: dict[int, Heard] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while sum(h.end is not None for h in out) < messages:
        assert loop.time() < deadline, f"heard {len(out)} of {messages} messages"
        item = await client.areceive(max(0.01, deadline - loop.time()))
        if isinstance(item, AudioStart):
            streams[item.stream] = Heard(item)
            out.append(streams[item.stream])
        elif isinstance(item, AudioMarks):
            heard = streams[item.stream]
            heard.marks.append((heard.samples, item))
        elif isinstance(item, AudioFrame):
            streams[item.stream].samples += len(item.pcm) // 2
        elif isinstance(item, AudioEnd) and item.stream in streams:
            streams[item.stream].end = item
    return out


def check_in_band(heard: Heard) -> None:
    """Every mark lies inside the stream, after the audio received before its message."""
    assert heard.end is not None and heard.end.samples == heard.samples
    for before, m in heard.marks:
        for mark in [*(m.words or []), *(m.visemes or [])]:
            assert before <= mark["start"] < mark["end"] <= heard.samples, (before, mark)
        for v in m.visemes or []:
            assert v["v"] in VISEMES
        if m.mouth:
            assert m.mouth["start"] >= before and m.mouth["rate"] == MOUTH_RATE


async def test_listeners_on_another_server_get_every_word_exact_at_their_own_rate(
    redis_server: RedisServer, speaker_encoder: SpeakerEncoder, piper: PiperEngine
) -> None:
    url = redis_server.url
    async with (
        live_server(embedder=EncoderWorker(speaker_encoder), engine=piper, redis_url=url) as a,
        live_server(embedder=EncoderWorker(speaker_encoder), engine=piper, redis_url=url) as b,
        raw_client(a) as bot,
        raw_client(a) as a22,
        raw_client(b) as b16,
        raw_client(b) as b48,
        raw_client(b) as plain,
    ):
        await producer(bot)
        await join(a22, ENGINE_RATE)
        await join(b16, 16000)
        await join(b48, 48000)
        await join(plain, 48000, marks=False)
        await bot.asend({"type": "speak", "id": "m1", "text": TEXT})
        (ref,), (h16,), (h48,), (bare,) = [await hear(c, 1) for c in (a22, b16, b48, plain)]
    assert ref.start.marks == h16.start.marks == h48.start.marks == ["words", "visemes", "mouth"]
    assert bare.start.marks is None and bare.marks == [], "not asked, nothing changes"
    words = [w["text"] for w in ref.words]
    assert words == text_words(TEXT), "every word, in order"
    for heard in (ref, h16, h48):
        check_in_band(heard)
        starts = [w["start"] for w in heard.words]
        ends = [w["end"] for w in heard.words]
        assert starts == sorted(starts)
        assert all(e <= s for e, s in zip(ends, starts[1:], strict=False)), "words overlap"
        # the mouth: one value per 20 ms of the message, whatever the rate
        assert sum(len(m["values"]) for m in heard.mouth) == -(-ref.samples // (ENGINE_RATE // 50))
    for heard, rate in ((h16, 16000), (h48, 48000)):
        assert [w["text"] for w in heard.words] == words
        for w, at_engine in zip(heard.words, ref.words, strict=True):
            for edge in ("start", "end"):
                expected = round(at_engine[edge] * rate / ENGINE_RATE)
                assert abs(w[edge] - expected) <= 1, (rate, w, at_engine)
        assert [v for m in heard.mouth for v in m["values"]] == [
            v for m in ref.mouth for v in m["values"]
        ]


async def test_a_listener_that_comes_back_gets_the_marks_of_the_rest_in_its_own_stream(
    redis_server: RedisServer, encoder_worker: EncoderWorker
) -> None:
    """R18 with R19: marks that end before the resume point are dropped, the rest are counted
    from the resumed stream's sample 0 (``resumed_from`` frames into the message); the line
    after it is replayed with all of its marks."""
    engine = GatedMarkedEngine()
    url = redis_server.url
    rate, frame = 24000, 2400  # 100 ms frames
    async with (
        live_server(embedder=encoder_worker, engine=engine, redis_url=url) as a,
        live_server(embedder=encoder_worker, engine=engine, redis_url=url) as b,
        raw_client(a) as bot,
        raw_client(b) as stayed,
    ):
        await producer(bot)
        await join(stayed, rate)
        async with raw_client(b) as leaving:
            await join(leaving, rate)
            await bot.asend({"type": "speak", "id": "m1", "text": "One. Two. Three. Four."})
            await bot.asend({"type": "speak", "id": "m2", "text": "Five. Six."})
            engine.release(2)  # One and Two
            got = 0
            while got < 7 * frame:  # into "Two": the resume point falls inside a word
                if isinstance(item := await leaving.areceive(60), AudioFrame):
                    got += len(item.pcm) // 2
            start = next(m for m in leaving.seen.messages if isinstance(m, AudioStart))
            last_seq = len(leaving.seen.frames[start.stream]) - 1
        engine.release(4)
        full1, full2 = await hear(stayed, 2)
        async with raw_client(a) as back:
            resumed = await join(back, rate, resume_message=start.message, resume_seq=last_seq)
            assert resumed is True
            rest1, all2 = await hear(back, 2)
    assert rest1.start.resumed_from == last_seq + 1 and rest1.start.marks == full1.start.marks
    skipped = (last_seq + 1) * frame
    assert full1.samples - skipped == rest1.samples
    check_in_band(rest1)
    check_in_band(all2)
    assert [w["text"] for w in full1.words] == ["One", "Two", "Three", "Four"]
    expected = [
        {"text": w["text"], "start": max(0, w["start"] - skipped), "end": w["end"] - skipped}
        for w in full1.words
        if w["end"] > skipped
    ]
    assert rest1.words == expected and expected[0]["text"] == "Two"
    window = rate // MOUTH_RATE
    late = -(-skipped // window)
    assert rest1.mouth[0]["start"] == late * window - skipped
    assert [v for m in rest1.mouth for v in m["values"]] == [
        v for m in full1.mouth for v in m["values"]
    ][late:]
    assert all2.words == full2.words and all2.mouth == full2.mouth


async def test_played_on_one_server_reaches_the_other_listeners_on_every_server(
    redis_server: RedisServer, encoder_worker: EncoderWorker
) -> None:
    """R20 across servers, through the Python client on both ends: a listener on B reports
    what it played; a listener on A (and B's other listener) gets ``channel.played`` with
    the channel's key of the message and the milliseconds; the reporter does not. The
    listener on A asked for marks and reads them as events too."""
    engine = GatedEngine(auto=True)
    url = redis_server.url
    async with (
        live_server(embedder=encoder_worker, engine=engine, redis_url=url) as a,
        live_server(embedder=encoder_worker, engine=engine, redis_url=url) as b,
        raw_client(a) as bot,
        raw_client(b) as peer,
        LivevoiceClient(a.ws_url) as avatar,
        LivevoiceClient(b.ws_url) as obs,
    ):
        await producer(bot)
        await avatar.ajoin("main", "listen", sample_rate=16000, marks=True)
        await obs.ajoin("main", "listen", sample_rate=16000)
        await join(peer, 16000, marks=False)
        await bot.asend({"type": "speak", "id": "m1", "text": "One. Two."})
        while not isinstance(started := await asyncio.wait_for(obs.heard.get(), 60), Started):
            pass
        assert started.start.message
        key, stream = started.start.message, started.start.stream

        seen: list[Any] = []

        async def position() -> PositionHeard:
            while True:
                seen.append(event := await avatar.heard.get())
                if isinstance(event, PositionHeard):
                    return event

        waiting = asyncio.ensure_future(position())
        try:
            for _ in range(400):  # until A's subscription is in place: bounded, event-driven
                await obs.areport_played(stream, 8000)
                done, _ = await asyncio.wait({waiting}, timeout=0.15)
                if done:
                    break
            heard = await asyncio.wait_for(waiting, 1)
        finally:
            waiting.cancel()
        assert heard.played.channel == "main"
        assert heard.played.message == key and heard.played.ms == 500.0
        while not any(isinstance(e, ChannelHeardEnded) for e in seen):
            seen.append(await asyncio.wait_for(avatar.heard.get(), 60))
        marks = [e for e in seen if isinstance(e, HeardMarks)]
        assert marks and all(e.channel == "main" and e.marks.mouth for e in marks)
        audio = [e for e in seen if isinstance(e, HeardAudio)]
        assert audio and seen.index(marks[0]) < seen.index(audio[0]), "marks before audio"
        relayed = await until_message(peer, is_type(ChannelPlayed), timeout=30)
        assert isinstance(relayed, ChannelPlayed) and relayed.message == key
        await until_message(bot, is_type(AudioEnd, "m1"), timeout=30)
        await obs.aping()  # what was relayed to it would have arrived by now
        while not obs.heard.empty():
            assert not isinstance(obs.heard.get_nowait(), PositionHeard), "not to its reporter"


async def test_played_reaches_the_other_listeners_of_a_channel_on_one_server(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as bot,
        raw_client(srv) as obs,
        raw_client(srv) as avatar,
    ):
        await producer(bot)
        await join(obs, 48000, marks=False)
        await join(avatar, 16000, marks=False)
        await bot.asend({"type": "speak", "id": "m1", "text": "One."})
        start = await obs.await_type("audio.start")
        assert isinstance(start, AudioStart)
        await obs.asend({"type": "played", "stream": start.stream, "samples": 4800})
        relayed = await until_message(avatar, is_type(ChannelPlayed), timeout=30)
        assert relayed == ChannelPlayed(channel="main", message=start.message or "", ms=100.0)


def test_the_client_protocol_reads_marks_and_positions() -> None:
    wire = ClientProtocol()
    start = wire.receive_text(
        '{"type":"audio.start","id":"m1","stream":3,"sample_rate":16000,"channels":1,'
        '"encoding":"s16le","channel":"main","text":"Hi","voice":"v","message":"7",'
        '"marks":["words","visemes","mouth"]}'
    )
    assert isinstance(start, ChannelHeardStarted)
    marks = wire.receive_text(
        '{"type":"audio.marks","id":"m1","stream":3,'
        '"words":[{"text":"Hi","start":0,"end":4000}],'
        '"mouth":{"start":0,"rate":50,"values":[0.0,0.5]}}'
    )
    assert isinstance(marks, HeardMarks) and marks.channel == "main" and marks.id == "m1"
    assert marks.marks.words == [{"text": "Hi", "start": 0, "end": 4000}]
    played = wire.receive_text(
        '{"type":"channel.played","channel":"main","message":"7","ms":250.0}'
    )
    assert isinstance(played, PositionHeard)
    assert played.played == ChannelPlayed(channel="main", message="7", ms=250.0)


def test_a_resumed_listeners_position_counts_from_the_start_of_the_message() -> None:
    """R20 after R18: a stream that began at frame ``resumed_from`` of its message reports its
    played samples from there; the relayed position is in the whole message."""
    proto = joined_protocol("listen", 24000)
    proto.accept_hello(session_id="s", limits={}, default_sample_rate=22050, frame_ms=100)
    whole = proto.listen_start(id="m1", text="hi", voice=None, user=None, kind=None, message="7")
    resumed = proto.listen_start(
        id="m1", text="hi", voice=None, user=None, kind=None, message="8", resumed_from=5
    )
    assert whole is not None and resumed is not None
    assert proto.played(Played(stream=whole.stream, samples=2400), now=10.0) == ("7", 100.0)
    # frames 0-4 of message 8 (5 x 2400 samples at 24 kHz) came before this stream's first
    assert proto.played(Played(stream=resumed.stream, samples=2400), now=20.0) == ("8", 600.0)
