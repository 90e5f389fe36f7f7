"""The model zoo on a real local Ray cluster: several models served side by side, per request.

One application serves four image-to-video models at once: the default tiny model ``svd-a``, a
whole other tiny model with different random weights (``acme/svd-b``, preloaded), a fine-tune of
``svd-a`` with its own U-Net as one safetensors file (``svd-c``), and a LoRA adapter on ``svd-a``'s
U-Net (``svd-a-lora``). Every job's clip is compared with the clip of its own in-process reference
(the same weights through :class:`~pipelines.staged.StagedPipeline`, the same seed): equal up to
codec noise, and clearly different from the other models' clips. Then the Sampler keeps one model
per replica, and jobs alternating between models still come out right while evictions count up.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from waiting import free_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from pipelines.images import load_image  # noqa: E402
from pipelines.loader import ModelSpec, load_components, write_unet_checkpoint  # noqa: E402
from pipelines.params import GenerationParams  # noqa: E402
from pipelines.sample_image import SAMPLE_IMAGE_PATH  # noqa: E402
from pipelines.staged import StagedPipeline  # noqa: E402
from pipelines.tiny import build_tiny_pipeline, write_tiny_model  # noqa: E402
from pipelines.video import decode_video_frames  # noqa: E402
from serve.app import build_app  # noqa: E402
from serve.config import AppConfig  # noqa: E402
from serve.tenants import add_tenant  # noqa: E402

APP = "zoo"
TERMINAL = {"completed", "failed", "cancelled"}
SMALL = {"num_frames": 6, "num_inference_steps": 4, "width": 64, "height": 64, "seed": 1234, "output_fps": 10}
REFERENCE = ("sample.png", Path(SAMPLE_IMAGE_PATH).read_bytes(), "image/png")
COMPONENTS = ("image_encoder", "feature_extractor", "vae", "unet", "scheduler")


def config_for(tmp: Path, models: dict[str, Path], *, per_replica: int, concurrent: int) -> AppConfig:
    def stage(**extra):
        return {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}, "graceful_shutdown_timeout_s": 5,
                "health_check_period_s": 2, **extra}

    return AppConfig.model_validate({
        "model": {"source": str(models["a"]), "dtype": "fp32", "device": "cpu"},
        "model_id": "svd-a",
        "models": [
            {"id": "acme/svd-b", "source": str(models["b"]), "preload": True, "description": "other weights"},
            {"id": "svd-c", "base": "svd-a", "unet": str(models["c_unet"])},
            {"id": "svd-a-lora", "base": "svd-a", "lora": str(models["lora"])},
        ],
        "text_to_image_model": None,
        "stages": {
            "image_encoder": stage(max_ongoing_requests=4), "decoder": stage(max_ongoing_requests=4),
            "sampler": stage(max_ongoing_requests=concurrent, max_num_models_per_replica=per_replica),
            "video_encoder": stage(max_ongoing_requests=4),
            "runner": {"ray_actor_options": {"num_cpus": 0.1}, "graceful_shutdown_timeout_s": 5},
            "ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        },
        "storage": {"local_dir": str(tmp / "outputs")},
        "job_store": {"sqlite_path": str(tmp / "jobs.sqlite3")},
        "auth": {"tenants_file": str(tmp / "tenants.yaml")},
        "max_inflight_jobs": 8,
    })


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_model_dir):
    from pipelines.adapters import write_tiny_lora

    tmp = tmp_path_factory.mktemp("zoo")
    models = {"a": tiny_model_dir, "b": write_tiny_model(tmp / "svd-b", seed=1),
              "c_unet": write_unet_checkpoint(build_tiny_pipeline(seed=2).unet, tmp / "svd-c-unet.safetensors")}
    base_unet = load_components(ModelSpec(source=str(tiny_model_dir), dtype="fp32", device="cpu"), ("unet",))["unet"]
    models["lora"] = write_tiny_lora(base_unet, tmp / "svd-a-lora", seed=3)
    limits = {"rate_limit_per_minute": 100000, "burst": 10000, "max_running_jobs": 100, "max_queued_jobs": 1000}
    keys = {name: add_tenant(tmp / "tenants.yaml", name, **limits) for name in ("alice", "bob")}

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config_for(tmp, models, per_replica=4, concurrent=2)), name=APP, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, "readyz")
    yield {"client": client, "keys": keys, "tmp": tmp, "models": models, "references": References(models)}
    client.close()
    serve.shutdown()
    ray.shutdown()


class References:
    """Each model's clip for SMALL, made in this process from the same weights (cached)."""

    def __init__(self, models: dict[str, Path]) -> None:
        self.models, self.clips = models, {}
        self.image = load_image(SAMPLE_IMAGE_PATH)

    def clip(self, model: str, lora_scale: float = 1.0, **overrides) -> np.ndarray:
        key = (model, lora_scale, tuple(sorted(overrides.items())))
        if key not in self.clips:
            from pipelines.adapters import reference_with_adapter
            from pipelines.loader import load_unet_checkpoint

            spec = ModelSpec(source=str(self.models["b" if model == "acme/svd-b" else "a"]), dtype="fp32",
                             device="cpu")
            components = load_components(spec, COMPONENTS)
            if model == "svd-c":
                components["unet"], _ = load_unet_checkpoint(str(self.models["c_unet"]),
                                                             base_dir=Path(self.models["a"]), spec=spec)
            if model == "svd-a-lora":
                components["unet"] = reference_with_adapter(components["unet"], self.models["lora"], lora_scale)
            video = StagedPipeline(components)(self.image, GenerationParams(**{**SMALL, **overrides})).video
            self.clips[key] = decode_video_frames(video.data).astype(np.int16)
        return self.clips[key]


