"""``livevoice vts``: a channel's voice moves a VTube Studio avatar's mouth.

The bridge joins a livevoice channel to listen (it plays nothing itself) and feeds VTube Studio's
public API (``ws://127.0.0.1:8001``, DenchiSoft/VTubeStudio README) a mouth value for what the
audience hears now.

**Custom parameters, not ``MouthOpen``.** It creates its own input parameters with
``ParameterCreationRequest`` — ``LivevoiceMouthOpen`` (0..1), ``LivevoiceMouthForm`` (-1 round ..
1 wide, from visemes when the server sends them) and ``LivevoiceSpeaking`` (1 while a message plays)
— rather than injecting VTube Studio's default ``MouthOpen``/``MouthSmile``. VTS lets one plugin
"set" a parameter at a time and drops a parameter not sent for a second, so a bridge that owns
``MouthOpen`` must keep sending it while idle and would hold the streamer's own face-tracked
mouth shut between messages (or fight another lip-sync plugin for it). A custom parameter
takes nothing away from tracking: the streamer maps it in the model's settings once (e.g. add
``LivevoiceMouthOpen`` as a second input of the mouth, or drive an expression with
``LivevoiceSpeaking``), and how the voice and their own mouth mix is theirs to choose.

**The token.** The first run sends ``AuthenticationTokenRequest``; VTube Studio shows a popup and
answers once the user clicks Allow. The token is written (mode 0600) to ``--token-file``
(default: ``vts-token.json`` in the user's config directory) and every later session — a
restart of VTS, of the bridge — authenticates with ``AuthenticationRequest`` alone. Only a
revoked token (``authenticated: false``) asks the user again.

**What moves the mouth.** The value comes from ``audio.marks``'s ``mouth`` values (50 per
second, 0..1) when the server sends them — the bridge asks with ``marks: true`` in its join
(``--no-marks``: not) — and otherwise from the audio's own envelope computed here with the
same definition: RMS per 20 ms window, in dBFS mapped linearly from ``ENVELOPE_FLOOR_DB`` (0) to
``ENVELOPE_CEILING_DB`` (1), smoothed by a one-pole filter that opens fast and closes slower.
Either is read at the message's playback position: real time from its first frame heard (a
message heard while the one before still plays starts after it), re-anchored whenever a
``channel.played`` position (what the OBS source reports it actually played) names the message.

**Rates.** ``InjectParameterDataRequest`` goes out ``--fps`` times a second (30..60, default 60)
while a message plays and every ``IDLE_INTERVAL_S`` (twice a second) while idle, so VTS never
considers the parameters lost. Both sockets come back by themselves: VTube Studio's with a
bounded, jittered backoff (authenticated again with the kept token, parameters created again),
livevoice's through :class:`LivevoiceClient`'s own reconnect, resuming where it was.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from protocol import LivevoiceError
from protocol.client import (
    ChannelHeardEnded,
    ChannelHeardStarted,
    HeardMarks,
    PositionHeard,
    error_code,
)
from protocol.errors import Unauthorized
from protocol.messages import AudioStart, ChannelJoined

from .cli import Progress, UsageError, _connection_args, _run
from .client import Backoff, ClientClosed, HeardAudio, LivevoiceClient

log = logging.getLogger(__name__)

DEFAULT_VTS_URL = "ws://127.0.0.1:8001"
API_NAME = "VTubeStudioPublicAPI"
API_VERSION = "1.0"
PLUGIN_NAME = "livevoice"
PLUGIN_DEVELOPER = "livevoice"
"""Both must match between the token request and every authentication (README, Authentication)."""

MOUTH_OPEN = "LivevoiceMouthOpen"
MOUTH_FORM = "LivevoiceMouthForm"
SPEAKING = "LivevoiceSpeaking"
PARAMETERS: tuple[tuple[str, str, float, float, float], ...] = (
    (MOUTH_OPEN, "How open the mouth is in the livevoice TTS voice now (0..1).", 0.0, 1.0, 0.0),
    (MOUTH_FORM, "Mouth shape of the TTS voice: -1 round (o, u) .. 1 wide (i, e).", -1.0, 1.0, 0.0),
    (SPEAKING, "1 while a livevoice message plays, else 0.", 0.0, 1.0, 0.0),
)
"""Name, explanation, min, max, default of each custom parameter (names: 4..32 alphanumerics)."""

MOUTH_RATE = 50
"""Mouth values per second, as ``audio.marks`` sends them."""
ENVELOPE_FLOOR_DB = -50.0
ENVELOPE_CEILING_DB = -16.0
ENVELOPE_ATTACK = 0.6
"""Share of the way to a louder window's value taken at once (the mouth opens fast)."""
ENVELOPE_RELEASE = 0.3
"""Share of the way to a quieter window's value (it closes slower than it opens)."""
IDLE_INTERVAL_S = 0.5
"""Idle injections: VTS drops a parameter not sent for a second, so twice that often."""
VTS_BACKOFF = Backoff(initial=0.5, maximum=10.0)
"""Reconnect delays to either side: VTS takes seconds to restart, and a user may start it late."""
FORGET_AFTER_S = 1.0
"""A message played out is kept this long (a late ``channel.played`` may still name it)."""

