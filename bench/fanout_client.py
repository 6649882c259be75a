"""The fan-out scenario's load, in a process of its own: ``python -m bench.fanout_client CONFIG``.

Load never runs on the server's event loop (the server is the bench process): this process
either opens ``listeners`` channel listeners, or is the channel's one producer. It prints one
JSON line when it is ready (every listener joined; the producer's voice registered and joined),
and one JSON line with what it measured at the end. Times are ``time.monotonic()``, the
system-wide CLOCK_MONOTONIC, so the bench compares them with other processes' times.

Producer: reads one line ``{"t0": T}`` on stdin, then sends message ``i`` when it is due, at
``T + i * interval_s`` (sleeping until then; the due time, not the send time, is what TTFA is
measured from), and waits for every message's completion.

Listener: records, per message, when its first audio frame arrived and how many frames and
samples came against what its ``audio.end`` announced; ends once every listener heard every
message's end, or a listener's socket ended (cut loose), or the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from protocol.client import (
    ChannelHeardEnded,
    ChannelHeardStarted,
    ChannelJoinAnswered,
    SpeechAudio,
    SpeechEnded,
    SpeechFailed,
    Unmatched,
    error_code,
)
from protocol.messages import ChannelJoin, Error, Speak

from .harness import ServerError, WsSession


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(data).decode() + "\n")
    sys.stdout.flush()


async def _ajoin(session: WsSession, channel: str, role: str, rate: int | None) -> None:
    await session.asend(ChannelJoin(channel=channel, role=role, sample_rate=rate, id="join"))
    while not isinstance(event := await session.anext_event(), ChannelJoinAnswered):
        pass
    if event.joined is None:
        raise ServerError.of(event)


class Heard:
    """One listener: per message id [first frame at, frames, samples, end frames, end samples,
    cancelled]; errors as codes."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.messages: dict[str, list[Any]] = {}
        self.errors: list[str] = []

    def ended(self) -> int:
        return sum(1 for m in self.messages.values() if m[3] is not None)

    async def aread(self, session: WsSession, count: int) -> None:
        while self.ended() < count:
            try:
                event = await session.anext_event(timeout=None)
            except ConnectionError as exc:
                self.errors.append(f"socket ended: {str(exc)[:80]}")
                return
            now = time.monotonic()
            if isinstance(event, ChannelHeardStarted):
                self.messages[event.start.id] = [None, 0, 0, None, None, False]
            elif isinstance(event, SpeechAudio) and event.channel is not None:
                heard = self.messages.get(event.id)
                if heard is not None:
                    if heard[0] is None:
                        heard[0] = now
                    heard[1] += 1
                    heard[2] += len(event.pcm) // 2
            elif isinstance(event, ChannelHeardEnded):
                heard = self.messages.get(event.end.id)
                if heard is not None:
                    heard[3], heard[4] = event.end.frames, event.end.samples
                    heard[5] = event.end.cancelled
            elif isinstance(event, SpeechFailed):  # frames or samples short of audio.end's
                self.errors.append(error_code(event.error))
                if (heard := self.messages.get(event.id)) is not None:
                    heard[3] = heard[4] = -1
            elif isinstance(event, Unmatched) and isinstance(event.message, Error):
                self.errors.append(event.message.code)


async def alisten(config: dict[str, Any]) -> None:
    count = int(config["messages"])
    rates = [int(r) for r in config["rates"]]
    heard = [Heard(rates[(config["first"] + i) % len(rates)]) for i in range(config["listeners"])]
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        sessions = []
        for n, listener in enumerate(heard):
            session = await stack.enter_async_context(
                WsSession.aopen(http, config["url"], f"bench-fanout-listener-{n}")
            )
            await _ajoin(session, config["channel"], "listen", listener.rate)
            sessions.append(session)
        _emit({"ready": True})
        readers = [
            asyncio.create_task(listener.aread(session, count))
            for listener, session in zip(heard, sessions, strict=True)
        ]
        _done, pending = await asyncio.wait(readers, timeout=float(config["timeout_s"]))
        for task in pending:
            task.cancel()
        for listener, task in zip(heard, readers, strict=True):
            if task in pending:
                listener.errors.append("timeout")
        _emit(
            {
                "listeners": [
                    {"rate": h.rate, "messages": h.messages, "errors": h.errors} for h in heard
                ]
            }
        )


async def aproduce(config: dict[str, Any]) -> None:
    texts: list[str] = config["texts"]
    interval = float(config["interval_s"])
    ends: dict[str, dict[str, Any]] = {}
    async with (
        aiohttp.ClientSession() as http,
        WsSession.aopen(http, config["url"], "bench-fanout-producer") as session,
    ):
        await session.aregister(config["clip_bytes"], name="fanout producer")
        await _ajoin(session, config["channel"], "speak", None)
        _emit({"ready": True})
        line = await asyncio.to_thread(sys.stdin.readline)
        t0 = float(orjson.loads(line)["t0"])
        due = [t0 + i * interval for i in range(len(texts))]
        sent: list[float] = []

        async def asend() -> None:
            for i, text in enumerate(texts):
                await asyncio.sleep(max(0.0, due[i] - time.monotonic()))
                sent.append(time.monotonic())
                await session.asend(Speak(id=f"f{i}", text=text))

        async def aread() -> None:
            while len(ends) < len(texts):
                event = await session.anext_event(timeout=float(config["timeout_s"]))
                if isinstance(event, SpeechEnded):
                    end = event.end
                    ends[event.id] = {
                        "duration_ms": None if end is None else end.duration_ms,
                        "ttfa_ms": None if end is None else end.ttfa_ms,
                        "cancelled": event.cancelled,
                        "at": time.monotonic(),
                    }
                elif isinstance(event, SpeechFailed):
                    ends[event.id] = {"error": error_code(event.error), "at": time.monotonic()}

        await asyncio.gather(asend(), aread())
        _emit({"due": due, "sent": sent, "ends": ends})


def main() -> None:
    config = orjson.loads(sys.argv[1])
    if "clip" in config:
        config["clip_bytes"] = Path(config["clip"]).read_bytes()
    import uvloop

    uvloop.run(aproduce(config) if config["role"] == "produce" else alisten(config))


if __name__ == "__main__":
    main()
