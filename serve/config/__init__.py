"""The application config: one validated pydantic model that builds the whole Serve application.

``serve.app:build_app`` takes these fields as its ``args`` (from ``serve run``, ``serve deploy``,
or the Helm chart's ``serveConfigV2``) and applies every stage's options in code, so the same
structure drives a laptop, a CI cluster and a KubeRay RayService. This module imports no Ray:
unit tests and the Helm tests validate configs without starting a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from pipelines.loader import DEFAULT_TEXT_TO_IMAGE_MODEL_ID, ModelSpec
from pipelines.params import MAX_DURATION_S
from pipelines.registry import STAGES as STAGE_REGISTRY
from pipelines.registry import TEXT_TO_IMAGE_MODEL, StageSpec, import_stage_modules

from ..zoo.entry import MODEL_ID_PATTERN, ModelEntry
from ._strict import _Strict
from .backends import AuthConfig, JobStoreConfig, StorageConfig, TracingConfig, WebhookConfig
from .deployments import ActorOptions, AutoscalingConfig, DeploymentConfig, StagesConfig

__all__ = ["ActorOptions", "AppConfig", "AuthConfig", "AutoscalingConfig", "DeploymentConfig", "JobStoreConfig",
           "StagesConfig", "StorageConfig", "TracingConfig", "WebhookConfig"]


class AppConfig(_Strict):
    """Everything ``serve.app:build_app`` needs."""

    stage_modules: list[str] = Field(
        default_factory=list,
        description="Python modules imported before the rest of the config is validated, each registering extra "
        "pipeline stages with pipelines.registry.register_stage (docs/architecture.md). Every process imports them.",
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The default video model: what a request "
                             "without a model gets. Its device, cache_dir and S3 settings apply to every model.")
    model_id: str | None = Field(
        default=None, max_length=128, pattern=MODEL_ID_PATTERN,
        description="The id requests name the default model by; null: its source if that is a Hub repo id, else "
        "the directory's name. Its source and the source's last path part are accepted too.",
    )
    models: list[ModelEntry] = Field(
        default_factory=list,
        description="More models served beside the default one (the model zoo: SVD family checkpoints, fine-tunes "
        "with a U-Net checkpoint or a LoRA adapter, private models of one tenant). Declared here they are fixed; "
        "`svd-serve models add` registers more at run time in the job store.",
    )
    text_to_image_model: ModelSpec | None = Field(
        default_factory=lambda: ModelSpec(source=DEFAULT_TEXT_TO_IMAGE_MODEL_ID),
        description="The text-to-image pipeline that makes text-to-video's first frame (any diffusers text-to-image "
        "pipeline: SDXL, SDXL-Turbo, SD 3.5, FLUX.1-schnell; HF id, directory or s3://). null: no text-to-video "
        "(the TextToImage deployment is not built and prompt-only requests are refused).",
    )
    max_duration_s: float = Field(
        default=8.0, gt=0, le=MAX_DURATION_S,
        description="Longest clip a request may ask for with duration_s (long clips are made of segments).",
    )
    default_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Generation parameters a request gets when it does not give them (this deployment's defaults, "
        "e.g. a small size and few steps for a CPU demo). Validated as generation parameters; a request that gives "
        "any size field (width, height, aspect_ratio, size) or length field (num_frames, seconds, duration_s) "
        "replaces the defaults of that group as a whole; text-to-video's fields (negative_prompt, t2i_*) apply to "
        "text-to-video requests only. seed and prompt cannot have defaults.",
    )
    max_segments: int = Field(
        default=8, ge=1, le=64,
        description="Most segments one long clip may take (duration_s x fps / frames per segment, rounded).",
    )
    stages: StagesConfig = Field(default_factory=StagesConfig, description="Per-deployment options.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Output storage.")
    job_store: JobStoreConfig = Field(default_factory=JobStoreConfig, description="Durable job store.")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="OpenTelemetry.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Tenants and API keys.")
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig, description="Webhook delivery and retries.")
    public_url: str | None = Field(
        default=None,
        description="Base URL clients reach the API at (e.g. https://svd.example.com); used for output URLs in "
        "webhook bodies. Without it they are relative paths.",
    )
    max_inflight_jobs: int = Field(
        default=4,
        ge=1,
        description="Jobs one runner replica drives at once. Keep runners x this above the Sampler's capacity, "
        "so queued work shows up as Sampler load and its autoscaler can react.",
    )
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="Largest accepted image upload.")
    generations_wait_s: float = Field(
        default=60.0, ge=0, le=600,
        description="How long POST /v1/video/generations waits for its job to end before answering 202 with the job "
        "id and a Location to poll (0: never waits). Each waiting request holds one of the ingress's "
        "max_ongoing_requests.",
    )
    url_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs the service may fetch from or call even though they are private "
        "(trusted internal hosts). Everything else private, loopback or link-local is refused.",
    )

    @model_validator(mode="before")
    @classmethod
    def _import_stage_modules(cls, data: Any) -> Any:
        # Before ``stages`` is validated: it may configure a stage those modules register.
        if isinstance(data, dict) and data.get("stage_modules"):
            import_stage_modules(data["stage_modules"])
        return data

    @field_validator("default_params")
    @classmethod
    def _check_default_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        from pipelines.params import GenerationParams, describe_validation_error
        from pydantic import ValidationError

        fixed = sorted({"seed", "prompt"} & set(value))
        if fixed:
            raise ValueError(f"default_params: {', '.join(fixed)} cannot have a deployment default")
        try:  # as a text-to-video request would get them (text-to-video's own fields are allowed)
            GenerationParams.model_validate({**value, "prompt": "x"})
        except ValidationError as error:
            raise ValueError(f"default_params: {describe_validation_error(error)}") from None
        return value

    @model_validator(mode="after")
    def _check_models(self) -> "AppConfig":
        from ..zoo.catalog import model_id_for

        ids = [self.resolved_model_id()]
        if self.text_to_image_model is not None:
            ids.append(model_id_for(self.text_to_image_model.source))
        seen = set()
        for entry in self.models:
            if entry.id in seen or entry.id in ids:
                raise ValueError(f"models: the id {entry.id!r} is used twice (the default model is "
                                 f"{ids[0]!r}{', the text-to-image model ' + repr(ids[1]) if len(ids) > 1 else ''})")
            seen.add(entry.id)
        known = {*ids, *seen}
        declared = {entry.id: entry for entry in self.models}
        for entry in self.models:
            if entry.base is not None and entry.base not in known:
                raise ValueError(f"models: {entry.id!r} names base {entry.base!r}, which is not declared")
            base = declared.get(entry.base or "")
            if base is not None and base.visibility == "private" and base.tenant != entry.tenant:
                raise ValueError(f"models: {entry.id!r} cannot build on {base.id!r}, private to another tenant")
        return self

    def resolved_model_id(self) -> str:
        """The default model's id (``model_id``, else derived from its source)."""
        from ..zoo.catalog import model_id_for

        return self.model_id or model_id_for(self.model.source)

    def model_for(self, spec: StageSpec) -> ModelSpec | None:
        """The weights a stage loads: the text-to-image model for that stage, else the video model."""
        return self.text_to_image_model if spec.model == TEXT_TO_IMAGE_MODEL else self.model

    def built_stages(self) -> tuple[StageSpec, ...]:
        """The registered stages this application deploys (all but those whose model is off)."""
        return tuple(spec for spec in STAGE_REGISTRY.stages() if self.model_for(spec) is not None)

    @classmethod
    def from_file(cls, path: str | Path) -> "AppConfig":
        import yaml

        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
