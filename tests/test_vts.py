"""``livevoice vts`` against a fake VTube Studio written from its public API's README
(DenchiSoft/VTubeStudio: the envelope ``apiName``/``apiVersion``/``requestID``/``messageType``/
``data``, ``AuthenticationTokenRequest``, ``AuthenticationRequest``, ``ParameterCreationRequest``,
``InjectParameterDataRequest``, ``APIError``) and the real livevoice server speaking into a channel.

The fake keeps what VTS keeps in its config across a restart (the tokens it issued, the custom
parameters) and refuses what VTS refuses (requests before authentication, a parameter that does
not exist, a bad name). ``GatedEngine`` speaks 0.5 s tones, so the test knows how long the mouth
should move.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import WSMsgType, web

from clients.client import Backoff, LivevoiceClient
from clients.vts import MOUTH_OPEN, SPEAKING, MouthTimeline, VtsBridge
from live.encoder import EncoderWorker
from protocol.messages import AudioStart
from tests.clips import reference_wav
from tests.fakes import GatedEngine
from tests.server import LiveServer, free_port, live_server, until_true

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent
PARAMETER_NAME = re.compile(r"^[A-Za-z0-9]{4,32}$")
DEFAULT_PARAMETERS = frozenset({"MouthOpen", "MouthSmile", "FaceAngleX"})


@dataclass(frozen=True)
class Injection:
    at: float
    session: int
    values: dict[str, float]


@dataclass
class FakeVtubeStudio:
    """VTube Studio's API on a loopback port, recording what plugins ask of it."""

    port: int = field(default_factory=free_port)
    issued: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Token -> (pluginName, pluginDeveloper): kept across restarts, as VTS keeps it."""
    parameters: dict[str, str] = field(default_factory=dict)
    """Custom parameter -> the plugin that created it (kept across restarts)."""
    token_requests: int = 0
    authentications: list[tuple[int, str, bool]] = field(default_factory=list)
    created: list[tuple[int, str]] = field(default_factory=list)
    injections: list[Injection] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    sessions: int = 0
    _runner: web.AppRunner | None = None
    _sockets: set[web.WebSocketResponse] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def astart(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._session)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def astop(self) -> None:
        """VTS quits: every plugin's socket closes."""
        for ws in list(self._sockets):
            await ws.close()
        assert self._runner is not None
        await self._runner.cleanup()
        self._runner = None

    def injected(self, session: int) -> list[Injection]:
        return [i for i in self.injections if i.session == session]

    async def _session(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sessions += 1
        session = self.sessions
        plugin: str | None = None  # authenticated as
        self._sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                request_msg = json.loads(msg.data)
                kind, data = request_msg.get("messageType"), request_msg.get("data") or {}
                try:
                    if request_msg.get("apiName") != "VTubeStudioPublicAPI":
                        raise ApiError(3, "apiName must be VTubeStudioPublicAPI")
                    if request_msg.get("apiVersion") != "1.0":
                        raise ApiError(4, "unsupported apiVersion")
                    rid = request_msg.get("requestID")
                    if rid is not None and not (isinstance(rid, str) and 1 <= len(rid) <= 64):
                        raise ApiError(5, "requestID must be 1..64 ASCII characters")
                    if kind == "AuthenticationTokenRequest":
                        answer = self._token(data)
                    elif kind == "AuthenticationRequest":
                        answer, plugin = self._authenticate(session, data)
                    elif plugin is None:
                        raise ApiError(8, "this request requires authentication")
                    elif kind == "ParameterCreationRequest":
                        answer = self._create(session, plugin, data)
                    elif kind == "InjectParameterDataRequest":
                        answer = self._inject(session, data)
                    else:
                        raise ApiError(7, f"unknown request type {kind}")
                    reply = {"messageType": kind.replace("Request", "Response"), "data": answer}
                except ApiError as exc:
                    self.errors.append((exc.error_id, exc.message))
                    reply = {
                        "messageType": "APIError",
                        "data": {"errorID": exc.error_id, "message": exc.message},
                    }
                reply.update(
                    apiName="VTubeStudioPublicAPI",
                    apiVersion="1.0",
                    timestamp=int(asyncio.get_running_loop().time() * 1000),
                    requestID=request_msg.get("requestID") or uuid.uuid4().hex,
                )
                await ws.send_str(json.dumps(reply))
        finally:
            self._sockets.discard(ws)
        return ws

    def _token(self, data: dict[str, Any]) -> dict[str, Any]:
        name, developer = data.get("pluginName"), data.get("pluginDeveloper")
        if not (isinstance(name, str) and 3 <= len(name) <= 32):
            raise ApiError(52, "pluginName must be 3..32 characters")
        if not (isinstance(developer, str) and 3 <= len(developer) <= 32):
            raise ApiError(53, "pluginDeveloper must be 3..32 characters")
        self.token_requests += 1  # the user clicks Allow at once
        token = uuid.uuid4().hex
        self.issued[token] = (name, developer)
        return {"authenticationToken": token}

    def _authenticate(
        self, session: int, data: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        token = data.get("authenticationToken")
        if not isinstance(token, str):
            raise ApiError(100, "authenticationToken missing")
        plugin = (data.get("pluginName"), data.get("pluginDeveloper"))
        ok = self.issued.get(token) == plugin
        self.authentications.append((session, token, ok))
        return {"authenticated": ok, "reason": "Token valid." if ok else "Token invalid."}, (
            str(plugin[0]) if ok else None
        )

    def _create(self, session: int, plugin: str, data: dict[str, Any]) -> dict[str, Any]:
        name = data.get("parameterName")
        if not isinstance(name, str) or not PARAMETER_NAME.match(name):
            raise ApiError(352, "parameter names are 4..32 alphanumerics")
        for bound in ("min", "max", "defaultValue"):
            value = data.get(bound)
            if not isinstance(value, int | float) or not -1e6 <= value <= 1e6:
                raise ApiError(353, f"{bound} must be a number in -1000000..1000000")
        if self.parameters.get(name, plugin) != plugin:
            raise ApiError(354, "a parameter of that name belongs to another plugin")
        self.parameters[name] = plugin
        self.created.append((session, name))
        return {"parameterName": name}

    def _inject(self, session: int, data: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, float] = {}
        for entry in data.get("parameterValues") or []:
            name, value = entry.get("id"), entry.get("value")
            if name not in self.parameters and name not in DEFAULT_PARAMETERS:
                raise ApiError(453, f"parameter {name} not found")
            if not isinstance(value, int | float) or not -1e6 <= value <= 1e6:
                raise ApiError(454, "values must be numbers in -1000000..1000000")
            values[name] = float(value)
        loop = asyncio.get_running_loop()
        self.injections.append(Injection(loop.time(), session, values))
        return {}


class ApiError(Exception):
    def __init__(self, error_id: int, message: str) -> None:
        super().__init__(message)
        self.error_id = error_id
        self.message = message


@pytest_asyncio.fixture(loop_scope="module")
async def vts() -> AsyncIterator[FakeVtubeStudio]:
    fake = FakeVtubeStudio()
    await fake.astart()
    try:
        yield fake
    finally:
        if fake._runner is not None:
            await fake.astop()


def speaking_run(injections: list[Injection]) -> list[Injection]:
    """The injections from the first one marked speaking to the last of that run."""
    flags = [i.values[SPEAKING] == 1.0 for i in injections]
    first = flags.index(True)
    last = first
    while last + 1 < len(flags) and flags[last + 1]:
        last += 1
    return injections[first : last + 1]


def assert_idle(injections: list[Injection]) -> None:
    """At least once a second, mouth shut (VTS forgets a parameter not sent for a second)."""
    assert len(injections) >= 3
    assert all(i.values[MOUTH_OPEN] == 0.0 and i.values[SPEAKING] == 0.0 for i in injections)
    gaps = np.diff([i.at for i in injections])
    assert gaps.max() < 1.0, gaps


async def test_the_bridge_moves_the_mouth_with_the_channel_and_survives_restarts(
    encoder_worker: EncoderWorker, vts: FakeVtubeStudio, tmp_path: Path
) -> None:
    engine = GatedEngine(auto=True)
    token_file = tmp_path / "config" / "vts-token.json"
    async with (
        live_server(embedder=encoder_worker, engine=engine) as srv,
        LivevoiceClient(srv.ws_url, timeout=TIMEOUT) as bot,
    ):
        await bot.aregister(reference_wav())
        await bot.ajoin("main", "speak")
        bridge = VtsBridge(
            server=srv.ws_url,
            channel="main",
            vts_url=vts.url,
            token_file=token_file,
            timeout=TIMEOUT,
            backoff=Backoff(initial=0.1, maximum=0.5),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(bridge.arun(stop))
        try:
            # First run: a token asked for once (the user clicks Allow), kept in the file.
            await asyncio.wait_for(bridge.listening.wait(), TIMEOUT)
            await until_true(lambda: len(vts.injected(1)) >= 4, "idle injections")
            assert vts.token_requests == 1
            (token,) = vts.issued
            assert vts.authentications == [(1, token, True)]
            assert json.loads(token_file.read_text())["authenticationToken"] == token
            assert token_file.stat().st_mode & 0o077 == 0
            created = [name for session, name in vts.created if session == 1]
            assert created == ["LivevoiceMouthOpen", "LivevoiceMouthForm", "LivevoiceSpeaking"]
            assert_idle(vts.injected(1))

            # Six 0.5 s sentences: 3 s of voice, then the mouth closes and stays shut.
            said = await bot.aspeak("One. Two. Three. Four. Five. Six.")
            await asyncio.wait_for(said.aresult(), TIMEOUT)
            await until_true(
                lambda: any(i.values[SPEAKING] == 1.0 for i in vts.injected(1)), "speaking"
            )
            spoke_at = speaking_run(vts.injected(1))[0].at
            await until_true(
                lambda: (
                    vts.injected(1)[-1].values[SPEAKING] == 0.0
                    and len([i for i in vts.injected(1) if i.at > spoke_at + 3.0]) >= 4
                ),
                "idle again after the message",
            )
            run = speaking_run(vts.injected(1))
            span = run[-1].at - run[0].at
            assert 2.5 <= span <= 4.0, span  # played in real time, not as fast as it arrived
            per_second = (len(run) - 1) / span
            assert per_second >= 30, per_second
            opened = [i.values[MOUTH_OPEN] for i in run]
            assert max(opened) > 0.5 and float(np.mean(np.array(opened) > 0.1)) >= 0.9, opened
            after = [i for i in vts.injected(1) if i.at > run[-1].at]
            assert_idle(after)

            # VTube Studio restarts: the bridge comes back with the kept token.
            await vts.astop()
            await until_true(lambda: bridge.vts_unreachable >= 2, "tries while VTS is down")
            assert bridge.listening.is_set()  # the livevoice side never noticed
            await vts.astart()
            await until_true(lambda: len(vts.injected(2)) >= 3, "injections again")
            assert vts.token_requests == 1 and vts.sessions == 2
            assert [a for a in vts.authentications if a[0] > 1] == [(2, token, True)]
            assert [name for session, name in vts.created if session == 2] == created
            assert_idle(vts.injected(2))
            assert bridge.vts_sessions == 2
        finally:
            stop.set()
            await asyncio.wait_for(running, TIMEOUT)

        # Second run, as the command: the token comes from the file; no popup again.
        await second_run_as_the_command(srv, bot, vts, token_file, token)
    assert not [e for e in vts.errors if e[0] != 8], vts.errors


async def second_run_as_the_command(
    srv: LiveServer,
    bot: LivevoiceClient,
    vts: FakeVtubeStudio,
    token_file: Path,
    token: str,
) -> None:
    sessions = vts.sessions
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "live.cli", "vts", "--server", srv.ws_url, "--channel", "main"),
        *("--vts-url", vts.url, "--token-file", str(token_file), "-v"),
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), TIMEOUT * 2)
            assert line, "livevoice vts ended before it joined"
            if line.startswith(b"listening to channel main"):
                break
        session = sessions + 1
        await until_true(lambda: len(vts.injected(session)) >= 2, "the command injecting")
        assert vts.token_requests == 1
        assert vts.authentications[-1] == (session, token, True)
        said = await bot.aspeak("Seven. Eight.")
        await asyncio.wait_for(said.aresult(), TIMEOUT)
        await until_true(
            lambda: any(i.values[SPEAKING] == 1.0 for i in vts.injected(session)), "speaking"
        )
        run_start = speaking_run(vts.injected(session))[0].at
        await until_true(
            lambda: any(i.at > run_start + 0.5 for i in vts.injected(session)), "mid-message"
        )
        assert max(i.values[MOUTH_OPEN] for i in speaking_run(vts.injected(session))) > 0.5
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), TIMEOUT)
    assert rc == 0


