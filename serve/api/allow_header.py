"""Every 405 names every method its path is served with, in an ``Allow`` header (RFC 9110, 15.5.6).

Starlette's own 405 names only the methods of the first route whose path matched (``DELETE
/v1/videos`` got ``Allow: POST``, though GET is served too), and a 405 raised by a route itself
(the fal zoo route, for a path of this API's own) has none. :class:`AllowHeaderMiddleware` sets the
header on every 405 from the app's routes: each route whose path matches adds its methods, unless
its endpoint has a ``serves_path(path_params) -> bool`` attribute that says it does not serve this
path (the zoo route matches any ``/{owner}/{alias}`` but serves none of this API's own prefixes).

Install it in ``create_api``: ``app.add_middleware(AllowHeaderMiddleware)``.
"""

from __future__ import annotations

from typing import Any, Iterable

try:  # FastAPI >= 0.140 keeps included routers as such: their routes are listed through this
    from fastapi.routing import iter_route_contexts
except ImportError:  # pragma: no cover - older FastAPI copies included routes into app.routes
    def iter_route_contexts(routes):
        return routes

#: The order methods are listed in; any other method follows, sorted.
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _routes(app: Any) -> Iterable[Any]:
    return iter_route_contexts(getattr(getattr(app, "router", None), "routes", ()))


def _route_path(scope: dict[str, Any]) -> str:
    """The path the routes match: the request's, less the ``root_path`` it is mounted under."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):]
    return path


def allowed_methods(scope: dict[str, Any]) -> list[str]:
    """The methods the app serves the request's path with (any method: only the path is matched)."""
    path = _route_path(scope)
    methods: set[str] = set()
    for route in _routes(scope.get("app")):
        route_methods, regex = getattr(route, "methods", None), getattr(route, "path_regex", None)
        if not route_methods or regex is None:
            continue  # a mount or a websocket route: no methods of its own
        match = regex.match(path)
        if match is None:
            continue
        serves_path = getattr(getattr(route, "endpoint", None), "serves_path", None)
        if serves_path is not None and not serves_path(match.groupdict()):
            continue
        methods.update(route_methods)
    rank = {name: index for index, name in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda name: (rank.get(name, len(rank)), name))


class AllowHeaderMiddleware:
    """Sets ``Allow`` on every 405 response to the methods the path is served with."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_allow(message):
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != b"allow"]
                headers.append((b"allow", ", ".join(allowed_methods(scope)).encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_allow)
