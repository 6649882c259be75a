"""The real server on a free loopback port, in the test's own event loop, and a raw WS client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from clients.web import add_widget_routes
from live.testing import server as testing
from live.testing.server import TIMEOUT, LiveServer, free_port
from protocol import AudioFrame, decode_server, encode
from protocol.messages import Error, Message, VoiceReady

__all__ = [
    "TIMEOUT",
    "LiveServer",
    "RawClient",
    "Received",
    "free_port",
    "live_server",
    "raw_client",
]


def live_server(*args: Any, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[LiveServer]:
    """``live.testing.server.live_server`` with the browser widget mounted, as ``livevoice
    serve`` mounts it."""
    kwargs.setdefault("routes", (add_widget_routes,))
    return testing.live_server(*args, **kwargs)


@dataclass
class Received:
    """What a test client saw: control messages in order and audio frames per stream."""

    messages: list[Message] = field(default_factory=list)
    frames: dict[int, list[AudioFrame]] = field(default_factory=dict)


class RawClient:
    """A minimal client straight on the protocol codec, for asserting wire behaviour."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.seen = Received()

    async def asend(self, message: Message | dict[str, Any] | str) -> None:
        if isinstance(message, Message):
            await self.ws.send_str(encode(message))
        elif isinstance(message, dict):
            await self.ws.send_str(orjson.dumps(message).decode())
        else:
            await self.ws.send_str(message)

    async def asend_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def anext(self, timeout: float = TIMEOUT) -> Message:
        """The next control message; audio frames met on the way are collected."""
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            if msg.type is aiohttp.WSMsgType.TEXT:
                message = decode_server(msg.data)
                self.seen.messages.append(message)
                return message
            if msg.type is aiohttp.WSMsgType.BINARY:
                frame = AudioFrame.decode(msg.data)
                self.seen.frames.setdefault(frame.stream, []).append(frame)
                continue
            raise ConnectionError(f"socket ended: {msg.type} {msg.data!r} {msg.extra!r}")

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
