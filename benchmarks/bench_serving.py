"""Serving benchmarks, measured side by side in one run on this machine.

1. Serving latency through the HTTP API, for this tree and (``--baseline REF``) for an earlier
   commit checked out into a temporary git worktree, each served in turn by the same harness on
   the same tiny workload:
   * plumbing: server created->finished minus the time inside the stages (the stages' own timings);
   * queue wait: created->started;
   * first progress event: the first SSE event showing a finished sampling step, minus the moment
     that step ended. The moment comes from the job's ``progress.updated_at`` where the API has
     it (the Sampler reports it), else from a watcher that reads the job's SQLite row every 2 ms
     (the baseline's Sampler writes that row as the step ends).
2. The in-process staged pipeline on the same workload, and the bytes between stages.
3. Throughput of N concurrent jobs: the staged application through its HTTP API versus one
   deployment holding the whole pipeline called directly, on the same CPU budget.
4. The floor under the plumbing: one no-op Serve call, and four chained, on this machine.

    python benchmarks/bench_serving.py [--jobs 20] [--concurrent 12] [--baseline 5210605] [--json out.json]

Prints figures and ratios; record them in docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = {"num_frames": 14, "num_inference_steps": 4, "width": 64, "height": 64}
TERMINAL = ("completed", "failed", "cancelled")
#: The landed tree before the stage registry and the runner split.
DEFAULT_BASELINE = "5210605"


def p50(values):
    return statistics.median(values) if values else float("nan")


def stage_options(cpus: float) -> dict:
    return {"num_replicas": 1, "ray_actor_options": {"num_cpus": cpus}, "torch_threads": 1, "max_ongoing_requests": 16}


def app_config(work: Path, model_dir: Path) -> dict:
    """Stage CPU shares add up to 2.0, the same budget the monolithic deployment gets: one CPU for
    the stage that steps (the sampler), the other one split between the rest."""
    from pipelines.params import GenerationParams
    from pipelines.registry import STAGES

    route = STAGES.route(GenerationParams())  # image-to-video: the benchmark's route
    stepping = STAGES.model_stage()
    others = [spec for spec in route if spec is not stepping]
    stages = {spec.config_key: stage_options(1.0 if spec is stepping else round(1.0 / len(others), 3))
              for spec in route}
    return {
        "model": {"source": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "text_to_image_model": None,
        "storage": {"local_dir": str(work / "outputs")},
        "job_store": {"sqlite_path": str(work / "jobs.sqlite3")},
        "auth": {"tenants_file": str(work / "tenants.yaml")},
        "stages": {**stages, "runner": {"ray_actor_options": {"num_cpus": 0}},
                   "ingress": {"ray_actor_options": {"num_cpus": 0}}},
        "max_inflight_jobs": 16,
    }


def step_stage() -> str:
    """The stage whose steps progress events count (the sampler)."""
    from pipelines.registry import STAGES

    return STAGES.model_stage().name


def view_progress(view: dict) -> dict:
    """The stage/step progress of a job view: ``progress_detail`` in this tree (``progress`` is
    OpenAI's whole percent there), the ``progress`` object in a baseline tree."""
    detail = view.get("progress_detail")
    return detail if isinstance(detail, dict) else view["progress"]


def view_instants(view: dict) -> tuple[datetime, datetime, datetime]:
    """(created, started, finished) to the microsecond: from ``timestamps`` in this tree (the
    top-level instants are whole Unix seconds there), from the ISO top level in a baseline tree."""
    precise = view.get("timestamps")
    source = precise if isinstance(precise, dict) else view
    return tuple(datetime.fromisoformat(source[k].replace("Z", "+00:00"))
                 for k in ("created_at", "started_at", "finished_at"))


def past_first_step(progress: dict, step_stage: str, before: tuple[str, ...]) -> bool:
    """Whether a job's progress shows a finished step of the stepping stage, or anything after it."""
    if progress.get("stage") == step_stage:
        return progress.get("step", 0) >= 1
    return progress.get("stage") not in (None, *before)


# -- the server: one tree's application in a child process ------------------------------------------


def serve_tree(tree: Path, config_path: Path, port: int) -> int:
    """Child process: serve ``tree``'s application until SIGTERM."""
    sys.path.insert(0, str(tree))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    import ray
    from ray import serve

    from serve.app import build_app

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(json.loads(config_path.read_text())), name="svd", route_prefix="/")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


