"""Repeated work, against ``livevoice serve`` in a process of its own: a clip registered again,
and an alert line spoken again.

``python -m bench.repeats`` starts a ``redis-server`` and the real server (GE2E encoder, Piper,
rendered-audio cache on) on free loopback ports, and one client in this process:

1. **Re-registering a clip**: an 8.65 s 48 kHz 16-bit WAV (~830 KB), round trip from sending
   ``voice.register`` to ``voice.ready``, ``--tries`` times. Side by side: the clip's SHA-256
   alone (registering by hash, no upload; the client hashes the bytes inside the round trip),
   the same bytes uploaded each time (the upload alias: no decode) and the same samples in new
   bytes each time (a WAV with one more private chunk: decoded, then an L1 hit by content —
   what every re-registration cost before the alias).
2. **A repeated line**: ``--lines`` distinct alert lines, each spoken once (synthesized) and then
   once more (from the rendered-audio cache). TTFA on the client (``speak`` sent → first audio
   frame) and the server's own (``audio.end.ttfa_ms``), and the server process's CPU seconds
   (``/proc``) in each phase.

Figures from a shared or loaded machine are not final: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import soxr

from protocol.client import SpeechAudio, SpeechEnded, SpeechFailed
from protocol.messages import Speak

from .harness import ROOT, WS_TIMEOUT, WsSession, child_env, percentiles_ms

ALERTS = (
    "Thanks for the follow, {name}!",
    "Welcome to the raid, {name}, and thank you for bringing everyone!",
    "{name} just subscribed for {n} months in a row!",
)
NAMES = ("Alex", "Sam", "Jordan", "Riley", "Casey", "Morgan", "Taylor", "Jamie", "Robin", "Drew")


def clip_48k(seconds: float = 8.65) -> bytes:
    """The reference speech at 48 kHz, repeated to ``seconds``: ~830 KB of 16-bit mono WAV."""
    from live.testing.clips import quantize, reference_clip, wav_bytes

    pcm, rate = reference_clip("piper")
    up = soxr.resample(np.asarray(pcm), rate, 48_000)
    frames = int(seconds * 48_000)
    looped = np.concatenate([up] * (frames // len(up) + 1))[:frames]
    return wav_bytes(quantize(looped), 48_000)


def same_samples_new_bytes(wav: bytes, n: int) -> bytes:
    """``wav`` with a private RIFF chunk holding ``n``: other bytes, identical samples."""
    out = bytearray(wav + b"lvbn" + struct.pack("<IQ", 8, n))
    out[4:8] = struct.pack("<I", len(out) - 8)
    return bytes(out)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def aserver(redis_url: str) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """``livevoice serve`` of this checkout in its own process; (ws url, process)."""
    from live.testing.server import free_port

    port = free_port()
    env = {
        **child_env(),
        "LIVEVOICE_REGISTRATIONS_PER_MINUTE": "1000000",
        "LIVEVOICE_REGISTRATION_BURST": "1000000",
        "LIVEVOICE_SPEAKS_PER_MINUTE": "1000000",
        "LIVEVOICE_SPEAK_BURST": "1000000",
    }
    command = [sys.executable, "-m", "live.cli", "serve", "--port", str(port)]
    command += ["--redis-url", redis_url, "--data-dir", "none", "--log-level", "WARNING"]
    proc = subprocess.Popen(command, env=env, cwd=ROOT)  # noqa: ASYNC220 - returns at once
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as reply:
                        if reply.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError("the server was not ready within 180 s")
                await asyncio.sleep(0.2)
        yield f"ws://127.0.0.1:{port}/ws", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def areregister(session: WsSession, tries: int) -> dict[str, Any]:
    clip = clip_48k()
    await session.aregister(clip)  # new: decoded and embedded once
    await session.aregister(same_samples_new_bytes(clip, 0))  # warm the decode path
    hashed, alias, decoded = [], [], []
    for n in range(1, tries + 1):
        # Interleaved, so all three see the same machine.
        hashed.append((await session.aregister(clip, by_sha256=True)).seconds)
        alias.append((await session.aregister(clip)).seconds)
        decoded.append((await session.aregister(same_samples_new_bytes(clip, n))).seconds)
    return {
        "clip_bytes": len(clip),
        "by_sha256_ms": percentiles_ms(hashed),
        "same_bytes_ms": percentiles_ms(alias),
        "same_samples_new_bytes_ms": percentiles_ms(decoded),
    }


async def aspeak(session: WsSession, mid: str, text: str) -> tuple[float, float]:
    """(client TTFA, server TTFA) of one line, in seconds."""
    sent = time.perf_counter()
    await session.asend(Speak(id=mid, text=text))
    first: float | None = None
    while True:
        event = await session.anext_event(WS_TIMEOUT)
        if isinstance(event, SpeechAudio) and first is None:
            first = time.perf_counter() - sent
        elif isinstance(event, SpeechFailed):
            raise RuntimeError(f"line {mid} failed: {event}")
        elif isinstance(event, SpeechEnded):
            if event.end is None or first is None:
                raise RuntimeError(f"line {mid} ended without audio")
            return first, event.end.ttfa_ms / 1000


async def arepeat_lines(session: WsSession, pid: int, lines: int) -> dict[str, Any]:
    texts = [
        ALERTS[i % len(ALERTS)].format(name=NAMES[i % len(NAMES)], n=i + 2) for i in range(lines)
    ]
    await aspeak(session, "warm", "Warming up the speech engine.")
    out: dict[str, Any] = {}
    for phase in ("synthesized", "cached"):
        cpu = cpu_seconds(pid)
        client, server = [], []
        for i, text in enumerate(texts):
            c, s = await aspeak(session, f"{phase}-{i}", text)
            client.append(c)
            server.append(s)
        out[phase] = {
            "client_ttfa_ms": percentiles_ms(client),
            "server_ttfa_ms": percentiles_ms(server),
            "server_cpu_s": round(cpu_seconds(pid) - cpu, 3),
        }
        await asyncio.sleep(0.5)  # the last line's store lands before it is asked for
    return out


async def arun(tries: int, lines: int) -> dict[str, Any]:
    from live.testing.redis_server import RedisServer

    with RedisServer() as redis:
        async with (
            aserver(redis.url) as (url, proc),
            aiohttp.ClientSession() as http,
            WsSession.aopen(http, url, client="bench-repeats") as session,
        ):
            registration = await areregister(session, tries)
            repeated = await arepeat_lines(session, proc.pid, lines)
    return {"reregister": registration, "repeated_line": repeated}


def _row(label: str, stats: dict[str, Any]) -> str:
    return f"  {label:<44} p50 {stats['p50']:>8.2f} ms   p99 {stats['p99']:>8.2f} ms"


def report(result: dict[str, Any]) -> str:
    reg, rep = result["reregister"], result["repeated_line"]
    lines = [
        f"re-registering an 8.65 s 48 kHz WAV ({reg['clip_bytes'] / 1000:.0f} KB), round trip:",
        _row("its sha256 alone (no upload, no decode)", reg["by_sha256_ms"]),
        _row("same bytes (upload alias, no decode)", reg["same_bytes_ms"]),
        _row("same samples, new bytes (decode + L1 hit)", reg["same_samples_new_bytes_ms"]),
        "a repeated line, time to first audio:",
    ]
    for phase in ("synthesized", "cached"):
        stats = rep[phase]
        lines.append(_row(f"{phase}, client", stats["client_ttfa_ms"]))
        lines.append(_row(f"{phase}, server (audio.end.ttfa_ms)", stats["server_ttfa_ms"]))
        lines.append(f"  {phase + ', server CPU for all lines':<44} {stats['server_cpu_s']:.3f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.repeats", description=__doc__)
    parser.add_argument("--tries", type=int, default=200, help="re-registrations of each kind")
    parser.add_argument("--lines", type=int, default=20, help="distinct lines, each said twice")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = asyncio.run(arun(args.tries, args.lines))
    print(report(result))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
