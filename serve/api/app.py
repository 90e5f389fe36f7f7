"""The HTTP routes. ``create_api`` builds a plain FastAPI app around a ``VideoService`` (so it can
be tested without Ray); ``serve.ingress_deployment.Ingress`` mounts it as the Serve ingress."""


import asyncio
import json
import time
from typing import Annotated, Any, Sequence

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from pipelines.errors import InvalidInputError

from ..jobstore import JobStatus
from ..tenants import Tenant, TenantRegistry
from .compat import compat_routers
from .playground import playground_router
from .errors import APIError, ErrorBody, install_error_handlers
from .forms import multipart_schema, read_submit_form
from .schemas import CreateVideoRequest, VideoJob, VideoJobList
from .service import VideoService

EVENTS_WAKE_S = 1.0  # disconnect checks and keep-alives, between change notices
EVENTS_RECHECK_S = 5.0  # re-read even without a notice (notices are hints, the store is the truth)
EVENTS_HEARTBEAT_S = 15.0
MULTIPART_OVERHEAD = 64 * 1024

REJECTIONS = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key."},
    403: {"model": ErrorBody, "description": "The tenant may not use this model."},
    404: {"model": ErrorBody, "description": "No such job for this tenant."},
    409: {"model": ErrorBody, "description": "The job is not in a state that allows this."},
    413: {"model": ErrorBody, "description": "The request or image is too large."},
    422: {"model": ErrorBody, "description": "Invalid image or parameter, or over a tenant cap."},
    429: {"model": ErrorBody, "description": "Over the tenant's rate limit or queue size (see Retry-After)."},
    503: {"model": ErrorBody, "description": "A backing service is unavailable."},
}


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
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(send, self.max_bytes)


class _BodyTooLarge(Exception):
    pass


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
    # base64 inflates by 4/3; multipart adds a little framing.
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.config.max_upload_bytes * 4 // 3 + MULTIPART_OVERHEAD)

    def tenant_of(authorization: Annotated[str | None, Header()] = None) -> Tenant:
        return tenants.authenticate(authorization)

    TenantDep = Annotated[Tenant, Depends(tenant_of)]

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def call(fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    @app.post("/v1/videos", status_code=202, response_model=VideoJob, responses=REJECTIONS,
              summary="Submit an image-to-video job",
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": CreateVideoRequest.model_json_schema()},
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
            image, params, webhook_url, webhook_events = form.image, form.params, form.webhook_url, form.webhook_events
        elif content_type.startswith("application/json") or not content_type:
            raw = await request.body()
            try:
                body = json.loads(raw or b"null")
            except json.JSONDecodeError as error:
                raise InvalidInputError(f"the body is not valid JSON ({error.msg} at position {error.pos})") from None
            if not isinstance(body, dict):
                raise InvalidInputError("the body must be a JSON object with image_url and generation parameters")
            create = CreateVideoRequest.model_validate(body)
            image = await call(service.image_from_url, create.image_url)
            params, webhook_url, webhook_events = create.generation_params(), create.webhook_url, create.webhook_events
        else:
            raise APIError(415, "unsupported_media_type", "send application/json or multipart/form-data")
        admission = await service.admit(tenant, image=image, params=params, webhook_url=webhook_url,
                                        webhook_events=webhook_events, idempotency_key=idempotency_key)
        view = service.view(admission.job, base_url(request))
        headers = {"Location": f"/v1/videos/{view.id}"}
        if not admission.created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(view.model_dump(mode="json"), status_code=202, headers=headers)

    @app.get("/v1/videos", response_model=VideoJobList, responses=REJECTIONS, summary="List jobs, newest first")
    async def list_videos(
        request: Request,
        tenant: TenantDep,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: str | None = None,
        status: JobStatus | None = None,
    ):
        try:
            jobs, next_cursor = await call(service.store.list, tenant.name, limit=limit, cursor=cursor, status=status)
        except ValueError:
            raise InvalidInputError("cursor: not a cursor returned by this API") from None
        return VideoJobList(data=[service.view(job, base_url(request)) for job in jobs],
                            next_cursor=next_cursor, has_more=next_cursor is not None)

    @app.get("/v1/videos/{job_id}", response_model=VideoJob, responses=REJECTIONS, summary="A job's status")
    async def get_video(request: Request, job_id: str, tenant: TenantDep):
        return service.view(await call(service.get, tenant, job_id), base_url(request))

    @app.post("/v1/videos/{job_id}/cancel", response_model=VideoJob, responses=REJECTIONS, summary="Cancel a job")
    async def cancel_video(request: Request, job_id: str, tenant: TenantDep):
        job, ended_now = await call(service.cancel, tenant, job_id)
        if ended_now and on_ended is not None:
            await on_ended(job.id)
        return service.view(job, base_url(request))

    @app.delete("/v1/videos/{job_id}", status_code=204, responses=REJECTIONS,
                summary="Delete a finished job and its stored files")
    async def delete_video(job_id: str, tenant: TenantDep):
        await call(service.delete, tenant, job_id)
        return Response(status_code=204)

    @app.get("/v1/videos/{job_id}/content", responses={**REJECTIONS, 200: {"content": {"video/mp4": {}}},
                                                        307: {"description": "Redirect to a presigned URL"}},
             summary="Download the clip")
    async def get_content(job_id: str, tenant: TenantDep):
        job, presigned = await call(service.content, tenant, job_id)
        if presigned:
            return RedirectResponse(presigned, status_code=307)
        chunks = service.storage.iter_chunks(job.output.key)
        return StreamingResponse(
            _iterate_in_thread(chunks), media_type=job.output.content_type,
            headers={"Content-Disposition": f'attachment; filename="{job.output.file_name}"',
                     "Content-Length": str(job.output.file_size)},
        )

    @app.get("/v1/videos/{job_id}/events", responses={**REJECTIONS, 200: {"content": {"text/event-stream": {}}}},
             summary="Server-sent events until the job ends")
    async def job_events(request: Request, job_id: str, tenant: TenantDep):
        first = await call(service.get, tenant, job_id)  # 404 before the stream starts
        url = base_url(request)

        async def stream():
            # The store announces every change of the job: wake on it, re-read, and send an event
            # when the rendered view changed (lease renewals change the record, not the view).
            # The disconnect check and the keep-alive run on a short timer; no store reads then.
            last, status, beat = None, None, time.monotonic()
            with service.store.changes.watch(job_id) as watch:
                job = first
                while job is not None:
                    payload = service.view(job, url).model_dump_json()
                    if payload != last:
                        event = "status" if job.status != status else "progress"
                        last, status = payload, job.status
                        yield f"event: {event}\nid: {job.version}\ndata: {payload}\n\n"
                        if job.status.is_terminal:
                            return
                    changed = False
                    waited = time.monotonic()
                    while not changed:
                        if await request.is_disconnected():
                            return
                        if time.monotonic() - beat >= EVENTS_HEARTBEAT_S:
                            beat = time.monotonic()
                            yield ": keep-alive\n\n"
                        # A lost notice costs at most EVENTS_RECHECK_S, never a stuck stream.
                        changed = await watch.changed(EVENTS_WAKE_S) or time.monotonic() - waited >= EVENTS_RECHECK_S
                    job = await call(service.store.get, job_id, tenant=tenant.name)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: job store, storage and models reachable",
             responses={503: {"model": ErrorBody}})
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

    return app


async def _iterate_in_thread(chunks):
    iterator = iter(chunks)
    sentinel = object()
    while True:
        chunk = await asyncio.to_thread(next, iterator, sentinel)
        if chunk is sentinel:
            return
        yield chunk
