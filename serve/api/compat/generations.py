"""OpenAI-style synchronous generations: ``POST /v1/video/generations`` answers with the clip.

The request (JSON) takes ``model``, ``prompt``, ``image`` (base64 or a data URL) or ``image_url``
(http(s), SSRF-guarded, or a data URL), ``response_format`` (``url``, the default, or
``b64_json``), ``n`` (1 only) and the native generation parameters (``num_frames``, ``fps``,
``width``, ``height``, ``seed``, ``num_inference_steps``, ``duration_s``, ``negative_prompt``, ...).
A ``prompt`` with neither ``image`` nor ``image_url`` is text-to-video (the text-to-image stage
makes the first frame from it); with an image the prompt is only stored with the job (SVD takes
no text). It is admitted through
``VideoService.admit`` like every other job, then the request waits for the job to end, woken by
the job store's change notices (with a slow re-read in case one is lost), for at most
``generations_wait_s``:

* ended in time: ``200 {"id", "created", "data": [{"url", "b64_json"?}]}``; ``url`` is a signed,
  expiring URL that works without the API key (``storage.presign_expiry_s``);
* still running: ``202 {"id", "created", "status"}`` with ``Location: /v1/video/generations/{id}``,
  which answers the same way without waiting.

Failures use OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pipelines.errors import InvalidImageError, InvalidInputError
from pipelines.params import GenerationParams

from ...jobstore import Job, JobStatus
from ...metering.models import CLIENT_ERROR_CODES
from .. import json_body
from ..errors import NO_RETRY_HEADERS, APIError, Rejection, adapter_route
from ..base_url import public_base_url
from ..follow import follow_job
from ..schemas import openapi_schema, text_to_video_params

if TYPE_CHECKING:
    from ...tenants import Tenant, TenantRegistry
    from ..service import VideoService

PATH = "/v1/video/generations"
#: The job ended this way; resubmitting would run a new one (the openai SDK retries 409 and 5xx
#: unless told not to).
FINAL = {"x-should-retry": "false"}
#: Retry-After of a 202: polling sooner rarely finds the job done.
POLL_AFTER_S = 2
MAX_PROMPT_CHARS = 4000

#: This service's rejection codes -> the codes OpenAI's clients know for the same thing.
OPENAI_CODES = {"unauthorized": "invalid_api_key", "rate_limited": "rate_limit_exceeded"}


class GenerationRequest(BaseModel):
    """The adapter's own fields; every other field is a generation parameter (``GenerationParams``)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="A model id GET /v1/models lists (the default model also "
                              "by its source or last path part); omit for the default model.")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                               description="Without image and image_url: text-to-video (the text-to-image stage "
                               "makes the first frame from it; negative_prompt and the t2i_* parameters apply). "
                               "With an image it is only stored with the job (SVD animates the image; it takes "
                               "no text).")
    image: str | None = Field(default=None, description="The conditioning image (image-to-video): base64 or a data "
                              "URL. Give it, image_url, or neither with a prompt (text-to-video).")
    image_url: str | None = Field(default=None, description="The conditioning image (image-to-video): an http(s) or "
                                  "data URL. Give it, image, or neither with a prompt (text-to-video).")
    response_format: Literal["url", "b64_json"] = Field(default="url", description="b64_json adds the clip inline.")
    n: Literal[1] = Field(default=1, description="Clips per request: only 1.")


ADAPTER_FIELDS = frozenset(GenerationRequest.model_fields)
KNOWN_PARAMS = ADAPTER_FIELDS | set(GenerationParams.model_fields) | {"cond_aug"}
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):")  # "seed: ...", "foo: unknown parameter"
_LEADING_WORD = re.compile(r"^([a-z_]+)\s")  # "num_frames 30 exceeds this tenant's limit ..."


def param_of(message: str) -> str | None:
    """The request field a rejection's message is about (each message starts with it), if any."""
    if match := _FIELD_PREFIX.match(message):
        return match.group(1)
    match = _LEADING_WORD.match(message)
    return match.group(1) if match and match.group(1) in KNOWN_PARAMS else None


def render(rejection: Rejection) -> JSONResponse:
    """A rejection in OpenAI's error shape (read by the openai SDK's ``APIStatusError``)."""
    param = param_of(rejection.message)
    body = {"error": {"message": rejection.message, "type": error_type(rejection.status), "param": param,
                      "code": OPENAI_CODES.get(rejection.code, rejection.code)}}
    headers = {**NO_RETRY_HEADERS.get(rejection.status, {}), **rejection.headers}
    return JSONResponse(body, status_code=rejection.status, headers=headers or None)


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")


