"""Channels across servers: ``python -m bench.cross_server [--quick] [--docs]``.

Starts a real redis-server and two real ``livevoice serve`` processes, A and B, on it (per-tenant
throttles lifted: the bench's clients are all one tenant). The clients are aiohttp WebSockets in
this process; the servers are other processes, so no client runs on a server's event loop.

1. **TTFA side by side, in one run.** A producer on A joins channel ``main`` first (so A holds
   the channel's lease and speaks it) and sends one short chat line every ``INTERVAL_S``, each
   due at a time fixed before the run; one 48 kHz listener on A and one on B. TTFA of a line
   for a listener is its first audio frame's arrival minus the line's *scheduled* send time.
2. **Takeover after SIGKILL**, repeated: on a fresh channel, a producer on A joins first (A holds
   the lease), a listener on B; three lines are queued, the first one long. Once B hears 0.5 s of
   the first line, A is SIGKILLed by pid; the takeover time is until B receives the replayed
   line's ``audio.start`` (``replayed: true``). B must then hear the line again to its end and
   lines 2 and 3 once each. A is restarted between repetitions.

``--docs`` rewrites this bench's own marked section of ``docs/benchmarks.md`` (appended the
first time). Times are ``time.monotonic()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from live.testing.clips import reference_wav
from live.testing.redis_server import RedisServer, free_port
from protocol.client import ChannelHeardEnded, ChannelHeardStarted, SpeechAudio
from protocol.codec import AudioFrame
from protocol.messages import AudioEnd, AudioStart, Speak

from .fanout_client import _ajoin
from .harness import UNTHROTTLED, WsSession, child_env
from .standalone import run_standalone

BEGIN, END = "<!-- bench:cross_server -->", "<!-- /bench:cross_server -->"
INTERVAL_S = 1.5
RATE = 48000
TAKEOVER_TARGET_S = 3.0
CHAT = [
    "Thanks for the follow, {n}!",
    "Welcome in, friend number {n}.",
    "Nice shot, that was round {n}.",
    "GG everyone, game {n} is done.",
    "Hydrate check number {n}.",
    "Lurker {n} says hello.",
]
LONG_LINE = (
    "This first line is long enough to be cut in the middle when its server dies, "
    "because it goes on and on for several seconds of speech, round {n}."
)


# --- servers --------------------------------------------------------------------------------------
@dataclass
class Served:
    """A real ``livevoice serve`` process on a loopback port; stopped by its pid only."""

    redis_url: str
    logs: Path
    name: str
    port: int = 0
    proc: asyncio.subprocess.Process | None = None
    started_s: float = 0.0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def astart(self, timeout_s: float = 300) -> None:
        self.port = free_port()
        env = child_env()
        env |= {f"LIVEVOICE_{k.upper()}": str(v) for k, v in UNTHROTTLED.items()}
        log = (self.logs / f"{self.name}-{self.port}.log").open("wb")
        began = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "live.cli", "serve", "--host", "127.0.0.1"),
            *("--port", str(self.port), "--redis-url", self.redis_url),
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - began < timeout_s:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"livevoice serve {self.name} exited; see {self.logs}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url) as reply:
                        if reply.status == 200:
                            self.started_s = time.monotonic() - began
                            return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"livevoice serve {self.name} not ready in {timeout_s} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def astop(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.terminate()
                try:
                    await asyncio.wait_for(self.proc.wait(), 10)
                except TimeoutError:
                    self.kill()
            await self.proc.wait()


# --- clients --------------------------------------------------------------------------------------
@dataclass
class Ear:
    """What one listener heard, per stream: start (and when it came), first frame, samples,
    end."""

    starts: list[tuple[float, AudioStart]] = field(default_factory=list)
    first: dict[int, float] = field(default_factory=dict)
    samples: dict[int, int] = field(default_factory=dict)
    ends: dict[int, AudioEnd] = field(default_factory=dict)
    closed: str | None = None

    async def aread(self, session: WsSession) -> None:
        while True:
            try:
                event = await session.anext_event(timeout=None)
            except (ConnectionError, aiohttp.ClientError) as exc:
                self.closed = str(exc)[:80]
                return
            now = time.monotonic()
            if isinstance(event, ChannelHeardStarted):
                self.starts.append((now, event.start))
            elif isinstance(event, SpeechAudio) and isinstance(event.message, AudioFrame):
                if event.channel is None:
                    continue
                stream = event.message.stream
                self.first.setdefault(stream, now)
                self.samples[stream] = self.samples.get(stream, 0) + len(event.pcm) // 2
            elif isinstance(event, ChannelHeardEnded):
                self.ends[event.end.stream] = event.end

    def of(self, message_id: str) -> list[AudioStart]:
        return [s for _, s in self.starts if s.id == message_id]

    def first_audio(self, message_id: str) -> float | None:
        streams = [s.stream for s in self.of(message_id)]
        return self.first.get(streams[0]) if streams else None


async def await_until(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def adrain(session: WsSession) -> None:
    """Read a producer's socket (queued, audio.end) so its server never waits on it."""
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
        while True:
            await session.anext_event(timeout=None)


