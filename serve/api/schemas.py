"""Request and response bodies of the HTTP API (what /docs shows), and the request fields of the
OpenAI Videos API mapped onto the generation parameters.

The native API and OpenAI's Videos API share the ``/v1/videos`` paths, so the job object is one
object: OpenAI's ``Video`` (``id``, ``object: "video"``, Unix-second ``created_at`` /
``completed_at`` / ``expires_at``, integer ``progress``, ``model``, ``prompt``, ``seconds``, ``size``,
``error``) plus this service's own fields under names that do not clash (``progress_detail``,
``timestamps``, ``params``, ``timings``, ``output``, ...). docs/compatibility.md has every mapping.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.params import (ASPECT_PRESETS, MAX_LONG_SIDE, MAX_PIXELS, MAX_PROMPT_CHARS, MIN_SIDE,  # noqa: F401
                              SIZE_MULTIPLE, GenerationParams)

from .errors import APIError


#: OpenAI's ``size`` values -> the size generated: the SVD aspect preset nearest in aspect ratio
#: (SVD-XT is trained at 1024x576; other sizes cost more and look worse). Any other ``WxH`` that
#: SVD supports as it is (both sides multiples of 8, 64 to 1536, at most 1536x864 pixels) is
#: generated at that size.
OPENAI_SIZES: dict[str, tuple[int, int]] = {
    "720x1280": ASPECT_PRESETS["9:16"],   # 9:16 portrait -> 576x1024
    "1280x720": ASPECT_PRESETS["16:9"],   # 16:9 landscape -> 1024x576
    "1024x1792": ASPECT_PRESETS["9:16"],  # 4:7 portrait (nearest: 9:16) -> 576x1024
    "1792x1024": ASPECT_PRESETS["16:9"],  # 7:4 landscape (nearest: 16:9) -> 1024x576
}

#: The fields a request may carry besides the generation parameters (OpenAI's names).
SIZE_FIELDS = ("width", "height", "aspect_ratio")
_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def invalid(field: str, message: str) -> APIError:
    return APIError(422, "invalid_parameter", f"{field}: {message}")


def size_to_dimensions(size: str) -> tuple[int, int]:
    """``(width, height)`` generated for an OpenAI ``size``: :data:`OPENAI_SIZES`, else a ``WxH``
    SVD supports as it is; anything else is a 422 naming it."""
    if size in OPENAI_SIZES:
        return OPENAI_SIZES[size]
    match = _SIZE_RE.match(size)
    if match:
        width, height = int(match[1]), int(match[2])
        if (all(MIN_SIDE <= side <= MAX_LONG_SIDE and side % SIZE_MULTIPLE == 0 for side in (width, height))
                and width * height <= MAX_PIXELS):
            return width, height
    raise invalid("size", f"{size!r} cannot be mapped to a size this service generates; use one of "
                          f"{', '.join(OPENAI_SIZES)} (mapped to the nearest SVD preset) or WxH with both "
                          f"sides multiples of {SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_LONG_SIDE} and at most "
                          f"{MAX_PIXELS} pixels (1536x864)")


#: Longer than any clip (frames are capped anyway); keeps ``seconds x fps`` a finite number.
MAX_SECONDS = 3600


def parse_seconds(value: Any) -> float:
    """OpenAI's ``seconds`` ("4", "8", "12", or any positive number of seconds)."""
    try:
        seconds = float(str(value).strip())
    except ValueError:
        raise invalid("seconds", f"{value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise invalid("seconds", f"{str(value)[:40]!r} must be a positive number of seconds")
    if seconds > MAX_SECONDS:
        raise invalid("seconds", f"{seconds:g} is over {MAX_SECONDS} seconds")
    return seconds


#: The most frames the model generates in one clip (GenerationParams' own bound on num_frames).
MODEL_MAX_FRAMES = next(meta.le for meta in GenerationParams.model_fields["num_frames"].metadata
                        if hasattr(meta, "le"))


def frames_for_seconds(seconds: float, fps: int, *, cap: int) -> int:
    """``round(seconds x fps)`` frames (``fps`` the clip's playback rate), at most ``cap``
    (the model's and the tenant's limits); fewer than 2 frames is a 422."""
    frames = math.floor(seconds * fps + 0.5)
    if frames < 2:
        raise invalid("seconds", f"{seconds:g} s at {fps} fps is {frames} frame(s); a clip has at least 2 frames "
                                 f"({2 / fps:.2g} s at {fps} fps)")
    return min(frames, cap)


def apply_size(values: dict[str, Any], size: str | None) -> dict[str, Any]:
    """Generation parameters (a dict, before validation) with ``size`` as width and height."""
    if size is None:
        return values
    given = [name for name in SIZE_FIELDS if values.get(name) is not None]
    if given:
        raise invalid("size", f"give size or {' and '.join(given)}, not both")
    width, height = size_to_dimensions(size)
    return {**values, "width": width, "height": height}


def text_to_video_params(values: dict[str, Any], *, prompt: str | None, has_image: bool) -> GenerationParams:
    """Generation parameters (a dict, before validation) with the request's prompt as
    text-to-video's when there is no image (with an image the prompt is only stored)."""
    if not has_image and prompt is not None:
        values = {**values, "prompt": prompt}
    return GenerationParams.model_validate(values)


def check_seconds_alone(values: dict[str, Any], seconds: Any) -> None:
    if seconds is not None and values.get("num_frames") is not None:
        raise invalid("seconds", "give seconds or num_frames, not both")


def format_seconds(seconds: float) -> str:
    """A clip length as OpenAI's ``seconds`` string: ``"4"``, ``"3.57"``."""
    return f"{seconds:.2f}".rstrip("0").rstrip(".") or "0"


class InputReference(BaseModel):
    """OpenAI's reference object (``input_reference`` in a JSON body)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_url: str | None = Field(default=None, description="An http(s) URL or a base64 data URL.")
    file_id: str | None = Field(default=None, description="Not supported here (there is no Files API): a 422.")


class CreateVideoRequest(GenerationParams):
    """JSON body of ``POST /v1/videos``: the image plus any generation parameter, and OpenAI's
    fields (``prompt``, ``input_reference``, ``model``, ``seconds``, ``size``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    image_url: str | None = Field(
        default=None,
        description="The conditioning image: an http(s) URL the service downloads, or a base64 data URL "
        "(data:image/png;base64,...). Or give input_reference.image_url; for a file upload use "
        "multipart/form-data instead.",
    )
    input_reference: InputReference | None = Field(
        default=None, description="OpenAI's form of the image: {\"image_url\": ...} (instead of image_url).")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                               description="Without an image: text-to-video (the text-to-image stage makes the first "
                               "frame from it). With an image it is stored with the job and shown back (SVD "
                               "animates the image; it takes no text).")
    model: str | None = Field(default=None, max_length=256, description="The model to use: an id GET /v1/models "
                              "lists (the default model also by its source); omit it for the default model.")
    seconds: str | float | None = Field(
        default=None, description="Clip length instead of num_frames: frames = round(seconds x output fps), "
        "at most the model's and the tenant's frame limits (docs/compatibility.md).")
    # ``size`` is GenerationParams' resolved (width, height): the request field is ``size_``, spelled size.
    size_: str | None = Field(
        default=None, alias="size", description="WxH instead of width/height/aspect_ratio: OpenAI's 720x1280, "
        "1280x720, 1024x1792, 1792x1024 map to the nearest SVD preset (docs/compatibility.md).")
    webhook_url: str | None = Field(default=None, description="Called with the job when it ends (docs/webhooks.md).")
    webhook_events: list[str] = Field(
        default_factory=list, description='Extra webhook events: ["progress"]. Terminal events are always sent.'
    )

    #: Fields that are not generation parameters.
    REQUEST_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"image_url", "input_reference", "prompt", "model", "seconds", "size_", "webhook_url", "webhook_events"})

    def image_source(self) -> str | None:
        """The image's URL (``image_url`` or ``input_reference.image_url``; at most one); None for
        text-to-video (a prompt and no image)."""
        reference = self.input_reference
        if reference is not None and reference.file_id is not None:
            raise invalid("input_reference.file_id", "file ids are not supported; give input_reference.image_url "
                                                      "or upload the image (multipart)")
        urls = [url for url in (self.image_url, reference.image_url if reference else None) if url is not None]
        if len(urls) > 1:
            raise invalid("image_url", "give image_url or input_reference, not both")
        if not urls:
            if self.prompt is None:
                raise invalid("image_url", "required: give image_url or input_reference.image_url for "
                                           "image-to-video, or a prompt alone for text-to-video")
            return None
        return urls[0]

    def generation_params(self) -> GenerationParams:
        """The generation parameters, with ``size`` as width and height (``seconds`` becomes
        num_frames at admission, where the tenant's limits are known) and, without an image, the
        prompt as text-to-video's."""
        values = self.model_dump(exclude=set(self.REQUEST_FIELDS), exclude_none=True, exclude_unset=True)
        check_seconds_alone(values, self.seconds)
        return text_to_video_params(apply_size(values, self.size_), prompt=self.prompt,
                                    has_image=self.image_source() is not None)


