"""``livevoice say``, ``livevoice chat`` and ``livevoice listen``: the Python client from a shell.

``say`` and ``chat`` take the voice as a reference clip (``--voice clip.wav``, uploaded once)
and/or the id of a voice registered before (``--voice-id``, tried first; the clip is the
fallback). Exit codes: 0 when everything was spoken, 1 when the server refused something or could
not be reached (the error's code and message go to stderr), 2 for a usage error. ``listen``
plays a channel (or writes it to WAV) until interrupted or ``--messages`` have ended; it exits 1
also when nothing here can play audio and no ``--out`` was given. ``vts`` (clients/vts.py) moves a
VTube Studio avatar's mouth with a channel's voice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
import wave
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import IO, TypeVar

import aiohttp

from protocol import LivevoiceError
from protocol.client import ChannelHeardEnded, ChannelHeardStarted, error_code
from protocol.errors import VoiceNotFound
from protocol.messages import AudioStart, VoiceReady
from protocol.state import CLIP_FORMATS

from .client import (
    ClientClosed,
    ConnectionLost,
    HeardAudio,
    LivevoiceClient,
    SpeechResult,
    Utterance,
)
from .playback import (
    AudioSink,
    DevicePlayer,
    NoAudioDevice,
    WavPerMessage,
    WavRecorder,
    find_output_device,
)

DEFAULT_SERVER = "ws://127.0.0.1:8765/ws"
T = TypeVar("T")


class UsageError(Exception):
    """Bad arguments found after parsing (an unreadable clip, PCM aimed at a terminal)."""


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``say`` and ``chat`` to the ``livevoice`` command line."""
    say = sub.add_parser(
        "say",
        help="speak one text and write it as WAV (or raw PCM)",
        description="Speak TEXT in the voice of a reference clip; write a WAV file or raw PCM.",
    )
    _common_args(say)
    say.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="WAV file to write, or '-' for raw s16le mono PCM on stdout "
        "(the default when stdout is not a terminal)",
    )
    say.add_argument("text", help="what to say")
    say.set_defaults(func=_cmd_say, prog=say.prog)

    chat = sub.add_parser(
        "chat",
        help="speak each line read from stdin",
        description="Speak each line of stdin, in order, as it arrives. Plays nothing itself: "
        "with --raw the PCM of every message goes to stdout, back to back (pipe it to a player).",
    )
    _common_args(chat)
    chat.add_argument(
        "--raw", action="store_true", help="write raw s16le mono PCM of every message to stdout"
    )
    chat.set_defaults(func=_cmd_chat, prog=chat.prog)

    listen = sub.add_parser(
        "listen",
        help="play a channel on this computer's audio device, or write it to WAV",
        description="Join CHANNEL to listen and play every message spoken into it on this "
        "computer's default audio device (needs the 'audio' extra, sounddevice, and the system's "
        "PortAudio, libportaudio2), or write it to WAV with --out. After a dropped socket it "
        "reconnects and resumes where it was. Prints one line per message heard (user: text).",
    )
    _connection_args(listen)
    listen.add_argument("--channel", required=True, help="the channel to listen to, e.g. main")
    listen.add_argument(
        "--out",
        metavar="FILE.wav|DIR",
        type=Path,
        help="write what is heard instead of playing it: a FILE.wav holds every message back to "
        "back (no silence between them); an existing DIR gets one WAV per message",
    )
    listen.add_argument(
        "--messages",
        type=int,
        metavar="N",
        help="stop once N messages have ended (default: listen until interrupted)",
    )
    listen.add_argument("-q", "--quiet", action="store_true", help="print no line per message")
    listen.set_defaults(func=_cmd_listen, prog=listen.prog)


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--voice", metavar="CLIP", type=Path, help="reference clip (wav, flac, ogg or mp3)"
    )
    parser.add_argument(
        "--voice-id",
        metavar="ID",
        help="a voice registered before; tried first, --voice is uploaded if the server lost it",
    )
    parser.add_argument("--name", help="display name of the voice (default: the clip's name)")
    _connection_args(parser)


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        "--url",
        default=os.environ.get("LIVEVOICE_SERVER", DEFAULT_SERVER),
        help=f"WebSocket URL (default {DEFAULT_SERVER}; LIVEVOICE_SERVER)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("LIVEVOICE_TOKEN"), help="bearer token (LIVEVOICE_TOKEN)"
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        metavar="HZ",
        help="output rate: 16000, 22050, 24000 or 48000 (default: the engine's own)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each answer (default 60)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="progress on stderr even when it is not a terminal",
    )
    parser.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)


