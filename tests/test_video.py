"""Tests for pipelines.video: encode synthetic frames with the real ffmpeg, decode them back."""

from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest

from pipelines.acceleration.nvenc import listed_encoders, nvenc_h264_args, trial_encode
from pipelines.params import GenerationParams, OutputFormat
from pipelines.payloads import DecodedFrames
from pipelines.stages import VideoEncodeStage
from pipelines.video import (
    _TO_YUV420P_BT709,
    CODECS,
    DEFAULT_CRF,
    FFmpegError,
    VideoInfo,
    decode_video_frames,
    encode_video,
    ffmpeg_exe,
    nvenc_status,
    probe_video,
    resolve_codec,
    write_video,
)

NUM_FRAMES = 14
SIZE = 64


def moving_square(num_frames: int = NUM_FRAMES, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """A yellow 16x16 square moving 3 px right per frame over a dark blue background."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    frames[..., 2] = 90
    for i in range(num_frames):
        frames[i, 20:36, 2 + 3 * i : 18 + 3 * i] = (255, 210, 0)
    return frames


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return moving_square()


@pytest.fixture(scope="module")
def clips(frames) -> dict[tuple[str, int], bytes]:
    """Every format at 7 and 12 fps, encoded once for the module."""
    return {
        (fmt.value, fps): encode_video(frames, fps=fps, output_format=fmt) for fmt in OutputFormat for fps in (7, 12)
    }


def top_level_boxes(data: bytes) -> list[tuple[str, int]]:
    """(type, offset) of an MP4's top-level boxes."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        boxes.append((kind.decode("latin-1"), offset))
        if size < 8:
            break
        offset += size
    return boxes


def test_bundled_ffmpeg_has_the_encoders():
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    for encoder in ("libx264", "libvpx-vp9", "gif"):
        assert f" {encoder} " in out


@pytest.mark.parametrize(
    "fmt, codec, pix_fmt",
    [("mp4", "h264", "yuv420p"), ("webm", "vp9", "yuv420p"), ("gif", "gif", "bgra")],
)
def test_encode_then_probe(clips, fmt, codec, pix_fmt):
    info = probe_video(clips[(fmt, 7)])
    assert isinstance(info, VideoInfo)
    assert (info.frames, info.width, info.height) == (NUM_FRAMES, SIZE, SIZE)
    assert (info.codec, info.pix_fmt) == (codec, pix_fmt)


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_playback_rate_is_exact_for_mp4_and_webm(clips, fmt):
    slow, fast = probe_video(clips[(fmt, 7)]), probe_video(clips[(fmt, 12)])
    assert (slow.fps, fast.fps) == (7.0, 12.0)
    assert slow.duration == pytest.approx(NUM_FRAMES / 7)
    assert fast.duration == pytest.approx(NUM_FRAMES / 12)


def test_gif_playback_rate_is_rounded_to_centiseconds(clips):
    slow, fast = probe_video(clips[("gif", 7)]), probe_video(clips[("gif", 12)])
    # GIF delays are whole 1/100 s: 7 fps -> 14 cs (7.14 fps), 12 fps -> 8 cs (12.5 fps).
    assert slow.fps == pytest.approx(100 / 14, abs=0.01)
    assert fast.fps == pytest.approx(100 / 8, abs=0.01)
    assert slow.duration > 1.9 and fast.duration < 1.2


def test_mp4_is_h264_yuv420p_with_faststart(clips):
    data = clips[("mp4", 7)]
    boxes = [kind for kind, _ in top_level_boxes(data)]
    assert boxes[0] == "ftyp"
    assert "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat"), boxes
    info = probe_video(data)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")


@pytest.mark.parametrize("fmt, tolerance", [("mp4", 4.0), ("webm", 5.0), ("gif", 5.0)])
def test_decoded_frames_are_close_to_the_input(clips, frames, fmt, tolerance):
    decoded = decode_video_frames(clips[(fmt, 7)])
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
    assert error.mean() < tolerance, error.mean()
    # Order is kept: each decoded frame is closest to the input frame with its own index.
    for i, frame in enumerate(decoded):
        distances = np.abs(frames.astype(np.int16) - frame.astype(np.int16)).mean(axis=(1, 2, 3))
        assert int(distances.argmin()) == i


def test_mp4_colours_survive_the_yuv_round_trip(clips):
    decoded = decode_video_frames(clips[("mp4", 7)])
    square = decoded[0, 24:32, 6:14].reshape(-1, 3).mean(axis=0)
    background = decoded[0, 50:60, 40:60].reshape(-1, 3).mean(axis=0)
    assert np.allclose(square, (255, 210, 0), atol=6), square
    assert np.allclose(background, (0, 0, 90), atol=6), background


