"""A Speaker.bot-compatible WebSocket endpoint that speaks into one channel.

Streamer.bot (and many chat bots) drive Speaker.bot over a WebSocket with requests like
``{"id": "<id>", "request": "Speak", "voice": "EventVoice", "message": "...", "badWordFilter":
true}`` (Streamerbot/docs, ``speakerbot/2.api/0.websocket/1.requests.md``). This endpoint serves
that format so a streamer switches by changing the URL: each connection is a speak-role member
of the channel ``speakerbot_channel`` of the tenant it authenticated as, and the channel's
listeners (the OBS overlay) play what it speaks.

Each connection runs a real :class:`live.session.Session` over an in-process transport and
talks to it in livevoice frames (``hello``, ``channel.join`` as ``speak``, ``voice.use``,
``speak``, ``channel.pause`` …), so the session's rules hold unchanged: the tenant's limits,
text cleaning, voice checks, the channel's queue.

Replies follow Speaker.bot's: ``{"id": <echoed>, "status": "ok", "result": {...}}`` and
``{"id": <echoed>, "status": "error", "error": "<why>"}``; a frame that is not a request object
gets ``{"error": "malformed command"}``. Speaker.bot's docs show requests only; the reply shape
is the one Speekaboo (easyaspi314/Speekaboo, a Speaker.bot drop-in Streamer.bot talks to)
documents as Speaker.bot 0.1.4's. The connection stays open after any bad request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import WSMsgType, hdrs, web

from protocol.errors import LivevoiceError

from .connections import upgrade_tenant
from .session import Session

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 30.0
"""How long a request waits for the session's answer before it is answered with an error."""


def parse_voice_aliases(config: str | None) -> dict[str, str]:
    """``Alias=voice_id`` entries separated by commas or newlines; ``*`` names the voice for
    aliases not listed."""
    aliases: dict[str, str] = {}
    for entry in (config or "").replace("\n", ",").split(","):
        alias, sep, voice_id = entry.partition("=")
        if sep and alias.strip() and voice_id.strip():
            aliases[alias.strip()] = voice_id.strip()
    return aliases


@dataclass
class Speakerbot:
    """The endpoint's app-wide state: the channel it feeds, voice aliases, and which channels
    Speaker.bot has disabled (``Disable``: speak requests are answered but not spoken)."""

    channel: str = "main"
    aliases: dict[str, str] = field(default_factory=dict)
    disabled: set[tuple[str, str]] = field(default_factory=set)

    def voice_for(self, alias: str) -> str | None:
        """The tenant's voice id for a Speaker.bot voice alias: the mapped one, else the ``*``
        default, else the alias itself (a voice id used as its own alias)."""
        return self.aliases.get(alias) or self.aliases.get("*") or (alias or None)


SPEAKERBOT = web.AppKey("speakerbot", Speakerbot)


def is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


async def aserve(
    request: web.Request, services: Services, endpoint: Speakerbot
) -> web.StreamResponse:
    """The route: authenticated like ``/ws`` at the upgrade (Speaker.bot clients send no
    hello), then one request, one reply, in order."""
    # A server without tokens has one tenant: only this computer may drive it.
    if services.tenants.open and not is_loopback(request.remote):
        raise web.HTTPForbidden(text="without tokens, only loopback clients may connect")
    tenant = upgrade_tenant(request, services.tenants)
    if tenant is None:
        raise web.HTTPUnauthorized(
            text="this server needs a token: Authorization: Bearer or ?token=",
            headers={hdrs.WWW_AUTHENTICATE: "Bearer"},
        )
    if services.channels is None:
        raise web.HTTPNotFound(text="this server serves no channels")
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1024 * 1024)
    await ws.prepare(request)
    services.sockets.add(ws)
    bridge = SessionBridge(services, tenant)
    try:
        if await bridge.astart(endpoint.channel):
            await SpeakerbotConnection(ws, bridge, endpoint).arun()
        else:
            await ws.send_str(orjson.dumps({"status": "error", "error": bridge.failure}).decode())
    finally:
        services.sockets.discard(ws)
        await bridge.aclose()
        if not ws.closed:
            await ws.close()
    return ws


