"""The ``redis_server`` fixture: a real redis-server per test (``live.testing.redis_server``,
which the bench uses too), always stopped at teardown."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from live.testing.redis_server import REDIS_SERVER, RedisServer, free_port

__all__ = ["REDIS_SERVER", "RedisServer", "channel_store", "free_port", "redis_server"]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started redis-server without a password, always stopped at teardown."""
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def channel_store(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a channel test twice: on servers keeping channels in memory (no Redis), and on
    servers sharing them through a real redis-server (``SharedChannels``)."""
    from tests.server import SERVER_DEFAULTS

    if request.param == "memory":
        yield "memory"
        return
    with RedisServer() as server:
        SERVER_DEFAULTS["redis_url"] = server.url
        try:
            yield "redis"
        finally:
            SERVER_DEFAULTS.clear()
