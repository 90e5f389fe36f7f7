"""Tracing (OpenTelemetry), metrics (ray.util.metrics) and log context for every process.

One trace per job: the ingress opens the ``admission`` span and stores its W3C ``traceparent``
on the job; the runner continues it with a ``job`` span; every stage replica, in its own Ray
process, opens its stage span as a child of the context it is handed. Nothing here is required
for correctness: with ``exporter: none`` spans are created and dropped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from .config import TracingConfig

# Under "ray.serve" so replica logs go through Serve's handlers: JSON encoding (the deployments'
# logging_config) with our extra fields (job_id, trace_id) as keys, in Serve's log files.
logger = logging.getLogger("ray.serve.svd_serve")
_setup_lock = threading.Lock()
_configured = False
TRACER_NAME = "svd_serve"


def setup_tracing(config: TracingConfig) -> None:
    """Install this process's tracer provider once (each Ray replica is its own process)."""
    global _configured
    with _setup_lock:
        if _configured:
            return
        provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        exporter = None
        if config.exporter == "console":
            exporter = ConsoleSpanExporter()
        elif config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = config.otlp_endpoint.rstrip("/")
            exporter = OTLPSpanExporter(endpoint=endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces")
        if exporter is not None:
            provider.add_span_processor(
                BatchSpanProcessor(exporter, schedule_delay_millis=int(config.export_interval_s * 1000))
            )
        trace.set_tracer_provider(provider)
        _configured = True


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def current_carrier() -> dict[str, str]:
    """The current span context as W3C headers (``traceparent``), to hand to another process."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


@contextlib.contextmanager
def span_from_carrier(name: str, carrier: Mapping[str, str] | None, **attributes) -> Iterator[trace.Span]:
    """Open ``name`` as a child of the context in ``carrier`` (a traceparent from another process)."""
    parent = extract(dict(carrier or {}))
    token = otel_context.attach(parent)
    try:
        with tracer().start_as_current_span(name, attributes={k: v for k, v in attributes.items() if v is not None}) as span:
            yield span
    finally:
        otel_context.detach(token)


def trace_id_hex(span: trace.Span | None = None) -> str | None:
    span = span or trace.get_current_span()
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def log_extra(job_id: str | None = None, **fields) -> dict:
    """Fields for ``logger.info(..., extra=...)``; Serve's JSON log encoding emits them as keys."""
    extra = {"job_id": job_id, "trace_id": trace_id_hex()}
    extra.update(fields)
    return {k: v for k, v in extra.items() if v is not None}


# -- Prometheus metrics through ray.util.metrics (exported by every Ray node's metrics agent) -----
#
# Ray's metrics agent (one per node; it runs without the dashboard) serves them on the node's
# metrics export port with a ``ray_`` prefix: ``svd_jobs_total`` is scraped as ``ray_svd_jobs_total``,
# a histogram ``svd_x_seconds`` as ``ray_svd_x_seconds_bucket/_sum/_count``. Every series also
# carries Ray's own labels (``WorkerId``, ``NodeAddress``, ``SessionName``...): each process exports
# its own series, so queries sum (counters) or take the max (gauges) over them. A histogram's
# ``_sum`` is Ray's approximation (bucket midpoints x counts): read latencies from the buckets.

#: ``svd_storage_errors_total``'s ``reason`` values.
STORAGE_REASONS = ("credentials", "access_denied", "not_found", "other")
#: ``svd_webhook_deliveries_total``'s ``outcome`` values.
WEBHOOK_OUTCOMES = ("delivered", "retry", "failed", "blocked")
#: ``svd_stage_replicas``'s ``state`` values.
REPLICA_STATES = ("target", "running")

_SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320]
_STARTUP_BUCKETS = [0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280]


