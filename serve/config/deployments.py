"""Options of the Serve deployments: one per registered stage, plus the ingress and the job runner."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.registry import STAGES as STAGE_REGISTRY
from pipelines.registry import StageSpec

from pipelines.acceleration.options import LowVramOptions, StageAcceleration, WarmupShape

from ._strict import _Strict


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
    max_surge_percent: int = Field(
        default=0, ge=0, le=100,
        description="Extra replicas (percent of the target, rounded up) Serve may start while it replaces this "
        "deployment's replicas in an upgrade: with 100 an old replica keeps serving until its replacement is ready, "
        "so the stage never has fewer replicas than its target; it needs room for the extra replica (a GPU for a "
        "GPU stage). 0: an old replica stops (finishing its work) while its replacement starts.",
    )
    health_check_period_s: float = Field(default=10.0, gt=0, description="Seconds between check_health calls.")
    health_check_timeout_s: float = Field(default=30.0, gt=0, description="A check slower than this fails.")
    max_num_models_per_replica: int | None = Field(
        default=None, ge=1,
        description="Model stages: how many models (of the zoo) one replica keeps loaded; the least recently used "
        "is unloaded to make room (Serve model multiplexing routes a request to a replica holding its model). "
        "null: as many as fit in the replica's GPU share after the first one (on CPU: 4).",
    )
    acceleration: StageAcceleration | None = Field(
        default=None,
        description="Model stages (image_encoder, sampler, decoder): torch.compile mode and scope, shape policy, "
        "attention kernels, channels_last, opt-in FP8 (sampler) and the compile cache shared by replicas "
        "(docs/pipeline.md, 'Compiled stages'). null: eager.",
    )
    warmup_shapes: list[WarmupShape] = Field(
        default_factory=list,
        description="Request shapes a compiled stage's replica compiles for before it reports ready; empty: the "
        "default model's default request. Other shapes follow acceleration.shape_policy.",
    )
    low_vram: LowVramOptions | None = Field(
        default=None,
        description="Model stages: feed-forward chunking, split guidance batch, decode chunk (docs/pipeline.md, "
        "'Low-VRAM profile') for 8-24 GB GPUs. null: none.",
    )
    h264_codec: Literal["auto", "libx264", "h264_nvenc"] = Field(
        default="auto",
        description="Video encoder: the H.264 encoder for MP4. auto: NVENC where ffmpeg has it and a GPU is "
        "visible to the replica (give it a num_gpus share), else libx264; h264_nvenc without them fails at start.",
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
        if self.warmup_shapes and (self.acceleration is None or not self.acceleration.compiled):
            raise ValueError("warmup_shapes need acceleration.compile other than 'none'")
        if self.low_vram is not None and self.low_vram.cpu_offload:
            raise ValueError("low_vram.cpu_offload is for single-process runs (CLI, demo); a stage deployment holds "
                             "only its own models: give it a smaller GPU share instead")
        return self

    def to_serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options.to_ray(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "max_surge_percent": self.max_surge_percent,
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

    # Both surge in an upgrade by default: a quarter CPU more for a moment, and the API never has no
    # ingress (nor the queue no runner) while they are replaced.
    ingress: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(
            ray_actor_options=ActorOptions(num_cpus=0.25), max_ongoing_requests=200, max_surge_percent=100
        ),
        description="FastAPI HTTP ingress (no model).",
    )
    runner: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(ray_actor_options=ActorOptions(num_cpus=0.25), max_ongoing_requests=4,
                                                 max_surge_percent=100),
        description="Job runner: claims jobs from the job store and drives them through the stages.",
    )

    @model_validator(mode="before")
    @classmethod
    def _stages_from_registry(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            data = {**data.model_dump(), **(data.model_extra or {})}
        data = dict(data or {})
        known = {spec.config_key: spec for spec in STAGE_REGISTRY.stages()}
        for key in ("ingress", "runner"):
            _check_stage_options(key, None, data.get(key) or {})
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
            _check_stage_options(key, spec, given or {})
            try:
                data[key] = DeploymentConfig.model_validate(_merged(base, given or {}))
                _check_decoder_warmup(key, spec, data[key])
            except ValidationError as error:  # name the stage in each error's location
                raise ValidationError.from_exception_data(cls.__name__, [
                    {"type": item["type"], "loc": (key, *item["loc"]), "input": item["input"],
                     **({"ctx": item["ctx"]} if "ctx" in item else {})}
                    for item in error.errors(include_url=False)]) from None
        return data

    def for_stage(self, spec: StageSpec) -> DeploymentConfig:
        """The deployment options of a registered stage."""
        return getattr(self, spec.config_key)


#: Which deployments take the stage-specific options (by registry stage name).
_OPTION_STAGES = {"acceleration": ("image_encode", "sampling", "decode"),
                  "warmup_shapes": ("image_encode", "sampling", "decode"),
                  "low_vram": ("sampling", "decode"), "h264_codec": ("video_encode",)}


def _check_stage_options(key: str, spec: StageSpec | None, given: Any) -> None:
    """Stage-specific options only where they apply (a typo'd placement must not pass silently)."""
    if isinstance(given, DeploymentConfig):
        given = given.model_dump(exclude_defaults=True)
    if not isinstance(given, dict):
        return
    for option, stages in _OPTION_STAGES.items():
        # A default value is no placement: a whole config dumped (build_app hands every replica one,
        # svd-serve deploy --show prints one) carries every option of every stage.
        if option not in given or given[option] == DeploymentConfig.model_fields[option].get_default(
                call_default_factory=True):
            continue
        if spec is None or spec.name not in stages:
            where = ", ".join(_CONFIG_KEYS.get(name, name) for name in stages)
            raise ValueError(f"stages.{key}.{option} applies only to {where}")


def _check_decoder_warmup(key: str, spec: StageSpec, options: "DeploymentConfig") -> None:
    """A compiled decoder must warm up for the chunk it will serve. Without a chunk in the shape the
    warm-up would size one from the GPU memory free while the replica starts, which the requests
    (sized from the replica's share, over its concurrent requests) may not get: their decodes would
    run eagerly under the static policy."""
    if spec.name != "decode" or options.acceleration is None or not options.acceleration.compiled:
        return
    if not options.warmup_shapes or any(shape.decode_chunk_size is None for shape in options.warmup_shapes):
        raise ValueError(f"stages.{key}: a compiled decoder needs warmup_shapes with decode_chunk_size (the chunk "
                         "its requests use: set the same as low_vram.decode_chunk_size, or requests' own)")


_CONFIG_KEYS = {"image_encode": "image_encoder", "sampling": "sampler", "decode": "decoder",
                "video_encode": "video_encoder"}


def _merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``defaults``, one level deep into ``ray_actor_options``."""
    merged = {**defaults, **given}
    if "ray_actor_options" in given and isinstance(given["ray_actor_options"], dict):
        merged["ray_actor_options"] = {**defaults["ray_actor_options"], **given["ray_actor_options"]}
    return merged
