"""Adding a stage is one registry entry plus one class: ``tests/stage_plugins/passthrough_stage.py``
registers a pass-through stage after the decoder, and it runs both in process (``StagedPipeline``)
and in the Serve application (its own deployment, in the job's route, timed and metered), with no
other module edited.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fixtures_redis import _free_port

from pipelines import registry
from pipelines.params import GenerationParams
from pipelines.sample_image import SAMPLE_IMAGE_PATH, draw_sample_image
from pipelines.staged import StagedPipeline
from pipelines.video import decode_video_frames

PLUGINS = Path(__file__).resolve().parent / "stage_plugins"
MODULE = "passthrough_stage"
WORKLOAD = {"seed": 7, "num_frames": 6, "num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture
def passthrough(monkeypatch):
    """The plugin registered for the test, and gone afterwards (the registry is process-wide)."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    # Replicas find the module the same way: they inherit this environment from the local Ray.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))
    registry.import_stage_modules([MODULE])
    yield registry.STAGES.get("passthrough")
    registry.STAGES.unregister("passthrough")
    sys.modules.pop(MODULE, None)


def test_the_route_is_registry_data(passthrough):
    names = registry.STAGES.names()
    assert names == ("text_to_image", "image_encode", "sampling", "decode", "passthrough", "video_encode")
    assert [s.name for s in registry.STAGES.route(GenerationParams())] == list(names[1:])  # image-to-video
    assert [s.name for s in registry.STAGES.route(GenerationParams(prompt="x"))] == list(names)
    spans = registry.progress_spans(registry.STAGES.route(GenerationParams()))
    assert spans["passthrough"][0] == spans["decode"][1] and spans["video_encode"][1] == pytest.approx(99.0)


def test_a_stage_must_read_what_earlier_stages_produce():
    broken = registry.StageSpec(name="x", config_key="x", deployment="X", factory=object, inputs=("latents",),
                                output="y")
    with pytest.raises(ValueError, match="reads \\['latents'\\], which no earlier stage produces"):
        registry.StageRegistry([registry.IMAGE_ENCODE]).register(broken)
    with pytest.raises(ValueError, match="already registered"):
        registry.StageRegistry([registry.IMAGE_ENCODE]).register(
            registry.StageSpec(name="image_encode", config_key="other", deployment="Other", factory=object,
                               inputs=("image",), output="z"))
    with pytest.raises(ValueError, match="do not produce 'video'"):
        registry.StageRegistry([registry.IMAGE_ENCODE]).route(GenerationParams())


def test_the_extra_stage_runs_in_process(passthrough, tiny_pipeline):
    image = draw_sample_image()
    with_stage = StagedPipeline(tiny_pipeline)(image, GenerationParams(**WORKLOAD))
    assert list(with_stage.timings) == ["image_encode", "sampling", "decode", "passthrough", "video_encode"]
    assert set(with_stage.bytes_between_stages) == {"image_encode->sampling", "sampling->decode",
                                                    "decode->passthrough", "passthrough->video_encode"}
    registry.STAGES.unregister("passthrough")
    try:
        without = StagedPipeline(tiny_pipeline)(image, GenerationParams(**WORKLOAD))
    finally:
        registry.STAGES.register(passthrough, after="decode")
    assert "passthrough" not in without.timings
    # The same frames either way: the stage passes them on unchanged.
    a, b = (decode_video_frames(r.video.data) for r in (with_stage, without))
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_extra_stage_runs_in_the_serve_application(passthrough, tmp_path, tiny_model_dir):
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import AppConfig
    from serve.tenants import add_tenant

    key = add_tenant(tmp_path / "tenants.yaml", "alice")
    config = AppConfig.model_validate({
        "stage_modules": [MODULE],
        "model": {"source": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"},
        "text_to_image_model": None,
        "stages": {name: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}, "torch_threads": 1}
                   for name in ("image_encoder", "sampler", "decoder", "video_encoder", "passthrough", "ingress",
                                "runner")},
        "storage": {"local_dir": str(tmp_path / "outputs")},
        "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")},
        "auth": {"tenants_file": str(tmp_path / "tenants.yaml")},
    })
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        serve.run(build_app(config), name="plugin", route_prefix="/")
        port = serve.context._get_global_client().http_config.port
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": f"Bearer {key}"})
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the application did not become ready"
            time.sleep(0.5)
        data_url = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
        job = client.post("/v1/videos", json={"image_url": data_url, **WORKLOAD}).json()
        while job["status"] not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline + 120, job
            time.sleep(0.2)
            job = client.get(f"/v1/videos/{job['id']}").json()
        assert job["status"] == "completed", job
        assert {"image_encode", "sampling", "decode", "passthrough", "video_encode", "store"} <= set(job["timings"])
        frames = decode_video_frames(client.get(f"/v1/videos/{job['id']}/content").content)
        assert frames.shape[:3] == (WORKLOAD["num_frames"], 64, 64)
        assert "PassThrough" in serve.status().applications["plugin"].deployments
        usage = client.get("/v1/usage").json()
        assert "passthrough" in usage["gpu_seconds"]["by_stage"]
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()

