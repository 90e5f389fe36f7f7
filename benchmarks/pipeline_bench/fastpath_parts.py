"""The pieces of ``--fastpath`` (see fastpath.py): models, stages, one timed generation, the
comparisons, the low-VRAM peaks, the warm-start child process and the FP8 run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pipelines.acceleration.options import StageAcceleration, WarmupShape
from pipelines.acceleration.warmup import prepare_stage
from pipelines.stages import DecodeStage, ImageEncodeStage, SamplingStage

#: Components whose weights the warm start loads from disk (the image encoder is never compiled).
SAVED_COMPONENTS = ("unet", "vae")


# -- models and stages -------------------------------------------------------------------------


def build(args, device: torch.device, dtype: torch.dtype) -> dict:
    from .models import build_components

    built = build_components(SimpleNamespace(tiny=args.tiny, attention="sdpa", channels_last=False, compile=False),
                             str(device), dtype)
    return dict(vars(built))


def save_weights(components: dict, directory: Path) -> dict:
    """Each saved component's config, scheduler config and safetensors weights; bytes per file."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in SAVED_COMPONENTS:
        module = components[name]
        (directory / f"{name}.json").write_text(json.dumps({"class": type(module).__name__, **dict(module.config)},
                                                           default=list))
        path = directory / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
        sizes[name] = path.stat().st_size
    (directory / "scheduler.json").write_text(json.dumps(dict(components["scheduler"].config), default=list))
    return sizes


def make_stages(components: dict) -> SimpleNamespace:
    return SimpleNamespace(
        encode=ImageEncodeStage(image_encoder=components["image_encoder"],
                                feature_extractor=components["feature_extractor"], vae=components["vae"]),
        sampling=SamplingStage(unet=components["unet"], scheduler=components["scheduler"]),
        decode=DecodeStage(vae=components["vae"]),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode(stages, args, params):
    import PIL.Image

    from pipelines.sample_image import draw_sample_image

    image = PIL.Image.open(args.image) if args.image else draw_sample_image()
    image = image.convert("RGB").resize((args.width, args.height))
    return stages.encode(image, params)


# -- one generation ----------------------------------------------------------------------------


@dataclass
class Generation:
    stage_s: dict = field(default_factory=dict)
    peak_bytes: dict = field(default_factory=dict)
    sampled: object = None
    frames: np.ndarray | None = None

    def figures(self) -> dict:
        total = sum(self.stage_s.values())
        return {"stage_s": {k: round(v, 3) for k, v in self.stage_s.items()}, "video_s": round(total, 3),
                "peak_gib": {k: round(v / 2**30, 2) for k, v in self.peak_bytes.items()}}

    def ratios(self, baseline: "Generation") -> dict:
        out = {k: round(baseline.stage_s[k] / v, 2) for k, v in self.stage_s.items() if v > 0}
        out["video"] = round(sum(baseline.stage_s.values()) / sum(self.stage_s.values()), 2)
        return out


def generate(stages, encoded, params, device, *, warmup: bool, sampling=None) -> Generation:
    """Sampling then decode, synchronised and timed; ``warmup`` runs a 2-step generation first."""
    sampling = sampling or stages.sampling
    if warmup:
        short = params.model_copy(update={"num_inference_steps": 2})
        stages.decode(sampling(encoded, short), short)
    result = Generation()
    for name, call in (("sampling", lambda: sampling(encoded, params)),
                       ("decode", lambda: stages.decode(result.sampled, params))):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        output = call()
        _sync(device)
        result.stage_s[name] = time.perf_counter() - started
        if device.type == "cuda":
            result.peak_bytes[name] = torch.cuda.max_memory_allocated(device)
        if name == "sampling":
            result.sampled = output
        else:
            result.frames = output.frames
    return result


def host_transfer(stages, sampled, params, device) -> dict:
    """The decode as float32 frames copied to the host vs uint8 made on the device (eager)."""
    figures = {}
    for name, call in (("float32", lambda: stages.decode.decode_float(sampled, params)),
                       ("uint8", lambda: stages.decode(sampled, params).frames)):
        _sync(device)
        started = time.perf_counter()
        frames = call()
        _sync(device)
        figures[name] = {"decode_s": round(time.perf_counter() - started, 3), "host_mb": round(frames.nbytes / 1e6, 1),
                         "host_bytes": int(frames.nbytes)}
    return figures


def difference(reference: Generation, other: Generation) -> dict:
    a = reference.sampled.latents.float().cpu()
    b = other.sampled.latents.float().cpu()
    frames = np.abs(reference.frames.astype(np.int16) - other.frames.astype(np.int16))
    return {"latents_rel_rmse": float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt().clamp(min=1e-12)),
            "frames_mean_abs": float(frames.mean()), "frames_max_abs": int(frames.max()),
            "finite": bool(torch.isfinite(b).all())}


