"""The shared Redis tier of the voice cache: embeddings keyed by encoder and fingerprint.

Redis is an optimisation, never a dependency: every method answers "unavailable"
instead of raising when Redis is slow, down, or refuses our password, and a circuit
breaker makes later calls skip Redis entirely until a probe gets an answer again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeGuard, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgpack
import numpy as np
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)

from .breaker import BreakerState, CircuitBreaker
from .values import Embedding, Fingerprint, Purge, VoiceProfile, VoiceRecord

__all__ = [
    "DOWN",
    "FORMAT_VERSION",
    "VALUE_VERSION",
    "Lookup",
    "RedisTier",
    "alias_key",
    "decode_purge",
    "decode_value",
    "encode_purge",
    "encode_value",
    "key",
    "lock_key",
    "record_key",
    "redacted_url",
    "refs_key",
    "rendered_key",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
"""Version of the voice records (``aput_record``)."""
VALUE_VERSION: Final = 2
"""Version of the embedding values: 2 adds the voice profile (``prof``). Values of version 1
still load, with no profile: the next registration of the clip computes one and writes the
value again; a ``voice.use`` of such a voice speaks unmatched until then."""
_DTYPE: Final = "<f4"
_PREFIX: Final = "livevoice:v1"

# Deletes the lock only while it still holds our token, so a holder whose lock
# expired cannot release the next holder's lock.
_UNLOCK_LUA: Final = """
if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
end
return 0
"""

PURGE_CHANNEL: Final = f"{_PREFIX}:purge"

# Forgets one tenant's voice id and drops the shared embedding only when no other voice id
# (of any tenant) still references that content; tells every server either way. Atomic, so a
# registration of the same audio by another tenant is either counted or comes after.
# KEYS: record, refs, embedding. ARGV: voice id, purge payload if the embedding stays,
# payload if it goes. Returns 1 when the embedding was dropped, 0 when others still use it.
_DELETE_VOICE_LUA: Final = f"""
redis.call("DEL", KEYS[1])
redis.call("SREM", KEYS[2], ARGV[1])
if redis.call("SCARD", KEYS[2]) == 0 then
    redis.call("DEL", KEYS[3])
    redis.call("PUBLISH", "{PURGE_CHANNEL}", ARGV[3])
    return 1
end
redis.call("PUBLISH", "{PURGE_CHANNEL}", ARGV[2])
return 0
"""

# --- rendered audio (live.rendered): a byte budget kept by Redis itself ----------------------
# Entries are plain keys with a TTL (evictable under ``volatile-*``, like embeddings). Beside
# them: a sorted set of entries by last use (Redis' clock, in µs), a hash of their sizes and the
# sum. Every write trims, atomically across servers: first entries unused for longer than the TTL
# (their keys have expired: only the index remembers them), then the least recently used until
# the sum fits the budget. A hit bumps its entry's last use and TTL. The index keys carry the
# TTL too, refreshed on every write, so an idle cache leaves nothing behind.
_RENDERED_INDEX: Final = f"{_PREFIX}:rendered-index"
_RENDERED_SIZES: Final = f"{_PREFIX}:rendered-sizes"
_RENDERED_TOTAL: Final = f"{_PREFIX}:rendered-bytes"

# KEYS: entry, index, sizes, total. ARGV: value, ttl ms, budget bytes.
# Returns {1 if stored (0: larger than the whole budget), bytes held after, entries evicted}.
_RENDERED_PUT_LUA: Final = """
local now = redis.call("TIME")
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local ttl, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local size = string.len(ARGV[1])
local total = tonumber(redis.call("GET", KEYS[4]) or "0")
local function forget(member)
    local was = tonumber(redis.call("HGET", KEYS[3], member) or "0")
    redis.call("HDEL", KEYS[3], member)
    redis.call("ZREM", KEYS[2], member)
    total = total - was
end
for _, member in ipairs(redis.call("ZRANGEBYSCORE", KEYS[2], "-inf", now_us - ttl * 1000)) do
    forget(member)
end
if redis.call("HEXISTS", KEYS[3], KEYS[1]) == 1 then
    forget(KEYS[1])
end
local evicted = 0
while total + size > budget do
    local oldest = redis.call("ZRANGE", KEYS[2], 0, 0)
    if #oldest == 0 then break end
    forget(oldest[1])
    redis.call("DEL", oldest[1])
    evicted = evicted + 1
