"""A session's voice requests against the voice store: register a clip, use an id, delete one.

Each runs as the session's slow work and reports its outcome to the protocol, which answers the
client (``voice.ready``, ``voice.deleted`` or the ``error``, with the request's id) and decides
which messages fall back to which voice; the embeddings land in the session's ``PinnedVoice``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import Any

from protocol.errors import InternalError, LivevoiceError
from protocol.messages import VoiceDelete, VoiceReady, VoiceRegister, VoiceUse
from protocol.state import ClipUpload, ServerProtocol, VoiceRequest

from .audio import ClipQuality
from .matching import VoiceMatching
from .pinned import PinnedVoice
from .settings import Limits
from .values import ResolvedVoice, VoiceRecord
from .voices import VoiceStore


class VoiceRequests:
    def __init__(
        self,
        protocol: ServerProtocol,
        voice: PinnedVoice,
        store: VoiceStore,
        limits: Limits,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        *,
        matching: VoiceMatching | None = None,
    ) -> None:
        self._matching = matching
        """The engine, when it matches voices to their profile."""
        self._protocol = protocol
        self._voice = voice
        self._store = store
        self._limits = limits
        self._log = log

    async def aregister(self, tenant: str, upload: ClipUpload, request: VoiceRequest) -> None:
        """Decode the clip (unless these exact bytes were seen before), find or compute its
        embedding, remember it as the tenant's voice."""
        limits = self._limits
        resolving = self._store.aresolve_upload(
            upload.data, min_s=limits.min_clip_s, max_s=limits.max_clip_s
        )
        await self._aregistered(tenant, upload.register, request, resolving)

    async def aregister_sent(
        self, tenant: str, register: VoiceRegister, request: VoiceRequest
    ) -> None:
        """A ``voice.register`` by ``sha256``: the voice of the clip this tenant sent before,
        without the upload; ``clip_needed`` when it is not known (the client sends the clip)."""
        assert register.sha256 is not None  # the protocol checked it (R2)
        limits = self._limits
        resolving = self._store.aresolve_sent(
            tenant,
            bytes.fromhex(register.sha256),
            min_s=limits.min_clip_s,
            max_s=limits.max_clip_s,
        )
        await self._aregistered(tenant, register, request, resolving)

    async def _aregistered(
        self,
        tenant: str,
        register: VoiceRegister,
        request: VoiceRequest,
        resolving: Coroutine[Any, Any, tuple[ResolvedVoice, ClipQuality]],
    ) -> None:
        """A registration's embedding and clip quality (``resolving``), remembered as the
        tenant's voice and pinned; or its error. Only an embedding the encoder just computed
        can be a near-duplicate (``VoiceStore.count_near_duplicate``)."""
        start = time.perf_counter()
        try:
            resolved, quality = await resolving
            self._store.count_near_duplicate(tenant, resolved)
            record = await self._store.aremember(tenant, resolved, register.name)
        except Exception as exc:
            self.failed(request, exc)
        else:
            self._pin(
                request,
                record,
                resolved,
                start,
                quality=quality.to_wire(),
                match=register.match is not False,
            )

    async def ause(self, tenant: str, use: VoiceUse, request: VoiceRequest) -> None:
        start = time.perf_counter()
        try:
            record, resolved = await self._store.ause(tenant, use.voice_id)
        except Exception as exc:
            self.failed(request, exc)
        else:
            self._pin(request, record, resolved, start, match=use.match is not False)

    def failed(self, request: VoiceRequest, exc: Exception) -> None:
        """The request failed: its error goes to the client, its messages fall back (R4)."""
        self._protocol.voice_failed(request, self._typed(exc, "resolve this voice"))
        self._voice.failed()

    async def adelete(self, tenant: str, delete: VoiceDelete) -> None:
        """Forget the tenant's voice everywhere. The purge reaches this session (and every other
        of the tenant) through the store's listeners before the answer (R6)."""
        try:
            await self._store.adelete(tenant, delete.voice_id)
        except Exception as exc:
            self._protocol.delete_failed(delete, self._typed(exc, "delete this voice"))
            return
        self._log.info("voice %s deleted", delete.voice_id[:40])
        self._protocol.voice_deleted(delete)

    def _typed(self, exc: Exception, what: str) -> LivevoiceError:
        if isinstance(exc, LivevoiceError):
            return exc
        self._log.error("failed to %s", what, exc_info=exc)
        return InternalError(f"the server failed to {what}")

    def _pin(
        self,
        request: VoiceRequest,
        record: VoiceRecord,
        resolved: ResolvedVoice,
        start: float,
        *,
        quality: dict[str, Any] | None = None,
        match: bool = True,
    ) -> None:
        matched: dict[str, Any] | None = None
        if match and self._matching is not None and resolved.profile is not None:
            matched = self._matching.match(resolved.profile).to_wire()
        else:  # spoken in the engine's own voice
            resolved = dataclasses.replace(resolved, profile=None)
        self._voice.pin(request, resolved)
        ready = VoiceReady(
            voice_id=record.voice_id,
            source=resolved.source.value,
            ms=round((time.perf_counter() - start) * 1000, 3),
            name=record.name,
            duration_s=round(record.duration_s, 3),
            quality=quality,
            matched=matched,
        )
        self._protocol.voice_pinned(request, ready)
        self._log.info(
            "voice %s pinned from %s in %.1f ms",
            record.voice_id,
            resolved.source.value,
            resolved.seconds * 1000,
        )
