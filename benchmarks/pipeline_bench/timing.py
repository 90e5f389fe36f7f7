"""The timing runs: one generation with synchronised stages, the variants of one invocation
(image-to-video, text-to-video, the long clip), their figures, and the whole benchmark run."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import warnings

import bench_text_to_video as t2v  # benchmarks/ (light: no torch)
from pipelines.params import GenerationParams  # light: pydantic only

from . import machine
from .accounting import boundary_sizes, flop_estimates, lookup_peak
from .common import BenchError, route_names
from .models import build_components
from .reference import PUBLISHED_ANCHORS

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

    device_name = machine.device_name(device)
    result = {
        "mode": "tiny" if args.tiny else "svd-xt",
        "variants": list(variants),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": device,
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "versions": {"torch": torch.__version__, "python": platform.python_version(), **machine.lib_versions()},
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