def auth(zoo, tenant="alice") -> dict:
    return {"Authorization": f"Bearer {zoo['keys'][tenant]}"}


def submit(zoo, model: str | None, tenant="alice", **extra) -> httpx.Response:
    data_url = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
    body = {"image_url": data_url, **SMALL, **extra}
    if model is not None:
        body["model"] = model
    return zoo["client"].post("/v1/videos", headers=auth(zoo, tenant), json=body)


def finished(zoo, job_id: str, tenant="alice", timeout_s: float = 240) -> dict:
    last = {}

    def done():
        last["job"] = job = zoo["client"].get(f"/v1/videos/{job_id}", headers=auth(zoo, tenant)).json()
        return job if job["status"] in TERMINAL else None

    try:
        return wait_for(done, timeout_s, f"job {job_id}")
    except AssertionError as error:
        raise AssertionError(f"{error}: {last.get('job')}") from None


def clip_of(zoo, job: dict, tenant="alice") -> np.ndarray:
    assert job["status"] == "completed", job
    content = zoo["client"].get(f"/v1/videos/{job['id']}/content", headers=auth(zoo, tenant), follow_redirects=True)
    return decode_video_frames(content.content).astype(np.int16)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def sampler_info() -> dict:
    return serve.get_deployment_handle("Sampler", app_name=APP).replica_info.remote().result(timeout_s=30)


def assert_is_reference(zoo, model: str, clip: np.ndarray) -> None:
    """Equal to its own reference up to codec noise, and clearly unlike the default model's clip."""
    references = zoo["references"]
    assert distance(clip, references.clip(model)) < 2.0, model
    if model != "svd-a":
        assert distance(clip, references.clip("svd-a")) > 5.0, model


def test_each_model_makes_the_clip_of_its_own_reference(zoo):
    info = sampler_info()
    assert {"svd-a", "acme/svd-b"} <= set(info["models"])  # the default and the warm pool, before any job
    models = ["svd-a", "acme/svd-b", "svd-c", "svd-a-lora"]
    responses = {model: submit(zoo, model) for model in models}
    for model, response in responses.items():
        assert response.status_code == 202, response.text
        assert response.json()["model"] == model
    jobs = {model: finished(zoo, response.json()["id"]) for model, response in responses.items()}
    for model, job in jobs.items():
        assert_is_reference(zoo, model, clip_of(zoo, job))
    # A preloaded model never pays a load on the request path; one loaded on demand shows it.
    assert "model_load" not in jobs["acme/svd-b"]["timings"] and "model_load" not in jobs["svd-a"]["timings"]
    assert jobs["svd-c"]["timings"]["model_load"] > 0
    # svd-c and svd-a-lora take svd-a's VAE and image encoder (same hashes) from the shared cache,
    # and the LoRA model svd-a's very U-Net.
    info = sampler_info()
    assert set(models) <= set(info["models"]) and info["evictions"] == 0
    assert info["component_hits"] >= 1
    # Without a model: the default.
    default = finished(zoo, submit(zoo, None).json()["id"])
    assert default["model"] == "svd-a"
    assert distance(clip_of(zoo, default), zoo["references"].clip("svd-a")) < 2.0


def test_requests_with_and_without_the_adapter_run_at_once_on_one_replica(zoo):
    # One Sampler replica taking two requests at a time: base and LoRA jobs share one U-Net.
    ids = [(model, submit(zoo, model, num_inference_steps=12).json()["id"])
           for model in ("svd-a", "svd-a-lora", "svd-a", "svd-a-lora")]
    jobs = [(model, finished(zoo, job_id)) for model, job_id in ids]
    references = zoo["references"]
    for model, job in jobs:
        assert distance(clip_of(zoo, job), references.clip(model, num_inference_steps=12)) < 2.0, model
    # They overlapped: a LoRA job ran while a base job did.
    spans = {model: [] for model in ("svd-a", "svd-a-lora")}
    for model, job in jobs:
        spans[model].append((job["started_at"], job["completed_at"]))
    assert any(a0 < b1 and b0 < a1 for a0, a1 in spans["svd-a"] for b0, b1 in spans["svd-a-lora"]), spans


