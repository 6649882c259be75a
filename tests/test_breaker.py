"""The circuit breaker, driven synchronously with a fake clock."""

from __future__ import annotations

import logging

import pytest

from live.breaker import BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list[tuple[BreakerState, BreakerState]]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, changes: list[tuple[BreakerState, BreakerState]]) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=3,
        reset_after=1.0,
        clock=clock,
        on_change=lambda old, new: changes.append((old, new)),
    )


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record_failure()


def test_starts_closed_and_allows(breaker: CircuitBreaker) -> None:
    assert breaker.state is CLOSED
    assert all(breaker.allow() for _ in range(100))


def test_opens_after_threshold_consecutive_failures(
    breaker: CircuitBreaker, changes: list[tuple[BreakerState, BreakerState]]
) -> None:
    fail(breaker, 2)
    assert breaker.state is CLOSED
    fail(breaker, 1)
    assert breaker.state is OPEN
    assert not breaker.allow()
    assert changes == [(CLOSED, OPEN)]


def test_a_success_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.record_success()
    fail(breaker, 2)
    assert breaker.state is CLOSED
    fail(breaker, 1)
    assert breaker.state is OPEN


def test_stays_open_until_reset_after(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    for _ in range(9):
        clock.advance(0.1)
        assert not breaker.allow()
    assert breaker.state is OPEN


def test_one_probe_after_reset_after(
    breaker: CircuitBreaker,
    clock: FakeClock,
    changes: list[tuple[BreakerState, BreakerState]],
) -> None:
    fail(breaker, 3)
    clock.advance(1.0)
    assert breaker.allow()  # the probe
    assert breaker.state is HALF_OPEN
    assert not any(breaker.allow() for _ in range(10))  # everyone else, while it is out
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_probe_success_closes(
    breaker: CircuitBreaker,
    clock: FakeClock,
    changes: list[tuple[BreakerState, BreakerState]],
) -> None:
    fail(breaker, 3)
    clock.advance(1.0)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.allow()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # Closed again means the full threshold is needed to reopen.
    fail(breaker, 2)
    assert breaker.state is CLOSED


def test_probe_failure_reopens_for_another_reset_after(
    breaker: CircuitBreaker,
    clock: FakeClock,
    changes: list[tuple[BreakerState, BreakerState]],
) -> None:
    fail(breaker, 3)
    clock.advance(1.5)
    assert breaker.allow()
    breaker.record_failure()  # one failure suffices while half-open
    assert breaker.state is OPEN
    clock.advance(0.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


def test_on_change_once_per_transition(
    breaker: CircuitBreaker,
    clock: FakeClock,
    changes: list[tuple[BreakerState, BreakerState]],
) -> None:
    fail(breaker, 3)
    breaker.record_failure()  # late failures of calls admitted before it opened
    breaker.record_success()  # a late success: only the probe may close it
    assert breaker.state is OPEN
    for _ in range(5):
        breaker.allow()
    clock.advance(1.0)
    breaker.allow()
    breaker.allow()
    breaker.record_success()
    breaker.record_success()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_lost_probe_is_replaced_after_reset_after(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail(breaker, 3)
    clock.advance(1.0)
    assert breaker.allow()  # the probe's task is cancelled and never reports back
    clock.advance(0.5)
    assert not breaker.allow()
    clock.advance(0.5)
    assert breaker.allow()
    assert breaker.state is HALF_OPEN


def test_logs_open_and_close_once(
    breaker: CircuitBreaker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="live.breaker")
    fail(breaker, 3)
    for _ in range(5):  # a long outage: probes keep failing
        breaker.allow()
        clock.advance(1.0)
        assert breaker.allow()
        breaker.record_failure()
    clock.advance(1.0)
    assert breaker.allow()
    breaker.record_success()
    for _ in range(10):
        breaker.allow()
        breaker.record_success()
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [lvl for lvl, _ in levels] == [logging.WARNING, logging.INFO]
    assert "open" in levels[0][1]
    assert "closed" in levels[1][1]


def test_rejects_nonsense_config() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_after=-1)
