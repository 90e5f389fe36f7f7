"""The job store interface, and the state machine every backend shares.

A backend supplies storage primitives (insert with idempotency, read, list, index queries, delete,
and ``_mutate``: an atomic read-modify-write of one record). The state transitions (claim, renew,
progress, terminal states, release, cancel, lease recovery) are written once here as pure
functions of a :class:`Job`, and each backend runs them inside its own atomic section (a
``BEGIN IMMEDIATE`` transaction in SQLite, a WATCH/MULTI optimistic transaction in Redis), so both
backends behave identically.

Semantics, shared by every backend:

* Tenant scoping: every method that takes ``tenant`` treats a job of another tenant exactly like
  a missing one. ``tenant=None`` on :meth:`JobStore.get` is unscoped access for internal callers.
* ``version`` is bumped (and ``updated_at`` set) on every change, lease renewals included.
* ``attempts`` counts claims that ran. :meth:`JobStore.release` (a graceful hand-back, e.g. on
  replica shutdown) undoes its claim's increment, so a release never counts toward
  ``max_attempts``; a job whose worker *stopped responding* (lease expired) does count.
* Queue order is ``(created_at, id)``. A released or recovered job keeps its ``created_at`` and so
  keeps its place in the queue.
* ``expires_at`` is ``created_at + retention_s`` on create and ``finished_at + retention_s`` once
  terminal, so a finished clip is kept a full retention period. :meth:`JobStore.purge_expired`
  never removes an ``in_progress`` record (its runner still writes to it). A job whose
  ``metadata["retention_s"]`` is a positive number (a tenant's own retention) uses that instead of
  the store's ``retention_s``.
* Every committed change of a job is announced on ``store.changes`` (:mod:`serve.jobstore.changes`),
  so waiters wake on it instead of polling.
* Token buckets (:meth:`JobStore.take_token`) live in the store too, so a rate limit holds across
  every process that shares it (all ingress replicas), not per process.
"""

from __future__ import annotations

import base64
import binascii
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from serve.jobstore.changes import QUEUE_CHANNEL, JobChanges
from serve.jobstore.models import (
    Job,
    JobError,
    JobOutput,
    JobProgress,
    JobStatus,
    SegmentRecord,
    WebhookAttempt,
    dt_to_us,
    epoch_to_dt,
    to_utc,
)

#: A transition: mutates the job in place, returns whether it changed anything.
Mutation = Callable[[Job], bool]

DEFAULT_RETENTION_S = 24 * 3600.0

#: Listing order by ``(created_at, id)``: newest first (``desc``, the default) or oldest first.
ListOrder = Literal["desc", "asc"]
LIST_ORDERS = ("desc", "asc")

_TOKEN_EPSILON = 1e-9



class JobStoreError(RuntimeError):
    """The job store could not complete an operation: the backend is unreachable, locked for too
    long, or kept conflicting. (A refused transition is not an error: it returns False/None.)"""


def encode_cursor(job: Job) -> str:
    raw = f"{dt_to_us(job.created_at)}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """``(created_at in epoch microseconds, job id)`` of the last job of the previous page."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        us, job_id = raw.split("|", 1)
        if not 0 <= int(us) < 2**63:  # an index column holds 64-bit integers
            raise ValueError("out of range")
        return int(us), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("invalid cursor") from exc


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


