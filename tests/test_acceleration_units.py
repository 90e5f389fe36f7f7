"""The acceleration options, FP8 linears and quality metrics, without compiling anything."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipelines.acceleration.cache import CompileCache, cache_key, key_name, network_signature
from pipelines.acceleration.compile import accelerate_stage, stage_network
from pipelines.acceleration.fp8 import Float8Linear, fp8_supported, quantize_linears_fp8
from pipelines.acceleration.options import StageAcceleration, WarmupShape
from pipelines.acceleration.quality import psnr, ssim
from pipelines.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline(seed=0)


@pytest.mark.parametrize("fields, message", [
    ({"scope": "regional"}, "scope 'regional' needs a compile mode"),
    ({"shape_policy": "dynamic"}, "shape_policy 'dynamic' needs a compile mode"),
    ({"cache_dir": "/tmp/x"}, "cache_dir is only used when compile"),
    ({"compile": "default", "cache_dir": " "}, "cache_dir must not be empty"),
    ({"compile": "fastest"}, "Input should be"),
    ({"compile": "default", "bogus": 1}, "Extra inputs are not permitted"),
])
def test_options_reject_inconsistent_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        StageAcceleration(**fields)


def test_warmup_shape_bounds():
    assert WarmupShape(width=1024, height=576, num_frames=25).label() == "1024x576x25"
    assert WarmupShape(width=64, height=64, num_frames=4, decode_chunk_size=2).label() == "64x64x4/chunk 2"
    with pytest.raises(ValidationError, match="multiple of 8"):
        WarmupShape(width=1020, height=576, num_frames=25)


def test_stage_network_names_each_stage(tiny):
    components = dict(unet=tiny.unet, vae=tiny.vae, image_encoder=tiny.image_encoder)
    assert stage_network("sampling", components) is tiny.unet
    assert stage_network("decode", components) is tiny.vae.decoder
    with pytest.raises(ValueError, match="stage 'video_encode' has no network"):
        stage_network("video_encode", components)
    with pytest.raises(ValueError, match="needs component 'unet'"):
        stage_network("sampling", {"vae": tiny.vae})


def test_fp8_only_on_the_unet(tiny):
    with pytest.raises(ValueError, match="fp8 applies to the sampling stage's U-Net only"):
        accelerate_stage("decode", {"vae": tiny.vae}, StageAcceleration(fp8=True))


def test_float8_linear_is_close_to_the_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(3, 7, 256)
    exact = linear(x)
    approx = Float8Linear(linear)(x)
    assert approx.shape == exact.shape and approx.dtype == exact.dtype
    relative = (approx - exact).norm() / exact.norm()
    # e4m3 keeps 3 mantissa bits: per-element error up to 1/16, averaging to a few percent.
    assert 0 < relative < 0.06, relative


def test_quantize_replaces_only_transformer_linears():
    unet = build_tiny_pipeline(seed=0).unet
    linears_before = {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    replaced = quantize_linears_fp8(unet)
    fp8 = {name for name, m in unet.named_modules() if isinstance(m, Float8Linear)}
    assert replaced == len(fp8) > 0
    assert all("transformer_blocks" in name for name in fp8)
    assert any("time_embedding" in name for name in linears_before - fp8)  # the 2-row linears stay


def test_fp8_device_support():
    assert fp8_supported(torch.device("cpu"))
    assert not fp8_supported(torch.device("meta"))


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, size=(3, 32, 48, 3), dtype=np.uint8)
    assert psnr(clip, clip) == math.inf and ssim(clip, clip) == pytest.approx(1.0)
    noisy = np.clip(clip.astype(int) + rng.integers(-8, 9, size=clip.shape), 0, 255).astype(np.uint8)
    assert 25 < psnr(clip, noisy) < 40
    assert 0.5 < ssim(clip, noisy) < 1.0
    assert ssim(clip, 255 - clip) < ssim(clip, noisy)
    with pytest.raises(ValueError, match="one shape"):
        psnr(clip, clip[:2])


def test_cache_key_is_architecture_not_weights(tiny):
    other = build_tiny_pipeline(seed=1).unet  # same architecture, other weights
    options = StageAcceleration(compile="default")
    shapes = [WarmupShape(width=64, height=64, num_frames=4)]
    key = cache_key(stage="sampling", network=tiny.unet, options=options, shapes=shapes)
    assert key == cache_key(stage="sampling", network=other, options=options, shapes=shapes)
    assert network_signature(tiny.unet) != network_signature(tiny.vae.decoder)
    changed = cache_key(stage="sampling", network=tiny.unet, options=options,
                        shapes=[WarmupShape(width=64, height=64, num_frames=6)])
    assert key_name(changed) != key_name(key)
    assert key["device"].startswith("cpu:") and key["torch"] == torch.__version__


def test_cache_round_trip_on_disk_and_s3(tmp_path, s3_bucket, moto_s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3_endpoint)  # the cache's own client, as a replica makes it
    _client, bucket = s3_bucket
    key = {"stage": "sampling", "x": 1}
    for location in (str(tmp_path / "cache"), f"s3://{bucket}/compile"):
        cache = CompileCache(location)
        assert cache.load(key) is False and cache.entries() == []
        cache._write(key_name(key) + ".megacache", b"not a mega-cache blob")
        assert cache.load(key) is False  # unusable blobs are ignored, never fatal
        assert cache.entries() == [key_name(key)]


def test_a_compiled_decoder_must_warm_up_for_a_chunk():
    from serve.config import AppConfig

    compiled = {"acceleration": {"compile": "default"}}
    with pytest.raises(ValidationError, match="a compiled decoder needs warmup_shapes with decode_chunk_size"):
        AppConfig.model_validate({"stages": {"decoder": compiled}})
    with pytest.raises(ValidationError, match="a compiled decoder needs warmup_shapes with decode_chunk_size"):
        AppConfig.model_validate({"stages": {"decoder": {**compiled, "warmup_shapes": [
            {"width": 1024, "height": 576, "num_frames": 25}]}}})
    config = AppConfig.model_validate({"stages": {"decoder": {**compiled, "warmup_shapes": [
        {"width": 1024, "height": 576, "num_frames": 25, "decode_chunk_size": 8}]}}})
    assert config.stages.decoder.warmup_shapes[0].decode_chunk_size == 8
    # What build_app hands every replica (a full dump) validates again.
    assert AppConfig.model_validate(config.model_dump()).stages.decoder == config.stages.decoder


def test_a_pinned_attention_backend_is_process_wide():
    from pipelines.acceleration.compile import pin_attention_backend

    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    try:
        pin_attention_backend(StageAcceleration(attention="math"))
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        flash, math_, efficient, cudnn = before
        torch.backends.cuda.enable_flash_sdp(flash)
        torch.backends.cuda.enable_math_sdp(math_)
        torch.backends.cuda.enable_mem_efficient_sdp(efficient)
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
