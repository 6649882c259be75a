"""What every scenario needs: the models loaded once, a real redis-server, the real server on a
free loopback port in this process, raw WebSocket clients, distinct clips, statistics, progress.

The server runs in the bench's own event loop (uvloop, like ``livevoice serve``) so that its
counters (``store.encoder_calls``, the Redis tier's hits, the breaker) can be read directly. The
clients share that loop: client-side figures include the client's own share of the 2 cores, which
makes them a little pessimistic, never optimistic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import aiohttp
import numpy as np
import orjson

from protocol import ClientProtocol, LivevoiceError
from protocol.client import (
    Event,
    SessionReady,
    VoiceAnswered,
    VoiceRequestFailed,
    error_code,
)
from protocol.messages import Hello, Message, VoiceReady, VoiceRegister

if TYPE_CHECKING:
    from live.audio import Fingerprint
    from live.encoder import SpeakerEncoder
    from live.speech import PiperEngine
    from live.testing.redis_server import RedisServer
    from live.testing.server import LiveServer
    from live.voices import Embedding

ROOT = Path(__file__).resolve().parent.parent
"""The source checkout: the bench writes ``bench-results/`` (and ``docs/`` with ``--docs``) here."""


def child_env() -> dict[str, str]:
    """This process's environment for a server or talker subprocess: this checkout first on
    ``PYTHONPATH``, whatever it already named kept after it (packages installed there)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


WS_TIMEOUT = 60.0
"""Bound on every single wait for the server; nothing in a scenario waits unbounded."""


# --- sizes ------------------------------------------------------------------------------------
@dataclass
class LookupSizes:
    n: int = 200
    """Distinct clips; each is timed once per tier (encoder miss, Redis hit, L1 hit)."""
    warmup: int = 3


@dataclass
class HotVoicesSizes:
    voices: int = 200
    registrations: int = 5000
    clients: int = 16
    zipf_s: float = 1.0


@dataclass
class LiveSessionsSizes:
    levels: tuple[int, ...] = (1, 4, 16, 32)
    beyond: tuple[int, ...] = (48, 64)
    """Tried after ``levels`` only while every level so far was ok and the time cap allows."""
    seconds: float = 20.0
    """How long each level sends messages; then it drains for at most ``drain_s``."""
    interval_s: float = 5.0
    """Mean gap between one session's messages (uniform in ±40 %)."""
    drain_s: float = 20.0
    long_share: float = 0.3


@dataclass
class OutageSizes:
    seconds: float = 45.0
    """Redis is killed at 1/3 and restarted at 2/3 of this; the run then goes on until the first
    Redis hit (at most ``recovery_wait_s`` more)."""
    voices: int = 200
    clients: int = 16
    zipf_s: float = 1.0
    recovery_wait_s: float = 15.0


@dataclass
class MemorySizes:
    redis_keys: int = 10_000
    l1_voices: int = 10_000
    evicting_puts: int = 1_000


@dataclass
class FanoutSizes:
    levels: tuple[int, ...] = (1, 5, 10, 25, 50)
    """Listeners on the one channel, one level after another."""
    messages: int = 16
    """The producer's fixed schedule: this many chat messages, one every ``interval_s``."""
    interval_s: float = 0.75
    rates: tuple[int, ...] = (48000,)
    """Listening rates, dealt to the listeners in turn."""
    per_process: int = 25
    """Listeners per listener process."""
    drain_s: float = 30.0
    """How long after the last message is due a level may take to end."""


@dataclass
class MatchingSizes:
    repeats: int = 3
    """Syntheses per reference and condition (Piper samples noise: each one differs)."""
    references: int = 4
    """How many of the references, in order: the human clip, two espeak-ng voices, Piper's own
    (``--quick`` takes the first and the last)."""


@dataclass
class LoadSizes:
    idle_repeats: int = 3
    """One session says every corpus line in turn, each after the one before has played and a
    second of quiet, this many times over: first audio on an idle server (0 skips it)."""
    levels: tuple[int, ...] = (1, 16, 32, 64)
    """Chat sessions at ``duty``, starts spread over ``chat_spread_s``."""
    raid_levels: tuple[int, ...] = (16, 32, 64)
    """The same chat, every session's first line within ``raid_spread_s``."""
    seconds: float = 30.0
    """How long each run's schedule sends lines; then it drains for at most ``drain_s``."""
    duty: float = 0.25
    """A chat line, then silence for the rest of its cycle (0.25: 3x the line's length)."""
    chat_spread_s: float = 10.0
    raid_spread_s: float = 2.0
    continuous_steps: int = 4
    """Runs of the search for the largest continuous-talk level without underrun, per server."""
    continuous_spread_s: float = 5.0
    """Continuous talkers' first lines are spread over this."""
    lead_s: float = 1.0
    """A continuous talker sends its next line once its player holds less than this."""
    drain_s: float = 30.0
    per_process: int = 16
    """Sessions per load-generator process."""
    peer: int = 1
    """1: the same runs against wyoming-piper, alternating with livevoice; 0: livevoice only."""
    match: int = 0
    """0: livevoice speaks in Piper joe's own voice (``match: false``), the audio the peer makes;
    1: matched to the reference clip (section 8), whose slow pace makes every line a quarter
    longer, so a quarter more synthesis than the peer does."""
    device: str = "cpu"
    """``cuda``: both servers run Piper on onnxruntime's CUDA provider (onnxruntime-gpu), and
    livevoice its speaker encoder on the GPU; the limit is then what the GPU delivered."""


