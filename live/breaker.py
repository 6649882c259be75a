"""A circuit breaker for calls to a shared dependency (Redis), with no I/O of its own.

While the dependency fails, callers skip it instead of each paying a timeout. After
``reset_after`` seconds one caller is let through as a probe; its outcome closes the
breaker or opens it for another ``reset_after``.

Not thread-safe: it lives on one event loop, like the client it guards.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker"]

logger = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    """Calls go through; consecutive failures are counted."""
    OPEN = "open"
    """Calls are skipped until ``reset_after`` has passed."""
    HALF_OPEN = "half_open"
    """One probe call is in flight; everyone else is still skipped."""


class CircuitBreaker:
    """Counts consecutive failures and decides whether the next call may go through.

    The caller asks :meth:`allow` before each call and reports the outcome with
    :meth:`record_success` or :meth:`record_failure`.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_after: float = 1.0,
        name: str = "breaker",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_after < 0:
            raise ValueError("reset_after must not be negative")
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self.name = name
        self.on_change = on_change
        """Called with ``(old, new)`` on every transition, e.g. to update a gauge."""
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._since = 0.0  # when it opened, or when the probe was let through

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether the caller may make the call now; True admits at most one probe."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if now - self._since < self.reset_after:
            return False
        # OPEN long enough: this caller is the probe. A HALF_OPEN probe that never
        # reported back (its task was cancelled) is replaced after the same delay,
        # so the breaker cannot stay stuck half-open.
        self._since = now
        self._transition(BreakerState.HALF_OPEN)
        return True

    def record_success(self) -> None:
        if self._state is BreakerState.OPEN:
            # A call admitted before the breaker opened; only the probe may close it.
            return
        self._failures = 0
        self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        if self._state is BreakerState.OPEN:
            # Late failures of calls admitted before it opened do not extend the wait.
            return
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._since = self._clock()
            self._transition(BreakerState.OPEN)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            logger.warning(
                "%s circuit open after %d consecutive failures; skipping it, probing every %.1fs",
                self.name,
                self._failures,
                self.reset_after,
            )
        elif new is BreakerState.CLOSED:
            logger.info("%s circuit closed: calls go through again", self.name)
        else:
            # Probes during a long outage: one line a probe is too many for warning.
            logger.debug("%s circuit %s -> %s", self.name, old.value, new.value)
        if self.on_change is not None:
            self.on_change(old, new)
