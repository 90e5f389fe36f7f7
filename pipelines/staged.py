"""All stages in one process, along the registry's route: the CLI, the demo, the tests and the
benchmarks use this.

The Ray Serve application runs the same stage classes from the same registry, each stage in its
own deployment, and the same segment loop (``serve/runner/driver.py``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import PIL.Image

from .params import GenerationParams
from .registry import FINAL_VALUE, SOURCE_VALUE, STAGES, TEXT_TO_IMAGE_MODEL, StageRegistry, StageSpec, split_route
from .segments import DEFAULT_MAX_SEGMENTS, plan_for, seam_frame
from .stages import CancelCheck, EncodedVideo, ProgressCallback, SVDComponents

#: Wraps each stage call (e.g. a device synchronise before and after it, for honest GPU timings).
StageHook = Callable[[str], ContextManager[Any]]


@dataclass
class GenerationResult:
    """A finished clip with the parameters that made it (seed resolved) and seconds per stage
    (summed over the segments of a long clip)."""

    video: EncodedVideo
    params: GenerationParams
    timings: dict[str, float] = field(default_factory=dict)
    bytes_between_stages: dict[str, int] = field(default_factory=dict)
    first_frame: PIL.Image.Image | None = None
    """The text-to-image stage's output (text-to-video only)."""
    num_segments: int = 1

    def summary(self) -> str:
        p = self.params
        stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.timings.items())
        segments = f", {self.num_segments} segments" if self.num_segments > 1 else ""
        return (
            f"seed {p.seed}, {self.video.num_frames} frames {self.video.width}x{self.video.height} "
            f"@ {self.video.fps} fps{segments}, {p.num_inference_steps} steps, {len(self.video.data) / 1024:.0f} KiB "
            f"{p.output_format.value} ({stages})"
        )


class StagedPipeline:
    """Runs every stage of the job's route in this process, in order, segment by segment.

    ``components`` are the video model's (a loaded ``StableVideoDiffusionPipeline`` or a dict of
    its sub-models); ``text_to_image`` the text-to-image stage's (a diffusers text-to-image
    pipeline or what :func:`pipelines.text_to_image.load_text_to_image` returns). Without it,
    prompt-only requests are refused.
    """

    def __init__(self, components: SVDComponents | dict[str, Any], *, text_to_image: Any = None,
                 registry: StageRegistry = STAGES, max_segments: int = DEFAULT_MAX_SEGMENTS) -> None:
        parts = components if isinstance(components, dict) else _components_of(components, registry)
        t2i_parts = _text_to_image_parts(text_to_image)
        self.registry = registry
        self.max_segments = max_segments
        self.stages = {}
        for spec in registry.stages():
            if spec.model == TEXT_TO_IMAGE_MODEL:
                if t2i_parts is not None:
                    self.stages[spec.name] = spec.build(t2i_parts)
            else:
                self.stages[spec.name] = spec.build(parts)
        self.default_num_frames = int(self.stages[registry.model_stage().name].default_num_frames)

    def __getattr__(self, name: str) -> Any:
        # pipeline.sampling, pipeline.decode, ...: the built stage of that name.
        stages = self.__dict__.get("stages") or {}
        if name in stages:
            return stages[name]
        raise AttributeError(name)

    def __call__(
        self,
        image: PIL.Image.Image | None = None,
        params: GenerationParams | None = None,
        *,
        on_step: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        stage_hook: StageHook | None = None,
    ) -> GenerationResult:
        # 1. Resolve defaults (seed, frames, size) once so every stage sees the same values.
        params = (params or GenerationParams()).resolved(self.default_num_frames)
        if (image is None) != params.text_to_video:
            raise ValueError("give an image (image-to-video) or params.prompt (text-to-video), exactly one")
        before, per_segment, after = split_route(self.registry.route(params))
        missing = [spec.name for spec in (*before, *per_segment, *after) if spec.name not in self.stages]
        if missing:
            raise ValueError(f"stages {missing} were not loaded (text-to-video needs text_to_image components)")
        plan = plan_for(params, max_segments=self.max_segments)
        segments = plan.num_segments if plan is not None else 1
        run = _Run(self, params, on_step=on_step, should_cancel=should_cancel, stage_hook=stage_hook,
                   segments=segments)
        values: dict[str, Any] = {SOURCE_VALUE: image}

        # 2. The stages before the segments (text-to-image makes the source image).
        for spec in before:
            run.stage(spec, values)
        first_frame = values[SOURCE_VALUE] if params.text_to_video else None

        # 3. Each segment: encode its conditioning image, sample, decode; the next one starts
        #    from this one's seam frame.
        outputs = []
        for index in range(segments):
            run.segment, run.params = index, params.for_segment(index)
            for spec in per_segment:
                run.stage(spec, values)
            frames = values[per_segment[-1].output] if per_segment else None
            outputs.append(frames)
            if index + 1 < segments:
                values = {SOURCE_VALUE: PIL.Image.fromarray(seam_frame(frames.frames, plan))}
        if per_segment:
            values[per_segment[-1].output] = outputs if segments > 1 else outputs[0]

        # 4. The stages after them (join, retime, encode).
        run.params = params
        for spec in after:
            run.stage(spec, values)
        return GenerationResult(video=values[FINAL_VALUE], params=params, timings=run.timings,
                                bytes_between_stages=run.sizes, first_frame=first_frame,
                                num_segments=segments)


