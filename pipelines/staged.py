"""All four stages in one process: the CLI, the demo, the tests and the benchmarks use this.

The Ray Serve application runs the same stage classes, each in its own deployment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import PIL.Image

from .params import GenerationParams
from .stages import (
    CancelCheck,
    DecodeStage,
    EncodedVideo,
    ImageEncodeStage,
    ProgressCallback,
    SamplingStage,
    SVDComponents,
    VideoEncodeStage,
)

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
    """Runs image encode -> sampling -> decode -> video encode in this process."""

    def __init__(self, components: SVDComponents) -> None:
        self.image_encode = ImageEncodeStage(
            image_encoder=components.image_encoder, feature_extractor=components.feature_extractor, vae=components.vae
        )
        self.sampling = SamplingStage(unet=components.unet, scheduler=components.scheduler)
        self.decode = DecodeStage(vae=components.vae)
        self.video_encode = VideoEncodeStage()
        self.default_num_frames = int(components.unet.config.num_frames)

    def __call__(
        self,
        image: PIL.Image.Image,
        params: GenerationParams | None = None,
        *,
        on_step: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        # 1. Resolve defaults (seed, frames, size) once so every stage sees the same values.
        params = (params or GenerationParams()).resolved(self.default_num_frames)
        timings: dict[str, float] = {}
        sizes: dict[str, int] = {}

        def timed(name, fn, *args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            timings[name] = time.perf_counter() - start
            return out

        # 2. Image encode, 3. sampling, 4. decode, 5. video encode.
        encoded = timed("image_encode", self.image_encode, image, params)
        sizes["image_encode->sampling"] = encoded.nbytes()
        sampled = timed("sampling", self.sampling, encoded, params, on_step=on_step, should_cancel=should_cancel)
        sizes["sampling->decode"] = sampled.nbytes()
        decoded = timed("decode", self.decode, sampled, params)
        sizes["decode->video_encode"] = decoded.nbytes()
        video = timed("video_encode", self.video_encode, decoded, params)
        return GenerationResult(video=video, params=params, timings=timings, bytes_between_stages=sizes)
