"""Tests for pipelines.segments: segment planning, seams, stitching and output frame counts."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.segments import (
    SegmentPlan,
    output_frame_count,
    plan_segments,
    seam_frame,
    stitch_segments,
)

SIZE = (6, 8)  # height, width: small, and not square so a transposed array would show


def make_segments(num_segments: int, frames: int, overlap: int, *, seed: int = 0) -> list[np.ndarray]:
    """Random segments that obey the pipeline's rule: segment k+1's frame 0 is segment k's seam frame."""
    rng = np.random.default_rng(seed)
    segments = []
    for k in range(num_segments):
        segment = rng.integers(0, 256, (frames, *SIZE, 3), dtype=np.uint8)
        if k:
            segment[0] = segments[-1][frames - 1 - overlap]
        segments.append(segment)
    return segments


# -- plan_segments -------------------------------------------------------------------------------


def test_svd_xt_eight_seconds_is_two_segments_of_49_frames():
    plan = plan_segments(duration_s=8, fps=7, frames_per_segment=25, overlap_frames=0)
    assert plan == SegmentPlan(num_segments=2, frames_per_segment=25, overlap_frames=0, duration_s=8.0)
    assert plan.total_frames == 49
    assert plan.seam_index == 24
    assert plan.generated_fps == 6.0
    assert plan.describe() == "2 segments x 25 frames, overlap 0 (seam at frame 24) -> 49 frames over 8 s"


@pytest.mark.parametrize(
    "duration_s, fps, frames, overlap, segments, total",
    [
        (8, 7, 25, 0, 2, 49),  # 56 / 24 = 2.33
        (1, 7, 25, 0, 1, 25),  # 0.29 -> at least one segment
        (0.1, 7, 14, 0, 1, 14),
        (7.5, 8, 25, 0, 3, 73),  # 60 / 24 = 2.5 exactly: rounds half up (Python's round() gives 2)
        (10.5, 8, 25, 0, 4, 97),  # 84 / 24 = 3.5 -> 4
        (8, 7, 25, 4, 3, 65),  # 56 / 20 = 2.8; 25 + 2 * 20
        (8, 7, 14, 0, 4, 53),  # SVD: 56 / 13 = 4.3; 14 + 3 * 13
        (8, 7, 14, 11, 28, 68),  # o = F - 3: two new frames per segment
        (20, 6, 25, 2, 5, 113),  # 120 / 22 = 5.45
    ],
)
def test_plan_segments_counts(duration_s, fps, frames, overlap, segments, total):
    plan = plan_segments(
        duration_s=duration_s, fps=fps, frames_per_segment=frames, overlap_frames=overlap, max_segments=32
    )
    assert plan.num_segments == segments
    assert plan.total_frames == total == frames + (segments - 1) * (frames - 1 - overlap)
    assert plan.duration_s == duration_s
    assert plan.seam_index == frames - 1 - overlap


def test_no_duration_is_one_pass_at_the_conditioning_rate():
    plan = plan_segments(duration_s=None, fps=7, frames_per_segment=25, overlap_frames=0)
    assert (plan.num_segments, plan.total_frames) == (1, 25)
    assert plan.duration_s == pytest.approx(24 / 7)
    assert plan.generated_fps == pytest.approx(7)
    assert plan.describe().startswith("1 segment x 25 frames")


