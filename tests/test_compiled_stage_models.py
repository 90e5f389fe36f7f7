"""Compiled stages as a stage replica loads them (``StageModels`` with an acceleration), without
Ray: the U-Net with the replica's LoRA hooks compiled by Inductor (CPU backend, regional scope),
warmed up at load, its output equal to eager; a model sharing the U-Net reuses it; a LoRA adapter
loaded later runs correctly (eagerly: the adapter hooks change the module tree the graphs were
compiled for); the compile cache is filled. Runs in a fresh process: dynamo state is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from pipelines.acceleration.options import StageAcceleration, WarmupShape
    from pipelines.acceleration.warmup import run_once, warmup_params
    from pipelines.adapters import write_tiny_lora
    from pipelines.loader import ModelSpec, load_components
    from pipelines.payloads import EncodedImage
    from pipelines.registry import SAMPLING
    from pipelines.stages import SamplingStage
    from serve.config import AppConfig
    from serve.stage_models import StageModels
    from serve.zoo import ModelCatalog, ModelEntry, make_model_store

    torch.set_num_threads(1)
    tiny, work = sys.argv[1], sys.argv[2]
    config = AppConfig.model_validate({"model": {"source": tiny, "dtype": "fp32", "device": "cpu"}, "model_id": "a",
                                       "text_to_image_model": None, "job_store": {"sqlite_path": work + "/jobs.sqlite3"}})
    catalog = ModelCatalog(config, make_model_store(config.job_store), ttl_s=0)
    plain_unet = load_components(ModelSpec(source=tiny, dtype="fp32", device="cpu"), ("unet",))["unet"]
    lora_dir = write_tiny_lora(plain_unet, work + "/lora", seed=3)
    catalog.store.put(ModelEntry(id="a-lora", base="a", lora=str(lora_dir)))
    shape = WarmupShape(width=64, height=64, num_frames=4)
    encoded = EncodedImage(image_embeddings=torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(1)),
                           image_latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                           generator_state=torch.Generator("cpu").manual_seed(0).get_state())
    params = warmup_params(shape, steps=3)

    options = StageAcceleration(compile="default", scope="regional", cache_dir=work + "/compile-cache")
    models = StageModels(SAMPLING, catalog, acceleration=options, warmup_shapes=[shape])
    base = models.load(catalog.version_key("a"))
    eager = SamplingStage(unet=plain_unet, scheduler=base.stage.new_scheduler())(encoded, params).latents
    graphs = counters["stats"]["unique_graphs"]
    base.hold()
    with base.applied() as stage:
        compiled = stage(encoded, params).latents
    base.release()
    served_compiled = counters["stats"]["unique_graphs"] == graphs
    lora = models.load(catalog.version_key("a-lora"))
    lora.hold()
    with lora.applied() as stage:
        adapted = stage(encoded, params).latents
    lora.release()
    base.hold()
    with base.applied() as stage:
        base_again = stage(encoded, params).latents
    base.release()
    print(json.dumps({
        "base_ready": {"cache": base.ready.cache, "warmed": list(base.ready.warmup_s), "bytes": base.ready.cache_bytes},
        "lora_ready_cache": lora.ready.cache,
        "graphs_after_warmup": graphs, "served_compiled": served_compiled,
        "compiled_vs_eager": float((compiled - eager).abs().max() / eager.abs().max()),
        "lora_changes_output": float((adapted - compiled).abs().max()),
        "base_after_lora_vs_eager": float((base_again - eager).abs().max() / eager.abs().max()),
        "cache_files": sorted(p.name for p in __import__("pathlib").Path(work, "compile-cache").iterdir()),
    }))
''')


@pytest.mark.slow
@pytest.mark.second_lane
def test_a_compiled_sampler_as_a_replica_loads_it(tmp_path, tiny_model_dir):
    child = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_dir), str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["base_ready"] == {"cache": "miss", "warmed": ["64x64x4"], "bytes": result["base_ready"]["bytes"]}
    assert result["base_ready"]["bytes"] > 0 and any(name.endswith(".megacache") for name in result["cache_files"])
    assert result["served_compiled"], "the warmed-up shape compiled again when served"
    assert result["compiled_vs_eager"] < 1e-4  # fp32, reordered reductions only
    assert result["lora_ready_cache"] == "shared"  # the LoRA model runs on its base's U-Net
    assert result["lora_changes_output"] > 1e-3  # the adapter still applies on the compiled U-Net
    assert result["base_after_lora_vs_eager"] < 1e-4