def test_a_private_model_added_at_run_time(zoo):
    client, tmp = zoo["client"], zoo["tmp"]
    command = [sys.executable, "-m", "serve.cli", "models", "--job-store", f"sqlite:{tmp / 'jobs.sqlite3'}", "add",
               "acme/alice-slowmo", "--base", "svd-a", "--lora", str(zoo["models"]["lora"]), "--private", "alice"]
    added = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert added.returncode == 0, added.stderr
    listed = {model["id"] for model in client.get("/v1/models", headers=auth(zoo)).json()["data"]}
    assert "acme/alice-slowmo" in listed and {"svd-a", "acme/svd-b", "svd-c", "svd-a-lora"} <= listed
    assert "acme/alice-slowmo" not in {m["id"] for m in client.get("/v1/models", headers=auth(zoo, "bob")).json()["data"]}
    # Everywhere bob looks it is as unknown as a model that never existed.
    for response in (submit(zoo, "acme/alice-slowmo", tenant="bob"),
                     client.get("/v1/models/acme/alice-slowmo", headers=auth(zoo, "bob")),
                     client.post("/acme/alice-slowmo", headers=auth(zoo, "bob"), json={"image_url": "x"})):
        assert response.status_code == 404, response.text
    unknown = submit(zoo, "acme/never-was", tenant="bob")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert submit(zoo, "acme/alice-slowmo", tenant="bob").json()["error"] == unknown.json()["error"] | {
        "message": unknown.json()["error"]["message"].replace("never-was", "alice-slowmo")}
    # Alice's job on it, with no restart: the LoRA's clip; through fal's queue under its app id too.
    job = finished(zoo, submit(zoo, "acme/alice-slowmo").json()["id"])
    assert job["model"] == "acme/alice-slowmo"
    assert distance(clip_of(zoo, job), zoo["references"].clip("svd-a-lora")) < 2.0
    data_url = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
    queued = client.post("/acme/alice-slowmo", headers=auth(zoo), json={
        "image_url": data_url, "seed": 1234, "fps": 10, "num_frames": 6, "num_inference_steps": 4, "width": 64,
        "height": 64})  # never a full-size job on the tiny CPU model
    assert queued.status_code == 200, queued.text
    assert queued.json()["status_url"].endswith(f"/acme/alice-slowmo/requests/{queued.json()['request_id']}/status")
    request_id = queued.json()["request_id"]
    status = client.get(f"/acme/alice-slowmo/requests/{request_id}/status", headers=auth(zoo))
    assert status.status_code == 200 and status.json()["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert finished(zoo, request_id)["model"] == "acme/alice-slowmo"
    result = client.get(f"/acme/alice-slowmo/requests/{request_id}", headers=auth(zoo))
    assert result.status_code == 200 and result.json()["video"]["url"]
    assert client.get(f"/acme/alice-slowmo/requests/{request_id}/status", headers=auth(zoo, "bob")).status_code == 404
    # A change to the model's weights applies to the next job, without a restart.
    changed = subprocess.run([*command[:6], "set", "acme/alice-slowmo", "--lora-scale", "0.5"], capture_output=True,
                             text=True, timeout=60)
    assert changed.returncode == 0, changed.stderr
    halved = clip_of(zoo, finished(zoo, submit(zoo, "acme/alice-slowmo").json()["id"]))
    references = zoo["references"]
    assert distance(halved, references.clip("svd-a-lora", lora_scale=0.5)) < 2.0
    assert distance(halved, references.clip("svd-a-lora")) > distance(halved, references.clip("svd-a-lora", 0.5))
    # Usage is broken down by model.
    wait_for(lambda: client.get("/v1/usage", headers=auth(zoo)).json().get("by_model", {}).get("acme/alice-slowmo"),
          30, "usage of the private model")


def test_one_model_per_replica_evicts_and_stays_correct(zoo):
    config = config_for(zoo["tmp"], zoo["models"], per_replica=1, concurrent=1)
    serve.run(build_app(config), name=APP, route_prefix="/")
    wait_for(lambda: zoo["client"].get("/readyz").status_code == 200, 120, "readyz after the redeploy")
    order = ["acme/svd-b", "svd-a", "svd-c", "svd-a", "acme/svd-b"]
    for model in order:  # one at a time: each needs the replica's one slot
        job = finished(zoo, submit(zoo, model).json()["id"])
        assert_is_reference(zoo, model, clip_of(zoo, job))
    info = sampler_info()
    assert info["capacity"] == 1 and len(info["models"]) == 1
    assert info["evictions"] >= len(order) - 1, info


def test_concurrent_base_and_adapter_requests_in_parallel_threads_of_one_client(zoo):
    # Through the OpenAI SDK, as an existing client names the model.
    import openai

    sdk = openai.OpenAI(base_url=str(zoo["client"].base_url) + "/v1", api_key=zoo["keys"]["alice"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        sdk.videos.create(prompt="x", model="acme/never-was", input_reference=REFERENCE, extra_body=SMALL)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        created = list(pool.map(lambda m: sdk.videos.create(prompt="x", model=m, input_reference=REFERENCE,
                                                            extra_body=SMALL), ["svd-a", "svd-a-lora"]))
    for video, model in zip(created, ["svd-a", "svd-a-lora"]):
        assert video.model == model
        job = finished(zoo, video.id)
        assert distance(clip_of(zoo, job), zoo["references"].clip(model)) < 2.0
