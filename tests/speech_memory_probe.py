"""Run the real PiperEngine over chat messages in a process of its own and report its memory.

``python -m tests.speech_memory_probe CASE [CASE ...]`` speaks each case (see ``CASES``) through
``clean_text`` and ``PiperEngine.stream`` as a session would, and prints one JSON line: per case
the seconds of audio, chunk count, CPU seconds and VmRSS after; overall the VmRSS once the model
is loaded and warm, and the VmHWM (peak). A subprocess, so the figures are this work's alone.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time

import numpy as np
import orjson

from live.speech import PiperEngine
from live.text import clean_text
from live.voices import Embedding

CASES = {
    # The message from issue 9: 200 characters.
    "emoji40": "😀🎉🔥👍🏽🧑\u200d🚀" * 40,
    # The message, ten times longer: 2,000 characters of emoji, skin tones and ZWJ.
    "emoji": "😀🎉🔥👍🏽🧑\u200d🚀" * 400,
    # Speakable but hostile: digits and symbols that espeak expands into long phoneme runs
    # (~1,400 phonemes per 200-character segment). The test speaks 400 characters of it; the
    # figures in the closing note are for all 2,000.
    "digits": ("1234567890 $%&@# 98765432109876543210 +=*/ " * 10)[:400],
    "digits2000": ("1234567890 $%&@# 98765432109876543210 +=*/ " * 50)[:2000],
    # One 600-character "word": no space for segments() to cut at, hundreds of phonemes.
    "one_word": "9" * 600,
    "sentence": "Thanks for the follow, and welcome to the stream everyone!",
}
_VOICE = Embedding(
    vector=np.zeros(256, dtype=np.float32), encoder_id="probe", duration_s=5.0, created=0.0
)


def status(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def speak(engine: PiperEngine, text: str) -> tuple[float, int, float]:
    """Seconds of audio, chunks, and seconds in the longest chunk."""
    samples = chunks = longest = 0
    async for chunk in engine.stream(text, _VOICE):
        samples += len(chunk)
        chunks += 1
        longest = max(longest, len(chunk))
    return samples / engine.sample_rate, chunks, longest / engine.sample_rate


async def main(names: list[str]) -> dict[str, object]:
    engine = PiperEngine(workers=1)
    try:
        await speak(engine, CASES["sentence"])  # warm: the model's own arena and caches
        report: dict[str, object] = {"rss_warm_kib": status("VmRSS")}
        for name in names:
            text = clean_text(CASES[name])
            start_cpu, start_wall = cpu_s(), time.perf_counter()
            audio_s, chunks, longest_s = await speak(engine, text)
            report[name] = {
                "chars_in": len(CASES[name]),
                "chars_spoken": len(text),
                "audio_s": round(audio_s, 2),
                "chunks": chunks,
                "longest_chunk_s": round(longest_s, 2),
                "cpu_s": round(cpu_s() - start_cpu, 3),
                "wall_s": round(time.perf_counter() - start_wall, 3),
                "rss_after_kib": status("VmRSS"),
            }
        report["hwm_kib"] = status("VmHWM")
        report["rss_end_kib"] = status("VmRSS")
        return report
    finally:
        await engine.aclose()


if __name__ == "__main__":
    print(orjson.dumps(asyncio.run(main(sys.argv[1:]))).decode())
