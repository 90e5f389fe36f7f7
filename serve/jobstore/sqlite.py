"""SQLite job store: one node, any number of processes (Ray replicas) sharing one file.

* Connections: :class:`serve.db.sqlite.SqliteDatabase` (WAL, ``busy_timeout``,
  ``synchronous=NORMAL``, one connection per thread, re-opened after ``fork``).
* Every write is a ``BEGIN IMMEDIATE`` transaction: it takes the database write lock up front, so
  read-check-write sequences (claim, idempotent create, every transition) are atomic across
  threads *and* processes.
* Each job is stored as its JSON plus the columns the queries index (tenant, status, created_at in
  epoch microseconds, idempotency_key, lease_expires_at, expires_at).
* Token buckets (rate limits) are rows of ``token_buckets`` (tokens, last refill time), read and
  written in one ``BEGIN IMMEDIATE`` transaction.
* Pending webhook deliveries are rows of ``webhook_deliveries`` (:mod:`serve.jobstore.sqlite_deliveries`);
  a job's terminal event is inserted in the transaction that makes it terminal.
* ``create(job, max_queued=N)`` counts the tenant's queued jobs inside the insert's transaction.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime

from serve.db.sqlite import SqliteDatabase

from serve.jobstore.base import (
    DEFAULT_RETENTION_S,
    JobStore,
    Mutation,
    TenantJobCounts,
)
from serve.jobstore.changes import SocketChanges
from serve.jobstore.counted import counted_errors
from serve.jobstore.deliveries import WEBHOOK_CHANNEL, terminal_delivery
from serve.jobstore.sqlite_deliveries import DELIVERY_SCHEMA, SqliteDeliveries
from serve.jobstore.listing import ListOrder, encode_cursor
from serve.jobstore.models import Job, JobStatus, dt_to_us, epoch_to_dt

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    tenant           TEXT NOT NULL,
    status           TEXT NOT NULL,
    created_us       INTEGER NOT NULL,
    idempotency_key  TEXT,
    lease_expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    expires_at       REAL,
    version          INTEGER NOT NULL,
    data             TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_tenant_created ON jobs (tenant, created_us, id);
CREATE INDEX IF NOT EXISTS jobs_tenant_status_created ON jobs (tenant, status, created_us, id);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_us, id);
CREATE INDEX IF NOT EXISTS jobs_status_lease ON jobs (status, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency
    ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS cluster_leases (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS token_buckets (
    name       TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""

_COLUMNS = (
    "id, tenant, status, created_us, idempotency_key, lease_expires_at, cancel_requested, expires_at, version, data"
)


def _row(job: Job) -> tuple:
    return (
        job.id,
        job.tenant,
        job.status.value,
        dt_to_us(job.created_at),
        job.idempotency_key,
        job.lease_expires_at,
        int(job.cancel_requested),
        job.expires_at.timestamp() if job.expires_at else None,
        job.version,
        job.model_dump_json(),
    )


def _load(conn: sqlite3.Connection, job_id: str, tenant: str | None) -> Job | None:
    """The job, or None if it is missing or (``tenant`` given) another tenant's."""
    row = conn.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    job = Job.model_validate_json(row[0])
    return None if tenant is not None and job.tenant != tenant else job


_translate = counted_errors(sqlite3.Error, backend="sqlite")  # JobStoreError, counted


