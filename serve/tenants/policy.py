"""A tenant's admission policy: what one tenant may do and how a request is checked against it.

:class:`TenantPolicy` is the whole policy with its built-in defaults; the tenants file stores only
the keys that differ (see :mod:`serve.tenants.file`). Admission (``serve.api.service``) and the
runner read it; nothing here touches the file, keys or the registry.
"""

from __future__ import annotations

import fnmatch

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TenantPolicy(BaseModel):
    """What one tenant may do: its request rate, its queue and concurrency, its share of the GPUs,
    the models and the size of the jobs it may ask for, and how long its jobs are kept.

    ``None`` means "no limit of this kind" (the service's own global limits still apply).
    """

    model_config = ConfigDict(extra="forbid")

    rate_limit_per_minute: float | None = Field(
        default=150.0,
        gt=0,
        description="Sustained submissions (POST /v1/videos) per minute, enforced by a token bucket shared by "
        "every ingress replica. Over it: 429 rate_limited with Retry-After. None: no rate limit.",
    )
    burst: int = Field(
        default=20,
        ge=1,
        description="Token-bucket size: submissions that may arrive back to back after a quiet period before "
        "the per-minute rate applies. Ignored without a rate limit.",
    )
    max_running_jobs: int | None = Field(
        default=4,
        ge=1,
        description="Jobs of this tenant generating at once, across the cluster. More are not rejected: they "
        "wait in the queue until one of the tenant's running jobs ends. None: bounded only by fair sharing.",
    )
    max_queued_jobs: int | None = Field(
        default=100,
        ge=1,
        description="Jobs of this tenant waiting in the queue. A submission past it gets 429 queue_full "
        "(this tenant's quota, not a service outage). None: unbounded.",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="Fair-share weight: when tenants compete for the GPUs, running slots split in proportion.",
    )
    allowed_models: list[str] = Field(
        default_factory=list,
        description="Model sources this tenant may use (exact or shell-style glob, e.g. 'stabilityai/*'), compared "
        "with the deployed model's source. Empty: any model. Not allowed: 403 model_not_allowed.",
    )
    max_num_frames: int | None = Field(
        default=None, ge=2, description="Most frames per clip (num_frames). Over it: 422 limit_exceeded."
    )
    max_pixels: int | None = Field(
        default=None,
        ge=64 * 64,
        description="Most pixels per frame (width x height). Over it: 422 limit_exceeded.",
    )
    max_long_side: int | None = Field(
        default=None, ge=64, description="Largest width or height in pixels. Over it: 422 limit_exceeded."
    )
    max_inference_steps: int | None = Field(
        default=None, ge=1, description="Most sampling steps (num_inference_steps). Over it: 422 limit_exceeded."
    )
    retention_s: float | None = Field(
        default=None,
        gt=0,
        description="How long this tenant's job records and clips are kept (seconds after they finish); "
        "overrides job_store.retention_s. None: the service's retention.",
    )

    @field_validator("allowed_models")
    @classmethod
    def _clean_models(cls, value: list[str]) -> list[str]:
        cleaned: list[str] = []
        for item in value:
            item = item.strip()
            if not item:
                raise ValueError("allowed_models entries must not be empty")
            if item not in cleaned:
                cleaned.append(item)
        return cleaned

    @model_validator(mode="after")
    def _cross_field(self) -> "TenantPolicy":
        if self.max_pixels is not None and self.max_long_side is not None and self.max_pixels < 64 * self.max_long_side:
            # Otherwise max_long_side could never be reached: even the narrowest clip (64 wide) at that
            # length is refused by max_pixels, which is a contradiction worth catching at write time.
            raise ValueError(
                f"max_pixels ({self.max_pixels}) is below 64 x max_long_side ({64 * self.max_long_side}): "
                "max_long_side could never be reached; lower it or raise max_pixels"
            )
        return self

    # -- derived --------------------------------------------------------------------------

    @property
    def rate_per_s(self) -> float | None:
        return None if self.rate_limit_per_minute is None else self.rate_limit_per_minute / 60.0

    def allows_model(self, source: str) -> bool:
        if not self.allowed_models:
            return True
        return any(
            fnmatch.fnmatchcase(source, pattern) or fnmatch.fnmatchcase(source.rstrip("/"), pattern.rstrip("/"))
            for pattern in self.allowed_models
        )

    def limit_violations(self, *, num_frames: int, width: int, height: int, num_inference_steps: int,
                         segments: int = 1, t2i_num_inference_steps: int | None = None) -> list[str]:
        """One sentence per cap the (resolved) request exceeds; empty when it fits. ``num_frames``
        is every frame the clip generates (all segments of a long clip: ``segments`` of them), and
        the text-to-image stage's steps count against ``max_inference_steps`` too."""
        problems = []
        if self.max_num_frames is not None and num_frames > self.max_num_frames:
            what = f"num_frames {num_frames}" if segments == 1 else \
                f"duration_s: the clip's {segments} segments generate {num_frames} frames, which"
            problems.append(f"{what} exceeds this tenant's limit of {self.max_num_frames}")
        steps = {"num_inference_steps": num_inference_steps, "t2i_num_inference_steps": t2i_num_inference_steps}
        for name, value in steps.items():
            if self.max_inference_steps is not None and value is not None and value > self.max_inference_steps:
                problems.append(f"{name} {value} exceeds this tenant's limit of {self.max_inference_steps}")
        if self.max_long_side is not None and max(width, height) > self.max_long_side:
            problems.append(
                f"{width}x{height}: the long side {max(width, height)} exceeds this tenant's limit of "
                f"{self.max_long_side} pixels"
            )
        if self.max_pixels is not None and width * height > self.max_pixels:
            problems.append(
                f"{width}x{height} = {width * height} pixels per frame exceeds this tenant's limit of {self.max_pixels}"
            )
        return problems
