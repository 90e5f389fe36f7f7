"""What happens when a job ends (and, for subscribers, while it runs): usage, metrics, webhook.

One place for it, used by the job runner (completed, failed, cancelled while running, abandoned)
and by the ingress (cancelled while queued), so every terminal state is metered once and
announced once.
"""

from __future__ import annotations

import asyncio
import logging

from .api.views import job_view
from .config import AppConfig
from pipelines.params import GenerationParams
from pipelines.segments import plan_for

from .jobstore import Job, JobStore, segment_file
from .metering import UsageLedger, gpu_share_from_config, usage_record_for
from .storage import Storage, job_key
from .telemetry import log_extra, metrics
from .tenants import TenantRegistry
from .webhooks import EVENT_PROGRESS, WebhookSender, event_type_for, job_recorder, new_event_id, wants_event

logger = logging.getLogger("ray.serve.svd_serve")


class JobLifecycle:
    def __init__(self, config: AppConfig, *, store: JobStore, ledger: UsageLedger, tenants: TenantRegistry,
                 storage: Storage | None = None) -> None:
        self.store, self.ledger, self.tenants, self.storage = store, ledger, tenants, storage
        self.gpu_share = gpu_share_from_config(config.stages)
        self.base_url = config.public_url or ""
        self.sender = WebhookSender.from_config(config.webhooks, allow=config.url_allowlist)
        self.keep_attempts = config.webhooks.max_recorded_attempts
        self._deliveries: set[asyncio.Task] = set()

    async def ended(self, job_id: str) -> None:
        """Meter, count and announce a job that reached a terminal state. Never raises."""
        try:
            job = await asyncio.to_thread(self.store.get, job_id, tenant=None)
            if job is None or not job.status.is_terminal:
                return
            await asyncio.to_thread(self._meter, job)
            self._notify(job, event_type_for(job.status))
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
        """Send a progress event for ``job`` (as it is now); see :meth:`wants_progress_event`."""
        self._notify(job, EVENT_PROGRESS)

    def _meter(self, job: Job) -> None:
        record = usage_record_for(job, self.gpu_share)
        first = self.ledger.record(record)
        recorder = metrics()
        if recorder is None:
            return
        recorder.jobs_total.inc(tags={"status": job.status.value, "tenant": job.tenant})
        if first and record.charged:
            if record.video_seconds:
                recorder.video_seconds.inc(record.video_seconds, tags={"tenant": job.tenant})
            for stage, seconds in record.gpu_seconds.items():
                if seconds:
                    recorder.gpu_seconds.inc(seconds, tags={"tenant": job.tenant, "stage": stage})

    def _notify(self, job: Job, event_type: str) -> None:
        if not job.webhook_url:
            return
        tenant = self.tenants.get(job.tenant)
        secret = tenant.webhook_secret if tenant is not None else None
        if not secret:
            logger.warning("webhook skipped: the tenant has no webhook secret", extra=log_extra(job.id))
            return
        payload = job_view(job, self.base_url).model_dump(mode="json")
        event_id, body = new_event_id(), None
        if job.webhook.format != "native":
            body = webhook_body_of(job.webhook.format)(job, event_type, event_id, self.base_url)
        task = asyncio.get_running_loop().create_task(self.sender.deliver(
            job.id, job.webhook_url, secret, event_type, payload,
            job_recorder(self.store, job.id, keep=self.keep_attempts), event_id=event_id, body=body))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def drain(self, timeout_s: float) -> None:
        """Give pending deliveries a chance to finish (shutdown)."""
        if self._deliveries:
            await asyncio.wait(list(self._deliveries), timeout=timeout_s)


def webhook_body_of(format_name: str):
    """The webhook renderer of an adapter: ``serve.api.compat.<format>.webhook_body(job, event_type,
    event_id, base_url) -> bytes``."""
    import importlib

    return importlib.import_module(f"serve.api.compat.{format_name}").webhook_body
