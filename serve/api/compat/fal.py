"""fal's queue protocol (``queue.fal.run``) over the one job service, for ``fal-client`` and fal's
other clients pointed at this deployment (docs/compatibility.md, section "fal").

Routes, for each app id: image-to-video at ``fal-ai/stable-video`` and the deployed model's Hugging
Face repo id; text-to-video at ``fal-ai/fast-svd/text-to-video`` and ``fal-ai/fast-svd-lcm/text-to-video``
(fal's hosted text-to-video SVD apps: the first frame is made from the prompt by the text-to-image
stage, then animated):

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

fal's queue names a request by its app, ``owner/alias``, without the endpoint path: the URLs a
text-to-video submit answers are under ``/fal-ai/fast-svd/requests/{id}``, where
``fal_client.status`` / ``result`` / ``cancel`` also look when given the app id (they drop the
path); the request routes also answer under the full app id.

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
``min_guidance_scale``, ``max_guidance_scale``, ``decode_chunk_size``, ``duration_s``,
``overlap_frames`` and ``interpolation`` (ranges as in ``POST /v1/videos``); the clip is always MP4,
as fal's model returns it.

Text-to-video input (fal's schema of ``fal-ai/fast-svd/text-to-video``): ``prompt`` (required),
``negative_prompt`` (fal's default list when absent), ``seed``, ``motion_bucket_id`` (127),
``cond_aug`` (0.02), ``steps`` (20: our ``num_inference_steps``), ``fps`` (10: our ``output_fps``),
``video_size`` (a name, :data:`VIDEO_SIZES`, or ``{width, height}``; ``landscape_16_9``) and
``deep_cache``: DeepCache is not implemented here, so only ``"none"`` (or no value) is accepted and
any other level is a 422, never silently ignored. Beyond it: :data:`T2V_EXTENSION_FIELDS`. A
deployment without a text-to-image model answers 422 ``text_to_video_unavailable``.
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' ``TenantDep`` annotations
# at runtime, and it is local to ``router``.
import asyncio
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic_core import PydanticCustomError

from pipelines.params import (ASPECT_PRESETS, DEFAULT_ASPECT, MAX_PROMPT_CHARS, MAX_SEED, GenerationParams,
                              OutputFormat)
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

#: fal's ids of its hosted text-to-video SVD apps (the LCM one an alias here: this deployment runs
#: its own model, with fast-svd's input schema and defaults); this deployment answers to both.
FAL_T2V_APP_IDS = ("fal-ai/fast-svd/text-to-video", "fal-ai/fast-svd-lcm/text-to-video")
FAL_T2V_APP_ID = FAL_T2V_APP_IDS[0]

#: fal's input fields whose name differs from ours (the others are ours as they are).
RENAMED = {"cond_aug": "noise_aug_strength", "fps": "output_fps"}
#: The same for the text-to-video apps (``steps`` is fast-svd's name for the sampling steps).
T2V_RENAMED = {**RENAMED, "steps": "num_inference_steps"}
#: Long clips and frame interpolation: our own, accepted by every app.
_LENGTH_FIELDS = ("duration_s", "overlap_frames", "interpolation")
#: Our own generation parameters accepted beyond fal's schema (same ranges as POST /v1/videos).
EXTENSION_FIELDS = ("num_frames", "num_inference_steps", "width", "height", "aspect_ratio",
                    "min_guidance_scale", "max_guidance_scale", "decode_chunk_size", *_LENGTH_FIELDS)
#: The same for the text-to-video apps (the size is fal's ``video_size``, the steps fal's ``steps``).
T2V_EXTENSION_FIELDS = ("num_frames", "min_guidance_scale", "max_guidance_scale", "decode_chunk_size",
                        "t2i_guidance_scale", "t2i_num_inference_steps", *_LENGTH_FIELDS)

#: fal's named video sizes -> the size generated. fal's own square_hd is 1024x1024 and square
#: 512x512; both are SVD's 1:1 preset here, 768x768 (the pixel count SVD-XT is trained at; a
#: custom ``{"width": 1024, "height": 1024}`` gets 1024x1024). The others are fal's sizes exactly.
VIDEO_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": ASPECT_PRESETS["1:1"],
    "square": ASPECT_PRESETS["1:1"],
    "portrait_4_3": ASPECT_PRESETS["3:4"],
    "portrait_16_9": ASPECT_PRESETS["9:16"],
    "landscape_4_3": ASPECT_PRESETS["4:3"],
    "landscape_16_9": ASPECT_PRESETS["16:9"],
}
DEFAULT_VIDEO_SIZE = "landscape_16_9"
#: fal's default ``negative_prompt`` of fast-svd's text-to-video.
FAL_NEGATIVE_PROMPT = ("unrealistic, saturated, high contrast, big nose, painting, drawing, sketch, cartoon, "
                       "anime, manga, render, CG, 3d, watermark, signature, label")

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


def _bound(name: str, kind: str) -> Any:
    """GenerationParams' own bound (``ge`` / ``le``) of a field, so fal's fields share its ranges."""
    return next(getattr(meta, kind) for meta in GenerationParams.model_fields[name].metadata if hasattr(meta, kind))


class FalImageSize(BaseModel):
    """fal's custom ``video_size``: ``{"width", "height"}`` (each 512 when absent, as fal's)."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(default=512, description="Width in pixels (multiple of 8; at most 1536x864 pixels in all).")
    height: int = Field(default=512, description="Height in pixels (multiple of 8; at most 1536x864 pixels in all).")


