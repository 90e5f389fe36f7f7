"""Serving benchmarks (issue #3), measured side by side in one run on this machine.

1. Serving overhead: end-to-end latency of a job through the HTTP API (submit, poll, download)
   minus the in-process staged pipeline on the same tiny workload and the same torch threads.
2. Bytes moved between stages per job.
3. Throughput of N concurrent jobs: the four-stage deployment versus one deployment holding the
   whole pipeline, on the same CPU budget.

    python benchmarks/bench_serving.py [--jobs 20] [--concurrent 12] [--json out.json]

Prints figures and ratios; record them in docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402

from pipelines.images import load_image  # noqa: E402
from pipelines.loader import ModelSpec, load_pipeline  # noqa: E402
from pipelines.params import GenerationParams  # noqa: E402
from pipelines.sample_image import SAMPLE_IMAGE_PATH  # noqa: E402
from pipelines.staged import StagedPipeline  # noqa: E402
from pipelines.tiny import write_tiny_model  # noqa: E402

WORKLOAD = {"num_frames": 14, "num_inference_steps": 4, "width": 64, "height": 64}


def p50(values):
    return statistics.median(values)


STAGES = ("image_encode", "sampling", "decode", "video_encode")


def in_process_baseline(model_dir: Path, jobs: int) -> tuple[list[float], dict[str, int], dict[str, list[float]]]:
    torch.set_num_threads(1)  # the replicas run one torch thread each (num_cpus <= 1)
    pipe = StagedPipeline(load_pipeline(ModelSpec(source=str(model_dir), dtype="fp32", device="cpu")))
    image = load_image(SAMPLE_IMAGE_PATH)
    pipe(image, GenerationParams(seed=0, **WORKLOAD))  # warm-up
    times, sizes, stage_times = [], {}, {stage: [] for stage in STAGES}
    for i in range(jobs):
        start = time.perf_counter()
        result = pipe(image, GenerationParams(seed=i, **WORKLOAD))
        times.append(time.perf_counter() - start)
        sizes = result.bytes_between_stages
        for stage in STAGES:
            stage_times[stage].append(result.timings[stage])
    return times, sizes, stage_times


def stage_options(cpus: float) -> dict:
    return {"num_replicas": 1, "ray_actor_options": {"num_cpus": cpus}, "torch_threads": 1, "max_ongoing_requests": 16}


def http_overhead(client: httpx.Client, key: str, jobs: int, poll_s: float) -> dict[str, list[float]]:
    """Sequential jobs through the HTTP API; client and server-side latencies and where they go."""
    from datetime import datetime

    data_url = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
    headers = {"Authorization": f"Bearer {key}"}
    out: dict[str, list[float]] = {"client": [], "server": [], "queue_wait": [], "stages": [],
                                   **{stage: [] for stage in STAGES}}
    for i in range(jobs + 1):
        start = time.perf_counter()
        job = client.post("/v1/videos", headers=headers, json={"image_url": data_url, "seed": i, **WORKLOAD}).json()
        while True:
            view = client.get(f"/v1/videos/{job['id']}", headers=headers).json()
            if view["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(poll_s)
        assert view["status"] == "completed", view
        content = client.get(f"/v1/videos/{job['id']}/content", headers=headers)
        assert content.status_code == 200
        elapsed = time.perf_counter() - start
        if i == 0:
            continue  # warm-up
        created, started, finished = (datetime.fromisoformat(view[k]) for k in ("created_at", "started_at",
                                                                                 "finished_at"))
        out["client"].append(elapsed)
        out["server"].append((finished - created).total_seconds())
        out["queue_wait"].append((started - created).total_seconds())
        out["stages"].append(sum(v for k, v in view["timings"].items() if k != "total"))
        for stage in STAGES:
            out[stage].append(view["timings"][stage])
    return out


def throughput_staged(concurrent: int, storage_key: str, store) -> float:
    """N jobs through the four stage deployments, driven the way the runner drives them (claimed job
    records, chained DeploymentResponses) but without the HTTP API and the dispatch loop."""
    from ray import serve

    from serve.context import JobContext
    from serve.jobstore import Job

    encoder, sampler, decoder, video = (serve.get_deployment_handle(n, app_name="svd")
                                        for n in ("ImageEncoder", "Sampler", "Decoder", "VideoEncoder"))
    params = [GenerationParams(seed=i, **WORKLOAD).resolved(14).model_dump(mode="json") for i in range(concurrent)]
    jobs = []
    for p in params:
        job, _ = store.create(Job(tenant="bench", params=p, input_key=storage_key))
        jobs.append(store.claim(job.id, owner="bench", lease_s=3600))
    start = time.perf_counter()
    responses = []
    for job, p in zip(jobs, params):
        ctx = JobContext(job_id=job.id, tenant="bench", owner="bench")
        encoded = encoder.encode.remote(ctx, storage_key, p)
        sampled = sampler.sample.remote(ctx, encoded, p)
        decoded = decoder.decode.remote(ctx, sampled, p)
        responses.append(video.encode.remote(ctx, decoded, p, f"bench/{job.id}/out.mp4"))
    for response in responses:
        response.result(timeout_s=600)
    return time.perf_counter() - start


def throughput_monolithic(model_dir: Path, concurrent: int, replicas: int, cpus: float) -> float:
    from ray import serve

    @serve.deployment(name="Monolithic")
    class Monolithic:
        def __init__(self, source: str) -> None:
            torch.set_num_threads(1)
            self.pipe = StagedPipeline(load_pipeline(ModelSpec(source=source, dtype="fp32", device="cpu")))
            self.image = load_image(SAMPLE_IMAGE_PATH)

        def generate(self, params: dict) -> int:
            return len(self.pipe(self.image, GenerationParams.model_validate(params)).video.data)

    handle = serve.run(
        Monolithic.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus}, max_ongoing_requests=16)
        .bind(str(model_dir)), name="mono", route_prefix="/mono")
    handle.generate.remote(GenerationParams(seed=0, **WORKLOAD).model_dump(mode="json")).result()  # warm-up
    start = time.perf_counter()
    responses = [handle.generate.remote(GenerationParams(seed=i, **WORKLOAD).model_dump(mode="json"))
                 for i in range(concurrent)]
    for response in responses:
        response.result(timeout_s=600)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="sequential jobs for the overhead figure")
    parser.add_argument("--concurrent", type=int, default=12, help="concurrent jobs for the throughput figure")
    parser.add_argument("--poll", type=float, default=0.02, help="client poll interval in seconds (default 0.02)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import AppConfig
    from serve.storage import make_storage
    from serve.tenants import add_tenant

    work = Path(tempfile.mkdtemp(prefix="svd-bench-"))
    model_dir = write_tiny_model(work / "tiny")
    figures: dict = {"workload": WORKLOAD, "cpu_count": os.cpu_count(), "torch": torch.__version__}

    print(f"in-process staged pipeline, {args.jobs} jobs, 1 torch thread ...", flush=True)
    local_times, sizes, local_stages = in_process_baseline(model_dir, args.jobs)
    figures["in_process_p50_s"] = p50(local_times)
    figures["in_process_stage_p50_s"] = {stage: p50(values) for stage, values in local_stages.items()}
    figures["bytes_between_stages"] = sizes

    # Stage CPU shares add up to 2.0: the same budget the monolithic deployment gets below.
    config = AppConfig.model_validate({
        "model": {"source": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "storage": {"local_dir": str(work / "outputs")},
        "job_store": {"sqlite_path": str(work / "jobs.sqlite3")},
        "auth": {"tenants_file": str(work / "tenants.yaml")},
        "stages": {"image_encoder": stage_options(0.25), "sampler": stage_options(1.0),
                   "decoder": stage_options(0.5), "video_encoder": stage_options(0.25),
                   "runner": {"ray_actor_options": {"num_cpus": 0}}, "ingress": {"ray_actor_options": {"num_cpus": 0}}},
        "max_inflight_jobs": 16,
    })
    key = add_tenant(work / "tenants.yaml", "bench", rate_limit_per_minute=None, max_running_jobs=None,
                     max_queued_jobs=None)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="svd", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    while client.get("/readyz").status_code != 200:
        time.sleep(0.5)

    print(f"HTTP job API, {args.jobs} sequential jobs ...", flush=True)
    latencies = http_overhead(client, key, args.jobs, args.poll)
    figures["http_e2e_p50_s"] = p50(latencies["client"])
    figures["server_e2e_p50_s"] = p50(latencies["server"])
    figures["queue_wait_p50_s"] = p50(latencies["queue_wait"])
    figures["stage_time_p50_s"] = p50(latencies["stages"])
    figures["served_stage_p50_s"] = {stage: p50(latencies[stage]) for stage in STAGES}
    figures["overhead_p50_ms"] = (p50(latencies["client"]) - figures["in_process_p50_s"]) * 1000
    figures["server_overhead_p50_ms"] = (p50(latencies["server"]) - figures["in_process_p50_s"]) * 1000

    print(f"throughput, {args.concurrent} concurrent jobs: staged ...", flush=True)
    storage_key = "bench/input/sample.png"
    make_storage(config.storage).put(storage_key, Path(SAMPLE_IMAGE_PATH).read_bytes(), content_type="image/png")
    from serve.jobstore import make_job_store

    store = make_job_store(config.job_store)
    throughput_staged(2, storage_key, store)  # warm-up
    staged_s = throughput_staged(args.concurrent, storage_key, store)
    serve.delete("svd")
    print("... monolithic (2 replicas x 1 CPU, whole pipeline each) ...", flush=True)
    mono_s = throughput_monolithic(model_dir, args.concurrent, replicas=2, cpus=1.0)
    figures["staged_jobs_per_min"] = args.concurrent / staged_s * 60
    figures["monolithic_jobs_per_min"] = args.concurrent / mono_s * 60
    figures["staged_over_monolithic"] = figures["staged_jobs_per_min"] / figures["monolithic_jobs_per_min"]
    serve.shutdown()
    ray.shutdown()

    print()
    print(f"workload: {WORKLOAD}, tiny model, CPU, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"in-process staged pipeline      p50 {figures['in_process_p50_s'] * 1000:8.1f} ms")
    print(f"HTTP job (submit->poll->download) p50 {figures['http_e2e_p50_s'] * 1000:6.1f} ms"
          f"   (server created->finished p50 {figures['server_e2e_p50_s'] * 1000:.1f} ms)")
    print(f"  queue wait p50 {figures['queue_wait_p50_s'] * 1000:.1f} ms, time inside the stages p50 "
          f"{figures['stage_time_p50_s'] * 1000:.1f} ms (client polls every {args.poll * 1000:.0f} ms)")
    for stage in STAGES:
        print(f"  {stage:<13} in process {figures['in_process_stage_p50_s'][stage] * 1000:7.1f} ms   "
              f"in its replica {figures['served_stage_p50_s'][stage] * 1000:7.1f} ms")
    print(f"serving overhead (client)       p50 {figures['overhead_p50_ms']:8.1f} ms   (target <= 50 ms)")
    print(f"serving overhead (server)       p50 {figures['server_overhead_p50_ms']:8.1f} ms")
    for boundary, size in sizes.items():
        print(f"bytes {boundary:<24} {size:>10,d}")
    print(f"throughput staged     {figures['staged_jobs_per_min']:7.1f} jobs/min")
    print(f"throughput monolithic {figures['monolithic_jobs_per_min']:7.1f} jobs/min")
    print(f"staged / monolithic   {figures['staged_over_monolithic']:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
