"""The voice cache's value types, shared by the store, the Redis tier, the session and metrics.

A leaf: it imports nothing of ``live``, so the modules that pass these values between them
(``voices``, ``redis_tier``, ``session``) never need to import each other for a type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

import numpy as np

__all__ = [
    "Embedding",
    "Fingerprint",
    "Purge",
    "ResolvedVoice",
    "VoiceProfile",
    "VoiceRecord",
    "VoiceSource",
]

Fingerprint = NewType("Fingerprint", str)
"""Hex BLAKE2b-256 of a clip's canonical PCM: the same audio in any container has the same one."""


@dataclass(frozen=True, slots=True)
class VoiceProfile:
    """What the ear notices first in a voice, measured from a clip (``live.matching.analyse``).

    Absolute measurements of the clip alone, so one profile serves any engine: what an engine
    changes to match it (``live.matching.plan``) is derived from this and the engine's own
    profile when a voice is pinned.
    """

    f0_hz: float
    """Median fundamental frequency over the voiced frames."""
    f0_range_st: float
    """Spread of the pitch: 10th to 90th percentile of F0, in semitones."""
    formants_hz: tuple[float, float, float]
    """Median F2, F3, F4 over the voiced frames (the vocal tract's length sets them; F1
    follows the vowel and the pitch more than the speaker)."""
    syllables_per_s: float
    """Articulation rate: syllable nuclei (intensity peaks in voiced stretches) per second of
    speech, pauses left out."""


@dataclass(frozen=True, slots=True)
class Embedding:
    """The cached value for one clip's content: its speaker embedding and voice profile."""

    vector: np.ndarray
    """float32, shape (dim,), L2-normalised."""
    encoder_id: str
    duration_s: float
    """Duration of the reference clip."""
    created: float
    """Unix time the encoder computed it."""
    profile: VoiceProfile | None = None
    """The clip's pitch, formants and pace; None for a value cached before profiles existed
    (computed again when the clip itself is registered once more)."""


class VoiceSource(enum.StrEnum):
    """Where a registration's embedding came from (``voice.ready.source``)."""

    L1 = "l1"
    REDIS = "redis"
    ENCODER = "encoder"


@dataclass(frozen=True, slots=True)
class ResolvedVoice:
    fingerprint: Fingerprint
    embedding: Embedding
    source: VoiceSource
    seconds: float
    profile: VoiceProfile | None = None
    """The profile the engine matches this voice to: the embedding's, or None when the request
    turned matching off (``match: false``) or the engine does not match voices."""


@dataclass(frozen=True, slots=True)
class VoiceRecord:
    """A tenant's registered voice: what ``voice.use`` needs to pin it again."""

    voice_id: str
    fingerprint: Fingerprint
    name: str | None
    duration_s: float


@dataclass(frozen=True, slots=True)
class Purge:
    """A deleted voice, as every server hears of it.

    Only sessions of ``tenant`` pinning ``voice_id`` lose their voice. The embedding is shared
    by content between tenants: ``gone`` says whether it was dropped too (no voice id of any
    tenant references that content any more).
    """

    tenant: str | None
    voice_id: str | None
    fingerprint: Fingerprint
    gone: bool
