"""A channel's word filter (R17) and a message voice deleted while it waits (R16).

The matcher and the protocol rule in memory; the filter end to end over real sockets, heard by a
listener as the text in ``audio.start.text``, with ``GatedEngine`` (the audio is not the point).
"""

from __future__ import annotations

import orjson
import pytest

from live.encoder import EncoderWorker
from protocol.errors import LivevoiceError
from protocol.messages import (
    AudioEnd,
    AudioStart,
    Cancelled,
    ChannelFiltered,
    Error,
    Queued,
    VoiceDeleted,
)
from protocol.wordfilter import MAX_WORD_CHARS, MAX_WORDS, WordFilter
from tests.clips import reference_wav
from tests.fakes import GatedEngine
from tests.server import live_server, raw_client, until_message
from tests.test_channels import bot_and_overlay, is_type, join, joined_protocol, state

pytestmark = pytest.mark.usefixtures("channel_store")


# --- in memory ----------------------------------------------------------------------------------
def compiled(words: list[str], **options: object) -> WordFilter:
    return WordFilter.compile(words, message_id="f", **options)  # type: ignore[arg-type]


def test_words_are_masked_whole_and_case_insensitively() -> None:
    rules = compiled(["darn", "heck*", "*fool", "b*d"])
    assert (
        rules.apply("Darn it, HECKIN tomfool, bad bd bird") == "beep it, beep beep, beep beep beep"
    )
    # Whole words only: a literal inside another word, or a wildcard's missing part, is no hit.
    assert rules.apply("darnit fools heck") == "darnit fools beep"
    assert rules.apply("hec bear") == "hec bear"


def test_drop_refuses_a_message_with_a_match_and_keeps_the_others() -> None:
    rules = compiled(["darn"], action="drop")
    assert rules.apply("oh DARN.") is None
    assert rules.apply("oh darling.") == "oh darling."


def test_links_are_spoken_as_link_only_when_asked() -> None:
    text = "see https://example.com/a?b=1 or www.foo.org and twitch.tv/me now"
    assert compiled([], links=True).apply(text) == "see link or link and link now"
    assert compiled(["see"]).apply(text).startswith("beep https://example.com/a?b=1")  # type: ignore[union-attr]


def test_regex_syntax_is_no_pattern() -> None:
    """Only literals with one '*': a user regex could hang the server."""
    for word in ("a.b", "(a+)+", "*", "a**", "*a*", "[ab]", "a b"):
        with pytest.raises(LivevoiceError) as refused:
            compiled([word])
        assert refused.value.code == "unsupported" and refused.value.message_id == "f"


def test_the_list_is_bounded() -> None:
    compiled(["w"] * MAX_WORDS)
    compiled(["w" * MAX_WORD_CHARS])
    for words in (["w"] * (MAX_WORDS + 1), ["w" * (MAX_WORD_CHARS + 1)], [""]):
        with pytest.raises(LivevoiceError) as refused:
            compiled(words)
        assert refused.value.code == "unsupported"
    with pytest.raises(LivevoiceError):
        compiled(["w"], action="shout")


def test_a_hostile_list_costs_a_bounded_number_of_checks() -> None:
    """The worst case a streamer can configure against the longest message: every word is
    looked up once and checked against each wildcard by prefix and suffix, nothing more."""
    rules = compiled([f"{'a' * 31}*{'b' * 31}"] * MAX_WORDS)
    text = " ".join(["a" * 63] * 31)  # 2,000 characters of near misses
    assert rules.apply(text) == text


def test_channel_filter_is_a_speakers_request_answered_channel_filtered() -> None:
    speaker = joined_protocol("speak")
    speaker.data_to_send()  # channel.joined
    wire = {"type": "channel.filter", "words": ["darn", "heck*"], "links": True, "id": "f1"}
    speaker.receive_text(orjson.dumps(wire))
    sent = [orjson.loads(f) for f in speaker.data_to_send()]
    assert sent == [
        {
            "type": "channel.filtered",
            "channel": "main",
            "words": 2,
            "action": "mask",
            "links": True,
            "id": "f1",
        }
    ]
    listener = joined_protocol("listen")
    with pytest.raises(LivevoiceError) as refused:
        listener.receive_text(orjson.dumps(wire))
    assert refused.value.code == "not_a_speaker" and refused.value.message_id == "f1"


