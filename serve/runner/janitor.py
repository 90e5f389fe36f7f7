"""Once-per-cluster housekeeping: lease recovery, retention purge, queue gauges, and a sweep that
marks completed jobs whose clip is gone from storage (their content then answers 410; a storage
lifecycle rule or an operator may delete objects before the job's own retention does).

Every runner replica has a janitor, but only the one holding the ``janitor`` lease in the job
store works; the others keep trying to take it, so when its holder dies another takes over within
one lease period.
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
from ..telemetry import log_extra, metrics

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
        """Take or keep the lease; if held, recover expired leases, purge, update gauges."""
        elected = await asyncio.to_thread(self.store.hold_lease, LEASE_NAME, owner=self.owner, ttl_s=self.lease_s)
        if elected != self.elected:
            logger.info("janitor %s", "elected" if elected else "stood down")
            self.elected = elected
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

    def update_gauges(self) -> None:
        recorder = metrics()
        if recorder is not None:
            recorder.queue_depth.set(self.store.queue_depth())
            recorder.running_jobs.set(self.store.running_count())
