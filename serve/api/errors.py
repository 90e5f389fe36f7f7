"""One table from domain errors to HTTP responses, and the one error body every rejection uses.

A *rejected* request (bad input, authentication, not found, capacity) is an HTTP 4xx/503 with
``{"error": {"code", "message"}}``. A job that fails after admission is data on the job, never
an HTTP error. No exception type name or stack trace reaches a client, and no message is longer
than :data:`MAX_MESSAGE_CHARS` (input echoed in a message is cut, never sent back whole).

Anything else is a bug: a 500 ``internal_error`` whose message carries an error id (also in the
``X-Error-Id`` header) that finds the log line. The traceback is logged once per kind of failure
(exception type and where it was raised), later ones as one line with their id, so a flood of one
bad request cannot flood the log; each is counted (``svd_http_internal_errors_total``).

Every error response (4xx/5xx) the app sends, whoever renders it, is counted by
:class:`HTTPErrorMetrics` in ``svd_http_errors_total{api, status, code, tenant}``.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.errors import ImageTooLargeError, InvalidImageError, InvalidInputError, SVDServeError
from pipelines.params import describe_validation_error

from ..jobstore import JobStoreError
from ..storage import ObjectNotFound, StorageError
from ..tenants import AuthenticationError

logger = logging.getLogger("ray.serve.svd_serve")

#: Longest error message a client gets; longer ones (echoed input) are cut with an ellipsis.
MAX_MESSAGE_CHARS = 1000


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_parameter, not_found.")
    message: str = Field(description="What went wrong, for a person; one line.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class APIError(SVDServeError):
    """An error raised by the API layer itself with its status and code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class NotFoundError(APIError):
    def __init__(self, what: str = "video job") -> None:
        super().__init__(404, "not_found", f"{what} not found")