@dataclass
class Sizes:
    lookup: LookupSizes = dataclasses.field(default_factory=LookupSizes)
    hot_voices: HotVoicesSizes = dataclasses.field(default_factory=HotVoicesSizes)
    live_sessions: LiveSessionsSizes = dataclasses.field(default_factory=LiveSessionsSizes)
    outage: OutageSizes = dataclasses.field(default_factory=OutageSizes)
    memory: MemorySizes = dataclasses.field(default_factory=MemorySizes)
    fanout: FanoutSizes = dataclasses.field(default_factory=FanoutSizes)
    load: LoadSizes = dataclasses.field(default_factory=LoadSizes)
    matching: MatchingSizes = dataclasses.field(default_factory=MatchingSizes)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            LookupSizes(n=20, warmup=2),
            HotVoicesSizes(voices=20, registrations=300, clients=8),
            LiveSessionsSizes(
                levels=(1, 4, 8), beyond=(), seconds=6.0, interval_s=3.0, drain_s=10.0
            ),
            OutageSizes(seconds=9.0, voices=20, clients=8, recovery_wait_s=10.0),
            MemorySizes(redis_keys=1000, l1_voices=1000, evicting_puts=200),
            FanoutSizes(levels=(1, 5, 10), messages=6, interval_s=0.75, rates=(48000, 16000)),
            LoadSizes(
                idle_repeats=1,
                levels=(1, 8),
                raid_levels=(8,),
                seconds=8.0,
                continuous_steps=1,
                continuous_spread_s=2.0,
                drain_s=15.0,
            ),
            MatchingSizes(repeats=1, references=2),
        )

    def override(self, assignment: str) -> None:
        """Apply ``scenario.field=value`` (``live_sessions.levels=1,4,8``)."""
        target, sep, raw = assignment.partition("=")
        scenario, dot, name = target.partition(".")
        section = getattr(self, scenario, None) if dot and sep else None
        if section is None or name not in {f.name for f in dataclasses.fields(section)}:
            raise ValueError(f"not a size: {assignment!r} (expected scenario.field=value)")
        current = getattr(section, name)
        value: object
        if isinstance(current, tuple):
            value = tuple(int(part) for part in raw.split(",") if part)
        elif isinstance(current, str):
            value = raw
        elif isinstance(current, int):
            value = int(raw)
        else:
            value = float(raw)
        setattr(section, name, value)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- statistics -------------------------------------------------------------------------------
def _num(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """n, mean, p50, p95, p99 and max of durations given in seconds, in milliseconds."""
    if not seconds:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "n": len(ms),
        "mean": round(float(ms.mean()), 4),
        "p50": round(float(p50), 4),
        "p95": round(float(p95), 4),
        "p99": round(float(p99), 4),
        "max": round(float(ms.max()), 4),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return _num(round(a / b, 2))


def zipf_sequence(voices: int, count: int, s: float, seed: int) -> list[int]:
    """``count`` voice indices, rank k drawn with probability proportional to 1 / k**s."""
    weights = 1.0 / np.arange(1, voices + 1, dtype=np.float64) ** s
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(voices, size=count, p=weights / weights.sum())]


# --- clips ------------------------------------------------------------------------------------
class ClipBank:
    """Distinct clips made cheaply from one real Piper reference clip.

    Each copy gets its own seeded ±1 LSB of noise on the 16-bit samples: inaudible, same length
    and same speech (so the same encoder cost), but a different canonical PCM and so a different
    content fingerprint. ``namespace`` keeps scenarios from meeting each other's voices.
    """

    def __init__(self) -> None:
        from live.testing.clips import quantize, reference_clip

        pcm, self.sample_rate = reference_clip("piper")
        self._base = quantize(pcm).astype(np.int32)
        self.duration_s = len(pcm) / self.sample_rate

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - the bank lives for the whole run
    def clip(self, namespace: str, index: int) -> bytes:
        from live.testing.clips import wav_bytes

        seed = int.from_bytes(namespace.encode()[:8].ljust(8, b"\0"), "little")
        noise = np.random.default_rng([seed, index]).integers(-1, 2, size=self._base.shape)
        samples = np.clip(self._base + noise, -32768, 32767).astype(np.int16)
        return wav_bytes(samples, self.sample_rate)

    def clips(self, namespace: str, count: int) -> list[bytes]:
        return [self.clip(namespace, i) for i in range(count)]


