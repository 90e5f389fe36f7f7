"""What the API answers, as typed objects.

Every model accepts fields it does not know (``extra="allow"``: they stay readable as attributes
and in ``model_dump()``), and every field a server might leave out has a default, so a newer
server never breaks an older client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

VideoStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class APIObject(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class VideoError(APIObject):
    """Why a job failed (``status == "failed"``)."""

    code: str = "unknown"
    message: str = ""


class ProgressDetail(APIObject):
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    percent: float = 0.0
    updated_at: datetime | None = None


class Timestamps(APIObject):
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None


class Output(APIObject):
    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


class Video(APIObject):
    """A video job: OpenAI's video object plus svd-serve's own fields."""

    id: str
    object: str = "video"
    status: VideoStatus | str
    created_at: int | None = None
    completed_at: int | None = None
    expires_at: int | None = None
    progress: int = 0
    model: str | None = None
    prompt: str | None = None
    seconds: str | None = None
    size: str | None = None
    error: VideoError | None = None
    started_at: int | None = None
    finished_at: int | None = None
    timestamps: Timestamps | None = None
    params: dict[str, Any] = {}
    queue_position: int | None = None
    progress_detail: ProgressDetail | None = None
    timings: dict[str, float] = {}
    output: Output | None = None
    webhook_url: str | None = None
    webhook: dict[str, Any] | None = None

    @property
    def is_terminal(self) -> bool:
        """Completed, failed or cancelled: the job will not change any more."""
        return self.status in TERMINAL_STATUSES

    @property
    def percent(self) -> float:
        """Overall completion, 0-100 (the finer ``progress_detail.percent`` when the server sends it)."""
        return self.progress_detail.percent if self.progress_detail is not None else float(self.progress)


class VideoList(APIObject):
    """One page of ``GET /v1/videos``; pass ``last_id`` as ``after`` for the next one."""

    object: str = "list"
    data: list[Video] = []
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VideoDeleted(APIObject):
    id: str
    object: str = "video.deleted"
    deleted: bool = True


class VideoEvent(APIObject):
    """One server-sent event of ``GET /v1/videos/{id}/events``: ``status`` when the status changed,
    ``progress`` otherwise; ``data`` is the whole video object at that moment."""

    event: str
    data: Video
    id: str | None = None
