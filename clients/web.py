"""Serves the browser widget (``clients/widget/``) from the livevoice server at ``/widget``."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

WIDGET_DIR = Path(__file__).resolve().parent / "widget"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    # Module scripts and AudioWorklet modules are refused under a non-JavaScript MIME type.
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def add_widget_routes(app: web.Application) -> None:
    """``GET /widget`` (the page; configured by its query string) and ``GET /widget/<file>``."""
    app.router.add_get("/widget", widget_index)
    app.router.add_get("/widget/", widget_index)
    app.router.add_get("/widget/{name:[A-Za-z0-9_.-]+}", widget_file)


async def widget_index(request: web.Request) -> web.StreamResponse:
    return _file(WIDGET_DIR / "index.html")


async def widget_file(request: web.Request) -> web.StreamResponse:
    # One flat directory and a strict name pattern: no path can leave it (tests are not served).
    name = request.match_info["name"]
    path = WIDGET_DIR / name
    if name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    return _file(path)


def _file(path: Path) -> web.StreamResponse:
    content_type = CONTENT_TYPES.get(path.suffix.lower())
    if content_type is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": content_type, **HEADERS})
