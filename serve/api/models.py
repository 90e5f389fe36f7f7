"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models this deployment serves, in the shape
of OpenAI's Models API (``client.models.list()`` / ``retrieve(id)`` of the ``openai`` SDK read it),
with this service's own fields beside OpenAI's (docs/compatibility.md, "Models").

The entries are the model zoo (:class:`serve.zoo.ModelCatalog`): the default video model first,
then the text-to-image model that makes text-to-video's first frame, then every other declared or
registered model, each with what a request may ask of it (``limits``, ``model_limits``, its
``defaults``, ``interpolation``, ``default_num_frames``, whether it takes a prompt alone:
``text_to_video``). A model the tenant may not see (another tenant's private model) or use (its
``allowed_models``) is not listed, and retrieving it is the native 404, as for an unknown id. Ids
may be ``org/name``, so the route's id is a path; the default model also answers to its source
and the source's last path part, as the ``model`` request field does.
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' ``TenantDep`` annotations
# at runtime, and it is local to ``router``.
import asyncio
import logging
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field

from pipelines.loader import ModelSpec
from pipelines.params import (MAX_INTERPOLATED_FPS, MAX_LONG_SIDE, MAX_PIXELS, MIN_SIDE, SIZE_MULTIPLE,
                              GenerationParams, Interpolation)

from ..tenants import Tenant
from ..zoo import ModelEntry, ModelLimits, allows
from .errors import APIError, ErrorBody
from .schemas import MODEL_MAX_FRAMES

if TYPE_CHECKING:
    from ..tenants import TenantRegistry
    from .service import VideoService

logger = logging.getLogger("ray.serve.svd_serve")

#: ``created`` of the models the app config declares. OpenAI's SDK needs an integer; the weights
#: carry no creation time, and a per-process time would differ between ingress replicas, so it is a
#: stable 0 ("unknown"). Registered models carry the time they were added.
CREATED = 0
#: The largest frame, as a size (``MAX_PIXELS`` pixels, 16:9).
MAX_SIZE = "1536x864"


REJECTIONS = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key."},
    404: {"model": ErrorBody, "description": "No such model, or the tenant may not use it."},
    422: {"model": ErrorBody, "description": "A header or path value this API cannot read."},
    503: {"model": ErrorBody, "description": "The model registry (in the job store) is unavailable."},
}


def _bound(name: str, kind: str) -> Any:
    return next(getattr(meta, kind) for meta in GenerationParams.model_fields[name].metadata if hasattr(meta, kind))


class Limits(BaseModel):
    """What one request may ask of the video model (this deployment's bounds; a tenant's own caps,
    when lower, are in ``tenant_limits``)."""

    max_duration_s: float = Field(description="Longest clip (duration_s), the deployment's max_duration_s.")
    max_segments: int = Field(description="Most segments one long clip may take (max_segments).")
    max_num_frames: int = Field(description="Most frames one pass of the model generates (num_frames).")
    max_pixels: int = Field(description="Most pixels per frame, width x height (1536x864).")
    max_size: str = Field(description="The largest frame as WxH; any shape with as many pixels or fewer.")
    min_side: int = Field(description="Smallest width or height in pixels.")
    max_long_side: int = Field(description="Largest width or height in pixels.")
    size_multiple: int = Field(description="Width and height are multiples of this.")
    max_inference_steps: int = Field(description="Most sampling steps (num_inference_steps).")
    max_output_fps: int = Field(description="Highest playback rate (output_fps) of a clip played as generated.")
    max_output_fps_interpolated: int = Field(description="Highest output_fps with interpolation blend or mci.")


class TenantLimits(BaseModel):
    """The calling tenant's own caps (docs/tenants.md); null: no cap of that kind."""

    max_num_frames: int | None = None
    max_pixels: int | None = None
    max_long_side: int | None = None
    max_inference_steps: int | None = None


