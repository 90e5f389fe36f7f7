"""The web playground served by the ingress: ``GET /`` and its two assets under ``/playground/``.

Plain files from ``serve/api/static/`` (HTML, one script, one stylesheet: no framework, no build
step, nothing from a CDN). The page builds its parameter form from the service's own
``/openapi.json``, keeps the API key in ``sessionStorage`` and sends it only in the
``Authorization`` header of its same-origin requests. Every response carries a
Content-Security-Policy that allows this origin only (no inline script or style; Trusted Types
required, so no HTML is ever built from strings).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSET_PREFIX = "/playground"

#: Served file -> media type. Nothing else under static/ is reachable.
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",  # the uploaded image's preview
    "media-src 'self' blob:",  # the finished clip, fetched with the key and played from a blob URL
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",
])

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC_DIR / name).read_bytes(), media_type=media_type, headers=SECURITY_HEADERS)


def playground_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def playground_page() -> Response:
        return _file("index.html", "text/html; charset=utf-8")

    for name, media_type in ASSETS.items():
        router.add_api_route(f"{ASSET_PREFIX}/{name}", _asset(name, media_type), methods=["GET"])
    return router


def _asset(name: str, media_type: str):
    def playground_asset() -> Response:
        return _file(name, media_type)

    playground_asset.__name__ = f"playground_{name.replace('.', '_')}"
    return playground_asset