# -- compiled stages ---------------------------------------------------------------------------


def clear_compile_cache(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def use_fresh_local_caches(work: Path, name: str) -> dict[str, str]:
    """Point Inductor's and Triton's on-disk caches at empty directories of this run (both read
    their variable when they first need the directory, so setting it before the first compile is
    enough): a replica on a new node starts with none."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{name}"), "TRITON_CACHE_DIR": str(work / f"triton-{name}")}
    for path in env.values():
        shutil.rmtree(path, ignore_errors=True)
    os.environ.update(env)
    return env


def prepare(stages, components, options: StageAcceleration, shape: WarmupShape, *, compile_vae: bool) -> dict:
    reports = {"sampling": prepare_stage("sampling", components=components, stage_object=stages.sampling,
                                         options=options, shapes=[shape])}
    if compile_vae:
        reports["decode"] = prepare_stage("decode", components=components, stage_object=stages.decode,
                                          options=options, shapes=[shape])
    return {name: {**asdict(r), "total_s": round(r.total_s, 2)} for name, r in reports.items()}


def warm_start(args, work: Path, weights_dir: Path, options: StageAcceleration, shape: WarmupShape) -> dict:
    """A fresh process (empty Inductor and Triton caches of its own, as on a new node) that loads
    the weights from disk and the compile cache, and prepares the same stages."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")]))
    fresh = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-warm"), "TRITON_CACHE_DIR": str(work / "triton-warm")}
    for path in fresh.values():
        shutil.rmtree(path, ignore_errors=True)
    env.update(fresh)
    spawned = time.monotonic()
    child = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("fastpath_warm.py")), "--weights", str(weights_dir),
         "--options", options.model_dump_json(), "--shape", shape.model_dump_json(),
         "--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--dtype", args.dtype,
         "--spawned", repr(spawned)] + (["--compile-vae"] if args.compile_vae else []),
        env=env, stdout=subprocess.PIPE, text=True, timeout=args.warm_timeout_s)  # stderr: progress, to the log
    if child.returncode != 0:
        return {"error": f"exit {child.returncode}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


# -- low VRAM ----------------------------------------------------------------------------------


def _activation_peak(device, call) -> int:
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        call()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def low_vram_peaks(components, stages, encoded, params, device, args) -> dict:
    """Activation peaks (bytes above the resident weights) per setting, and weight bytes per
    component: a stage's peak on a card that holds only its own model is its weights plus these.
    On CUDA measured (``max_memory_allocated``) on the run's models and size; elsewhere counted on
    the ``meta`` device for the full-size SVD-XT architecture at 576x1024 (memory_count.py: the
    tensors eager PyTorch keeps alive, which matched the H200's measurement)."""
    from pipelines.acceleration.lowvram import set_feed_forward_chunking
    from pipelines.acceleration.memory_count import count_peak_bytes, module_tensors, svd_architecture

    if device.type == "cuda":
        models, height, width, frame_counts = components, args.height, args.width, sorted({args.frames, 14})
        method = "measured: torch.cuda.max_memory_allocated above the resident weights"
        dtype, where = components["unet"].dtype, device

        def peak(call, module):
            return _activation_peak(device, call)
    else:
        models, height, width, frame_counts = svd_architecture("svd-xt", device="meta"), 576, 1024, [14, 25]
        method = ("counted on the meta device (full-size SVD-XT architecture, bf16, 576x1024): an estimate; "
                  "decode: one chunk (the frames of earlier chunks, 3.4 MB each, left out)")
        dtype, where = torch.bfloat16, torch.device("meta")

        def peak(call, module):
            return count_peak_bytes(call, ignore=module_tensors(module))
    unet, vae = models["unet"], models["vae"]
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    figures = {"method": method, "shape": f"{width}x{height}",
               "weights_gib": {name: gib(sum(p.numel() * p.element_size() for p in models[name].parameters()))
                               for name in ("unet", "vae", "image_encoder")}}
    h, w = height // 8, width // 8
    timestep = torch.tensor(1.0, device=device) if device.type == "cuda" else torch.tensor(1.0)
    for frames in frame_counts:
        model_input = torch.randn(2, frames, 8, h, w, device=where, dtype=dtype)
        step = lambda: unet(model_input, timestep,  # noqa: E731
                            encoder_hidden_states=torch.zeros(2, 1, unet.config.cross_attention_dim, device=where,
                                                              dtype=dtype),
                            added_time_ids=torch.zeros(2, 3, device=where, dtype=dtype), return_dict=False)
        figures[f"unet_step_{frames}f_gib"] = gib(peak(step, unet))
        set_feed_forward_chunking(unet, enabled=True)  # as a low_vram deployment sets it
        figures[f"unet_step_{frames}f_ff_chunked_gib"] = gib(peak(step, unet))
        set_feed_forward_chunking(unet, enabled=False)
        latents = torch.randn(frames, 4, h, w, device=where, dtype=dtype)
        for chunk in sorted({frames, 8, 4, 2, 1}, reverse=True):
            starts = range(0, frames, chunk) if device.type == "cuda" else range(1)  # counted: one chunk
            figures[f"decode_{frames}f_chunk{chunk}_gib"] = gib(peak(
                lambda c=chunk, starts=starts: [vae.decode(latents[s:s + c], num_frames=latents[s:s + c].shape[0])
                                                for s in starts], vae))
    return figures


# -- FP8 ---------------------------------------------------------------------------------------


def fp8_run(fp8_unet, stages, components, encoded, params, device, shape, args, *, reference: Generation,
            eager: Generation) -> dict:
    from pipelines.acceleration.fp8 import Float8Linear
    from pipelines.acceleration.quality import psnr, ssim

    sampling = SamplingStage(unet=fp8_unet, scheduler=components["scheduler"])
    options = StageAcceleration(compile=args.compile_mode, scope=args.compile_scope, engine=args.compile_engine,
                                fp8=True)
    ready = prepare_stage("sampling", components={**components, "unet": fp8_unet}, stage_object=sampling,
                          options=options, shapes=[shape])
    run = generate(stages, encoded, params, device, warmup=False, sampling=sampling)
    return {"linears_fp8": sum(isinstance(m, Float8Linear) for m in fp8_unet.modules()),
            "prepare_s": round(ready.total_s, 1), **run.figures(),
            "sampling_ratio_to_bf16_compiled": round(reference.stage_s["sampling"] / run.stage_s["sampling"], 3),
            "quality_vs_bf16_compiled": {"psnr_db": round(psnr(reference.frames, run.frames), 2),
                                         "ssim": round(ssim(reference.frames, run.frames), 4)},
            "quality_vs_bf16_eager": {"psnr_db": round(psnr(eager.frames, run.frames), 2),
                                      "ssim": round(ssim(eager.frames, run.frames), 4)},
            "compiled_vs_eager_bf16": {"psnr_db": round(psnr(eager.frames, reference.frames), 2),
                                       "ssim": round(ssim(eager.frames, reference.frames), 4)}}
