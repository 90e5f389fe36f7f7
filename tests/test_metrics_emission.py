"""The service's Prometheus metrics as Ray exports them: each emission site, driven with real
parts (the HTTP app, SQLite and Redis stores, local and moto S3 storage, a webhook receiver, the
janitor, a Serve application), then read back from the Ray metrics agent's export endpoint.

One Ray session serves the module: started here with ``include_dashboard=False`` (the metrics
agent runs without the dashboard) on a known ``_metrics_export_port``, reporting every 0.5 s. The
test process is the Ray driver, so what it records is exported like a replica's would be. The
live deployment scraped by a real Prometheus is tests/test_prometheus*.py's; the pure mappings
(S3 reasons, adapter names) are checked without Ray at the end.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures_api import make_api
from prometheus_client.parser import text_string_to_metric_families
from waiting import free_port, wait_for

from pipelines import s3client
from pipelines.sample_image import SAMPLE_IMAGE_PATH
from serve.api.errors import HTTPErrorMetrics, adapter_api_name, export_zero_error_series
from serve.config import AppConfig, StorageConfig
from serve.jobstore import (AdmissionPolicy, Job, JobError, JobStoreError, RedisJobStore, SqliteJobStore,
                            utcnow)
from serve.lifecycle import JobLifecycle
from serve.metering import make_usage_ledger
from serve.runner import Janitor
from serve.runner.janitor import stage_replica_counts
from serve.storage import ObjectNotFound, S3Storage, StorageError, make_storage
from serve.storage.s3 import failure_reason
from serve.tenants import TenantRegistry, add_tenant
from serve.webhooks import WebhookSender
from serve.webhooks.delivery import metric_outcome

PNG = Path(SAMPLE_IMAGE_PATH).read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
SMALL = {"num_frames": 4, "num_inference_steps": 2, "width": 64, "height": 64}


class Exported:
    """The Ray metrics agent's ``/metrics``, read as Prometheus reads it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        text = urllib.request.urlopen(self.url, timeout=10).read().decode()
        return [(sample.labels, sample.value) for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == name]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum over every process's series of ``name`` with these labels; None if none exists."""
        found = [value for series, value in self.samples(name)
                 if all(series.get(key) == want for key, want in labels.items())]
        return sum(found) if found else None

    def wait(self, name: str, value: float | None = None, *, timeout_s: float = 20.0, **labels: str) -> float:
        """The value once a series of ``name`` with ``labels`` is exported (and, given ``value``,
        once the sum equals it)."""
        def ready():
            current = self.value(name, **labels)
            return current is not None and (value is None or current == value) and (current, )

        return wait_for(ready, timeout_s, f"{name}{labels} == {value}")[0]


