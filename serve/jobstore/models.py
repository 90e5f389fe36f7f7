"""The job record: what the API returns, what the runner drives, what the job store persists.

Pure pydantic, no Ray and no storage code. Every timestamp is a timezone-aware UTC ``datetime``
except the lease expiry, which is a float epoch (it is compared against ``time.time()`` on every
renew and every recovery sweep).
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

JOB_ID_PREFIX = "vid_"


def new_job_id() -> str:
    """``"vid_"`` + 24 URL-safe random characters (144 bits)."""
    return JOB_ID_PREFIX + secrets.token_urlsafe(18)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def to_utc(value: datetime) -> datetime:
    """A timezone-aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def epoch_to_dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def dt_to_us(value: datetime) -> int:
    """Integer microseconds since the epoch: the exact sort key of ``created_at`` in both backends."""
    value = to_utc(value)
    delta = value - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


class JobStatus(str, Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobError(BaseModel):
    code: str
    message: str


class JobProgress(BaseModel):
    stage: str | None = None
    step: int = 0
    total_steps: int = 0


class JobOutput(BaseModel):
    key: str = Field(description="Storage key of the encoded clip.")
    content_type: str
    file_name: str
    file_size: int


class Job(BaseModel):
    """One video generation job.

    ``version`` is bumped by the store on every change (the events endpoint streams on it);
    ``expires_at`` is filled by the store on create (``created_at + retention_s``) and moved to
    ``finished_at + retention_s`` when the job reaches a terminal state.
    """

    model_config = ConfigDict(extra="ignore")

    id: str = Field(default_factory=new_job_id)
    tenant: str = Field(min_length=1)
    status: JobStatus = JobStatus.QUEUED
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    params: dict[str, Any] = Field(default_factory=dict, description="The resolved generation parameters.")
    input_key: str = Field(default="", description="Storage key of the conditioning image.")
    progress: JobProgress = Field(default_factory=JobProgress)
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds spent per stage.")
    error: JobError | None = None
    output: JobOutput | None = None
    attempts: int = Field(default=0, description="Claims that ran (a graceful release does not count).")
    lease_owner: str | None = None
    lease_expires_at: float | None = Field(default=None, description="Epoch seconds.")
    cancel_requested: bool = False
    idempotency_key: str | None = None
    trace_context: dict[str, str] = Field(default_factory=dict, description="W3C traceparent carrier.")
    weight: float = Field(default=1.0, gt=0, description="The tenant's fair-share weight at admission.")
    webhook_url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form: webhook attempts, usage, ...")
    version: int = 0
    expires_at: datetime | None = Field(default=None, description="Set by the store on create.")

    @field_validator("created_at", "updated_at", "started_at", "finished_at", "expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else to_utc(value)

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal
