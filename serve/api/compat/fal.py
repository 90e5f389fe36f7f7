"""fal's queue protocol (``queue.fal.run``) over the one job service, for ``fal-client`` and fal's
other clients pointed at this deployment (docs/compatibility.md, section "fal").

Routes, for each app id (``fal-ai/stable-video``, and the deployed model's Hugging Face repo id):

* ``POST /{app_id}`` (``?fal_webhook=URL``): admit a job -> ``{request_id, response_url,
  status_url, cancel_url}`` (absolute URLs, honouring ``X-Forwarded-Proto`` / ``X-Forwarded-Host``
  / ``Host``, so a TLS terminator in front gets ``https://`` URLs back);
* ``GET /{app_id}/requests/{id}/status`` (``?logs=1``): ``IN_QUEUE`` with ``queue_position``,
  ``IN_PROGRESS`` with ``logs``, ``COMPLETED`` with ``logs`` and ``metrics``. Failed and cancelled
  jobs are ``COMPLETED`` too, with ``error`` and ``error_type`` (that is how fal reports them);
* ``GET /{app_id}/requests/{id}/status/stream``: the same bodies as server-sent events until the
  job ends;
* ``GET /{app_id}/requests/{id}``: ``{"video": {url, content_type, file_name, file_size}, "seed"}``
  (``url`` needs no API key where the storage signs URLs, as fal's CDN URLs need none); a failed
  job answers its error (422 for the client's input, 500 for the service's), a cancelled or
  unfinished one 400;
* ``PUT /{app_id}/requests/{id}/cancel``: 202 ``CANCELLATION_REQUESTED`` or 400
  ``ALREADY_COMPLETED`` (never 409: fal's client retries 409 as a transient conflict).

The app ids are literal paths (no ``/{owner}/{name}`` pattern), so they cannot shadow the native
``/v1/...`` routes. Every route authenticates (``Authorization: Key <api key>`` as fal's clients
send it, or ``Bearer``) and admits through :meth:`VideoService.admit`, so limits, tenant isolation
(another tenant's request id is a 404 here), metering, webhooks and storage are the native API's.
Rejections carry ``detail`` (and the code in ``X-Fal-Error-Type``); input validation answers
422 with FastAPI's ``{"detail": [{"loc", "msg", "type"}]}`` list, naming each unknown field.

Input (fal's documented schema of ``fal-ai/stable-video``): ``image_url`` (required: http(s) or a
data URL), ``seed``, ``motion_bucket_id`` (1-255, 127), ``cond_aug`` (0-10, 0.02: our
``noise_aug_strength``) and ``fps`` (10-100, 25): fal documents it as the frame rate of the
generated video, so it is our ``output_fps`` (playback rate of the encoded clip); the frame-rate
conditioning the U-Net sees stays at our default. Beyond fal's schema this service also takes its
own ``num_frames``, ``num_inference_steps``, ``width``, ``height``, ``aspect_ratio``,
``min_guidance_scale``, ``max_guidance_scale`` and ``decode_chunk_size`` (ranges as in
``POST /v1/videos``); the clip is always MP4, as fal's model returns it.
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' ``TenantDep`` annotations
# at runtime, and it is local to ``router``.
import asyncio
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from pipelines.params import ASPECT_PRESETS, DEFAULT_ASPECT, MAX_SEED, GenerationParams, OutputFormat
from pipelines.registry import STAGES

from ...jobstore import Job, JobStatus
from ...metering.models import CLIENT_ERROR_CODES
from ...tenants import Tenant
from ..errors import APIError, NotFoundError, Rejection, adapter_route
from ..base_url import public_base_url
from ..follow import KEEPALIVE, follow_job

if TYPE_CHECKING:
    from ...tenants import TenantRegistry
    from ..service import VideoService

#: fal's id of its hosted Stable Video Diffusion app; this deployment answers to it.
FAL_APP_ID = "fal-ai/stable-video"

#: fal's input fields whose name differs from ours (the others are ours as they are).
RENAMED = {"cond_aug": "noise_aug_strength", "fps": "output_fps"}
#: Our own generation parameters accepted beyond fal's schema (same ranges as POST /v1/videos).
EXTENSION_FIELDS = ("num_frames", "num_inference_steps", "width", "height", "aspect_ratio",
                    "min_guidance_scale", "max_guidance_scale", "decode_chunk_size")

STREAM_RECHECK_S = 2.0  # re-read without a notice (the queue position moves when other jobs start)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class _FalInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(description="The conditioning image: an http(s) URL or a base64 data URL.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random seed; drawn when absent.")
    motion_bucket_id: int = Field(default=127, ge=1, le=255, description="Amount of motion; higher moves more.")
    cond_aug: float = Field(default=0.02, ge=0.0, le=10.0,
                            description="Noise added to the conditioning image (our noise_aug_strength).")
    fps: int = Field(default=25, ge=10, le=100,
                     description="Frame rate of the generated video (our output_fps: playback rate of the clip).")


#: The request body of ``POST /{app_id}``: fal's schema plus our extension fields.
FalStableVideoInput = create_model(
    "FalStableVideoInput", __base__=_FalInput,
    **{name: (GenerationParams.model_fields[name].annotation, GenerationParams.model_fields[name])
       for name in EXTENSION_FIELDS},
)


class FalInputError(Exception):
    """The body does not fit the input schema: rendered as FastAPI's 422 ``detail`` list."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail))
        self.detail = detail


def _detail_of(error: ValidationError, rename: dict[str, str] | None = None) -> list[dict[str, Any]]:
    rename = rename or {}
    return [{"loc": ["body", *(rename.get(str(p), p) for p in item.get("loc", ()))],
             "msg": str(item.get("msg", "")).removeprefix("Value error, "), "type": item.get("type", "value_error")}
            for item in error.errors(include_url=False)]


def parse_input(body: Any) -> tuple[str, GenerationParams]:
    """fal's input body -> (image_url, our GenerationParams); FalInputError naming every problem."""
    if not isinstance(body, dict):
        raise FalInputError([{"loc": ["body"], "msg": "the body must be a JSON object", "type": "model_type"}])
    try:
        given = FalStableVideoInput.model_validate(body)
    except ValidationError as error:
        raise FalInputError(_detail_of(error)) from None
    values = given.model_dump(exclude={"image_url"}, exclude_unset=True)
    # fal's default frame rate (25), where our output_fps would default to the conditioning value.
    values.setdefault("fps", _FalInput.model_fields["fps"].default)
    params = {RENAMED.get(name, name): value for name, value in values.items()}
    params["output_format"] = OutputFormat.mp4
    try:
        return given.image_url, GenerationParams.model_validate(params)
    except ValidationError as error:
        raise FalInputError(_detail_of(error, {ours: theirs for theirs, ours in RENAMED.items()})) from None


# -- rendering ------------------------------------------------------------------------------------


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
        logs.append(_log(f"Started: {params.get('num_frames')} frames at {width}x{height}, "
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


# -- routes ---------------------------------------------------------------------------------------


def app_ids(model_source: str) -> list[str]:
    """fal's app id and the deployed model's Hugging Face repo id (``org/name``; not a local path,
    and never one that would shadow the native ``v1/`` routes)."""
    ids = [FAL_APP_ID]
    if (_REPO_ID.fullmatch(model_source) and model_source not in ids and model_source.split("/")[0] != "v1"
            and not Path(model_source).expanduser().exists()):
        ids.append(model_source)
    return ids


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def router(service: "VideoService", tenants: "TenantRegistry", *,
           on_ended: Callable[[str], Awaitable[None]] | None = None) -> APIRouter:
    api = APIRouter(route_class=adapter_route(render), tags=["fal"])

    def tenant_of(authorization: Annotated[str | None, Header()] = None) -> Tenant:
        return tenants.authenticate(authorization)

    TenantDep = Annotated[Tenant, Depends(tenant_of)]

    async def job_of(tenant: Tenant, request_id: str) -> Job:
        try:
            return await asyncio.to_thread(service.get, tenant, request_id)
        except NotFoundError:
            raise APIError(404, "not_found", f"request {request_id} not found") from None

    async def position_of(job: Job) -> int | None:
        if job.status is not JobStatus.QUEUED:
            return None
        return await asyncio.to_thread(service.store.queue_position, job.id)

    for app_id in app_ids(service.config.model.source):
        add_routes(api, app_id, service, TenantDep, job_of, position_of, on_ended)
    return api


def add_routes(api: APIRouter, app_id: str, service: "VideoService", TenantDep, job_of, position_of,
               on_ended) -> None:
    prefix = f"/{app_id}"
    request_path = prefix + "/requests/{request_id}"

    @api.post(prefix, summary=f"fal queue: submit to {app_id}", openapi_extra={"requestBody": {
        "content": {"application/json": {"schema": FalStableVideoInput.model_json_schema()}}, "required": True}})
    async def submit(request: Request, tenant: TenantDep,
                     idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None):
        raw = await request.body()
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError as error:
            return JSONResponse({"detail": [{"loc": ["body", error.pos], "msg": f"JSON decode error: {error.msg}",
                                             "type": "json_invalid"}]}, status_code=422,
                                headers={"X-Fal-Error-Type": "invalid_parameter"})
        try:
            image_url, params = parse_input(body)
        except FalInputError as error:
            return JSONResponse({"detail": error.detail}, status_code=422,
                                headers={"X-Fal-Error-Type": "invalid_parameter"})
        webhook_url = request.query_params.get("fal_webhook") or None
        image = await asyncio.to_thread(service.image_from_url, image_url)
        admission = await service.admit(tenant, image=image, params=params, webhook_url=webhook_url,
                                        idempotency_key=idempotency_key, webhook_format="fal")
        job = admission.job
        urls = request_urls(public_base_url(request, service.config.public_url), app_id, job.id)
        return JSONResponse(status_body(job, urls, with_logs=False, queue_position=await position_of(job)))

    @api.get(request_path + "/status", summary=f"fal queue: status of a {app_id} request")
    async def status(request: Request, request_id: str, tenant: TenantDep):
        job = await job_of(tenant, request_id)
        urls = request_urls(public_base_url(request, service.config.public_url), app_id, job.id)
        return JSONResponse(status_body(job, urls, with_logs=_flag(request.query_params.get("logs")),
                                        queue_position=await position_of(job)))

    @api.get(request_path + "/status/stream", summary=f"fal queue: status of a {app_id} request as server-sent "
             "events until it completes", responses={200: {"content": {"text/event-stream": {}}}})
    async def status_stream(request: Request, request_id: str, tenant: TenantDep):
        first = await job_of(tenant, request_id)  # 404 before the stream starts
        urls = request_urls(public_base_url(request, service.config.public_url), app_id, first.id)
        with_logs = _flag(request.query_params.get("logs"))

        async def stream():
            last = None
            async for job in follow_job(service.store, first, tenant=tenant.name, request=request,
                                        recheck_s=STREAM_RECHECK_S):
                if job is KEEPALIVE:
                    yield ": keep-alive\n\n"
                    continue
                data = json.dumps(status_body(job, urls, with_logs=with_logs,
                                              queue_position=await position_of(job)), separators=(",", ":"))
                if data != last:
                    last = data
                    yield f"data: {data}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get(request_path, summary=f"fal queue: result of a {app_id} request")
    async def result(request: Request, request_id: str, tenant: TenantDep):
        job = await job_of(tenant, request_id)
        if job.status is JobStatus.COMPLETED and job.output is not None:
            base_url = public_base_url(request, service.config.public_url)
            return JSONResponse(result_body(job, base_url, await download_url(service, job, base_url)))
        if not job.status.is_terminal:
            raise APIError(400, "request_in_progress", "Request is still in progress")
        message, code = _error_of(job)
        status_code = 400 if job.status is JobStatus.CANCELLED else 422 if code in CLIENT_ERROR_CODES else 500
        return JSONResponse({"detail": message, "error_type": code}, status_code=status_code,
                            headers={"X-Fal-Error-Type": code})

    @api.put(request_path + "/cancel", summary=f"fal queue: cancel a {app_id} request")
    async def cancel(request_id: str, tenant: TenantDep):
        try:
            job, ended_now = await asyncio.to_thread(service.cancel, tenant, request_id)
        except NotFoundError:
            return JSONResponse({"status": "NOT_FOUND", "detail": f"request {request_id} not found"},
                                status_code=404, headers={"X-Fal-Error-Type": "not_found"})
        except APIError as error:
            if error.code != "already_finished":
                raise
            return JSONResponse({"status": "ALREADY_COMPLETED", "detail": str(error)}, status_code=400,
                                headers={"X-Fal-Error-Type": "already_completed"})
        if ended_now and on_ended is not None:
            await on_ended(job.id)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
