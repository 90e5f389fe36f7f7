"""How a job record is shown to its owner: the API responses, SSE events and webhook bodies.

One object for the native API and OpenAI's Videos API (docs/compatibility.md): OpenAI's fields
with OpenAI's types, this service's richer fields beside them under names that do not clash.
"""

from __future__ import annotations

import math
from datetime import datetime

from pipelines.params import ASPECT_PRESETS, DEFAULT_ASPECT
from pipelines.registry import STAGES, progress_spans
from pipelines.params import GenerationParams
from pipelines.segments import output_frame_count, plan_for

from ..jobstore import Job, JobStatus
from .schemas import ErrorInfo, Output, Progress, Timestamps, VideoJob, WebhookInfo, format_seconds

#: The upload of the finished clip, after the last stage.
STORE_SPAN = (99.0, 100.0)

#: ``error`` of a cancelled job: OpenAI's statuses have no cancelled, so a client that treats an
#: unknown terminal status as a failure still finds a reason.
CANCELLED_ERROR = ErrorInfo(code="cancelled", message="the job was cancelled")


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


def unix(value: datetime | None) -> int | None:
    """Whole Unix seconds (floored: never later than the instant itself)."""
    return None if value is None else math.floor(value.timestamp())


def clip_size(params: dict) -> tuple[int, int]:
    """(width, height) of the clip the resolved parameters describe."""
    if params.get("width") and params.get("height"):
        return int(params["width"]), int(params["height"])
    return ASPECT_PRESETS.get(params.get("aspect_ratio") or DEFAULT_ASPECT, ASPECT_PRESETS[DEFAULT_ASPECT])


def clip_seconds(params: dict) -> float:
    """Playback length. Frames played as generated: num_frames / output fps (``fps`` when no
    ``output_fps``). Retimed (``duration_s``, or interpolation blend/mci): the output frame count
    of :func:`pipelines.segments.output_frame_count` / output fps."""
    fps = params.get("output_fps") or params.get("fps") or 0
    if not fps:
        return 0.0
    duration = params.get("duration_s")
    if duration or (params.get("interpolation") or "none") != "none":
        conditioning_fps = params.get("fps") or fps
        span = duration or max(1, (params.get("num_frames") or 2) - 1) / conditioning_fps
        return output_frame_count(generated_frames=2, duration_s=span, output_fps=fps) / fps
    return (params.get("num_frames") or 0) / fps


def segment_progress(job: Job) -> tuple[int | None, int | None]:
    """(segments finished, segments in all) of a long clip (``duration_s``); (None, None) otherwise."""
    if not job.params.get("duration_s"):  # every view of every job comes here: skip the validation
        return None, None
    try:
        plan = plan_for(GenerationParams.model_validate(job.params), max_segments=1 << 16)
    except ValueError:  # a record this version cannot read as parameters: no segment figures
        return None, None
    if plan is None:
        return None, None
    total = plan.num_segments
    return (total if job.status is JobStatus.COMPLETED else len(job.segments)), total


def job_view(job: Job, base_url: str, *, queue_position: int | None = None) -> VideoJob:
    progress = job.progress
    percent = progress_percent(job)
    content = f"{base_url.rstrip('/')}/v1/videos/{job.id}/content"
    output = None
    if job.output is not None:
        output = Output(url=content, content_type=job.output.content_type, file_name=job.output.file_name,
                        file_size=job.output.file_size, thumbnail_url=f"{content}?variant=thumbnail")
    webhook = None
    if job.webhook is not None:
        webhook = WebhookInfo(url=job.webhook.url, events=sorted(job.webhook.events),
                              deliveries=[_delivery(d) for d in job.webhook.deliveries])
    error = ErrorInfo(code=job.error.code, message=job.error.message) if job.error else None
    if error is None and job.status is JobStatus.CANCELLED:
        error = CANCELLED_ERROR
    width, height = clip_size(job.params)
    segments_done, segments = segment_progress(job)
    ended = job.finished_at if job.status.is_terminal else None
    completed = ended if job.status is JobStatus.COMPLETED else None
    return VideoJob(
        id=job.id,
        status=job.status.value,
        model=job.model,
        model_version=job.output.model_version if job.output is not None else None,
        prompt=job.prompt,
        progress=100 if job.status is JobStatus.COMPLETED else min(99, math.floor(percent)),
        seconds=format_seconds(clip_seconds(job.params)),
        size=f"{width}x{height}",
        created_at=unix(job.created_at),
        started_at=unix(job.started_at),
        completed_at=unix(completed),
        finished_at=unix(ended),
        expires_at=unix(job.expires_at),
        error=error,
        timestamps=Timestamps(created_at=job.created_at, started_at=job.started_at, finished_at=ended,
                              expires_at=job.expires_at),
        params=job.params,
        queue_position=queue_position if job.status is JobStatus.QUEUED else None,
        progress_detail=Progress(stage=progress.stage, step=progress.step, total_steps=progress.total_steps,
                                 percent=round(percent, 1), updated_at=progress.updated_at,
                                 segments_done=segments_done, segments=segments),
        timings=job.timings,
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