class _FalTextToVideoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="What the video shows: the text-to-image stage makes its first frame from it.")
    negative_prompt: str = Field(default=FAL_NEGATIVE_PROMPT, max_length=MAX_PROMPT_CHARS,
                                 description="What the first frame should not show (fal's default list when absent).")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random seed; drawn when absent.")
    motion_bucket_id: int = Field(default=127, ge=1, le=255, description="Amount of motion; higher moves more.")
    cond_aug: float = Field(default=0.02, ge=0.0, le=10.0,
                            description="Noise added to the first frame (our noise_aug_strength).")
    steps: int = Field(default=20, ge=_bound("num_inference_steps", "ge"), le=_bound("num_inference_steps", "le"),
                       description="Sampling steps of the video model (our num_inference_steps).")
    fps: int = Field(default=10, ge=_bound("output_fps", "ge"), le=_bound("output_fps", "le"),
                     description="Frame rate of the generated video (our output_fps: playback rate of the clip).")
    video_size: Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3",
                        "landscape_16_9"] | FalImageSize = Field(
        default=DEFAULT_VIDEO_SIZE, description="A named size (square_hd and square are 768x768 here) or "
        "{width, height} (multiples of 8, at most 1536x864 pixels).")
    deep_cache: Literal["none", "minimum", "medium", "high"] | None = Field(
        default=None, description="fal's DeepCache level: not implemented here, so only 'none' is accepted.")

    @field_validator("video_size", mode="wrap")
    @classmethod
    def _one_video_size(cls, value: Any, handler: Any) -> Any:
        """The errors of the one form given (not one per member of the union)."""
        if isinstance(value, dict):
            return FalImageSize.model_validate(value)
        if isinstance(value, (str, FalImageSize)) and (not isinstance(value, str) or value in VIDEO_SIZES):
            return handler(value)
        raise PydanticCustomError("literal_error", "Input should be one of {names}, or an object {width, height}",
                                  {"names": ", ".join(VIDEO_SIZES)})

    @field_validator("deep_cache")
    @classmethod
    def _no_deep_cache(cls, value: str | None) -> str | None:
        if value not in (None, "none"):
            raise PydanticCustomError(
                "unsupported_value", "DeepCache is not implemented by this service: send deep_cache 'none' or "
                "omit it ('{value}' is refused rather than ignored, as it would change the output)", {"value": value})
        return value


#: The request body of ``POST /fal-ai/fast-svd/text-to-video``: fal's schema plus our extension fields.
FalTextToVideoInput = create_model(
    "FalTextToVideoInput", __base__=_FalTextToVideoInput,
    **{name: (GenerationParams.model_fields[name].annotation, GenerationParams.model_fields[name])
       for name in T2V_EXTENSION_FIELDS},
)


