"""``livevoice`` command line: ``serve`` (and the clients' commands, added by the clients)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from .app import create_app
from .settings import Settings

log = logging.getLogger("live")


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the WebSocket TTS server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1; LIVEVOICE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8765; LIVEVOICE_PORT)")
    serve.add_argument(
        "--redis-url",
        help="shared embedding cache, redis:// or rediss:// (LIVEVOICE_REDIS_URL); "
        "without it voices are cached in process only",
    )
    serve.add_argument("--device", choices=["cpu", "cuda"], help="model device (default: auto)")
    serve.add_argument("--log-level", default="INFO")


async def aserve(settings: Settings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("livevoice listening on http://%s:%d (ws at /ws)", settings.host, settings.port)
    if settings.redis_url is None:
        log.info("no Redis URL: voices are cached in this process only")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()


def _run(coro_factory: object) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        runner = asyncio.Runner()
    with runner:
        runner.run(coro_factory)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livevoice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    try:
        from clients.cli import add_commands
    except ImportError:
        add_commands = None
    if add_commands is not None:
        add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        settings = Settings.from_env(
            host=args.host, port=args.port, redis_url=args.redis_url, device=args.device
        )
        _run(aserve(settings))
        return 0
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
