"""The connection layer: what a client may cost the server before it has shown a token.

Three bounds, all before a session exists or while it waits for ``hello``:

- **Connections.** :class:`ConnectionCap` is the listening socket's protocol factory: aiohttp's
  handler for each connection up to ``max_connections`` open at once; beyond that a 503 and a
  close, before a byte of the request is read.
- **Request headers.** aiohttp closes a connection whose request is not complete when its
  keep-alive timer fires; :func:`handler_args` sets that timer to ``header_timeout_s`` (aiohttp's
  default is an hour), so a half-sent request holds its socket for seconds, not hours.
- **Unauthenticated WebSockets.** At most ``max_unauthenticated`` at once (:class:`Lobby`), each
  reading frames of at most ``max_hello_frame_bytes`` until it authenticates — with a token in the
  upgrade (``Authorization: Bearer`` or ``?token=``) or in ``hello``. aiohttp fixes a socket's
  message limit when it builds its frame reader, and its compiled reader keeps it out of reach;
  :class:`SessionSocket` installs aiohttp's pure-Python reader instead, whose limit can rise.

The same reader hands the session, in order, the two reader errors that RFC 6455 says end the
connection — a frame over the limit and a text frame that is not UTF-8 — as typed errors
(``frame_too_large``, ``bad_utf8``), so the session can send them before it closes; aiohttp's own
``receive()`` would close the socket first and leave nothing to say.

Private aiohttp API used here (checked against 3.14; ``tests/test_connections.py`` covers each):
``WebSocketResponse._post_start`` and the attributes it sets, and ``aiohttp._websocket.reader_py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import WSCloseCode, WSMessage, WSMsgType, hdrs, web
from aiohttp._websocket.reader_py import WebSocketDataQueue, WebSocketReader
from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.abc import AbstractAccessLogger
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http_websocket import WebSocketError

from protocol.errors import BadUtf8, FrameTooLarge, LivevoiceError, Unauthorized

from .tenants import PUBLIC_TENANT, TenantDirectory

log = logging.getLogger(__name__)

LINGER_S = 5.0
"""How long a connection ended by a bad frame stays open for its client to read why. Measured:
100 clients each sending a 15.9 MB frame before hello, on 2 loaded cores, 2 s let 29 of the 64
admitted ones see a reset before the error; 5 s let all 64 read it."""


# --- frames ---------------------------------------------------------------------------------
class FrameReader(WebSocketReader):
    """aiohttp's pure-Python frame reader, with a limit that can rise and typed fatal errors.

    An oversized frame is refused from its header, before any of its payload is buffered.
    """

    @property
    def failed(self) -> bool:
        """The reader met a frame that ends the connection and reads no further."""
        return self._exc is not None

    def raise_limit(self, max_frame_bytes: int) -> None:
        self._max_msg_size = max_frame_bytes
        self._max_fragments = max(1024, max_frame_bytes // 256)

    def _feed_data(self, data: bytes) -> None:
        try:
            super()._feed_data(data)
        except WebSocketError as exc:
            typed = self._typed(exc)
            if typed is not None:
                # Queued behind every frame read before it; the reader's error follows it.
                self.queue.feed_data(WSMessage(WSMsgType.ERROR, typed, None), 0)
            raise

    def _typed(self, exc: WebSocketError) -> LivevoiceError | None:
        if exc.code == WSCloseCode.MESSAGE_TOO_BIG:
            size = self._payload_bytes_to_read + len(self._partial)
            return FrameTooLarge(
                f"a frame of {size} bytes is over this connection's limit of "
                f"{self._max_msg_size} bytes (before ready, frames must be small)"
            )
        if exc.code == WSCloseCode.INVALID_TEXT:
            return BadUtf8("a text frame that is not valid UTF-8")
        return None


class SessionSocket(web.WebSocketResponse):
    """A WebSocket whose frame limit rises when its client is admitted (authenticated).

    Reader errors that end the connection arrive from ``receive()`` as an ``ERROR`` message whose
    ``data`` is the :class:`LivevoiceError` to send, with the socket still open. Closing after
    such an error lingers: the client, likely still sending the frame we refused, gets the
    error, the close frame and a FIN before the TCP connection goes. Closed at once, the unread
    bytes would make it a reset, and many clients drop what they had received with it.
    """

    def __init__(
        self,
        *,
        frame_limit: int,
        admitted_frame_limit: int,
        on_admit: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_msg_size=frame_limit, **kwargs)
        self._admitted_frame_limit = admitted_frame_limit
        self._on_admit = on_admit
        self._frames: FrameReader | None = None

    def _post_start(
        self, request: web.BaseRequest, protocol: str | None, writer: WebSocketWriter
    ) -> None:
        # aiohttp 3.14's own, but with FrameReader: its compiled reader fixes the limit for good.
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        loop = self._loop
        assert loop is not None
        self._reader = WebSocketDataQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=loop)
        self._frames = FrameReader(
            self._reader,
            self._max_msg_size,
            compress=bool(self._compress),
            decode_text=self._decode_text,
        )
        self._parser = self._frames
        callback = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(self._frames, data_received_cb=callback)
        request.protocol.keep_alive(False)

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        closed = await super().close(code=code, message=message, drain=drain)
        if self._frames is not None and self._frames.failed:
            await self._alinger()
        return closed

    def _close_transport(self) -> None:
        if self._frames is not None and self._frames.failed:
            return  # close() lingers first
        super()._close_transport()

    async def _alinger(self) -> None:
        """Half-close, read and drop what the client still sends, until it closes or
        ``LINGER_S`` passes; then close the TCP connection."""
        transport = self._req.transport if self._req is not None else None
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_S
        with contextlib.suppress(OSError, RuntimeError):
            if transport.can_write_eof():
                transport.write_eof()
        # aiohttp's handler keeps reading (and dropping) after a reader error; the transport
        # closes itself when the client's FIN arrives.
        while not transport.is_closing() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        transport.close()

    async def areceive(self, timeout: float) -> str | bytes | LivevoiceError | None:
        """The next frame for a session (``live.session.Transport``): a text frame as ``str``, a
        binary one as ``bytes``, the typed error of a frame that ends the connection, or None
        once the connection has ended. ``TimeoutError`` when nothing came in ``timeout``."""
        msg = await self.receive(timeout=timeout)
        if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
            data: str | bytes = msg.data
            return data
        if msg.type is WSMsgType.ERROR:
            if isinstance(msg.data, LivevoiceError):
                return msg.data
            log.info("socket error: %s", self.exception())
        return None

    def admit(self) -> None:
        """The client is authenticated: frames up to the full limit from now on."""
        if self._frames is not None:
            self._frames.raise_limit(self._admitted_frame_limit)
        if self._on_admit is not None:
            self._on_admit()
            self._on_admit = None


# --- authentication at the upgrade ---------------------------------------------------------
def upgrade_token(request: web.BaseRequest) -> str | None:
    """A bearer token from the upgrade request: ``Authorization: Bearer …`` or ``?token=…``
    (browsers cannot set headers on a WebSocket)."""
    scheme, _, credentials = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query.get("token") or None


def upgrade_tenant(request: web.BaseRequest, tenants: TenantDirectory) -> str | None:
    """The tenant the upgrade request authenticates, or None when it carries no token.

    A server without tokens has one tenant, so every upgrade is authenticated. A token the
    server does not accept is refused before the upgrade (HTTP 401).
    """
    if tenants.open:
        return PUBLIC_TENANT
    token = upgrade_token(request)
    if token is None:
        return None
    try:
        return tenants.authenticate(token)
    except Unauthorized:
        raise web.HTTPUnauthorized(
            text="the token is not valid", headers={hdrs.WWW_AUTHENTICATE: "Bearer"}
        ) from None


class Lobby:
    """WebSockets that have not authenticated yet, capped: none of them has shown a token."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.waiting = 0

    def enter(self) -> Callable[[], None]:
        """Take a place (or refuse the upgrade with 503); the callable gives it back, once."""
        if self.waiting >= self.limit:
            raise web.HTTPServiceUnavailable(
                text="too many connections waiting to authenticate; retry shortly, or send "
                "the token in the upgrade request",
                headers={hdrs.RETRY_AFTER: "1"},
            )
        self.waiting += 1
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                self.waiting -= 1

        return leave


