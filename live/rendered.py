"""The rendered-audio cache: a repeated line is streamed from Redis instead of synthesized again.

Alerts are templated ("Thanks for the follow!", "Welcome to the raid!"): the same engine, voice
and cleaned text come back again and again. :class:`RenderedSpeech` is a ``SpeechEngine`` that
wraps another. A line it has seen finish is streamed from the PCM stored in Redis (no model
work; the first chunk leaves as soon as Redis answers); any other line streams from the inner
engine as before, and its PCM is stored once the line has finished, uncancelled and under the
per-entry cap.

The key is the engine (name and native rate), the voice that conditions it, and the text. The
PCM is kept at the engine's native rate, before resampling, so one entry serves every output
rate. Redis keeps the total under a byte budget itself (``RedisTier.aput_rendered``: a sorted
set of entries by last use, trimmed by one Lua script at every store), so the budget holds
across all the servers sharing it, whatever Redis' own eviction policy. Redis down: the breaker
the voice cache uses is open and lines are synthesized as if there were no cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Final

import msgpack
import numpy as np

from .marks import VisemeMark, WordMark
from .metrics import Metrics
from .pcm import to_s16le
from .redis_tier import DOWN, RedisTier
from .speech import MarkedChunk, SpeechEngine, marked_stream_of, stream_of, unmarked
from .values import Embedding, VoiceProfile
from .wrapped import WrappedEngine

__all__ = ["RenderedSpeech", "decode_rendered", "encode_rendered"]

log = logging.getLogger(__name__)

_KEY_DOMAIN: Final = b"livevoice:rendered:v1"
_VALUE_VERSION: Final = 2
"""2: word and viseme marks kept with the PCM of a line synthesized with them."""
_CHUNK_S: Final = 0.25
"""A hit is streamed in chunks this long: the first frames leave before the rest is converted,
and a cancel takes effect at the next chunk, as with synthesized speech."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """A stored line: its s16le PCM and, when it was synthesized with them, its marks."""

    pcm: bytes
    words: tuple[WordMark, ...] | None = None
    """None: stored without marks (a hit for a plain stream only)."""
    visemes: tuple[VisemeMark, ...] = ()


def encode_rendered(sample_rate: int, pcm: bytes, marks: MarkedChunk | None = None) -> bytes:
    """The msgpack map stored for a line: format version, native rate, s16le PCM (what the
    wire would carry at that rate, ``to_s16le``, so a hit is sample-exact), and the line's
    marks when it had them (``marks``: all of them, in the message's samples)."""
    value: dict[str, object] = {"v": _VALUE_VERSION, "sr": sample_rate, "pcm": pcm}
    if marks is not None:
        value["words"] = [[w.text, w.start, w.end] for w in marks.words]
        value["visemes"] = [[v.v, v.start, v.end] for v in marks.visemes]
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def decode_rendered(raw: bytes, sample_rate: int) -> Rendered | None:
    """The line in ``raw``, or None for anything not written for this rate (a miss)."""
    try:
        obj = msgpack.unpackb(raw, raw=False)
        if not isinstance(obj, dict) or obj.get("v") != _VALUE_VERSION:
            return None
        if obj.get("sr") != sample_rate:
            return None
        pcm = obj.get("pcm")
        if not isinstance(pcm, bytes) or len(pcm) % 2:
            return None
        if "words" not in obj:
            return Rendered(pcm)
        words = tuple(WordMark(str(t), int(a), int(b)) for t, a, b in obj["words"])
        visemes = tuple(VisemeMark(str(v), int(a), int(b)) for v, a, b in obj["visemes"])
        return Rendered(pcm, words, visemes)
    except Exception:  # msgpack's zoo of errors, or a garbled map: all mean "not ours"
        return None


class RenderedSpeech(WrappedEngine):
    """A ``SpeechEngine`` that serves repeated lines from Redis and synthesizes the rest with
    ``inner``. It does not own ``inner`` (whoever built it closes it)."""

    def __init__(
        self,
        inner: SpeechEngine,
        tier: RedisTier,
        *,
        metrics: Metrics,
        ttl_s: float,
        budget_bytes: int,
        max_entry_bytes: int,
    ) -> None:
        super().__init__(inner)
        self.tier = tier
        self.metrics = metrics
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes
        self.max_entry_bytes = min(max_entry_bytes, budget_bytes)
        """An entry larger than the whole budget would evict everything and still not fit."""
        self._stores: set[asyncio.Task[None]] = set()
        """Stores in flight: a line's end is not held up by the write."""

    def render_key(self, text: str, voice: Embedding, *, profile: str | None = None) -> str:
        """What the audio depends on: engine and native rate, the voice, the cleaned text.

        The voice is its embedding (encoder id and vector): that is what a zero-shot engine is
        conditioned with; Piper ignores it, and pays one entry per voice for a line. HOOK for
        voice profiles: when a profile (speaking rate, style) reaches the engine with the
        embedding, pass its stable key as ``profile``; a speaking rate belongs there too.
        """
        h = hashlib.blake2b(digest_size=32)
        vector = np.ascontiguousarray(voice.vector, dtype="<f4").tobytes()
        for part in (
            _KEY_DOMAIN,
            self.name.encode(),
            str(self.sample_rate).encode(),
            voice.encoder_id.encode(),
            vector,
            (profile or "").encode(),
            text.encode(),
        ):
            h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no part bleeds over
            h.update(part)
        return h.hexdigest()

    async def _chunks(
        self, text: str, voice: Embedding, profile: VoiceProfile | None, marked: bool
    ) -> AsyncGenerator[MarkedChunk, None]:
        """The line from the cache, or from ``inner`` (then kept). A hit stored with its marks
        gives them all with its first chunk; one stored without them is a miss when marks are
        asked for."""
        key = self.render_key(text, voice, profile=None if profile is None else repr(profile))
        raw = await self.tier.aget_rendered(key, self.ttl_s)
        if raw is DOWN:
            self.metrics.rendered_lookups.labels("skipped").inc()
            async with contextlib.aclosing(self._inner(text, voice, profile, marked)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        hit = decode_rendered(raw, self.sample_rate) if isinstance(raw, bytes) else None
        if hit is not None and (hit.words is not None or not marked):
            self.metrics.rendered_lookups.labels("hit").inc()
            self.metrics.rendered_served_bytes.inc(len(hit.pcm))
            samples = np.frombuffer(hit.pcm, dtype="<i2")
            step = max(1, int(self.sample_rate * _CHUNK_S))
            for start in range(0, len(samples), step):
                pcm = samples[start : start + step].astype(np.float32) / np.float32(32767.0)
                if start == 0 and hit.words is not None:
                    yield MarkedChunk(pcm, hit.words, hit.visemes)
                else:
                    yield MarkedChunk(pcm)
            return
        self.metrics.rendered_lookups.labels("miss").inc()
        kept: list[bytes] = []
        words: list[WordMark] = []
        visemes: list[VisemeMark] = []
        size = 0
        async with contextlib.aclosing(self._inner(text, voice, profile, marked)) as chunks:
            async for chunk in chunks:
                words += chunk.words
                visemes += chunk.visemes
                if size <= self.max_entry_bytes:
                    s16 = to_s16le(chunk.pcm)
                    size += len(s16)
                    kept.append(s16)
                    if size > self.max_entry_bytes:
                        kept.clear()  # too long to keep: stop holding it
                yield chunk
        # Reached only when the inner stream ended: a cancelled line (the consumer closed this
        # generator at a yield, or cancelled it mid-chunk) never gets here, so it is not stored.
        if size > self.max_entry_bytes:
            self.metrics.rendered_stores.labels("too_big").inc()
        elif size:
            marks = MarkedChunk(np.zeros(0, np.float32), tuple(words), tuple(visemes))
            value = encode_rendered(self.sample_rate, b"".join(kept), marks if marked else None)
            self._store_later(key, value)

    def _inner(
        self, text: str, voice: Embedding, profile: VoiceProfile | None, marked: bool
    ) -> AsyncGenerator[MarkedChunk, None]:
        """The inner engine's chunks, with marks when asked (and it has them)."""
        if marked:
            chunks, _ = marked_stream_of(self.inner, text, voice, profile)
            return chunks
        return unmarked(stream_of(self.inner, text, voice, profile))

    def _store_later(self, key: str, value: bytes) -> None:
        task = asyncio.create_task(self._astore(key, value))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def _astore(self, key: str, value: bytes) -> None:
        done = await self.tier.aput_rendered(
            key, value, ttl_s=self.ttl_s, budget_bytes=self.budget_bytes
        )
        if done is None:
            self.metrics.rendered_stores.labels("unavailable").inc()
            return
        stored, held, evicted = done
        self.metrics.rendered_stores.labels("stored" if stored else "over_budget").inc()
        self.metrics.rendered_evictions.inc(evicted)
        self.metrics.rendered_bytes.set(held)

    async def adrain(self) -> None:
        """Wait for the stores in flight (tests, and shutdown before the pool closes)."""
        if self._stores:
            await asyncio.wait(set(self._stores), timeout=2.0)

    async def aclose(self) -> None:
        """Finish the stores in flight; ``inner`` is closed by its owner."""
        await self.adrain()
        for task in list(self._stores):
            task.cancel()
