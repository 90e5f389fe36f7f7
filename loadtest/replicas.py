"""Replica counts per Serve deployment over time, sampled during a run.

Two sources:

* ``ray`` - a Ray driver on the machine of the cluster: ``ray.init(address=...)`` then
  ``serve.status()``. It runs in a *subprocess* (``python -m loadtest.replicas``) because Locust's
  gevent monkey-patching and Ray's own threads do not mix in one process.
* ``dashboard`` - the Ray dashboard's REST API, ``GET <dashboard>/api/serve/applications/``:
  works against a remote cluster (KubeRay head service, port 8265) and from a Locust master.

Each sample is one JSON line: ``{"t": epoch, "source": ..., "deployments": {name: {"running": n,
"starting": n, "target": n|null, "status": ...}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable



def parse_dashboard(payload: dict[str, Any], app: str = "svd") -> dict[str, dict[str, Any]]:
    """Deployments of ``app`` from the dashboard's /api/serve/applications/ body."""
    application = (payload.get("applications") or {}).get(app) or {}
    out: dict[str, dict[str, Any]] = {}
    for name, detail in (application.get("deployments") or {}).items():
        states: dict[str, int] = {}
        for replica in detail.get("replicas") or []:
            state = str(replica.get("state", "UNKNOWN")).upper()
            states[state] = states.get(state, 0) + 1
        out[name] = {"running": states.get("RUNNING", 0), "starting": states.get("STARTING", 0),
                     "states": states, "target": detail.get("target_num_replicas"), "status": detail.get("status")}
    return out


def parse_serve_status(status: Any, app: str = "svd") -> dict[str, dict[str, Any]]:
    """Deployments of ``app`` from ``ray.serve.status()``."""
    application = status.applications.get(app)
    out: dict[str, dict[str, Any]] = {}
    if application is None:
        return out
    for name, detail in application.deployments.items():
        states = {str(getattr(k, "value", k)).upper(): int(v) for k, v in detail.replica_states.items()}
        out[name] = {"running": states.get("RUNNING", 0), "starting": states.get("STARTING", 0),
                     "states": states, "target": None, "status": str(getattr(detail.status, "value", detail.status))}
    return out


