"""What fal's clients read: the status, result, log and metrics bodies of a request, its webhook
body, and rejections in fal's error shape."""

import asyncio
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response

from pipelines.params import ASPECT_PRESETS, DEFAULT_ASPECT
from pipelines.registry import STAGES

from ....jobstore import Job, JobStatus
from ...errors import Rejection

if TYPE_CHECKING:
    from ...service import VideoService


def render(rejection: Rejection) -> Response:
    """A rejection in fal's shape: ``{"detail": message}``, the code in ``X-Fal-Error-Type``."""
    headers = {**rejection.headers, "X-Fal-Error-Type": rejection.code}
    return JSONResponse({"detail": rejection.message}, status_code=rejection.status, headers=headers)


def request_urls(base_url: str, app_id: str, request_id: str) -> dict[str, str]:
    response_url = f"{base_url}/{app_id}/requests/{request_id}"
    return {"request_id": request_id, "response_url": response_url, "status_url": f"{response_url}/status",
            "cancel_url": f"{response_url}/cancel"}


def _iso(moment) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else ""


def _log(message: str, moment, level: str = "INFO") -> dict[str, Any]:
    return {"message": message, "level": level, "source": "user", "timestamp": _iso(moment)}


def job_logs(job: Job) -> list[dict[str, Any]]:
    """The job's progress as fal log lines: the start, each finished stage with its time, the
    running stage (and its sampling step), then how it ended. Finished stages are stamped from the
    start plus the time of the stages so far (the record keeps durations, not their ends)."""
    if job.started_at is None and not job.status.is_terminal:
        return []
    params = job.params
    logs = []
    if job.started_at is not None:
        width, height = params.get("width"), params.get("height")
        if not (width and height):
            width, height = ASPECT_PRESETS.get(params.get("aspect_ratio") or DEFAULT_ASPECT, ("?", "?"))
        kind = "text-to-video: " if params.get("prompt") else ""
        logs.append(_log(f"Started: {kind}{params.get('num_frames')} frames at {width}x{height}, "
                         f"{params.get('num_inference_steps')} steps, seed {params.get('seed')}", job.started_at))
        elapsed = 0.0
        for stage in [*job.route, "store"]:
            if stage in job.timings:
                elapsed += job.timings[stage]
                logs.append(_log(f"{stage}: done in {job.timings[stage]:.2f} s",
                                 job.started_at + timedelta(seconds=elapsed)))
    progress = job.progress
    if job.status is JobStatus.IN_PROGRESS and progress.stage and progress.stage not in job.timings:
        moment = progress.updated_at or job.started_at
        logs.append(_log(f"{progress.stage}: running", moment))
        known = progress.stage in STAGES.names()
        if known and STAGES.get(progress.stage).reports_steps and progress.total_steps:
            logs.append(_log(f"{progress.stage}: step {progress.step}/{progress.total_steps}", moment))
    if job.status is JobStatus.COMPLETED and job.output is not None:
        logs.append(_log(f"Completed: {job.output.file_name} ({job.output.num_frames or params.get('num_frames')} "
                         f"frames, {job.output.file_size} bytes)", job.finished_at))
    elif job.status is JobStatus.FAILED:
        logs.append(_log(f"Failed: {job.error.message if job.error else 'unknown error'}", job.finished_at, "ERROR"))
    elif job.status is JobStatus.CANCELLED:
        logs.append(_log("Cancelled", job.finished_at, "WARNING"))
    return logs


def job_metrics(job: Job) -> dict[str, Any]:
    if not job.status.is_terminal or job.started_at is None:
        return {}
    stages = [job.timings[name] for name in job.route if name in job.timings]
    if stages:
        return {"inference_time": round(sum(stages), 3)}
    if job.finished_at is not None:
        return {"inference_time": round((job.finished_at - job.started_at).total_seconds(), 3)}
    return {}


def _error_of(job: Job) -> tuple[str, str]:
    if job.status is JobStatus.CANCELLED:
        return "Request was cancelled", "request_cancelled"
    if job.error is not None:
        return job.error.message, job.error.code
    return "generation failed", "internal_error"


def status_body(job: Job, urls: dict[str, str], *, with_logs: bool, queue_position: int | None) -> dict[str, Any]:
    """``GET .../status``: fal's ``IN_QUEUE`` / ``IN_PROGRESS`` / ``COMPLETED`` (failed and
    cancelled jobs included, with ``error`` and ``error_type``)."""
    logs = job_logs(job) if with_logs else None
    if job.status is JobStatus.QUEUED:
        return {"status": "IN_QUEUE", "queue_position": queue_position or 0, **urls, "logs": logs}
    if job.status is JobStatus.IN_PROGRESS:
        return {"status": "IN_PROGRESS", **urls, "logs": logs}
    body = {"status": "COMPLETED", **urls, "logs": logs, "metrics": job_metrics(job)}
    if job.status is not JobStatus.COMPLETED:
        body["error"], body["error_type"] = _error_of(job)
    return body


def result_body(job: Job, base_url: str, video_url: str | None = None) -> dict[str, Any]:
    """fal-ai/stable-video's output: the clip (``video_url``, else our keyed download route) and
    the seed used."""
    output = job.output
    return {
        "video": {"url": video_url or f"{base_url.rstrip('/')}/v1/videos/{job.id}/content",
                  "content_type": output.content_type, "file_name": output.file_name,
                  "file_size": output.file_size},
        "seed": job.params.get("seed"),
    }


async def download_url(service: "VideoService", job: Job, base_url: str) -> str | None:
    """A URL of the clip that needs no API key, as fal's CDN URLs need none: the storage's signed
    URL (S3: presigned; local: this service's signed ``/files`` route) where the storage signs
    URLs, else its presigned URL; None (our keyed ``/v1/videos/{id}/content``) when it has neither."""
    output = job.output
    signed_url = getattr(service.storage, "signed_url", None)
    if signed_url is not None:
        return await asyncio.to_thread(signed_url, output.key, base_url=base_url,
                                       expires_s=int(service.config.storage.presign_expiry_s),
                                       filename=output.file_name, content_type=output.content_type)
    return await asyncio.to_thread(service.storage.presigned_url, output.key, filename=output.file_name)


def webhook_body(job: Job, event_type: str, event_id: str, base_url: str) -> bytes:
    """fal's webhook body (signed and retried like ours): ``{request_id, gateway_request_id,
    status: OK, payload}`` for a completed job, ``status: ERROR`` with ``error`` and ``payload:
    {detail}`` for a failed or cancelled one."""
    body: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id}
    if job.status is JobStatus.COMPLETED and job.output is not None:
        body.update(status="OK", payload=result_body(job, base_url), error=None)
    elif job.status.is_terminal:
        message, code = _error_of(job)
        body.update(status="ERROR", error=message, payload={"detail": message, "error_type": code})
    else:  # progress events (a fal job never subscribes to them)
        body.update(status="IN_PROGRESS", payload=None, error=None)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")
