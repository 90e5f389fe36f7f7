"""Which low-VRAM options (:class:`~.lowvram.LowVramOptions`) a GPU size needs for SVD and
SVD-XT, from the peak memory of each stage, counted on the ``meta`` device.

The counts (:func:`count_reference_bytes`, :mod:`.memory_count`) run the full architectures at
576x1024 in bf16; every stage's activations are linear in frames x pixels (the U-Net's attention
is counted as fused SDPA, which holds no score matrix), so they are kept as bytes per frame-pixel
and scaled. ``tests/test_lowvram.py`` recounts them, so they cannot drift from diffusers.

A stage's peak in one process (``StagedPipeline``) is its models' weights, plus the other
stages' weights unless ``cpu_offload`` moved them off the GPU, plus its activations. It must fit
in ``(total - CUDA_CONTEXT_BYTES) * ALLOCATOR_HEADROOM``: the CUDA context is outside
``max_memory_allocated``, and the headroom covers what the count leaves out (allocator rounding
and fragmentation, cuDNN and cuBLAS workspaces). :func:`profile_for_gpu_memory` takes the first
rung of :data:`LADDER` (cheapest first) where the image encode and the sampler fit and the
decoder fits one frame: the decoder sizes its own chunk from what its stage leaves
(:class:`~pipelines.stages.DecodeStage`: ``DECODE_MEMORY_SHARE`` of the memory not held), so it
never decides the rung unless a single frame is too much.

``python -m pipelines.acceleration.lowvram_profiles`` prints the table of docs/pipeline.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.stages import DECODE_ELEMENTS_PER_PIXEL, auto_decode_chunk_size

from .lowvram import LowVramOptions
from .memory_count import SVD_MODELS, count_peak_bytes, module_bytes, module_tensors, svd_architecture

GIB = 2**30
#: Outside max_memory_allocated: the CUDA context, cuBLAS handles (300-500 MiB on recent GPUs).
CUDA_CONTEXT_BYTES = GIB // 2
#: Share of the rest the counted bytes may use (the decoder keeps the same share, DECODE_MEMORY_SHARE).
ALLOCATOR_HEADROOM = 0.8

# Counted in bf16 at 576x1024 (count_reference_bytes(); the larger of 14 and 25 frames where
# they differ by the inputs' few MiB). fp16 is the same; fp32 doubles everything.
#: Weights of each model.
WEIGHT_BYTES = {"unet": 3_049_246_164, "vae": 195_485_694, "image_encoder": 1_264_155_656}
#: One guided U-Net call (a batch of two), per frame and output pixel, by
#: (feed_forward_chunking, split_guidance_batch). Without guidance the batch is one: (x, True).
UNET_BYTES_PER_FRAME_PIXEL = {(False, False): 566, (False, True): 271, (True, False): 326, (True, True): 151}
#: The VAE decoder, per frame of a chunk and output pixel (the decoder's own constant, 2 bytes).
DECODE_BYTES_PER_FRAME_PIXEL = DECODE_ELEMENTS_PER_PIXEL * 2
#: The image encode: VAE encoder on one image, per pixel, and CLIP at 224x224.
ENCODE_BYTES_PER_PIXEL = 1286
CLIP_ACTIVATION_BYTES = 8_196_096

#: Cheapest first: feed-forward chunking costs little; the split batch a few percent of U-Net
#: throughput on a small GPU; offload two model transfers per job.
LADDER = (
    LowVramOptions(),
    LowVramOptions(feed_forward_chunking=True),
    LowVramOptions(feed_forward_chunking=True, split_guidance_batch=True),
    LowVramOptions(feed_forward_chunking=True, split_guidance_batch=True, cpu_offload=True),
)
#: GPU sizes of the table, as torch reports their total memory (the lower of common cards).
GPU_TIERS = {"8 GB": 7.6 * GIB, "12 GB": 11.6 * GIB, "16 GB": 14.6 * GIB, "24 GB": 22.0 * GIB,
             "40 GB": 39.4 * GIB, "80 GB": 79.1 * GIB}
_STAGE_MODELS = {"image_encode": ("image_encoder", "vae"), "sampling": ("unet",), "decode": ("vae",)}


@dataclass(frozen=True)
class StageEstimate:
    """A stage's estimated peak: its weights, the other stages' weights still on the GPU, and
    its activations (``decode_chunk_size`` frames per decoder call for the decoder)."""

    stage: str
    weight_bytes: int
    other_weight_bytes: int
    activation_bytes: int
    decode_chunk_size: int | None = None

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.other_weight_bytes + self.activation_bytes


def usable_bytes(total_bytes: float) -> float:
    """What the counted peaks may reach on a GPU of ``total_bytes``."""
    return max(0.0, (total_bytes - CUDA_CONTEXT_BYTES) * ALLOCATOR_HEADROOM)


def estimate_stage_peaks(total_bytes: float, options: LowVramOptions, *, model: str = "svd-xt", height: int = 576,
                         width: int = 1024, num_frames: int | None = None, guided: bool = True,
                         dtype: torch.dtype = torch.bfloat16) -> dict[str, StageEstimate]:
    """Each GPU stage's :class:`StageEstimate` on a GPU of ``total_bytes`` with ``options``, in
    one process. The decoder's chunk is ``options.decode_chunk_size``, else what
    :func:`~pipelines.stages.auto_decode_chunk_size` gives for the memory its stage leaves."""
    if model not in SVD_MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(SVD_MODELS)}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    scale = torch.finfo(dtype).bits // 16
    frames = num_frames or SVD_MODELS[model]
    pixels = height * width
    weights = {name: size * scale for name, size in WEIGHT_BYTES.items()}

    def others(stage: str) -> int:
        if options.cpu_offload:
            return 0
        return sum(size for name, size in weights.items() if name not in _STAGE_MODELS[stage])

    def own(stage: str) -> int:
        return sum(weights[name] for name in _STAGE_MODELS[stage])

    split = options.split_guidance_batch or not guided
    estimates = {
        "image_encode": StageEstimate("image_encode", own("image_encode"), others("image_encode"),
                                      (CLIP_ACTIVATION_BYTES + ENCODE_BYTES_PER_PIXEL * pixels) * scale),
        "sampling": StageEstimate("sampling", own("sampling"), others("sampling"),
                                  UNET_BYTES_PER_FRAME_PIXEL[(options.feed_forward_chunking, split)]
                                  * frames * pixels * scale),
    }
    held = own("decode") + others("decode")
    chunk = options.decode_chunk_size or auto_decode_chunk_size(
        free_bytes=max(0, int(total_bytes) - held), height=height, width=width, bytes_per_element=2 * scale)
    chunk = min(chunk, frames)
    estimates["decode"] = StageEstimate("decode", own("decode"), others("decode"),
                                        decode_activation_bytes(chunk, frames=frames, pixels=pixels, scale=scale), chunk)
    return estimates


def decode_activation_bytes(chunk: int, *, frames: int, pixels: int, scale: int = 1) -> int:
    """The decoder's chunk, then its float32 frames and the uint8 clip they go into."""
    return DECODE_BYTES_PER_FRAME_PIXEL * scale * chunk * pixels + (12 * chunk + 3 * frames) * pixels


