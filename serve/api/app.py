"""The HTTP routes. ``create_api`` builds a plain FastAPI app around a ``VideoService`` (so it can
be tested without Ray); ``serve.ingress_deployment.Ingress`` mounts it as the Serve ingress."""


import asyncio
import json
from typing import Annotated, Any, Literal, Sequence

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from pydantic import WithJsonSchema

from pipelines.errors import InvalidInputError

from .models import router as models_router
from ..jobstore import Job, JobStatus
from ..tenants import Tenant, TenantRegistry
from .allow_header import AllowHeaderMiddleware
from .compat import compat_routers
from .compat.fal.routes import zoo_router as fal_zoo_router
from .playground import playground_router
from . import json_body
from .errors import APIError, ErrorBody, RequestTooLarge, install_error_handlers
from .base_url import public_base_url
from .follow import KEEPALIVE, follow_job
from .forms import SubmitForm, multipart_schema, read_submit_form
from .schemas import (CreateVideoRequest, VideoDeleted, VideoJob, VideoJobList, openapi_schema, parse_seconds,
                      sse_event_schema)
from .content import CONTENT_VARIANTS
from .service import VideoService

MULTIPART_OVERHEAD = 64 * 1024

#: ``openai-poll-after-ms`` on a job that has not ended: how long a polling client (the OpenAI
#: SDK's ``poll`` / ``create_and_poll``) waits before asking again.
POLL_AFTER_MS = {JobStatus.QUEUED: 1000, JobStatus.IN_PROGRESS: 500}

#: Every rejection of the native routes, for the docs; each route lists those it can answer
#: (:func:`rejections`), all with the one error body.
REJECTION_DOCS = {
    401: "Missing or invalid API key.",
    403: "The tenant may not use this model (allowed_models).",
    404: "No such job for this tenant.",
    409: "The job is not in a state that allows this.",
    410: "The job completed, but its clip is no longer in storage (output_gone).",
    413: "The request or image is too large.",
    415: "The body is neither application/json nor multipart/form-data.",
    422: "Invalid image or parameter, or over a tenant cap (or a header or path value this API cannot read).",
    429: "Over the tenant's rate limit or queue size (see Retry-After).",
    503: "A backing service (job store, storage, model) is unavailable; retry after Retry-After.",
}


