"""The Serve application on a real multi-node local Ray cluster.

One cluster for the whole module (starting Ray dominates the cost): a head node for the
ingress and runner, and three worker nodes standing in for the GPU pools, each offering
logical GPUs and the custom resource that pins its stages. The job store is a real
redis-server, output storage a real S3-compatible server (moto over HTTP), traces go to a real
OTLP/HTTP receiver.
"""

from __future__ import annotations

import base64
import io
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from waiting import free_port, wait_for
from PIL import Image

from fixtures_redis import redis_server  # noqa: F401
from otlp_collector import OTLPCollector

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipelines.params import GenerationParams  # noqa: E402
from pipelines.sample_image import SAMPLE_IMAGE_PATH  # noqa: E402
from pipelines.video import decode_video_frames, probe_video  # noqa: E402
from serve.app import build_app  # noqa: E402
from serve.config import AppConfig  # noqa: E402
from serve.tenants import add_tenant  # noqa: E402

APP = "svd"
TERMINAL = {"completed", "failed", "cancelled"}
SMALL = {"num_frames": 6, "num_inference_steps": 4, "width": 64, "height": 64}
SLOW = {"num_frames": 8, "num_inference_steps": 60, "width": 64, "height": 64}
POOLS = {
    "gpu-large": {"num_cpus": 3, "num_gpus": 2, "resources": {"svd_sampler": 100}},
    "gpu-small": {"num_cpus": 2, "num_gpus": 1, "resources": {"svd_encode_decode": 100}},
    "cpu": {"num_cpus": 1, "num_gpus": 0, "resources": {"svd_video": 100}},
}


def app_config(tmp: Path, model_dir: Path, redis_url: str, s3_endpoint: str, otlp_url: str) -> AppConfig:
    def stage(gpus, resource, **extra):
        return {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": gpus, "resources": {resource: 1}},
                "graceful_shutdown_timeout_s": 20, "health_check_period_s": 2, **extra}

    return AppConfig.model_validate({
        "model": {"source": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "text_to_image_model": None,
        "stages": {
            "image_encoder": stage(0.25, "svd_encode_decode", num_replicas=1, max_ongoing_requests=8),
            "sampler": stage(0.5, "svd_sampler", max_ongoing_requests=1, autoscaling={
                "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                "upscale_delay_s": 0, "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}),
            "decoder": stage(0.25, "svd_encode_decode", num_replicas=1, max_ongoing_requests=8),
            "video_encoder": stage(0, "svd_video", num_replicas=1, max_ongoing_requests=8),
            "runner": {"ray_actor_options": {"num_cpus": 0.1}, "graceful_shutdown_timeout_s": 6},
            "ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        },
        "storage": {"backend": "s3", "bucket": "svd-e2e", "endpoint_url": s3_endpoint, "region": "us-east-1"},
        "job_store": {"backend": "redis", "redis_url": redis_url, "key_prefix": f"e2e{time.time_ns()}",
                      "lease_s": 4, "max_attempts": 3},
        "tracing": {"exporter": "otlp", "otlp_endpoint": otlp_url, "export_interval_s": 0.3},
        "auth": {"tenants_file": str(tmp / "tenants.yaml")},
        "max_inflight_jobs": 8,
        "url_allowlist": ["127.0.0.1"],  # the test's webhook receiver
        "webhooks": {"initial_backoff_s": 0.2, "max_backoff_s": 1, "max_elapsed_s": 30},
    })


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir, redis_server, moto_s3_endpoint):  # noqa: F811
    import boto3

    tmp = tmp_path_factory.mktemp("serve-e2e")
    mp = pytest.MonkeyPatch()
    # Raylets inherit the environment: the S3 credentials reach every replica this way.
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "RAY_SERVE_HTTP_PORT": "0"}.items():
        mp.setenv(name, value)
    boto3.client("s3", endpoint_url=moto_s3_endpoint, region_name="us-east-1").create_bucket(Bucket="svd-e2e")
    collector = OTLPCollector()
    # Limits high enough that only the scheduler shapes these tests (limits have their own tests).
    limits = {"rate_limit_per_minute": 100000, "burst": 10000, "max_running_jobs": 100, "max_queued_jobs": 1000}
    keys = {name: add_tenant(tmp / "tenants.yaml", name, weight=weight, **limits)
            for name, weight in (("alice", 1.0), ("bob", 1.0), ("carol", 2.0), ("dave", 1.0), ("erin", 1.0))}

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = {name: cluster.add_node(**spec) for name, spec in POOLS.items()}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = app_config(tmp, tiny_model_dir, redis_server, moto_s3_endpoint, collector.url)
    serve.run(build_app(config), name=APP, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, "readyz")
    yield {"client": client, "keys": keys, "config": config, "nodes": nodes, "collector": collector,
           "model_dir": tiny_model_dir, "tenants_file": tmp / "tenants.yaml"}
    client.close()
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    collector.close()
    mp.undo()