#: Domain error type -> HTTP status. The most specific type wins (checked in MRO order); the body's
#: code is the error's own ``code`` (e.g. invalid_image, url_not_allowed), or the one given here.
ERROR_TABLE: dict[type[BaseException], tuple[int, str]] = {
    AuthenticationError: (401, "unauthorized"),
    ImageTooLargeError: (413, "image_too_large"),
    InvalidImageError: (422, "invalid_image"),
    InvalidInputError: (422, "invalid_input"),
    JobStoreError: (503, "store_unavailable"),
    StorageError: (503, "storage_unavailable"),
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass(frozen=True)
class Rejection:
    """What a request's failure means for the client, before any API renders it in its own shape."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.message) > MAX_MESSAGE_CHARS:
            object.__setattr__(self, "message", self.message[:MAX_MESSAGE_CHARS - 3] + "...")


def rejection_for(error: BaseException) -> Rejection:
    """The one mapping from domain errors to HTTP (the native API and every adapter use it)."""
    if isinstance(error, APIError):
        return Rejection(error.status, error.code, str(error), error.headers)
    if isinstance(error, ValidationError):
        return Rejection(422, "invalid_parameter", describe_validation_error(error))
    if isinstance(error, RequestValidationError):
        parts = []
        for item in error.errors():
            loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path", "header"))
            parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
        return Rejection(422, "invalid_parameter", "; ".join(parts) or "invalid request")
    if isinstance(error, ObjectNotFound):  # a stored clip that a storage rule or an operator deleted
        return Rejection(410, "output_gone", "the job's clip is no longer in storage (deleted or expired there); "
                         "submit the job again")
    if isinstance(error, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return Rejection(error.status_code, code, str(error.detail), dict(error.headers or {}))
    for kind in type(error).__mro__:
        if kind in ERROR_TABLE:
            status, code = ERROR_TABLE[kind]
            code = getattr(error, "code", None) or code
            if status >= 500:
                # Infrastructure detail stays in the logs.
                logger.error("request rejected: %s", error)
                return Rejection(status, code, "a backing service is unavailable; retry shortly", {"Retry-After": "5"})
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
            return Rejection(status, code, str(error), headers)
    return _internal_error(error)


class _SeenFailures:
    """Kinds of unexpected failure whose traceback was logged already (bounded)."""

    def __init__(self, limit: int = 1000) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._limit = limit

    def first(self, error: BaseException) -> bool:
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        kind = (type(error).__qualname__, where)
        with self._lock:
            if kind in self._seen or len(self._seen) >= self._limit:
                return False
            self._seen.add(kind)
            return True


_seen_failures = _SeenFailures()


def _internal_error(error: BaseException) -> Rejection:
    """A bug: a 500 with an error id the logs can be searched for; never the error's own text."""
    error_id = uuid.uuid4().hex[:16]
    if _seen_failures.first(error):
        logger.error("unhandled error %s", error_id, exc_info=error)
    else:
        logger.error("unhandled error %s: %s (traceback logged at its first occurrence)", error_id,
                     type(error).__name__)
    from ..telemetry import emit

    kind = type(error).__name__
    emit(lambda m: m.http_internal_errors.inc(tags={"error": kind}))
    return Rejection(500, "internal_error", f"internal error (error id {error_id})", {"X-Error-Id": error_id})


#: A conflict about the job's state is final: clients that retry 409s by default (the openai SDK)
#: are told not to (``x-should-retry`` is the header that SDK honours).
NO_RETRY_HEADERS = {409: {"x-should-retry": "false"}}


def response_for(error: BaseException, request: Request | None = None) -> JSONResponse:
    r = rejection_for(error)
    if request is not None:
        note_error_code(request, r.code)
    return error_response(r.status, r.code, r.message, {**NO_RETRY_HEADERS.get(r.status, {}), **r.headers} or None)


#: Where the rejection's code waits in the request's ASGI state for :class:`HTTPErrorMetrics`
#: (an adapter's body may spell it its own way, e.g. OpenAI's ``invalid_api_key``).
ERROR_CODE_STATE = "svd_error_code"


def note_error_code(request: Request, code: str) -> None:
    request.scope.setdefault("state", {})[ERROR_CODE_STATE] = code


class RequestTooLarge(Exception):
    """Raised by the body-size middleware while a body streams in; it answers the 413 itself."""


def adapter_route(render: Callable[[Rejection], Response]) -> type[APIRoute]:
    """A route class for a compatibility adapter: every failure of its routes (request validation
    included) is mapped by :func:`rejection_for` and rendered in that API's own error shape."""

    class AdapterRoute(APIRoute):
        svd_api = adapter_api_name(render)  # svd_http_errors_total's ``api``

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestTooLarge:
                    raise  # the middleware's own 413, not the route's failure
                except Exception as error:  # noqa: BLE001 - mapped, never leaked
                    rejection = rejection_for(error)
                    note_error_code(request, rejection.code)
                    return render(rejection)

            return handle

    return AdapterRoute


def adapter_api_name(render: Callable) -> str:
    """The adapter a render function belongs to: its module's package under ``serve.api.compat``
    (``serve.api.compat.fal.rendering`` -> ``fal``)."""
    module = getattr(render, "__module__", "") or ""
    _, found, rest = module.partition(".compat.")
    return rest.split(".", 1)[0] if found and rest else "other"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SVDServeError)
    async def _domain(request: Request, error: SVDServeError):
        return response_for(error, request)

    @app.exception_handler(JobStoreError)
    async def _store(request: Request, error: JobStoreError):
        return response_for(error, request)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, error: StorageError):
        return response_for(error, request)

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, error: ValidationError):
        return response_for(error, request)

    @app.exception_handler(RequestValidationError)
    async def _request(request: Request, error: RequestValidationError):
        return response_for(error, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        return response_for(error, request)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, error: Exception):
        return response_for(error, request)


# -- counting error responses -----------------------------------------------------------------------

#: Error bodies read (at most this much) for their code when nothing noted it: the native shape
#: written by middlewares (413 request_too_large, 503 not_ready).
MAX_SNIFFED_BODY = 4096
#: The code of an error response that names none.
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "request_too_large", 429: "rate_limited", 500: "internal_error",
                503: "unavailable"}
#: Series exported at 0 from the start, so alert expressions on them have data before the first.
ZERO_SERIES = [("native", 429, "rate_limited"), ("native", 429, "queue_full"), ("native", 500, "internal_error"),
               ("native", 503, "store_unavailable"), ("native", 503, "storage_unavailable"),
               ("native", 503, "not_ready")]


