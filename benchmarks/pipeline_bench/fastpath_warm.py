"""The warm-start child of ``--fastpath``: what a new replica does, timed from its spawn.

Loads the U-Net (and with --compile-vae the VAE) from the safetensors on local disk the parent
saved, loads the compile cache, prepares the stages through the serving path's ``prepare_stage``
and prints one JSON line: seconds from spawn to imports done, weights loaded, ready; the cache
outcome; dynamo/Inductor counters (a warm start compiles nothing: FX-graph cache hits only)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True)
    parser.add_argument("--options", required=True, help="StageAcceleration as JSON")
    parser.add_argument("--shape", required=True, help="WarmupShape as JSON")
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--spawned", type=float, required=True, help="the parent's time.monotonic() at spawn")
    parser.add_argument("--compile-vae", action="store_true")
    args = parser.parse_args()
    marks = {"process_started_s": time.monotonic() - args.spawned}
    # Progress on stderr, which the parent passes through: a child stopped by its time limit still
    # shows how far it got (cache outcome, which stage it was compiling).
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[warm start %(relativeCreated)6.0f ms] %(message)s")
    logging.getLogger("torch").setLevel(logging.WARNING)

    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from safetensors.torch import load_file

    from pipelines.acceleration.options import StageAcceleration, WarmupShape
    from pipelines.acceleration.warmup import prepare_stage
    from pipelines.stages import DecodeStage, SamplingStage

    marks["imports_done_s"] = time.monotonic() - args.spawned
    logging.info("imports done")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    weights = Path(args.weights)
    classes = {"unet": UNetSpatioTemporalConditionModel, "vae": AutoencoderKLTemporalDecoder}
    components = {}
    for name in ("unet", "vae") if args.compile_vae else ("unet",):
        config = json.loads((weights / f"{name}.json").read_text())
        config.pop("class")
        with torch.device("meta"):
            module = classes[name].from_config(config)
        module.load_state_dict(load_file(str(weights / f"{name}.safetensors"), device=str(device)), assign=True,
                               strict=True)
        components[name] = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    components["scheduler"] = EulerDiscreteScheduler.from_config(json.loads((weights / "scheduler.json").read_text()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    marks["weights_loaded_s"] = time.monotonic() - args.spawned
    logging.info("weights loaded")

    options = StageAcceleration.model_validate_json(args.options)
    shape = WarmupShape.model_validate_json(args.shape)
    stages = {"sampling": SamplingStage(unet=components["unet"], scheduler=components["scheduler"])}
    if args.compile_vae:
        stages["decode"] = DecodeStage(vae=components["vae"])
    reports = {}
    for name, stage in stages.items():
        logging.info("preparing %s", name)
        report = prepare_stage(name, components=components, stage_object=stage, options=options, shapes=[shape])
        reports[name] = {"cache": report.cache, "cache_load_s": round(report.cache_load_s, 2),
                         "warmup_s": {k: round(v, 2) for k, v in report.warmup_s.items()},
                         "aot_build_s": round(report.aot_build_s, 2), "aot_packages": report.aot_packages,
                         "total_s": round(report.total_s, 2)}
    marks["ready_s"] = time.monotonic() - args.spawned

    from torch._dynamo.utils import counters

    print(json.dumps({**{k: round(v, 2) for k, v in marks.items()}, "stages": reports,
                      "inductor": {k: v for k, v in counters["inductor"].items() if "cache" in k}}))


if __name__ == "__main__":
    sys.exit(main())