# --- clients ----------------------------------------------------------------------------------
class ServerError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code

    @classmethod
    def of(cls, event: Event) -> ServerError:
        """The server's refusal (or whatever came instead of the answer)."""
        error = getattr(event, "error", None)
        if isinstance(error, LivevoiceError):
            return cls(error_code(error), error.message)
        return cls("unexpected", repr(event.message)[:200])


@dataclass(frozen=True, slots=True)
class Registration:
    seconds: float
    """Client round trip: register + clip upload (or its hash) to ``voice.ready``."""
    source: str
    server_ms: float
    """``voice.ready.ms``: the server's clip decode plus lookup."""
    voice_id: str


class WsSession:
    """One bench client on the wire, read through ``protocol.ClientProtocol``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.wire = ClientProtocol()

    @classmethod
    @contextlib.asynccontextmanager
    async def aopen(
        cls, http: aiohttp.ClientSession, url: str, client: str = "livevoice-bench"
    ) -> AsyncIterator[WsSession]:
        async with http.ws_connect(
            url, max_msg_size=0, compress=0, timeout=aiohttp.ClientWSTimeout(ws_close=5)
        ) as ws:
            session = cls(ws)
            await session.asend(Hello(client=client))
            event = await session.anext_event()
            if not isinstance(event, SessionReady):
                raise ServerError.of(event)
            yield session

    async def asend(self, message: Message, clip: bytes | None = None) -> None:
        self.wire.send(message, clip)
        for frame in self.wire.data_to_send():
            if isinstance(frame, str):
                await self.ws.send_str(frame)
            else:
                await self.ws.send_bytes(frame)

    async def anext_event(self, timeout: float | None = WS_TIMEOUT) -> Event:
        """What the next frame from the server means."""
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type is aiohttp.WSMsgType.TEXT:
            return self.wire.receive_text(msg.data)
        if msg.type is aiohttp.WSMsgType.BINARY:
            return self.wire.receive_binary(msg.data)
        raise ConnectionError(f"socket ended: {msg.type.name} {msg.data!r}")

    async def aregister(
        self,
        clip: bytes,
        *,
        name: str | None = None,
        match: bool | None = None,
        by_sha256: bool = False,
    ) -> Registration:
        """Register ``clip``: uploaded, or ``by_sha256`` its hash alone (computed here, inside
        the round trip; ``clip_needed`` raises)."""
        start = time.perf_counter()
        if by_sha256:
            sha256 = hashlib.sha256(clip).hexdigest()
            await self.asend(VoiceRegister(name=name, format="wav", match=match, sha256=sha256))
        else:
            await self.asend(VoiceRegister(name=name, format="wav", match=match), clip)
        while not isinstance(event := await self.anext_event(), VoiceAnswered | VoiceRequestFailed):
            pass
        seconds = time.perf_counter() - start
        if not isinstance(event, VoiceAnswered) or not isinstance(event.answer, VoiceReady):
            raise ServerError.of(event)
        ready = event.answer
        return Registration(seconds, ready.source, ready.ms, ready.voice_id)


# --- progress ---------------------------------------------------------------------------------
class Progress:
    """A one-line bar on a terminal; elsewhere one compact line when the step ends."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._drawn = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def set(self, done: int) -> None:
        self.done = done
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        width = 28
        filled = min(width, int(width * self.done / self.total))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(
            f"\r  {self.label:<28} [{bar}] {self.done}/{self.total} {now - self.started:5.1f}s"
        )
        self.stream.flush()

    def close(self, note: str = "") -> None:
        elapsed = time.monotonic() - self.started
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
        else:
            self.stream.write(f"  {self.label}: {self.done}/{self.total} in {elapsed:.1f} s\n")
        if note:
            self.stream.write(f"    {note}\n")
        self.stream.flush()


