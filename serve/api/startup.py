"""Start-up gates: until the application can take work, its routes answer 503 ``not_ready`` with
``Retry-After`` (never a 404 that a client would read as permanent, never a hang).

Two layers, because Ray Serve's HTTP proxy answers before the application exists:

* :class:`ProxyStartupGate`, in Serve's HTTP proxy (``svd-serve up`` names :func:`proxy_middlewares`
  in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``). Until the application's route is registered
  (and again once it is deleted on shutdown) the proxy answers ``404 Path '...' not found``; from the
  route's registration until an ingress replica runs it holds the request. Both become 503.
* :class:`ReadinessGate`, around the FastAPI app in the ingress. Once the ingress runs but the model
  replicas or the job runner do not answer yet, ``/v1`` answers 503. Readiness is latched on its
  first success (``/readyz`` or a request's check); later outages have their own errors.
  ``/healthz``, ``/readyz``, the docs and the playground are never gated.

This module is imported in the proxy process: the standard library only (starlette lazily).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

#: What a client is told to wait before trying again.
RETRY_AFTER_S = 5
#: The environment variable Serve's proxy reads for a callback that returns its ASGI middlewares.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve.api.startup:proxy_middlewares"
#: The body the proxy sends when no route matches (``HTTPProxy.not_found_response``).
_PROXY_NOT_FOUND_PREFIX = b"Path '"
#: Serve's own endpoints (/-/healthz, /-/routes): answered by the proxy itself.
_SERVE_PATHS = "/-/"
STARTING_MESSAGE = "the service is starting (or stopping); retry after a few seconds"
MODELS_MESSAGE = "the service is starting: its models are not ready yet; retry after a few seconds"


async def send_not_ready(send, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
    """503 with the native error body and Retry-After."""
    body = json.dumps({"error": {"code": "not_ready", "message": message}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry_after_s).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- in Serve's HTTP proxy -------------------------------------------------------------------------


class ProxyStartupGate:
    """ASGI middleware for Serve's HTTP proxy: "no such route" and "no ingress replica yet" -> 503.

    The first is seen in the proxy's own answer (a text/plain 404 ``Path '...' not found``, which
    the application never sends); the second is asked of the proxy's route table (the handle of the
    matched route has not seen a running replica yet). Without that table (another Ray version) the
    request waits in the proxy until the ingress runs, which then answers 503 itself.
    """

    def __init__(self, app) -> None:
        self.app = app
        self._router = _proxy_router(app)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(_SERVE_PATHS):
            return await self.app(scope, receive, send)
        if self._no_replica_yet(scope.get("path", "/")):
            return await send_not_ready(send, STARTING_MESSAGE)
        await self.app(scope, receive, _not_found_to_not_ready(send))

    def _no_replica_yet(self, path: str) -> bool:
        if self._router is None:
            return False
        try:
            matched = self._router.match_route(path)
            if matched is None:
                return False  # the proxy's 404, rewritten on its way out
            return not matched[1].running_replicas_populated()
        except Exception:  # noqa: BLE001 - an internal that changed: let the proxy decide
            return False


def _proxy_router(app) -> Any:
    """The proxy's route table (``ProxyRouter``), found through the wrapped apps; None if absent."""
    for _ in range(8):
        router = getattr(app, "proxy_router", None)
        if router is not None and hasattr(router, "match_route"):
            return router
        app = getattr(app, "app", None) or getattr(app, "_app", None)
        if app is None:
            return None
    return None


def _not_found_to_not_ready(send) -> Callable[[dict], Awaitable[None]]:
    """Wraps ``send``: the proxy's own "no such route" 404 goes out as 503 not_ready."""
    held: dict | None = None
    replaced = False

    async def wrapped(message: dict) -> None:
        nonlocal held, replaced
        if replaced:
            return  # the rest of the proxy's 404 body
        if message["type"] == "http.response.start" and message.get("status") == 404 and _is_text(message):
            held = message  # decided by the body
            return
        if held is not None:
            start, held = held, None
            if message["type"] == "http.response.body" and message.get("body", b"").startswith(
                    _PROXY_NOT_FOUND_PREFIX):
                replaced = True
                return await send_not_ready(send, STARTING_MESSAGE)
            await send(start)
        await send(message)

    return wrapped


def _is_text(start: dict) -> bool:
    for name, value in start.get("headers") or ():
        if bytes(name).lower() == b"content-type":
            return bytes(value).startswith(b"text/plain")
    return False


def proxy_middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` callback: the proxy's extra middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyStartupGate)]


# -- in the ingress --------------------------------------------------------------------------------


class StartupReadiness:
    """Whether the application has been ready once: false until ``check`` first succeeds.

    ``check`` (``/readyz``) always checks and latches on success; ``poll`` (the gate) shares one
    check among concurrent requests and waits for it at most ``wait_s`` (it goes on meanwhile).
    """

    def __init__(self, check: Callable[[], Awaitable[Any]], *, wait_s: float = 2.0) -> None:
        self._check, self.wait_s = check, wait_s
        self.ready = False
        self._task: asyncio.Task | None = None

    async def check(self) -> None:
        await self._check()
        self.ready = True

    async def poll(self) -> bool:
        if self.ready:
            return True
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self.check())
            self._task.add_done_callback(_retrieve)
        await asyncio.wait({self._task}, timeout=self.wait_s)
        return self.ready


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # a failed check is an answer (not ready), not an unhandled error


class ReadinessGate:
    """ASGI middleware: requests under ``prefixes`` answer 503 until the application is ready."""

    def __init__(self, app, *, readiness: StartupReadiness, prefixes: tuple[str, ...] = ("/v1",)) -> None:
        self.app, self.readiness, self.prefixes = app, readiness, prefixes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self._gated(scope.get("path", "")) and not await self.readiness.poll():
            return await send_not_ready(send, MODELS_MESSAGE)
        await self.app(scope, receive, send)

    def _gated(self, path: str) -> bool:
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.prefixes)