# --- commands ---------------------------------------------------------------------------------
def _cmd_say(args: argparse.Namespace) -> int:
    return _run(args, _asay(args))


def _cmd_chat(args: argparse.Namespace) -> int:
    return _run(args, _achat(args))


def _cmd_listen(args: argparse.Namespace) -> int:
    return _run(args, _alisten(args))


def _run(args: argparse.Namespace, work: Awaitable[int]) -> int:
    async def main() -> int:
        return await work

    try:
        return asyncio.run(main())
    except UsageError as exc:
        print(f"usage: {args.prog} ...\n{args.prog}: error: {exc}", file=sys.stderr)
        return 2
    except LivevoiceError as exc:
        print(f"livevoice: {error_code(exc)}: {exc.message}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"livevoice: timeout: no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    except (OSError, aiohttp.ClientError, ConnectionError) as exc:
        reason = str(exc) or type(exc).__name__
        print(f"livevoice: connection_failed: {args.server}: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _asay(args: argparse.Namespace) -> int:
    clip = _read_clip(args)
    output = args.output
    if output is None:
        if sys.stdout.isatty():
            raise UsageError("refusing to write PCM to a terminal: give -o FILE.wav or -o -")
        output = "-"
    progress = Progress(sys.stderr.isatty() or args.verbose)
    async with LivevoiceClient(
        args.server, token=args.token, reconnect=False, timeout=args.timeout
    ) as client:
        await _apin_voice(client, args, clip, progress)
        utterance = await client.aspeak(args.text, sample_rate=args.sample_rate)
        if output == "-":
            out = sys.stdout.buffer
            async for pcm in _bounded(utterance, args.timeout):
                out.write(pcm)
                out.flush()
        result = await asyncio.wait_for(utterance.aresult(), args.timeout * 10)
    if output != "-":
        write_wav(Path(output), result)
    where = "stdout" if output == "-" else output
    progress.line(
        f"spoke {result.duration_ms / 1000:.2f} s: {result.frames} frames, {result.samples} "
        f"samples at {result.sample_rate} Hz to {where} (first audio {result.ttfa_ms:.0f} ms)"
    )
    return 0


async def _achat(args: argparse.Namespace) -> int:
    clip = _read_clip(args)
    raw_out: IO[bytes] | None = sys.stdout.buffer if args.raw else None
    progress = Progress(sys.stderr.isatty() or args.verbose)
    lines = _stdin_lines()
    spoken: asyncio.Queue[tuple[int, str, Utterance] | None] = asyncio.Queue()
    failures = 0

    def failed(n: int, exc: BaseException) -> None:
        nonlocal failures
        failures += 1
        if isinstance(exc, LivevoiceError):
            progress.line(f"[{n}] error {error_code(exc)}: {exc.message}", force=True)
        else:
            progress.line(f"[{n}] error connection_lost: {exc}", force=True)

    async def play() -> None:
        # Strictly in order, so that --raw output is the messages back to back.
        while (item := await spoken.get()) is not None:
            n, text, utterance = item
            try:
                if raw_out is not None:
                    async for pcm in _bounded(utterance, args.timeout):
                        raw_out.write(pcm)
                    raw_out.flush()
                result = await asyncio.wait_for(utterance.aresult(), args.timeout * 10)
            except (LivevoiceError, ConnectionLost, TimeoutError) as exc:
                failed(n, exc)
                continue
            state = "cancelled" if result.cancelled else "spoken"
            progress.line(
                f"[{n}] {state} {result.duration_ms / 1000:.2f} s, {result.samples} samples "
                f"at {result.sample_rate} Hz, first audio {result.ttfa_ms:.0f} ms: {_short(text)}"
            )

    async with LivevoiceClient(args.server, token=args.token, timeout=args.timeout) as client:
        await _apin_voice(client, args, clip, progress)
        if raw_out is None:
            # Said whether or not stderr is a terminal: the command plays nothing by itself.
            formats = client.ready.formats if client.ready else {}
            rate = args.sample_rate or formats.get("default_sample_rate", 22050)
            print(
                "livevoice chat plays no audio itself: each message is synthesized and its "
                f"figures printed. To hear them: --raw | aplay -q -f S16_LE -c 1 -r {rate}",
                file=sys.stderr,
            )
        player = asyncio.create_task(play())
        n = 0
        try:
            while (line := await lines.get()) is not None:
                text = line.strip()
                if not text:
                    continue
                n += 1
                try:
                    utterance = await client.aspeak(text, sample_rate=args.sample_rate)
                except (LivevoiceError, ConnectionLost) as exc:
                    failed(n, exc)
                    continue
                except ClientClosed as exc:
                    failed(n, exc)
                    break
                ahead = utterance.queued.position if utterance.queued else 0
                progress.line(f"[{n}] queued ({ahead} ahead)")
                spoken.put_nowait((n, text, utterance))
        finally:
            spoken.put_nowait(None)
            await player
    if n == 0:
        progress.line("no lines on stdin: nothing spoken")
    return 1 if failures else 0


async def _alisten(args: argparse.Namespace) -> int:
    if args.messages is not None and args.messages < 1:
        raise UsageError("--messages must be 1 or more")
    try:
        sink = _listen_sink(args.out)
    except NoAudioDevice as exc:
        # Said whatever stderr is: exiting 0 having played nothing would look like silence.
        print(
            f"livevoice listen: cannot play audio here: {exc}.\n"
            "Give --out FILE.wav (or --out DIR) to write what the channel says instead.",
            file=sys.stderr,
        )
        return 1
    progress = Progress(sys.stderr.isatty() or args.verbose)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows' loop
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    ended = 0
    try:
        async with LivevoiceClient(args.server, token=args.token, timeout=args.timeout) as client:
            joined = await client.ajoin(args.channel, "listen", sample_rate=args.sample_rate)
            progress.line(f"listening to channel {joined.channel}: {sink.describe()}")
            closed = asyncio.ensure_future(client.aclosed())
            stopping = asyncio.ensure_future(stop.wait())
            printed: str | None = None  # the message key of the last line printed
            try:
                while args.messages is None or ended < args.messages:
                    heard = asyncio.ensure_future(client.heard.get())
                    await asyncio.wait({heard, closed, stopping}, return_when="FIRST_COMPLETED")
                    if not heard.done():
                        heard.cancel()
                        if closed.done():
                            raise closed.result()
                        break
                    event = heard.result()
                    if isinstance(event, ChannelHeardStarted):
                        sink.start(event.start)
                        key = event.start.message
                        if not args.quiet and (key is None or key != printed):
                            print(_heard_line(event.start), flush=True)
                        printed = key
                    elif isinstance(event, HeardAudio):
                        sink.write(event.pcm)
                    elif isinstance(event, ChannelHeardEnded):
                        sink.end()
                        ended += 1
            finally:
                closed.cancel()
                stopping.cancel()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
        await asyncio.to_thread(sink.close)  # a device plays out what it holds
    progress.line(f"{ended} messages heard")
    return 0


def _listen_sink(out: Path | None) -> AudioSink:
    """Where a channel's audio goes; ``NoAudioDevice`` when it would be a device there is not."""
    if out is None:
        return DevicePlayer(find_output_device())
    if out.is_dir():
        return WavPerMessage(out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: no directory {out.parent}")
    return WavRecorder(out)


def _heard_line(start: AudioStart) -> str:
    """What a listener prints for a message: ``[kind] user: text``."""
    who = f"{start.user}: " if start.user else ""
    kind = f"[{start.kind}] " if start.kind else ""
    again = "(replayed) " if start.replayed else "(resumed) " if start.resumed_from else ""
    return f"{again}{kind}{who}{start.text or ''}"


# --- pieces -----------------------------------------------------------------------------------
def _read_clip(args: argparse.Namespace) -> bytes | None:
    if args.voice is None:
        if args.voice_id is None:
            raise UsageError("give a reference clip with --voice (or --voice-id of a known voice)")
        return None
    try:
        return Path(args.voice).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the clip {args.voice}: {exc.strerror or exc}") from None


async def _apin_voice(
    client: LivevoiceClient, args: argparse.Namespace, clip: bytes | None, progress: Progress
) -> VoiceReady:
    if args.voice_id is not None:
        try:
            ready = await client.ause(args.voice_id)
        except VoiceNotFound:
            if clip is None:
                raise
            progress.line(f"voice {args.voice_id} is unknown to the server; uploading the clip")
        else:
            progress.line(f"voice {ready.voice_id} pinned ({ready.source}, {ready.ms:.0f} ms)")
            return ready
    assert clip is not None
    path = Path(args.voice)
    suffix = path.suffix.lower().lstrip(".")
    fmt = suffix if suffix in CLIP_FORMATS else None
    label = f"registering voice from {path.name} ({len(clip) / 1024:.0f} KB)"
    ready = await progress.awhile(label, client.aregister(clip, args.name or path.stem, fmt))
    progress.line(
        f"voice {ready.voice_id} ready ({ready.source}, {ready.ms:.0f} ms server-side, "
        f"clip {ready.duration_s or 0:.1f} s)"
    )
    return ready


async def _bounded(utterance: Utterance, timeout: float) -> AsyncIterator[bytes]:
    """The utterance's PCM, failing if no frame (or the end) comes within ``timeout``."""
    chunks = aiter(utterance)
    while True:
        try:
            pcm = await asyncio.wait_for(anext(chunks), timeout)
        except StopAsyncIteration:
            return
        yield pcm


def write_wav(path: Path, result: SpeechResult) -> None:
    """A 16-bit mono RIFF/WAVE file of the result's PCM."""
    if result.sample_rate is None:
        raise LivevoiceError("no audio was produced (the message was cancelled)")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(result.sample_rate)
        wav.writeframes(result.pcm)


def _stdin_lines() -> asyncio.Queue[str | None]:
    """Lines of stdin as they are typed or piped; ``None`` at the end.

    A daemon thread reads, so a blocked read never holds up the event loop or the exit.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in sys.stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line)
        except (OSError, ValueError):  # stdin closed under us
            pass
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="livevoice-stdin", daemon=True).start()
    return queue


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class Progress:
    """Progress for people: lines on stderr, and a ticking timer for long steps on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def line(self, text: str, *, force: bool = False) -> None:
        if self.enabled or force:
            print(text, file=sys.stderr, flush=True)

    async def awhile(self, label: str, work: Awaitable[T]) -> T:
        """Awaits ``work``, showing ``label`` and the seconds spent while it runs."""
        if not (self.enabled and self.tty):
            return await work
        task = asyncio.ensure_future(work)
        start = time.monotonic()
        frames = "|/-\\"
        i = 0
        while not task.done():
            elapsed = time.monotonic() - start
            sys.stderr.write(f"\r{frames[i % 4]} {label}… {elapsed:.1f} s")
            sys.stderr.flush()
            i += 1
            await asyncio.wait([task], timeout=0.1)
        sys.stderr.write("\r\x1b[2K")
        sys.stderr.flush()
        return task.result()
