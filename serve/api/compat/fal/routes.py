"""fal's queue routes: ``router``, the app ids it answers to, and each app's submit, status,
status stream, result and cancel routes."""

# No ``from __future__ import annotations``: FastAPI resolves the routes' ``TenantDep`` annotations
# at runtime, and it is local to ``router``.
import asyncio
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ....jobstore import Job, JobStatus
from ....metering.models import CLIENT_ERROR_CODES
from ....tenants import Tenant
from ....zoo.entry import RESERVED_OWNERS
from ...base_url import public_base_url
from ... import json_body
from ...errors import APIError, NotFoundError, adapter_route
from ...follow import KEEPALIVE, follow_job
from ...schemas import openapi_schema, sse_event_schema
from .inputs import FAL_APP_ID, FAL_T2V_APP_IDS, IMAGE_TO_VIDEO, TEXT_TO_VIDEO, FalApp, FalInputError
from .rendering import _error_of, download_url, render, request_urls, result_body, status_body

if TYPE_CHECKING:
    from ....tenants import TenantRegistry
    from ...service import VideoService

STREAM_RECHECK_S = 2.0  # re-read without a notice (the queue position moves when other jobs start)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


# -- the bodies as /docs shows them (the routes build them as dicts: rendering.py) ---------------

class FalValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class FalError(BaseModel):
    """fal's rejection: ``detail`` (a message; FastAPI's list of issues for an invalid input body),
    the code in the ``X-Fal-Error-Type`` header."""

    detail: str | list[FalValidationIssue]
    error_type: str | None = Field(default=None, description="The result of a failed job: why it failed.")
    status: Literal["NOT_FOUND", "ALREADY_COMPLETED"] | None = Field(default=None, description="Cancel only.")


class FalLog(BaseModel):
    message: str
    level: str
    source: str
    timestamp: str


class FalStatus(BaseModel):
    """A request's status (submit answers it too). A failed or cancelled request is COMPLETED with
    ``error`` and ``error_type``, as fal reports them."""

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None = Field(default=None, description="IN_QUEUE: requests ahead of this one.")
    logs: list[FalLog] | None = Field(description="With ?logs=1; else null.")
    metrics: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None


class FalFile(BaseModel):
    url: str
    content_type: str
    file_name: str
    file_size: int


class FalResult(BaseModel):
    video: FalFile
    seed: int | None


class FalCancelled(BaseModel):
    status: Literal["CANCELLATION_REQUESTED"]


def fal_errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries in fal's error shape: ``s404="..."`` -> 404 with that description."""
    return {int(name[1:]): {"model": FalError, "description": text} for name, text in codes.items()}


#: Every fal route.
_ANY_ROUTE = dict(s401="Missing or invalid API key (Authorization: Key or Bearer).",
                  s422="A header or path value this API cannot read.",
                  s503="A backing service is unavailable; retry after Retry-After.")
SUBMIT_RESPONSES = {
    200: {"model": FalStatus, "description": "Queued: IN_QUEUE with the request's URLs."},
    **fal_errors(**{**_ANY_ROUTE, "s422": "The input does not fit the app's schema (detail lists each issue), an "
                                          "invalid image, or over a tenant cap."},
                 s403="The tenant may not use this model.",
                 s404="No such model for this tenant.",
                 s409="The Idempotency-Key was used with a different request.",
                 s413="The request or image is too large.",
                 s429="Over the tenant's rate limit or queue size (see Retry-After)."),
}
STATUS_RESPONSES = {200: {"model": FalStatus}, **fal_errors(**_ANY_ROUTE, s404="No such request for this key.")}
STREAM_RESPONSES = {200: {"description": "Server-sent events, each data a status body, until the request ends",
                          "content": {"text/event-stream": {"schema": sse_event_schema("FalStatus")}}},
                    **fal_errors(**_ANY_ROUTE, s404="No such request for this key.")}
RESULT_RESPONSES = {
    200: {"model": FalResult},
    **fal_errors(**{**_ANY_ROUTE, "s422": "The request failed because of its input (error_type says why)."},
                 s400="The request is still in progress, or was cancelled.",
                 s404="No such request for this key.",
                 s410="The request completed, but its clip is no longer in storage (output_gone).",
                 s500="The request failed because of the service (error_type says why)."),
}
CANCEL_RESPONSES = {
    202: {"model": FalCancelled, "description": "Cancelled, or cancellation requested (a running request stops "
                                                "at its next step)."},
    **fal_errors(**_ANY_ROUTE, s400="ALREADY_COMPLETED: the request already ended.",
                 s404="NOT_FOUND: no such request for this key."),
}
#: Query parameters the routes read themselves.
LOGS_PARAMETER = {"name": "logs", "in": "query", "required": False, "description": "1: include the logs.",
                  "schema": {"type": "string", "enum": ["0", "1", "true", "false"]}}
