"""The six scenarios. Each takes the shared context, its sizes and a deadline, and returns a dict
with a flat ``summary`` of numbers (the table and the smoke test read it), the details, the raw
series the plots draw, and ``method``: how it was measured, in words.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import orjson

from protocol.client import (
    SpeechAudio,
    SpeechEnded,
    SpeechFailed,
    SpeechStarted,
    Unmatched,
    error_code,
)
from protocol.messages import Error, Speak

from .harness import (
    ROOT,
    WS_TIMEOUT,
    BenchContext,
    HotVoicesSizes,
    LiveSessionsSizes,
    LookupSizes,
    MemorySizes,
    OutageSizes,
    Progress,
    Registration,
    ServerError,
    SyntheticVoices,
    WsSession,
    aline,
    percentiles_ms,
    ratio,
    zipf_sequence,
)
from .matching import arun_matching

if TYPE_CHECKING:
    from live.audio import CanonicalClip, ClipQuality
    from live.metrics import Metrics
    from live.redis_tier import RedisTier
    from live.services import StoreFactory
    from live.testing.server import LiveServer
    from live.voices import Embedder, ResolvedVoice, VoiceStore

    from .harness import FanoutSizes


def _recording_store(seen: list[tuple[str, float]]) -> StoreFactory:
    """A ``store_factory`` for the server: its usual store, noting (source, server-side seconds)
    of every upload it resolves in ``seen``.

    ``ResolvedVoice.seconds`` is the store's own clock around L1 → Redis → encoder, the figure
    behind the ``livevoice_voice_lookup_seconds`` histogram, without its coarse buckets. Bytes
    seen before skip the decode (their upload alias), so it counts from the upload.
    """
    from live.voices import VoiceStore

    class RecordingStore(VoiceStore):
        async def aresolve_upload(
            self, data: bytes, **kwargs: Any
        ) -> tuple[ResolvedVoice, ClipQuality]:
            resolved, quality = await super().aresolve_upload(data, **kwargs)
            seen.append((resolved.source.value, resolved.seconds))
            return resolved, quality

    return RecordingStore


def _histogram(server: LiveServer, name: str) -> dict[str, tuple[float, float]]:
    """(sum, count) per ``tier`` label of one histogram, parsed from the ``/metrics`` text."""
    from prometheus_client.parser import text_string_to_metric_families

    text = server.services.metrics.render().decode()
    out: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            tier = sample.labels.get("tier", "")
            total, count = out.get(tier, (0.0, 0.0))
            if sample.name.endswith("_sum"):
                out[tier] = (sample.value, count)
            elif sample.name.endswith("_count"):
                out[tier] = (total, sample.value)
    return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


# === 1. lookup ================================================================================
async def arun_lookup(ctx: BenchContext, sizes: LookupSizes, deadline: float) -> dict[str, Any]:
    bank = ctx.bank
    clips = bank.clips("lookup", sizes.n)
    warm = bank.clips("lookup-warm", sizes.warmup)
    await ctx.aflush_redis()
    tiers = ("encoder", "redis", "l1")
    rows: dict[str, dict[str, list[float]]] = {
        t: {"round_trip": [], "server": [], "lookup": []} for t in tiers
    }
    unexpected: Counter[str] = Counter()
    histogram_mean_ms: dict[str, float | None] = {}
    progress = Progress("lookup", 4 * sizes.n)
    truncated = False
    # L1 capacity 0: an unpinned entry is dropped as soon as it is stored, and a session pins
    # only its latest voice, so registering clip i+1 releases clip i from the L1 for good.
    lookups: list[tuple[str, float]] = []
    recording = _recording_store(lookups)
    async with (
        ctx.aserver(redis_url=ctx.redis().url, l1_voices=0, store_factory=recording) as server,
        aiohttp.ClientSession() as http,
    ):
        async with WsSession.aopen(http, server.ws_url) as session:
            for clip in warm + warm:  # encoder, then Redis: first calls pay one-off costs
                await session.aregister(clip)

        async def timed_pass(server: LiveServer, tier: str) -> None:
            nonlocal truncated
            before = _histogram(server, "livevoice_voice_lookup_seconds").get(tier, (0.0, 0.0))
            async with WsSession.aopen(http, server.ws_url) as session:
                for clip in clips:
                    if time.perf_counter() > deadline:
                        truncated = True
                        break
                    mark = len(lookups)
                    reg = await session.aregister(clip)
                    progress.advance()
                    if reg.source != tier:
                        unexpected[tier] += 1
                        continue
                    rows[tier]["round_trip"].append(reg.seconds)
                    rows[tier]["server"].append(reg.server_ms / 1000)
                    rows[tier]["lookup"].append(lookups[mark][1])
            after = _histogram(server, "livevoice_voice_lookup_seconds").get(tier, (0.0, 0.0))
            count = after[1] - before[1]
            histogram_mean_ms[tier] = (
                round((after[0] - before[0]) / count * 1000, 4) if count else None
            )

        await timed_pass(server, "encoder")  # every clip is new: L1 miss, Redis miss, encoder
        await timed_pass(server, "redis")  # L1 holds nothing unpinned: every clip from Redis
        # L1 on: a second server with the default capacity, on the same Redis; one untimed pass
        # fills its L1 from Redis, the next hits it.
        async with ctx.aserver(redis_url=ctx.redis().url, store_factory=recording) as warm_l1:
            async with WsSession.aopen(http, warm_l1.ws_url) as session:
                for clip in clips:
                    if time.perf_counter() > deadline:
                        break
                    await session.aregister(clip)
                    progress.advance()
            await timed_pass(warm_l1, "l1")
    progress.close()

    detail: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for tier in tiers:
        detail[tier] = {
            "round_trip_ms": percentiles_ms(rows[tier]["round_trip"]),
            "server_ms": percentiles_ms(rows[tier]["server"]),
            "lookup_ms": percentiles_ms(rows[tier]["lookup"]),
            "histogram_mean_ms": histogram_mean_ms.get(tier),
            "unexpected_source": unexpected[tier],
        }
        for what in ("round_trip", "lookup"):
            stats = detail[tier][f"{what}_ms"]
            for q in ("p50", "p95", "p99"):
                summary[f"{tier}_{what}_{q}_ms"] = stats[q]
    for what in ("round_trip", "lookup"):
        for q in ("p50", "p99"):
            enc, red, l1 = (summary[f"{t}_{what}_{q}_ms"] for t in tiers)
            summary[f"encoder_over_redis_{what}_{q}"] = ratio(enc, red)
            summary[f"redis_over_l1_{what}_{q}"] = ratio(red, l1)
    summary["clip_seconds"] = round(bank.duration_s, 3)
    summary["clip_bytes"] = len(clips[0])
    summary["unexpected_sources"] = sum(unexpected.values())
    return {
        "summary": summary,
        "tiers": detail,
        "truncated": truncated,
        "series": {
            t: {
                "round_trip_ms": [round(s * 1000, 4) for s in rows[t]["round_trip"]],
                "lookup_ms": [round(s * 1000, 5) for s in rows[t]["lookup"]],
            }
            for t in tiers
        },
        "method": (
            f"{sizes.n} distinct {bank.duration_s:.1f} s WAV clips ({len(clips[0]) // 1024} KB, "
            "one Piper clip with its own ±1 LSB of seeded noise per copy), registered one at a "
            "time on one session per pass against a server with Redis and l1_voices=0. Pass 1: "
            "all new (encoder). Pass 2: same clips, L1 capacity 0 keeps nothing unpinned and a "
            "session pins only its latest voice, so each comes from Redis. Then the L1 capacity "
            "is set to the default, an untimed pass fills it, and pass 3 hits the L1. Round trip = "
            "client send of voice.register + clip to voice.ready (upload, decode, lookup, reply); "
            "lookup = the store's own ResolvedVoice.seconds (what the "
            "livevoice_voice_lookup_seconds histogram observes; its per-tier mean is kept as a "
            "cross-check)."
        ),
    }


# === shared: a registration workload =========================================================
@dataclass
class Workload:
    """Registrations made by ``clients`` concurrent sessions, each taking the next clip."""

    started: float = field(default_factory=time.perf_counter)
    t_start: list[float] = field(default_factory=list)
    t_done: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    voice: list[int] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)

    def add(self, voice: int, t0: float, reg: Registration) -> None:
        self.t_start.append(t0 - self.started)
        self.t_done.append(t0 + reg.seconds - self.started)
        self.seconds.append(reg.seconds)
        self.source.append(reg.source)
        self.server_ms.append(reg.server_ms)
        self.voice.append(voice)


async def _adrive(
    server: LiveServer,
    clients: int,
    take: Callable[[], tuple[int, bytes] | None],
    work: Workload,
    progress: Progress | None = None,
) -> None:
    """Run ``clients`` sessions until ``take`` returns None; errors are recorded, not raised."""

    async def client(http: aiohttp.ClientSession, n: int) -> None:
        item = take()
        while item is not None:
            try:
                async with WsSession.aopen(http, server.ws_url, f"bench-{n}") as session:
                    while item is not None:
                        voice, clip = item
                        t0 = time.perf_counter()
                        try:
                            reg = await session.aregister(clip)
                        except ServerError as exc:
                            work.errors.append((time.perf_counter() - work.started, exc.code))
                        else:
                            work.add(voice, t0, reg)
                        if progress is not None:
                            progress.advance()
                        item = take()
            except (OSError, ConnectionError, TimeoutError, aiohttp.ClientError) as exc:
                # The socket itself failed: a client-visible error too. Reconnect and go on.
                work.errors.append((time.perf_counter() - work.started, type(exc).__name__))
                item = take()

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http, n) for n in range(clients)))


def _uncached_store(embedder: Embedder, *, metrics: Metrics, **_: Any) -> VoiceStore:
    """The store the app would build, with its cache taken out: no L1, no Redis, no
    single-flight. Given to the server as its ``store_factory``.

    The bench's baseline, not a server mode. A server with ``l1_voices=0`` and no Redis is not
    cache-free: voices pinned by live sessions stay in the L1, and concurrent registrations of
    one clip share one encoder call, so it would under-count the encoder's work.
    """
    from live.voices import VoiceSource, VoiceStore

    class UncachedStore(VoiceStore):
        async def aresolve(self, clip: CanonicalClip) -> ResolvedVoice:
            start = time.perf_counter()
            embedding = await self._aencode(clip)
            return self._resolved(clip.fingerprint, embedding, VoiceSource.ENCODER, start)

    return UncachedStore(embedder, l1_capacity=0, metrics=metrics)


# === 2. hot voices ============================================================================
async def arun_hot_voices(
    ctx: BenchContext, sizes: HotVoicesSizes, deadline: float
) -> dict[str, Any]:
    clips = ctx.bank.clips("hot", sizes.voices)
    sequence = zipf_sequence(sizes.voices, sizes.registrations, sizes.zipf_s, seed=7)
    budget = deadline - time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    series: dict[str, Any] = {}
    for mode in ("cache_on", "cache_off"):
        if mode == "cache_on":
            await ctx.aflush_redis()
            overrides: dict[str, Any] = {"redis_url": ctx.redis().url}
            run_deadline = time.perf_counter() + budget / 2
        else:
            overrides = {"l1_voices": 0, "store_factory": _uncached_store}
            run_deadline = deadline
        progress = Progress(f"hot_voices ({mode.replace('_', ' ')})", len(sequence))
        work = Workload()
        async with ctx.aserver(**overrides) as server:
            store = server.services.store
            position = 0

            def take(run_deadline: float = run_deadline) -> tuple[int, bytes] | None:
                nonlocal position
                if position >= len(sequence) or time.perf_counter() > run_deadline:
                    return None
                voice = sequence[position]
                position += 1
                return voice, clips[voice]

            work.started = time.perf_counter()
            await _adrive(server, sizes.clients, take, work, progress)
            wall = time.perf_counter() - work.started
            encoder_calls = store.encoder_calls
        progress.close()
        done = len(work.seconds) + len(work.errors)
        distinct = len(set(sequence[:position]))
        by_source = Counter(work.source)
        latency = percentiles_ms(work.seconds)
        runs[mode] = {
            "registrations": done,
            "planned": len(sequence),
            "truncated": position < len(sequence),
            "distinct_voices": distinct,
            "encoder_calls": encoder_calls,
            "encoder_calls_per_distinct_voice": _round(encoder_calls / max(1, distinct)),
            "encoder_calls_per_registration": _round(encoder_calls / max(1, done), 4),
            "hit_ratio": _round(1 - encoder_calls / max(1, done), 4),
            "by_source": dict(by_source),
            "errors": len(work.errors),
            "latency_ms": latency,
            "hits_latency_ms": percentiles_ms(
                [x for x, src in zip(work.seconds, work.source, strict=True) if src != "encoder"]
            ),
            "server_ms": percentiles_ms([ms / 1000 for ms in work.server_ms]),
            "wall_s": round(wall, 2),
            "registrations_per_s": round(done / wall, 1) if wall else None,
        }
        series[mode] = {"latency_ms": [round(s * 1000, 3) for s in work.seconds]}
    on, off = runs["cache_on"], runs["cache_off"]
    invariant = off["encoder_calls"] == off["registrations"]
    summary = {
        "registrations": on["registrations"],
        "distinct_voices": on["distinct_voices"],
        "clients": sizes.clients,
        "hit_ratio": on["hit_ratio"],
        "cache_on_encoder_calls": on["encoder_calls"],
        "cache_off_encoder_calls": off["encoder_calls"],
        "cache_off_registrations": off["registrations"],
        "encoder_calls_per_distinct_voice": on["encoder_calls_per_distinct_voice"],
        "encoder_call_reduction": ratio(
            off["encoder_calls_per_registration"], on["encoder_calls_per_registration"]
        ),
        "cache_on_p50_ms": on["latency_ms"]["p50"],
        "cache_on_p99_ms": on["latency_ms"]["p99"],
        "cache_on_hits_p99_ms": on["hits_latency_ms"]["p99"],
        "cache_off_p50_ms": off["latency_ms"]["p50"],
        "cache_off_p99_ms": off["latency_ms"]["p99"],
        "p50_ratio": ratio(off["latency_ms"]["p50"], on["latency_ms"]["p50"]),
        "p99_ratio": ratio(off["latency_ms"]["p99"], on["latency_ms"]["p99"]),
        "cache_on_per_s": on["registrations_per_s"],
        "cache_off_per_s": off["registrations_per_s"],
        "throughput_ratio": ratio(on["registrations_per_s"], off["registrations_per_s"]),
        "errors": on["errors"] + off["errors"],
    }
    return {
        "summary": summary,
        "runs": runs,
        "cache_off_encoder_calls_equal_registrations": invariant,
        "series": series,
        "method": (
            f"{sizes.registrations} registrations drawn Zipf(s={sizes.zipf_s}) over "
            f"{sizes.voices} distinct clips (seed 7, the same sequence both runs), "
            f"{sizes.clients} concurrent sessions each registering the next clip as soon as the "
            "previous one is ready. Cache on: the server as shipped with Redis (flushed first) "
            "and the default L1. Cache off: the same server without Redis whose store is "
            "replaced by one that runs the encoder on every registration (no L1, no "
            "single-flight); checked: encoder calls == registrations. Hit ratio = registrations "
            "served without an encoder call. Each run is capped in time; a capped run reports "
            "what it completed."
        ),
    }


# === 3. live sessions =========================================================================
SHORT_MESSAGES = (
    "Thanks for the follow!",
    "gg, that was close.",
    "Welcome to the stream, everyone!",
    "Nice shot!",
    "Thank you for the five gifted subs!",
    "Hydrate, chat.",
    "Can you play the next level on hard mode?",
    "Hello from Brazil!",
)
LONG_MESSAGES = (
    "Thanks so much for the raid, everyone! I hope you all had a great stream. "
    "Make yourselves at home, we are just about to start the boss fight.",
    "I have been watching for three years now and this is the best run yet. "
    "Keep it up, and do not forget to take a break after this one. See you tomorrow!",
    "Quick question about your setup. Which microphone are you using these days? "
    "It sounds a lot better than it did last month.",
    "Happy birthday! Here is a little something for the stream. "
    "Everyone in chat, please wish the streamer a happy birthday.",
)


@dataclass
class Utterance:
    id: str
    kind: str
    sent: float
    start_at: float | None = None
    end_at: float | None = None
    sample_rate: int = 22050
    frames: list[tuple[float, int]] = field(default_factory=list)
    """(arrival, samples) of each audio frame, in order."""
    server_ttfa_ms: float | None = None
    duration_ms: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.end_at is not None or self.error is not None


@dataclass
class Listener:
    """One session of a level: a chat bot sending messages and a player consuming the audio."""

    number: int
    utterances: list[Utterance] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def arun(
        self,
        http: aiohttp.ClientSession,
        url: str,
        clip: bytes,
        sizes: LiveSessionsSizes,
        until: float,
        drain_until: float,
        rng: random.Random,
    ) -> None:
        by_id: dict[str, Utterance] = {}
        try:
            async with WsSession.aopen(http, url, f"bench-live-{self.number}") as session:
                await session.aregister(clip, name=f"streamer {self.number}")
                reader = asyncio.create_task(self._aread(session, by_id))
                try:
                    await self._asend(session, by_id, sizes, until, rng)
                    while time.perf_counter() < drain_until and not all(
                        u.finished for u in self.utterances
                    ):
                        if reader.done():
                            break
                        await asyncio.sleep(0.05)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await reader
        except (OSError, ConnectionError, TimeoutError, aiohttp.ClientError, ServerError) as exc:
            self.errors.append(type(exc).__name__)

    async def _asend(
        self,
        session: WsSession,
        by_id: dict[str, Utterance],
        sizes: LiveSessionsSizes,
        until: float,
        rng: random.Random,
    ) -> None:

        def gap() -> float:
            return sizes.interval_s * rng.uniform(0.6, 1.4)

        next_at = time.perf_counter() + rng.uniform(0, sizes.interval_s)  # staggered starts
        count = 0
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            long = rng.random() < sizes.long_share
            text = rng.choice(LONG_MESSAGES if long else SHORT_MESSAGES)
            count += 1
            utterance = Utterance(f"m{count}", "long" if long else "short", time.perf_counter())
            by_id[utterance.id] = utterance
            self.utterances.append(utterance)
            await session.asend(Speak(id=utterance.id, text=text))
            next_at += gap()

    async def _aread(self, session: WsSession, by_id: dict[str, Utterance]) -> None:
        while True:
            try:
                event = await session.anext_event(timeout=None)
            except ConnectionError:
                if not all(u.finished for u in self.utterances):
                    self.errors.append("socket ended")
                return
            now = time.perf_counter()
            utterance = by_id.get(getattr(event, "id", ""))
            if isinstance(event, SpeechAudio) and utterance is not None:
                utterance.frames.append((now, len(event.pcm) // 2))
            elif isinstance(event, SpeechStarted) and utterance is not None:
                utterance.start_at = now
                utterance.sample_rate = event.sample_rate
            elif isinstance(event, SpeechEnded) and event.end is not None and utterance:
                utterance.end_at = now
                utterance.server_ttfa_ms = event.end.ttfa_ms
                utterance.duration_ms = event.end.duration_ms
            elif isinstance(event, SpeechEnded | SpeechFailed):
                code = "cancelled" if isinstance(event, SpeechEnded) else error_code(event.error)
                self.errors.append(code)
                if utterance is not None:
                    utterance.error = code
            elif isinstance(event, Unmatched) and isinstance(event.message, Error):
                self.errors.append(event.message.code)


def play(utterances: list[Utterance], prebuffer_s: float = 0.0) -> dict[str, float]:
    """Simulate one listener's player: messages back to back, each starting ``prebuffer_s``
    after its first frame arrives (or when the previous one ends), consuming at real time.

    An underrun is a frame that has not arrived when the player needs it; the player then waits
    for it (a stall) and goes on from there.
    """
    playing_until = 0.0
    underruns = 0
    stall = 0.0
    worst = 0.0
    for u in utterances:
        if not u.frames:
            continue
        clock = max(u.frames[0][0] + prebuffer_s, playing_until)
        for arrival, samples in u.frames:
            if arrival > clock:
                underruns += 1
                stall += arrival - clock
                worst = max(worst, arrival - clock)
                clock = arrival
            clock += samples / u.sample_rate
        playing_until = clock
    return {"underruns": underruns, "stall_s": stall, "worst_s": worst}


async def arun_live_sessions(
    ctx: BenchContext, sizes: LiveSessionsSizes, deadline: float
) -> dict[str, Any]:
    levels: list[dict[str, Any]] = []
    skipped: list[int] = []
    rng = random.Random(11)
    series: dict[str, Any] = {}
    async with ctx.aserver() as server, aiohttp.ClientSession() as http:
        # Warm-up: one message through Piper so that no level pays the first inference.
        async with WsSession.aopen(http, server.ws_url) as session:
            await session.aregister(ctx.bank.clip("live", 0))
            await session.asend(Speak(id="warm", text=SHORT_MESSAGES[0]))
            while not isinstance(await session.anext_event(), SpeechEnded | SpeechFailed):
                pass
        planned = list(sizes.levels) + list(sizes.beyond)
        for index, level in enumerate(planned):
            extra = index >= len(sizes.levels)
            if extra and not all(lv["ok"] for lv in levels):
                break  # the limit is found: no need to go further
            if time.perf_counter() + sizes.seconds + 2.0 > deadline:
                if not extra:
                    skipped.append(level)
                continue
            progress = Progress(f"live_sessions ({level})", int(sizes.seconds))
            listeners = [Listener(n) for n in range(level)]
            start = time.perf_counter()
            until = start + sizes.seconds
            drain_until = min(until + sizes.drain_s, deadline)
            tasks = [
                asyncio.create_task(
                    listener.arun(
                        http,
                        server.ws_url,
                        ctx.bank.clip("live", listener.number),
                        sizes,
                        until,
                        drain_until,
                        random.Random(rng.random()),
                    )
                )
                for listener in listeners
            ]
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.25)
                progress.set(min(int(sizes.seconds), int(time.perf_counter() - start)))
            await asyncio.gather(*tasks)
            progress.close()
            levels.append(_level_stats(level, listeners))
            series[str(level)] = {
                "ttfa_ms": [
                    round((u.frames[0][0] - u.sent) * 1000, 2)
                    for listener in listeners
                    for u in listener.utterances
                    if u.frames
                ]
            }
    ok_levels = [lv["sessions"] for lv in levels if lv["ok"]]
    first_bad = min((lv["sessions"] for lv in levels if not lv["ok"]), default=None)
    max_ok = max((n for n in ok_levels if first_bad is None or n < first_bad), default=0)
    summary: dict[str, Any] = {
        "max_sessions_without_underrun": max_ok,
        "largest_level_tried": max((lv["sessions"] for lv in levels), default=0),
        "first_level_not_ok": first_bad or 0,
    }
    for lv in levels:
        n = lv["sessions"]
        summary[f"s{n}_ttfa_p50_ms"] = lv["ttfa_ms"]["p50"]
        summary[f"s{n}_ttfa_p99_ms"] = lv["ttfa_ms"]["p99"]
        summary[f"s{n}_rtf_p50"] = lv["rtf"]["p50"]
        summary[f"s{n}_underruns"] = lv["underruns"]
    return {
        "summary": summary,
        "levels": levels,
        "skipped_levels": skipped,
        "series": series,
        "method": (
            f"Levels of {', '.join(map(str, sizes.levels))} concurrent sessions (then "
            f"{', '.join(map(str, sizes.beyond)) or 'none'} while all are ok and the time cap "
            f"allows), each for "
            f"{sizes.seconds:g} s (then up to {sizes.drain_s:g} s to finish what was sent). Every "
            "session registers its own voice, then sends a chat message every "
            f"{sizes.interval_s:g} s ±40 % (first one at a random offset), "
            f"{sizes.long_share:.0%} of them long (2-3 sentences), the rest short; real Piper, "
            "tts_workers at its default. TTFA = client send of speak to the first audio frame "
            "(includes waiting behind the session's earlier messages); server TTFA = audio.end "
            "ttfa_ms (dequeue to first frame). RTF = audio.start→audio.end wall time over the "
            "audio's duration. Each session simulates a player that starts a message at its "
            "first frame (or when the previous one ends) and consumes at real time; an underrun "
            "is a frame not there when needed. A level is ok with no underrun, no error and "
            "every message finished; the answer is the largest level below the first that is not."
        ),
    }


def _level_stats(level: int, listeners: list[Listener]) -> dict[str, Any]:
    ttfa: list[float] = []
    server_ttfa: list[float] = []
    rtf: list[float] = []
    audio_s = 0.0
    sent = finished = 0
    underruns = underruns_200 = sessions_under = 0
    stall = worst = 0.0
    errors = Counter[str]()
    for listener in listeners:
        errors.update(listener.errors)
        for u in listener.utterances:
            sent += 1
            finished += u.end_at is not None
            if u.frames:
                ttfa.append(u.frames[0][0] - u.sent)
            if u.server_ttfa_ms is not None:
                server_ttfa.append(u.server_ttfa_ms / 1000)
            if u.end_at is not None and u.start_at is not None and u.duration_ms:
                rtf.append((u.end_at - u.start_at) / (u.duration_ms / 1000))
                audio_s += u.duration_ms / 1000
        played = play(listener.utterances)
        underruns += int(played["underruns"])
        sessions_under += played["underruns"] > 0
        stall += played["stall_s"]
        worst = max(worst, played["worst_s"])
        underruns_200 += int(play(listener.utterances, prebuffer_s=0.2)["underruns"])
    rtf_sorted = np.asarray(rtf) if rtf else None
    return {
        "sessions": level,
        "messages_sent": sent,
        "messages_finished": finished,
        "unfinished": sent - finished,
        "audio_s": round(audio_s, 1),
        "errors": dict(errors),
        "ttfa_ms": percentiles_ms(ttfa),
        "server_ttfa_ms": percentiles_ms(server_ttfa),
        "rtf": {
            "p50": _round(float(np.percentile(rtf_sorted, 50)), 4)
            if rtf_sorted is not None
            else None,
            "p99": _round(float(np.percentile(rtf_sorted, 99)), 4)
            if rtf_sorted is not None
            else None,
        },
        "underruns": underruns,
        "sessions_with_underrun": sessions_under,
        "stall_ms": round(stall * 1000, 1),
        "worst_late_ms": round(worst * 1000, 1),
        "underruns_with_200ms_prebuffer": underruns_200,
        "ok": underruns == 0 and not errors and sent == finished,
    }


# === 4. outage ================================================================================
async def arun_outage(ctx: BenchContext, sizes: OutageSizes, deadline: float) -> dict[str, Any]:
    clips = ctx.bank.clips("outage", sizes.voices)
    sequence = zipf_sequence(sizes.voices, 1_000_000, sizes.zipf_s, seed=13)
    redis = ctx.redis()
    await ctx.aflush_redis()
    work = Workload()
    events: dict[str, float] = {}
    calls_at: dict[str, int] = {}
    samples: list[tuple[float, str, int, int]] = []
    progress = Progress("outage (seconds)", int(sizes.seconds))
    # l1_voices=0: only voices pinned by live sessions stay in process, so Redis serves the rest
    # and its outage is visible rather than hidden behind a warm L1.
    # Every breaker transition, timed exactly (the sampler below sees only 10 a second): the
    # server's tier is built with a breaker that notes them.
    changes: list[tuple[float, str]] = []

    def noting_tier(url: str, **kwargs: Any) -> RedisTier:
        from live.breaker import CircuitBreaker
        from live.redis_tier import RedisTier

        def on_change(old: Any, new: Any) -> None:
            changes.append((time.perf_counter(), new.value))

        return RedisTier(url, breaker=CircuitBreaker(name="redis", on_change=on_change), **kwargs)

    async with ctx.aserver(redis_url=redis.url, l1_voices=0, tier_factory=noting_tier) as server:
        store = server.services.store
        tier = server.services.tier
        assert tier is not None
        position = 0
        work.started = start = time.perf_counter()
        end = start + sizes.seconds
        initial = tier.breaker.state.value
        changes.clear()
        hard_end = min(end + sizes.recovery_wait_s, deadline)

        checked = 0
        hit_after_restart = False

        def recovered() -> bool:
            """Whether a registration started after the restart came from Redis (so far)."""
            nonlocal checked, hit_after_restart
            restart = events.get("restart")
            if restart is None or hit_after_restart:
                return hit_after_restart
            while checked < len(work.source):
                if work.source[checked] == "redis" and work.t_start[checked] + start >= restart:
                    hit_after_restart = True
                checked += 1
            return hit_after_restart

        def take() -> tuple[int, bytes] | None:
            nonlocal position
            now = time.perf_counter()
            if now > hard_end or (now > end and recovered()):
                return None
            voice = sequence[position % len(sequence)]
            position += 1
            return voice, clips[voice]

        async def stage() -> None:
            await asyncio.sleep(sizes.seconds / 3)
            calls_at["kill"] = store.encoder_calls
            await asyncio.to_thread(redis.kill)
            events["kill"] = time.perf_counter()
            await asyncio.sleep(max(0.0, start + 2 * sizes.seconds / 3 - time.perf_counter()))
            calls_at["restart_begin"] = store.encoder_calls
            events["restart_begin"] = time.perf_counter()
            await asyncio.to_thread(redis.start)
            events["restart"] = time.perf_counter()
            calls_at["restart"] = store.encoder_calls

        async def sample() -> None:
            while True:
                samples.append(
                    (
                        time.perf_counter() - start,
                        tier.breaker.state.value,
                        store.encoder_calls,
                        tier.hits,
                    )
                )
                progress.set(min(int(sizes.seconds), int(time.perf_counter() - start)))
                await asyncio.sleep(0.1)

        stager = asyncio.create_task(stage())
        sampler = asyncio.create_task(sample())
        try:
            await _adrive(server, sizes.clients, take, work)
            await stager  # a very short run still restarts Redis before it ends
        finally:
            sampler.cancel()
            stager.cancel()
            for task in (sampler, stager):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if not redis.running:
                await asyncio.to_thread(redis.start)
        calls_end = store.encoder_calls
    progress.close()
    transitions = [(0.0, initial)] + [(t - start, state) for t, state in changes]

    kill = events["kill"] - start
    restart = events["restart"] - start
    first_hit = next(
        (
            t_done
            for t0, t_done, s in sorted(zip(work.t_start, work.t_done, work.source, strict=True))
            if s == "redis" and t0 >= restart
        ),
        None,
    )
    # From the start() call: the breaker's probe can close it while start() still waits for
    # Redis to answer PING (a quick run once lost that transition and reported nothing).
    restart_begin = events["restart_begin"] - start
    after_restart = [(t, state) for t, state in transitions if t >= restart_begin]
    closed_again = next((t for t, state in after_restart if state == "closed"), None)
    before = [state for t, state in transitions if t < restart_begin]
    if closed_again is None and (not before or before[-1] == "closed"):
        closed_again = restart_begin  # it was closed when Redis came back: nothing to wait for
    # Re-opened once Redis answered again (start() returns after a PING): a probe that fails
    # while redis-server is still starting is the breaker doing its job, not a flap.
    reopened = sum(1 for t, state in after_restart if state == "open" and t >= restart)
    last_closed = next((t for t, state in reversed(after_restart) if state == "closed"), None)
    if last_closed is None and not after_restart:
        last_closed = closed_again
    first_hit_calls = next(
        (calls for t, _, calls, _ in samples if first_hit is not None and t >= first_hit),
        calls_end,
    )
    phases = {"before": (0.0, kill), "outage": (kill, restart), "after": (restart, None)}
    by_phase: dict[str, Any] = {}
    for name, (lo, hi) in phases.items():
        picked = [i for i, t0 in enumerate(work.t_start) if t0 >= lo and (hi is None or t0 < hi)]
        by_phase[name] = {
            "registrations": len(picked),
            "by_source": dict(Counter(work.source[i] for i in picked)),
            "latency_ms": percentiles_ms([work.seconds[i] for i in picked]),
        }
    summary = {
        "registrations": len(work.seconds) + len(work.errors),
        "client_errors": len(work.errors),
        "killed_at_s": round(kill, 2),
        "restarted_at_s": round(restart, 2),
        "outage_s": round(restart - kill, 2),
        "encoder_calls_before_kill": calls_at["kill"],
        "fallback_encoder_calls": calls_at["restart"] - calls_at["kill"],
        "recovery_encoder_calls": first_hit_calls - calls_at["restart"],
        "breaker_closed_after_s": _round(
            None if closed_again is None else max(0.0, closed_again - restart)
        ),
        "breaker_reopened_after_restart": reopened,
        "breaker_closed_for_good_after_s": _round(
            None if last_closed is None else max(0.0, last_closed - restart)
        ),
        "first_redis_hit_after_s": _round(None if first_hit is None else first_hit - restart),
        "before_p50_ms": by_phase["before"]["latency_ms"]["p50"],
        "outage_p50_ms": by_phase["outage"]["latency_ms"]["p50"],
        "outage_p99_ms": by_phase["outage"]["latency_ms"]["p99"],
        "after_p50_ms": by_phase["after"]["latency_ms"]["p50"],
        "after_p99_ms": by_phase["after"]["latency_ms"]["p99"],
        "max_latency_ms": round(max(work.seconds, default=0.0) * 1000, 1),
        "registrations_over_1s": sum(1 for x in work.seconds if x > 1.0),
    }
    return {
        "summary": summary,
        "phases": by_phase,
        "errors": [{"t": round(t, 3), "code": code} for t, code in work.errors],
        "breaker_transitions": [{"t": round(t, 3), "state": st} for t, st in transitions],
        "series": {
            "t_done": [round(t, 3) for t in work.t_done],
            "latency_ms": [round(s * 1000, 3) for s in work.seconds],
            "source": work.source,
            "samples": [
                {"t": round(t, 2), "breaker": state, "encoder_calls": calls, "redis_hits": hits}
                for t, state, calls, hits in samples
            ],
        },
        "method": (
            f"The hot-voice workload (Zipf s={sizes.zipf_s} over {sizes.voices} clips, "
            f"{sizes.clients} sessions registering back to back) against a server with Redis and "
            f"l1_voices=0 for {sizes.seconds:g} s. Redis (no persistence) is SIGKILLed at 1/3 and "
            "started again, empty, on the same port at 2/3; the run goes on after the end until "
            f"the first Redis hit after the restart (at most {sizes.recovery_wait_s:g} s more). "
            "Client errors = error frames and failed sockets seen by the clients. Fallback "
            "encoder calls = those between the kill and the restart; recovery encoder calls = "
            "from the restart to the first Redis hit (the restarted Redis is empty, so hot "
            "voices are embedded once more and written back)."
        ),
    }


# === 5. memory ================================================================================
async def arun_memory(ctx: BenchContext, sizes: MemorySizes, deadline: float) -> dict[str, Any]:
    import redis.asyncio

    from live.redis_tier import encode_value, key

    assert ctx.encoder is not None
    encoder_id, dim = ctx.encoder.encoder_id, ctx.encoder.dim
    synthetic = SyntheticVoices(encoder_id, dim)
    embedding, fingerprint = synthetic.embedding, synthetic.fingerprint

    progress = Progress("memory", sizes.redis_keys + sizes.l1_voices)
    # --- Redis: N values in the tier's own codec, with the tier's TTL, at the tier's keys ------
    await ctx.aflush_redis()
    client = redis.asyncio.from_url(ctx.redis().url)
    try:
        before = int((await client.info("memory"))["used_memory"])
        value_bytes = len(encode_value(embedding()))
        ttl = 7 * 24 * 3600
        keys: list[str] = []
        for lo in range(0, sizes.redis_keys, 500):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(lo, min(sizes.redis_keys, lo + 500)):
                    k = key(encoder_id, fingerprint(i))
                    keys.append(k)
                    pipe.set(k, encode_value(embedding()), ex=ttl)
                await pipe.execute()
            progress.set(len(keys))
        after = int((await client.info("memory"))["used_memory"])
        sample = keys[:: max(1, len(keys) // 200)]
        usage = [u for k in sample if (u := await client.memory_usage(k)) is not None]
        await client.flushall()
    finally:
        await client.aclose()
    key_bytes = len(keys[0]) if keys else 0

    # --- L1: N synthetic embeddings put straight into a fresh server process's store --------
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.memprobe",
        str(sizes.l1_voices),
        str(sizes.evicting_puts),
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(), max(30.0, deadline - time.perf_counter())
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {err.decode(errors='replace')[-2000:]}")
    probe = orjson.loads(out.decode().strip().splitlines()[-1])
    entries = int(probe["voices"])
    rss_before, rss_after = int(probe["rss_before"]), int(probe["rss_after"])
    progress.set(sizes.redis_keys + sizes.l1_voices)
    progress.close()
    n_redis = max(1, sizes.redis_keys)
    n_l1 = max(1, entries)
    summary = {
        "redis_keys": sizes.redis_keys,
        "value_bytes": value_bytes,
        "key_bytes": key_bytes,
        "redis_memory_usage_bytes": round(float(np.mean(usage)), 1) if usage else None,
        "redis_used_memory_per_voice_bytes": round((after - before) / n_redis, 1),
        "redis_used_memory_delta_mb": round((after - before) / 2**20, 2),
        "l1_voices": entries,
        "l1_rss_delta_mb": round((rss_after - rss_before) / 2**20, 2),
        "l1_rss_per_voice_bytes": round((rss_after - rss_before) / n_l1, 1),
        "l1_object_bytes_per_voice": int(probe["object_bytes"]),
        "process_rss_mb_with_l1": round(rss_after / 2**20, 1),
        "process_rss_mb_before_l1": round(rss_before / 2**20, 1),
        "l1_put_us": round(float(probe["put_us"]), 2),
        "l1_put_evicting_us": round(float(probe["put_evicting_us"]), 2),
    }
    return {
        "summary": summary,
        "method": (
            f"Redis: {sizes.redis_keys} values written straight to a flushed redis-server with "
            "the tier's own codec (live.redis_tier.encode_value, a 256-dim float32 embedding), "
            "key layout and 7-day TTL; used_memory (INFO memory) before and after, divided by "
            "the count, and MEMORY USAGE averaged over a sample of keys. L1: "
            f"{sizes.l1_voices} synthetic embeddings put into store.l1 of a fresh server process "
            "(python -m bench.memprobe: create_app with the real models, listening on loopback; "
            "L1 capacity raised to fit); its VmRSS (/proc/self/status) after gc, before and "
            "after. Put timings are the L1's own cost per put, filling and then full "
            f"({sizes.evicting_puts} puts that each evict one entry)."
        ),
    }


# === 6. fan-out ===============================================================================
FANOUT_CHANNEL = "fanout"


async def _aspawn(config: dict[str, Any]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fanout_client",
        orjson.dumps(config).decode(),
        cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=2**26,
    )


async def _afanout_level(
    server: LiveServer, sizes: FanoutSizes, listeners: int, clip: str, deadline: float
) -> dict[str, Any]:
    """One level: ``listeners`` listeners in processes of their own, one producer process."""
    texts = [SHORT_MESSAGES[i % len(SHORT_MESSAGES)] for i in range(sizes.messages)]
    timeout = sizes.messages * sizes.interval_s + sizes.drain_s
    common = {"url": server.ws_url, "channel": FANOUT_CHANNEL, "timeout_s": timeout}
    groups = [
        (first, min(sizes.per_process, listeners - first))
        for first in range(0, listeners, sizes.per_process)
    ]
    procs = [
        await _aspawn(
            common
            | {
                "role": "listen",
                "listeners": k,
                "first": first,
                "rates": list(sizes.rates),
                "messages": sizes.messages,
            }
        )
        for first, k in groups
    ]
    producer = await _aspawn(
        common | {"role": "produce", "clip": clip, "texts": texts, "interval_s": sizes.interval_s}
    )
    everyone = [*procs, producer]
    hub = server.services.channels
    try:
        for proc in everyone:  # every listener joined and the producer's voice ready
            await aline(proc, max(30.0, deadline - time.perf_counter()), "fan-out client")
        calls0 = getattr(hub, "engine_calls", 0)
        cpu0 = time.process_time()
        t0 = time.monotonic() + 0.2
        assert producer.stdin is not None
        producer.stdin.write(orjson.dumps({"t0": t0}) + b"\n")
        await producer.stdin.drain()
        wait = timeout + 30.0
        produced = await aline(producer, wait, "fan-out client")
        heard = [
            h for proc in procs for h in (await aline(proc, wait, "fan-out client"))["listeners"]
        ]
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - t0
        engine_calls = getattr(hub, "engine_calls", 0) - calls0
    finally:
        for proc in everyone:
            with contextlib.suppress(ProcessLookupError):
                if proc.returncode is None and proc.stdin is not None:
                    proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    due = {f"f{i}": t for i, t in enumerate(produced["due"])}
    ends = produced["ends"]
    audio_s = sum((e.get("duration_ms") or 0.0) for e in ends.values()) / 1000
    spoken = sum(1 for e in ends.values() if "error" not in e and not e.get("cancelled"))
    ttfa: list[float] = []
    per_listener_p50: list[float] = []
    frames_lost = missing = cut_loose = 0
    errors: Counter[str] = Counter()
    samples_by_rate: dict[int, dict[str, set[int]]] = {}
    for listener in heard:
        errors.update(listener["errors"])
        cut_loose += any(
            e.startswith("socket ended") or e == "listener_too_slow" for e in listener["errors"]
        )
        mine: list[float] = []
        for mid in due:
            got = listener["messages"].get(mid)
            if got is None or got[0] is None or got[3] is None or got[3] < 0 or got[5]:
                missing += 1
                continue
            frames_lost += max(0, got[3] - got[1])
            mine.append(got[0] - due[mid])
            samples_by_rate.setdefault(listener["rate"], {}).setdefault(mid, set()).add(got[2])
        ttfa += mine
        if mine:
            per_listener_p50.append(float(np.median(mine)))
    # Same rate, same message: every listener got the same number of samples.
    samples_differ = sum(
        1 for by_id in samples_by_rate.values() for counts in by_id.values() if len(counts) > 1
    )
    return {
        "listeners": listeners,
        "listener_processes": len(procs),
        "messages": sizes.messages,
        "spoken": spoken,
        "producer_errors": sorted(e["error"] for e in ends.values() if "error" in e),
        "engine_calls": engine_calls,
        "audio_s": round(audio_s, 3),
        "server_cpu_s": round(cpu, 3),
        "cpu_per_audio_s": _round(cpu / audio_s if audio_s else None, 4),
        "wall_s": round(wall, 2),
        "ttfa_ms": percentiles_ms(ttfa),
        "listener_p50_spread_ms": _round(
            (max(per_listener_p50) - min(per_listener_p50)) * 1000 if per_listener_p50 else None,
            2,
        ),
        "server_ttfa_ms": percentiles_ms(
            [e["ttfa_ms"] / 1000 for e in ends.values() if e.get("ttfa_ms") is not None]
        ),
        "send_late_ms": percentiles_ms(
            [s - d for s, d in zip(produced["sent"], produced["due"], strict=False)]
        ),
        "frames_lost": frames_lost,
        "messages_missing": missing,
        "samples_differ": samples_differ,
        "cut_loose": cut_loose,
        "errors": dict(errors),
        "samples": {
            str(rate): {mid: sorted(c) for mid, c in by_id.items()}
            for rate, by_id in samples_by_rate.items()
        },
        "ttfa_series_ms": [round(x * 1000, 2) for x in ttfa],
    }


def _slope(xs: list[float], ys: list[float | None]) -> float | None:
    """Least-squares slope of ys over xs (None without two measured points)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    slope = np.polyfit([x for x, _ in pts], [y for _, y in pts], 1)[0]
    return float(slope)


