"""One model of the zoo: :class:`ModelEntry`, what the registry keeps per model.

An entry names a model by a stable ``id`` (what requests send as ``model``) and says where its
weights come from: a whole diffusers pipeline (``source``), or a fine-tune of another entry
(``base``) that brings its own U-Net (``unet``: a diffusers folder or one ``.safetensors`` file)
and/or a LoRA adapter (``lora``, applied per request on the base's U-Net). Its ``defaults`` fill
what a request leaves out, its ``limits`` bound what a request may ask, and ``visibility`` /
``tenant`` decide who may see it at all: a private entry is invisible to every other tenant.

This module imports no Ray and no torch: the CLI, the ingress and the chart tests validate entries.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: ``org/name`` or ``name``: the shape of a Hugging Face repo id, so a model id can be a fal app id.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
MAX_MODEL_ID_CHARS = 128

#: Generation parameters an entry may default (the model's own frames, fps conditioning, motion, size, steps).
DEFAULTABLE_PARAMS = frozenset({
    "num_frames", "fps", "motion_bucket_id", "noise_aug_strength", "width", "height", "num_inference_steps",
    "min_guidance_scale", "max_guidance_scale", "decode_chunk_size",
})

ModelKind = Literal["image-to-video", "text-to-image"]

#: First path parts of the API's own routes and of the fal app ids it answers to: an ``org/name``
#: id is a fal app id too, and one of these would be shadowed by (or shadow) those routes.
RESERVED_OWNERS = frozenset({"v1", "v2beta", "fal-ai", "healthz", "readyz", "docs", "redoc", "openapi.json",
                             "playground", "static", "files"})


class ModelLimits(BaseModel):
    """What one request may ask of this model (on top of the deployment's and the tenant's bounds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_frames: int | None = Field(default=None, ge=1, le=25, description="Most frames per pass of the model.")
    max_pixels: int | None = Field(default=None, ge=64 * 64, description="Most pixels per frame (width x height).")
    max_long_side: int | None = Field(default=None, ge=64, description="Largest width or height in pixels.")

    def violations(self, *, num_frames: int, width: int, height: int) -> list[str]:
        """One readable line per limit a request's (single-pass) frames or size exceed."""
        problems = []
        if self.max_num_frames is not None and num_frames > self.max_num_frames:
            problems.append(f"num_frames {num_frames} exceeds this model's max_num_frames {self.max_num_frames}")
        if self.max_pixels is not None and width * height > self.max_pixels:
            problems.append(f"{width}x{height} exceeds this model's max_pixels {self.max_pixels}")
        if self.max_long_side is not None and max(width, height) > self.max_long_side:
            problems.append(f"{width}x{height} exceeds this model's max_long_side {self.max_long_side}")
        return problems


class ModelEntry(BaseModel):
    """A named model: its weights, defaults, limits and who may use it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        max_length=MAX_MODEL_ID_CHARS, pattern=MODEL_ID_PATTERN,
        description="What requests send as model ('svd-xt', 'acme/svd-anime'); an 'org/name' id is also a fal app id.",
    )
    kind: ModelKind = Field(default="image-to-video", description="image-to-video (SVD family) or text-to-image.")
    source: str | None = Field(
        default=None, min_length=1,
        description="A whole diffusers pipeline: Hugging Face repo id, local directory or s3://bucket/prefix. "
        "Required unless base is given.",
    )
    base: str | None = Field(
        default=None, max_length=MAX_MODEL_ID_CHARS, pattern=MODEL_ID_PATTERN,
        description="A fine-tune: the id of the image-to-video entry whose components (VAE, image encoder, "
        "scheduler, and U-Net unless unet is given) this one uses.",
    )
    unet: str | None = Field(
        default=None, min_length=1,
        description="A full fine-tuned U-Net: a diffusers folder or one .safetensors state dict (local path or "
        "s3://); replaces the U-Net of source or base.",
    )
    lora: str | None = Field(
        default=None, min_length=1,
        description="A PEFT LoRA adapter directory (local path or s3://), applied per request on the base's U-Net "
        "without reloading it. Needs base.",
    )
    lora_scale: float = Field(default=1.0, gt=0, le=4, description="Strength of the LoRA adapter.")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit (Hugging Face sources).")
    dtype: Literal["fp32", "fp16", "bf16"] | None = Field(
        default=None, description="Weight precision; null: the app's model.dtype.")
    variant: Literal["auto", "fp16", "none"] | None = Field(
        default=None, description="Which weight files; null: the app's model.variant.")
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Generation parameters this model's requests get when they do not give them "
        f"({', '.join(sorted(DEFAULTABLE_PARAMS))}); over the deployment's default_params.",
    )
    limits: ModelLimits = Field(default_factory=ModelLimits, description="Bounds of one request to this model.")
    visibility: Literal["public", "private"] = Field(
        default="public", description="public: every tenant its allowed_models admit; private: only tenant.")
    tenant: str | None = Field(default=None, min_length=1, description="The one tenant a private model belongs to.")
    preload: bool = Field(
        default=False, description="Warm pool: model stage replicas load it when they start, so its requests never "
        "pay a load.")
    description: str = Field(default="", max_length=500, description="Shown in GET /v1/models.")
    created: int = Field(default_factory=lambda: int(time.time()), ge=0,
                         description="When it was registered (Unix seconds).")

    @field_validator("defaults")
    @classmethod
    def _check_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError

        from pipelines.params import GenerationParams, describe_validation_error

        unknown = sorted(set(value) - DEFAULTABLE_PARAMS)
        if unknown:
            raise ValueError(f"defaults: {', '.join(unknown)} cannot have a model default "
                             f"(allowed: {', '.join(sorted(DEFAULTABLE_PARAMS))})")
        try:
            GenerationParams.model_validate(value)
        except ValidationError as error:
            raise ValueError(f"defaults: {describe_validation_error(error)}") from None
        return value

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelEntry":
        if (self.source is None) == (self.base is None):
            raise ValueError("give exactly one of source (a whole pipeline) or base (a fine-tune of another entry)")
        if self.base is not None and self.unet is None and self.lora is None:
            raise ValueError("a fine-tune (base) brings a unet checkpoint, a lora adapter, or both")
        if self.base == self.id:
            raise ValueError("a model cannot be its own base")
        if "/" in self.id and self.id.split("/", 1)[0].lower() in RESERVED_OWNERS:
            raise ValueError(f"ids under {self.id.split('/', 1)[0]}/ are the API's own routes; choose another "
                             "organisation part")
        if self.base is not None and (self.revision or self.dtype or self.variant):
            raise ValueError("revision, dtype and variant belong to a whole pipeline (source); a fine-tune loads "
                             "with its base's")
        if self.kind == "text-to-image" and (self.base or self.unet or self.lora):
            raise ValueError("a text-to-image model is a whole pipeline (source); base, unet and lora are for "
                             "image-to-video fine-tunes")
        if (self.visibility == "private") != (self.tenant is not None):
            raise ValueError("a private model names its tenant, and only a private model has one")
        if self.limits.max_num_frames is not None and self.defaults.get("num_frames", 0) > self.limits.max_num_frames:
            raise ValueError("defaults.num_frames exceeds limits.max_num_frames")
        return self

    @property
    def owned_by(self) -> str:
        """OpenAI's owned_by: the tenant of a private model, the Hub organisation of a repo id, else svd-serve."""
        if self.tenant is not None:
            return self.tenant
        source = self.source or ""
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", source) and not source.startswith((".", "/")):
            return source.split("/", 1)[0]
        return "svd-serve"

    def visible_to(self, tenant: str) -> bool:
        return self.visibility == "public" or self.tenant == tenant
