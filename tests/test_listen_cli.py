"""``livevoice listen`` as a subprocess against the real server (Piper): a producer speaks into the
channel, the command writes what it hears to WAV, comes back after a dropped socket resuming from
where it was, and says plainly when this machine cannot play audio."""

from __future__ import annotations

import asyncio
import re
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from clients.client import HeardAudio, LivevoiceClient
from protocol.client import ChannelHeardEnded
from tests.channel_kit import LONG_TEXT, speaking_bot
from tests.relay import relay
from tests.server import LiveServer, live_server, until_true

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

TIMEOUT = 60.0
ROOT = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[LiveServer]:
    async with live_server() as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def bot(server: LiveServer) -> AsyncIterator[LivevoiceClient]:
    async with speaking_bot(server.ws_url, TIMEOUT) as c:
        yield c


async def listen(
    url: str, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "live.cli", "listen", "--server", url, "--channel", "main"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


async def until_listening(proc: asyncio.subprocess.Process) -> None:
    """Waits for the command's own word that it joined (``-v``): what is spoken after is heard."""
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), TIMEOUT)
        assert line, "listen ended before it joined"
        if line.startswith(b"listening to channel main"):
            return


async def heard_samples(listener: LivevoiceClient, messages: int) -> int:
    """Samples an in-process listener heard in ``messages`` whole messages."""
    samples = 0
    while messages:
        event = await asyncio.wait_for(listener.heard.get(), TIMEOUT)
        if isinstance(event, HeardAudio):
            samples += len(event.pcm) // 2
        elif isinstance(event, ChannelHeardEnded):
            messages -= 1
    return samples


async def test_listen_out_writes_what_the_channel_says(
    server: LiveServer, bot: LivevoiceClient, tmp_path: Path
) -> None:
    out = tmp_path / "channel.wav"
    proc = await listen(
        server.ws_url, "--out", str(out), "--sample-rate", "16000", "--messages", "2", "-v"
    )
    async with LivevoiceClient(server.ws_url, timeout=TIMEOUT) as beside:
        await beside.ajoin("main", "listen", sample_rate=16000)
        await until_listening(proc)
        texts = ["Thanks for the raid, everyone!", "Welcome to the stream."]
        first = await bot.aspeak(texts[0], user="Ann", kind="raid")
        second = await bot.aspeak(texts[1], user="Bob")
        spoken = [await asyncio.wait_for(u.aresult(), TIMEOUT) for u in (first, second)]
        expected = await heard_samples(beside, 2)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, stderr.decode()
    assert stdout.decode().splitlines() == [f"[raid] Ann: {texts[0]}", f"Bob: {texts[1]}"]
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    # Every sample both messages were heard with, back to back: what a listener in this
    # process heard, and the length the producer was told was spoken.
    assert len(pcm) == expected
    spoken_s = sum(r.duration_ms for r in spoken) / 1000
    assert abs(len(pcm) / 16000 - spoken_s) < 0.01
    assert 2.0 < spoken_s < 8.0  # two short sentences
    rms = float(np.sqrt(np.mean((pcm / 32768.0) ** 2)))
    assert rms > 0.02  # speech, not silence
    loud = np.abs(pcm) > 0.05 * 32768
    assert loud.mean() > 0.1  # and a good share of it voiced


async def test_listen_reconnects_and_resumes_into_a_file_per_message(
    server: LiveServer, bot: LivevoiceClient, tmp_path: Path
) -> None:
    async with relay(server.ws_url) as through:
        proc = await listen(through.url, "--out", str(tmp_path), "--messages", "1", "-v")
        await until_listening(proc)
        long = await bot.aspeak(LONG_TEXT, user="Ann")
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        assert line.decode().startswith("Ann: This is sentence number 1")
        # Mid-message, as the relay saw it: the key and the last frame the command received.
        leg = through.legs[0]
        await until_true(lambda: leg.last_frame is not None and leg.last_frame.seq >= 2, "frames")
        await through.adrop()
        assert leg.last_frame is not None
        key = leg.starts[leg.last_frame.stream]["message"]
        seq = leg.starts[leg.last_frame.stream].get("resumed_from", 0) + leg.last_frame.seq
        # It comes back on its own; what is spoken once it joined again is heard.
        await until_true(lambda: len(through.legs) == 2, "the reconnect")
        await until_true(
            lambda: any(m["type"] == "channel.joined" for m in through.legs[1].received), "a join"
        )
        rejoin = through.joins()[1]
        assert (rejoin["resume_message"], rejoin["resume_seq"]) == (key, seq)
        await bot.acontrol("skip")  # the rest of the long one; this server replays nothing
        await asyncio.wait_for(long.aresult(), TIMEOUT)
        after = await bot.aspeak("Back after the drop.", user="Bob")
        await asyncio.wait_for(after.aresult(), TIMEOUT)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, stderr.decode()
    files = sorted(await asyncio.to_thread(lambda: list(tmp_path.glob("*.wav"))))
    assert files and files[0].name == f"0001-{key}.wav"
    with wave.open(str(files[0])) as wav:
        # What arrived of the cut message: at least the frames received before the drop.
        assert wav.getframerate() == 22050 and wav.getnframes() >= (seq + 1) * 2205
    with wave.open(str(files[-1])) as wav:
        assert wav.getnframes() > 0
    assert stdout.decode().splitlines()[-1].endswith("Bob: Back after the drop.")