class JobStore(ABC):
    """Durable, multi-process-safe job records. All methods are synchronous and thread-safe."""

    changes: JobChanges
    """Where committed changes are announced (set by each backend)."""

    def __init__(self, *, retention_s: float = DEFAULT_RETENTION_S, clock: Callable[[], float] = time.time):
        if retention_s <= 0:
            raise ValueError("retention_s must be positive")
        self.retention_s = float(retention_s)
        self._clock = clock

    # ------------------------------------------------------------------ backend primitives

    @abstractmethod
    def create(self, job: Job) -> tuple[Job, bool]:
        """Insert ``job`` (queued, typically). Returns ``(stored job, True)``.

        If ``job.idempotency_key`` is set and the same tenant already has an unexpired job with that
        key, returns ``(existing job, False)`` and inserts nothing; concurrent creates with one key
        (from any thread or process) make exactly one job. Raises ``ValueError`` if the id exists.
        """

    @abstractmethod
    def get(self, job_id: str, *, tenant: str | None) -> Job | None:
        """The job, or None if absent or owned by another tenant (``tenant=None``: unscoped)."""

    @abstractmethod
    def list(
        self,
        tenant: str,
        *,
        limit: int = 20,
        cursor: str | None = None,
        status: JobStatus | None = None,
        order: ListOrder = "desc",
        after: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """The tenant's jobs ordered by ``(created_at, id)``, newest first (``order="desc"``) or
        oldest first (``"asc"``), and the cursor of the next page (None on the last).

        The page starts after a position: ``cursor`` (returned by an earlier call with the same
        ``order``) or ``after``, the id of one of the tenant's jobs (OpenAI-style pagination).
        Raises ``ValueError`` for a malformed cursor, both given, an unknown order, or an
        ``after`` id that is not one of the tenant's jobs (another tenant's id is a missing one).
        """

    @abstractmethod
    def queued_heads(self) -> list[Job]:
        """For each tenant with queued jobs, its oldest queued job (oldest first)."""

    @abstractmethod
    def queue_depth(self, tenant: str | None = None) -> int:
        """Queued jobs, of one tenant or in all."""

    @abstractmethod
    def running_count(self, tenant: str | None = None) -> int:
        """In-progress jobs, of one tenant or in all."""

    @abstractmethod
    def queue_position(self, job_id: str) -> int | None:
        """Queued jobs (of all tenants) created before this one; 0 = next. None if it is not queued."""

    @abstractmethod
    def is_cancel_requested(self, job_id: str) -> bool:
        """Cheap check for the sampler's step callback: True if a cancel was requested, the job is
        already cancelled, or its record is gone (deleted): in each case the work should stop."""

    @abstractmethod
    def delete(self, job_id: str, *, tenant: str) -> Job | None:
        """Remove the record (the caller removes its stored files). Returns it as it was."""

    @abstractmethod
    def purge_expired(self, now: datetime | float | None = None) -> list[Job]:
        """Remove records past ``expires_at`` (except in-progress ones); returned so the caller can
        delete their outputs and inputs."""

    @abstractmethod
    def find_by_idempotency_key(self, tenant: str, idempotency_key: str) -> Job | None:
        """The tenant's unexpired job created with this idempotency key (what :meth:`create` would
        return as ``(existing, False)``), or None. A read: admission uses it to answer a replay
        without spending rate-limit tokens."""

    @abstractmethod
    def take_token(self, bucket: str, *, rate_per_s: float, burst: float, now: float | None = None) -> float:
        """Atomically take one token from the token bucket ``bucket`` (shared by every process using
        this store). Returns 0.0 if a token was taken, else the seconds until one will be available
        (nothing is taken then).

        A bucket holds at most ``burst`` tokens and refills at ``rate_per_s``; an unknown bucket
        starts full. ``now`` (epoch seconds) defaults to the store's clock; time never runs
        backwards for a bucket (a caller whose clock is behind refills nothing), so slightly skewed
        replica clocks cannot mint extra tokens. Raises ``ValueError`` for a non-positive rate or a
        burst below 1."""

    @abstractmethod
    def hold_lease(self, name: str, *, owner: str, ttl_s: float) -> bool:
        """Take or keep the cluster-wide lease ``name`` for ``ttl_s`` seconds: True if ``owner``
        holds it afterwards (it was free, expired, or already ``owner``'s). Elects the one process
        that runs once-per-cluster work (the janitor)."""

    @abstractmethod
    def ping(self) -> bool:
        """True if the backing store answers."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. The store is not usable afterwards."""

    @abstractmethod
    def _mutate(self, job_id: str, fn: Mutation, *, tenant: str | None = None) -> tuple[Job, bool] | None:
        """Atomically: read the job, apply ``fn``, and if it returns True bump ``version``, set
        ``updated_at`` and write it back. Returns ``(job after, changed)``, or None if the job is
        absent (or another tenant's, when ``tenant`` is given). ``fn`` may run more than once
        (optimistic retries), so it must only touch the job passed to it."""

    @abstractmethod
    def _expired_lease_ids(self, now: float) -> list[str]:
        """Ids of in-progress jobs whose lease expired at or before ``now``."""

    # ------------------------------------------------------------------ helpers

    def _now(self) -> float:
        return self._clock()

    def _list_start(self, tenant: str, *, limit: int, cursor: str | None, after: str | None,
                    order: str) -> tuple[int, str] | None:
        """Checks a listing's arguments; the ``(created_at in epoch microseconds, id)`` the page
        starts after, or None to start at the first job."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if order not in LIST_ORDERS:
            raise ValueError(f"order must be one of {', '.join(LIST_ORDERS)}")
        if cursor is not None and after is not None:
            raise ValueError("give cursor or after, not both")
        if cursor is not None:
            return decode_cursor(cursor)
        if after is not None:
            job = self.get(after, tenant=tenant)
            if job is None:
                raise ValueError(f"after: no job {after!r}")
            return dt_to_us(job.created_at), job.id
        return None

    def _announce(self, job: Job) -> None:
        """Publish a committed change (and, for a queued job, that the queue changed)."""
        self.changes.publish(job.id)
        if job.status is JobStatus.QUEUED:
            self.changes.publish(QUEUE_CHANNEL)

    def _retention_of(self, job: Job) -> float:
        """The tenant's retention stamped at admission, else the store's."""
        return job.policy.retention_s or self.retention_s

    def _prepare_new(self, job: Job) -> Job:
        """The record as first stored: version 1, ``updated_at`` now, ``expires_at`` filled in."""
        job = job.model_copy(deep=True)
        job.version = 1
        job.updated_at = epoch_to_dt(self._now())
        if job.expires_at is None:
            job.expires_at = job.created_at + timedelta(seconds=self._retention_of(job))
        return job

    @staticmethod
    def _check_bucket_args(bucket: str, rate_per_s: float, burst: float) -> None:
        if not bucket:
            raise ValueError("bucket must not be empty")
        if not rate_per_s > 0:
            raise ValueError("rate_per_s must be positive")
        if not burst >= 1:
            raise ValueError("burst must be at least 1")

    @staticmethod
    def _refill(tokens: float | None, updated: float | None, *, now: float, rate_per_s: float, burst: float
                ) -> tuple[float, float, float]:
        """The token-bucket step both backends share (Redis runs the same arithmetic in Lua):
        ``(tokens after, timestamp after, wait)``; ``wait`` is 0.0 when a token was taken."""
        if tokens is None or updated is None:
            tokens, updated = burst, now
        elapsed = max(0.0, now - updated)
        tokens = min(burst, tokens + elapsed * rate_per_s)
        updated = max(updated, now)
        if tokens >= 1.0 - _TOKEN_EPSILON:  # float refills land a hair short of a whole token
            return max(0.0, tokens - 1.0), updated, 0.0
        return tokens, updated, (1.0 - tokens) / rate_per_s

    def _is_expired(self, job: Job, now: float | None = None) -> bool:
        now = self._now() if now is None else now
        return job.expires_at is not None and job.expires_at.timestamp() <= now

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

    @staticmethod
    def _normalize_now(now: datetime | float | None, default: float) -> float:
        if now is None:
            return default
        if isinstance(now, datetime):
            return to_utc(now).timestamp()
        return float(now)

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

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