def export_zero_error_series() -> None:
    """Export :data:`ZERO_SERIES` at 0 (the ingress, at start: Starlette builds the middleware
    only on the first request)."""
    from ..telemetry import zero_counters

    zero_counters("http_errors", [{"api": api, "status": str(status), "code": code, "tenant": ""}
                                  for api, status, code in ZERO_SERIES])


class HTTPErrorMetrics:
    """ASGI middleware, outermost: counts every 4xx/5xx response in ``svd_http_errors_total{api,
    status, code, tenant}``. Nothing is added to a successful request; an error costs a hash of
    its API key (``authenticate`` is the tenants registry's in-memory lookup, no store read).

    * ``api``: the adapter whose route answered (``fal``, ``generations``, ``stability``, ``files``);
      ``openai`` for the native routes called by an OpenAI SDK (its User-Agent); ``native`` for the
      other ``/v1`` routes and probes; ``other`` for paths no route serves.
    * ``code``: the rejection's own code (noted by the error handlers, the same for every API),
      else fal's ``X-Fal-Error-Type``, else the native body's ``error.code``, else one per status.
    * ``tenant``: the tenant of the request's API key; "" without a valid one.
    """

    def __init__(self, app, *, authenticate: Callable[[str | None], object]) -> None:
        self.app, self.authenticate = app, authenticate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})
        status, headers, body = 0, [], bytearray()

        async def watching_send(message):
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers") or []
            elif message["type"] == "http.response.body" and status >= 400 and len(body) < MAX_SNIFFED_BODY:
                body.extend(message.get("body", b"")[:MAX_SNIFFED_BODY])
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:
            # An unexpected exception passes through here before Starlette's outermost handler turns it
            # into the 500 internal_error response: count it as that response.
            if status == 0:
                status = 500
                scope["state"][ERROR_CODE_STATE] = "internal_error"
            raise
        finally:
            if status >= 400:
                try:
                    self._count(scope, status, headers, bytes(body))
                except Exception:  # noqa: BLE001 - counting must never break a response
                    logger.debug("could not count an error response", exc_info=True)

    def _count(self, scope, status: int, headers, body: bytes) -> None:
        from ..telemetry import count_http_error

        request_headers = dict(scope.get("headers") or [])
        count_http_error(api=api_of(scope, request_headers), status=status,
                         code=code_of(scope, status, dict(headers), body),
                         tenant=self._tenant(request_headers.get(b"authorization")))

    def _tenant(self, authorization: bytes | None) -> str:
        if not authorization:
            return ""
        try:
            return self.authenticate(authorization.decode("latin-1")).name
        except Exception:  # noqa: BLE001 - no valid key: no tenant
            return ""


def api_of(scope, request_headers: dict[bytes, bytes]) -> str:
    """``svd_http_errors_total``'s ``api`` of a request (see :class:`HTTPErrorMetrics`)."""
    api = getattr(scope.get("route"), "svd_api", None)
    if api:
        return api
    path = scope.get("path", "")
    if path == "/v1" or path.startswith("/v1/") or path in ("/readyz", "/healthz"):
        agent = request_headers.get(b"user-agent", b"").lower()
        return "openai" if agent.startswith(b"openai/") else "native"
    return "native" if scope.get("route") is not None else "other"


def code_of(scope, status: int, response_headers: dict[bytes, bytes], body: bytes) -> str:
    """``svd_http_errors_total``'s ``code`` of an error response (see :class:`HTTPErrorMetrics`)."""
    noted = (scope.get("state") or {}).get(ERROR_CODE_STATE)
    if noted:
        return str(noted)
    fal = response_headers.get(b"x-fal-error-type")
    if fal:
        return fal.decode("latin-1")
    if body and response_headers.get(b"content-type", b"").startswith(b"application/json"):
        try:
            code = json.loads(body).get("error", {}).get("code")
        except (ValueError, AttributeError):
            code = None
        if isinstance(code, str) and code:
            return code
    return STATUS_CODES.get(status, f"http_{status}")
