"""Redis job store: the cluster backend (every replica on every node shares one Redis).

Keys, all under ``{prefix}:`` (the tenant is always the *last* key component, so tenant names
cannot collide with one another or with the fixed names):

===============================  ====================================================================
``job:{id}``                     string: the job as JSON
``jobs:{tenant}``                zset: the tenant's jobs, score = created_at (epoch microseconds)
``queued:{tenant}``              zset: the tenant's queued jobs, same score
``queued``                       zset: every queued job, same score (queue positions)
``queued-tenants``               set: tenants that have queued jobs (queued_heads)
``running:{tenant}``             set: the tenant's in-progress jobs
``leases``                       zset: in-progress jobs, score = lease expiry (recover_expired)
``expiry``                       zset: every job, score = expires_at (purge_expired)
``idem:{tenant}``                hash: idempotency key -> job id
``lease:{name}``                 string: the owner of a cluster-wide lease (PX expiry)
``changes``                      pub/sub channel: ids of jobs just changed
``bucket:{name}``                hash: a token bucket (``tokens``, ``ts`` = last refill, epoch seconds);
                                 expires once it would be full again (a missing bucket is a full one)
``webhooks``, ``webhook:{id}``   the pending webhook deliveries (:mod:`serve.jobstore.redis_deliveries`)
===============================  ====================================================================

Equal scores order by member, i.e. by job id, so every zset orders by ``(created_at, id)`` exactly
like the SQLite backend.

Atomicity: every write is an optimistic WATCH/MULTI/EXEC transaction. The job's key (and, for
create, the tenant's idempotency hash) is WATCHed, the record is read and the shared transition
(:mod:`serve.jobstore.transitions`) is applied in Python, then the record and all its index entries are
written in one MULTI/EXEC. If another client changed a watched key in between, EXEC aborts and the
whole step is retried on fresh data, so e.g. of eight concurrent claims exactly one succeeds. Two
conditional deletes that MULTI cannot express (drop a tenant from ``queued-tenants`` once its
queue is empty; drop an idempotency entry only if it still points at this job) are tiny Lua
scripts queued inside the same MULTI.

Expiry: records carry no Redis TTL on purpose. :meth:`RedisJobStore.purge_expired` must *return*
expired jobs so their stored clips get deleted; a key that Redis evicted silently would leak its
files and leave stale index entries. Expiry is tracked in the ``expiry`` zset instead, and an
expired but not yet purged job no longer holds its idempotency key.

The client comes from :func:`serve.db.redis.connect_redis`: the password comes from the
``REDIS_PASSWORD`` environment variable, never from the URL in the config; it is not logged and
does not appear in ``repr``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import redis as redis_lib
from redis.exceptions import WatchError

from pipelines.urls import redact_url
from serve.db.redis import (
    PASSWORD_ENV,
    check_key_prefix,
    connect_redis,
    ping_redis,
    redis_key,
)
from serve.jobstore.base import (
    DEFAULT_RETENTION_S,
    JobStore,
    JobStoreError,
    Mutation,
    QueueFullError,
)
from serve.jobstore.changes import RedisChanges
from serve.jobstore.counted import counted_errors
from serve.jobstore.deliveries import WEBHOOK_CHANNEL, terminal_delivery
from serve.jobstore.redis_counts import RedisTenantCounts
from serve.jobstore.redis_deliveries import RedisDeliveries
from serve.jobstore.redis_scripts import _HDEL_IF_EQUAL, _HOLD_LEASE, _SREM_IF_EMPTY, _TAKE_TOKEN
from serve.jobstore.listing import ListOrder, encode_cursor
from serve.jobstore.models import Job, JobStatus, dt_to_us, epoch_to_dt

__all__ = ["PASSWORD_ENV", "RedisJobStore"]

R = TypeVar("R")

#: Queues (inside MULTI) the writes of one transaction step on its pipeline.
Writes = Callable[[Any], None]

#: What :meth:`RedisJobStore._update_one` does with the job it read (None if missing): returns
#: ``(result, writes)``; ``writes`` None writes nothing.
Plan = Callable[[Job | None], tuple[R, Writes | None]]

_MAX_RETRIES = 1000


def _visible(job: Job | None, tenant: str | None) -> Job | None:
    """``job``, or None if it is missing or (``tenant`` given) another tenant's."""
    return None if job is None or (tenant is not None and job.tenant != tenant) else job


_translate = counted_errors(redis_lib.RedisError, backend="redis")  # JobStoreError, counted