class SqliteJobStore(SqliteDeliveries, JobStore):
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], float] | None = None,
    ):
        kwargs = {"clock": clock} if clock is not None else {}
        super().__init__(retention_s=retention_s, **kwargs)
        self._db = SqliteDatabase(path, schema=_SCHEMA + DELIVERY_SCHEMA, busy_timeout_s=busy_timeout_s,
                                  name="job store")
        self.path = self._db.path
        self.changes = SocketChanges.for_database(self.path)

    # ------------------------------------------------------------------ writes

    @_translate
    def create(self, job: Job, *, max_queued: int | None = None) -> tuple[Job, bool]:
        job = self._prepare_new(job)
        with self._db.transaction() as conn:
            if job.idempotency_key is not None:
                row = conn.execute(
                    "SELECT data FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                    (job.tenant, job.idempotency_key),
                ).fetchone()
                if row is not None:
                    existing = Job.model_validate_json(row[0])
                    if not self._is_expired(existing):
                        return existing, False
                    # An expired job keeps its record until purged but no longer owns the key.
                    conn.execute("UPDATE jobs SET idempotency_key = NULL WHERE id = ?", (existing.id,))
            if max_queued is not None:  # counted under the write lock: no other create can interleave
                (depth,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE tenant = ? AND status = ?",
                                        (job.tenant, JobStatus.QUEUED.value)).fetchone()
                self._check_queue_room(job, max_queued, int(depth))
            try:
                conn.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _row(job))
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"job {job.id} already exists") from exc
        self._announce(job)
        return job, True

    @_translate
    def take_token(self, bucket: str, *, rate_per_s: float, burst: float, now: float | None = None) -> float:
        self._check_bucket_args(bucket, rate_per_s, burst)
        now = self._now() if now is None else float(now)
        with self._db.transaction() as conn:
            row = conn.execute("SELECT tokens, updated_at FROM token_buckets WHERE name = ?", (bucket,)).fetchone()
            tokens, updated, wait = self._refill(row[0] if row else None, row[1] if row else None,
                                                 now=now, rate_per_s=rate_per_s, burst=burst)
            conn.execute(
                "INSERT INTO token_buckets (name, tokens, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
                (bucket, tokens, updated),
            )
        return wait

    @_translate
    def _mutate(self, job_id: str, fn: Mutation, *, tenant: str | None = None) -> tuple[Job, bool] | None:
        with self._db.transaction() as conn:
            job = _load(conn, job_id, tenant)
            if job is None:
                return None
            was_terminal = job.is_terminal
            if not fn(job):
                return job, False
            now = self._now()
            job.version += 1
            job.updated_at = epoch_to_dt(now)
            values = _row(job)
            conn.execute(
                "UPDATE jobs SET status = ?, lease_expires_at = ?, cancel_requested = ?, expires_at = ?, "
                "version = ?, data = ? WHERE id = ?",
                (values[2], values[5], values[6], values[7], values[8], values[9], job.id),
            )
            # The terminal webhook event, in the same transaction: it exists iff the job ended.
            event = terminal_delivery(was_terminal, job, now)
            if event is not None:
                self._insert_delivery(conn, event)
        self._announce(job)
        if event is not None:
            self.changes.publish(WEBHOOK_CHANNEL)
        return job, True

    @_translate
    def hold_lease(self, name: str, *, owner: str, ttl_s: float) -> bool:
        now = self._now()
        with self._db.transaction() as conn:
            row = conn.execute("SELECT owner, expires_at FROM cluster_leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            conn.execute(
                "INSERT INTO cluster_leases (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                (name, owner, now + ttl_s),
            )
        return True

    @_translate
    def delete(self, job_id: str, *, tenant: str) -> Job | None:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT data FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return Job.model_validate_json(row[0])

    @_translate
    def completed_after(self, after: tuple[float, str] | None, *, limit: int = 100
                        ) -> tuple[list[Job], tuple[float, str] | None]:
        expires, job_id = after if after is not None else (float("-inf"), "")
        rows = self._db.conn().execute(
            "SELECT data, expires_at, id FROM jobs WHERE status = ? AND (expires_at > ? OR (expires_at = ? AND id > ?)) "
            "ORDER BY expires_at, id LIMIT ?",
            (JobStatus.COMPLETED.value, expires, expires, job_id, limit)).fetchall()
        cursor = (rows[-1][1], rows[-1][2]) if len(rows) == limit else None
        return [Job.model_validate_json(row[0]) for row in rows], cursor

    @_translate
    def purge_expired(self, now: datetime | float | None = None) -> list[Job]:
        cutoff = self._normalize_now(now, self._now())
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT data FROM jobs WHERE expires_at <= ? AND status != ?",
                (cutoff, JobStatus.IN_PROGRESS.value),
            ).fetchall()
            conn.execute(
                "DELETE FROM jobs WHERE expires_at <= ? AND status != ?", (cutoff, JobStatus.IN_PROGRESS.value)
            )
        return [Job.model_validate_json(r[0]) for r in rows]

    # ------------------------------------------------------------------ reads

    @_translate
    def get(self, job_id: str, *, tenant: str | None) -> Job | None:
        return _load(self._db.conn(), job_id, tenant)

    @_translate
    def find_by_idempotency_key(self, tenant: str, idempotency_key: str) -> Job | None:
        row = (
            self._db.conn()
            .execute("SELECT data FROM jobs WHERE tenant = ? AND idempotency_key = ?", (tenant, idempotency_key))
            .fetchone()
        )
        if row is None:
            return None
        job = Job.model_validate_json(row[0])
        return None if self._is_expired(job) else job

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
        start = self._list_start(tenant, limit=limit, cursor=cursor, after=after, order=order)
        sql = "SELECT data FROM jobs WHERE tenant = ?"
        args: list[object] = [tenant]
        if status is not None:
            sql += " AND status = ?"
            args.append(JobStatus(status).value)
        descending = order == "desc"
        if start is not None:
            sql += " AND (created_us, id) < (?, ?)" if descending else " AND (created_us, id) > (?, ?)"
            args += list(start)
        sql += " ORDER BY created_us DESC, id DESC LIMIT ?" if descending else " ORDER BY created_us, id LIMIT ?"
        args.append(limit + 1)
        jobs = [Job.model_validate_json(r[0]) for r in self._db.conn().execute(sql, args).fetchall()]
        if len(jobs) > limit:
            jobs = jobs[:limit]
            return jobs, encode_cursor(jobs[-1])
        return jobs, None

    @_translate
    def queued_heads(self) -> list[Job]:
        rows = (
            self._db.conn()
            .execute(
                "SELECT data FROM ("
                "  SELECT data, created_us, id,"
                "         ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY created_us, id) AS rn"
                "  FROM jobs WHERE status = ?"
                ") WHERE rn = 1 ORDER BY created_us, id",
                (JobStatus.QUEUED.value,),
            )
            .fetchall()
        )
        return [Job.model_validate_json(r[0]) for r in rows]

    def _count(self, status: JobStatus, tenant: str | None) -> int:
        if tenant is None:
            row = self._db.conn().execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status.value,)).fetchone()
        else:
            row = (
                self._db.conn()
                .execute("SELECT COUNT(*) FROM jobs WHERE tenant = ? AND status = ?", (tenant, status.value))
                .fetchone()
            )
        return int(row[0])

    @_translate
    def queue_depth(self, tenant: str | None = None) -> int:
        return self._count(JobStatus.QUEUED, tenant)

    @_translate
    def running_count(self, tenant: str | None = None) -> int:
        return self._count(JobStatus.IN_PROGRESS, tenant)

    @_translate
    def tenant_job_counts(self, tenants: Iterable[str] = ()) -> dict[str, TenantJobCounts]:
        rows = self._db.conn().execute(
            "SELECT tenant, status, COUNT(*) FROM jobs WHERE status IN (?, ?) GROUP BY tenant, status",
            (JobStatus.QUEUED.value, JobStatus.IN_PROGRESS.value)).fetchall()
        counts: dict[str, TenantJobCounts] = {}
        for tenant, status, count in rows:
            queued, running = counts.get(tenant, TenantJobCounts(0, 0))
            counts[tenant] = TenantJobCounts(int(count), running) if status == JobStatus.QUEUED.value \
                else TenantJobCounts(queued, int(count))
        return counts

    @_translate
    def queue_position(self, job_id: str) -> int | None:
        conn = self._db.conn()
        row = conn.execute("SELECT status, created_us FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] != JobStatus.QUEUED.value:
            return None
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = ? AND (created_us, id) < (?, ?)",
            (JobStatus.QUEUED.value, row[1], job_id),
        ).fetchone()
        return int(count)

    @_translate
    def is_cancel_requested(self, job_id: str) -> bool:
        row = self._db.conn().execute("SELECT status, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row[1]) or row[0] == JobStatus.CANCELLED.value

    @_translate
    def _expired_lease_ids(self, now: float) -> list[str]:
        rows = (
            self._db.conn()
            .execute(
                "SELECT id FROM jobs WHERE status = ? AND lease_expires_at <= ? ORDER BY lease_expires_at",
                (JobStatus.IN_PROGRESS.value, now),
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> bool:
        return self._db.ping()

    def close(self) -> None:
        self.changes.close()
        self._db.close()

    def __repr__(self) -> str:
        return f"SqliteJobStore(path={self.path!r})"
