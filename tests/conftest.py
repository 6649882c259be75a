"""Shared fixtures: the real models, loaded once per test run, and a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from live.encoder import EncoderWorker, SpeakerEncoder
from live.speech import PiperEngine

# The `redis_server` fixture: a real redis-server per test, always stopped at teardown.
pytest_plugins = ["tests.redis_server"]


@pytest.fixture(scope="session")
def speaker_encoder() -> SpeakerEncoder:
    return SpeakerEncoder.load(device="cpu")


@pytest.fixture(scope="session")
def piper() -> Iterator[PiperEngine]:
    engine = PiperEngine(workers=2)
    yield engine
    engine.close()


@pytest.fixture
def encoder_worker(speaker_encoder: SpeakerEncoder) -> EncoderWorker:
    """A fresh worker (bound to this test's loop) around the shared model; the server closes it."""
    return EncoderWorker(speaker_encoder)
