"""The connection layer under hostile clients: frames before authentication, oversized and
non-UTF-8 frames, half-sent requests and too many connections. Raw sockets throughout, so the
tests send exactly the bytes a hostile client would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest

from live.settings import Limits
from live.tenants import new_token
from tests.fakes import GatedEngine
from tests.server import LiveServer, free_port, live_server
from tests.test_serve_process import wait_ready

pytestmark = pytest.mark.timeout(60)

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8
WAIT = 20.0
"""Bound on any single wait for the server; generous for a loaded 2-core machine."""


@dataclass
class RawSocket:
    """A WebSocket client made of a TCP socket and hand-built frames."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int

    @classmethod
    async def aconnect(
        cls, port: int, *, path: str = "/ws", headers: dict[str, str] | None = None
    ) -> RawSocket:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        return cls(reader, writer, int(head.split(b" ", 2)[1]))

    @staticmethod
    def frame_header(opcode: int, length: int) -> bytes:
        """A final, masked client frame header; the mask key is zero, so the payload is sent
        as is (a valid mask: RFC 6455 only asks that the bit be set)."""
        first = 0x80 | opcode
        if length < 126:
            head = struct.pack("!BB", first, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", first, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, length)
        return head + b"\0\0\0\0"

    async def asend(self, opcode: int, payload: bytes) -> None:
        self.writer.write(self.frame_header(opcode, len(payload)) + payload)
        await asyncio.wait_for(self.writer.drain(), WAIT)

    async def asend_json(self, message: dict[str, object]) -> None:
        await self.asend(TEXT, orjson.dumps(message))

    async def arecv(self) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload); (CLOSE, b"") at end of stream."""
        try:
            first, second = await asyncio.wait_for(self.reader.readexactly(2), WAIT)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await asyncio.wait_for(self.reader.readexactly(length), WAIT)
        except (asyncio.IncompleteReadError, ConnectionError):
            return CLOSE, b""

    async def aanswer(self) -> dict[str, object]:
        opcode, payload = await self.arecv()
        assert opcode == TEXT, (opcode, payload[:100])
        answer: dict[str, object] = orjson.loads(payload)
        return answer

    async def aclose_code(self) -> int | None:
        """The close code the server sent (None: the stream ended without a close frame)."""
        opcode, payload = await self.arecv()
        assert opcode == CLOSE, (opcode, payload[:100])
        return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None

    def close(self) -> None:
        self.writer.close()


async def expect_fatal(sock: RawSocket, code: str, close_code: int) -> None:
    """The typed error first, then the close frame with its code."""
    answer = await sock.aanswer()
    assert answer["type"] == "error" and answer["code"] == code, answer
    assert await sock.aclose_code() == close_code


@contextlib.asynccontextmanager
async def token_server(**overrides: object) -> AsyncIterator[tuple[LiveServer, str, str]]:
    """A server with two tenants; yields it and their tokens."""
    alice, alice_entry = new_token("alice")
    bob, bob_entry = new_token("bob")
    async with live_server(
        engine=GatedEngine(),
        embedder=_NoEmbedder(),
        tokens=f"{alice_entry},{bob_entry}",
        **overrides,
    ) as srv:
        yield srv, alice, bob


class _NoEmbedder:
    """These tests never register a voice."""

    encoder_id = "none"
    dim = 256

    async def aembed(self, pcm16k: np.ndarray) -> np.ndarray:
        raise AssertionError("no voice is registered in these tests")


async def half_sent(port: int, head: bytes = b"GET /healthz HTTP/1.1\r\nHost: x\r\n") -> RawSocket:
    """A connection that sends part of its request headers and then nothing."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    writer.write(head)
    await asyncio.wait_for(writer.drain(), WAIT)
    return RawSocket(reader, writer, 0)


# --- item 6: frames and connections before authentication -------------------------------------
async def test_before_ready_only_small_frames_are_read() -> None:
    async with token_server() as (srv, alice, _):
        sock = await RawSocket.aconnect(srv.port)
        assert sock.status == 101
        await sock.asend(BINARY, b"\0" * (Limits().max_hello_frame_bytes + 1))
        await expect_fatal(sock, "frame_too_large", 1009)
        sock.close()
        # After hello authenticates, the full limit applies.
        sock = await RawSocket.aconnect(srv.port)
        await sock.asend_json({"type": "hello", "token": alice})
        assert (await sock.aanswer())["type"] == "ready"
        await sock.asend(BINARY, b"\0" * (1024 * 1024))
        assert (await sock.aanswer())["code"] == "unexpected_binary"  # read, not refused
        sock.close()