@contextlib.asynccontextmanager
async def aclients(
    http: aiohttp.ClientSession, producer_on: Served, channel: str, listeners: list[Served]
) -> AsyncIterator[tuple[WsSession, list[Ear]]]:
    """A producer joined first (its server holds the lease), then 48 kHz listeners; their
    sockets read by tasks for as long as this lasts."""
    async with contextlib.AsyncExitStack() as stack:
        bot = await stack.enter_async_context(
            WsSession.aopen(http, producer_on.ws_url, "bench-cross-producer")
        )
        await bot.aregister(reference_wav(), name="cross-server producer")
        await _ajoin(bot, channel, "speak", None)
        ears: list[Ear] = []
        tasks = [asyncio.create_task(adrain(bot))]
        for n, server in enumerate(listeners):
            session = await stack.enter_async_context(
                WsSession.aopen(http, server.ws_url, f"bench-cross-listener-{n}")
            )
            await _ajoin(session, channel, "listen", RATE)
            ears.append(Ear())
            tasks.append(asyncio.create_task(ears[-1].aread(session)))
        try:
            yield bot, ears
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# --- the two measurements -------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def attfa(http: aiohttp.ClientSession, a: Served, b: Served, lines: int) -> dict[str, Any]:
    texts = [CHAT[i % len(CHAT)].format(n=i + 1) for i in range(lines)]
    async with aclients(http, a, "main", [a, b]) as (bot, (on_a, on_b)):
        t0 = time.monotonic() + 1.0
        due = [t0 + i * INTERVAL_S for i in range(lines)]
        late: list[float] = []
        for i, text in enumerate(texts):
            await asyncio.sleep(max(0.0, due[i] - time.monotonic()))
            late.append(time.monotonic() - due[i])
            await bot.asend(Speak(id=f"t{i}", text=text, user="bench"))

        def done() -> bool:
            return all(len(ear.ends) >= lines for ear in (on_a, on_b))

        await await_until(done, "every line heard on both servers", 60 + lines * INTERVAL_S)
    per_line = []
    for i in range(lines):
        fa, fb = on_a.first_audio(f"t{i}"), on_b.first_audio(f"t{i}")
        per_line.append(
            {
                "a_ms": None if fa is None else round((fa - due[i]) * 1000, 1),
                "b_ms": None if fb is None else round((fb - due[i]) * 1000, 1),
            }
        )
    a_ms = [p["a_ms"] for p in per_line if p["a_ms"] is not None]
    b_ms = [p["b_ms"] for p in per_line if p["b_ms"] is not None]
    diff = [
        round(pb - pa, 1)
        for p in per_line
        if (pa := p["a_ms"]) is not None and (pb := p["b_ms"]) is not None
    ]
    return {
        "lines": lines,
        "interval_s": INTERVAL_S,
        "send_late_ms_max": round(max(late) * 1000, 1),
        "same": {"p50": pct(a_ms, 50), "p99": pct(a_ms, 99), "n": len(a_ms)},
        "cross": {"p50": pct(b_ms, 50), "p99": pct(b_ms, 99), "n": len(b_ms)},
        "diff": {"p50": pct(diff, 50), "p99": pct(diff, 99), "n": len(diff)},
        "per_line": per_line,
    }


