"""Per-message options of a channel speak (R15): priority lanes, interrupt, expire_s.

The placing rule and the admission checks in memory (``channel_place``, ``ServerProtocol`` /
``ClientProtocol``); each option end to end over real sockets, with ``GatedEngine`` holding the
timing (the audio itself is not what these tests are about).
"""

from __future__ import annotations

import orjson
import pytest

from live.encoder import EncoderWorker
from protocol import ClientProtocol, ServerProtocol
from protocol.client import SpeechQueued
from protocol.errors import LivevoiceError
from protocol.messages import (
    AudioEnd,
    AudioStart,
    Error,
    Hello,
    Queued,
    Speak,
)
from protocol.state import channel_place
from tests.clips import reference_wav
from tests.fakes import GatedEngine
from tests.server import live_server, raw_client, until_message, until_true
from tests.test_channels import bot_and_overlay, is_type, join, joined_protocol, state

pytestmark = pytest.mark.usefixtures("channel_store")


# --- in memory ----------------------------------------------------------------------------------
def place_all(messages: list[tuple[str, int, bool]]) -> list[str]:
    """The waiting queue after putting each (id, priority, interrupt) in turn."""
    queue: list[tuple[str, int]] = []
    for name, priority, interrupt in messages:
        index = channel_place([p for _, p in queue], priority, interrupt=interrupt)
        queue.insert(index, (name, priority))
    return [name for name, _ in queue]


def test_higher_lanes_go_first_and_no_lane_is_reordered() -> None:
    order = place_all(
        [
            ("chat1", 0, False),
            ("bits1", 5, False),
            ("chat2", 0, False),
            ("raid", 9, False),
            ("bits2", 5, False),
            ("chat3", 0, False),
            ("bits3", 5, False),
        ]
    )
    assert order == ["raid", "bits1", "bits2", "bits3", "chat1", "chat2", "chat3"]


def test_an_interrupt_goes_ahead_of_every_lane() -> None:
    order = place_all([("chat", 0, False), ("raid", 9, False), ("now", 0, True)])
    assert order == ["now", "raid", "chat"]


def test_the_place_is_the_number_of_messages_ahead() -> None:
    waiting = [9, 5, 5, 0, 0]
    assert channel_place(waiting, 5) == 3
    assert channel_place(waiting, 0) == 5
    assert channel_place(waiting, 9) == 1
    assert channel_place(waiting, 7) == 1
    assert channel_place([], 3) == 0


def test_a_channel_speak_with_lanes_is_queued_at_its_place() -> None:
    """R15 through both cores: the options pass admission, queued carries the place given."""
    server = joined_protocol("speak")
    client = ClientProtocol()
    client.track(Hello())
    server.receive_text(orjson.dumps({"type": "voice.use", "voice_id": "v"}))
    wire = {"type": "speak", "id": "m1", "text": "hi", "priority": 5, "expire_s": 2.5}
    speak = server.receive_text(orjson.dumps({**wire, "interrupt": True}))
    assert isinstance(speak, Speak)
    assert (speak.priority, speak.interrupt, speak.expire_s) == (5, True, 2.5)
    client.send_speak(speak)
    server.accept_speak(speak, position=0)
    events = [client.receive_text(f) for f in server.data_to_send() if isinstance(f, str)]
    queued = [e for e in events if isinstance(e, SpeechQueued)]
    assert len(queued) == 1 and queued[0].position == 0


@pytest.mark.parametrize(
    "fields",
    [{"priority": 10}, {"priority": -1}, {"expire_s": 0}, {"expire_s": 3601.0}],
)
def test_options_out_of_range_are_unsupported(fields: dict[str, object]) -> None:
    server = joined_protocol("speak")
    server.receive_text(orjson.dumps({"type": "voice.use", "voice_id": "v"}))
    with pytest.raises(LivevoiceError) as refused:
        server.receive_text(orjson.dumps({"type": "speak", "id": "m", "text": "hi", **fields}))
    assert refused.value.code == "unsupported" and refused.value.message_id == "m"
    assert not server.busy  # nothing admitted


@pytest.mark.parametrize("fields", [{"priority": 1}, {"interrupt": True}, {"expire_s": 5.0}])
def test_options_are_for_channel_messages_only(fields: dict[str, object]) -> None:
    server = ServerProtocol()
    server.receive_text(orjson.dumps({"type": "hello"}))
    server.receive_text(orjson.dumps({"type": "voice.use", "voice_id": "v"}))
    with pytest.raises(LivevoiceError) as refused:
        server.receive_text(orjson.dumps({"type": "speak", "id": "m", "text": "hi", **fields}))
    assert refused.value.code == "unsupported"


