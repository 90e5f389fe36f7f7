"""The metrics the dashboard and the alert rules read, each named once, as Prometheus sees it.

svd-serve's metrics are declared in ``serve/telemetry.py`` through ``ray.util.metrics``. Ray's
metrics agent (one per node, on the metrics export port; it runs without the dashboard) serves
them, and Ray Serve's own, with a ``ray_`` prefix; a counter gets a ``_total`` suffix unless its
name already ends so; a histogram is ``<name>_bucket``/``_sum``/``_count``. Checked against Ray
2.60's agent (``open_telemetry_metric_recorder.py``: ``f"{NAMESPACE}_{name}"`` with
``NAMESPACE = "ray"``) and a real scrape.

Every series also carries Ray's own labels (``WorkerId``, ``NodeAddress``, ``SessionName``,
``Component``, ``Version``): each Ray process exports its own series. So queries ``sum`` counters
and take the ``max`` of store-wide gauges (one elected process sets them; the others hold 0). A
counter series of a dead process stays on its node's agent until the node goes away, and a new
process starts new series: ``rate()`` misses the first increment of a new series, which is why
one-off events (a replica's start) are read from the cumulative values, not from ``rate()``.

Renaming a metric is one edit here; tests/test_dashboard.py checks this catalogue against the
declarations in serve/ (names, kinds, labels) and Ray Serve's source, and tests/test_alert_rules.py
checks that the rules file reads only metrics listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Prefix Ray's metrics agent puts on every metric it exports (its Prometheus namespace "ray").
RAY_PREFIX = "ray_"

MetricKind = Literal["counter", "gauge", "histogram"]
Owner = Literal["svd", "ray_serve"]


@dataclass(frozen=True)
class Metric:
    """One metric: as declared to ``ray.util.metrics`` and as exported to Prometheus."""

    declared: str
    kind: MetricKind
    labels: tuple[str, ...]
    owner: Owner
    description: str

    @property
    def name(self) -> str:
        """The metric name Prometheus stores (the sample name of a counter or gauge)."""
        name = RAY_PREFIX + self.declared
        if self.kind == "counter" and not name.endswith("_total"):
            name += "_total"
        return name

    def _histogram_series(self, suffix: str) -> str:
        if self.kind != "histogram":
            raise ValueError(f"{self.declared} is a {self.kind}, not a histogram: it has no {suffix} series")
        return f"{self.name}{suffix}"

    @property
    def bucket(self) -> str:
        return self._histogram_series("_bucket")

    @property
    def sum(self) -> str:
        return self._histogram_series("_sum")

    @property
    def count(self) -> str:
        return self._histogram_series("_count")

    @property
    def sample_names(self) -> tuple[str, ...]:
        """Every sample name this metric produces in Prometheus."""
        if self.kind == "histogram":
            return (self.bucket, self.sum, self.count)
        return (self.name,)


def _svd(declared: str, kind: MetricKind, labels: tuple[str, ...], description: str) -> Metric:
    return Metric(declared=declared, kind=kind, labels=labels, owner="svd", description=description)


def _serve(declared: str, kind: MetricKind, labels: tuple[str, ...], description: str) -> Metric:
    return Metric(declared=declared, kind=kind, labels=labels, owner="ray_serve", description=description)


# -- jobs and stages
STAGE_LATENCY = _svd("svd_stage_latency_seconds", "histogram", ("stage", "model"),
                     "Seconds one pipeline stage took for one job.")
STAGE_BUSY = _svd("svd_stage_busy_seconds_total", "counter", ("stage",),
                  "Seconds stage replicas spent on requests (every job).")
JOBS = _svd("svd_jobs_total", "counter", ("status", "tenant", "model"),
            "Jobs reaching a terminal status (completed, failed, cancelled).")
JOB_ERRORS = _svd("svd_job_errors_total", "counter", ("code", "tenant", "model"),
                  "Failed jobs by the job's error code.")
VIDEO_SECONDS = _svd("svd_video_seconds_total", "counter", ("tenant",),
                     "Seconds of video delivered (charged jobs).")
GPU_SECONDS = _svd("svd_gpu_seconds_total", "counter", ("tenant", "stage"),
                   "Charged GPU-seconds: busy time x the stage's GPU share.")
# -- models and replicas
MODEL_LOAD = _svd("svd_model_load_seconds", "histogram", ("stage", "model"),
                  "Seconds a stage replica took to fetch and load one model.")
REPLICA_STARTS = _svd("svd_replica_starts_total", "counter", ("deployment",),
                      "Replica constructors entered (one series per replica process).")
REPLICA_READY = _svd("svd_replica_ready_seconds", "histogram", ("deployment",),
                     "Seconds from a replica's constructor entered to ready (model load and warm-up included).")
STAGE_REPLICAS = _svd("svd_stage_replicas", "gauge", ("stage", "state"),
                      "Replicas of a stage: state target or running (from Serve's status).")
# -- the queue and the tenants
QUEUE_DEPTH = _svd("svd_queue_depth", "gauge", (), "Queued jobs in the job store.")
RUNNING_JOBS = _svd("svd_running_jobs", "gauge", (), "Jobs in progress.")
QUEUE_OLDEST_AGE = _svd("svd_queue_oldest_age_seconds", "gauge", (),
                        "Age of the oldest queued job (0 when none waits).")
TENANT_QUEUED = _svd("svd_tenant_queued_jobs", "gauge", ("tenant",), "Queued jobs of a tenant.")
TENANT_RUNNING = _svd("svd_tenant_running_jobs", "gauge", ("tenant",), "Jobs of a tenant in progress.")
TENANT_WEIGHT_SHARE = _svd("svd_tenant_weight_share", "gauge", ("tenant",),
                           "A tenant's weight over the weights of the tenants with work.")
TENANT_RUNNING_SHARE = _svd("svd_tenant_running_share", "gauge", ("tenant",),
                            "A tenant's running jobs over all running jobs.")
# -- errors and deliveries
HTTP_ERRORS = _svd("svd_http_errors_total", "counter", ("api", "status", "code", "tenant"),
                   "Error responses the HTTP API sent.")
WEBHOOK_DELIVERIES = _svd("svd_webhook_deliveries_total", "counter", ("outcome",),
                          "Webhook delivery attempts: delivered, retry, failed, blocked.")
JOBSTORE_ERRORS = _svd("svd_jobstore_errors_total", "counter", ("backend", "op"), "Job store calls that failed.")
JOBSTORE_UP = _svd("svd_jobstore_up", "gauge", ("backend",), "1 if a runner's last job store ping answered.")
STORAGE_ERRORS = _svd("svd_storage_errors_total", "counter", ("backend", "op", "reason"),
                      "Object storage calls that failed, by reason.")
# -- Ray Serve's own (ray/serve/_private: replica.py, deployment_state.py)
SERVE_REPLICA_STARTS = _serve("serve_deployment_replica_starts", "counter", ("deployment", "replica", "application"),
                              "Set to 1 by each Serve replica when it starts (one series per replica id).")
SERVE_REPLICA_HEALTHY = _serve("serve_deployment_replica_healthy", "gauge", ("deployment", "replica", "application"),
                               "1 for each healthy replica, 0 for an unhealthy one (set by the Serve controller).")
SERVE_REPLICA_STARTUP = _serve("serve_replica_startup_latency_ms", "histogram", ("deployment", "application"),
                               "Milliseconds from replica creation to ready (scheduling, node start-up included).")

CATALOGUE: tuple[Metric, ...] = tuple(value for value in globals().values() if isinstance(value, Metric))


def by_sample_name() -> dict[str, Metric]:
    """Every Prometheus sample name of the catalogue, mapped to its metric."""
    return {sample: metric for metric in CATALOGUE for sample in metric.sample_names}
