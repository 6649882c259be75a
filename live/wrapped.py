"""An engine around another one (the rendered-audio cache, the loudness target): what it says of
its marks, and its plain and marked streams, from one generator of marked chunks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

import numpy as np

from .speech import MarkedChunk, SpeechEngine
from .values import Embedding, VoiceProfile


class WrappedEngine:
    """A ``SpeechEngine`` that changes or serves what ``inner`` would say. Subclasses give
    :meth:`_chunks`; ``stream`` and ``stream_marked`` are that, without and with marks."""

    inner: SpeechEngine

    def __init__(self, inner: SpeechEngine) -> None:
        self.inner = inner
        self.name = inner.name
        self.sample_rate = inner.sample_rate

    @property
    def aligned(self) -> bool:
        """Whether lines come with word and viseme marks (the inner engine's alignments)."""
        return bool(getattr(self.inner, "aligned", False))

    async def stream(
        self, text: str, voice: Embedding, *, profile: VoiceProfile | None = None
    ) -> AsyncGenerator[np.ndarray, None]:
        async with contextlib.aclosing(self._chunks(text, voice, profile, False)) as chunks:
            async for chunk in chunks:
                yield chunk.pcm

    async def stream_marked(
        self, text: str, voice: Embedding, *, profile: VoiceProfile | None = None
    ) -> AsyncGenerator[MarkedChunk, None]:
        async with contextlib.aclosing(self._chunks(text, voice, profile, True)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _chunks(
        self, text: str, voice: Embedding, profile: VoiceProfile | None, marked: bool
    ) -> AsyncGenerator[MarkedChunk, None]:
        """The line's chunks; with their marks when ``marked`` (and ``inner`` has them)."""
        raise NotImplementedError