WEBHOOK_PARAMETER = {"name": "fal_webhook", "in": "query", "required": False,
                     "description": "Called with the result when the request ends (fal's webhook body).",
                     "schema": {"type": "string"}}


def _submit_docs(schema: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {"schema": openapi_schema(schema)}},
                            "required": True},
            "parameters": [WEBHOOK_PARAMETER]}


async def without_unusable_default_negative_prompt(service: "VideoService", params):
    """fal's default negative prompt, dropped where the deployed text-to-image model cannot use one
    (SDXL-Turbo at guidance 0, FLUX): the client did not ask for it, so it must not fail the job."""
    guided = params.t2i_guidance_scale is None or params.t2i_guidance_scale > 1
    accepts = True
    if service.text_to_image_info is not None:
        try:
            accepts = (await service.text_to_image_info()).get("negative_prompt", True) is not False
        except Exception:  # noqa: BLE001 - unknown: keep fal's default (the stage still checks it)
            accepts = True
    return params if guided and accepts else params.model_copy(update={"negative_prompt": None})


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


def _accessors(service: "VideoService", tenants: "TenantRegistry"):
    """The tenant dependency, the tenant-scoped job lookup (fal's 404) and the queue position."""
    def tenant_of(authorization: Annotated[str | None, Header()] = None) -> Tenant:
        return tenants.authenticate(authorization)

    async def job_of(tenant: Tenant, request_id: str) -> Job:
        try:
            return await asyncio.to_thread(service.get, tenant, request_id)
        except NotFoundError:
            raise APIError(404, "not_found", f"request {request_id} not found") from None

    async def position_of(job: Job) -> int | None:
        if job.status is not JobStatus.QUEUED:
            return None
        return await asyncio.to_thread(service.store.queue_position, job.id)

    return Annotated[Tenant, Depends(tenant_of)], job_of, position_of


def router(service: "VideoService", tenants: "TenantRegistry", *,
           on_ended: Callable[[str], Awaitable[None]] | None = None) -> APIRouter:
    api = APIRouter(route_class=adapter_route(render), tags=["fal"])

    TenantDep, job_of, position_of = _accessors(service, tenants)

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

    @api.post(prefix, summary=f"fal queue: submit to {app_id} ({app.summary})", responses=SUBMIT_RESPONSES,
              openapi_extra=_submit_docs(app.schema))
    async def submit(request: Request, tenant: TenantDep,
                     idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None):
        return await submit_request(request, tenant, idempotency_key, service, app, url_app, position_of)

    for request_prefix in dict.fromkeys([f"/{url_app}", prefix]):
        add_request_routes(api, request_prefix, url_app, service, TenantDep, job_of, position_of, on_ended)


async def submit_request(request: Request, tenant: Tenant, idempotency_key: str | None, service: "VideoService",
                         app: FalApp, url_app: str, position_of, *, model: str | None = None) -> JSONResponse:
    """One submission to a fal app: ``model`` is the zoo model the app id names (None: the default)."""
    raw = await request.body()
    try:
        body = json_body.loads(raw or b"null")
    except json.JSONDecodeError as error:
        return JSONResponse({"detail": [{"loc": ["body", error.pos], "msg": f"JSON decode error: {error.msg}",
                                         "type": "json_invalid"}]}, status_code=422,
                            headers={"X-Fal-Error-Type": "invalid_parameter"})
    try:
        image_url, params = app.parse(body)
    except FalInputError as error:
        return JSONResponse({"detail": error.detail}, status_code=422,
                            headers={"X-Fal-Error-Type": "invalid_parameter"})
    if params.text_to_video and "negative_prompt" not in body:
        params = await without_unusable_default_negative_prompt(service, params)
    webhook_url = request.query_params.get("fal_webhook") or None
    admission = await service.admit(tenant, image=None, image_url=image_url, params=params, webhook_url=webhook_url,
                                    idempotency_key=idempotency_key, webhook_format="fal",
                                    prompt=params.prompt, model=model)
    job = admission.job
    urls = request_urls(public_base_url(request, service.config.public_url), url_app, job.id)
    return JSONResponse(status_body(job, urls, with_logs=False, queue_position=await position_of(job)))


