"""Word captions in headless Chromium: the widget's captions mode (and the overlay's line) light
each word of a channel's line in order, in time with what the page plays (SPEC.md "Marks")."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from live.encoder import EncoderWorker
from live.marks import text_words
from live.speech import PiperEngine
from protocol.messages import AudioEnd
from tests.server import live_server, raw_client, until_message
from tests.test_widget_browser import (
    ARTIFACTS,
    AUDIBLE_DB,
    CHROMIUM_ARGS,
    HEARD_LEVEL_SCRIPT,
    OVERLAY_JOINED,
    TIMEOUT_MS,
    channel_bot,
    chromium,
    hooks,
    playwright_api,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

LINE = "Thanks for the follow, Ann! Welcome to the stream, and enjoy the show tonight."
CAPTIONS_URL = (
    "/widget?mode=captions&channel=main&volume=0.8"
    "&font=DejaVu%20Sans&size=72&color=ffffff&highlight=ffd84d"
)
OVERLAY_URL = "/widget?mode=overlay&channel=main&mute=1&highlight=%2300e5ff"
OFFSET_BOUND_MS = 250.0
"""Caption to audio: how late a word may light after playback reached its first sample. The
page's figure is a few ms plus one animation frame; the bound is for a loaded 2-core machine."""


def highlights(state: dict[str, Any], message: str) -> list[dict[str, Any]]:
    return [e for e in state["captions"]["log"] if e["message"] == message]


def assert_words_lit_in_order(state: dict[str, Any]) -> tuple[dict[str, Any], list[float]]:
    """The one heard line's marks are its words; each lit in turn (at most the last one missed
    when the line ends before a frame draws it); the caption-to-audio offsets in ms."""
    (heard,) = state["messages"].values()
    assert heard["state"] == "done" and heard["text"] == LINE
    words = text_words(heard["text"])
    assert [w["text"] for w in heard["words"]] == words
    lit = highlights(state, heard["id"])
    assert [e["index"] for e in lit] == list(range(len(lit))), lit  # none skipped, none twice
    assert [e["text"] for e in lit] == words[: len(lit)] and len(lit) >= len(words) - 1, lit
    track = state["tracks"][str(heard["track"])]
    assert track["underruns"] == 0 and track["played"] == track["samples"] > 0
    return heard, [e["offsetMs"] for e in lit]


async def test_captions_light_each_spoken_word_in_order_in_time_with_playback(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    async_api = playwright_api()
    executable = chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    async with (
        live_server(embedder=encoder_worker, engine=piper) as srv,
        raw_client(srv) as bot,
        async_api.async_playwright() as pw,
    ):
        await channel_bot(bot)
        browser = await pw.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            errors: list[str] = []
            # The captions page plays the channel; the overlay beside it is muted (mute=1) and
            # lights the same words on its own line.
            captions = await browser.new_page(viewport={"width": 1920, "height": 1080})
            overlay = await browser.new_page(viewport={"width": 800, "height": 240})
            for page, url in [(captions, CAPTIONS_URL), (overlay, OVERLAY_URL)]:
                await page.add_init_script(HEARD_LEVEL_SCRIPT)
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(srv.url + url)
                await wait_for(page, OVERLAY_JOINED)
                state = await hooks(page)
                assert state["audio"]["state"] == "running", "headless Chromium did not start audio"
                assert state["channel"]["role"] == "listen"

            # Idle: nothing drawn, a transparent page, the look from the URL.
            assert await captions.is_hidden("#line") and await captions.is_hidden("#status")
            look = await captions.evaluate(
                """() => {
                  const body = getComputedStyle(document.body);
                  const line = getComputedStyle(document.getElementById("line"));
                  return [body.backgroundColor, line.backgroundColor, line.fontSize,
                          line.fontWeight, line.color, line.fontFamily];
                }"""
            )
            assert look[:5] == [
                "rgba(0, 0, 0, 0)",
                "rgba(0, 0, 0, 0)",
                "72px",
                "800",
                "rgb(255, 255, 255)",
            ]
            assert look[5].startswith('"DejaVu Sans"') or look[5].startswith("DejaVu Sans")

            await bot.asend({"type": "speak", "id": "m1", "text": LINE, "user": "Ann"})
            # Mid-message: a word of the second sentence is lit, heard on the captions page only.
            await captions.wait_for_function(
                """db => {
                  const w = window.livevoice.captions.word;
                  return w && w.index >= 7 && window.heardLevelDb() > db;
                }""",
                arg=AUDIBLE_DB,
                polling=20,
                timeout=TIMEOUT_MS,
            )
            lit = await captions.evaluate(
                """() => {
                  const span = document.querySelector("#line-text .w.now");
                  return [span.textContent, getComputedStyle(span).color,
                          document.getElementById("line-text").textContent];
                }"""
            )
            assert lit[1:] == ["rgb(255, 216, 77)", LINE] and lit[0] in text_words(LINE)
            await captions.screenshot(
                path=str(ARTIFACTS / "widget-captions.png"), omit_background=True
            )
            assert await overlay.evaluate("window.heardLevelDb()") < AUDIBLE_DB - 40  # muted
            overlay_lit = await wait_for(
                overlay,
                """() => {
                  const span = document.querySelector("#line-text .w.now");
                  return span && getComputedStyle(span).color;
                }""",
            )
            assert overlay_lit == "rgb(0, 229, 255)"

            done = await until_message(bot, lambda m: isinstance(m, AudioEnd))
            assert isinstance(done, AudioEnd) and done.id == "m1" and not done.cancelled
            offsets: dict[str, list[float]] = {}
            for name, page in [("captions", captions), ("overlay", overlay)]:
                await wait_for(page, "window.livevoice.counters.messagesDone === 1")
                await wait_for(page, "window.livevoice.channel.current === null")
                assert await page.is_hidden("#line")  # gone between messages
                state = await hooks(page)
                assert state["counters"]["marksReceived"] >= 2  # one per sentence at least
                _, offsets[name] = assert_words_lit_in_order(state)
                latency = state["captions"]["outputLatencyMs"]
                print(
                    f"{name}: {len(offsets[name])} words lit, caption-to-audio offset "
                    f"p50 {statistics.median(offsets[name]):.1f} ms, "
                    f"max {max(offsets[name]):.1f} ms, of which the output latency the page "
                    f"waits for (to light what is heard) {latency:.1f} ms"
                )
                # Never ahead of the audio, and not far behind it.
                assert all(-1.0 <= ms < OFFSET_BOUND_MS for ms in offsets[name]), offsets[name]
            assert errors == []
        finally:
            await browser.close()
