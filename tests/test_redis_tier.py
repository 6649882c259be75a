"""The Redis tier against a real redis-server: codec, TTLs, outages, locks, passwords."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgpack
import numpy as np
import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from live.audio import Fingerprint, canonicalize
from live.breaker import BreakerState, CircuitBreaker
from live.redis_tier import (
    Lookup,
    RedisTier,
    decode_value,
    encode_value,
    key,
    lock_key,
    redacted_url,
)
from live.voices import Embedding, VoiceRecord, VoiceSource, VoiceStore
from tests.clips import reference_clip, wav_bytes
from tests.redis_server import RedisServer, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(30)

ENC = "ge2e-test-0123abcd"
DIM = 256
FP = Fingerprint("ab" * 32)
BOUND_S = 10.0  # every test body runs under this asyncio timeout
SLACK_S = 2.0
"""Upper bound for a call that should cost one op timeout (0.2-0.25 s): ~10x, for a loaded CI."""


def make_embedding(encoder_id: str = ENC, dim: int = DIM, seed: int = 0) -> Embedding:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return Embedding(vector / np.linalg.norm(vector), encoder_id, 4.5, 1_700_000_000.5)


def fast_breaker(reset_after: float = 0.1) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_after=reset_after, name="redis")


@pytest.fixture
async def tier(redis_server: RedisServer) -> AsyncIterator[RedisTier]:  # noqa: F811
    t = RedisTier(redis_server.url, ttl_s=3600, breaker=fast_breaker())
    yield t
    await t.aclose()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:  # noqa: F811
    client = redis.asyncio.from_url(redis_server.url, socket_timeout=2)
    yield client
    await client.aclose()


# --- codec ----------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    emb = make_embedding()
    back = decode_value(encode_value(emb), encoder_id=ENC, dim=DIM)
    assert back is not None
    assert back.vector.dtype == np.float32 and back.vector.shape == (DIM,)
    assert back.vector.flags.writeable
    np.testing.assert_array_equal(back.vector, emb.vector)
    assert (back.encoder_id, back.duration_s, back.created) == (ENC, 4.5, 1_700_000_000.5)


def good_fields() -> dict[str, object]:
    fields: dict[str, object] = msgpack.unpackb(encode_value(make_embedding()))
    return fields


@pytest.mark.parametrize(
    "change",
    [
        {"v": 3},
        {"v": True},
        {"enc": "another-encoder"},
        {"dim": 128},
        {"dtype": "<f8"},
        {"data": b"\x00" * 1020},
        {"data": "not bytes"},
        {"data": np.full(DIM, np.nan, dtype="<f4").tobytes()},
        {"created": "yesterday"},
        {"dur": None},
        {"dur": float("inf")},
    ],
)
def test_decode_rejects_mismatched_fields(change: dict[str, object]) -> None:
    fields = good_fields() | change
    assert decode_value(msgpack.packb(fields), encoder_id=ENC, dim=DIM) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({1: 2}),
        pickle.dumps({"v": 1}),
        encode_value(make_embedding())[:-1],
        encode_value(make_embedding()) + b"\x00",
    ],
)
def test_decode_never_raises_on_junk(raw: bytes) -> None:
    assert decode_value(raw, encoder_id=ENC, dim=DIM) is None


@settings(database=None, max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_never_raises_on_random_bytes(raw: bytes) -> None:
    assert decode_value(raw, encoder_id=ENC, dim=DIM) is None


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=64),
    st.just(ENC),
    st.just(DIM),
    st.just(1),
)


@settings(database=None, max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "enc", "dim", "dtype", "data", "created", "dur", "x"]), _scalars
    )
)
def test_decode_never_raises_on_random_maps(fields: dict[str, object]) -> None:
    decode_value(msgpack.packb(fields), encoder_id=ENC, dim=DIM)


def test_redacted_url() -> None:
    assert redacted_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert redacted_url("rediss://user:hunter2@h/1") == "rediss://user:***@h/1"
    assert redacted_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redacted_url("redis://user@h") == "redis://user@h"
    assert redacted_url("redis://:p%40ss@[::1]:6380") == "redis://:***@[::1]:6380"
    redacted = redacted_url("unix:///run/redis.sock?db=2&password=hunter2")
    assert "hunter2" not in redacted and "password=***" in redacted and "db=2" in redacted


# --- against redis-server -------------------------------------------------------------------


async def test_put_get_round_trip(tier: RedisTier, raw: redis.asyncio.Redis) -> None:
    async with asyncio.timeout(BOUND_S):
        emb = make_embedding()
        assert await tier.aput(FP, emb)
        lookup, got = await tier.aget(ENC, FP, DIM)
        assert lookup is Lookup.HIT and got is not None
        np.testing.assert_array_equal(got.vector, emb.vector)
        assert (tier.hits, tier.misses, tier.writes, tier.errors) == (1, 0, 1, 0)

        name = f"livevoice:v1:emb:{ENC}:{FP}"
        assert key(ENC, FP) == name
        assert 3600 - 5 <= await raw.ttl(name) <= 3600
        stored = await raw.get(name)
        assert stored is not None and stored[:1] != b"\x80"  # not a pickle
        fields = msgpack.unpackb(stored)
        assert fields.keys() == {"v", "enc", "dim", "dtype", "data", "created", "dur"}
        assert (fields["v"], fields["enc"], fields["dim"], fields["dtype"]) == (2, ENC, DIM, "<f4")
        assert fields["data"] == emb.vector.astype("<f4").tobytes()
        assert (fields["created"], fields["dur"]) == (emb.created, emb.duration_s)


async def test_absent_key_is_a_miss(tier: RedisTier) -> None:
    async with asyncio.timeout(BOUND_S):
        assert await tier.aget(ENC, FP, DIM) == (Lookup.MISS, None)
        assert (tier.misses, tier.corrupt) == (1, 0)


async def test_hit_refreshes_ttl(tier: RedisTier, raw: redis.asyncio.Redis) -> None:
    async with asyncio.timeout(BOUND_S):
        await tier.aput(FP, make_embedding())
        await raw.expire(key(ENC, FP), 2)
        await asyncio.sleep(0.05)
        assert await raw.ttl(key(ENC, FP)) <= 2
        assert (await tier.aget(ENC, FP, DIM))[0] is Lookup.HIT
        assert await raw.ttl(key(ENC, FP)) >= 3600 - 5


@pytest.mark.parametrize(
    "value",
    [
        b"not msgpack \xff\xfe",
        pickle.dumps({"v": 1, "enc": ENC}),
        encode_value(make_embedding(encoder_id="another-encoder")),
        encode_value(make_embedding(dim=128)),
    ],
    ids=["junk", "pickle", "wrong-encoder", "wrong-dim"],
)
async def test_bad_value_is_a_counted_miss_then_overwritten(
    tier: RedisTier, raw: redis.asyncio.Redis, value: bytes
) -> None:
    async with asyncio.timeout(BOUND_S):
        await raw.set(key(ENC, FP), value)
        assert await tier.aget(ENC, FP, DIM) == (Lookup.MISS, None)
        assert (tier.corrupt, tier.misses, tier.errors) == (1, 1, 0)
        assert tier.breaker.state is BreakerState.CLOSED
        assert await tier.aput(FP, make_embedding())
        assert (await tier.aget(ENC, FP, DIM))[0] is Lookup.HIT


async def test_wrong_type_at_key_is_a_counted_miss(
    tier: RedisTier, raw: redis.asyncio.Redis
) -> None:
    async with asyncio.timeout(BOUND_S):
        await raw.hset(key(ENC, FP), "a", "b")
        assert await tier.aget(ENC, FP, DIM) == (Lookup.MISS, None)
        assert (tier.corrupt, tier.errors) == (1, 0)
        assert await tier.aput(FP, make_embedding())
        assert (await tier.aget(ENC, FP, DIM))[0] is Lookup.HIT


async def test_touch_refreshes_pinned_keys(tier: RedisTier, raw: redis.asyncio.Redis) -> None:
    async with asyncio.timeout(BOUND_S):
        other = Fingerprint("cd" * 32)
        await tier.aput(FP, make_embedding())
        await tier.aput(other, make_embedding(seed=1))
        for fp in (FP, other):
            await raw.expire(key(ENC, fp), 10)
        missing = Fingerprint("ef" * 32)
        assert await tier.atouch([(ENC, FP), (ENC, other), (ENC, missing)]) == [True, True, False]
        for fp in (FP, other):
            assert await raw.ttl(key(ENC, fp)) >= 3600 - 5
        assert not await raw.exists(key(ENC, missing))
        assert await tier.atouch([]) == []


async def test_memory_and_ping(tier: RedisTier) -> None:
    async with asyncio.timeout(BOUND_S):
        used = await tier.aused_memory()
        assert used is not None and used > 100_000
        assert await tier.aping()


# --- outages --------------------------------------------------------------------------------


async def timed(call: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = call()
    if asyncio.iscoroutine(result):
        result = await result
    return result, time.perf_counter() - start


async def test_stopped_redis_is_unavailable_fast_and_then_skipped(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async with asyncio.timeout(BOUND_S):
        tier = RedisTier(redis_server.url, op_timeout_s=0.25, breaker=fast_breaker(60))
        try:
            await tier.aput(FP, make_embedding())
            redis_server.stop()
            for _ in range(3):
                answer, seconds = await timed(lambda: tier.aget(ENC, FP, DIM))
                assert answer == (Lookup.UNAVAILABLE, None)
                assert seconds < SLACK_S  # no retries, no backoff, no default socket timeout
            assert tier.breaker.state is BreakerState.OPEN
            assert tier.errors == 3

            # Open: Redis is not even asked (counted as skipped, not as errors), so it answers
            # "unavailable" even once back up. How fast a skip is belongs to the bench.
            redis_server.start()
            for _ in range(200):
                answer = await tier.aget(ENC, FP, DIM)
                assert answer == (Lookup.UNAVAILABLE, None)
            assert not await tier.aput(FP, make_embedding())
            assert not await tier.alock(ENC, FP, "t")
            assert await tier.await_value(ENC, FP, DIM, timeout_s=1) is None
            assert (tier.errors, tier.skipped) == (3, 203)
        finally:
            await tier.aclose()


async def test_unresponsive_redis_costs_one_op_timeout(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async with asyncio.timeout(BOUND_S):
        tier = RedisTier(redis_server.url, op_timeout_s=0.2, breaker=fast_breaker(60))
        try:
            assert await tier.aping()  # a pooled connection exists before the freeze
            redis_server.pause()
            try:
                for _ in range(3):
                    answer, seconds = await timed(lambda: tier.aget(ENC, FP, DIM))
                    assert answer == (Lookup.UNAVAILABLE, None)
                    # It waited for the op timeout (it cannot end sooner), and not much more.
                    assert 0.15 < seconds < SLACK_S
                assert tier.breaker.state is BreakerState.OPEN
                assert (tier.errors, tier.skipped) == (3, 0)
                assert await tier.aget(ENC, FP, DIM) == (Lookup.UNAVAILABLE, None)
                assert (tier.errors, tier.skipped) == (3, 1)  # not asked: nothing to wait for
            finally:
                redis_server.resume()
        finally:
            await tier.aclose()


async def test_probe_closes_breaker_after_restart(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async with asyncio.timeout(BOUND_S):
        changes: list[tuple[BreakerState, BreakerState]] = []
        closed = asyncio.Event()

        def on_change(old: BreakerState, new: BreakerState) -> None:
            changes.append((old, new))
            if new is BreakerState.CLOSED:
                closed.set()

        breaker = fast_breaker(0.2)
        breaker.on_change = on_change
        tier = RedisTier(redis_server.url, breaker=breaker)
        try:
            assert await tier.aput(FP, make_embedding())
            redis_server.kill()
            while tier.breaker.state is not BreakerState.OPEN:
                await tier.aping()
            redis_server.start()  # same port, empty (no persistence)

            # No traffic: only the background probe can notice Redis is back.
            prober = asyncio.create_task(tier.aprobe_forever(interval_s=0.05))
            try:
                await closed.wait()
            finally:
                prober.cancel()
                await asyncio.gather(prober, return_exceptions=True)
            assert changes[0] == (BreakerState.CLOSED, BreakerState.OPEN)
            assert changes[-1] == (BreakerState.HALF_OPEN, BreakerState.CLOSED)

            assert await tier.aget(ENC, FP, DIM) == (Lookup.MISS, None)
            assert await tier.aput(FP, make_embedding())
            assert (await tier.aget(ENC, FP, DIM))[0] is Lookup.HIT
        finally:
            await tier.aclose()


async def test_traffic_probe_closes_breaker_after_restart(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async with asyncio.timeout(BOUND_S):
        tier = RedisTier(redis_server.url, breaker=fast_breaker(0.1))
        try:
            redis_server.stop()
            for _ in range(3):
                await tier.aget(ENC, FP, DIM)
            assert tier.breaker.state is BreakerState.OPEN
            redis_server.start()
            await asyncio.sleep(0.15)
            assert await tier.aput(FP, make_embedding())  # the probe
            assert tier.available
            assert (await tier.aget(ENC, FP, DIM))[0] is Lookup.HIT
        finally:
            await tier.aclose()


# --- cross-process single flight ------------------------------------------------------------


async def test_lock_is_exclusive_and_token_checked(
    tier: RedisTier, raw: redis.asyncio.Redis
) -> None:
    async with asyncio.timeout(BOUND_S):
        assert lock_key(ENC, FP) == f"livevoice:v1:lock:{ENC}:{FP}"
        assert await tier.alock(ENC, FP, "token-a")
        assert not await tier.alock(ENC, FP, "token-b")
        assert not await tier.aunlock(ENC, FP, "token-b")
        assert await raw.get(lock_key(ENC, FP)) == b"token-a"
        assert 0 < await raw.pttl(lock_key(ENC, FP)) <= 3_000
        assert await tier.aunlock(ENC, FP, "token-a")
        assert not await raw.exists(lock_key(ENC, FP))
        assert await tier.alock(ENC, FP, "token-b")


async def test_lock_expires_after_its_ttl(
    redis_server: RedisServer,  # noqa: F811
    raw: redis.asyncio.Redis,
) -> None:
    async with asyncio.timeout(BOUND_S):
        tier = RedisTier(redis_server.url, lock_ttl_ms=150)
        try:
            assert await tier.alock(ENC, FP, "token-a")
            assert 0 < await raw.pttl(lock_key(ENC, FP)) <= 150
            while await raw.exists(lock_key(ENC, FP)):  # Redis expires it; bounded by BOUND_S
                await asyncio.sleep(0.02)
            assert await tier.alock(ENC, FP, "token-b")
            assert not await tier.aunlock(ENC, FP, "token-a")  # too late to release b's
        finally:
            await tier.aclose()


async def test_await_value_gets_what_the_holder_puts(redis_server: RedisServer) -> None:  # noqa: F811
    async with asyncio.timeout(BOUND_S):
        holder = RedisTier(redis_server.url)
        waiter = RedisTier(redis_server.url)  # as if another process
        emb = make_embedding()

        try:
            assert await holder.alock(ENC, FP, "holder")
            assert not await waiter.alock(ENC, FP, "waiter")
            # Its timeout is past the test's bound: a None could only come from the lock.
            waiting = asyncio.create_task(waiter.await_value(ENC, FP, DIM, timeout_s=60))
            await asyncio.sleep(0.1)  # a few polls while the lock is held and no value is there
            assert not waiting.done()
            assert await holder.aput(FP, emb)
            assert await holder.aunlock(ENC, FP, "holder")
            got = await waiting
            assert isinstance(got, Embedding)
            np.testing.assert_array_equal(got.vector, emb.vector)
        finally:
            await holder.aclose()
            await waiter.aclose()


async def test_await_value_gives_up_when_the_lock_expires_empty(
    redis_server: RedisServer,  # noqa: F811
    raw: redis.asyncio.Redis,
) -> None:
    async with asyncio.timeout(BOUND_S):
        tier = RedisTier(redis_server.url, lock_ttl_ms=200)
        try:
            assert await tier.alock(ENC, FP, "a-holder-that-dies")
            # A timeout past the test's bound: the None comes from the lock lapsing.
            assert await tier.await_value(ENC, FP, DIM, timeout_s=60) is None
            assert not await raw.exists(lock_key(ENC, FP))
        finally:
            await tier.aclose()


async def test_await_value_times_out_and_returns_none_at_once_without_a_lock(
    tier: RedisTier, raw: redis.asyncio.Redis
) -> None:
    async with asyncio.timeout(BOUND_S):
        # No lock: nobody is computing it. A wait would outlast the test's bound.
        assert await tier.await_value(ENC, FP, DIM, timeout_s=60) is None
        assert await tier.alock(ENC, FP, "holder")
        got, seconds = await timed(lambda: tier.await_value(ENC, FP, DIM, timeout_s=0.2))
        assert got is None and seconds >= 0.15
        assert await raw.exists(lock_key(ENC, FP))  # its own timeout ended it, not the lock


# --- tenants' voice records ------------------------------------------------------------------


async def test_a_voice_record_is_read_back_only_by_its_tenant(
    tier: RedisTier, raw: redis.asyncio.Redis
) -> None:
    """Ids live in a Redis every tenant's servers share; the tier itself must refuse another
    tenant's record (a server's own check is not enough: the next server reads Redis)."""
    async with asyncio.timeout(BOUND_S):
        record = VoiceRecord("v_0123456789abcdef01234567", FP, "alice's voice", 5.5)
        assert await tier.aput_record("alice", record)
        assert await raw.exists(f"livevoice:v1:voice:{record.voice_id}")
        assert await tier.aget_record("alice", record.voice_id) == (Lookup.HIT, record)
        assert await tier.aget_record("bob", record.voice_id) == (Lookup.MISS, None)
        assert await tier.aget_record("", record.voice_id) == (Lookup.MISS, None)
        # Still alice's after bob asked: asking is not taking.
        assert await tier.aget_record("alice", record.voice_id) == (Lookup.HIT, record)


# --- passwords ------------------------------------------------------------------------------

PASSWORD = "s3cret-Pa55word"


async def test_await_value_does_not_wait_on_a_lock_this_process_left(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async with asyncio.timeout(BOUND_S):
        tier = RedisTier(redis_server.url, lock_ttl_ms=30_000)
        try:
            assert await tier.alock(ENC, FP, "me0123:flight")
            # Lock and timeout both outlast the test's bound: only "it is ours" can end this.
            got = await tier.await_value(ENC, FP, DIM, timeout_s=60, own_prefix="me0123")
            assert got is None
            got, seconds = await timed(
                lambda: tier.await_value(ENC, FP, DIM, timeout_s=0.3, own_prefix="other")
            )
            assert got is None and seconds >= 0.3  # someone else's lock is waited on
        finally:
            await tier.aclose()


class CountingEmbedder:
    """Stands in for the encoder worker where only "was it called, and when" matters."""

    encoder_id = ENC
    dim = DIM

    def __init__(self) -> None:
        self.calls = 0
        self.during_call: Callable[[], Awaitable[None]] | None = None

    async def aembed(self, pcm16k: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.during_call is not None:
            await self.during_call()
        return make_embedding(seed=self.calls).vector


async def test_store_computes_at_once_past_a_lock_it_left_itself(
    redis_server: RedisServer,  # noqa: F811
    raw: redis.asyncio.Redis,
) -> None:
    """A flight whose value and unlock never reached Redis (Redis blinked) leaves this store's
    own lock behind for its whole TTL. The next registration of that voice must compute at
    once, not wait ``lock_wait_s`` for a value nobody will store (the outage benchmark once
    saw registrations stall this way for the full wait)."""
    clip = canonicalize(wav_bytes(*reference_clip("piper")))
    held = lock_key(ENC, clip.fingerprint)
    embedder = CountingEmbedder()
    token: list[bytes] = []

    async def note_token() -> None:
        token.append(await raw.get(held))

    embedder.during_call = note_token
    tier = RedisTier(redis_server.url, lock_ttl_ms=30_000)
    # No L1 to hide behind: an unpinned entry leaves it as soon as it is stored.
    store = VoiceStore(embedder, tier=tier, lock_wait_s=20.0, l1_capacity=0)
    try:
        async with asyncio.timeout(BOUND_S):
            first = await store.aresolve(clip)
            assert first.source is VoiceSource.ENCODER and token and token[0]
            # Stage the blink: the value never landed and the lock, with the store's own
            # token, was never released.
            await raw.delete(key(ENC, clip.fingerprint))
            await raw.set(held, token[0], px=30_000)

        # A wait would last lock_wait_s (20 s), twice this bound: unmistakable, not a race.
        async with asyncio.timeout(BOUND_S):
            again = await store.aresolve(clip)
        assert again.source is VoiceSource.ENCODER
        assert embedder.calls == 2
        assert await raw.get(held) == token[0]  # it did not wait for the lock to lapse either
    finally:
        await tier.aclose()


async def test_a_restart_costs_one_failed_call_not_a_pool_of_stale_connections(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """After a Redis restart every pooled connection is dead, but a pool hands out the most
    recently returned connection first: quiet traffic keeps reusing the one it repaired, and the
    next burst meets the stale rest, each failing once. Without dropping idle connections on
    the first connection error, a burst of 32 failed 31 calls and opened the breaker: a second
    outage long after Redis was back (the outage benchmark saw the breaker flap this way)."""
    async with asyncio.timeout(BOUND_S):
        changes: list[tuple[BreakerState, BreakerState]] = []
        breaker = CircuitBreaker(failure_threshold=3, reset_after=60, name="redis")
        breaker.on_change = lambda old, new: changes.append((old, new))
        tier = RedisTier(redis_server.url, breaker=breaker)
        try:
            # A burst fills the pool with 32 connections; then Redis restarts under them.
            await asyncio.gather(*(tier.aput(FP, make_embedding()) for _ in range(32)))
            redis_server.kill()
            await asyncio.to_thread(redis_server.start)  # same port, empty

            # Quiet traffic: the first call may find its connection dead; the rest work.
            quiet = [(await tier.aget(ENC, FP, DIM))[0] for _ in range(5)]
            assert quiet[1:] == [Lookup.MISS] * 4, quiet
            # The next burst takes connections from deep in the pool.
            burst = await asyncio.gather(*(tier.aget(ENC, FP, DIM) for _ in range(32)))
            assert [lookup for lookup, _ in burst] == [Lookup.MISS] * 32
            assert tier.errors <= 1
            assert changes == [], "the breaker opened after Redis was back"
        finally:
            await tier.aclose()


async def test_password_in_url_works() -> None:
    async with asyncio.timeout(BOUND_S):
        with RedisServer(password=PASSWORD) as server:
            tier = RedisTier(server.url)
            try:
                assert PASSWORD not in tier.display_url and ":***@" in tier.display_url
                assert await tier.aput(FP, make_embedding())
                assert (await tier.aget(ENC, FP, DIM))[0] is Lookup.HIT
            finally:
                await tier.aclose()


@pytest.mark.parametrize("userinfo", [":wrong-Pa55word@", ""], ids=["wrong", "none"])
async def test_bad_password_degrades_with_one_log_line(
    caplog: pytest.LogCaptureFixture, userinfo: str
) -> None:
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(BOUND_S):
        with RedisServer(password=PASSWORD) as server:
            tier = RedisTier(f"redis://{userinfo}127.0.0.1:{server.port}/0", breaker=fast_breaker())
            try:
                for _ in range(5):
                    assert await tier.aget(ENC, FP, DIM) == (Lookup.UNAVAILABLE, None)
                    assert not await tier.aput(FP, make_embedding())
                    await asyncio.sleep(0.06)
                    assert not await tier.aping()
                assert tier.breaker.state is not BreakerState.CLOSED
            finally:
                await tier.aclose()
    auth_lines = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(auth_lines) == 1
    assert "running without the Redis tier" in auth_lines[0].getMessage()
    assert "wrong-Pa55word" not in caplog.text and PASSWORD not in caplog.text
