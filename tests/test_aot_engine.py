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
    decoder_dispatch = plain["vae"].decoder.forward
    calls = decoder_dispatch.compiled_calls
    compiled_frames = decode(latents, params).frames
    decode_compiled_calls = decoder_dispatch.compiled_calls - calls

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
        "decode_compiled_calls": decode_compiled_calls,
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
        assert run["frames_max_diff"] <= 1 and run["decode_compiled_calls"] == 2  # 4 frames in chunks of 2
        assert run["lora_ready_cache"] == "shared"
        assert run["lora_eager_calls"] == run["steps"]  # the adapter is not in the package
        assert run["lora_vs_eager_lora"] < 1e-6 and run["lora_changes_output"] > 1e-3
        assert run["other_shape_eager_calls"] == 2 and run["other_vs_eager"] < 1e-6
    # The next replica compiles nothing: its packages come from the cache.
    assert warm["sampling"] == {"cache": "hit", "build_s": 0.0, "packages": 1}
    assert warm["decode"] == {"cache": "hit", "build_s": 0.0, "packages": 1}



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


def test_recording_keeps_an_installed_dispatch():
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


class TinyUNetCall(torch.nn.Module):
    """The U-Net's call signature (what the low-VRAM split wrapper expects), with a trivial body."""

    def forward(self, sample, timestep, encoder_hidden_states, added_time_ids, return_dict=True):
        return (sample * 2 + timestep,)


def _unet_call(batch: int):
    return (torch.ones(batch, 2, 3), torch.tensor(1.0), torch.zeros(batch, 1, 4), torch.zeros(batch, 3))


def test_under_the_split_guidance_batch_the_dispatch_sees_one_sample_calls():
    """low_vram.split_guidance_batch wraps the U-Net's forward; the dispatch goes under the wrapper
    (in either order), so the one-sample calls are recorded and dispatched, and turning the split
    off puts the dispatch back in its place."""
    from pipelines.acceleration.lowvram import set_split_guidance_batch

    network = TinyUNetCall()
    set_split_guidance_batch(network, enabled=True)
    with aot.record_calls(network) as calls:
        network(*_unet_call(2))
    assert len(calls) == 1 and "T(1, 2, 3)" in next(iter(calls))  # one sample at a time
    seen = []
    runners = {next(iter(calls)): lambda *args, **kwargs: seen.append(args[0].shape) or (args[0] * 0,)}
    dispatch = aot.install(network, runners)
    assert torch.equal(network(*_unet_call(2), return_dict=False)[0], torch.zeros(2, 2, 3))
    assert seen == [torch.Size([1, 2, 3])] * 2 and dispatch.compiled_calls == 2
    set_split_guidance_batch(network, enabled=False)
    assert network.forward is dispatch
    network(*_unet_call(2), return_dict=False)  # batch 2: no package, eager
    assert dispatch.eager_calls == 1
    set_split_guidance_batch(network, enabled=True)  # a dispatch installed first moves under the wrapper
    network(*_unet_call(2), return_dict=False)
    assert dispatch.compiled_calls == 4


def test_an_expanded_input_is_not_recorded():
    """A stride-0 (expanded) input clones to a dense tensor: a package built from that clone would
    misread the real call's memory, so such calls stay eager."""
    network = torch.nn.Linear(3, 2)
    with aot.record_calls(network) as calls:
        network(torch.ones(1, 3).expand(4, 3))
        network(torch.ones(4, 3))
    assert list(calls) == [aot.call_signature((torch.ones(4, 3),), {})]


