"""Webhooks: signed, retried HTTP notifications when a job ends (and, on request, as it progresses).

A job created with a ``webhook_url`` gets one POST per event: ``video.completed``,
``video.failed`` or ``video.cancelled`` when it reaches a terminal state, and ``video.progress``
while it runs if the job asked for progress events. The body is JSON::

    {"id": "evt_...", "type": "video.completed", "created_at": "2025-01-01T00:00:00.000Z",
     "data": {...the job, exactly as GET /v1/videos/{id} shows it...}}

Signing (Stripe / Standard Webhooks style, see ``docs/webhooks.md``): every attempt carries

* ``Webhook-Id``: the event id (``evt_...``), unique per event and the same on every retry of it
  (receivers deduplicate on it; it is also the body's ``id``, which the signature covers);
* ``Webhook-Timestamp``: unix seconds when *this attempt* was signed;
* ``Webhook-Signature``: ``v1=<hex>``, the lowercase hex HMAC-SHA256, keyed with the tenant's
  webhook secret (its UTF-8 bytes, as given), of ``f"{timestamp}.".encode() + body``.

Receivers recompute the HMAC over the raw body bytes, compare in constant time and reject
timestamps more than 5 minutes from their clock (replay protection). Several space-separated
``v1=`` entries may appear (secret rotation); one match is enough.

Delivery goes through the SSRF guard (:mod:`serve.urlguard`) on every attempt: http(s) only,
every resolved address public unless allowlisted, and the connection pinned to the checked
address. Redirects are never followed (a 3xx is a failure). Connection errors, timeouts, 429 and
5xx are retried with exponential backoff and jitter (``Retry-After`` honoured) until
``max_attempts`` or ``max_elapsed_s``; any other 4xx, a 3xx, or a refused URL ends the delivery
at once. Every attempt is reported through a ``record`` callback (see :func:`job_recorder`,
which appends it to the job's ``metadata["webhook_deliveries"]``).

Nothing here logs the secret, a signature or the body; URLs are logged without query string.

This module imports neither Ray nor ``serve.config`` (the config imports :class:`WebhookConfig`).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .urlguard import CONNECT_TIMEOUT_S, BlockedURLError, URLPolicy

if TYPE_CHECKING:
    from serve.jobstore.base import JobStore

__all__ = [
    "EVENT_CANCELLED",
    "EVENT_COMPLETED",
    "EVENT_FAILED",
    "EVENT_PROGRESS",
    "EVENT_TYPES",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "METADATA_KEY",
    "SUBSCRIBABLE_EVENTS",
    "AsyncGuardedTransport",
    "BlockedURLError",
    "DeliveryResult",
    "WebhookConfig",
    "WebhookSender",
    "check_webhook_url",
    "event_type_for",
    "generate_secret",
    "job_recorder",
    "new_event_id",
    "normalize_events",
    "redact_url",
    "retry_after_seconds",
    "sign",
    "verify",
    "wants_event",
]

logger = logging.getLogger("ray.serve.svd_serve.webhooks")

EVENT_COMPLETED = "video.completed"
EVENT_FAILED = "video.failed"
EVENT_CANCELLED = "video.cancelled"
EVENT_PROGRESS = "video.progress"
TERMINAL_EVENT_TYPES = frozenset({EVENT_COMPLETED, EVENT_FAILED, EVENT_CANCELLED})
EVENT_TYPES = TERMINAL_EVENT_TYPES | {EVENT_PROGRESS}

#: Values a job may list in ``webhook_events`` to opt in to extra events. Terminal events are
#: always sent; naming them too is accepted and changes nothing.
SUBSCRIBABLE_EVENTS = frozenset({"progress"})

HEADER_ID = "Webhook-Id"
HEADER_TIMESTAMP = "Webhook-Timestamp"
HEADER_SIGNATURE = "Webhook-Signature"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300

#: Where :func:`job_recorder` keeps the attempts on the job.
METADATA_KEY = "webhook_deliveries"

MAX_URL_LENGTH = 2048
USER_AGENT = "svd-serve-webhooks/1"
_RETRYABLE_STATUS = frozenset({429})  # plus every 5xx


# -- signing ------------------------------------------------------------------------------------


def generate_secret() -> str:
    """A new webhook signing secret: ``whsec_`` + 43 URL-safe characters (256 random bits)."""
    return "whsec_" + secrets.token_urlsafe(32)


def _digest(secret: str, timestamp: int | str, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Webhook-Signature`` header value: ``"v1=" + hex(HMAC-SHA256(secret, f"{timestamp}." + body))``.

    ``secret`` is keyed as its UTF-8 bytes (a ``whsec_...`` secret is used whole, prefix
    included); ``timestamp`` is the integer unix time also sent as ``Webhook-Timestamp``.
    """
    if not secret:
        raise ValueError("a webhook secret is required to sign")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp must be integer unix seconds")
    return f"{SIGNATURE_VERSION}={_digest(secret, timestamp, body)}"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    getter = getattr(headers, "get", None)
    value = getter(name) if getter is not None else None
    if value is None:  # a plain dict is case-sensitive; HTTP header names are not
        wanted = name.lower()
        for key, candidate in headers.items():
            if key.lower() == wanted:
                return candidate
    return value


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True if ``headers`` carry a valid, fresh signature of ``body`` under ``secret``.

    Header names are matched case-insensitively. False (never an exception) when a header is
    missing or malformed, when the timestamp is more than ``tolerance_s`` away from ``now``
    (default: the current time) in either direction, or when no ``v1=`` signature matches
    (compared in constant time).
    """
    if not secret or not isinstance(body, (bytes, bytearray)):
        return False
    raw_ts = _header(headers, HEADER_TIMESTAMP)
    raw_sig = _header(headers, HEADER_SIGNATURE)
    if not raw_ts or not raw_sig or _header(headers, HEADER_ID) is None:
        return False
    raw_ts = raw_ts.strip()
    if not raw_ts.isascii() or not raw_ts.isdigit() or len(raw_ts) > 12:
        return False
    timestamp = int(raw_ts)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, bytes(body))
    ok = False
    for entry in raw_sig.replace(",", " ").split():
        version, _, value = entry.partition("=")
        if version == SIGNATURE_VERSION and value:
            ok |= hmac.compare_digest(value.strip().lower().encode("ascii", "replace"), expected.encode("ascii"))
    return ok


# -- events -------------------------------------------------------------------------------------


def new_event_id() -> str:
    """``evt_`` + 24 URL-safe random characters."""
    return "evt_" + secrets.token_urlsafe(18)


def event_type_for(status: Any) -> str:
    """The terminal event type of a job status (a ``JobStatus`` or its string value)."""
    value = getattr(status, "value", status)
    event = f"video.{value}"
    if event not in TERMINAL_EVENT_TYPES:
        raise ValueError(f"status {value!r} has no terminal webhook event")
    return event


def normalize_events(events: Iterable[str] | None) -> frozenset[str]:
    """Validate a job's ``webhook_events`` and return them as full event types.

    Accepts ``"progress"`` (or ``"video.progress"``) and, harmlessly, the terminal ones
    (``"completed"``, ``"video.failed"``, ...). Raises ``ValueError`` naming the allowed values.
    """
    result = set()
    for raw in events or ():
        name = str(raw).strip().lower()
        full = name if name.startswith("video.") else f"video.{name}"
        if full not in EVENT_TYPES:
            allowed = ", ".join(sorted(SUBSCRIBABLE_EVENTS | {t.split(".", 1)[1] for t in TERMINAL_EVENT_TYPES}))
            raise ValueError(f"unknown webhook event {raw!r}; allowed: {allowed}")
        result.add(full)
    return frozenset(result)


def wants_event(event_type: str, events: Iterable[str] | None) -> bool:
    """Whether a job subscribed with ``events`` gets ``event_type``: terminal events always,
    ``video.progress`` only if it asked for ``"progress"``."""
    if event_type in TERMINAL_EVENT_TYPES:
        return True
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    return event_type in normalize_events(events)


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return _iso(value) if isinstance(value, datetime) else value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_body(event_id: str, event_type: str, payload: Mapping[str, Any] | BaseModel, created_at: datetime) -> bytes:
    """The exact bytes POSTed (and signed): compact JSON ``{"id", "type", "created_at", "data"}``."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else dict(payload)
    envelope = {"id": event_id, "type": event_type, "created_at": _iso(created_at), "data": data}
    return json.dumps(envelope, separators=(",", ":"), default=_json_default).encode("utf-8")


