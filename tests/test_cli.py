"""The ``svd-serve`` CLI, run for real in subprocesses against the tiny random-weight model.

Generation is kept tiny (64x64, 4 frames, 2 steps) so the whole file runs in well under a minute.
Every bad input must give exactly one line on stderr (``svd-serve generate: ...``), a non-zero
exit status, no traceback and no output file; the bad-input cases fail before the model loads.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipelines.video import probe_video

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = REPO_ROOT / "pipelines" / "assets" / "sample.png"
TINY_ARGS = ["--width", "64", "--height", "64", "--num-frames", "4", "--num-inference-steps", "2",
             "--device", "cpu", "--dtype", "fp32", "--quiet"]
# One torch thread per subprocess: on a shared 2-core machine two OpenMP threads per process make
# the tiny model 10-50x slower whenever the other core is busy (threads spin at every barrier).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STAGES = ("image_encode", "sampling", "decode", "video_encode")


def run_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def generate(model: Path, image: str | Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("generate", "--model", model, "--image", image, "--out", out, *TINY_ARGS, *extra)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's contract for expected failures; returns the message after the prefix."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("svd-serve generate: "), lines[0]
    return lines[0].removeprefix("svd-serve generate: ")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that holds (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-images")
    paths = {name: folder / name for name in
             ("cmyk.jpg", "rgba.png", "not-an-image.png", "truncated.png", "bomb-pillow.png", "bomb-limit.png")}
    Image.new("CMYK", (96, 64), (200, 40, 10, 20)).save(paths["cmyk.jpg"], quality=90)
    rgba = Image.new("RGBA", (96, 64), (30, 120, 220, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 48, 64))  # left half fully transparent
    rgba.save(paths["rgba.png"])
    paths["not-an-image.png"].write_bytes(b"this is plain text, not a PNG\n" * 4)
    data = SAMPLE_IMAGE.read_bytes()
    paths["truncated.png"].write_bytes(data[: len(data) // 2])
    # 20000 x 20000 = 400 MP trips Pillow's own guard; 5000 x 5000 = 25 MP only svd-serve's 16.7 MP limit.
    paths["bomb-pillow.png"].write_bytes(png_header_only(20000, 20000))
    paths["bomb-limit.png"].write_bytes(png_header_only(5000, 5000))
    (folder / "a-directory.png").mkdir()
    paths["a-directory.png"] = folder / "a-directory.png"
    with Image.open(paths["cmyk.jpg"]) as check:
        assert check.mode == "CMYK"
    return paths


# -- happy paths ---------------------------------------------------------------------------------


def test_generate_mp4_and_summary_line(tiny_model_dir, tmp_path):
    out = tmp_path / "nested" / "clip.mp4"
    result = generate(tiny_model_dir, SAMPLE_IMAGE, out, "--seed", "1234", "--output-fps", "10")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    info = probe_video(out)  # decodes every frame: the file is playable
    assert (info.frames, info.width, info.height, info.codec) == (4, 64, 64, "h264")
    assert info.fps == pytest.approx(10)

    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    summary = lines[0]
    assert summary.startswith(f"{out}: seed 1234, 4 frames 64x64 @ 10 fps, 2 steps"), summary
    for stage in STAGES:
        assert re.search(rf"\b{stage} \d+\.\d\ds\b", summary), (stage, summary)
    assert re.search(r"model load \d+\.\ds$", summary), summary


def test_generate_webm_from_cmyk_jpeg(tiny_model_dir, images, tmp_path):
    out = tmp_path / "clip.webm"
    result = generate(tiny_model_dir, images["cmyk.jpg"], out, "--seed", "5", "--fps", "6")
    assert result.returncode == 0, result.stderr
    info = probe_video(out)
    assert (info.frames, info.width, info.height, info.codec) == (4, 64, 64, "vp9")
    assert info.fps == pytest.approx(6)  # without --output-fps the clip plays at --fps
    assert "seed 5, 4 frames 64x64 @ 6 fps" in result.stdout
    assert "webm" in result.stdout


def test_generate_gif_from_rgba_png(tiny_model_dir, images, tmp_path):
    out = tmp_path / "clip.GIF"  # the suffix decides the format, case-insensitively
    result = generate(tiny_model_dir, images["rgba.png"], out, "--output-fps", "10")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    info = probe_video(out)
    assert (info.frames, info.width, info.height, info.codec) == (4, 64, 64, "gif")
    assert info.fps == pytest.approx(10)  # 10 fps = 10/100 s per frame, exact in GIF
    assert re.search(r": seed \d+, 4 frames", result.stdout)  # a random seed is drawn and reported


def test_tiny_model_writes_a_loadable_model(tmp_path, tiny_pipeline):
    import torch

    from pipelines.loader import ModelSpec, load_pipeline

    target = tmp_path / "tiny"
    result = run_cli("tiny-model", target)
    assert result.returncode == 0, result.stderr
    assert f"wrote tiny random-weight SVD to {target}" in result.stdout
    assert (target / "model_index.json").is_file()

    pipe = load_pipeline(ModelSpec(source=str(target), dtype="fp32", device="cpu"))
    assert type(pipe).__name__ == "StableVideoDiffusionPipeline"
    assert pipe.unet.config.num_frames == tiny_pipeline.unet.config.num_frames
    # Default --seed 0 gives the same weights as the in-process tiny model (build_tiny_pipeline(seed=0)).
    expected = tiny_pipeline.unet.state_dict()
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# -- bad inputs: one line, non-zero exit, no traceback, no output --------------------------------


@pytest.mark.parametrize(
    ("image_key", "expected"),
    [
        ("missing.png", "does not exist"),
        ("a-directory.png", "is a directory"),
        ("not-an-image.png", "is not an image"),
        ("truncated.png", "truncated or corrupt PNG"),
        ("bomb-pillow.png", "the limit is 16,777,216 pixels"),
        ("bomb-limit.png", "5000x5000 = 25,000,000 pixels; the limit is 16,777,216 pixels"),
    ],
)
def test_bad_image_file(tiny_model_dir, images, tmp_path, image_key, expected):
    image = images.get(image_key, tmp_path / image_key)
    out = tmp_path / "clip.mp4"
    message = assert_one_line_error(generate(tiny_model_dir, image, out))
    assert expected in message
    assert str(image) in message
    assert not out.exists()


def test_image_url_to_closed_port(tiny_model_dir, tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/image.png?token=secret"
    message = assert_one_line_error(generate(tiny_model_dir, url, tmp_path / "clip.mp4"))
    assert f"http://127.0.0.1:{port}/image.png" in message
    assert "secret" not in message  # query strings may hold credentials


@pytest.mark.parametrize(
    ("out_name", "extra", "expected"),
    [
        ("clip.avi", [], "use a .mp4, .webm or .gif file name"),
        ("clip.mp4", ["--output-format", "gif"], "does not match --output-format gif"),
        ("clip.mp4", ["--motion-bucket-id", "300"], "motion_bucket_id: 300 is out of range (allowed: 1 to 255)"),
        ("clip.mp4", ["--num-inference-steps", "0"], "num_inference_steps: 0 is out of range (allowed: 1 to 150)"),
        ("clip.mp4", ["--width", "100"], "width: 100 is out of range (allowed: 64 to 1536, a multiple of 8)"),
        ("clip.mp4", ["--min-guidance-scale", "5", "--max-guidance-scale", "2"],
         "min_guidance_scale (5.0) must not exceed max_guidance_scale (2.0)"),
        ("clip.mp4", ["--device", "tpu"], "--device tpu: use auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_parameters(tiny_model_dir, tmp_path, out_name, extra, expected):
    out = tmp_path / out_name
    # Later options win in argparse, so `extra` overrides the tiny defaults.
    message = assert_one_line_error(generate(tiny_model_dir, SAMPLE_IMAGE, out, *extra))
    assert expected in message
    assert not out.exists()


def test_missing_model_dir(tmp_path):
    """With default --device and --dtype: on a CPU machine the CLI picks fp32 itself, so the loader's
    "fp16 is not supported on CPU" warning does not turn the one-line error into two."""
    model = tmp_path / "no-such-model"
    result = run_cli("generate", "--model", model, "--image", SAMPLE_IMAGE, "--out", tmp_path / "clip.mp4")
    assert assert_one_line_error(result) == f"Model directory {model} does not exist"


def test_model_dir_without_model_index(tiny_model_dir, tmp_path):
    model = tmp_path / "no-index"
    shutil.copytree(tiny_model_dir, model)
    (model / "model_index.json").unlink()
    message = assert_one_line_error(generate(model, SAMPLE_IMAGE, tmp_path / "clip.mp4"))
    assert f"Model directory {model} has no model_index.json" in message


@pytest.mark.parametrize("kind", ["directory", "under-a-file"])
def test_unwritable_out_fails_before_loading(tiny_model_dir, tmp_path, kind):
    if kind == "directory":
        out = tmp_path / "taken.mp4"
        out.mkdir()
        expected = "is a directory"
    else:
        (tmp_path / "plain-file").write_text("x")
        out = tmp_path / "plain-file" / "clip.mp4"
        expected = "cannot create the folder"
    message = assert_one_line_error(generate(tiny_model_dir, SAMPLE_IMAGE, out))
    assert message.startswith(f"--out {out}") and expected in message