def test_the_cache_key_names_what_a_package_bakes_in():
    from pipelines.acceleration.cache import cache_key
    from pipelines.acceleration.lowvram import set_feed_forward_chunking, set_split_guidance_batch
    from pipelines.acceleration.options import WarmupShape
    from pipelines.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline().unet
    options = StageAcceleration(compile="default", engine="aot")
    shape = WarmupShape(width=64, height=64, num_frames=4)

    def key():
        return cache_key(stage="sampling", network=unet, options=options, shapes=[shape])

    plain = key()
    assert plain["device"].startswith("cpu:") and plain["device"].count(":") == 2  # the host's vector ISA
    set_feed_forward_chunking(unet, enabled=True)
    chunked = key()
    set_split_guidance_batch(unet, enabled=True)
    split = key()
    assert len({str(plain), str(chunked), str(split)}) == 3, (plain["variant"], chunked["variant"], split["variant"])
    set_feed_forward_chunking(unet, enabled=False)
    set_split_guidance_batch(unet, enabled=False)
    assert key() == plain


def test_a_failed_build_leaves_no_dispatch_and_no_prepared_mark(monkeypatch):
    """Export failing (a network it cannot trace) fails the model's load with its reason and leaves
    the network as it was, so a retry prepares it from scratch."""
    from pipelines.acceleration.options import WarmupShape
    from pipelines.acceleration.warmup import PREPARED_MARK, prepare_stage
    from pipelines.stages import DecodeStage
    from pipelines.tiny import build_tiny_pipeline

    def cannot_export(network, call, options):
        raise RuntimeError("export failed: data-dependent control flow")

    monkeypatch.setattr(aot, "build_package", cannot_export)
    vae = build_tiny_pipeline().vae
    with pytest.raises(RuntimeError, match="data-dependent"):
        prepare_stage("decode", components={"vae": vae}, stage_object=DecodeStage(vae=vae),
                      options=StageAcceleration(compile="default", engine="aot"),
                      shapes=[WarmupShape(width=64, height=64, num_frames=2, decode_chunk_size=2)])
    assert "forward" not in vars(vae.decoder) and PREPARED_MARK not in vars(vae.decoder)


@pytest.mark.slow
@pytest.mark.second_lane
def test_a_cached_archive_that_misses_this_deployments_calls_is_completed(tmp_path):
    """An archive under this key made by a deployment whose calls differ (here: another decode
    chunk) is a partial hit: its packages load, the calls it lacks are compiled, and the archive is
    stored again with both. A torn archive (a broken copy onto the shared volume) is compiled
    again and replaced."""
    from pipelines.acceleration.cache import AOT_SUFFIX, cache_key, key_name
    from pipelines.acceleration.options import WarmupShape
    from pipelines.acceleration.warmup import prepare_stage
    from pipelines.stages import DecodeStage
    from pipelines.tiny import build_tiny_pipeline

    options = StageAcceleration(compile="default", engine="aot", cache_dir=str(tmp_path))
    chunk2, chunk4 = (WarmupShape(width=64, height=64, num_frames=4, decode_chunk_size=c) for c in (2, 4))
    first = build_tiny_pipeline().vae
    prepare_stage("decode", components={"vae": first}, stage_object=DecodeStage(vae=first), options=options,
                  shapes=[chunk2])
    second = build_tiny_pipeline().vae
    [made] = tmp_path.glob("*" + AOT_SUFFIX)
    wanted = key_name(cache_key(stage="decode", network=second.decoder, options=options, shapes=[chunk4]))
    made.rename(tmp_path / (wanted + AOT_SUFFIX))  # as if written under this key by other settings
    report = prepare_stage("decode", components={"vae": second}, stage_object=DecodeStage(vae=second),
                           options=options, shapes=[chunk4])
    assert report.cache == "partial" and report.aot_build_s > 0 and report.aot_packages == 2
    archive = tmp_path / (wanted + AOT_SUFFIX)
    stored = aot.unpack(archive.read_bytes())
    assert len(stored) == 2 and any("T(4, 4, 8, 8)" in signature for signature in stored)

    archive.write_bytes(archive.read_bytes()[:1000])
    third = build_tiny_pipeline().vae
    report = prepare_stage("decode", components={"vae": third}, stage_object=DecodeStage(vae=third),
                           options=options, shapes=[chunk4])
    assert report.cache == "miss" and report.aot_build_s > 0 and report.aot_packages == 1
    assert len(aot.unpack(archive.read_bytes())) == 1  # replaced by a whole archive
