"""Smoke test of benchmarks/bench_pipeline.py: the CI mode (--tiny), with --text-to-video and with
--duration, --boundaries, --count-flops and --retime.

The full-size benchmark needs a GPU; these runs check that the script works end to end on CPU,
that it reports what docs/benchmarks.md records, and that the boundary sizes and FLOP anchors
quoted in docs/pipeline.md are what the code computes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_pipeline.py"
# One torch thread per subprocess: on a shared 2-core machine two OpenMP threads per process make
# the tiny model 10-50x slower whenever the other core is busy (threads spin at every barrier).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Image-to-video's route; text-to-video's starts with text_to_image (run only for a prompt).
STAGES = ("image_encode", "sampling", "decode", "video_encode")
T2V_STAGES = ("text_to_image", *STAGES)
BOUNDARIES = ("image_encode->sampling", "sampling->decode", "decode->video_encode")
T2V_BOUNDARIES = ("text_to_image->image_encode", *BOUNDARIES)


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
    # Only the stages of the image-to-video route are timed (text_to_image is registered, not run).
    assert tuple(data["stage_seconds"]) == STAGES
    assert data["variants"] == ["image_to_video"] and data["runs"]["image_to_video"]["route"] == list(STAGES)
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
    assert set(sizes) == set(BOUNDARIES)
    assert "1.84 MB" in result.stdout
    assert "44.24 MB" in result.stdout


def test_boundaries_for_text_to_video(tmp_path):
    """The first frame crosses text_to_image->image_encode, and rides on to the decoder."""
    out = tmp_path / "boundaries.json"
    result = run_bench("--boundaries", "--text-to-video", "--json", out)
    assert result.returncode == 0, result.stderr
    sizes = json.loads(out.read_text())["bytes"]
    frame = 576 * 1024 * 3  # 1,769,472 B, RGB uint8
    assert list(sizes) == list(T2V_BOUNDARIES)
    assert sizes["text_to_image->image_encode"] == frame
    assert sizes["image_encode->sampling"] == 2 * 1024 + 2 * 4 * 72 * 128 + generator_state_bytes() + frame
    assert sizes["sampling->decode"] == 1_843_200 + frame  # 3,612,672
    assert sizes["decode->video_encode"] == 44_236_800
    assert "1.77 MB" in result.stdout and "3.61 MB" in result.stdout


def run_tiny(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    result = run_bench("--tiny", *args, "--json", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result, json.loads(out.read_text())


def check_run(run: dict, stages: tuple[str, ...]) -> None:
    assert run["route"] == list(stages)
    assert tuple(run["stage_seconds"]) == stages
    for stage in stages:
        assert run["stage_seconds"][stage] > 0, stage
        assert run["stage_cpu_seconds"][stage] >= 0, stage
    assert run["total_seconds"] == pytest.approx(sum(run["stage_seconds"].values()))  # one measured run
    assert run["video_bytes"] > 0
    split = run["video_encode_split"]
    assert split["encode_seconds"] > 0 and split["other_seconds"] >= 0
    assert (split["retime_seconds"] or 0) + split["encode_seconds"] <= run["stage_seconds"]["video_encode"]


def test_tiny_text_to_video_writes_text_to_image_figures(tmp_path):
    result, data = run_tiny(tmp_path, "--text-to-video")
    assert data["variants"] == ["image_to_video", "text_to_video"]
    assert tuple(data["stage_seconds"]) == STAGES  # the top-level figures stay image-to-video's
    check_run(data["runs"]["image_to_video"], STAGES)
    run = data["runs"]["text_to_video"]
    check_run(run, T2V_STAGES)
    assert run["params"]["t2i_steps"] == 4 and run["params"]["t2i_guidance_scale"] == 5.0
    assert run["text_to_image_seconds_per_step"] == pytest.approx(run["stage_seconds"]["text_to_image"] / 4)
    assert (run["num_segments"], run["generated_frames"], run["output_frames"]) == (1, 14, 14)
    assert run["video_encode_split"]["retime_seconds"] is None  # one pass at 7 fps: nothing retimed
    assert data["text_to_image_model"] == "tiny SDXL (pipelines.tiny_t2i)"
    assert set(data["text_to_image_parameters"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}

    # The first frame (64x64 RGB) crosses to image_encode and rides with the encoded image and the
    # latents (text-to-video opens on it exactly): each boundary is one frame more than image-to-video's.
    measured, frame = run["bytes_between_stages"], 64 * 64 * 3
    assert set(measured) == set(T2V_BOUNDARIES)
    assert measured == run["bytes_between_stages_expected"]
    assert measured["text_to_image->image_encode"] == frame
    assert measured["image_encode->sampling"] == data["bytes_between_stages"]["image_encode->sampling"] + frame
    assert measured["sampling->decode"] == data["bytes_between_stages"]["sampling->decode"] + frame

    ratios = data["comparisons"]
    assert ratios["text_to_video_over_image_to_video"] == pytest.approx(
        run["total_seconds"] / data["runs"]["image_to_video"]["total_seconds"])
    assert 0 < ratios["text_to_image_share_of_text_to_video"] < 1
    text = result.stdout
    assert "side by side" in text and "text-to-video / image-to-video, total:" in text
    assert "text_to_image" in text and "tiny SDXL" in text


def test_tiny_long_clip_writes_segment_figures(tmp_path):
    """14-frame passes, 4 s at fps 7 -> 2 segments, 27 generated frames -> 97 at 24 fps."""
    result, data = run_tiny(tmp_path, "--duration", "4", "--output-fps", "24")
    assert data["variants"] == ["image_to_video", "long_clip"]
    one, run = data["runs"]["image_to_video"], data["runs"]["long_clip"]
    check_run(one, STAGES)
    check_run(run, STAGES)
    assert (run["num_segments"], run["generated_frames"], run["output_frames"], run["output_fps"]) == (2, 27, 97, 24)
    assert (one["num_segments"], one["generated_frames"], one["output_frames"]) == (1, 14, 14)
    assert run["interpolation"] == "mci" and run["clip_seconds"] == 4
    assert run["sampling_seconds_per_step"] == pytest.approx(run["stage_seconds"]["sampling"] / (4 * 2))
    assert run["video_encode_split"]["retime_seconds"] > 0
    # Per segment, each payload carries the conditioning frame; the encoder gets both segments.
    assert run["bytes_between_stages_expected"]["decode->video_encode"] == 2 * 14 * 64 * 64 * 3
    for boundary, size in run["bytes_between_stages"].items():
        assert size == run["bytes_between_stages_expected"][boundary], boundary

    micro = run["retime_modes"]
    assert micro["input"] == {"frames": 27, "height": 64, "width": 64} and micro["output_frames"] == 97
    assert micro["seconds"]["blend"] > 0 and micro["seconds"]["mci"] > 0
    ratios = data["comparisons"]
    assert ratios["long_clip_one_pass"] == "image_to_video"
    assert ratios["long_clip_over_one_pass"] == pytest.approx(run["total_seconds"] / one["total_seconds"])
    assert set(ratios["long_clip_over_one_pass_per_stage"]) == set(STAGES)
    assert ratios["retime_mci_over_blend"] == pytest.approx(micro["mci_over_blend"])
    text = result.stdout
    assert "long clip / one pass (image-to-video), total:" in text
    assert "= retime (mci)" in text and "mci / blend" in text


def test_retime_mode_times_blend_mci_and_encode(tmp_path):
    out = tmp_path / "retime.json"
    result = run_bench("--retime", "--frames", "8", "--height", "64", "--width", "64", "--duration", "1",
                       "--output-fps", "24", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["mode"] == "retime" and data["content"] == "pan"
    assert data["input"] == {"frames": 8, "height": 64, "width": 64}
    assert data["output_frames"] == 25  # floor(1 s x 24 + 0.5) + 1
    assert data["seconds"]["blend"] > 0 and data["seconds"]["mci"] > 0 and data["encode_seconds"] > 0
    assert data["mci_over_blend"] == pytest.approx(data["seconds"]["mci"] / data["seconds"]["blend"])
    assert "mci / blend" in result.stdout


def test_sdxl_configs_give_the_published_parameter_counts():
    """The SDXL base 1.0 configs written in the benchmark build the released architecture (counted
    on the meta device: nothing is allocated)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_text_to_video
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert bench_text_to_video.sdxl_parameter_counts() == bench_text_to_video.SDXL_PUBLISHED_PARAMETERS


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

    result = run_bench("--text-to-video", "--duration", "8", "--output-fps", "24", "--steps", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("bench_pipeline.py: full-size SVD-XT on CPU"), result.stderr


def test_model_zoo_benchmark_prints_its_three_tables():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_model_zoo.py"), "--repeat", "2",
                             "--hash-mb", "4"], cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The fine-tune loads only its U-Net; the VAE and image encoder come from the cache.
    assert re.search(r"fine-tune of A \(own U-Net file\)\s+[\d.]+\s+1\s+2", out), out
    assert re.search(r"model A again \(loaded\)\s+[\d.]+\s+0\s+3", out), out
    assert "MB/s sha256" in out and "adapter active" in out and "x1.000" in out


