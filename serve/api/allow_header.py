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

from typing import Any

from starlette.routing import Match

#: The order methods are listed in; any other method follows, sorted.
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(scope: dict[str, Any]) -> list[str]:
    """The methods the app serves the request's path with (any method: only the path is matched)."""
    router = getattr(scope.get("app"), "router", None)
    methods: set[str] = set()
    for route in getattr(router, "routes", ()):
        route_methods = getattr(route, "methods", None)
        if not route_methods:
            continue  # a mount or a websocket route: no methods of its own
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        serves_path = getattr(getattr(route, "endpoint", None), "serves_path", None)
        if serves_path is not None and not serves_path(child.get("path_params", {})):
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
