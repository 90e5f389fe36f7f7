"""What admission does to a request's parameters: fill defaults (the model's over the
deployment's), turn OpenAI's ``seconds`` into frames, and check the model's and the tenant's caps.
Pure functions of the request, the policy and the model entry: no store, no Ray."""

from __future__ import annotations

from typing import Any

from pipelines.params import GenerationParams
from pipelines.segments import SegmentPlan

from ..tenants import TenantPolicy
from ..zoo import ModelEntry
from .errors import APIError
from .schemas import MODEL_MAX_FRAMES, frames_for_seconds

#: Parameters a request sets together: giving one drops the deployment's defaults for all of them.
SIZE_GROUP = frozenset({"width", "height", "aspect_ratio"})
LENGTH_GROUP = frozenset({"num_frames", "duration_s", "overlap_frames", "interpolation"})
#: Defaults that only a text-to-video request takes.
TEXT_TO_VIDEO_FIELDS = frozenset({"negative_prompt", "t2i_guidance_scale", "t2i_num_inference_steps"})


def params_for_seconds(policy: TenantPolicy, params: GenerationParams, seconds: float,
                       model: ModelEntry | None = None) -> GenerationParams:
    """``params`` with num_frames = round(seconds x the clip's playback fps), capped by the
    model's frame limit and the tenant's ``max_num_frames`` (docs/compatibility.md)."""
    cap = min(MODEL_MAX_FRAMES, policy.max_num_frames or MODEL_MAX_FRAMES,
              (model.limits.max_num_frames if model is not None else None) or MODEL_MAX_FRAMES)
    frames = frames_for_seconds(seconds, params.resolved_output_fps, cap=cap)
    return GenerationParams.model_validate({**params.model_dump(), "num_frames": frames})


def with_defaults(params: GenerationParams, deployment_defaults: dict[str, Any], *, seconds_given: bool = False,
                  model: ModelEntry | None = None) -> GenerationParams:
    """``params`` over the model's ``defaults`` over the deployment's ``default_params``: a field
    the request set wins, and a request that sets any field of a group (size, length) takes none
    of that group's defaults (a model default of a group replaces the deployment's group)."""
    defaults = dict(deployment_defaults)
    model_defaults = dict(model.defaults) if model is not None else {}
    for group in (SIZE_GROUP, LENGTH_GROUP):
        if set(model_defaults) & group:
            for name in group:
                defaults.pop(name, None)
    defaults.update(model_defaults)
    if not defaults:
        return params
    given = set(params.model_fields_set)
    if not params.text_to_video:
        for name in TEXT_TO_VIDEO_FIELDS:
            defaults.pop(name, None)
    for group in (SIZE_GROUP, LENGTH_GROUP):
        if given & group or (group is LENGTH_GROUP and seconds_given):
            for name in group:
                defaults.pop(name, None)
    explicit = {name: getattr(params, name) for name in given}
    return GenerationParams.model_validate({**defaults, **explicit})


def check_limits(policy: TenantPolicy, resolved: GenerationParams, plan: SegmentPlan | None = None,
                 model: ModelEntry | None = None) -> None:
    """422 ``limit_exceeded`` naming every cap of the model (per pass) and of the tenant's policy
    (a long clip's frames are all its segments' frames) the request exceeds."""
    width, height = resolved.size
    frames = plan.total_frames if plan is not None else (resolved.num_frames or 0)
    problems = [] if model is None else model.limits.violations(
        num_frames=resolved.num_frames or 0, width=width, height=height)
    problems += policy.limit_violations(num_frames=frames, width=width, height=height,
                                       num_inference_steps=resolved.num_inference_steps,
                                       segments=plan.num_segments if plan is not None else 1,
                                       t2i_num_inference_steps=resolved.t2i_num_inference_steps)
    if problems:
        raise APIError(422, "limit_exceeded", "; ".join(problems))
