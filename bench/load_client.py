"""The load scenario's talkers, in a process of their own: ``python -m bench.load_client CONFIG``.

No talker runs on a server's event loop: the bench starts several of these processes, each
driving its share of the sessions against one server, either livevoice (its WebSocket, read
through ``protocol.ClientProtocol``) or wyoming-piper (the Wyoming protocol over TCP:
``Synthesize`` in, ``AudioStart``/``AudioChunk``/``AudioStop`` out).

The process connects every session (livevoice: ``hello`` and the reference clip registered),
prints ``{"ready": true}``, reads ``{"t0": T}`` on stdin, and then follows the schedule it was
given, relative to ``T``. Chat sessions send each line when it is due whatever the server did
meanwhile; continuously talking sessions send their next line once their player holds less than
``lead_s`` of audio (after the current line fully arrived). At the end it prints one JSON line:
per session, per line, when it was due and sent, every frame's arrival and samples, and when it
ended. Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from .harness import ServerError, WsSession
from .realtime import Player


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(data).decode() + "\n")
    sys.stdout.flush()


@dataclass
class Line:
    """One line a session sent, as the session saw it."""

    line: int
    due: float
    sent: float | None = None
    rate: int = 22050
    frames: list[tuple[float, int]] = field(default_factory=list)
    """(arrival, samples) of each audio frame, in order."""
    end: float | None = None
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, at: float, error: str | None = None) -> None:
        self.end, self.error = at, error
        self.done.set()

    def to_json(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "due": self.due,
            "sent": self.sent,
            "rate": self.rate,
            "frames": self.frames,
            "end": self.end,
            "error": self.error,
        }


class Talker(Protocol):
    """One session's connection to the server under test."""

    async def asay(self, ident: str, text: str) -> None: ...

    async def aread(self, on_start: Any, on_frame: Any, on_end: Any) -> None:
        """Read the server until the socket ends, calling ``on_start(ident, rate)``,
        ``on_frame(ident, arrival, samples)`` and ``on_end(ident, arrival, error)``; ``ident``
        is the line's id where the protocol names it (livevoice), else None: the oldest line
        not yet ended (Wyoming answers in order)."""
        ...


