"""The models a run builds: the full SVD-XT architecture with random weights (or the tiny
pipeline), with the attention, memory-format and compile settings of the options."""

from __future__ import annotations

from types import SimpleNamespace

# -- models ----------------------------------------------------------------------------------------


def build_svd_xt_models(device, dtype, *, attention: str, with_clip: bool = True) -> dict:
    """The full SVD-XT architecture with random weights, built on ``device`` and cast to ``dtype``.

    Each model is constructed (in fp32, as diffusers and transformers initialise weights) directly
    on the device and cast before the next one is built, so the fp32 copy of one model at most
    exists at a time (6.1 GB for the U-Net)."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    def finish(module):
        # .to(device) as well: a few parameters (the U-Net's temporal mix_factor) are created with the
        # legacy torch.Tensor constructor, which ignores the default device.
        return module.to(device=device, dtype=dtype).eval().requires_grad_(False)

    models = {}
    with torch.device(device):
        models["unet"] = finish(UNetSpatioTemporalConditionModel())  # class defaults = SVD-XT's config
        models["vae"] = finish(AutoencoderKLTemporalDecoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
            scaling_factor=0.18215,
            force_upcast=True,
        ))
        if with_clip:
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            config = CLIPVisionConfig(  # ViT-H/14, as in SVD's image_encoder/config.json
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=16,
                patch_size=14,
                image_size=224,
                projection_dim=1024,
                hidden_act="gelu",
                attn_implementation="sdpa" if attention == "sdpa" else "eager",
            )
            models["image_encoder"] = finish(CLIPVisionModelWithProjection(config))
    return models


def build_components(args, device: str, dtype):
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPImageProcessor

    from pipelines.tiny import build_tiny_pipeline, svd_xt_scheduler_config

    if args.tiny:
        pipe = build_tiny_pipeline(seed=0)
        components = SimpleNamespace(
            unet=pipe.unet, vae=pipe.vae, image_encoder=pipe.image_encoder,
            feature_extractor=pipe.feature_extractor, scheduler=pipe.scheduler,
        )
        for name in ("unet", "vae", "image_encoder"):
            setattr(components, name, getattr(components, name).to(device=device, dtype=dtype).requires_grad_(False))
        if args.attention == "default":
            components.image_encoder.set_attn_implementation("eager")
    else:
        models = build_svd_xt_models(device, dtype, attention=args.attention)
        components = SimpleNamespace(
            **models,
            feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
            scheduler=EulerDiscreteScheduler.from_config(svd_xt_scheduler_config()),
        )
    if args.attention == "default":
        components.unet.set_default_attn_processor()
        components.vae.set_default_attn_processor()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        components.unet.set_attn_processor(AttnProcessor2_0())
        components.vae.set_attn_processor(AttnProcessor2_0())
    if args.channels_last:
        from pipelines.acceleration.compile import to_channels_last  # the serving path's, one definition

        to_channels_last(components.unet)
        to_channels_last(components.vae)
    if args.compile:
        components.unet.compile()  # in place: the module keeps its type, config and attributes
    return components