# --- connections ----------------------------------------------------------------------------
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 25\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many open connections"
)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        tcp = cast(asyncio.Transport, transport)
        tcp.write(REFUSED)
        tcp.close()


class _Counted(asyncio.Protocol):
    """aiohttp's handler for one connection, counted until the connection is lost."""

    __slots__ = ("_cap", "_handler")

    def __init__(self, handler: asyncio.Protocol, cap: ConnectionCap) -> None:
        self._handler = handler
        self._cap = cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cap.open -= 1
        self._handler.connection_lost(exc)


class ConnectionCap:
    """The listening socket's protocol factory: at most ``limit`` connections open at once."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server = server
        self.limit = limit
        self.open = 0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            log.warning("refusing a connection: %d open, the limit is %d", self.open, self.limit)
            return _Refused()
        self.open += 1
        return _Counted(self._server(), self)


async def alisten(
    runner: web.AppRunner, host: str, port: int, *, max_connections: int
) -> asyncio.Server:
    """Listen for the runner's app (after ``runner.setup()``); close it before ``cleanup()``."""
    assert runner.server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        ConnectionCap(runner.server, max_connections), host, port, reuse_address=True
    )


class AccessLog(AbstractAccessLogger):
    """aiohttp's access line without the query string: ``/ws?token=…`` must never be logged."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %s %.3f',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def handler_args(header_timeout_s: float) -> dict[str, Any]:
    """aiohttp request-handler settings every server of ours runs with (``create_app``)."""
    # The keep-alive timer runs from the connection's start (and from the end of each response)
    # and closes the connection if no complete request has arrived by then: a header timeout.
    return {"keepalive_timeout": header_timeout_s, "access_log_class": AccessLog}
