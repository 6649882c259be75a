"""The voice a session has pinned, and the embedding each of its voice requests resolved to.

Which request a message is spoken in is the protocol's rule (``ServerProtocol.voice_of``); this
unit holds the embeddings behind those requests and the one pin in the voice store that keeps
the session's voice in the L1 for as long as the session lives.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Protocol

from protocol.errors import VoiceFailed
from protocol.state import ServerProtocol, SpeakJob, VoiceRequest

from .values import Fingerprint, ResolvedVoice


class PinStore(Protocol):
    """The part of the voice store that pinning needs."""

    def pin(self, fp: Fingerprint) -> None: ...
    def unpin(self, fp: Fingerprint) -> None: ...


class PinnedVoice:
    def __init__(
        self, store: PinStore, *, on_pin: Callable[[ResolvedVoice], None] | None = None
    ) -> None:
        self._store = store
        self._on_pin = on_pin
        """Told each voice pinned (the loudness engine measures its gain then)."""
        self.voice: ResolvedVoice | None = None
        """The voice pinned in the store (the last one that landed)."""
        self._resolved: weakref.WeakKeyDictionary[VoiceRequest, ResolvedVoice] = (
            weakref.WeakKeyDictionary()
        )
        """Kept while the protocol holds the request (a message or the session's voice)."""
        self._changed = asyncio.Event()

    def pin(self, request: VoiceRequest, voice: ResolvedVoice) -> None:
        """``request`` resolved to ``voice``: pin it in place of the one pinned before."""
        self._store.pin(voice.fingerprint)
        if self.voice is not None:
            self._store.unpin(self.voice.fingerprint)
        self.voice = voice
        self._resolved[request] = voice
        if self._on_pin is not None:
            self._on_pin(voice)
        self._wake()

    def failed(self) -> None:
        """A request failed: messages waiting for it may fall back now."""
        self._wake()

    def release(self) -> None:
        """The pinned voice was purged, or the session ends: let the store forget it. Always
        on close, whatever else failed: a leaked pin keeps a voice in memory forever."""
        if self.voice is not None:
            self._store.unpin(self.voice.fingerprint)
            self.voice = None
        self._resolved.clear()
        self._wake()

    async def avoice_of(self, protocol: ServerProtocol, job: SpeakJob) -> ResolvedVoice:
        """The voice ``job`` is spoken in, once its request (or a fallback) has landed.
        ``VoiceFailed`` when none is left."""
        while True:
            request = protocol.voice_of(job)
            voice = self._resolved.get(request)
            if voice is not None:
                return voice
            if not request.pending:  # landed, then purged: the message is cancelled already
                raise VoiceFailed("this message's voice was deleted", message_id=job.id)
            self._changed.clear()
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