# PortAudio as sounddevice presents it, with an output "device" that records what it is given:
# its callback is pulled every 10 ms for 10 ms of samples, as a sound card would.
RECORDING_DEVICE = """
import os, threading, time

def query_devices(device=None, kind=None):
    return {"name": "recorder", "max_output_channels": 2, "default_samplerate": 48000.0}

class RawOutputStream:
    def __init__(self, samplerate, channels, dtype, callback):
        assert (channels, dtype) == (1, "int16")
        self.frames, self.callback = int(samplerate) // 100, callback
        self.running, self.thread = False, None
        self.out = open(os.environ["RECORDED_PCM"], "ab")

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self.pull, daemon=True)
        self.thread.start()

    def pull(self):
        while self.running:
            buffer = bytearray(2 * self.frames)
            self.callback(buffer, self.frames, None, None)
            self.out.write(buffer)
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.thread.join()

    def close(self):
        self.out.close()
"""


async def test_listen_plays_on_the_audio_device(
    server: LiveServer, bot: LivevoiceClient, tmp_path: Path
) -> None:
    (tmp_path / "sounddevice.py").write_text(RECORDING_DEVICE)
    recorded = tmp_path / "recorded.pcm"
    env = {
        "PYTHONPATH": f"{tmp_path}:{ROOT}",
        "PATH": "/usr/bin:/bin",
        "RECORDED_PCM": str(recorded),
    }
    proc = await listen(server.ws_url, "--messages", "1", "-v", env=env)
    async with LivevoiceClient(server.ws_url, timeout=TIMEOUT) as beside:
        await beside.ajoin("main", "listen")
        await until_listening(proc)
        await bot.aspeak("Played on the speakers.", user="Ann")
        heard = bytearray()
        while True:
            event = await asyncio.wait_for(beside.heard.get(), TIMEOUT)
            if isinstance(event, HeardAudio):
                heard += event.pcm
            elif isinstance(event, ChannelHeardEnded):
                break
        stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, stderr.decode()
    assert stdout.decode() == "Ann: Played on the speakers.\n"
    played = np.frombuffer(recorded.read_bytes(), dtype="<i2")
    expected = np.frombuffer(bytes(heard), dtype="<i2")
    # Silence fills the card where nothing was buffered; the message itself was played whole,
    # in order, before the command ended.
    assert np.array_equal(played[played != 0], expected[expected != 0])
    assert np.count_nonzero(expected) > 16000


SOUNDDEVICE_STUBS = {
    # sounddevice installed, the system's PortAudio not: what its import raises then.
    "no PortAudio": ("raise OSError('PortAudio library not found')", "PortAudio library not found"),
    "no sounddevice": ("raise ImportError('No module named sounddevice')", "not installed"),
    "no output device": (
        "class PortAudioError(Exception): pass\n"
        "def query_devices(device=None, kind=None):\n"
        "    raise PortAudioError('Error querying device -1')\n",
        "no output audio device",
    ),
}


@pytest.mark.parametrize("missing", SOUNDDEVICE_STUBS)
async def test_listen_without_a_device_or_out_fails_plainly(
    server: LiveServer, tmp_path: Path, missing: str
) -> None:
    stub, reason = SOUNDDEVICE_STUBS[missing]
    (tmp_path / "sounddevice.py").write_text(stub + "\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    proc = await listen(server.ws_url, env=env)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    err = stderr.decode()
    assert proc.returncode == 1, err
    assert stdout == b""
    assert re.search(r"^livevoice listen: cannot play audio here: .*", err, re.M), err
    assert reason in err and "--out FILE.wav" in err
    assert "Traceback" not in err