def zoo_router(service: "VideoService", tenants: "TenantRegistry", *,
               on_ended: Callable[[str], Awaitable[None]] | None = None) -> APIRouter:
    """fal app ids for the zoo: every ``org/name`` image-to-video model this tenant may see is an
    app (``fal_client.submit("acme/svd-anime", ...)``), registered now or later. Its routes match
    any two-segment path, so the app includes this router after all its other routes."""
    api = APIRouter(route_class=adapter_route(render), tags=["fal"])

    TenantDep, job_of, position_of = _accessors(service, tenants)

    def model_of(tenant: Tenant, owner: str, alias: str) -> str:
        model_id = f"{owner}/{alias}"
        entry = service.catalog.get(model_id)
        if entry is None or entry.id != model_id or not entry.visible_to(tenant.name) or entry.kind != "image-to-video":
            raise APIError(404, "not_found", f"application {model_id[:200]!r} not found")
        return model_id

    @api.post("/{owner}/{alias}", summary="fal queue: submit to a zoo model's app id (GET /v1/models lists them)",
              responses={**SUBMIT_RESPONSES, **fal_errors(
                  s404="No such image-to-video model for this tenant (or the path is one of this API's own).",
                  s405="The path is one of this API's own, which another method serves.")},
              openapi_extra=_submit_docs(IMAGE_TO_VIDEO.schema))
    async def submit(owner: str, alias: str, request: Request,
                     authorization: Annotated[str | None, Header()] = None,
                     idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None):
        if owner.lower() in RESERVED_OWNERS:  # the API's own paths answer as they would without this route
            raise StarletteHTTPException(405 if _other_method_matches(request) else 404)
        tenant = tenants.authenticate(authorization)
        model_id = model_of(tenant, owner, alias)
        return await submit_request(request, tenant, idempotency_key, service, IMAGE_TO_VIDEO, model_id,
                                    position_of, model=model_id)

    # For the Allow header of a 405 (serve.api.allow_header): this route serves none of the API's own paths.
    submit.serves_path = lambda path_params: str(path_params.get("owner", "")).lower() not in RESERVED_OWNERS

    add_request_routes(api, "/{owner}/{alias}", None, service, TenantDep, job_of, position_of, on_ended)
    return api


def _other_method_matches(request: Request) -> bool:
    """Whether another route serves this path with another method (Starlette's 405 case)."""
    from starlette.routing import Match

    return any(route.matches(request.scope)[0] is Match.PARTIAL for route in request.app.router.routes)


def add_request_routes(api: APIRouter, prefix: str, url_app: str, service: "VideoService", TenantDep, job_of,
                       position_of, on_ended) -> None:
    """status, status/stream, result and cancel of a request under ``prefix``; answered URLs name
    ``url_app`` (None: the app the request's path names, for the zoo's ``/{owner}/{alias}``)."""
    app_id = prefix.lstrip("/")
    request_path = prefix + "/requests/{request_id}"
    fixed_app = url_app

    def app_of(request: Request) -> str:
        return fixed_app or f"{request.path_params['owner']}/{request.path_params['alias']}"

    # The prefix's own path parameters (the zoo's owner and alias: read from the path, not arguments).
    prefix_parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                         for name in re.findall(r"\{(\w+)\}", prefix)]

    @api.get(request_path + "/status", summary=f"fal queue: status of a {app_id} request",
             responses=STATUS_RESPONSES, openapi_extra={"parameters": [*prefix_parameters, LOGS_PARAMETER]})
    async def status(request: Request, request_id: str, tenant: TenantDep):
        job = await job_of(tenant, request_id)
        urls = request_urls(public_base_url(request, service.config.public_url), app_of(request), job.id)
        return JSONResponse(status_body(job, urls, with_logs=_flag(request.query_params.get("logs")),
                                        queue_position=await position_of(job)))

    @api.get(request_path + "/status/stream", summary=f"fal queue: status of a {app_id} request as server-sent "
             "events until it completes", responses=STREAM_RESPONSES,
             openapi_extra={"parameters": [*prefix_parameters, LOGS_PARAMETER]})
    async def status_stream(request: Request, request_id: str, tenant: TenantDep):
        first = await job_of(tenant, request_id)  # 404 before the stream starts
        urls = request_urls(public_base_url(request, service.config.public_url), app_of(request), first.id)
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

    @api.get(request_path, summary=f"fal queue: result of a {app_id} request", responses=RESULT_RESPONSES,
             openapi_extra={"parameters": prefix_parameters})
    async def result(request: Request, request_id: str, tenant: TenantDep):
        job = await job_of(tenant, request_id)
        if job.status is JobStatus.COMPLETED and job.output is not None:
            if job.output.gone_at is not None:
                raise APIError(410, "output_gone", "the request's clip is no longer in storage")
            base_url = public_base_url(request, service.config.public_url)
            return JSONResponse(result_body(job, base_url, await download_url(service, job, base_url)))
        if not job.status.is_terminal:
            raise APIError(400, "request_in_progress", "Request is still in progress")
        message, code = _error_of(job)
        status_code = 400 if job.status is JobStatus.CANCELLED else 422 if code in CLIENT_ERROR_CODES else 500
        return JSONResponse({"detail": message, "error_type": code}, status_code=status_code,
                            headers={"X-Fal-Error-Type": code})

    @api.put(request_path + "/cancel", summary=f"fal queue: cancel a {app_id} request", status_code=202,
             responses=CANCEL_RESPONSES, openapi_extra={"parameters": prefix_parameters})
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
