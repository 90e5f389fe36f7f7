"""What travels between the job driver and the stage replicas besides the payloads themselves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class JobContext:
    job_id: str
    tenant: str
    owner: str = ""
    """The lease owner (the driving runner): the stages' progress notes are guarded by it."""
    trace: dict[str, str] = field(default_factory=dict)
    """W3C trace context (``traceparent``) of the driver's job span."""
    output_key: str = ""
    """Where the stage that produces the final value stores the clip."""
    segment: int = 0
    """Which segment of a long clip a per-segment stage works on (0 for the first, and for a clip
    made in one pass)."""
    segment_key: str = ""
    """Long clips only: where the last per-segment stage stores its frames (a retry resumes from
    stored segments), returning a :class:`StoredSegment` instead of the frames."""
    note_progress: bool = True
    """Whether the stage records its start as the job's progress. In a long clip only the first
    segment's image encode does (then the Sampler's steps, counted across segments), so the
    progress bar never steps back between segments."""


@dataclass
class StageOutput:
    """A stage's result as it leaves the replica: the value for the next stage, and the seconds
    spent by every stage so far (each replica adds its own), so the driver learns all timings from
    the last result without touching the payloads in between."""

    value: Any
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepReport:
    """A stage that reports steps streams these to the driver: ``step`` 0 when it starts, then
    after every step."""

    stage: str
    step: int
    total: int
    at: float = 0.0
    """Epoch seconds when the step ended (when the stage started, for step 0)."""


@dataclass(frozen=True)
class StoredSegment:
    """One segment's decoded frames, stored in output storage under the job (uint8 ``.npy``)."""

    index: int
    key: str
    num_frames: int
    seam: Any = None
    """The frame that conditions the next segment (uint8 [H, W, 3]), handed on in memory so the
    next segment need not read the stored frames back; None in a SegmentSet and after a resume
    (then it is read from ``key``)."""


@dataclass(frozen=True)
class SegmentSet:
    """Every segment of a long clip, in order: the video-encode stage joins them."""

    segments: tuple[StoredSegment, ...]


@dataclass(frozen=True)
class StoredVideo:
    """The final stage's result in the Serve application: the clip, already in output storage."""

    key: str
    content_type: str
    file_size: int
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0
