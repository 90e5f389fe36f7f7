"""Admission and job views: the logic behind the HTTP routes, with no Ray and no FastAPI.

``VideoService`` validates the image and parameters, stores the image, writes the job record
(before the client gets its 202), and renders jobs for their owner. Everything is tenant-scoped:
another tenant's job id behaves exactly like a missing one.

Admission applies the tenant's policy (``serve.tenants.TenantPolicy``, see docs/tenants.md) before
anything is stored, in this order:

1. the model: ``model`` (none: the default model) must name a model of the zoo this tenant may
   see (404 ``model_not_found``: unknown, or another tenant's private model) and that its
   ``allowed_models`` admits (403 ``model_not_allowed``); its defaults fill what the request left
   out (over the deployment's ``default_params``), and its limits bound the request (422);
2. a known ``Idempotency-Key``: the existing job is returned (or 409 if the request differs). A
   replay is looked up *before* the quota checks, so a retried submit never spends a rate-limit
   token and is never refused for a quota (a race with a concurrent first submit can still
   spend one token, once);
3. OpenAI's ``seconds`` becomes ``num_frames`` (round(seconds x output fps), at most the model's
   and the tenant's frame limits); caps on frames, resolution and steps: 422 ``limit_exceeded``
   naming each limit; a ``webhook_url`` needs a tenant webhook secret and must pass the SSRF
   checks (422);
4. ``max_queued_jobs`` reached: 429 ``queue_full`` with Retry-After. A full queue is this
   tenant's quota, not a service outage, hence 429 and not 503. It is read early (a cheap
   refusal) and enforced when the job is written (the store counts and inserts atomically, so
   concurrent submits never overshoot it, on SQLite or Redis, from any number of ingresses);
5. the rate limit: a token bucket in the job store, shared by every ingress replica: 429
   ``rate_limited`` with Retry-After (seconds until the next token);
6. then the image is decoded (its errors are 422/413), stored, and the job written.

Text-to-video is a request with a prompt and no image: ``params.prompt`` is set, no input is
stored, and the route starts with the text-to-image stage. A long clip (``duration_s``) must fit
``max_duration_s`` and ``max_segments``; both are checked before any quota is spent.

``max_running_jobs`` never rejects: it is stamped on the job (``job.policy``) and
the dispatcher (:func:`serve.scheduler.pick_next`) skips a tenant at its cap.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from pipelines.errors import ImageTooLargeError, InvalidImageError, InvalidInputError
from pipelines.images import decode_image_bytes, fetch_image_url
from pipelines.params import GenerationParams
from pipelines.registry import STAGES
from pipelines.segments import SegmentPlan, plan_for

from ..config import AppConfig
from ..jobstore import (
    AdmissionPolicy,
    Job,
    JobStatus,
    JobStore,
    QueueFullError,
    WebhookSubscription,
    utcnow,
)
from ..storage import Storage, job_key, job_prefix
from ..telemetry import current_carrier, log_extra, tracer
from ..tenants import Tenant
from ..urlguard import URLPolicy, guarded_client
from ..zoo import ModelCatalog, ModelEntry, ModelNotAllowedError, NotAVideoModelError, UnknownModelError
from ..webhooks import check_webhook_url, normalize_events
from .errors import APIError, NotFoundError
from .schemas import MAX_PROMPT_CHARS, VideoJob, invalid
from .content import Content, content_of
from .request_params import check_limits, params_for_seconds, with_defaults
from .views import job_view

logger = logging.getLogger("ray.serve.svd_serve")

#: Retry-After of a 429 queue_full: the queue drains at the pace of whole jobs, so a short hint.
QUEUE_FULL_RETRY_AFTER_S = 10

#: Token bucket of a tenant's submissions in the job store.
SUBMIT_BUCKET = "submit:{tenant}"


def queue_full(depth: int, limit: int) -> APIError:
    """429 ``queue_full`` with Retry-After: the tenant has ``depth`` queued jobs, ``limit`` allowed."""
    return APIError(429, "queue_full", f"queue full: this tenant has {depth} queued jobs and may have at most "
                    f"{limit} (max_queued_jobs); retry once some have started",
                    {"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})


@dataclass
class Admission:
    job: Job
    created: bool


def _named(field: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, its input errors naming ``field`` (once)."""
    try:
        return function(*args)
    except InvalidInputError as error:
        raise type(error)(f"{field}: {str(error).removeprefix(field + ': ')}") from None


