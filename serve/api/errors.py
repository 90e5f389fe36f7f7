"""One table from domain errors to HTTP responses, and the one error body every rejection uses.

A *rejected* request (bad input, authentication, not found, capacity) is an HTTP 4xx/503 with
``{"error": {"code", "message"}}``. A job that fails after admission is data on the job, never
an HTTP error. No exception type name or stack trace reaches a client, and no message is longer
than :data:`MAX_MESSAGE_CHARS` (input echoed in a message is cut, never sent back whole).

Anything else is a bug: a 500 ``internal_error`` whose message carries an error id (also in the
``X-Error-Id`` header) that finds the log line. The traceback is logged once per kind of failure
(exception type and where it was raised), later ones as one line with their id, so a flood of one
bad request cannot flood the log; each is counted (``svd_http_internal_errors_total``).
"""

from __future__ import annotations

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
    from ..telemetry import metrics

    recorder = metrics()
    if recorder is not None:
        recorder.http_internal_errors.inc(tags={"error": type(error).__name__})
    return Rejection(500, "internal_error", f"internal error (error id {error_id})", {"X-Error-Id": error_id})


#: A conflict about the job's state is final: clients that retry 409s by default (the openai SDK)
#: are told not to (``x-should-retry`` is the header that SDK honours).
NO_RETRY_HEADERS = {409: {"x-should-retry": "false"}}


def response_for(error: BaseException) -> JSONResponse:
    r = rejection_for(error)
    return error_response(r.status, r.code, r.message, {**NO_RETRY_HEADERS.get(r.status, {}), **r.headers} or None)


class RequestTooLarge(Exception):
    """Raised by the body-size middleware while a body streams in; it answers the 413 itself."""


def adapter_route(render: Callable[[Rejection], Response]) -> type[APIRoute]:
    """A route class for a compatibility adapter: every failure of its routes (request validation
    included) is mapped by :func:`rejection_for` and rendered in that API's own error shape."""

    class AdapterRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestTooLarge:
                    raise  # the middleware's own 413, not the route's failure
                except Exception as error:  # noqa: BLE001 - mapped, never leaked
                    return render(rejection_for(error))

            return handle

    return AdapterRoute


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SVDServeError)
    async def _domain(_: Request, error: SVDServeError):
        return response_for(error)

    @app.exception_handler(JobStoreError)
    async def _store(_: Request, error: JobStoreError):
        return response_for(error)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, error: StorageError):
        return response_for(error)

    @app.exception_handler(ValidationError)
    async def _pydantic(_: Request, error: ValidationError):
        return response_for(error)

    @app.exception_handler(RequestValidationError)
    async def _request(_: Request, error: RequestValidationError):
        return response_for(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException):
        return response_for(error)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, error: Exception):
        return response_for(error)
