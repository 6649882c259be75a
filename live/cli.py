"""``livevoice`` command line: ``serve`` and ``token`` here; other packages add theirs.

``live`` imports nothing above it. The client commands (``say``, ``chat``), the bench and the
browser widget's pages reach the command line and the served app as entry points of the
installed distribution (``pyproject.toml``): ``livevoice.commands`` and ``livevoice.routes``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from .app import RouteSet, create_app
from .connections import alisten
from .settings import Settings
from .tenants import TenantDirectory, describe, new_token

log = logging.getLogger("live")

T = TypeVar("T")

COMMANDS = "livevoice.commands"
"""Entry points called with the ``livevoice`` subparsers, each adding its commands."""
ROUTES = "livevoice.routes"
"""Entry points called with the served app, each adding its routes (the browser widget)."""
DESCRIPTION = "Streaming WebSocket text-to-speech for live streamers."


def plugins(group: str) -> list[Any]:
    """The objects the installed distributions name in entry point ``group``, by name."""
    return [ep.load() for ep in sorted(entry_points(group=group), key=lambda ep: ep.name)]


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the WebSocket TTS server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1; LIVEVOICE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8765; LIVEVOICE_PORT)")
    serve.add_argument(
        "--redis-url",
        help="shared embedding cache, redis:// or rediss:// (LIVEVOICE_REDIS_URL); "
        "without it voices are cached in process only",
    )
    serve.add_argument(
        "--data-dir",
        help="without --redis-url: an embedded Redis keeps voices here across restarts "
        "(LIVEVOICE_DATA_DIR; default ~/.local/share/livevoice; 'none' keeps them in memory)",
    )
    serve.add_argument(
        "--device", choices=["cpu", "cuda"], help="speaker encoder device (default: auto)"
    )
    serve.add_argument(
        "--tts-device",
        choices=["cpu", "cuda"],
        help="Piper's device (default cpu; cuda needs onnxruntime-gpu; LIVEVOICE_TTS_DEVICE)",
    )
    serve.add_argument(
        "--tokens-file",
        help="file of tenant=sha256:<hex> lines (LIVEVOICE_TOKENS_FILE; LIVEVOICE_TOKENS for "
        "inline entries); without tokens the server binds to loopback only",
    )
    serve.add_argument("--log-level", default="INFO")


LOOPBACK = ("127.0.0.1", "::1", "localhost")
DEFAULT_DATA_DIR = Path("~/.local/share/livevoice")


def _token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="make a bearer token for a tenant")
    token.add_argument("tenant")
    token.set_defaults(func=_token)


def _token(args: argparse.Namespace) -> int:
    token, entry = new_token(args.tenant)
    print(f"token (give it to the client; it is not stored): {token}")
    print(f"entry (add it to LIVEVOICE_TOKENS or the tokens file): {entry}")
    return 0


def guard_open_server(settings: Settings) -> Settings:
    """Without tokens anyone can connect, so such a server only listens on loopback."""
    tenants = TenantDirectory.from_config(settings.tokens, settings.tokens_file)
    if not tenants.open:
        log.info("%d tenants configured: %s", len(tenants.tenants), describe(tenants.tenants))
        return settings
    if settings.host not in LOOPBACK:
        log.warning(
            "no tokens configured: binding to 127.0.0.1 instead of %s "
            "(configure LIVEVOICE_TOKENS or --tokens-file to serve other machines)",
            settings.host,
        )
        return dataclasses.replace(settings, host="127.0.0.1")
    log.info("no tokens configured: open to anyone on this machine, loopback only")
    return settings


async def aserve(settings: Settings) -> None:
    settings = guard_open_server(settings)
    routes: list[RouteSet] = plugins(ROUTES)
    if not routes:
        log.warning(
            "no %s entry points: /widget is not served (the installed metadata predates them; "
            "reinstall: make install)",
            ROUTES,
        )
    app = create_app(settings, routes=routes)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    listener = await alisten(
        runner, settings.host, settings.port, max_connections=settings.max_connections
    )
    log.info(
        "livevoice listening on http://%s:%d (ws at /ws; %s event loop)",
        settings.host,
        settings.port,
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    if settings.redis_url is None and settings.data_dir is None:
        log.info("no Redis URL and no data dir: voices are cached in this process only")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        listener.close()
        await runner.cleanup()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop, the loop ``serve`` and the bench measure with."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - no uvloop on Windows (see pyproject's markers)
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        return runner.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livevoice", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _token_parser(sub)
    for add_commands in plugins(COMMANDS):
        add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        settings = Settings.from_env(
            host=args.host,
            port=args.port,
            redis_url=args.redis_url,
            device=args.device,
            tts_device=args.tts_device,
            tokens_file=args.tokens_file,
            data_dir=args.data_dir,
        )
        if settings.data_dir is None:
            settings = dataclasses.replace(settings, data_dir=str(DEFAULT_DATA_DIR))
        elif settings.data_dir.lower() == "none":
            settings = dataclasses.replace(settings, data_dir=None)
        run(aserve(settings))
        return 0
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
