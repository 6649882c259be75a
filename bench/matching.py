"""The ``matching`` scenario: Piper with and without voice matching, side by side per reference.

For each reference clip: the speaker encoder's cosine between the output and the reference,
PocketSphinx's word recall of the output, the PSOLA's CPU per audio second, and the engine's
time to its first chunk, each with and without matching. The figures judge matching; they
never feed back into it (its parameters come from the clip's acoustics alone).
"""

from __future__ import annotations

import asyncio
import glob
import re
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .harness import BenchContext, MatchingSizes

LINE = (
    "Thanks for the follow, welcome to the stream. The next game starts in five minutes, so grab "
    "a snack and get comfy."
)
"""The line of issue 14, where the figures before matching were measured."""
HUMAN = "human (alsa-utils)"
IDENTITY = "Piper joe (identity)"
PSOLA = "plain_psola_cpu_per_audio_s"
ALSA_SOUNDS = "/usr/share/sounds/alsa"
"""Debian alsa-utils' channel announcements: one human speaker, eight short recordings."""


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def human_reference() -> tuple[np.ndarray, int]:
    """The alsa-utils recordings (not ``Noise.wav``), 0.2 s apart: ~13 s of one speaker."""
    import soundfile as sf

    parts: list[np.ndarray] = []
    rate = 0
    for path in sorted(glob.glob(f"{ALSA_SOUNDS}/*.wav")):
        if "Noise" in path:
            continue
        pcm, rate = sf.read(path, dtype="float32", always_2d=False)
        parts += [pcm, np.zeros(int(0.2 * rate), dtype=np.float32)]
    if not parts:
        raise FileNotFoundError(f"no recordings in {ALSA_SOUNDS} (apt-get install alsa-utils)")
    return np.concatenate(parts), rate


def espeak(text: str, voice: str, pitch: int) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "e.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-p", str(pitch), "-w", str(out), text],
            check=True,
            capture_output=True,
            timeout=30,
        )
        pcm, rate = sf.read(out, dtype="float32", always_2d=False)
    return pcm, int(rate)


