"""Marks, captions and loudness: ``python -m bench.presentation [--quick] [--docs]``.

What the audience-facing features cost and do, each side by side with its "off" in one run:

1. **Marks' cost in the engine.** One real ``PiperEngine`` (``workers=1``), the same six chat
   lines (short and long), each spoken marks off (``speak_in``) and marks on
   (``speak_marked_in`` plus what the server adds per chunk: the mouth envelope, the marks
   rescaled to 48 kHz and put in their wire form, as ``live.speaker`` does), alternating and
   swapping which goes first every repeat. Process CPU (``time.process_time``: the event loop
   and the model's worker thread) per second of audio, and time to the first chunk.
2. **Over the socket.** A real ``livevoice serve`` subprocess (``--data-dir none``); one client
   in this process registers a clip and speaks the same lines at 48 kHz with and without
   ``marks: true``, alternating: TTFA from the send to the first audio frame.
3. **Loudness spread.** espeak-ng, Piper joe as it comes out of the model (not
   peak-normalised: how the server runs it under a loudness target) and a copy 12 dB down:
   integrated loudness (pyloudnorm, BS.1770-4) and true peak (4x oversampled) of a message in
   each, raw and through ``LoudnessEngine`` (target -16 LUFS, ceiling -1 dBTP), 16-bit. A copy
   26 dB down is reported beside them: it needs more than the engine's gain cap.

The caption-to-audio offset is measured in Chromium by ``tests/test_captions_browser.py``,
which prints it; this bench does not run a browser (see the docs section).

``--docs`` rewrites this bench's own marked section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pyloudnorm
from scipy.signal import resample_poly

from live.loudness import MAX_GAIN_DB, LoudnessEngine
from live.marks import Marks, MouthEnvelope
from live.speech import PiperEngine, speak_in, speak_marked_in
from live.testing.clips import espeak_speech, reference_wav
from live.testing.redis_server import free_port
from live.text import segments
from live.values import Embedding, Fingerprint, ResolvedVoice, VoiceProfile, VoiceSource
from protocol.client import HeardMarks, SpeechAudio, SpeechEnded, SpeechFailed
from protocol.messages import Speak

from .harness import UNTHROTTLED, WsSession, child_env
from .standalone import run_standalone

BEGIN, END = "<!-- bench:presentation -->", "<!-- /bench:presentation -->"
RATE = 48000
"""The listener's rate: marks are rescaled to it (the OBS overlay's rate)."""
LINES = [
    "GG!",
    "Thanks for the follow, Ann!",
    "Welcome in, friend, grab a seat.",
    "Nice shot, that was a clean round and the crowd loved it.",
    "Hydrate check: everyone drink some water, stretch, and come back for the next game.",
    "This one is a long message from chat, going on about the last match, the map, the "
    "weapons everybody picked, and what the team should try in the next round tonight.",
]
"""Chat lines, short and long: one word to three sentences."""
MESSAGE = (
    "Hey chat, how is everybody doing today? I hope you are all having a great time. "
    "Thanks for the raid, and welcome to everyone who just came in!"
)
"""What loudness is measured on: not the engine's reference text, which its gain is set on."""
LEVELS_DB = (0.0, -12.0, -26.0)
"""Piper joe as is and two quieter copies; the last needs more than ``MAX_GAIN_DB``."""
TARGET_LUFS, CEILING_DBTP = -16.0, -1.0


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def voice() -> ResolvedVoice:
    """Piper ignores the embedding; no profile: its own voice, no matching."""
    vector = np.ones(256, dtype=np.float32) / 16.0
    embedding = Embedding(vector, "bench", 5.0, 0.0)
    return ResolvedVoice(Fingerprint("bench"), embedding, VoiceSource.L1, 0.0)