end
if total + size > budget then
    if total < 0 then total = 0 end
    redis.call("SET", KEYS[4], total, "PX", ttl)
    return {0, total, evicted}
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ttl)
redis.call("ZADD", KEYS[2], now_us, KEYS[1])
redis.call("HSET", KEYS[3], KEYS[1], size)
total = total + size
redis.call("SET", KEYS[4], total, "PX", ttl)
redis.call("PEXPIRE", KEYS[2], ttl)
redis.call("PEXPIRE", KEYS[3], ttl)
return {1, total, evicted}
"""

# KEYS: entry, index. ARGV: ttl ms. The value, its TTL and last use refreshed; nil on a miss.
_RENDERED_GET_LUA: Final = """
local value = redis.call("GET", KEYS[1])
if value then
    local now = redis.call("TIME")
    redis.call("PEXPIRE", KEYS[1], ARGV[1])
    redis.call("ZADD", KEYS[2], "XX", tonumber(now[1]) * 1000000 + tonumber(now[2]), KEYS[1])
end
return value
"""


def rendered_key(digest: str) -> str:
    """One rendered line (``live.rendered``): cache, with a TTL, inside the byte budget."""
    return f"{_PREFIX}:rendered:{digest}"


def alias_key(digest: str) -> str:
    """An upload's exact bytes → the fingerprint their decode gave (``live.audio.UploadAlias``):
    cache, with the embeddings' TTL."""
    return f"{_PREFIX}:alias:{digest}"


T = TypeVar("T")


def record_key(voice_id: str) -> str:
    """A tenant's voice id: a record, kept without a TTL (never evicted by ``volatile-*``)."""
    return f"{_PREFIX}:voice:{voice_id}"


def refs_key(fp: Fingerprint) -> str:
    """The set of voice ids (any tenant) registered with this content: a record, no TTL."""
    return f"{_PREFIX}:refs:{fp}"


def encode_purge(purge: Purge, origin: str = "") -> bytes:
    """The pub/sub notice of a deletion; ``origin`` names the server that applied it already."""
    packed: bytes = msgpack.packb(
        {
            "t": purge.tenant,
            "v": purge.voice_id,
            "fp": purge.fingerprint,
            "gone": purge.gone,
            "o": origin,
        }
    )
    return packed


def decode_purge(raw: bytes) -> tuple[str, Purge] | None:
    """Origin and deletion of a purge notice from any server. A bare fingerprint (servers
    before the reference sets) means the embedding is gone, with no tenant's voice named."""
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except Exception:
        obj = None
    if isinstance(obj, dict):
        tenant, voice_id, fp = obj.get("t"), obj.get("v"), obj.get("fp")
        origin = obj.get("o")
        if isinstance(tenant, str) and isinstance(voice_id, str) and isinstance(fp, str):
            purge = Purge(tenant, voice_id, Fingerprint(fp), bool(obj.get("gone")))
            return (origin if isinstance(origin, str) else ""), purge
        return None
    text = raw.decode("ascii", "replace")
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return "", Purge(None, None, Fingerprint(text), True)
    return None


class Lookup(enum.Enum):
    HIT = "hit"
    MISS = "miss"
    UNAVAILABLE = "unavailable"
    """Redis was not asked (breaker open) or did not answer: the caller computes."""


class _Down(enum.Enum):
    """Sentinel for "Redis gave no usable answer", distinct from a None reply."""

    DOWN = enum.auto()


_DOWN: Final = _Down.DOWN
DOWN: Final = _DOWN
"""What :meth:`RedisTier.script`'s scripts answer when Redis gave no usable answer."""


def key(encoder_id: str, fp: Fingerprint) -> str:
    return f"{_PREFIX}:emb:{encoder_id}:{fp}"


def lock_key(encoder_id: str, fp: Fingerprint) -> str:
    return f"{_PREFIX}:lock:{encoder_id}:{fp}"


