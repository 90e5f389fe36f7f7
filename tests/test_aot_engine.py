"""The ``aot`` compile engine as a stage replica uses it (``StageModels`` with an acceleration,
without Ray), in fresh processes as replicas are: the first compiles packages from its warm-up
and stores them in the compile cache; the next loads them and is ready without compiling; the
packages' output equals eager; a LoRA model sharing the U-Net runs eagerly (its adapter is not in
the package) with the adapter applied; a shape nobody warmed up runs eagerly; a corrupt archive in
the cache is ignored (compiled again) instead of stopping the replica."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipelines.acceleration import aot
from pipelines.acceleration.options import StageAcceleration

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import json, sys, time
    started = time.monotonic()
    import numpy as np
    import torch
    from pipelines.acceleration.options import StageAcceleration, WarmupShape
    from pipelines.acceleration.warmup import prepare_stage, warmup_params
    from pipelines.adapters import LoraAdapters, write_tiny_lora
    from pipelines.loader import ModelSpec, load_components
    from pipelines.payloads import EncodedImage, SampledLatents
    from pipelines.registry import SAMPLING
    from pipelines.stages import DecodeStage, SamplingStage
    from serve.config import AppConfig
    from serve.stage_models import StageModels
    from serve.zoo import ModelCatalog, ModelEntry, make_model_store

    torch.set_num_threads(1)
    tiny, work = sys.argv[1], sys.argv[2]
    config = AppConfig.model_validate({"model": {"source": tiny, "dtype": "fp32", "device": "cpu"}, "model_id": "a",
                                       "text_to_image_model": None, "job_store": {"sqlite_path": work + "/jobs.sqlite3"}})
    catalog = ModelCatalog(config, make_model_store(config.job_store), ttl_s=0)
    plain = load_components(ModelSpec(source=tiny, dtype="fp32", device="cpu"), ("unet", "vae"))
    lora_dir = write_tiny_lora(plain["unet"], work + "/lora", seed=3)
    catalog.store.put(ModelEntry(id="a-lora", base="a", lora=str(lora_dir)))
    shape = WarmupShape(width=64, height=64, num_frames=4, decode_chunk_size=2)
    encoded = EncodedImage(image_embeddings=torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(1)),
                           image_latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                           generator_state=torch.Generator("cpu").manual_seed(0).get_state())
    params = warmup_params(shape, steps=3)
    options = StageAcceleration(compile="default", engine="aot", cache_dir=work + "/compile-cache")

    # The Sampler as a replica loads it: prepared (packages) before it is ready.
    models = StageModels(SAMPLING, catalog, acceleration=options, warmup_shapes=[shape])
    base = models.load(catalog.version_key("a"))
    ready_s = time.monotonic() - started
    dispatch = base.stage.unet.forward
    eager_stage = SamplingStage(unet=plain["unet"], scheduler=base.stage.new_scheduler())
    eager = eager_stage(encoded, params).latents
    calls = dispatch.compiled_calls
    base.hold()
    with base.applied() as stage:
        compiled = stage(encoded, params).latents
    base.release()
    served_compiled = dispatch.compiled_calls - calls
    eager_before = dispatch.eager_calls
    lora = models.load(catalog.version_key("a-lora"))
    lora.hold()
    with lora.applied() as stage:
        adapted = stage(encoded, params).latents
    lora.release()
    lora_eager_calls = dispatch.eager_calls - eager_before
    plain_adapters = LoraAdapters(plain["unet"])  # the same adapter on the plain (eager) U-Net
    plain_adapters.load("same", lora_dir)
    with plain_adapters.active("same"):
        adapted_eager = eager_stage(encoded, params).latents
    other = warmup_params(WarmupShape(width=64, height=64, num_frames=3), steps=2)
    before = dispatch.eager_calls
    base.hold()
    with base.applied() as stage:
        other_compiled = stage(encoded, other).latents
    base.release()
    other_eager = eager_stage(encoded, other).latents

    # The decoder, prepared directly (the same prepare_stage a Decoder replica runs).
    decode = DecodeStage(vae=plain["vae"])
    latents = SampledLatents(latents=eager)
    eager_frames = decode(latents, params).frames
    decode_ready = prepare_stage("decode", components=plain, stage_object=decode, options=options, shapes=[shape])
    compiled_frames = decode(latents, params).frames

    relative = lambda a, b: float((a - b).abs().max() / b.abs().max())
    print(json.dumps({
        "ready_s": ready_s,
        "sampling": {"cache": base.ready.cache, "build_s": base.ready.aot_build_s, "packages": base.ready.aot_packages},
        "decode": {"cache": decode_ready.cache, "build_s": decode_ready.aot_build_s,
                   "packages": decode_ready.aot_packages},
        "lora_ready_cache": lora.ready.cache,
        "served_compiled_calls": served_compiled, "steps": params.num_inference_steps,
        "compiled_vs_eager": relative(compiled, eager),
        "lora_eager_calls": lora_eager_calls, "lora_vs_eager_lora": relative(adapted, adapted_eager),
        "lora_changes_output": float((adapted - compiled).abs().max()),
        "other_shape_eager_calls": dispatch.eager_calls - before, "other_vs_eager": relative(other_compiled, other_eager),
        "frames_max_diff": int(np.abs(compiled_frames.astype(int) - eager_frames.astype(int)).max()),
        "cache_files": sorted(p.name for p in __import__("pathlib").Path(work, "compile-cache").iterdir()),
    }))
''')


def _replica(tiny_model_dir, work: Path) -> dict:
    child = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_dir), str(work)], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.second_lane
def test_aot_packages_compiled_once_then_loaded_by_the_next_replica(tmp_path, tiny_model_dir):
    cold = _replica(tiny_model_dir, tmp_path)
    assert cold["sampling"]["cache"] == "miss" and cold["sampling"]["build_s"] > 0
    assert cold["sampling"]["packages"] == 1  # the guided batch: one signature for every step
    assert cold["decode"] == {"cache": "miss", "build_s": cold["decode"]["build_s"], "packages": 1}
    assert sum(name.endswith(".aoti") for name in cold["cache_files"]) == 2
    for run in (cold, warm := _replica(tiny_model_dir, tmp_path)):
        assert run["served_compiled_calls"] == run["steps"]  # every step (one guided batch) ran the package
        assert run["compiled_vs_eager"] < 1e-4  # fp32, Inductor's reordered reductions only
        assert run["frames_max_diff"] <= 1
        assert run["lora_ready_cache"] == "shared"
        assert run["lora_eager_calls"] == run["steps"]  # the adapter is not in the package
        assert run["lora_vs_eager_lora"] < 1e-6 and run["lora_changes_output"] > 1e-3
        assert run["other_shape_eager_calls"] == 2 and run["other_vs_eager"] < 1e-6
    # The next replica compiles nothing: its packages come from the cache.
    assert warm["sampling"] == {"cache": "hit", "build_s": 0.0, "packages": 1}
    assert warm["decode"] == {"cache": "hit", "build_s": 0.0, "packages": 1}
    assert warm["ready_s"] < cold["ready_s"] / 2, (warm["ready_s"], cold["ready_s"])

    # A broken archive (a torn copy onto the shared volume) is ignored: that replica compiles again
    # and replaces it.
    [archive] = (tmp_path / "compile-cache").glob("decode-*.aoti")
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    repaired = _replica(tiny_model_dir, tmp_path)
    assert repaired["decode"]["cache"] == "miss" and repaired["decode"]["build_s"] > 0
    assert repaired["sampling"]["cache"] == "hit" and repaired["frames_max_diff"] <= 1
    assert aot.unpack(archive.read_bytes()).keys() == aot.unpack(whole).keys()


def test_call_signature_tells_apart_what_a_package_is_specific_to():
    x = torch.zeros(2, 3, 4)
    base = aot.call_signature((x,), {"flag": False})
    assert base == aot.call_signature((torch.ones(2, 3, 4),), {"flag": False})  # values do not matter
    for args, kwargs in [((torch.zeros(2, 3, 5),), {"flag": False}),  # shape
                         ((x.double(),), {"flag": False}),  # dtype
                         ((x.transpose(1, 2),), {"flag": False}),  # layout
                         ((x,), {"flag": True}),  # a baked-in value
                         ((x,), {"other": False}),  # a keyword
                         ((x, x), {"flag": False})]:  # the structure
        assert aot.call_signature(args, kwargs) != base


def test_archive_round_trip_and_garbage():
    packages = {"sig-a": b"\x00package a", "sig-b": b"package b"}
    assert aot.unpack(aot.pack(packages)) == packages
    for garbage in (b"", b"not a zip", aot.pack(packages)[:40]):
        with pytest.raises(ValueError, match="not a compiled-package archive"):
            aot.unpack(garbage)


def test_recording_keeps_an_installed_dispatch_and_export_sees_the_class_forward():
    network = torch.nn.Linear(3, 2)
    dispatch = aot.install(network, {})
    with aot.record_calls(network) as calls:
        network(torch.ones(1, 3))
        network(torch.ones(1, 3))
        network(torch.ones(4, 3))
    assert len(calls) == 2 and network.forward is dispatch
    network(torch.ones(1, 3))
    assert (dispatch.compiled_calls, dispatch.eager_calls) == (0, 1)


def test_a_deep_copy_of_a_dispatched_network_runs_its_own_weights_eagerly():
    network = torch.nn.Linear(3, 2)
    aot.install(network, {"any": object()})
    clone = copy.deepcopy(network)
    with torch.no_grad():
        clone.weight.zero_()
        clone.bias.fill_(1.0)
    assert clone.forward.network is clone and clone.forward.runners == {}
    assert torch.equal(clone(torch.ones(1, 3)), torch.ones(1, 2))


@pytest.mark.parametrize("options, message", [
    ({"engine": "aot"}, "engine 'aot' needs a compile mode"),
    ({"engine": "aot", "compile": "reduce-overhead"}, "does not record CUDA graphs"),
    ({"engine": "aot", "compile": "max-autotune"}, "does not record CUDA graphs"),
    ({"engine": "aot", "compile": "default", "scope": "regional"}, "scope must be 'full'"),
    ({"engine": "aot", "compile": "default", "shape_policy": "dynamic"}, "shape_policy must be 'static'"),
    ({"engine": "aot", "compile": "default", "warmup": False}, "warmup must be true"),
])
def test_aot_option_combinations_that_cannot_work_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        StageAcceleration.model_validate(options)