def test_max_segments_is_enforced_and_named():
    # 16 segments of 24 new frames at 7 fps: anything rounding to 17 segments is refused.
    assert plan_segments(duration_s=56.5, fps=7, frames_per_segment=25, max_segments=16).num_segments == 16
    with pytest.raises(ValueError, match=r"needs 17 segments .* max_segments=16") as error:
        plan_segments(duration_s=57, fps=7, frames_per_segment=25, max_segments=16)
    assert "durations under 56.57 s" in str(error.value)
    # The default is the app config's: 8 segments.
    with pytest.raises(ValueError, match=r"needs 9 segments .* max_segments=8"):
        plan_segments(duration_s=31, fps=7, frames_per_segment=25)
    with pytest.raises(ValueError, match=r"needs 4 segments .* max_segments=2"):
        plan_segments(duration_s=8, fps=7, frames_per_segment=14, max_segments=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(overlap_frames=23), r"overlap_frames must be from 0 to 22 \(frames per segment - 3\) for 25-frame"),
        (dict(overlap_frames=-1), r"overlap_frames must be from 0 to 22"),
        (dict(overlap_frames=1.0), r"overlap_frames must be an integer"),
        (dict(frames_per_segment=2, overlap_frames=0), r"frames_per_segment must be an integer of at least 3"),
        (dict(fps=0), r"fps must be an integer of at least 1, got 0"),
        (dict(fps=7.5), r"fps must be an integer"),
        (dict(duration_s=0), r"duration_s must be a finite number of seconds above 0, got 0"),
        (dict(duration_s=-2.0), r"duration_s must be a finite number"),
        (dict(duration_s=float("inf")), r"duration_s must be a finite number"),
        (dict(duration_s=True), r"duration_s must be a finite number"),
        (dict(max_segments=0), r"max_segments must be an integer of at least 1"),
    ],
)
def test_plan_segments_errors(kwargs, message):
    args = dict(duration_s=8, fps=7, frames_per_segment=25, overlap_frames=0) | kwargs
    with pytest.raises(ValueError, match=message):
        plan_segments(**args)


def test_segment_plan_validates_when_built_directly():
    with pytest.raises(ValueError, match="overlap_frames must be from 0 to 11"):
        SegmentPlan(num_segments=2, frames_per_segment=14, overlap_frames=12, duration_s=4.0)
    with pytest.raises(ValueError, match="num_segments must be an integer of at least 1"):
        SegmentPlan(num_segments=0, frames_per_segment=14, overlap_frames=0, duration_s=4.0)


# -- seam_frame ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [0, 1, 5])
def test_seam_frame_is_frame_f_minus_1_minus_o(overlap):
    plan = plan_segments(duration_s=8, fps=7, frames_per_segment=14, overlap_frames=overlap)
    (segment,) = make_segments(1, 14, overlap)
    seam = seam_frame(segment, plan)
    assert seam.shape == (*SIZE, 3)
    np.testing.assert_array_equal(seam, segment[13 - overlap])
    segment[13 - overlap] = 0
    assert seam.any(), "the seam frame must be a copy, not a view into the segment"


def test_seam_frame_checks_the_segment_length():
    plan = plan_segments(duration_s=8, fps=7, frames_per_segment=25)
    with pytest.raises(ValueError, match="frames has 14 frames; the plan's segments have 25"):
        seam_frame(np.zeros((14, *SIZE, 3), np.uint8), plan)
    with pytest.raises(ValueError, match="frames must have dtype uint8"):
        seam_frame(np.zeros((25, *SIZE, 3), np.float32), plan)


# -- stitch_segments -----------------------------------------------------------------------------


def test_stitch_without_overlap_keeps_each_seam_once():
    segments = make_segments(3, 25, 0)
    clip = stitch_segments(segments, overlap_frames=0)
    assert clip.dtype == np.uint8
    assert clip.shape == (25 + 2 * 24, *SIZE, 3)
    np.testing.assert_array_equal(clip[:25], segments[0])
    np.testing.assert_array_equal(clip[24:49], segments[1])  # frame 24 is both: kept once
    np.testing.assert_array_equal(clip[48:], segments[2])
    # No duplicate at the seams: a duplicated frame would show as two equal neighbours.
    assert not any(np.array_equal(clip[i], clip[i + 1]) for i in range(len(clip) - 1))


def test_stitch_matches_the_plan():
    plan = plan_segments(duration_s=8, fps=7, frames_per_segment=14, overlap_frames=3)
    segments = make_segments(plan.num_segments, 14, 3)
    assert len(stitch_segments(segments, overlap_frames=3)) == plan.total_frames