class Server:
    def __init__(self, tree: Path, work: Path, config: dict, port: int) -> None:
        self.tree, self.port = tree, port
        work.mkdir(parents=True, exist_ok=True)
        config_path = work / "config.json"
        config_path.write_text(json.dumps(config))
        env = {**os.environ, "RAY_DEDUP_LOGS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-tree", str(tree), "--serve-config",
                                      str(config_path), "--serve-port", str(port)],
                                     stdout=subprocess.PIPE, stderr=open(work / "server.log", "w"), text=True,
                                     env=env, cwd=tree)

    def __enter__(self) -> "Server":
        import httpx

        line = self.proc.stdout.readline()
        if "READY" not in line:
            raise RuntimeError(f"the server for {self.tree} did not start (see its server.log)")
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}") as client:
            while client.get("/readyz").status_code != 200:
                time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the client side ---------------------------------------------------------------------------------


class RowWatcher(threading.Thread):
    """Reads one job's SQLite row every 2 ms; remembers when it first shows a finished sampling step."""

    def __init__(self, db_path: Path, job_id: str) -> None:
        super().__init__(daemon=True)
        self.db_path, self.job_id = db_path, job_id
        self.step_stage = step_stage()
        self.first_step_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.db_path, timeout=5)
        try:
            while not self.stop.is_set():
                row = conn.execute("SELECT data FROM jobs WHERE id = ?", (self.job_id,)).fetchone()
                if row is not None:
                    job = json.loads(row[0])
                    if job["progress"].get("stage") == self.step_stage and job["progress"].get("step", 0) >= 1:
                        self.first_step_at = time.time()
                        return
                    if job["status"] in TERMINAL:
                        return
                time.sleep(0.002)
        finally:
            conn.close()


