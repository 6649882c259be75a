"""A speech engine whose timing the test controls. Only for tests about timing and ordering;
everything about the audio itself is tested with the real Piper engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import numpy as np

from live.scheduler import heard_until
from live.voices import Embedding


class GatedEngine:
    """Yields one 0.5 s tone per sentence (split on '.'); each sentence waits for ``gate``."""

    name = "gated"
    sample_rate = 22050

    def __init__(self, *, auto: bool = False, delay_s: float = 0.0) -> None:
        self.gate = asyncio.Semaphore(0)
        self.auto = auto
        self.delay_s = delay_s
        self.produced = 0
        self.started: list[str] = []
        self.heard_until: list[tuple[float, float | None]] = []
        """Per stream: when it started and the listener's ``heard_until`` it saw then."""

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    async def stream(self, text: str, voice: Embedding) -> AsyncGenerator[np.ndarray, None]:
        self.started.append(text)
        self.heard_until.append((time.monotonic(), heard_until.get()))
        for _sentence in [s for s in text.split(".") if s.strip()]:
            if not self.auto:
                await self.gate.acquire()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            self.produced += 1
            t = np.arange(self.sample_rate // 2) / self.sample_rate
            yield (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)

    async def aclose(self) -> None:
        pass