def test_stitch_with_overlap_cross_fades_the_shared_frames():
    frames, overlap = 10, 2
    a = np.full((frames, *SIZE, 3), 200, np.uint8)
    b = np.full((frames, *SIZE, 3), 11, np.uint8)
    a[frames - 1 - overlap] = 77  # the seam frame
    b[0] = 77  # ...which opens the next segment
    clip = stitch_segments([a, b], overlap_frames=overlap)
    assert len(clip) == frames + (frames - 1 - overlap) == 17
    seam = frames - 1 - overlap  # 7: where b's frame 0 lands
    np.testing.assert_array_equal(clip[:seam], a[:seam])
    np.testing.assert_array_equal(clip[seam], a[seam])  # shared frame 0: exactly a's (= b's frame 0)
    # Shared frame 1 of 2: half of each, computed in float and rounded (200 / 2 + 11 / 2 = 105.5).
    assert np.all(clip[seam + 1] == np.rint(np.float32(0.5) * 200 + np.float32(0.5) * 11))
    np.testing.assert_array_equal(clip[seam + 2], b[2])  # shared frame o: exactly b's frame o
    np.testing.assert_array_equal(clip[seam + 3 :], b[3:])


def test_stitch_fade_weights_are_j_over_o():
    frames, overlap = 12, 4
    a = np.zeros((frames, *SIZE, 3), np.uint8)
    b = np.full((frames, *SIZE, 3), 200, np.uint8)
    b[0] = a[frames - 1 - overlap]
    clip = stitch_segments([a, b], overlap_frames=overlap)
    start = frames - 1 - overlap
    assert [int(clip[start + j, 0, 0, 0]) for j in range(overlap + 1)] == [0, 50, 100, 150, 200]


def test_single_segment_is_returned_as_is():
    (segment,) = make_segments(1, 14, 0)
    np.testing.assert_array_equal(stitch_segments([segment], overlap_frames=0), segment)


@pytest.mark.parametrize(
    "segments, overlap, message",
    [
        ([], 0, "segments must be a non-empty list"),
        ([np.zeros((14, 6, 8, 3), np.uint8), np.zeros((25, 6, 8, 3), np.uint8)], 0,
         r"segments\[1\] has shape \[25, 6, 8, 3\]; segments\[0\] has \[14, 6, 8, 3\]"),
        ([np.zeros((14, 6, 8, 3), np.uint8), np.zeros((14, 6, 6, 3), np.uint8)], 0, r"segments\[1\] has shape"),
        ([np.zeros((14, 6, 8), np.uint8)], 0, r"segments\[0\] must have shape \[frames, height, width, 3\]"),
        ([np.zeros((14, 6, 8, 3), np.float32)], 0, r"segments\[0\] must have dtype uint8"),
        ([np.zeros((14, 6, 8, 3), np.uint8)], 12, "overlap_frames must be from 0 to 11"),
        ([np.zeros((2, 6, 8, 3), np.uint8)], 0, "frames per segment must be an integer of at least 3"),
    ],
)  # fmt: skip
def test_stitch_errors(segments, overlap, message):
    with pytest.raises(ValueError, match=message):
        stitch_segments(segments, overlap_frames=overlap)


# -- output_frame_count --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "generated, duration_s, output_fps, expected",
    [
        (49, 8, 24, 193),  # 8 s at 24 fps: the encoded clip lasts 193 / 24 = 8.04 s
        (25, 24 / 7, 24, 83),  # one SVD-XT pass: 82.3 -> 82 intervals
        (25, 24 / 7, 30, 104),  # 102.86 -> 103
        (14, 13 / 7, 24, 46),  # SVD: 44.57 -> 45
        (49, 8, 6, 49),  # the generated rate itself
        (49, 8.3, 24, 200),  # 199.2 -> 199
        (49, 2.0, 10, 21),  # fewer frames than generated
        (73, 0.0625, 24, 3),  # 1.5 intervals: rounds half up to 2
        (2, 1.0, 1, 2),
    ],
)
def test_output_frame_count(generated, duration_s, output_fps, expected):
    count = output_frame_count(generated_frames=generated, duration_s=duration_s, output_fps=output_fps)
    assert count == expected
    # The last frame's time is within half a frame of the duration.
    assert abs((count - 1) / output_fps - duration_s) <= 0.5 / output_fps + 1e-12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(generated_frames=1), "generated_frames must be an integer of at least 2"),
        (dict(duration_s=0.0), "duration_s must be a finite number of seconds above 0"),
        (dict(output_fps=0), "output_fps must be a number above 0"),
        (dict(output_fps=float("nan")), "output_fps must be a number above 0"),
    ],
)
def test_output_frame_count_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        output_frame_count(**(dict(generated_frames=49, duration_s=8.0, output_fps=24) | kwargs))
