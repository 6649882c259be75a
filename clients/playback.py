"""Where ``livevoice listen`` puts a channel's audio: this computer's audio device or WAV files.

The device is reached through ``sounddevice`` (PortAudio), an optional extra
(``pip install 'livevoice[audio]'``, and the system's ``libportaudio2``). :func:`find_output_device`
looks for it before anything connects, so a machine without one is told so plainly at once,
never left running and playing nothing.
"""

from __future__ import annotations

import collections
import re
import threading
import time
import wave
from pathlib import Path
from typing import Any, Protocol

from protocol.messages import AudioStart


class NoAudioDevice(RuntimeError):
    """Nothing here can play audio: no ``sounddevice``, no PortAudio, or no output device."""


class AudioSink(Protocol):
    """Takes a channel's messages in the order heard: a start, its PCM, its end."""

    def start(self, start: AudioStart) -> None: ...
    def write(self, pcm: bytes) -> None: ...
    def end(self) -> None: ...
    def close(self) -> None:
        """Everything written is played or on disk when this returns."""
        ...

    def describe(self) -> str: ...


def find_output_device() -> Any:
    """The ``sounddevice`` module, once it has shown an output device; else :class:`NoAudioDevice`
    saying what is missing."""
    try:
        import sounddevice  # optional: only ``listen`` without --out needs it
    except ImportError:
        raise NoAudioDevice(
            "the sounddevice package is not installed (pip install 'livevoice[audio]')"
        ) from None
    except OSError as exc:  # sounddevice imports, PortAudio does not load
        raise NoAudioDevice(f"{exc} (install the system's PortAudio: libportaudio2)") from None
    try:
        device = sounddevice.query_devices(kind="output")
    except Exception as exc:  # PortAudioError, ValueError: no default output device
        raise NoAudioDevice(f"no output audio device ({exc})") from None
    if not device or int(device.get("max_output_channels", 0)) < 1:
        raise NoAudioDevice("no output audio device")
    return sounddevice


class DevicePlayer:
    """Plays PCM on the default output device, messages back to back, from a buffer that the
    audio callback drains on PortAudio's thread (silence while it is empty)."""

    def __init__(self, sounddevice: Any) -> None:
        self._sd = sounddevice
        self._stream: Any = None
        self._rate: int | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0
        self._buffered = 0
        self._lock = threading.Lock()

    def describe(self) -> str:
        name = self._sd.query_devices(kind="output").get("name", "?")
        return f"the audio device {name!r}"

    def start(self, start: AudioStart) -> None:
        if self._rate != start.sample_rate:
            self._drain()
            self._close_stream()
            self._stream = self._sd.RawOutputStream(
                samplerate=start.sample_rate, channels=1, dtype="int16", callback=self._fill
            )
            self._stream.start()
            self._rate = start.sample_rate

    def write(self, pcm: bytes) -> None:
        with self._lock:
            self._chunks.append(pcm)
            self._buffered += len(pcm)

    def end(self) -> None:
        pass

    def close(self) -> None:
        self._drain()
        self._close_stream()

    def _fill(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's callback: the next ``frames`` samples, silence where none are buffered."""
        out = memoryview(outdata).cast("B")
        want = len(out)
        i = 0
        with self._lock:
            while i < want and self._chunks:
                chunk = self._chunks[0]
                n = min(want - i, len(chunk) - self._offset)
                out[i : i + n] = chunk[self._offset : self._offset + n]
                i += n
                self._offset += n
                self._buffered -= n
                if self._offset == len(chunk):
                    self._chunks.popleft()
                    self._offset = 0
        out[i:want] = bytes(want - i)

    def _drain(self) -> None:
        if self._stream is None or self._rate is None:
            return
        deadline = time.monotonic() + self._buffered / 2 / self._rate + 2.0
        while self._buffered > 0 and time.monotonic() < deadline:
            time.sleep(0.05)

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None
            self._rate = None


class WavRecorder:
    """One WAV file, every message back to back (no silence between them), at the rate heard.

    The header is rewritten with each write, so the file is whole even if the process is killed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wav: wave.Wave_write | None = None
        self._rate: int | None = None

    def describe(self) -> str:
        return str(self.path)

    def start(self, start: AudioStart) -> None:
        if self._wav is None:
            self._wav = _open_wav(self.path, start.sample_rate)
            self._rate = start.sample_rate
        elif start.sample_rate != self._rate:
            raise ValueError(
                f"the channel now comes at {start.sample_rate} Hz, {self.path} is at {self._rate}:"
                " give --sample-rate, or --out DIR for a file per message"
            )

    def write(self, pcm: bytes) -> None:
        assert self._wav is not None
        self._wav.writeframes(pcm)

    def end(self) -> None:
        pass

    def close(self) -> None:
        if self._wav is None:  # nothing heard: still a valid, empty WAV
            self._wav = _open_wav(self.path, 22050)
        self._wav.close()


class WavPerMessage:
    """One WAV file per message in a directory: ``0001-<message>.wav``… A message resumed after
    a reconnect (the same message key) goes on in its file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: list[Path] = []
        self._wav: wave.Wave_write | None = None
        self._message: str | None = None

    def describe(self) -> str:
        return f"{self.directory}/ (a file per message)"

    def start(self, start: AudioStart) -> None:
        if self._wav is not None and start.message is not None and start.message == self._message:
            return  # the rest of the message whose stream a dropped socket cut
        self.end()
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", start.message or start.id)[:64]
        path = self.directory / f"{len(self.files) + 1:04d}-{key}.wav"
        self._wav = _open_wav(path, start.sample_rate)
        self._message = start.message
        self.files.append(path)

    def write(self, pcm: bytes) -> None:
        assert self._wav is not None
        self._wav.writeframes(pcm)

    def end(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None

    def close(self) -> None:
        self.end()


def _open_wav(path: Path, rate: int) -> wave.Wave_write:
    wav = wave.open(str(path), "wb")  # noqa: SIM115 - closed by its sink
    wav.setnchannels(1)
    wav.setsampwidth(2)
    wav.setframerate(rate)
    return wav