class Recognizer:
    """PocketSphinx (its wheel's US English model): the share of the line's words it hears."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder(samprate=16000, logfn="/dev/null")

    def recall(self, pcm16k: np.ndarray, text: str) -> float:
        data = (np.clip(pcm16k, -1, 1) * 32767).astype("<i2").tobytes()
        self._decoder.start_utt()
        self._decoder.process_raw(data, full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        heard = set(re.findall(r"[a-z']+", hyp.hypstr.lower())) if hyp is not None else set()
        words = re.findall(r"[a-z']+", text.lower())
        return sum(w in heard for w in words) / len(words)


async def arun_matching(ctx: BenchContext, sizes: MatchingSizes, deadline: float) -> dict[str, Any]:
    from live import matching

    # Praat in this process: its CPU is counted with the synthesis (the server runs it in
    # worker processes, which this process's CPU time would not include).
    apart, matching.PRAAT_APART = matching.PRAAT_APART, False
    try:
        return await _arun_matching(ctx, sizes, deadline)
    finally:
        matching.PRAAT_APART = apart


async def _arun_matching(
    ctx: BenchContext, sizes: MatchingSizes, deadline: float
) -> dict[str, Any]:
    from live.matching import ChunkMatcher, analyse
    from live.testing.clips import REFERENCE_TEXT, piper_speech, to_16k

    assert ctx.engine is not None and ctx.encoder is not None
    engine, encoder = ctx.engine, ctx.encoder
    recognizer = Recognizer()
    makers = [
        (HUMAN, human_reference),
        ("espeak-ng en-us+f3 -p 70", lambda: espeak(REFERENCE_TEXT, "en-us+f3", 70)),
        ("espeak-ng en-us+m7 -p 25", lambda: espeak(REFERENCE_TEXT, "en-us+m7", 25)),
        (IDENTITY, lambda: piper_speech(REFERENCE_TEXT)),
    ]
    chosen = (
        makers
        if sizes.references >= len(makers)
        else [*makers[: max(sizes.references - 1, 1)], makers[-1]]
    )
    references = {name: make() for name, make in chosen}

    async def speak(profile: Any) -> tuple[np.ndarray, float, float]:
        started, cpu = time.perf_counter(), _cpu_s()
        chunks: list[np.ndarray] = []
        ttfa = 0.0
        async for chunk in engine.stream(LINE, None, profile=profile):  # type: ignore[arg-type]
            if not chunks:
                ttfa = time.perf_counter() - started
            chunks.append(chunk)
        return np.concatenate(chunks), ttfa, _cpu_s() - cpu

    rows: dict[str, Any] = {}
    for name, (pcm, rate) in references.items():
        if time.perf_counter() > deadline:
            rows[name] = {"skipped": "time"}
            continue
        ref16 = to_16k(pcm, rate)
        ref_vec = await asyncio.to_thread(encoder.embed, ref16)
        profile = await asyncio.to_thread(analyse, ref16)
        match = engine.match(profile) if profile is not None else None
        figures: dict[str, dict[str, list[float]]] = {"plain": {}, "matched": {}}
        for _ in range(sizes.repeats):
            for label, given in (("plain", None), ("matched", profile)):
                audio, ttfa, cpu = await speak(given)
                audio16 = to_16k(audio, engine.sample_rate)
                vec = await asyncio.to_thread(encoder.embed, audio16)
                f = figures[label]
                f.setdefault("cosine", []).append(float(np.dot(vec, ref_vec)))
                f.setdefault("recall", []).append(recognizer.recall(audio16, LINE))
                f.setdefault("ttfa_ms", []).append(ttfa * 1000)
                f.setdefault("cpu_per_audio_s", []).append(cpu / (audio.size / engine.sample_rate))
                if label == "plain" and match is not None and match.reshapes:
                    matcher = ChunkMatcher(match, engine.sample_rate)
                    t0 = time.thread_time()
                    matcher.feed(audio)
                    matcher.flush()
                    psola = time.thread_time() - t0
                    f.setdefault("psola_cpu_per_audio_s", []).append(
                        psola / (audio.size / engine.sample_rate)
                    )
        rows[name] = {
            "profile": None if profile is None else profile.__repr__(),
            "matched": None if match is None else match.to_wire(),
            **{
                f"{label}_{what}": round(float(np.mean(values)), 4)
                for label, f in figures.items()
                for what, values in f.items()
            },
        }
    done = {k: r for k, r in rows.items() if "plain_cosine" in r}
    human = done.get(HUMAN, {})
    identity = done.get(IDENTITY, {})
    psola_costs: list[float] = [
        float(r["plain_psola_cpu_per_audio_s"])
        for r in done.values()
        if "plain_psola_cpu_per_audio_s" in r
    ]
    summary = {
        "human_cosine_plain": human.get("plain_cosine"),
        "human_cosine_matched": human.get("matched_cosine"),
        "human_recall_drop": (
            round(human["plain_recall"] - human["matched_recall"], 4) if human else None
        ),
        "identity_cosine_change": (
            round(identity["matched_cosine"] - identity["plain_cosine"], 4) if identity else None
        ),
        "psola_cpu_per_audio_s_max": max(psola_costs) if psola_costs else 0.0,
    }
    return {
        "summary": {k: v for k, v in summary.items() if v is not None},
        "method": (
            f"Piper joe speaks the line {LINE!r} {sizes.repeats} times per reference without "
            "and with matching to that reference (the profile measured from the clip). GE2E "
            "cosine between the output and the reference clip; PocketSphinx word recall of the "
            "output; engine time to first chunk and process CPU per audio second over the "
            "whole synthesis (matched output is longer when the pace is slowed); PSOLA's own "
            "CPU per audio second (the matcher alone, on the unmatched output). Means over the "
            "repeats."
        ),
        "references": rows,
    }
