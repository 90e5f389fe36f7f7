"""``svd-serve up``: a local single-node deployment, ready to take requests.

With no model given it builds the tiny offline models (SVD and a text-to-image model, CPU, no
network), so text-to-video works out of the box too; with ``--model`` it
loads real weights from a Hugging Face id, a directory or ``s3://``. Storage is a local
directory and the job store an embedded SQLite file under ``--data-dir`` unless ``--config``
says otherwise.

Once ready it writes ``svd-serve.json`` into the data dir (its Ray address, URL and the app config
it runs): ``svd-serve deploy CONFIG`` finds the deployment through it and changes the application
in place. Ray's dashboard is off unless ``--dashboard`` (it costs ≈900 MB); with it, Ray's own
``serve deploy`` works too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from pipelines.registry import STAGES as STAGE_REGISTRY

from .config import AppConfig, StagesConfig
from .tenants import create_tenant, read_tenants, rotate_key

DEMO_TENANT = "demo"
#: Deployment defaults with the tiny models (a request's own values win): the model's own 1024x576 at
#: 25 + 30 steps takes minutes on a CPU.
TINY_DEFAULTS = {"width": 256, "height": 128, "num_inference_steps": 8, "t2i_num_inference_steps": 4}
READY_TIMEOUT_S = 600.0
APP_NAME = "svd"
#: Beyond the deployments' graceful period: how long Serve may take to remove the application.
SERVE_STOP_MARGIN_S = 20.0
#: After ``ray.shutdown()``: how long the cluster's processes get to exit before they are killed.
RAY_STOP_TIMEOUT_S = 10.0
#: Where ``--dashboard`` serves Ray's dashboard (Ray takes the next free port if it is taken).
DASHBOARD_PORT = 8265


def issue_demo_key(tenants_file: Path) -> str:
    """A fresh key for the demo tenant (only its hash is written); its policy, its webhook secret
    and the other tenants are kept."""
    if DEMO_TENANT in read_tenants(tenants_file):
        return rotate_key(tenants_file, DEMO_TENANT).api_key
    return create_tenant(tenants_file, DEMO_TENANT).api_key


def local_config(*, model: str | None, data_dir: Path, config_file: str | None) -> AppConfig:
    config = AppConfig.from_file(config_file) if config_file else AppConfig()
    update: dict = {}
    if model is None and not config_file:
        tiny = Path("models/tiny")
        if not (tiny / "model_index.json").exists():
            from pipelines.tiny import write_tiny_model

            print(f"building the tiny offline model in {tiny} ...", flush=True)
            write_tiny_model(tiny)
        update["model"] = config.model.model_copy(update={"source": str(tiny), "dtype": "fp32", "device": "cpu"})
        tiny_t2i = Path("models/tiny-t2i")
        if not (tiny_t2i / "model_index.json").exists():
            from pipelines.tiny_t2i import write_tiny_text_to_image_model

            print(f"building the tiny offline text-to-image model in {tiny_t2i} ...", flush=True)
            write_tiny_text_to_image_model(tiny_t2i)
        update["text_to_image_model"] = config.model.model_copy(
            update={"source": str(tiny_t2i), "dtype": "fp32", "device": "cpu"})
        # The tiny models on a CPU: a request with only a prompt (or an image) finishes in seconds.
        update["default_params"] = {**TINY_DEFAULTS, **config.default_params}
        # Room for one more replica of each (8 logical CPUs, small models): `svd-serve deploy` replaces
        # every replica only once its successor is ready, so the API never answers 503 meanwhile.
        update["stages"] = StagesConfig.model_validate({
            key: getattr(config.stages, key).model_copy(update={"max_surge_percent": 100})
            for key in ("ingress", "runner", *(spec.config_key for spec in STAGE_REGISTRY.stages()))})
    elif model is not None:
        update["model"] = config.model.model_copy(update={"source": model})
    if not config_file:
        update["storage"] = config.storage.model_copy(update={"local_dir": str(data_dir / "outputs")})
        update["job_store"] = config.job_store.model_copy(update={"sqlite_path": str(data_dir / "jobs.sqlite3")})
    if config.auth.resolved_tenants_file() is None:
        update["auth"] = config.auth.model_copy(update={"tenants_file": str(data_dir / "tenants.yaml")})
    return config.model_copy(update=update)


class StopSignals:
    """SIGINT (Ctrl-C: a terminal sends it to the whole foreground process group) and SIGTERM.

    The first asks for a graceful stop, a second for an immediate one. A flag, never a
    KeyboardInterrupt, so a signal cannot land in the middle of a Ray call (or of the shutdown
    itself). Ray's own processes are not disturbed by a group-wide Ctrl-C: the ones ``ray.init``
    starts block SIGINT and the raylet puts each worker in a process group of its own.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """(Re)installs the handlers: ``ray.init`` replaces the SIGTERM one with its own."""
        for sig in self.SIGNALS:
            try:
                previous = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the caller handles signals
                return
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.count += 1

    @property
    def requested(self) -> bool:
        return self.count > 0

    @property
    def forced(self) -> bool:
        return self.count > 1

    def wait(self, seconds: float | None = None) -> bool:
        """Sleeps until a stop is asked for (True) or ``seconds`` pass (False)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.requested:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True


def graceful_period(config: AppConfig) -> float:
    """The longest ``graceful_shutdown_timeout_s`` among the deployments: how long a stop may drain."""
    stages = config.stages
    periods = [stages.ingress.graceful_shutdown_timeout_s, stages.runner.graceful_shutdown_timeout_s]
    periods += [stages.for_stage(spec).graceful_shutdown_timeout_s for spec in config.built_stages()]
    return max(periods)


def wait_ready(url: str, timeout_s: float, *, stop: StopSignals | None = None, app_status=None) -> bool:
    """Polls until ``/readyz`` answers 200 and, with ``app_status`` (the application's Serve status
    and message), Serve reports it RUNNING: every replica up, not only the ones ``/readyz`` asks.
    True when ready; False if a stop signal came first; a failed deployment raises at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.requested:
            return False
        status, message = app_status() if app_status is not None else ("RUNNING", "")
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"the application failed to deploy: {message}")
        if status == "RUNNING":
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
        if stop is not None:
            stop.wait(1.0)
        else:
            time.sleep(1.0)
    raise TimeoutError(f"the service was not ready at {url}/readyz within {timeout_s:.0f}s")


