"""The per-session speech queue: strict FIFO, bounded, with cancellation by id or all at once."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from protocol.errors import DuplicateId, QueueFull

from .voices import ResolvedVoice


@dataclass(slots=True, eq=False)
class SpeakJob:
    id: str
    text: str
    sample_rate: int | None
    voice: asyncio.Future[ResolvedVoice]
    """The voice pinned (or being registered) when the message was accepted."""
    accepted: float = field(default_factory=time.perf_counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by ``cancel``: the speaker stops waiting for the engine's next chunk."""

    @property
    def cancelled(self) -> bool:
        return self.stop.is_set()

    def cancel(self) -> None:
        self.stop.set()


class SpeechQueue:
    """Messages waiting to be spoken, behind the one being spoken now (``current``)."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._waiting: deque[SpeakJob] = deque()
        self._ready = asyncio.Event()
        self.current: SpeakJob | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def ahead_of_next(self) -> int:
        """How many messages a newly accepted one would wait behind."""
        return len(self._waiting) + (1 if self.current is not None else 0)

    def check(self, job_id: str) -> None:
        """Raise the typed error that ``put`` would raise, without putting."""
        if (self.current is not None and self.current.id == job_id) or any(
            j.id == job_id for j in self._waiting
        ):
            raise DuplicateId(f"message id {job_id[:64]!r} is already queued", message_id=job_id)
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(
                f"{len(self._waiting)} messages are already waiting; the limit is "
                f"{self.max_waiting}",
                message_id=job_id,
            )

    def put(self, job: SpeakJob) -> None:
        self.check(job.id)
        self._waiting.append(job)
        self._ready.set()

    async def aget(self) -> SpeakJob:
        """The next message; it becomes ``current`` until ``done`` is called."""
        while not self._waiting:
            self._ready.clear()
            await self._ready.wait()
        self.current = self._waiting.popleft()
        return self.current

    def done(self) -> None:
        self.current = None

    def cancel(self, job_id: str | None) -> list[SpeakJob]:
        """Mark the current message cancelled (if it matches) and drop matching waiting ones.

        Returns the dropped waiting jobs; the current one is stopped by its speaker.
        """
        if self.current is not None and job_id in (None, self.current.id):
            self.current.cancel()
        dropped = [j for j in self._waiting if job_id in (None, j.id)]
        for job in dropped:
            job.cancel()
            self._waiting.remove(job)
        return dropped

    def drain(self) -> list[SpeakJob]:
        """Everything waiting, removed (the session is closing)."""
        jobs = list(self._waiting)
        self._waiting.clear()
        return jobs