# --- 1. marks' cost in the engine -----------------------------------------------------------------
async def aspeak_plain(
    engine: PiperEngine, text: str, as_voice: ResolvedVoice
) -> tuple[float, int]:
    """Seconds to the first chunk, samples in all."""
    began = time.perf_counter()
    first: float | None = None
    samples = 0
    async with contextlib.aclosing(speak_in(engine, text, as_voice)) as chunks:
        async for chunk in chunks:
            first = time.perf_counter() - began if first is None else first
            samples += len(chunk)
    return first or 0.0, samples


async def aspeak_marked(
    engine: PiperEngine, text: str, as_voice: ResolvedVoice
) -> tuple[float, int]:
    """As ``live.speaker._pcm_of`` does: marks, mouth, rescaled to 48 kHz, wire form."""
    began = time.perf_counter()
    first: float | None = None
    samples = 0
    marked, kinds = speak_marked_in(engine, text, as_voice)
    mouth = MouthEnvelope(engine.sample_rate)
    wire: list[dict[str, Any]] = []
    async with contextlib.aclosing(marked) as chunks:
        async for chunk in chunks:
            marks = Marks(engine.sample_rate, chunk.words, chunk.visemes, mouth.feed(chunk.pcm))
            if marks:
                wire.append(marks.rescaled(RATE).to_wire(kinds))
            first = time.perf_counter() - began if first is None else first
            samples += len(chunk.pcm)
    tail = Marks(engine.sample_rate, mouth=mouth.feed(np.zeros(0, np.float32), last=True))
    if tail:
        wire.append(tail.rescaled(RATE).to_wire(kinds))
    assert any("words" in w for w in wire) or not text.strip(), "no word marks"
    return first or 0.0, samples


async def amarks_cost(repeats: int) -> dict[str, Any]:
    engine = PiperEngine(workers=1)
    as_voice = voice()
    try:
        assert engine.aligned, "Piper loaded without its alignment output (is onnx installed?)"
        for text in LINES[:2]:  # warm the arena and espeak for both paths
            await aspeak_plain(engine, text, as_voice)
            await aspeak_marked(engine, text, as_voice)
        modes = {"off": aspeak_plain, "on": aspeak_marked}
        cpu = {"off": 0.0, "on": 0.0}
        samples = {"off": 0, "on": 0}
        ttfa: dict[str, list[float]] = {"off": [], "on": []}
        diff: list[float] = []
        for rep in range(repeats):
            for text in LINES:
                order = ("off", "on") if rep % 2 == 0 else ("on", "off")
                first: dict[str, float] = {}
                for mode in order:
                    c0 = time.process_time()
                    first[mode], n = await modes[mode](engine, text, as_voice)
                    cpu[mode] += time.process_time() - c0
                    samples[mode] += n
                    ttfa[mode].append(first[mode] * 1000)
                diff.append((first["on"] - first["off"]) * 1000)
        audio_s = {m: samples[m] / engine.sample_rate for m in modes}
        per_s = {m: cpu[m] / audio_s[m] for m in modes}
        return {
            "repeats": repeats,
            "lines": len(LINES),
            "runs": repeats * len(LINES),
            "audio_s": {m: round(audio_s[m], 1) for m in modes},
            "cpu_s": {m: round(cpu[m], 2) for m in modes},
            "cpu_per_audio_s": {m: round(per_s[m], 4) for m in modes},
            "added_cpu_per_audio_s": round(per_s["on"] - per_s["off"], 4),
            "ttfa_ms": {m: {"p50": pct(ttfa[m], 50), "p99": pct(ttfa[m], 99)} for m in modes},
            "ttfa_diff_ms": {"p50": pct(diff, 50), "p99": pct(diff, 99)},
        }
    finally:
        await engine.aclose()


