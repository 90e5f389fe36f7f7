"""Where the service keeps things and talks to: storage, the job store, tracing, webhooks, auth."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ._strict import _Strict


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
        "run timeout_s past it). Pending deliveries live in the job store; any runner replica sends them, so a "
        "runner restart loses none.",
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
