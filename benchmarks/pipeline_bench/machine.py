"""The machine a run is recorded on: the CPU or GPU, and the versions of the libraries."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import bench_text_to_video as t2v  # benchmarks/ (light: no torch)


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} CPU, {os.cpu_count()} logical cores"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()}, torch threads {torch.get_num_threads()}"


def lib_versions() -> dict:
    import diffusers
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "ffmpeg": t2v.ffmpeg_version()}