async def atakeover(http: aiohttp.ClientSession, a: Served, b: Served, rep: int) -> dict[str, Any]:
    texts = [
        LONG_LINE.format(n=rep),
        f"The second line waits in the queue, round {rep}.",
        f"And the third line waits behind it, round {rep}.",
    ]
    async with aclients(http, a, f"takeover-{rep}", [b]) as (bot, (ear,)):
        for n, text in enumerate(texts):
            await bot.asend(Speak(id=f"m{n}", text=text))

        def heard_some() -> bool:
            streams = [s.stream for s in ear.of("m0")]
            return bool(streams) and ear.samples.get(streams[0], 0) >= RATE // 2

        await await_until(heard_some, "0.5 s of the first line on B", 120)
        a.kill()
        killed = time.monotonic()

        def replayed() -> bool:
            return any(s.id == "m0" and s.replayed for _, s in ear.starts)

        await await_until(replayed, "the replayed line's audio.start on B", 60)
        at = next(t for t, s in ear.starts if s.id == "m0" and s.replayed)

        def all_heard() -> bool:
            return all(s.stream in ear.ends for _, s in ear.starts) and len(ear.starts) >= 4

        await await_until(all_heard, "every line on B", 120)
        await asyncio.sleep(1.0)  # a line heard twice would show up here
    assert a.proc is not None
    await a.proc.wait()
    cut = ear.of("m0")
    ok = {
        "cut_line_ended_cancelled": ear.ends[cut[0].stream].cancelled,
        "replay_ended_whole": len(cut) == 2 and not ear.ends[cut[1].stream].cancelled,
        "line_2_once": [bool(s.replayed) for s in ear.of("m1")] == [False],
        "line_3_once": [bool(s.replayed) for s in ear.of("m2")] == [False],
        "order": [s.id for _, s in ear.starts] == ["m0", "m0", "m1", "m2"],
    }
    return {"rep": rep, "takeover_s": round(at - killed, 3), "checks": ok}


def show_logs(logs: Path) -> None:
    """The end of each server's last log, on stderr (after a failure)."""
    for name in ("A", "B"):
        with contextlib.suppress(OSError):
            tail = sorted(logs.glob(f"{name}-*.log"))
            if tail:
                sys.stderr.write(f"--- {tail[-1].name}\n{tail[-1].read_text()[-2000:]}\n")


async def arun(quick: bool) -> dict[str, Any]:
    lines, reps = (8, 2) if quick else (30, 5)
    results: dict[str, Any] = {"takeover": []}
    with tempfile.TemporaryDirectory(prefix="bench-cross-") as tmp, RedisServer() as redis:
        logs = Path(tmp)
        a, b = Served(redis.url, logs, "A"), Served(redis.url, logs, "B")
        try:
            await asyncio.gather(a.astart(), b.astart())
            results["startup_s"] = [round(a.started_s, 1), round(b.started_s, 1)]
            print(f"servers ready: A {a.started_s:.1f} s, B {b.started_s:.1f} s", flush=True)
            async with aiohttp.ClientSession() as http:
                results["ttfa"] = ttfa = await attfa(http, a, b, lines)
                print(
                    f"TTFA over {lines} lines (ms, from the scheduled send): same server (A) "
                    f"p50 {ttfa['same']['p50']} p99 {ttfa['same']['p99']}; across servers (B) "
                    f"p50 {ttfa['cross']['p50']} p99 {ttfa['cross']['p99']}; B - A per line "
                    f"p50 {ttfa['diff']['p50']} p99 {ttfa['diff']['p99']}",
                    flush=True,
                )
                for rep in range(1, reps + 1):
                    if rep > 1:
                        await a.astart()
                    took = await atakeover(http, a, b, rep)
                    results["takeover"].append(took)
                    print(
                        f"takeover {rep}: {took['takeover_s']:.2f} s; "
                        f"checks {'ok' if all(took['checks'].values()) else took['checks']}",
                        flush=True,
                    )
        except BaseException:
            show_logs(logs)
            raise
        finally:
            await asyncio.gather(a.astop(), b.astop())
    times = [t["takeover_s"] for t in results["takeover"]]
    results["takeover_max_s"] = max(times)
    print(f"takeover max {max(times):.2f} s (target <= {TAKEOVER_TARGET_S} s)")
    return results


