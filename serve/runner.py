"""The job runner: claims jobs from the durable store and drives them through the stages.

Why a separate deployment: the ingress only admits and reports, so a crash here loses nothing
that the store does not remember. A claimed job carries a lease that this replica renews while
the job runs; if the replica dies, the lease runs out and any runner re-queues the job (or fails
it after ``max_attempts`` claims), so no job stays ``in_progress`` forever.

The runner chains the stage calls as ``DeploymentResponse``s: each stage's output goes straight
from one replica to the next through Ray's object store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, RayServeException

from pipelines.errors import InvalidInputError, JobCancelledError

from .config import AppConfig
from .context import JobContext
from .jobstore import Job, JobError, JobOutput, make_job_store
from .lifecycle import JobLifecycle
from .metering import make_usage_ledger
from .scheduler import pick_next
from .storage import job_prefix, make_storage
from .telemetry import current_carrier, log_extra, metrics, setup_tracing, span_from_carrier
from .tenants import TenantRegistry

logger = logging.getLogger("ray.serve.svd_serve")

POLL_INTERVAL_S = 0.1
GAUGE_INTERVAL_S = 5.0


#: Failures of the machinery rather than of the job: a replica or node died, an object was lost,
#: Serve could not route the request. The job is re-queued (bounded by max_attempts).
INFRASTRUCTURE_ERRORS = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, BackPressureError,
                         RayServeException)


def _cause(error: BaseException) -> BaseException:
    return getattr(error, "cause", None) or error


def is_infrastructure_error(error: BaseException) -> bool:
    return isinstance(error, INFRASTRUCTURE_ERRORS) or isinstance(_cause(error), INFRASTRUCTURE_ERRORS)


@serve.deployment(name="JobRunner", logging_config={"encoding": "JSON"})
class JobRunner:
    async def __init__(self, config: dict[str, Any], image_encoder, sampler, decoder, video_encoder) -> None:
        self.config = AppConfig.model_validate(config)
        setup_tracing(self.config.tracing)
        self.store = make_job_store(self.config.job_store)
        self.storage = make_storage(self.config.storage)
        self.ledger = make_usage_ledger(self.config.job_store, retention_s=self.config.job_store.usage_retention_s)
        self.lifecycle = JobLifecycle(self.config, store=self.store, ledger=self.ledger,
                                      tenants=TenantRegistry(self.config.auth.resolved_tenants_file()))
        self.stages = (image_encoder, sampler, decoder, video_encoder)
        self.owner = f"runner-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_s = self.config.job_store.lease_s
        self.inflight: dict[str, asyncio.Task] = {}
        self.stopping = False
        self._last_recover = 0.0
        self._last_gauges = 0.0
        self._last_renew = 0.0
        self._wakeup = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_loop())

    # -- public methods (called by the ingress) -------------------------------------------------

    async def wake(self) -> None:
        """A job was just admitted: look now instead of at the next poll (the store stays the truth)."""
        self._wakeup.set()

    async def stats(self) -> dict[str, Any]:
        return {"owner": self.owner, "inflight": sorted(self.inflight), "stopping": self.stopping}

    async def check_health(self) -> None:
        if self._loop_task.done():
            raise RuntimeError("the dispatch loop stopped")
        if not await asyncio.to_thread(self.store.ping):
            raise RuntimeError("the job runner cannot reach the job store")

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self.stopping:
            try:
                now = time.monotonic()
                if now - self._last_renew >= self.lease_s / 3:
                    self._last_renew = now
                    await asyncio.to_thread(self._renew_leases)
                if now - self._last_recover >= self.lease_s / 2:
                    self._last_recover = now
                    for job_id in await asyncio.to_thread(self._recover):
                        await self.lifecycle.ended(job_id)
                if now - self._last_gauges >= GAUGE_INTERVAL_S:
                    self._last_gauges = now
                    await asyncio.to_thread(self._update_gauges)
                job = None
                if len(self.inflight) < self.config.max_inflight_jobs:
                    job = await asyncio.to_thread(self._claim_next)
                if job is None:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), POLL_INTERVAL_S)
                    except asyncio.TimeoutError:
                        pass
                    continue
                self.inflight[job.id] = asyncio.get_running_loop().create_task(self._run_job(job))
                task = self.inflight[job.id]
                task.add_done_callback(lambda _: self._wakeup.set())  # a slot is free
            except Exception:  # the loop must survive a store hiccup
                logger.exception("dispatch loop error")
                await asyncio.sleep(1.0)

    def _claim_next(self) -> Job | None:
        # Another runner may win the race for a head; try the next-best pick a few times.
        for _ in range(3):
            heads = self.store.queued_heads()
            running: dict[str, int] = {}

            def running_of(tenant: str) -> int:
                if tenant not in running:
                    running[tenant] = self.store.running_count(tenant)
                return running[tenant]

            head = pick_next(heads, running_of)
            if head is None:
                return None
            job = self.store.claim(head.id, owner=self.owner, lease_s=self.lease_s)
            if job is not None:
                return job
        return None

    def _renew_leases(self) -> None:
        for job_id, task in list(self.inflight.items()):
            if not self.store.renew(job_id, owner=self.owner, lease_s=self.lease_s):
                # The lease is gone (recovered by another runner after a stall): stop our copy.
                logger.warning("lost the lease; stopping this copy", extra=log_extra(job_id))
                task.cancel()

    def _recover(self) -> list[str]:
        """Re-queue or fail jobs whose runner vanished; apply retention. Returns jobs that ended."""
        ended = []
        for job in self.store.recover_expired(max_attempts=self.config.job_store.max_attempts):
            logger.warning("recovered an expired lease: now %s", job.status.value, extra=log_extra(job.id))
            if job.status.is_terminal:
                ended.append(job.id)
        # Retention: expired records go, and their stored input and output with them.
        for job in self.store.purge_expired():
            self.storage.delete_prefix(job_prefix(job.tenant, job.id))
            logger.info("purged an expired job and its files", extra=log_extra(job.id))
        self.ledger.purge()
        return ended

    def _update_gauges(self) -> None:
        recorder = metrics()
        if recorder is not None:
            recorder.queue_depth.set(self.store.queue_depth())
            recorder.running_jobs.set(self.store.running_count())

    # -- one job --------------------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        try:
            with span_from_carrier("job", job.trace_context, **{"svd.job_id": job.id, "svd.tenant": job.tenant,
                                                                 "svd.attempt": job.attempts}):
                ctx = JobContext(job_id=job.id, tenant=job.tenant, owner=self.owner, trace=current_carrier())
                await self._drive(job, ctx)
        except asyncio.CancelledError:
            pass  # lease lost or shutting down: the store already has the job elsewhere
        finally:
            self.inflight.pop(job.id, None)

    async def _drive(self, job: Job, ctx: JobContext) -> None:
        encoder, sampler, decoder, video_encoder = self.stages
        params = job.params
        output_key = job.metadata["output_key"]
        start = time.perf_counter()
        responses = []
        watcher = asyncio.get_running_loop().create_task(self._watch_progress(job.id)) \
            if job.webhook_url and job.metadata.get("webhook_events") else None
        try:
            encoded = encoder.encode.remote(ctx, job.input_key, params)
            sampled = sampler.sample.remote(ctx, encoded, params)
            decoded = decoder.decode.remote(ctx, sampled, params)
            stored_response = video_encoder.encode.remote(ctx, decoded, params, output_key)
            responses = [encoded, sampled, decoded, stored_response]
            stored = await stored_response
        except asyncio.CancelledError:
            for response in responses:
                response.cancel()
            raise
        except BaseException as error:  # noqa: BLE001 - classified below
            if await asyncio.to_thread(self._settle_failure, job, error):
                await self.lifecycle.ended(job.id)
            return
        finally:
            if watcher is not None:
                watcher.cancel()
        output = JobOutput(
            key=stored["key"], content_type=stored["content_type"],
            file_name=f"{job.id}.{output_key.rsplit('.', 1)[-1]}", file_size=stored["file_size"],
        )
        job_seconds = time.perf_counter() - start
        await asyncio.to_thread(
            self.store.complete, job.id, owner=self.owner, output=output,
            timings={"total": job_seconds},
        )
        await self.lifecycle.ended(job.id)
        logger.info("job completed in %.2fs", job_seconds, extra=log_extra(job.id, tenant=job.tenant))

    def _settle_failure(self, job: Job, error: BaseException) -> bool:
        """Record how a job that raised ends; True if it reached a terminal state."""
        cause = _cause(error)
        if isinstance(cause, JobCancelledError) or self.store.is_cancel_requested(job.id):
            logger.info("job cancelled", extra=log_extra(job.id))
            return self.store.mark_cancelled(job.id, owner=self.owner)
        if is_infrastructure_error(error):
            # A replica died or the stage was saturated: try again (bounded by max_attempts at claim).
            logger.warning("stage worker lost (%s)", type(cause).__name__, extra=log_extra(job.id))
            if job.attempts < self.config.job_store.max_attempts:
                self.store.release(job.id, owner=self.owner, count_attempt=True)
                return False
            return self.store.fail(job.id, owner=self.owner, error=JobError(
                code="worker_lost",
                message=f"a pipeline worker stopped during each of {job.attempts} attempts; giving up"))
        if isinstance(cause, InvalidInputError):
            err = JobError(code=cause.code, message=str(cause))
        else:
            err = JobError(code="internal_error", message="generation failed inside the service; it was logged "
                                                          "and is not charged")
            logger.error("job failed: %r", cause, extra=log_extra(job.id), exc_info=cause)
        return self.store.fail(job.id, owner=self.owner, error=err)

    async def _watch_progress(self, job_id: str) -> None:
        """Progress webhooks for jobs that asked for them: the stages write progress to the store."""
        interval = self.config.webhooks.progress_min_interval_s
        while True:
            await asyncio.sleep(interval)
            job = await asyncio.to_thread(self.store.get, job_id, tenant=None)
            if job is None or job.status.is_terminal:
                return
            await self.lifecycle.progressed(job)

    # -- shutdown -------------------------------------------------------------------------------

    async def __del__(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, then hand back the rest."""
        self.stopping = True
        grace = max(0.0, self.config.stages.runner.graceful_shutdown_timeout_s - 5.0)
        pending = [task for task in self.inflight.values() if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for job_id, task in list(self.inflight.items()):
            task.cancel()
            await asyncio.to_thread(self.store.release, job_id, owner=self.owner)
        await self.lifecycle.drain(timeout_s=5.0)