class _Run:
    """One call's bookkeeping: timings summed over segments, payload sizes, global step counts."""

    def __init__(self, pipeline: StagedPipeline, params: GenerationParams, *, on_step, should_cancel, stage_hook,
                 segments: int) -> None:
        self.pipeline, self.params = pipeline, params
        self.on_step, self.should_cancel, self.stage_hook = on_step, should_cancel, stage_hook
        self.segments, self.segment = segments, 0
        self.timings: dict[str, float] = {}
        self.sizes: dict[str, int] = {}
        self.previous: str | None = None

    def stage(self, spec: StageSpec, values: dict[str, Any]) -> None:
        # The first segment's boundaries, and those after the segments (a long clip's seams are not counted).
        first_pass = self.segment == 0 or not spec.per_segment
        if self.previous is not None and spec.inputs and first_pass:
            self.sizes[f"{self.previous}->{spec.name}"] = _nbytes(values[spec.inputs[0]])
        hooks = {}
        if spec.reports_steps:
            hooks = {"on_step": self._step_callback(spec), "should_cancel": self.should_cancel}
        stage = self.pipeline.stages[spec.name]
        with self.stage_hook(spec.name) if self.stage_hook is not None else contextlib.nullcontext():
            start = time.perf_counter()
            values[spec.output] = stage(*(values[name] for name in spec.inputs), self.params, **hooks)
            self.timings[spec.name] = self.timings.get(spec.name, 0.0) + time.perf_counter() - start
        self.previous = spec.name

    def _step_callback(self, spec: StageSpec) -> ProgressCallback | None:
        """Steps counted across every segment of a per-segment stage (segment 2 of 2 at its step 3
        of 25 is step 28 of 50)."""
        if self.on_step is None:
            return None
        if not spec.per_segment or self.segments == 1:
            return self.on_step
        offset, segments = self.segment, self.segments
        return lambda done, total: self.on_step(offset * total + done, segments * total)


def _nbytes(payload: Any) -> int:
    """Bytes of a payload crossing a boundary: a stage dataclass, an image, or a long clip's segments."""
    if isinstance(payload, list):
        return sum(_nbytes(item) for item in payload)
    if isinstance(payload, PIL.Image.Image):
        return payload.width * payload.height * len(payload.getbands())
    return payload.nbytes() if hasattr(payload, "nbytes") else 0


def _components_of(components: SVDComponents, registry: StageRegistry) -> dict[str, Any]:
    """The named sub-models of a loaded pipeline object (``StableVideoDiffusionPipeline``)."""
    names = {name for spec in registry.stages() for name in spec.components}
    return {name: getattr(components, name) for name in names if hasattr(components, name)}


def _text_to_image_parts(text_to_image: Any) -> dict[str, Any] | None:
    """The text-to-image stage's keyword arguments from a loaded diffusers pipeline or a dict."""
    if text_to_image is None or isinstance(text_to_image, dict):
        return text_to_image
    from .text_to_image import pipeline_settings

    components = {name: part for name, part in text_to_image.components.items() if part is not None}
    settings = pipeline_settings(type(text_to_image), text_to_image.config, components=text_to_image.components)
    return {**components, "pipeline_class": type(text_to_image).__name__, "pipeline_config": settings}
