"""Tests for pipelines.interpolate: retiming generated frames with the real ffmpeg minterpolate."""

from __future__ import annotations

import re
import subprocess
from fractions import Fraction

import numpy as np
import pytest

from pipelines import interpolate
from pipelines.interpolate import FILTERS, input_rate, retime
from pipelines.segments import output_frame_count
from pipelines.video import FFmpegError, encode_video, ffmpeg_exe, probe_video

BACKGROUND = 60  # blue level of the square scenes' background


def sliding_texture(num_frames: int, height: int = 64, width: int = 64, *, step: int = 3) -> np.ndarray:
    """A random texture panning left by ``step`` px per frame: every frame differs, motion is uniform."""
    rng = np.random.default_rng(num_frames)
    base = rng.integers(0, 256, (height, width + step * num_frames, 3), dtype=np.uint8)
    return np.stack([base[:, step * i : step * i + width] for i in range(num_frames)])


def moving_square(num_frames: int, *, step: int = 8, size: int = 16, height: int = 64, width: int = 128) -> np.ndarray:
    """A white ``size`` px square moving right by ``step`` px per frame over a dark blue background."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    frames[..., 2] = BACKGROUND
    for i in range(num_frames):
        frames[i, 24 : 24 + size, 8 + step * i : 8 + size + step * i] = 255
    return frames


def centroid_x(frame: np.ndarray) -> float:
    """Brightness-weighted mean column of the bright red (the square's; the background has none)."""
    red = frame[..., 0].astype(np.float64)
    # Ignore faint red: minterpolate's YUV round trip leaves ~1 level of it over the background.
    weights = np.where(red > 100, red, 0).sum(axis=0)
    return float((weights * np.arange(frame.shape[1])).sum() / weights.sum())


# -- counts and end points -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, duration_s, output_fps, expected",
    [
        (49, 8.0, 24, 193),  # two SVD-XT segments over 8 s at 24 fps
        (14, 13 / 7, 24, 46),  # one SVD pass at its 7 fps: 44.6 intervals round up
        (25, 24 / 7, 30, 104),
        (49, 8.3, 24, 200),  # 199.2 intervals round down: the last frame is interpolated
        (14, 2.0, 25, 51),  # input rate 13/2
        (49, 2.0, 10, 21),  # fewer output frames than generated
        (14, 1.0, 60, 61),
    ],
)
def test_retime_gives_exactly_m_frames(count, duration_s, output_fps, expected):
    frames = sliding_texture(count)
    out = retime(frames, duration_s=duration_s, output_fps=output_fps, mode="blend")
    assert expected == output_frame_count(generated_frames=count, duration_s=duration_s, output_fps=output_fps)
    assert out.shape == (expected, 64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], frames[0])
    last_time = (expected - 1) / output_fps
    if last_time >= duration_s - 1e-9:
        np.testing.assert_array_equal(out[-1], frames[-1])
    else:  # within half an output frame before the last generated frame: mostly it
        assert np.abs(out[-1].astype(int) - frames[-1]).mean() < np.abs(out[-1].astype(int) - frames[-2]).mean()


def test_mci_count_and_end_points_for_two_segments_over_8_s():
    frames = sliding_texture(49)
    out = retime(frames, duration_s=8.0, output_fps=24, mode="mci")
    assert len(out) == 193
    np.testing.assert_array_equal(out[0], frames[0])
    np.testing.assert_array_equal(out[-1], frames[-1])


def test_output_frames_on_generated_times_are_the_generated_frames():
    frames = sliding_texture(14)
    out = retime(frames, duration_s=13 / 7, output_fps=21, mode="mci")  # 7 -> 21 fps: every third frame
    assert len(out) == 40
    for i in range(14):
        np.testing.assert_array_equal(out[3 * i], frames[i])
    # ...and the ones in between are new frames (minterpolate's, not copies of a neighbour).
    assert not np.array_equal(out[1], frames[0]) and not np.array_equal(out[1], frames[1])


def test_same_rate_returns_the_input_and_whole_divisors_skip_ffmpeg(monkeypatch):
    frames = sliding_texture(25)
    assert retime(frames, duration_s=24 / 7, output_fps=7, mode="mci") is frames

    def no_ffmpeg(*args, **kwargs):
        raise AssertionError("ffmpeg should not run when every output frame is a generated frame")

    monkeypatch.setattr(interpolate, "_minterpolate", no_ffmpeg)
    halved = retime(frames, duration_s=1.0, output_fps=12, mode="blend")  # 24 -> 12 fps
    np.testing.assert_array_equal(halved, frames[::2])


def test_input_rate_is_an_exact_fraction():
    assert input_rate(generated_frames=49, duration_s=8.0) == Fraction(6)
    assert input_rate(generated_frames=14, duration_s=13 / 7) == Fraction(7)
    assert input_rate(generated_frames=49, duration_s=8.3) == Fraction(480, 83)


