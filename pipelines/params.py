"""Generation parameters: the single source of validation for the CLI and the HTTP API.

``GenerationParams`` mirrors the keyword arguments of ``diffusers.StableVideoDiffusionPipeline``
with the same defaults, adds the serving-only fields (``seed``, ``output_fps``, ``output_format``,
``aspect_ratio``), text-to-video (``prompt`` and the text-to-image stage's own fields), long clips
(``duration_s``, ``overlap_frames``) and frame interpolation (``interpolation``), and validates every
range and combination. :func:`describe_validation_error` turns a pydantic error into one line that
names the field and its allowed range.

The frame-count rules (docs/pipeline.md) are in :mod:`pipelines.segments`.
"""

from __future__ import annotations

import secrets
from enum import Enum
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_SEED = 2**32 - 2
MAX_LONG_SIDE = 1536
#: Sides are multiples of the VAE's downsampling factor (8 for SVD and the SD family); the U-Nets
#: pad odd latent sizes themselves (``forward_upsample_size``).
SIZE_MULTIPLE = 8
MIN_SIDE = 64
#: Largest frame: 1536x864 (16:9 at 1.5x SVD-XT's training size) or any shape with as many pixels.
MAX_PIXELS = 1536 * 864
#: Longest clip any request may ask for; a deployment's own maximum (``max_duration_s``) is lower.
MAX_DURATION_S = 60.0
MAX_PROMPT_CHARS = 4000
#: Output frame rates that interpolation may reach (ffmpeg's minterpolate beyond this is pointless).
MAX_INTERPOLATED_FPS = 60
#: The text-to-image stage's defaults (SDXL base's usual settings).
DEFAULT_T2I_GUIDANCE_SCALE = 5.0
DEFAULT_T2I_STEPS = 30

#: Aspect presets, (width, height) in pixels. 16:9 is SVD-XT's training resolution.
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "16:9": (1024, 576),
    "9:16": (576, 1024),
    "1:1": (768, 768),
    "4:3": (1024, 768),
    "3:4": (768, 1024),
}
DEFAULT_ASPECT = "16:9"
#: Named sizes beyond the presets (1.5x 16:9 and its portrait).
LARGE_SIZES: dict[str, tuple[int, int]] = {"1536x864": (1536, 864), "864x1536": (864, 1536)}

Interpolation = Literal["none", "blend", "mci"]


class OutputFormat(str, Enum):
    """Container and codec of the produced clip."""

    mp4 = "mp4"  # H.264, yuv420p, faststart: plays everywhere
    webm = "webm"  # VP9
    gif = "gif"

    @property
    def content_type(self) -> str:
        return {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}[self.value]


