"""Webhooks: signed, retried HTTP notifications when a job ends (and, on request, as it progresses).

* :mod:`.events`: the event types, which ones a job gets, the JSON body;
* :mod:`.signing`: the ``Webhook-*`` headers, :func:`sign` and :func:`verify` (``docs/webhooks.md``);
* :mod:`.delivery`: :class:`WebhookSender` (SSRF-guarded POSTs, retry policy), the admission check
  :func:`check_webhook_url`, and :func:`job_recorder`, which stores every attempt on the job;
* :mod:`.outbox`: :class:`WebhookOutbox`, durable delivery: events wait in the job store and any
  runner replica sends them (a replica that dies loses none).

Settings: :class:`serve.config.WebhookConfig`. The SSRF guard: :mod:`serve.urlguard`. No Ray here.
"""

from __future__ import annotations

from .delivery import (
    Attempt,
    DeliveryResult,
    WebhookSender,
    check_webhook_url,
    job_recorder,
    retry_after_seconds,
)
from .events import (
    EVENT_CANCELLED,
    EVENT_COMPLETED,
    EVENT_FAILED,
    EVENT_PROGRESS,
    EVENT_TYPES,
    SUBSCRIBABLE_EVENTS,
    event_type_for,
    new_event_id,
    normalize_events,
    terminal_event_id,
    wants_event,
)
from .outbox import WebhookOutbox
from .signing import HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign, signed_headers, verify

__all__ = [
    "EVENT_CANCELLED",
    "EVENT_COMPLETED",
    "EVENT_FAILED",
    "EVENT_PROGRESS",
    "EVENT_TYPES",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SUBSCRIBABLE_EVENTS",
    "Attempt",
    "DeliveryResult",
    "WebhookOutbox",
    "WebhookSender",
    "check_webhook_url",
    "event_type_for",
    "job_recorder",
    "new_event_id",
    "normalize_events",
    "retry_after_seconds",
    "sign",
    "terminal_event_id",
    "signed_headers",
    "verify",
    "wants_event",
]
