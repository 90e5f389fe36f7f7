"""A fault run: the Serve application on a real multi-node local Ray cluster with a Redis job
store and S3 storage, a steady load, and faults injected on a timeline.

The faults are what an operator meets: Redis killed and restarted, the S3 endpoint hanging, a
Sampler replica killed mid-step, a runner replica killed (with webhook deliveries pending when
the load asks for webhooks), and a worker node removed from the cluster. Each fault is a named
function of the run; :meth:`FaultRun.timeline` plays them while the load runs, then every
accepted job is followed to its end and the report says what clients saw.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .load import LoadReport, SteadyLoad
from .services import RedisProcess, S3Process, free_port

APP = "svd"
BUCKET = "svd-faults"
#: Two interchangeable worker nodes: every stage can run on either, so one can be removed.
WORKER = {"num_cpus": 3, "num_gpus": 2, "resources": {"svd_worker": 100}}
#: Small jobs: the tiny model at 64x64 takes about a second of CPU per stage.
SMALL = {"num_frames": 6, "num_inference_steps": 6, "width": 64, "height": 64}


@dataclass
class FaultEvent:
    name: str
    at_s: float
    seconds: float = 0.0
    detail: str = ""


@dataclass
class FaultReport:
    load: LoadReport
    events: list[FaultEvent] = field(default_factory=list)
    webhooks: dict[str, Any] = field(default_factory=dict)
    completed_ids: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {**self.load.as_dict(), "faults": [vars(event) for event in self.events], "webhooks": self.webhooks}


def app_config(workdir: Path, model_dir: Path, redis_url: str, s3_url: str, tenants_file: Path) -> dict[str, Any]:
    def stage(**extra):
        return {"num_replicas": 1, "graceful_shutdown_timeout_s": 10, "health_check_period_s": 2,
                "health_check_timeout_s": 10,
                "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25, "resources": {"svd_worker": 1}}, **extra}

    return {
        "model": {"source": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "text_to_image_model": None,
        "stages": {"image_encoder": stage(max_ongoing_requests=8), "sampler": stage(max_ongoing_requests=2),
                   "decoder": stage(max_ongoing_requests=8), "video_encoder": stage(max_ongoing_requests=8),
                   "runner": {"ray_actor_options": {"num_cpus": 0.1}, "graceful_shutdown_timeout_s": 6},
                   "ingress": {"ray_actor_options": {"num_cpus": 0.1}}},
        "storage": {"backend": "s3", "bucket": BUCKET, "endpoint_url": s3_url, "region": "us-east-1"},
        "job_store": {"backend": "redis", "redis_url": redis_url, "key_prefix": f"faults{time.time_ns()}",
                      "lease_s": 4, "max_attempts": 6},
        "auth": {"tenants_file": str(tenants_file)},
        "max_inflight_jobs": 8,
        "url_allowlist": ["127.0.0.1"],
        "webhooks": {"initial_backoff_s": 1.0, "max_backoff_s": 2.0, "max_elapsed_s": 120},
    }


class FaultRun:
    """The cluster, the services and the app, started by ``with FaultRun(model_dir) as run:``."""

    def __init__(self, model_dir: Path, *, workdir: Path | None = None) -> None:
        self.model_dir = Path(model_dir)
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="svd-faults-")
        self.workdir = Path(workdir or self._tmp.name)
        self.redis = RedisProcess(self.workdir / "redis")
        self.s3 = S3Process()
        self.events: list[FaultEvent] = []
        self._stack = contextlib.ExitStack()
        self.started_at = 0.0

    # -- set-up -----------------------------------------------------------------------------------

    def __enter__(self) -> "FaultRun":
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _start(self) -> None:
        import boto3
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from serve.app import build_app
        from serve.tenants import add_tenant, rotate_webhook_secret

        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(name, value)
        self.redis.start()
        self._stack.callback(self.redis.stop)
        self.s3.start()
        self._stack.callback(self.s3.stop)
        boto3.client("s3", endpoint_url=self.s3.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        tenants = self.workdir / "tenants.yaml"
        limits = {"rate_limit_per_minute": 100000, "burst": 10000, "max_running_jobs": 100, "max_queued_jobs": 10000}
        self.api_key = add_tenant(tenants, "load", **limits)
        rotate_webhook_secret(tenants, "load")
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        self._stack.callback(self.cluster.shutdown)
        self.workers = [self.cluster.add_node(**WORKER) for _ in range(2)]
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level="ERROR", log_to_driver=False)
        self._stack.callback(ray.shutdown)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self._stack.callback(serve.shutdown)
        config = app_config(self.workdir, self.model_dir, self.redis.url, self.s3.url, tenants)
        serve.run(build_app(config), name=APP, route_prefix="/")
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready(120)

    def _wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the application was not ready within {timeout_s}s")

    # -- faults -----------------------------------------------------------------------------------

    def restart_redis(self, seconds: float) -> str:
        self.redis.kill()
        time.sleep(seconds)
        self.redis.start()
        return f"redis-server killed (SIGKILL), restarted after {seconds:g}s from its append-only file"

    def pause_s3(self, seconds: float) -> str:
        self.s3.pause()
        time.sleep(seconds)
        self.s3.resume()
        return f"S3 endpoint stopped (SIGSTOP) for {seconds:g}s"

    def kill_replicas(self, deployment: str, *, when: Callable[[], bool] | None = None) -> str:
        import ray

        deadline = time.monotonic() + 30
        while when is not None and not when() and time.monotonic() < deadline:
            time.sleep(0.1)
        victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]
        for actor in victims:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        return f"{len(victims)} {deployment} replica(s) killed (ray.kill)"

    def remove_worker(self) -> str:
        node = self.workers.pop(0)
        self.cluster.remove_node(node)
        self.workers.append(self.cluster.add_node(**WORKER))  # capacity comes back, as an autoscaler would
        return "a worker node removed (its replicas died with it); a fresh one joined"

    # -- the run ----------------------------------------------------------------------------------

    def timeline(self, faults: list[tuple[float, str, Callable[[], str]]], *, rate_per_s: float, run_s: float,
                 settle_s: float, image: Path, webhook_url: str | None = None) -> FaultReport:
        """Run the load for ``run_s`` seconds, playing ``(at_s, name, fault)`` in order, then follow
        every accepted job to its end (at most ``settle_s`` seconds)."""
        load = SteadyLoad(self.url, self.api_key, rate_per_s=rate_per_s, params=SMALL, image=image,
                          webhook_url=webhook_url).start()
        self.started_at = start = time.monotonic()
        try:
            for at_s, name, fault in sorted(faults, key=lambda item: item[0]):
                time.sleep(max(0.0, start + at_s - time.monotonic()))
                began = time.monotonic()
                detail = fault()
                self.events.append(FaultEvent(name=name, at_s=round(began - start, 1),
                                              seconds=round(time.monotonic() - began, 1), detail=detail))
            time.sleep(max(0.0, start + run_s - time.monotonic()))
        finally:
            load.stop()
        report = load.settle(settle_s)
        return FaultReport(load=report, events=list(self.events), completed_ids=set(load.completed_ids))
