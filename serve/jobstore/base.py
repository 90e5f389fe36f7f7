"""The job store interface, and the state machine every backend shares.

A backend supplies storage primitives (insert with idempotency, read, list, index queries, delete,
and ``_mutate``: an atomic read-modify-write of one record). The state transitions (claim, renew,
progress, terminal states, release, cancel, lease recovery) are written once, in
:mod:`serve.jobstore.transitions`, as pure functions of a :class:`Job`, and each backend runs them
inside its own atomic section (a ``BEGIN IMMEDIATE`` transaction in SQLite, a WATCH/MULTI
optimistic transaction in Redis), so both backends behave identically.

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
* ``create(job, max_queued=N)`` checks the tenant's queued count and inserts in one atomic step,
  so N holds however many ingress replicas admit at once (:class:`QueueFullError` otherwise).
* Pending webhook deliveries live in the store as well (:mod:`serve.jobstore.deliveries`), so a
  runner replica that dies loses none of them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import NamedTuple

from serve.jobstore.buckets import check_bucket_args, refill
from serve.jobstore.changes import QUEUE_CHANNEL, JobChanges
from serve.jobstore.deliveries import DeliveryQueue
from serve.jobstore.listing import LIST_ORDERS, ListOrder, decode_cursor
from serve.jobstore.models import Job, JobStatus, dt_to_us, epoch_to_dt, to_utc
from serve.jobstore.transitions import JobTransitions

#: A transition: mutates the job in place, returns whether it changed anything.
Mutation = Callable[[Job], bool]

DEFAULT_RETENTION_S = 24 * 3600.0


class TenantJobCounts(NamedTuple):
    """One tenant's queued and in-progress jobs (:meth:`JobStore.tenant_job_counts`)."""

    queued: int
    running: int


class JobStoreError(RuntimeError):
    """The job store could not complete an operation: the backend is unreachable, locked for too
    long, or kept conflicting. (A refused transition is not an error: it returns False/None.)"""


class QueueFullError(Exception):
    """:meth:`JobStore.create` refused a job: its tenant already has ``depth`` queued jobs and may
    have at most ``limit`` (``max_queued``). Not a :class:`JobStoreError`: the store works, the
    tenant is over its limit (the API answers 429 ``queue_full``)."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"the tenant has {depth} queued jobs and may have at most {limit}")
        self.depth, self.limit = depth, limit

    def __reduce__(self):  # picklable with its fields (Ray carries exceptions between processes)
        return type(self), (self.depth, self.limit)


class JobStore(JobTransitions, DeliveryQueue, ABC):
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
    def create(self, job: Job, *, max_queued: int | None = None) -> tuple[Job, bool]:
        """Insert ``job`` (queued, typically). Returns ``(stored job, True)``.

        If ``job.idempotency_key`` is set and the same tenant already has an unexpired job with that
        key, returns ``(existing job, False)`` and inserts nothing; concurrent creates with one key
        (from any thread or process) make exactly one job. Raises ``ValueError`` if the id exists.

        ``max_queued``: insert a queued job only if its tenant has fewer queued jobs than that,
        checked and inserted atomically (across threads, processes and store objects), else raise
        :class:`QueueFullError`. The idempotency check comes first: a replay of an existing job is
        answered even when the queue is full (it adds nothing).
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
    def completed_after(self, after: tuple[float, str] | None, *, limit: int = 100
                        ) -> tuple[list[Job], tuple[float, str] | None]:
        """Completed jobs in order of (expiry, id), those after the cursor ``after`` (None: from the
        first), at most ``limit`` records looked at; and the next page's cursor (None: this was the
        last). The janitor's sweep for clips gone from storage walks them in pages."""

    @abstractmethod
    def queued_heads(self) -> list[Job]:
        """For each tenant with queued jobs, its oldest queued job (oldest first)."""

    @abstractmethod
    def queue_depth(self, tenant: str | None = None) -> int:
        """Queued jobs, of one tenant or in all."""

    @abstractmethod
    def running_count(self, tenant: str | None = None) -> int:
        """In-progress jobs, of one tenant or in all."""

    def tenant_job_counts(self, tenants: Iterable[str] = ()) -> dict[str, TenantJobCounts]:
        """Queued and running jobs of each tenant that has any (for the janitor's per-tenant
        gauges). ``tenants``: names to look at besides those with queued jobs (a backend that
        cannot list tenants with running jobs counts these). This default asks two counts per
        tenant; the backends answer in one query or one round trip."""
        names = {job.tenant for job in self.queued_heads()} | set(tenants)
        counts = {name: TenantJobCounts(self.queue_depth(name), self.running_count(name)) for name in names}
        return {name: count for name, count in counts.items() if count.queued or count.running}

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

    @staticmethod
    def _check_queue_room(job: Job, max_queued: int | None, depth: int) -> None:
        """Raise :class:`QueueFullError` if a new queued ``job`` would exceed ``max_queued``."""
        if max_queued is not None and job.status is JobStatus.QUEUED and depth >= max_queued:
            raise QueueFullError(depth, max_queued)

    def _prepare_new(self, job: Job) -> Job:
        """The record as first stored: version 1, ``updated_at`` now, ``expires_at`` filled in."""
        job = job.model_copy(deep=True)
        job.version = 1
        job.updated_at = epoch_to_dt(self._now())
        if job.expires_at is None:
            job.expires_at = job.created_at + timedelta(seconds=self._retention_of(job))
        return job

    #: The token-bucket checks and step (:mod:`serve.jobstore.buckets`), for the backends.
    _check_bucket_args = staticmethod(check_bucket_args)
    _refill = staticmethod(refill)

    def _is_expired(self, job: Job, now: float | None = None) -> bool:
        now = self._now() if now is None else now
        return job.expires_at is not None and job.expires_at.timestamp() <= now

    @staticmethod
    def _normalize_now(now: datetime | float | None, default: float) -> float:
        if now is None:
            return default
        if isinstance(now, datetime):
            return to_utc(now).timestamp()
        return float(now)

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