async def test_mouth_marks_and_played_positions_lead_the_timeline() -> None:
    """Sans I/O: ``audio.marks`` mouth values win over the envelope where they cover the
    position, visemes set the form, and a ``channel.played`` report re-anchors the playhead."""
    timeline = MouthTimeline()
    start = AudioStart(id="m", stream=0, sample_rate=16000, channel="main", message="k1")
    timeline.start(start, now=100.0)
    tone = (0.3 * 32767 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype("<i2")
    timeline.audio(0, tone.tobytes())  # 1 s of loud tone
    timeline.end(0)
    assert timeline.pose(100.5).open > 0.9 and timeline.pose(100.5).speaking
    assert not timeline.pose(101.2).speaking  # played out in real time
    # Marks cover 0.2..0.4 s: 10 values at 50/s from sample 3200.
    marks = {"start": 3200, "rate": 50, "values": [0.25] * 10}
    timeline.start(AudioStart(id="m", stream=1, sample_rate=16000, message="k2"), now=102.0)
    timeline.marks(1, marks, [{"v": "ou", "start": 3200, "end": 4800}])
    timeline.audio(1, tone.tobytes())
    timeline.end(1)
    pose = timeline.pose(102.3)
    assert (pose.open, pose.form) == (0.25, -1.0)
    assert timeline.pose(102.6).open > 0.9 and timeline.pose(102.6).form == 0.0
    # The OBS source says it has played only 100 ms of k2 at 102.8: the mouth follows it.
    timeline.played("k2", 100.0, now=102.8)
    assert timeline.pose(102.95).open == 0.25  # 0.25 s into k2, under the marks again
    assert timeline.pose(103.65).speaking and not timeline.pose(103.75).speaking  # ends at 103.7
