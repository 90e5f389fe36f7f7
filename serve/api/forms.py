"""Multipart submits of ``POST /v1/videos``: the form read into the same model as a JSON body.

The image is the file field ``image`` (or ``input_reference``, as OpenAI's SDK sends it), or its
URL in the text field ``input_reference[image_url]``. Every generation parameter may be its own
text field (``-F seed=5 -F cond_aug=0.1 -F output_format=webm``), sit in the ``params`` field as a
JSON object, or both; ``webhook_url`` and ``webhook_events`` (comma-separated) and OpenAI's
``prompt``, ``model``, ``seconds`` and ``size`` complete the form (``size`` becomes width and
height here; ``seconds`` becomes num_frames at admission, see docs/compatibility.md). Nothing is
dropped: an unknown field, a repeated field, or a parameter given twice (flat and in ``params``,
by name and by alias, or as ``size``/``seconds`` and as width/height/num_frames) is a 422 naming it.

Form values are strings. Pydantic first coerces them to each field's type with a model that
has GenerationParams' fields and aliases but none of its constraints; GenerationParams then
validates the merged parameters, so errors read as for JSON (``motion_bucket_id: 300 is out of
range (allowed: 1 to 255)``, not ``'300'``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, Field, create_model
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from pipelines.errors import InvalidInputError
from pipelines.params import GenerationParams

from . import json_body
from .errors import APIError
from .schemas import (MAX_PROMPT_CHARS, CreateVideoRequest, apply_size, check_seconds_alone, invalid, parse_seconds,
                      text_to_video_params)

IMAGE_FIELD, PARAMS_FIELD, WEBHOOK_URL_FIELD, WEBHOOK_EVENTS_FIELD = "image", "params", "webhook_url", "webhook_events"
#: OpenAI's names: the image file, or its URL / file id as the SDK flattens {"image_url": ...}.
REFERENCE_FIELD, REFERENCE_URL_FIELD, REFERENCE_FILE_FIELD = (
    "input_reference", "input_reference[image_url]", "input_reference[file_id]")
PROMPT_FIELD, MODEL_FIELD, SECONDS_FIELD, SIZE_FIELD = "prompt", "model", "seconds", "size"
IMAGE_FIELDS = (IMAGE_FIELD, REFERENCE_FIELD)
ROUTE_FIELDS = (IMAGE_FIELD, REFERENCE_FIELD, REFERENCE_URL_FIELD, REFERENCE_FILE_FIELD, PARAMS_FIELD,
                WEBHOOK_URL_FIELD, WEBHOOK_EVENTS_FIELD, PROMPT_FIELD, MODEL_FIELD, SECONDS_FIELD, SIZE_FIELD)
#: The most fields a form can need: one per generation parameter plus the route's own.
MAX_FORM_FIELDS = len(GenerationParams.model_fields) + len(ROUTE_FIELDS)

#: A parameter's name or alias -> its field name.
_PARAMETER_NAMES = {
    **{name: name for name in GenerationParams.model_fields},
    **{field.alias: name for name, field in GenerationParams.model_fields.items() if field.alias},
}

#: GenerationParams' fields and aliases with their types only: coerces form strings, checks no range.
_FormValues = create_model(
    "GenerationFormValues",
    __config__=ConfigDict(extra="forbid", populate_by_name=True),
    **{name: (field.annotation, Field(default=None, alias=field.alias))
       for name, field in GenerationParams.model_fields.items()},
)


@dataclass(frozen=True)
class SubmitForm:
    """A submit, from a form or a JSON body: the image (bytes, or a URL to fetch), the validated
    parameters (``size`` applied), the webhook settings and OpenAI's other fields."""

    image: bytes | None
    params: GenerationParams
    webhook_url: str | None
    webhook_events: list[str]
    image_url: str | None = None
    prompt: str | None = None
    model: str | None = None
    seconds: float | None = None


async def read_submit_form(request: Request, *, max_image_bytes: int) -> SubmitForm:
    """The image (at most ``max_image_bytes`` + 1 bytes read, so the caller sees it is too large)
    or its URL, the validated parameters, the webhook settings and OpenAI's fields of a multipart
    submit."""
    fields = _single_values(await _parse_form(request))
    uploads = {name: fields.pop(name) for name in IMAGE_FIELDS if name in fields}
    if isinstance(fields.get(REFERENCE_FILE_FIELD), str) and fields[REFERENCE_FILE_FIELD]:
        raise invalid(REFERENCE_FILE_FIELD, "file ids are not supported; upload the image or give "
                                            f"{REFERENCE_URL_FIELD}")
    image_url = fields.get(REFERENCE_URL_FIELD) if isinstance(fields.get(REFERENCE_URL_FIELD), str) else None
    image_url = image_url or None
    for name, upload in uploads.items():
        if not isinstance(upload, UploadFile):
            raise InvalidInputError(f"multipart upload: {name}: send the image as a file")
    if len(uploads) + (image_url is not None) > 1:
        raise invalid(REFERENCE_URL_FIELD if image_url is not None else IMAGE_FIELD,
                      "give the image once: a file or its URL, not both")
    if not uploads and image_url is None and not isinstance(fields.get(PROMPT_FIELD), str):
        raise InvalidInputError("multipart upload: send the image as a file field named 'image' (or "
                                f"'{REFERENCE_FIELD}'), or its URL as '{REFERENCE_URL_FIELD}', or a prompt "
                                "alone for text-to-video")
    texts: dict[str, str] = {}
    for name, value in fields.items():
        if not isinstance(value, str):
            raise InvalidInputError(f"multipart upload: {name}: send a text field, not a file")
        texts[name] = value
    prompt = texts.get(PROMPT_FIELD)
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise invalid(PROMPT_FIELD, f"at most {MAX_PROMPT_CHARS} characters")
    seconds = parse_seconds(texts[SECONDS_FIELD]) if texts.get(SECONDS_FIELD) else None
    flat = {name: value for name, value in texts.items() if name not in ROUTE_FIELDS}
    params = _form_params(flat, parse_params_field(texts.get(PARAMS_FIELD)), size=texts.get(SIZE_FIELD) or None,
                          seconds=seconds, prompt=prompt, has_image=bool(uploads) or image_url is not None)
    events = texts.get(WEBHOOK_EVENTS_FIELD) or ""
    upload = next(iter(uploads.values()), None)
    return SubmitForm(
        image=await upload.read(max_image_bytes + 1) if upload is not None else None,
        image_url=image_url,
        params=params,
        webhook_url=texts.get(WEBHOOK_URL_FIELD) or None,
        webhook_events=[event.strip() for event in events.split(",") if event.strip()],
        prompt=prompt,
        model=texts.get(MODEL_FIELD) or None,
        seconds=seconds,
    )