class _Metrics:
    """Created lazily inside a Ray worker; ray.util.metrics needs a connected Ray."""

    def __init__(self) -> None:
        from ray.util import metrics

        counter, gauge, histogram = metrics.Counter, metrics.Gauge, metrics.Histogram
        # -- jobs and stages
        self.stage_seconds = histogram(
            "svd_stage_latency_seconds", description="Seconds spent in one pipeline stage for one job.",
            boundaries=_SECONDS_BUCKETS, tag_keys=("stage", "model"))
        self.stage_busy_seconds = counter(
            "svd_stage_busy_seconds_total",
            description="Seconds stage replicas spent on requests (every job, charged or not; the clip's upload "
                        "included); rate() over running replicas is the busy ratio.", tag_keys=("stage",))
        self.jobs_total = counter(
            "svd_jobs_total", description="Jobs reaching a terminal status.", tag_keys=("status", "tenant", "model"))
        self.job_errors = counter(
            "svd_job_errors_total", description="Failed jobs, by the job's error code.",
            tag_keys=("code", "tenant", "model"))
        self.video_seconds = counter(
            "svd_video_seconds_total", description="Seconds of video produced (charged jobs).", tag_keys=("tenant",))
        self.gpu_seconds = counter(
            "svd_gpu_seconds_total", description="GPU-seconds used: replica busy time x GPU share (charged jobs).",
            tag_keys=("tenant", "stage"))
        # -- models and replicas
        self.model_load_seconds = histogram(
            "svd_model_load_seconds",
            description="Seconds one stage replica took to fetch and load its model components (per load).",
            boundaries=[1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640], tag_keys=("stage", "model"))
        self.model_evictions = counter(
            "svd_model_evictions_total",
            description="Models a stage replica unloaded to make room for another (max_num_models_per_replica).",
            tag_keys=("stage", "model"))
        self.replica_starts = counter(
            "svd_replica_starts_total", description="Replica constructors entered (a restart shows as an increase).",
            tag_keys=("deployment",))
        self.replica_ready_seconds = histogram(
            "svd_replica_ready_seconds",
            description="Seconds from a replica's constructor entered to ready to serve (model loading, preload and "
                        "warm-up included).", boundaries=_STARTUP_BUCKETS, tag_keys=("deployment",))
        self.stage_replicas = gauge(
            "svd_stage_replicas", description="Replicas of a stage's deployment: target, and running (from Serve).",
            tag_keys=("stage", "state"))
        # -- the queue and the tenants (the elected janitor sets these; the others hold 0)
        self.queue_depth = gauge("svd_queue_depth", description="Queued jobs in the job store.")
        self.running_jobs = gauge("svd_running_jobs", description="Jobs in progress in the job store.")
        self.queue_oldest_age = gauge(
            "svd_queue_oldest_age_seconds", description="Age of the oldest queued job (0 when none is queued).")
        self.tenant_queued = gauge("svd_tenant_queued_jobs", description="Queued jobs of a tenant.",
                                   tag_keys=("tenant",))
        self.tenant_running = gauge("svd_tenant_running_jobs", description="Jobs of a tenant in progress.",
                                    tag_keys=("tenant",))
        self.tenant_weight_share = gauge(
            "svd_tenant_weight_share",
            description="A tenant's weight over the sum of the weights of tenants with queued or running jobs.",
            tag_keys=("tenant",))
        self.tenant_running_share = gauge(
            "svd_tenant_running_share", description="A tenant's running jobs over all running jobs.",
            tag_keys=("tenant",))
        # -- errors and deliveries
        self.http_errors = counter(
            "svd_http_errors_total",
            description="Error responses (4xx/5xx) the HTTP API sent; api: native, openai, generations, fal, "
                        "stability, files (signed download links) or other.",
            tag_keys=("api", "status", "code", "tenant"))
        self.http_internal_errors = counter(
            "svd_http_internal_errors_total",
            description="Requests answered 500 internal_error (a bug: each has an error id in the logs).",
            tag_keys=("error",))
        self.webhook_deliveries = counter(
            "svd_webhook_deliveries_total",
            description="Webhook delivery attempts by outcome: delivered, retry (a retry follows), failed (given up "
                        "or refused by the receiver), blocked (the URL is not allowed).", tag_keys=("outcome",))
        self.jobstore_errors = counter(
            "svd_jobstore_errors_total", description="Job store calls that failed (backend unreachable or erring).",
            tag_keys=("backend", "op"))
        self.jobstore_up = gauge(
            "svd_jobstore_up", description="1 if this runner replica's last job store ping answered, else 0.",
            tag_keys=("backend",))
        self.storage_errors = counter(
            "svd_storage_errors_total",
            description="Object storage calls that failed; op: put, get, presign, delete, exists, list; reason: "
                        "credentials, access_denied, not_found, other.",
            tag_keys=("backend", "op", "reason"))


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> _Metrics | None:
    """The process's metrics, or None outside a connected Ray worker or driver (unit tests, the CLI)."""
    global _metrics
    ray = sys.modules.get("ray")  # a process that never imported Ray is no Ray worker: no import here
    try:
        if ray is None or not ray.is_initialized():
            return None
        if _metrics is None:
            with _metrics_lock:
                if _metrics is None:
                    _metrics = _Metrics()
    except Exception:  # metrics must never break serving
        logger.debug("metrics unavailable", exc_info=True)
        return None
    return _metrics