def auth(deployment, tenant="alice") -> dict:
    return {"Authorization": f"Bearer {deployment['keys'][tenant]}"}


def submit(deployment, tenant="alice", **params) -> dict:
    data_url = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
    response = deployment["client"].post("/v1/videos", headers=auth(deployment, tenant),
                                         json={"image_url": data_url, **SMALL, **params})
    assert response.status_code == 202, response.text
    return response.json()


def job(deployment, job_id, tenant="alice") -> dict:
    response = deployment["client"].get(f"/v1/videos/{job_id}", headers=auth(deployment, tenant))
    assert response.status_code == 200, response.text
    return response.json()


def wait_terminal(deployment, job_id, timeout_s=120, tenant="alice") -> dict:
    return wait_for(lambda: (j := job(deployment, job_id, tenant))["status"] in TERMINAL and j, timeout_s,
                 f"job {job_id} to finish")


def replica_counts() -> dict[str, int]:
    status = serve.status().applications[APP].deployments
    return {name: sum(count for state, count in d.replica_states.items() if str(state).endswith("RUNNING"))
            for name, d in status.items()}


# -- tests ----------------------------------------------------------------------------------------


def test_http_job_end_to_end_matches_in_process_pipeline(deployment):
    from pipelines.images import load_image
    from pipelines.loader import ModelSpec, load_pipeline
    from pipelines.staged import StagedPipeline

    created = submit(deployment, seed=1234, output_fps=10)
    assert created["status"] == "queued" and created["params"]["seed"] == 1234
    done = wait_terminal(deployment, created["id"])
    assert done["status"] == "completed", done
    assert set(done["timings"]) >= {"image_encode", "sampling", "decode", "video_encode", "store"}
    assert done["progress_detail"]["step"] == done["progress_detail"]["total_steps"] == 4 and done["progress"] == 100

    # Stored in S3: the content endpoint redirects to a presigned URL that serves the MP4.
    content = deployment["client"].get(f"/v1/videos/{created['id']}/content", headers=auth(deployment))
    assert content.status_code == 307
    video = httpx.get(content.headers["location"], timeout=30)
    assert video.status_code == 200 and len(video.content) == done["output"]["file_size"]
    info = probe_video(video.content)
    assert (info.frames, info.width, info.height, round(info.fps)) == (6, 64, 64, 10)
    assert info.codec == "h264"
    # The final stage stored the first frame beside the clip: the thumbnail variant, presigned too.
    thumbnail = deployment["client"].get(f"/v1/videos/{created['id']}/content?variant=thumbnail",
                                         headers=auth(deployment))
    assert thumbnail.status_code == 307
    image = httpx.get(thumbnail.headers["location"], timeout=30)
    assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"  # a JPEG
    first = np.asarray(Image.open(io.BytesIO(image.content)).convert("RGB")).astype(np.int16)
    assert first.shape == (64, 64, 3)
    assert np.abs(first - decode_video_frames(video.content)[0].astype(np.int16)).mean() < 8

    # Same seed in process: the clips match up to codec noise (torch thread counts differ between
    # the replica and this process, which can flip a rounded pixel and nudge the encoder), while
    # another seed gives a clearly different clip (about 20 grey levels apart on average).
    pipe = StagedPipeline(load_pipeline(ModelSpec(source=str(deployment["model_dir"]), dtype="fp32", device="cpu")))
    image = load_image(SAMPLE_IMAGE_PATH)
    served = decode_video_frames(video.content).astype(np.int16)
    same_seed = decode_video_frames(pipe(image, GenerationParams(seed=1234, output_fps=10, **SMALL)).video.data)
    other_seed = decode_video_frames(pipe(image, GenerationParams(seed=999, output_fps=10, **SMALL)).video.data)
    assert np.abs(served - same_seed.astype(np.int16)).mean() < 2.0
    assert np.abs(served - other_seed.astype(np.int16)).mean() > 10.0


