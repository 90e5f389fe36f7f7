"""What the svd-serve dashboard shows: its rows and panels, as data (monitoring.dashboard lays them out).

Rates are per minute where events are rare (jobs, errors), quantiles come from the histograms'
buckets. Start-up figures are one-off events per replica process, so they are read from the
cumulative histograms of the live series (since the node or the Serve controller started), not
from ``rate()`` (see monitoring.metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from serve.metering.models import CLIENT_ERROR_CODES

from . import metrics as m
from .promql import RATE_INTERVAL, gauge, per_minute, per_second, quantile_cumulative, quantile_over_rate, selector


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: Literal["timeseries", "stat"] = "timeseries"
    width: int = 12
    height: int = 8
    minimum: float | None = 0
    #: (value, colour) steps above the base colour.
    thresholds: tuple[tuple[float, str], ...] = ()
    base_colour: str = "green"
    stacked: bool = False
    #: A regex over series names drawn dashed (the reference line of a comparison).
    dashed_series: str | None = None
    #: Stat value mappings: value -> (text, colour).
    value_text: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    title: str
    panels: tuple[PanelSpec, ...]


def _stage_latency(quantile: float) -> PanelSpec:
    return PanelSpec(
        title=f"Stage latency p{int(quantile * 100)}",
        description=f"{int(quantile * 100)}th percentile of the seconds one stage took for one job, per stage "
                    "(text_to_image, image_encode, sampling, decode, video_encode).",
        queries=(Query(expr=quantile_over_rate(m.STAGE_LATENCY, quantile, by=("stage",)), legend="{{stage}}"),),
        unit="s", width=8,
    )


_RUNNING = 'state="running"'
#: Client errors (bad input found while the job ran): failures that are not the service's fault, left
#: out as the metering leaves them out of uncharged failures and SvdJobFailureRatioHigh of its ratio.
_CLIENT_ERROR = f'code=~"{"|".join(sorted(CLIENT_ERROR_CODES))}"'


def _service_failure_ratio(by: tuple[str, ...] = ()) -> str:
    """Jobs failed through the service's fault over all finished jobs: failed jobs minus those with a
    client error code (each failed job counts once in both metrics); 0, not nothing, without failures."""
    failed = per_second(m.JOBS, 'status="failed"', by=by)
    client = per_second(m.JOB_ERRORS, _CLIENT_ERROR, by=by)
    finished = per_second(m.JOBS, by=by)
    return f"(({failed} - ({client} or 0 * {failed})) or 0 * {finished}) / {finished}"


OVERVIEW = Section("Overview", (
    PanelSpec(title="Queued jobs", description="Jobs waiting in the job store.", kind="stat", width=4, height=4,
              queries=(Query(gauge(m.QUEUE_DEPTH), "queued"),)),
    PanelSpec(title="Running jobs", description="Jobs in progress.", kind="stat", width=4, height=4,
              queries=(Query(gauge(m.RUNNING_JOBS), "running"),)),
    PanelSpec(title="Oldest queued job", description="Age of the oldest queued job (0 when none waits). "
              "Alert SvdQueueOldestJobTooOld fires above 10 minutes.", kind="stat", width=4, height=4, unit="s",
              thresholds=((300, "orange"), (600, "red")), queries=(Query(gauge(m.QUEUE_OLDEST_AGE), "oldest"),)),
    PanelSpec(title="Jobs finished / min", description="Jobs reaching a terminal status per minute.", kind="stat",
              width=4, height=4, queries=(Query(per_minute(m.JOBS), "finished"),)),
    PanelSpec(title="Service failures", description="Jobs failed through the service's fault over all finished "
              "jobs (client errors such as invalid_image left out). Alert SvdJobFailureRatioHigh fires above 10% "
              "of a model's jobs over 15 minutes.", kind="stat", width=4, height=4, unit="percentunit",
              thresholds=((0.05, "orange"), (0.1, "red")), queries=(Query(_service_failure_ratio(), "failed"),)),
    PanelSpec(title="Job store", description="Whether every runner replica's last ping of the job store answered.",
              kind="stat", width=4, height=4, base_colour="red", thresholds=((1, "green"),), minimum=None,
              value_text={"0": ("DOWN", "red"), "1": ("UP", "green")},
              queries=(Query(gauge(m.JOBSTORE_UP, aggregate="min"), "up"),)),
))

QUEUE_AND_REPLICAS = Section("Queue and replicas", (
    PanelSpec(title="Queue", description="Queued and running jobs.", queries=(
        Query(gauge(m.QUEUE_DEPTH), "queued"), Query(gauge(m.RUNNING_JOBS), "running"))),
    PanelSpec(title="Oldest queued job age", description="Age of the oldest queued job; a steady climb means the "
              "stages cannot keep up (or none runs).", unit="s", thresholds=((600, "red"),),
              queries=(Query(gauge(m.QUEUE_OLDEST_AGE), "oldest queued job"),)),
    PanelSpec(title="Replicas per stage: target vs running", description="The replicas Serve aims for (dashed) and "
              "those running, per stage. Running below target for long: no GPU node, or replicas failing to start.",
              dashed_series=".* target$",
              queries=(Query(gauge(m.STAGE_REPLICAS, by=("stage", "state")), "{{stage}} {{state}}"),)),
    PanelSpec(title="Healthy Serve replicas per deployment", description="Replicas the Serve controller reports "
              "healthy, every deployment (the stages, Ingress and JobRunner).",
              queries=(Query(f"sum by (deployment) ({selector(m.SERVE_REPLICA_HEALTHY)})", "{{deployment}}"),)),
))

LATENCY = Section("Stage latency", tuple(_stage_latency(q) for q in (0.5, 0.95, 0.99)))

GPU = Section("GPU", (
    PanelSpec(title="GPU-seconds per second by stage (charged)", description="Charged GPU-seconds per second, i.e. "
              "GPUs kept busy by charged jobs, per stage.", width=8, stacked=True,
              queries=(Query(per_second(m.GPU_SECONDS, by=("stage",)), "{{stage}}"),)),
    PanelSpec(title="Busy ratio per stage", description="Seconds the stage's replicas spent on requests per second, "
              "over its running replicas (every job, charged or not). Near 1: the stage is the bottleneck.",
              unit="percentunit", width=8, thresholds=((0.8, "orange"), (0.95, "red")),
              queries=(Query(f"{per_second(m.STAGE_BUSY, by=('stage',))} / on (stage) "
                             f"{gauge(m.STAGE_REPLICAS, _RUNNING, by=('stage',))}", "{{stage}}"),)),
    PanelSpec(title="GPU-seconds per second by tenant (charged)", description="Charged GPU-seconds per second per "
              "tenant (what GET /v1/usage invoices).", width=8, stacked=True,
              queries=(Query(per_second(m.GPU_SECONDS, by=("tenant",)), "{{tenant}}"),)),
))

JOBS_AND_ERRORS = Section("Jobs and errors", (
    PanelSpec(title="Jobs finished per minute by outcome", description="Jobs reaching completed, failed or cancelled.",
              width=8, stacked=True, queries=(Query(per_minute(m.JOBS, by=("status",)), "{{status}}"),)),
    PanelSpec(title="Service failure ratio by model", description="Jobs failed through the service's fault over "
              "finished jobs, per model (client errors left out: see the error codes). Alert SvdJobFailureRatioHigh "
              "fires above 10%.", unit="percentunit", width=8, thresholds=((0.1, "red"),),
              queries=(Query(_service_failure_ratio(by=("model",)), "{{model}}"),)),
    PanelSpec(title="Job errors per minute by code", description="Failed jobs by the error code in the job "
              "(docs/reliability.md lists them).", width=8, stacked=True,
              queries=(Query(per_minute(m.JOB_ERRORS, by=("code",)), "{{code}}"),)),
    PanelSpec(title="HTTP error responses per minute", description="Every error response the API sent, by API, "
              "status and error code (429s included; tenant empty before authentication).", width=12,
              queries=(Query(per_minute(m.HTTP_ERRORS, by=("api", "status", "code")), "{{api}} {{status}} {{code}}"),)),
    PanelSpec(title="Internal errors per minute", description="Requests answered 500 internal_error, by API: each "
              "is a bug, with an error id (X-Error-Id) in the logs next to the exception. Alert SvdInternalErrors.",
              width=12, queries=(Query(per_minute(m.HTTP_ERRORS, 'code="internal_error"', by=("api",)), "{{api}}"),)),
))

TENANTS = Section("Tenants", (
    PanelSpec(title="Completed jobs per minute by tenant", description="Per-tenant throughput.", width=8, stacked=True,
              queries=(Query(per_minute(m.JOBS, 'status="completed"', by=("tenant",)), "{{tenant}}"),)),
    PanelSpec(title="Video seconds delivered per minute by tenant", description="Seconds of video delivered (charged "
              "jobs) per minute.", width=8, stacked=True, unit="s",
              queries=(Query(per_minute(m.VIDEO_SECONDS, by=("tenant",)), "{{tenant}}"),)),
    PanelSpec(title="Running share vs weight share", description="A tenant's share of the running jobs (solid) and "
              "its weight over the weights of the tenants with work (dashed): weighted fair scheduling keeps them "
              "close while several tenants wait.", unit="percentunit", width=8, dashed_series=".* weight$",
              queries=(Query(gauge(m.TENANT_RUNNING_SHARE, by=("tenant",)), "{{tenant}} running"),
                       Query(gauge(m.TENANT_WEIGHT_SHARE, by=("tenant",)), "{{tenant}} weight"))),
    PanelSpec(title="Queued and running jobs by tenant", description="Per tenant: jobs queued (dashed) and in "
              "progress.", width=12, dashed_series=".* queued$",
              queries=(Query(gauge(m.TENANT_QUEUED, by=("tenant",)), "{{tenant}} queued"),
                       Query(gauge(m.TENANT_RUNNING, by=("tenant",)), "{{tenant}} running"))),
    PanelSpec(title="429 responses per minute by tenant", description="Requests refused with 429 (rate limit, "
              "quota or queue cap), by tenant and error code.", width=12,
              queries=(Query(per_minute(m.HTTP_ERRORS, 'status="429"', by=("tenant", "code")),
                             "{{tenant}} {{code}}"),)),
))

DELIVERY_AND_STORAGE = Section("Webhooks, job store and storage", (
    PanelSpec(title="Webhook deliveries per minute by outcome", description="delivered, retry (another attempt "
              "follows), failed (given up or refused by the receiver), blocked (URL not allowed).", width=12,
              queries=(Query(per_minute(m.WEBHOOK_DELIVERIES, by=("outcome",)), "{{outcome}}"),)),
    PanelSpec(title="Job store reachable", description="Per backend, the lowest of the runner replicas' last ping "
              "(1 answered, 0 not).", width=12, minimum=None, base_colour="red", thresholds=((1, "green"),),
              queries=(Query(gauge(m.JOBSTORE_UP, by=("backend",), aggregate="min"), "{{backend}}"),)),
    PanelSpec(title="Job store errors per minute", description="Job store calls that failed, by backend and "
              "operation.", width=12,
              queries=(Query(per_minute(m.JOBSTORE_ERRORS, by=("backend", "op")), "{{backend}} {{op}}"),)),
    PanelSpec(title="Storage errors per minute", description="Object storage calls that failed, by backend, "
              "operation and reason (credentials and access_denied: alert SvdStorageCredentialErrors).", width=12,
              queries=(Query(per_minute(m.STORAGE_ERRORS, by=("backend", "op", "reason")),
                             "{{backend}} {{op}} {{reason}}"),)),
))

STARTUP = Section("Start-up and models", (
    PanelSpec(title="Cold start: replica created to ready (Serve)", description="Serve controller's time from "
              "creating a replica to its being ready, scheduling (waiting for a GPU node) included; over the "
              "replicas started since the controller started.", unit="s", width=8,
              queries=tuple(Query(quantile_cumulative(m.SERVE_REPLICA_STARTUP, q, by=("deployment",)) + " / 1000",
                                  f"{{{{deployment}}}} p{int(q * 100)}") for q in (0.5, 0.95))),
    PanelSpec(title="Replica ready time (constructor to ready)", description="Time from a replica's constructor to "
              "ready to serve (model loading, preload and warm-up), over the replicas started on the current nodes: "
              "median and slowest.", unit="s", width=8,
              queries=(Query(quantile_cumulative(m.REPLICA_READY, 0.5, by=("deployment",)), "{{deployment}} p50"),
                       Query(f"max by (deployment) ({selector(m.REPLICA_READY, sample=m.REPLICA_READY.sum)} / "
                             f"{selector(m.REPLICA_READY, sample=m.REPLICA_READY.count)})", "{{deployment}} max"))),
    PanelSpec(title="Model load time by stage", description="Seconds a stage replica took to fetch and load a model "
              "(at start-up and on demand), over the loads on the current nodes.", unit="s", width=8,
              queries=tuple(Query(quantile_cumulative(m.MODEL_LOAD, q, by=("stage",)), f"{{{{stage}}}} p{int(q * 100)}")
                            for q in (0.5, 0.95))),
    PanelSpec(title="Replica starts per deployment", description="Replica processes started on the current nodes "
              "(a step up is a start: a scale-up, a deploy or a restart). Alert SvdReplicasRestarting.", width=12,
              queries=(Query(f"sum by (deployment) ({selector(m.REPLICA_STARTS)})", "{{deployment}}"),)),
    PanelSpec(title="Model loads per minute", description="Models a stage replica loaded. After start-up a load "
              "means a request found its model unloaded (first use, or evicted beyond max_num_models_per_replica): "
              "steady loads mean reloads on the request path.", width=12,
              queries=(Query(f"60 * sum by (stage, model) (rate({selector(m.MODEL_LOAD, sample=m.MODEL_LOAD.count)}"
                             f"[{RATE_INTERVAL}]))", "{{stage}} {{model}}"),)),
))

SECTIONS: tuple[Section, ...] = (OVERVIEW, QUEUE_AND_REPLICAS, LATENCY, GPU, JOBS_AND_ERRORS, TENANTS,
                                 DELIVERY_AND_STORAGE, STARTUP)
