"""Once-per-cluster housekeeping: lease recovery, retention purge, queue gauges, and a sweep that
marks completed jobs whose clip is gone from storage (their content then answers 410; a storage
lifecycle rule or an operator may delete objects before the job's own retention does).

Every runner replica has a janitor, but only the one holding the ``janitor`` lease in the job
store works; the others keep trying to take it, so when its holder dies another takes over within
one lease period.

Gauges: every janitor pings the job store each tick (``svd_jobstore_up``, per replica); the
elected one sets the queue, tenant and stage replica gauges, at most every
:data:`GAUGE_INTERVAL_S`, and one that stands down sets its own to 0, so the maximum over the
replicas' series is the cluster's value.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..config import AppConfig
from ..jobstore import JobStore
from ..lifecycle import JobLifecycle
from ..metering import UsageLedger
from ..storage import ObjectNotFound, Storage, StorageError, job_prefix
from ..telemetry import REPLICA_STATES, count_jobstore_error, emit, log_extra, metrics, zero_counters

logger = logging.getLogger("ray.serve.svd_serve")

LEASE_NAME = "janitor"
GAUGE_INTERVAL_S = 5.0
#: The output sweep checks this many completed jobs' clips (one storage HEAD each) ...
OUTPUT_SWEEP_PAGE = 50
#: ... this often, walking every completed job in order of expiry, then starting over.
OUTPUT_SWEEP_INTERVAL_S = 30.0


class Janitor:
    def __init__(self, config: AppConfig, *, store: JobStore, storage: Storage, ledger: UsageLedger,
                 lifecycle: JobLifecycle, owner: str) -> None:
        self.config, self.store, self.storage, self.ledger = config, store, storage, ledger
        self.lifecycle, self.owner = lifecycle, owner
        self.lease_s = config.job_store.lease_s
        self.elected = False
        self._last_gauges = 0.0
        self._last_sweep = 0.0
        self._sweep_after: tuple[float, str] | None = None  # the output sweep's place: (expiry, job id)
        self.backend = config.job_store.backend
        self._tenants_shown: set[str] = set()  # tenants whose gauges this janitor set (zeroed when idle)
        self._stages_shown: set[str] = set()
        zero_counters("jobstore_errors", [{"backend": self.backend, "op": "ping"}])

    async def run_forever(self, stop: asyncio.Event) -> None:
        interval = self.lease_s / 3  # renew well before the lease runs out
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a store hiccup must not end housekeeping
                logger.exception("janitor error")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def tick(self) -> None:
        """Ping the store; take or keep the lease; if held, recover expired leases, purge, update gauges."""
        await asyncio.to_thread(self.ping_store)
        elected = await asyncio.to_thread(self.store.hold_lease, LEASE_NAME, owner=self.owner, ttl_s=self.lease_s)
        if elected != self.elected:
            logger.info("janitor %s", "elected" if elected else "stood down")
            self.elected = elected
            if not elected:
                self.clear_gauges()
        if not elected:
            return
        for job_id in await asyncio.to_thread(self.recover):
            await self.lifecycle.ended(job_id)
        now = time.monotonic()
        if now - self._last_gauges >= GAUGE_INTERVAL_S:
            self._last_gauges = now
            await asyncio.to_thread(self.update_gauges)
        if now - self._last_sweep >= OUTPUT_SWEEP_INTERVAL_S:
            self._last_sweep = now
            await asyncio.to_thread(self.sweep_outputs)

    def recover(self) -> list[str]:
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

    def sweep_outputs(self, page: int = OUTPUT_SWEEP_PAGE) -> list[str]:
        """Check one page of completed jobs' clips; mark those gone from storage. Returns them."""
        jobs, next_page = self.store.completed_after(self._sweep_after, limit=page)
        gone = []
        for job in jobs:
            if job.output is not None and job.output.gone_at is None:
                try:
                    self.storage.size(job.output.key)
                except ObjectNotFound:
                    if self.store.mark_output_gone(job.id):
                        logger.warning("the job's clip is gone from storage", extra=log_extra(job.id))
                        gone.append(job.id)
                except StorageError:  # storage unreachable: resume from this job next time
                    logger.warning("output sweep paused: storage unavailable", exc_info=True)
                    return gone
            self._sweep_after = (job.expires_at.timestamp(), job.id)
        self._sweep_after = next_page  # None: the next sweep starts over
        return gone

    def ping_store(self) -> bool:
        """``svd_jobstore_up`` of this replica (a failed ping also counts as a job store error)."""
        try:
            up = bool(self.store.ping())
        except Exception:  # noqa: BLE001 - a ping that raises is a ping that failed
            up = False
        emit(lambda m: m.jobstore_up.set(1 if up else 0, tags={"backend": self.backend}))
        if not up:
            count_jobstore_error(backend=self.backend, op="ping")
        return up

    def update_gauges(self) -> None:
        """The queue, per-tenant and stage replica gauges (elected janitor; blocking)."""
        recorder = metrics()
        if recorder is None:
            return
        heads = self.store.queued_heads()  # oldest first: one per tenant with queued jobs
        registered = set(self.lifecycle.tenants.tenants())
        counts = self.store.tenant_job_counts(registered)
        queued, running = self.store.queue_depth(), self.store.running_count()
        oldest = max(0.0, time.time() - heads[0].created_at.timestamp()) if heads else 0.0
        weights = self._weights(heads, counts)
        total_weight = sum(weights.values())
        recorder.queue_depth.set(queued)
        recorder.running_jobs.set(running)
        recorder.queue_oldest_age.set(oldest)
        for tenant in set(counts) | registered | self._tenants_shown:  # every tenant has series, idle ones at 0
            count = counts.get(tenant)
            tags = {"tenant": tenant}
            recorder.tenant_queued.set(count.queued if count else 0, tags=tags)
            recorder.tenant_running.set(count.running if count else 0, tags=tags)
            recorder.tenant_weight_share.set(weights.get(tenant, 0.0) / total_weight if total_weight else 0.0,
                                             tags=tags)
            recorder.tenant_running_share.set(count.running / running if count and running else 0.0, tags=tags)
        self._tenants_shown |= set(counts) | registered
        try:
            replicas = stage_replica_counts()
        except Exception:  # noqa: BLE001 - Serve's controller busy or gone: keep the last values
            logger.debug("could not read the stage replicas", exc_info=True)
            return
        for stage in set(replicas) | self._stages_shown:
            for state, value in zip(REPLICA_STATES, replicas.get(stage, (0, 0))):
                recorder.stage_replicas.set(value, tags={"stage": stage, "state": state})
        self._stages_shown |= set(replicas)

    def _weights(self, heads, counts) -> dict[str, float]:
        """The fair-share weight of each tenant with queued or running work: its oldest queued
        job's (what the scheduler ranks by), else its current policy's."""
        weights = {job.tenant: job.policy.weight for job in heads}
        for tenant in counts:
            if tenant not in weights:
                found = self.lifecycle.tenants.get(tenant)
                weights[tenant] = found.weight if found is not None else 1.0
        return weights

    def clear_gauges(self) -> None:
        """A janitor that stood down reports 0 everywhere, leaving the values to the new one."""
        def clear(recorder) -> None:
            for gauge in (recorder.queue_depth, recorder.running_jobs, recorder.queue_oldest_age):
                gauge.set(0)
            for tenant in self._tenants_shown:
                for gauge in (recorder.tenant_queued, recorder.tenant_running, recorder.tenant_weight_share,
                              recorder.tenant_running_share):
                    gauge.set(0, tags={"tenant": tenant})
            for stage in self._stages_shown:
                for state in REPLICA_STATES:
                    recorder.stage_replicas.set(0, tags={"stage": stage, "state": state})

        emit(clear)


def stage_replica_counts() -> dict[str, tuple[int, int]]:
    """``{stage: (target, running)}`` replicas of each stage's deployment, from Serve's controller:
    this replica's application's, or (outside a replica) every application's. Empty without Serve."""
    from ray.serve.context import _get_global_client

    from pipelines.registry import STAGES

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    try:
        from ray import serve

        own_app = serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not in a replica (tests, the CLI)
        own_app = None
    stage_of = {spec.deployment: spec.name for spec in STAGES.stages()}
    counts: dict[str, tuple[int, int]] = {}
    for app_name, app in (client.get_serve_details().get("applications") or {}).items():
        if own_app is not None and app_name != own_app:
            continue
        for name, deployment in (app.get("deployments") or {}).items():
            if name in stage_of:
                running = sum(1 for replica in deployment.get("replicas") or () if replica.get("state") == "RUNNING")
                counts[stage_of[name]] = (int(deployment.get("target_num_replicas") or 0), running)
    return counts
