"""Smoke test of benchmarks/bench_pipeline.py: the CI mode (--tiny), --boundaries and --count-flops.

The full-size benchmark needs a GPU; these runs check that the script works end to end on CPU,
that it reports what docs/benchmarks.md records, and that the boundary sizes and FLOP anchors
quoted in docs/pipeline.md are what the code computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_pipeline.py"
# One torch thread per subprocess: on a shared 2-core machine two OpenMP threads per process make
# the tiny model 10-50x slower whenever the other core is busy (threads spin at every barrier).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STAGES = ("image_encode", "sampling", "decode", "video_encode")
BOUNDARIES = ("image_encode->sampling", "sampling->decode", "decode->video_encode")


def run_bench(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def generator_state_bytes() -> int:
    import torch

    return torch.Generator("cpu").get_state().numel()


def test_tiny_run_writes_per_stage_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("--tiny", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads(out.read_text())

    assert data["mode"] == "tiny" and data["device"] == "cpu"
    assert (data["config"]["frames"], data["config"]["height"], data["config"]["width"], data["config"]["steps"]) == (
        14, 64, 64, 4)
    for stage in STAGES:
        assert data["stage_seconds"][stage] > 0, stage
        assert data["stage_cpu_seconds"][stage] >= 0, stage
    assert data["total_seconds"] >= sum(data["stage_seconds"].values()) * 0.999
    assert data["sampling_seconds_per_step"] == pytest.approx(data["stage_seconds"]["sampling"] / 4)
    assert data["flops"] is None  # the TFLOP anchors describe SVD-XT, not the tiny model
    assert data["peak_gpu_memory_bytes"] is None and data["peak_rss_bytes"] > 0

    # Measured boundary bytes = what the shapes predict: tiny CLIP embedding 32 wide, fp32 tensors.
    measured = data["bytes_between_stages"]
    assert set(measured) == set(BOUNDARIES)
    assert measured == data["bytes_between_stages_expected"]
    assert measured["image_encode->sampling"] == 4 * (1 * 1 * 32 + 1 * 4 * 8 * 8) + generator_state_bytes()
    assert measured["sampling->decode"] == 4 * 1 * 14 * 4 * 8 * 8  # 14,336
    assert measured["decode->video_encode"] == 14 * 64 * 64 * 3  # 172,032 uint8
    assert data["video_bytes"] > 0

    text = result.stdout
    for stage in STAGES:
        assert stage in text
    assert "published figures for comparison (NOT measured here)" in text
    assert "22.6 s/video" in text
    assert f"wrote {out}" in text


def test_boundaries_for_svd_xt(tmp_path):
    out = tmp_path / "boundaries.json"
    result = run_bench("--boundaries", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["shape"] == {"frames": 25, "height": 576, "width": 1024, "dtype": "fp16"}
    sizes = data["bytes"]
    assert sizes["image_encode->sampling"] == 2 * 1024 + 2 * 4 * 72 * 128 + generator_state_bytes()  # ~81 kB
    assert sizes["sampling->decode"] == 1_843_200  # [1, 25, 4, 72, 128] fp16, ~1.8 MB
    assert sizes["decode->video_encode"] == 44_236_800  # 25 x 576 x 1024 x 3 uint8, ~44 MB
    assert "1.84 MB" in result.stdout
    assert "44.24 MB" in result.stdout


def test_count_flops_matches_the_mfu_anchors():
    """159.9 TFLOP per guided U-Net step and 173.6 TFLOP per 25-frame decode, counted on the meta device."""
    result = run_bench("--count-flops")
    assert result.returncode == 0, result.stderr
    assert "one guided step (batch 2): 159.9 TFLOP (linear rule: 159.9)" in result.stdout
    assert "173.6 TFLOP (linear rule: 173.6)" in result.stdout


def test_full_size_on_cpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full-size run would start")
    result = run_bench("--steps", "1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_pipeline.py: full-size SVD-XT on CPU"), result.stderr