class FalInputError(Exception):
    """The body does not fit the input schema: rendered as FastAPI's 422 ``detail`` list."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail))
        self.detail = detail


def _detail_of(error: ValidationError, rename: dict[str, str | tuple[str, ...]] | None = None,
               hints: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """FastAPI's 422 ``detail`` list, our field names put back as the client's (``rename``: ours ->
    theirs, a tuple for a nested field) and ``hints`` ((field, type) -> message) for known mistakes."""
    rename, hints = rename or {}, hints or {}
    detail = []
    for item in error.errors(include_url=False):
        loc: list[Any] = ["body"]
        for part in item.get("loc", ()):
            theirs = rename.get(str(part), part)
            loc.extend(theirs if isinstance(theirs, tuple) else (theirs,))
        kind = item.get("type", "value_error")
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        detail.append({"loc": loc, "msg": hints.get((str(loc[-1]), kind), message), "type": kind})
    return detail


#: Explanations of what a client of the image app sends for text-to-video.
_IMAGE_APP_HINTS = {(field, "extra_forbidden"): f"{FAL_APP_ID} takes no {field} (it animates image_url); "
                    f"submit to {FAL_T2V_APP_ID} for text-to-video" for field in ("prompt", "negative_prompt")}


def _json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise FalInputError([{"loc": ["body"], "msg": "the body must be a JSON object", "type": "model_type"}])
    return body


def parse_input(body: Any) -> tuple[str, GenerationParams]:
    """fal's input body -> (image_url, our GenerationParams); FalInputError naming every problem."""
    try:
        given = FalStableVideoInput.model_validate(_json_object(body))
    except ValidationError as error:
        raise FalInputError(_detail_of(error, hints=_IMAGE_APP_HINTS)) from None
    values = given.model_dump(exclude={"image_url"}, exclude_unset=True)
    # fal's default frame rate (25), where our output_fps would default to the conditioning value.
    values.setdefault("fps", _FalInput.model_fields["fps"].default)
    params = {RENAMED.get(name, name): value for name, value in values.items()}
    params["output_format"] = OutputFormat.mp4
    try:
        return given.image_url, GenerationParams.model_validate(params)
    except ValidationError as error:
        raise FalInputError(_detail_of(error, {ours: theirs for theirs, ours in RENAMED.items()})) from None


#: The same for a client of the text-to-video apps sending the image app's or our native fields.
_T2V_APP_HINTS = {
    ("image_url", "extra_forbidden"): f"{FAL_T2V_APP_ID} takes no image (it makes the first frame from the "
    f"prompt); submit to {FAL_APP_ID} for image-to-video",
    ("num_inference_steps", "extra_forbidden"): "give the sampling steps as steps (fal's name for them)",
    **{(field, "extra_forbidden"): "give the size as video_size (a name or {\"width\", \"height\"})"
       for field in ("width", "height", "aspect_ratio")},
}


def video_size(value: str | FalImageSize) -> tuple[int, int]:
    """fal's ``video_size`` -> (width, height) generated (:data:`VIDEO_SIZES`, or the custom size)."""
    if isinstance(value, FalImageSize):
        return value.width, value.height
    return VIDEO_SIZES[value]


def parse_text_to_video_input(body: Any) -> tuple[None, GenerationParams]:
    """fal's text-to-video input body -> (no image, our GenerationParams with the prompt);
    FalInputError naming every problem (in fal's field names)."""
    try:
        given = FalTextToVideoInput.model_validate(_json_object(body))
    except ValidationError as error:
        raise FalInputError(_detail_of(error, hints=_T2V_APP_HINTS)) from None
    values = given.model_dump(exclude={"video_size", "deep_cache"}, exclude_unset=True)
    # fal's defaults where ours differ (steps 20, fps 10, its negative prompt).
    for name in ("negative_prompt", "steps", "fps"):
        values.setdefault(name, _FalTextToVideoInput.model_fields[name].default)
    params = {T2V_RENAMED.get(name, name): value for name, value in values.items()}
    params["width"], params["height"] = video_size(given.video_size)
    params["output_format"] = OutputFormat.mp4
    rename: dict[str, str | tuple[str, ...]] = {ours: theirs for theirs, ours in T2V_RENAMED.items()}
    rename.update(width=("video_size", "width"), height=("video_size", "height"))
    try:
        return None, GenerationParams.model_validate(params)
    except ValidationError as error:
        raise FalInputError(_detail_of(error, rename)) from None


