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

One concern per module:

- :mod:`.inputs`: the app ids, the input schemas of the image app and the text-to-video apps, their
  parsing into :class:`~pipelines.params.GenerationParams`, and :class:`FalInputError`.
- :mod:`.rendering`: the bodies answered (status, result, logs, metrics, webhook) and rejections
  in fal's error shape.
- :mod:`.routes`: :func:`router` and the routes of each app id.

This package re-exports what other code imports from ``serve.api.compat.fal``: :func:`router`
(``serve.api.compat.compat_routers``), :func:`webhook_body` (``serve.lifecycle``) and the app ids
and helpers the tests use.
"""

from .inputs import FAL_APP_ID, FAL_NEGATIVE_PROMPT, FAL_T2V_APP_ID, FAL_T2V_APP_IDS, VIDEO_SIZES
from .rendering import webhook_body
from .routes import app_ids, queue_app, router

__all__ = [
    "FAL_APP_ID",
    "FAL_NEGATIVE_PROMPT",
    "FAL_T2V_APP_ID",
    "FAL_T2V_APP_IDS",
    "VIDEO_SIZES",
    "app_ids",
    "queue_app",
    "router",
    "webhook_body",
]