@pytest.mark.parametrize("height, width", [(64, 64), (128, 256), (33, 65)])
def test_sizes_including_odd_ones(height, width):
    frames = sliding_texture(7, height, width)
    for mode in ("blend", "mci"):
        out = retime(frames, duration_s=1.0, output_fps=15, mode=mode)
        assert out.shape == (16, height, width, 3)
        np.testing.assert_array_equal(out[0], frames[0])


# -- what the modes make -------------------------------------------------------------------------


def test_mci_moves_the_square_where_blend_double_exposes_it():
    frames = moving_square(12)  # 8 px per frame
    mci = retime(frames, duration_s=11.0, output_fps=2, mode="mci")  # 1 -> 2 fps: one frame between each pair
    blend = retime(frames, duration_s=11.0, output_fps=2, mode="blend")
    assert len(mci) == len(blend) == 23
    half = (255 + 0) // 2  # red channel: square 255, background 0
    # Away from the clip's ends: the first pairs, before motion-vector predictors settle, and the
    # last one (with the repeated last frame after it) leave a partial ghost.
    for i in range(2, 10):
        between = 2 * i + 1
        left, right = centroid_x(frames[i]), centroid_x(frames[i + 1])
        # mci: one full-bright square, half-way along its path.
        red = mci[between, ..., 0].astype(int)
        assert left < centroid_x(mci[between]) < right
        assert centroid_x(mci[between]) == pytest.approx((left + right) / 2, abs=0.5)
        assert (red > 240).sum() == 16 * 16
        assert (abs(red - half) < 30).sum() < 10
        x0 = 8 + 8 * i + 4
        assert (red[24:40, x0 : x0 + 16] > 240).all()
        # blend: both squares at half brightness where they do not overlap (two 8 px strips each side).
        red = blend[between, ..., 0].astype(int)
        assert (abs(red - half) < 30).sum() == 2 * 16 * 8
        assert (red > 240).sum() == 16 * 8  # only the overlap stays full-bright


# -- encoding the result -------------------------------------------------------------------------


def test_retimed_frames_encode_to_m_frames_at_24_fps(tmp_path):
    frames = sliding_texture(49)
    out = retime(frames, duration_s=8.0, output_fps=24, mode="mci")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_video(out, fps=24, output_format="mp4"))
    info = probe_video(clip)  # decodes every frame: nb_read_frames
    assert (info.frames, info.width, info.height, info.fps) == (193, 64, 64, 24.0)
    # No ffprobe here: ffmpeg -i prints the container duration and the stream's average rate.
    header = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(clip)], capture_output=True, text=True).stderr
    hours, minutes, seconds = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", header).groups()
    assert int(hours) * 3600 + int(minutes) * 60 + float(seconds) == pytest.approx(193 / 24, abs=0.01)  # 8.04 s
    assert re.search(r"Video: h264.*, 24 fps,", header)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="none"), "retime makes frames; with interpolation 'none' play the generated frames as they are"),
        (dict(mode="dup"), "mode must be 'blend' or 'mci', got 'dup'"),
        (dict(output_fps=0), "output_fps must be an integer from 1 to 60, got 0"),
        (dict(output_fps=61), "output_fps must be an integer from 1 to 60, got 61"),
        (dict(output_fps=24.0), "output_fps must be an integer from 1 to 60, got 24.0"),
        (dict(output_fps=True), "output_fps must be an integer from 1 to 60"),
        (dict(duration_s=0.0), "duration_s must be a finite number of seconds above 0"),
        (dict(duration_s=float("nan")), "duration_s must be a finite number of seconds above 0"),
        (dict(frames=np.zeros((1, 64, 64, 3), np.uint8)), "retime needs at least 2 frames"),
        (dict(frames=np.zeros((4, 64, 64), np.uint8)), r"frames must have shape \[frames, height, width, 3\]"),
        (dict(frames=np.zeros((4, 64, 64, 3), np.float32)), "frames must have dtype uint8, got float32"),
        (dict(frames=[[0]]), "frames must be a numpy array, not list"),
        (dict(frames=np.zeros((4, 16, 64, 3), np.uint8)), r"mci needs frames of at least 32x32 pixels, got 64x16"),
    ],
)
def test_retime_errors(kwargs, message):
    args = dict(frames=np.zeros((4, 64, 64, 3), np.uint8), duration_s=1.0, output_fps=24, mode="mci") | kwargs
    frames = args.pop("frames")
    with pytest.raises(ValueError, match=message):
        retime(frames, **args)


def test_blend_works_below_mci_minimum_size():
    frames = np.zeros((4, 16, 20, 3), np.uint8)
    assert retime(frames, duration_s=1.0, output_fps=24, mode="blend").shape == (25, 16, 20, 3)


def test_ffmpeg_failure_is_reported(monkeypatch):
    monkeypatch.setitem(FILTERS, "blend", "no_such_filter={fps}")
    with pytest.raises(FFmpegError, match=r"ffmpeg minterpolate \(blend\) failed: .*no_such_filter"):
        retime(sliding_texture(4), duration_s=1.0, output_fps=24, mode="blend")
