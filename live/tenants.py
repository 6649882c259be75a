"""Tenants: bearer tokens (hashed at rest, compared in constant time) and per-tenant limits,
counted in the shared Redis when there is one."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from protocol.errors import RateLimited, TooManySessions, Unauthorized

from .redis_tier import DOWN, RedisTier
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


# --- limits shared by the servers on one Redis --------------------------------------------------
# Redis' own clock (TIME) everywhere, so servers whose clocks disagree still agree on expiry and
# refill. Each script is one atomic step: no two servers can both see the last free slot.

_KEY_PREFIX: Final = "livevoice:v1:tenant"

# Admit one session if the tenant has a free slot. KEYS: the tenant's sorted set of session ids
# scored by expiry (ms). ARGV: session id, the limit, expiry (ms). Expired members (a server that
# died without closing them) are dropped first. -1 when admitted, else the live count.
_OPEN_SESSION_LUA: Final = """
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
local n = redis.call("ZCARD", KEYS[1])
if not redis.call("ZSCORE", KEYS[1], ARGV[1]) and n >= tonumber(ARGV[2]) then
    return n
end
redis.call("ZADD", KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call("PEXPIRE", KEYS[1], ARGV[3])
return -1
"""

# Push the expiry of live sessions on. KEYS: a tenant's set per session; ARGV: expiry (ms), then
# the session ids in the order of KEYS. Also re-adds sessions admitted while Redis was away.
_REFRESH_SESSIONS_LUA: Final = """
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
    redis.call("ZADD", k, now + expiry, ARGV[i + 1])
    redis.call("PEXPIRE", k, expiry)
end
return #KEYS
"""

# KEYS: a tenant's set per session; ARGV: the session ids in the order of KEYS.
_CLOSE_SESSIONS_LUA: Final = """
for i, k in ipairs(KEYS) do
    redis.call("ZREM", k, ARGV[i])
end
return #KEYS
"""

# Take one token. KEYS: the bucket (a hash: tokens, stamp in s). ARGV: rate per s, burst, TTL
# (ms: the time to refill completely, after which a missing bucket is the same as a full one).
# "0" when a token was taken, else the seconds until one is there (a string: Lua numbers
# become integers in replies).
_TAKE_TOKEN_LUA: Final = """
local t = redis.call("TIME")
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call("HMGET", KEYS[1], "tokens", "stamp")
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil or stamp == nil then
    tokens, stamp = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then
    tokens = tokens - 1
elseif rate > 0 then
    wait = (1 - tokens) / rate
else
    wait = -1
end
redis.call("HSET", KEYS[1], "tokens", tostring(tokens), "stamp", tostring(now))
redis.call("PEXPIRE", KEYS[1], ARGV[3])
return tostring(wait)
"""


def sessions_key(tenant: str) -> str:
    """The tenant's live sessions on every server: a sorted set of session ids by expiry."""
    return f"{_KEY_PREFIX}:{tenant}:sessions"


def bucket_key(tenant: str, kind: str) -> str:
    """One of the tenant's token buckets (``speak``, ``register``) shared by every server."""
    return f"{_KEY_PREFIX}:{tenant}:bucket:{kind}"


@dataclass(slots=True)
class _LocalBuckets:
    registrations: TokenBucket
    speaks: TokenBucket


class TenantLimits:
    """Sessions per tenant and per-tenant message rates, for every server sharing one Redis.

    With a Redis tier the counts live in Redis, each step one atomic Lua script on Redis' own
    clock (no rate-limit library fits: ``limits`` offers windows, not token buckets, and opens a
    pool of its own outside the tier's breaker):

    - token buckets: a hash per tenant and kind, refilled by the time elapsed since the last
      take, expiring once it would be full again (an idle tenant leaves nothing behind);
    - sessions: a sorted set per tenant of session ids scored by expiry. Each server pushes the
      expiry of its live sessions on every ``refresh_s`` (:meth:`arefresh_forever`), admitting
      drops expired members first, and closing removes the id, so the sessions of a server that
      died (SIGKILL, a lost host) stop counting within ``expiry_s``.

    Redis is never a dependency: when the tier answers :data:`~live.redis_tier.DOWN` (down, slow,
    breaker open) the server counts for itself, as it does without Redis — a tenant then gets the
    limits on each server — and goes back to the shared counts as soon as Redis answers. Sessions
    admitted meanwhile join the shared count at the next refresh (so a tenant may briefly be
    over its limit: nobody is closed for it, new sessions wait until it is under again). A close
    Redis missed is covered by the expiry.
    """

    def __init__(
        self,
        limits: Limits,
        tier: RedisTier | None = None,
        *,
        expiry_s: float = 30.0,
        refresh_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.tier = tier
        self.expiry_s = expiry_s
        self.refresh_s = refresh_s
        self.clock = clock
        self._live: dict[str, set[str]] = {}
        """This server's sessions per tenant: the fallback count, and what it refreshes."""
        self._buckets: dict[str, _LocalBuckets] = {}
        """Per-server buckets, used only while Redis does not answer."""
        self._closes: set[asyncio.Task[Any]] = set()
        """Removals on their way to Redis (kept so they are not collected midway)."""
        self.fallbacks = 0
        """Limit checks answered by this server alone because Redis did not answer."""
        if tier is not None:
            self._open_script = tier.script(_OPEN_SESSION_LUA)
            self._refresh_script = tier.script(_REFRESH_SESSIONS_LUA)
            self._close_script = tier.script(_CLOSE_SESSIONS_LUA)
            self._take_script = tier.script(_TAKE_TOKEN_LUA)

    @property
    def _expiry_ms(self) -> int:
        return max(1, round(self.expiry_s * 1000))

    # --- sessions ---------------------------------------------------------------------------
    async def aopen_session(self, tenant: str, session_id: str) -> None:
        """Count ``session_id`` as one of the tenant's; ``TooManySessions`` when none is left."""
        limit = self.limits.max_sessions_per_tenant
        live = self._live.setdefault(tenant, set())
        if self.tier is not None:
            args: list[str | int | float] = [session_id, limit, self._expiry_ms]
            answer = await self._open_script([sessions_key(tenant)], args)
            if answer is not DOWN:
                if int(answer) >= 0:
                    self._refuse_session(int(answer))
                live.add(session_id)
                return
            self.fallbacks += 1
        if len(live) >= limit:
            self._refuse_session(len(live))
        live.add(session_id)

    def _refuse_session(self, count: int) -> None:
        raise TooManySessions(
            f"this tenant already has {count} sessions open; the limit is "
            f"{self.limits.max_sessions_per_tenant}"
        )

    def close_session(self, tenant: str, session_id: str) -> None:
        """Give the session's slot back; Redis hears of it in the background (a session that
        ends must not wait on Redis, and if Redis misses it, the expiry frees the slot)."""
        live = self._live.get(tenant)
        if live is not None:
            live.discard(session_id)
            if not live:
                del self._live[tenant]
        if self.tier is not None:
            self._forget([(tenant, session_id)])

    def _forget(self, sessions: list[tuple[str, str]]) -> None:
        closing = asyncio.create_task(self._aforget(sessions))
        self._closes.add(closing)
        closing.add_done_callback(self._closes.discard)

    async def _aforget(self, sessions: list[tuple[str, str]]) -> None:
        keys = [sessions_key(tenant) for tenant, _ in sessions]
        await self._close_script(keys, [sid for _, sid in sessions])

    async def arefresh(self) -> bool:
        """Push on the expiry of this server's live sessions in Redis (and add those admitted
        while it was away). False when Redis did not answer."""
        if self.tier is None:
            return False
        sessions = [(tenant, sid) for tenant, ids in self._live.items() for sid in ids]
        if not sessions:
            return True
        keys = [sessions_key(tenant) for tenant, _ in sessions]
        args: list[str | int | float] = [self._expiry_ms, *(sid for _, sid in sessions)]
        if await self._refresh_script(keys, args) is DOWN:
            return False
        # A session closed while the refresh was on its way may have been added back after its
        # own removal: remove it again.
        closed = [(t, sid) for t, sid in sessions if sid not in self._live.get(t, ())]
        if closed:
            self._forget(closed)
        return True

    async def arefresh_forever(self) -> None:
        """:meth:`arefresh` every ``refresh_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.arefresh()

    async def aclose(self) -> None:
        """Let the removals on their way reach Redis (briefly: the expiry covers the rest)."""
        if self._closes:
            await asyncio.wait(set(self._closes), timeout=1.0)

    # --- message rates ----------------------------------------------------------------------
    async def atake_registration(self, tenant: str) -> None:
        lim = self.limits
        per_s = lim.registrations_per_minute / 60
        await self._atake(tenant, "register", per_s, lim.registration_burst, None)

    async def atake_speak(self, tenant: str, message_id: str) -> None:
        lim = self.limits
        per_s = lim.speaks_per_minute / 60
        await self._atake(tenant, "speak", per_s, lim.speak_burst, message_id)

    async def _atake(
        self, tenant: str, kind: str, per_s: float, burst: int, message_id: str | None
    ) -> None:
        wait: float | None = None
        if self.tier is not None:
            full_ms = math.ceil(burst / per_s * 1000) + 1000 if per_s > 0 else 86_400_000
            answer = await self._take_script([bucket_key(tenant, kind)], [per_s, burst, full_ms])
            if answer is DOWN:
                self.fallbacks += 1
            else:
                wait = float(answer)
                if wait < 0:
                    wait = math.inf
        if wait is None:
            buckets = self._local(tenant)
            bucket = buckets.speaks if kind == "speak" else buckets.registrations
            wait = bucket.take(self.clock())
        if wait > 0:
            what = "speak messages" if kind == "speak" else "voice registrations"
            raise RateLimited(
                f"too many {what} for this tenant; retry in {wait:.1f} s", message_id=message_id
            )

    def _local(self, tenant: str) -> _LocalBuckets:
        buckets = self._buckets.get(tenant)
        if buckets is None:
            lim = self.limits
            buckets = _LocalBuckets(
                registrations=TokenBucket(
                    lim.registrations_per_minute / 60, lim.registration_burst
                ),
                speaks=TokenBucket(lim.speaks_per_minute / 60, lim.speak_burst),
            )
            self._buckets[tenant] = buckets
        return buckets


def describe(tenants: Iterable[str]) -> str:
    names = sorted(tenants)
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
