#!/usr/bin/env python
"""Benchmark the staged SVD pipeline: seconds per stage, U-Net TFLOP/s and MFU, peak GPU memory.

Modes
    (default)       The full SVD-XT architecture with random weights (no download: the speed of a
                    network does not depend on its weight values), built directly on the GPU in
                    bf16/fp16, generating one 576x1024, 25-frame, 25-step clip through the stages
                    of its route in ``pipelines.staged.StagedPipeline`` (image-to-video: image
                    encode, sampling, decode, video encode). Needs a CUDA GPU; on a CPU it refuses
                    (full size would take hours) unless ``--allow-cpu`` is given.
    --tiny          ``pipelines.tiny.build_tiny_pipeline()`` at 64x64, 14 frames, 4 steps on CPU
                    (fp32): the CI smoke mode. ``--tiny --device cuda`` checks the GPU code path
                    in seconds.
    --boundaries    No model is built or run: the bytes that cross each stage boundary for the
                    given shape (default SVD-XT 576x1024x25, fp16), from the tensor shapes.
    --count-flops   No model is run: counts the FLOPs of one guided U-Net step and of the VAE
                    decode at the given shape exactly, with the full SVD-XT modules on PyTorch's
                    ``meta`` device (``torch.utils.flop_counter``), and compares them with the
                    linear scaling used for MFU.
    --retime        No model is run: ``pipelines.interpolate.retime`` with blend and with mci on
                    synthetic frames (default 49 frames at 1024x576 spanning 8 s -> 24 fps: the
                    two-segment SVD-XT clip), then the H.264 encode of the result.

Added to a run (default or --tiny; both together too)
    --text-to-video The text-to-image model is built as well (``--tiny``: the tiny SDXL of
                    ``pipelines.tiny_t2i``; full size: SDXL base 1.0's architecture with random
                    weights, 1024x576, 30 steps, guidance 5.0) and the prompt-only route
                    (text_to_image, then the video stages) is timed next to image-to-video.
    --duration S    A long clip is timed next to the one-pass clip: S seconds in segments of
                    ``--frames`` (SVD-XT, fps 7, 8 s: 2 segments, 49 frames; ``--output-fps 24``:
                    193 frames), with per-stage seconds summed over segments, the video-encode
                    stage split into retiming, H.264 encoding and the rest, and blend vs mci
                    retiming of its own frames. With --text-to-video the long clip is text-to-video.

Timing
    One warm-up generation per route (same shapes, at most 2 steps) runs first, so CUDA context
    creation, cuDNN autotuning and ``--compile`` are not counted; then ``--repeat`` measured rounds,
    each running every variant once (interleaved, so a change in load hits all alike), reporting
    the median per stage. Each stage is followed by ``torch.cuda.synchronize()``, so
    asynchronous GPU work is charged to the stage that queued it (StagedPipeline's own timings
    do not synchronise). Random weights can produce NaN frames; that changes nothing in the
    timing of the GPU stages, but makes the video-encode figure unrepresentative of real clips.

FLOPs and MFU
    One classifier-free-guided U-Net step (batch 2) at SVD-XT's 25x72x128 latents is 159.9 TFLOP
    and decoding 25 frames at 576x1024 is 173.6 TFLOP (both counted with ``--count-flops``).
    Other shapes are scaled linearly in frames x height x width (attention makes the true cost
    slightly super-linear; ``--count-flops`` gives exact numbers). MFU = achieved U-Net TFLOP/s
    divided by the GPU's dense bf16/fp16 peak: H100 SXM 989, H100 PCIe 756, H200 989, A100 312,
    L4 121; any other GPU needs ``--peak-tflops``.

Examples::

    python benchmarks/bench_pipeline.py --tiny --repeat 5 --json out/bench-tiny.json
    python benchmarks/bench_pipeline.py --tiny --text-to-video --duration 4 --output-fps 24
    python benchmarks/bench_pipeline.py --boundaries
    python benchmarks/bench_pipeline.py --retime                 # 49 x 1024x576 -> 193 frames
    python benchmarks/bench_pipeline.py                       # on a GPU: full SVD-XT, bf16
    python benchmarks/bench_pipeline.py --text-to-video --duration 8 --output-fps 24 --json out/bench-t2v.json
    python benchmarks/bench_pipeline.py --dtype fp16 --channels-last --compile --json out/bench.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from any directory
    sys.path.insert(0, str(REPO_ROOT))

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_text_to_video as t2v  # noqa: E402  (this directory; light: no torch)
from pipelines.params import GenerationParams  # noqa: E402  (light: pydantic only)
from pipelines.registry import STAGES as REGISTRY  # noqa: E402  (light: no torch)

PROG = "bench_pipeline.py"

# -- reference figures ---------------------------------------------------------------------------

#: SVD-XT's shape: 25 frames at 576x1024, i.e. latents 25 x 4 x 72 x 128.
REF_FRAMES, REF_HEIGHT, REF_WIDTH = 25, 576, 1024
#: FLOPs of one classifier-free-guided U-Net step (batch 2) at 25x72x128 latents (FlopCounterMode).
UNET_TFLOP_PER_GUIDED_STEP = 159.9
#: FLOPs of the temporal VAE decoder for 25 frames at 576x1024 (FlopCounterMode: 173.57).
DECODE_TFLOP_REF = 173.6

#: Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, matched against the device name.
PEAK_TFLOPS = (
    (r"H100.*PCIE", "H100 PCIe", 756.0),
    (r"H100.*NVL", None, None),  # a different part: ask for --peak-tflops rather than guess
    (r"H100", "H100 SXM", 989.0),
    (r"H200", "H200", 989.0),
    (r"A100", "A100", 312.0),
    (r"\bL4\b", "L4", 121.0),
)

#: Published figures for comparison. Not measured by this script.
PUBLISHED_ANCHORS = (
    {
        "what": "Stability AI TensorRT SVD-XT 1.1, 25 frames, 25 steps, H100 80GB PCIe",
        "seconds_per_video": 22.6,
        "stages": {"unet_x25": 19.1, "vae_decode": 3.4, "clip": 0.09, "vae_encode": 0.05},
        "source": "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt-1-1-tensorrt",
    },
    {
        "what": "Stability AI TensorRT SVD-XT 1.1, 25 frames, 25 steps, A100 80GB SXM",
        "seconds_per_video": 32.2,
        "stages": {"unet_x25": 27.5, "vae_decode": 4.5},
        "source": "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt-1-1-tensorrt",
    },
    {
        "what": "eager PyTorch (diffusers) SVD-XT, 25 frames, 25 steps, A100",
        "seconds_per_video": 51.0,
        "stages": {},
        "source": "figure quoted in issue #2 (approximate; not re-checked here)",
    },
)

TINY_DEFAULTS = {"frames": 14, "height": 64, "width": 64, "steps": 4, "t2i_steps": 4, "dtype": "fp32",
                 "device": "cpu"}
FULL_DEFAULTS = {"frames": REF_FRAMES, "height": REF_HEIGHT, "width": REF_WIDTH, "steps": 25, "t2i_steps": 30,
                 "dtype": "bf16"}
BOUNDARY_DEFAULTS = {"frames": REF_FRAMES, "height": REF_HEIGHT, "width": REF_WIDTH, "dtype": "fp16"}
#: --retime: the two-segment SVD-XT clip, 49 frames at 1024x576 spanning 8 s, to 24 fps (193 frames).
RETIME_DEFAULTS = {"frames": 49, "height": REF_HEIGHT, "width": REF_WIDTH, "duration": 8.0, "output_fps": 24}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LABEL = t2v.LABELS
DEFAULT_PROMPT = "a red fox running through fresh snow in a pine forest at sunrise, cinematic, detailed"


def route_names(params: GenerationParams) -> tuple[str, ...]:
    """The stages a job with these parameters passes through (the registry's route), in order."""
    return tuple(spec.name for spec in REGISTRY.route(params))


#: Image-to-video's route (image_encode, sampling, decode, video_encode) and text-to-video's
#: (text_to_image first). A job runs only the stages of its route: text_to_image is not timed for
#: an image-to-video run.
STAGES = route_names(GenerationParams())
T2V_STAGES = route_names(GenerationParams(prompt="x"))
BOUNDARIES = tuple(f"{a}->{b}" for a, b in zip(STAGES, STAGES[1:]))


class BenchError(Exception):
    """An expected failure: printed as one line, exit status 2."""


# -- arguments -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmark the staged SVD pipeline (see the module docstring for details).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true",
                      help="tiny random-weight model at 64x64, 14 frames, 4 steps on CPU (CI smoke mode)")
    mode.add_argument("--boundaries", action="store_true",
                      help="print the bytes crossing each stage boundary for the shape, without running models")
    mode.add_argument("--count-flops", action="store_true",
                      help="count U-Net and decode FLOPs exactly on the meta device, without running models")
    mode.add_argument("--retime", action="store_true",
                      help="time frame retiming (blend, mci) and the H.264 encode on synthetic frames, without "
                           "models (default: 49 frames 1024x576 over 8 s -> 24 fps)")
    parser.add_argument("--text-to-video", action="store_true",
                        help="also build the text-to-image model (--tiny: tiny SDXL; else SDXL base 1.0 architecture, "
                             "random weights) and time the prompt-only route next to image-to-video")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text-to-video prompt")
    parser.add_argument("--t2i-steps", type=int, default=None, help="text-to-image steps (default: 30; --tiny: 4)")
    parser.add_argument("--t2i-guidance", type=float, default=5.0, help="text-to-image guidance scale (default: 5.0)")
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="also time a long clip of S seconds (segments of --frames frames; --retime: 8)")
    parser.add_argument("--output-fps", type=int, default=None,
                        help="long clip / --retime: output frame rate (default: fps 7; --retime: 24)")
    parser.add_argument("--interpolation", choices=["blend", "mci"], default="mci",
                        help="long clip: how frames are made to reach --output-fps (default: mci)")
    parser.add_argument("--overlap-frames", type=int, default=0, help="long clip: frames consecutive segments share")
    parser.add_argument("--retime-content", choices=["pan", "noise"], default="pan",
                        help="--retime: the sample landscape panning 4 px/frame (default) or uniform noise")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available; --tiny: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None,
                        help="default: bf16 (full), fp32 (--tiny), fp16 (--boundaries)")
    parser.add_argument("--attention", choices=["sdpa", "default"], default="sdpa",
                        help="sdpa: diffusers AttnProcessor2_0 + transformers 'sdpa' (fused kernels); default: "
                             "diffusers' classic AttnProcessor + transformers 'eager', which materialises the "
                             "attention matrix (tens of GB at 576x1024)")
    parser.add_argument("--channels-last", action="store_true",
                        help="U-Nets and VAEs (SVD's; SDXL's too with --text-to-video) in channels_last memory format")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the U-Nets (SVD's; SDXL's too with --text-to-video); compile time is in "
                             "the warm-up")
    parser.add_argument("--decode-chunk-size", type=int, default=8, help="frames the VAE decodes at once (default: 8)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 25; --tiny: 4)")
    parser.add_argument("--frames", type=int, default=None, help="frames per pass (default: 25; --tiny: 14; --retime: 49 in all)")
    parser.add_argument("--height", type=int, default=None, help="height in pixels (default: 576; --tiny: 64)")
    parser.add_argument("--width", type=int, default=None, help="width in pixels (default: 1024; --tiny: 64)")
    parser.add_argument("--repeat", type=int, default=1, help="measured generations; the median is reported (default: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up generations, not measured (default: 1)")
    parser.add_argument("--seed", type=int, default=42, help="generation seed (default: 42)")
    parser.add_argument("--image", default=None, help="conditioning image (default: pipelines/assets/sample.png)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16/fp16 peak of the GPU for MFU, when it is not in the built-in table")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the full-size architecture on CPU anyway (to check the code path at small "
                             "--frames/--height/--width; full size on CPU takes hours)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    defaults = (TINY_DEFAULTS if args.tiny else BOUNDARY_DEFAULTS if args.boundaries
                else RETIME_DEFAULTS if args.retime else FULL_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("steps", "t2i_steps"):
        if getattr(args, key) is None:
            setattr(args, key, FULL_DEFAULTS[key])
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    if (args.count_flops or args.retime) and args.text_to_video:
        parser.error("--text-to-video adds a run to the default or --tiny mode (or stages to --boundaries)")
    if (args.count_flops or args.boundaries) and args.duration is not None:
        parser.error("--duration adds a long clip to the default or --tiny mode (or sets --retime's span)")
    if args.duration is not None and not args.duration > 0:
        parser.error("--duration must be above 0 seconds")
    if args.output_fps is not None and args.duration is None:
        parser.error("--output-fps applies to the long clip: give --duration too")
    return args


def _quiet_libraries() -> None:
    # transformers says once that torchvision is missing and the PIL CLIPImageProcessor is used
    # (the one SVD uses anyway); diffusers warns on every .to(dtype) of a freshly built model.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)


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


def _human(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB ({n / 2**20:.2f} MiB)"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB ({n / 2**10:.1f} KiB)"
    return f"{n} B"


def print_boundaries(sizes: dict, measured: dict | None = None) -> None:
    s = sizes["shape"]
    print(f"bytes crossing each stage boundary, {s['frames']} frames {s['width']}x{s['height']}, {s['dtype']}"
          + ("" if measured else " (from the shapes; no model run)"))
    for boundary, tensors in sizes["parts"].items():
        for i, t in enumerate(tensors):
            label = boundary if i == 0 else ""
            shape = "[" + ", ".join(str(d) for d in t["shape"]) + "]"
            print(f"  {label:<27} {t['name']:<17} {shape:<20} {t['dtype']:<5} {t['bytes']:>12,} B")
        total = sizes["bytes"][boundary]
        extra = ""
        if measured is not None:
            extra = "  (measured: same)" if measured.get(boundary) == total else f"  (measured: {measured.get(boundary)})"
        print(f"  {'':<27} {'total':<17} {'':<20} {'':<5} {total:>12,} B = {_human(total)}{extra}")


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


def to_channels_last(module) -> None:
    """Conv weights to channels_last. ``module.to(memory_format=...)`` fails on the SVD U-Net, whose
    temporal ResNet blocks hold 5-D Conv3d weights; those get channels_last_3d instead."""
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.to(memory_format=torch.channels_last)
        elif isinstance(layer, torch.nn.Conv3d):
            layer.to(memory_format=torch.channels_last_3d)


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
        to_channels_last(components.unet)
        to_channels_last(components.vae)
    if args.compile:
        components.unet.compile()  # in place: the module keeps its type, config and attributes
    return components


# -- one generation --------------------------------------------------------------------------------


def run_once(pipeline, image, params, sync):
    """StagedPipeline.__call__ with a device synchronise around each stage, so GPU time is not
    misplaced; the CPU time of each stage (summed over the segments of a long clip); and the
    video-encode stage's split into retime / encode seconds."""
    import contextlib

    cpu_times: dict[str, float] = {}

    @contextlib.contextmanager
    def synchronised(name):
        sync()
        cpu_start = time.process_time()
        yield
        sync()
        cpu_times[name] = cpu_times.get(name, 0.0) + time.process_time() - cpu_start

    split: dict = {}
    with t2v.video_encode_split(split):
        result = pipeline(image, params, stage_hook=synchronised)
    return result, cpu_times, split


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} CPU, {os.cpu_count()} logical cores"


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{_cpu_name()}, torch threads {torch.get_num_threads()}"


def plan_variants(args, image) -> tuple[dict, str]:
    """``{name: (params, image or None)}`` in run order, and the one-pass run the long clip repeats."""
    from pydantic import ValidationError

    from pipelines.params import describe_validation_error

    shape = dict(seed=args.seed, num_frames=args.frames, num_inference_steps=args.steps, width=args.width,
                 height=args.height, decode_chunk_size=args.decode_chunk_size, output_format="mp4")
    text = dict(prompt=args.prompt, t2i_num_inference_steps=args.t2i_steps, t2i_guidance_scale=args.t2i_guidance)
    try:
        variants = {"image_to_video": (GenerationParams(**shape), image)}
        one_pass = "image_to_video"
        if args.text_to_video:
            variants["text_to_video"] = (GenerationParams(**shape, **text), None)
            one_pass = "text_to_video"
        if args.duration is not None:
            long = dict(duration_s=args.duration, output_fps=args.output_fps, interpolation=args.interpolation,
                        overlap_frames=args.overlap_frames)
            variants["long_clip"] = (GenerationParams(**shape, **(text if args.text_to_video else {}), **long),
                                     None if args.text_to_video else image)
    except ValidationError as error:
        raise BenchError(describe_validation_error(error)) from None
    return variants, one_pass


def summarise(raw: list, steps: int) -> dict:
    """One variant's figures from its measured runs ``[(result, cpu_times, split, peak), ...]``."""
    from pipelines.segments import plan_segments

    results = [r for r, *_ in raw]
    last = results[-1]
    p = last.params
    stage_runs = [r.timings for r in results]
    stages = list(stage_runs[0])
    median = {stage: statistics.median(t[stage] for t in stage_runs) for stage in stages}
    totals = [sum(t.values()) for t in stage_runs]
    plan = plan_segments(duration_s=p.duration_s, fps=p.fps, frames_per_segment=p.num_frames,
                         overlap_frames=p.overlap_frames, max_segments=max(16, last.num_segments))
    splits = [s for _, _, s, _ in raw]
    retimed = all("retime" in s for s in splits)
    others = [t["video_encode"] - s.get("retime", 0.0) - s.get("encode", 0.0) for t, s in zip(stage_runs, splits)]
    peaks = [peak for *_, peak in raw if peak is not None]
    record = {
        "route": list(route_names(p)),
        "params": {"frames": p.num_frames, "width": p.width, "height": p.height, "steps": p.num_inference_steps,
                   "fps": p.fps, "duration_s": p.duration_s, "output_fps": p.resolved_output_fps,
                   "interpolation": p.resolved_interpolation, "overlap_frames": p.overlap_frames,
                   "prompt": p.prompt, "t2i_steps": p.t2i_num_inference_steps,
                   "t2i_guidance_scale": p.t2i_guidance_scale},
        "stage_seconds": median,
        "stage_seconds_runs": stage_runs,
        "stage_cpu_seconds": {stage: statistics.median(c.get(stage, 0.0) for _, c, _, _ in raw) for stage in stages},
        "total_seconds": statistics.median(totals),
        "total_seconds_runs": totals,
        "sampling_seconds_per_step": median["sampling"] / (steps * last.num_segments),
        "num_segments": last.num_segments,
        "plan": plan.describe(),
        "generated_frames": plan.total_frames,
        "output_frames": last.video.num_frames,
        "output_fps": last.video.fps,
        "clip_seconds": plan.duration_s,
        "interpolation": p.resolved_interpolation,
        "video_encode_split": {
            "retime_seconds": statistics.median(s["retime"] for s in splits) if retimed else None,
            "encode_seconds": statistics.median(s.get("encode", 0.0) for s in splits),
            "other_seconds": statistics.median(others),
        },
        "bytes_between_stages": dict(last.bytes_between_stages),
        "video_bytes": len(last.video.data),
        "summary": last.summary(),
        "peak_gpu_memory_bytes": max(peaks) if peaks else None,
    }
    if "text_to_image" in median:
        record["text_to_image_seconds_per_step"] = median["text_to_image"] / p.t2i_num_inference_steps
        if last.first_frame is not None and not record["bytes_between_stages"].get("text_to_image->image_encode"):
            # StagedPipeline sizes payloads with an nbytes() method; the first frame is a PIL image.
            frame = last.first_frame
            record["bytes_between_stages"]["text_to_image->image_encode"] = frame.width * frame.height * len(
                frame.getbands())
    return record


def benchmark(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: no CUDA GPU is available")
    if not on_cuda and not args.tiny and not args.allow_cpu:
        raise BenchError("full-size SVD-XT on CPU would take hours: use --tiny for the CPU smoke run, or run on a CUDA GPU")
    if args.dtype == "fp16" and not on_cuda:
        raise BenchError("--dtype fp16 is not supported on CPU (use fp32 or bf16)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)

    import numpy as np

    from pipelines.images import load_image
    from pipelines.sample_image import SAMPLE_IMAGE_PATH
    from pipelines.staged import StagedPipeline

    image = load_image(args.image or SAMPLE_IMAGE_PATH)
    variants, one_pass = plan_variants(args, image)

    start = time.perf_counter()
    components = build_components(args, device, dtype)
    sync()
    build_seconds = {"video": time.perf_counter() - start}
    text_to_image = None
    if args.text_to_video:
        start = time.perf_counter()
        text_to_image = t2v.build_text_to_image(tiny=args.tiny, device=device, dtype=dtype, attention=args.attention,
                                                channels_last=args.channels_last, compile=args.compile)
        sync()
        build_seconds["text_to_image"] = time.perf_counter() - start
    pipeline = StagedPipeline(components, text_to_image=text_to_image)

    raw: dict[str, list] = {name: [] for name in variants}
    warmup_seconds: dict[str, list[float]] = {}
    retime_frames = None
    with warnings.catch_warnings(), np.errstate(invalid="ignore", over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN frames from random weights
        # One warm-up per route; the long clip runs the same shapes through the same stages.
        for name, (params, img) in variants.items():
            if name == "long_clip":
                continue
            update = {"num_inference_steps": min(params.num_inference_steps, 2)}
            if params.text_to_video:
                update["t2i_num_inference_steps"] = min(params.t2i_num_inference_steps, 2)
            warm_params = params.model_copy(update=update)
            for _ in range(args.warmup):
                t0 = time.perf_counter()
                run_once(pipeline, img, warm_params, sync)
                warmup_seconds.setdefault(name, []).append(time.perf_counter() - t0)
        load_before = os.getloadavg()
        for _ in range(args.repeat):
            for name, (params, img) in variants.items():
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                result, cpu, split = run_once(pipeline, img, params, sync)
                frames = split.pop("retime_input", None)
                if name == "long_clip" and frames is not None:
                    retime_frames = frames
                raw[name].append((result, cpu, split, torch.cuda.max_memory_allocated(device) if on_cuda else None))
        load_after = os.getloadavg()

    runs = {name: summarise(raw[name], args.steps) for name in variants}
    if retime_frames is not None:
        long = runs["long_clip"]
        small = min(retime_frames.shape[1:3]) < 32  # minterpolate's mci refuses frames under 32x32
        long["retime_modes"] = t2v.time_retime(retime_frames, duration_s=long["clip_seconds"],
                                               output_fps=long["output_fps"], repeat=args.repeat,
                                               modes=("blend",) if small else ("blend", "mci"))
    main_run = runs["image_to_video"]
    last = raw["image_to_video"][-1][0]
    guided = last.params.max_guidance_scale > 1.0
    peaks = [r["peak_gpu_memory_bytes"] for r in runs.values() if r["peak_gpu_memory_bytes"] is not None]

    device_name = _device_name(device)
    result = {
        "mode": "tiny" if args.tiny else "svd-xt",
        "variants": list(variants),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": device,
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "versions": {"torch": torch.__version__, "python": platform.python_version(), **_lib_versions()},
        "config": {
            "dtype": args.dtype, "attention": args.attention, "channels_last": args.channels_last,
            "compile": args.compile, "frames": last.params.num_frames, "height": args.height, "width": args.width,
            "steps": args.steps, "decode_chunk_size": args.decode_chunk_size, "seed": args.seed,
            "guided": guided, "repeat": args.repeat, "warmup": args.warmup,
            "text_to_video": args.text_to_video, "t2i_steps": args.t2i_steps if args.text_to_video else None,
            "t2i_guidance": args.t2i_guidance if args.text_to_video else None,
            "duration": args.duration, "output_fps": args.output_fps if args.duration is not None else None,
            "interpolation": args.interpolation if args.duration is not None else None,
        },
        "text_to_image_model": None if text_to_image is None else (
            "tiny SDXL (pipelines.tiny_t2i)" if args.tiny else "SDXL base 1.0 architecture, random weights"),
        "text_to_image_parameters": None if text_to_image is None else {
            name: sum(p.numel() for p in getattr(text_to_image, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")},
        "build_seconds": sum(build_seconds.values()),
        "build_seconds_by_model": build_seconds,
        "warmup_seconds": warmup_seconds.get("image_to_video", []),
        "warmup_seconds_by_run": warmup_seconds,
        # The image-to-video run's figures, as before text-to-video and long clips were added.
        **{key: main_run[key] for key in ("stage_seconds", "stage_seconds_runs", "stage_cpu_seconds")},
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "total_seconds": main_run["total_seconds"],
        "total_seconds_runs": main_run["total_seconds_runs"],
        "sampling_seconds_per_step": main_run["sampling_seconds_per_step"],
        "bytes_between_stages": main_run["bytes_between_stages"],
        "video_bytes": main_run["video_bytes"],
        "summary": main_run["summary"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_memory_bytes": max(peaks) if peaks else None,
        "runs": runs,
        "comparisons": t2v.comparisons(runs, one_pass),
        "published_anchors": list(PUBLISHED_ANCHORS),
    }
    embed_dim = components.image_encoder.config.projection_dim if args.tiny else 1024
    expected = boundary_sizes(last.params.num_frames, args.height, args.width, args.dtype, embed_dim=embed_dim)
    result["bytes_between_stages_expected"] = expected["bytes"]
    result["_boundary_parts"] = expected
    for name in ("text_to_video", "long_clip"):
        if name in runs:
            p = raw[name][-1][0]
            runs[name]["bytes_between_stages_expected"] = boundary_sizes(
                p.params.num_frames, args.height, args.width, args.dtype, embed_dim=embed_dim,
                route=route_names(p.params), keeps_first_frame=p.params.keeps_conditioning_frame,
                segments=p.num_segments)["bytes"]

    if args.tiny:
        result["flops"] = None  # the 159.9 / 173.6 TFLOP figures describe the full SVD-XT, not the tiny model
    else:
        median = main_run["stage_seconds"]
        flops = flop_estimates(last.params.num_frames, args.height, args.width, args.steps, guided)
        label, peak = lookup_peak(device_name, args.peak_tflops) if on_cuda else (None, None)
        unet_rate = flops["unet_tflop"] / median["sampling"]
        decode_rate = flops["decode_tflop"] / median["decode"]
        flops.update({
            "unet_tflops_per_s": unet_rate,
            "decode_tflops_per_s": decode_rate,
            "peak_tflops": peak,
            "peak_source": label,
            "unet_mfu": unet_rate / peak if peak and args.dtype in ("bf16", "fp16") else None,
            "decode_mfu": decode_rate / peak if peak and args.dtype in ("bf16", "fp16") else None,
        })
        result["flops"] = flops
    return result


def _lib_versions() -> dict:
    import diffusers
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "ffmpeg": t2v.ffmpeg_version()}


def print_report(r: dict) -> None:
    c = r["config"]
    title = "tiny random-weight SVD (CI smoke)" if r["mode"] == "tiny" else "SVD-XT architecture, random weights"
    print(f"{title} on {r['device']}: {r['device_name']}")
    print(f"  torch {r['versions']['torch']}, diffusers {r['versions']['diffusers']}, "
          f"transformers {r['versions']['transformers']}, {r['date']}")
    print(f"  {c['frames']} frames {c['width']}x{c['height']}, {c['steps']} steps, {c['dtype']}, "
          f"attention {c['attention']}, channels_last {'on' if c['channels_last'] else 'off'}, "
          f"compile {'on' if c['compile'] else 'off'}, decode_chunk_size {c['decode_chunk_size']}, "
          f"{'CFG (U-Net batch 2)' if c['guided'] else 'no CFG'}")
    if c["text_to_video"]:
        params = r["runs"]["text_to_video"]["params"]
        print(f"  text-to-image: {r['text_to_image_model']}, {c['width']}x{c['height']}, {c['t2i_steps']} steps, "
              f"guidance {c['t2i_guidance']:g}; prompt {params['prompt']!r}")
    if c["duration"] is not None:
        long = r["runs"]["long_clip"]
        print(f"  long clip: {c['duration']:g} s, {long['plan']}, output {long['output_frames']} frames at "
              f"{long['output_fps']} fps ({long['interpolation']})")
    warm = "; ".join(f"{LABEL.get(name, name)} " + ", ".join(f"{s:.2f}" for s in values)
                     for name, values in r["warmup_seconds_by_run"].items()) or "none"
    builds = ", ".join(f"{name} {s:.2f}" for name, s in r["build_seconds_by_model"].items())
    print(f"  build {r['build_seconds']:.2f} s ({builds}), warm-up (<= 2 steps) {warm} s, measured runs {c['repeat']}"
          + (" (median)" if c["repeat"] > 1 else ""))
    print(("image-to-video, " if len(r["runs"]) > 1 else "") + "seconds per stage:")
    for stage in STAGES:
        values = [t[stage] for t in r["stage_seconds_runs"]]
        spread = f"  (min {min(values):.3f}, max {max(values):.3f})" if len(values) > 1 else ""
        extra = f"  = {r['sampling_seconds_per_step']:.3f} s/step" if stage == "sampling" else ""
        print(f"  {stage:<14} {r['stage_seconds'][stage]:9.3f}{extra}{spread}")
    print(f"  {'total':<14} {r['total_seconds']:9.3f} s/video")
    if not r["device"].startswith("cuda"):
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in r["stage_cpu_seconds"].items())
        load = r["load_average_1min"]
        print(f"  process CPU seconds per stage: {cpu}; 1-min load average {load['before']:.1f} -> {load['after']:.1f}")
    f = r["flops"]
    if f:
        mfu = f"MFU {f['unet_mfu']:.1%} of {f['peak_tflops']:g} TFLOP/s ({f['peak_source']})" if f["unet_mfu"] else (
            "MFU n/a: unknown GPU, pass --peak-tflops" if r["device"].startswith("cuda") else "MFU n/a on CPU")
        print(f"U-Net: {f['unet_tflop_per_step']:.4g} TFLOP/step x {c['steps']} = {f['unet_tflop']:.4g} TFLOP "
              f"-> {f['unet_tflops_per_s']:.4g} TFLOP/s, {mfu}")
        dmfu = f", MFU {f['decode_mfu']:.1%}" if f["decode_mfu"] else ""
        print(f"decode: {f['decode_tflop']:.4g} TFLOP -> {f['decode_tflops_per_s']:.4g} TFLOP/s{dmfu}")
        print(f"  (FLOPs {f['rule']})")
    if r["peak_gpu_memory_bytes"] is not None:
        print(f"peak GPU memory (torch.cuda.max_memory_allocated, measured runs): "
              f"{r['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    print(f"peak process RSS: {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    print_boundaries(r["_boundary_parts"], measured=r["bytes_between_stages"])
    print(f"  {'video_encode->storage':<27} {'mp4':<17} {'(random weights)':<20} {'':<5} {r['video_bytes']:>12,} B")
    print(f"last run: {r['summary']}")
    extra = {name: run for name, run in r["runs"].items() if name != "image_to_video"}
    for name, run in extra.items():
        print(f"last {LABEL[name]} run: {run['summary']}")
        if "text_to_image_seconds_per_step" in run:
            print(f"  text_to_image {run['text_to_image_seconds_per_step']:.3f} s/step")
        measured, expected = run["bytes_between_stages"], run["bytes_between_stages_expected"]
        print("  bytes between stages (first segment): " + ", ".join(
            f"{b} {measured[b]:,}" + ("" if measured[b] == expected.get(b) else f" (expected {expected.get(b):,})")
            if b in measured else f"{b} {expected[b]:,} (expected; not recorded by StagedPipeline)"
            for b in expected))
    if extra:
        t2v.print_side_by_side(r["runs"], r["comparisons"], order=REGISTRY.names())
    print_anchors()


def print_anchors() -> None:
    print("published figures for comparison (NOT measured here):")
    for a in PUBLISHED_ANCHORS:
        stages = ", ".join(f"{k} {v:g} s" for k, v in a["stages"].items())
        print(f"  {a['what']}: {a['seconds_per_video']:g} s/video" + (f" ({stages})" if stages else "")
              + f"  [{a['source']}]")


# -- entry point -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        if args.boundaries:
            sizes = boundary_sizes(args.frames, args.height, args.width, args.dtype,
                                   route=T2V_STAGES if args.text_to_video else STAGES,
                                   keeps_first_frame=args.text_to_video)
            print_boundaries(sizes)
            result = {"mode": "boundaries", **sizes}
        elif args.count_flops:
            counted = count_flops_meta(args.frames, args.height, args.width, args.decode_chunk_size)
            scaled = flop_estimates(args.frames, args.height, args.width, 1, True)
            print(f"SVD-XT at {args.frames} frames {args.width}x{args.height} (meta device, FlopCounterMode):")
            print(f"  U-Net, one guided step (batch 2): {counted['unet_tflop_per_guided_step']:.1f} TFLOP "
                  f"(linear rule: {scaled['unet_tflop_per_step']:.1f})")
            print(f"  VAE decode, chunks of {args.decode_chunk_size}: {counted['decode_tflop']:.1f} TFLOP "
                  f"(linear rule: {scaled['decode_tflop']:.1f})")
            result = {"mode": "count-flops", "shape": {"frames": args.frames, "height": args.height,
                      "width": args.width}, "counted": counted, "linear_rule": scaled}
        elif args.retime:
            result = {"mode": "retime", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
                      "device_name": _cpu_name(), "load_average_1min": os.getloadavg()[0],
                      "ffmpeg": t2v.ffmpeg_version(),
                      **t2v.retime_benchmark(args)}
            t2v.print_retime(result)
        else:
            result = benchmark(args)
            print_report(result)
            result.pop("_boundary_parts")
    except BenchError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if type(error).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        print(f"{PROG}: out of GPU memory ({first}); try --attention sdpa or a smaller --decode-chunk-size",
              file=sys.stderr)
        return 3
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
