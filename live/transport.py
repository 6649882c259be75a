"""What a session needs of its socket: the one interface between ``Session`` and the network.

``live.connections.SessionSocket`` (aiohttp) is the server's; a test can hand a session anything
shaped alike.
"""

from __future__ import annotations

from typing import Protocol

from protocol.errors import LivevoiceError


class Transport(Protocol):
    """What a session needs of its socket (``live.connections.SessionSocket`` in the server)."""

    @property
    def closed(self) -> bool: ...

    async def areceive(self, timeout: float) -> str | bytes | LivevoiceError | None:
        """Text, binary, the typed error of a frame that ends the connection (RFC 6455), or
        None once it ended; ``TimeoutError`` when nothing came in time."""
        ...

    async def send_str(self, data: str) -> None: ...
    async def send_bytes(self, data: bytes) -> None: ...
    async def close(self, *, code: int, message: bytes) -> bool: ...

    def admit(self) -> None:
        """The client authenticated: its frames may be as large as any session's."""
        ...


async def asend_frames(ws: Transport, frames: list[str | bytes]) -> bool:
    """Send frames in order (text as ``str``, binary as ``bytes``). False when the peer is gone;
    the frames left are dropped with the socket."""
    for frame in frames:
        if ws.closed:
            return False
        try:
            if isinstance(frame, str):
                await ws.send_str(frame)
            else:
                await ws.send_bytes(frame)
        except (ConnectionError, RuntimeError):
            # aiohttp raises ClientConnectionResetError (a ConnectionResetError) or, on a
            # closing transport, RuntimeError: both mean the peer is gone.
            return False
    return True
