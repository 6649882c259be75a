"""A real redis-server on a free loopback port, for tests and benchmarks.

It can be stopped, killed, paused (SIGSTOP: it accepts connections but never answers)
and started again on the same port, to stage outages. Only the process it started is
ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["REDIS_SERVER", "RedisServer", "free_port"]

REDIS_SERVER = os.environ.get("LIVEVOICE_TEST_REDIS_SERVER", "/usr/bin/redis-server")


class _PortTaken(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    def __init__(
        self,
        *,
        password: str | None = None,
        port: int | None = None,
        executable: str = REDIS_SERVER,
        extra_config: dict[str, str] | None = None,
        ready_timeout_s: float = 5.0,
    ) -> None:
        self.password = password
        self._port_chosen = port is None
        self.port = port if port is not None else free_port()
        self.executable = executable
        self.extra_config = dict(extra_config or {})
        self.ready_timeout_s = ready_timeout_s
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return self
        for _ in range(3):
            try:
                return self._start()
            except _PortTaken:
                # Someone took our free port between probe and bind; only the first
                # start may move, restarts must keep the port the clients know.
                self.port = free_port()
        raise RuntimeError("could not find a free port for redis-server")

    def _start(self) -> Self:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="livevoice-redis-"))
        config = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": '""',
            "appendonly": "no",
            "daemonize": "no",
            "dir": str(self._dir),
            **self.extra_config,
        }
        if self.password:
            config["requirepass"] = self.password
        # A config file rather than flags: the password stays out of `ps`.
        conf = self._dir / "redis.conf"
        conf.write_text("".join(f"{k} {v}\n" for k, v in config.items()))
        log = self._dir / "redis.log"
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                [self.executable, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._paused = False
        self._wait_ready(log)
        self._port_chosen = False  # from now on, restarts keep this port
        return self

    def _wait_ready(self, log: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                tail = log.read_text(errors="replace")[-2000:]
                if self._port_chosen and "Address already in use" in tail:
                    raise _PortTaken
                raise RuntimeError(f"redis-server exited early:\n{tail}")
            if self._answers_ping():
                return
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in time")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        # -NOAUTH from a password-protected server also means it is up.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if self._paused:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        self._paused = False

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything gracefully."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._proc = None
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel but nothing answers."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort so a crashed test never leaves a server behind.
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
