"""``svd-serve up``: a local single-node deployment, ready to take requests.

With no model given it builds the tiny offline models (SVD and a text-to-image model, CPU, no
network), so text-to-video works out of the box too; with ``--model`` it
loads real weights from a Hugging Face id, a directory or ``s3://``. Storage is a local
directory and the job store an embedded SQLite file under ``--data-dir`` unless ``--config``
says otherwise.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx

from .config import AppConfig
from .tenants import create_tenant, read_tenants, rotate_key

DEMO_TENANT = "demo"
#: Deployment defaults with the tiny models (a request's own values win): the model's own 1024x576 at
#: 25 + 30 steps takes minutes on a CPU.
TINY_DEFAULTS = {"width": 256, "height": 128, "num_inference_steps": 8, "t2i_num_inference_steps": 4}
READY_TIMEOUT_S = 600.0


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
    elif model is not None:
        update["model"] = config.model.model_copy(update={"source": model})
    if not config_file:
        update["storage"] = config.storage.model_copy(update={"local_dir": str(data_dir / "outputs")})
        update["job_store"] = config.job_store.model_copy(update={"sqlite_path": str(data_dir / "jobs.sqlite3")})
    if config.auth.resolved_tenants_file() is None:
        update["auth"] = config.auth.model_copy(update={"tenants_file": str(data_dir / "tenants.yaml")})
    return config.model_copy(update=update)


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the service was not ready at {url}/readyz within {timeout_s:.0f}s")


def up(*, model: str | None, config_file: str | None, host: str, port: int, data_dir: str,
       num_cpus: int | None, num_gpus: int | None, block: bool = True) -> int:
    import ray
    from ray import serve

    from .app import build_app

    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    config = local_config(model=model, data_dir=data, config_file=config_file)
    key = issue_demo_key(Path(config.auth.resolved_tenants_file()))

    # Logical CPUs: the stages reserve whole CPUs for scheduling, but a small machine can still run them all.
    ray.init(
        address="local",  # always a new cluster of our own, never whatever else runs on this machine
        num_cpus=num_cpus or max(8, os.cpu_count() or 1),
        num_gpus=num_gpus,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name="svd", route_prefix="/", blocking=False)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    wait_ready(url, READY_TIMEOUT_S)
    sample = Path("pipelines/assets/sample.png")
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
        "Ctrl-C stops it.",
        flush=True,
    )
    if not block:
        return 0
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    print("shutting down ...", file=sys.stderr)
    serve.shutdown()
    ray.shutdown()
    return 0
