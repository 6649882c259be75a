"""What the channel client tests share: a bot that speaks into ``main`` and a line long enough
to drop a socket in the middle of."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from clients.client import LivevoiceClient
from tests.clips import reference_wav

LONG_TEXT = " ".join(
    f"This is sentence number {n} of a long message that goes on for quite a while."
    for n in range(1, 13)
)


@asynccontextmanager
async def speaking_bot(ws_url: str, timeout: float) -> AsyncIterator[LivevoiceClient]:
    """A Python client with a voice, joined to channel ``main`` to speak."""
    async with LivevoiceClient(ws_url, timeout=timeout) as client:
        await client.aregister(reference_wav())
        await client.ajoin("main", "speak")
        yield client