# --- machine ----------------------------------------------------------------------------------
def rss_bytes() -> int:
    """This process's resident set (VmRSS) from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
                break
    versions: dict[str, str] = {"python": platform.python_version()}
    for module in ("torch", "onnxruntime", "numpy", "aiohttp", "redis"):
        with contextlib.suppress(Exception):
            versions[module] = __import__(module).__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        versions["piper-tts"] = version("piper-tts")
    with contextlib.suppress(Exception):
        from live.testing.redis_server import REDIS_SERVER

        out = subprocess.run(
            [REDIS_SERVER, "--version"], capture_output=True, text=True, timeout=5
        ).stdout
        versions["redis-server"] = next(
            (w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip()
        )
    loadavg = None
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        loadavg = [float(x) for x in f.read().split()[:3]]
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_bytes": mem_total,
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_at_start": loadavg,
        "gpu": "none used (CPU run)",
    }


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]
    return None


# --- the system under test ---------------------------------------------------------------------
UNTHROTTLED: dict[str, Any] = {
    "max_sessions_per_tenant": 10_000,
    "registrations_per_minute": 1e9,
    "registration_burst": 1_000_000,
    "speaks_per_minute": 1e9,
    "speak_burst": 1_000_000,
    "max_encoder_jobs": 10_000,
}
"""Per-tenant limits lifted: the bench's clients all arrive as one tenant (no tokens), where in
production they would be many streamers. Everything else keeps its default."""


def bench_limits() -> Any:
    """The server's default ``Limits`` with the per-tenant throttles (those it has) lifted."""
    from live.settings import Limits

    names = {f.name for f in dataclasses.fields(Limits)}
    return Limits(**{k: v for k, v in UNTHROTTLED.items() if k in names})


class BenchContext:
    """Models loaded once and injected into every server the scenarios start; one redis-server."""

    def __init__(self) -> None:
        self.encoder: SpeakerEncoder | None = None
        self.engine: PiperEngine | None = None
        self._redis: RedisServer | None = None
        self._bank: ClipBank | None = None

    @property
    def bank(self) -> ClipBank:
        if self._bank is None:
            self._bank = ClipBank()
        return self._bank

    async def aload(self) -> None:
        from live.encoder import SpeakerEncoder
        from live.settings import Settings
        from live.speech import PiperEngine

        defaults = Settings()
        self.encoder = await asyncio.to_thread(SpeakerEncoder.load, device=defaults.device)
        self.engine = await asyncio.to_thread(PiperEngine, workers=defaults.tts_workers)
        await asyncio.to_thread(lambda: self.bank)

    def redis(self) -> RedisServer:
        """The bench's redis-server, started on first use (and again after a scenario kills it)."""
        from live.testing.redis_server import RedisServer

        if self._redis is None:
            self._redis = RedisServer()
        if not self._redis.running:
            self._redis.start()
        return self._redis

    async def aflush_redis(self) -> None:
        import redis.asyncio

        client = redis.asyncio.from_url(self.redis().url)
        try:
            await client.flushall()
        finally:
            await client.aclose()

    @contextlib.asynccontextmanager
    async def aserver(self, **overrides: Any) -> AsyncIterator[LiveServer]:
        """The real app on a free loopback port, with the shared models injected."""
        from live.encoder import EncoderWorker
        from live.settings import Settings
        from live.testing.server import live_server

        assert self.encoder is not None and self.engine is not None, "aload() first"
        overrides.setdefault("limits", bench_limits())
        # One worker per server: it binds to the loop it first runs on and the server's cleanup
        # leaves injected models alone, so it is closed here.
        embedder = EncoderWorker(self.encoder, max_batch=Settings().encoder_max_batch)
        try:
            async with live_server(engine=self.engine, embedder=embedder, **overrides) as server:
                yield server
        finally:
            await embedder.aclose()

    async def aclose(self) -> None:
        if self.engine is not None:
            await self.engine.aclose()
        if self._redis is not None:
            await asyncio.to_thread(self._redis.close)


class SyntheticVoices:
    """Random unit embeddings and distinct fingerprints, for filling caches to measure memory."""

    def __init__(self, encoder_id: str, dim: int, seed: int = 5) -> None:
        self.encoder_id = encoder_id
        self.dim = dim
        self._rng = np.random.default_rng(seed)

    def embedding(self) -> Embedding:
        from live.voices import Embedding

        vector = self._rng.standard_normal(self.dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        return Embedding(vector, self.encoder_id, 5.0, time.time())

    @staticmethod
    def fingerprint(i: int) -> Fingerprint:
        from live.audio import Fingerprint

        digest = hashlib.blake2b(f"bench-memory-{i}".encode(), digest_size=32)
        return Fingerprint(digest.hexdigest())


async def aline(proc: asyncio.subprocess.Process, timeout: float, what: str) -> dict[str, Any]:
    """A client process's next JSON line; its stderr in the error when it ends instead."""
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        err = await asyncio.wait_for(proc.stderr.read(), 5)
        raise RuntimeError(f"{what} ended: {err.decode(errors='replace')[-2000:]}")
    data: dict[str, Any] = orjson.loads(line)
    return data