def encode_value(emb: Embedding) -> bytes:
    """The msgpack map stored under :func:`key`; raw little-endian float32, never pickle."""
    vector = np.ascontiguousarray(emb.vector, dtype=_DTYPE)
    if vector.ndim != 1:
        raise ValueError(f"embedding must be one-dimensional, got shape {vector.shape}")
    value: dict[str, Any] = {
        "v": VALUE_VERSION,
        "enc": emb.encoder_id,
        "dim": int(vector.shape[0]),
        "dtype": _DTYPE,
        "data": vector.tobytes(),
        "created": float(emb.created),
        "dur": float(emb.duration_s),
    }
    if emb.profile is not None:
        p = emb.profile
        value["prof"] = {
            "f0": float(p.f0_hz),
            "range": float(p.f0_range_st),
            "fmt": [float(f) for f in p.formants_hz],
            "syl": float(p.syllables_per_s),
        }
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _decode_profile(obj: object) -> VoiceProfile | None:
    """A value's profile; None when it is not a well-formed one (the embedding still loads)."""
    if not isinstance(obj, dict):
        return None
    f0, spread, formants, rate = obj.get("f0"), obj.get("range"), obj.get("fmt"), obj.get("syl")
    if not (
        _is_number(f0)
        and _is_number(spread)
        and _is_number(rate)
        and isinstance(formants, tuple)
        and len(formants) == 3
        and all(_is_number(f) and f > 0 for f in formants)
        and f0 > 0
    ):
        return None
    f2, f3, f4 = (float(f) for f in formants)
    return VoiceProfile(float(f0), float(spread), (f2, f3, f4), float(rate))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def decode_value(raw: bytes, *, encoder_id: str, dim: int) -> Embedding | None:
    """The embedding in ``raw``, or None for anything we did not write for this encoder.

    Never raises: the value comes from a shared store, and a bad one is just a miss
    that the caller overwrites.
    """
    try:
        obj = msgpack.unpackb(raw, raw=False, use_list=False, strict_map_key=True)
    except Exception:  # msgpack raises a zoo of types on garbage; all mean "not ours"
        return None
    if not isinstance(obj, dict):
        return None
    version, data = obj.get("v"), obj.get("data")
    created, duration = obj.get("created"), obj.get("dur")
    if not (
        _is_int(version)
        and version in (1, VALUE_VERSION)
        and obj.get("enc") == encoder_id
        and _is_int(obj.get("dim"))
        and obj.get("dim") == dim
        and obj.get("dtype") == _DTYPE
        and isinstance(data, bytes)
        and len(data) == dim * 4
        and _is_number(created)
        and _is_number(duration)
    ):
        return None
    vector = np.frombuffer(data, dtype=_DTYPE).astype(np.float32)  # a writable copy
    if not np.isfinite(vector).all():
        return None
    return Embedding(
        vector=vector,
        encoder_id=encoder_id,
        duration_s=duration,
        created=created,
        profile=_decode_profile(obj.get("prof")),
    )


