"""``GET /files/{key}?expires=...&signature=...``: the public route behind signed URLs of a storage
backend that has no presigned URLs of its own (local; see ``LocalStorage.signed_url``).

No API key: the signature is the credential. The route checks, in this order, the HMAC signature
(constant time) over the key, the expiry and the optional ``filename`` / ``content_type``
overrides (403 ``invalid_signature``), the expiry (403 ``url_expired``), and that the key is the
output of a completed job (404 otherwise; a key is never read as a path, so nothing else under the
storage root, the signing key file included, can be served). Then it streams the file.
Rejections use the native error body ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from ...jobstore import JobStatus
from ...storage import ObjectNotFound, job_key
from ...storage.base import SIGNED_URL_PATH, SignedURLError
from ...storage.s3 import content_disposition
from ..errors import APIError, ErrorBody, NotFoundError, Rejection, adapter_route, error_response

if TYPE_CHECKING:
    from ...tenants import TenantRegistry
    from ..service import VideoService


def render(rejection: Rejection) -> JSONResponse:
    return error_response(rejection.status, rejection.code, rejection.message, rejection.headers or None)


def router(service: "VideoService", tenants: "TenantRegistry", *, on_ended=None) -> APIRouter:
    api = APIRouter(route_class=adapter_route(render), tags=["Signed files"])
    storage, store = service.storage, service.store

    @api.get(f"{SIGNED_URL_PATH}/{{key:path}}", summary="Download a file through a signed URL (no API key)",
             responses={200: {"description": "The file, as the content_type the URL was signed with (else its "
                                              "stored type: the clip's video/mp4, video/webm or image/gif)",
                              "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                        403: {"model": ErrorBody, "description": "The signature does not match, or the URL has "
                                                                 "expired."},
                        404: {"model": ErrorBody, "description": "No such stored output."},
                        410: {"model": ErrorBody, "description": "The clip is no longer in storage (output_gone)."},
                        422: {"model": ErrorBody, "description": "A query value this API cannot read."},
                        503: {"model": ErrorBody, "description": "Storage or the job store is unavailable."}})
    async def signed_file(key: str, expires: str = "", signature: str = "", filename: str | None = None,
                          content_type: str | None = None):
        try:
            storage.verify_signed_url(key, expires=int(expires), signature=signature, filename=filename,
                                      content_type=content_type)
        except SignedURLError as error:
            code = "url_expired" if error.reason == "expired" else "invalid_signature"
            raise APIError(403, code, f"{error}; ask the API for a new URL") from None
        except ValueError:  # expires is not a number, or the key is malformed
            raise APIError(403, "invalid_signature", "the URL's signature does not match") from None
        tenant, _, rest = key.partition("/")
        job_id, _, name = rest.partition("/")
        try:
            job_key(tenant, job_id, name)
        except ValueError:
            raise NotFoundError("file") from None
        job = await asyncio.to_thread(store.get, job_id, tenant=tenant)
        if job is None or job.status is not JobStatus.COMPLETED or job.output is None or job.output.key != key:
            raise NotFoundError("file")
        output = job.output
        try:
            chunks = await asyncio.to_thread(storage.iter_chunks, key)
        except ObjectNotFound:
            await asyncio.to_thread(store.mark_output_gone, job.id)
            raise APIError(410, "output_gone", "this clip is no longer in storage (deleted or expired there)") from None
        headers = {"Content-Length": str(output.file_size), "Cache-Control": "private"}
        if filename:
            headers["Content-Disposition"] = content_disposition(filename)
        # A plain iterator: Starlette reads it in a worker thread.
        return StreamingResponse(chunks, media_type=content_type or output.content_type, headers=headers)

    return api