async def arun_fanout(ctx: BenchContext, sizes: FanoutSizes, deadline: float) -> dict[str, Any]:
    import tempfile

    levels: list[dict[str, Any]] = []
    skipped: list[int] = []
    per_level_s = sizes.messages * sizes.interval_s + 5.0
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        clip = Path(tmp) / "producer.wav"
        clip.write_bytes(ctx.bank.clip("fanout", 0))
        async with ctx.aserver() as server, aiohttp.ClientSession() as http:
            # Warm-up, before anything is measured: the producer's voice into the L1 and one
            # message through Piper, so that no level pays the first inference.
            async with WsSession.aopen(http, server.ws_url) as session:
                await session.aregister(clip.read_bytes())
                await session.asend(Speak(id="warm", text=SHORT_MESSAGES[0]))
                while not isinstance(await session.anext_event(), SpeechEnded | SpeechFailed):
                    pass
            progress = Progress("fanout (levels)", len(sizes.levels))
            for n in sizes.levels:
                if time.perf_counter() + per_level_s > deadline:
                    skipped.append(n)
                    continue
                levels.append(await _afanout_level(server, sizes, n, str(clip), deadline))
                progress.advance()
            progress.close()
    xs = [float(lv["listeners"]) for lv in levels]
    cpu_slope = _slope(xs, [lv["cpu_per_audio_s"] for lv in levels])
    ttfa_slope = _slope(xs, [lv["ttfa_ms"]["p50"] for lv in levels])
    ttfa99_slope = _slope(xs, [lv["ttfa_ms"]["p99"] for lv in levels])
    summary: dict[str, Any] = {
        "largest_level": max((lv["listeners"] for lv in levels), default=0),
        "messages_per_level": sizes.messages,
        "engine_calls_minus_messages": sum(lv["engine_calls"] - lv["messages"] for lv in levels),
        "frames_lost": sum(lv["frames_lost"] for lv in levels),
        "cut_loose": sum(lv["cut_loose"] for lv in levels),
        "messages_missing": sum(lv["messages_missing"] for lv in levels),
        "samples_differ": sum(lv["samples_differ"] for lv in levels),
    }
    if cpu_slope is not None:  # two levels or more: the added cost of one more listener
        summary["cpu_per_audio_s_per_extra_listener"] = _round(cpu_slope, 5)
    if ttfa_slope is not None and ttfa99_slope is not None:
        summary["ttfa_p50_ms_per_extra_listener"] = _round(ttfa_slope, 3)
        summary["ttfa_p99_ms_per_extra_listener"] = _round(ttfa99_slope, 3)
    for lv in levels:
        n = lv["listeners"]
        summary[f"l{n}_cpu_per_audio_s"] = lv["cpu_per_audio_s"]
        summary[f"l{n}_ttfa_p50_ms"] = lv["ttfa_ms"]["p50"]
        summary[f"l{n}_ttfa_p99_ms"] = lv["ttfa_ms"]["p99"]
        summary[f"l{n}_engine_calls"] = lv["engine_calls"]
    return {
        "summary": summary,
        "levels": [{k: v for k, v in lv.items() if k != "ttfa_series_ms"} for lv in levels],
        "skipped_levels": skipped,
        "series": {str(lv["listeners"]): {"ttfa_ms": lv["ttfa_series_ms"]} for lv in levels},
        "method": (
            f"One channel, one producer, {', '.join(map(str, sizes.levels))} listeners in turn "
            f"(listening at {', '.join(map(str, sizes.rates))} Hz, dealt in turn). The server "
            "runs in the bench process (its event loop serves nothing else); the listeners "
            f"({sizes.per_process} per process) and the producer are processes of their own "
            "(python -m bench.fanout_client: aiohttp + protocol.ClientProtocol, uvloop). Once "
            "every listener has joined and the producer's voice is ready, the producer sends a "
            f"fixed schedule of {sizes.messages} short chat messages, one due every "
            f"{sizes.interval_s:g} s, and the level ends when every listener has heard every "
            "message's audio.end. Server CPU = time.process_time() of the bench process (the "
            "server, its Piper threads included) over that window, divided by the audio "
            "seconds spoken (the producer's audio.end duration_ms); the slope is the "
            "least-squares fit over the levels. TTFA = a listener's first audio frame of a "
            "message (its own clock, CLOCK_MONOTONIC shared by the processes) minus when the "
            "message was due, for every listener and message; server TTFA = the producer's "
            "audio.end ttfa_ms (synthesis start to first frame). Engine calls = the channel "
            "hub's count over the window (must equal the messages). Frames lost = frames an "
            "audio.end announced that the listener did not get; cut loose = a listener whose "
            "socket ended or that was answered listener_too_slow; samples differ = a message "
            "that two listeners at one rate got a different number of samples of."
        ),
    }


RUNNERS: dict[str, Callable[[BenchContext, Any, float], Awaitable[dict[str, Any]]]] = {
    "lookup": arun_lookup,
    "hot_voices": arun_hot_voices,
    "live_sessions": arun_live_sessions,
    "outage": arun_outage,
    "memory": arun_memory,
    "fanout": arun_fanout,
    "matching": arun_matching,
}

__all__ = ["RUNNERS", "WS_TIMEOUT", "play"]