def redacted_url(url: str) -> str:
    """``url`` with its password (userinfo or ``?password=``) replaced by ``***``, for logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        userinfo, at, hostport = netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable redis url>"


class RedisTier:
    """Async access to the shared embedding cache; one instance (one pool) per process.

    Every method returns its "unavailable" answer instead of raising on Redis trouble,
    bounded by ``op_timeout_s``; once the breaker opens, methods return at once.
    Counters are plain ints for the metrics endpoint to read.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int = 7 * 24 * 3600,
        op_timeout_s: float = 0.25,
        connect_timeout_s: float = 0.25,
        lock_ttl_ms: int = 3_000,
        health_check_interval_s: int = 30,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.display_url = redacted_url(url)
        self.ttl_s = ttl_s
        self.op_timeout_s = op_timeout_s
        self.lock_ttl_ms = lock_ttl_ms
        self.breaker = breaker if breaker is not None else CircuitBreaker(name="redis")
        # No retries: an outage must cost one short timeout, then the breaker stops us
        # calling at all. from_url happens to default to none, but Redis() defaults to
        # 10 with backoff, so say it. (retry_on_timeout is deprecated since redis-py 6.)
        self._client: redis.asyncio.Redis = redis.asyncio.from_url(
            url,
            socket_timeout=op_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            health_check_interval=health_check_interval_s,
            retry=Retry(NoBackoff(), 0),
            client_name="livevoice",
        )
        self._unlock = self._client.register_script(_UNLOCK_LUA)
        self._delete_voice = self._client.register_script(_DELETE_VOICE_LUA)
        self._rendered_put = self._client.register_script(_RENDERED_PUT_LUA)
        self._rendered_get = self._client.register_script(_RENDERED_GET_LUA)
        self.instance = uuid.uuid4().hex
        """This tier's name on the purge channel and in its lock tokens (so it never waits on
        a lock it left itself)."""
        self._auth_failure_logged = False
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.corrupt = 0
        self.writes = 0
        self.skipped = 0  # calls not made because the breaker was open

    @property
    def available(self) -> bool:
        return self.breaker.state is BreakerState.CLOSED

    async def aget(
        self, encoder_id: str, fp: Fingerprint, dim: int
    ) -> tuple[Lookup, Embedding | None]:
        """Look up an embedding; a hit refreshes its TTL (GETEX)."""
        k = key(encoder_id, fp)

        async def getex() -> bytes | None:
            try:
                raw = await self._client.getex(k, ex=self.ttl_s)
            except ResponseError as exc:
                if str(exc).startswith("WRONGTYPE"):
                    return b""  # someone else's data at our key: a corrupt value
                raise
            return raw if isinstance(raw, bytes | None) else raw.encode()  # decode_responses is off

        raw = await self._run(getex)
        if raw is _DOWN:
            return Lookup.UNAVAILABLE, None
        if raw is None:
            self.misses += 1
            return Lookup.MISS, None
        emb = decode_value(raw, encoder_id=encoder_id, dim=dim)
        if emb is None:
            self.corrupt += 1
            self.misses += 1
            return Lookup.MISS, None
        self.hits += 1
        return Lookup.HIT, emb

    async def aput(self, fp: Fingerprint, emb: Embedding) -> bool:
        """Store an embedding with a fresh TTL, replacing whatever was at its key."""
        value = encode_value(emb)
        k = key(emb.encoder_id, fp)
        done = await self._run(lambda: self._client.set(k, value, ex=self.ttl_s))
        if done is _DOWN or not done:
            return False
        self.writes += 1
        return True

    async def atouch(self, keys: list[tuple[str, Fingerprint]]) -> list[bool] | None:
        """Refresh the TTL of pinned voices, given as ``(encoder_id, fp)``, in one round trip.

        Per key, whether it was still there (False: evicted or expired, the caller may write it
        again); None when Redis is unavailable.
        """
        if not keys:
            return []

        async def expire_all() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for encoder_id, fp in keys:
                    pipe.expire(key(encoder_id, fp), self.ttl_s)
                result: list[Any] = await pipe.execute()
                return result

        found = await self._run(expire_all)
        if found is _DOWN:
            return None
        return [bool(x) for x in found]

    async def aget_or_compute(
        self,
        encoder_id: str,
        fp: Fingerprint,
        dim: int,
        compute: Callable[[], Awaitable[Embedding]],
        *,
        wait_s: float,
    ) -> tuple[Embedding, bool]:
        """The embedding from Redis, or from ``compute`` called at most once across the
        servers sharing this Redis (the cross-server single-flight, all of it here).

        A miss takes a short ``SET NX PX`` lock and computes, storing the value before it
        unlocks; a server that finds the lock held waits up to ``wait_s`` for the holder's
        value, and computes itself when the holder fails, its lock is our own leftover, or
        Redis is unavailable. True when this call computed it. ``compute``'s errors propagate
        (after the lock is released).
        """
        lookup, emb = await self.aget(encoder_id, fp, dim)
        if emb is not None:
            return emb, False
        if lookup is Lookup.UNAVAILABLE:
            return await self._acompute_and_store(fp, compute), True
        token = f"{self.instance}:{uuid.uuid4().hex}"
        if await self.alock(encoder_id, fp, token):
            try:
                return await self._acompute_and_store(fp, compute), True
            finally:
                await self.aunlock(encoder_id, fp, token)
        emb = await self.await_value(
            encoder_id, fp, dim, timeout_s=wait_s, own_prefix=self.instance
        )
        if emb is not None:
            return emb, False
        return await self._acompute_and_store(fp, compute), True

    async def _acompute_and_store(
        self, fp: Fingerprint, compute: Callable[[], Awaitable[Embedding]]
    ) -> Embedding:
        emb = await compute()
        await self.aput(fp, emb)
        return emb

    async def alock(self, encoder_id: str, fp: Fingerprint, token: str) -> bool:
        """Try to become the one process computing this embedding.

        False when another holder has it, and also when Redis is unavailable; then
        :meth:`await_value` returns None at once and the caller computes anyway.
        :meth:`aget_or_compute` is the one caller outside the tests.
        """
        k = lock_key(encoder_id, fp)
        got = await self._run(lambda: self._client.set(k, token, nx=True, px=self.lock_ttl_ms))
        return got is not _DOWN and bool(got)

    async def aunlock(self, encoder_id: str, fp: Fingerprint, token: str) -> bool:
        """Release the lock if it still holds ``token``; True if this call released it."""
        k = lock_key(encoder_id, fp)
        released = await self._run(lambda: self._unlock(keys=[k], args=[token]))
        return released is not _DOWN and released == 1

    async def await_value(
        self,
        encoder_id: str,
        fp: Fingerprint,
        dim: int,
        *,
        timeout_s: float,
        poll_s: float = 0.02,
        own_prefix: str | None = None,
    ) -> Embedding | None:
        """Wait for another process's lock holder to store the embedding.

        None when the lock disappears without a value (the holder failed or died),
        when Redis is unavailable, or after ``timeout_s``: the caller then computes.
        """
        value_key, held_key = key(encoder_id, fp), lock_key(encoder_id, fp)

        async def poll() -> list[Any]:
            # Lock first: the holder stores the value before it unlocks, so "no lock,
            # then no value" means it will not come.
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(held_key)
                pipe.get(value_key)
                result: list[Any] = await pipe.execute()
                return result

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            answer = await self._run(poll)
            if answer is _DOWN:
                return None
            held, raw = answer
            if raw is not None:
                emb = decode_value(raw, encoder_id=encoder_id, dim=dim)
                if emb is None:
                    self.corrupt += 1
                return emb
            if not held:
                return None
            if own_prefix is not None and bytes(held).startswith(own_prefix.encode()):
                # Our own process holds it: a flight of ours that could not store its value
                # (Redis blinked). Nobody else will store it: compute instead of waiting.
                return None
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(poll_s, remaining))

    # --- tenants' voice records and purges -----------------------------------------------
    async def aput_record(self, tenant: str, record: VoiceRecord) -> bool:
        """Remember a tenant's voice id, so ``voice.use`` works on any server sharing Redis.

        Records carry no TTL: ids are data, not cache, and must survive memory pressure under a
        ``volatile-*`` eviction policy (only embeddings, which have a TTL, may go). The id joins
        its content's reference set, so deleting it never takes the embedding from another
        tenant who registered the same audio. False when Redis did not take it.
        """
        value = msgpack.packb(
            {
                "v": FORMAT_VERSION,
                "tenant": tenant,
                "fp": record.fingerprint,
                "name": record.name,
                "dur": record.duration_s,
            }
        )
        k = record_key(record.voice_id)

        async def put() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(k, value)
                pipe.sadd(refs_key(record.fingerprint), record.voice_id)
                result: list[Any] = await pipe.execute()
                return result

        done = await self._run(put)
        return done is not _DOWN and bool(done[0])

    async def aget_record(self, tenant: str, voice_id: str) -> tuple[Lookup, VoiceRecord | None]:
        """The record behind a voice id, only if ``tenant`` registered it.

        ``Lookup.UNAVAILABLE`` when Redis did not answer: the id may well exist, and callers
        must not report it as absent.
        """
        k = record_key(voice_id)
        raw = await self._run(lambda: self._client.get(k))
        if raw is _DOWN:
            return Lookup.UNAVAILABLE, None
        if not isinstance(raw, bytes):
            return Lookup.MISS, None
        try:
            value = msgpack.unpackb(raw)
            if value.get("tenant") != tenant or value.get("v") != FORMAT_VERSION:
                return Lookup.MISS, None
            name = value.get("name")
            record = VoiceRecord(
                voice_id,
                Fingerprint(str(value["fp"])),
                name if isinstance(name, str) else None,
                float(value["dur"]),
            )
        except Exception:
            self.corrupt += 1
            return Lookup.MISS, None
        # Records written before reference sets existed join theirs when first read (idempotent).
        await self._run(lambda: self._client.sadd(refs_key(record.fingerprint), voice_id))
        return Lookup.HIT, record

    async def adelete_voice(self, encoder_id: str, purge: Purge) -> bool | None:
        """Forget ``purge.voice_id`` and, if no other voice id references its content, the
        embedding; every server hears of it on :data:`PURGE_CHANNEL`.

        True when the embedding was dropped, False when other voices still use it, None when
        Redis is unavailable.
        """
        stays = encode_purge(purge, self.instance)
        goes = encode_purge(
            Purge(purge.tenant, purge.voice_id, purge.fingerprint, True), self.instance
        )
        voice_id = purge.voice_id
        assert voice_id is not None
        fp = purge.fingerprint
        keys = [record_key(voice_id), refs_key(fp), key(encoder_id, fp)]
        done = await self._run(lambda: self._delete_voice(keys=keys, args=[voice_id, stays, goes]))
        if done is _DOWN:
            return None
        return bool(done == 1)

    async def alisten_purges(
        self, on_purge: Callable[[Purge], None], *, retry_s: float = 1.0
    ) -> None:
        """Call ``on_purge`` for every voice deleted by any server, until cancelled.

        Resubscribes after an outage; a purge published while this server was cut off from
        Redis is missed (the embedding's Redis copy is gone either way).
        """
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(PURGE_CHANNEL)
                # A Redis that goes away closes the socket, which ends listen() with an error.
                # redis-py 8.1's reader can absorb a task cancellation (seen on Python 3.11:
                # shutdown hung ~30 s), so the owner also closes the pool to end this loop.
                async for message in pubsub.listen():
                    data = message.get("data")
                    notice = decode_purge(data) if isinstance(data, bytes) else None
                    # Our own deletions were applied when made: an echo arriving after the
                    # same audio was registered again must not undo that registration.
                    if notice is not None and notice[0] != self.instance:
                        on_purge(notice[1])
            except (RedisError, OSError, TimeoutError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # redis-py turned our cancellation into a connection error: honour it.
                    raise asyncio.CancelledError from exc
                logger.debug("purge subscription lost: %r", exc)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(retry_s)

    async def aused_memory(self) -> int | None:
        """Redis's ``used_memory`` in bytes (INFO memory), or None when unavailable."""
        info = await self._run(lambda: self._client.info("memory"))
        if info is _DOWN:
            return None
        used = info.get("used_memory")
        return used if _is_int(used) else None

    async def aeviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy``, or None when it cannot be read (managed Redis often
        refuses CONFIG)."""

        async def policy() -> Any:
            try:
                return await self._client.config_get("maxmemory-policy")
            except ResponseError:
                return None  # CONFIG is disabled: an answer, not an outage

        reply = await self._run(policy)
        if reply is _DOWN or not isinstance(reply, dict):
            return None
        value = reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy")
        if isinstance(value, bytes):
            value = value.decode()
        return value if isinstance(value, str) else None

    # --- upload aliases (live.voices.UploadAliases) -----------------------------------------
    async def aget_alias(self, digest: str) -> bytes | None:
        """The alias stored for an upload's bytes (TTL refreshed), or None: absent, or Redis
        unavailable (either way the caller decodes)."""
        k = alias_key(digest)
        raw = await self._run(lambda: self._client.getex(k, ex=self.ttl_s))
        return raw if isinstance(raw, bytes) else None

    async def aput_alias(self, digest: str, value: bytes) -> bool:
        """Store an upload's alias with the embeddings' TTL: it is worth keeping only as long as
        the embedding it leads to."""
        k = alias_key(digest)
        done = await self._run(lambda: self._client.set(k, value, ex=self.ttl_s))
        return done is not _DOWN and bool(done)

    # --- rendered audio (live.rendered) ---------------------------------------------------
    async def aget_rendered(self, digest: str, ttl_s: float) -> bytes | _Down | None:
        """A rendered line's stored value, its TTL and last use refreshed; None when absent,
        :data:`DOWN` when Redis did not answer."""
        keys = [rendered_key(digest), _RENDERED_INDEX]
        raw = await self._run(lambda: self._rendered_get(keys=keys, args=[int(ttl_s * 1000)]))
        if raw is _DOWN or raw is None or isinstance(raw, bytes):
            return raw
        self.corrupt += 1
        return None

    async def aput_rendered(
        self, digest: str, value: bytes, *, ttl_s: float, budget_bytes: int
    ) -> tuple[bool, int, int] | None:
        """Store a rendered line within the byte budget, evicting the least recently used
        lines to make room (one atomic script, shared by every server on this Redis).

        (stored, bytes held after, lines evicted); None when Redis did not answer.
        """
        keys = [rendered_key(digest), _RENDERED_INDEX, _RENDERED_SIZES, _RENDERED_TOTAL]
        args: list[bytes | int] = [value, int(ttl_s * 1000), budget_bytes]
        done = await self._run(lambda: self._rendered_put(keys=keys, args=args))
        if done is _DOWN or not isinstance(done, list) or len(done) != 3:
            return None
        return bool(done[0]), int(done[1]), int(done[2])

    # --- scripts of other parts (the tenants' shared limits) --------------------------------
    def script(self, lua: str) -> Callable[[list[str], list[str | int | float]], Awaitable[Any]]:
        """A Lua script on this tier's pool, run like every call here: under the breaker and the
        timeout, answering :data:`DOWN` instead of raising (so Redis stays optional for its
        callers too). Redis runs a script atomically, which is why callers use one."""
        registered = self._client.register_script(lua)

        async def arun(keys: list[str], args: list[str | int | float]) -> Any:
            return await self._run(lambda: registered(keys=keys, args=args))

        return arun

    async def aping(self) -> bool:
        reply = await self._run(lambda: self._client.ping())
        return reply is not _DOWN and bool(reply)

    async def aprobe_forever(self, interval_s: float = 1.0) -> None:
        """PING through the breaker every ``interval_s`` until cancelled: with no traffic,
        only this notices Redis is back while the breaker is open."""
        while True:
            await self.aping()
            await asyncio.sleep(interval_s)

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:
            logger.debug("closing redis client: %r", exc)

    async def _run(self, op: Callable[[], Awaitable[T]]) -> T | _Down:
        """Run one Redis call under the breaker and the timeout; _DOWN instead of raising."""
        if not self.breaker.allow():
            self.skipped += 1
            return _DOWN
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.op_timeout_s):
                result = await op()
        except AuthenticationError as exc:
            self._failed(exc, started, explained=True)
            if not self._auth_failure_logged:
                self._auth_failure_logged = True
                logger.error(
                    "redis authentication failed for %s (%s); "
                    "running without the Redis tier until it recovers",
                    self.display_url,
                    exc,
                )
            return _DOWN
        except OutOfMemoryError as exc:
            # Redis answered, it just will not take writes: not an outage.
            self.errors += 1
            self.breaker.record_success()
            logger.debug("redis refused a write: %s", exc)
            return _DOWN
        except (RedisError, OSError, TimeoutError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py can turn our cancellation into a connection error: honour it, or a
                # background loop cancelled at shutdown would go on (and hold the shutdown).
                raise asyncio.CancelledError from exc
            self._failed(exc, started)
            if isinstance(exc, ConnectionError | OSError):
                # After a Redis restart the pooled connections are dead; one that failed once
                # more after the breaker closed could re-trip it. Drop the idle ones now.
                with contextlib.suppress(RedisError, OSError):
                    await self._client.connection_pool.disconnect(inuse_connections=False)
            return _DOWN
        self._auth_failure_logged = False
        self.breaker.record_success()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py swallowed a cancellation (seen after a SIGSTOPped Redis resumed): a
            # background loop told to stop must stop, not poll on and hold the shutdown.
            raise asyncio.CancelledError
        return result

    def _failed(self, exc: BaseException, started: float, *, explained: bool = False) -> None:
        self.errors += 1
        was = self.breaker.state
        self.breaker.record_failure()
        opened = was is not BreakerState.OPEN and self.breaker.state is BreakerState.OPEN
        if opened and not explained:
            # Name the cause once, next to the breaker's own "open" line.
            logger.info(
                "redis at %s failed after %.0f ms: %s: %s",
                self.display_url,
                (time.monotonic() - started) * 1000,
                type(exc).__name__,
                exc,
            )
        else:
            logger.debug("redis call failed: %s: %s", type(exc).__name__, exc)
