"""The voice store: content-addressed speaker embeddings behind L1, Redis and the encoder.

``VoiceStore.aresolve`` turns a canonical clip into a pinned embedding with at most one encoder
call per distinct content (single-flight in process, a Redis lock across processes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np

from protocol.errors import (
    ClipNeeded,
    EncoderBusy,
    EncoderFailed,
    VoiceNotFound,
    VoiceUnavailable,
)

from .audio import (
    CanonicalClip,
    ClipQuality,
    UploadAlias,
    UploadDigest,
    alias_digest,
    canonicalize,
    upload_digest,
)
from .matching import analyse_apart
from .metrics import Metrics
from .redis_tier import Lookup, RedisTier
from .values import (
    Embedding,
    Fingerprint,
    Purge,
    ResolvedVoice,
    VoiceProfile,
    VoiceRecord,
    VoiceSource,
)

# The value types' old home: the session and the engines still import them from here.
__all__ = [
    "NEAR_DUPLICATE_COSINE",
    "Embedder",
    "Embedding",
    "EmbeddingL1",
    "Purge",
    "ResolvedVoice",
    "UploadAliases",
    "VoiceRecord",
    "VoiceSource",
    "VoiceStore",
    "voice_id_for",
]

log = logging.getLogger(__name__)

NEAR_DUPLICATE_COSINE = 0.99
"""An upload whose new embedding is this close to one of its tenant's voices is a micro-variant
of it (a re-encode, a trim, added noise): it cost an encoder call the cache could not save."""
_HASH_INLINE_BYTES = 1 << 20
"""Uploads up to this size are hashed on the event loop (~0.6 ms for 1 MiB with SHA-NI; a
thread hop costs about as much); larger ones in a thread."""


class Embedder(Protocol):
    """The speaker encoder as the store sees it (``live.encoder.EncoderWorker``)."""

    @property
    def encoder_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    async def aembed(self, pcm16k: np.ndarray) -> np.ndarray: ...


class EmbeddingL1:
    """In-process LRU of ``capacity`` unpinned entries; entries pinned by a live session are
    never evicted.

    Embeddings are content-addressed and immutable, so entries never need invalidation.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Fingerprint, Embedding] = OrderedDict()
        self._pins: dict[Fingerprint, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, fp: Fingerprint) -> Embedding | None:
        emb = self._entries.get(fp)
        if emb is not None:
            self._entries.move_to_end(fp)
        return emb

    def peek(self, fp: Fingerprint) -> Embedding | None:
        """The entry without making it recently used (a scan must not reorder the LRU)."""
        return self._entries.get(fp)

    def put(self, fp: Fingerprint, emb: Embedding) -> None:
        self._entries[fp] = emb
        self._entries.move_to_end(fp)
        self._evict()

    def pin(self, fp: Fingerprint) -> None:
        self._pins[fp] = self._pins.get(fp, 0) + 1

    def discard(self, fp: Fingerprint) -> None:
        """Remove an entry even if pinned: a purge of personal data wins over pinning."""
        self._entries.pop(fp, None)

    def unpin(self, fp: Fingerprint) -> None:
        count = self._pins.get(fp, 0) - 1
        if count > 0:
            self._pins[fp] = count
        else:
            self._pins.pop(fp, None)
            self._evict()

    @property
    def pinned(self) -> set[Fingerprint]:
        return set(self._pins)

    def _evict(self) -> None:
        """Drop least recently used unpinned entries until those fit the capacity.

        Pinned entries do not count: they are bounded by the live sessions holding them.
        """
        pinned_here = sum(1 for fp in self._pins if fp in self._entries)
        excess = len(self._entries) - pinned_here - self.capacity
        if excess <= 0:
            return
        # Oldest first, skipping pinned ones; only as far as needed (no copy of every key).
        victims: list[Fingerprint] = []
        for fp in self._entries:
            if fp not in self._pins:
                victims.append(fp)
                if len(victims) == excess:
                    break
        for fp in victims:
            del self._entries[fp]


