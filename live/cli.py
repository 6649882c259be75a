"""``livevoice`` command line: ``serve`` (and the clients' commands, added by the clients)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from .app import create_app
from .connections import alisten
from .settings import Settings
from .tenants import TenantDirectory, describe, new_token

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
    serve.add_argument(
        "--data-dir",
        help="without --redis-url: an embedded Redis keeps voices here across restarts "
        "(LIVEVOICE_DATA_DIR; default ~/.local/share/livevoice; 'none' keeps them in memory)",
    )
    serve.add_argument("--device", choices=["cpu", "cuda"], help="model device (default: auto)")
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


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # No options of its own (prefix_chars): everything after `bench` goes to the bench's parser.
    bench = sub.add_parser(
        "bench",
        help="benchmark the voice cache and live sessions (source checkout; `bench --help`)",
        add_help=False,
        prefix_chars="\0",
    )
    bench.add_argument("args", nargs="*")
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    try:
        import bench
    except ImportError:  # the bench and the tests it reuses live in the checkout, not the wheel
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import bench
    result: int = bench.main(args.args, prog="livevoice bench")
    return result


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
    app = create_app(settings)
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
    _token_parser(sub)
    _bench_parser(sub)
    try:
        from clients.cli import add_commands
    except ImportError:  # the clients' commands land separately
        pass
    else:
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
            tokens_file=args.tokens_file,
            data_dir=args.data_dir,
        )
        if settings.data_dir is None:
            settings = dataclasses.replace(settings, data_dir=str(DEFAULT_DATA_DIR))
        elif settings.data_dir.lower() == "none":
            settings = dataclasses.replace(settings, data_dir=None)
        _run(aserve(settings))
        return 0
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