def follow_events(base_url: str, headers: dict, job_id: str) -> dict:
    """The job's SSE stream to its end: the final view, and the arrival of the first step event."""
    import httpx

    from pipelines.params import GenerationParams
    from pipelines.registry import STAGES

    stepping = step_stage()
    route = [spec.name for spec in STAGES.route(GenerationParams())]
    before = route[:route.index(stepping)]
    out: dict = {}
    with httpx.stream("GET", f"{base_url}/v1/videos/{job_id}/events", headers=headers, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            view, arrived = json.loads(line[6:]), time.time()
            progress = view_progress(view)
            if "first_step" not in out and past_first_step(progress, stepping, before):
                out["first_step"] = (arrived, progress)
            if view["status"] in TERMINAL:
                out["final"] = view
                return out
    return out


def http_latencies(base_url: str, key: str, jobs: int, db_path: Path) -> dict[str, list[float]]:
    """Sequential jobs through the HTTP API, followed by SSE; server-side latencies and where they go."""
    import httpx

    from pipelines.sample_image import SAMPLE_IMAGE_PATH

    data_url = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
    headers = {"Authorization": f"Bearer {key}"}
    out: dict[str, list[float]] = {"client": [], "server": [], "queue_wait": [], "plumbing": [],
                                   "first_progress": [], "first_progress_row": []}
    with httpx.Client(base_url=base_url, timeout=60, headers=headers) as client:
        for i in range(jobs + 1):
            start = time.perf_counter()
            job = client.post("/v1/videos", json={"image_url": data_url, "seed": i, **WORKLOAD}).json()
            watcher = RowWatcher(db_path, job["id"])
            watcher.start()
            events = follow_events(base_url, headers, job["id"])
            watcher.stop.set()
            watcher.join()
            view = events["final"]
            assert view["status"] == "completed", view
            assert client.get(f"/v1/videos/{job['id']}/content").status_code == 200
            elapsed = time.perf_counter() - start
            if i == 0:
                continue  # warm-up
            created, started, finished = view_instants(view)
            server = (finished - created).total_seconds()
            inside = sum(v for k, v in view["timings"].items() if k != "total")
            out["client"].append(elapsed)
            out["server"].append(server)
            out["queue_wait"].append((started - created).total_seconds())
            out["plumbing"].append(server - inside)
            if "first_step" in events:
                arrived, progress = events["first_step"]
                if watcher.first_step_at is not None:
                    out["first_progress_row"].append(arrived - watcher.first_step_at)
                reported = progress.get("updated_at")
                if reported and progress["stage"] == step_stage() and progress["step"] == 1:
                    out["first_progress"].append(arrived - datetime.fromisoformat(reported).timestamp())
                elif watcher.first_step_at is not None:
                    out["first_progress"].append(arrived - watcher.first_step_at)
    return out


def serving_figures(tree: Path, work: Path, model_dir: Path, jobs: int, port: int) -> dict:
    from serve.tenants import add_tenant

    config = app_config(work, model_dir)
    work.mkdir(parents=True, exist_ok=True)
    key = add_tenant(work / "tenants.yaml", "bench", rate_limit_per_minute=None, max_running_jobs=None,
                     max_queued_jobs=None)
    with Server(tree, work, config, port):
        lat = http_latencies(f"http://127.0.0.1:{port}", key, jobs, work / "jobs.sqlite3")
    ms = {name: round(p50(values) * 1000, 1) for name, values in lat.items()}
    return {"tree": str(tree), "p50_ms": ms, "n": {name: len(values) for name, values in lat.items()}}


# -- throughput ------------------------------------------------------------------------------------------


def throughput_staged(base_url: str, key: str, concurrent: int) -> float:
    import httpx

    from pipelines.sample_image import SAMPLE_IMAGE_PATH

    data_url = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
    with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        start = time.perf_counter()
        ids = [client.post("/v1/videos", json={"image_url": data_url, "seed": i, **WORKLOAD}).json()["id"]
               for i in range(concurrent)]
        for job_id in ids:
            while client.get(f"/v1/videos/{job_id}").json()["status"] not in TERMINAL:
                time.sleep(0.05)
        return time.perf_counter() - start


def throughput_monolithic(model_dir: Path, concurrent: int, replicas: int, cpus: float) -> float:
    import ray
    from ray import serve

    from pipelines.images import load_image
    from pipelines.loader import ModelSpec, load_pipeline
    from pipelines.params import GenerationParams
    from pipelines.sample_image import SAMPLE_IMAGE_PATH
    from pipelines.staged import StagedPipeline

    @serve.deployment(name="Monolithic")
    class Monolithic:
        def __init__(self, source: str) -> None:
            import torch

            torch.set_num_threads(1)
            self.pipe = StagedPipeline(load_pipeline(ModelSpec(source=source, dtype="fp32", device="cpu")))
            self.image = load_image(SAMPLE_IMAGE_PATH)

        def generate(self, params: dict) -> int:
            return len(self.pipe(self.image, GenerationParams.model_validate(params)).video.data)

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        handle = serve.run(Monolithic.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus},
                                              max_ongoing_requests=16).bind(str(model_dir)), name="mono",
                           route_prefix="/mono")
        handle.generate.remote(GenerationParams(seed=0, **WORKLOAD).model_dump(mode="json")).result()  # warm-up
        start = time.perf_counter()
        responses = [handle.generate.remote(GenerationParams(seed=i, **WORKLOAD).model_dump(mode="json"))
                     for i in range(concurrent)]
        for response in responses:
            response.result(timeout_s=600)
        return time.perf_counter() - start
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_call_floor(rounds: int = 40) -> dict[str, float]:
    """p50 ms of one no-op Serve call, and of four chained ones, each with a worker-thread hop like
    a stage: the floor under the plumbing on this machine."""
    import asyncio

    import ray
    from ray import serve

    @serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
    class Noop:
        async def run(self, value=None):
            await asyncio.to_thread(lambda: None)
            return value

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Chain:
        def __init__(self, *hops) -> None:
            self.hops = hops

        async def once(self) -> tuple[float, float]:
            start = time.perf_counter()
            await self.hops[0].run.remote(1)
            one = time.perf_counter() - start
            start = time.perf_counter()
            response = None
            for hop in self.hops:
                response = hop.run.remote(response)
            await response
            return one, time.perf_counter() - start

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        handle = serve.run(Chain.bind(*(Noop.options(name=f"Noop{i}").bind() for i in range(4))), name="floor",
                           route_prefix=None)
        for _ in range(5):
            handle.once.remote().result()
        samples = [handle.once.remote().result() for _ in range(rounds)]
        return {"one_call_p50_ms": round(p50([a for a, _ in samples]) * 1000, 1),
                "four_chained_p50_ms": round(p50([b for _, b in samples]) * 1000, 1)}
    finally:
        serve.shutdown()
        ray.shutdown()


