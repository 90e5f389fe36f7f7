"""Request and response bodies of the HTTP API (what /docs shows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.params import GenerationParams


class CreateVideoRequest(GenerationParams):
    """JSON body of ``POST /v1/videos``: the image plus any generation parameter."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    image_url: str = Field(
        description="The conditioning image: an http(s) URL the service downloads, or a base64 data URL "
        "(data:image/png;base64,...). For a file upload use multipart/form-data instead."
    )
    webhook_url: str | None = Field(default=None, description="Called with the job when it ends (docs/webhooks.md).")
    webhook_events: list[str] = Field(
        default_factory=list, description='Extra webhook events: ["progress"]. Terminal events are always sent.'
    )

    def generation_params(self) -> GenerationParams:
        return GenerationParams.model_validate(self.model_dump(exclude={"image_url", "webhook_url", "webhook_events"}))


class Progress(BaseModel):
    stage: str | None = Field(description="The stage running now (image_encode, sampling, decode, ...: the "
                              "job's route); null when queued.")
    step: int = Field(description="Sampling steps done.")
    total_steps: int = Field(description="Sampling steps in all.")
    percent: float = Field(description="Rough overall completion, 0-100.")
    updated_at: datetime | None = Field(default=None, description="When the running stage reported this progress.")


class Output(BaseModel):
    url: str = Field(description="Where to download the clip: this API's /content endpoint.")
    content_type: str
    file_name: str
    file_size: int = Field(description="Bytes.")


class ErrorInfo(BaseModel):
    code: str
    message: str


class WebhookInfo(BaseModel):
    url: str
    events: list[str] = Field(description="Events asked for besides the terminal ones (e.g. video.progress).")
    deliveries: list[dict[str, Any]] = Field(
        description="Delivery attempts: event id and type, attempt number, time, HTTP status or error, next retry.")


class VideoJob(BaseModel):
    """A video generation job as clients see it."""

    id: str
    object: Literal["video.job"] = "video.job"
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    params: dict[str, Any] = Field(description="The generation parameters, seed resolved.")
    queue_position: int | None = Field(default=None, description="Jobs ahead of this one while queued.")
    progress: Progress
    timings: dict[str, float] = Field(description="Seconds per stage.")
    error: ErrorInfo | None = Field(default=None, description="Why the job failed (status failed).")
    output: Output | None = Field(default=None, description="The clip (status completed).")
    webhook_url: str | None = None
    webhook: WebhookInfo | None = Field(default=None, description="Webhook settings and delivery attempts.")


class VideoJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next (older) page.")
    has_more: bool