def test_crf_changes_size(frames):
    noisy = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
    small = encode_video(noisy, fps=7, crf=40)
    large = encode_video(noisy, fps=7, crf=10)
    assert len(small) < len(large)
    assert DEFAULT_CRF[OutputFormat.mp4] == 18


def test_gif_allows_odd_sizes():
    odd = moving_square(num_frames=3, height=33, width=65)
    info = probe_video(encode_video(odd, fps=10, output_format="gif"))
    assert (info.frames, info.width, info.height) == (3, 65, 33)


def test_single_frame_clip():
    info = probe_video(encode_video(moving_square(num_frames=1), fps=7))
    assert info.frames == 1


def test_write_video_infers_format_and_leaves_no_temp_files(tmp_path, frames):
    path = write_video(frames, tmp_path / "out" / "clip.webm", fps=12)
    assert path == tmp_path / "out" / "clip.webm"
    assert [p.name for p in path.parent.iterdir()] == ["clip.webm"]
    info = probe_video(path)
    assert (info.codec, info.frames, info.fps) == ("vp9", NUM_FRAMES, 12.0)
    gif = write_video(frames, tmp_path / "clip.bin", fps=7, output_format=OutputFormat.gif)
    assert probe_video(str(gif)).codec == "gif"
    with pytest.raises(ValueError, match=r"\.mp4, \.webm or \.gif"):
        write_video(frames, tmp_path / "clip.avi", fps=7)


@pytest.mark.parametrize(
    "bad, kwargs, match",
    [
        (moving_square().astype(np.float32), {}, "dtype uint8"),
        (moving_square()[0], {}, r"shape \[frames, height, width, 3\]"),
        (np.zeros((2, 8, 8, 4), np.uint8), {}, r"shape \[frames, height, width, 3\]"),
        (np.zeros((0, 8, 8, 3), np.uint8), {}, "non-empty"),
        (moving_square(height=64, width=63), {}, "even width and height, got 63x64"),
        (moving_square(height=63, width=64), {"output_format": "webm"}, "webm .*even"),
        (moving_square(), {"fps": 0}, "fps must be"),
        (moving_square(), {"fps": 1000}, "at most 240"),
        (moving_square(), {"crf": 52}, "0 to 51"),
        (moving_square(), {"crf": 64, "output_format": "webm"}, "0 to 63"),
        (moving_square(), {"crf": 20, "output_format": "gif"}, "does not apply to gif"),
        (moving_square().tolist(), {}, "numpy array"),
    ],
)
def test_bad_input_is_rejected_precisely(bad, kwargs, match):
    kwargs = {"fps": 7, **kwargs}
    with pytest.raises(ValueError, match=match):
        encode_video(bad, **kwargs)


def test_unknown_format_is_rejected(frames):
    with pytest.raises(ValueError, match="avi"):
        encode_video(frames, fps=7, output_format="avi")


def test_ffmpeg_encode_failure_reports_stderr():
    # libx264 refuses frames wider than 16384 px: a real ffmpeg failure, not a simulated one.
    too_wide = np.zeros((1, 2, 32768, 3), np.uint8)
    with pytest.raises(FFmpegError) as info:
        encode_video(too_wide, fps=7)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and "\n" not in message
    assert "could not encode mp4" in message and "encoder" in message