class FalApp:
    """One kind of fal app: its input schema (for /docs) and the parser of its body into
    ``(image_url or None, GenerationParams)``."""

    def __init__(self, schema: type[BaseModel], parse: Callable[[Any], tuple[str | None, GenerationParams]],
                 summary: str) -> None:
        self.schema, self.parse, self.summary = schema, parse, summary


IMAGE_TO_VIDEO = FalApp(FalStableVideoInput, parse_input, "image-to-video")
TEXT_TO_VIDEO = FalApp(FalTextToVideoInput, parse_text_to_video_input, "text-to-video")


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
    # Registered with or without a text-to-image model: without one a submit is a 422
    # text_to_video_unavailable (fal's shape), which says more than a 404 would.
    for app_id in FAL_T2V_APP_IDS:
        add_routes(api, app_id, service, TenantDep, job_of, position_of, on_ended, app=TEXT_TO_VIDEO)
    return api


def queue_app(app_id: str) -> str:
    """The app a request of ``app_id`` belongs to in fal's queue URLs: ``owner/alias``, without an
    endpoint path (``fal-ai/fast-svd/text-to-video`` -> ``fal-ai/fast-svd``), as fal's queue names
    them and as ``fal_client.status`` / ``result`` / ``cancel`` build them from an app id."""
    return "/".join(app_id.split("/")[:2])


def add_routes(api: APIRouter, app_id: str, service: "VideoService", TenantDep, job_of, position_of,
               on_ended, app: FalApp = IMAGE_TO_VIDEO) -> None:
    """``POST /{app_id}``, and the request routes under ``/{owner}/{alias}/requests/`` (the URLs
    answered) and, for an app id with an endpoint path, under ``/{app_id}/requests/`` too."""
    prefix = f"/{app_id}"
    url_app = queue_app(app_id)

    @api.post(prefix, summary=f"fal queue: submit to {app_id} ({app.summary})", openapi_extra={"requestBody": {
        "content": {"application/json": {"schema": app.schema.model_json_schema()}}, "required": True}})
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
            image_url, params = app.parse(body)
        except FalInputError as error:
            return JSONResponse({"detail": error.detail}, status_code=422,
                                headers={"X-Fal-Error-Type": "invalid_parameter"})
        webhook_url = request.query_params.get("fal_webhook") or None
        image = None if image_url is None else await asyncio.to_thread(service.image_from_url, image_url)
        admission = await service.admit(tenant, image=image, params=params, webhook_url=webhook_url,
                                        idempotency_key=idempotency_key, webhook_format="fal",
                                        prompt=params.prompt)
        job = admission.job
        urls = request_urls(public_base_url(request, service.config.public_url), url_app, job.id)
        return JSONResponse(status_body(job, urls, with_logs=False, queue_position=await position_of(job)))

    for request_prefix in dict.fromkeys([f"/{url_app}", prefix]):
        add_request_routes(api, request_prefix, url_app, service, TenantDep, job_of, position_of, on_ended)


def add_request_routes(api: APIRouter, prefix: str, url_app: str, service: "VideoService", TenantDep, job_of,
                       position_of, on_ended) -> None:
    """status, status/stream, result and cancel of a request under ``prefix``; answered URLs name ``url_app``."""
    app_id = prefix.lstrip("/")
    request_path = prefix + "/requests/{request_id}"

    @api.get(request_path + "/status", summary=f"fal queue: status of a {app_id} request")
    async def status(request: Request, request_id: str, tenant: TenantDep):
        job = await job_of(tenant, request_id)
        urls = request_urls(public_base_url(request, service.config.public_url), url_app, job.id)
        return JSONResponse(status_body(job, urls, with_logs=_flag(request.query_params.get("logs")),
                                        queue_position=await position_of(job)))

    @api.get(request_path + "/status/stream", summary=f"fal queue: status of a {app_id} request as server-sent "
             "events until it completes", responses={200: {"content": {"text/event-stream": {}}}})
    async def status_stream(request: Request, request_id: str, tenant: TenantDep):
        first = await job_of(tenant, request_id)  # 404 before the stream starts
        urls = request_urls(public_base_url(request, service.config.public_url), url_app, first.id)
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
