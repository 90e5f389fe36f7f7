"""When to retry a request, and how long to wait first.

* ``429`` and ``503`` are retried for every request: the server did not act on it. The wait is the
  response's ``Retry-After`` (seconds or an HTTP date) when it sends one, else an exponential backoff.
* A connection that failed before the request went out (refused, connect or pool timeout) is
  retried for every request; one that broke later (reset, dropped mid-response, read timeout) only
  for idempotent requests: reads, and submits, which always carry an ``Idempotency-Key``.
* Nothing else is retried: another 4xx is the caller's to fix.

Retries stop after ``max_retries``, or as soon as the next wait would take the total past
``max_wait`` seconds; then the last error is raised (a ``RateLimitError`` keeps its ``retry_after``).
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from datetime import timezone

import httpx

RETRY_STATUSES = frozenset({429, 503})
#: Errors raised before any byte of the request reached the server.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None when absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4
    max_wait: float = 60.0
    backoff: float = 0.5
    max_backoff: float = 8.0

    def _delay(self, attempt: int, waited: float, wanted: float | None) -> float | None:
        if attempt >= self.max_retries:
            return None
        delay = wanted if wanted is not None else min(self.max_backoff, self.backoff * 2 ** attempt)
        return delay if waited + delay <= self.max_wait else None

    def after_status(self, status: int, retry_after: float | None, *, attempt: int, waited: float) -> float | None:
        """Seconds to wait before retrying a response with this status; None: do not retry."""
        if status not in RETRY_STATUSES:
            return None
        return self._delay(attempt, waited, retry_after)

    def after_error(self, error: httpx.RequestError, *, idempotent: bool, attempt: int,
                    waited: float) -> float | None:
        """Seconds to wait before retrying a request that got no response; None: do not retry."""
        if not isinstance(error, httpx.TransportError):
            return None
        if not idempotent and not isinstance(error, NOT_SENT_ERRORS):
            return None
        return self._delay(attempt, waited, None)
