"""Long clips: how many passes of the model a duration takes, and how their frames are stitched.

Definitions (docs/pipeline.md copies these):

* A long clip is made of ``S`` *segments* of ``F`` frames each. ``F`` is the model's frames per
  pass (25 for SVD-XT, 14 for SVD).
* ``o = overlap_frames``, with ``0 <= o <= F - 3``. Segment ``k + 1`` is conditioned on frame
  ``F - 1 - o`` of segment ``k`` (the *seam index*; ``o = 0``: the last frame), and its own first
  frame IS that frame (the pipeline keeps every segment's frame 0 equal to the image it was
  conditioned on). So consecutive segments share ``o + 1`` frames: shared frame ``j`` (``j`` in
  ``0..o``) is frame ``F - 1 - o + j`` of segment ``k`` and frame ``j`` of segment ``k + 1``.
* Stitching keeps every shared frame once. With ``o = 0`` the single shared frame (the seam) is
  kept once: no duplicate, no jump. With ``o > 0`` the shared frames are cross-faded linearly:
  shared frame ``j`` is ``(1 - j / o) * segment_k + (j / o) * segment_k+1``, computed in float32 and
  rounded to the nearest integer. Shared frame 0 is exactly segment ``k``'s frame ``F - 1 - o``
  (equal to segment ``k + 1``'s frame 0 anyway) and shared frame ``o`` is exactly segment
  ``k + 1``'s frame ``o``: the fade hands over from one segment to the next within the overlap.
* Each segment after the first adds ``F - 1 - o`` new frames, so the clip has
  ``N = F + (S - 1) * (F - 1 - o)`` generated frames.
* Segments for a requested duration ``D`` seconds at the conditioning frame rate ``fps`` (SVD's
  ``fps`` parameter, default 7): ``S = max(1, floor(D * fps / (F - 1 - o) + 0.5))`` (round half up,
  not Python's round-half-to-even), at most ``max_segments`` (more is a ValueError naming the
  limit). Example: SVD-XT (``F = 25``), fps 7, ``D = 8``, ``o = 0``: 56 / 24 = 2.33, so ``S = 2``
  and ``N = 49``.
* Without a requested duration the clip is one segment, and its duration is ``D = (F - 1) / fps``:
  the generated frames at the conditioning rate (with ``N`` frames in general, ``(N - 1) / fps``).
* The ``N`` generated frames span the clip's duration evenly: frame ``i`` is at time
  ``i * D / (N - 1)``. Because ``S`` is rounded, that rate, ``(N - 1) / D``, is near the
  conditioning ``fps`` but not always equal to it (6 frames/s in the example above).
* The output clip at ``output_fps`` ``R`` has ``M = floor(D * R + 0.5) + 1`` frames, frame ``j`` at
  time ``j / R`` (made by :func:`pipelines.interpolate.retime`). Example: ``N = 49``, ``D = 8``,
  ``R = 24``: ``M = 193``; the encoded clip lasts ``M / R = 8.04`` s, within one frame of 8 s.

Everything here is pure: numpy only, no model and no ffmpeg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Default cap on the number of segments one clip may take (one model pass each): the app
#: config's ``max_segments`` default too.
DEFAULT_MAX_SEGMENTS = 8
#: Fewest frames per pass: the overlap rule ``o <= F - 3`` needs at least 3.
MIN_FRAMES_PER_SEGMENT = 3


@dataclass(frozen=True)
class SegmentPlan:
    """How a clip is cut into passes of the model (see the module docstring for the rules)."""

    num_segments: int  # S
    frames_per_segment: int  # F
    overlap_frames: int  # o
    duration_s: float  # D: the time the generated frames span, first to last frame

    def __post_init__(self) -> None:
        _check_int("num_segments", self.num_segments, low=1)
        _check_frames_per_segment(self.frames_per_segment)
        _check_overlap(self.overlap_frames, self.frames_per_segment)
        _check_duration(self.duration_s)

    @property
    def seam_index(self) -> int:
        """Frame ``F - 1 - o`` of a segment: the one that conditions (and opens) the next segment."""
        return self.frames_per_segment - 1 - self.overlap_frames

    @property
    def new_frames_per_segment(self) -> int:
        """Frames each segment after the first adds to the clip, ``F - 1 - o`` (= the seam index)."""
        return self.seam_index

    @property
    def total_frames(self) -> int:
        """Generated frames after stitching, ``N = F + (S - 1) * (F - 1 - o)``."""
        return self.frames_per_segment + (self.num_segments - 1) * self.seam_index

    @property
    def generated_fps(self) -> float:
        """The rate at which the generated frames span the duration, ``(N - 1) / D``."""
        return (self.total_frames - 1) / self.duration_s

    def describe(self) -> str:
        """One line, e.g. ``2 segments x 25 frames, overlap 0 (seam at frame 24) -> 49 frames over 8 s``."""
        plural = "segment" if self.num_segments == 1 else "segments"
        return (
            f"{self.num_segments} {plural} x {self.frames_per_segment} frames, overlap {self.overlap_frames} "
            f"(seam at frame {self.seam_index}) -> {self.total_frames} frames over {self.duration_s:g} s"
        )


def plan_for(params, *, max_segments: int = DEFAULT_MAX_SEGMENTS) -> SegmentPlan | None:
    """The plan of a long clip from resolved generation parameters (``duration_s``, ``fps``,
    ``num_frames`` per pass, ``overlap_frames``); None for a clip made in one pass (no
    ``duration_s``), which needs no plan and may have fewer frames than a segment."""
    if params.duration_s is None:
        return None
    return plan_segments(duration_s=params.duration_s, fps=params.fps, frames_per_segment=params.num_frames,
                         overlap_frames=params.overlap_frames, max_segments=max_segments)


def plan_segments(
    *,
    duration_s: float | None,
    fps: int,
    frames_per_segment: int,
    overlap_frames: int = 0,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
) -> SegmentPlan:
    """Plan the segments of a clip lasting ``duration_s`` seconds.

    Args:
        duration_s: the clip's length in seconds; ``None``: one segment, lasting ``(F - 1) / fps``.
        fps: SVD's ``fps`` conditioning (frames per second the model is told it makes), >= 1.
        frames_per_segment: ``F``, the model's frames per pass, >= 3.
        overlap_frames: ``o``, from 0 to ``F - 3``.
        max_segments: most segments allowed, >= 1.

    Returns:
        The plan, with ``S = max(1, floor(D * fps / (F - 1 - o) + 0.5))``.

    Raises:
        ValueError: a bad argument, or a duration that needs more than ``max_segments`` segments.
    """
    _check_int("fps", fps, low=1)
    _check_frames_per_segment(frames_per_segment)
    _check_overlap(overlap_frames, frames_per_segment)
    _check_int("max_segments", max_segments, low=1)
    step = frames_per_segment - 1 - overlap_frames
    if duration_s is None:
        return SegmentPlan(
            num_segments=1,
            frames_per_segment=frames_per_segment,
            overlap_frames=overlap_frames,
            duration_s=(frames_per_segment - 1) / fps,
        )
    _check_duration(duration_s)
    # Round half up: Python's round() would send 2.5 segments to 2 and 3.5 to 4.
    num_segments = max(1, math.floor(duration_s * fps / step + 0.5))
    if num_segments > max_segments:
        # Durations below this round to at most max_segments.
        limit_s = (max_segments + 0.5) * step / fps
        raise ValueError(
            f"duration_s={duration_s:g} needs {num_segments} segments of {frames_per_segment} frames at fps {fps} "
            f"(overlap {overlap_frames}); the limit is max_segments={max_segments} (durations under {limit_s:.4g} s)"
        )
    return SegmentPlan(
        num_segments=num_segments,
        frames_per_segment=frames_per_segment,
        overlap_frames=overlap_frames,
        duration_s=float(duration_s),
    )


def seam_frame(frames: np.ndarray, plan: SegmentPlan) -> np.ndarray:
    """The frame of a segment that conditions the next one: ``frames[F - 1 - o]``, a copy.

    ``frames`` is one segment, ``uint8`` ``[F, H, W, 3]``; the result is ``[H, W, 3]``.
    """
    check_frames("frames", frames)
    if frames.shape[0] != plan.frames_per_segment:
        raise ValueError(f"frames has {frames.shape[0]} frames; the plan's segments have {plan.frames_per_segment}")
    # A copy: the conditioning image must not change if the caller reuses the segment's buffer.
    return frames[plan.seam_index].copy()


def stitch_segments(segments: list[np.ndarray], *, overlap_frames: int) -> np.ndarray:
    """Join segments into one clip, keeping each seam once and cross-fading the overlaps.

    Args:
        segments: one or more ``uint8`` arrays ``[F, H, W, 3]`` of the same shape, in order.
        overlap_frames: ``o``, as planned (0 to ``F - 3``).

    Returns:
        ``uint8`` ``[N, H, W, 3]`` with ``N = F + (S - 1) * (F - 1 - o)``: the shared frames of
        consecutive segments appear once, cross-faded as the module docstring defines.

    Raises:
        ValueError: no segments, a bad shape or dtype, segments of different shapes, bad overlap.
    """
    if not isinstance(segments, (list, tuple)) or not segments:
        raise ValueError("segments must be a non-empty list of frame arrays")
    for k, segment in enumerate(segments):
        check_frames(f"segments[{k}]", segment)
    shape = segments[0].shape
    for k, segment in enumerate(segments[1:], start=1):
        if segment.shape != shape:
            raise ValueError(f"segments[{k}] has shape {list(segment.shape)}; segments[0] has {list(shape)}")
    frames_per_segment = shape[0]
    _check_frames_per_segment(frames_per_segment, name="frames per segment")
    _check_overlap(overlap_frames, frames_per_segment)

    step = frames_per_segment - 1 - overlap_frames
    total = frames_per_segment + (len(segments) - 1) * step
    out = np.empty((total, *shape[1:]), dtype=np.uint8)
    out[:frames_per_segment] = segments[0]
    for k, segment in enumerate(segments[1:], start=1):
        start = k * step  # where segment k's frame 0 lands: the previous segment's seam frame
        # Shared frame 0 stays the previous segment's (weight 0 for the new one): with o = 0 the
        # seam is kept once; with o > 0 the fade starts there and ends on the new segment's frame o.
        for j in range(1, overlap_frames + 1):
            weight = np.float32(j / overlap_frames)
            # One frame at a time in float32: a whole segment in float would be 4x its uint8 size.
            mixed = (np.float32(1) - weight) * out[start + j].astype(np.float32) + weight * segment[j].astype(
                np.float32
            )
            out[start + j] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        out[start + overlap_frames + 1 : start + frames_per_segment] = segment[overlap_frames + 1 :]
    return out


def output_frame_count(*, generated_frames: int, duration_s: float, output_fps: float) -> int:
    """Frames of the output clip, ``M = floor(D * R + 0.5) + 1``, frame ``j`` at time ``j / R``.

    ``M`` depends only on the duration and the output rate; ``generated_frames`` (``N``, at least
    2: the first and the last frame span the duration) is checked so callers cannot pass a clip
    that has no duration.
    """
    _check_int("generated_frames", generated_frames, low=2)
    _check_duration(duration_s)
    if isinstance(output_fps, bool) or not isinstance(output_fps, (int, float)) or not output_fps > 0:
        raise ValueError(f"output_fps must be a number above 0, got {output_fps!r}")
    if not math.isfinite(output_fps):
        raise ValueError(f"output_fps must be finite, got {output_fps!r}")
    return math.floor(duration_s * output_fps + 0.5) + 1


# -- checks ------------------------------------------------------------------------------------


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")


def _check_frames_per_segment(value: object, *, name: str = "frames_per_segment") -> None:
    _check_int(name, value, low=MIN_FRAMES_PER_SEGMENT)


def _check_overlap(overlap: object, frames_per_segment: int) -> None:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)):
        raise ValueError(f"overlap_frames must be an integer, got {overlap!r}")
    highest = frames_per_segment - 3
    if not 0 <= overlap <= highest:
        # F - 3: each segment after the first must add at least two new frames.
        raise ValueError(
            f"overlap_frames must be from 0 to {highest} (frames per segment - 3) for {frames_per_segment}-frame "
            f"segments, got {overlap}"
        )


def _check_duration(duration_s: object) -> None:
    if (
        isinstance(duration_s, bool)
        or not isinstance(duration_s, (int, float))
        or not math.isfinite(duration_s)
        or duration_s <= 0
    ):
        raise ValueError(f"duration_s must be a finite number of seconds above 0, got {duration_s!r}")


def check_frames(name: str, frames: object) -> None:
    """``frames`` is uint8 RGB frames, [F, H, W, 3]; a ValueError naming ``name`` otherwise."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, not {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"{name} must have shape [frames, height, width, 3], got {list(frames.shape)}")