async def test_a_token_in_the_upgrade_authenticates_before_any_frame() -> None:
    async with token_server() as (srv, alice, bob):
        for headers, path in (
            ({"Authorization": f"Bearer {alice}"}, "/ws"),
            ({}, f"/ws?token={alice}"),
        ):
            sock = await RawSocket.aconnect(srv.port, headers=headers, path=path)
            assert sock.status == 101
            await sock.asend(BINARY, b"\0" * (1024 * 1024))  # the full limit from the start
            assert (await sock.aanswer())["code"] == "hello_required"
            await sock.asend_json({"type": "hello"})  # no token needed in hello now
            assert (await sock.aanswer())["type"] == "ready"
            sock.close()
        # A hello token naming another tenant than the upgrade's is refused.
        sock = await RawSocket.aconnect(srv.port, headers={"Authorization": f"Bearer {alice}"})
        await sock.asend_json({"type": "hello", "token": bob})
        await expect_fatal(sock, "unauthorized", 4401)
        sock.close()
        # A token the server does not accept is refused before the upgrade.
        sock = await RawSocket.aconnect(srv.port, headers={"Authorization": "Bearer nope"})
        assert sock.status == 401
        sock.close()


async def test_unauthenticated_connections_are_capped() -> None:
    async with token_server(max_unauthenticated=4) as (srv, alice, _):
        waiting = [await RawSocket.aconnect(srv.port) for _ in range(4)]
        assert [s.status for s in waiting] == [101] * 4
        refused = await RawSocket.aconnect(srv.port)
        assert refused.status == 503
        refused.close()
        # Authenticated upgrades are not held back by strangers.
        upgraded = await RawSocket.aconnect(srv.port, headers={"Authorization": f"Bearer {alice}"})
        assert upgraded.status == 101
        # One of the four authenticates: its place is free again.
        await waiting[0].asend_json({"type": "hello", "token": alice})
        assert (await waiting[0].aanswer())["type"] == "ready"
        again = await RawSocket.aconnect(srv.port)
        assert again.status == 101
        # A stranger who leaves frees a place too.
        waiting[1].close()
        assert await waiting[1].reader.read() == b""
        for _ in range(100):  # the server notices the close in its own time
            late = await RawSocket.aconnect(srv.port)
            late.close()
            if late.status == 101:
                break
            await asyncio.sleep(0.05)
        assert late.status == 101
        for s in (*waiting, upgraded, again):
            s.close()


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Peak RSS from here on: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture
def serve_with_tokens(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes], str]]:
    """``livevoice serve`` as its own process, with a tenant, a 2 s header timeout and at most
    32 unauthenticated sockets, all from LIVEVOICE_* variables."""
    token, entry = new_token("alice")
    port = free_port()
    env = {
        **os.environ,
        "LIVEVOICE_PORT": str(port),
        "LIVEVOICE_TOKENS": entry,
        "LIVEVOICE_HEADER_TIMEOUT_S": "2",
        "LIVEVOICE_MAX_UNAUTHENTICATED": "32",
    }
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "live.cli", "serve", "--data-dir", "none"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield port, proc, token
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


FLOOD_CONNECTIONS = 40
FLOOD_FRAME = 8 * 1024 * 1024


@pytest.mark.timeout(180)  # most of it is the server loading its models
async def test_strangers_cannot_make_the_server_buffer_megabytes(
    serve_with_tokens: tuple[int, subprocess.Popen[bytes], str],
) -> None:
    """40 connections each send an 8 MB frame before hello. Before the fix all 40 were read
    and held until the hello timeout (VmHWM +~500 MB); now 32 get frame_too_large from the
    frame's header and 8 are refused before the upgrade."""
    port, proc, token = serve_with_tokens
    await wait_ready(f"http://127.0.0.1:{port}", proc)
    reset_peak(proc.pid)
    before = vm_kib(proc.pid, "VmRSS")

    socks = [await RawSocket.aconnect(port) for _ in range(FLOOD_CONNECTIONS)]
    payload = bytes(FLOOD_FRAME)

    async def flood(sock: RawSocket) -> str:
        if sock.status != 101:
            return f"http {sock.status}"
        with contextlib.suppress(ConnectionError, TimeoutError):
            sock.writer.write(sock.frame_header(BINARY, FLOOD_FRAME))
            sock.writer.write(payload)
            await asyncio.wait_for(sock.writer.drain(), WAIT)
        answer = await sock.arecv()
        return orjson.loads(answer[1])["code"] if answer[0] == TEXT else f"opcode {answer[0]}"

    outcomes = await asyncio.gather(*(flood(s) for s in socks))
    grown_mib = (vm_kib(proc.pid, "VmHWM") - before) / 1024
    for s in socks:
        s.close()
    print(f"server peak RSS growth: {grown_mib:.1f} MiB; answers: {sorted(set(outcomes))}")
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert sorted(outcomes) == ["frame_too_large"] * 32 + ["http 503"] * 8, outcomes

    # `serve` bounds the time to send request headers, and still serves a tenant.
    half = await half_sent(port)
    assert await asyncio.wait_for(half.reader.read(), WAIT) == b""
    half.close()
    authed = await RawSocket.aconnect(port, headers={"Authorization": f"Bearer {token}"})
    assert authed.status == 101
    await authed.asend_json({"type": "hello"})
    assert (await authed.aanswer())["type"] == "ready"
    authed.close()


