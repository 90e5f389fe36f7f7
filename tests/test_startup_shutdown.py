"""Start-up and shutdown of ``svd-serve up`` (issue #13, item 5).

* Until the application is ready, ``/v1`` answers 503 ``not_ready`` with ``Retry-After``: never the
  404 of Serve's proxy before the route exists, never a request held while the ingress starts
  (:mod:`serve.api.startup`; the gates are tested here without Ray too).
* Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and SIGTERM stop it cleanly
  within the graceful period, a running job drains or goes back to the queue, and no process of
  its Ray cluster is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI
from starlette.testclient import TestClient

from serve.api.startup import ProxyStartupGate, ReadinessGate, StartupReadiness

ROOT = Path(__file__).resolve().parent.parent
#: Every deployment's graceful period in the test config: a stop waits at most this for a running job.
GRACE_S = 10.0
#: The graceful period, plus Serve's and Ray's own stop (serve.up: SERVE_STOP_MARGIN_S, RAY_STOP_TIMEOUT_S).
STOP_TIMEOUT_S = GRACE_S + 40.0


# -- the gates, without Ray ----------------------------------------------------------------------


def fake_proxy(status: int, body: bytes, content_type: bytes):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})
    return app


def assert_not_ready(response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["code"] == "not_ready"
    assert response.json()["error"]["message"]


def test_proxy_gate_answers_503_for_the_proxys_route_not_found():
    proxy = fake_proxy(404, b"Path '/v1/videos' not found. Ping http://.../-/routes for available routes.",
                       b"text/plain; charset=utf-8")
    client = TestClient(ProxyStartupGate(proxy))  # no lifespan: a bare ASGI app
    assert_not_ready(client.post("/v1/videos"))
    assert_not_ready(client.get("/docs"))
    assert client.get("/-/routes").status_code == 404  # Serve's own endpoints are left alone


def test_proxy_gate_keeps_the_applications_own_404():
    app_404 = fake_proxy(404, b'{"error":{"code":"not_found","message":"video job not found"}}', b"application/json")
    response = TestClient(ProxyStartupGate(app_404)).get("/v1/videos/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    text_404 = fake_proxy(404, b"no such thing", b"text/plain")
    assert TestClient(ProxyStartupGate(text_404)).get("/v1/x").text == "no such thing"


class FakeHandle:
    def __init__(self) -> None:
        self.populated = False

    def running_replicas_populated(self) -> bool:
        return self.populated


class FakeRouter:
    def __init__(self, handle: FakeHandle) -> None:
        self.handle = handle

    def match_route(self, path: str):
        return ("/", self.handle, False)


class FakeHTTPProxy:
    """Serve's ``HTTPProxy``: its route table and an ASGI call that reaches the application."""

    def __init__(self, router: FakeRouter) -> None:
        self.proxy_router = router

    async def __call__(self, scope, receive, send):
        await fake_proxy(202, b"{}", b"application/json")(scope, receive, send)


class FakeRequestIdMiddleware:
    def __init__(self, app) -> None:
        self._app = app

    async def __call__(self, scope, receive, send):
        await self._app(scope, receive, send)


def test_proxy_gate_answers_503_until_the_ingress_has_a_replica():
    """The route exists but no ingress replica runs yet: 503 at once instead of a held request."""
    handle = FakeHandle()
    client = TestClient(ProxyStartupGate(FakeRequestIdMiddleware(FakeHTTPProxy(FakeRouter(handle)))))
    assert_not_ready(client.post("/v1/videos"))
    handle.populated = True
    assert client.post("/v1/videos").status_code == 202


def test_readiness_gate_gates_v1_until_first_ready_then_latches():
    calls = {"n": 0, "ok": False}

    async def check():
        calls["n"] += 1
        if not calls["ok"]:
            raise TimeoutError("the model stage did not answer")

    readiness = StartupReadiness(check, wait_s=0.5)
    app = FastAPI()

    @app.get("/v1/videos")
    async def videos():
        return {"data": []}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        try:
            await readiness.check()
        except Exception:  # noqa: BLE001
            return {"status": "not ready"}
        return {"status": "ready"}

    app.add_middleware(ReadinessGate, readiness=readiness)
    with TestClient(app) as client:
        assert_not_ready(client.get("/v1/videos"))
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1").status_code == 503 and client.get("/v1x").status_code == 404
        calls["ok"] = True
        assert client.get("/readyz").json() == {"status": "ready"}  # readiness latches here too
        n = calls["n"]
        assert client.get("/v1/videos").json() == {"data": []}
        calls["ok"] = False  # a later outage is not start-up: no more checks from the gate
        assert client.get("/v1/videos").status_code == 200 and calls["n"] == n


def test_readiness_poll_shares_one_slow_check():
    started = []

    async def slow_check():
        started.append(time.monotonic())
        await asyncio.sleep(0.3)

    async def main():
        readiness = StartupReadiness(slow_check, wait_s=0.05)
        first = await asyncio.gather(*(readiness.poll() for _ in range(5)))
        await asyncio.sleep(0.4)
        return first, await readiness.poll()

    first, later = asyncio.run(main())
    assert first == [False] * 5 and later is True and len(started) == 1


# -- svd-serve up, for real ----------------------------------------------------------------------