# --- 2. over the socket ---------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def aserved(logs: Path, timeout_s: float = 300) -> AsyncIterator[str]:
    """A real ``livevoice serve`` (voices in memory, throttles lifted); its ws URL. Stopped by
    its pid."""
    port = free_port()
    env = child_env()
    env |= {f"LIVEVOICE_{k.upper()}": str(v) for k, v in UNTHROTTLED.items()}
    log_path = logs / f"serve-{port}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "live.cli", "serve", "--host", "127.0.0.1"),
            *("--port", str(port), "--data-dir", "none"),
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        began = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"livevoice serve exited: {log_path.read_text()[-2000:]}")
                if time.monotonic() - began > timeout_s:
                    raise TimeoutError(f"livevoice serve not ready in {timeout_s} s")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as reply:
                        if reply.status == 200:
                            break
                await asyncio.sleep(0.1)
        print(f"livevoice serve ready in {time.monotonic() - began:.1f} s", flush=True)
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
        await proc.wait()


async def aone(session: WsSession, message_id: str, text: str, marks: bool) -> tuple[float, int]:
    """Send one line; ms to its first audio frame, and how many ``audio.marks`` came."""
    sent = time.perf_counter()
    await session.asend(Speak(id=message_id, text=text, sample_rate=RATE, marks=marks or None))
    first: float | None = None
    marked = 0
    while True:
        event = await session.anext_event()
        if isinstance(event, SpeechAudio) and event.id == message_id and first is None:
            first = time.perf_counter() - sent
        elif isinstance(event, HeardMarks) and event.id == message_id:
            marked += 1
        elif isinstance(event, SpeechFailed) and event.id == message_id:
            raise RuntimeError(f"{message_id} failed: {event.error}")
        elif isinstance(event, SpeechEnded) and event.id == message_id:
            if first is None:
                raise RuntimeError(f"{message_id} ended without audio")
            return first * 1000, marked


