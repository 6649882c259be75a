"""The Speaker.bot-compatible endpoint: a client speaking Speaker.bot's request format over a real
WebSocket feeds a channel whose listener (the overlay) plays it.

Request format: Streamerbot/docs ``speakerbot/2.api/0.websocket/1.requests.md``; replies as
Speekaboo documents Speaker.bot 0.1.4's (see ``live/speakerbot.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from live.encoder import EncoderWorker
from live.speakerbot import SPEAKERBOT, is_loopback, parse_voice_aliases
from live.speech import PiperEngine
from live.tenants import new_token
from protocol.messages import AudioEnd, AudioStart
from tests.clips import reference_wav
from tests.fakes import GatedEngine
from tests.server import TIMEOUT, LiveServer, RawClient, live_server, raw_client, until_message
from tests.test_channels import heard, join, state

pytestmark = pytest.mark.usefixtures("channel_store")


class SpeakerbotClient:
    """Streamer.bot's side: one JSON request, one JSON reply."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.sent = 0

    async def arequest(self, request: str, **fields: Any) -> dict[str, Any]:
        self.sent += 1
        return await self.araw(
            orjson.dumps({"id": f"req-{self.sent}", "request": request, **fields}).decode()
        )

    async def araw(self, text: str) -> dict[str, Any]:
        await self.ws.send_str(text)
        msg = await self.ws.receive(timeout=TIMEOUT)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        reply: dict[str, Any] = orjson.loads(msg.data)
        return reply


def speakerbot_url(server: LiveServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/speakerbot{query}"


@contextlib.asynccontextmanager
async def speakerbot_client(
    server: LiveServer, query: str = "", headers: dict[str, str] | None = None
) -> AsyncIterator[SpeakerbotClient]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(speakerbot_url(server, query), headers=headers) as ws,
    ):
        yield SpeakerbotClient(ws)


async def overlay_with_voice(server: LiveServer, overlay: RawClient) -> str:
    """The overlay registers the tenant's voice (what the streamer did once) and listens; the
    Speaker.bot alias ``EventVoice`` names that voice."""
    ready = await overlay.aregister(reference_wav())
    assert server.runner is not None
    server.runner.app[SPEAKERBOT].aliases["EventVoice"] = ready.voice_id
    await join(overlay, "listen")
    return ready.voice_id


def ok(reply: dict[str, Any], rid: str) -> dict[str, Any]:
    assert reply.get("id") == rid and reply.get("status") == "ok", reply
    result: dict[str, Any] = reply["result"]
    return result


def test_voice_aliases_and_loopback() -> None:
    assert parse_voice_aliases("EventVoice=abc, Chat = def\n*=ghi,broken,=x") == {
        "EventVoice": "abc",
        "Chat": "def",
        "*": "ghi",
    }
    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("192.168.1.5") and not is_loopback(None) and not is_loopback("x")


