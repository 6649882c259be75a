"""A WebSocket relay in front of the real server: it records what each connection carries both
ways and can drop its clients' sockets, so a test sees exactly what a client sent on a rejoin
and which audio reached it before the drop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from protocol import AudioFrame
from tests.server import free_port


@dataclass
class Leg:
    """One client connection through the relay."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    """The client's text frames, decoded."""
    received: list[dict[str, Any]] = field(default_factory=list)
    """The server's text frames forwarded to the client, decoded."""
    starts: dict[int, dict[str, Any]] = field(default_factory=dict)
    """``audio.start`` forwarded to the client, by stream."""
    last_frame: AudioFrame | None = None
    """The last audio frame forwarded to the client."""
    forwarding: bool = True


class Relay:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.legs: list[Leg] = []
        self._sockets: dict[web.WebSocketResponse, Leg] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def joins(self) -> list[dict[str, Any]]:
        """Every ``channel.join`` sent through the relay, in order."""
        return [m for leg in self.legs for m in leg.sent if m.get("type") == "channel.join"]

    async def adrop(self) -> None:
        """Stops forwarding to the clients now, then closes their sockets: what a leg recorded
        as forwarded is all its client got."""
        for leg in self._sockets.values():
            leg.forwarding = False
        for ws in list(self._sockets):
            await asyncio.wait_for(ws.close(), 5)

    async def _ahandle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        leg = Leg()
        self.legs.append(leg)
        self._sockets[ws] = leg
        headers = (
            {"Authorization": request.headers["Authorization"]}
            if ("Authorization" in request.headers)
            else None
        )
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(self.upstream, max_msg_size=0, headers=headers) as up,
            ):
                down = asyncio.create_task(self._adown(up, ws, leg))
                try:
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            leg.sent.append(orjson.loads(msg.data))
                            await up.send_str(msg.data)
                        elif msg.type is aiohttp.WSMsgType.BINARY:
                            await up.send_bytes(msg.data)
                finally:
                    down.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await down
        finally:
            self._sockets.pop(ws, None)
        return ws

    async def _adown(
        self, up: aiohttp.ClientWebSocketResponse, ws: web.WebSocketResponse, leg: Leg
    ) -> None:
        async for msg in up:
            if not leg.forwarding:
                break
            # Recorded once sent: the client reads everything sent before the close.
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
                data = orjson.loads(msg.data)
                leg.received.append(data)
                if data.get("type") == "audio.start":
                    leg.starts[data["stream"]] = data
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
                leg.last_frame = AudioFrame.decode(msg.data)
        if leg.forwarding:
            await ws.close()


@contextlib.asynccontextmanager
async def relay(upstream: str) -> AsyncIterator[Relay]:
    r = Relay(upstream)
    app = web.Application()
    app.router.add_get("/ws", r._ahandle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", r.port)
    await site.start()
    try:
        yield r
    finally:
        for ws in list(r._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
        await runner.cleanup()