class RedisJobStore(RedisTenantCounts, RedisDeliveries, JobStore):
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "svd",
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] | None = None,
        client: redis_lib.Redis | None = None,
        socket_timeout_s: float = 10.0,
    ):
        kwargs = {"clock": clock} if clock is not None else {}
        super().__init__(retention_s=retention_s, **kwargs)
        self.prefix = check_key_prefix(key_prefix)
        self.url = redact_url(url)
        self._r = connect_redis(url, socket_timeout_s=socket_timeout_s, client=client)
        self._take_token_script = self._r.register_script(_TAKE_TOKEN)
        self._hold_lease_script = self._r.register_script(_HOLD_LEASE)
        self.changes = RedisChanges(self._r, self._k("changes"))

    # ------------------------------------------------------------------ keys

    def _k(self, *parts: str) -> str:
        return redis_key(self.prefix, *parts)

    def _job_key(self, job_id: str) -> str:
        return self._k("job", job_id)

    # ------------------------------------------------------------------ record I/O

    @staticmethod
    def _load(raw: str | None) -> Job | None:
        return None if raw is None else Job.model_validate_json(raw)

    def _load_many(self, ids: list[str]) -> list[Job]:
        if not ids:
            return []
        raws = self._r.mget([self._job_key(i) for i in ids])
        return [job for job in map(self._load, raws) if job is not None]

    def _write(self, pipe: Any, old: Job | None, new: Job) -> None:
        """Queue (inside MULTI) the record and every index change from ``old`` to ``new``."""
        t = new.tenant
        score = dt_to_us(new.created_at)
        pipe.set(self._job_key(new.id), new.model_dump_json())
        if old is None:
            pipe.zadd(self._k("jobs", t), {new.id: score})
            if new.idempotency_key is not None:
                pipe.hset(self._k("idem", t), new.idempotency_key, new.id)
        if new.expires_at is not None and (old is None or old.expires_at != new.expires_at):
            pipe.zadd(self._k("expiry"), {new.id: new.expires_at.timestamp()})

        was_queued = old is not None and old.status is JobStatus.QUEUED
        is_queued = new.status is JobStatus.QUEUED
        if is_queued and not was_queued:
            pipe.zadd(self._k("queued", t), {new.id: score})
            pipe.zadd(self._k("queued"), {new.id: score})
            pipe.sadd(self._k("queued-tenants"), t)
        elif was_queued and not is_queued:
            self._unqueue(pipe, new)

        was_running = old is not None and old.status is JobStatus.IN_PROGRESS
        is_running = new.status is JobStatus.IN_PROGRESS
        if is_running:
            pipe.zadd(self._k("leases"), {new.id: new.lease_expires_at or 0.0})
            if not was_running:
                pipe.sadd(self._k("running", t), new.id)
        elif was_running:
            pipe.zrem(self._k("leases"), new.id)
            pipe.srem(self._k("running", t), new.id)

    def _unqueue(self, pipe: Any, job: Job) -> None:
        t = job.tenant
        pipe.zrem(self._k("queued", t), job.id)
        pipe.zrem(self._k("queued"), job.id)
        pipe.eval(_SREM_IF_EMPTY, 2, self._k("queued", t), self._k("queued-tenants"), t)

    def _remove(self, pipe: Any, job: Job) -> None:
        """Queue (inside MULTI) the deletion of the record and all its index entries."""
        t = job.tenant
        pipe.delete(self._job_key(job.id))
        pipe.zrem(self._k("jobs", t), job.id)
        pipe.zrem(self._k("expiry"), job.id)
        pipe.zrem(self._k("leases"), job.id)
        pipe.srem(self._k("running", t), job.id)
        self._unqueue(pipe, job)
        if job.idempotency_key is not None:
            pipe.eval(_HDEL_IF_EQUAL, 1, self._k("idem", t), job.idempotency_key, job.id)

    def _transaction(self, step: Callable[[Any], Any]) -> Any:
        """Run ``step(pipe)`` (WATCH, read, MULTI, queue writes) and EXEC, retrying on conflicts."""
        for _ in range(_MAX_RETRIES):
            with self._r.pipeline(transaction=True) as pipe:
                try:
                    return step(pipe)
                except WatchError:
                    continue
        raise JobStoreError("job store transaction kept conflicting; giving up")

    # ------------------------------------------------------------------ writes

    @_translate
    def create(self, job: Job, *, max_queued: int | None = None) -> tuple[Job, bool]:
        job = self._prepare_new(job)
        job_key = self._job_key(job.id)
        idem_key = self._k("idem", job.tenant)
        queued_key = self._k("queued", job.tenant)

        def step(pipe: Any) -> tuple[Job, bool]:
            # WATCH the tenant's idempotency hash too: of two concurrent creates with one key,
            # the second EXEC aborts, and its retry finds the first one's job. With a queue limit,
            # WATCH the tenant's queued zset as well: any change to the count between the ZCARD
            # and the EXEC (another create, a claim) aborts this step and it counts again.
            pipe.watch(job_key, *((idem_key,) if job.idempotency_key is not None else ()),
                       *((queued_key,) if max_queued is not None else ()))
            if pipe.exists(job_key):
                raise ValueError(f"job {job.id} already exists")
            if job.idempotency_key is not None:
                existing_id = pipe.hget(idem_key, job.idempotency_key)
                if existing_id is not None:
                    existing_key = self._job_key(existing_id)
                    pipe.watch(existing_key)
                    existing = self._load(pipe.get(existing_key))
                    if existing is not None and existing.tenant == job.tenant and not self._is_expired(existing):
                        pipe.unwatch()
                        return existing, False
            if max_queued is not None:
                try:
                    self._check_queue_room(job, max_queued, int(pipe.zcard(queued_key)))
                except QueueFullError:
                    pipe.unwatch()
                    raise
            pipe.multi()
            self._write(pipe, None, job)
            pipe.execute()
            return job, True

        stored, created = self._transaction(step)
        if created:
            self._announce(stored)
        return stored, created

    @_translate
    def take_token(self, bucket: str, *, rate_per_s: float, burst: float, now: float | None = None) -> float:
        self._check_bucket_args(bucket, rate_per_s, burst)
        now = self._now() if now is None else float(now)
        wait = self._take_token_script(keys=[self._k("bucket", bucket)],
                                       args=[repr(float(now)), repr(float(rate_per_s)), repr(float(burst))])
        return float(wait)

    def _update_one(self, job_id: str, plan: Plan[R]) -> R:
        """One optimistic step on one job: WATCH its record, read it and ``plan`` what to do. Its
        writes are EXECed in one MULTI (the whole step is retried on fresh data if the record
        changed meanwhile); without writes the record is UNWATCHed. Returns the plan's result."""
        key = self._job_key(job_id)

        def step(pipe: Any) -> R:
            pipe.watch(key)
            result, writes = plan(self._load(pipe.get(key)))
            if writes is None:
                pipe.unwatch()
            else:
                pipe.multi()
                writes(pipe)
                pipe.execute()
            return result

        return self._transaction(step)

    @_translate
    def _mutate(self, job_id: str, fn: Mutation, *, tenant: str | None = None) -> tuple[Job, bool] | None:
        events: list[bool] = []  # whether the committed step enqueued the terminal webhook event

        def plan(old: Job | None) -> tuple[tuple[Job, bool] | None, Writes | None]:
            old = _visible(old, tenant)
            if old is None:
                return None, None
            new = old.model_copy(deep=True)
            if not fn(new):
                return (old, False), None
            now = self._now()
            new.version = old.version + 1
            new.updated_at = epoch_to_dt(now)
            # The terminal webhook event goes in the same MULTI: it exists iff the job ended.
            event = terminal_delivery(old.is_terminal, new, now)
            events[:] = [event is not None]

            def writes(pipe: Any) -> None:
                self._write(pipe, old, new)
                if event is not None:
                    self._queue_delivery(pipe, event)

            return (new, True), writes

        result = self._update_one(job_id, plan)
        if result is not None and result[1]:
            self._announce(result[0])
            if events and events[0]:
                self.changes.publish(WEBHOOK_CHANNEL)
        return result

    @_translate
    def hold_lease(self, name: str, *, owner: str, ttl_s: float) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        return bool(self._hold_lease_script(keys=[self._k("lease", name)], args=[owner, ttl_ms]))

    @_translate
    def delete(self, job_id: str, *, tenant: str) -> Job | None:
        def plan(job: Job | None) -> tuple[Job | None, Writes | None]:
            job = _visible(job, tenant)
            return job, (None if job is None else lambda pipe: self._remove(pipe, job))

        return self._update_one(job_id, plan)

    @_translate
    def completed_after(self, after: tuple[float, str] | None, *, limit: int = 100
                        ) -> tuple[list[Job], tuple[float, str] | None]:
        # The expiry index holds every job with an expiry, finished or not: a page is filtered here.
        # Equal scores come in member order, so the page resumes inside the cursor's score past the
        # members up to the cursor's own.
        key, start, low = self._k("expiry"), 0, "-inf"
        if after is not None:
            score, member = after
            low = repr(score)
            start = sum(1 for tie in self._r.zrangebyscore(key, low, low) if tie <= member)
        scored = self._r.zrangebyscore(key, low, "+inf", start=start, num=limit, withscores=True)
        jobs = [job for job in self._load_many([job_id for job_id, _ in scored]) if job.status is JobStatus.COMPLETED]
        return jobs, (scored[-1][1], scored[-1][0]) if len(scored) == limit else None

    @_translate
    def purge_expired(self, now: datetime | float | None = None) -> list[Job]:
        cutoff = self._normalize_now(now, self._now())
        purged = (
            self._purge_one(job_id, cutoff) for job_id in self._r.zrangebyscore(self._k("expiry"), "-inf", cutoff)
        )
        return [job for job in purged if job is not None]

    def _purge_one(self, job_id: str, cutoff: float) -> Job | None:
        def plan(job: Job | None) -> tuple[Job | None, Writes | None]:
            if job is None:  # a stale index entry: drop it
                self._r.zrem(self._k("expiry"), job_id)
                return None, None
            if job.status is JobStatus.IN_PROGRESS or not self._is_expired(job, cutoff):
                return None, None
            return job, lambda pipe: self._remove(pipe, job)

        return self._update_one(job_id, plan)

    # ------------------------------------------------------------------ reads

    @_translate
    def get(self, job_id: str, *, tenant: str | None) -> Job | None:
        return _visible(self._load(self._r.get(self._job_key(job_id))), tenant)

    @_translate
    def find_by_idempotency_key(self, tenant: str, idempotency_key: str) -> Job | None:
        job_id = self._r.hget(self._k("idem", tenant), idempotency_key)
        if job_id is None:
            return None
        job = _visible(self._load(self._r.get(self._job_key(job_id))), tenant)
        return None if job is None or self._is_expired(job) else job

    @_translate
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
        start: tuple[int, str] | None = self._list_start(tenant, limit=limit, cursor=cursor, after=after, order=order)
        status = JobStatus(status) if status is not None else None
        descending = order == "desc"
        # A status-filtered listing of queued jobs has its own index; others filter while scanning.
        key = self._k("queued", tenant) if status is JobStatus.QUEUED else self._k("jobs", tenant)
        # From the start position's score (inclusive: equal scores order by id) to the end.
        if descending:
            low, high = "-inf", ("+inf" if start is None else start[0])
        else:
            low, high = ("-inf" if start is None else start[0]), "+inf"

        def beyond(member: str, score: float) -> bool:
            if start is None:
                return True
            position = (int(score), member)
            return position < start if descending else position > start

        batch = max(limit + 1, 50)
        offset = 0
        found: list[Job] = []
        while len(found) <= limit:
            if descending:
                entries = self._r.zrevrangebyscore(key, high, low, start=offset, num=batch, withscores=True)
            else:
                entries = self._r.zrangebyscore(key, low, high, start=offset, num=batch, withscores=True)
            if not entries:
                break
            offset += len(entries)
            ids = [member for member, score in entries if beyond(member, score)]
            for job in self._load_many(ids):
                if job.tenant == tenant and (status is None or job.status is status):
                    found.append(job)
            if len(entries) < batch:
                break
        if len(found) > limit:
            found = found[:limit]
            return found, encode_cursor(found[-1])
        return found, None

    @_translate
    def queued_heads(self) -> list[Job]:
        tenants = sorted(self._r.smembers(self._k("queued-tenants")))
        if not tenants:
            return []
        pipe = self._r.pipeline(transaction=False)
        for t in tenants:
            pipe.zrange(self._k("queued", t), 0, 0)
        heads = [ids[0] for ids in pipe.execute() if ids]
        jobs = [job for job in self._load_many(heads) if job.status is JobStatus.QUEUED]
        return sorted(jobs, key=lambda j: (dt_to_us(j.created_at), j.id))

    @_translate
    def queue_depth(self, tenant: str | None = None) -> int:
        return int(self._r.zcard(self._k("queued") if tenant is None else self._k("queued", tenant)))

    @_translate
    def running_count(self, tenant: str | None = None) -> int:
        if tenant is None:
            return int(self._r.zcard(self._k("leases")))
        return int(self._r.scard(self._k("running", tenant)))

    @_translate
    def queue_position(self, job_id: str) -> int | None:
        rank = self._r.zrank(self._k("queued"), job_id)
        return None if rank is None else int(rank)

    @_translate
    def is_cancel_requested(self, job_id: str) -> bool:
        raw = self._r.get(self._job_key(job_id))
        if raw is None:
            return True
        data = json.loads(raw)
        return bool(data.get("cancel_requested")) or data.get("status") == JobStatus.CANCELLED.value

    @_translate
    def _expired_lease_ids(self, now: float) -> list[str]:
        return list(self._r.zrangebyscore(self._k("leases"), "-inf", now))

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> bool:
        return ping_redis(self._r)

    def close(self) -> None:
        self.changes.close()
        self._r.close()

    def __repr__(self) -> str:
        return f"RedisJobStore(url={self.url!r}, key_prefix={self.prefix!r})"