def _app_status() -> tuple[str | None, str]:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    return (None, "") if app is None else (str(getattr(app.status, "value", app.status)), app.message)


def up(*, model: str | None, config_file: str | None, host: str, port: int, data_dir: str,
       num_cpus: int | None, num_gpus: int | None, block: bool = True, dashboard: bool = False,
       dashboard_port: int = DASHBOARD_PORT, metrics_port: int | None = None) -> int:
    import ray
    from ray import serve

    from .api.startup import PROXY_CALLBACK, PROXY_CALLBACK_ENV
    from .app import build_app, localize_paths
    from .local_state import LocalState

    stop = StopSignals()
    stop.install()
    try:
        data = Path(data_dir).resolve()
        data.mkdir(parents=True, exist_ok=True)
        config = local_config(model=model, data_dir=data, config_file=config_file)
        key = issue_demo_key(Path(config.auth.resolved_tenants_file()))
        if stop.requested:
            return 0

        # Serve's HTTP proxy answers 503 not_ready (not 404) until the application's ingress runs:
        # the proxy is a Ray worker, so it inherits this through the raylet started just below.
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        # Logical CPUs: the stages reserve whole CPUs for scheduling, but a small machine can still run them all.
        context = ray.init(
            address="local",  # always a new cluster of our own, never whatever else runs on this machine
            num_cpus=num_cpus or max(8, os.cpu_count() or 1),
            num_gpus=num_gpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            logging_level="WARNING",
            log_to_driver=False,
            # Where Ray's metrics agent serves every process's metrics (ray_svd_*, ray_serve_*): a fixed
            # port is a stable Prometheus target; None lets Ray pick one (written in its session dir).
            _metrics_export_port=metrics_port,
        )
        stop.install()
        keep_running = False
        try:
            serve.start(http_options={"host": host, "port": port})
            # Not blocking: the wait below stops at a signal, and sees a failed deployment.
            serve.run_many([serve.RunTarget(build_app(config), name=APP_NAME, route_prefix="/")],
                           wait_for_applications_running=False)
            shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            url = f"http://{shown_host}:{port}"
            if not wait_ready(url, READY_TIMEOUT_S, stop=stop, app_status=_app_status):
                return 0
            dashboard_url = f"http://{context.dashboard_url}" if dashboard and context.dashboard_url else None
            state = LocalState(pid=os.getpid(), gcs_address=context.address_info["gcs_address"], app_name=APP_NAME,
                               host=host, port=port, url=url, dashboard_url=dashboard_url,
                               auth_mode=os.environ.get("RAY_AUTH_MODE"),  # ray.init sets it for a new cluster
                               config=localize_paths(config).model_dump(mode="json"))
            state.write(data)
            print_banner(url, config, key, dashboard_url=dashboard_url, data_dir=data_dir, auth_mode=state.auth_mode)
            if metrics_port:
                print(f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics (scrape config and dashboard: "
                      "docs/operations.md)")
            if not block:
                keep_running = True
                return 0
            stop.wait()
            return 0
        finally:
            if not keep_running:
                shutdown(stop, graceful_period(_deployed_config(data, fallback=config)))
                LocalState.remove(data, pid=os.getpid())
    finally:
        stop.restore()


def _deployed_config(data_dir: Path, *, fallback: AppConfig) -> AppConfig:
    """The app config running now: the last ``svd-serve deploy`` may have changed the graceful periods."""
    from .local_state import STATE_FILE

    try:
        return AppConfig.model_validate(json.loads((data_dir / STATE_FILE).read_text())["config"])
    except Exception:  # noqa: BLE001 - no state file (or an unreadable one): what `up` started with
        return fallback


def print_banner(url: str, config: AppConfig, key: str, *, dashboard_url: str | None = None,
                 data_dir: str = "data", auth_mode: str | None = None) -> None:
    sample = Path("pipelines/assets/sample.png")
    where = "" if data_dir == "data" else f" --data-dir {data_dir}"
    upgrade = (f"Change it in place: svd-serve deploy{where} CONFIG (svd-serve deploy{where} --show prints the "
               "config it runs).\n")
    if dashboard_url:
        # Ray 2.60 protects a new local cluster with a token (~/.ray/auth_token); Ray's CLI sends it
        # only when told to.
        token = "RAY_AUTH_MODE=token " if auth_mode == "token" else ""
        upgrade += f"Ray dashboard: {dashboard_url}  ({token}serve deploy --address {dashboard_url} CONFIG works too)\n"
    print(
        f"\nsvd-serve is ready at {url}  (API docs: {url}/docs)\n"
        f"model: {config.model.source}"
        f"{'' if config.text_to_image_model is None else ', text-to-image: ' + config.text_to_image_model.source}\n"
        f"demo API key (tenant '{DEMO_TENANT}', shown once): {key}\n\n"
        f"  curl -s -H 'Authorization: Bearer {key}' -F image=@{sample} "
        f"-F num_frames=14 -F num_inference_steps=8 -F width=256 -F height=128 {url}/v1/videos\n"
        f"  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
        f"-d '{{\"prompt\": \"a lighthouse at dusk\", \"width\": 256, \"height\": 128, \"num_inference_steps\": 8}}' "
        f"{url}/v1/videos\n"
        f"  curl -s -H 'Authorization: Bearer {key}' {url}/v1/videos/<id>\n"
        f"  curl -s -L -H 'Authorization: Bearer {key}' -o clip.mp4 {url}/v1/videos/<id>/content\n\n"
        f"{upgrade}"
        "Ctrl-C stops it (running jobs finish or go back to the queue; Ctrl-C again to stop at once).",
        flush=True,
    )


def _drain_runner(stop: StopSignals, grace_s: float) -> None:
    """The runner finishes or hands back its running jobs before anything is torn down (waiting
    for it ends early on a second signal)."""
    from ray import serve

    try:
        response = serve.get_deployment_handle("JobRunner", app_name=APP_NAME).drain.remote(wait_s=grace_s)
    except Exception:  # noqa: BLE001 - the application never got that far: nothing to drain
        return
    deadline = time.monotonic() + grace_s + 10
    while not stop.forced and time.monotonic() < deadline:
        try:
            outcome = response.result(timeout_s=0.5)
        except TimeoutError:
            continue
        except Exception:  # noqa: BLE001 - a runner gone already: its jobs come back by their leases
            return
        print(f"jobs: {outcome['running'] - outcome['handed_back']} finished, {outcome['handed_back']} handed back "
              "to the queue", file=sys.stderr, flush=True)
        return


def shutdown(stop: StopSignals, grace_s: float) -> None:
    """Stops the application, Serve and our Ray cluster, and leaves none of its processes behind.

    Graceful first: the job runner stops claiming and its running jobs get ``grace_s`` to finish
    while every stage still serves them; the ones that cannot are handed back to the queue. Then
    the application is deleted (its route goes, so the proxy answers 503). A second signal skips
    to the end.
    """
    import ray
    from ray import serve

    print(f"shutting down: running jobs get up to {grace_s:.0f}s to finish, or go back to the queue "
          "(Ctrl-C again to stop at once) ...", file=sys.stderr, flush=True)
    ours = _descendants()
    started = time.monotonic()
    try:
        gone = False
        if not stop.forced:
            _drain_runner(stop, grace_s)
        if not stop.forced:
            serve.delete(APP_NAME, _blocking=False)
            deadline = started + grace_s + SERVE_STOP_MARGIN_S
            while not stop.forced and time.monotonic() < deadline and not gone:
                time.sleep(0.5)
                gone = _app_status()[0] is None
        if gone:
            serve.shutdown()  # the proxy and the controller; quick once the application is gone
        elif stop.forced:
            print("stopping at once: running jobs go back to the queue when their leases run out",
                  file=sys.stderr, flush=True)
        else:
            print(f"the application did not stop within {grace_s + SERVE_STOP_MARGIN_S:.0f}s; stopping Ray",
                  file=sys.stderr, flush=True)
    except Exception as error:  # noqa: BLE001 - Ray is stopped below in any case
        print(f"stopping Serve failed ({error}); stopping Ray", file=sys.stderr, flush=True)
    finally:
        ours += _descendants()
        ray.shutdown()
        left = _reap(ours, timeout_s=RAY_STOP_TIMEOUT_S)
        print(f"stopped in {time.monotonic() - started:.0f}s"
              + (f" ({left} Ray process(es) killed)" if left else ""), file=sys.stderr, flush=True)


def _descendants() -> list:
    try:
        import psutil

        return psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - best effort: ray.shutdown() stops what it started anyway
        return []


def _reap(processes: list, *, timeout_s: float) -> int:
    """Waits for the processes to end; kills the ones still there. How many had to be killed."""
    if not processes:
        return 0
    import psutil

    unique = {p.pid: p for p in processes}.values()
    _, alive = psutil.wait_procs(list(unique), timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(alive)