class VideoService:
    def __init__(
        self,
        config: AppConfig,
        *,
        store: JobStore,
        storage: Storage,
        model_info: Callable[..., Awaitable[dict[str, Any]]],
        text_to_image_info: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        catalog: ModelCatalog | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog if catalog is not None else ModelCatalog(config, None)
        self.store = store
        self.storage = storage
        self.model_info = model_info
        self.text_to_image_info = text_to_image_info

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
        image: bytes | None,
        params: GenerationParams,
        image_url: str | None = None,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        idempotency_key: str | None = None,
        webhook_format: str = "native",
        prompt: str | None = None,
        model: str | None = None,
        seconds: float | None = None,
    ) -> Admission:
        """Validate, store the image (none for text-to-video: ``params.prompt`` instead), write
        the job. Raises for anything the client must fix. The image comes as bytes, or as
        ``image_url`` (http(s) or a data URL), fetched only once the quota checks passed.
        ``webhook_format`` names the adapter whose webhook shape the job's events take; ``prompt``
        is stored with the job; ``model`` names a model of the zoo (None: the default); ``seconds``
        (instead of ``params.num_frames``) sets the clip's length."""
        if image is not None and image_url is not None:
            raise InvalidInputError("give the image as a file or as a URL, not both")
        try:
            events = sorted(normalize_events(webhook_events)) if webhook_events else []
        except ValueError as error:
            raise invalid("webhook_events", str(error)) from None
        if events and not webhook_url:
            raise InvalidInputError("webhook_events: given without a webhook_url to send them to")
        if idempotency_key is not None and not (1 <= len(idempotency_key) <= 255 and idempotency_key.isprintable()):
            raise InvalidInputError("Idempotency-Key must be 1-255 printable characters")
        if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
            raise invalid("prompt", f"at most {MAX_PROMPT_CHARS} characters")
        policy = tenant.policy
        with tracer().start_as_current_span("admission", attributes={"svd.tenant": tenant.name}) as span:
            entry = self.model_for(tenant, model)
            span.set_attribute("svd.model", entry.id)
            if (params.text_to_video and self.config.text_to_image_model is not None
                    and not policy.allows_model(self.config.text_to_image_model.source)):
                raise APIError(403, "model_not_allowed",
                               "this tenant may not use the text-to-image model that makes text-to-video's first "
                               f"frame (allowed_models: {', '.join(policy.allowed_models)}); send an image")
            params = with_defaults(params, self.config.default_params, seconds_given=seconds is not None, model=entry)
            if seconds is not None:
                if params.num_frames is not None or params.duration_s is not None:
                    raise invalid("seconds", "give seconds, or num_frames or duration_s, not both")
                if params.interpolates:  # retimed frames span the clip's length: seconds is that length
                    params = GenerationParams.model_validate({**params.model_dump(), "duration_s": seconds})
                else:
                    params = params_for_seconds(policy, params, seconds, model=entry)
            self.check_source(image is not None or image_url is not None, params)
            source = image if image is not None else json.dumps(image_url).encode()  # ASCII: any str hashes
            fingerprint = hashlib.sha256(
                hashlib.sha256(source).digest() + params.model_dump_json().encode()
                + json.dumps([webhook_url, events]).encode()
                + (b"" if prompt is None else json.dumps({"prompt": prompt}).encode())
                + json.dumps({"model": entry.id}).encode()
            ).hexdigest()
            if idempotency_key is not None:
                existing = self.store.find_by_idempotency_key(tenant.name, idempotency_key)
                if existing is not None:
                    return self._replay(tenant, existing, fingerprint)
            frames = params.num_frames or await self._model_frames(entry)
            resolved = params.resolved(default_num_frames=frames)
            plan = self.check_length(resolved)
            check_limits(policy, resolved, plan, model=entry)
            if resolved.text_to_video and self.text_to_image_info is not None:
                self.check_size(resolved, await self._text_to_image_info_or_none())
            if webhook_url is not None:
                if not tenant.webhook_secret:
                    raise APIError(422, "webhook_unavailable", "this tenant has no webhook secret to sign "
                                   "webhooks with; ask the operator to run 'svd-serve tenants rotate --webhook-secret'")
                URLPolicy(self.config.url_allowlist).check_url(webhook_url)  # its form; DNS after the quota
            if image_url is not None and not image_url.startswith("data:"):
                _named("image_url", URLPolicy(self.config.url_allowlist).check_url, image_url)
            # The quota, then the expensive work: a tenant over its limits causes no DNS lookup, no
            # fetch and no decoding.
            self.check_quota(tenant)
            if webhook_url is not None:
                await asyncio.to_thread(check_webhook_url, webhook_url, self.config.url_allowlist)
            if image_url is not None:
                image = await asyncio.to_thread(_named, "image_url", self.image_from_url, image_url)
            if image is not None:
                await asyncio.to_thread(decode_image_bytes, image, max_bytes=self.config.max_upload_bytes,
                                        name="image")
            job = Job(
                tenant=tenant.name,
                params=resolved.model_dump(mode="json"),
                model=entry.id,
                prompt=prompt,
                route=[spec.name for spec in STAGES.route(resolved)],
                fingerprint=fingerprint,
                policy=AdmissionPolicy(weight=tenant.weight, max_running_jobs=policy.max_running_jobs,
                                       retention_s=policy.retention_s),
                webhook=WebhookSubscription(url=webhook_url, events=events, format=webhook_format)
                if webhook_url else None,
                idempotency_key=idempotency_key,
                trace_context=current_carrier(),
            )
            job.output_key = job_key(tenant.name, job.id, f"{job.id}.{resolved.output_format.value}")
            span.set_attribute("svd.job_id", job.id)
            if image is not None:
                job.input_key = job_key(tenant.name, job.id, "input")
                self.storage.put(job.input_key, image, content_type="application/octet-stream")
            # The job exists from the moment its record is written (queue order and queue wait
            # count from here), not from when admission began storing its input.
            job.created_at = job.updated_at = utcnow()
            try:  # the authoritative queue check: counted and inserted atomically (replays pass)
                stored, created = self.store.create(job, max_queued=policy.max_queued_jobs)
            except QueueFullError as full:
                if job.input_key:
                    self.storage.delete(job.input_key)
                raise queue_full(full.depth, full.limit) from None
            if not created:
                if job.input_key:
                    self.storage.delete(job.input_key)
                return self._replay(tenant, stored, fingerprint)
            logger.info("job admitted", extra=log_extra(stored.id, tenant=tenant.name))
            return Admission(job=stored, created=True)

    @staticmethod
    def _replay(tenant: Tenant, existing: Job, fingerprint: str) -> Admission:
        """The job an earlier request with the same Idempotency-Key made, or 409 if it differs."""
        if existing.fingerprint != fingerprint:
            raise APIError(409, "idempotency_key_reused",
                           "this Idempotency-Key was already used with a different request")
        logger.info("idempotent replay", extra=log_extra(existing.id, tenant=tenant.name))
        return Admission(job=existing, created=False)

    def model_for(self, tenant: Tenant, model: str | None) -> ModelEntry:
        """The image-to-video model a request names (None: the default): 404 ``model_not_found``
        for one this tenant cannot see (unknown, or another tenant's private model: the same
        answer), 403 ``model_not_allowed`` for one its ``allowed_models`` excludes."""
        if model is not None and (not model.strip() or len(model) > 256):
            raise invalid("model", "a model id (GET /v1/models lists them)")
        try:
            return self.catalog.resolve(model, tenant.policy, tenant.name)
        except UnknownModelError:
            raise APIError(404, "model_not_found", f"model {str(model)[:200]!r} not found; GET /v1/models lists the "
                           "models this key may use") from None
        except ModelNotAllowedError as error:
            raise APIError(403, "model_not_allowed", str(error)) from None
        except NotAVideoModelError as error:
            raise invalid("model", str(error)) from None

    async def _model_frames(self, entry: ModelEntry) -> int:
        """The model's own frame count (read from its U-Net config by a model stage replica, once):
        503 ``model_unavailable`` when no replica answers in time or the model cannot be read."""
        try:
            return int((await self.model_info(entry.id))["num_frames"])
        except Exception:  # noqa: BLE001 - a timeout, a replica starting, an unreadable source
            logger.warning("the frame count of model %s is unavailable", entry.id, exc_info=True)
            raise APIError(503, "model_unavailable", f"model {entry.id!r} is not ready yet; retry shortly, or give "
                           "num_frames", {"Retry-After": "5"}) from None

    def check_source(self, has_image: bool, params: GenerationParams) -> None:
        """An image (image-to-video) or a prompt alone (text-to-video), and text-to-video only
        where the text-to-image stage is deployed."""
        if not has_image and not params.text_to_video:
            raise invalid("image", "required, or give a prompt and no image for text-to-video")
        if has_image and params.text_to_video:
            raise InvalidInputError("give an image (image-to-video) or a prompt alone (text-to-video), not both")
        if params.text_to_video and self.config.text_to_image_model is None:
            raise APIError(422, "text_to_video_unavailable", "this deployment has no text-to-image model "
                           "(text_to_image_model is off): send an image")

    async def _text_to_image_info_or_none(self) -> dict[str, Any] | None:
        """What the text-to-image replicas report, or None when none answers in time (scaled to
        zero, or all busy): admission does not wait for one; the stage checks the size itself."""
        try:
            return await self.text_to_image_info()
        except Exception:  # noqa: BLE001 - a timeout or a replica still starting
            logger.info("text-to-image model info unavailable; its size check is left to the stage")
            return None

    def check_size(self, resolved: GenerationParams, info: dict[str, Any] | None) -> None:
        """422 for a size the text-to-image model cannot make (SD 3.5 and FLUX need multiples of 16)."""
        multiple = (info or {}).get("size_multiple")
        width, height = resolved.size
        if multiple and (width % multiple or height % multiple):
            raise invalid("width", f"{width}x{height} is not a size {info.get('model') or 'the text-to-image model'} "
                                   f"can make: both sides must be multiples of {multiple}")

    def check_length(self, resolved: GenerationParams) -> SegmentPlan | None:
        """A long clip's plan; 422 for one longer than ``max_duration_s`` or needing more than
        ``max_segments`` (None for a clip made in one pass)."""
        if resolved.duration_s is not None and resolved.duration_s > self.config.max_duration_s:
            raise invalid("duration_s", f"{resolved.duration_s:g} s is over this deployment's maximum of "
                                        f"{self.config.max_duration_s:g} s (max_duration_s)")
        try:
            return plan_for(resolved, max_segments=self.config.max_segments)
        except ValueError as error:
            raise invalid("duration_s", str(error)) from None

    def check_quota(self, tenant: Tenant) -> None:
        """429 ``queue_full`` / ``rate_limited`` (both with Retry-After), from state in the job store,
        so the limits hold across every ingress replica. Spends one rate-limit token when it passes."""
        policy = tenant.policy
        if policy.max_queued_jobs is not None:
            # A cheap early refusal before the input is stored; store.create(max_queued=...) is
            # the atomic check that holds under concurrent submits.
            depth = self.store.queue_depth(tenant.name)
            if depth >= policy.max_queued_jobs:
                raise queue_full(depth, policy.max_queued_jobs)
        if policy.rate_per_s is not None:
            wait = self.store.take_token(SUBMIT_BUCKET.format(tenant=tenant.name),
                                         rate_per_s=policy.rate_per_s, burst=policy.burst)
            if wait > 0:
                retry_after = max(1, math.ceil(wait))
                raise APIError(
                    429, "rate_limited",
                    f"rate limit exceeded: this tenant may submit {policy.rate_limit_per_minute:g} requests per "
                    f"minute (rate_limit_per_minute, bursts of up to {policy.burst}); retry in {retry_after} s",
                    {"Retry-After": str(retry_after)},
                )

    # -- reads and changes ----------------------------------------------------------------------

    def get(self, tenant: Tenant, job_id: str) -> Job:
        job = self.store.get(job_id, tenant=tenant.name)
        if job is None:
            raise NotFoundError()
        return job

    def cancel(self, tenant: Tenant, job_id: str) -> tuple[Job, bool]:
        """The job after a cancel request, and whether this request ended it (it was still queued)."""
        before = self.store.get(job_id, tenant=tenant.name)
        job = self.store.request_cancel(job_id, tenant=tenant.name)
        if job is None:
            raise NotFoundError()
        if job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
            raise APIError(409, "already_finished", f"the job already {job.status.value}; nothing to cancel")
        ended_now = before is not None and before.status is JobStatus.QUEUED and job.status is JobStatus.CANCELLED
        return job, ended_now

    def delete(self, tenant: Tenant, job_id: str) -> Job:
        """Remove a finished job's files and record; returns the job as it was."""
        job = self.get(tenant, job_id)
        if not job.status.is_terminal:
            raise APIError(409, "job_running", f"the job is {job.status.value}: cancel it first, then delete it")
        self.storage.delete_prefix(job_prefix(tenant.name, job.id))
        self.store.delete(job_id, tenant=tenant.name)
        return job

    def content(self, tenant: Tenant, job_id: str, variant: str = "video") -> Content:
        """The completed job's clip or thumbnail (see :func:`serve.api.content.content_of`)."""
        return content_of(self, tenant, job_id, variant)

    # -- views ----------------------------------------------------------------------------------

    def view(self, job: Job, base_url: str) -> VideoJob:
        position = self.store.queue_position(job.id) if job.status is JobStatus.QUEUED else None
        return job_view(job, base_url, queue_position=position)