class Progress(BaseModel):
    stage: str | None = Field(description="The stage running now (image_encode, sampling, decode, ...: the "
                              "job's route); null when queued.")
    step: int = Field(description="Steps done by the stage that reports steps (text_to_image or sampling; "
                      "sampling counts across every segment of a long clip).")
    total_steps: int = Field(description="Steps of that stage in all.")
    percent: float = Field(description="Rough overall completion, 0-100.")
    updated_at: datetime | None = Field(default=None, description="When the running stage reported this progress.")
    segments_done: int | None = Field(default=None, description="Long clips (duration_s): segments finished (kept "
                                      "with the job; a retry resumes after them). Null without duration_s.")
    segments: int | None = Field(default=None, description="Long clips (duration_s): segments in all. Null without "
                                 "duration_s.")


class Output(BaseModel):
    url: str = Field(description="Where to download the clip: this API's /content endpoint.")
    content_type: str
    file_name: str
    file_size: int = Field(description="Bytes.")
    thumbnail_url: str = Field(description="The clip's first frame as a JPEG: /content?variant=thumbnail.")


class ErrorInfo(BaseModel):
    code: str
    message: str


class WebhookInfo(BaseModel):
    url: str
    events: list[str] = Field(description="Events asked for besides the terminal ones (e.g. video.progress).")
    deliveries: list[dict[str, Any]] = Field(
        description="Delivery attempts: event id and type, attempt number, time, HTTP status or error, next retry.")


