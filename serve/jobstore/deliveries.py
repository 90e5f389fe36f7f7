"""Pending webhook deliveries, kept in the job store so that they outlive the runner replica that
made them (an outbox). Why here: a retry waiting out its backoff in one process's memory is lost
when that process dies; a row/hash in the store is picked up by whichever runner polls next.

A delivery is one event (its ``event_id`` is the ``Webhook-Id``, fixed when it is enqueued, so every
attempt of the event, by any replica, carries the same id). Its life:

1. :meth:`DeliveryQueue.enqueue_webhook`: stored, due now (an event id already pending is kept as is).
2. :meth:`DeliveryQueue.claim_webhooks`: a runner takes the due ones under a lease of ``lease_s``
   (their due time moves to the lease's end, so a claimant that dies mid-attempt hands the
   delivery to the next poller once the lease runs out: at-least-once, same id).
3. After one attempt the claimant either removes it (:meth:`DeliveryQueue.finish_webhook`: delivered
   or given up) or hands it back due at its next retry (:meth:`DeliveryQueue.retry_webhook`), which
   also ends the lease: a replica dying during a backoff holds nothing, and any runner sends the
   retry when it is due.

A job's terminal event is enqueued by the store itself, in the same atomic step that makes the
job terminal (:func:`terminal_delivery`; a transactional outbox): no process can die between
the two, so every job with a webhook gets its terminal event exactly once, whoever ended it (the
runner, the janitor, the ingress cancelling a queued job). Its body (the job's view needs the
API's renderers) is filled in right after by the process that ended the job
(:meth:`DeliveryQueue.set_webhook_body`), or, if that process died first, rendered by the first
runner that attempts it; either way it is then kept, so every attempt sends the same bytes.
Progress events are enqueued by the runner.

Due order is ``(due_at, event_id)``. Both backends implement the abstract methods below with the
same semantics (SQLite: :mod:`serve.jobstore.sqlite_deliveries`; Redis:
:mod:`serve.jobstore.redis_deliveries`).
"""

from __future__ import annotations

import base64
import hashlib
from abc import ABC, abstractmethod

from pydantic import BaseModel, ConfigDict, Field

from serve.jobstore.models import Job

#: The notice name that means "a webhook delivery was enqueued" (delivery loops watch it).
WEBHOOK_CHANNEL = "webhooks"


def terminal_event_id(job_id: str, event_type: str) -> str:
    """The id of a job's terminal event, derived from the job (``evt_`` + 24 URL-safe characters,
    the shape of a random event id): the same however often, or by whichever process, the event is
    announced, so a receiver de-duplicating on ``Webhook-Id`` never sees one event under two ids."""
    digest = hashlib.sha256(f"svd-serve-event|{job_id}|{event_type}".encode()).digest()[:18]
    return "evt_" + base64.urlsafe_b64encode(digest).decode()


def terminal_delivery(was_terminal: bool, job: Job, now: float) -> "WebhookDelivery | None":
    """The terminal event to enqueue with a transition of ``job`` (as it is after the transition;
    ``was_terminal``: before it), or None: only when a job with a webhook *becomes* terminal. The
    event type is ``video.<status>`` (``video.completed``, ``video.failed``, ``video.cancelled``)."""
    if was_terminal or not job.is_terminal or job.webhook is None:
        return None
    event_type = f"video.{job.status.value}"
    created = job.finished_at.timestamp() if job.finished_at is not None else now
    return WebhookDelivery(event_id=terminal_event_id(job.id, event_type), job_id=job.id, tenant=job.tenant,
                           event_type=event_type, url=job.webhook.url, body=b"", created_at=created, due_at=now)


class WebhookDelivery(BaseModel):
    """One pending webhook event. ``body`` is the exact bytes to POST (and sign), so a retry by
    another replica sends the same event, same ``created_at``, same id; empty until the first
    attempt renders it (a terminal event enqueued by the store). The signing secret is *not*
    stored: the sender looks up the tenant's current one."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    event_id: str = Field(min_length=1, description="The Webhook-Id (the body's id).")
    job_id: str
    tenant: str
    event_type: str
    url: str
    body: bytes
    created_at: float = Field(description="Epoch seconds it was enqueued.")
    attempts: int = Field(default=0, ge=0, description="Attempts made so far.")
    first_attempt_at: float | None = Field(default=None, description="Epoch of the first attempt (max_elapsed_s).")
    due_at: float = Field(default=0.0, description="Epoch from which a runner may claim it: the next attempt, or the "
                          "end of the current claim's lease.")
    lease_owner: str | None = None

    def immutable_json(self) -> str:
        """The fields fixed at enqueue, as stored once (the mutable ones are kept beside them)."""
        return self.model_dump_json(include={"event_id", "job_id", "tenant", "event_type", "url", "body",
                                             "created_at"})


class DeliveryQueue(ABC):
    """The durable delivery queue of :class:`serve.jobstore.base.JobStore` (mixed into it)."""

    @abstractmethod
    def enqueue_webhook(self, delivery: WebhookDelivery) -> bool:
        """Store ``delivery``, due at its ``due_at`` (0 or past: now) with no lease. False (and
        nothing changes) if a delivery with its ``event_id`` is already pending: one event never
        gets two records. Announces it on ``changes`` (:data:`WEBHOOK_CHANNEL`)."""

    @abstractmethod
    def claim_webhooks(self, *, owner: str, lease_s: float, limit: int = 16,
                       now: float | None = None) -> list[WebhookDelivery]:
        """Atomically take up to ``limit`` deliveries due at ``now`` (never-claimed, due for a
        retry, or whose claimant's lease ran out), oldest due first: each gets ``lease_owner =
        owner`` and ``due_at = now + lease_s``. Concurrent claimants never get the same delivery
        while its lease runs. Returned as stored after the claim."""

    @abstractmethod
    def retry_webhook(self, event_id: str, *, owner: str, attempts: int, first_attempt_at: float | None,
                      due_at: float, body: bytes | None = None) -> bool:
        """Hand a claimed delivery back: record ``attempts`` and ``first_attempt_at`` (and ``body``,
        if given: the bytes its first attempt rendered), due again at ``due_at``, lease ended. Also
        a graceful release (same attempts, due now). False if ``owner`` no longer holds it (its
        lease ran out and another runner claimed it, or it was removed): then nothing changes."""

    @abstractmethod
    def set_webhook_body(self, event_id: str, body: bytes) -> bool:
        """Give a pending delivery its body if it has none yet: the process that ended the job
        renders its terminal event right away, so the event says what the job was when it ended
        (and survives the job being deleted before the first attempt). False if it already had
        one or is gone."""

    @abstractmethod
    def finish_webhook(self, event_id: str) -> bool:
        """Remove the delivery (delivered, or given up). False if it was not pending."""

    @abstractmethod
    def pending_webhooks(self, *, job_id: str | None = None, limit: int = 100) -> list[WebhookDelivery]:
        """Pending deliveries (of one job, or all), soonest due first: for operators and tests."""