# --- items 9 and 10: the two frames that end a connection get their typed error first ---------
async def test_a_frame_over_the_limit_gets_frame_too_large_then_1009() -> None:
    limits = Limits(max_frame_bytes=256 * 1024)
    async with live_server(engine=GatedEngine(), embedder=_NoEmbedder(), limits=limits) as srv:
        sock = await RawSocket.aconnect(srv.port)
        await sock.asend_json({"type": "hello"})
        assert (await sock.aanswer())["type"] == "ready"
        await sock.asend(BINARY, b"\0" * (256 * 1024))
        answer = await sock.aanswer()
        assert answer["code"] == "frame_too_large" and "262144" in str(answer["message"])
        assert await sock.aclose_code() == 1009
        sock.close()


async def test_a_text_frame_that_is_not_utf8_gets_bad_utf8_then_1007() -> None:
    async with token_server() as (srv, alice, _):
        for authenticated in (False, True):
            sock = await RawSocket.aconnect(srv.port)
            if authenticated:
                await sock.asend_json({"type": "hello", "token": alice})
                assert (await sock.aanswer())["type"] == "ready"
            await sock.asend(TEXT, b'{"type":"ping","id":"\xff\xfe"}')
            await expect_fatal(sock, "bad_utf8", 1007)
            sock.close()


# --- item 13: half-sent requests and too many connections --------------------------------------
async def test_half_sent_requests_are_closed_after_the_header_timeout() -> None:
    async with live_server(
        engine=GatedEngine(), embedder=_NoEmbedder(), header_timeout_s=1.0
    ) as srv:
        stalled = [await half_sent(srv.port) for _ in range(50)]
        dripping = await half_sent(srv.port, b"G")

        async def drip() -> None:  # a byte at a time does not keep the request open
            with contextlib.suppress(ConnectionError):
                for byte in b"ET /healthz HTTP/1.1\r\nHost: x\r\n":
                    await asyncio.sleep(0.2)
                    dripping.writer.write(bytes([byte]))
                    await dripping.writer.drain()

        dripper = asyncio.create_task(drip())
        ends = await asyncio.gather(
            *(asyncio.wait_for(s.reader.read(), WAIT) for s in (*stalled, dripping))
        )
        assert ends == [b""] * 51
        dripper.cancel()
        for s in (*stalled, dripping):
            s.close()
        # A complete request is still served.
        ok = await half_sent(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(ok.reader.readline(), WAIT)).startswith(b"HTTP/1.1 200")
        ok.close()


async def test_connections_over_the_cap_are_refused() -> None:
    async with live_server(
        engine=GatedEngine(), embedder=_NoEmbedder(), max_connections=10, header_timeout_s=60
    ) as srv:
        held = [await half_sent(srv.port) for _ in range(10)]
        refused = await half_sent(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status = await asyncio.wait_for(refused.reader.readline(), WAIT)
        assert status.startswith(b"HTTP/1.1 503"), status
        assert await asyncio.wait_for(refused.reader.read(), WAIT) != b"x"  # then closed
        refused.close()
        # A connection that ends gives its place back.
        held[0].close()
        for _ in range(100):
            ok = await half_sent(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await asyncio.wait_for(ok.reader.readline(), WAIT)
            ok.close()
            if status.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.05)
        assert status.startswith(b"HTTP/1.1 200"), status
        for s in held:
            s.close()