@pytest.fixture(scope="module")
def exported():
    import ray

    from serve.telemetry import forget_metrics

    port = free_port()
    ray.init(address="local", include_dashboard=False, num_cpus=2, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        yield Exported(f"http://127.0.0.1:{port}/metrics")
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
            forget_metrics()


# -- the HTTP API ------------------------------------------------------------------------------


@pytest.mark.ray
def test_every_error_response_is_counted_by_api_status_code_and_tenant(exported, tmp_path):
    api = make_api(tmp_path, tenants={"alice": {}, "limited": {"rate_limit_per_minute": 1, "burst": 1}})
    api.app.add_middleware(HTTPErrorMetrics, authenticate=TenantRegistry(api.tenants_file).authenticate)
    alice, limited = (f"Bearer {api.keys[name]}" for name in ("alice", "limited"))
    export_zero_error_series()  # as the ingress does at start: series for alert expressions before any error
    exported.wait("ray_svd_http_errors_total", 0, api="native", status="429", code="rate_limited", tenant="")

    assert api.get("/v1/videos/vid_nope").status_code == 401
    assert api.get("/v1/videos/vid_nope", headers={"Authorization": alice}).status_code == 404
    assert api.get("/v1/videos/vid_nope", headers={"Authorization": alice,
                                                    "User-Agent": "OpenAI/Python 1.99.0"}).status_code == 404
    body = {"image_url": DATA_URL, **SMALL}
    assert api.post("/v1/videos", headers={"Authorization": limited}, json=body).status_code == 202
    assert api.post("/v1/videos", headers={"Authorization": limited}, json=body).status_code == 429
    assert api.get("/fal-ai/stable-video/requests/nope/status",
                   headers={"Authorization": f"Key {api.keys['alice']}"}).status_code == 404
    answer = api.post("/v1/video/generations", headers={"Authorization": alice}, json={"prompt": 5})
    assert answer.status_code == 422 and answer.json()["error"]["code"] != ""
    refused = api.post("/v1/video/generations", json={"prompt": "x"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"  # OpenAI's spelling
    assert api.post("/v2beta/image-to-video").status_code == 401
    assert api.get("/files/alice/x/clip.mp4?expires=1&signature=x").status_code in (403, 404)
    assert api.get("/no/such/path/here").status_code == 404

    expected = [
        dict(api="native", status="401", code="unauthorized", tenant=""),
        dict(api="native", status="404", code="not_found", tenant="alice"),
        dict(api="openai", status="404", code="not_found", tenant="alice"),
        dict(api="native", status="429", code="rate_limited", tenant="limited"),
        dict(api="fal", status="404", code="not_found", tenant="alice"),
        dict(api="generations", status="422", code="invalid_parameter", tenant="alice"),
        dict(api="generations", status="401", code="unauthorized", tenant=""),  # our code, whatever the body says
        dict(api="stability", status="401", code="unauthorized", tenant=""),
        dict(api="other", status="404", code="not_found", tenant=""),
    ]
    for labels in expected:
        assert exported.wait("ray_svd_http_errors_total", 1, **labels) == 1, labels
    files = [series for series, value in exported.samples("ray_svd_http_errors_total")
             if series["api"] == "files" and value == 1]
    assert files and files[0]["tenant"] == ""


# -- the job store ------------------------------------------------------------------------------


@pytest.mark.ray
def test_job_store_failures_are_counted_once_per_call(exported, tmp_path):
    dead = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0", key_prefix="metrics", socket_timeout_s=0.5)
    with pytest.raises(JobStoreError):
        dead.get("vid_x", tenant=None)
    with pytest.raises(JobStoreError):
        dead.claim("vid_x", owner="runner", lease_s=10)  # a transition: claim runs in _mutate
    with pytest.raises(JobStoreError):
        dead.tenant_job_counts(["alice"])
    exported.wait("ray_svd_jobstore_errors_total", 1, backend="redis", op="get")
    exported.wait("ray_svd_jobstore_errors_total", 1, backend="redis", op="tenant_job_counts")
    exported.wait("ray_svd_jobstore_errors_total", 1, backend="redis", op="mutate")
    assert exported.value("ray_svd_jobstore_errors_total", backend="redis", op="claim") is None  # counted once

    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as other:  # an OperationalError from then on
        other.execute("DROP TABLE jobs")
    with pytest.raises(JobStoreError):
        store.queue_depth()
    exported.wait("ray_svd_jobstore_errors_total", 1, backend="sqlite", op="queue_depth")
    store.close()


# -- storage ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authenticating_s3(tmp_path_factory):
    """A moto S3 server of its own that checks credentials after its first three requests (the
    bucket, a user with no policy, its key): ``(endpoint, bucket, (user key id, user secret))``."""
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3", "AWS_ACCESS_KEY_ID": "AKIASETUPSETUPSETUP0",
           "AWS_SECRET_ACCESS_KEY": "setup", "AWS_DEFAULT_REGION": "us-east-1"}
    log = (tmp_path_factory.mktemp("moto-auth") / "moto.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, 30, "the moto server")
        session = boto3.session.Session(aws_access_key_id="AKIASETUPSETUPSETUP0", aws_secret_access_key="setup",
                                        region_name="us-east-1")
        session.client("s3", endpoint_url=endpoint).create_bucket(Bucket="metrics")
        iam = session.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="no-policy")
        key = iam.create_access_key(UserName="no-policy")["AccessKey"]
        yield endpoint, "metrics", (key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def _s3_with(monkeypatch, endpoint: str, bucket: str, key_id: str | None, secret: str | None) -> S3Storage:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    if key_id is not None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    return S3Storage(StorageConfig(backend="s3", bucket=bucket, endpoint_url=endpoint, region="us-east-1"))


@pytest.mark.ray
def test_storage_failures_are_counted_by_reason(exported, s3_env, monkeypatch, authenticating_s3, s3_bucket,
                                                moto_s3_endpoint, tmp_path):
    endpoint, bucket, (key_id, secret) = authenticating_s3
    refused = [
        (key_id, secret, "access_denied"),                                   # AccessDenied: no policy
        ("AKIAUNKNOWNUNKNOWN00", "whatever", "credentials"),                 # InvalidAccessKeyId
        (key_id, "not-the-secret", "credentials"),                           # SignatureDoesNotMatch
    ]
    for user, password, reason in refused:
        with pytest.raises(StorageError) as raised:
            _s3_with(monkeypatch, endpoint, bucket, user, password).put("a/b.mp4", b"x", content_type="video/mp4")
        assert failure_reason(s3client.classify(raised.value.__cause__)) == reason
    exported.wait("ray_svd_storage_errors_total", 1, backend="s3", op="put", reason="access_denied")
    exported.wait("ray_svd_storage_errors_total", 2, backend="s3", op="put", reason="credentials")

    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError):  # no credentials anywhere: presigning fails
        _s3_with(monkeypatch, endpoint, bucket, None, None).presigned_url("a/b.mp4")
    exported.wait("ray_svd_storage_errors_total", 1, backend="s3", op="presign", reason="credentials")

    _, plain_bucket = s3_bucket  # moto without authentication: a missing key is NoSuchKey / a 404
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTSVDSERVE0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    plain = S3Storage(StorageConfig(backend="s3", bucket=plain_bucket, endpoint_url=moto_s3_endpoint))
    assert plain.exists("a/missing.mp4") is False  # a question, not an error: not counted
    with pytest.raises(ObjectNotFound):
        plain.get("a/missing.mp4")
    with pytest.raises(ObjectNotFound):
        plain.size("a/missing.mp4")
    exported.wait("ray_svd_storage_errors_total", 1, backend="s3", op="get", reason="not_found")
    exported.wait("ray_svd_storage_errors_total", 1, backend="s3", op="exists", reason="not_found")

    local = make_storage(StorageConfig(backend="local", local_dir=str(tmp_path / "local")))
    with pytest.raises(ObjectNotFound):
        local.get("a/missing.mp4")
    (tmp_path / "local" / "svd-serve" / "a").mkdir(parents=True)
    (tmp_path / "local" / "svd-serve" / "a" / "file").write_bytes(b"")
    with pytest.raises(StorageError):  # its "folder" is a file
        local.put("a/file/clip.mp4", b"x", content_type="video/mp4")
    exported.wait("ray_svd_storage_errors_total", 1, backend="local", op="get", reason="not_found")
    assert exported.wait("ray_svd_storage_errors_total", backend="local", op="put") == 1
    # make_storage exports each reason at 0 from the start
    exported.wait("ray_svd_storage_errors_total", 0, backend="local", op="presign", reason="credentials")


# -- webhooks -----------------------------------------------------------------------------------


class _Receiver:
    """A webhook receiver on loopback answering the statuses queued in ``answers``."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(receiver.answers.pop(0))
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.ray
def test_webhook_attempts_are_counted_by_outcome(exported):
    receiver = _Receiver()
    sender = WebhookSender(allow=["127.0.0.1"], timeout_s=2.0, initial_backoff_s=0.05, max_backoff_s=0.5,
                           max_elapsed_s=10.0, max_attempts=5)
    receiver.answers = [200, 503, 410]

    async def attempts():
        for number in (1, 1, 1):
            await sender.attempt("vid_1", receiver.url, "secret", "video.completed", "evt_1", b"{}", number=number)
        await sender.attempt("vid_1", "http://169.254.169.254/hook", "secret", "video.completed", "evt_2", b"{}",
                             number=1)

    asyncio.run(attempts())
    receiver.server.shutdown()
    for outcome in ("delivered", "retry", "failed", "blocked"):
        exported.wait("ray_svd_webhook_deliveries_total", 1, outcome=outcome)


# -- jobs, the queue and the tenants (the janitor) -----------------------------------------------


@pytest.mark.ray
def test_jobs_and_the_janitors_gauges(exported, tmp_path):
    tenants_file = tmp_path / "tenants.yaml"
    add_tenant(tenants_file, "heavy", weight=3)
    add_tenant(tenants_file, "light")
    add_tenant(tenants_file, "idle")
    config = AppConfig.model_validate({
        "storage": {"local_dir": str(tmp_path / "out")},
        "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3"), "lease_s": 10},
        "auth": {"tenants_file": str(tenants_file)},
    })
    store = SqliteJobStore(config.job_store.sqlite_path)
    ledger = make_usage_ledger(config.job_store, retention_s=config.job_store.usage_retention_s)
    tenants = TenantRegistry(tenants_file)
    lifecycle = JobLifecycle(config, store=store, ledger=ledger, tenants=tenants)

    def janitor(owner: str) -> Janitor:
        return Janitor(config, store=store, storage=make_storage(config.storage), ledger=ledger,
                       lifecycle=lifecycle, owner=owner)

    def admit(tenant: str, weight: float, **fields) -> Job:
        return store.create(Job(tenant=tenant, model="svd-tiny", policy=AdmissionPolicy(weight=weight), **fields))[0]

    running = [admit("heavy", 3), admit("heavy", 3), admit("light", 1)]
    for job in running:
        store.claim(job.id, owner="runner-x", lease_s=600)
    admit("heavy", 3, created_at=utcnow() - timedelta(seconds=30))  # queued for 30 s
    failed = admit("light", 1)
    store.claim(failed.id, owner="runner-x", lease_s=600)
    store.fail(failed.id, owner="runner-x", error=JobError(code="invalid_image", message="bad"))
    asyncio.run(lifecycle.ended(failed.id))
    asyncio.run(lifecycle.ended(failed.id))  # announced twice (two runners): counted once
    exported.wait("ray_svd_jobs_total", 1, status="failed", tenant="light", model="svd-tiny")
    exported.wait("ray_svd_job_errors_total", 1, code="invalid_image", tenant="light", model="svd-tiny")

    elected, other = janitor("runner-a"), janitor("runner-b")
    asyncio.run(elected.tick())
    asyncio.run(other.tick())
    assert (elected.elected, other.elected) == (True, False)
    exported.wait("ray_svd_jobstore_up", 1, backend="sqlite")
    exported.wait("ray_svd_queue_depth", 1)
    exported.wait("ray_svd_running_jobs", 3)
    assert 29 <= exported.wait("ray_svd_queue_oldest_age_seconds") <= 120
    exported.wait("ray_svd_tenant_queued_jobs", 1, tenant="heavy")
    exported.wait("ray_svd_tenant_running_jobs", 2, tenant="heavy")
    exported.wait("ray_svd_tenant_running_jobs", 1, tenant="light")
    exported.wait("ray_svd_tenant_weight_share", 0.75, tenant="heavy")
    exported.wait("ray_svd_tenant_weight_share", 0.25, tenant="light")
    assert abs(exported.wait("ray_svd_tenant_running_share", tenant="heavy") - 2 / 3) < 1e-6
    exported.wait("ray_svd_tenant_queued_jobs", 0, tenant="idle")  # every registered tenant has series
    exported.wait("ray_svd_tenant_weight_share", 0, tenant="idle")
    exported.wait("ray_svd_jobstore_errors_total", 0, backend="sqlite", op="ping")  # exported before any failure

    elected.clear_gauges()  # as when it stands down: its values go to 0, the new janitor's count
    exported.wait("ray_svd_queue_depth", 0)
    exported.wait("ray_svd_tenant_running_jobs", 0, tenant="heavy")
    store.close()


# -- replicas (a Serve application) ---------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_replica_starts_ready_time_and_stage_replica_counts(exported):
    from ray import serve

    from serve.telemetry import timed_replica

    @serve.deployment(name="Sampler", num_replicas=1, ray_actor_options={"num_cpus": 0})
    @timed_replica
    class SlowStart:
        async def __init__(self) -> None:
            await asyncio.sleep(0.5)

        async def __call__(self) -> str:
            return "ok"

    serve.run(SlowStart.bind(), name="metrics-test", route_prefix=None)
    exported.wait("ray_svd_replica_starts_total", 1, deployment="Sampler")
    assert exported.wait("ray_svd_replica_ready_seconds_count", 1, deployment="Sampler") == 1
    assert exported.value("ray_svd_replica_ready_seconds_sum", deployment="Sampler") >= 0.5
    assert stage_replica_counts() == {"sampling": (1, 1)}
    serve.delete("metrics-test")


# -- the mappings, without Ray ------------------------------------------------------------------------


def test_adapters_are_named_by_their_package():
    from serve.api.compat import files, generations, stability
    from serve.api.compat.fal import rendering

    assert [adapter_api_name(module.render) for module in (files, generations, stability, rendering)] == [
        "files", "generations", "stability", "fal"]
    assert adapter_api_name(lambda rejection: None) == "other"


def test_webhook_outcomes_of_attempts():
    assert metric_outcome("delivered", None) == "delivered"
    assert metric_outcome("retry", "timeout: no response") == "retry"
    assert metric_outcome("exhausted", "ConnectError: refused") == "failed"
    assert metric_outcome("rejected", None) == "failed"  # a 4xx from the receiver
    assert metric_outcome("rejected", "url_not_allowed: 169.254.169.254 is link-local") == "blocked"