def parse_request(body: Any) -> tuple[GenerationRequest, GenerationParams]:
    """The adapter's fields and the generation parameters: image-to-video with ``image`` or
    ``image_url`` (a prompt is then only stored), text-to-video with a ``prompt`` and neither."""
    if not isinstance(body, dict):
        raise InvalidInputError("the body must be a JSON object with image, image_url or a prompt and the "
                                "generation parameters")
    request = GenerationRequest.model_validate({k: v for k, v in body.items() if k in ADAPTER_FIELDS})
    if request.image is not None and request.image_url is not None:
        raise InvalidInputError("image: give one of image (base64 or a data URL) and image_url, not both")
    has_image = request.image is not None or request.image_url is not None
    if not has_image and request.prompt is None:
        raise InvalidInputError("image: give image (base64 or a data URL) or image_url for image-to-video, "
                                "or a prompt alone for text-to-video")
    params = text_to_video_params({k: v for k, v in body.items() if k not in ADAPTER_FIELDS},
                                  prompt=request.prompt, has_image=has_image)
    return request, params


def image_bytes(service: "VideoService", request: GenerationRequest) -> bytes | None:
    """The inline conditioning image (``image``: base64 or a data URL, decoded here; blocking: run
    it in a thread), None without one; ``image_url`` is left to admission, which fetches it once
    the tenant's quota allows. Errors name the field."""
    if request.image is None:
        return None
    value = request.image
    if value.startswith(("http://", "https://")):
        raise InvalidImageError("image: takes base64 or a data URL; send an http(s) URL as image_url")
    if not value.startswith("data:"):
        value = f"data:application/octet-stream;base64,{value}"  # decoded in place, never fetched
    try:
        return service.image_from_url(value)
    except InvalidInputError as error:
        raise type(error)(f"image: {str(error).removeprefix('image_url: ')}") from None


async def wait_for_end(service: "VideoService", tenant: "Tenant", job: Job, timeout_s: float,
                       request: Request | None = None) -> Job:
    """The job once it ended, or as it stands after ``timeout_s`` (or when the client left)."""
    if job.status.is_terminal or timeout_s <= 0:
        return job
    async for current in follow_job(service.store, job, tenant=tenant.name, request=request,
                                    deadline=time.monotonic() + timeout_s, heartbeat_s=None):
        job = current  # the newest read: terminal, or as it stands at the deadline
    return job


# -- the bodies as /docs shows them -------------------------------------------------------------

class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                      "rate_limit_error or server_error.")
    param: str | None = Field(description="The request field the error is about, if any.")
    code: str | None


class OpenAIError(BaseModel):
    """OpenAI's error body (read by the openai SDK's ``APIStatusError``)."""

    error: OpenAIErrorDetail


class GenerationData(BaseModel):
    url: str = Field(description="A signed, expiring URL of the clip that needs no API key.")
    b64_json: str | None = Field(default=None, description="The clip in base64 (response_format b64_json).")


class Generation(BaseModel):
    id: str
    created: int = Field(description="Unix seconds.")
    data: list[GenerationData]


class GenerationPending(BaseModel):
    id: str
    created: int = Field(description="Unix seconds.")
    status: Literal["queued", "in_progress"]


def request_body_schema() -> dict[str, Any]:
    """The JSON body: the adapter's own fields and every generation parameter (unknown fields are refused)."""
    params, own = openapi_schema(GenerationParams), openapi_schema(GenerationRequest)
    return {"title": "GenerationRequest", "type": "object", "additionalProperties": False,
            "description": "model, prompt, image or image_url, response_format, n, and any generation parameter.",
            "properties": {**params["properties"], **own["properties"]}}


def openai_errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries in OpenAI's error shape: ``s404="..."`` -> 404 with that description."""
    return {int(name[1:]): {"model": OpenAIError, "description": text} for name, text in codes.items()}


