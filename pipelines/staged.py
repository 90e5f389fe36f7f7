"""All stages in one process, along the registry's route: the CLI, the demo, the tests and the
benchmarks use this.

The Ray Serve application runs the same stage classes from the same registry, each stage in its
own deployment.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import PIL.Image

from .params import GenerationParams
from .registry import FINAL_VALUE, SOURCE_VALUE, STAGES, StageRegistry
from .stages import CancelCheck, EncodedVideo, ProgressCallback, SVDComponents

#: Wraps each stage call (e.g. a device synchronise before and after it, for honest GPU timings).
StageHook = Callable[[str], ContextManager[Any]]


@dataclass
class GenerationResult:
    """A finished clip with the parameters that made it (seed resolved) and seconds per stage."""

    video: EncodedVideo
    params: GenerationParams
    timings: dict[str, float] = field(default_factory=dict)
    bytes_between_stages: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        p = self.params
        stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.timings.items())
        return (
            f"seed {p.seed}, {self.video.num_frames} frames {self.video.width}x{self.video.height} "
            f"@ {self.video.fps} fps, {p.num_inference_steps} steps, {len(self.video.data) / 1024:.0f} KiB "
            f"{p.output_format.value} ({stages})"
        )


class StagedPipeline:
    """Runs every stage of the job's route in this process, in order."""

    def __init__(self, components: SVDComponents | dict[str, Any], *, registry: StageRegistry = STAGES) -> None:
        parts = components if isinstance(components, dict) else _components_of(components, registry)
        self.registry = registry
        self.stages = {spec.name: spec.build(parts) for spec in registry.stages()}
        self.default_num_frames = int(self.stages[registry.model_stage().name].default_num_frames)

    def __getattr__(self, name: str) -> Any:
        # pipeline.sampling, pipeline.decode, ...: the built stage of that name.
        stages = self.__dict__.get("stages") or {}
        if name in stages:
            return stages[name]
        raise AttributeError(name)

    def __call__(
        self,
        image: PIL.Image.Image,
        params: GenerationParams | None = None,
        *,
        on_step: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        stage_hook: StageHook | None = None,
    ) -> GenerationResult:
        # 1. Resolve defaults (seed, frames, size) once so every stage sees the same values.
        params = (params or GenerationParams()).resolved(self.default_num_frames)
        values: dict[str, Any] = {SOURCE_VALUE: image}
        timings: dict[str, float] = {}
        sizes: dict[str, int] = {}
        previous = None

        # 2. Each stage of the route reads its inputs and adds its output.
        for spec in self.registry.route(params):
            if previous is not None:
                payload = values[spec.inputs[0]]
                sizes[f"{previous}->{spec.name}"] = payload.nbytes() if hasattr(payload, "nbytes") else 0
            hooks = {"on_step": on_step, "should_cancel": should_cancel} if spec.reports_steps else {}
            with stage_hook(spec.name) if stage_hook is not None else contextlib.nullcontext():
                start = time.perf_counter()
                values[spec.output] = self.stages[spec.name](*(values[i] for i in spec.inputs), params, **hooks)
                timings[spec.name] = time.perf_counter() - start
            previous = spec.name
        return GenerationResult(video=values[FINAL_VALUE], params=params, timings=timings,
                                bytes_between_stages=sizes)


def _components_of(components: SVDComponents, registry: StageRegistry) -> dict[str, Any]:
    """The named sub-models of a loaded pipeline object (``StableVideoDiffusionPipeline``)."""
    names = {name for spec in registry.stages() for name in spec.components}
    return {name: getattr(components, name) for name in names if hasattr(components, name)}
