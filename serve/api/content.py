"""What ``GET /v1/videos/{id}/content`` serves: the completed job's clip or its first frame, from
storage or through a presigned URL, checked to exist before any redirect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..jobstore import THUMBNAIL_CONTENT_TYPE, JobStatus
from ..storage import ObjectNotFound
from ..tenants import Tenant
from .errors import APIError
from .schemas import invalid

if TYPE_CHECKING:
    from .service import VideoService


@dataclass(frozen=True)
class Content:
    """What ``GET /v1/videos/{id}/content`` serves: an object in storage, or a presigned URL to it."""

    key: str
    content_type: str
    file_name: str
    size: int
    presigned_url: str | None


#: ``variant`` of the content endpoint (OpenAI's names; no spritesheet here).
CONTENT_VARIANTS = ("video", "thumbnail")


def content_of(service: "VideoService", tenant: Tenant, job_id: str, variant: str = "video") -> Content:
    """The completed job's clip (``video``) or its first frame (``thumbnail``, a JPEG), with a
    presigned URL where the storage has them (None: stream the bytes from storage)."""
    if variant not in CONTENT_VARIANTS:
        raise invalid("variant", f"{variant!r} is not available; use {' or '.join(CONTENT_VARIANTS)}")
    job = service.get(tenant, job_id)
    if job.status is not JobStatus.COMPLETED or job.output is None:
        raise APIError(409, "not_ready", f"the job is {job.status.value}; content exists once it is completed")
    output = job.output
    if variant == "video":
        key, content_type, file_name, size = output.key, output.content_type, output.file_name, output.file_size
        try:  # checked before any redirect: a presigned URL to a missing object is the store's 403
            service.storage.size(key)
        except ObjectNotFound:
            service.store.mark_output_gone(job.id)  # as the janitor's sweep would
            raise APIError(410, "output_gone", "this job's clip is no longer in storage (deleted or expired "
                           "there); submit the job again") from None
    else:
        key, content_type = output.thumbnail_key, THUMBNAIL_CONTENT_TYPE
        file_name = f"{job.id}.thumbnail.jpg"
        try:
            size = service.storage.size(key)
        except ObjectNotFound:
            raise APIError(404, "not_found", "this clip has no thumbnail (it was stored before thumbnails "
                           "existed, or its first frame could not be extracted)") from None
    return Content(key=key, content_type=content_type, file_name=file_name, size=size,
                   presigned_url=service.storage.presigned_url(key, filename=file_name))
