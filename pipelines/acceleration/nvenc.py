"""Whether this process can encode H.264 on an NVIDIA GPU (NVENC) through ffmpeg, and the
encoder options that keep libx264's quality intent.

Three checks, in order, each cached for the life of the process (per ffmpeg binary):

1. the binary lists ``h264_nvenc`` (``ffmpeg -hide_banner -encoders``); imageio-ffmpeg's static
   build does, Debian's does, a minimal build may not;
2. a CUDA device is visible to this process (``torch.cuda.device_count()``, which honours
   ``CUDA_VISIBLE_DEVICES``; a Ray actor without a GPU share sees none, and NVENC opens the
   device through the same CUDA driver);
3. a trial encode of two synthetic frames with the very options real clips use succeeds: it
   proves the driver's NVENC library loads, the GPU has an encoder and a session is free.

Quality: ``-rc vbr -cq N -b:v 0`` is NVENC's constant-quality mode, the counterpart of x264's
CRF; ``N`` is the CRF asked for (NVENC's ``-cq 0`` means "let the encoder choose", so CRF 0 maps
to 1). The scales are close but not identical: at the same number NVENC files are usually
somewhat larger for the same look. ``-preset p4 -tune hq`` is NVENC's middle preset (p1 fastest,
p7 best), like x264's ``medium``.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass

#: The smallest frame the trial encode uses: NVENC has minimum frame sizes (they differ by GPU
#: generation), and the clips served are far larger than this.
TRIAL_SIZE = "256x256"
_TRIAL_TIMEOUT_S = 60
_STDERR_LINES = 2


@dataclass(frozen=True)
class NvencStatus:
    """Whether ``h264_nvenc`` works here; ``reason`` says why not (or what was checked)."""

    available: bool
    reason: str


def nvenc_h264_args(crf: int) -> list[str]:
    """The ``-c:v h264_nvenc`` options for a constant-rate factor on x264's 0-51 scale."""
    return [
        "-c:v", "h264_nvenc", "-preset", "p4", "-tune", "hq", "-profile:v", "high",
        "-rc", "vbr", "-cq", str(max(1, crf)), "-b:v", "0",
    ]  # fmt: skip


@functools.lru_cache(maxsize=None)
def listed_encoders(exe: str) -> frozenset[str]:
    """Names of the encoders the ffmpeg binary ``exe`` was built with."""
    result = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30)
    names = set()
    for line in result.stdout.splitlines():
        fields = line.split()
        # Lines look like " V....D libx264   libx264 H.264 / AVC ...": flags, then the name.
        if len(fields) >= 2 and len(fields[0]) == 6 and fields[0][0] in "VAS":
            names.add(fields[1])
    return frozenset(names)


def cuda_device_visible() -> tuple[bool, str]:
    """(visible, what was seen): whether this process sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed, so no CUDA device can be checked for"
    count = torch.cuda.device_count()
    if count:
        return True, f"{count} CUDA device(s) visible"
    where = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = f" (CUDA_VISIBLE_DEVICES={where!r})" if where is not None else ""
    return False, f"no CUDA device is visible to this process{note}"


def trial_encode(exe: str, *, video_filter: str) -> str | None:
    """Encode two synthetic frames with ``h264_nvenc``; None if it worked, else ffmpeg's error."""
    cmd = [
        exe, "-hide_banner", "-nostdin", "-loglevel", "error",
        "-f", "lavfi", "-i", f"testsrc2=size={TRIAL_SIZE}:rate=7", "-frames:v", "2",
        "-vf", video_filter, *nvenc_h264_args(18), "-pix_fmt", "yuv420p",
        "-f", "null", "-",
    ]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, timeout=_TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the trial encode took over {_TRIAL_TIMEOUT_S} s"
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.decode("utf-8", errors="replace").splitlines() if line.strip()]
    # The cause comes first ("Cannot load libcuda.so.1", "OpenEncodeSessionEx failed: out of
    # memory"); the lines after it are threads shutting down.
    return " | ".join(lines[:_STDERR_LINES]) or f"ffmpeg exited with status {result.returncode}"


@functools.lru_cache(maxsize=None)
def nvenc_status(exe: str, *, video_filter: str) -> NvencStatus:
    """The three checks of the module docstring, run once per process and binary."""
    try:
        encoders = listed_encoders(exe)
    except (OSError, subprocess.SubprocessError) as error:
        return NvencStatus(False, f"cannot run ffmpeg {exe}: {error}")
    if "h264_nvenc" not in encoders:
        return NvencStatus(False, f"the ffmpeg binary {exe} has no h264_nvenc encoder")
    visible, seen = cuda_device_visible()
    if not visible:
        return NvencStatus(False, seen)
    error = trial_encode(exe, video_filter=video_filter)
    if error is not None:
        return NvencStatus(False, f"a trial h264_nvenc encode failed: {error}")
    return NvencStatus(True, f"h264_nvenc works ({seen})")
