"""The durable job store: job records, the queue, leases and cancellation, behind one interface.

Two backends: :class:`SqliteJobStore` (one node; any number of processes share the file) and
:class:`RedisJobStore` (a cluster). Pick one with :func:`make_job_store`. No Ray here. Pending
webhook deliveries live here too (:mod:`serve.jobstore.deliveries`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve.jobstore.changes import QUEUE_CHANNEL, JobChanges, JobWatch
from serve.jobstore.base import JobStore, JobStoreError, QueueFullError
from serve.jobstore.deliveries import WEBHOOK_CHANNEL, WebhookDelivery
from serve.jobstore.listing import LIST_ORDERS, ListOrder, decode_cursor, encode_cursor
from serve.jobstore.models import (
    JOB_ID_PREFIX,
    TERMINAL_STATUSES,
    THUMBNAIL_CONTENT_TYPE,
    Job,
    JobError,
    JobOutput,
    JobProgress,
    JobStatus,
    AdmissionPolicy,
    SegmentRecord,
    WebhookAttempt,
    WebhookSubscription,
    new_job_id,
    segment_file,
    thumbnail_key_for,
    utcnow,
)
from serve.jobstore.redis import RedisJobStore
from serve.jobstore.sqlite import SqliteJobStore
from serve.jobstore.transitions import abandoned_error

if TYPE_CHECKING:
    from serve.config import JobStoreConfig

__all__ = [
    "QUEUE_CHANNEL",
    "WEBHOOK_CHANNEL",
    "QueueFullError",
    "WebhookDelivery",
    "JobChanges",
    "JobWatch",
    "AdmissionPolicy",
    "SegmentRecord",
    "segment_file",
    "WebhookAttempt",
    "WebhookSubscription",
    "JOB_ID_PREFIX",
    "LIST_ORDERS",
    "ListOrder",
    "TERMINAL_STATUSES",
    "THUMBNAIL_CONTENT_TYPE",
    "Job",
    "JobError",
    "JobOutput",
    "JobProgress",
    "JobStatus",
    "JobStore",
    "JobStoreError",
    "RedisJobStore",
    "SqliteJobStore",
    "abandoned_error",
    "decode_cursor",
    "encode_cursor",
    "make_job_store",
    "new_job_id",
    "thumbnail_key_for",
    "utcnow",
]


def make_job_store(config: "JobStoreConfig") -> JobStore:
    """The store ``config`` describes. ``lease_s`` and ``max_attempts`` are the caller's to pass to
    :meth:`JobStore.claim` / :meth:`JobStore.recover_expired`; the Redis password is read from the
    ``REDIS_PASSWORD`` environment variable."""
    if config.backend == "sqlite":
        return SqliteJobStore(config.sqlite_path, retention_s=config.retention_s)
    if config.backend == "redis":
        if not config.redis_url:
            raise ValueError("job_store.redis_url is required when job_store.backend is redis")
        return RedisJobStore(config.redis_url, key_prefix=config.key_prefix, retention_s=config.retention_s)
    raise ValueError(f"unknown job store backend {config.backend!r}")
