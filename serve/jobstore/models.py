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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    updated_at: datetime | None = Field(default=None, description="When the stage reported this progress.")


#: Suffix of the thumbnail (the clip's first frame, JPEG) stored beside the clip.
THUMBNAIL_SUFFIX = ".thumbnail.jpg"
THUMBNAIL_CONTENT_TYPE = "image/jpeg"


def segment_file(index: int, attempt: int) -> str:
    """File name of segment ``index`` of a long clip as attempt ``attempt`` stores it, beside the
    job's files: one per attempt, so a replica still finishing a lost attempt never overwrites
    what the current attempt resumes from."""
    return f"segment-{index}-a{attempt}.npy"


def thumbnail_key_for(output_key: str) -> str:
    """Where the final stage stores the clip's first frame: beside the clip, same name, its
    extension replaced (``acme/vid_x/vid_x.mp4`` -> ``acme/vid_x/vid_x.thumbnail.jpg``)."""
    folder, _, name = output_key.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{folder}/{stem}{THUMBNAIL_SUFFIX}" if folder else f"{stem}{THUMBNAIL_SUFFIX}"


class JobOutput(BaseModel):
    """The stored clip, as the final stage wrote it."""

    key: str = Field(description="Storage key of the encoded clip.")
    content_type: str
    file_name: str
    file_size: int
    num_frames: int = Field(default=0, ge=0, description="Frames in the clip.")
    fps: float = Field(default=0.0, ge=0, description="Playback frame rate.")
    width: int = Field(default=0, ge=0)
    height: int = Field(default=0, ge=0)
    duration_s: float = Field(default=0.0, ge=0, description="Playback length, num_frames / fps (metered).")
    model_version: str | None = Field(
        default=None, description="The model version that made the clip: its id and the digest of its weights "
        "(``id@digest``, the key the model stages were called with). Null on clips stored before versions were "
        "recorded.")
    gone_at: datetime | None = Field(
        default=None, description="When the clip was found missing from storage (deleted or expired there): "
        "its content answers 410 output_gone.")

    @property
    def thumbnail_key(self) -> str:
        """Storage key of the clip's first frame (JPEG), stored beside the clip by the final stage.
        Derived from ``key``, so every writer of a JobOutput agrees on it; a clip stored before
        thumbnails existed (or whose frame could not be extracted) has none there."""
        return thumbnail_key_for(self.key)


class WebhookAttempt(BaseModel):
    """One delivery attempt of one webhook event, as shown on the job."""

    model_config = ConfigDict(extra="ignore")

    event_id: str
    type: str
    attempt: int
    at: str = Field(description="When the attempt started (ISO 8601, UTC).")
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None
    next_retry_in_s: float | None = None


class WebhookSubscription(BaseModel):
    """Where the job's events go, which extra events it asked for, and what was delivered."""

    url: str
    events: list[str] = Field(default_factory=list, description="Extra events (video.progress); terminal ones always.")
    format: str = Field(default="native", description="Body shape: native, or the adapter the job came through "
                        "(its module under serve.api.compat renders it).")
    deliveries: list[WebhookAttempt] = Field(default_factory=list, description="The newest attempts.")


class AdmissionPolicy(BaseModel):
    """The tenant's policy as it stood when the job was admitted: later policy changes apply to new
    jobs only, so a job is scheduled and kept by the terms it was accepted under."""

    weight: float = Field(default=1.0, gt=0, description="Fair-share weight.")
    max_running_jobs: int | None = Field(default=None, ge=1, description="The tenant's cap on running jobs.")
    retention_s: float | None = Field(default=None, gt=0, description="The tenant's own retention.")


class SegmentRecord(BaseModel):
    """One finished segment of a long clip, kept with the job so that a retry resumes after it."""

    model_config = ConfigDict(extra="ignore")

    index: int = Field(ge=0, description="0 for the first segment.")
    key: str = Field(description="Storage key of its decoded frames (uint8 .npy), deleted when the job ends.")
    num_frames: int = Field(ge=1)
    seconds: dict[str, float] = Field(default_factory=dict, description="Seconds per stage spent on the clip up to "
                                      "and including this segment (a resume carries them on).")


_LEGACY_KEYS = frozenset({"metadata", "weight", "webhook_url"})


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
    model: str = Field(default="", description="The model that serves the job (its source, as configured).")
    prompt: str | None = Field(default=None, description="The client's text prompt (text-to-video's, or stored "
                               "with an image-to-video job).")
    input_key: str = Field(default="", description="Storage key of the conditioning image (empty: text-to-video).")
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
    route: list[str] = Field(default_factory=list, description="The stages the job passes through, in order.")
    output_key: str = Field(default="", description="Storage key the clip is written to.")
    fingerprint: str | None = Field(default=None, description="Hash of the request (Idempotency-Key replays).")
    policy: AdmissionPolicy = Field(default_factory=AdmissionPolicy, description="The tenant's terms at admission.")
    webhook: WebhookSubscription | None = None
    segments: list[SegmentRecord] = Field(default_factory=list,
                                          description="Finished segments of a long clip (a retry resumes after them).")
    version: int = 0
    expires_at: datetime | None = Field(default=None, description="Set by the store on create.")

    @model_validator(mode="before")
    @classmethod
    def _from_metadata_record(cls, data: Any) -> Any:
        """Records written before the typed fields kept them in a ``metadata`` dict: read those
        (a job queued across an upgrade keeps its output key, policy and webhook)."""
        if not isinstance(data, dict) or not _LEGACY_KEYS & data.keys():
            return data
        data = dict(data)
        meta = data.pop("metadata", None) or {}
        data.setdefault("output_key", meta.get("output_key", ""))
        data.setdefault("fingerprint", meta.get("fingerprint"))
        data.setdefault("policy", {"weight": data.pop("weight", 1.0), "max_running_jobs": meta.get("max_running"),
                                   "retention_s": meta.get("retention_s")})
        url = data.pop("webhook_url", None)
        if url and "webhook" not in data:
            data["webhook"] = {"url": url, "events": meta.get("webhook_events") or [],
                               "deliveries": meta.get("webhook_deliveries") or []}
        return data

    @field_validator("created_at", "updated_at", "started_at", "finished_at", "expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else to_utc(value)

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def webhook_url(self) -> str | None:
        return self.webhook.url if self.webhook is not None else None
