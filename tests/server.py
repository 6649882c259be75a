"""The real server on a free loopback port, in the test's own event loop, and a raw WS client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from clients.web import add_widget_routes
from live.testing import server as testing
from live.testing.server import TIMEOUT, LiveServer, free_port
from protocol import AudioFrame, ClientProtocol, LivevoiceError, decode_client, encode
from protocol.client import Event, SpeechFailed
from protocol.messages import AudioEnd, Error, Message, VoiceReady

__all__ = [
    "TIMEOUT",
    "LiveServer",
    "RawClient",
    "Received",
    "free_port",
    "live_server",
    "raw_client",
]


SERVER_DEFAULTS: dict[str, Any] = {}
"""Settings every ``live_server`` of the running test gets unless it names them (the
``channel_store`` fixture points them at a real Redis)."""


def live_server(*args: Any, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[LiveServer]:
    """``live.testing.server.live_server`` with the browser widget mounted, as ``livevoice
    serve`` mounts it."""
    kwargs.setdefault("routes", (add_widget_routes,))
    if not args:
        for name, value in SERVER_DEFAULTS.items():
            kwargs.setdefault(name, value)
    return testing.live_server(*args, **kwargs)


@dataclass
class Received:
    """What a test client saw: control messages in order and audio frames per stream."""

    messages: list[Message] = field(default_factory=list)
    frames: dict[int, list[AudioFrame]] = field(default_factory=dict)


class RawClient:
    """A minimal client that sends frames exactly as a test writes them, and reads the server's
    through ``protocol.ClientProtocol``, the one decoder of the server's wire: requests it sends
    are tracked there, so every test also checks the server's promises about them (frames
    numbered without a gap, ``audio.end`` counting what arrived)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.wire = ClientProtocol()
        self.seen = Received()
        self.events: list[Event] = []
        """What the wire made of every frame received, in order."""

    @property
    def broken_promises(self) -> list[SpeechFailed]:
        """Speaks whose audio broke the protocol's rules (a gap, a miscount)."""
        return [
            e
            for e in self.events
            if isinstance(e, SpeechFailed) and isinstance(e.message, AudioEnd | AudioFrame)
        ]

    async def asend(self, message: Message | dict[str, Any] | str) -> None:
        if isinstance(message, Message):
            text = encode(message)
        elif isinstance(message, dict):
            text = orjson.dumps(message).decode()
        else:
            text = message
        with contextlib.suppress(LivevoiceError):  # hostile frames are sent, not tracked
            self.wire.track(decode_client(text))
        await self.ws.send_str(text)

    async def asend_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def areceive(self, timeout: float = TIMEOUT) -> Message | AudioFrame:
        """The next frame, decoded and kept in ``seen``."""
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type is aiohttp.WSMsgType.TEXT:
            event = self.wire.receive_text(msg.data)
            self.events.append(event)
            assert isinstance(event.message, Message)
            self.seen.messages.append(event.message)
            return event.message
        if msg.type is aiohttp.WSMsgType.BINARY:
            event = self.wire.receive_binary(msg.data)
            self.events.append(event)
            assert isinstance(event.message, AudioFrame)
            self.seen.frames.setdefault(event.message.stream, []).append(event.message)
            return event.message
        raise ConnectionError(f"socket ended: {msg.type} {msg.data!r} {msg.extra!r}")

    async def anext(self, timeout: float = TIMEOUT) -> Message:
        """The next control message; audio frames met on the way are collected."""
        while not isinstance(frame := await self.areceive(timeout), Message):
            pass
        return frame

    async def anext_frame(self, timeout: float = TIMEOUT) -> AudioFrame:
        """The next audio frame; control messages met on the way are collected."""
        while not isinstance(frame := await self.areceive(timeout), AudioFrame):
            pass
        return frame

    async def aregister(self, clip: bytes, **fields: Any) -> VoiceReady:
        """voice.register + the clip; the voice.ready that answers it. Audio and messages of
        earlier speaks may come first; an error fails the test."""
        await self.asend({"type": "voice.register", **fields})
        await self.asend_bytes(clip)
        while True:
            msg = await self.anext()
            assert not isinstance(msg, Error), msg
            if isinstance(msg, VoiceReady):
                return msg

    async def await_type(self, kind: str, timeout: float = TIMEOUT) -> Message:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            message = await self.anext(max(0.01, left))
            if kind == message.TYPE:
                return message


@contextlib.asynccontextmanager
async def raw_client(server: LiveServer, *, hello: bool = True) -> AsyncIterator[RawClient]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            server.ws_url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5)
        ) as ws,
    ):
        client = RawClient(ws)
        if hello:
            await client.asend({"type": "hello", "client": "tests"})
            ready = await client.anext()
            assert ready.TYPE == "ready", ready
        yield client
        assert not client.broken_promises, client.broken_promises


async def until_true(check: Callable[[], bool], what: str, timeout_s: float = TIMEOUT) -> None:
    """Poll a condition seen from outside (a counter, a set) until it holds, bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def until_message(
    client: RawClient, match: Callable[[Message], bool], timeout: float = TIMEOUT
) -> Message:
    """The next control message that matches; audio and others met on the way are kept."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        message = await client.anext(max(0.01, deadline - loop.time()))
        if match(message):
            return message
