#!/usr/bin/env python
"""Benchmark what the model zoo costs: loading models side by side, and LoRA per request.

Measured side by side in one run, on the machine it runs on (CPU by default: the tiny model at
64x64; ``--device cuda`` on a GPU; ``--unet-config svd-xt`` builds the full SVD-XT U-Net with
random weights for the adapter overhead, which needs a GPU to be quick):

1. Loads through one replica's shared-component cache (``pipelines.loader.shared``): a whole model
   cold; a second model with other weights (everything loads again); a fine-tune of the first with
   its own U-Net (only the U-Net loads, the VAE and image encoder come from the cache); the same
   model again while loaded (all hits).
2. The fingerprint that decides sharing: sha256 throughput over a weight file (MB/s), and the
   second call, answered from the (path, size, mtime) cache.
3. LoRA per request (``pipelines.adapters``): U-Net forward seconds of the base model before any
   adapter, the base with an adapter loaded but not active, and with the adapter active, as
   medians over ``--repeat`` interleaved rounds, with the ratios to the plain base.

    python benchmarks/bench_model_zoo.py                 # tiny, CPU
    python benchmarks/bench_model_zoo.py --device cuda --unet-config svd-xt --frames 25 --size 576x1024
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.loader import ModelSpec, SharedComponents, load_components_shared, write_unet_checkpoint  # noqa: E402
from pipelines.loader.fingerprint import file_fingerprint  # noqa: E402
from pipelines.tiny import build_tiny_pipeline, write_tiny_model  # noqa: E402

COMPONENTS = ("image_encoder", "feature_extractor", "vae", "unet", "scheduler")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_loads(work: Path, device: str) -> list[tuple[str, float, int, int]]:
    """(case, seconds, component loads, cache hits) for each load through one cache."""
    a, b = write_tiny_model(work / "a", seed=0), write_tiny_model(work / "b", seed=1)
    c_unet = write_unet_checkpoint(build_tiny_pipeline(seed=2).unet, work / "c-unet.safetensors")
    spec_a = ModelSpec(source=str(a), dtype="fp32", device=device)
    spec_b = ModelSpec(source=str(b), dtype="fp32", device=device)
    cache = SharedComponents()
    rows, held = [], []
    for case, spec, override in (("model A, cold", spec_a, None), ("model B (other weights)", spec_b, None),
                                 ("fine-tune of A (own U-Net file)", spec_a, str(c_unet)),
                                 ("model A again (loaded)", spec_a, None)):
        loads, hits = cache.loads, cache.hits
        (components, _), seconds = timed(lambda: load_components_shared(spec, COMPONENTS, cache=cache,
                                                                        unet_override=override))
        held.append(components)
        rows.append((case, seconds, cache.loads - loads, cache.hits - hits))
    return rows


def bench_fingerprint(work: Path, megabytes: int) -> tuple[float, float]:
    path = work / "weights.bin"
    with path.open("wb") as handle:
        for _ in range(megabytes):
            handle.write(torch.randint(0, 255, (1 << 20,), dtype=torch.uint8).numpy().tobytes())
    _, first = timed(lambda: file_fingerprint(path))
    _, again = timed(lambda: file_fingerprint(path))
    return megabytes / first, again


def unet_for(config: str, device: str, dtype: torch.dtype):
    if config == "tiny":
        return build_tiny_pipeline(seed=0).unet.to(device=device, dtype=dtype).eval()
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device(device):
        return UNetSpatioTemporalConditionModel().to(dtype=dtype).eval()  # SVD-XT's architecture


def bench_lora(work: Path, *, config: str, device: str, dtype: torch.dtype, frames: int, size: tuple[int, int],
               repeat: int, rank: int) -> dict[str, float]:
    from pipelines.adapters import LoraAdapters, write_tiny_lora

    unet = unet_for(config, device, dtype)
    latent_h, latent_w = size[0] // 8, size[1] // 8
    generator = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(2, frames, 8, latent_h, latent_w, generator=generator).to(device, dtype)
    states = torch.randn(2, 1, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * 2).to(device, dtype)

    def forward():
        with torch.no_grad():
            unet(sample, torch.tensor(10.0, device=device), encoder_hidden_states=states,
                 added_time_ids=time_ids, return_dict=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    forward()  # warm-up
    plain = [timed(forward)[1] for _ in range(repeat)]
    directory = write_tiny_lora(unet, work / "lora", seed=3, rank=rank)
    adapters = LoraAdapters(unet)
    load_seconds = adapters.load("bench", directory)
    base, lora = [], []

    def with_adapter():
        with adapters.active("bench"):
            forward()

    forward(), with_adapter()  # warm-up with the hooks in place
    for _ in range(repeat):
        base.append(timed(forward)[1])
        lora.append(timed(with_adapter)[1])
    return {"plain": statistics.median(plain), "base": statistics.median(base), "lora": statistics.median(lora),
            "load": load_seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--unet-config", choices=["tiny", "svd-xt"], default="tiny")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on CPU, bf16 on a GPU")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--size", default="64x64", help="HxW in pixels of the U-Net's input")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--hash-mb", type=int, default=256, help="size of the file fingerprinted")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("fp32" if args.device == "cpu" else "bf16")]
    height, width = (int(part) for part in args.size.split("x"))
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("\n1. loads through one shared-component cache (tiny models)")
        print(f"   {'case':34} {'seconds':>8} {'loaded':>7} {'shared':>7}")
        for case, seconds, loads, hits in bench_loads(work, args.device):
            print(f"   {case:34} {seconds:8.3f} {loads:7d} {hits:7d}")
        rate, again = bench_fingerprint(work, args.hash_mb)
        print(f"\n2. fingerprint: {rate:.0f} MB/s sha256 over a {args.hash_mb} MB file; again (cached): "
              f"{again * 1e3:.2f} ms")
        result = bench_lora(work, config=args.unet_config, device=args.device, dtype=dtype, frames=args.frames,
                            size=(height, width), repeat=args.repeat, rank=args.rank)
        print(f"\n3. LoRA per request ({args.unet_config} U-Net, rank {args.rank}, {args.frames} frames at "
              f"{height}x{width}, batch 2, median of {args.repeat}): adapter load {result['load']:.3f} s")
        for name, label in (("plain", "base, no adapter loaded"), ("base", "base, adapter loaded, inactive"),
                            ("lora", "adapter active")):
            print(f"   {label:32} {result[name] * 1e3:9.2f} ms/forward  x{result[name] / result['plain']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
