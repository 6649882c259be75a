"""The voice cache's value types, shared by the store, the Redis tier, the session and metrics.

A leaf: it imports nothing of ``live``, so the modules that pass these values between them
(``voices``, ``redis_tier``, ``session``) never need to import each other for a type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

import numpy as np

__all__ = ["Embedding", "Fingerprint", "Purge", "ResolvedVoice", "VoiceRecord", "VoiceSource"]

Fingerprint = NewType("Fingerprint", str)
"""Hex BLAKE2b-256 of a clip's canonical PCM: the same audio in any container has the same one."""


@dataclass(frozen=True, slots=True)
class Embedding:
    vector: np.ndarray
    """float32, shape (dim,), L2-normalised."""
    encoder_id: str
    duration_s: float
    """Duration of the reference clip."""
    created: float
    """Unix time the encoder computed it."""


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