# -- URLs ---------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL for logs: scheme, host, port and path; no credentials, query string or fragment."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<invalid url>"


def check_webhook_url(url: str, allow: Iterable[str] = ()) -> None:
    """Admission check of a ``webhook_url``; raises :class:`BlockedURLError` (a 400 ``url_not_allowed``).

    http(s) only, no credentials, at most 2048 characters, and every address the host resolves
    to must be public unless the host or address is in ``allow`` (``url_allowlist``). This does a
    DNS lookup, so call it off the event loop (``asyncio.to_thread``). Every delivery attempt
    checks again (DNS answers change).
    """
    if not isinstance(url, str) or not url:
        raise BlockedURLError("the webhook URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise BlockedURLError(f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise BlockedURLError("the webhook URL contains whitespace or control characters")
    policy = URLPolicy(allow)
    host, port = policy.check_url(url)
    policy.resolve(host, port)


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


class AsyncGuardedTransport(httpx.AsyncHTTPTransport):
    """The async twin of :class:`serve.urlguard.GuardedTransport`: each request is checked with
    :class:`URLPolicy` (DNS in a worker thread) and sent to the very address that was checked
    (URL rewritten to the IP; Host header and TLS SNI keep the name)."""

    def __init__(self, policy: URLPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy = policy

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host, port = self.policy.check_url(str(request.url))
        address = await asyncio.to_thread(self._resolve, host, port)
        default_port = 443 if request.url.scheme == "https" else 80
        shown = f"[{host}]" if ":" in host else host
        request.url = request.url.copy_with(host=address)
        request.headers["Host"] = shown if port == default_port else f"{shown}:{port}"
        if request.url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": host}
        return await super().handle_async_request(request)

    def _resolve(self, host: str, port: int) -> str:
        try:
            return self.policy.resolve(host, port)
        except BlockedURLError:
            # A name that does not resolve right now is a network failure (retryable), not a refusal.
            try:
                ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                try:
                    socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except socket.gaierror:
                    raise httpx.ConnectError(f"cannot resolve host {host!r}") from None
                except UnicodeError:
                    pass
            raise


# -- config -------------------------------------------------------------------------------------


class WebhookConfig(BaseModel):
    """Webhook delivery: timeouts and the retry policy (AppConfig ``webhooks``)."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(
        default=10.0, gt=0, le=120,
        description="Seconds one attempt may take in all (connect, send, response headers); slower counts as a "
        "failed attempt and is retried.",
    )
    max_elapsed_s: float = Field(
        default=3600.0, gt=0, le=86400,
        description="Retry window per event, from the first attempt: no attempt starts after it (the last one may "
        "run timeout_s past it). Pending retries live in the runner process; a runner restart drops them.",
    )
    initial_backoff_s: float = Field(
        default=1.0, gt=0, description="Wait before the first retry; each further retry waits twice as long."
    )
    max_backoff_s: float = Field(
        default=300.0, gt=0, description="Longest wait between two attempts, unless the receiver's Retry-After asks "
        "for more."
    )
    max_attempts: int = Field(default=20, ge=1, le=100, description="Attempts per event, the first one included.")
    jitter: float = Field(
        default=0.2, ge=0, lt=1,
        description="Random spread of each backoff, as a fraction (0.2: +/-20%), so retries of many events do not "
        "arrive in lockstep.",
    )
    progress_max_attempts: int = Field(
        default=1, ge=1, le=100,
        description="Attempts per video.progress event. Progress is superseded by the next event, so by default it "
        "is sent once and not retried (a stale retry could arrive after the terminal event).",
    )
    progress_min_interval_s: float = Field(
        default=5.0, ge=0, description="Least seconds between two progress events of one job (WebhookSender.progress_due)."
    )
    max_recorded_attempts: int = Field(
        default=50, ge=1, le=1000,
        description="Attempts kept on the job in metadata.webhook_deliveries (the newest; job_recorder trims).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "WebhookConfig":
        if self.initial_backoff_s > self.max_backoff_s:
            raise ValueError(
                f"initial_backoff_s ({self.initial_backoff_s}) exceeds max_backoff_s ({self.max_backoff_s})"
            )
        if self.max_backoff_s > self.max_elapsed_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) exceeds max_elapsed_s ({self.max_elapsed_s})")
        if self.progress_max_attempts > self.max_attempts:
            raise ValueError("progress_max_attempts exceeds max_attempts")
        return self


# -- delivery -----------------------------------------------------------------------------------

Record = Callable[[dict[str, Any]], "None | Awaitable[None]"]


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


def _now_iso() -> str:
    return _iso(datetime.now(timezone.utc))


class WebhookSender:
    """Delivers webhook events; one instance per runner replica (it holds no connections).

    ``allow`` is the service's ``url_allowlist`` (trusted private hosts or CIDRs). The keyword
    arguments override :class:`WebhookConfig` defaults and are validated by it; or build one with
    :meth:`from_config`.
    """

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        timeout_s: float = 10.0,
        max_elapsed_s: float = 3600.0,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        max_attempts: int = 20,
        **extra: Any,
    ) -> None:
        self.config = WebhookConfig(
            timeout_s=timeout_s, max_elapsed_s=max_elapsed_s, initial_backoff_s=initial_backoff_s,
            max_backoff_s=max_backoff_s, max_attempts=max_attempts, **extra,
        )
        self.allow = tuple(allow)
        self._policy = URLPolicy(self.allow)
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

    # -- one event ------------------------------------------------------------------------------

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
    ) -> DeliveryResult:
        """POST one event to ``url``, retrying as configured; returns how it ended (never raises
        for delivery failures; ``ValueError`` for an unknown event type or an empty secret).

        ``payload`` is the job's public view (``VideoJob`` or its JSON dict); it becomes the
        body's ``data``. ``record`` is called once per attempt, in order, with a JSON-safe dict
        ``{"event_id", "type", "attempt", "at", "status_code" | "error", "duration_ms",
        "next_retry_in_s"}`` (``next_retry_in_s`` is None when no retry follows). It runs in a
        worker thread, so it may block (e.g. write to the job store); it may also be a coroutine
        function. Its exceptions are logged and ignored. Pass ``event_id`` to keep the id stable
        across a re-delivery of the same event (e.g. after a runner restart).
        """
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown webhook event type {event_type!r}")
        if not secret:
            raise ValueError("a webhook secret is required to deliver")
        cfg = self.config
        event_id = event_id or new_event_id()
        created_at = created_at or datetime.now(timezone.utc)
        body = encode_body(event_id, event_type, payload, created_at)
        if event_type in TERMINAL_EVENT_TYPES:
            self.forget(job_id)
            max_attempts = cfg.max_attempts
        else:
            max_attempts = cfg.progress_max_attempts
        shown_url = redact_url(url)
        log = {"job_id": job_id, "event_id": event_id, "webhook_event": event_type, "webhook_url": shown_url}
        attempts: list[dict[str, Any]] = []
        start = time.monotonic()

        async with self._client() as client:
            attempt = 0
            while True:
                attempt += 1
                at = _now_iso()
                began = time.monotonic()
                status, error, retry_after, verdict = await self._attempt(client, url, secret, event_id, body)
                duration_ms = round((time.monotonic() - began) * 1000, 1)

                next_retry: float | None = None
                if verdict == "retry":
                    if attempt >= max_attempts:
                        verdict = "exhausted"
                    else:
                        delay = self.backoff_s(attempt)
                        if retry_after is not None:
                            delay = max(delay, retry_after)
                        if time.monotonic() - start + delay > cfg.max_elapsed_s:
                            verdict = "exhausted"  # the next attempt would start past the window
                        else:
                            next_retry = round(delay, 3)

                entry: dict[str, Any] = {"event_id": event_id, "type": event_type, "attempt": attempt, "at": at}
                if status is not None:
                    entry["status_code"] = status
                else:
                    entry["error"] = _scrub(error or "unknown error", url, shown_url)
                entry["duration_ms"] = duration_ms
                entry["next_retry_in_s"] = next_retry
                attempts.append(entry)
                await self._record(record, entry, log)

                outcome_of = f"HTTP {status}" if status is not None else entry["error"]
                if verdict == "ok":
                    logger.info("webhook %s delivered to %s (attempt %d, HTTP %s)", event_type, shown_url, attempt,
                                status, extra=log)
                    return DeliveryResult(event_id, event_type, "delivered", status, None, attempts)
                if next_retry is not None:
                    logger.warning("webhook %s to %s: attempt %d failed (%s); retrying in %.3gs", event_type,
                                   shown_url, attempt, outcome_of, next_retry, extra=log)
                    await asyncio.sleep(next_retry)
                    continue
                outcome: Literal["rejected", "exhausted"] = "rejected" if verdict == "permanent" else "exhausted"
                logger.warning("webhook %s to %s %s after %d attempt(s) (%s)", event_type, shown_url,
                               "rejected" if outcome == "rejected" else "gave up", attempt, outcome_of, extra=log)
                return DeliveryResult(event_id, event_type, outcome, status, entry.get("error"), attempts)

    def _client(self) -> httpx.AsyncClient:
        timeout = self.config.timeout_s
        return httpx.AsyncClient(
            transport=AsyncGuardedTransport(self._policy),
            follow_redirects=False,
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_S, timeout)),
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
        )

    async def _attempt(
        self, client: httpx.AsyncClient, url: str, secret: str, event_id: str, body: bytes
    ) -> tuple[int | None, str | None, float | None, Literal["ok", "retry", "permanent"]]:
        """(status code, error, Retry-After seconds, verdict) of one POST."""
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            HEADER_ID: event_id,
            HEADER_TIMESTAMP: str(timestamp),
            HEADER_SIGNATURE: sign(secret, timestamp, body),
        }
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with client.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code  # the response body is never read
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        except BlockedURLError as exc:
            return None, f"url_not_allowed: {exc}", None, "permanent"
        except (TimeoutError, httpx.TimeoutException):
            return None, f"timeout: no response within {self.config.timeout_s:g}s", None, "retry"
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            return None, f"{type(exc).__name__}: {exc}", None, "permanent"
        except httpx.TransportError as exc:  # connect refused/reset, DNS, protocol errors from the receiver
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


# -- storing attempts on the job ----------------------------------------------------------------


def job_recorder(store: "JobStore", job_id: str, *, keep: int = 50) -> Callable[[dict[str, Any]], None]:
    """A ``record`` callback that appends each attempt to ``metadata["webhook_deliveries"]`` of
    the job, atomically (one read-modify-write in the store; concurrent deliveries of one job do
    not lose entries), keeping the newest ``keep``. A deleted job is skipped silently."""
    if keep < 1:
        raise ValueError("keep must be at least 1")

    def record(attempt: dict[str, Any]) -> None:
        def append(job: Any) -> bool:
            deliveries = list(job.metadata.get(METADATA_KEY) or [])
            deliveries.append(dict(attempt))
            job.metadata[METADATA_KEY] = deliveries[-keep:]
            return True

        store._mutate(job_id, append)

    return record