class ModelObject(BaseModel):
    """OpenAI's ``Model`` (``id``, ``object``, ``created``, ``owned_by``) and this service's fields."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="What requests send as model (GET /v1/models/{id}).")
    object: Literal["model"] = "model"
    created: int = Field(default=CREATED, description="When the model was registered (Unix seconds); 0 for the models the app "
                         "config declares (the weights carry no creation time).")
    owned_by: str = Field(description="The tenant of a private model, else the Hugging Face organisation of the "
                          "source, else svd-serve.")
    kind: Literal["image-to-video", "text-to-image"]
    description: str | None = Field(default=None, description="What the operator says about it.")
    visibility: Literal["public", "private"] = Field(default="public", description="private: only its tenant sees it.")
    base: str | None = Field(default=None, description="A fine-tune: the model it is based on.")
    fine_tune: Literal["unet", "lora", "unet+lora"] | None = Field(
        default=None, description="A fine-tune's kind: its own U-Net, a LoRA adapter on its base's, or both.")
    default: bool | None = Field(default=None, description="The model a request without model gets.")
    defaults: dict[str, Any] | None = Field(default=None, description="Parameters its requests get unless given.")
    model_limits: ModelLimits | None = Field(default=None, description="This model's own bounds per request.")
    revision: str | None = Field(default=None, description="The Hub revision loaded (null: main).")
    used_for: str | None = Field(default=None, description="What this service uses the model for.")
    text_to_video: bool | None = Field(
        default=None, description="Video model: whether a prompt alone (no image) is taken, its first frame made "
        "by text_to_image_model.")
    text_to_image_model: str | None = Field(default=None, description="Video model: the model making "
                                            "text-to-video's first frame, if any.")
    default_num_frames: int | None = Field(
        default=None, description="Video model: frames of a clip when num_frames is absent (the model's own); "
        "null while the model is not loaded yet.")
    interpolation: list[str] | None = Field(default=None, description="Video model: the interpolation modes.")
    limits: Limits | None = Field(default=None, description="Video model: this deployment's bounds.")
    tenant_limits: TenantLimits | None = Field(default=None, description="Video model: the caller's own caps.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


def limits(service: "VideoService") -> Limits:
    config = service.config
    return Limits(
        max_duration_s=config.max_duration_s, max_segments=config.max_segments, max_num_frames=MODEL_MAX_FRAMES,
        max_pixels=MAX_PIXELS, max_size=MAX_SIZE, min_side=MIN_SIDE, max_long_side=MAX_LONG_SIDE,
        size_multiple=SIZE_MULTIPLE, max_inference_steps=_bound("num_inference_steps", "le"),
        max_output_fps=_bound("output_fps", "le"), max_output_fps_interpolated=MAX_INTERPOLATED_FPS)


async def default_num_frames(service: "VideoService") -> int | None:
    """The model's own frame count; None when the model stage cannot tell yet (the list still answers)."""
    try:
        return int((await service.model_info())["num_frames"])
    except Exception:  # noqa: BLE001 - a listing never fails for a model still loading
        logger.warning("model info unavailable for GET /v1/models", exc_info=True)
        return None


async def models_for(service: "VideoService", tenant: Tenant) -> list[ModelObject]:
    """The entries this tenant may see and use, the default model first."""
    catalog = service.catalog
    entries = await asyncio.to_thread(catalog.visible, tenant.policy, tenant.name)
    return [await _model_object(service, tenant, entry) for entry in entries]


async def _model_object(service: "VideoService", tenant: Tenant, entry: ModelEntry) -> ModelObject:
    catalog, config, policy = service.catalog, service.config, tenant.policy
    common = dict(id=entry.id, created=entry.created, owned_by=entry.owned_by, kind=entry.kind,
                  revision=entry.revision, description=entry.description or None, visibility=entry.visibility)
    if entry.kind == "text-to-image":
        used = "text-to-video first frame" if entry.id == catalog.text_to_image_id else "not used by this deployment"
        return ModelObject(**common, used_for=used)
    text_to_image: ModelSpec | None = config.text_to_image_model
    is_default = entry.id == catalog.default_id
    frames = entry.defaults.get("num_frames") or (await default_num_frames(service) if is_default else None)
    fine_tune = "+".join(kind for kind, given in (("unet", entry.unet), ("lora", entry.lora)) if given) or None
    return ModelObject(
        **common, base=entry.base, fine_tune=fine_tune, default=is_default, defaults=dict(entry.defaults) or None,
        model_limits=entry.limits if entry.limits != ModelLimits() else None,
        used_for="image-to-video, and text-to-video from its first frame" if text_to_image else "image-to-video",
        text_to_video=text_to_image is not None,
        text_to_image_model=catalog.text_to_image_id if text_to_image else None,
        default_num_frames=frames, interpolation=list(get_args(Interpolation)), limits=limits(service),
        tenant_limits=TenantLimits(max_num_frames=policy.max_num_frames, max_pixels=policy.max_pixels,
                                   max_long_side=policy.max_long_side,
                                   max_inference_steps=policy.max_inference_steps))


def router(service: "VideoService", tenants: "TenantRegistry", *, on_ended=None) -> APIRouter:
    """The models routes (native error shape: rejections go to the app's handlers)."""
    api = APIRouter(tags=["models"])

    def tenant_of(authorization: Annotated[str | None, Header()] = None) -> Tenant:
        return tenants.authenticate(authorization)

    TenantDep = Annotated[Tenant, Depends(tenant_of)]

    def render(entry: ModelObject) -> dict[str, Any]:
        return entry.model_dump(mode="json", exclude_none=True)

    @api.get("/v1/models", response_model=ModelList, response_model_exclude_none=True,
             responses={code: doc for code, doc in REJECTIONS.items() if code != 404},
             summary="The models this deployment serves (OpenAI's Models API shape)")
    async def list_models(tenant: TenantDep):
        return {"object": "list", "data": [render(entry) for entry in await models_for(service, tenant)]}

    @api.get("/v1/models/{model_id:path}", response_model=ModelObject, response_model_exclude_none=True,
             responses=REJECTIONS, summary="One model (its id contains '/': e.g. /v1/models/stabilityai/...)")
    async def retrieve_model(model_id: str, tenant: TenantDep):
        entry = await asyncio.to_thread(service.catalog.get, model_id)
        if entry is not None and entry.visible_to(tenant.name) and allows(tenant.policy, entry):
            return render(await _model_object(service, tenant, entry))
        raise APIError(404, "not_found", f"model {model_id[:200]!r} not found")

    return api
