"""Upload aliases: the exact bytes of a clip seen before skip decoding; new bytes are decoded and
resolved by content as always. And the count of near-duplicate voices (micro-variants).

Against the real speaker encoder and a real redis-server; the decoder is wrapped only to count
(or forbid) its calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest

from live.audio import CanonicalClip, ClipQuality, canonicalize, upload_digest
from live.encoder import EncoderWorker, SpeakerEncoder
from live.metrics import Metrics
from live.redis_tier import RedisTier, alias_key
from live.voices import ResolvedVoice, VoiceSource, VoiceStore
from protocol.errors import ClipTooLong
from protocol.messages import VoiceReady
from tests.clips import flac_bytes, quantize, reference_clip, reference_wav, wav_bytes
from tests.fakes import GatedEngine
from tests.redis_server import RedisServer
from tests.server import live_server, raw_client

pytestmark = pytest.mark.timeout(120)

LIMITS = {"min_s": 1.0, "max_s": 30.0}


class CountingDecoder:
    """``canonicalize`` as the store runs it, counting calls; ``forbid`` makes a call fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.forbid = False

    async def __call__(self, data: bytes) -> CanonicalClip:
        assert not self.forbid, "the decoder was called for bytes seen before"
        self.calls += 1
        return canonicalize(data, **LIMITS)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def stores(
    encoder: SpeakerEncoder, redis_url: str | None, count: int = 1
) -> AsyncIterator[list[VoiceStore]]:
    """``count`` stores (as on ``count`` servers) sharing one Redis, each with its own L1."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for _ in range(count):
            worker = EncoderWorker(encoder)
            stack.push_async_callback(worker.aclose)
            tier = None
            if redis_url is not None:
                tier = RedisTier(redis_url)
                stack.push_async_callback(tier.aclose)
            out.append(VoiceStore(worker, tier=tier, metrics=Metrics()))
        yield out


def resolve(
    store: VoiceStore, data: bytes, decoder: Callable[[bytes], Awaitable[CanonicalClip]]
) -> Awaitable[tuple[ResolvedVoice, ClipQuality]]:
    return store.aresolve_upload(data, adecode=decoder, **LIMITS)


async def test_the_same_bytes_skip_the_decoder_here_and_on_another_server(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    data = reference_wav()
    decoder = CountingDecoder()
    async with stores(speaker_encoder, redis_server.url, count=2) as (a, b):
        first, quality = await a.aresolve_upload(data, adecode=decoder, **LIMITS)
        assert (first.source, decoder.calls) == (VoiceSource.ENCODER, 1)

        decoder.forbid = True
        again, quality_again = await a.aresolve_upload(data, adecode=decoder, **LIMITS)
        assert again.source is VoiceSource.L1
        assert again.fingerprint == first.fingerprint
        assert quality_again == quality  # voice.ready says what the decode said
        assert _value(a.metrics, "livevoice_upload_aliases_total", outcome="l1") == 1

        # Another server: the alias and the embedding both come from Redis.
        there, quality_there = await b.aresolve_upload(data, adecode=decoder, **LIMITS)
        assert there.source is VoiceSource.REDIS
        assert there.fingerprint == first.fingerprint and quality_there == quality
        assert np.array_equal(there.embedding.vector, first.embedding.vector)
        assert _value(b.metrics, "livevoice_upload_aliases_total", outcome="redis") == 1
        assert (a.encoder_calls, b.encoder_calls) == (1, 0)

        tier = a.tier
        assert tier is not None
        ttl = await tier._client.ttl(alias_key(upload_digest(data)))
        assert tier.ttl_s - 60 < ttl <= tier.ttl_s  # the embeddings' TTL


async def test_other_bytes_are_decoded_and_the_same_samples_still_hit_by_content(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    pcm, sr = reference_clip()
    samples = quantize(pcm)
    as_wav, as_flac = wav_bytes(samples, sr), flac_bytes(samples, sr)
    decoder = CountingDecoder()
    async with stores(speaker_encoder, redis_server.url) as (store,):
        first, _ = await resolve(store, as_wav, decoder)
        # Same samples in another container: new bytes, so decoded; same content, so no encoder.
        other, _ = await resolve(store, as_flac, decoder)
        assert decoder.calls == 2
        assert other.fingerprint == first.fingerprint and other.source is VoiceSource.L1
        assert store.encoder_calls == 1

        # One changed byte in the audio (the last sample's low byte): decoded, a new content.
        changed = bytearray(as_wav)
        changed[-2] ^= 0x01
        third, _ = await resolve(store, bytes(changed), decoder)
        assert decoder.calls == 3
        assert third.fingerprint != first.fingerprint and third.source is VoiceSource.ENCODER


async def test_an_alias_is_not_followed_past_its_embedding_or_the_limits(
    speaker_encoder: SpeakerEncoder,
) -> None:
    data = reference_wav()
    decoder = CountingDecoder()
    async with stores(speaker_encoder, None) as (store,):
        resolved, _ = await resolve(store, data, decoder)
        record = await store.aremember("alice", resolved, "mine")

        # Stricter limits than when the alias was made: decoded, and refused as the decode says.
        short_limit = canonicalize(data).duration_s - 0.5
        with pytest.raises(ClipTooLong):
            await store.aresolve_upload(data, adecode=None, min_s=1.0, max_s=short_limit)

        # Deleted: the alias goes with the content; the same bytes are decoded and embedded anew.
        await store.adelete("alice", record.voice_id)
        assert len(store.aliases) == 0
        again, _ = await resolve(store, data, decoder)
        assert again.source is VoiceSource.ENCODER
        assert decoder.calls == 2
        # Misses: the first upload, the one past the limits, the one after the delete.
        assert _value(store.metrics, "livevoice_upload_aliases_total", outcome="miss") == 3


async def test_a_micro_variant_of_a_tenants_voice_is_counted(
    speaker_encoder: SpeakerEncoder,
) -> None:
    pcm, sr = reference_clip()
    base = quantize(pcm).astype(np.int32)
    noise = np.random.default_rng(12).integers(-1, 2, size=base.shape)
    variant = wav_bytes(np.clip(base + noise, -32768, 32767).astype(np.int16), sr)
    other_voice = wav_bytes(*reference_clip("espeak"))
    decoder = CountingDecoder()

    def near_duplicates(store: VoiceStore) -> float:
        return _value(store.metrics, "livevoice_voice_near_duplicates_total")

    async with stores(speaker_encoder, None) as (store,):

        async def register(tenant: str, data: bytes) -> bool:
            resolved, _ = await resolve(store, data, decoder)
            counted = store.count_near_duplicate(tenant, resolved)
            await store.aremember(tenant, resolved, None)
            return counted

        assert not await register("alice", wav_bytes(base.astype(np.int16), sr))
        assert not await register("alice", other_voice)  # another speaker: not a variant
        assert not await register("alice", other_voice)  # the same clip again: a cache hit
        assert near_duplicates(store) == 0
        # ±1 LSB of noise: a new content (an encoder call), within cosine 0.99 of her voice.
        assert await register("alice", variant)
        assert near_duplicates(store) == 1
        assert store.encoder_calls == 3
        # Another tenant with no voice of hers: no variant of anything, and a cache hit anyway.
        assert not await register("bob", variant)
        assert near_duplicates(store) == 1


async def test_reregistering_over_the_socket_skips_the_decode(
    encoder_worker: EncoderWorker, redis_server: RedisServer
) -> None:
    """End to end: the same voice.ready (id, quality) for the same bytes, from the alias."""
    data = reference_wav()
    async with (
        live_server(
            embedder=encoder_worker, engine=GatedEngine(auto=True), redis_url=redis_server.url
        ) as srv,
        raw_client(srv) as client,
    ):
        first = await client.aregister(data, name="me")
        second = await client.aregister(data, name="me")
        assert isinstance(first, VoiceReady) and isinstance(second, VoiceReady)
        assert (first.source, second.source) == ("encoder", "l1")
        assert second.voice_id == first.voice_id
        assert second.quality == first.quality and second.duration_s == first.duration_s
        metrics = srv.services.metrics
        assert _value(metrics, "livevoice_upload_aliases_total", outcome="l1") == 1
        assert _value(metrics, "livevoice_upload_aliases_total", outcome="miss") == 1


async def test_the_same_record_again_is_written_behind_its_answer_and_a_delete_waits_for_it(
    speaker_encoder: SpeakerEncoder, redis_server: RedisServer
) -> None:
    from live.redis_tier import record_key
    from tests.server import until_true

    data = reference_wav()
    async with stores(speaker_encoder, redis_server.url) as (store,):
        assert store.tier is not None
        redis = store.tier._client
        resolved, _ = await resolve(store, data, CountingDecoder())
        record = await store.aremember("alice", resolved, "mine")
        key = record_key(record.voice_id)
        assert await redis.exists(key)  # a new record is in Redis before the answer

        # Lost in Redis without this server hearing of it (a missed purge): the same clip
        # registered again is answered from here, and the record written back behind it.
        await redis.delete(key)
        again = await store.aremember("alice", resolved, "mine")
        assert again == record
        await until_true(lambda: not store._rewrites, "the record written again")
        assert await redis.exists(key)

        # Registered again and deleted at once: the delete waits for the write behind the
        # answer, so the record does not come back.
        await store.aremember("alice", resolved, "mine")
        assert store._rewrites
        await store.adelete("alice", record.voice_id)
        await until_true(lambda: not store._rewrites, "no write left")
        assert not await redis.exists(key)
