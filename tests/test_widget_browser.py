"""The browser widget in headless Chromium against the real server: codec, worklet and UI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.clips import reference_clip, wav_bytes
from tests.server import LiveServer, live_server

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
