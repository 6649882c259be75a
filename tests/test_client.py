"""The Python client and its CLI against the real server (GE2E encoder, Piper) on a free port."""

from __future__ import annotations

import asyncio
import re
import sys
import wave
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_asyncio

from clients.client import (
    Backoff,
    ClientClosed,
    ConnectionLost,
    LivevoiceClient,
    Utterance,
    error_from_wire,
)
from live.cli import main as livevoice_main
from live.settings import Limits
from protocol import AudioFrame, ClientProtocol, LivevoiceError, encode
from protocol.client import RemoteError, error_code
from protocol.errors import (
    BadAudioFrame,
    ClipNotAudio,
    DuplicateId,
    EmptyText,
    NoVoice,
    QueueFull,
    Unauthorized,
    UnsupportedSampleRate,
    VoiceNotFound,
)
from protocol.messages import AudioEnd, AudioStart, Error, Speak
from tests.clips import reference_clip, wav_bytes
from tests.server import LiveServer, live_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

T = TypeVar("T")
TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent
LONG_TEXT = " ".join(
    f"This is sentence number {n} of a long message that goes on for quite a while."
    for n in range(1, 13)
)
FAST = Backoff(initial=0.05, maximum=0.5)


async def within(work: Awaitable[T], timeout: float = TIMEOUT) -> T:
    return await asyncio.wait_for(work, timeout)


@pytest.fixture(scope="module")
def clip() -> bytes:
    pcm, sr = reference_clip("piper")
    return wav_bytes(pcm, sr)


@pytest.fixture(scope="module")
def clip_path(clip: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "streamer.wav"
    path.write_bytes(clip)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[LiveServer]:
    # Every test (and every CLI run) registers the clip again: more than the default burst.
    limits = Limits(registrations_per_minute=600, registration_burst=100)
    async with live_server(limits=limits) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: LiveServer, clip: bytes) -> AsyncIterator[LivevoiceClient]:
    async with LivevoiceClient(server.ws_url, backoff=FAST, timeout=TIMEOUT) as c:
        await within(c.aregister(clip, name="streamer", format="wav"))
        yield c


async def first_pcm(utterance: Utterance) -> bytes:
    async for pcm in utterance:
        return pcm
    raise AssertionError("no audio")


# --- library ----------------------------------------------------------------------------------
async def test_register_speak_and_stream_in_order(server: LiveServer, clip: bytes) -> None:
    async with LivevoiceClient(server.ws_url, client_name="tests") as c:
        assert c.ready is not None and c.ready.formats["sample_rates"]
        voice = await within(c.aregister(clip, name="streamer", format="wav"))
        assert voice.voice_id.startswith("v_") and voice.name == "streamer"
        assert voice.source in {"encoder", "l1"}

        utterance = await within(c.aspeak("Hello chat! Thanks for the follow."))
        assert utterance.queued is not None and utterance.queued.position == 0
        chunks = [pcm async for pcm in utterance]
        result = await within(utterance.aresult())
        assert not result.cancelled and result.sample_rate == 22050
        assert result.frames == len(chunks) > 1
        assert result.pcm == b"".join(chunks)
        assert result.samples * 2 == len(result.pcm)
        assert result.duration_ms == pytest.approx(result.samples * 1000 / 22050, abs=1)

        # Two messages at once: each gets its own frames, in order, at the rate it asked for.
        a = await within(c.aspeak("First one.", sample_rate=48000))
        b = await within(c.aspeak("Second one.", id="second"))
        assert b.id == "second" and b.queued is not None and b.queued.position == 1
        ra, rb = await within(asyncio.gather(a.aresult(), b.aresult()))
        assert (ra.sample_rate, rb.sample_rate) == (48000, 22050)
        assert ra.samples and rb.samples
        assert a.start is not None and b.start is not None and a.start.stream < b.start.stream

        assert 0 < await within(c.aping()) < 5


