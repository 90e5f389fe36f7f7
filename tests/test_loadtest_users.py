"""The Locust users and the in-process runner against a stub of the API (no Ray, a few seconds).

The stub implements the job API with jobs that progress by the clock, SSE, cancellation, MP4
content and a tenant that is always answered 429. ``python -m loadtest.run`` runs in a
subprocess (Locust monkey-patches the process with gevent, which must not leak into pytest).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"KA": "alpha", "KB": "beta", "KL": "limited"}
QUEUED_S, RUN_S = 0.2, 0.6


class StubAPI:
    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.lock = threading.Lock()

    def view(self, job: dict) -> dict:
        age = time.time() - job["t"]
        status, stage = "queued", None
        if job["cancel"] is not None and job["cancel"] < job["t"] + QUEUED_S + RUN_S:
            status = "cancelled"
        elif age >= QUEUED_S + RUN_S:
            status = "completed"
        elif age >= QUEUED_S:
            status, stage = "in_progress", "sampling"
        iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat()  # noqa: E731
        done = status in ("completed", "cancelled")
        created, started, ended = job["t"], job["t"] + QUEUED_S, job["t"] + QUEUED_S + RUN_S
        return {"id": job["id"], "object": "video", "status": status, "model": "tiny", "prompt": None,
                "progress": 100 if status == "completed" else 0, "seconds": "2", "size": "64x64",
                "created_at": int(created), "started_at": int(started) if status != "queued" else None,
                "completed_at": int(ended) if status == "completed" else None,
                "finished_at": int(ended) if done else None, "expires_at": None,
                "timestamps": {"created_at": iso(created), "started_at": iso(started) if status != "queued" else None,
                               "finished_at": iso(ended) if done else None, "expires_at": None},
                "params": job["params"],
                "queue_position": 0 if status == "queued" else None,
                "progress_detail": {"stage": stage, "step": 0, "total_steps": 4, "percent": 0.0},
                "timings": {"image_encode": 0.01, "sampling": 0.5, "decode": 0.05, "video_encode": 0.02,
                            "store": 0.001, "total": 0.6} if status == "completed" else {},
                "error": {"code": "cancelled", "message": "cancelled"} if status == "cancelled" else None,
                "output": None}


def make_handler(api: StubAPI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: dict | bytes, headers: dict | None = None, ctype="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _tenant(self) -> str | None:
            return KEYS.get(self.headers.get("Authorization", "").removeprefix("Bearer "))

        def _job(self, job_id: str, tenant: str) -> dict | None:
            job = api.jobs.get(job_id)
            return job if job and job["tenant"] == tenant else None

        def do_POST(self):
            tenant = self._tenant()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if tenant is None:
                return self._send(401, {"error": {"code": "unauthorized", "message": "no"}})
            parts = self.path.strip("/").split("/")
            if self.path == "/v1/videos":
                if tenant == "limited":
                    return self._send(429, {"error": {"code": "rate_limited", "message": "slow down"}},
                                      {"Retry-After": "1"})
                params = json.loads(body)
                assert params["image_url"].startswith("data:image/png;base64,")
                job = {"id": "vid_" + uuid.uuid4().hex[:12], "tenant": tenant, "t": time.time(), "cancel": None,
                       "params": {k: v for k, v in params.items() if k != "image_url"}}
                with api.lock:
                    api.jobs[job["id"]] = job
                return self._send(202, api.view(job))
            if len(parts) == 4 and parts[3] == "cancel":
                job = self._job(parts[2], tenant)
                if job is None:
                    return self._send(404, {"error": {"code": "not_found", "message": "no"}})
                if api.view(job)["status"] == "completed":
                    return self._send(409, {"error": {"code": "already_finished", "message": "done"}})
                job["cancel"] = job["cancel"] or time.time()
                return self._send(200, api.view(job))
            self._send(404, {"error": {"code": "not_found", "message": "no"}})

        def do_GET(self):
            tenant = self._tenant()
            if tenant is None:
                return self._send(401, {"error": {"code": "unauthorized", "message": "no"}})
            path = self.path.split("?")[0]
            parts = path.strip("/").split("/")
            if path == "/v1/videos":
                data = [api.view(j) for j in list(api.jobs.values()) if j["tenant"] == tenant][:20]
                return self._send(200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                        "last_id": data[-1]["id"] if data else None, "has_more": False,
                                        "next_cursor": None})
            job = self._job(parts[2], tenant) if len(parts) >= 3 else None
            if job is None:
                return self._send(404, {"error": {"code": "not_found", "message": "no"}})
            if len(parts) == 3:
                return self._send(200, api.view(job))
            if parts[3] == "content":
                if api.view(job)["status"] != "completed":
                    return self._send(409, {"error": {"code": "not_ready", "message": "no"}})
                return self._send(200, b"\x00\x00\x00\x18ftypisom" + b"\x00" * 2000, ctype="video/mp4")
            if parts[3] == "events":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                last = None
                while True:
                    view = api.view(job)
                    payload = json.dumps(view)
                    if payload != last:
                        event = "status" if last is None or json.loads(last)["status"] != view["status"] else "progress"
                        self.wfile.write(f"event: {event}\ndata: {payload}\n\n".encode())
                        self.wfile.flush()
                        last = payload
                    if view["status"] in ("completed", "cancelled", "failed"):
                        return
                    time.sleep(0.05)
            self._send(404, {"error": {"code": "not_found", "message": "no"}})

    return Handler


@pytest.fixture
def stub_api():
    api = StubAPI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(api))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", api
    server.shutdown()
    server.server_close()


PROFILE = {
    "name": "stub-mix",
    "duration": "6s",
    "drain_timeout": "10s",
    "max_jobs": 24,
    "max_requests": 5000,
    "concurrency": 8,
    "seed": 3,
    "poll_interval": 0.1,
    "clips": [{"num_frames": 4, "num_inference_steps": 2, "width": 64, "height": 64}],
    "tenants": [
        {"name": "alpha", "weight": 2, "arrivals": {"pattern": "constant", "rate": "90/min"},
         "cancel": {"fraction": 0.5, "after": [0, 0.3]}},
        {"name": "beta", "follow": "sse", "arrivals": {"pattern": "burst", "size": 3, "every": "4s", "start": "1s"}},
        {"name": "limited", "arrivals": {"pattern": "constant", "rate": "30/min", "start": "0.5s"}},
    ],
    "poll_storm": {"users": 3, "ramp": "1s", "rate_per_user": 5, "list_fraction": 0.2, "events_fraction": 0.2},
}


def test_users_against_stub_api(stub_api, tmp_path):
    url, api = stub_api
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--target", url, "--profile", str(profile), "--keys",
         "alpha=KA,beta=KB,limited=KL", "--out", str(out), "--no-replicas", "--quiet", "--strict"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - start < 60
    report = json.loads((out / "report.json").read_text())
    jobs = report["jobs"]
    assert jobs["completed"] >= 8
    assert jobs["cancelled"] >= 1
    assert jobs["unfinished"] == 0 and jobs["error"] == 0
    assert jobs["scheduled"] <= PROFILE["max_jobs"]
    assert report["rejections_per_tenant"]["limited"]["429"] >= 2
    assert "alpha" not in report["rejections_per_tenant"]
    assert report["http"]["errors_5xx"] == 0 and report["http"]["connection_errors"] == 0
    endpoints = report["http"]["by_endpoint"]
    assert endpoints["GET /v1/videos/{id}/events"]["200"] >= 3  # beta follows by SSE
    assert "GET /v1/videos/{id} (storm)" in endpoints and "GET /v1/videos" in endpoints
    assert report["downloads"]["ok"] == jobs["completed"] and report["downloads"]["failed"] == 0
    canc = report["cancellations"]
    assert canc["requested"] >= 1 and set(canc["answered"]) <= {"200", "409"}
    tenants = report["latency"]["per_tenant"]
    assert tenants["alpha"]["end_to_end_s"]["n"] >= 1 and tenants["beta"]["end_to_end_s"]["n"] == 6  # bursts at 1 s and 5 s
    # the stub's queue wait is QUEUED_S by construction
    assert report["latency"]["overall"]["queue_wait_s"]["p50"] == pytest.approx(QUEUED_S, abs=0.01)
    assert report["fairness"]["alpha"]["weight"] == 2
    assert report["arrival_lag_s"]["p95"] < 1.0
    for name in ("throughput", "latency", "scaling", "tenants", "stages"):
        assert (out / "charts" / f"{name}.png").stat().st_size > 1000
    assert (out / "report.md").read_text().startswith("# Load test: stub-mix")
    assert len((out / "records.jsonl").read_text().splitlines()) == jobs["scheduled"]
    assert "jobs:" in proc.stdout and "checks:" in proc.stdout
    # every job the run submitted reached a terminal state on the service
    statuses = {api.view(j)["status"] for j in api.jobs.values()}
    assert statuses <= {"completed", "cancelled"}


def test_run_refuses_missing_keys(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loadtest.run", "--target", "http://127.0.0.1:9", "--profile",
                           "multitenant", "--keys", "gold=K"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "silver" in proc.stderr and "bronze" in proc.stderr


def test_distributed_master_and_workers(stub_api, tmp_path):
    """The Locust CLI path used in k8s/loadtest/: a headless master, two workers, one report."""
    url, api = stub_api
    profile = tmp_path / "profile.yaml"
    body = {**PROFILE, "name": "dist", "tenants": PROFILE["tenants"][:2], "max_jobs": 20}
    profile.write_text(yaml.safe_dump(body))
    out = tmp_path / "out"
    env = {**__import__("os").environ, "LOADTEST_PROFILE": str(profile), "LOADTEST_KEYS": "alpha=KA,beta=KB",
           "LOADTEST_OUT": str(out), "LOADTEST_WORKERS": "2"}
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    locust = [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py"]
    master = subprocess.Popen(locust + ["--master", "--headless", "--expect-workers", "2", "--host", url,
                                        "--master-bind-port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = [subprocess.Popen(locust + ["--worker", "--master-port", str(port)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        output, _ = master.communicate(timeout=120)
        for worker in workers:
            worker.wait(timeout=30)
    finally:
        for proc in [master, *workers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    runs = list(out.iterdir())
    assert len(runs) == 1, output
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["meta"]["workers"] == 2
    assert report["jobs"]["scheduled"] == 15  # 9 constant + 2 bursts of 3, split between the workers
    assert report["jobs"]["unfinished"] == 0 and report["jobs"]["completed"] >= 10
    assert report["http"]["errors_5xx"] == 0
    records = [json.loads(line) for line in (runs[0] / "records.jsonl").read_text().splitlines()]
    assert {r["worker"] for r in records} == {0, 1}
    assert (runs[0] / "charts" / "scaling.png").exists() and (runs[0] / "report.md").exists()
