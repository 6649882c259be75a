"""`livevoice serve` as its own process (uvloop, CLI settings, embedded Redis), driven by the
Python client over a real socket, then stopped with SIGTERM like a service manager would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from clients.client import LivevoiceClient
from tests.clips import reference_clip, wav_bytes
from tests.server import free_port

pytestmark = pytest.mark.timeout(120)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the server exited during start-up"
            try:
                async with http.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("the server did not become ready")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    port = free_port()
    env = {**os.environ, "LIVEVOICE_PORT": str(port), "LIVEVOICE_MAX_QUEUE": "5"}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "live.cli", "serve", "--data-dir", str(tmp_path / "data")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield port, proc, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


async def test_serve_process_speaks_and_stops_cleanly(
    serve: tuple[int, subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    port, proc, log_path = serve
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)
        pcm, sr = reference_clip("piper")
        async with LivevoiceClient(f"ws://127.0.0.1:{port}/ws") as client:
            ready = await client.aregister(wav_bytes(pcm, sr), name="me")
            assert ready.source == "encoder"
            utterance = await client.aspeak("Hello from a separate process.", sample_rate=24000)
            result = await asyncio.wait_for(utterance.aresult(), 30)
        assert result.sample_rate == 24000 and not result.cancelled
        audio = np.frombuffer(result.pcm, dtype="<i2")
        assert len(audio) == result.samples > 24000 // 2
        assert float(np.abs(audio).max()) > 1000
    finally:
        code = await asyncio.to_thread(stop, proc)
    text = log_path.read_text()
    assert code == 0, text
    assert "uvloop event loop" in text
    assert "embedded Redis (pid" in text
    redis_pid = int(text.split("embedded Redis (pid ")[1].split(")")[0])
    with pytest.raises(ProcessLookupError):
        os.kill(redis_pid, 0)
    assert (tmp_path / "data" / "voices.rdb").exists(), "voices were saved on the way out"