def forget_metrics() -> None:
    """Drop this process's metric objects: a driver that shut Ray down and connects again (tests)
    gets new ones, bound to the new session."""
    global _metrics
    with _metrics_lock:
        _metrics = None


def emit(record: Callable[[_Metrics], object]) -> None:
    """Run ``record`` on this process's metrics, if it has any; never raises (a metric must not
    break serving)."""
    recorder = metrics()
    if recorder is None:
        return
    try:
        record(recorder)
    except Exception:  # noqa: BLE001
        logger.debug("could not record a metric", exc_info=True)


def add(counter, value: float, tags: Mapping[str, str]) -> None:
    """``counter`` += ``value``; 0 exports the series at 0 (ray.util.metrics' ``inc`` refuses 0,
    its ``_record`` takes it), so a panel or alert on it has data before the first increment."""
    if value > 0:
        counter.inc(value, tags=dict(tags))
    else:
        counter._record(0.0, tags=dict(tags))


def zero_counters(counter_name: str, label_sets: Iterable[Mapping[str, str]]) -> None:
    """Export ``counter_name`` at 0 for these label values (error counters at process start)."""
    def record(recorder: _Metrics) -> None:
        counter = getattr(recorder, counter_name)
        for labels in label_sets:
            add(counter, 0, labels)

    emit(record)


def count_http_error(*, api: str, status: int, code: str, tenant: str) -> None:
    emit(lambda m: m.http_errors.inc(tags={"api": api, "status": str(status), "code": code, "tenant": tenant}))


def count_jobstore_error(*, backend: str, op: str) -> None:
    emit(lambda m: m.jobstore_errors.inc(tags={"backend": backend, "op": op}))


def count_storage_error(*, backend: str, op: str, reason: str) -> None:
    emit(lambda m: m.storage_errors.inc(tags={"backend": backend, "op": op, "reason": reason}))


def count_webhook_delivery(outcome: str) -> None:
    emit(lambda m: m.webhook_deliveries.inc(tags={"outcome": outcome}))


# -- replica start-up ----------------------------------------------------------------------------


def _replica_deployment() -> str:
    """The deployment this process serves (its Serve replica context), or "" outside one."""
    try:
        from ray import serve

        return serve.get_replica_context().deployment
    except Exception:  # noqa: BLE001 - not a Serve replica
        return ""


def _replica_started() -> tuple[str, float]:
    deployment = _replica_deployment()
    emit(lambda m: m.replica_starts.inc(tags={"deployment": deployment}))
    return deployment, time.monotonic()


def _replica_ready(started: tuple[str, float]) -> None:
    deployment, began = started
    seconds = time.monotonic() - began
    emit(lambda m: m.replica_ready_seconds.observe(seconds, tags={"deployment": deployment}))
    logger.info("%s replica ready in %.2fs", deployment or "replica", seconds)


def timed_replica(cls: type) -> type:
    """Class decorator for a Serve deployment class (put it under ``@serve.deployment``): counts
    each constructor entered (``svd_replica_starts_total``) and times the whole construction, model
    loading and warm-up included (``svd_replica_ready_seconds``), labelled with the deployment name.
    A constructor that raises counts as a start, never as ready."""
    init = cls.__init__
    if inspect.iscoroutinefunction(init):
        @functools.wraps(init)
        async def timed_init(self, *args, **kwargs):
            started = _replica_started()
            await init(self, *args, **kwargs)
            _replica_ready(started)
    else:
        @functools.wraps(init)
        def timed_init(self, *args, **kwargs):
            started = _replica_started()
            init(self, *args, **kwargs)
            _replica_ready(started)
    cls.__init__ = timed_init
    return cls


def set_torch_threads(threads: int) -> None:
    """Ray sets OMP_NUM_THREADS=1 in actors with fractional CPUs; set torch's pool explicitly."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def record_model_load(*, stage: str, model: str, seconds: float) -> None:
    """One model loaded by a stage replica: its load time, and its eviction count from 0 on."""
    tags = {"stage": stage, "model": model}

    def loaded(recorder) -> None:
        recorder.model_load_seconds.observe(seconds, tags=tags)
        add(recorder.model_evictions, 0, tags)

    emit(loaded)
