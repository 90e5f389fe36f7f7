"""fal's input bodies -> our :class:`~pipelines.params.GenerationParams`: the app ids, the input
schemas of ``fal-ai/stable-video`` and of the text-to-video apps (fal's fields plus our extension
fields), their parsing, and :class:`FalInputError` (rendered as FastAPI's 422 ``detail`` list, in
fal's field names)."""

from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic_core import PydanticCustomError

from pipelines.params import ASPECT_PRESETS, MAX_PROMPT_CHARS, MAX_SEED, GenerationParams, OutputFormat

#: fal's id of its hosted Stable Video Diffusion app; this deployment answers to it.
FAL_APP_ID = "fal-ai/stable-video"

#: fal's ids of its hosted text-to-video SVD apps (the LCM one an alias here: this deployment runs
#: its own model, with fast-svd's input schema and defaults); this deployment answers to both.
FAL_T2V_APP_IDS = ("fal-ai/fast-svd/text-to-video", "fal-ai/fast-svd-lcm/text-to-video")
FAL_T2V_APP_ID = FAL_T2V_APP_IDS[0]

#: fal's input fields whose name differs from ours (the others are ours as they are).
RENAMED = {"cond_aug": "noise_aug_strength", "fps": "output_fps"}
#: The same for the text-to-video apps (``steps`` is fast-svd's name for the sampling steps).
T2V_RENAMED = {**RENAMED, "steps": "num_inference_steps"}
#: Long clips and frame interpolation: our own, accepted by every app.
_LENGTH_FIELDS = ("duration_s", "overlap_frames", "interpolation")
#: Our own generation parameters accepted beyond fal's schema (same ranges as POST /v1/videos).
EXTENSION_FIELDS = ("num_frames", "num_inference_steps", "width", "height", "aspect_ratio",
                    "min_guidance_scale", "max_guidance_scale", "decode_chunk_size", *_LENGTH_FIELDS)
#: The same for the text-to-video apps (the size is fal's ``video_size``, the steps fal's ``steps``).
T2V_EXTENSION_FIELDS = ("num_frames", "min_guidance_scale", "max_guidance_scale", "decode_chunk_size",
                        "t2i_guidance_scale", "t2i_num_inference_steps", *_LENGTH_FIELDS)

#: fal's named video sizes -> the size generated. fal's own square_hd is 1024x1024 and square
#: 512x512; both are SVD's 1:1 preset here, 768x768 (the pixel count SVD-XT is trained at; a
#: custom ``{"width": 1024, "height": 1024}`` gets 1024x1024). The others are fal's sizes exactly.
VIDEO_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": ASPECT_PRESETS["1:1"],
    "square": ASPECT_PRESETS["1:1"],
    "portrait_4_3": ASPECT_PRESETS["3:4"],
    "portrait_16_9": ASPECT_PRESETS["9:16"],
    "landscape_4_3": ASPECT_PRESETS["4:3"],
    "landscape_16_9": ASPECT_PRESETS["16:9"],
}
DEFAULT_VIDEO_SIZE = "landscape_16_9"
#: fal's default ``negative_prompt`` of fast-svd's text-to-video.
FAL_NEGATIVE_PROMPT = ("unrealistic, saturated, high contrast, big nose, painting, drawing, sketch, cartoon, "
                       "anime, manga, render, CG, 3d, watermark, signature, label")


class _FalInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(description="The conditioning image: an http(s) URL or a base64 data URL.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random seed; drawn when absent.")
    motion_bucket_id: int = Field(default=127, ge=1, le=255, description="Amount of motion; higher moves more.")
    cond_aug: float = Field(default=0.02, ge=0.0, le=10.0,
                            description="Noise added to the conditioning image (our noise_aug_strength).")
    fps: int = Field(default=25, ge=10, le=100,
                     description="Frame rate of the generated video (our output_fps: playback rate of the clip).")


#: The request body of ``POST /{app_id}``: fal's schema plus our extension fields.
FalStableVideoInput = create_model(
    "FalStableVideoInput", __base__=_FalInput,
    **{name: (GenerationParams.model_fields[name].annotation, GenerationParams.model_fields[name])
       for name in EXTENSION_FIELDS},
)


