"""Tracing (OpenTelemetry), metrics (ray.util.metrics) and log context for every process.

One trace per job: the ingress opens the ``admission`` span and stores its W3C ``traceparent``
on the job; the runner continues it with a ``job`` span; every stage replica, in its own Ray
process, opens its stage span as a child of the context it is handed. Nothing here is required
for correctness: with ``exporter: none`` spans are created and dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator, Mapping

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


class _Metrics:
    """Created lazily inside a Ray worker; ray.util.metrics needs a connected Ray."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.stage_seconds = metrics.Histogram(
            "svd_stage_latency_seconds",
            description="Seconds spent in one pipeline stage for one job.",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320],
            tag_keys=("stage",),
        )
        self.jobs_total = metrics.Counter(
            "svd_jobs_total", description="Jobs reaching a status.", tag_keys=("status", "tenant")
        )
        self.video_seconds = metrics.Counter(
            "svd_video_seconds_total", description="Seconds of video produced (charged jobs).", tag_keys=("tenant",)
        )
        self.gpu_seconds = metrics.Counter(
            "svd_gpu_seconds_total", description="GPU-seconds used: replica busy time x GPU share (charged jobs).",
            tag_keys=("tenant", "stage"),
        )
        self.model_load_seconds = metrics.Histogram(
            "svd_model_load_seconds",
            description="Seconds one stage replica took to fetch and load its model components (per load).",
            boundaries=[1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640],
            tag_keys=("stage", "model"),
        )
        self.model_evictions = metrics.Counter(
            "svd_model_evictions_total",
            description="Models a stage replica unloaded to make room for another (max_num_models_per_replica).",
            tag_keys=("stage", "model"),
        )
        self.http_internal_errors = metrics.Counter(
            "svd_http_internal_errors_total",
            description="Requests answered 500 internal_error (a bug: each has an error id in the logs).",
            tag_keys=("error",),
        )
        self.queue_depth = metrics.Gauge("svd_queue_depth", description="Queued jobs in the job store.")
        self.running_jobs = metrics.Gauge("svd_running_jobs", description="Jobs in progress in the job store.")


_metrics: _Metrics | None = None


def metrics() -> _Metrics | None:
    """The process's metrics, or None outside a Ray worker (unit tests, the CLI)."""
    global _metrics
    if _metrics is None:
        try:
            import ray

            if not ray.is_initialized():
                return None
            _metrics = _Metrics()
        except Exception:  # metrics must never break serving
            logger.debug("metrics unavailable", exc_info=True)
            return None
    return _metrics


def set_torch_threads(threads: int) -> None:
    """Ray sets OMP_NUM_THREADS=1 in actors with fractional CPUs; set torch's pool explicitly."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