# --- docs -----------------------------------------------------------------------------------------
def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    t = results["ttfa"]
    out = [
        BEGIN,
        "## 9. Channels across servers",
        "",
        f"From a separate run: `{meta['command']}` on {meta['started']} "
        f"({m.get('cores')} cores, {m.get('cpu')}; load average at start "
        f"{m.get('loadavg_at_start')}, at end {meta['loadavg_at_end']}; took "
        f"{meta['seconds']} s). **The machine is shared** with other sessions' builds and tests "
        "(see the load average), and both servers, redis-server and the clients share its "
        "cores: the absolute TTFA figures move with that load; the same-server / cross-server "
        "difference comes from one run, line by line, under the same load.",
        "",
    ]
    if "--quick" in meta["command"].split():
        out += [
            f"**A `--quick` run**: {t['lines']} lines and {len(results['takeover'])} takeovers, "
            "enough to check the bench works; rerun without `--quick` on a quiet machine for "
            "figures to quote.",
            "",
        ]
    out += [
        "One real redis-server and two real `livevoice serve` processes, A and B, on it. A "
        "producer on A joins channel `main` first (A holds the lease and speaks the channel) "
        f"and sends a short chat line every {t['interval_s']} s, each due at a time fixed "
        "before the run; a 48 kHz listener on A and one on B (aiohttp clients in the bench "
        "process). TTFA is a line's first audio frame at the listener minus its *scheduled* "
        f"send time (the sends were at most {t['send_late_ms_max']} ms late). Both listeners "
        "read the channel's Redis Stream through their own server; B's differs only in the "
        "speaking server being another process.",
        "",
        "| listener | lines | TTFA p50 ms | TTFA p99 ms |",
        "|---|---|---|---|",
        f"| same server (A) | {t['same']['n']} | {t['same']['p50']} | {t['same']['p99']} |",
        f"| across servers (B) | {t['cross']['n']} | {t['cross']['p50']} | {t['cross']['p99']} |",
        f"| difference B - A, per line | {t['diff']['n']} | {t['diff']['p50']} | "
        f"{t['diff']['p99']} |",
        "",
        "**Takeover after SIGKILL.** On a fresh channel per repetition, a producer on A joins "
        "first (A holds the lease), a listener on B; three lines are queued, the first several "
        "seconds long. Once B has heard 0.5 s of it, A is SIGKILLed by pid; the time is until B "
        "receives the replayed line's `audio.start` (`replayed: true`). A is restarted between "
        "repetitions. The lease is 2 s and lapsed leases are tried every 0.25 s.",
        "",
        "| repetition | takeover s | cut line ended cancelled, replayed whole, lines 2 and 3 "
        "heard once, in order |",
        "|---|---|---|",
    ]
    for took in results["takeover"]:
        checks = took["checks"]
        verdict = "yes" if all(checks.values()) else f"no: {checks}"
        out.append(f"| {took['rep']} | {took['takeover_s']:.2f} | {verdict} |")
    worst = results["takeover_max_s"]
    met = "met" if worst <= TAKEOVER_TARGET_S else "**not met**"
    out += [
        "",
        f"Max takeover {worst:.2f} s against the target of ≤ {TAKEOVER_TARGET_S:.0f} s: {met}.",
        "",
        END,
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    run_standalone(
        "python -m bench.cross_server",
        __doc__,
        "8 lines and 2 takeovers",
        arun,
        markdown,
        (BEGIN, END),
        argv,
    )


if __name__ == "__main__":
    main()