async def test_errors_come_back_typed_and_the_session_goes_on(client: LivevoiceClient) -> None:
    with pytest.raises(EmptyText):
        await within(client.aspeak("   "))
    with pytest.raises(UnsupportedSampleRate) as info:
        await within(client.aspeak("hi", id="odd-rate", sample_rate=44100))
    assert info.value.message_id == "odd-rate"
    with pytest.raises(VoiceNotFound):
        await within(client.ause("v_nobody"))
    with pytest.raises(ClipNotAudio):
        await within(client.aregister(b"this is not audio at all" * 100, format="wav"))
    # A failed voice request leaves the pinned voice as it was, and FIFO matching in step.
    again = await within(client.ause(client.voice.voice_id if client.voice else ""))
    assert again.source == "l1"
    utterance = await within(client.aspeak("Still here.", id="dup"))
    with pytest.raises(DuplicateId):
        await within(client.aspeak("Twice.", id="dup"))
    assert (await within(utterance.aresult())).samples > 0


async def test_cancel_one_and_cancel_all(client: LivevoiceClient) -> None:
    long = await within(client.aspeak(LONG_TEXT))
    waiting = await within(client.aspeak("This one never gets to speak."))
    await within(first_pcm(long))
    await within(client.acancel(long.id))
    cut = await within(long.aresult())
    assert cut.cancelled and cut.samples > 0
    assert cut.duration_ms < 20_000  # the whole text is ~50 s of speech

    # ``waiting`` may have started by now: cancel all stops it either way.
    await within(client.acancel())
    dropped = await within(waiting.aresult())
    assert dropped.cancelled

    # Cancel all with several queued: each one ends cancelled, none is spoken.
    many = [await within(client.aspeak(f"Queued message {n}.")) for n in range(3)]
    await within(client.acancel())
    results = await within(asyncio.gather(*(u.aresult() for u in many)))
    assert all(r.cancelled for r in results)


async def test_utterance_checks_sequence_numbers_and_counts() -> None:
    """The checks are the ClientProtocol's; an Utterance raises what it reports."""

    def fed(message_id: str, stream: int) -> tuple[ClientProtocol, Utterance]:
        wire, u = ClientProtocol(), Utterance(message_id)
        wire.send_speak(Speak(id=message_id, text="x"))
        u._on_event(
            wire.receive_text(encode(AudioStart(id=message_id, stream=stream, sample_rate=22050)))
        )
        return wire, u

    wire, u = fed("m1", 3)
    u._on_event(wire.receive_binary(AudioFrame(3, 0, b"\x01\x00").encode()))
    u._on_event(wire.receive_binary(AudioFrame(3, 2, b"\x02\x00").encode()))  # frame 1 was lost
    with pytest.raises(BadAudioFrame, match="expected frame 1, got 2"):
        await within(u.aresult())

    wire, v = fed("m2", 4)
    v._on_event(wire.receive_binary(AudioFrame(4, 0, b"\x01\x00").encode()))
    end = AudioEnd(id="m2", stream=4, frames=2, samples=2, duration_ms=0.1, ttfa_ms=1)
    v._on_event(wire.receive_text(encode(end)))
    with pytest.raises(BadAudioFrame, match="announces 2 frames"):
        await within(v.aresult())
    with pytest.raises(BadAudioFrame):
        _ = [pcm async for pcm in v]

    known = error_from_wire(Error(code="queue_full", message="full", id="m3"))
    assert isinstance(known, QueueFull) and known.message_id == "m3"
    # A code this client does not know: kept on the instance, no class attribute changed.
    unknown = error_from_wire(Error(code="brand_new", message="later protocol"))
    assert isinstance(unknown, RemoteError) and error_code(unknown) == "brand_new"
    assert LivevoiceError.code == "internal_error"