def profile_for_gpu_memory(total_bytes: float, *, model: str = "svd-xt", height: int = 576, width: int = 1024,
                           num_frames: int | None = None, dtype: torch.dtype = torch.bfloat16) -> LowVramOptions:
    """The cheapest :data:`LADDER` rung whose every stage fits a GPU of ``total_bytes``
    (``torch.cuda.get_device_properties(0).total_memory``) at this size, in one process.

    Raises:
        ValueError: not even the last rung fits (the message gives the estimate).
    """
    limit = usable_bytes(total_bytes)
    frames = num_frames or SVD_MODELS.get(model, 0)
    for options in LADDER:
        peaks = estimate_stage_peaks(total_bytes, options, model=model, height=height, width=width,
                                     num_frames=num_frames, dtype=dtype)
        # The decoder sizes its own chunk from what is left: it needs one frame to fit.
        decode = peaks["decode"]
        one_frame = decode.weight_bytes + decode.other_weight_bytes + decode_activation_bytes(
            1, frames=frames, pixels=height * width, scale=torch.finfo(dtype).bits // 16)
        needed = {"image_encode": peaks["image_encode"].peak_bytes, "sampling": peaks["sampling"].peak_bytes,
                  "decode": one_frame}
        if max(needed.values()) <= limit:
            return options
    worst = max(needed, key=needed.get)
    raise ValueError(
        f"{model} at {width}x{height}x{frames} does not fit {total_bytes / GIB:.1f} GiB: its {worst} stage needs an "
        f"estimated {needed[worst] / GIB:.1f} GiB with every low-VRAM option "
        f"({limit / GIB:.1f} GiB usable)"
    )


# -- the counts behind the constants ---------------------------------------------------------------


def count_reference_bytes(model: str = "svd-xt", *, num_frames: int | None = None, height: int = 576,
                          width: int = 1024) -> dict[str, object]:
    """Count, on the meta device, what the constants above hold (bf16; about 15 s on a CPU)."""
    from pipelines.stages import frames_to_uint8

    from .lowvram import apply_low_vram

    models = svd_architecture(model, device="meta", dtype=torch.bfloat16)
    unet, vae, clip = models["unet"], models["vae"], models["image_encoder"]
    frames = num_frames or SVD_MODELS[model]
    lh, lw, pixels = height // 8, width // 8, height * width

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    def unet_call():
        return unet(meta(2, frames, 8, lh, lw), torch.tensor(1.0), encoder_hidden_states=meta(2, 1, 1024),
                    added_time_ids=meta(2, 3), return_dict=False)[0]

    per_frame_pixel = {}
    for chunking in (False, True):
        for split in (False, True):
            apply_low_vram({"unet": unet}, LowVramOptions(feed_forward_chunking=chunking, split_guidance_batch=split))
            counted = count_peak_bytes(unet_call, ignore=module_tensors(unet))
            per_frame_pixel[(chunking, split)] = counted / (frames * pixels)
    apply_low_vram({"unet": unet}, LowVramOptions())

    def decode_one_frame():
        return frames_to_uint8(((vae.decode(meta(1, 4, lh, lw), num_frames=1).sample.float()) / 2 + 0.5).clamp(0, 1))

    return {
        "weights": {name: module_bytes(module) for name, module in models.items()},
        "unet_bytes_per_frame_pixel": per_frame_pixel,
        "decode_bytes_per_frame_pixel": count_peak_bytes(decode_one_frame, ignore=module_tensors(vae)) / pixels,
        "encode_bytes_per_pixel": count_peak_bytes(lambda: vae.encode(meta(1, 3, height, width)).latent_dist.mode(),
                                                   ignore=module_tensors(vae)) / pixels,
        "clip_activation_bytes": count_peak_bytes(lambda: clip(meta(1, 3, 224, 224)).image_embeds,
                                                  ignore=module_tensors(clip)),
    }


def profile_table() -> list[dict[str, object]]:
    """The rows of docs/pipeline.md's table: each model on each :data:`GPU_TIERS` size."""
    rows = []
    for model in SVD_MODELS:
        for tier, total in GPU_TIERS.items():
            try:
                options = profile_for_gpu_memory(total, model=model)
            except ValueError as error:
                rows.append({"model": model, "gpu": tier, "options": None, "error": str(error)})
                continue
            peaks = estimate_stage_peaks(total, options, model=model)
            rows.append({"model": model, "gpu": tier, "options": options, "peaks": peaks})
    return rows


def _main() -> None:
    print("| model | GPU (total as torch sees it) | options | encode | sampling | decode (chunk) |")
    print("|---|---|---|---|---|---|")
    for row in profile_table():
        total = GPU_TIERS[row["gpu"]] / GIB
        if row["options"] is None:
            print(f"| {row['model']} | {row['gpu']} ({total:.1f} GiB) | does not fit | | | |")
            continue
        peaks = row["peaks"]
        names = ", ".join(row["options"].enabled) or "none"
        decode = peaks["decode"]
        print(f"| {row['model']} | {row['gpu']} ({total:.1f} GiB) | {names} | "
              f"{peaks['image_encode'].peak_bytes / GIB:.1f} | {peaks['sampling'].peak_bytes / GIB:.1f} | "
              f"{decode.peak_bytes / GIB:.1f} ({decode.decode_chunk_size}) |")


if __name__ == "__main__":
    _main()
