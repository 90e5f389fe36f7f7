"""The command-line options of ``bench_pipeline.py`` and their per-mode defaults."""

from __future__ import annotations

import argparse

from .common import DTYPE_BYTES, PROG
from .reference import REF_FRAMES, REF_HEIGHT, REF_WIDTH

TINY_DEFAULTS = {"frames": 14, "height": 64, "width": 64, "steps": 4, "t2i_steps": 4, "dtype": "fp32",
                 "device": "cpu"}
FULL_DEFAULTS = {"frames": REF_FRAMES, "height": REF_HEIGHT, "width": REF_WIDTH, "steps": 25, "t2i_steps": 30,
                 "dtype": "bf16"}
BOUNDARY_DEFAULTS = {"frames": REF_FRAMES, "height": REF_HEIGHT, "width": REF_WIDTH, "dtype": "fp16"}
#: --retime: the two-segment SVD-XT clip, 49 frames at 1024x576 spanning 8 s, to 24 fps (193 frames).
RETIME_DEFAULTS = {"frames": 49, "height": REF_HEIGHT, "width": REF_WIDTH, "duration": 8.0, "output_fps": 24}
DEFAULT_PROMPT = "a red fox running through fresh snow in a pine forest at sunrise, cinematic, detailed"


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
    parser.add_argument("--fastpath", action="store_true",
                        help="eager vs compiled stages side by side, cold vs warm replica start through the compile "
                             "cache, and with --fp8 / --low-vram their figures (full SVD-XT on a GPU; with --tiny on CPU)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="--fastpath: torch.compile mode of the compiled run (default: default)")
    parser.add_argument("--compile-scope", choices=["full", "regional"], default="full",
                        help="--fastpath: compile whole networks or their repeated blocks (default: full)")
    parser.add_argument("--compile-engine", choices=["jit", "aot"], default=None,
                        help="--fastpath: torch.compile in the process (jit, default) or ahead-of-time packages "
                             "loaded from the compile cache (aot)")
    parser.add_argument("--compile-vae", action="store_true", help="--fastpath: compile the VAE decoder too")
    parser.add_argument("--fp8", action="store_true",
                        help="--fastpath: also run the U-Net with float8 linears (approximate): speed and PSNR/SSIM")
    parser.add_argument("--low-vram", action="store_true",
                        help="--fastpath: also measure activation peaks per stage and setting (CUDA only)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="--fastpath: skip sections that would end after this many seconds (default: 480)")
    parser.add_argument("--warm-timeout-s", type=float, default=300.0,
                        help="--fastpath: the warm-start child's time limit (default: 300)")
    parser.add_argument("--work-dir", default=None,
                        help="--fastpath: weights and compile cache (default: next to --json, else out/fastpath-work)")
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
    fastpath_only = [flag for flag in ("compile_vae", "compile_engine", "fp8", "low_vram") if getattr(args, flag)]
    if fastpath_only and not args.fastpath:
        parser.error(f"--{fastpath_only[0].replace('_', '-')} is a --fastpath option")
    args.compile_engine = args.compile_engine or "jit"
    if args.fastpath:
        from pipelines.acceleration.options import StageAcceleration

        try:
            StageAcceleration(compile=args.compile_mode, scope=args.compile_scope, engine=args.compile_engine)
        except ValueError as error:  # pydantic's ValidationError: its first message, as one line
            message = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
            parser.error(message.removeprefix("Value error, "))
    if args.fastpath and (args.boundaries or args.count_flops or args.retime or args.text_to_video
                          or args.duration is not None or args.compile):
        parser.error("--fastpath runs image-to-video stages only; combine it with --tiny and the --fastpath options")
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
