"""Webhook delivery: one signed POST per attempt, retried with backoff, every attempt recorded.

Delivery goes through the SSRF guard (:func:`serve.urlguard.async_guarded_client`) on every
attempt: http(s) only, every resolved address public unless allowlisted, and the connection
pinned to the checked address. Redirects are never followed (a 3xx is a failure). Connection
errors, timeouts, a host name that does not resolve right now, 429 and 5xx are retried with
exponential backoff and jitter (``Retry-After`` honoured) until ``max_attempts`` or
``max_elapsed_s``; any other 4xx, a 3xx, or a refused URL ends the delivery at once. Every attempt
is reported through a ``record`` callback (see :func:`job_recorder`). :meth:`WebhookSender.attempt` is
one attempt and its retry decision; :meth:`WebhookSender.deliver` loops over it in memory, and the
service's durable outbox (:mod:`serve.webhooks.outbox`) drives it from the job store.

Nothing here logs the secret, a signature or the body; URLs are logged with
:func:`pipelines.urls.redact_url` (no credentials, no query string). Settings:
:class:`serve.config.WebhookConfig`.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping  # noqa: F401 - Awaitable: in Record below
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel

from pipelines.urls import redact_url

from ..config import WebhookConfig
from ..telemetry import count_webhook_delivery
from ..urlguard import BlockedURLError, UnresolvableHostError, URLPolicy, async_guarded_client
from .events import EVENT_TYPES, TERMINAL_EVENT_TYPES, encode_body, iso_utc, new_event_id
from .signing import signed_headers

if TYPE_CHECKING:
    from serve.jobstore.base import JobStore

logger = logging.getLogger("ray.serve.svd_serve.webhooks")

MAX_URL_LENGTH = 2048
USER_AGENT = "svd-serve-webhooks/1"
_RETRYABLE_STATUS = frozenset({429})  # plus every 5xx

Record = Callable[[dict[str, Any]], "None | Awaitable[None]"]
Verdict = Literal["ok", "retry", "permanent"]


def check_webhook_url(url: str, allow: Iterable[str] = ()) -> None:
    """Admission check of a ``webhook_url``; raises :class:`BlockedURLError` (a 400 ``url_not_allowed``).

    http(s) only, no credentials, at most 2048 characters, and every address the host resolves
    to must be public unless the host or address is in ``allow`` (``url_allowlist``); a name that
    does not resolve is refused too. This does a DNS lookup, so call it off the event loop
    (``asyncio.to_thread``). Every delivery attempt checks again (DNS answers change).
    """
    if not isinstance(url, str) or not url:
        raise BlockedURLError("the webhook URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise BlockedURLError(f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise BlockedURLError("the webhook URL contains whitespace or control characters")
    policy = URLPolicy(allow)
    policy.resolve(*policy.check_url(url))


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date); None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN, inf
        return None
    return max(0.0, seconds)


Outcome = Literal["delivered", "rejected", "exhausted", "retry"]


@dataclass
class Attempt:
    """One attempt of one event and what follows it: ``outcome`` is ``"retry"`` (then
    ``next_retry_in_s`` says when) or how the event ended (see :class:`DeliveryResult`). ``entry``
    is the attempt record stored on the job (``webhook.deliveries``)."""

    entry: dict[str, Any]
    outcome: Outcome
    status_code: int | None
    error: str | None
    next_retry_in_s: float | None


def metric_outcome(outcome: Outcome, error: str | None) -> str:
    """``svd_webhook_deliveries_total``'s ``outcome`` of one attempt: delivered, retry (another
    attempt follows), blocked (the URL is not allowed) or failed (given up, or refused by the
    receiver)."""
    if outcome in ("delivered", "retry"):
        return outcome
    return "blocked" if outcome == "rejected" and (error or "").startswith("url_not_allowed") else "failed"


def check_event(event_type: str, secret: str | None) -> None:
    """``ValueError`` for an unknown event type or an empty secret (nothing can be sent)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    if not secret:
        raise ValueError("a webhook secret is required to deliver")


@dataclass
class DeliveryResult:
    """How one event's delivery ended.

    ``outcome``: ``"delivered"`` (a 2xx), ``"rejected"`` (permanent: a 3xx, a 4xx other than 429,
    a refused URL) or ``"exhausted"`` (retryable failures until max_attempts or max_elapsed_s).
    ``attempts`` holds every attempt record, as passed to ``record``.
    """

    event_id: str
    event_type: str
    outcome: Literal["delivered", "rejected", "exhausted"]
    status_code: int | None = None
    error: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


