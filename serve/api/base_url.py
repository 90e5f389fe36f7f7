"""The base URL a response's links are built on, the same for every API: the configured
``public_url``, else where the client reached us (``X-Forwarded-Proto`` / ``X-Forwarded-Host``
from a proxy or TLS terminator in front), else the request's own scheme and ``Host``."""

from __future__ import annotations

import re

from fastapi import Request

_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]]+")


def public_base_url(request: Request, public_url: str | None = None) -> str:
    if public_url:
        return public_url.rstrip("/")
    proto = (request.headers.get("x-forwarded-proto") or "").split(",")[0].strip().lower()
    if proto not in ("http", "https"):
        proto = request.url.scheme
    host = (request.headers.get("x-forwarded-host") or "").split(",")[0].strip()
    if not host or not _HOST.fullmatch(host):
        host = request.headers.get("host") or request.url.netloc
        if not _HOST.fullmatch(host):
            host = request.url.netloc
    return f"{proto}://{host}{request.scope.get('root_path', '')}".rstrip("/")