class GenerationParams(BaseModel):
    """Everything that shapes one generated clip, validated once for every entry point."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Random seed. Drawn at random when absent; the resolved value is always reported back.",
    )
    num_frames: int | None = Field(
        default=None,
        ge=2,
        le=64,
        description="Frames to generate. Defaults to the model's own (14 for SVD, 25 for SVD-XT).",
    )
    num_inference_steps: int = Field(default=25, ge=1, le=150, description="Euler sampling steps.")
    fps: int = Field(
        default=7,
        ge=1,
        le=60,
        description="Frame-rate conditioning value given to the U-Net (the model sees fps-1). "
        "Not the playback rate: see output_fps.",
    )
    output_fps: int | None = Field(
        default=None, ge=1, le=100, description="Playback frame rate of the encoded clip (up to 100, as the hosted "
        "APIs allow). Defaults to fps."
    )
    motion_bucket_id: int = Field(default=127, ge=1, le=255, description="Amount of motion; higher moves more.")
    noise_aug_strength: float = Field(
        default=0.02,
        ge=0.0,
        le=10.0,
        alias="cond_aug",
        description="Noise added to the conditioning image (alias cond_aug). More noise, less likeness, more motion.",
    )
    min_guidance_scale: float = Field(
        default=1.0, ge=0.0, le=30.0, description="Classifier-free guidance scale of the first frame."
    )
    max_guidance_scale: float = Field(
        default=3.0, ge=0.0, le=30.0, description="Classifier-free guidance scale of the last frame (linear ramp)."
    )
    aspect_ratio: Literal["16:9", "9:16", "1:1", "4:3", "3:4"] | None = Field(
        default=None,
        description="Size preset: 16:9 = 1024x576, 9:16 = 576x1024, 1:1 = 768x768, 4:3 = 1024x768, 3:4 = 768x1024. "
        "Give either a preset or width and height; with neither, 16:9.",
    )
    width: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_LONG_SIDE, multiple_of=SIZE_MULTIPLE,
        description="Width in pixels (multiple of 8; width x height at most 1536x864).",
    )
    height: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_LONG_SIDE, multiple_of=SIZE_MULTIPLE,
        description="Height in pixels (multiple of 8; width x height at most 1536x864).",
    )
    decode_chunk_size: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Frames the VAE decodes at once. Lower uses less GPU memory; higher is faster. Absent: chosen "
        "from the GPU memory free when the decoder runs (8 on a CPU).",
    )
    output_format: OutputFormat = Field(default=OutputFormat.mp4, description="mp4 (H.264), webm (VP9) or gif.")
    prompt: str | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPT_CHARS,
        description="Text-to-video: with no conditioning image, the text-to-image stage makes the first frame from "
        "this prompt at the clip's size, and the video stages animate it.",
    )
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="Text-to-video: what the first frame should not show.")
    t2i_guidance_scale: float | None = Field(
        default=None, ge=0.0, le=30.0,
        description=f"Text-to-video: classifier-free guidance of the first frame ({DEFAULT_T2I_GUIDANCE_SCALE:g} "
        "when absent; 0 for SDXL-Turbo and FLUX.1-schnell).",
    )
    t2i_num_inference_steps: int | None = Field(
        default=None, ge=1, le=150,
        description=f"Text-to-video: denoising steps of the first frame ({DEFAULT_T2I_STEPS} when absent; 1-4 for "
        "SDXL-Turbo and FLUX.1-schnell).",
    )
    duration_s: float | None = Field(
        default=None, gt=0.0, le=MAX_DURATION_S,
        description="Clip length in seconds (up to the deployment's max_duration_s, 8 by default). Longer than one "
        "pass of the model, the clip is made of segments, each conditioned on a frame of the one before; the "
        "frames are then retimed to span exactly this duration at output_fps (docs/pipeline.md).",
    )
    overlap_frames: int = Field(
        default=0, ge=0, le=16,
        description="Long clips: frames two consecutive segments share and cross-fade, besides the seam frame "
        "(0: the next segment starts from the last frame of the one before).",
    )
    interpolation: Interpolation | None = Field(
        default=None,
        description="How the clip reaches output_fps: none plays the generated frames as they are (output_fps is "
        "then only the playback rate), blend cross-fades neighbours, mci makes motion-compensated frames (ffmpeg "
        "minterpolate). Default: mci with duration_s, else none.",
    )

    @model_validator(mode="after")
    def _check_cross_field(self) -> "GenerationParams":
        if self.min_guidance_scale > self.max_guidance_scale:
            raise ValueError(
                f"min_guidance_scale ({self.min_guidance_scale}) must not exceed "
                f"max_guidance_scale ({self.max_guidance_scale})"
            )
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together (or use aspect_ratio)")
        if self.width is not None and self.aspect_ratio is not None:
            raise ValueError("give either aspect_ratio or width and height, not both")
        width, height = self.size
        if width * height > MAX_PIXELS:
            raise ValueError(f"{width}x{height} is {width * height} pixels; at most {MAX_PIXELS} (1536x864) are allowed")
        if self.prompt is None:
            given = [name for name in ("negative_prompt", "t2i_guidance_scale", "t2i_num_inference_steps")
                     if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to text-to-video: give a prompt (and no image)")
        if self.overlap_frames and self.duration_s is None:
            raise ValueError("overlap_frames only applies to long clips: give duration_s")
        if self.interpolation == "none" and self.duration_s is not None:
            raise ValueError("duration_s retimes the generated frames to span it: use interpolation blend or mci, "
                             "or omit duration_s and give num_frames")
        if self.interpolates and self.output_fps is not None and self.output_fps > MAX_INTERPOLATED_FPS:
            raise ValueError(f"output_fps: at most {MAX_INTERPOLATED_FPS} with interpolation "
                             f"{self.resolved_interpolation}")
        return self

    # -- resolved values -------------------------------------------------------------------

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after applying the preset or the default."""
        if self.width is not None and self.height is not None:
            return self.width, self.height
        return ASPECT_PRESETS[self.aspect_ratio or DEFAULT_ASPECT]

    @property
    def resolved_output_fps(self) -> int:
        return self.output_fps if self.output_fps is not None else self.fps

    @property
    def resolved_interpolation(self) -> Interpolation:
        if self.interpolation is not None:
            return self.interpolation
        return "mci" if self.duration_s is not None else "none"

    @property
    def interpolates(self) -> bool:
        """Whether the generated frames are retimed (by blend or mci) rather than played as they are."""
        return self.resolved_interpolation != "none"

    @property
    def text_to_video(self) -> bool:
        """The first frame comes from the text-to-image stage (a prompt and no image)."""
        return self.prompt is not None

    @property
    def keeps_conditioning_frame(self) -> bool:
        """Whether each pass's first frame is the image it was conditioned on, exactly: so that a
        text-to-video clip opens on its text-to-image frame and segments meet without a jump.
        (A plain image-to-video clip keeps the model's own first frame: diffusers' output.)"""
        return self.text_to_video or self.duration_s is not None

    def for_segment(self, index: int) -> "GenerationParams":
        """The parameters of segment ``index`` of a long clip: segment k draws its noise from
        ``seed + k`` (wrapping), so segments do not repeat one noise pattern and a resumed clip
        is the clip that would have been made without the interruption."""
        if index == 0:
            return self
        if self.seed is None:
            raise ValueError("resolve the seed before splitting a clip into segments")
        return self.model_copy(update={"seed": (self.seed + index) % (MAX_SEED + 1)})

    def with_seed(self) -> "GenerationParams":
        """A copy whose seed is set: the given one, or a fresh random one."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})

    def resolved(self, default_num_frames: int) -> "GenerationParams":
        """A copy with seed, num_frames, width and height filled in, as reported back to clients."""
        width, height = self.size
        update: dict[str, Any] = {"num_frames": self.num_frames or default_num_frames,
                                  "interpolation": self.resolved_interpolation}
        if self.aspect_ratio is None:
            update.update(width=width, height=height)
        if self.text_to_video:
            update.update(
                t2i_guidance_scale=DEFAULT_T2I_GUIDANCE_SCALE if self.t2i_guidance_scale is None
                else self.t2i_guidance_scale,
                t2i_num_inference_steps=self.t2i_num_inference_steps or DEFAULT_T2I_STEPS)
        return self.with_seed().model_copy(update=update)


def _allowed_range(field_name: str) -> str | None:
    field = GenerationParams.model_fields.get(field_name)
    if field is None:
        return None
    low = high = multiple = None
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
        elif isinstance(meta, annotated_types.MultipleOf):
            multiple = meta.multiple_of
    if low is None and high is None:
        return None
    text = f"{low} to {high}"
    if multiple:
        text += f", a multiple of {multiple}"
    return text


def _bounded(value: Any, limit: int = 80) -> str:
    """A field name as it may appear in an error: a client's unknown key can be megabytes long."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the field and what it allows, e.g.
    ``motion_bucket_id: 300 is out of range (allowed: 1 to 255)``."""
    lines = []
    for item in error.errors(include_url=False):
        loc = ".".join(_bounded(part) for part in item.get("loc", ()) if part != "__root__")
        field = str(item["loc"][-1]) if item.get("loc") else ""
        if field == "cond_aug":
            field = "noise_aug_strength"
        allowed = _allowed_range(field)
        kind = item.get("type", "")
        if kind == "extra_forbidden":
            lines.append(f"{loc}: unknown parameter")
        elif allowed and kind in {"greater_than_equal", "less_than_equal", "multiple_of"}:
            lines.append(f"{loc}: {_bounded(repr(item.get('input')))} is out of range (allowed: {allowed})")
        elif loc:
            lines.append(f"{loc}: {item['msg']}")
        else:
            lines.append(str(item["msg"]).removeprefix("Value error, "))
    return "; ".join(lines)
