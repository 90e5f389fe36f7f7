"""Names shared by the modules of ``bench_pipeline.py``: the program name, its expected failure,
the dtype sizes and the stage routes (from the registry)."""

from __future__ import annotations

from pipelines.params import GenerationParams  # light: pydantic only
from pipelines.registry import STAGES as REGISTRY  # light: no torch

PROG = "bench_pipeline.py"

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def route_names(params: GenerationParams) -> tuple[str, ...]:
    """The stages a job with these parameters passes through (the registry's route), in order."""
    return tuple(spec.name for spec in REGISTRY.route(params))


#: Image-to-video's route (image_encode, sampling, decode, video_encode) and text-to-video's
#: (text_to_image first). A job runs only the stages of its route: text_to_image is not timed for
#: an image-to-video run.
STAGES = route_names(GenerationParams())
T2V_STAGES = route_names(GenerationParams(prompt="x"))
BOUNDARIES = tuple(f"{a}->{b}" for a, b in zip(STAGES, STAGES[1:]))


class BenchError(Exception):
    """An expected failure: printed as one line, exit status 2."""