# --- end to end ---------------------------------------------------------------------------------
async def test_the_filter_masks_then_drops_what_listeners_hear(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine(auto=True)
    async with bot_and_overlay(encoder_worker, engine) as (bot, overlay):
        # Off by default: the text is spoken as cleaned.
        await bot.asend({"type": "speak", "id": "m0", "text": "Darn, see https://x.com/a."})
        start = await until_message(overlay, is_type(AudioStart, "m0"))
        assert isinstance(start, AudioStart) and start.text == "Darn, see https://x.com/a."
        wire = {"type": "channel.filter", "words": ["DARN", "heck*"], "links": True, "id": "f1"}
        await bot.asend(wire)
        answer = await until_message(bot, is_type(ChannelFiltered, "f1"))
        assert isinstance(answer, ChannelFiltered) and answer.words == 2 and answer.links
        await bot.asend(
            {"type": "speak", "id": "m1", "text": "darn it, HECKIN see https://x.com/a."}
        )
        start = await until_message(overlay, is_type(AudioStart, "m1"))
        assert isinstance(start, AudioStart) and start.text == "beep it, beep see link"
        done = await until_message(bot, is_type(AudioEnd, "m1"))
        assert isinstance(done, AudioEnd) and not done.cancelled

        await bot.asend({"type": "channel.filter", "words": ["darn"], "action": "drop", "id": "f2"})
        await until_message(bot, is_type(ChannelFiltered, "f2"))
        await bot.asend({"type": "speak", "id": "m2", "text": "Oh darn."})
        await bot.asend({"type": "speak", "id": "m3", "text": "Oh darling."})
        refused = await until_message(bot, lambda m: getattr(m, "id", None) == "m2")
        assert isinstance(refused, Error) and refused.code == "filtered"
        start = await until_message(overlay, is_type(AudioStart))
        assert isinstance(start, AudioStart) and start.id == "m3" and start.text == "Oh darling."
        await until_message(bot, is_type(AudioEnd, "m3"))
        assert engine.started[-1] == "Oh darling."
        assert "Oh darn." not in engine.started
        assert not any(isinstance(m, Queued) and m.id == "m2" for m in bot.seen.messages)


async def test_a_waiting_message_whose_voice_is_deleted_is_not_spoken(
    encoder_worker: EncoderWorker,
) -> None:
    """R16 and R6: the tenant deletes a viewer's voice (from a session outside the channel)
    while a message in it waits; the message ends cancelled for its producer, unspoken."""
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as owner,
        raw_client(srv) as bot,
        raw_client(srv) as overlay,
    ):
        ready = await owner.aregister(reference_wav())
        viewer_voice = ready.voice_id
        await join(bot, "speak")
        await join(overlay, "listen")
        await bot.asend({"type": "channel.pause"})
        await until_message(overlay, state(0, True))
        await bot.asend({"type": "speak", "id": "gone", "text": "Gone.", "voice_id": viewer_voice})
        await until_message(bot, is_type(Queued, "gone"))
        await until_message(overlay, state(1, True))
        await owner.asend({"type": "voice.delete", "voice_id": viewer_voice, "id": "d1"})
        deleted = await until_message(owner, is_type(VoiceDeleted, "d1"))
        assert isinstance(deleted, VoiceDeleted)
        ended = await until_message(bot, lambda m: getattr(m, "id", None) == "gone")
        assert isinstance(ended, Cancelled)
        await until_message(overlay, state(0, True))
        await bot.asend({"type": "channel.resume"})
        await until_message(overlay, state(0, False))
        await bot.asend({"type": "ping", "id": "p"})
        await bot.await_type("pong")
        assert engine.started == []
        assert not any(isinstance(m, AudioStart) for m in overlay.seen.messages)


async def test_a_waiting_message_in_the_producers_deleted_voice_is_not_spoken(
    encoder_worker: EncoderWorker,
) -> None:
    """R6 in a channel: the producer's pinned voice is deleted while its messages wait in the
    channel; they end cancelled for it, unspoken, as its own queue's would."""
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as bot,
        raw_client(srv) as overlay,
    ):
        ready = await bot.aregister(reference_wav())
        await join(bot, "speak")
        await join(overlay, "listen")
        await bot.asend({"type": "channel.pause"})
        await until_message(overlay, state(0, True))
        for n in (1, 2):
            await bot.asend({"type": "speak", "id": f"m{n}", "text": f"Message {n}."})
            await until_message(bot, is_type(Queued, f"m{n}"))
        await until_message(overlay, state(2, True))
        await bot.asend({"type": "voice.delete", "voice_id": ready.voice_id, "id": "d1"})
        for n in (1, 2):
            ended = await until_message(bot, lambda m, n=n: getattr(m, "id", None) == f"m{n}")
            assert isinstance(ended, Cancelled), ended
        await until_message(overlay, state(0, True))
        await bot.asend({"type": "channel.resume"})
        await until_message(overlay, state(0, False))
        await bot.asend({"type": "ping", "id": "p"})
        await bot.await_type("pong")
        assert engine.started == []
        assert not any(isinstance(m, AudioStart) for m in overlay.seen.messages)
