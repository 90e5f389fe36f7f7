"""The application config: one validated pydantic model that builds the whole Serve application.

``serve.app:build_app`` takes these fields as its ``args`` (from ``serve run``, ``serve deploy``,
or the Helm chart's ``serveConfigV2``) and applies every stage's options in code, so the same
structure drives a laptop, a CI cluster and a KubeRay RayService. This module imports no Ray:
unit tests and the Helm tests validate configs without starting a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.loader import DEFAULT_TEXT_TO_IMAGE_MODEL_ID, ModelSpec
from pipelines.registry import STAGES as STAGE_REGISTRY
from pipelines.params import MAX_DURATION_S
from pipelines.registry import TEXT_TO_IMAGE_MODEL, StageSpec, import_stage_modules

from .zoo.entry import MODEL_ID_PATTERN, ModelEntry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling for one deployment (a subset of ``ray.serve.config.AutoscalingConfig``)."""

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound on replicas.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at deploy time; default min_replicas.")
    target_ongoing_requests: float = Field(
        default=1.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(default=5.0, ge=0, description="Sustained demand needed before adding replicas.")
    downscale_delay_s: float = Field(default=60.0, ge=0, description="Idle time needed before removing replicas.")
    metrics_interval_s: float = Field(default=2.0, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(default=10.0, gt=0, description="Window over which load is averaged.")

    @model_validator(mode="after")
    def _check_bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class ActorOptions(_Strict):
    """Resources of one replica: what Ray schedules it by."""

    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPU share per replica; fractions pack several replicas onto one GPU."
    )
    memory: int | None = Field(default=None, ge=0, description="Bytes of memory reserved per replica (optional).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources, e.g. {'svd_sampler': 1}: offered only by the node pool meant for this stage, "
        "they pin the stage there.",
    )

    def to_ray(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            options["memory"] = self.memory
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class DeploymentConfig(_Strict):
    """Options of one Serve deployment: replicas, resources, queue bounds, shutdown."""

    num_replicas: int | None = Field(default=None, ge=1, description="Fixed replica count; omit to autoscale.")
    autoscaling: AutoscalingConfig | None = Field(default=None, description="Autoscaling; omit for a fixed count.")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions, description="Resources per replica.")
    max_ongoing_requests: int = Field(default=4, ge=1, description="Requests one replica runs at once.")
    max_queued_requests: int = Field(
        default=-1, ge=-1, description="Requests queued per caller before Serve rejects with 503; -1 is unbounded."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=600.0, gt=0, description="How long a stopping replica may finish running work. Keep it above one job."
    )
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, gt=0, description="Poll interval while draining.")
    health_check_period_s: float = Field(default=10.0, gt=0, description="Seconds between check_health calls.")
    health_check_timeout_s: float = Field(default=30.0, gt=0, description="A check slower than this fails.")
    max_num_models_per_replica: int | None = Field(
        default=None, ge=1,
        description="Model stages: how many models (of the zoo) one replica keeps loaded; the least recently used "
        "is unloaded to make room (Serve model multiplexing routes a request to a replica holding its model). "
        "null: as many as fit in the replica's GPU share after the first one (on CPU: 4).",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads in the replica. Default: num_cpus rounded up (Ray sets "
        "OMP_NUM_THREADS=1 in fractional-CPU actors, which would otherwise leave torch single-threaded).",
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "DeploymentConfig":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self

    def to_serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options.to_ray(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options

    def resolved_torch_threads(self) -> int:
        import math

        return self.torch_threads or max(1, math.ceil(self.ray_actor_options.num_cpus))


class StagesConfig(BaseModel):
    """One deployment per registered pipeline stage (keyed by its ``config_key``: ``image_encoder``,
    ``sampler``, ``decoder``, ``video_encoder``, plus any stage a ``stage_modules`` module adds),
    plus the HTTP ingress and the job runner. A stage left out gets its registry defaults."""

    model_config = ConfigDict(extra="allow")

    ingress: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(
            ray_actor_options=ActorOptions(num_cpus=0.25), max_ongoing_requests=200
        ),
        description="FastAPI HTTP ingress (no model).",
    )
    runner: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(ray_actor_options=ActorOptions(num_cpus=0.25), max_ongoing_requests=4),
        description="Job runner: claims jobs from the job store and drives them through the stages.",
    )

    @model_validator(mode="before")
    @classmethod
    def _stages_from_registry(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            data = {**data.model_dump(), **(data.model_extra or {})}
        data = dict(data or {})
        known = {spec.config_key: spec for spec in STAGE_REGISTRY.stages()}
        unknown = sorted(set(data) - set(known) - {"ingress", "runner"})
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r} in stages; registered stages: "
                             f"{', '.join(known)} (plus ingress and runner)")
        for key, spec in known.items():
            given = data.get(key)
            if isinstance(given, DeploymentConfig):
                continue
            defaults = spec.resources
            base = {"ray_actor_options": {"num_cpus": defaults.num_cpus, "num_gpus": defaults.num_gpus},
                    "max_ongoing_requests": defaults.max_ongoing_requests}
            data[key] = DeploymentConfig.model_validate(_merged(base, given or {}))
        return data

    def for_stage(self, spec: StageSpec) -> DeploymentConfig:
        """The deployment options of a registered stage."""
        return getattr(self, spec.config_key)