class UploadAliases:
    """In-process LRU of upload digests → what their decode gave (``UploadAlias``), in front of
    the same aliases in Redis.

    An alias only says which content some exact bytes decode to; the content fingerprint stays
    the truth. It is followed only while that content's embedding is still cached, so an alias
    never outlives a purge in effect; the purge drops the aliases here too (they name deleted
    audio), and those in Redis expire with the embeddings' TTL.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[UploadDigest, UploadAlias] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: UploadDigest) -> UploadAlias | None:
        alias = self._entries.get(digest)
        if alias is not None:
            self._entries.move_to_end(digest)
        return alias

    def put(self, digest: UploadDigest, alias: UploadAlias) -> None:
        self._entries[digest] = alias
        self._entries.move_to_end(digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def forget(self, fp: Fingerprint) -> None:
        """Drop every alias leading to ``fp`` (a scan: purges are rare)."""
        for digest in [d for d, a in self._entries.items() if a.fingerprint == fp]:
            del self._entries[digest]


def voice_id_for(tenant: str, fp: Fingerprint) -> str:
    """Tenant-scoped id: the same clip registered twice by one tenant keeps its id, and the id
    reveals nothing about the fingerprint (it is keyed by the tenant)."""
    digest = hashlib.blake2b(fp.encode(), key=tenant.encode()[:64], digest_size=12).hexdigest()
    return f"v_{digest}"


class VoiceStore:
    def __init__(
        self,
        embedder: Embedder,
        *,
        l1_capacity: int = 10_000,
        tier: RedisTier | None = None,
        metrics: Metrics | None = None,
        lock_wait_s: float = 3.0,
        max_encoder_jobs: int = 64,
        profiler: Callable[[np.ndarray], VoiceProfile | None] | None = analyse_apart,
    ) -> None:
        self.embedder = embedder
        self.profiler = profiler
        """Measures a clip's voice profile (pitch, formants, pace) beside its embedding, off
        the event loop; None stores no profiles (nothing is matched)."""
        self.l1 = EmbeddingL1(l1_capacity)
        self.aliases = UploadAliases(l1_capacity)
        self.tier = tier
        self.metrics = metrics or Metrics()
        self.lock_wait_s = lock_wait_s
        self.max_encoder_jobs = max_encoder_jobs
        self._flights: dict[Fingerprint, asyncio.Task[tuple[Embedding, VoiceSource]]] = {}
        # Bounded like the L1: an id dropped here is found again in Redis when there is one.
        self._records: OrderedDict[tuple[str, str], VoiceRecord] = OrderedDict()
        self.records_capacity = max(l1_capacity, 10_000)
        self._refs: dict[Fingerprint, set[str]] = {}
        """Without Redis: the voice ids (any tenant) kept here for each content."""
        self._unsaved: OrderedDict[tuple[str, str], VoiceRecord] = OrderedDict()
        """Records Redis did not take (down, or full): written again when it answers, so an id
        handed to a client is never lost to the other servers."""
        self._rewrites: dict[tuple[str, str], asyncio.Task[None]] = {}
        """Records written again after their answer (``aremember``), until Redis has them."""
        self.purge_listeners: set[Callable[[Purge], None]] = set()
        self.encoder_calls = 0

    # --- resolving --------------------------------------------------------------------------
    async def aresolve(self, clip: CanonicalClip) -> ResolvedVoice:
        """The embedding for a clip: L1, then Redis, then the encoder (once per content)."""
        start = time.perf_counter()
        fp = clip.fingerprint
        emb = self.l1.get(fp)
        if emb is not None and (emb.profile is not None or self.profiler is None):
            return self._resolved(fp, emb, VoiceSource.L1, start)
        flight = self._flights.get(fp)
        if flight is None:
            if len(self._flights) >= self.max_encoder_jobs:
                raise EncoderBusy(
                    f"{len(self._flights)} voices are being computed; register again shortly"
                )
            # The lookup is its own task so that a caller who goes away (a closed socket)
            # does not cancel it for everyone else waiting on the same content.
            flight = asyncio.ensure_future(self._alookup(clip))
            self._flights[fp] = flight
            flight.add_done_callback(self._landed)
        try:
            result = await asyncio.shield(flight)
        except (EncoderFailed, EncoderBusy):
            raise
        except Exception as exc:
            log.exception("voice lookup failed for %s", fp[:12])
            raise EncoderFailed("the voice could not be resolved") from exc
        emb, source = result
        return self._resolved(fp, emb, source, start)

    def _landed(self, flight: asyncio.Task[tuple[Embedding, VoiceSource]]) -> None:
        for fp, task in list(self._flights.items()):
            if task is flight:
                del self._flights[fp]
        if not flight.cancelled():
            flight.exception()  # marks it retrieved even when every waiter went away

    def _resolved(
        self, fp: Fingerprint, emb: Embedding, source: VoiceSource, start: float
    ) -> ResolvedVoice:
        seconds = time.perf_counter() - start
        self.metrics.lookups.labels(source.value).inc()
        self.metrics.lookup_seconds.labels(source.value).observe(seconds)
        return ResolvedVoice(fp, emb, source, seconds, emb.profile)

    async def _alookup(self, clip: CanonicalClip) -> tuple[Embedding, VoiceSource]:
        found = self.l1.get(clip.fingerprint)
        if found is not None:  # cached before profiles existed: only the profile is missing
            return await self._awith_profile(clip, found), VoiceSource.L1
        if self.tier is None:
            emb = await self._aencode(clip)
            self.l1.put(clip.fingerprint, emb)
            return emb, VoiceSource.ENCODER
        # One walk through the tier: it asks Redis, and if nobody has the value, computes it
        # once across the servers sharing that Redis (lock, or wait for the holder's value).
        emb, computed = await self.tier.aget_or_compute(
            self.embedder.encoder_id,
            clip.fingerprint,
            self.embedder.dim,
            lambda: self._aencode(clip),
            wait_s=self.lock_wait_s,
        )
        if not computed and emb.profile is None and self.profiler is not None:
            emb = await self._awith_profile(clip, emb)
        self.l1.put(clip.fingerprint, emb)
        return emb, VoiceSource.ENCODER if computed else VoiceSource.REDIS

    async def _awith_profile(self, clip: CanonicalClip, emb: Embedding) -> Embedding:
        """A value cached before profiles existed, completed from the clip and written again
        (L1 and Redis), so the next lookup of this content finds it whole."""
        profile = await self._aprofile(clip)
        if profile is None:
            return emb
        emb = dataclasses.replace(emb, profile=profile)
        self.l1.put(clip.fingerprint, emb)
        if self.tier is not None:
            await self.tier.aput(clip.fingerprint, emb)
        return emb

    async def _aprofile(self, clip: CanonicalClip) -> VoiceProfile | None:
        """The clip's voice profile, or None: a clip that defeats the analysis is still a
        voice, spoken unmatched."""
        if self.profiler is None:
            return None
        try:
            return await asyncio.to_thread(self.profiler, clip.pcm)
        except Exception:
            log.exception("voice profile failed on %s", clip.fingerprint[:12])
            return None

    async def _aencode(self, clip: CanonicalClip) -> Embedding:
        start = time.perf_counter()
        self.encoder_calls += 1
        self.metrics.encoder_calls.inc()
        profiling = asyncio.ensure_future(self._aprofile(clip))
        try:
            vector = await self.embedder.aembed(clip.pcm)
        except Exception as exc:
            profiling.cancel()
            self.metrics.encoder_failures.inc()
            log.exception("speaker encoder failed on %s", clip.fingerprint[:12])
            raise EncoderFailed("the speaker encoder failed on this clip") from exc
        self.metrics.encoder_seconds.observe(time.perf_counter() - start)
        emb = Embedding(
            np.asarray(vector, dtype=np.float32),
            self.embedder.encoder_id,
            clip.duration_s,
            time.time(),
            await profiling,
        )
        return emb

    # --- uploads: exact bytes seen before skip the decode -----------------------------------
    async def aresolve_upload(
        self,
        data: bytes,
        *,
        min_s: float,
        max_s: float,
        adecode: Callable[[bytes], Awaitable[CanonicalClip]] | None = None,
    ) -> tuple[ResolvedVoice, ClipQuality]:
        """The embedding for an uploaded clip and the clip's quality.

        Bytes seen before (here or by any server sharing Redis) go straight to their content's
        fingerprint: no decode, no resampling, no voice checks (all deterministic, and their
        outcome is kept in the alias). New bytes are decoded (``adecode``; by default
        ``canonicalize`` in a thread) and resolved by content as always, which also catches
        the same samples in another file; their alias is then remembered.
        """
        start = time.perf_counter()
        if len(data) <= _HASH_INLINE_BYTES:
            digest = upload_digest(data)
        else:
            digest = await asyncio.to_thread(upload_digest, data)
        known = await self._afollow(digest, min_s, max_s, start)
        if known is not None:
            resolved, alias = known
            return resolved, alias.quality
        if adecode is None:
            clip = await asyncio.to_thread(canonicalize, data, min_s=min_s, max_s=max_s)
        else:
            clip = await adecode(data)
        resolved = await self.aresolve(clip)
        fresh = UploadAlias.of(clip)
        self.aliases.put(digest, fresh)
        if self.tier is not None:
            await self.tier.aput_alias(digest, fresh.encode())
        return resolved, clip.quality

    async def aresolve_sent(
        self, tenant: str, sha256: bytes, *, min_s: float, max_s: float
    ) -> tuple[ResolvedVoice, ClipQuality]:
        """The embedding and quality of a clip this tenant uploaded before, known by the SHA-256
        of its bytes alone (``voice.register`` with ``sha256``: no upload); never decodes or
        computes.

        ``ClipNeeded`` unless the bytes' alias, their content's embedding *and* this tenant's
        voice record for that content are all still known: a hash proves nothing about holding
        the audio, a record says the tenant sent it (registering still requires the audio,
        once). Another tenant's bytes, deleted or expired voices and a Redis that does not
        answer all get the same answer — send the clip.
        """
        start = time.perf_counter()
        known = await self._afollow(alias_digest(sha256), min_s, max_s, start)
        if known is not None:
            resolved, alias = known
            voice_id = voice_id_for(tenant, resolved.fingerprint)
            record = self.record(tenant, voice_id)
            if record is None and self.tier is not None:
                _, record = await self.tier.aget_record(tenant, voice_id)
                if record is not None:
                    self._keep_record(tenant, record)
            if record is not None and record.fingerprint == resolved.fingerprint:
                return resolved, alias.quality
        raise ClipNeeded("these bytes are not a voice of this tenant here: send the clip")

    async def _afollow(
        self, digest: UploadDigest, min_s: float, max_s: float, start: float
    ) -> tuple[ResolvedVoice, UploadAlias] | None:
        """The cached embedding an upload's alias leads to (L1, then Redis), or None: no alias,
        out of the limits, or its embedding is gone (counted as ``stale``)."""
        alias, where = self.aliases.get(digest), "l1"
        if alias is None and self.tier is not None:
            raw = await self.tier.aget_alias(digest)
            alias, where = (UploadAlias.decode(raw) if raw is not None else None), "redis"
        if alias is not None and min_s <= alias.duration_s <= max_s:
            resolved = await self._aknown(alias.fingerprint, start)
            if resolved is not None:
                self.metrics.upload_aliases.labels(where).inc()
                if where == "redis":
                    self.aliases.put(digest, alias)
                return resolved, alias
            where = "stale"  # its embedding is gone (expired, or purged): decode again
        else:
            where = "miss"
        self.metrics.upload_aliases.labels(where).inc()
        return None

    async def _aknown(self, fp: Fingerprint, start: float) -> ResolvedVoice | None:
        """The cached embedding of a content, from L1 or Redis; never computes."""
        emb = self.l1.get(fp)
        if emb is not None:
            return self._resolved(fp, emb, VoiceSource.L1, start)
        if self.tier is None:
            return None
        _, emb = await self.tier.aget(self.embedder.encoder_id, fp, self.embedder.dim)
        if emb is None:
            return None
        self.l1.put(fp, emb)
        return self._resolved(fp, emb, VoiceSource.REDIS, start)

    def count_near_duplicate(self, tenant: str, resolved: ResolvedVoice) -> bool:
        """Count (``livevoice_voice_near_duplicates``) a new content the encoder just embedded
        that lands within cosine ``NEAR_DUPLICATE_COSINE`` of a voice the tenant already has
        here: a micro-variant that dodged the cache. True when it did.

        Only encoder results are compared (a cache hit dodged nothing), against the tenant's
        voices this server holds with their embeddings in L1.
        """
        if resolved.source is not VoiceSource.ENCODER:
            return False
        fp = resolved.fingerprint
        theirs = {r.fingerprint for (t, _), r in self._records.items() if t == tenant}
        if fp in theirs:
            return False
        vectors = [emb.vector for f in theirs if (emb := self.l1.peek(f)) is not None]
        if not vectors:
            return False
        closest = float(np.max(np.stack(vectors) @ resolved.embedding.vector))
        if closest < NEAR_DUPLICATE_COSINE:
            return False
        self.metrics.near_duplicates.inc()
        log.info("a near-duplicate voice (cosine %.4f) for tenant %s", closest, tenant[:40])
        return True

    # --- tenant voices ----------------------------------------------------------------------
    async def aremember(
        self, tenant: str, resolved: ResolvedVoice, name: str | None
    ) -> VoiceRecord:
        """The tenant's id for this voice, kept here and (when configured) in Redis.

        A new record is in Redis before this returns (the id answered works on every server).
        The same record again (the same clip registered again: this server wrote it, or read
        it, and has heard of no deletion since) is answered at once and written again behind
        the answer: it is already there, and the write only heals a deletion this server
        missed. A deletion waits for that write, so it cannot bring the record back.
        """
        record = VoiceRecord(
            voice_id_for(tenant, resolved.fingerprint),
            resolved.fingerprint,
            name,
            resolved.embedding.duration_s,
        )
        where = (tenant, record.voice_id)
        known = self._records.get(where) == record and where not in self._unsaved
        self._keep_record(tenant, record)
        if self.tier is None:
            return record
        if known:
            if where not in self._rewrites:
                task = asyncio.create_task(self._aput_record(tenant, record))
                self._rewrites[where] = task
                task.add_done_callback(lambda _: self._rewrites.pop(where, None))
            return record
        await self._aput_record(tenant, record)
        return record

    async def _aput_record(self, tenant: str, record: VoiceRecord) -> None:
        assert self.tier is not None
        if not await self.tier.aput_record(tenant, record):
            self._unsaved[(tenant, record.voice_id)] = record
            log.warning("voice %s kept in this process until Redis takes it", record.voice_id)

    async def aflush_records(self) -> int:
        """Write the records Redis did not take before; how many are still waiting."""
        while self._unsaved and self.tier is not None:
            (tenant, voice_id), record = next(iter(self._unsaved.items()))
            if not await self.tier.aput_record(tenant, record):
                break
            self._unsaved.pop((tenant, voice_id), None)
        return len(self._unsaved)

    def _keep_record(self, tenant: str, record: VoiceRecord) -> None:
        self._records[(tenant, record.voice_id)] = record
        self._records.move_to_end((tenant, record.voice_id))
        if self.tier is None:
            self._refs.setdefault(record.fingerprint, set()).add(record.voice_id)
        while len(self._records) > self.records_capacity:
            _, dropped = self._records.popitem(last=False)
            if self.tier is None:
                # Without Redis an evicted id is forgotten anyway: it no longer holds its content.
                self._unref(dropped.fingerprint, dropped.voice_id)

    def _unref(self, fp: Fingerprint, voice_id: str) -> bool:
        """Drop one reference; True when no voice id references the content any more."""
        refs = self._refs.get(fp)
        if refs is not None:
            refs.discard(voice_id)
            if refs:
                return False
            del self._refs[fp]
        return True

    def record(self, tenant: str, voice_id: str) -> VoiceRecord | None:
        record = self._records.get((tenant, voice_id))
        if record is not None:
            self._records.move_to_end((tenant, voice_id))
        return record

    async def _arecord(self, tenant: str, voice_id: str) -> VoiceRecord:
        record = self.record(tenant, voice_id)
        if record is None and self.tier is not None:
            lookup, record = await self.tier.aget_record(tenant, voice_id)
            if lookup is Lookup.UNAVAILABLE:
                # Unavailable is not absent: the client must keep the id and retry.
                raise VoiceUnavailable("the voice store did not answer; retry shortly")
            if record is not None:
                self._keep_record(tenant, record)
        if record is None:
            # The same answer whether the id exists for another tenant or not at all.
            raise VoiceNotFound(f"no voice {voice_id[:40]!r} for this tenant")
        return record

    async def ause(self, tenant: str, voice_id: str) -> tuple[VoiceRecord, ResolvedVoice]:
        """Pin a voice this tenant registered before, by id; never computes (no audio here)."""
        start = time.perf_counter()
        record = await self._arecord(tenant, voice_id)
        fp = record.fingerprint
        emb = self.l1.get(fp)
        source = VoiceSource.L1
        if emb is None and self.tier is not None:
            lookup, emb = await self.tier.aget(self.embedder.encoder_id, fp, self.embedder.dim)
            if lookup is Lookup.UNAVAILABLE:
                raise VoiceUnavailable("the voice store did not answer; retry shortly")
            source = VoiceSource.REDIS
            if emb is not None:
                self.l1.put(fp, emb)
        if emb is None:
            raise VoiceNotFound("this voice's embedding has expired; register the clip again")
        return record, self._resolved(fp, emb, source, start)

    async def adelete(self, tenant: str, voice_id: str) -> Purge:
        """Forget a tenant's voice id. Its embedding is purged from L1, Redis and (through Redis
        pub/sub) every server's L1 only when no voice id of any tenant still references that
        content. Sessions of this tenant pinning the id are told (``purge_listeners``)."""
        record = await self._arecord(tenant, voice_id)
        fp = record.fingerprint
        if (rewrite := self._rewrites.get((tenant, voice_id))) is not None:
            await asyncio.wait([rewrite])
        if self.tier is not None:
            gone = await self.tier.adelete_voice(
                self.embedder.encoder_id, Purge(tenant, voice_id, fp, False)
            )
            if gone is None:
                raise VoiceUnavailable("the voice store did not answer; the voice was not deleted")
        else:
            gone = self._unref(fp, voice_id)
        self._unsaved.pop((tenant, voice_id), None)
        purge = Purge(tenant, voice_id, fp, gone)
        self.purged(purge)
        return purge

    def purged(self, purge: Purge) -> None:
        """Apply a deletion here (called locally and for deletions on other servers)."""
        if purge.tenant is not None and purge.voice_id is not None:
            self._records.pop((purge.tenant, purge.voice_id), None)
        if purge.gone:
            self.l1.discard(purge.fingerprint)
            self.aliases.forget(purge.fingerprint)
        for listener in list(self.purge_listeners):
            listener(purge)

    async def arefresh_pinned(self) -> int:
        """Keep voices pinned by live sessions in Redis: refresh their TTL, and write back any
        that memory pressure evicted, so ``voice.use`` on another server still finds them.
        How many were written back."""
        if self.tier is None:
            return 0
        encoder_id = self.embedder.encoder_id
        pinned = [fp for fp in sorted(self.l1.pinned) if self.l1.get(fp) is not None]
        found = await self.tier.atouch([(encoder_id, fp) for fp in pinned])
        if found is None:
            return 0
        rewritten = 0
        for fp, there in zip(pinned, found, strict=True):
            emb = self.l1.get(fp)
            if not there and emb is not None and await self.tier.aput(fp, emb):
                rewritten += 1
        return rewritten

    # --- pinning ----------------------------------------------------------------------------
    def pin(self, fp: Fingerprint) -> None:
        self.l1.pin(fp)
        self.metrics.pinned_voices.set(len(self.l1.pinned))

    def unpin(self, fp: Fingerprint) -> None:
        self.l1.unpin(fp)
        self.metrics.pinned_voices.set(len(self.l1.pinned))
