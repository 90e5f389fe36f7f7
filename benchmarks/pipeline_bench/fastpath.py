"""``bench_pipeline.py --fastpath``: eager vs compiled stages side by side in one run, cold vs warm
replica start through the compile cache, FP8 speed and quality, low-VRAM peak memory.

One process, sections in order of value, each written to ``--json`` as soon as it ends (a run cut
short by its time limit still leaves every finished figure), and skipped when ``--budget-s`` would
be exceeded by its estimate:

1. build the models (full SVD-XT architecture, random weights, on the GPU; or the tiny model);
   save the U-Net and VAE weights to local disk for the warm start;
2. eager: one warm-up generation (2 steps), then one measured, per stage; peak memory per stage;
   the decode's host transfer as float32 and as uint8;
3. ``--low-vram``: activation peaks of one guided U-Net step (with and without feed-forward
   chunking) and of the decoder at several chunk sizes; component weight bytes;
4. compiled, cold: the serving path's ``prepare_stage`` (U-Net; the VAE decoder too with
   ``--compile-vae``; ``--compile-engine jit`` or ``aot``) with an empty compile cache, then the same generation as in 2 (same encoded
   image, same seed): per stage times, ratios to eager, and the difference of latents and frames;
5. warm start: a fresh process (``fastpath_warm.py``) loads the saved weights from disk, loads the
   compile cache, prepares the same stages and reports process start -> ready;
6. ``--fp8``: a copy of the U-Net taken before compiling, quantised, compiled and warmed up, then
   the same generation: speed and PSNR/SSIM of its frames against the compiled bf16 frames.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

#: Rough seconds each section needs at full size on an H100/H200 (the budget check's estimates;
#: warm_start is the jit engine's, an aot warm start loads packages and compiles nothing).
FULL_ESTIMATES = {"eager": 60, "low_vram": 30, "compiled": 250, "warm_start": 90, "fp8": 120}
TINY_ESTIMATES = {"eager": 10, "low_vram": 10, "compiled": 200, "warm_start": 150, "fp8": 150}


class Run:
    """The figures so far, written after every section."""

    def __init__(self, args) -> None:
        self.args = args
        self.started = time.monotonic()
        self.result: dict = {"mode": "fastpath", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                             "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
                             "sections": {}, "skipped": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fits(self, section: str) -> bool:
        estimates = TINY_ESTIMATES if self.args.tiny else FULL_ESTIMATES
        left = self.args.budget_s - self.elapsed()
        if left >= estimates[section]:
            return True
        self.result["skipped"][section] = f"{left:.0f} s of the budget left, the section needs ~{estimates[section]} s"
        print(f"[fastpath] skipping {section}: {self.result['skipped'][section]}", flush=True)
        self.save()
        return False

    def attempt(self, section: str, make) -> object:
        """``make()``'s figures recorded under ``section``; an exception is recorded, not fatal, so
        one broken section never costs the others (GPU time comes in short windows)."""
        import traceback

        try:
            figures = make()
        except Exception as error:  # noqa: BLE001 - recorded and reported, the run goes on
            self.record(section, {"error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()[-2000:]})
            return None
        self.record(section, figures)
        return figures

    def record(self, section: str, figures: dict) -> None:
        figures["finished_at_s"] = round(self.elapsed(), 1)
        self.result["sections"][section] = figures
        print(f"[fastpath] {section}: {json.dumps(figures, default=str)}", flush=True)
        self.save()

    def save(self) -> None:
        if self.args.json:
            path = Path(self.args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.result, indent=2, default=str) + "\n")


def run_fastpath(args) -> dict:
    import torch

    from pipelines.acceleration.options import StageAcceleration, WarmupShape
    from pipelines.params import GenerationParams

    from . import fastpath_parts as parts
    from .machine import device_name

    run = Run(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny and not args.allow_cpu:
        from .common import BenchError

        raise BenchError("--fastpath at full size needs a CUDA GPU (or --tiny / --allow-cpu)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    work = Path(args.work_dir or (Path(args.json).parent / "fastpath-work" if args.json else "out/fastpath-work"))
    work.mkdir(parents=True, exist_ok=True)
    shape = WarmupShape(width=args.width, height=args.height, num_frames=args.frames,
                        decode_chunk_size=args.decode_chunk_size)
    params = GenerationParams(seed=args.seed, num_frames=args.frames, num_inference_steps=args.steps, width=args.width,
                              height=args.height, decode_chunk_size=args.decode_chunk_size).resolved(args.frames)
    run.result.update({"device_name": device_name(str(device)), "dtype": args.dtype, "libraries": _versions(),
                       "shape": shape.model_dump(), "steps": args.steps, "tiny": bool(args.tiny)})

    # 1. Models, and their weights on local disk for the warm start.
    started = time.perf_counter()
    components = parts.build(args, device, dtype)
    fp8_unet = copy.deepcopy(components["unet"]) if args.fp8 else None
    built_s = time.perf_counter() - started
    weights_dir = work / "weights"
    saved = parts.save_weights(components, weights_dir)
    run.record("build", {"seconds": round(built_s, 2), "weights_saved": saved})
    stages = parts.make_stages(components)
    encoded = parts.encode(stages, args, params)

    # 2. Eager.
    eager = parts.generate(stages, encoded, params, device, warmup=True)
    run.record("eager", {**eager.figures(), "host_transfer": parts.host_transfer(stages, eager.sampled, params, device)})

    # 3. Low-VRAM peaks.
    if args.low_vram and run.fits("low_vram"):
        run.attempt("low_vram", lambda: parts.low_vram_peaks(components, stages, encoded, params, device, args))

    # 4. Compiled, cold cache.
    options = StageAcceleration(compile=args.compile_mode, scope=args.compile_scope, engine=args.compile_engine,
                                cache_dir=str(work / "compile-cache"))
    if run.fits("compiled"):
        parts.clear_compile_cache(work / "compile-cache")
        parts.use_fresh_local_caches(work, "cold")  # a cold start: nothing from earlier runs on this machine
        ready = parts.prepare(stages, components, options, shape, compile_vae=args.compile_vae)
        compiled = parts.generate(stages, encoded, params, device, warmup=False)
        run.record("compiled", {"cold_start": ready, **compiled.figures(), "ratio_to_eager": compiled.ratios(eager),
                                "difference_to_eager": parts.difference(eager, compiled)})

        # 5. Warm start in a fresh process.
        if run.fits("warm_start"):
            run.attempt("warm_start", lambda: parts.warm_start(args, work, weights_dir, options, shape))

        # 6. FP8 (approximate): quality against the compiled bf16 frames.
        if fp8_unet is not None and run.fits("fp8"):
            run.attempt("fp8", lambda: parts.fp8_run(fp8_unet, stages, components, encoded, params, device, shape,
                                                     args, reference=compiled, eager=eager))
    return run.result


def _versions() -> dict:
    """Library versions (no ffmpeg: the GPU machine has none, and the video encode is not timed here)."""
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "diffusers", "transformers", "triton"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    versions["cuda"] = torch.version.cuda
    return versions
