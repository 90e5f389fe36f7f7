"""Admission and job views: the logic behind the HTTP routes, with no Ray and no FastAPI.

``VideoService`` validates the image and parameters, stores the image, writes the job record
(before the client gets its 202), and renders jobs for their owner. Everything is tenant-scoped:
another tenant's job id behaves exactly like a missing one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from pipelines.errors import ImageTooLargeError, InvalidImageError, InvalidInputError
from pipelines.images import decode_image_bytes, fetch_image_url
from pipelines.params import GenerationParams

from ..config import AppConfig
from ..jobstore import Job, JobStatus, JobStore
from ..storage import Storage, job_key, job_prefix
from ..telemetry import current_carrier, log_extra, tracer
from ..tenants import Tenant
from ..urlguard import URLPolicy, guarded_client
from .errors import APIError, NotFoundError
from .schemas import ErrorInfo, Output, Progress, VideoJob

logger = logging.getLogger("svd_serve")

#: Rough share of a job's time per stage, for the progress percentage.
_STAGE_SPAN = {"image_encode": (0, 3), "sampling": (3, 88), "decode": (88, 96), "video_encode": (96, 99), "store": (99, 100)}


@dataclass
class Admission:
    job: Job
    created: bool


class VideoService:
    def __init__(
        self,
        config: AppConfig,
        *,
        store: JobStore,
        storage: Storage,
        model_info: Callable[[], Awaitable[dict[str, Any]]],
        on_admitted: Callable[[Job], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.storage = storage
        self.model_info = model_info
        self.on_admitted = on_admitted

    # -- admission ------------------------------------------------------------------------------

    def image_from_url(self, url: str) -> bytes:
        """Bytes of an http(s) image URL (SSRF-checked) or a base64 data URL."""
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise InvalidImageError("image_url: a data URL must be base64 encoded (data:image/png;base64,...)")
            if len(payload) > self.config.max_upload_bytes * 4 // 3 + 4:
                raise ImageTooLargeError(f"image_url: the image is over {self.config.max_upload_bytes} bytes")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidImageError("image_url: the data URL is not valid base64") from None
        URLPolicy(self.config.url_allowlist).check_url(url)  # scheme and form, before any I/O
        with guarded_client(allow=self.config.url_allowlist) as client:
            return fetch_image_url(url, max_bytes=self.config.max_upload_bytes, client=client)

    async def admit(
        self,
        tenant: Tenant,
        *,
        image: bytes,
        params: GenerationParams,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Admission:
        """Validate, store the image, write the job. Raises for anything the client must fix."""
        if idempotency_key is not None and not (1 <= len(idempotency_key) <= 255 and idempotency_key.isprintable()):
            raise InvalidInputError("Idempotency-Key must be 1-255 printable characters")
        with tracer().start_as_current_span("admission", attributes={"svd.tenant": tenant.name}) as span:
            decode_image_bytes(image, max_bytes=self.config.max_upload_bytes, name="image")
            info = await self.model_info()
            resolved = params.resolved(default_num_frames=info["num_frames"])
            fingerprint = hashlib.sha256(
                hashlib.sha256(image).digest() + params.model_dump_json().encode() + (webhook_url or "").encode()
            ).hexdigest()
            job = Job(
                tenant=tenant.name,
                params=resolved.model_dump(mode="json"),
                weight=tenant.weight,
                webhook_url=webhook_url,
                idempotency_key=idempotency_key,
                trace_context=current_carrier(),
            )
            job.input_key = job_key(tenant.name, job.id, "input")
            job.metadata = {
                "output_key": job_key(tenant.name, job.id, f"{job.id}.{resolved.output_format.value}"),
                "fingerprint": fingerprint,
            }
            span.set_attribute("svd.job_id", job.id)
            self.storage.put(job.input_key, image, content_type="application/octet-stream")
            stored, created = self.store.create(job)
            if not created:
                self.storage.delete(job.input_key)
                if stored.metadata.get("fingerprint") != fingerprint:
                    raise APIError(409, "idempotency_key_reused",
                                   "this Idempotency-Key was already used with a different request")
            logger.info("job admitted" if created else "idempotent replay", extra=log_extra(stored.id, tenant=tenant.name))
            if created and self.on_admitted is not None:
                self.on_admitted(stored)
            return Admission(job=stored, created=created)

    # -- reads and changes ----------------------------------------------------------------------

    def get(self, tenant: Tenant, job_id: str) -> Job:
        job = self.store.get(job_id, tenant=tenant.name)
        if job is None:
            raise NotFoundError()
        return job

    def cancel(self, tenant: Tenant, job_id: str) -> Job:
        job = self.store.request_cancel(job_id, tenant=tenant.name)
        if job is None:
            raise NotFoundError()
        if job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
            raise APIError(409, "already_finished", f"the job already {job.status.value}; nothing to cancel")
        return job

    def delete(self, tenant: Tenant, job_id: str) -> None:
        job = self.get(tenant, job_id)
        if not job.status.is_terminal:
            raise APIError(409, "job_running", f"the job is {job.status.value}: cancel it first, then delete it")
        self.storage.delete_prefix(job_prefix(tenant.name, job.id))
        self.store.delete(job_id, tenant=tenant.name)

    def content(self, tenant: Tenant, job_id: str) -> tuple[Job, str | None]:
        """The completed job and a presigned URL (None: stream the bytes from storage)."""
        job = self.get(tenant, job_id)
        if job.status is not JobStatus.COMPLETED or job.output is None:
            raise APIError(409, "not_ready", f"the job is {job.status.value}; content exists once it is completed")
        return job, self.storage.presigned_url(job.output.key, filename=job.output.file_name)

    # -- views ----------------------------------------------------------------------------------

    def view(self, job: Job, base_url: str) -> VideoJob:
        progress = job.progress
        if job.status is JobStatus.COMPLETED:
            percent = 100.0
        elif progress.stage in _STAGE_SPAN:
            low, high = _STAGE_SPAN[progress.stage]
            fraction = progress.step / progress.total_steps if progress.stage == "sampling" and progress.total_steps else 0
            percent = low + (high - low) * fraction
        else:
            percent = 0.0
        output = None
        if job.output is not None:
            output = Output(
                url=f"{base_url.rstrip('/')}/v1/videos/{job.id}/content",
                content_type=job.output.content_type,
                file_name=job.output.file_name,
                file_size=job.output.file_size,
            )
        return VideoJob(
            id=job.id,
            status=job.status.value,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            expires_at=job.expires_at,
            params=job.params,
            queue_position=self.store.queue_position(job.id) if job.status is JobStatus.QUEUED else None,
            progress=Progress(stage=progress.stage, step=progress.step, total_steps=progress.total_steps,
                              percent=round(percent, 1)),
            timings=job.timings,
            error=ErrorInfo(code=job.error.code, message=job.error.message) if job.error else None,
            output=output,
            webhook_url=job.webhook_url,
        )


def parse_params_field(raw: str | None) -> dict[str, Any]:
    """The ``params`` form field of a multipart upload: a JSON object of generation parameters."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"params: not valid JSON ({error.msg} at position {error.pos})") from None
    if not isinstance(value, dict):
        raise InvalidInputError("params: must be a JSON object of generation parameters")
    return value