@pytest.mark.parametrize("damage", ["garbage", "half", "tail", "empty"])
def test_damaged_clips_fail_to_probe(clips, damage):
    data = clips[("mp4", 7)]
    broken = {
        "garbage": b"definitely not a video" * 10,
        "half": data[: len(data) // 2],
        "tail": data[:-100],  # index intact, last frames' data missing
        "empty": b"",
    }[damage]
    with pytest.raises(FFmpegError) as info:
        probe_video(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(FFmpegError):
        decode_video_frames(broken)


def test_probe_missing_file(tmp_path):
    with pytest.raises(FFmpegError, match="does not exist"):
        probe_video(tmp_path / "nope.mp4")


# -- codec choice: auto | libx264 | h264_nvenc (mp4), the CPU encoders of webm and gif -----------

NVENC = nvenc_status()
needs_no_nvenc = pytest.mark.skipif(NVENC.available, reason="NVENC works here: the fallback cannot be seen")


def test_the_bundled_ffmpeg_lists_nvenc_so_the_other_checks_decide():
    assert {"libx264", "h264_nvenc", "libvpx-vp9", "gif"} <= listed_encoders(ffmpeg_exe())


def test_auto_picks_the_h264_encoder_nvenc_status_names():
    expected = "h264_nvenc" if NVENC.available else "libx264"
    assert resolve_codec("mp4", "auto") == expected
    assert (resolve_codec("webm", "auto"), resolve_codec("gif", "auto")) == ("libvpx-vp9", "gif")


@needs_no_nvenc
def test_auto_falls_back_to_libx264_and_the_clip_plays(frames):
    assert not NVENC.available and NVENC.reason
    data = encode_video(frames, fps=7, codec="auto")
    assert encode_video(frames, fps=7, codec="libx264") == data  # x264 is deterministic: the same encoder ran
    info = probe_video(data)
    assert (info.codec, info.pix_fmt, info.frames) == ("h264", "yuv420p", NUM_FRAMES)


@needs_no_nvenc
def test_explicit_nvenc_is_refused_with_the_reason(frames):
    with pytest.raises(ValueError, match=r"h264_nvenc cannot be used here: .*use libx264 or auto") as info:
        encode_video(frames, fps=7, codec="h264_nvenc")
    assert NVENC.reason in str(info.value)
    # At configuration time: building the stage fails, not each job.
    with pytest.raises(ValueError, match="h264_nvenc cannot be used here"):
        VideoEncodeStage(h264_codec="h264_nvenc")


def test_building_the_stage_needs_no_ffmpeg_unless_nvenc_is_named(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-ffmpeg")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", missing)
    assert VideoEncodeStage().h264_codec == "auto" and VideoEncodeStage(h264_codec="libx264")
    with pytest.raises(ValueError, match=f"h264_nvenc cannot be used here: cannot run ffmpeg {missing}"):
        VideoEncodeStage(h264_codec="h264_nvenc")


@pytest.mark.skipif(not listed_encoders(ffmpeg_exe()) >= {"h264_nvenc"}, reason="this ffmpeg has no NVENC")
def test_trial_encode_reports_ffmpegs_first_error_when_nvenc_cannot_open():
    error = trial_encode(ffmpeg_exe(), video_filter=_TO_YUV420P_BT709)
    if NVENC.available:
        assert error is None
    else:
        assert error and "\n" not in error and "h264_nvenc" in error


@pytest.mark.parametrize(
    "fmt, codec, match",
    [
        ("webm", "libx264", "codec libx264 does not encode webm: use auto or libvpx-vp9"),
        ("gif", "h264_nvenc", "does not encode gif"),
        ("mp4", "libvpx-vp9", "use auto or libx264 or h264_nvenc"),
        ("mp4", "hevc_nvenc", "unknown video codec 'hevc_nvenc'"),
        ("mp4", None, "unknown video codec None"),
    ],
)
def test_codec_that_cannot_encode_the_format_is_rejected(frames, fmt, codec, match):
    with pytest.raises(ValueError, match=match):
        encode_video(frames, fps=7, output_format=fmt, codec=codec)


@pytest.mark.parametrize("fmt, decoder", [("mp4", "h264"), ("webm", "vp9"), ("gif", "gif")])
def test_each_formats_cpu_codec_by_name_decodes(frames, fmt, decoder):
    data = encode_video(frames, fps=7, output_format=fmt, codec=CODECS[OutputFormat(fmt)][0])
    info = probe_video(data)
    assert (info.codec, info.frames) == (decoder, NUM_FRAMES)


def test_nvenc_options_keep_the_quality_intent():
    args = nvenc_h264_args(18)
    assert args[args.index("-cq") + 1] == "18" and args[args.index("-b:v") + 1] == "0"
    assert args[args.index("-rc") + 1] == "vbr" and args[args.index("-preset") + 1] == "p4"
    # NVENC reads -cq 0 as "encoder's choice", so CRF 0 asks for the best constant quality it has.
    assert nvenc_h264_args(0)[nvenc_h264_args(0).index("-cq") + 1] == "1"


def test_video_encode_stage_uses_its_h264_codec_for_mp4_only(frames):
    stage = VideoEncodeStage(h264_codec="libx264")
    assert stage.mp4_encoder == "libx264" and stage.codec_for(OutputFormat.webm) == "auto"
    for fmt, codec in (("mp4", "h264"), ("webm", "vp9")):
        params = GenerationParams(seed=1, num_frames=NUM_FRAMES, fps=7, output_format=fmt).resolved(NUM_FRAMES)
        video = stage(DecodedFrames(frames=frames), params)
        assert probe_video(video.data).codec == codec
    with pytest.raises(ValueError, match="h264_codec must be one of auto, libx264, h264_nvenc, got 'x264'"):
        VideoEncodeStage(h264_codec="x264")
    assert VideoEncodeStage().mp4_encoder == ("h264_nvenc" if NVENC.available else "libx264")


@pytest.mark.skipif(not NVENC.available, reason="needs a GPU with NVENC and an ffmpeg built with it")
def test_nvenc_clip_is_h264_yuv420p_and_close_to_the_input():
    big = moving_square(num_frames=6, height=256, width=320)
    data = encode_video(big, fps=7, codec="h264_nvenc")
    info = probe_video(data)
    assert (info.codec, info.pix_fmt, info.frames, info.width) == ("h264", "yuv420p", 6, 320)
    error = np.abs(decode_video_frames(data).astype(np.int16) - big.astype(np.int16))
    assert error.mean() < 4.0