async def asocket(repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-presentation-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            url = await stack.enter_async_context(aserved(Path(tmp)))
            http = await stack.enter_async_context(aiohttp.ClientSession())
            session = await stack.enter_async_context(
                WsSession.aopen(http, url, "bench-presentation")
            )
            await session.aregister(reference_wav(), name="presentation")
            for n, text in enumerate(LINES[:2]):  # the voice's gain, the model's arena
                await aone(session, f"w{n}", text, False)
                await aone(session, f"wm{n}", text, True)
            ttfa: dict[str, list[float]] = {"off": [], "on": []}
            diff: list[float] = []
            marks_seen = 0
            for rep in range(repeats):
                for n, text in enumerate(LINES):
                    first: dict[str, float] = {}
                    for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                        first[mode], m = await aone(
                            session, f"{mode}-{rep}-{n}", text, mode == "on"
                        )
                        ttfa[mode].append(first[mode])
                        if mode == "on":
                            marks_seen += 1 if m else 0
                    diff.append(first["on"] - first["off"])
    return {
        "runs": repeats * len(LINES),
        "ttfa_ms": {m: {"p50": pct(v, 50), "p99": pct(v, 99)} for m, v in ttfa.items()},
        "ttfa_diff_ms": {"p50": pct(diff, 50), "p99": pct(diff, 99)},
        "marked_messages_with_marks": marks_seen,
    }


# --- 3. loudness spread ---------------------------------------------------------------------------
class LevelledPiper:
    """Piper joe at ``gain_db`` from its own (unnormalised) level: a voice at another level."""

    def __init__(self, inner: PiperEngine, gain_db: float) -> None:
        self.inner = inner
        self.gain = 10.0 ** (gain_db / 20.0)
        self.name = f"piper-joe{gain_db:+.0f}dB"
        self.sample_rate = inner.sample_rate

    async def stream(
        self, text: str, voice: Embedding, *, profile: VoiceProfile | None = None
    ) -> AsyncGenerator[np.ndarray, None]:
        async with contextlib.aclosing(self.inner.stream(text, voice)) as chunks:
            async for chunk in chunks:
                yield (chunk * self.gain).astype(np.float32)

    async def aclose(self) -> None:
        """The inner engine is closed by its owner."""


class EspeakEngine:
    """espeak-ng (formant synthesis, peak near full scale): a louder voice than Piper's raw
    output. A chunk per sentence."""

    name = "espeak-ng en-us+f3"
    sample_rate = 22050

    async def stream(
        self, text: str, voice: Embedding, *, profile: VoiceProfile | None = None
    ) -> AsyncGenerator[np.ndarray, None]:
        for segment in segments(text):
            pcm, rate = await asyncio.to_thread(espeak_speech, segment)
            assert rate == self.sample_rate, rate
            yield np.asarray(pcm, dtype=np.float32)

    async def aclose(self) -> None:
        """Nothing held."""


def sixteen_bit(pcm: np.ndarray) -> np.ndarray:
    """As sent: rounded to 16 bits."""
    out: np.ndarray = np.round(np.clip(pcm, -1.0, 1.0) * 32767.0) / 32767.0
    return out


def measured(pcm: np.ndarray, rate: int) -> dict[str, float]:
    x = sixteen_bit(pcm).astype(np.float64)
    lufs = float(pyloudnorm.Meter(rate).integrated_loudness(x))
    peak = float(np.max(np.abs(resample_poly(x, 4, 1))))
    return {"lufs": round(lufs, 2), "dbtp": round(20 * math.log10(peak), 2)}


async def agather(chunks: AsyncGenerator[np.ndarray, None]) -> np.ndarray:
    async with contextlib.aclosing(chunks) as stream:
        pcm: np.ndarray = np.concatenate([c async for c in stream])
    return pcm


async def aloudness() -> dict[str, Any]:
    piper = PiperEngine(workers=1, peak_normalize=False)
    embedding = voice().embedding
    voices: list[LevelledPiper | EspeakEngine] = [
        EspeakEngine(),
        *(LevelledPiper(piper, level) for level in LEVELS_DB),
    ]
    rows: list[dict[str, Any]] = []
    try:
        for engine in voices:
            levelled = LoudnessEngine(engine, target_lufs=TARGET_LUFS, ceiling_dbtp=CEILING_DBTP)
            raw = await agather(engine.stream(MESSAGE, embedding))
            after = await agather(levelled.stream(MESSAGE, embedding))
            gain = await levelled.again_db(embedding)
            rows.append(
                {
                    "voice": engine.name,
                    "raw": measured(raw, engine.sample_rate),
                    "after": measured(after, engine.sample_rate),
                    "gain_db": gain,
                    "capped": gain >= MAX_GAIN_DB,
                }
            )
    finally:
        await piper.aclose()
    spread_rows = rows[: len(rows) - 1]  # the last one is the beyond-the-cap case

    def spread(when: str) -> float:
        values = [float(r[when]["lufs"]) for r in spread_rows]
        return round(max(values) - min(values), 2)

    return {
        "voices": rows,
        "spread_of": [r["voice"] for r in spread_rows],
        "spread_lu": {"raw": spread("raw"), "after": spread("after")},
        "max_dbtp_after": max(r["after"]["dbtp"] for r in spread_rows),
        "worst_off_target_lu": round(
            max(abs(r["after"]["lufs"] - TARGET_LUFS) for r in spread_rows), 2
        ),
    }


async def arun(quick: bool) -> dict[str, Any]:
    repeats = 2 if quick else 6
    results: dict[str, Any] = {}
    results["marks"] = cost = await amarks_cost(repeats)
    print(
        f"marks' cost ({cost['runs']} runs each): CPU per audio second off "
        f"{cost['cpu_per_audio_s']['off']} on {cost['cpu_per_audio_s']['on']} (added "
        f"{cost['added_cpu_per_audio_s']}); first chunk p50 ms off {cost['ttfa_ms']['off']['p50']} "
        f"on {cost['ttfa_ms']['on']['p50']} (per pair on - off p50 {cost['ttfa_diff_ms']['p50']})",
        flush=True,
    )
    results["socket"] = sock = await asocket(repeats)
    print(
        f"over the socket ({sock['runs']} each): TTFA ms off p50 {sock['ttfa_ms']['off']['p50']} "
        f"p99 {sock['ttfa_ms']['off']['p99']}; on p50 {sock['ttfa_ms']['on']['p50']} p99 "
        f"{sock['ttfa_ms']['on']['p99']}; per pair on - off p50 {sock['ttfa_diff_ms']['p50']} "
        f"p99 {sock['ttfa_diff_ms']['p99']}",
        flush=True,
    )
    results["loudness"] = loud = await aloudness()
    for row in loud["voices"]:
        print(
            f"{row['voice']}: raw {row['raw']['lufs']} LUFS {row['raw']['dbtp']} dBTP -> "
            f"{row['after']['lufs']} LUFS {row['after']['dbtp']} dBTP (gain {row['gain_db']} dB)"
        )
    print(f"loudness spread: raw {loud['spread_lu']['raw']} LU, after {loud['spread_lu']['after']}")
    return results


# --- docs -----------------------------------------------------------------------------------------
CAPTIONS: dict[str, Any] = {
    "command": "pytest -q -p no:cacheprovider -s tests/test_captions_browser.py",
    "when": "2026-11-26",
    "words": 14,
    "offset_p50_ms": 52.2,
    "offset_max_ms": 63.9,
    "output_latency_ms": 42.0,
    "overlay_p50_ms": 58.0,
    "overlay_max_ms": 63.9,
}
"""Printed by the Chromium test (a run beside this bench's; the bench does not start a
browser). Update from its output when the widget changes."""


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    c, s, lo = results["marks"], results["socket"], results["loudness"]
    cap = CAPTIONS
    out = [
        BEGIN,
        "## 10. Marks, captions and loudness",
        "",
        f"From a separate run: `{meta['command']}` on {meta['started']} "
        f"({m.get('cores')} cores, {m.get('cpu')}; load average at start "
        f"{m.get('loadavg_at_start')}, at end {meta['loadavg_at_end']}; took "
        f"{meta['seconds']} s). **The machine is shared** with other sessions' builds and "
        "tests: absolute times move with that load; each off/on pair ran back to back, in "
        "alternating order, under the same load.",
        "",
    ]
    if "--quick" in meta["command"].split():
        out += [
            f"**A `--quick` run**: {c['repeats']} repeats of the {c['lines']} lines; rerun "
            "without `--quick` on a quiet machine for figures to quote.",
            "",
        ]
    out += [
        "**Marks' cost in the engine.** One `PiperEngine` (`workers=1`), six chat lines from "
        "one word to three sentences, each spoken with marks off (`speak_in`) and on "
        "(`speak_marked_in`, the mouth envelope, marks rescaled to 48 kHz in wire form: what "
        "`live.speaker` adds per chunk). CPU is the process's (`time.process_time`: event loop "
        "and model thread). The model's alignment output is computed either way (it is a "
        "tensor the model computes anyway); what marks add is espeak phonemizing each word "
        "alone, sharing out, visemes, the mouth envelope and the wire form.",
        "",
        "| marks | runs | audio s | CPU s | CPU s per audio s | first chunk p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("off", "on"):
        out.append(
            f"| {mode} | {c['runs']} | {c['audio_s'][mode]} | {c['cpu_s'][mode]} | "
            f"{c['cpu_per_audio_s'][mode]} | {c['ttfa_ms'][mode]['p50']} | "
            f"{c['ttfa_ms'][mode]['p99']} |"
        )
    out += [
        "",
        f"Added by marks: {c['added_cpu_per_audio_s']} CPU s per audio s; first chunk, per "
        f"pair (on - off) p50 {c['ttfa_diff_ms']['p50']} ms, p99 {c['ttfa_diff_ms']['p99']} ms.",
        "",
        "**Over the socket.** A real `livevoice serve` subprocess (`--data-dir none`, default "
        "loudness target), one client in the bench process: a registered clip, then the same "
        "lines at 48 kHz without and with `marks: true`, alternating, one at a time. TTFA is "
        "the send to the first audio frame.",
        "",
        "| marks | messages | TTFA p50 ms | TTFA p99 ms |",
        "|---|---|---|---|",
        f"| off | {s['runs']} | {s['ttfa_ms']['off']['p50']} | {s['ttfa_ms']['off']['p99']} |",
        f"| on | {s['runs']} | {s['ttfa_ms']['on']['p50']} | {s['ttfa_ms']['on']['p99']} |",
        f"| on - off, per pair | {s['runs']} | {s['ttfa_diff_ms']['p50']} | "
        f"{s['ttfa_diff_ms']['p99']} |",
        "",
        f"Every marked message came with `audio.marks`: {s['marked_messages_with_marks']} of "
        f"{s['runs']}.",
        "",
        "**Caption to audio in Chromium.** Not run by this bench: "
        f"`{cap['command']}` ({cap['when']}; headless Chromium, real Piper, the widget's "
        "captions page playing a channel and a muted overlay beside it) prints the offsets the "
        "page measures: for each word, the audio clock when the word was lit minus the output "
        "sample its first sample was rendered at. The page lights a word when it is *heard*, "
        f"i.e. waits the output path's latency ({cap['output_latency_ms']} ms in that run) "
        "on purpose; the rest is the wait for the next animation frame.",
        "",
        "| page | words lit | offset p50 ms | max ms | of which output latency ms | late to "
        "what is heard, p50 / max ms |",
        "|---|---|---|---|---|---|",
        f"| captions | {cap['words']} | {cap['offset_p50_ms']} | {cap['offset_max_ms']} | "
        f"{cap['output_latency_ms']} | "
        f"{cap['offset_p50_ms'] - cap['output_latency_ms']:.1f} / "
        f"{cap['offset_max_ms'] - cap['output_latency_ms']:.1f} |",
        f"| overlay (muted) | {cap['words']} | {cap['overlay_p50_ms']} | "
        f"{cap['overlay_max_ms']} | {cap['output_latency_ms']} | "
        f"{cap['overlay_p50_ms'] - cap['output_latency_ms']:.1f} / "
        f"{cap['overlay_max_ms'] - cap['output_latency_ms']:.1f} |",
        "",
        "**Loudness spread.** Three voices at very different levels: espeak-ng (formant "
        "synthesis, near full scale), Piper joe as the model writes it (not peak-normalised: "
        "how the server runs it under a loudness target) and a copy of it 12 dB down; each "
        "speaks one message (not the reference text its gain is measured on), raw and "
        f"through `LoudnessEngine` (target {TARGET_LUFS:g} LUFS, ceiling {CEILING_DBTP:g} "
        "dBTP); rounded to 16 bits at the engine's rate, measured by pyloudnorm (BS.1770-4, "
        "400 ms blocks), the true peak 4x oversampled. Raw and after are two syntheses (Piper "
        "is not deterministic). A fourth row, Piper 26 dB down, is outside the spread: it "
        f"needs more than the engine's gain cap (`MAX_GAIN_DB`, {MAX_GAIN_DB:g} dB).",
        "",
        "| voice | raw LUFS | raw dBTP | gain dB | after LUFS | after dBTP |",
        "|---|---|---|---|---|---|",
    ]
    for r in lo["voices"]:
        capped = " (gain capped)" if r["capped"] else ""
        out.append(
            f"| {r['voice']} | {r['raw']['lufs']} | {r['raw']['dbtp']} | {r['gain_db']}{capped} "
            f"| {r['after']['lufs']} | {r['after']['dbtp']} |"
        )
    out += [
        "",
        f"Spread (max - min) across {', '.join(lo['spread_of'])}: {lo['spread_lu']['raw']} LU "
        f"raw, {lo['spread_lu']['after']} LU after; furthest from the target "
        f"{lo['worst_off_target_lu']} LU; highest true peak after {lo['max_dbtp_after']} dBTP.",
        "",
        END,
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    run_standalone(
        "python -m bench.presentation",
        __doc__,
        "2 repeats instead of 6",
        arun,
        markdown,
        (BEGIN, END),
        argv,
    )


if __name__ == "__main__":
    main()
