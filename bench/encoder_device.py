"""The GE2E encoder on an accelerator: parity with the CPU and batched timing.

Run in two steps, because the machine with the GPU has no speech synthesizers:

    python -m bench.encoder_device make OUT_DIR     # here: clips + CPU embeddings (npz)
    python -m bench.encoder_device check OUT_DIR    # there: CUDA vs CPU, timings (JSON)

``check`` needs torch, librosa, webrtcvad and the resemblyzer wheel (for its weights) only.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np


def make(out: Path) -> None:
    import soxr

    from live.encoder import SpeakerEncoder
    from live.testing.clips import espeak_speech, reference_clip

    clips: dict[str, np.ndarray] = {}
    for kind in ("piper", "espeak"):
        pcm, sr = reference_clip(kind)  # type: ignore[arg-type]
        clips[kind] = soxr.resample(np.asarray(pcm, np.float32), sr, 16000).astype(np.float32)
    pcm, sr = espeak_speech("A different sentence, a little longer than the others.", "en-us+m3")
    clips["espeak_m3"] = soxr.resample(np.asarray(pcm, np.float32), sr, 16000).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "clips.npz", **clips)
    encoder = SpeakerEncoder.load(device="cpu")
    np.savez(out / "ref_cpu.npz", **{k: encoder.embed(v) for k, v in clips.items()})


def check(out: Path, device: str = "cuda") -> dict[str, object]:
    import torch

    from live.encoder import EncoderWorker, SpeakerEncoder

    clips, ref = np.load(out / "clips.npz"), np.load(out / "ref_cpu.npz")
    names = list(clips.files)
    cpu, dev = SpeakerEncoder.load(device="cpu"), SpeakerEncoder.load(device=device)
    result: dict[str, object] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "encoder_id_same": cpu.encoder_id == dev.encoder_id,
        "cosine_vs_cpu": {n: float(cpu.embed(clips[n]) @ dev.embed(clips[n])) for n in names},
        "cosine_vs_reference_machine": {n: float(dev.embed(clips[n]) @ ref[n]) for n in names},
    }

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    timing: dict[str, float] = {}
    for label, encoder in (("cpu", cpu), (device, dev)):
        for n in (1, 8, 32, 64):
            batch = [clips[names[i % len(names)]] for i in range(n)]
            encoder.embed_batch(batch)
            sync()
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                encoder.embed_batch(batch)
                sync()
                runs.append(time.perf_counter() - start)
            timing[f"{label}_batch{n}_ms"] = round(1000 * sorted(runs)[2], 2)
    result["median_of_5_ms"] = timing

    async def worker() -> float:
        w = EncoderWorker(dev, max_batch=8)
        w.start()
        start = time.perf_counter()
        await asyncio.gather(*(w.aembed(clips[names[i % len(names)]]) for i in range(64)))
        elapsed = time.perf_counter() - start
        await w.aclose()
        return elapsed

    result["worker_64_concurrent_ms"] = round(1000 * asyncio.run(worker()), 1)
    return result


if __name__ == "__main__":
    verb, folder = sys.argv[1], Path(sys.argv[2])
    if verb == "make":
        make(folder)
    else:
        print(json.dumps(check(folder, *sys.argv[3:]), indent=1))
