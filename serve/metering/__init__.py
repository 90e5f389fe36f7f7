"""Per-tenant usage metering: what each finished job used, what is charged, summed per tenant.

One :class:`UsageRecord` per finished job (:func:`usage_record_for`), kept in a
:class:`UsageLedger` (idempotent per job, kept far longer than the job records), summed by
:meth:`UsageLedger.summary` (in total and per model, ``by_model``; optionally for one model) and
served by :func:`serve.metering.api.usage_router` as
``GET /v1/usage``. Two backends, like the job store: :class:`SqliteUsageLedger` (its own table in
the job store's SQLite file) and :class:`RedisUsageLedger` (the job store's Redis, under
``{key_prefix}:usage``). Pick one with :func:`make_usage_ledger`. No Ray here. The charging rules
are in :mod:`serve.metering.models` and ``docs/metering.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve.metering.base import DEFAULT_USAGE_RETENTION_S, UsageLedger
from serve.metering.models import (
    CLIENT_ERROR_CODES,
    UNKNOWN_MODEL,
    metered_stages,
    ModelUsage,
    Outcome,
    UsageRecord,
    UsageSummary,
    UsageTotals,
    gpu_share_from_config,
    is_charged,
    usage_record_for,
)
from serve.metering.redis import RedisUsageLedger
from serve.metering.sqlite import SqliteUsageLedger

if TYPE_CHECKING:
    from serve.config import JobStoreConfig

__all__ = [
    "CLIENT_ERROR_CODES",
    "DEFAULT_USAGE_RETENTION_S",
    "metered_stages",
    "ModelUsage",
    "Outcome",
    "RedisUsageLedger",
    "SqliteUsageLedger",
    "UsageLedger",
    "UsageRecord",
    "UsageSummary",
    "UsageTotals",
    "UNKNOWN_MODEL",
    "gpu_share_from_config",
    "is_charged",
    "make_usage_ledger",
    "usage_record_for",
]


def make_usage_ledger(config: "JobStoreConfig", *, retention_s: float | None = None) -> UsageLedger:
    """The ledger next to the job store ``config`` describes: the same SQLite file (table
    ``usage_records``) or the same Redis (keys under ``{key_prefix}:usage``). ``retention_s``
    defaults to the config's ``usage_retention_s`` if it has one, else 400 days; it is *not* the job
    store's ``retention_s`` (jobs expire after a day, usage is kept for invoices). The Redis
    password is read from the ``REDIS_PASSWORD`` environment variable."""
    if retention_s is None:
        retention_s = getattr(config, "usage_retention_s", None) or DEFAULT_USAGE_RETENTION_S
    if config.backend == "sqlite":
        return SqliteUsageLedger(config.sqlite_path, retention_s=retention_s)
    if config.backend == "redis":
        if not config.redis_url:
            raise ValueError("job_store.redis_url is required when job_store.backend is redis")
        return RedisUsageLedger(config.redis_url, key_prefix=config.key_prefix, retention_s=retention_s)
    raise ValueError(f"unknown job store backend {config.backend!r}")