ERROR_REQUIRES_AUTHENTICATION = 8
ERROR_TOKEN_DENIED = 50
ERROR_TOKEN_REQUEST_ONGOING = 51

VISEME_FORM: Mapping[str, float] = {
    # VRM's five vowels, and the Oculus set's vowels; every other viseme (closed, consonants) is 0.
    "i": 1.0, "ih": 1.0, "e": 0.6, "ee": 0.6, "a": 0.2, "aa": 0.2,
    "o": -0.6, "oh": -0.6, "u": -1.0, "ou": -1.0,
}  # fmt: skip
"""``LivevoiceMouthForm`` per viseme name (case ignored): lips spread for i/e, rounded for o/u."""


def default_token_file() -> Path:
    """``livevoice/vts-token.json`` in the user's config directory (XDG, or %APPDATA%)."""
    base = os.environ.get("XDG_CONFIG_HOME") or (
        os.environ.get("APPDATA") if sys.platform == "win32" else None
    )
    return Path(base or Path.home() / ".config") / "livevoice" / "vts-token.json"


# --- the mouth, sans I/O ------------------------------------------------------------------------
class MouthEnvelope:
    """Mouth values (``MOUTH_RATE`` per second, 0..1) from PCM as it arrives, carrying a partial
    window from one chunk to the next."""

    def __init__(self, sample_rate: int) -> None:
        self.window = max(1, sample_rate // MOUTH_RATE)
        self.values: list[float] = []
        self._pending = np.zeros(0, dtype=np.float32)
        self._level = 0.0

    def feed(self, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        pending = np.concatenate((self._pending, samples))
        whole = len(pending) // self.window * self.window
        for block in pending[:whole].reshape(-1, self.window) if whole else ():
            self._push(float(np.sqrt(np.mean(block * block))))
        self._pending = pending[whole:]

    def flush(self) -> None:
        """The message ended: its last, partial window counts too."""
        if len(self._pending):
            self._push(float(np.sqrt(np.mean(self._pending * self._pending))))
            self._pending = self._pending[:0]

    def _push(self, rms: float) -> None:
        db = 20.0 * np.log10(rms + 1e-9)
        target = (db - ENVELOPE_FLOOR_DB) / (ENVELOPE_CEILING_DB - ENVELOPE_FLOOR_DB)
        target = min(1.0, max(0.0, target))
        share = ENVELOPE_ATTACK if target > self._level else ENVELOPE_RELEASE
        self._level += share * (target - self._level)
        self.values.append(round(self._level, 3))


@dataclass
class HeardMessage:
    """One channel message as the bridge follows it: what arrived, and where its playback is."""

    key: str
    sample_rate: int
    arrived: float
    """Loop time its first audio arrived (None of it played before then)."""
    envelope: MouthEnvelope
    samples: int = 0
    ended: bool = False
    anchor: float | None = None
    """Loop time its sample 0 played, from a ``channel.played`` report; None: not reported."""
    stream_offset: int = 0
    """Samples of the message before the current stream's sample 0 (a resumed listener)."""
    marks: list[tuple[float, float, list[float]]] = field(default_factory=list)
    """``audio.marks`` mouth runs: start (s), values per second, values."""
    forms: list[tuple[float, float, float]] = field(default_factory=list)
    """Viseme runs: start (s), end (s), ``LivevoiceMouthForm``; sorted by start."""

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate

    def mouth_at(self, t: float) -> float:
        """The mouth value ``t`` seconds into the message: its marks where they cover ``t``,
        else the envelope of the audio received."""
        for start, rate, values in reversed(self.marks):
            i = int((t - start) * rate)
            if 0 <= i < len(values):
                return float(values[i])
        i = int(t * MOUTH_RATE)
        values = self.envelope.values
        return values[i] if 0 <= i < len(values) else 0.0

    def form_at(self, t: float) -> float:
        i = bisect.bisect_right(self.forms, (t, float("inf"), 0.0)) - 1
        if i >= 0 and self.forms[i][0] <= t < self.forms[i][1]:
            return self.forms[i][2]
        return 0.0


@dataclass(frozen=True, slots=True)
class MouthPose:
    """What the avatar shows at one instant."""

    open: float
    form: float
    speaking: bool


class MouthTimeline:
    """The channel's messages laid out on the loop's clock; :meth:`pose` says what plays now.

    Messages are heard one after another, faster than real time: each starts playing when its
    first audio arrives or when the one before it ends, whichever is later — unless a
    ``channel.played`` report anchored it to what a player actually played.
    """

    def __init__(self) -> None:
        self.messages: list[HeardMessage] = []
        self._streams: dict[int, HeardMessage] = {}
        self.changed = asyncio.Event()
        """Set when a message starts: an idle injector wakes at once instead of at its next tick."""

    def start(self, start: AudioStart, now: float) -> None:
        key = start.message or f"{start.id}/{start.stream}"
        known = next((m for m in self.messages if m.key == key), None)
        if known is not None and not start.replayed and known.sample_rate == start.sample_rate:
            # Resumed after a reconnect: the rest of the same message follows on a new stream.
            known.stream_offset = known.samples
            known.ended = False
        else:
            if known is not None:
                self.messages.remove(known)
            known = HeardMessage(key, start.sample_rate, now, MouthEnvelope(start.sample_rate))
            self.messages.append(known)
        self._streams[start.stream] = known
        self.changed.set()

    def audio(self, stream: int, pcm: bytes) -> None:
        message = self._streams.get(stream)
        if message is not None:
            message.envelope.feed(pcm)
            message.samples += len(pcm) // 2

    def end(self, stream: int) -> None:
        message = self._streams.pop(stream, None)
        if message is not None:
            message.envelope.flush()
            message.ended = True

    def reset_streams(self) -> None:
        """A new socket numbers its streams from 0 again."""
        self._streams.clear()

    def marks(self, stream: int, mouth: Any, visemes: Any) -> None:
        """An ``audio.marks``: ``mouth`` ``{"start", "rate", "values"}`` and ``visemes``
        ``[{"v", "start", "end"}]``, in samples of the stream (either may be absent)."""
        message = self._streams.get(stream)
        if message is None:
            return
        rate = float(message.sample_rate)
        offset = message.stream_offset
        if mouth:
            start, per_s, values = (
                _field(mouth, "start"),
                _field(mouth, "rate"),
                _field(mouth, "values"),
            )
            if isinstance(start, int | float) and isinstance(per_s, int | float) and per_s > 0:
                run = [min(1.0, max(0.0, float(v))) for v in (values or [])]
                message.marks.append(((start + offset) / rate, float(per_s), run))
        for viseme in visemes or ():
            name, start, end = _field(viseme, "v"), _field(viseme, "start"), _field(viseme, "end")
            if isinstance(name, str) and isinstance(start, int) and isinstance(end, int):
                form = VISEME_FORM.get(name.lower(), 0.0)
                bisect.insort(message.forms, ((start + offset) / rate, (end + offset) / rate, form))

    def played(self, key: str, ms: float, now: float) -> None:
        """A player reports ``ms`` of the message ``key`` played, as of about ``now``."""
        for message in self.messages:
            if message.key == key:
                message.anchor = now - ms / 1000.0
                return

    def pose(self, now: float) -> MouthPose:
        """The mouth now; forgets messages played out a while ago."""
        begin = None
        current: tuple[HeardMessage, float] | None = None
        keep: list[HeardMessage] = []
        for message in self.messages:
            begin = (
                message.anchor
                if message.anchor is not None
                else max(message.arrived, begin if begin is not None else message.arrived)
            )
            finish = begin + message.duration
            if not message.ended or now < finish + FORGET_AFTER_S:
                keep.append(message)
            if current is None and begin <= now and (now < finish or not message.ended):
                current = (message, now - begin)
            begin = finish
        self.messages = keep
        if current is None:
            return MouthPose(0.0, 0.0, False)
        message, t = current
        return MouthPose(message.mouth_at(t), message.form_at(t), True)


def _field(obj: Any, name: str) -> Any:
    """A field of a marks object, whether the client library hands it as a dict or an object."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


# --- VTube Studio's API -------------------------------------------------------------------------
class VtsError(Exception):
    """VTube Studio answered ``APIError``."""

    def __init__(self, error_id: int, message: str) -> None:
        super().__init__(f"VTube Studio error {error_id}: {message}")
        self.error_id = error_id


class VtsRefused(Exception):
    """The user denied the plugin, or VTS refused its token: retrying cannot help."""


class VtsApi:
    """One WebSocket session with VTube Studio: requests answered by ``requestID``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.inject_errors = 0
        self.needs_authentication = False
        self._reader = asyncio.create_task(self._aread(), name="vts-reader")

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2.0)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def arequest(
        self, message_type: str, data: dict[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        """Sends a request and returns the answer's ``data``; ``VtsError`` for an ``APIError``."""
        request_id = uuid.uuid4().hex[:16]
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            await self._asend(message_type, data, request_id)
            return await asyncio.wait_for(answer, timeout)
        finally:
            self._waiting.pop(request_id, None)

    async def ainject(self, values: list[dict[str, Any]]) -> None:
        """``InjectParameterDataRequest`` without waiting for its answer: at 60 a second the
        answers are read as they come, and an error among them is counted and logged."""
        data = {"faceFound": False, "mode": "set", "parameterValues": values}
        await self._asend("InjectParameterDataRequest", data, "livevoice-inject")

    async def _asend(self, message_type: str, data: dict[str, Any], request_id: str) -> None:
        if self.closed:
            raise ConnectionResetError("VTube Studio closed the connection")
        payload = {
            "apiName": API_NAME,
            "apiVersion": API_VERSION,
            "requestID": request_id,
            "messageType": message_type,
            "data": data,
        }
        await self.ws.send_str(json.dumps(payload))

    async def _aread(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    answer = json.loads(msg.data)
                except ValueError:
                    log.warning("VTube Studio sent a frame that is not JSON")
                    continue
                if isinstance(answer, dict):
                    self._on_answer(answer)
        finally:
            gone = ConnectionResetError("VTube Studio closed the connection")
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(gone)

    def _on_answer(self, answer: dict[str, Any]) -> None:
        data = answer.get("data") if isinstance(answer.get("data"), dict) else {}
        assert isinstance(data, dict)
        request_id = answer.get("requestID")
        is_error = answer.get("messageType") == "APIError"
        waiting = self._waiting.get(request_id) if isinstance(request_id, str) else None
        if waiting is not None and not waiting.done():
            if is_error:
                error_id = data.get("errorID")
                waiting.set_exception(
                    VtsError(
                        error_id if isinstance(error_id, int) else -1, str(data.get("message"))
                    )
                )
            else:
                waiting.set_result(data)
        elif is_error:
            self.inject_errors += 1
            if self.inject_errors == 1 or self.inject_errors % 100 == 0:
                log.warning(
                    "VTube Studio refused an injection (%d so far): %s",
                    self.inject_errors,
                    data.get("message"),
                )
            if data.get("errorID") == ERROR_REQUIRES_AUTHENTICATION:
                self.needs_authentication = True


class TokenFile:
    """The plugin's VTS token, kept between runs (only the user may read it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> str | None:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        token = saved.get("authenticationToken") if isinstance(saved, dict) else None
        return token if isinstance(token, str) and token else None

    def save(self, token: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"pluginName": PLUGIN_NAME, "authenticationToken": token}, out)
        os.replace(partial, self.path)

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --- the bridge ---------------------------------------------------------------------------------
class VtsBridge:
    """Listens to a livevoice channel and drives VTube Studio until ``stop`` is set."""

    def __init__(
        self,
        *,
        server: str,
        channel: str,
        vts_url: str = DEFAULT_VTS_URL,
        token_file: Path | None = None,
        livevoice_token: str | None = None,
        sample_rate: int | None = None,
        fps: float = 60.0,
        marks: bool = True,
        timeout: float = 60.0,
        backoff: Backoff = VTS_BACKOFF,
        progress: Progress | None = None,
    ) -> None:
        self.server = server
        self.channel = channel
        self.vts_url = vts_url
        self.tokens = TokenFile(token_file or default_token_file())
        self.livevoice_token = livevoice_token
        self.sample_rate = sample_rate or 16000  # the envelope needs no more
        self.fps = fps
        self.want_marks = marks
        self.timeout = timeout
        self.backoff = backoff
        self.progress = progress or Progress(False)
        self.timeline = MouthTimeline()
        self.vts_sessions = 0
        """VTube Studio sessions authenticated so far (more than one: it was reconnected)."""
        self.injections = 0
        self.vts_unreachable = 0
        """Connection attempts to VTube Studio that failed (it was not running)."""
        self.listening = asyncio.Event()
        """Set while joined to the channel: what is spoken from then on moves the mouth."""

    async def arun(self, stop: asyncio.Event) -> None:
        """Runs both sides until ``stop``; raises what makes going on pointless (a denied plugin,
        a refused livevoice token)."""
        sides = [
            asyncio.create_task(self._alivevoice(), name="vts-bridge-livevoice"),
            asyncio.create_task(self._avts(), name="vts-bridge-vts"),
        ]
        stopping = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait([*sides, stopping], return_when="FIRST_COMPLETED")
            for side in sides:
                if side in done:
                    side.result()  # raises why it stopped
        finally:
            stopping.cancel()
            for side in sides:
                side.cancel()
            await asyncio.gather(*sides, return_exceptions=True)

    # --- livevoice -------------------------------------------------------------------------------
    async def _alivevoice(self) -> None:
        attempt = 0
        while True:
            client = LivevoiceClient(self.server, token=self.livevoice_token, timeout=self.timeout)
            try:
                async with client:
                    joined = await self._ajoin(client)
                    attempt = 0
                    self.progress.line(f"listening to channel {joined.channel}")
                    self.listening.set()
                    try:
                        await self._afollow(client)
                    finally:
                        self.listening.clear()
            except Unauthorized:
                raise
            except (OSError, aiohttp.ClientError, TimeoutError, ClientClosed) as exc:
                reason = str(exc) or type(exc).__name__
                log.info("livevoice: %s", reason)
            except LivevoiceError as exc:
                if not exc.retryable:
                    raise
                log.info("livevoice: %s: %s", error_code(exc), exc.message)
            delay = self.backoff.delay(attempt)
            self.progress.line(
                f"livevoice {self.server} not reachable; trying again in {delay:.1f} s"
            )
            await asyncio.sleep(delay)
            attempt += 1

    async def _ajoin(self, client: LivevoiceClient) -> ChannelJoined:
        return await client.ajoin(
            self.channel, "listen", sample_rate=self.sample_rate, marks=self.want_marks
        )

    async def _afollow(self, client: LivevoiceClient) -> None:
        """Feeds what the channel says to the timeline until the client stops for good."""
        loop = asyncio.get_running_loop()
        closed = asyncio.ensure_future(client.aclosed())
        session = client.ready.session_id if client.ready else None
        try:
            while True:
                heard = asyncio.ensure_future(client.heard.get())
                await asyncio.wait({heard, closed}, return_when="FIRST_COMPLETED")
                if not heard.done():
                    heard.cancel()
                    raise closed.result()
                now = loop.time()
                if client.ready is not None and client.ready.session_id != session:
                    session = client.ready.session_id
                    self.timeline.reset_streams()
                self._on_heard(heard.result(), now)
        finally:
            closed.cancel()

    def _on_heard(self, event: Any, now: float) -> None:
        if isinstance(event, ChannelHeardStarted):
            self.timeline.start(event.start, now)
        elif isinstance(event, HeardAudio):
            self.timeline.audio(event.message.stream, event.pcm)  # type: ignore[union-attr]
        elif isinstance(event, ChannelHeardEnded):
            self.timeline.end(event.end.stream)
        elif isinstance(event, HeardMarks):
            marks = event.marks
            self.timeline.marks(marks.stream, marks.mouth, marks.visemes)
        elif isinstance(event, PositionHeard):
            self.timeline.played(event.played.message, float(event.played.ms), now)

    # --- VTube Studio -----------------------------------------------------------------------------
    async def _avts(self) -> None:
        attempt = 0
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    ws = await asyncio.wait_for(
                        http.ws_connect(self.vts_url, heartbeat=10.0), self.timeout
                    )
                except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                    delay = self.backoff.delay(attempt)
                    attempt += 1
                    self.vts_unreachable += 1
                    self.progress.line(
                        f"VTube Studio at {self.vts_url} not reachable "
                        f"({exc or type(exc).__name__}); trying again in {delay:.1f} s "
                        "(is 'Allow Plugin API access' on?)"
                    )
                    await asyncio.sleep(delay)
                    continue
                api = VtsApi(ws)
                try:
                    await self._aauthenticate(api)
                    await self._acreate_parameters(api)
                    attempt = 0
                    self.vts_sessions += 1
                    await self._ainject(api)
                except (OSError, aiohttp.ClientError, TimeoutError, VtsError) as exc:
                    reason = str(exc) or type(exc).__name__
                    delay = self.backoff.delay(attempt)
                    attempt += 1
                    self.progress.line(f"VTube Studio: {reason}; reconnecting in {delay:.1f} s")
                    await api.aclose()
                    await asyncio.sleep(delay)
                    continue
                finally:
                    await api.aclose()

    async def _aauthenticate(self, api: VtsApi) -> None:
        token = self.tokens.load()
        if token is not None:
            if await self._asession(api, token):
                self.progress.line(f"VTube Studio: authenticated (token from {self.tokens.path})")
                return
            self.progress.line("VTube Studio no longer accepts the saved token; asking again")
            self.tokens.forget()
        token = await self._arequest_token(api)
        self.tokens.save(token)
        if not await self._asession(api, token):
            raise VtsRefused("VTube Studio refused the token it had just given")
        self.progress.line(f"VTube Studio: authenticated; token kept in {self.tokens.path}")

    async def _asession(self, api: VtsApi, token: str) -> bool:
        answer = await api.arequest(
            "AuthenticationRequest",
            {
                "pluginName": PLUGIN_NAME,
                "pluginDeveloper": PLUGIN_DEVELOPER,
                "authenticationToken": token,
            },
            self.timeout,
        )
        return answer.get("authenticated") is True

    async def _arequest_token(self, api: VtsApi) -> str:
        # Said whatever stderr is: nothing happens until the user clicks in VTube Studio.
        print(
            f"VTube Studio asks whether to allow the plugin {PLUGIN_NAME!r}: "
            "click Allow in its window.",
            file=sys.stderr,
            flush=True,
        )
        while True:
            try:
                answer = await api.arequest(
                    "AuthenticationTokenRequest",
                    {"pluginName": PLUGIN_NAME, "pluginDeveloper": PLUGIN_DEVELOPER},
                    None,  # the popup waits for the user as long as it takes
                )
            except VtsError as exc:
                if exc.error_id == ERROR_TOKEN_DENIED:
                    raise VtsRefused(
                        "the plugin was denied in VTube Studio; run again and click Allow"
                    ) from exc
                if exc.error_id != ERROR_TOKEN_REQUEST_ONGOING:
                    raise
                await asyncio.sleep(1.0)  # a popup from an earlier try is still open
                continue
            token = answer.get("authenticationToken")
            if not isinstance(token, str) or not token:
                raise VtsError(-1, "AuthenticationTokenResponse without a token")
            return token

    async def _acreate_parameters(self, api: VtsApi) -> None:
        for name, explanation, low, high, default in PARAMETERS:
            await api.arequest(
                "ParameterCreationRequest",
                {
                    "parameterName": name,
                    "explanation": explanation,
                    "min": low,
                    "max": high,
                    "defaultValue": default,
                },
                self.timeout,
            )
        names = ", ".join(name for name, *_ in PARAMETERS)
        self.progress.line(f"VTube Studio: parameters {names} ready (map them in the model)")

    async def _ainject(self, api: VtsApi) -> None:
        """Sends the pose at ``fps`` while a message plays and every ``IDLE_INTERVAL_S`` while
        idle, until the socket fails. A late tick is not made up for: a burst would show
        nothing the next tick does not."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.fps
        while True:
            if api.needs_authentication:
                raise VtsError(
                    ERROR_REQUIRES_AUTHENTICATION, "the session is no longer authenticated"
                )
            now = loop.time()
            self.timeline.changed.clear()
            pose = self.timeline.pose(now)
            await api.ainject(
                [
                    {"id": MOUTH_OPEN, "value": round(pose.open, 3)},
                    {"id": MOUTH_FORM, "value": round(pose.form, 3)},
                    {"id": SPEAKING, "value": 1.0 if pose.speaking else 0.0},
                ]
            )
            self.injections += 1
            wait = period if pose.speaking else IDLE_INTERVAL_S
            next_tick = now + wait  # counted from this tick's start, not after the send
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.timeline.changed.wait(), max(0.0, next_tick - loop.time())
                )


# --- the command --------------------------------------------------------------------------------
def add_vts_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``vts`` to the ``livevoice`` command line."""
    vts = sub.add_parser(
        "vts",
        help="move a VTube Studio avatar's mouth with a channel's voice",
        description="Join CHANNEL to listen (playing nothing) and drive VTube Studio's mouth "
        "parameters through its public API: custom parameters LivevoiceMouthOpen, "
        "LivevoiceMouthForm and LivevoiceSpeaking, which you map in the model's settings. The "
        "first run asks VTube Studio for a token (click Allow there); later runs reuse it. Both "
        "connections come back by themselves after a restart of either side.",
    )
    _connection_args(vts)
    vts.add_argument("--channel", required=True, help="the channel to follow, e.g. main")
    vts.add_argument(
        "--vts-url",
        default=os.environ.get("LIVEVOICE_VTS_URL", DEFAULT_VTS_URL),
        help=f"VTube Studio's API (default {DEFAULT_VTS_URL}; LIVEVOICE_VTS_URL)",
    )
    vts.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"where the VTube Studio token is kept (default {default_token_file()})",
    )
    vts.add_argument(
        "--fps",
        type=float,
        default=60.0,
        help="parameter updates per second while a message plays, 30..60 (default 60)",
    )
    vts.add_argument(
        "--no-marks",
        action="store_true",
        help="always follow the audio's own envelope, even where the server sends mouth marks",
    )
    vts.set_defaults(func=_cmd_vts, prog=vts.prog)


def _cmd_vts(args: argparse.Namespace) -> int:
    return _run(args, _avts(args))


async def _avts(args: argparse.Namespace) -> int:
    if not 30.0 <= args.fps <= 60.0:
        raise UsageError("--fps must be between 30 and 60")
    progress = Progress(sys.stderr.isatty() or args.verbose)
    bridge = VtsBridge(
        server=args.server,
        channel=args.channel,
        vts_url=args.vts_url,
        token_file=args.token_file,
        livevoice_token=args.token,
        sample_rate=args.sample_rate,
        fps=args.fps,
        marks=not args.no_marks,
        timeout=args.timeout,
        progress=progress,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows' loop
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await bridge.arun(stop)
    except VtsRefused as exc:
        print(f"livevoice vts: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
    progress.line(f"stopped after {bridge.injections} parameter updates")
    return 0


__all__ = [
    "MouthEnvelope",
    "MouthPose",
    "MouthTimeline",
    "TokenFile",
    "VtsApi",
    "VtsBridge",
    "VtsError",
    "VtsRefused",
    "add_vts_command",
    "default_token_file",
]
