"""Durable webhook delivery: events wait in the job store, not in a runner's memory.

Why: a retry that waits out its backoff in one process is lost when that process dies. Here an
event is written to the store when it happens (a job's terminal event by the store itself, in the
transition that ends the job; progress events by :meth:`WebhookOutbox.enqueue`), and every runner
replica runs an outbox loop (:meth:`WebhookOutbox.run`) that claims due deliveries under a lease,
makes one attempt each (:meth:`WebhookSender.attempt`, the same retry policy as ever), records it
on the job, and then removes the delivery (delivered or given up) or hands it back due at its next
retry. Between attempts nobody holds it, so whichever replica polls when it is due sends it; a
replica that dies *during* an attempt holds it only until its lease runs out.

Delivery is at-least-once: a replica that dies after the receiver got a request but before the
store heard about it leaves the delivery to be sent again, with the same ``Webhook-Id`` (fixed at
enqueue, stored with the body), so receivers de-duplicate on it. One event never gets two ids.

The loop wakes on a store notice (:data:`serve.jobstore.WEBHOOK_CHANNEL`, published on enqueue),
on its own retries falling due, and on a slow poll (a lost notice costs latency, not the event).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from pipelines.urls import redact_url

from ..aio import first_of
from ..jobstore import WEBHOOK_CHANNEL, JobStore, WebhookDelivery
from ..telemetry import WEBHOOK_OUTCOMES, count_webhook_delivery, zero_counters
from .delivery import Attempt, WebhookSender
from .events import iso_utc

logger = logging.getLogger("ray.serve.svd_serve.webhooks")

#: Seconds between polls of the store when no notice arrives.
POLL_S = 1.0
#: Deliveries one outbox attempts at once.
MAX_INFLIGHT = 32


class WebhookOutbox:
    """Enqueues events into the job store and (in runner replicas) drives their delivery.

    ``secret_of(tenant)`` returns the tenant's current webhook secret (None: it has none); it is
    looked up at every attempt and never stored. ``render(delivery)`` returns the body of a
    delivery stored without one (a terminal event the store enqueued), or None if its job is gone
    (the delivery is dropped); it runs in a worker thread. ``owner`` names this process in claims
    (unique per replica). ``lease_s`` bounds how long a claimed delivery waits for an attempt to
    finish before another replica may take it (default: twice the attempt timeout plus 30 s).
    """

    def __init__(self, store: JobStore, sender: WebhookSender, *, secret_of: Callable[[str], str | None],
                 owner: str, render: Callable[[WebhookDelivery], bytes | None] | None = None,
                 keep_attempts: int = 50, lease_s: float | None = None, poll_s: float = POLL_S,
                 max_inflight: int = MAX_INFLIGHT, clock: Callable[[], float] = time.time) -> None:
        if not owner:
            raise ValueError("owner must not be empty")
        self.store, self.sender, self.secret_of, self.owner = store, sender, secret_of, owner
        self.render = render
        self.lease_s = lease_s if lease_s is not None else 2 * sender.config.timeout_s + 30.0
        self.poll_s, self.max_inflight, self._clock = poll_s, max_inflight, clock
        if keep_attempts < 1:
            raise ValueError("keep_attempts must be at least 1")
        self.keep_attempts = keep_attempts
        self._inflight: dict[str, tuple[asyncio.Task, WebhookDelivery]] = {}
        self._due: list[float] = []  # when retries this outbox handed back fall due
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    # -- enqueue (any process: ingress or runner) -----------------------------------------------

    def enqueue(self, *, job_id: str, tenant: str, url: str, event_type: str, event_id: str, body: bytes) -> bool:
        """Store one event for delivery, due now (blocking: call it in a worker thread). False if
        an event with this id is already pending (it is not stored twice)."""
        now = self._clock()
        added = self.store.enqueue_webhook(WebhookDelivery(
            event_id=event_id, job_id=job_id, tenant=tenant, event_type=event_type, url=url, body=body,
            created_at=now, due_at=now))
        self.wake()
        return added

    def wake(self) -> None:
        """Make the running loop (if any) look for due deliveries now; callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    # -- the delivery loop (runner replicas) ----------------------------------------------------

    async def run(self) -> None:
        """Claim and deliver due events until :meth:`stop`. Survives store errors (retried)."""
        self._loop = asyncio.get_running_loop()
        zero_counters("webhook_deliveries", [{"outcome": outcome} for outcome in WEBHOOK_OUTCOMES])
        with self.store.changes.watch(WEBHOOK_CHANNEL) as notices:
            while not self._stopping.is_set():
                try:
                    self._wake.clear()
                    room = self.max_inflight - len(self._inflight)
                    started = await self.run_once(wait=False)
                    if started and started == room and len(self._inflight) < self.max_inflight:
                        continue  # a full batch: more may be due
                    await first_of(notices.changed(self._idle_wait()), self._wake.wait(), self._stopping.wait())
                except Exception:  # noqa: BLE001 - the loop must survive a store hiccup
                    logger.exception("webhook outbox error")
                    await asyncio.sleep(1.0)

    async def run_once(self, *, wait: bool = True) -> int:
        """Claim the deliveries due now (as many as there is room for) and start one attempt of
        each; with ``wait``, until those attempts are settled. Returns how many were claimed."""
        self._loop = asyncio.get_running_loop()
        room = self.max_inflight - len(self._inflight)
        if room <= 0 or self._stopping.is_set():
            return 0
        now = self._clock()
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        claimed = await asyncio.to_thread(self.store.claim_webhooks, owner=self.owner, lease_s=self.lease_s,
                                          limit=room, now=now)
        tasks = [self._start(delivery) for delivery in claimed]
        if wait and tasks:
            await asyncio.wait(tasks)
        return len(claimed)

    async def stop(self, timeout_s: float) -> None:
        """Stop claiming; give attempts in flight up to ``timeout_s``, then hand the rest back due
        now (so another replica sends them at once instead of after the lease)."""
        self._stopping.set()
        pending = [task for task, _ in self._inflight.values() if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        for event_id, (task, delivery) in list(self._inflight.items()):
            task.cancel()
            try:
                await asyncio.to_thread(self.store.retry_webhook, event_id, owner=self.owner,
                                        attempts=delivery.attempts, first_attempt_at=delivery.first_attempt_at,
                                        due_at=self._clock())
            except Exception:  # noqa: BLE001 - the lease runs out instead
                logger.warning("could not hand back a webhook delivery", exc_info=True)

    @property
    def inflight(self) -> list[str]:
        return sorted(self._inflight)

    def _idle_wait(self) -> float:
        if not self._due:
            return self.poll_s
        return min(self.poll_s, max(0.0, self._due[0] - self._clock()))

    def _start(self, delivery: WebhookDelivery) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._inflight[delivery.event_id] = (task, delivery)

        def done(_: asyncio.Task) -> None:
            if self._inflight.get(delivery.event_id, (None,))[0] is task:
                del self._inflight[delivery.event_id]
            self._wake.set()  # a slot freed

        task.add_done_callback(done)
        return task

    async def _deliver(self, d: WebhookDelivery) -> None:
        """One attempt of a claimed delivery, recorded on the job, then removed or handed back.
        A store error leaves it claimed: the lease runs out and it is tried again (same id)."""
        log = {"job_id": d.job_id, "event_id": d.event_id, "webhook_event": d.event_type,
               "webhook_url": redact_url(d.url)}
        try:
            first = d.first_attempt_at if d.first_attempt_at is not None else self._clock()
            number = d.attempts + 1
            body = d.body or (await asyncio.to_thread(self.render, d) if self.render is not None else None)
            if not body:
                logger.warning("webhook dropped: its job is gone, nothing to send", extra=log)
                await asyncio.to_thread(self.store.finish_webhook, d.event_id)
                return
            secret = await asyncio.to_thread(self.secret_of, d.tenant)
            try:
                step = await self.sender.attempt(d.job_id, d.url, secret or "", d.event_type, d.event_id, body,
                                                 number=number, elapsed_s=max(0.0, self._clock() - first))
            except ValueError as exc:  # no secret any more, or an event type this version does not know
                logger.warning("webhook dropped: %s", exc, extra=log)
                count_webhook_delivery("failed")
                step = Attempt(_refusal(d, number, str(exc)), "rejected", None, str(exc), None)
            await asyncio.to_thread(self.store.record_webhook_attempt, d.job_id, step.entry, keep=self.keep_attempts)
            if step.next_retry_in_s is None:
                await asyncio.to_thread(self.store.finish_webhook, d.event_id)
                return
            due = self._clock() + step.next_retry_in_s
            if await asyncio.to_thread(self.store.retry_webhook, d.event_id, owner=self.owner, attempts=number,
                                       first_attempt_at=first, due_at=due,
                                       body=None if d.body else body):  # rendered now: kept for the retries
                heapq.heappush(self._due, due)
            else:
                logger.warning("webhook delivery was taken over by another runner (lease ran out)", extra=log)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - retried once the lease runs out
            logger.exception("webhook delivery step failed; it is retried after its lease", extra=log)


def _refusal(d: WebhookDelivery, number: int, reason: str) -> dict:
    """The attempt record of an event that could not be sent at all (no request was made)."""
    return {"event_id": d.event_id, "type": d.event_type, "attempt": number,
            "at": iso_utc(datetime.now(timezone.utc)), "error": f"not_sent: {reason}"[:500],
            "duration_ms": 0.0, "next_retry_in_s": None}
