"""``--local``: a whole load test on this machine, service included.

1. creates a temp data dir, the profile's tenants (with their weights) and a Serve config with the
   tiny CPU model and Sampler autoscaling (1-2 replicas), so scaling shows in the report;
2. starts ``svd-serve up`` on a free loopback port in its own process group and waits for it;
3. runs the profile against it (replica counts sampled from its Ray cluster);
4. stops it with SIGTERM (``svd-serve up`` drains and shuts Serve and Ray down), a second SIGTERM
   if the drain takes too long (it stops at once: running jobs go back to the queue), escalating
   to SIGKILL of its process group and of any process of its Ray session left behind.

    python -m loadtest.local --profile smoke            # same as: python -m loadtest.run --local ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import yaml

from pipelines.registry import STAGES

from .profile import Profile
from .session import execute, finish, run_cli

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 90.0
#: Of STOP_TIMEOUT_S, how long the drain may take before a second SIGTERM stops it at once.
DRAIN_TIMEOUT_S = 45.0
#: The stage that autoscales (1-2 replicas) in the default local config, so scaling shows in the report.
SCALED_STAGE = "sampling"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_serve_config(data_dir: Path, model_dir: Path) -> dict:
    """Tiny CPU model, local storage and SQLite under ``data_dir``, Sampler autoscaling 1-2."""
    stages = {spec.config_key: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}} for spec in STAGES.stages()}
    stages[STAGES.get(SCALED_STAGE).config_key] = {
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "upscale_delay_s": 3, "downscale_delay_s": 20},
        "max_ongoing_requests": 1, "ray_actor_options": {"num_cpus": 1}}
    return {
        "model": {"source": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "text_to_image_model": None,
        "storage": {"backend": "local", "local_dir": str(data_dir / "outputs")},
        "job_store": {"backend": "sqlite", "sqlite_path": str(data_dir / "jobs.sqlite3")},
        "auth": {"tenants_file": str(data_dir / "tenants.yaml")},
        "stages": stages,
    }


class LocalService:
    """``svd-serve up`` in a subprocess; a context manager that always stops it."""

    def __init__(self, data_dir: Path, *, config: Path | None, log_path: Path, port: int | None = None) -> None:
        self.data_dir, self.config, self.log_path = data_dir, config, log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.gcs_address: str | None = None
        self.session: str | None = None

    def start(self, timeout_s: float = READY_TIMEOUT_S, attempts: int = 2) -> "LocalService":
        """Start and wait until ready. On a busy machine Ray's node start-up can time out (its agents
        must come up within seconds): such a failed start is retried once on a new port."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except RuntimeError as error:
                if attempt == attempts or "timed out during startup" not in str(error):
                    raise
                print(f"svd-serve up: Ray start-up timed out (busy machine?); retrying ({attempt}/{attempts - 1})",
                      file=sys.stderr)
                self.stop()
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> "LocalService":
        cmd = [sys.executable, "-m", "serve.cli", "up", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        env = dict(os.environ)
        # Start a new local cluster even when another Ray cluster runs on this machine (without it
        # ray.init() connects to the newest one and `up` fails: see docs/loadtesting.md).
        env["RAY_ADDRESS"] = "local"
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace")
                reason = "Ray node timed out during startup: " if "timed out during startup" in log else ""
                raise RuntimeError(f"{reason}svd-serve up exited with status {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if "svd-serve is ready at" in self.log_path.read_text(errors="replace"):
                break
            time.sleep(1.0)
        else:
            raise TimeoutError(f"svd-serve up was not ready within {timeout_s:.0f}s:\n{self.log_tail()}")
        from .replicas import gcs_address_of

        self.gcs_address = gcs_address_of(self.proc.pid)
        self.session = self._session_name()
        return self

    def _session_name(self) -> str | None:
        import psutil

        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                for arg in child.cmdline():
                    if arg.startswith("--session-name="):
                        return arg.split("=", 1)[1]
        except psutil.Error:
            pass
        return None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM, wait (a second SIGTERM after DRAIN_TIMEOUT_S skips the drain), then SIGKILL the
        group and leftovers of its Ray session. True if it stopped by itself, leaving nothing behind."""
        if self.proc is None:
            return True
        clean = True
        if self.proc.poll() is None:
            started = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=min(DRAIN_TIMEOUT_S, timeout_s))
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                clean = False
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        leftovers = self._session_leftovers()
        if leftovers:
            clean = False
            for process in leftovers:
                try:
                    process.kill()
                except Exception:  # noqa: BLE001
                    pass
        self._log.close()
        return clean

    def _session_leftovers(self) -> list:
        """Processes of this service's Ray session still alive (ours: found by the session name)."""
        if not self.session:
            return []
        import psutil

        time.sleep(1.0)
        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.session in arg for arg in (process.info["cmdline"] or [])):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def __enter__(self) -> "LocalService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_tiny_model() -> Path:
    model = ROOT / "models" / "tiny"
    if not (model / "model_index.json").exists():
        print(f"building the tiny model in {model} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "serve.cli", "tiny-model", str(model)], cwd=ROOT, check=True)
    return model


def prepare_data_dir(profile: Profile, data_dir: Path, *, serve_config: str | None) -> tuple[Path, dict[str, str]]:
    """Tenants (with keys) and the Serve config for a local run."""
    from serve.tenants import add_tenant

    data_dir.mkdir(parents=True, exist_ok=True)
    keys = {t.name: add_tenant(data_dir / "tenants.yaml", t.name, weight=t.weight) for t in profile.tenants}
    if serve_config:
        config = yaml.safe_load(Path(serve_config).read_text()) or {}
        config.setdefault("auth", {})["tenants_file"] = str(data_dir / "tenants.yaml")
    else:
        config = local_serve_config(data_dir, ensure_tiny_model())
    path = data_dir / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, keys


def run_local(profile: Profile, *, out: Path, args: argparse.Namespace, command: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="svd-loadtest-"))
    status = 1
    service = None
    try:
        config, keys = prepare_data_dir(profile, data_dir, serve_config=getattr(args, "serve_config", None))
        service = LocalService(data_dir, config=config, log_path=out / "service.log")
        print(f"starting svd-serve up on {service.url} (data {data_dir}, log {service.log_path}) ...", file=sys.stderr)
        started = time.monotonic()
        service.start()
        print(f"ready in {time.monotonic() - started:.0f}s; Ray cluster {service.gcs_address}", file=sys.stderr)
        print(profile.summary(), file=sys.stderr)
        if service.gcs_address and not args.ray_address and not args.dashboard_url:
            args.ray_address = service.gcs_address
        result = execute(profile, target=service.url, keys=keys, out=out, args=args, command=command)
        status = finish(result, out, strict=args.strict)
    except (RuntimeError, TimeoutError, OSError, ValueError) as error:
        print(f"loadtest --local: {error}", file=sys.stderr)
        status = 1
    finally:
        if service is not None:
            print("stopping svd-serve up ...", file=sys.stderr)
            stopping = time.monotonic()
            if service.stop():
                print(f"svd-serve up stopped in {time.monotonic() - stopping:.0f}s", file=sys.stderr)
            else:
                print("svd-serve up did not stop cleanly on SIGTERM; its processes were killed", file=sys.stderr)
        if not getattr(args, "keep_data", False):
            shutil.rmtree(data_dir, ignore_errors=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(["--local", *args], prog="python -m loadtest.local", run_local=run_local)


if __name__ == "__main__":
    sys.exit(main())