def _bound(name: str, kind: str) -> Any:
    """GenerationParams' own bound (``ge`` / ``le``) of a field, so fal's fields share its ranges."""
    return next(getattr(meta, kind) for meta in GenerationParams.model_fields[name].metadata if hasattr(meta, kind))


class FalImageSize(BaseModel):
    """fal's custom ``video_size``: ``{"width", "height"}`` (each 512 when absent, as fal's)."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(default=512, description="Width in pixels (multiple of 8; at most 1536x864 pixels in all).")
    height: int = Field(default=512, description="Height in pixels (multiple of 8; at most 1536x864 pixels in all).")


class _FalTextToVideoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="What the video shows: the text-to-image stage makes its first frame from it.")
    negative_prompt: str = Field(default=FAL_NEGATIVE_PROMPT, max_length=MAX_PROMPT_CHARS,
                                 description="What the first frame should not show (fal's default list when absent).")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random seed; drawn when absent.")
    motion_bucket_id: int = Field(default=127, ge=1, le=255, description="Amount of motion; higher moves more.")
    cond_aug: float = Field(default=0.02, ge=0.0, le=10.0,
                            description="Noise added to the first frame (our noise_aug_strength).")
    steps: int = Field(default=20, ge=_bound("num_inference_steps", "ge"), le=_bound("num_inference_steps", "le"),
                       description="Sampling steps of the video model (our num_inference_steps).")
    fps: int = Field(default=10, ge=_bound("output_fps", "ge"), le=_bound("output_fps", "le"),
                     description="Frame rate of the generated video (our output_fps: playback rate of the clip).")
    video_size: Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3",
                        "landscape_16_9"] | FalImageSize = Field(
        default=DEFAULT_VIDEO_SIZE, description="A named size (square_hd and square are 768x768 here) or "
        "{width, height} (multiples of 8, at most 1536x864 pixels).")
    deep_cache: Literal["none", "minimum", "medium", "high"] | None = Field(
        default=None, description="fal's DeepCache level: not implemented here, so only 'none' is accepted.")

    @field_validator("video_size", mode="wrap")
    @classmethod
    def _one_video_size(cls, value: Any, handler: Any) -> Any:
        """The errors of the one form given (not one per member of the union)."""
        if isinstance(value, dict):
            return FalImageSize.model_validate(value)
        if isinstance(value, (str, FalImageSize)) and (not isinstance(value, str) or value in VIDEO_SIZES):
            return handler(value)
        raise PydanticCustomError("literal_error", "Input should be one of {names}, or an object {width, height}",
                                  {"names": ", ".join(VIDEO_SIZES)})

    @field_validator("deep_cache")
    @classmethod
    def _no_deep_cache(cls, value: str | None) -> str | None:
        if value not in (None, "none"):
            raise PydanticCustomError(
                "unsupported_value", "DeepCache is not implemented by this service: send deep_cache 'none' or "
                "omit it ('{value}' is refused rather than ignored, as it would change the output)", {"value": value})
        return value


#: The request body of ``POST /fal-ai/fast-svd/text-to-video``: fal's schema plus our extension fields.
FalTextToVideoInput = create_model(
    "FalTextToVideoInput", __base__=_FalTextToVideoInput,
    **{name: (GenerationParams.model_fields[name].annotation, GenerationParams.model_fields[name])
       for name in T2V_EXTENSION_FIELDS},
)


class FalInputError(Exception):
    """The body does not fit the input schema: rendered as FastAPI's 422 ``detail`` list."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail))
        self.detail = detail