class SessionBridge:
    """A :class:`Session` over an in-process transport (``live.transport.Transport``): frames
    in through a queue, the session's frames out to whoever waits for an answer by id."""

    def __init__(self, services: Services, tenant: str) -> None:
        self._inbound: asyncio.Queue[str | None] = asyncio.Queue()
        self._closed = False
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._answer_types: dict[str, frozenset[str]] = {}
        self.session = Session(self, services, tenant=tenant)
        self._task: asyncio.Task[None] | None = None
        self.failure = "the session did not start"
        self.pinned: str | None = None
        """The voice id the session has pinned (``voice.use`` answered)."""

    # --- Transport ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    async def areceive(self, timeout: float) -> str | bytes | LivevoiceError | None:
        # No hello or idle timeout: this side sends hello at once, and a bot may be quiet
        # for hours while its socket stays up.
        return await self._inbound.get()

    async def send_str(self, data: str) -> None:
        message = orjson.loads(data)
        key = message.get("id")
        kind = message.get("type")
        if kind == "ready":
            key = "ready"
        elif kind == "channel.joined":
            key = "join"
        if not isinstance(key, str) or key not in self._waiters:
            return  # a completion, channel.state: nothing a Speaker.bot client is told
        if kind == "error" or kind in self._answer_types[key]:
            waiter = self._waiters.pop(key)
            if not waiter.done():
                waiter.set_result(message)

    async def send_bytes(self, data: bytes) -> None:
        pass  # a speak-role member gets no audio

    async def close(self, *, code: int, message: bytes) -> bool:
        self._closed = True
        self.failure = message.decode(errors="replace") or f"session closed ({code})"
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result({"type": "error", "message": self.failure})
        self._waiters.clear()
        return True

    def admit(self) -> None:
        pass

    # --- requests -----------------------------------------------------------------------------
    async def astart(self, channel: str) -> bool:
        """hello, then join ``channel`` as a speaker; False (``failure`` says why) if refused."""
        self._task = asyncio.create_task(self.session.arun(), name="speakerbot-session")
        for key, frame, answer in (
            ("ready", {"type": "hello", "client": "speakerbot"}, "ready"),
            (
                "join",
                {"type": "channel.join", "channel": channel, "role": "speak"},
                "channel.joined",
            ),
        ):
            reply = await self.arequest(key, frame, answer)
            if reply.get("type") == "error":
                self.failure = str(reply.get("message", self.failure))
                return False
        return True

    async def arequest(self, key: str, frame: dict[str, Any], *answers: str) -> dict[str, Any]:
        """Send one frame; the first message answering ``key`` (one of ``answers`` or an
        ``error``)."""
        if self._closed:
            return {"type": "error", "message": self.failure}
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        self._answer_types[key] = frozenset(answers)
        await self._inbound.put(orjson.dumps(frame).decode())
        try:
            return await asyncio.wait_for(waiter, ANSWER_TIMEOUT_S)
        except TimeoutError:
            return {"type": "error", "message": "the server did not answer in time"}
        finally:
            self._waiters.pop(key, None)
            self._answer_types.pop(key, None)

    async def acontrol(self, kind: str) -> dict[str, Any]:
        """A queue control, then a ping: frames are handled in order, so the pong says the
        control was (an error with its id says it was refused)."""
        key = uuid.uuid4().hex
        self._waiters[key] = asyncio.get_running_loop().create_future()
        self._answer_types[key] = frozenset()
        try:
            await self._inbound.put(orjson.dumps({"type": kind, "id": key}).decode())
            pong = await self.arequest(key + ".ping", {"type": "ping", "id": key + ".ping"}, "pong")
            refused = self._waiters[key]
            return refused.result() if refused.done() else pong
        finally:
            self._waiters.pop(key, None)
            self._answer_types.pop(key, None)

    async def aclose(self) -> None:
        await self._inbound.put(None)
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, ANSWER_TIMEOUT_S)
            except Exception:
                log.exception("the Speaker.bot session ended with an error")


