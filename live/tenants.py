"""Tenants: bearer tokens (hashed at rest, compared in constant time) and per-tenant limits."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import RateLimited, TooManySessions, Unauthorized

from .settings import Limits

log = logging.getLogger(__name__)

PUBLIC_TENANT = "public"
"""The one tenant of a server with no tokens configured (it binds to loopback only)."""


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token(tenant: str) -> tuple[str, str]:
    """A fresh token and the configuration entry (``tenant=sha256:…``) that accepts it."""
    token = secrets.token_urlsafe(32)
    return token, f"{tenant}={hash_token(token)}"


def parse_entries(text: str, *, source: str) -> dict[str, str]:
    """``tenant=sha256:<hex>`` entries, one per line or comma-separated → {hash: tenant}."""
    entries: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tenant, sep, digest = line.partition("=")
        tenant, digest = tenant.strip(), digest.strip().lower()
        if not sep or not tenant or not digest.startswith("sha256:") or len(digest) != 71:
            # Never echo the line: it might be a plaintext token pasted by mistake.
            raise ValueError(f"{source}: malformed token entry (want tenant=sha256:<64 hex>)")
        int(digest[7:], 16)
        entries[digest] = tenant
    return entries


class TenantDirectory:
    """Maps bearer tokens to tenants. With no tokens configured everyone is ``public``."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = hashes

    @classmethod
    def from_config(cls, tokens: str | None, tokens_file: str | None) -> TenantDirectory:
        hashes: dict[str, str] = {}
        if tokens:
            hashes.update(parse_entries(tokens, source="LIVEVOICE_TOKENS"))
        if tokens_file:
            hashes.update(parse_entries(Path(tokens_file).read_text(), source=tokens_file))
        return cls(hashes)

    @property
    def open(self) -> bool:
        return not self._hashes

    @property
    def tenants(self) -> set[str]:
        return set(self._hashes.values())

    def authenticate(self, token: str | None) -> str:
        if self.open:
            return PUBLIC_TENANT
        if not token:
            raise Unauthorized("this server needs a token in hello")
        offered = hash_token(token)
        found: str | None = None
        for digest, tenant in self._hashes.items():  # no early exit: same work for any token
            if hmac.compare_digest(offered, digest):
                found = tenant
        if found is None:
            raise Unauthorized("the token is not valid")
        return found


@dataclass(slots=True)
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s if self.rate_per_s > 0 else float("inf")


@dataclass(slots=True)
class _TenantState:
    sessions: int = 0
    registrations: TokenBucket | None = None
    speaks: TokenBucket | None = None


@dataclass
class TenantLimits:
    """Sessions per tenant and per-tenant message rates, shared by a server's sessions."""

    limits: Limits
    clock: Callable[[], float] = time.monotonic
    _state: dict[str, _TenantState] = field(default_factory=dict)

    def _of(self, tenant: str) -> _TenantState:
        state = self._state.get(tenant)
        if state is None:
            lim = self.limits
            state = _TenantState(
                registrations=TokenBucket(
                    lim.registrations_per_minute / 60, lim.registration_burst
                ),
                speaks=TokenBucket(lim.speaks_per_minute / 60, lim.speak_burst),
            )
            self._state[tenant] = state
        return state

    def open_session(self, tenant: str) -> None:
        state = self._of(tenant)
        if state.sessions >= self.limits.max_sessions_per_tenant:
            raise TooManySessions(
                f"this tenant already has {state.sessions} sessions open; the limit is "
                f"{self.limits.max_sessions_per_tenant}"
            )
        state.sessions += 1

    def close_session(self, tenant: str) -> None:
        state = self._of(tenant)
        state.sessions = max(0, state.sessions - 1)

    def take_registration(self, tenant: str) -> None:
        self._take(self._of(tenant).registrations, "voice registrations", None)

    def take_speak(self, tenant: str, message_id: str) -> None:
        self._take(self._of(tenant).speaks, "speak messages", message_id)

    def _take(self, bucket: TokenBucket | None, what: str, message_id: str | None) -> None:
        assert bucket is not None
        wait = bucket.take(self.clock())
        if wait > 0:
            raise RateLimited(
                f"too many {what} for this tenant; retry in {wait:.1f} s", message_id=message_id
            )


def describe(tenants: Iterable[str]) -> str:
    names = sorted(tenants)
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
