"""The job runner deployment: claims queued jobs, holds their leases, hands each to the driver.

Why a separate deployment: the ingress only admits and reports, so a crash here loses nothing that
the store does not remember. A claimed job carries a lease that this replica renews while the job
runs; if the replica dies, the lease runs out and the janitor re-queues the job (or fails it after
``max_attempts`` claims), so no job stays ``in_progress`` forever. Webhook deliveries work the same
way: pending ones live in the store and every replica's outbox loop sends what is due
(:class:`serve.webhooks.WebhookOutbox`), so a replica that dies leaves none behind.

The dispatcher wakes when the store announces a queue change (a job admitted) or a local slot
frees, and falls back to a slow timer, so a lost notice delays dispatch but never strands a job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from ..aio import first_of
from ..config import AppConfig
from ..jobstore import QUEUE_CHANNEL, Job, make_job_store
from ..lifecycle import JobLifecycle
from ..metering import make_usage_ledger
from ..scheduler import pick_next
from ..storage import make_storage
from ..telemetry import log_extra, setup_tracing, timed_replica
from ..tenants import TenantRegistry
from ..zoo import ModelCatalog, make_model_store
from .driver import JobDriver
from .janitor import Janitor

logger = logging.getLogger("ray.serve.svd_serve")

#: Fallback re-check of the queue when no notice arrives (notices are hints; the store is the truth).
IDLE_RECHECK_S = 1.0


@serve.deployment(name="JobRunner", logging_config={"encoding": "JSON"})
@timed_replica
class JobRunner:
    async def __init__(self, config: dict[str, Any], stages: dict[str, DeploymentHandle]) -> None:
        self.config = AppConfig.model_validate(config)
        setup_tracing(self.config.tracing)
        self.store = make_job_store(self.config.job_store)
        ledger = make_usage_ledger(self.config.job_store, retention_s=self.config.job_store.usage_retention_s)
        storage = make_storage(self.config.storage)
        self.owner = f"runner-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lifecycle = JobLifecycle(self.config, store=self.store, ledger=ledger,
                                      tenants=TenantRegistry(self.config.auth.resolved_tenants_file()), storage=storage,
                                      owner=self.owner)
        self.lease_s = self.config.job_store.lease_s
        self.driver = JobDriver(self.config, store=self.store, lifecycle=self.lifecycle, stages=stages,
                                owner=self.owner,
                                catalog=ModelCatalog(self.config, make_model_store(self.config.job_store)))
        self.janitor = Janitor(self.config, store=self.store, storage=storage,
                               ledger=ledger, lifecycle=self.lifecycle, owner=self.owner)
        self.inflight: dict[str, asyncio.Task] = {}
        self.stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._dispatch_loop()), loop.create_task(self._renew_loop()),
                       loop.create_task(self.janitor.run_forever(self.stopping)),
                       loop.create_task(self.lifecycle.deliver_forever())]

    # -- called by operators and the ingress ----------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        return {"owner": self.owner, "inflight": sorted(self.inflight), "stopping": self.stopping.is_set(),
                "janitor": self.janitor.elected, "webhooks_inflight": self.lifecycle.outbox.inflight}

    async def check_health(self) -> None:
        if not self.stopping.is_set() and any(task.done() for task in self._tasks):
            raise RuntimeError("a runner loop stopped")  # draining (stopping) ends them on purpose
        if not await asyncio.to_thread(self.store.ping):
            raise RuntimeError("the job runner cannot reach the job store")

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        with self.store.changes.watch(QUEUE_CHANNEL) as queue_changed:
            while not self.stopping.is_set():
                try:
                    job = None
                    if len(self.inflight) < self.config.max_inflight_jobs:
                        job = await asyncio.to_thread(self._claim_next)
                    if job is not None:
                        self._start(job)
                        continue
                    self._slot_freed.clear()
                    await first_of(queue_changed.changed(IDLE_RECHECK_S), self._slot_freed.wait())
                except Exception:  # noqa: BLE001 - the loop must survive a store hiccup
                    logger.exception("dispatch loop error")
                    await asyncio.sleep(1.0)

    def _start(self, job: Job) -> None:
        stale = self.inflight.get(job.id)
        if stale is not None:
            # Claimed again while an older copy still runs here (its lease ran out during a store
            # outage and the job was re-queued): only the newest claim may go on.
            stale.cancel()
        task = asyncio.get_running_loop().create_task(self._run(job))
        self.inflight[job.id] = task

    async def _run(self, job: Job) -> None:
        try:
            await self.driver.run(job)
        except asyncio.CancelledError:
            pass  # lease lost or shutting down: the store already has the job elsewhere
        except Exception:  # noqa: BLE001 - the driver settles jobs itself; this is a bug
            logger.exception("job driver error", extra=log_extra(job.id))
        finally:
            if self.inflight.get(job.id) is asyncio.current_task():
                del self.inflight[job.id]
            self._slot_freed.set()

    def _claim_next(self) -> Job | None:
        # Another runner may win the race for a head; try the next-best pick a few times.
        for _ in range(3):
            heads = self.store.queued_heads()
            if not heads:
                return None
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

    async def _renew_loop(self) -> None:
        # Renewal outlives the stop of claiming: jobs finishing within the grace period keep their leases.
        while not self.stopping.is_set() or self.inflight:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await asyncio.to_thread(self._renew_leases)
            except Exception:  # noqa: BLE001 - retried next period, well inside the lease
                logger.exception("lease renewal error")

    def _renew_leases(self) -> None:
        for job_id, task in list(self.inflight.items()):
            if not self.store.renew(job_id, owner=self.owner, lease_s=self.lease_s):
                current = self.store.get(job_id, tenant=None)
                if current is not None and current.is_terminal:
                    continue  # it just ended: the driver is finishing its bookkeeping
                # The lease is gone (recovered after a stall): stop our copy.
                logger.warning("lost the lease; stopping this copy", extra=log_extra(job_id))
                task.get_loop().call_soon_threadsafe(task.cancel)

    # -- shutdown -------------------------------------------------------------------------------

    async def drain(self, wait_s: float) -> dict[str, int]:
        """Stop claiming, let running jobs finish for up to ``wait_s`` seconds, then hand the rest
        back to the queue. Called before the application is deleted (``svd-serve up`` on Ctrl-C),
        while the stages still serve: a job that can finish does."""
        self.stopping.set()
        pending = [task for task in self.inflight.values() if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=wait_s)
        handed_back = 0
        for job_id, task in list(self.inflight.items()):
            task.cancel()
            await asyncio.to_thread(self.store.release, job_id, owner=self.owner)
            handed_back += 1
        return {"running": len(pending), "handed_back": handed_back}

    async def __del__(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, then hand back the rest
        (jobs and webhook deliveries alike: other replicas take them over at once)."""
        await self.drain(max(0.0, self.config.stages.runner.graceful_shutdown_timeout_s - 5.0))
        await self.lifecycle.drain(timeout_s=5.0)
