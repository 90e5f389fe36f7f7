"""The decoder converts its frames to uint8 on its own device: the same bytes as converting the
float32 frames on the host (the path before), with the float frames still there for parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.params import GenerationParams
from pipelines.payloads import SampledLatents
from pipelines.sample_image import draw_sample_image
from pipelines.stages import DecodeStage, ImageEncodeStage, SamplingStage, frames_to_uint8

CASES = {
    "one-chunk": dict(seed=5, num_frames=4, num_inference_steps=2, width=64, height=64, decode_chunk_size=8),
    "chunked-uneven": dict(seed=6, num_frames=5, num_inference_steps=2, width=128, height=64, decode_chunk_size=2),
}


def host_uint8(float_frames: np.ndarray) -> np.ndarray:
    """The conversion the stage made on the host before: numpy, from diffusers' float frames."""
    return (float_frames * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def stages(tiny_pipeline):
    return (ImageEncodeStage(image_encoder=tiny_pipeline.image_encoder,
                             feature_extractor=tiny_pipeline.feature_extractor, vae=tiny_pipeline.vae),
            SamplingStage(unet=tiny_pipeline.unet, scheduler=tiny_pipeline.scheduler),
            DecodeStage(vae=tiny_pipeline.vae))


def sampled_for(stages, case: str) -> tuple[SampledLatents, GenerationParams]:
    encode, sample, _ = stages
    params = GenerationParams(**CASES[case]).resolved(14)
    return sample(encode(draw_sample_image(), params), params), params


@pytest.mark.parametrize("case", CASES)
def test_uint8_on_the_device_equals_the_host_conversion(stages, case):
    decode = stages[2]
    sampled, params = sampled_for(stages, case)
    expected = host_uint8(decode.decode_float(sampled, params))
    frames = decode(sampled, params).frames
    assert frames.dtype == np.uint8 and frames.flags.c_contiguous and frames.flags.writeable
    assert frames.shape == (params.num_frames, params.height, params.width, 3)
    assert np.array_equal(frames, expected)
    assert len(np.unique(frames)) > 50  # real pictures, not a constant the comparison would pass on


def test_the_conditioning_frame_still_replaces_frame_zero(stages):
    decode = stages[2]
    sampled, params = sampled_for(stages, "one-chunk")
    first = np.full((params.height, params.width, 3), 7, np.uint8)
    frames = decode(SampledLatents(latents=sampled.latents, first_frame=first), params).frames
    assert np.array_equal(frames[0], first)
    assert np.array_equal(frames[1:], host_uint8(decode.decode_float(sampled, params))[1:])


def test_rounding_matches_numpy_at_every_level_and_half_step():
    # Every uint8 level, every half-way point between two levels (round half to even in both),
    # the clamp ends and their neighbours in float32.
    levels = np.arange(256, dtype=np.float32) / 255
    halves = (np.arange(255, dtype=np.float32) + 0.5) / 255
    edges = np.array([0.0, 1.0, np.nextafter(np.float32(0), 1), np.nextafter(np.float32(1), 0)], np.float32)
    values = np.concatenate([levels, halves, np.nextafter(halves, 0), np.nextafter(halves, 1), edges])
    values = np.resize(values, (1, 3, 1, values.size // 3))  # [n, 3, H, W]
    tensor = torch.from_numpy(values.copy())
    expected = host_uint8(values.transpose(0, 2, 3, 1))
    assert np.array_equal(frames_to_uint8(tensor).numpy(), expected)


def test_chunk_size_prefers_the_request_then_the_stage_default(stages):
    decode = DecodeStage(vae=stages[2].vae)
    params = GenerationParams(seed=1, num_frames=5, width=64, height=64).resolved(14)
    assert decode.chunk_size(params, height=64, width=64) == 8  # CPU: DEFAULT_DECODE_CHUNK
    decode.default_chunk_size = 3
    assert decode.chunk_size(params, height=64, width=64) == 3
    given = params.model_copy(update={"decode_chunk_size": 2})
    assert decode.chunk_size(given, height=64, width=64) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-memory copy needs a CUDA device")
def test_cuda_decode_through_pinned_memory_equals_the_host_conversion(tiny_pipeline, stages):
    import copy

    sampled, params = sampled_for(stages, "chunked-uneven")
    decode = DecodeStage(vae=copy.deepcopy(tiny_pipeline.vae).to("cuda"))
    expected = host_uint8(decode.decode_float(sampled, params))
    assert np.array_equal(decode(sampled, params).frames, expected)