@pytest.mark.slow
@pytest.mark.second_lane
@pytest.mark.parametrize("engine", ["jit", "aot"])
def test_fastpath_tiny_runs_every_section(tmp_path, engine):
    """--fastpath on CPU (Inductor's C++ backend; jit in regional scope to keep the compile short):
    every section asked for runs and reports; compiled frames equal eager's; the warm start, a fresh process
    with empty local caches, finds the compile cache and builds no graph from scratch (aot: loads
    its package and compiles nothing)."""
    out = tmp_path / "fastpath.json"
    # FP8 and the low-VRAM counts do not depend on the engine: run once, with aot (the shorter compile).
    extra = ["--compile-scope", "regional"] if engine == "jit" else ["--fp8", "--low-vram"]
    result = run_bench("--fastpath", "--tiny", "--frames", "4", "--steps", "2", "--decode-chunk-size", "4",
                       "--compile-engine", engine, *extra, "--budget-s", "3000", "--json", out, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    sections = data["sections"]
    expected = {"build", "eager", "compiled", "warm_start"} | ({"low_vram", "fp8"} if engine == "aot" else set())
    assert set(sections) == expected, data["skipped"]
    assert not any("error" in figures for figures in sections.values()), sections

    eager, compiled = sections["eager"], sections["compiled"]
    assert set(eager["stage_s"]) == set(compiled["stage_s"]) == {"sampling", "decode"}
    assert eager["host_transfer"]["uint8"]["host_bytes"] * 4 == eager["host_transfer"]["float32"]["host_bytes"]
    assert compiled["cold_start"]["sampling"]["cache"] == "miss"
    assert compiled["cold_start"]["sampling"]["cache_bytes"] > 0
    difference = compiled["difference_to_eager"]
    # fp32 on CPU: reordered reductions only (measured 3e-6; bf16 on an H200 gives ~1e-2).
    assert difference["finite"] and difference["latents_rel_rmse"] < 1e-4 and difference["frames_max_abs"] <= 1

    warm = sections["warm_start"]
    assert warm["stages"]["sampling"]["cache"] == "hit"
    if engine == "jit":
        assert warm["inductor"].get("fxgraph_cache_hit", 0) >= 1 and warm["inductor"].get("fxgraph_cache_miss", 0) == 0
    else:
        assert compiled["cold_start"]["sampling"]["aot_packages"] == 1
        assert warm["stages"]["sampling"]["aot_build_s"] == 0 and warm["inductor"] == {}  # nothing compiled
    assert warm["process_started_s"] < warm["imports_done_s"] <= warm["weights_loaded_s"] < warm["ready_s"]

    if engine == "jit":
        return
    low_vram = sections["low_vram"]  # no CUDA: counted for the full-size architecture (measured on an H200: equal)
    assert low_vram["method"].startswith("counted on the meta device")
    assert low_vram["unet_step_25f_gib"] == 7.73 and low_vram["unet_step_25f_ff_chunked_gib"] < 4.5
    assert low_vram["decode_25f_chunk25_gib"] > low_vram["decode_25f_chunk8_gib"] > low_vram["decode_25f_chunk1_gib"]
    fp8 = sections["fp8"]
    assert fp8["linears_fp8"] > 0
    # Approximate by design: close to bf16/fp32, never equal.
    assert 25 < fp8["quality_vs_bf16_compiled"]["psnr_db"] < 200 and 0.9 < fp8["quality_vs_bf16_compiled"]["ssim"] < 1


@pytest.mark.parametrize("flags, message", [
    (["--compile-engine", "aot"], "--compile-engine is a --fastpath option"),
    (["--fastpath", "--tiny", "--compile-engine", "aot", "--compile-mode", "reduce-overhead"],
     "engine 'aot' does not record CUDA graphs"),
    (["--fastpath", "--tiny", "--compile-engine", "aot", "--compile-scope", "regional"], "scope must be 'full'"),
])
def test_fastpath_option_errors_are_one_line(flags, message):
    result = run_bench(*flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr.strip().splitlines()[-1], result.stderr


def test_gpu_script_without_wheels_says_how_to_get_them(tmp_path):
    """benchmarks/gpu_fastpath.sh, the one prepared call for the GPU machine, stops with one line
    (before any model is built) when the wheels it installs there were not downloaded."""
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_fastpath.sh")], cwd=tmp_path,
                            env={**SUBPROCESS_ENV, "WHEELS": str(tmp_path / "none"), "OUT": str(tmp_path / "out")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"gpu_fastpath.sh: no wheels in {tmp_path / 'none'} (run with --download first)"
