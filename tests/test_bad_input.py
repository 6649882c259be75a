"""Bad input gets a typed error; the session, the server and every other session survive."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import numpy as np
import pytest
import soundfile as sf
import soxr

from live.encoder import EncoderWorker
from live.settings import Limits
from protocol.messages import AudioEnd, Error, Pong, VoiceReady
from tests.clips import reference_clip, wav_bytes
from tests.fakes import GatedEngine
from tests.server import LiveServer, RawClient, live_server, raw_client

pytestmark = pytest.mark.timeout(120)


def tone(seconds: float, sr: int = 16000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * 180 * t)).astype(np.float32)


async def expect_error(client: RawClient, code: str, message_id: str | None = None) -> Error:
    msg = await client.anext()
    assert isinstance(msg, Error), msg
    assert msg.code == code, msg
    assert msg.id == message_id
    assert msg.message  # a human-readable explanation
    return msg


async def alive(client: RawClient) -> None:
    await client.asend({"type": "ping", "id": "alive"})
    assert await client.anext() == Pong(id="alive")


async def register_clip(client: RawClient, data: bytes) -> None:
    await client.asend({"type": "voice.register", "name": "x"})
    await client.asend_bytes(data)


@pytest.fixture
async def server(encoder_worker: EncoderWorker):  # type: ignore[no-untyped-def]
    async with live_server(embedder=encoder_worker, engine=GatedEngine(auto=True)) as srv:
        yield srv


CLIP_CASES = [
    ("empty", b"", "clip_empty"),
    ("not audio", b"this is a text file, not a recording " * 20, "clip_not_audio"),
    ("under 1 s", wav_bytes(tone(0.5), 16000), "clip_too_short"),
    ("over 30 s", wav_bytes(tone(31.0), 16000), "clip_too_long"),
    ("silent", wav_bytes(np.zeros(32000, dtype=np.float32), 16000), "clip_silent"),
    ("truncated header", wav_bytes(tone(2.0), 16000)[:30], "clip_not_audio"),
]


@pytest.mark.parametrize(("name", "data", "code"), CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
async def test_bad_clips_are_rejected_with_typed_errors(
    server: LiveServer, name: str, data: bytes, code: str
) -> None:
    async with raw_client(server) as c:
        await register_clip(c, data)
        await expect_error(c, code)
        await alive(c)
        # A speak right after a failed first registration has no voice to use.
        await c.asend({"type": "speak", "id": "s", "text": "hello"})
        msg = await c.anext()
        assert isinstance(msg, Error) and msg.code in {"no_voice", "voice_failed"}, msg
        await alive(c)


async def test_clip_over_10_mb_is_refused_and_the_session_goes_on(server: LiveServer) -> None:
    async with raw_client(server) as c:
        await register_clip(c, b"\0" * (10 * 1024 * 1024 + 1))
        await expect_error(c, "clip_too_large")
        await alive(c)


async def test_control_frame_errors(server: LiveServer) -> None:
    async with raw_client(server) as c:
        await c.asend("{not json")
        await expect_error(c, "bad_json")
        await c.asend({"type": "teleport", "id": "t1"})
        await expect_error(c, "unknown_type", "t1")
        await c.asend_bytes(b"\x00\x01\x02")
        await expect_error(c, "unexpected_binary")
        await c.asend({"type": "speak", "id": "early", "text": "hello"})
        await expect_error(c, "no_voice", "early")
        await c.asend({"type": "voice.use", "voice_id": "v_doesnotexist"})
        await expect_error(c, "voice_not_found")
        await alive(c)
        pcm, sr = reference_clip("piper")
        await register_clip(c, wav_bytes(pcm, sr))
        assert isinstance(await c.anext(), VoiceReady)
        await c.asend({"type": "speak", "id": "empty", "text": "   "})
        await expect_error(c, "empty_text", "empty")
        await c.asend({"type": "speak", "id": "long", "text": "a" * 2001})
        await expect_error(c, "text_too_long", "long")
        await c.asend({"type": "speak", "id": "rate", "text": "hi", "sample_rate": 44100})
        await expect_error(c, "unsupported_sample_rate", "rate")
        await c.asend({"type": "hello"})
        await expect_error(c, "unexpected_message")
        # Still a working session: a real message is spoken after all that.
        await c.asend({"type": "speak", "id": "ok", "text": "Fine."})
        end = await c.await_type("audio.end")
        assert isinstance(end, AudioEnd) and end.id == "ok" and end.samples > 0


async def test_one_bad_session_does_not_disturb_another(server: LiveServer) -> None:
    pcm, sr = reference_clip("piper")
    async with raw_client(server) as good, raw_client(server) as bad:
        await register_clip(good, wav_bytes(pcm, sr))
        assert isinstance(await good.anext(), VoiceReady)
        await good.asend({"type": "speak", "id": "g", "text": "One. Two. Three."})
        for junk in ["{", "[]", '{"type":5}', '{"type":"speak"}']:
            await bad.asend(junk)
        await bad.asend_bytes(b"junk")
        for _ in range(5):
            assert isinstance(await bad.anext(), Error)
        end = await good.await_type("audio.end")
        assert isinstance(end, AudioEnd) and not end.cancelled
        await alive(bad)


async def test_hello_is_required_and_times_out(encoder_worker: EncoderWorker) -> None:
    limits = Limits(hello_timeout_s=0.3)
    async with (
        live_server(embedder=encoder_worker, engine=GatedEngine(), limits=limits) as srv,
        raw_client(srv, hello=False) as c,
    ):
        await c.asend({"type": "ping"})
        await expect_error(c, "hello_required")
        await expect_error(c, "hello_timeout")
        msg = await asyncio.wait_for(c.ws.receive(), 5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4408


async def test_frames_above_the_frame_limit_close_with_1009(encoder_worker: EncoderWorker) -> None:
    limits = Limits(max_frame_bytes=64 * 1024, max_clip_bytes=32 * 1024)
    async with live_server(embedder=encoder_worker, engine=GatedEngine(), limits=limits) as srv:
        async with raw_client(srv) as c:
            await c.asend({"type": "voice.register"})
            await c.asend_bytes(b"\0" * (64 * 1024 + 1))
            await expect_error(c, "frame_too_large")
            msg = await asyncio.wait_for(c.ws.receive(), 5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009
        # The server itself carries on.
        async with raw_client(srv) as other:
            await alive(other)


def stereo_flac_48k(seconds: float) -> bytes:
    speech, sr = reference_clip("piper")  # speech: a tone is refused as clip_not_speech
    left = soxr.resample(speech, sr, 48000)[: int(seconds * 48000)]
    buf = io.BytesIO()
    sf.write(buf, np.stack([left, left * 0.5], axis=1), 48000, format="FLAC")
    return buf.getvalue()


async def test_stereo_48k_flac_is_accepted(server: LiveServer) -> None:
    async with raw_client(server) as c:
        await register_clip(c, stereo_flac_48k(2.0))
        ready = await c.anext()
        assert isinstance(ready, VoiceReady) and ready.duration_s == pytest.approx(2.0, abs=0.01)


async def test_a_failed_registration_keeps_the_voice_pinned_before(server: LiveServer) -> None:
    pcm, sr = reference_clip("piper")
    async with raw_client(server) as c:
        await c.asend({"type": "voice.register", "id": "good"})
        await c.asend_bytes(wav_bytes(pcm, sr))
        ready = await c.anext()
        assert isinstance(ready, VoiceReady) and ready.id == "good"
        await c.asend({"type": "voice.register", "id": "bad"})
        await c.asend_bytes(b"not audio at all" * 100)
        await c.asend({"type": "speak", "id": "m", "text": "Still my voice."})
        await c.asend({"type": "voice.use", "voice_id": "v_nope", "id": "use"})
        errors: dict[str | None, str] = {}
        while True:
            msg = await c.anext()
            if isinstance(msg, Error):
                errors[msg.id] = msg.code
            if isinstance(msg, AudioEnd):
                assert msg.id == "m" and msg.samples > 0
                break
        while "use" not in errors:
            msg = await c.anext()
            assert isinstance(msg, Error)
            errors[msg.id] = msg.code
        assert errors == {"bad": "clip_not_audio", "use": "voice_not_found"}
        await c.asend({"type": "speak", "id": "m2", "text": "And again."})
        end = await c.await_type("audio.end")
        assert isinstance(end, AudioEnd) and end.id == "m2"