class WebhookSender:
    """Delivers webhook events; one instance per runner replica (it holds no connections).

    ``allow`` is the service's ``url_allowlist`` (trusted private hosts or CIDRs). Any other
    keyword argument is a :class:`WebhookConfig` setting (defaults and validation are its own);
    or build one with :meth:`from_config`.
    """

    def __init__(self, *, allow: Iterable[str] = (), **settings: Any) -> None:
        self.config = WebhookConfig(**settings)
        self.allow = tuple(allow)
        self._random = random.Random()
        self._progress_sent: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: WebhookConfig, *, allow: Iterable[str] = ()) -> "WebhookSender":
        return cls(allow=allow, **config.model_dump())

    # -- progress throttling --------------------------------------------------------------------

    def progress_due(self, job_id: str, *, now: float | None = None) -> bool:
        """True (and remembered) if a progress event of ``job_id`` may go out now: at most one per
        ``progress_min_interval_s``. A terminal delivery of the job forgets it."""
        now = time.monotonic() if now is None else now
        last = self._progress_sent.get(job_id)
        if last is not None and now - last < self.config.progress_min_interval_s:
            return False
        self._progress_sent[job_id] = now
        if len(self._progress_sent) > 10_000:  # jobs that ended elsewhere: drop the stalest half
            for stale in sorted(self._progress_sent, key=self._progress_sent.__getitem__)[:5_000]:
                del self._progress_sent[stale]
        return True

    def forget(self, job_id: str) -> None:
        self._progress_sent.pop(job_id, None)

    # -- backoff --------------------------------------------------------------------------------

    def backoff_s(self, attempt: int) -> float:
        """Wait after failed attempt number ``attempt`` (1-based): initial * 2^(attempt-1), capped at
        max_backoff_s, spread by +/- jitter (and still capped)."""
        cfg = self.config
        base = min(cfg.max_backoff_s, cfg.initial_backoff_s * (2 ** min(attempt - 1, 60)))
        spread = self._random.uniform(1 - cfg.jitter, 1 + cfg.jitter) if cfg.jitter else 1.0
        return min(cfg.max_backoff_s, base * spread)

    def max_attempts_for(self, event_type: str) -> int:
        """Attempts an event gets: ``max_attempts``, or ``progress_max_attempts`` for progress."""
        if event_type in TERMINAL_EVENT_TYPES:
            return self.config.max_attempts
        return self.config.progress_max_attempts

    # -- one attempt ----------------------------------------------------------------------------

    async def attempt(
        self,
        job_id: str,
        url: str,
        secret: str,
        event_type: str,
        event_id: str,
        body: bytes,
        *,
        number: int,
        elapsed_s: float = 0.0,
        client: httpx.AsyncClient | None = None,
    ) -> Attempt:
        """Make attempt ``number`` (1-based) of one event and decide what follows: the step both
        :meth:`deliver` (retries in memory) and the durable outbox (:mod:`serve.webhooks.outbox`,
        retries kept in the job store) are built on, so both keep one retry policy.

        ``elapsed_s``: seconds since the event's first attempt began (0 for the first); the retry
        window ``max_elapsed_s`` is measured from there. Never raises for delivery failures
        (``ValueError`` for an unknown event type or an empty secret).
        """
        check_event(event_type, secret)
        cfg = self.config
        shown_url = redact_url(url)
        log = {"job_id": job_id, "event_id": event_id, "webhook_event": event_type, "webhook_url": shown_url}
        at = iso_utc(datetime.now(timezone.utc))
        began = time.monotonic()
        if client is None:
            async with self._client() as own:
                status, error, retry_after, verdict = await self._attempt(own, url, secret, event_id, body)
        else:
            status, error, retry_after, verdict = await self._attempt(client, url, secret, event_id, body)
        took = time.monotonic() - began

        next_retry: float | None = None
        outcome: Outcome = "delivered" if verdict == "ok" else "rejected" if verdict == "permanent" else "exhausted"
        if verdict == "retry" and number < self.max_attempts_for(event_type):
            delay = self.backoff_s(number)
            if retry_after is not None:
                delay = max(delay, retry_after)
            if elapsed_s + took + delay <= cfg.max_elapsed_s:  # else the next attempt would start past the window
                next_retry, outcome = round(delay, 3), "retry"

        entry: dict[str, Any] = {"event_id": event_id, "type": event_type, "attempt": number, "at": at}
        if status is not None:
            entry["status_code"] = status
        else:
            entry["error"] = _scrub(error or "unknown error", url, shown_url)
        entry["duration_ms"] = round(took * 1000, 1)
        entry["next_retry_in_s"] = next_retry

        count_webhook_delivery(metric_outcome(outcome, error))
        outcome_of = f"HTTP {status}" if status is not None else entry["error"]
        if outcome == "delivered":
            logger.info("webhook %s delivered to %s (attempt %d, HTTP %s)", event_type, shown_url, number, status,
                        extra=log)
        elif outcome == "retry":
            logger.warning("webhook %s to %s: attempt %d failed (%s); retrying in %.3gs", event_type, shown_url,
                           number, outcome_of, next_retry, extra=log)
        else:
            logger.warning("webhook %s to %s %s after %d attempt(s) (%s)", event_type, shown_url,
                           "rejected" if outcome == "rejected" else "gave up", number, outcome_of, extra=log)
        return Attempt(entry, outcome, status, entry.get("error"), next_retry)

    # -- one event, retried in memory -----------------------------------------------------------

    async def deliver(
        self,
        job_id: str,
        url: str,
        secret: str,
        event_type: str,
        payload: Mapping[str, Any] | BaseModel,
        record: Record | None = None,
        *,
        event_id: str | None = None,
        created_at: datetime | None = None,
        body: bytes | None = None,
    ) -> DeliveryResult:
        """POST one event to ``url``, retrying as configured, the pending retries held in this
        process (the service itself delivers through the durable outbox instead,
        :mod:`serve.webhooks.outbox`); returns how it ended (never raises for delivery failures;
        ``ValueError`` for an unknown event type or an empty secret).

        ``payload`` is the job's public view (``VideoJob`` or its JSON dict); it becomes the
        body's ``data``. ``record`` is called once per attempt, in order, with a JSON-safe dict
        ``{"event_id", "type", "attempt", "at", "status_code" | "error", "duration_ms",
        "next_retry_in_s"}`` (``next_retry_in_s`` is None when no retry follows). It runs in a
        worker thread, so it may block (e.g. write to the job store); it may also be a coroutine
        function. Its exceptions are logged and ignored. Pass ``event_id`` to keep the id stable
        across a re-delivery of the same event. ``body`` replaces the standard envelope with bytes
        an adapter rendered in its API's webhook shape (signed and retried the same way).
        """
        check_event(event_type, secret)
        event_id = event_id or new_event_id()
        if body is None:
            body = encode_body(event_id, event_type, payload, created_at or datetime.now(timezone.utc))
        if event_type in TERMINAL_EVENT_TYPES:
            self.forget(job_id)
        log = {"job_id": job_id, "event_id": event_id, "webhook_event": event_type, "webhook_url": redact_url(url)}
        attempts: list[dict[str, Any]] = []
        start = time.monotonic()
        async with self._client() as client:
            number = 0
            while True:
                number += 1
                step = await self.attempt(job_id, url, secret, event_type, event_id, body, number=number,
                                          elapsed_s=time.monotonic() - start, client=client)
                attempts.append(step.entry)
                await self._record(record, step.entry, log)
                if step.next_retry_in_s is None:
                    assert step.outcome != "retry"
                    return DeliveryResult(event_id, event_type, step.outcome, step.status_code, step.error, attempts)
                await asyncio.sleep(step.next_retry_in_s)

    def _client(self) -> httpx.AsyncClient:
        return async_guarded_client(allow=self.allow, timeout_s=self.config.timeout_s, follow_redirects=False,
                                    headers={"User-Agent": USER_AGENT})

    async def _attempt(
        self, client: httpx.AsyncClient, url: str, secret: str, event_id: str, body: bytes
    ) -> tuple[int | None, str | None, float | None, Verdict]:
        """(status code, error, Retry-After seconds, verdict) of one POST."""
        headers = {"Content-Type": "application/json", **signed_headers(secret, event_id, body)}
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with client.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code  # the response body is never read
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        except UnresolvableHostError as exc:  # a name that does not resolve right now: a network failure
            return None, f"ConnectError: {exc}", None, "retry"
        except BlockedURLError as exc:
            return None, f"url_not_allowed: {exc}", None, "permanent"
        except (TimeoutError, httpx.TimeoutException):
            return None, f"timeout: no response within {self.config.timeout_s:g}s", None, "retry"
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            return None, f"{type(exc).__name__}: {exc}", None, "permanent"
        except httpx.TransportError as exc:  # connect refused/reset, protocol errors from the receiver
            return None, f"{type(exc).__name__}: {str(exc) or 'connection failed'}", None, "retry"
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the caller's task; not retried
            logger.exception("webhook attempt failed unexpectedly")
            return None, f"{type(exc).__name__}: {exc}", None, "permanent"
        if 200 <= status < 300:
            return status, None, None, "ok"
        if status in _RETRYABLE_STATUS or 500 <= status < 600:
            return status, None, retry_after, "retry"
        return status, None, None, "permanent"  # 1xx/3xx (redirects are not followed), other 4xx

    @staticmethod
    async def _record(record: Record | None, entry: dict[str, Any], log: dict[str, Any]) -> None:
        if record is None:
            return
        try:
            result = await asyncio.to_thread(record, dict(entry))
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - recording must not stop a delivery
            logger.warning("could not record a webhook attempt", exc_info=True, extra=log)


def _scrub(message: str, url: str, shown_url: str) -> str:
    """An error message with the full URL (query string included) replaced by its redacted form."""
    return message.replace(url, shown_url)[:500]


def job_recorder(store: "JobStore", job_id: str, *, keep: int) -> Callable[[dict[str, Any]], None]:
    """A ``record`` callback that appends each attempt to the job, atomically, keeping the newest
    ``keep`` (``WebhookConfig.max_recorded_attempts``): :meth:`JobStore.record_webhook_attempt`.
    A deleted job is skipped silently."""
    if keep < 1:
        raise ValueError("keep must be at least 1")

    def record(attempt: dict[str, Any]) -> None:
        store.record_webhook_attempt(job_id, attempt, keep=keep)

    return record
