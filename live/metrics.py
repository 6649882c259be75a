"""Prometheus metrics, one registry per app so that several servers can share a process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .breaker import CircuitBreaker


class TierCounters(Protocol):
    """What the metrics read of the Redis tier (``live.redis_tier.RedisTier``) at scrape time:
    plain counters and its breaker, so this module needs nothing else of the tier."""

    hits: int
    misses: int
    errors: int
    corrupt: int
    writes: int
    skipped: int
    breaker: CircuitBreaker


_MS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lookups = Counter(
            "livevoice_voice_lookups",
            "Voice registrations by the tier that answered",
            ["tier"],
            registry=r,
        )
        self.lookup_seconds = Histogram(
            "livevoice_voice_lookup_seconds",
            "Server-side time to resolve a voice",
            ["tier"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.encoder_calls = Counter(
            "livevoice_encoder_calls", "Clips embedded by the speaker encoder", registry=r
        )
        self.encoder_seconds = Histogram(
            "livevoice_encoder_seconds",
            "Speaker encoder latency per clip (queue included)",
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.encoder_failures = Counter(
            "livevoice_encoder_failures", "Encoder calls that raised", registry=r
        )
        self.redis_used_memory = Gauge(
            "livevoice_redis_used_memory_bytes", "Redis INFO used_memory, polled", registry=r
        )
        self.sessions = Gauge("livevoice_sessions_active", "Open WebSocket sessions", registry=r)
        self.pinned_voices = Gauge(
            "livevoice_pinned_voices", "Distinct voices pinned by live sessions", registry=r
        )
        self.messages = Counter(
            "livevoice_messages", "Speak messages by outcome", ["outcome"], registry=r
        )
        self.ttfa_seconds = Histogram(
            "livevoice_time_to_first_audio_seconds",
            "From dequeue to first audio frame sent",
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "livevoice_protocol_errors", "Errors sent to clients by code", ["code"], registry=r
        )
        self._cache_metrics(r)

    def _cache_metrics(self, r: CollectorRegistry) -> None:
        """Upload aliases, near-duplicate voices and the rendered-audio cache (issue 12)."""
        self.upload_aliases = Counter(
            "livevoice_upload_aliases",
            "Registrations by what their exact bytes' alias gave: l1 or redis (no decode), "
            "miss or stale (decoded)",
            ["outcome"],
            registry=r,
        )
        self.near_duplicates = Counter(
            "livevoice_voice_near_duplicates",
            "New voices embedded within cosine 0.99 of a voice their tenant already has",
            registry=r,
        )
        self.rendered_lookups = Counter(
            "livevoice_rendered_lookups",
            "Lines by rendered-audio cache outcome: hit, miss, skipped (Redis unavailable)",
            ["outcome"],
            registry=r,
        )
        self.rendered_served_bytes = Counter(
            "livevoice_rendered_served_bytes",
            "Bytes of stored PCM (s16le) streamed from the rendered-audio cache",
            registry=r,
        )
        self.rendered_stores = Counter(
            "livevoice_rendered_stores",
            "Finished lines offered to the rendered-audio cache, by outcome: stored, too_big, "
            "over_budget, unavailable",
            ["outcome"],
            registry=r,
        )
        self.rendered_evictions = Counter(
            "livevoice_rendered_evictions",
            "Lines evicted (least recently used) to keep the rendered-audio byte budget",
            registry=r,
        )
        self.rendered_bytes = Gauge(
            "livevoice_rendered_bytes",
            "Bytes the rendered-audio cache holds in Redis, as of this server's last store",
            registry=r,
        )

    def watch_tier(self, tier: TierCounters) -> None:
        """Export the Redis tier's own counters and breaker state at scrape time."""
        self.registry.register(_TierCollector(tier))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TierCollector(Collector):
    def __init__(self, tier: TierCounters) -> None:
        self.tier = tier

    def collect(self) -> Iterator[Metric]:
        tier = self.tier
        calls = CounterMetricFamily(
            "livevoice_redis_calls", "Redis tier outcomes", labels=["outcome"]
        )
        for outcome in ("hits", "misses", "errors", "corrupt", "writes", "skipped"):
            calls.add_metric([outcome], getattr(tier, outcome))
        yield calls
        yield CounterMetricFamily(
            "livevoice_redis_errors", "Redis calls that failed or timed out", value=tier.errors
        )
        state = GaugeMetricFamily(
            "livevoice_redis_breaker_state",
            "Redis circuit breaker: 1 for the current state",
            labels=["state"],
        )
        for candidate in type(tier.breaker.state):
            state.add_metric([candidate.value], 1.0 if candidate is tier.breaker.state else 0.0)
        yield state