_ANSWERS = {
    200: {"model": Generation, "description": "The clip: a signed URL that needs no API key (and base64 with "
                                              "b64_json)."},
    202: {"model": GenerationPending, "description": "Still running: poll the Location (see Retry-After)."},
}
_ENDED_BADLY = dict(s409="The job was cancelled.",
                    s410="The job completed, but its clip is no longer in storage (output_gone).",
                    s500="The job failed because of the service (code says why).",
                    s503="A backing service is unavailable; retry after Retry-After.")
CREATE_RESPONSES = {**_ANSWERS, **openai_errors(
    **_ENDED_BADLY, s401="Missing or invalid API key.", s403="The tenant may not use this model.",
    s404="No such model for this tenant.", s413="The request or image is too large.",
    s415="The body is not application/json.",
    s422="Invalid image or parameter (param names it), over a tenant cap, or the job failed because of its input.",
    s429="Over the tenant's rate limit or queue size (see Retry-After).")}
CREATE_RESPONSES[409]["description"] = ("The Idempotency-Key was used with a different request, or the job was "
                                         "cancelled.")
GET_RESPONSES = {**_ANSWERS, **openai_errors(
    **_ENDED_BADLY, s401="Missing or invalid API key.", s404="No such generation for this key.",
    s422="An invalid response_format, or the job failed because of its input.")}


def router(service: "VideoService", tenants: "TenantRegistry", *, on_ended=None) -> APIRouter:
    api = APIRouter(route_class=adapter_route(render), tags=["OpenAI-style generations"])
    config = service.config

    def base_url(request: Request) -> str:
        return public_base_url(request, config.public_url)

    async def answer(job: Job, response_format: str, request: Request) -> JSONResponse:
        created = int(job.created_at.timestamp())
        if job.status is JobStatus.COMPLETED and job.output is not None:
            output = job.output
            if output.gone_at is not None:
                raise APIError(410, "output_gone", f"the clip of {job.id} is no longer in storage", FINAL)
            url = await asyncio.to_thread(
                service.storage.signed_url, output.key, base_url=base_url(request),
                expires_s=config.storage.presign_expiry_s, filename=output.file_name,
                content_type=output.content_type)
            item = {"url": url}
            if response_format == "b64_json":
                item["b64_json"] = base64.b64encode(await asyncio.to_thread(service.storage.get, output.key)).decode()
            return JSONResponse({"id": job.id, "created": created, "data": [item]})
        if job.status is JobStatus.FAILED:
            error = job.error
            code, message = (error.code, error.message) if error else ("internal_error", "the generation failed")
            raise APIError(422 if code in CLIENT_ERROR_CODES else 500, code, f"{message} (job {job.id})", FINAL)
        if job.status is JobStatus.CANCELLED:
            raise APIError(409, "cancelled", f"the job {job.id} was cancelled", FINAL)
        return JSONResponse({"id": job.id, "created": created, "status": job.status.value}, status_code=202,
                            headers={"Location": f"{PATH}/{job.id}", "Retry-After": str(POLL_AFTER_S)})

    @api.post(PATH, summary="Generate a clip and wait for it (OpenAI-style)", responses=CREATE_RESPONSES,
              description="Answers 200 with the clip when the job ends within generations_wait_s, else 202.",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": request_body_schema()}}}})
    async def create_generation(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ):
        tenant = tenants.authenticate(authorization)
        content_type = request.headers.get("content-type", "")
        if content_type and not content_type.startswith("application/json"):
            raise APIError(415, "unsupported_media_type", "send the request as application/json")
        try:
            body = json_body.loads(await request.body() or b"null")
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"the body is not valid JSON ({error.msg} at position {error.pos})") from None
        generation, params = parse_request(body)
        image = await asyncio.to_thread(image_bytes, service, generation)
        admission = await service.admit(tenant, image=image, image_url=generation.image_url, params=params,
                                        idempotency_key=idempotency_key, prompt=generation.prompt,
                                        model=generation.model)
        job = await wait_for_end(service, tenant, admission.job, config.generations_wait_s, request)
        return await answer(job, generation.response_format, request)

    @api.get(f"{PATH}/{{job_id}}", summary="A generation: the clip once done, else 202 (no waiting)",
             responses=GET_RESPONSES)
    async def get_generation(
        request: Request,
        job_id: str,
        authorization: Annotated[str | None, Header()] = None,
        response_format: Annotated[Literal["url", "b64_json"], Query()] = "url",
    ):
        tenant = tenants.authenticate(authorization)
        return await answer(await asyncio.to_thread(service.get, tenant, job_id), response_format, request)

    return api