def test_stage_replicas_hold_their_gpu_share_on_their_node_pool(deployment):
    expected = {"ImageEncoder": ("gpu-small", 0.25), "Sampler": ("gpu-large", 0.5),
                "Decoder": ("gpu-small", 0.25), "VideoEncoder": ("cpu", 0.0)}
    for name, (pool, gpus) in expected.items():
        info = serve.get_deployment_handle(name, app_name=APP).replica_info.remote().result(timeout_s=30)
        assert info["node_id"] == deployment["nodes"][pool].node_id, (name, info)
        assert info["resources"].get("GPU", 0.0) == pytest.approx(gpus), (name, info)
        assert info["torch_threads"] >= 1
        assert info["load_seconds"] > 0  # each load is timed (and exported as a span and a metric)
    loads = [span for span in deployment["collector"].spans if span["name"] == "model_load"]
    assert {span["attributes"].get("svd.stage") for span in loads} >= {"image_encode", "sampling", "decode"}


def test_cancel_queued_and_running_jobs(deployment):
    running = submit(deployment, **SLOW)
    wait_for(lambda: job(deployment, running["id"])["progress_detail"]["stage"] == "sampling", 60, "sampling to start")
    response = deployment["client"].post(f"/v1/videos/{running['id']}/cancel", headers=auth(deployment))
    assert response.status_code == 200
    cancelled = wait_terminal(deployment, running["id"], timeout_s=30)
    assert cancelled["status"] == "cancelled"
    # It stopped within a step or so, well short of the 60 it asked for.
    assert cancelled["progress_detail"]["step"] < 60 and cancelled["error"]["code"] == "cancelled"

    # A job cancelled while queued never starts. Fill the runners first so it stays queued.
    blockers = [submit(deployment, **SLOW) for _ in range(8)]
    queued = submit(deployment, **SMALL)
    assert job(deployment, queued["id"])["status"] == "queued"
    response = deployment["client"].post(f"/v1/videos/{queued['id']}/cancel", headers=auth(deployment))
    assert response.json()["status"] == "cancelled"
    for blocker in blockers:
        deployment["client"].post(f"/v1/videos/{blocker['id']}/cancel", headers=auth(deployment))
    for blocker in blockers:
        assert wait_terminal(deployment, blocker["id"], timeout_s=60)["status"] == "cancelled"
    final = job(deployment, queued["id"])
    assert final["status"] == "cancelled" and final["started_at"] is None and final["timings"] == {}


def test_tenants_cannot_see_each_others_jobs_events_or_files(deployment):
    mine = submit(deployment, tenant="alice")
    wait_terminal(deployment, mine["id"])
    client, bob = deployment["client"], auth(deployment, "bob")
    for method, path in [("GET", ""), ("GET", "/content"), ("GET", "/events"), ("POST", "/cancel"), ("DELETE", "")]:
        response = client.request(method, f"/v1/videos/{mine['id']}{path}", headers=bob)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"error": {"code": "not_found", "message": "video job not found"}}
    assert all(item["id"] != mine["id"] for item in client.get("/v1/videos", headers=bob).json()["data"])
    assert any(item["id"] == mine["id"] for item in client.get("/v1/videos", headers=auth(deployment)).json()["data"])
    assert client.get("/v1/videos", headers={"Authorization": "Bearer nope"}).status_code == 401
    # The owner still has it, and deleting it removes the stored clip.
    assert client.delete(f"/v1/videos/{mine['id']}", headers=auth(deployment)).json() == {
        "id": mine["id"], "object": "video.deleted", "deleted": True}
    assert client.get(f"/v1/videos/{mine['id']}", headers=auth(deployment)).status_code == 404


