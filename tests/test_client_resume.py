"""A channel listener on the Python client resumes (R18): every rejoin passes back the position it
last received (or, when its caller reports playback, the one played), against the real server
(Piper) through a relay that records what the client sends and drops its socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from clients.client import Backoff, HeardAudio, ListenPosition, LivevoiceClient
from protocol.client import ChannelHeardStarted
from tests.channel_kit import LONG_TEXT, speaking_bot
from tests.relay import Relay, relay
from tests.server import LiveServer, live_server, until_true

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

TIMEOUT = 30.0
FAST = Backoff(initial=0.05, maximum=0.5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[LiveServer]:
    async with live_server() as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def bot(server: LiveServer) -> AsyncIterator[LivevoiceClient]:
    async with speaking_bot(server.ws_url, TIMEOUT) as c:
        yield c


async def heard_frames(client: LivevoiceClient, n: int) -> tuple[ChannelHeardStarted, HeardAudio]:
    """Reads ``heard`` until a message started and ``n`` of its frames came: the start and the
    last of those frames."""
    start: ChannelHeardStarted | None = None
    frames = 0
    while True:
        event = await asyncio.wait_for(client.heard.get(), TIMEOUT)
        if isinstance(event, ChannelHeardStarted):
            start, frames = event, 0
        elif isinstance(event, HeardAudio) and start is not None:
            frames += 1
            if frames == n:
                return start, event


async def heard_frames_more(client: LivevoiceClient, n: int) -> None:
    """Reads ``n`` more audio frames (received, not reported played)."""
    while n:
        if isinstance(await asyncio.wait_for(client.heard.get(), TIMEOUT), HeardAudio):
            n -= 1


async def rejoin(listener: LivevoiceClient, through: Relay) -> dict[str, object]:
    """Drops the listener's socket at the relay; the ``channel.join`` it sends on coming back."""
    joins = len(through.joins())
    reconnects = listener.reconnects
    await through.adrop()
    await until_true(lambda: listener.reconnects > reconnects, "the reconnect", TIMEOUT)
    assert len(through.joins()) == joins + 1
    return through.joins()[-1]


async def test_a_rejoin_resumes_from_the_last_frame_received(
    server: LiveServer, bot: LivevoiceClient
) -> None:
    async with (
        relay(server.ws_url) as through,
        LivevoiceClient(through.url, backoff=FAST, timeout=TIMEOUT) as listener,
    ):
        joined = await listener.ajoin("main", "listen", sample_rate=16000)
        assert joined.resumed is None and listener.listen_position is None
        assert "resume_message" not in through.joins()[0]  # nothing heard yet: nothing to resume

        utterance = await bot.aspeak(LONG_TEXT, user="Ann")
        start, _ = await heard_frames(listener, 3)
        key = start.start.message
        assert key  # the channel's key for the message (R18)
        join = await rejoin(listener, through)

        # What reached the client before the drop, as the relay forwarded it: its last frame.
        first = through.legs[0]
        assert first.last_frame is not None
        resumed_from = first.starts[first.last_frame.stream].get("resumed_from", 0)
        expected = ListenPosition(key, resumed_from + first.last_frame.seq)
        assert expected.seq >= 2
        assert (join["resume_message"], join["resume_seq"]) == (expected.message, expected.seq)
        assert join["role"] == "listen" and join["sample_rate"] == 16000
        # Every frame received before the drop moved the position; nothing after it came.
        last = None
        while not listener.heard.empty():
            if isinstance(event := listener.heard.get_nowait(), HeardAudio):
                last = event.position if event.position and event.position.message == key else last
        assert last == expected == listener.listen_position
        # The server answered the resume (this one keeps no audio without Redis: false).
        assert listener.resumed is not None

        # A new client given that position (another process, a restart) asks for it at once.
        async with (
            relay(server.ws_url) as other,
            LivevoiceClient(other.url, timeout=TIMEOUT) as again,
        ):
            rejoined = await again.ajoin("main", "listen", resume=expected)
            sent = other.joins()[0]
            assert (sent["resume_message"], sent["resume_seq"]) == (key, expected.seq)
            assert rejoined.resumed is not None and again.resumed == rejoined.resumed
        await bot.acontrol("skip")
        await asyncio.wait_for(utterance.aresult(), TIMEOUT)


async def test_a_player_reporting_playback_resumes_from_what_it_played(
    server: LiveServer, bot: LivevoiceClient
) -> None:
    async with (
        relay(server.ws_url) as through,
        LivevoiceClient(through.url, backoff=FAST, timeout=TIMEOUT, played_reports=True) as player,
    ):
        await player.ajoin("main", "listen")
        utterance = await bot.aspeak(LONG_TEXT)
        start, second = await heard_frames(player, 2)
        assert second.position is not None
        assert player.listen_position is None  # received is not played
        player.played(second.position)
        await heard_frames_more(player, 3)
        join = await rejoin(player, through)
        assert (join["resume_message"], join["resume_seq"]) == (start.start.message, 1)
        await bot.acontrol("skip")
        await asyncio.wait_for(utterance.aresult(), TIMEOUT)


async def test_a_speaker_never_resumes(server: LiveServer) -> None:
    """A position kept by a client that joins to speak is not sent: only a listener resumes
    (the server would refuse it, bad_message)."""
    async with (
        relay(server.ws_url) as through,
        LivevoiceClient(through.url, timeout=TIMEOUT) as speaker,
    ):
        joined = await speaker.ajoin("main", "speak", resume=ListenPosition("m1", 3))
        assert joined.role == "speak" and "resume_message" not in through.joins()[0]
