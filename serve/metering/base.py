"""The usage ledger interface: durable, idempotent per-job usage records, summed per tenant.

A backend supplies storage primitives (an idempotent insert, a scan of one tenant's records in a
time window, purge); the aggregation (:meth:`UsageSummary.of`) is written once and shared, so both
backends return identical summaries.

Semantics, shared by every backend:

* Idempotent per ``job_id``: the first :meth:`UsageLedger.record` of a job stores it and returns
  True; any later one (a retried runner step, a second runner settling the same job) stores
  nothing and returns False, so a job is never charged twice. The first record wins; records are
  never updated.
* Windows are half-open, ``start <= finished_at < end``, compared in epoch microseconds (UTC).
* Tenant scoping: a tenant's summary and records only ever contain its own records. The optional
  ``model`` filter narrows the tenant's records further (to :attr:`UsageRecord.model_key` equal to
  it; :data:`~serve.metering.models.UNKNOWN_MODEL` selects records that name no model); it never
  widens them. It is applied while the tenant's records stream past, so backends need no model
  index and old records (stored before the field existed) are filtered like new ones.
* Retention: usage outlives the job records (jobs expire after ``job_store.retention_s``, 24 h by
  default; invoices need months). :meth:`UsageLedger.purge` with no argument removes records that
  finished more than ``retention_s`` (default 400 days) ago.
* Backend errors are raised as :class:`serve.jobstore.JobStoreError` (the API maps it to 503).
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from serve.jobstore.models import dt_to_us, to_utc
from serve.metering.models import UsageRecord, UsageSummary

#: Usage records are kept this long after the job finished (400 days: a year of invoices + slack).
DEFAULT_USAGE_RETENTION_S = 400 * 24 * 3600.0

class UsageLedger(ABC):
    """Per-job usage records. All methods are synchronous and thread-safe."""

    def __init__(self, *, retention_s: float = DEFAULT_USAGE_RETENTION_S, clock: Callable[[], float] = time.time):
        if retention_s <= 0:
            raise ValueError("retention_s must be positive")
        self.retention_s = float(retention_s)
        self._clock = clock

    # ------------------------------------------------------------------ backend primitives

    @abstractmethod
    def record(self, rec: UsageRecord) -> bool:
        """Store ``rec`` unless a record of ``rec.job_id`` exists. True if it was stored, False if
        the job was already recorded (nothing changes then). Atomic across threads and processes:
        of concurrent records of one job exactly one returns True."""

    @abstractmethod
    def get(self, job_id: str) -> UsageRecord | None:
        """The record of one job, or None."""

    @abstractmethod
    def _scan(self, tenant: str, start_us: int, end_us: int, limit: int | None) -> Iterable[UsageRecord]:
        """The tenant's records with ``start_us <= finished_at < end_us`` (epoch microseconds),
        oldest first (ties by job id), at most ``limit`` (None: all)."""

    @abstractmethod
    def _purge_before(self, cutoff_us: int) -> int:
        """Remove every record that finished before ``cutoff_us``; returns how many."""

    @abstractmethod
    def ping(self) -> bool:
        """True if the backing store answers."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. The ledger is not usable afterwards."""

    # ------------------------------------------------------------------ shared

    @staticmethod
    def _window(start: datetime, end: datetime) -> tuple[int, int]:
        start_us, end_us = dt_to_us(to_utc(start)), dt_to_us(to_utc(end))
        if start_us > end_us:
            raise ValueError("start must not be after end")
        return start_us, end_us

    @staticmethod
    def _of_model(records: Iterable[UsageRecord], model: str | None) -> Iterator[UsageRecord]:
        return iter(records) if model is None else (rec for rec in records if rec.model_key == model)

    def summary(self, tenant: str, *, start: datetime, end: datetime, model: str | None = None) -> UsageSummary:
        """The tenant's usage over ``[start, end)``: jobs by outcome, charged jobs, uncharged
        failures, and the charged records' video seconds and GPU/busy seconds per stage, in total
        and per model (``by_model``). With ``model``, only that model's records are added up."""
        start_us, end_us = self._window(start, end)
        return UsageSummary.of(tenant, start, end, self._of_model(self._scan(tenant, start_us, end_us, None), model))

    def records(self, tenant: str, *, start: datetime, end: datetime, limit: int = 100,
                model: str | None = None) -> list[UsageRecord]:
        """The tenant's records over ``[start, end)``, oldest first, at most ``limit``; with
        ``model``, that model's records only."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        start_us, end_us = self._window(start, end)
        if model is None:
            return list(self._scan(tenant, start_us, end_us, limit))
        return list(itertools.islice(self._of_model(self._scan(tenant, start_us, end_us, None), model), limit))

    def purge(self, before: datetime | float | None = None) -> int:
        """Remove records that finished before ``before`` (a datetime or epoch seconds; default:
        ``retention_s`` ago). Returns how many were removed."""
        if isinstance(before, datetime):
            return self._purge_before(dt_to_us(before))
        cutoff = self._clock() - self.retention_s if before is None else float(before)
        return self._purge_before(round(cutoff * 1_000_000))

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> "UsageLedger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
