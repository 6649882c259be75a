"""The browser widget in headless Chromium against the real server: codec, worklet and UI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from live.encoder import EncoderWorker, SpeakerEncoder
from live.speech import PiperEngine
from live.testing.redis_server import RedisServer
from protocol.messages import (
    AudioEnd,
    AudioStart,
    ChannelJoined,
    ChannelPlayed,
    ChannelState,
    Message,
)
from tests.clips import reference_clip, wav_bytes
from tests.server import LiveServer, RawClient, live_server, raw_client, until_message

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
TIMEOUT_MS = 30_000
LONG_TEXT = " ".join(
    f"This is sentence number {n} of a long message that the streamer will skip." for n in range(12)
)


@pytest.fixture
def clip_path(tmp_path: Path) -> Path:
    pcm, sr = reference_clip("piper")
    clip = tmp_path / "streamer.wav"
    clip.write_bytes(wav_bytes(pcm, sr))
    ARTIFACTS.mkdir(exist_ok=True)
    return clip


@pytest_asyncio.fixture
async def server() -> AsyncIterator[LiveServer]:
    async with live_server() as srv:
        yield srv


async def test_widget_files_are_served_with_script_mime_types(server: LiveServer) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for path, kind in [
            ("/widget", "text/html"),
            ("/widget/", "text/html"),
            ("/widget/livevoice.js", "text/javascript"),
            ("/widget/player-worklet.js", "text/javascript"),
            ("/widget/widget.js", "text/javascript"),
        ]:
            async with http.get(server.url + path) as resp:
                assert resp.status == 200, path
                assert resp.content_type == kind, path
        for path in ["/widget/test/codec.test.mjs", "/widget/..%2Fweb.py", "/widget/.hidden"]:
            async with http.get(server.url + path) as resp:
                assert resp.status == 404, path


async def wait_for(page: Any, expression: str, arg: Any = None) -> Any:
    handle = await page.wait_for_function(expression, arg=arg, timeout=TIMEOUT_MS)
    return await handle.json_value()


# Taps whatever the page connects to its speakers (after the widget's volume) with an analyser,
# so the test reads the level the audience would hear, not the samples the widget copied.
HEARD_LEVEL_SCRIPT = """
(() => {
  const connect = AudioNode.prototype.connect;
  const taps = [];
  AudioNode.prototype.connect = function (target, ...rest) {
    const result = connect.call(this, target, ...rest);
    if (target instanceof AudioDestinationNode) {
      const tap = new AnalyserNode(this.context, { fftSize: 2048 });
      connect.call(this, tap);
      taps.push(tap);
    }
    return result;
  };
  window.heardLevelDb = () => {
    let loudest = -Infinity;
    for (const tap of taps) {
      const block = new Float32Array(tap.fftSize);
      tap.getFloatTimeDomainData(block);
      const rms = Math.sqrt(block.reduce((sum, x) => sum + x * x, 0) / block.length);
      loudest = Math.max(loudest, 20 * Math.log10(rms || 1e-12));
    }
    return loudest;
  };
})();
"""
AUDIBLE_DB = -40.0
"""RMS over ~93 ms of what reaches the speakers, in dBFS; Piper speech at volume 0.8 is ~-20."""


def playwright_api() -> Any:
    """playwright's async API; its absence fails the run (the widget is shipped, so tested)."""
    try:
        import playwright.async_api
    except ImportError as exc:
        pytest.fail(f"playwright is required (the test extras: make test): {exc}", pytrace=False)
    return playwright.async_api


def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is required: install Debian's chromium (make system-test-deps)",
            pytrace=False,
        )
    return CHROMIUM


async def hooks(page: Any) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(await page.evaluate("JSON.stringify(window.livevoice)"))
    return state


