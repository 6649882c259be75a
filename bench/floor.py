"""The raid's floor: the smallest first-audio wait any scheduler could give every line of a load
bench schedule without an underrun, on a machine that synthesizes ``capacity`` audio seconds
per second.

``python -m bench.floor RESULTS.json [--sessions 64] [--spread 2]`` takes the corpus line
lengths and the capacity (one single-threaded job per core at once) from a load bench run's
``results.json`` and rebuilds that run's chat schedule (``bench.realtime.chat_schedule``).

The model is a perfect fluid scheduler: preemptive, free of overhead, no sentence granularity.
Every line gets the same wait D; its audio up to any point x must be synthesized by its due time
+ D + x. Work for a line cannot start before it is due. That is feasible only if, for every
window [a, T], the audio due in it (of the lines due at a or later) is at most ``capacity`` *
(T - a); the floor is the smallest D for which every window passes (bisection). A real
scheduler does worse: this is a bound, not a prediction.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import orjson

from .harness import LoadSizes
from .realtime import chat_schedule

STEP_S = 0.05
"""The windows' ends are tried on this grid."""


def feasible(lines: Sequence[tuple[float, float]], wait_s: float, capacity: float) -> bool:
    """Whether lines ``(due, seconds)`` can all start ``wait_s`` after they are due and play
    without an underrun on ``capacity`` audio seconds of synthesis per second."""
    starts = sorted({due for due, _ in lines})
    for a in starts:
        later = [(due, seconds) for due, seconds in lines if due >= a]
        end = max(due + wait_s + seconds for due, seconds in later)
        steps = int((end - a) / STEP_S) + 2
        for k in range(steps):
            t = a + k * STEP_S
            needed = sum(min(seconds, max(0.0, t - (due + wait_s))) for due, seconds in later)
            if needed > capacity * (t - a) + 1e-9:
                return False
    return True


def floor_s(
    lines: Sequence[tuple[float, float]], capacity: float, *, within: float = 0.01
) -> float:
    """The smallest wait (to ``within`` seconds) with which :func:`feasible` holds."""
    lo, hi = 0.0, 1.0
    while not feasible(lines, hi, capacity):
        lo, hi = hi, hi * 2
    if feasible(lines, 0.0, capacity):
        return 0.0
    while hi - lo > within:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if feasible(lines, mid, capacity) else (mid, hi)
    return hi


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("results", type=Path, help="a load bench run's results.json")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--spread", type=float, default=2.0, help="first lines within (s)")
    args = parser.parse_args(argv)
    load = orjson.loads(args.results.read_bytes())["scenarios"]["load"]
    sizes = LoadSizes()
    durations = load["limit"]["durations_s"]
    capacity = float(load["limit"]["parallel_streams_measured"])
    seconds = float(load.get("sizes", {}).get("seconds", sizes.seconds))
    duty = float(load.get("sizes", {}).get("duty", sizes.duty))
    schedule = chat_schedule(
        args.sessions, durations, seconds=seconds, spread_s=args.spread, duty=duty
    )
    lines = [(line.due, durations[line.line]) for session in schedule for line in session]
    print(
        f"{args.sessions} sessions, first lines within {args.spread:g} s: {len(lines)} lines, "
        f"{sum(s for _, s in lines):.1f} s of audio; capacity {capacity:g} audio s per s; "
        f"floor {floor_s(lines, capacity):.2f} s"
    )


if __name__ == "__main__":
    main()
