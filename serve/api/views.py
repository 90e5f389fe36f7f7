"""How a job record is shown to its owner: the API responses, SSE events and webhook bodies."""

from __future__ import annotations

from ..jobstore import Job, JobStatus
from ..webhooks import METADATA_KEY as WEBHOOK_DELIVERIES
from .schemas import ErrorInfo, Output, Progress, VideoJob, WebhookInfo

#: Rough share of a job's time per stage, for the progress percentage.
STAGE_SPAN = {"image_encode": (0, 3), "sampling": (3, 88), "decode": (88, 96), "video_encode": (96, 99),
              "store": (99, 100)}


def job_view(job: Job, base_url: str, *, queue_position: int | None = None) -> VideoJob:
    progress = job.progress
    if job.status is JobStatus.COMPLETED:
        percent = 100.0
    elif progress.stage in STAGE_SPAN:
        low, high = STAGE_SPAN[progress.stage]
        sampling = progress.stage == "sampling" and progress.total_steps
        percent = low + (high - low) * (progress.step / progress.total_steps if sampling else 0)
    else:
        percent = 0.0
    output = None
    if job.output is not None:
        output = Output(url=f"{base_url.rstrip('/')}/v1/videos/{job.id}/content", content_type=job.output.content_type,
                        file_name=job.output.file_name, file_size=job.output.file_size)
    webhook = None
    if job.webhook_url:
        webhook = WebhookInfo(url=job.webhook_url, events=sorted(job.metadata.get("webhook_events") or []),
                              deliveries=list(job.metadata.get(WEBHOOK_DELIVERIES) or []))
    return VideoJob(
        id=job.id,
        status=job.status.value,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        expires_at=job.expires_at,
        params=job.params,
        queue_position=queue_position if job.status is JobStatus.QUEUED else None,
        progress=Progress(stage=progress.stage, step=progress.step, total_steps=progress.total_steps,
                          percent=round(percent, 1)),
        timings=job.timings,
        error=ErrorInfo(code=job.error.code, message=job.error.message) if job.error else None,
        output=output,
        webhook_url=job.webhook_url,
        webhook=webhook,
    )