def in_process_baseline(model_dir: Path, jobs: int) -> tuple[list[float], dict[str, int], dict[str, list[float]]]:
    import torch

    from pipelines.images import load_image
    from pipelines.loader import ModelSpec, load_pipeline
    from pipelines.params import GenerationParams
    from pipelines.sample_image import SAMPLE_IMAGE_PATH
    from pipelines.staged import StagedPipeline

    torch.set_num_threads(1)  # the replicas run one torch thread each (num_cpus <= 1)
    pipe = StagedPipeline(load_pipeline(ModelSpec(source=str(model_dir), dtype="fp32", device="cpu")))
    image = load_image(SAMPLE_IMAGE_PATH)
    pipe(image, GenerationParams(seed=0, **WORKLOAD))  # warm-up
    times, sizes, stage_times = [], {}, {}
    for i in range(jobs):
        start = time.perf_counter()
        result = pipe(image, GenerationParams(seed=i, **WORKLOAD))
        times.append(time.perf_counter() - start)
        sizes = result.bytes_between_stages
        for stage, seconds in result.timings.items():
            stage_times.setdefault(stage, []).append(seconds)
    return times, sizes, stage_times


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), ref], check=True,
                   capture_output=True)
    return where


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="sequential jobs per tree for the latency figures")
    parser.add_argument("--concurrent", type=int, default=12, help="concurrent jobs for the throughput figure")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help=f"git ref served side by side for comparison (default {DEFAULT_BASELINE}); 'none' to skip")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--serve-tree", help=argparse.SUPPRESS)
    parser.add_argument("--serve-config", help=argparse.SUPPRESS)
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_tree:
        return serve_tree(Path(args.serve_tree), Path(args.serve_config), args.serve_port)

    sys.path.insert(0, str(ROOT))
    import torch

    from pipelines.tiny import write_tiny_model
    from serve.tenants import add_tenant

    work = Path(tempfile.mkdtemp(prefix="svd-bench-"))
    model_dir = write_tiny_model(work / "tiny")
    figures: dict = {"workload": WORKLOAD, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                     "date": datetime.now().astimezone().isoformat(timespec="seconds")}

    print(f"in-process staged pipeline, {args.jobs} jobs, 1 torch thread ...", flush=True)
    local_times, sizes, local_stages = in_process_baseline(model_dir, args.jobs)
    figures["in_process_p50_ms"] = round(p50(local_times) * 1000, 1)
    figures["in_process_stage_p50_ms"] = {stage: round(p50(v) * 1000, 1) for stage, v in local_stages.items()}
    figures["bytes_between_stages"] = sizes

    trees = {"this tree": ROOT}
    if args.baseline != "none":
        trees = {f"baseline {args.baseline}": worktree(args.baseline, work / "baseline"), **trees}
    figures["serving"] = {}
    try:
        for label, tree in trees.items():
            print(f"HTTP job API, {args.jobs} sequential jobs, {label} ...", flush=True)
            figures["serving"][label] = serving_figures(tree, work / label.replace(" ", "-"), model_dir, args.jobs,
                                                        port=8765)
    finally:
        if args.baseline != "none":
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline")],
                           capture_output=True)

    print(f"throughput, {args.concurrent} concurrent jobs: staged (HTTP API) ...", flush=True)
    through = work / "throughput"
    through.mkdir()
    key = add_tenant(through / "tenants.yaml", "bench", rate_limit_per_minute=None, max_running_jobs=None,
                     max_queued_jobs=None)
    with Server(ROOT, through, app_config(through, model_dir), 8766):
        throughput_staged("http://127.0.0.1:8766", key, 2)  # warm-up
        staged_s = throughput_staged("http://127.0.0.1:8766", key, args.concurrent)
    print("... monolithic (2 replicas x 1 CPU, whole pipeline each, called directly) ...", flush=True)
    mono_s = throughput_monolithic(model_dir, args.concurrent, replicas=2, cpus=1.0)
    figures["staged_jobs_per_min"] = round(args.concurrent / staged_s * 60, 1)
    figures["monolithic_jobs_per_min"] = round(args.concurrent / mono_s * 60, 1)
    figures["staged_over_monolithic"] = round(figures["staged_jobs_per_min"] / figures["monolithic_jobs_per_min"], 2)
    print("... the floor: no-op Serve calls ...", flush=True)
    figures["serve_call_floor"] = serve_call_floor()

    print()
    print(f"workload: {WORKLOAD}, tiny model, CPU, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"in-process staged pipeline p50 {figures['in_process_p50_ms']:.1f} ms")
    rows = [("client submit->SSE end->download", "client"), ("server created->finished", "server"),
            ("queue wait (created->started)", "queue_wait"), ("plumbing (server minus stages)", "plumbing"),
            ("first SSE progress after step 1 ends", "first_progress"),
            ("  same, from the row watcher", "first_progress_row")]
    labels = list(figures["serving"])
    print(f"{'p50 ms':<40}" + "".join(f"{label:>22}" for label in labels))
    for title, name in rows:
        print(f"{title:<40}" + "".join(f"{figures['serving'][label]['p50_ms'][name]:>22.1f}" for label in labels))
    for boundary, size in sizes.items():
        print(f"bytes {boundary:<28} {size:>10,d}")
    print(f"throughput staged (HTTP)   {figures['staged_jobs_per_min']:7.1f} jobs/min")
    print(f"throughput monolithic      {figures['monolithic_jobs_per_min']:7.1f} jobs/min")
    print(f"staged / monolithic        {figures['staged_over_monolithic']:7.2f}x")
    floor = figures["serve_call_floor"]
    print(f"floor: one no-op Serve call {floor['one_call_p50_ms']:.1f} ms, four chained {floor['four_chained_p50_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