def test_events_stream_until_the_job_ends(deployment):
    created = submit(deployment)
    events = []
    with deployment["client"].stream("GET", f"/v1/videos/{created['id']}/events", headers=auth(deployment)) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
    assert events[-1] == "status" and "progress" in events


def test_one_trace_per_job_with_a_span_per_stage(deployment):
    created = submit(deployment)
    wait_terminal(deployment, created["id"])
    collector = deployment["collector"]
    names = {"admission", "job", "image_encode", "sampling", "decode", "video_encode", "store"}
    spans = wait_for(lambda: (s := collector.spans_of_job(created["id"])) and names <= {x["name"] for x in s} and s,
                  30, "spans to be exported")
    by_name = {span["name"]: span for span in spans}
    assert len({span["trace_id"] for span in spans}) == 1
    # Admission runs inside the HTTP request's server span (FastAPI's own instrumentation).
    trace_id = spans[0]["trace_id"]
    request_span = next(s for s in collector.spans if s["span_id"] == by_name["admission"]["parent_id"]
                        or s["name"] == "POST /v1/videos" and s["trace_id"] == trace_id)
    assert request_span["trace_id"] == trace_id
    assert by_name["job"]["parent_id"] == by_name["admission"]["span_id"]
    for stage in ("image_encode", "sampling", "decode", "video_encode", "store"):
        assert by_name[stage]["parent_id"] == by_name["job"]["span_id"], stage
    # Another job is another trace.
    other = submit(deployment)
    wait_terminal(deployment, other["id"])
    other_spans = wait_for(lambda: collector.spans_of_job(other["id"]), 30, "spans of the second job")
    assert {s["trace_id"] for s in other_spans} != {trace_id}


def test_burst_scales_the_sampler_alone_and_back_down(deployment):
    assert replica_counts()["Sampler"] == 1
    jobs = [submit(deployment, num_frames=8, num_inference_steps=40, width=64, height=64) for _ in range(8)]
    peak = wait_for(lambda: (c := replica_counts())["Sampler"] >= 2 and c, 90, "the Sampler to scale up")
    assert peak["ImageEncoder"] == peak["Decoder"] == peak["VideoEncoder"] == 1
    for created in jobs:
        assert wait_terminal(deployment, created["id"], timeout_s=180)["status"] == "completed"
    wait_for(lambda: replica_counts()["Sampler"] == 1, 90, "the Sampler to scale back down")
    assert replica_counts()["ImageEncoder"] == 1


def test_killed_sampler_replica_loses_no_job(deployment):
    created = [submit(deployment, **SLOW) for _ in range(2)]
    wait_for(lambda: any(job(deployment, c["id"])["progress_detail"]["stage"] == "sampling" for c in created), 60,
          "sampling")
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Sampler" in a["name"]]
    assert victims
    for actor in victims:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    for item in created:
        final = wait_terminal(deployment, item["id"], timeout_s=180)
        assert final["status"] == "completed", final


def test_restarting_the_application_loses_no_job(deployment):
    created = [submit(deployment, **SLOW) for _ in range(3)]
    wait_for(lambda: any(job(deployment, c["id"])["status"] == "in_progress" for c in created), 60, "a job to start")
    serve.delete(APP)
    serve.run(build_app(deployment["config"]), name=APP, route_prefix="/")
    wait_for(lambda: deployment["client"].get("/readyz").status_code == 200, 120, "readyz after restart")
    for item in created:
        final = wait_terminal(deployment, item["id"], timeout_s=180)
        assert final["status"] == "completed", final