class Timestamps(BaseModel):
    """The job's instants to the microsecond (ISO 8601, UTC); the top-level fields are whole seconds."""

    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = Field(default=None, description="When the job ended (any terminal status).")
    expires_at: datetime | None = None


class VideoJob(BaseModel):
    """A video generation job as clients see it: OpenAI's Video object plus this service's fields."""

    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"] = Field(
        description="OpenAI's four statuses, and cancelled (POST /v1/videos/{id}/cancel; error.code is "
        "then 'cancelled' too).")
    model: str = Field(description="The model serving the job (its source, as configured).")
    model_version: str | None = Field(
        default=None, description="The version of the model that made the clip: its id and a digest of where its "
        "weights come from (id@digest), so clips made before and after a model change can be told apart. Null "
        "until the job completes.")
    prompt: str | None = Field(default=None, description="The prompt given at creation, if any.")
    progress: int = Field(description="Approximate completion, 0-100 (whole percent; progress_detail has more).")
    seconds: str = Field(description="Clip length in seconds: num_frames / output fps, e.g. \"4\" or \"3.57\".")
    size: str = Field(description="The size generated, WxH (e.g. 1024x576).")
    created_at: int = Field(description="Unix seconds (timestamps.created_at has microseconds).")
    started_at: int | None = Field(default=None, description="Unix seconds the job first started running.")
    completed_at: int | None = Field(default=None, description="Unix seconds the job completed (status completed).")
    finished_at: int | None = Field(default=None, description="Unix seconds the job ended (completed, failed or "
                                    "cancelled).")
    expires_at: int | None = Field(default=None, description="Unix seconds the job and its files are deleted.")
    error: ErrorInfo | None = Field(default=None, description="Why the job failed (or code 'cancelled').")
    timestamps: Timestamps
    params: dict[str, Any] = Field(description="The generation parameters, seed resolved.")
    queue_position: int | None = Field(default=None, description="Jobs ahead of this one while queued.")
    progress_detail: Progress
    timings: dict[str, float] = Field(description="Seconds per stage.")
    output: Output | None = Field(default=None, description="The clip (status completed).")
    webhook_url: str | None = None
    webhook: WebhookInfo | None = Field(default=None, description="Webhook settings and delivery attempts.")


class VideoJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]
    first_id: str | None = Field(description="Id of the first job in data (null when empty).")
    last_id: str | None = Field(description="Id of the last job in data: pass as ?after= for the next page.")
    has_more: bool
    next_cursor: str | None = Field(description="Or pass this as ?cursor= for the next page (same order).")


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


def openapi_schema(model: type[BaseModel], *, by_alias: bool = True) -> dict[str, Any]:
    """``model``'s JSON schema for a request body given through ``openapi_extra``: every
    ``#/$defs/...`` reference replaced by its definition. A ``$ref`` in an OpenAPI document resolves
    against the whole document, which has no ``$defs`` (they would dangle: ``#/$defs/OutputFormat``)."""
    schema = dict(model.model_json_schema(by_alias=by_alias))
    return inline_defs(schema, schema.pop("$defs", {}))


def inline_defs(node: Any, defs: dict[str, Any], _seen: tuple[str, ...] = ()) -> Any:
    """``node`` with each ``#/$defs/<name>`` reference replaced by ``defs[name]`` (sibling keywords
    of the reference kept). A recursive definition cannot be inlined: ValueError."""
    if isinstance(node, list):
        return [inline_defs(item, defs, _seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        if name in _seen:
            raise ValueError(f"{name} refers to itself: a recursive schema cannot be inlined")
        rest = {key: value for key, value in node.items() if key != "$ref"}
        return inline_defs({**defs[name], **rest}, defs, (*_seen, name))
    return {key: inline_defs(value, defs, _seen) for key, value in node.items()}


def sse_event_schema(component: str, *, events: tuple[str, ...] = ("message",),
                     with_id: bool = False) -> dict[str, Any]:
    """The ``text/event-stream`` schema of one server-sent event (OpenAPI 3.1: ``schema`` describes
    each event): its ``event`` name, ``id`` (``with_id``) and ``data``, the JSON of ``component``
    (a schema under ``#/components/schemas``). Keep-alive comments are not events."""
    properties: dict[str, Any] = {
        "event": {"type": "string", "enum": list(events)},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": f"#/components/schemas/{component}"}},
    }
    if with_id:
        properties["id"] = {"type": "string", "description": "The job record's version."}
    return {"type": "object", "required": ["data"], "properties": properties}
