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

Code
    This script is the entry point (``main``); its parts are the modules of ``pipeline_bench/``,
    one concern each: options, models, boundary and FLOP accounting, the timing runs, the report.

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

import datetime as dt
import json
import logging
import os
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from any directory
    sys.path.insert(0, str(REPO_ROOT))

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_text_to_video as t2v  # noqa: E402  (this directory; light: no torch)
from pipeline_bench.accounting import boundary_sizes, count_flops_meta, flop_estimates  # noqa: E402
from pipeline_bench.cli import parse_args  # noqa: E402
from pipeline_bench.common import PROG, STAGES, T2V_STAGES, BenchError  # noqa: E402
from pipeline_bench.machine import cpu_name  # noqa: E402
from pipeline_bench.report import print_boundaries, print_report  # noqa: E402
from pipeline_bench.timing import benchmark  # noqa: E402


def _quiet_libraries() -> None:
    # transformers says once that torchvision is missing and the PIL CLIPImageProcessor is used
    # (the one SVD uses anyway); diffusers warns on every .to(dtype) of a freshly built model.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)


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
                      "device_name": cpu_name(), "load_average_1min": os.getloadavg()[0],
                      "ffmpeg": t2v.ffmpeg_version(),
                      **t2v.retime_benchmark(args)}
            t2v.print_retime(result)
        elif args.fastpath:
            from pipeline_bench.fastpath import run_fastpath

            result = run_fastpath(args)
            args.json = None  # written section by section already
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
