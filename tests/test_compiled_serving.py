"""Compiled stages in serving, end to end on a real local Ray cluster: the Sampler compiles at
replica start (jit engine: Inductor's CPU backend, regional scope, the tiny model) and the Decoder
builds ahead-of-time packages (aot engine); both report their warm-up in ``replica_info``, store
the compile cache, and serve clips equal to eager's in-process reference (codec noise only); a
shape that was not warmed up is served too (eagerly, under the static policy). A warm start from
the aot cache is covered without Ray (tests/test_aot_engine.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

from waiting import free_port, wait_for

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from pipelines.images import load_image  # noqa: E402
from pipelines.loader import ModelSpec, load_components  # noqa: E402
from pipelines.params import GenerationParams  # noqa: E402
from pipelines.sample_image import SAMPLE_IMAGE_PATH  # noqa: E402
from pipelines.staged import StagedPipeline  # noqa: E402
from pipelines.video import decode_video_frames  # noqa: E402
from serve.app import build_app  # noqa: E402
from serve.config import AppConfig  # noqa: E402
from serve.tenants import add_tenant  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.second_lane]

APP = "svd-compiled"
WARM = {"width": 64, "height": 64, "num_frames": 4}
SMALL = {**WARM, "num_inference_steps": 3, "seed": 77, "output_fps": 8, "decode_chunk_size": 4}
COMPONENTS = ("image_encoder", "feature_extractor", "vae", "unet", "scheduler")


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("compiled")
    key = add_tenant(tmp / "tenants.yaml", "alice", rate_limit_per_minute=100000, burst=1000)
    accelerated = {"acceleration": {"compile": "default", "scope": "regional", "cache_dir": str(tmp / "cache")},
                   "warmup_shapes": [{**WARM, "decode_chunk_size": 4}]}
    ahead_of_time = {"acceleration": {"compile": "default", "engine": "aot", "cache_dir": str(tmp / "cache")},
                     "warmup_shapes": [{**WARM, "decode_chunk_size": 4}]}

    def stage(**extra):
        return {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}, "graceful_shutdown_timeout_s": 5, **extra}

    config = AppConfig.model_validate({
        "model": {"source": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"},
        "text_to_image_model": None,
        "stages": {"image_encoder": stage(), "sampler": stage(**accelerated), "decoder": stage(**ahead_of_time),
                   "video_encoder": stage(), "runner": {"ray_actor_options": {"num_cpus": 0.1}},
                   "ingress": {"ray_actor_options": {"num_cpus": 0.1}}},
        "storage": {"local_dir": str(tmp / "outputs")},
        "job_store": {"sqlite_path": str(tmp / "jobs.sqlite3")},
        "auth": {"tenants_file": str(tmp / "tenants.yaml")},
    })
    # A cluster of its own (address="local"): the other lane of `make test` may run one at the same time.
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    wait_for(lambda: client.get("/readyz").status_code == 200, 600, "readyz")
    components = load_components(ModelSpec(source=str(tiny_model_dir), dtype="fp32", device="cpu"), COMPONENTS)
    yield {"client": client, "headers": {"Authorization": f"Bearer {key}"}, "tmp": tmp,
           "reference": StagedPipeline(components)}
    client.close()
    serve.shutdown()
    ray.shutdown()


def clip(service, **params) -> np.ndarray:
    image = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
    response = service["client"].post("/v1/videos", headers=service["headers"], json={"image_url": image, **params})
    assert response.status_code in (200, 201, 202), response.text
    job_id = response.json()["id"]

    def done():
        job = service["client"].get(f"/v1/videos/{job_id}", headers=service["headers"]).json()
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    job = wait_for(done, 300, f"job {job_id}")
    assert job["status"] == "completed", job
    content = service["client"].get(f"/v1/videos/{job_id}/content", headers=service["headers"])
    return decode_video_frames(content.content).astype(np.int16)


def reference(service, **params) -> np.ndarray:
    video = service["reference"](load_image(SAMPLE_IMAGE_PATH), GenerationParams(**params)).video
    return decode_video_frames(video.data).astype(np.int16)


def test_compiled_replicas_warm_up_at_start_and_fill_the_cache(service):
    def info(name):
        return serve.get_deployment_handle(name, app_name=APP).replica_info.remote().result(timeout_s=60)

    acceleration = info("Sampler")["acceleration"]
    assert acceleration["compiled"] and acceleration["cache"] == "miss", acceleration
    assert list(acceleration["warmup_s"]) == ["64x64x4/chunk 4"] and acceleration["cache_bytes"] > 0
    decoder = info("Decoder")["acceleration"]
    assert decoder["compiled"] and decoder["cache"] == "miss" and decoder["aot_packages"] == 1, decoder
    assert decoder["aot_build_s"] > 0 and decoder["cache_bytes"] > 0
    assert info("ImageEncoder")["acceleration"] is None  # eager: nothing configured
    assert [p.name.split("-")[0] for p in (service["tmp"] / "cache").glob("*.megacache")] == ["sampling"]
    assert [p.name.split("-")[0] for p in (service["tmp"] / "cache").glob("*.aoti")] == ["decode"]


def decoder_calls() -> dict:
    info = serve.get_deployment_handle("Decoder", app_name=APP).replica_info.remote().result(timeout_s=60)
    return info["acceleration"]["aot_calls"]


def test_a_compiled_clip_equals_eager(service):
    before = decoder_calls()
    served, expected = clip(service, **SMALL), reference(service, **SMALL)
    assert served.shape == expected.shape
    assert np.abs(served - expected).mean() < 2  # H.264 noise over float-reordering differences
    assert decoder_calls() == {"compiled": before["compiled"] + 1, "eager": before["eager"]}  # one chunk of 4


def test_a_shape_not_warmed_up_is_served_eagerly(service):
    other = {**SMALL, "num_frames": 6, "decode_chunk_size": 6}
    before = decoder_calls()
    served, expected = clip(service, **other), reference(service, **other)
    assert served.shape == expected.shape
    assert np.abs(served - expected).mean() < 2
    assert decoder_calls() == {"compiled": before["compiled"], "eager": before["eager"] + 1}