async def test_widget_registers_speaks_gaplessly_and_skips(
    server: LiveServer, clip_path: Path
) -> None:
    async_api = playwright_api()
    executable = chromium()

    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.add_init_script(HEARD_LEVEL_SCRIPT)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{server.url}/widget?mode=chat&volume=0.8", timeout=TIMEOUT_MS)
            await wait_for(page, "window.livevoice && window.livevoice.status === 'open'")
            state = await hooks(page)
            assert state["audio"]["state"] == "running", "headless Chromium did not start audio"
            assert state["config"]["volume"] == 0.8 and state["config"]["mode"] == "chat"

            # Register a clip through the file picker.
            await page.set_input_files("#clip", str(clip_path))
            voice = await wait_for(page, "window.livevoice.voice")
            assert voice["voice_id"].startswith("v_") and voice["source"] == "encoder"
            # The same clip again (a reloaded browser source): answered by its SHA-256 alone.
            again = await page.evaluate(
                "() => window.livevoice.register(document.getElementById('clip').files[0])"
            )
            assert again["voice_id"] == voice["voice_id"] and again["source"] == "l1"
            assert (await hooks(page))["counters"]["clipUploads"] == 1

            assert await page.evaluate("window.heardLevelDb()") < AUDIBLE_DB - 20  # silence

            # Two messages typed into the chat box, back to back.
            for text in ["Hello chat, thanks for stopping by.", "Here is the second message."]:
                await page.fill("#text", text)
                await page.press("#text", "Enter")
            # Sound reaches the speakers while they play (not only samples in a buffer).
            await page.wait_for_function(
                "db => window.livevoice.counters.messagesDone < 2 && window.heardLevelDb() > db",
                arg=AUDIBLE_DB,
                polling=20,
                timeout=TIMEOUT_MS,
            )
            await wait_for(page, "window.livevoice.counters.messagesDone >= 2")
            state = await hooks(page)
            first, second = state["messages"]["w1"], state["messages"]["w2"]
            for m in (first, second):
                assert m["state"] == "done" and not m["end"]["cancelled"]
                s = state["tracks"][str(m["track"])]
                assert s["inOrder"] and s["frames"] == m["end"]["frames"]
                assert s["samples"] == m["end"]["samples"] == s["played"] > 0
                assert s["underruns"] == 0  # no gap after each message's first frame
            assert state["counters"]["framesOutOfOrder"] == 0
            assert state["counters"]["underruns"] == 0
            # The second message was queued before the first ended: it starts on the very
            # sample the first one stopped (gapless).
            s1, s2 = (state["tracks"][str(m["track"])] for m in (first, second))
            assert s2["startFrame"] == s1["endFrame"]

            # A long message, skipped while it plays.
            await page.fill("#text", LONG_TEXT)
            await page.press("#text", "Enter")
            await wait_for(page, "window.livevoice.messages.w3?.state === 'playing'")
            await asyncio.sleep(0.4)
            await page.screenshot(path=str(ARTIFACTS / "widget.png"))
            await page.click("#skip")
            await wait_for(page, "window.livevoice.messages.w3.state === 'cancelled'")
            await wait_for(
                page,
                "window.livevoice.messages.w3.end || window.livevoice.messages.w3.serverCancelled",
            )
            state = await hooks(page)
            long = state["messages"]["w3"]
            assert long["serverCancelled"] or long["end"]["cancelled"]
            assert state["counters"]["messagesCancelled"] == 1
            assert state["counters"]["underruns"] == 0
            played = state["tracks"][str(long["track"])]["played"]
            assert 0 < played < 20 * 22050  # far less than the ~50 s the text would take
            assert state["errors"] == [] and errors == []

            # The overlay: transparent, no chat box, voice pinned from the URL by voice.use.
            overlay = await browser.new_page()
            await overlay.goto(
                f"{server.url}/widget?voice={voice['voice_id']}&volume=0.5", timeout=TIMEOUT_MS
            )
            pinned = await wait_for(
                overlay, "window.livevoice.status === 'open' && window.livevoice.voice"
            )
            assert pinned["voice_id"] == voice["voice_id"] and pinned["source"] == "l1"
            assert await overlay.is_hidden("#chat")
            background = await overlay.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background == "rgba(0, 0, 0, 0)"
            await overlay.evaluate("window.livevoice.speak('Overlay check.')")
            await wait_for(overlay, "window.livevoice.counters.messagesDone === 1")
            assert (await hooks(overlay))["counters"]["underruns"] == 0
            await overlay.close()

            # The socket drops: the page reconnects and re-pins its voice by voice.use.
            calls = server.services.store.encoder_calls
            for ws in list(server.services.sockets):
                await ws.close()
            await wait_for(
                page,
                "window.livevoice.counters.reconnects === 1 && window.livevoice.status === 'open'",
            )
            await page.fill("#text", "Back after the drop.")
            await page.press("#text", "Enter")
            await wait_for(page, "window.livevoice.messages.w4?.state === 'done'")
            state = await hooks(page)
            assert state["voice"]["source"] == "l1" and state["counters"]["clipReuploads"] == 0
            assert server.services.store.encoder_calls == calls
        finally:
            await browser.close()