async def test_delete_forgets_the_voice(server: LiveServer, clip: bytes) -> None:
    async with LivevoiceClient(server.ws_url, timeout=TIMEOUT) as c:
        voice = await within(c.aregister(clip, format="wav"))
        deleted = await within(c.adelete(voice.voice_id))
        assert deleted.voice_id == voice.voice_id
        assert c.voice is None  # and no reconnect will bring it back
        with pytest.raises(NoVoice):
            await within(c.aspeak("Nobody to speak with."))
        with pytest.raises(VoiceNotFound):
            await within(c.ause(voice.voice_id))
        again = await within(c.aregister(clip, format="wav"))
        assert again.voice_id == voice.voice_id and again.source == "encoder"
        assert (await within((await within(c.aspeak("Back."))).aresult())).samples > 0


# --- reconnect --------------------------------------------------------------------------------
async def test_dropped_socket_reconnects_and_repins_by_voice_use(
    server: LiveServer, client: LivevoiceClient
) -> None:
    assert client.voice is not None
    voice_id = client.voice.voice_id
    encoder_calls = server.services.store.encoder_calls

    in_flight = await within(client.aspeak(LONG_TEXT))
    await within(first_pcm(in_flight))
    for ws in list(server.services.sockets):
        await ws.close()
    with pytest.raises(ConnectionLost):
        await within(in_flight.aresult())

    after = await within(client.aspeak("Back again after the drop."))
    result = await within(after.aresult())
    assert result.samples > 0 and not result.cancelled
    assert client.reconnects == 1
    assert client.voice.voice_id == voice_id
    assert client.voice.source == "l1"  # answered by voice.use from the pinned embedding
    assert client.clip_reuploads == 0
    assert server.services.store.encoder_calls == encoder_calls  # no second encoder call


async def restart(srv: LiveServer) -> None:
    """Stops the server and starts a new one on the same port (a fresh process's state)."""
    await stop(srv)
    await within(srv.astart())


async def stop(srv: LiveServer) -> None:
    """Stops a server; its port is then free (for itself again, or another)."""
    assert srv.runner is not None
    # Stop listening first, then close the sockets: aiohttp's graceful shutdown would otherwise
    # wait out its timeout on the open WebSocket handlers (the app closes them only on cleanup).
    for site in list(srv.runner.sites):
        await within(site.stop())
    for ws in list(srv.services.sockets):
        await within(ws.close())
    await within(srv.astop())


async def test_server_restart_reuploads_the_kept_clip(clip: bytes) -> None:
    async with (
        live_server() as srv,
        LivevoiceClient(srv.ws_url, backoff=FAST, timeout=TIMEOUT) as c,
    ):
        voice = await within(c.aregister(clip, format="wav"))
        await restart(srv)
        # Without Redis the restarted server's voice directory is empty: voice.use fails with
        # voice_not_found and the client falls back to the clip it kept.
        utterance = await within(c.aspeak("The server came back."))
        assert (await within(utterance.aresult())).samples > 0
        assert c.reconnects == 1 and c.clip_reuploads == 1
        assert c.voice is not None and c.voice.voice_id == voice.voice_id
        assert srv.services.store.encoder_calls == 1