class LivevoiceTalker:
    def __init__(self, session: WsSession) -> None:
        self.session = session

    async def asay(self, ident: str, text: str) -> None:
        from protocol.messages import Speak

        await self.session.asend(Speak(id=ident, text=text))

    async def aread(self, on_start: Any, on_frame: Any, on_end: Any) -> None:
        from protocol.client import SpeechAudio, SpeechEnded, SpeechFailed, SpeechStarted

        while True:
            try:
                event = await self.session.anext_event(timeout=None)
            except ConnectionError:
                return
            now = time.monotonic()
            if isinstance(event, SpeechAudio) and event.channel is None:
                on_frame(event.id, now, len(event.pcm) // 2)
            elif isinstance(event, SpeechStarted):
                on_start(event.id, event.sample_rate)
            elif isinstance(event, SpeechEnded):
                on_end(event.id, now, None if event.end is not None else "cancelled")
            elif isinstance(event, SpeechFailed):  # refused (queue_full, ...) or failed
                on_end(event.id, now, ServerError.of(event).code)


class WyomingTalker:
    def __init__(self, client: Any) -> None:
        self.client = client

    async def asay(self, ident: str, text: str) -> None:
        from wyoming.tts import Synthesize

        await self.client.write_event(Synthesize(text=text).event())

    async def aread(self, on_start: Any, on_frame: Any, on_end: Any) -> None:
        from wyoming.audio import AudioChunk, AudioStart, AudioStop
        from wyoming.error import Error

        while True:
            event = await self.client.read_event()
            if event is None:
                return
            now = time.monotonic()
            if AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                on_frame(None, now, len(chunk.audio) // (chunk.width * chunk.channels))
            elif AudioStart.is_type(event.type):
                on_start(None, AudioStart.from_event(event).rate)
            elif AudioStop.is_type(event.type):
                on_end(None, now, None)
            elif Error.is_type(event.type):
                on_end(None, now, Error.from_event(event).code or "error")


class Session:
    """One talker: its schedule, the lines it said, and (continuous talk) its live player."""

    def __init__(self, plan: dict[str, Any], texts: list[str]) -> None:
        self.number = int(plan["number"])
        self.plan = plan
        self.texts = texts
        self.lines: list[Line] = []
        self.unanswered: deque[Line] = deque()
        """Said and not ended, oldest first."""
        self.by_ident: dict[str, Line] = {}
        self.player = Player(gapless=True)
        self.errors: list[str] = []

    def _line(self, ident: str | None, what: str) -> Line | None:
        line = self.unanswered[0] if ident is None and self.unanswered else None
        if ident is not None:
            line = self.by_ident.get(ident)
        if line is None or line.done.is_set():
            self.errors.append(f"{what} for no line said")
            return None
        return line

    def on_start(self, ident: str | None, rate: int) -> None:
        if (line := self._line(ident, "audio start")) is not None:
            line.rate = rate

    def on_frame(self, ident: str | None, arrival: float, samples: int) -> None:
        line = self._line(ident, "audio")
        if line is None:
            return
        if not line.frames:
            self.player.line()
        line.frames.append((arrival, samples))
        self.player.frame(arrival, samples / line.rate)

    def on_end(self, ident: str | None, arrival: float, error: str | None) -> None:
        line = self._line(ident, f"end ({error})")
        if line is not None:
            self.unanswered.remove(line)
            line.finish(arrival, error)

    async def asay(self, talker: Talker, line: int, due: float) -> Line:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        said = Line(line, due, sent=time.monotonic())
        ident = f"l{len(self.lines)}"
        self.lines.append(said)
        self.unanswered.append(said)
        self.by_ident[ident] = said
        await talker.asay(ident, self.texts[line])
        return said

    async def arun(self, talker: Talker, t0: float, seconds: float, lead_s: float) -> None:
        if self.plan["mode"] == "chat":
            for due, line in self.plan["lines"]:
                await self.asay(talker, int(line), t0 + float(due))
        else:  # continuous: the next line once the player holds less than lead_s
            due, line = t0 + float(self.plan["start"]), int(self.plan["first_line"])
            while due < t0 + seconds:
                said = await self.asay(talker, line, due)
                await said.done.wait()
                if said.error is not None or said.end is None:
                    break
                due = self.player.due_next(said.end, lead_s)
                line = (line + 1) % len(self.texts)
        for said in self.lines:
            await said.done.wait()

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "lines": [line.to_json() for line in self.lines],
            "errors": self.errors,
        }


async def _aconnect(stack: contextlib.AsyncExitStack, config: dict[str, Any], n: int) -> Talker:
    if config["target"] == "livevoice":
        http = config.setdefault("_http", await stack.enter_async_context(aiohttp.ClientSession()))
        session = await stack.enter_async_context(
            WsSession.aopen(http, config["url"], f"bench-load-{n}")
        )
        await session.aregister(
            config["clip_bytes"], name=f"streamer {n}", match=None if config["match"] else False
        )
        return LivevoiceTalker(session)
    from wyoming.client import AsyncTcpClient

    client = AsyncTcpClient(config["host"], int(config["port"]))
    await client.connect()
    stack.push_async_callback(client.disconnect)
    return WyomingTalker(client)


async def arun(config: dict[str, Any]) -> None:
    texts: list[str] = config["texts"]
    sessions = [Session(plan, texts) for plan in config["sessions"]]
    seconds, lead_s = float(config["seconds"]), float(config["lead_s"])
    async with contextlib.AsyncExitStack() as stack:
        talkers = [await _aconnect(stack, config, s.number) for s in sessions]
        _emit({"ready": True})
        line = await asyncio.to_thread(sys.stdin.readline)
        t0 = float(orjson.loads(line)["t0"])
        cpu0 = time.process_time()
        readers = [
            asyncio.create_task(t.aread(s.on_start, s.on_frame, s.on_end))
            for s, t in zip(sessions, talkers, strict=True)
        ]
        runs = [
            asyncio.create_task(s.arun(t, t0, seconds, lead_s))
            for s, t in zip(sessions, talkers, strict=True)
        ]
        timeout = max(1.0, t0 + seconds + float(config["drain_s"]) - time.monotonic())
        _done, pending = await asyncio.wait(runs, timeout=timeout)
        for task in pending:
            task.cancel()
        for session, task in zip(sessions, runs, strict=True):
            if task in pending:
                session.errors.append("timeout")
            elif task.exception() is not None:
                session.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*runs, *readers, return_exceptions=True)
        config.pop("_http", None)
        _emit(
            {
                "sessions": [s.to_json() for s in sessions],
                "cpu_s": time.process_time() - cpu0,
            }
        )


def main() -> None:
    config = orjson.loads(sys.argv[1])
    if "clip" in config:
        config["clip_bytes"] = Path(config["clip"]).read_bytes()
    import uvloop

    uvloop.run(arun(config))


if __name__ == "__main__":
    main()