# --- end to end ---------------------------------------------------------------------------------
async def test_paid_messages_are_spoken_before_chat_each_lane_in_order(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine(auto=True)
    async with bot_and_overlay(encoder_worker, engine) as (bot, overlay):
        await bot.asend({"type": "channel.pause"})
        await until_message(overlay, state(0, True))
        sent = [("chat1", 0), ("bits1", 5), ("chat2", 0), ("raid", 9), ("bits2", 5)]
        positions = {}
        for name, priority in sent:
            await bot.asend({"type": "speak", "id": name, "text": f"{name}.", "priority": priority})
            queued = await until_message(bot, is_type(Queued, name))
            assert isinstance(queued, Queued)
            positions[name] = queued.position
        # Each was told the messages ahead of it when it was queued.
        assert positions == {"chat1": 0, "bits1": 0, "chat2": 2, "raid": 0, "bits2": 2}
        await until_message(overlay, state(5, True))
        await bot.asend({"type": "channel.resume"})
        order = []
        for _ in sent:
            start = await until_message(overlay, is_type(AudioStart))
            assert isinstance(start, AudioStart)
            order.append(start.id)
        assert order == ["raid", "bits1", "bits2", "chat1", "chat2"]
        # Across servers a start is announced before its synthesis begins: wait for the last.
        await until_true(lambda: len(engine.started) == len(order), "every line synthesized")
        assert engine.started == [f"{name}." for name in order]


async def test_a_message_waiting_past_expire_s_is_dropped_with_expired(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine(auto=True)
    async with bot_and_overlay(encoder_worker, engine) as (bot, overlay):
        await bot.asend({"type": "channel.pause"})
        await until_message(overlay, state(0, True))
        await bot.asend({"type": "speak", "id": "old", "text": "Old news.", "expire_s": 0.2})
        await bot.asend({"type": "speak", "id": "keep", "text": "Still here.", "expire_s": 3600})
        await bot.asend({"type": "speak", "id": "plain", "text": "No expiry."})
        await until_message(overlay, state(3, True))
        expired = await until_message(bot, is_type(Error, "old"))
        assert isinstance(expired, Error) and expired.code == "expired"
        await until_message(overlay, state(2, True))  # listeners see the queue shrink
        await bot.asend({"type": "channel.resume"})
        for name in ("keep", "plain"):
            done = await until_message(bot, is_type(AudioEnd, name))
            assert isinstance(done, AudioEnd) and not done.cancelled
        assert engine.started == ["Still here.", "No expiry."]  # the expired one never spoken
        assert not any(isinstance(m, AudioStart) and m.id == "old" for m in overlay.seen.messages)


async def test_an_interrupt_cuts_the_current_message_and_is_spoken_next(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine()
    async with bot_and_overlay(encoder_worker, engine) as (bot, overlay):
        await bot.asend({"type": "speak", "id": "long", "text": "One. Two. Three."})
        start = await until_message(overlay, is_type(AudioStart))
        assert isinstance(start, AudioStart) and start.id == "long"
        await bot.asend({"type": "speak", "id": "raid", "text": "Raid.", "priority": 9})
        await until_message(overlay, state(1, False))
        engine.release(1)
        await overlay.anext_frame()  # "long" is being heard; the gate holds its next sentence
        await bot.asend({"type": "speak", "id": "now", "text": "Now.", "interrupt": True})
        queued = await until_message(bot, is_type(Queued, "now"))
        assert isinstance(queued, Queued) and queued.position == 0
        cut = await until_message(overlay, is_type(AudioEnd, "long"))
        assert isinstance(cut, AudioEnd) and cut.cancelled and cut.samples == 11025
        done = await until_message(bot, is_type(AudioEnd, "long"))
        assert isinstance(done, AudioEnd) and done.cancelled
        engine.release(2)
        order = []
        for _ in range(2):
            start = await until_message(overlay, is_type(AudioStart))
            assert isinstance(start, AudioStart)
            order.append(start.id)
        assert order == ["now", "raid"]  # the interrupt first, then the queue as it was
        for name in order:
            done = await until_message(bot, is_type(AudioEnd, name))
            assert isinstance(done, AudioEnd) and not done.cancelled
        assert engine.started == ["One. Two. Three.", "Now.", "Raid."]


async def test_a_message_speaks_in_its_own_voice_and_an_unknown_one_fails_alone(
    encoder_worker: EncoderWorker,
) -> None:
    """R16: a per-viewer voice from a speaker with no voice pinned; an unknown id ends that
    message with voice_not_found and the next one is spoken."""
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as owner,
        raw_client(srv) as bot,
        raw_client(srv) as overlay,
    ):
        ready = await owner.aregister(reference_wav())  # a viewer's voice, registered once
        viewer_voice = ready.voice_id
        await join(bot, "speak")  # this bot pins no voice of its own
        await join(overlay, "listen")
        await bot.asend({"type": "speak", "id": "m0", "text": "No voice."})
        refused = await until_message(bot, is_type(Error, "m0"))
        assert isinstance(refused, Error) and refused.code == "no_voice"
        await bot.asend({"type": "speak", "id": "bad", "text": "Bad.", "voice_id": "v_nope"})
        await bot.asend({"type": "speak", "id": "good", "text": "Good.", "voice_id": viewer_voice})
        failed = await until_message(bot, is_type(Error, "bad"))
        assert isinstance(failed, Error) and failed.code == "voice_not_found"
        start = await until_message(overlay, is_type(AudioStart))
        assert isinstance(start, AudioStart) and start.id == "good"
        assert start.voice == viewer_voice
        done = await until_message(bot, is_type(AudioEnd, "good"))
        assert isinstance(done, AudioEnd) and not done.cancelled and done.duration_ms == 500
        assert engine.started == ["Good."]