# --- CLI --------------------------------------------------------------------------------------
async def test_say_writes_a_wav_matching_audio_end(
    server: LiveServer, clip_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hello.wav"
    argv = ["say", "-v", "--server", server.ws_url, "--voice", str(clip_path), "-o", str(out)]
    code = await within(asyncio.to_thread(livevoice_main, [*argv, "Hello from the CLI."]))
    err = capsys.readouterr().err
    assert code == 0, err
    m = re.search(r"(\d+) frames, (\d+) samples at (\d+) Hz", err)
    assert m, err
    frames, samples, rate = map(int, m.groups())
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        assert wav.getframerate() == rate == 22050
        assert wav.getnframes() == samples > 0
    assert frames == -(-samples // 2205)  # 100 ms frames, the last one shorter

    at_48k = tmp_path / "48k.wav"
    argv48 = [*argv[:-1], str(at_48k), "--sample-rate", "48000", "Higher rate."]
    assert await within(asyncio.to_thread(livevoice_main, argv48)) == 0
    with wave.open(str(at_48k)) as wav:
        assert wav.getframerate() == 48000 and wav.getnframes() > 0
    capsys.readouterr()


async def test_say_exit_codes(
    server: LiveServer, clip_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["say", "--server", server.ws_url, "-o", str(tmp_path / "x.wav")]
    refused = [*base, "--voice", str(clip_path), "--sample-rate", "44100", "hi"]
    assert await within(asyncio.to_thread(livevoice_main, refused)) == 1
    assert "unsupported_sample_rate" in capsys.readouterr().err
    assert await within(asyncio.to_thread(livevoice_main, [*base, "no voice given"])) == 2
    assert "--voice" in capsys.readouterr().err
    missing = [*base, "--voice", str(tmp_path / "missing.wav"), "hi"]
    assert await within(asyncio.to_thread(livevoice_main, missing)) == 2
    with pytest.raises(SystemExit) as info:
        livevoice_main(["say", "--voice", str(clip_path)])  # no text
    assert info.value.code == 2
    unreachable = ["say", "--server", "ws://127.0.0.1:9/ws", "--voice", str(clip_path), "-o"]
    code = await within(asyncio.to_thread(livevoice_main, [*unreachable, str(tmp_path / "y"), "x"]))
    assert code == 1
    assert "connection_failed" in capsys.readouterr().err


async def test_chat_speaks_each_stdin_line(server: LiveServer, clip_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "live.cli",
        "chat",
        "--server",
        server.ws_url,
        "--voice",
        str(clip_path),
        "--raw",
        "-v",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    lines = b"Hi everyone.\n\nWelcome to the stream!\nThird line, then the end.\n"
    stdout, stderr = await within(proc.communicate(lines), 60)
    err = stderr.decode()
    assert proc.returncode == 0, err
    spoken = re.findall(r"^\[(\d)\] spoken [\d.]+ s, (\d+) samples at 22050 Hz", err, re.M)
    assert [n for n, _ in spoken] == ["1", "2", "3"], err
    assert len(stdout) == 2 * sum(int(s) for _, s in spoken) > 0
    assert "plays no audio" not in err  # --raw: the PCM is the output


async def test_chat_without_raw_says_it_plays_nothing(server: LiveServer, clip_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "live.cli", "chat", "--server", server.ws_url),
        *("--voice", str(clip_path)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    stdout, stderr = await within(proc.communicate(b"Hello there.\n"), 60)
    assert proc.returncode == 0 and stdout == b""
    assert "plays no audio itself" in stderr.decode() and "-r 22050" in stderr.decode()


async def test_say_streams_raw_pcm_to_stdout(server: LiveServer, clip_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "live.cli",
        "say",
        "-v",
        "--server",
        server.ws_url,
        "--voice",
        str(clip_path),
        "-o",
        "-",
        "Straight to a pipe.",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    stdout, stderr = await within(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    m = re.search(r"(\d+) samples at 22050 Hz to stdout", stderr.decode())
    assert m, stderr.decode()
    assert len(stdout) == 2 * int(m.group(1)) > 0


async def test_a_refused_token_ends_reconnecting() -> None:
    """The error decides (``retryable``), not a list in the client: ``unauthorized``, here
    answered at the upgrade with HTTP 401, ends the reconnect loop instead of retrying forever."""
    from live.tenants import new_token

    alice, bob = new_token("alice"), new_token("bob")
    async with live_server(tokens=alice[1]) as first:
        port = first.port
        c = LivevoiceClient(first.ws_url, token=alice[0], backoff=FAST, timeout=TIMEOUT)
        await within(c.__aenter__())
        try:
            await stop(first)
            # The same port now serves only bob: alice's token is refused at the upgrade.
            async with live_server(port=port, tokens=bob[1]):
                with pytest.raises(ClientClosed) as refused:
                    await within(c.aping())
                assert isinstance(refused.value.__cause__, Unauthorized)
                assert c.reconnects == 0
        finally:
            await within(c.aclose())