def _detail_of(error: ValidationError, rename: dict[str, str | tuple[str, ...]] | None = None,
               hints: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """FastAPI's 422 ``detail`` list, our field names put back as the client's (``rename``: ours ->
    theirs, a tuple for a nested field) and ``hints`` ((field, type) -> message) for known mistakes."""
    rename, hints = rename or {}, hints or {}
    detail = []
    for item in error.errors(include_url=False):
        loc: list[Any] = ["body"]
        for part in item.get("loc", ()):
            theirs = rename.get(str(part), part)
            loc.extend(theirs if isinstance(theirs, tuple) else (theirs,))
        kind = item.get("type", "value_error")
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        loc = [part[:200] + "..." if isinstance(part, str) and len(part) > 200 else part for part in loc]
        detail.append({"loc": loc, "msg": hints.get((str(loc[-1]), kind), message)[:500], "type": kind})
    return detail[:20]  # never the input echoed back unbounded


#: Explanations of what a client of the image app sends for text-to-video.
_IMAGE_APP_HINTS = {(field, "extra_forbidden"): f"{FAL_APP_ID} takes no {field} (it animates image_url); "
                    f"submit to {FAL_T2V_APP_ID} for text-to-video" for field in ("prompt", "negative_prompt")}


def _json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise FalInputError([{"loc": ["body"], "msg": "the body must be a JSON object", "type": "model_type"}])
    return body


def parse_input(body: Any) -> tuple[str, GenerationParams]:
    """fal's input body -> (image_url, our GenerationParams); FalInputError naming every problem."""
    try:
        given = FalStableVideoInput.model_validate(_json_object(body))
    except ValidationError as error:
        raise FalInputError(_detail_of(error, hints=_IMAGE_APP_HINTS)) from None
    values = given.model_dump(exclude={"image_url"}, exclude_unset=True)
    # fal's default frame rate (25), where our output_fps would default to the conditioning value.
    values.setdefault("fps", _FalInput.model_fields["fps"].default)
    params = {RENAMED.get(name, name): value for name, value in values.items()}
    params["output_format"] = OutputFormat.mp4
    try:
        return given.image_url, GenerationParams.model_validate(params)
    except ValidationError as error:
        raise FalInputError(_detail_of(error, {ours: theirs for theirs, ours in RENAMED.items()})) from None


#: The same for a client of the text-to-video apps sending the image app's or our native fields.
_T2V_APP_HINTS = {
    ("image_url", "extra_forbidden"): f"{FAL_T2V_APP_ID} takes no image (it makes the first frame from the "
    f"prompt); submit to {FAL_APP_ID} for image-to-video",
    ("num_inference_steps", "extra_forbidden"): "give the sampling steps as steps (fal's name for them)",
    **{(field, "extra_forbidden"): "give the size as video_size (a name or {\"width\", \"height\"})"
       for field in ("width", "height", "aspect_ratio")},
}


def video_size(value: str | FalImageSize) -> tuple[int, int]:
    """fal's ``video_size`` -> (width, height) generated (:data:`VIDEO_SIZES`, or the custom size)."""
    if isinstance(value, FalImageSize):
        return value.width, value.height
    return VIDEO_SIZES[value]


def parse_text_to_video_input(body: Any) -> tuple[None, GenerationParams]:
    """fal's text-to-video input body -> (no image, our GenerationParams with the prompt);
    FalInputError naming every problem (in fal's field names)."""
    try:
        given = FalTextToVideoInput.model_validate(_json_object(body))
    except ValidationError as error:
        raise FalInputError(_detail_of(error, hints=_T2V_APP_HINTS)) from None
    values = given.model_dump(exclude={"video_size", "deep_cache"}, exclude_unset=True)
    # fal's defaults where ours differ (steps 20, fps 10, its negative prompt).
    for name in ("negative_prompt", "steps", "fps"):
        values.setdefault(name, _FalTextToVideoInput.model_fields[name].default)
    params = {T2V_RENAMED.get(name, name): value for name, value in values.items()}
    params["width"], params["height"] = video_size(given.video_size)
    params["output_format"] = OutputFormat.mp4
    rename: dict[str, str | tuple[str, ...]] = {ours: theirs for theirs, ours in T2V_RENAMED.items()}
    rename.update(width=("video_size", "width"), height=("video_size", "height"))
    try:
        return None, GenerationParams.model_validate(params)
    except ValidationError as error:
        raise FalInputError(_detail_of(error, rename)) from None


class FalApp:
    """One kind of fal app: its input schema (for /docs) and the parser of its body into
    ``(image_url or None, GenerationParams)``."""

    def __init__(self, schema: type[BaseModel], parse: Callable[[Any], tuple[str | None, GenerationParams]],
                 summary: str) -> None:
        self.schema, self.parse, self.summary = schema, parse, summary


IMAGE_TO_VIDEO = FalApp(FalStableVideoInput, parse_input, "image-to-video")
TEXT_TO_VIDEO = FalApp(FalTextToVideoInput, parse_text_to_video_input, "text-to-video")