def _merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``defaults``, one level deep into ``ray_actor_options``."""
    merged = {**defaults, **given}
    if "ray_actor_options" in given and isinstance(given["ray_actor_options"], dict):
        merged["ray_actor_options"] = {**defaults["ray_actor_options"], **given["ray_actor_options"]}
    return merged


class StorageConfig(_Strict):
    """Where clips (and uploaded conditioning images) are stored."""

    backend: Literal["local", "s3"] = Field(default="local", description="local directory or S3.")
    local_dir: str = Field(default="./data/outputs", description="Directory of the local backend.")
    bucket: str | None = Field(default=None, description="S3 bucket (s3 backend).")
    prefix: str = Field(default="svd-serve", description="Key prefix; objects go under PREFIX/TENANT/.")
    region: str | None = Field(default=None, description="S3 region.")
    endpoint_url: str | None = Field(default=None, description="Custom endpoint for S3-compatible stores.")
    presign_expiry_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned GET URLs.")
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        default=None, description="S3 server-side encryption of stored objects."
    )
    kms_key_id: str | None = Field(default=None, description="KMS key for aws:kms encryption.")
    url_signing_key_env: str = Field(
        default="SVD_SERVE_URL_SIGNING_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the HMAC key (at least 32 bytes) that signs the local "
        "backend's file URLs (the key itself is never in this config). Unset: a key file created once, mode 0600, in "
        "local_dir; processes sharing local_dir share it. The s3 backend's URLs are presigned by S3 instead.",
    )

    @model_validator(mode="after")
    def _check_backend(self) -> "StorageConfig":
        if self.backend == "s3" and not self.bucket:
            raise ValueError("storage.bucket is required when storage.backend is s3")
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise ValueError("storage.kms_key_id needs server_side_encryption: aws:kms")
        return self


class JobStoreConfig(_Strict):
    """The durable job record: SQLite on one node, Redis for a cluster."""

    backend: Literal["sqlite", "redis"] = Field(default="sqlite", description="sqlite (one node) or redis (cluster).")
    sqlite_path: str = Field(default="./data/jobs.sqlite3", description="SQLite file of the sqlite backend.")
    redis_url: str | None = Field(
        default=None,
        description="redis://host:port/db of the redis backend. The password comes from the REDIS_PASSWORD "
        "environment variable, never from this config.",
    )
    key_prefix: str = Field(default="svd", description="Prefix of every Redis key.")
    lease_s: float = Field(default=30.0, gt=0, description="A claimed job returns to the queue if not renewed in time.")
    max_attempts: int = Field(default=3, ge=1, description="Claims of one job before it is failed as abandoned.")
    retention_s: float = Field(default=24 * 3600.0, gt=0, description="Records and outputs expire after this long.")
    usage_retention_s: float = Field(
        default=400 * 24 * 3600.0, gt=0, description="Usage (metering) records are kept this long, beyond the jobs."
    )

    @model_validator(mode="after")
    def _check_backend(self) -> "JobStoreConfig":
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("job_store.redis_url is required when job_store.backend is redis")
        return self


class TracingConfig(_Strict):
    """OpenTelemetry export."""

    exporter: Literal["none", "console", "otlp"] = Field(default="none", description="Where spans go.")
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP endpoint, e.g. http://otel-collector:4318.")
    service_name: str = Field(default="svd-serve", description="service.name resource attribute.")
    export_interval_s: float = Field(default=5.0, gt=0, description="How often batched spans are exported.")

    @model_validator(mode="after")
    def _check_endpoint(self) -> "TracingConfig":
        if self.exporter == "otlp" and not self.otlp_endpoint:
            raise ValueError("tracing.otlp_endpoint is required when tracing.exporter is otlp")
        return self


class WebhookConfig(_Strict):
    """Webhook delivery: timeouts and the retry policy (AppConfig ``webhooks``)."""

    timeout_s: float = Field(
        default=10.0, gt=0, le=120,
        description="Seconds one attempt may take in all (connect, send, response headers); slower counts as a "
        "failed attempt and is retried.",
    )
    max_elapsed_s: float = Field(
        default=3600.0, gt=0, le=86400,
        description="Retry window per event, from the first attempt: no attempt starts after it (the last one may "
        "run timeout_s past it). Pending retries live in the runner process; a runner restart drops them.",
    )
    initial_backoff_s: float = Field(
        default=1.0, gt=0, description="Wait before the first retry; each further retry waits twice as long."
    )
    max_backoff_s: float = Field(
        default=300.0, gt=0, description="Longest wait between two attempts, unless the receiver's Retry-After asks "
        "for more."
    )
    max_attempts: int = Field(default=20, ge=1, le=100, description="Attempts per event, the first one included.")
    jitter: float = Field(
        default=0.2, ge=0, lt=1,
        description="Random spread of each backoff, as a fraction (0.2: +/-20%), so retries of many events do not "
        "arrive in lockstep.",
    )
    progress_max_attempts: int = Field(
        default=1, ge=1, le=100,
        description="Attempts per video.progress event. Progress is superseded by the next event, so by default it "
        "is sent once and not retried (a stale retry could arrive after the terminal event).",
    )
    progress_min_interval_s: float = Field(
        default=5.0, ge=0, description="Least seconds between two progress events of one job (WebhookSender.progress_due)."
    )
    max_recorded_attempts: int = Field(
        default=50, ge=1, le=1000,
        description="Attempts kept on the job in webhook.deliveries (the newest; job_recorder trims).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "WebhookConfig":
        if self.initial_backoff_s > self.max_backoff_s:
            raise ValueError(
                f"initial_backoff_s ({self.initial_backoff_s}) exceeds max_backoff_s ({self.max_backoff_s})"
            )
        if self.max_backoff_s > self.max_elapsed_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) exceeds max_elapsed_s ({self.max_elapsed_s})")
        if self.progress_max_attempts > self.max_attempts:
            raise ValueError("progress_max_attempts exceeds max_attempts")
        return self



class AuthConfig(_Strict):
    """Tenants and their API keys (only SHA-256 hashes are stored)."""

    tenants_file: str | None = Field(
        default=None,
        description="YAML/JSON file of tenants and key hashes (see `svd-serve tenants`). Re-read when it changes. "
        "Also settable through SVD_SERVE_TENANTS_FILE.",
    )


    def resolved_tenants_file(self) -> str | None:
        import os

        return self.tenants_file or os.environ.get("SVD_SERVE_TENANTS_FILE")


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
        from .zoo.catalog import model_id_for

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
        for entry in self.models:
            if entry.base is not None and entry.base not in known:
                raise ValueError(f"models: {entry.id!r} names base {entry.base!r}, which is not declared")
        return self

    def resolved_model_id(self) -> str:
        """The default model's id (``model_id``, else derived from its source)."""
        from .zoo.catalog import model_id_for

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