# --- channels: the overlay listens to what a bot speaks, the chat page steers the queue ----------
async def channel_bot(client: RawClient, role: str = "speak") -> str:
    """A raw client in channel ``main`` (a speaker registers a voice first); its voice id."""
    voice_id = ""
    if role != "listen":
        ready = await client.aregister(wav_bytes(*reference_clip("piper")))
        voice_id = ready.voice_id
    await client.asend({"type": "channel.join", "channel": "main", "role": role})
    joined = await client.await_type("channel.joined")
    assert isinstance(joined, ChannelJoined) and joined.role == role
    return voice_id


OVERLAY_JOINED = (
    "window.livevoice && window.livevoice.status === 'open' && window.livevoice.channel.joined"
)


async def shows(page: Any, selector: str, text: str) -> None:
    await wait_for(
        page, "([sel, text]) => document.querySelector(sel).textContent === text", [selector, text]
    )


async def hear_line(page: Any, text: str, user: str) -> dict[str, Any]:
    """Waits until the overlay plays the channel message `text` loud enough and shows its line;
    the hooks' state then."""
    await page.wait_for_function(
        """([text, db]) => {
          const cur = window.livevoice.channel.current;
          return cur && cur.text === text && window.heardLevelDb() > db;
        }""",
        arg=[text, AUDIBLE_DB],
        polling=20,
        timeout=TIMEOUT_MS,
    )
    assert await page.is_visible("#line")
    assert await page.inner_text("#line-text") == text
    assert await page.inner_text("#line-user") == user
    return await hooks(page)