class SpeakerbotConnection:
    """One Speaker.bot client: its requests, answered in order."""

    def __init__(self, ws: web.WebSocketResponse, bridge: SessionBridge, endpoint: Speakerbot):
        self.ws = ws
        self.bridge = bridge
        self.endpoint = endpoint
        self.key = (bridge.session.tenant, endpoint.channel)

    async def arun(self) -> None:
        async for msg in self.ws:
            if msg.type is WSMsgType.TEXT:
                reply = await self.ahandle(msg.data)
            elif msg.type is WSMsgType.BINARY:
                try:
                    reply = await self.ahandle(msg.data.decode())
                except UnicodeDecodeError:
                    reply = {"error": "malformed command"}
            else:
                break
            await self.ws.send_str(orjson.dumps(reply).decode())
            if self.bridge.closed:  # the session was closed under us (rejected, shut down)
                break

    async def ahandle(self, text: str) -> dict[str, Any]:
        try:
            request = orjson.loads(text)
        except orjson.JSONDecodeError:
            return {"error": "malformed command"}
        if not isinstance(request, dict) or not isinstance(request.get("request"), str):
            return {"error": "malformed command"}
        rid = request.get("id")
        try:
            result = await self.adispatch(request["request"], request)
        except RequestFailed as exc:
            return {"id": rid, "status": "error", "error": str(exc)}
        return {"id": rid, "status": "ok", "result": result}

    async def adispatch(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        controls = {
            "Stop": "channel.skip",
            "Pause": "channel.pause",
            "Resume": "channel.resume",
            "Clear": "channel.clear",
        }
        if name == "Speak":
            return await self.aspeak(request)
        if name in controls:
            failed(await self.bridge.acontrol(controls[name]))
            return {}
        if name in ("Enable", "On"):
            self.endpoint.disabled.discard(self.key)
            return {}
        if name in ("Disable", "Off"):
            self.endpoint.disabled.add(self.key)
            return {}
        raise RequestFailed(f"unknown request {name!r}")

    async def aspeak(self, request: dict[str, Any]) -> dict[str, Any]:
        message = request.get("message")
        if not isinstance(message, str) or not message.strip():
            raise RequestFailed("no message was provided")
        alias = request.get("voice")
        alias = alias if isinstance(alias, str) else ""
        voice_id = self.endpoint.voice_for(alias)
        if voice_id is None:
            raise RequestFailed("no voice alias was provided and none is configured")
        speech_id = uuid.uuid4().hex
        result = {"speechId": speech_id, "text": message, "voiceName": alias}
        if self.key in self.endpoint.disabled:
            return result  # Speaker.bot disabled: the request is taken, nothing is spoken
        if voice_id != self.bridge.pinned:
            key = uuid.uuid4().hex
            answer = await self.bridge.arequest(
                key, {"type": "voice.use", "voice_id": voice_id, "id": key}, "voice.ready"
            )
            failed(answer, f"voice alias {alias!r}: ")
            self.bridge.pinned = voice_id
        # The channel's word filter (R17), if it has one, only where Speaker.bot would filter.
        self.bridge.session.filter_speaks = request.get("badWordFilter") is True
        speak = {"type": "speak", "id": speech_id, "text": message}
        failed(await self.bridge.arequest(speech_id, speak, "queued"))
        return result


class RequestFailed(Exception):
    """A request answered with Speaker.bot's error shape."""


def failed(answer: dict[str, Any], prefix: str = "") -> None:
    if answer.get("type") == "error":
        code = answer.get("code")
        why = str(answer.get("message", "failed"))
        raise RequestFailed(f"{prefix}{why} ({code})" if code else f"{prefix}{why}")
