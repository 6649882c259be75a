"""A fresh server process for the memory scenario: its RSS before and after N voices in the L1.

The memory scenario runs ``python -m bench.memprobe N EVICTING`` and reads the one JSON line it
prints. A fresh process keeps the figure clean of the bench's own heap (clips, earlier servers,
freed memory that the allocator would hand out again without growing the RSS).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import Any

import orjson
from aiohttp import web

from .harness import SyntheticVoices, bench_limits, rss_bytes


async def aprobe(voices: int, evicting: int) -> dict[str, Any]:
    from live.app import SERVICES, create_app
    from live.settings import Settings
    from live.testing.server import free_port

    # An L1 that holds every voice put here, so the figures are one entry each; full once
    # they are in, so each further put evicts the least recently used entry.
    settings = Settings(port=free_port(), limits=bench_limits(), l1_voices=voices)
    runner = web.AppRunner(create_app(settings), handle_signals=False)
    await runner.setup()  # loads the models, as `livevoice serve` does
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        store = runner.app[SERVICES].store
        encoder_id, dim = store.embedder.encoder_id, store.embedder.dim
        l1 = store.l1
        synthetic = SyntheticVoices(encoder_id, dim)
        embedding, fingerprint = synthetic.embedding, synthetic.fingerprint

        gc.collect()
        await asyncio.sleep(0.2)
        before = rss_bytes()
        put_s = 0.0
        for i in range(voices):
            emb, fp = embedding(), fingerprint(i)
            t0 = time.perf_counter()
            l1.put(fp, emb)
            put_s += time.perf_counter() - t0
        gc.collect()
        after = rss_bytes()
        entries = len(l1)
        evict_s = 0.0
        for i in range(evicting):
            emb, fp = embedding(), fingerprint(voices + i)
            t0 = time.perf_counter()
            l1.put(fp, emb)
            evict_s += time.perf_counter() - t0
        one = embedding()
        # What one entry holds of its own (the encoder id string is shared by all of them).
        object_bytes = sum(
            sys.getsizeof(part)
            for part in (one, one.vector, fingerprint(0), one.duration_s, one.created)
        )
        return {
            "voices": entries,
            "rss_before": before,
            "rss_after": after,
            "put_us": put_s / max(1, voices) * 1e6,
            "put_evicting_us": evict_s / max(1, evicting) * 1e6,
            "object_bytes": object_bytes,
        }
    finally:
        await runner.cleanup()


def main() -> None:
    voices, evicting = int(sys.argv[1]), int(sys.argv[2])
    result = asyncio.run(aprobe(voices, evicting))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
