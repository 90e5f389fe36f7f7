"""Stability AI's v2beta image-to-video API: ``POST /v2beta/image-to-video`` and
``GET /v2beta/image-to-video/result/{id}``, as Stability documents them, over the one job service.

Submit (``multipart/form-data``): ``image`` (a file of exactly 1024x576, 576x1024 or 768x768
pixels: the clip's width and height), ``seed`` (0 to 4294967294; 0, the default, draws one),
``cfg_scale`` (0 to 10, default 1.8) and ``motion_bucket_id`` (1 to 255, default 127). Answer:
``200 {"id"}``. Any other field, a repeated one or a value out of range is a 400 naming it.
Stability's image-to-video takes no prompt, and its v2beta API has no text-to-video endpoint, so
there is nothing to map text-to-video onto: a ``prompt`` (or ``negative_prompt``) field is a 400
that says where this service takes text-to-video (:data:`NO_PROMPT`).

Result: ``202 {"id", "status": "in-progress"}`` while the job is queued or running; once it
completed, ``200`` with the MP4 (``Accept: video/*``, the default; headers ``finish-reason:
SUCCESS`` and ``seed``) or ``{"video": base64, "finish_reason": "SUCCESS", "seed"}``
(``Accept: application/json``). Stability's result has no failed state (``finish_reason`` is
``SUCCESS`` or ``CONTENT_FILTERED``, and this service filters no content), so a failed job answers
as Stability's errors do: 400 ``bad_request`` when its input was at fault, else 500
``internal_error``; a job cancelled through the native API is a 404 ``not_found`` naming it.

Mapping onto :class:`~pipelines.params.GenerationParams`: ``cfg_scale`` is ``max_guidance_scale``
(the guidance of the last frame) and ``min_guidance_scale`` is 1.0, SVD's own first-frame value, or
``cfg_scale`` when that is lower (a flat ramp). Stability's API has no frame count or step count:
this adapter uses the model's own frame count (14 for SVD, 25 for SVD-XT) and
:data:`DEFAULT_STEPS` sampling steps, each lowered to the tenant's ``max_num_frames`` /
``max_inference_steps`` where those are lower (a Stability client cannot choose them, so a cap
shapes the clip instead of refusing every request); other parameters keep their defaults (fps 7).

Errors use Stability's body ``{"id", "name", "errors": [...]}`` (``id`` is a fresh error id):
invalid input is 400 ``bad_request``, a missing or wrong key 401 ``unauthorized``, another
tenant's or an unknown id 404 ``not_found``, a too large image 413 ``payload_too_large``, the
tenant's rate limit or queue size 429 ``rate_limited`` (with ``Retry-After``), a tenant cap on the
size 422 ``limit_exceeded``; other rejections keep their status with this service's code as name.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from pipelines.errors import InvalidImageError, InvalidInputError
from pipelines.images import image_header_size
from pipelines.params import MAX_SEED, GenerationParams, OutputFormat

from ...jobstore import Job, JobStatus
from ...metering.models import CLIENT_ERROR_CODES
from ..errors import APIError, Rejection, adapter_route
from ..schemas import openapi_schema

if TYPE_CHECKING:
    from ...tenants import Tenant, TenantRegistry
    from ..service import VideoService

PATH = "/v2beta/image-to-video"
IMAGE_FIELD = "image"
#: The image sizes Stability's image-to-video accepts, (width, height); the clip has the same size.
SIZES: tuple[tuple[int, int], ...] = ((1024, 576), (576, 1024), (768, 768))
#: Sampling steps of a Stability job (Stability's API has no such parameter); the native default.
DEFAULT_STEPS = GenerationParams.model_fields["num_inference_steps"].default
#: First-frame guidance (SVD's default); lowered to cfg_scale when that is smaller.
MIN_GUIDANCE = 1.0
#: Text fields a form may carry before the parser stops reading (the unknown ones are then named).
MAX_FORM_FIELDS = 16
VIDEO_TYPES = frozenset({"video/*", "video/mp4", "*/*"})
#: Text fields a client may send hoping for text-to-video: refused, saying where it is served.
PROMPT_FIELDS = ("prompt", "negative_prompt")
NO_PROMPT = ("{field}: Stability's image-to-video takes no prompt (it animates the image) and Stability's v2beta API "
             "has no text-to-video endpoint; for text-to-video send a prompt and no image to POST /v1/videos, "
             "POST /v1/video/generations or fal's fal-ai/fast-svd/text-to-video")
JSON_TYPE = "application/json"
SUCCESS = "SUCCESS"

#: HTTP status -> the error name Stability's documentation gives it.
STABILITY_NAMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "payload_too_large",
                   429: "rate_limited", 500: "internal_error"}


class StabilityForm(BaseModel):
    """The text fields of a submit, as Stability documents them (form strings are coerced)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="0: a random seed.")
    cfg_scale: float = Field(default=1.8, ge=0.0, le=10.0, description="How closely the video follows the image.")
    motion_bucket_id: int = Field(default=127, ge=1, le=255, description="Higher: more motion.")