class DashboardSampler:
    """Polls the dashboard REST API in a background thread (greenlet under gevent)."""

    def __init__(self, url: str, out: str | Path, *, interval: float = 5.0, app: str = "svd",
                 get: Callable[..., Any] | None = None) -> None:
        self.url = url.rstrip("/") + "/api/serve/applications/"
        self.out, self.interval, self.app = Path(out), interval, app
        self._get = get
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.last_error: str | None = None

    def sample(self) -> dict[str, Any] | None:
        import requests

        try:
            response = (self._get or requests.get)(self.url, timeout=5)
            response.raise_for_status()
            return {"t": time.time(), "source": "dashboard", "deployments": parse_dashboard(response.json(), self.app)}
        except Exception as error:  # noqa: BLE001
            self.errors += 1
            self.last_error = repr(error)
            return None

    def _loop(self) -> None:
        with open(self.out, "a") as handle:
            while not self._stop.is_set():
                sample = self.sample()
                if sample is not None:
                    handle.write(json.dumps(sample) + "\n")
                    handle.flush()
                self._stop.wait(self.interval)

    def start(self) -> "DashboardSampler":
        self._thread = threading.Thread(target=self._loop, name="replica-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


class RaySamplerProcess:
    """``python -m loadtest.replicas --ray-address ADDR`` in a subprocess; stopped with SIGTERM."""

    def __init__(self, address: str, out: str | Path, *, interval: float = 5.0, app: str = "svd") -> None:
        self.address, self.out, self.interval, self.app = address, Path(out), interval, app
        self.proc = None
        self.log = self.out.with_suffix(".log")

    def start(self) -> "RaySamplerProcess":
        import subprocess

        env = dict(os.environ)
        env.setdefault("RAY_DEDUP_LOGS", "0")
        if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").exists():
            # A local cluster started by ray.init() uses token auth with the default token file, but
            # Ray only turns auth on by itself for address=None/"auto", not for an explicit address.
            env["RAY_AUTH_MODE"] = "token"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loadtest.replicas", "--ray-address", self.address, "--interval",
                 str(self.interval), "--app", self.app, "--out", str(self.out)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def errors(self) -> int:
        return 0 if self.proc is None or self.proc.poll() in (None, 0) else 1

    @property
    def last_error(self) -> str | None:
        try:
            lines = [line for line in self.log.read_text().splitlines() if line.strip()]
        except OSError:
            return None
        return lines[-1] if lines and self.proc is not None and self.proc.poll() not in (None, 0) else None


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def gcs_address_of(pid: int) -> str | None:
    """The GCS address of the Ray cluster that process ``pid`` (e.g. ``svd-serve up``) started.

    Found through its ``gcs_server`` descendant: its ``--node-ip-address`` and the port file Ray
    writes in the session directory. Exact even when other Ray clusters run on the machine.
    """
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if not cmdline or not cmdline[0].endswith("gcs_server"):
            continue
        opts = dict(arg[2:].split("=", 1) for arg in cmdline[1:] if arg.startswith("--") and "=" in arg)
        session, node_id, ip = opts.get("session-dir"), opts.get("node-id"), opts.get("node-ip-address")
        port = opts.get("gcs_server_port")
        if session and node_id:
            port_file = Path(session) / f"gcs_server_port_{node_id}"
            if port_file.exists():
                port = port_file.read_text().strip() or port
        if ip and port and port != "0":
            return f"{ip}:{port}"
    return None


def _gcs_arg(cmdline: list[str]) -> str | None:
    for arg in cmdline:
        if arg.startswith("--gcs-address="):
            return arg.split("=", 1)[1]
    return None


def gcs_address_for_port(port: int) -> str | None:
    """The GCS address of the Ray cluster whose Serve proxy listens on ``port`` on this machine.

    The listening process is a Ray worker; an ancestor (its raylet) carries ``--gcs-address``.
    """
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    pids = {c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            chain = [process] + process.parents()
        except psutil.Error:
            continue
        for proc in chain:
            try:
                address = _gcs_arg(proc.cmdline())
            except psutil.Error:
                continue
            if address:
                return address
    return None


def _ray_main(args: argparse.Namespace) -> int:
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    import ray
    from ray import serve

    ray.init(address=args.ray_address, logging_level="ERROR", log_to_driver=False, include_dashboard=False,
             namespace="serve")
    try:
        with open(args.out, "a") as handle:
            while not stop["now"]:
                try:
                    deployments = parse_serve_status(serve.status(), args.app)
                    handle.write(json.dumps({"t": time.time(), "source": "ray", "deployments": deployments}) + "\n")
                    handle.flush()
                except Exception as error:  # noqa: BLE001 - keep sampling
                    print(f"sample failed: {error!r}", file=sys.stderr, flush=True)
                deadline = time.monotonic() + args.interval
                while not stop["now"] and time.monotonic() < deadline:
                    time.sleep(0.2)
    finally:
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.replicas",
                                     description="Sample Serve replica counts per deployment to a JSONL file.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ray-address", help="GCS address (host:port or 'auto') of a Ray cluster on this machine")
    source.add_argument("--dashboard-url", help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--app", default="svd", help="Serve application name (default svd)")
    parser.add_argument("--out", required=True, help="JSONL file to append samples to")
    args = parser.parse_args(argv)
    if args.ray_address:
        return _ray_main(args)
    sampler = DashboardSampler(args.dashboard_url, args.out, interval=args.interval, app=args.app).start()
    try:
        signal.signal(signal.SIGTERM, lambda *_: sampler._stop.set())
        while not sampler._stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    sampler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
