"""What happens when a job ends (and, for subscribers, while it runs): usage, metrics, webhook.

One place for it, used by the job runner (completed, failed, cancelled while running, abandoned)
and by the ingress (cancelled while queued), so every terminal state is metered once and
announced once.

Webhooks are durable: pending deliveries live in the job store, and the runner replicas' outbox
loops (:class:`serve.webhooks.WebhookOutbox`) send and retry them, so a replica that dies loses
none. A job's terminal event is enqueued by the store in the very transition that ends the job,
under an id derived from the job; :meth:`JobLifecycle.ended` renders its body right after (or,
if the process died first, the first runner to attempt it does: :meth:`JobLifecycle.render`).
Progress events are rendered and enqueued here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from datetime import datetime, timezone

from .api.views import job_view
from .config import AppConfig
from pipelines.params import GenerationParams
from pipelines.segments import plan_for

from .jobstore import Job, JobStatus, JobStore, WebhookDelivery, segment_file
from .metering import UsageLedger, gpu_share_from_config, usage_record_for
from .storage import Storage, job_key
from .telemetry import add, emit, log_extra
from .tenants import TenantRegistry
from .webhooks import (
    EVENT_PROGRESS,
    WebhookOutbox,
    WebhookSender,
    event_type_for,
    new_event_id,
    terminal_event_id,
    wants_event,
)
from .webhooks.events import encode_body

logger = logging.getLogger("ray.serve.svd_serve")


class JobLifecycle:
    """``owner`` names this process in webhook delivery claims (the runner passes its own id)."""

    def __init__(self, config: AppConfig, *, store: JobStore, ledger: UsageLedger, tenants: TenantRegistry,
                 storage: Storage | None = None, owner: str | None = None) -> None:
        self.store, self.ledger, self.tenants, self.storage = store, ledger, tenants, storage
        self.gpu_share = gpu_share_from_config(config.stages)
        self.default_model = config.resolved_model_id()  # a job's ``model`` label when it names none
        self.base_url = config.public_url or ""
        self.sender = WebhookSender.from_config(config.webhooks, allow=config.url_allowlist)
        self.keep_attempts = config.webhooks.max_recorded_attempts
        self.outbox = WebhookOutbox(store, self.sender, secret_of=self._secret_of, render=self.render,
                                    owner=owner or f"webhooks-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                                    keep_attempts=self.keep_attempts)
        self._enqueues: set[asyncio.Task] = set()

    async def ended(self, job_id: str) -> None:
        """Meter, count and announce a job that reached a terminal state. Never raises."""
        try:
            job = await asyncio.to_thread(self.store.get, job_id, tenant=None)
            if job is None or not job.status.is_terminal:
                return
            await asyncio.to_thread(self._meter, job)
            # The store enqueued the terminal event with the transition: give it its body now
            # (the job as it ended), and send it now if this process delivers.
            self.sender.forget(job.id)  # no more progress throttling for it
            await asyncio.to_thread(self._fill_terminal_event, job)
            self.outbox.wake()
            await asyncio.to_thread(self._drop_segments, job)
        except Exception:  # bookkeeping must not break serving
            logger.exception("terminal bookkeeping failed", extra=log_extra(job_id))

    def _drop_segments(self, job: Job) -> None:
        """Delete a long clip's stored segments (kept only for a resume): those recorded, and any a
        replica of a lost attempt may still have written (one key per segment and attempt)."""
        if self.storage is None or not job.params.get("duration_s"):
            return
        keys = {segment.key for segment in job.segments}
        plan = plan_for(GenerationParams.model_validate(job.params), max_segments=1 << 16)
        for attempt in range(job.attempts + 1):
            for index in range(plan.num_segments if plan is not None else 0):
                keys.add(job_key(job.tenant, job.id, segment_file(index, attempt)))
        for key in sorted(keys):
            try:
                self.storage.delete(key)
            except Exception:  # noqa: BLE001 - the janitor removes the job's files at expiry anyway
                logger.debug("could not delete a segment", exc_info=True, extra=log_extra(job.id))

    def wants_progress_event(self, job: Job) -> bool:
        """Whether the job subscribed to progress events and one is due (at most one per
        configured interval); a True answer counts as the event being sent."""
        return job.webhook is not None and wants_event(EVENT_PROGRESS, job.webhook.events) \
            and self.sender.progress_due(job.id)

    def progressed(self, job: Job) -> None:
        """Send a progress event for ``job`` (as it is now); see :meth:`wants_progress_event`.
        The event is enqueued in the background (tracked, so :meth:`drain` waits for it)."""
        task = asyncio.get_running_loop().create_task(self._notify(job, EVENT_PROGRESS))
        self._enqueues.add(task)
        task.add_done_callback(self._enqueues.discard)

    def _meter(self, job: Job) -> None:
        record = usage_record_for(job, self.gpu_share)
        first = self.ledger.record(record)
        if not first:  # ended before (a second runner or the janitor settling it again): counted then
            return
        model = job.model or self.default_model

        def count(recorder) -> None:
            recorder.jobs_total.inc(tags={"status": job.status.value, "tenant": job.tenant, "model": model})
            if job.status is JobStatus.FAILED:
                code = job.error.code if job.error is not None else "unknown"
                recorder.job_errors.inc(tags={"code": code, "tenant": job.tenant, "model": model})
            if record.charged:
                if record.video_seconds:
                    recorder.video_seconds.inc(record.video_seconds, tags={"tenant": job.tenant})
                for stage, seconds in record.gpu_seconds.items():  # a stage on CPU (no GPU share): at 0
                    add(recorder.gpu_seconds, seconds, {"tenant": job.tenant, "stage": stage})

        emit(count)

    def _secret_of(self, tenant: str) -> str | None:
        found = self.tenants.get(tenant)
        return found.webhook_secret if found is not None else None

    def _fill_terminal_event(self, job: Job) -> None:
        if job.webhook is None or job.finished_at is None:
            return
        event_type = event_type_for(job.status)
        event_id = terminal_event_id(job.id, event_type)
        self.store.set_webhook_body(event_id, self._body(job, event_type, event_id, job.finished_at))

    def render(self, delivery: WebhookDelivery) -> bytes | None:
        """The body of ``delivery`` from its job as it is now (None if the job is gone): the native
        envelope, or the shape of the adapter the job came through. Blocking (reads the store)."""
        job = self.store.get(delivery.job_id, tenant=None)
        if job is None or job.webhook is None:
            return None
        return self._body(job, delivery.event_type, delivery.event_id,
                          datetime.fromtimestamp(delivery.created_at, tz=timezone.utc))

    def _body(self, job: Job, event_type: str, event_id: str, created_at: datetime) -> bytes:
        if job.webhook is not None and job.webhook.format != "native":
            return webhook_body_of(job.webhook.format)(job, event_type, event_id, self.base_url)
        payload = job_view(job, self.base_url).model_dump(mode="json")
        return encode_body(event_id, event_type, payload, created_at)

    async def _notify(self, job: Job, event_type: str) -> None:
        """Render a progress event and put it in the store's delivery queue. Never raises: a
        failed enqueue is logged (progress is advisory)."""
        if not job.webhook_url:
            return
        if not self._secret_of(job.tenant):
            logger.warning("webhook skipped: the tenant has no webhook secret", extra=log_extra(job.id))
            return
        try:
            event_id = new_event_id()
            body = self._body(job, event_type, event_id, datetime.now(timezone.utc))
            await asyncio.to_thread(self.outbox.enqueue, job_id=job.id, tenant=job.tenant, url=job.webhook_url,
                                    event_type=event_type, event_id=event_id, body=body)
        except Exception:  # noqa: BLE001 - bookkeeping must not break serving
            logger.exception("could not enqueue a webhook event", extra=log_extra(job.id))

    async def deliver_forever(self) -> None:
        """Run the webhook outbox loop (runner replicas): send what is due, until :meth:`drain`."""
        await self.outbox.run()

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: finish enqueueing events, give attempts in flight ``timeout_s``, hand the rest
        back to the store (other replicas send them; nothing pending is lost)."""
        if self._enqueues:
            await asyncio.wait(list(self._enqueues), timeout=timeout_s)
        await self.outbox.stop(timeout_s)


def webhook_body_of(format_name: str):
    """The webhook renderer of an adapter: ``serve.api.compat.<format>.webhook_body(job, event_type,
    event_id, base_url) -> bytes``."""
    import importlib

    return importlib.import_module(f"serve.api.compat.{format_name}").webhook_body