#: The same fields with their types only: form strings are coerced first, so a range error shows
#: the number (``motion_bucket_id: 0 is out of range``), not the string ``'0'``.
_FormTypes = create_model("StabilityFormTypes", __config__=ConfigDict(extra="forbid"),
                          **{name: (field.annotation, None) for name, field in StabilityForm.model_fields.items()})


def render(rejection: Rejection) -> JSONResponse:
    """A rejection in Stability's error shape. Our 422s for bad input are Stability's 400s."""
    status = 400 if rejection.status == 422 and rejection.code != "limit_exceeded" else rejection.status
    body = {"id": uuid.uuid4().hex, "name": STABILITY_NAMES.get(status, rejection.code),
            "errors": [rejection.message]}
    return JSONResponse(body, status_code=status, headers=rejection.headers or None)


def image_size(image: bytes, *, max_bytes: int) -> tuple[int, int]:
    """(width, height) of the upload, which must be one of Stability's :data:`SIZES`: read from
    its header (admission decodes it fully, once the tenant's quota allows)."""
    size = image_header_size(image, max_bytes=max_bytes, name=IMAGE_FIELD)
    if size not in SIZES:
        allowed = ", ".join(f"{w}x{h}" for w, h in SIZES)
        raise InvalidImageError(f"image: {size[0]}x{size[1]} is not a supported size; send an image of "
                                f"exactly {allowed} pixels")
    return size


async def read_form(request: Request, *, max_image_bytes: int) -> tuple[bytes, StabilityForm]:
    """The image (at most ``max_image_bytes`` + 1 bytes read) and the validated text fields."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInputError("send the request as multipart/form-data with the image as a file field 'image'")
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except HTTPException as error:
        raise InvalidInputError(f"multipart upload: {error.detail}") from None
    fields: dict[str, UploadFile | str] = {}
    for name, value in form.multi_items():
        if name in fields:
            raise InvalidInputError(f"{name}: given more than once; send each form field once")
        fields[name] = value
    for name in PROMPT_FIELDS:  # before the image: a text-to-video request has none
        if name in fields:
            raise InvalidInputError(NO_PROMPT.format(field=name))
    upload = fields.pop(IMAGE_FIELD, None)
    if not isinstance(upload, UploadFile):
        raise InvalidInputError("image: required; send the image as a file field named 'image'")
    for name, value in fields.items():
        if not isinstance(value, str):
            raise InvalidInputError(f"{name}: send a text field, not a file")
    typed = _FormTypes.model_validate(fields).model_dump(exclude_unset=True)
    return await upload.read(max_image_bytes + 1), StabilityForm.model_validate(typed)


def wants_json(accept: str | None) -> bool:
    """Whether the client asked for JSON (else the video); Stability's default is ``video/*``."""
    types = [part.split(";")[0].strip().lower() for part in (accept or "").split(",") if part.strip()]
    for kind in types:
        if kind == JSON_TYPE:
            return True
        if kind in VIDEO_TYPES:
            return False
    if types:
        raise InvalidInputError(f"accept: {accept[:80]!r} is not supported; ask for video/* or application/json")
    return False


def unfinished(job: Job) -> APIError:
    """A job that ended without a clip, as Stability's errors (its result has no failed state)."""
    if job.status is JobStatus.CANCELLED:
        return APIError(404, "not_found", f"generation {job.id} was cancelled; it has no result")
    code, message = (job.error.code, job.error.message) if job.error else ("internal_error", "the generation failed")
    if code in CLIENT_ERROR_CODES:
        return APIError(422, code, f"generation {job.id} failed: {message}")
    return APIError(500, "internal_error", f"generation {job.id} failed: {message}")


# -- the bodies as /docs shows them -------------------------------------------------------------

class StabilityError(BaseModel):
    """Stability's error body."""

    id: str = Field(description="A fresh id of this error.")
    name: str = Field(description="bad_request, unauthorized, not_found, payload_too_large, rate_limited, "
                      "internal_error, or this service's code (e.g. limit_exceeded).")
    errors: list[str]