def test_webhook_is_signed_and_usage_adds_up(deployment):
    import hashlib
    import hmac
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serve.tenants import read_tenants

    received, calls = [], {"n": 0}

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls["n"] += 1
            if calls["n"] == 1:  # the first delivery fails: the service must retry
                self.send_response(503)
            else:
                received.append((dict(self.headers), body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        first = submit(deployment, tenant="erin", webhook_url=url)
        second = submit(deployment, tenant="erin", num_frames=4)
        for created in (first, second):
            assert wait_terminal(deployment, created["id"], tenant="erin")["status"] == "completed"
        headers, body = wait_for(lambda: received and received[0], 30, "the webhook")
    finally:
        server.shutdown()
    secret = read_tenants(deployment["tenants_file"])["erin"].webhook_secret
    timestamp = headers["Webhook-Timestamp"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers["Webhook-Signature"] == f"v1={expected}"
    event = json.loads(body)
    assert event["type"] == "video.completed" and event["data"]["id"] == first["id"]
    deliveries = wait_for(lambda: len((j := job(deployment, first["id"], "erin"))["webhook"]["deliveries"]) >= 2 and j,
                       30, "delivery attempts on the job")["webhook"]["deliveries"]
    assert [d.get("status_code") for d in deliveries[:2]] == [503, 204]

    usage = deployment["client"].get("/v1/usage", headers=auth(deployment, "erin")).json()
    assert usage["jobs"]["completed"] == 2 and usage["jobs"]["charged"] == 2
    # 6 frames + 4 frames at the default 7 fps.
    assert usage["video_seconds"] == pytest.approx(6 / 7 + 4 / 7)
    views = [job(deployment, c["id"], "erin") for c in (first, second)]
    sampler_gpu = sum(v["timings"]["sampling"] for v in views) * 0.5  # the Sampler holds half a GPU
    assert usage["gpu_seconds"]["by_stage"]["sampling"] == pytest.approx(sampler_gpu, rel=1e-6)
    other = deployment["client"].get("/v1/usage", headers=auth(deployment, "bob")).json()
    assert other["tenant"] == "bob" and other["video_seconds"] != usage["video_seconds"]


# -- fair sharing (issue #4): one Sampler replica, three jobs in flight --------------------------------


@pytest.fixture(scope="module")
def fair_deployment(deployment):
    config = deployment["config"]
    stages = config.stages.model_copy(update={"sampler": config.stages.sampler.model_copy(
        update={"autoscaling": None, "num_replicas": 1})})
    fair = config.model_copy(update={"stages": stages, "max_inflight_jobs": 3})
    serve.run(build_app(fair), name=APP, route_prefix="/")
    wait_for(lambda: deployment["client"].get("/readyz").status_code == 200, 120, "readyz after redeploy")
    return deployment


def finished_order(deployment, jobs: dict[str, str]) -> list[str]:
    """Tenants of finished jobs, in the order they completed."""
    views = [job(deployment, job_id, tenant) for job_id, tenant in jobs.items()]
    done = sorted((v for v in views if v["status"] == "completed"),
                  key=lambda v: datetime.fromisoformat(v["timestamps"]["finished_at"].replace("Z", "+00:00")))
    return [jobs[v["id"]] for v in done]


def cancel_all(deployment, jobs: dict[str, str]) -> None:
    for job_id, tenant in jobs.items():
        deployment["client"].post(f"/v1/videos/{job_id}/cancel", headers=auth(deployment, tenant))
    for job_id, tenant in jobs.items():
        wait_terminal(deployment, job_id, timeout_s=120, tenant=tenant)


def test_a_flood_does_not_starve_a_small_tenant(fair_deployment):
    d = fair_deployment
    jobs: dict[str, str] = {}
    try:
        jobs.update({submit(d, tenant="alice")["id"]: "alice" for _ in range(30)})
        bobs = {submit(d, tenant="bob")["id"]: "bob" for _ in range(3)}
        jobs.update(bobs)
        for job_id in bobs:
            assert wait_terminal(d, job_id, timeout_s=180, tenant="bob")["status"] == "completed"
        order = finished_order(d, jobs)
        last_bob = max(i for i, tenant in enumerate(order) if tenant == "bob")
        assert order[:last_bob].count("alice") < 10, order
    finally:
        cancel_all(d, jobs)


def test_weights_split_completed_work_under_saturation(fair_deployment):
    d = fair_deployment
    jobs: dict[str, str] = {}
    try:
        for _ in range(15):
            for tenant in ("carol", "dave"):
                jobs[submit(d, tenant=tenant)["id"]] = tenant
        order = wait_for(lambda: (o := finished_order(d, jobs)) and len(o) >= 15 and o, 240, "15 completed jobs")[:15]
        ratio = order.count("carol") / max(1, order.count("dave"))
        assert 1.6 <= ratio <= 2.4, order
    finally:
        cancel_all(d, jobs)


#: A long clip of two segments (1.5 s x fps 7 / 5 new frames a pass = 2.1 -> 2), 100 steps each.
SEGMENTED = {"num_frames": 6, "num_inference_steps": 100, "width": 64, "height": 64, "duration_s": 1.5,
             "output_fps": 8}


def _in_second_segment(deployment, job_id) -> bool:
    detail = job(deployment, job_id)["progress_detail"]
    return detail["stage"] == "sampling" and detail["step"] > SEGMENTED["num_inference_steps"]


def test_cancel_during_the_second_segment_stops_within_a_step(deployment):
    created = submit(deployment, **SEGMENTED)
    assert created["progress_detail"]["segments"] == 2
    wait_for(lambda: _in_second_segment(deployment, created["id"]), 90, "segment 2 to start sampling")
    response = deployment["client"].post(f"/v1/videos/{created['id']}/cancel", headers=auth(deployment))
    assert response.status_code == 200
    cancelled = wait_terminal(deployment, created["id"], timeout_s=30)
    assert cancelled["status"] == "cancelled", cancelled
    detail = cancelled["progress_detail"]
    # Inside segment 2 (steps 101-200 of 200), and well short of its end.
    assert SEGMENTED["num_inference_steps"] < detail["step"] < 2 * SEGMENTED["num_inference_steps"]
    assert detail["segments_done"] == 1 and "video_encode" not in cancelled["timings"]


def test_killed_sampler_during_the_second_segment_resumes_from_it(deployment):
    from serve.jobstore import make_job_store

    store = make_job_store(deployment["config"].job_store)
    created = submit(deployment, seed=77, **SEGMENTED)
    wait_for(lambda: _in_second_segment(deployment, created["id"]), 90, "segment 2 to start sampling")
    first_segment = store.get(created["id"], tenant=None).segments
    assert [s.index for s in first_segment] == [0]
    for actor in [a for a in ray.util.list_named_actors(all_namespaces=True) if "Sampler" in a["name"]]:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    steps_after_kill = []

    def ended() -> bool:
        current = job(deployment, created["id"])
        if current["progress_detail"]["stage"] == "sampling":
            steps_after_kill.append(current["progress_detail"]["step"])
        return current["status"] in TERMINAL

    wait_for(ended, 180, "the job to end after the kill", interval=0.05)
    final = job(deployment, created["id"])
    assert final["status"] == "completed", final
    record = store.get(created["id"], tenant=None)
    # It ran twice, and the second run started at segment 2: segment 1's record (its timings
    # included) is the one written before the kill, and sampling never went back to segment 1.
    assert record.attempts == 2 and record.segments[0] == first_segment[0] and len(record.segments) == 2
    assert min(steps_after_kill) >= SEGMENTED["num_inference_steps"], steps_after_kill
    # The same clip an uninterrupted run makes (segment k draws from seed + k, so a resume is exact
    # up to codec noise).
    again = wait_terminal(deployment, submit(deployment, seed=77, **SEGMENTED)["id"], timeout_s=180)
    clips = []
    for item in (final, again):
        response = deployment["client"].get(f"/v1/videos/{item['id']}/content", headers=auth(deployment))
        clips.append(decode_video_frames(httpx.get(response.headers["location"], timeout=30).content).astype(np.int16))
    assert clips[0].shape == clips[1].shape == (13, 64, 64, 3)  # 1.5 s x 8 fps + 1
    assert np.abs(clips[0] - clips[1]).mean() < 2.0
    store.close()