async def test_overlay_plays_a_channel_shows_the_line_and_goes_on_after_reload_and_reconnect(
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
            page = await browser.new_page(viewport={"width": 800, "height": 240})
            await page.add_init_script(HEARD_LEVEL_SCRIPT)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            before = set(srv.services.sockets)
            await page.goto(f"{srv.url}/widget?mode=overlay&channel=main&volume=0.8")
            await wait_for(page, OVERLAY_JOINED)
            (overlay_socket,) = set(srv.services.sockets) - before
            state = await hooks(page)
            assert state["audio"]["state"] == "running", "headless Chromium did not start audio"
            assert state["channel"]["role"] == "listen"
            assert await page.is_hidden("#line")  # nothing drawn over the stream while idle
            assert await page.is_hidden("#controls") and await page.is_hidden("#status")
            background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background == "rgba(0, 0, 0, 0)"

            async def bot_says(msg_id: str, text: str, user: str) -> AudioEnd:
                await bot.asend(
                    {"type": "speak", "id": msg_id, "text": text, "user": user, "kind": "chat"}
                )
                done = await until_message(bot, lambda m: isinstance(m, AudioEnd))
                assert isinstance(done, AudioEnd) and done.id == msg_id and not done.cancelled
                return done

            text = "Thanks for the follow, Ann! Welcome to the stream."
            speaking = asyncio.create_task(bot_says("m1", text, "Ann"))
            state = await hear_line(page, text, "Ann")
            await page.screenshot(
                path=str(ARTIFACTS / "widget-overlay-channel.png"), omit_background=True
            )
            done = await speaking
            await wait_for(page, "window.livevoice.counters.messagesDone === 1")
            await wait_for(page, "window.livevoice.channel.current === null")
            assert await page.is_hidden("#line")
            state = await hooks(page)
            (heard,) = state["messages"].values()
            assert heard["wireId"] == "m1" and heard["user"] == "Ann" and heard["kind"] == "chat"
            # At the page's own rate, one stream in order, every sample played, no gap.
            assert heard["sampleRate"] == state["audio"]["sampleRate"] == state["sampleRate"]
            track = state["tracks"][str(heard["track"])]
            assert track["inOrder"] and track["samples"] == heard["end"]["samples"]
            assert track["played"] == track["samples"] > 0 and track["underruns"] == 0
            assert abs(track["samples"] / heard["sampleRate"] * 1000 - done.duration_ms) < 25
            # Where it is: the message's last frame, played (R18), kept for the next page.
            played = {"message": track["message"], "seq": track["frames"] - 1}
            assert track["message"] and state["channel"]["position"] == played
            stored = await page.evaluate(
                "JSON.parse(sessionStorage.getItem(Object.keys(sessionStorage)[0]))"
            )
            assert stored == played

            # The OBS source is refreshed: the new page joins again, passing back the frame it
            # played last (the server answers resumed), and plays what comes next.
            await page.reload()
            await wait_for(page, OVERLAY_JOINED)
            state = await hooks(page)
            assert state["channel"]["position"] == played
            assert state["channel"]["resumed"] is not None
            text = "Second line, after the refresh."
            speaking = asyncio.create_task(bot_says("m2", text, "Bea"))
            await hear_line(page, text, "Bea")
            await speaking
            await wait_for(page, "window.livevoice.counters.messagesDone === 1")

            # Its socket drops: it reconnects, joins again, and plays on.
            (overlay_socket,) = set(srv.services.sockets) - before - {overlay_socket}
            await overlay_socket.close()
            await wait_for(page, f"{OVERLAY_JOINED} && window.livevoice.counters.reconnects === 1")
            text = "Third line, after the drop."
            speaking = asyncio.create_task(bot_says("m3", text, "Cy"))
            await hear_line(page, text, "Cy")
            await speaking
            await wait_for(page, "window.livevoice.counters.messagesDone === 2")
            state = await hooks(page)
            assert state["channel"]["joins"] == 2 and state["counters"]["underruns"] == 0
            assert state["channel"]["resumed"] is not None
            assert state["channel"]["position"]["seq"] >= 0
            assert state["channel"]["position"]["message"] not in (None, played["message"])
            assert state["errors"] == [] and errors == []
        finally:
            await browser.close()


async def test_chat_page_speaks_into_a_channel_and_its_queue_controls_steer_it(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    async_api = playwright_api()
    executable = chromium()
    async with (
        live_server(embedder=encoder_worker, engine=piper) as srv,
        raw_client(srv) as voice_owner,
        raw_client(srv) as listener,
        async_api.async_playwright() as pw,
    ):
        voice_id = await channel_bot(voice_owner)
        await channel_bot(listener, "listen")

        def state_is(waiting: int, paused: bool) -> Callable[[Message], bool]:
            return lambda m: (
                isinstance(m, ChannelState)
                and (m.waiting, m.paused)
                == (
                    waiting,
                    paused,
                )
            )

        browser = await pw.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{srv.url}/widget?mode=chat&channel=main&voice={voice_id}")
            await wait_for(page, f"{OVERLAY_JOINED} && window.livevoice.voice")
            assert (await hooks(page))["channel"]["role"] == "speak"
            assert await page.is_visible("#pause") and await page.is_visible("#clear")

            # Pause: the channel holds its queue; the page shows it, from channel.state.
            await page.click("#pause")
            await until_message(listener, state_is(0, True))
            for text in [LONG_TEXT, "The second line waits its turn."]:
                await page.fill("#text", text)
                await page.press("#text", "Enter")
            await until_message(listener, state_is(2, True))
            await shows(page, "#channel-state", "#main: 2 waiting · paused")
            await shows(page, "#pause", "Resume")
            assert not [m for m in listener.seen.messages if isinstance(m, AudioStart)]

            # Resume: the first line plays to the listener; Skip cuts it for every listener.
            await page.click("#pause")
            start = await until_message(listener, lambda m: isinstance(m, AudioStart))
            assert isinstance(start, AudioStart) and start.id == "w1" and start.text == LONG_TEXT
            await listener.anext_frame()
            await page.click("#skip")
            end = await until_message(listener, lambda m: isinstance(m, AudioEnd))
            assert isinstance(end, AudioEnd) and end.id == "w1" and end.cancelled
            await wait_for(page, "window.livevoice.messages.w1.state === 'cancelled'")
            start = await until_message(listener, lambda m: isinstance(m, AudioStart))
            assert isinstance(start, AudioStart) and start.id == "w2"

            # Clear: a line still waiting is dropped.
            await page.click("#pause")  # after the current line
            await until_message(listener, state_is(0, True))
            await page.fill("#text", "A third line nobody will hear.")
            await page.press("#text", "Enter")
            await until_message(listener, state_is(1, True))
            await page.click("#clear")
            await until_message(listener, state_is(0, True))
            await wait_for(page, "window.livevoice.messages.w3.state === 'cancelled'")
            await wait_for(page, "window.livevoice.messages.w2.state === 'done'")
            await shows(page, "#channel-state", "#main: 0 waiting · paused")
            heard_ids = [m.id for m in listener.seen.messages if isinstance(m, AudioStart)]
            assert heard_ids == ["w1", "w2"]
            state = await hooks(page)
            assert state["errors"] == [] and errors == []
            assert state["counters"]["framesReceived"] == 0  # a speaker: the audio went out
        finally:
            await browser.close()


async def test_overlay_on_server_b_plays_what_a_bot_on_server_a_says_and_resumes_after_refresh(
    redis_server: RedisServer, speaker_encoder: SpeakerEncoder, piper: PiperEngine
) -> None:
    """Across servers (one Redis): the OBS overlay on B plays the bot's line spoken on A. The
    overlay is refreshed mid-line: it joins again from the last frame it played and the
    channel's stream replays the rest of that line (resumed), then the next line."""
    async_api = playwright_api()
    executable = chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    url = redis_server.url
    async with (
        live_server(embedder=EncoderWorker(speaker_encoder), engine=piper, redis_url=url) as a,
        live_server(embedder=EncoderWorker(speaker_encoder), engine=piper, redis_url=url) as b,
        raw_client(a) as bot,
        raw_client(a) as bridge,
        async_api.async_playwright() as pw,
    ):
        await channel_bot(bot)
        await channel_bot(bridge, "listen")  # as a VTube Studio bridge listens
        browser = await pw.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 800, "height": 240})
            await page.add_init_script(HEARD_LEVEL_SCRIPT)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{b.url}/widget?mode=overlay&channel=main&volume=0.8")
            await wait_for(page, OVERLAY_JOINED)
            text = (
                "Thanks for the raid, Dee! Welcome, everyone, to the stream. "
                "Grab a snack, the next game starts in five minutes."
            )
            await bot.asend({"type": "speak", "id": "m1", "text": text, "user": "Dee"})
            await hear_line(page, text, "Dee")
            await page.screenshot(
                path=str(ARTIFACTS / "widget-overlay-cross-server.png"), omit_background=True
            )
            await wait_for(
                page,
                "window.livevoice.channel.position && window.livevoice.channel.position.seq >= 10",
            )
            # What the page played reaches the bridge on the other server (R20).
            position = await until_message(
                bridge, lambda m: isinstance(m, ChannelPlayed) and m.ms > 0
            )
            assert isinstance(position, ChannelPlayed)
            assert position.message == (await hooks(page))["channel"]["position"]["message"]
            await page.reload()  # the OBS source refreshed mid-line
            await wait_for(page, OVERLAY_JOINED)
            state = await hooks(page)
            assert state["channel"]["resumed"] is True
            await hear_line(page, text, "Dee")
            state = await hooks(page)
            (track,) = state["tracks"].values()
            assert track["resumedFrom"] > 10  # the rest of the line, not its start again
            done = await until_message(bot, lambda m: isinstance(m, AudioEnd), timeout=120)
            assert isinstance(done, AudioEnd) and done.id == "m1" and not done.cancelled
            await wait_for(page, "window.livevoice.counters.messagesDone === 1")
            state = await hooks(page)
            (track,) = state["tracks"].values()
            assert track["inOrder"] and track["underruns"] == 0 and track["played"] > 0
            assert state["errors"] == [] and errors == []
        finally:
            await browser.close()
