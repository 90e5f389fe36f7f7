"""How a job record is shown to its owner: the API responses, SSE events and webhook bodies."""

from __future__ import annotations

from pipelines.registry import STAGES, progress_spans

from ..jobstore import Job, JobStatus
from .schemas import ErrorInfo, Output, Progress, VideoJob, WebhookInfo

#: The upload of the finished clip, after the last stage.
STORE_SPAN = (99.0, 100.0)


def progress_percent(job: Job) -> float:
    """Rough overall completion: each stage of the job's route gets a band in proportion to its
    share of the time; a stage that reports steps fills its band step by step."""
    progress = job.progress
    if job.status is JobStatus.COMPLETED:
        return 100.0
    known = set(STAGES.names())
    spans = progress_spans(STAGES.get(name) for name in job.route if name in known)
    spans["store"] = STORE_SPAN
    if progress.stage not in spans:
        return 0.0
    low, high = spans[progress.stage]
    stepped = progress.stage in known and STAGES.get(progress.stage).reports_steps and progress.total_steps
    fraction = progress.step / progress.total_steps if stepped else 0.0
    return low + (high - low) * min(1.0, fraction)


def job_view(job: Job, base_url: str, *, queue_position: int | None = None) -> VideoJob:
    progress = job.progress
    percent = progress_percent(job)
    output = None
    if job.output is not None:
        output = Output(url=f"{base_url.rstrip('/')}/v1/videos/{job.id}/content", content_type=job.output.content_type,
                        file_name=job.output.file_name, file_size=job.output.file_size)
    webhook = None
    if job.webhook is not None:
        webhook = WebhookInfo(url=job.webhook.url, events=sorted(job.webhook.events),
                              deliveries=[_delivery(d) for d in job.webhook.deliveries])
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
                          percent=round(percent, 1), updated_at=progress.updated_at),
        timings=job.timings,
        error=ErrorInfo(code=job.error.code, message=job.error.message) if job.error else None,
        output=output,
        webhook_url=job.webhook_url,
        webhook=webhook,
    )


def _delivery(attempt) -> dict:
    """An attempt as shown: its HTTP status or its error, whichever it has."""
    shown = attempt.model_dump()
    for key in ("status_code", "error"):
        if shown[key] is None:
            del shown[key]
    return shown