def rejections(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a native route: the error body for each status in ``codes``
    (``descriptions``: ``s404="..."`` words it for this route)."""
    return {code: {"model": ErrorBody, "description": descriptions.get(f"s{code}", REJECTION_DOCS[code])}
            for code in codes}


#: What the content route serves: the clip in its output_format, or the thumbnail (a JPEG).
CONTENT_TYPES = ("video/mp4", "video/webm", "image/gif", "image/jpeg")
#: ``cursor``: what ``next_cursor`` holds (unpadded base64url); documentation of the opaque token.
CURSOR_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9_-]+={0,2}$", "maxLength": 512,
                 "description": "next_cursor of the previous page"}


class BodyLimitMiddleware:
    """Rejects bodies over the limit with 413 while they stream in, Content-Length or not."""

    def __init__(self, app, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except RequestTooLarge:
            await _too_large(send, self.max_bytes)


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"error": {"code": "request_too_large", "message": f"the request body is over {limit} bytes"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_api(service: VideoService, tenants: TenantRegistry, *, ready=None, on_ended=None,
               routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI app. ``ready`` is an async callable raising when the service cannot take work;
    ``on_ended(job_id)`` is awaited when a request ends a job (cancelling a queued one)."""
    app = FastAPI(
        title="svd-serve",
        version="0.1.0",
        description="Image-to-video generation with Stable Video Diffusion: submit a job, follow it, download the clip.",
    )
    install_error_handlers(app)
    for router in [*routers, *compat_routers(service, tenants, on_ended=on_ended), playground_router()]:
        app.include_router(router)
    app.include_router(models_router(service, tenants))
    # base64 inflates by 4/3; multipart adds a little framing.
    app.add_middleware(AllowHeaderMiddleware)  # every 405 names the methods its path serves
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.config.max_upload_bytes * 4 // 3 + MULTIPART_OVERHEAD)

    def tenant_of(authorization: Annotated[str | None, Header()] = None) -> Tenant:
        return tenants.authenticate(authorization)

    TenantDep = Annotated[Tenant, Depends(tenant_of)]

    def base_url(request: Request) -> str:
        return public_base_url(request, service.config.public_url)

    async def call(fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    def job_headers(job: Job) -> dict[str, str]:
        wait = POLL_AFTER_MS.get(job.status)
        return {"openai-poll-after-ms": str(wait)} if wait is not None else {}

    def job_response(job: Job, request: Request, status_code: int = 200, headers: dict[str, str] | None = None):
        view = service.view(job, base_url(request))
        return JSONResponse(view.model_dump(mode="json"), status_code=status_code,
                            headers={**job_headers(job), **(headers or {})})

    @app.post("/v1/videos", status_code=202, response_model=VideoJob,
              responses=rejections(401, 403, 404, 409, 413, 415, 422, 429, 503,
                                   s404="No such model for this tenant (model_not_found).",
                                   s409="The Idempotency-Key was used with a different request."),
              summary="Submit an image-to-video or text-to-video job",
              description="Native fields, or OpenAI's (prompt, input_reference, model, seconds, size): "
                          "docs/compatibility.md.",
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": openapi_schema(CreateVideoRequest)},
                  "multipart/form-data": {"schema": multipart_schema()}},
                  "required": True}})
    async def create_video(
        request: Request,
        tenant: TenantDep,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ):
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await read_submit_form(request, max_image_bytes=service.config.max_upload_bytes)
        elif content_type.startswith("application/json") or not content_type:
            raw = await request.body()
            try:
                body = json_body.loads(raw or b"null")
            except json.JSONDecodeError as error:
                raise InvalidInputError(f"the body is not valid JSON ({error.msg} at position {error.pos})") from None
            if not isinstance(body, dict):
                raise InvalidInputError("the body must be a JSON object with image_url and generation parameters")
            create = CreateVideoRequest.model_validate(body)
            form = SubmitForm(image=None, image_url=create.image_source(), params=create.generation_params(),
                              webhook_url=create.webhook_url, webhook_events=create.webhook_events,
                              prompt=create.prompt, model=create.model,
                              seconds=parse_seconds(create.seconds) if create.seconds is not None else None)
        else:
            raise APIError(415, "unsupported_media_type", "send application/json or multipart/form-data")
        admission = await service.admit(tenant, image=form.image, image_url=form.image_url, params=form.params,
                                        webhook_url=form.webhook_url,
                                        webhook_events=form.webhook_events, idempotency_key=idempotency_key,
                                        prompt=form.prompt, model=form.model, seconds=form.seconds)
        headers = {"Location": f"/v1/videos/{admission.job.id}"}
        if not admission.created:
            headers["Idempotent-Replayed"] = "true"
        return job_response(admission.job, request, 202, headers)

    @app.get("/v1/videos", response_model=VideoJobList,
             responses=rejections(401, 404, 422, 503, s404="after: no such job for this tenant."),
             summary="List jobs, newest first (order=asc: oldest first)")
    async def list_videos(
        request: Request,
        tenant: TenantDep,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page"),
                          WithJsonSchema(CURSOR_SCHEMA)] = None,
        after: Annotated[str | None, Query(description="The last_id of the previous page (OpenAI's)")] = None,
        order: Annotated[Literal["desc", "asc"], Query(description="By creation time")] = "desc",
        status: JobStatus | None = None,
    ):
        if cursor is not None and after is not None:
            raise InvalidInputError("give cursor or after, not both")
        try:
            jobs, next_cursor = await call(service.store.list, tenant.name, limit=limit, cursor=cursor, after=after,
                                           order=order, status=status)
        except ValueError:
            if after is not None:  # a missing id, or another tenant's: this API's 404
                raise APIError(404, "not_found", f"after: video {after!r} not found") from None
            raise InvalidInputError("cursor: not a cursor returned by this API") from None
        data = [service.view(job, base_url(request)) for job in jobs]
        return VideoJobList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                            has_more=next_cursor is not None, next_cursor=next_cursor)

    @app.get("/v1/videos/{job_id}", response_model=VideoJob, responses=rejections(401, 404, 422, 503),
             summary="A job's status",
             description="While the job has not ended, the openai-poll-after-ms header says when to ask again.")
    async def get_video(request: Request, job_id: str, tenant: TenantDep):
        return job_response(await call(service.get, tenant, job_id), request)

    @app.post("/v1/videos/{job_id}/cancel", response_model=VideoJob,
              responses=rejections(401, 404, 409, 422, 503, s409="The job already completed or failed."),
              summary="Cancel a job")
    async def cancel_video(request: Request, job_id: str, tenant: TenantDep):
        job, ended_now = await call(service.cancel, tenant, job_id)
        if ended_now and on_ended is not None:
            await on_ended(job.id)
        return job_response(job, request)

    @app.delete("/v1/videos/{job_id}", response_model=VideoDeleted,
                responses=rejections(401, 404, 409, 422, 503, s409="The job has not ended: cancel it first."),
                summary="Delete a finished job and its stored files")
    async def delete_video(job_id: str, tenant: TenantDep):
        job = await call(service.delete, tenant, job_id)
        return VideoDeleted(id=job.id)

    @app.get("/v1/videos/{job_id}/content",
             responses={**rejections(401, 404, 409, 410, 422, 503, s409="The job has not completed (not_ready).",
                                     s422="variant is not video or thumbnail."),
                        200: {"description": "The clip, or its first frame (variant=thumbnail)",
                              "content": {kind: {"schema": {"type": "string", "format": "binary"}}
                                          for kind in CONTENT_TYPES}},
                        307: {"description": "Redirect to a presigned URL"}},
             summary="Download the clip (variant=thumbnail: its first frame, a JPEG)")
    async def get_content(
        job_id: str,
        tenant: TenantDep,
        variant: Annotated[str, Query(description=f"{' or '.join(CONTENT_VARIANTS)}"),
                           WithJsonSchema({"type": "string", "enum": list(CONTENT_VARIANTS)})] = "video",
    ):
        content = await call(service.content, tenant, job_id, variant)
        if content.presigned_url:
            return RedirectResponse(content.presigned_url, status_code=307)
        chunks = await call(service.storage.iter_chunks, content.key)
        return StreamingResponse(
            _iterate_in_thread(chunks), media_type=content.content_type,
            headers={"Content-Disposition": f'attachment; filename="{content.file_name}"',
                     "Content-Length": str(content.size)},
        )

    @app.get("/v1/videos/{job_id}/events",
             responses={**rejections(401, 404, 422, 503),
                        200: {"description": "Server-sent events until the job ends: `status` when its status "
                                             "changes, `progress` when its progress does; each data a job object",
                              "content": {"text/event-stream": {"schema": sse_event_schema(
                                  "VideoJob", events=("status", "progress"), with_id=True)}}}},
             summary="Server-sent events until the job ends")
    async def job_events(request: Request, job_id: str, tenant: TenantDep):
        first = await call(service.get, tenant, job_id)  # 404 before the stream starts
        url = base_url(request)

        async def stream():
            # An event when the rendered view changed (lease renewals change the record, not the view).
            last, status = None, None
            async for job in follow_job(service.store, first, tenant=tenant.name, request=request):
                if job is KEEPALIVE:
                    yield ": keep-alive\n\n"
                    continue
                payload = service.view(job, url).model_dump_json()
                if payload != last:
                    event = "status" if job.status != status else "progress"
                    last, status = payload, job.status
                    yield f"event: {event}\nid: {job.version}\ndata: {payload}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: job store, storage and models reachable",
             responses=rejections(503, s503="Not ready: the job store, storage or a model is unavailable."))
    async def readyz():
        try:
            if not await call(service.store.ping) or not await call(service.storage.ping):
                raise RuntimeError("a backing service did not answer")
            if ready is not None:
                await ready()
        except Exception:
            raise APIError(503, "not_ready", "the service is starting or a backing service is unavailable",
                           {"Retry-After": "5"}) from None
        return {"status": "ready"}

    # Last: fal app ids of zoo models match any /{owner}/{alias} path the routes above do not.
    app.include_router(fal_zoo_router(service, tenants, on_ended=on_ended))
    return app


async def _iterate_in_thread(chunks):
    iterator = iter(chunks)
    sentinel = object()
    while True:
        chunk = await asyncio.to_thread(next, iterator, sentinel)
        if chunk is sentinel:
            return
        yield chunk
