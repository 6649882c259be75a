"""The load scenario's pure parts: fixed send schedules, a real-time player per session, and
percentiles. No I/O and no clock of their own: times are given in, so tests can drive them.

Why each exists:

- A **fixed schedule** decides when every line is due before the run starts. A client that
  waits for the server before sending its next line sends less when the server is slow and so
  hides the slowness (coordinated omission); here latency is counted from the due time, however
  late the client or the server got to it.
- A **player** per session consumes audio at real time from its first frame, with no prebuffer,
  as an OBS overlay would. Latency percentiles say nothing about gaps in the middle of a line;
  the player counts them: an underrun is a sample needed before it arrived.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

LINES: tuple[str, ...] = (
    "Thanks for the follow!",
    "Welcome to the stream, everyone!",
    "gg, that was close.",
    "Thank you for the five gifted subs, you are amazing!",
    "Can you play the next level on hard mode?",
    "Hello from Brazil! It is three in the morning here and I am still watching.",
    "Nice shot! How did you even see him behind that wall?",
    "Thanks so much for the raid, everyone! Make yourselves at home, we are just about to "
    "start the boss fight.",
    "Quick question about your setup. Which microphone are you using these days? It sounds a "
    "lot better than it did last month.",
    "Hydrate, chat.",
    "I have been watching for three years now and this is the best run yet. Keep it up!",
    "Happy birthday! Here is a little something for the stream.",
)
"""Chat lines of one to three sentences (about 1 to 8 s of audio each), every one ending in
punctuation so both servers cut the same sentences."""


@dataclass(frozen=True, slots=True)
class DueLine:
    """One line a session sends, and when it is due (seconds after the run's start)."""

    due: float
    line: int
    """Index into the corpus (``LINES``)."""


def chat_schedule(
    sessions: int,
    durations: Sequence[float],
    *,
    seconds: float,
    spread_s: float,
    duty: float = 0.25,
    seed: int = 12,
) -> list[list[DueLine]]:
    """Every session's lines: a chat bot that speaks a line, then stays quiet for the rest of
    its cycle (``duty`` 0.25: three times the line's length), for ``seconds``.

    Session ``s`` starts at a seeded offset in ``[0, spread_s)`` (10 s: steady chat; 2 s: a
    raid) with a seeded line of the corpus, and walks the corpus from there. ``durations`` are
    the corpus lines' audio lengths, measured before the run, so that the schedule is fixed
    before any server answers.
    """
    if not 0 < duty <= 1:
        raise ValueError(f"duty must be in (0, 1], not {duty}")
    if not durations or min(durations) <= 0:
        raise ValueError("every line needs a positive duration")
    rng = random.Random(seed)
    out: list[list[DueLine]] = []
    for _ in range(sessions):
        due = rng.uniform(0.0, spread_s) if spread_s > 0 else 0.0
        line = rng.randrange(len(durations))
        lines: list[DueLine] = []
        while due < seconds:
            lines.append(DueLine(round(due, 6), line))
            due += durations[line] / duty
            line = (line + 1) % len(durations)
        out.append(lines)
    return out


def start_offsets(sessions: int, spread_s: float, seed: int = 13) -> list[float]:
    """When each continuously talking session sends its first line: seeded, in
    ``[0, spread_s)``. Its later lines are due when its player runs low (``Player.due_next``)."""
    rng = random.Random(seed)
    return [round(rng.uniform(0.0, spread_s), 6) if spread_s > 0 else 0.0 for _ in range(sessions)]


@dataclass(frozen=True, slots=True)
class Underrun:
    at: float
    """When the player needed the sample."""
    late_s: float
    """How long it waited for it (the audible gap)."""
    line: int
    """The line (in the order fed) whose sample it was."""


@dataclass
class Player:
    """A listener's player with no prebuffer, consuming at real time.

    Feed it lines in the order they are played and each line's frames as (arrival time,
    seconds of audio). ``gapless`` plays every line straight after the previous one, as a
    continuously talking stream should sound: a line's first frame arriving after the previous
    line ran out is an underrun too. Otherwise (chat) a line starts at its first frame, or when
    the previous one ends if that is later: waiting for a line to begin is latency, not an
    underrun. After an underrun the player waits for the sample and goes on from there.
    """

    gapless: bool = False
    underruns: list[Underrun] = field(default_factory=list)
    lines: int = 0
    _clock: float | None = None
    """When the player needs its next sample: the end of what it has been fed so far."""
    _line_started: bool = True

    def line(self) -> None:
        """The next frames belong to a new line."""
        self.lines += 1
        self._line_started = False

    def frame(self, arrival: float, seconds: float) -> None:
        if self.lines == 0:
            raise ValueError("frame() before line()")
        if seconds < 0:
            raise ValueError(f"a frame cannot last {seconds} s")
        first = not self._line_started
        self._line_started = True
        if self._clock is None:
            self._clock = arrival
        elif first and not self.gapless:
            self._clock = max(self._clock, arrival)
        elif arrival > self._clock:
            self.underruns.append(Underrun(self._clock, arrival - self._clock, self.lines - 1))
            self._clock = arrival
        self._clock += seconds

    @property
    def drains_at(self) -> float | None:
        """When the audio fed so far will have been played (None before any)."""
        return self._clock

    def buffered(self, now: float) -> float:
        """Seconds of audio received and not yet played at ``now``."""
        return 0.0 if self._clock is None else max(0.0, self._clock - now)

    def due_next(self, now: float, lead_s: float) -> float:
        """When a continuously talking session sends its next line, the current one having
        fully arrived by ``now``: once less than ``lead_s`` is buffered (``now`` if that is
        already so)."""
        return now if self._clock is None else max(now, self._clock - lead_s)

    @property
    def worst_late_s(self) -> float:
        return max((u.late_s for u in self.underruns), default=0.0)

    @property
    def stall_s(self) -> float:
        return sum(u.late_s for u in self.underruns)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile: a value that was observed, never one interpolated
    below it (a p99 of 20 samples is their maximum). None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p90, p99 and max of durations given in seconds, in milliseconds."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "n": len(seconds),
        "p50": ms(percentile(seconds, 50)),
        "p90": ms(percentile(seconds, 90)),
        "p99": ms(percentile(seconds, 99)),
        "max": ms(max(seconds, default=None)),
    }