async def test_speak_is_played_by_the_channels_listener(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    """Real Piper: a Speak request's message reaches the overlay as speech, in the mapped voice."""
    async with (
        live_server(embedder=encoder_worker, engine=piper) as srv,
        raw_client(srv) as overlay,
    ):
        voice_id = await overlay_with_voice(srv, overlay)
        async with speakerbot_client(srv) as bot:
            reply = await bot.arequest(
                "Speak", voice="EventVoice", message="Thanks for the raid!", badWordFilter=True
            )
            result = ok(reply, "req-1")
            assert result["text"] == "Thanks for the raid!" and result["voiceName"] == "EventVoice"
            await until_message(overlay, lambda m: isinstance(m, AudioEnd))
        ((start, end, pcm),) = heard(overlay)
        assert start.id == result["speechId"] and start.channel == "main"
        assert start.text == "Thanks for the raid!" and start.voice == voice_id
        assert end is not None and not end.cancelled and end.samples > start.sample_rate // 2
        samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768
        assert len(samples) == end.samples and float(np.sqrt(np.mean(samples**2))) > 0.01


async def test_stop_pause_resume_and_clear_as_the_listener_hears_them(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine()
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as overlay,
    ):
        await overlay_with_voice(srv, overlay)
        async with speakerbot_client(srv) as bot:
            assert ok(await bot.arequest("Pause"), "req-1") == {}
            await until_message(overlay, state(0, True))
            ids = []
            for i in range(1, 4):
                reply = await bot.arequest("Speak", voice="EventVoice", message=f"Line {i}. More.")
                ids.append(ok(reply, f"req-{i + 1}")["speechId"])
            await until_message(overlay, state(3, True))
            assert engine.started == []  # paused: nothing is spoken
            ok(await bot.arequest("Resume"), "req-5")
            start = await until_message(overlay, lambda m: isinstance(m, AudioStart))
            assert isinstance(start, AudioStart) and start.id == ids[0]
            engine.release(1)
            await overlay.anext_frame()
            ok(await bot.arequest("Stop"), "req-6")  # the gate stays shut: Stop must not wait
            end = await until_message(overlay, lambda m: isinstance(m, AudioEnd))
            assert isinstance(end, AudioEnd) and end.id == ids[0] and end.cancelled
            start = await until_message(overlay, lambda m: isinstance(m, AudioStart))
            assert isinstance(start, AudioStart) and start.id == ids[1]
            ok(await bot.arequest("Clear"), "req-7")  # the third one goes; the current plays on
            await until_message(overlay, state(0, False))
            engine.release(2)
            end = await until_message(overlay, lambda m: isinstance(m, AudioEnd))
            assert isinstance(end, AudioEnd) and end.id == ids[1] and not end.cancelled
            assert end.samples == 2 * 11025
        assert engine.started == ["Line 1. More.", "Line 2. More."]


async def test_disabled_speak_is_answered_but_not_spoken(encoder_worker: EncoderWorker) -> None:
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as overlay,
    ):
        await overlay_with_voice(srv, overlay)
        async with speakerbot_client(srv) as bot:
            assert ok(await bot.arequest("Disable"), "req-1") == {}
            muted = ok(await bot.arequest("Speak", voice="EventVoice", message="Muted."), "req-2")
            assert muted["text"] == "Muted." and muted["speechId"]
            assert ok(await bot.arequest("Enable"), "req-3") == {}
            spoken = ok(await bot.arequest("Speak", voice="EventVoice", message="Heard."), "req-4")
            end = await until_message(overlay, lambda m: isinstance(m, AudioEnd))
            assert isinstance(end, AudioEnd) and end.id == spoken["speechId"]
        assert [s.id for s, _, _ in heard(overlay)] == [spoken["speechId"]]
        assert engine.started == ["Heard."]


async def test_bad_requests_are_answered_and_the_connection_stays(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine(auto=True)
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        raw_client(srv) as overlay,
    ):
        await overlay_with_voice(srv, overlay)
        async with speakerbot_client(srv) as bot:
            assert await bot.araw("{not json") == {"error": "malformed command"}
            assert await bot.araw('["Speak"]') == {"error": "malformed command"}
            unknown = await bot.arequest("Fly")
            assert unknown["id"] == "req-1" and unknown["status"] == "error"
            assert "Fly" in unknown["error"]
            empty = await bot.arequest("Speak", voice="EventVoice", message="  ")
            assert empty["id"] == "req-2" and empty["status"] == "error"
            nobody = await bot.arequest("Speak", voice="NoSuchAlias", message="Hi.")
            assert nobody["status"] == "error" and "voice_not_found" in nobody["error"], nobody
            spoken = ok(
                await bot.arequest("Speak", voice="EventVoice", message="Still here."), "req-4"
            )
            end = await until_message(overlay, lambda m: isinstance(m, AudioEnd))
            assert isinstance(end, AudioEnd) and end.id == spoken["speechId"]


async def test_a_server_with_tokens_refuses_the_upgrade_without_a_valid_one(
    encoder_worker: EncoderWorker,
) -> None:
    token, entry = new_token("alice")
    async with live_server(embedder=encoder_worker, engine=GatedEngine(), tokens=entry) as srv:
        for query, headers in (
            ("", None),
            ("?token=wrong", None),
            ("", {"Authorization": "Bearer x"}),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with speakerbot_client(srv, query, headers):
                    pass
            assert refused.value.status == 401
        for query, headers in (
            (f"?token={token}", None),
            ("", {"Authorization": f"Bearer {token}"}),
        ):
            async with speakerbot_client(srv, query, headers) as bot:
                assert ok(await bot.arequest("Pause"), "req-1") == {}
