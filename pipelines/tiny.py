"""A tiny random-weight SVD pipeline built from the real diffusers and transformers classes.

It exercises every code path of the real model (CLIP vision tower at 224x224, a four-level
temporal-decoder VAE with 8x downsampling, the spatio-temporal U-Net with cross-attention and
added time ids, and SVD-XT's own Euler scheduler config) while running 14 frames at 64x64 with
4 steps in well under a second on a CPU. It is generated on demand and never committed.

Why these sizes: the pipeline always resizes the conditioning image to 224x224 for CLIP, so the
tiny CLIP keeps ``image_size=224`` (with 32-pixel patches it is still only 49 tokens); and a VAE
with fewer than four levels downsamples less than 8x, which makes the U-Net's attention run over
far larger latents (about 100x slower on CPU with two levels).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

TINY_NUM_FRAMES = 14


def svd_xt_scheduler_config() -> dict:
    """The EulerDiscreteScheduler config shipped with SVD-XT (v-prediction, Karras sigmas)."""
    text = resources.files("pipelines").joinpath("configs/svd_xt_scheduler_config.json").read_text()
    return json.loads(text)


def build_tiny_pipeline(seed: int = 0):
    """Return a ``StableVideoDiffusionPipeline`` with small random weights (fp32, CPU)."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    embed_dim = 32
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=3 * 8,
        layers_per_block=1,
        cross_attention_dim=embed_dim,
        num_attention_heads=(2, 4),
        num_frames=TINY_NUM_FRAMES,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=embed_dim,
            projection_dim=embed_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            image_size=224,
            patch_size=32,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    scheduler = EulerDiscreteScheduler.from_config(svd_xt_scheduler_config())
    pipe = StableVideoDiffusionPipeline(
        vae=vae.eval(),
        image_encoder=image_encoder.eval(),
        unet=unet.eval(),
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    return pipe


def write_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline in diffusers' ``save_pretrained`` layout (safetensors) and return the path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
