"""The browser playground at `GET /`: one static page (HTML, CSS, plain JavaScript shipped as
package data in `jblip/serve/static/`) that asks this server's own `/v1/chat/completions`, and
searches its image index (`/v1/search`, `jblip.serve.search`) when it has one.

Only the files listed in `ASSETS` are served (no path from the URL reaches the file system),
and the page's Content-Security-Policy lets it load nothing from anywhere but this server.
"""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from jblip.serve.errors import APIError

ASSETS = {"playground.css": "text/css; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
          "search.js": "text/javascript; charset=utf-8"}
POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
          "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _read(name: str) -> bytes:
    return resources.files("jblip.serve").joinpath("static", name).read_bytes()


def add_playground(app: FastAPI):
    headers = {"Content-Security-Policy": POLICY, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def page():
        return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            raise APIError(f"no playground file named {name!r}", 404, "not_found_error")
        return Response(_read(name), media_type=ASSETS[name], headers=headers)