@pytest.fixture
def up_setup(tmp_path, tiny_model_dir):
    from loadtest.local import free_port
    from pipelines.registry import STAGES
    from serve.tenants import add_tenant

    key = add_tenant(tmp_path / "tenants.yaml", "alice")
    short = {"graceful_shutdown_timeout_s": GRACE_S, "graceful_shutdown_wait_loop_s": 0.5}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"},
        "text_to_image_model": None,
        "storage": {"local_dir": str(tmp_path / "outputs")},
        "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")},
        "auth": {"tenants_file": str(tmp_path / "tenants.yaml")},
        "stages": {"ingress": short, "runner": short, **{spec.config_key: short for spec in STAGES.stages()}},
    }))
    return {"dir": tmp_path, "config": config, "key": key, "port": free_port()}


class Up:
    """``svd-serve up`` in its own process group (as a shell runs a foreground job)."""

    def __init__(self, setup: dict) -> None:
        self.url = f"http://127.0.0.1:{setup['port']}"
        self.log_path = setup["dir"] / "up.log"
        self.headers = {"Authorization": f"Bearer {setup['key']}"}
        env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
        env.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "up", "--host", "127.0.0.1", "--port", str(setup["port"]),
             "--data-dir", str(setup["dir"]), "--config", str(setup["config"])],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.cluster: list = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def poll_until_ready(self, timeout_s: float = 240.0) -> list[httpx.Response]:
        """``POST /v1/videos`` (an empty body: a 422 once it is up) from the moment the port answers
        until the answer is not a 503; every answer, in order. A held request fails the test."""
        answers: list[httpx.Response] = []
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=10.0) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"svd-serve up exited early:\n{self.log()[-3000:]}"
                try:
                    response = client.post(f"{self.url}/v1/videos", json={}, headers=self.headers)
                except httpx.ConnectError:
                    assert not answers, "the port stopped answering during start-up"
                    time.sleep(0.2)
                    continue
                answers.append(response)
                if response.status_code != 503:
                    return answers
                time.sleep(0.2)
        raise AssertionError(f"not ready within {timeout_s:.0f}s:\n{self.log()[-3000:]}")

    def wait_for_banner(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "svd-serve is ready at" not in self.log():
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log()[-3000:]
            time.sleep(0.3)

    def snapshot_cluster(self) -> None:
        """Every process of its Ray cluster (all descend from it), to look for once it has exited."""
        import psutil

        self.cluster = psutil.Process(self.proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in self.cluster)
        assert "raylet" in names and "gcs_server" in names and "ServeReplica" in names, names

    def stop(self, send, timeout_s: float = STOP_TIMEOUT_S) -> tuple[int, float]:
        started = time.monotonic()
        send()
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"svd-serve up did not exit within {timeout_s:.0f}s:\n{self.log()[-3000:]}")
        return code, time.monotonic() - started

    def leftovers(self) -> list:
        import psutil

        time.sleep(0.5)
        alive = []
        for process in self.cluster:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            except psutil.Error:
                continue
        return alive

    def kill(self) -> None:
        """Whatever is left, after a failure: its process group, then its Ray cluster's processes."""
        import psutil

        if self.proc.poll() is None:
            try:
                self.cluster += psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for process in self.cluster:
            try:
                process.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=30)
        self._log.close()


def assert_start_up_answers(answers: list[httpx.Response]) -> None:
    *before, ready = answers
    statuses = [r.status_code for r in answers]
    assert 404 not in statuses, statuses
    assert before, "no answer before the service was ready (the port opened only when ready?)"
    for response in before:
        assert_not_ready(response)
    assert ready.status_code == 422, ready.text  # the empty body, judged by the application itself


@pytest.mark.ray
@pytest.mark.slow
def test_up_answers_503_until_ready_and_stops_on_ctrl_c_to_the_process_group(up_setup):
    up = Up(up_setup)
    try:
        answers = up.poll_until_ready()
        assert_start_up_answers(answers)
        assert httpx.get(f"{up.url}/readyz", timeout=10).status_code == 200
        up.snapshot_cluster()
        code, took = up.stop(lambda: os.killpg(up.proc.pid, signal.SIGINT))
        assert code in (0, 130), up.log()[-3000:]
        assert up.leftovers() == []
        seen = sorted({r.json()["error"]["message"] for r in answers[:-1]})
        slowest = max(r.elapsed.total_seconds() for r in answers[:-1])
        print(f"\n{len(answers) - 1} answers 503 before ready (slowest {slowest:.1f}s: {seen}); "
              f"Ctrl-C stopped it in {took:.1f}s")
    finally:
        up.kill()


@pytest.mark.ray
@pytest.mark.slow
def test_up_drains_or_requeues_a_running_job_and_stops_on_sigterm(up_setup):
    from serve.jobstore.sqlite import SqliteJobStore

    up = Up(up_setup)
    try:
        assert_start_up_answers(up.poll_until_ready())
        up.wait_for_banner()  # every replica up: the job runs at once
        image = (ROOT / "pipelines/assets/sample.png").read_bytes()
        submitted = httpx.post(f"{up.url}/v1/videos", headers=up.headers, timeout=30,
                               files={"image": ("sample.png", image, "image/png")},
                               data={"num_frames": "4", "num_inference_steps": "2", "width": "128", "height": "64"})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        deadline = time.monotonic() + 15
        while httpx.get(f"{up.url}/v1/videos/{job_id}", headers=up.headers).json()["status"] == "queued":
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        up.snapshot_cluster()
        code, took = up.stop(lambda: up.proc.send_signal(signal.SIGTERM))
        assert code == 0, up.log()[-3000:]
        assert up.leftovers() == []
        job = SqliteJobStore(str(up_setup["dir"] / "jobs.sqlite3")).get(job_id, tenant=None)
        assert job.status.value in ("completed", "queued"), job  # drained, or handed back to the queue
        print(f"\nSIGTERM stopped it in {took:.1f}s; the job is {job.status.value}")
    finally:
        up.kill()
