"""One exception hierarchy for everything the client raises.

Every error carries ``status`` (the HTTP status, or None when no response came), ``code`` (the
API's machine-readable code, e.g. ``invalid_parameter``, ``not_found``, ``rate_limited``) and
``message`` (one line for a person), read from the API's ``{"error": {"code", "message"}}`` body::

    ClientError
    ├── InvalidArgumentError        the call itself is wrong; nothing was sent (also a ValueError)
    ├── APIConnectionError          no usable response: refused, reset, dropped mid-body
    │   ├── APITimeoutError
    │   └── StreamInterruptedError  an event stream ended before the job did
    ├── APIResponseError            a response that is not what the API sends (a proxy's page?)
    ├── WaitTimeoutError            wait() ran past its timeout (also a TimeoutError)
    └── APIStatusError              the API rejected the request: 4xx/5xx
        ├── BadRequestError (400), AuthenticationError (401), PermissionDeniedError (403),
        │   NotFoundError (404), ConflictError (409), RequestTooLargeError (413),
        │   UnprocessableEntityError (422), RateLimitError (429)
        └── ServerError (5xx)
            └── ServiceUnavailableError (503)
"""

from __future__ import annotations

import json
from typing import Mapping

import httpx


class ClientError(Exception):
    """Base class of every error the svd-serve client raises."""

    status: int | None = None
    code: str = "client_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class InvalidArgumentError(ClientError, ValueError):
    code = "invalid_argument"


class APIConnectionError(ClientError):
    code = "connection_error"


class APITimeoutError(APIConnectionError):
    code = "timeout"


class StreamInterruptedError(APIConnectionError):
    code = "stream_interrupted"


class APIResponseError(ClientError):
    code = "invalid_response"


class WaitTimeoutError(ClientError, TimeoutError):
    code = "wait_timeout"


class APIStatusError(ClientError):
    """The API answered with an error status. ``retry_after`` is the server's Retry-After in
    seconds, when it sent one."""

    def __init__(self, message: str, *, status: int, code: str, headers: Mapping[str, str] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, code=code, status=status)
        self.headers = dict(headers or {})
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message} ({self.status} {self.code})"


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class RequestTooLargeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class ServerError(APIStatusError):
    pass


class ServiceUnavailableError(ServerError):
    pass


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_from_response(response: httpx.Response, retry_after: float | None = None) -> APIStatusError:
    """The exception for an error response; its body has been read."""
    status = response.status_code
    code, message = f"http_{status}", response.reason_phrase or "error"
    try:
        body = json.loads(response.content)
    except ValueError:
        text = response.text.strip()
        if text:
            message = f"{message}: {' '.join(text.split())[:200]}"
    else:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code") or error.get("type") or code)
            message = str(error.get("message") or message)
    kind = STATUS_ERRORS.get(status) or (ServerError if status >= 500 else APIStatusError)
    return kind(message, status=status, code=code, headers=response.headers, retry_after=retry_after)


def connection_error(error: httpx.RequestError, what: str) -> APIConnectionError:
    """The exception for a request that got no usable response."""
    kind = APITimeoutError if isinstance(error, httpx.TimeoutException) else APIConnectionError
    detail = str(error) or type(error).__name__
    return kind(f"{what}: {detail}")