class StabilityStarted(BaseModel):
    id: str


class StabilityPending(BaseModel):
    id: str
    status: Literal["in-progress"]


class StabilityVideo(BaseModel):
    video: str = Field(description="The MP4, base64.")
    finish_reason: Literal["SUCCESS"]
    seed: int | None


def stability_errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries in Stability's error shape: ``s404="..."`` -> 404 with that description."""
    return {int(name[1:]): {"model": StabilityError, "description": text} for name, text in codes.items()}


_ANY_ROUTE = dict(s401="Missing or invalid API key.", s503="A backing service is unavailable; retry after Retry-After.")
START_RESPONSES = {
    200: {"model": StabilityStarted, "description": "Started: poll the result with the id."},
    **stability_errors(**_ANY_ROUTE, s400="Invalid image, size or parameter.",
                       s403="The tenant may not use the model (allowed_models).",
                       s413="The request or image is too large.", s422="Over a tenant cap (limit_exceeded).",
                       s429="Over the tenant's rate limit or queue size (see Retry-After)."),
}
RESULT_RESPONSES = {
    200: {"description": "The MP4 (Accept: video/*) or {video, finish_reason, seed} (Accept: application/json).",
          "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": openapi_schema(StabilityVideo)}}},
    202: {"model": StabilityPending, "description": "Still in progress."},
    **stability_errors(**_ANY_ROUTE, s400="An Accept this API cannot answer, or the generation failed because of "
                       "its input.", s404="No such generation for this API key (or it was cancelled).",
                       s410="The generation completed, but its clip is no longer in storage.",
                       s422="A header this API cannot read.",
                       s500="The generation failed because of the service."),
}


def router(service: "VideoService", tenants: "TenantRegistry", *, on_ended=None) -> APIRouter:
    api = APIRouter(route_class=adapter_route(render), tags=["Stability v2beta image-to-video"])

    async def params_for(tenant: "Tenant", form: StabilityForm, size: tuple[int, int]) -> GenerationParams:
        policy = tenant.policy
        steps = min(DEFAULT_STEPS, policy.max_inference_steps or DEFAULT_STEPS)
        num_frames = None  # the model's own
        if policy.max_num_frames is not None:
            model_frames = (await service.model_info())["num_frames"]
            num_frames = min(model_frames, policy.max_num_frames)
        return GenerationParams(
            seed=form.seed or None, width=size[0], height=size[1], motion_bucket_id=form.motion_bucket_id,
            max_guidance_scale=form.cfg_scale, min_guidance_scale=min(MIN_GUIDANCE, form.cfg_scale),
            num_inference_steps=steps, num_frames=num_frames, output_format=OutputFormat.mp4)

    @api.post(PATH, summary="Start an image-to-video generation (Stability v2beta)", responses=START_RESPONSES,
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [IMAGE_FIELD], "additionalProperties": False,
            "properties": {IMAGE_FIELD: {"type": "string", "format": "binary",
                                         "description": "1024x576, 576x1024 or 768x768 pixels."},
                           **openapi_schema(StabilityForm)["properties"]}}}}}})
    async def start(request: Request, authorization: Annotated[str | None, Header()] = None):
        tenant = tenants.authenticate(authorization)
        image, form = await read_form(request, max_image_bytes=service.config.max_upload_bytes)
        size = await asyncio.to_thread(image_size, image, max_bytes=service.config.max_upload_bytes)
        admission = await service.admit(tenant, image=image, params=await params_for(tenant, form, size))
        return JSONResponse({"id": admission.job.id})

    @api.get(f"{PATH}/result/{{generation_id}}", summary="Fetch a generation's result (Stability v2beta)",
             responses=RESULT_RESPONSES)
    async def result(generation_id: str, authorization: Annotated[str | None, Header()] = None,
                     accept: Annotated[str | None, Header()] = None):
        tenant = tenants.authenticate(authorization)
        as_json = wants_json(accept)
        job = await asyncio.to_thread(service.get, tenant, generation_id)
        if not job.status.is_terminal:
            return JSONResponse({"id": job.id, "status": "in-progress"}, status_code=202)
        if job.status is not JobStatus.COMPLETED or job.output is None:
            raise unfinished(job)
        video = await asyncio.to_thread(service.storage.get, job.output.key)
        seed = job.params.get("seed")
        if as_json:
            return JSONResponse({"video": base64.b64encode(video).decode(), "finish_reason": SUCCESS, "seed": seed})
        return Response(video, media_type=job.output.content_type, headers={"finish-reason": SUCCESS,
                                                                            "seed": str(seed)})

    return api
