"""The state machine every backend shares: the job transitions (claim, renew, progress, terminal
states, release, cancel, lease recovery, webhook and segment records), each a function of a
:class:`Job` run inside the backend's atomic ``_mutate`` (see :mod:`serve.jobstore.base`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from serve.jobstore.models import (
    Job,
    JobError,
    JobOutput,
    JobProgress,
    JobStatus,
    SegmentRecord,
    WebhookAttempt,
    epoch_to_dt,
    utcnow,
)


def _is_behind(job: Job, stage: str | None) -> bool:
    """Whether ``stage`` comes before the job's current stage on its route (``store`` is last)."""
    order = [*job.route, "store"]
    current = job.progress.stage
    return stage in order and current in order and order.index(stage) < order.index(current)


def abandoned_error(attempts: int) -> JobError:
    return JobError(
        code="abandoned",
        message=f"The job gave up after {attempts} attempts: the worker running it stopped responding.",
    )


class JobTransitions:
    """The transitions of :class:`serve.jobstore.base.JobStore` (mixed into it). They run on the
    store's ``_mutate``, ``_expired_lease_ids``, ``_now`` and ``_retention_of``."""

    # ------------------------------------------------------------------ per-job helpers

    def _finish(self, job: Job, status: JobStatus, now: float) -> None:
        job.status = status
        job.finished_at = epoch_to_dt(now)
        job.expires_at = job.finished_at + timedelta(seconds=self._retention_of(job))
        job.lease_owner = None
        job.lease_expires_at = None

    def _requeue(self, job: Job) -> None:
        job.status = JobStatus.QUEUED
        job.lease_owner = None
        job.lease_expires_at = None
        job.progress = JobProgress()

    @staticmethod
    def _holds(job: Job, owner: str) -> bool:
        return job.status is JobStatus.IN_PROGRESS and job.lease_owner == owner

    # ------------------------------------------------------------------ transitions (shared)

    def claim(self, job_id: str, *, owner: str, lease_s: float) -> Job | None:
        """Queued -> in_progress for ``owner`` (attempts += 1). None if it is no longer queued."""

        def fn(job: Job) -> bool:
            if job.status is not JobStatus.QUEUED:
                return False
            now = self._now()
            job.status = JobStatus.IN_PROGRESS
            job.attempts += 1
            job.lease_owner = owner
            job.lease_expires_at = now + lease_s
            if job.started_at is None:
                job.started_at = epoch_to_dt(now)
            return True

        result = self._mutate(job_id, fn)
        return result[0] if result and result[1] else None

    def renew(self, job_id: str, *, owner: str, lease_s: float) -> bool:
        """Extend the lease, only while ``owner`` holds it and the job is in progress."""

        def fn(job: Job) -> bool:
            if not self._holds(job, owner):
                return False
            job.lease_expires_at = self._now() + lease_s
            return True

        return self._changed(self._mutate(job_id, fn))

    def update_progress(
        self,
        job_id: str,
        *,
        owner: str,
        stage: str | None,
        step: int | None = None,
        total_steps: int | None = None,
        timings: dict[str, float] | None = None,
        reported_at: float | None = None,
    ) -> bool:
        """Set the stage (and the sampling steps, when given: stages after sampling leave them at
        n of n) and merge ``timings``. ``reported_at`` (epoch seconds, default now) is when the
        stage observed this progress. Progress never moves back along the job's route (notes from
        different replicas may arrive out of order). False if ``owner`` lost the lease, or the note
        is older than the progress recorded."""

        def fn(job: Job) -> bool:
            if not self._holds(job, owner) or _is_behind(job, stage):
                return False
            job.progress = JobProgress(
                stage=stage,
                step=job.progress.step if step is None else step,
                total_steps=job.progress.total_steps if total_steps is None else total_steps,
                updated_at=epoch_to_dt(self._now() if reported_at is None else reported_at),
            )
            if timings:
                job.timings.update({k: float(v) for k, v in timings.items()})
            return True

        return self._changed(self._mutate(job_id, fn))

    def complete(self, job_id: str, *, owner: str, output: JobOutput, timings: dict[str, float] | None = None) -> bool:
        def fn(job: Job) -> bool:
            if not self._holds(job, owner):
                return False
            job.output = output.model_copy()
            if timings:
                job.timings.update({k: float(v) for k, v in timings.items()})
            self._finish(job, JobStatus.COMPLETED, self._now())
            return True

        return self._changed(self._mutate(job_id, fn))

    def fail(self, job_id: str, *, owner: str, error: JobError) -> bool:
        def fn(job: Job) -> bool:
            if not self._holds(job, owner):
                return False
            job.error = error.model_copy()
            self._finish(job, JobStatus.FAILED, self._now())
            return True

        return self._changed(self._mutate(job_id, fn))

    def mark_cancelled(self, job_id: str, *, owner: str) -> bool:
        def fn(job: Job) -> bool:
            if not self._holds(job, owner):
                return False
            self._finish(job, JobStatus.CANCELLED, self._now())
            return True

        return self._changed(self._mutate(job_id, fn))

    def release(self, job_id: str, *, owner: str, count_attempt: bool = False) -> bool:
        """Give a claimed job back to the queue.

        By default (a graceful shutdown) the attempt does not count: the claim's ``attempts``
        increment is undone (and ``started_at`` cleared if no attempt is left). With
        ``count_attempt`` (a pipeline worker died under the job) it counts, so a job that keeps
        killing workers runs out of ``max_attempts``. Either way the lease is dropped and the job
        keeps its place in the queue; a job whose cancel was requested is cancelled instead.
        """

        def fn(job: Job) -> bool:
            if not self._holds(job, owner):
                return False
            if job.cancel_requested:
                self._finish(job, JobStatus.CANCELLED, self._now())
                return True
            if not count_attempt:
                job.attempts = max(0, job.attempts - 1)
                if job.attempts == 0:
                    job.started_at = None
            self._requeue(job)
            return True

        return self._changed(self._mutate(job_id, fn))

    def request_cancel(self, job_id: str, *, tenant: str) -> Job | None:
        """Queued: cancelled at once. In progress: ``cancel_requested`` (the runner stops it and calls
        :meth:`mark_cancelled`). Terminal: unchanged. Returns the job after, None if absent."""

        def fn(job: Job) -> bool:
            if job.status is JobStatus.QUEUED:
                job.cancel_requested = True
                self._finish(job, JobStatus.CANCELLED, self._now())
                return True
            if job.status is JobStatus.IN_PROGRESS and not job.cancel_requested:
                job.cancel_requested = True
                return True
            return False

        result = self._mutate(job_id, fn, tenant=tenant)
        return result[0] if result else None

    def recover_expired(self, *, max_attempts: int) -> list[Job]:
        """In-progress jobs whose lease expired: requeued (keeping ``created_at``) if
        ``attempts < max_attempts``, else failed ``abandoned``; cancelled if a cancel was requested.
        Returns the jobs changed."""
        changed: list[Job] = []
        for job_id in self._expired_lease_ids(self._now()):

            def fn(job: Job) -> bool:
                now = self._now()
                if job.status is not JobStatus.IN_PROGRESS or (job.lease_expires_at or 0.0) > now:
                    return False  # renewed, finished or recovered by someone else meanwhile
                if job.cancel_requested:
                    self._finish(job, JobStatus.CANCELLED, now)
                elif job.attempts < max_attempts:
                    self._requeue(job)
                else:
                    job.error = abandoned_error(job.attempts)
                    self._finish(job, JobStatus.FAILED, now)
                return True

            result = self._mutate(job_id, fn)
            if result and result[1]:
                changed.append(result[0])
        return changed

    def mark_output_gone(self, job_id: str) -> bool:
        """Note that a completed job's clip is no longer in storage; True if this call noted it."""
        def fn(job: Job) -> bool:
            if job.status is not JobStatus.COMPLETED or job.output is None or job.output.gone_at is not None:
                return False
            job.output = job.output.model_copy(update={"gone_at": utcnow()})
            return True

        result = self._mutate(job_id, fn)
        return bool(result and result[1])

    def record_webhook_attempt(self, job_id: str, attempt: dict[str, Any], *, keep: int) -> bool:
        """Append one webhook delivery attempt to the job, keeping the newest ``keep``; atomic, so
        concurrent deliveries of one job lose no entry. False if the job is gone."""

        entry = WebhookAttempt.model_validate(attempt)

        def fn(job: Job) -> bool:
            if job.webhook is None:
                return False
            job.webhook.deliveries = [*job.webhook.deliveries, entry][-keep:]
            return True

        return self._changed(self._mutate(job_id, fn))

    def record_segment(self, job_id: str, segment: SegmentRecord, *, owner: str) -> bool:
        """Keep a finished segment of a long clip with the job (replacing an earlier record of the
        same index), so that a retry resumes after it. False if ``owner`` lost the lease."""

        def fn(job: Job) -> bool:
            if not self._holds(job, owner):
                return False
            job.segments = sorted([*(s for s in job.segments if s.index != segment.index), segment],
                                  key=lambda s: s.index)
            return True

        return self._changed(self._mutate(job_id, fn))

    @staticmethod
    def _changed(result: tuple[Job, bool] | None) -> bool:
        return bool(result and result[1])