async def _parse_form(request: Request) -> FormData:
    """The form, with the parser's refusals (starlette's plain 400s) as API errors."""
    try:
        return await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except HTTPException as error:
        detail = str(error.detail)
        if detail.startswith("Too many fields"):
            raise APIError(422, "too_many_fields",
                           f"multipart upload: more than {MAX_FORM_FIELDS} form fields (the image, params, "
                           "webhook_url, webhook_events, OpenAI's prompt, model, seconds and size, and one per "
                           "generation parameter)") from None
        if detail.startswith("Too many files"):
            raise InvalidInputError("multipart upload: send one file, the image (field 'image' or "
                                    "'input_reference')") from None
        raise InvalidInputError(f"multipart upload: {detail}") from None


def _single_values(form: FormData) -> dict[str, UploadFile | str]:
    values: dict[str, UploadFile | str] = {}
    for name, value in form.multi_items():
        if name in values:
            raise APIError(422, "invalid_parameter", f"{name}: given more than once; send each form field once")
        values[name] = value
    return values


def parse_params_field(raw: str | None) -> dict[str, Any]:
    """The ``params`` form field of a multipart upload: a JSON object of generation parameters."""
    if not raw:
        return {}
    try:
        value = json_body.loads(raw)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"params: not valid JSON ({error.msg} at position {error.pos})") from None
    if not isinstance(value, dict):
        raise InvalidInputError("params: must be a JSON object of generation parameters")
    return value


def _form_params(flat: dict[str, str], nested: dict[str, Any], *, size: str | None = None,
                 seconds: float | None = None, prompt: str | None = None, has_image: bool = True) -> GenerationParams:
    """Flat form fields plus the ``params`` object, each parameter given once, validated as JSON is
    (``size`` as width and height). A pydantic ValidationError is left to the API's handler (one
    line naming each field)."""
    _reject_given_twice(flat, nested)
    typed = _FormValues.model_validate(flat)
    coerced = {name: getattr(typed, _PARAMETER_NAMES[name]) for name in flat}  # keyed as the client spelled them
    values = {**nested, **coerced}
    check_seconds_alone(values, seconds)
    return text_to_video_params(apply_size(values, size), prompt=prompt, has_image=has_image)


def _reject_given_twice(flat: dict[str, str], nested: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    places = [(name, f"form field '{name}'") for name in flat] + [(name, f"'{name}' in params") for name in nested]
    for name, place in places:
        field = _PARAMETER_NAMES.get(name)
        if field is None:
            continue  # unknown: named by validation
        if field in seen:
            raise APIError(422, "invalid_parameter", f"{field}: given twice ({seen[field]} and {place}); give it once")
        seen[field] = place


def multipart_schema() -> dict[str, Any]:
    """The multipart request body as /docs shows it: the image, every generation parameter as its
    own field (from GenerationParams' JSON schema, references inlined), params, the webhook fields
    and OpenAI's fields."""
    schema = GenerationParams.model_json_schema()
    defs = schema.get("$defs", {})
    request = CreateVideoRequest.model_json_schema(by_alias=True)["properties"]
    return {"type": "object", "additionalProperties": False, "properties": {
        IMAGE_FIELD: {"type": "string", "format": "binary",
                      "description": f"The conditioning image (or send it as {REFERENCE_FIELD}, or its URL as "
                                     f"{REFERENCE_URL_FIELD}: exactly one of the three)."},
        REFERENCE_FIELD: {"type": "string", "format": "binary", "description": "The image, under OpenAI's name."},
        REFERENCE_URL_FIELD: {"type": "string", "description": "The image's http(s) or base64 data URL."},
        **{name: _inline_refs(prop, defs) for name, prop in schema["properties"].items()},
        PARAMS_FIELD: {"type": "string", "description": "JSON object of generation parameters, instead of or "
                                                         "besides the fields above (each parameter once)"},
        WEBHOOK_URL_FIELD: {"type": "string", "description": "Called with the job when it ends (docs/webhooks.md)."},
        WEBHOOK_EVENTS_FIELD: {"type": "string", "description": "comma-separated, e.g. progress"},
        **{name: {"type": "string", "description": request[name]["description"]}
           for name in (PROMPT_FIELD, MODEL_FIELD, SECONDS_FIELD, SIZE_FIELD)},
    }}


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with each ``#/$defs/...`` reference replaced by its definition (OpenAPI has no ``$defs``)."""
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref", "")
    if ref.startswith("#/$defs/"):
        rest = {key: value for key, value in node.items() if key != "$ref"}
        return _inline_refs({**defs[ref.removeprefix("#/$defs/")], **rest}, defs)
    return {key: _inline_refs(value, defs) for key, value in node.items()}
