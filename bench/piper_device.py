"""Piper on onnxruntime's CUDA provider against the CPU, on a machine with a GPU.

    python -m bench.piper_device OUT_DIR            # there: timings and parity (JSON + npz)
    python -m bench.piper_device recall OUT_DIR     # here: PocketSphinx word recall of both

The first step needs onnxruntime-gpu in place of onnxruntime. It runs the same corpus lines
through ``PiperEngine`` on each device (``noise=False``: no random noise, so the two must make
the same audio but for floating-point differences), timing a line's first audio and its whole
synthesis, and keeps both devices' audio in ``piper_device.npz``. The second step, on a machine
with PocketSphinx, transcribes both and compares the words with the text: the listening check
that the GPU's audio says what the CPU's does.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .realtime import LINES

CHECKED = LINES[:8]
"""Corpus lines spoken on each device: one to three sentences, 3 to 25 words."""
REPEATS = 5


async def _speak(engine: Any, text: str) -> tuple[np.ndarray, float, float]:
    """The line's audio, and seconds to its first chunk and to its end."""
    start = time.perf_counter()
    first = 0.0
    parts: list[np.ndarray] = []
    async for pcm in engine.stream(text, np.zeros(256, np.float32)):
        if not parts:
            first = time.perf_counter() - start
        parts.append(pcm)
    return np.concatenate(parts), first, time.perf_counter() - start


async def _measure(device: str) -> dict[str, Any]:
    from live.speech import PiperEngine

    engine = await asyncio.to_thread(PiperEngine, workers=2, use_cuda=device == "cuda", noise=False)
    try:
        await _speak(engine, "Warming up the engine.")
        lines: list[dict[str, Any]] = []
        audio: list[np.ndarray] = []
        for text in CHECKED:
            runs = [await _speak(engine, text) for _ in range(REPEATS)]
            pcm = runs[0][0]
            audio.append(pcm)
            lines.append(
                {
                    "text": text,
                    "audio_s": round(len(pcm) / engine.sample_rate, 3),
                    "first_ms": round(1000 * statistics.median(r[1] for r in runs), 1),
                    "total_ms": round(1000 * statistics.median(r[2] for r in runs), 1),
                }
            )
        return {"rate": engine.sample_rate, "lines": lines, "pcm": audio}
    finally:
        await engine.aclose()


def check(out: Path) -> dict[str, Any]:
    """Both devices, one after the other; timings, parity, and the audio to ``out``."""
    import onnxruntime
    import torch

    cpu = asyncio.run(_measure("cpu"))
    gpu = asyncio.run(_measure("cuda"))
    parity = []
    for a, b in zip(cpu["pcm"], gpu["pcm"], strict=True):
        n = min(len(a), len(b))
        noise = float(np.sum((a[:n] - b[:n]) ** 2))
        parity.append(
            {
                "samples_cpu_gpu": [len(a), len(b)],
                "snr_db": round(10 * np.log10(float(np.sum(a[:n] ** 2)) / noise), 1)
                if noise
                else None,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / "piper_device.npz",
        **{f"cpu_{i}": p for i, p in enumerate(cpu["pcm"])},
        **{f"cuda_{i}": p for i, p in enumerate(gpu["pcm"])},
    )
    return {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "rate": cpu["rate"],
        "lines": [
            {"text": c["text"], "audio_s": c["audio_s"], "cpu": c, "cuda": g, **p}
            for c, g, p in zip(cpu["lines"], gpu["lines"], parity, strict=True)
        ],
    }


def recall(out: Path) -> dict[str, Any]:
    """PocketSphinx's word recall (``bench.matching.Recognizer``) on each device's audio of
    each line."""
    import soxr

    from .matching import Recognizer

    recognizer = Recognizer()
    data = np.load(out / "piper_device.npz")
    rate = json.loads((out / "piper_device.json").read_text())["rate"]

    def heard(name: str, text: str) -> float:
        return round(recognizer.recall(soxr.resample(data[name], rate, 16000), text), 3)

    rows = [
        {"text": text, "cpu": heard(f"cpu_{i}", text), "cuda": heard(f"cuda_{i}", text)}
        for i, text in enumerate(CHECKED)
    ]
    return {"lines": rows}


if __name__ == "__main__":
    if sys.argv[1] == "recall":
        print(json.dumps(recall(Path(sys.argv[2])), indent=1))
    else:
        folder = Path(sys.argv[1])
        result = check(folder)
        (folder / "piper_device.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
