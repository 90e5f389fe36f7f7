"""The low-VRAM options change memory, not outputs (tiny model, CPU), and the counts and the
GPU-size table behind them hold."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipelines.acceleration.lowvram import (
    LowVramOptions,
    OffloadedStage,
    apply_low_vram,
    apply_low_vram_to_pipeline,
    measure_stage_peaks,
    stage_modules,
)
from pipelines.acceleration.lowvram_profiles import (
    CLIP_ACTIVATION_BYTES,
    ENCODE_BYTES_PER_PIXEL,
    GIB,
    GPU_TIERS,
    LADDER,
    UNET_BYTES_PER_FRAME_PIXEL,
    WEIGHT_BYTES,
    count_reference_bytes,
    estimate_stage_peaks,
    profile_for_gpu_memory,
    usable_bytes,
)
from pipelines.acceleration.memory_count import LiveTensorBytes
from pipelines.params import GenerationParams
from pipelines.sample_image import draw_sample_image
from pipelines.staged import StagedPipeline
from pipelines.stages import DECODE_ELEMENTS_PER_PIXEL

TOLERANCE = 1e-4  # as tests/test_parity.py: float noise of a different batch split, far below one uint8 level
PARAMS = GenerationParams(seed=11, num_frames=4, num_inference_steps=2, width=64, height=64).resolved(14)
MODULES = ("unet", "vae", "image_encoder", "feature_extractor", "scheduler")


@pytest.fixture(scope="module")
def components(tiny_pipeline):
    parts = {name: getattr(tiny_pipeline, name) for name in MODULES}
    yield parts
    apply_low_vram(parts, LowVramOptions())  # the session's tiny pipeline leaves as it came


def run(components, options: LowVramOptions, params: GenerationParams = PARAMS):
    """(final latents, float frames, uint8 frames) of one job with ``options`` applied."""
    apply_low_vram(components, options)
    pipeline = StagedPipeline(components)
    apply_low_vram_to_pipeline(pipeline, options, device="cpu")
    sampled = pipeline.sampling(pipeline.image_encode(draw_sample_image(), params), params)
    return sampled.latents.clone(), pipeline.decode.decode_float(sampled, params), pipeline.decode(sampled, params).frames


@pytest.fixture(scope="module")
def baseline(components):
    return run(components, LowVramOptions())


@pytest.mark.parametrize("options", [
    LowVramOptions(feed_forward_chunking=True),
    LowVramOptions(split_guidance_batch=True),
    LowVramOptions(cpu_offload=True),
    LowVramOptions(feed_forward_chunking=True, split_guidance_batch=True, cpu_offload=True),
], ids=lambda options: "+".join(options.enabled))
def test_each_option_leaves_the_outputs_alone(components, baseline, options):
    latents, frames, uint8 = run(components, options)
    # Float noise, amplified by the guidance (up to 3x the cond-uncond difference) and the Euler
    # steps: measured 7e-5 of the largest latent for the split batch; a wrong half would be O(1).
    assert torch.abs(latents - baseline[0]).max().item() <= 1e-3 * baseline[0].abs().max().item()
    assert np.abs(frames - baseline[1]).max() <= TOLERANCE
    assert np.abs(uint8.astype(int) - baseline[2].astype(int)).max() <= 1
    apply_low_vram(components, LowVramOptions())


def test_options_switch_on_and_off(components):
    unet = components["unet"]
    class_forward = type(unet).forward
    apply_low_vram(components, LowVramOptions(feed_forward_chunking=True, split_guidance_batch=True))
    blocks = [module for module in unet.modules() if hasattr(module, "set_chunk_feed_forward")]
    assert blocks and all(block._chunk_size == 1 for block in blocks)
    assert "forward" in vars(unet)
    apply_low_vram(components, LowVramOptions(split_guidance_batch=True))  # twice: one wrapper, not two
    apply_low_vram(components, LowVramOptions(split_guidance_batch=True))
    assert vars(unet)["forward"].__wrapped__.__func__ is class_forward
    apply_low_vram(components, LowVramOptions())
    assert "forward" not in vars(unet) and all(block._chunk_size is None for block in blocks)


def test_split_batch_without_guidance_is_one_call(components, baseline):
    # max_guidance_scale 1 means no guidance: a batch of one, which the split passes straight through.
    params = PARAMS.model_copy(update={"max_guidance_scale": 1.0, "min_guidance_scale": 1.0})
    plain = run(components, LowVramOptions(), params)
    split = run(components, LowVramOptions(split_guidance_batch=True), params)
    assert torch.equal(plain[0], split[0])
    apply_low_vram(components, LowVramOptions())


def test_decode_chunk_option_is_the_decoders_default(components):
    pipeline = StagedPipeline(components)
    apply_low_vram_to_pipeline(pipeline, LowVramOptions(decode_chunk_size=3), device="cpu")
    assert pipeline.decode.chunk_size(PARAMS, height=64, width=64) == 3
    given = PARAMS.model_copy(update={"decode_chunk_size": 2})
    assert pipeline.decode.chunk_size(given, height=64, width=64) == 2  # the request's own wins


def test_offloaded_stages_proxy_their_stage_and_take_turns(components):
    pipeline = StagedPipeline(components)
    apply_low_vram_to_pipeline(pipeline, LowVramOptions(cpu_offload=True), device="cpu")
    wrapped = {name for name, stage in pipeline.stages.items() if isinstance(stage, OffloadedStage)}
    assert wrapped == {"image_encode", "sampling", "decode"}  # video_encode holds no model
    assert {id(m) for m in stage_modules(pipeline.sampling)} == {id(components["unet"])}
    pipeline.decode.memory_budget_bytes = 123  # set through the wrapper, on the stage itself
    assert pipeline.decode.stage.memory_budget_bytes == 123
    assert pipeline.sampling.total_steps(PARAMS) == 2
    locks = {id(stage._lock) for stage in pipeline.stages.values() if isinstance(stage, OffloadedStage)}
    assert len(locks) == 1 and isinstance(pipeline.decode._lock, type(threading.Lock()))


def test_live_tensor_bytes_counts_new_storages_once_until_they_die():
    weight = torch.ones(256)  # made before: ignored
    with torch.inference_mode(), LiveTensorBytes(ignore=[weight]) as counter:
        a = weight + 1  # 1024 bytes
        view = a.view(16, 16)  # same storage: nothing more
        b = a * 2  # 2048 live
        del a
        assert counter.current == 2048  # the view keeps a's storage alive
        del view
        assert counter.current == 1024
        c = b.double()  # 2048 more: 3072 live
        del b, c
    assert (counter.current, counter.peak) == (0, 3072)


def test_measured_peaks_on_cpu_are_counted_and_shrink_with_the_options(components):
    plain = measure_stage_peaks(components, PARAMS, "cpu")
    assert set(plain) == {"image_encode", "sampling", "decode"}
    assert all(peak.method == "counted" and peak.added_bytes > 0 for peak in plain.values())
    # The decoder's uint8 frames at least: F x H x W x 3.
    assert plain["decode"].added_bytes >= 4 * 64 * 64 * 3
    frugal = measure_stage_peaks(components, PARAMS, "cpu",
                                 options=LowVramOptions(feed_forward_chunking=True, split_guidance_batch=True))
    assert frugal["sampling"].added_bytes < plain["sampling"].added_bytes
    assert frugal["decode"].added_bytes == plain["decode"].added_bytes
    apply_low_vram(components, LowVramOptions())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload moves models between CPU and a CUDA device")
def test_cuda_offload_moves_models_for_the_call_only(tiny_pipeline):
    import copy

    parts = {name: copy.deepcopy(getattr(tiny_pipeline, name)) for name in MODULES}
    for name in ("unet", "vae", "image_encoder"):
        parts[name].to("cuda")
    resident = run(parts, LowVramOptions())
    pipeline = StagedPipeline(parts)
    seen = []
    original = parts["unet"].forward
    parts["unet"].forward = lambda *a, **k: (seen.append(next(parts["unet"].parameters()).device.type), original(*a, **k))[1]
    apply_low_vram_to_pipeline(pipeline, LowVramOptions(cpu_offload=True), device="cuda")
    assert next(parts["unet"].parameters()).device.type == "cpu"
    sampled = pipeline.sampling(pipeline.image_encode(draw_sample_image(), PARAMS), PARAMS)
    assert set(seen) == {"cuda"} and next(parts["unet"].parameters()).device.type == "cpu"
    assert torch.abs(sampled.latents.cpu() - resident[0].cpu()).max().item() <= 1e-3 * resident[0].abs().max().item()


# -- the estimates and the GPU-size table ---------------------------------------------------------


def test_options_are_validated():
    with pytest.raises(ValidationError, match="extra"):
        LowVramOptions(attention_slicing=True)
    with pytest.raises(ValidationError, match="decode_chunk_size"):
        LowVramOptions(decode_chunk_size=0)
    assert all(field.description for field in LowVramOptions.model_fields.values())
    assert LowVramOptions(cpu_offload=True, decode_chunk_size=4).enabled == ("cpu_offload", "decode_chunk_size")


@pytest.mark.slow
def test_the_constants_are_what_the_meta_device_counts():
    counted = count_reference_bytes("svd")  # 14 frames, 576x1024, bf16
    assert counted["weights"] == WEIGHT_BYTES
    for key, constant in UNET_BYTES_PER_FRAME_PIXEL.items():
        assert counted["unet_bytes_per_frame_pixel"][key] == pytest.approx(constant, rel=0.01), key
    # The decoder's constant in pipelines/stages.py, which sizes its chunks, is the counted one.
    assert counted["decode_bytes_per_frame_pixel"] == pytest.approx(DECODE_ELEMENTS_PER_PIXEL * 2, rel=0.001)
    assert counted["encode_bytes_per_pixel"] == pytest.approx(ENCODE_BYTES_PER_PIXEL, rel=0.01)
    assert counted["clip_activation_bytes"] == CLIP_ACTIVATION_BYTES


@pytest.mark.parametrize("model", ["svd-xt", "svd"])
def test_bigger_gpus_need_no_more_options(model):
    rungs = [LADDER.index(profile_for_gpu_memory(total, model=model)) for total in GPU_TIERS.values()]
    assert rungs == sorted(rungs, reverse=True), rungs
    assert rungs[-1] == 0  # 80 GB: nothing
    for total in GPU_TIERS.values():
        options = profile_for_gpu_memory(total, model=model)
        peaks = estimate_stage_peaks(total, options, model=model)
        assert max(peaks["image_encode"].peak_bytes, peaks["sampling"].peak_bytes) <= usable_bytes(total)
        assert peaks["decode"].decode_chunk_size >= 1


def test_the_issues_targets_fit():
    # SVD-XT 576x1024x25 on a 24 GB card, SVD 14 frames on an 8 GB card.
    assert profile_for_gpu_memory(GPU_TIERS["24 GB"], model="svd-xt") == LowVramOptions()
    eight = profile_for_gpu_memory(GPU_TIERS["8 GB"], model="svd")
    assert eight.feed_forward_chunking and not eight.cpu_offload
    assert profile_for_gpu_memory(GPU_TIERS["8 GB"], model="svd-xt").cpu_offload
    # One full-size decode chunk on a 40 GB card: the same pixels as an 80 GB one.
    assert estimate_stage_peaks(GPU_TIERS["40 GB"], LowVramOptions())["decode"].decode_chunk_size == 25


def test_too_small_a_gpu_is_refused_with_the_estimate():
    with pytest.raises(ValueError, match=r"svd-xt at 1024x576x25 does not fit 4.0 GiB: its sampling stage needs an "
                                         r"estimated [\d.]+ GiB"):
        profile_for_gpu_memory(4 * GIB, model="svd-xt")
    with pytest.raises(ValueError, match="unknown model 'svd-2'"):
        profile_for_gpu_memory(80 * GIB, model="svd-2")


def test_larger_frames_scale_the_estimate_and_may_need_more():
    small = estimate_stage_peaks(GPU_TIERS["24 GB"], LowVramOptions())
    large = estimate_stage_peaks(GPU_TIERS["24 GB"], LowVramOptions(), height=864, width=1536)
    ratio = (864 * 1536) / (576 * 1024)
    assert large["sampling"].activation_bytes == pytest.approx(small["sampling"].activation_bytes * ratio)
    assert profile_for_gpu_memory(GPU_TIERS["24 GB"], height=864, width=1536) != LowVramOptions()
