"""Accounting from shapes: the bytes crossing each stage boundary, and the FLOPs of the U-Net
and the decode (the linear rule used for MFU, and the exact meta-device count)."""

from __future__ import annotations

import re

from .common import DTYPE_BYTES, STAGES
from .models import build_svd_xt_models
from .reference import DECODE_TFLOP_REF, PEAK_TFLOPS, REF_FRAMES, REF_HEIGHT, REF_WIDTH, UNET_TFLOP_PER_GUIDED_STEP

# -- boundary payloads ---------------------------------------------------------------------------


def generator_state_bytes() -> int:
    import torch

    return torch.Generator("cpu").get_state().numel()  # uint8 tensor: one byte per element


def boundary_sizes(frames: int, height: int, width: int, dtype: str, *, embed_dim: int = 1024,
                   latent_channels: int = 4, vae_scale: int = 8, route: tuple[str, ...] = STAGES,
                   keeps_first_frame: bool = False, segments: int = 1) -> dict:
    """What crosses each boundary of ``route``, from the shapes the stages produce (pipelines/stages.py).

    text_to_image hands over the first frame (RGB uint8 at the clip's size). When a pass must open
    on its conditioning image exactly (text-to-video, long clips: ``keeps_conditioning_frame``)
    that image also rides with the encoded image and the latents to the decoder. The encode,
    sampling and decode payloads are per segment; the video encoder receives every segment."""
    item = DTYPE_BYTES[dtype]
    lh, lw = height // vae_scale, width // vae_scale

    def tensor(name, shape, itemsize, kind):
        numel = 1
        for dim in shape:
            numel *= dim
        return {"name": name, "shape": list(shape), "dtype": kind, "bytes": numel * itemsize}

    encode = [
        tensor("image_embeddings", (1, 1, embed_dim), item, dtype),
        tensor("image_latents", (1, latent_channels, lh, lw), item, dtype),
        tensor("generator_state", (generator_state_bytes(),), 1, "uint8"),
    ]
    sample = [tensor("latents", (1, frames, latent_channels, lh, lw), item, dtype)]
    if keeps_first_frame:
        encode.append(tensor("first_frame", (height, width, 3), 1, "uint8"))
        sample.append(tensor("first_frame", (height, width, 3), 1, "uint8"))
    decode = [tensor("frames", (frames, height, width, 3), 1, "uint8")]
    if segments > 1:
        decode = [tensor(f"frames x {segments} segments", (segments, frames, height, width, 3), 1, "uint8")]
    produced = {"text_to_image": [tensor("image", (height, width, 3), 1, "uint8")],
                "image_encode": encode, "sampling": sample, "decode": decode}
    parts = {f"{a}->{b}": produced.get(a, []) for a, b in zip(route, route[1:])}
    return {
        "shape": {"frames": frames, "height": height, "width": width, "dtype": dtype},
        "parts": parts,
        "bytes": {name: sum(t["bytes"] for t in tensors) for name, tensors in parts.items()},
    }


# -- FLOPs -----------------------------------------------------------------------------------------


def flop_estimates(frames: int, height: int, width: int, steps: int, guided: bool) -> dict:
    latent_scale = (frames * height * width) / (REF_FRAMES * REF_HEIGHT * REF_WIDTH)
    per_step = UNET_TFLOP_PER_GUIDED_STEP * latent_scale * (1.0 if guided else 0.5)
    return {
        "unet_tflop_per_step": per_step,
        "unet_tflop": per_step * steps,
        "decode_tflop": DECODE_TFLOP_REF * latent_scale,
        "rule": "linear in frames*height*width from 159.9 TFLOP/guided step and 173.6 TFLOP/decode at 25x576x1024",
    }


def count_flops_meta(frames: int, height: int, width: int, chunk: int) -> dict:
    """Exact FLOPs of one guided U-Net step and of the whole decode, on the meta device (no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    components = build_svd_xt_models(torch.device("meta"), torch.bfloat16, attention="sdpa", with_clip=False)
    unet, vae = components["unet"], components["vae"]
    lh, lw = height // 8, width // 8
    with torch.device("meta"):
        sample = torch.empty(2, frames, 8, lh, lw, dtype=torch.bfloat16)
        embeddings = torch.empty(2, 1, 1024, dtype=torch.bfloat16)
        time_ids = torch.empty(2, 3, dtype=torch.bfloat16)
        with FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor(1.0), encoder_hidden_states=embeddings, added_time_ids=time_ids)
        unet_flops = counter.get_total_flops()
        decode_flops = 0
        for start in range(0, frames, chunk):
            n = min(chunk, frames - start)
            with FlopCounterMode(display=False) as counter:
                vae.decode(torch.empty(n, 4, lh, lw, dtype=torch.bfloat16), num_frames=n)
            decode_flops += counter.get_total_flops()
    return {"unet_tflop_per_guided_step": unet_flops / 1e12, "decode_tflop": decode_flops / 1e12}


def lookup_peak(device_name: str, override: float | None) -> tuple[str | None, float | None]:
    if override is not None:
        return "--peak-tflops", override
    for pattern, label, peak in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, peak
    return None, None
