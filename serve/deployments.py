"""The four pipeline stages as Ray Serve deployments.

Each replica loads only the sub-models its stage needs, once, and runs the stage from
``pipelines.stages`` in a worker thread so health checks and new requests stay responsive.
Stages write their own progress and timings to the job store (guarded by the runner's lease)
and open their own span under the job's trace. Payloads arrive and leave as objects in Ray's
object store: the runner chains ``DeploymentResponse``s and never touches latents or frames.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from pipelines.errors import JobCancelledError
from pipelines.images import decode_image_bytes
from pipelines.loader import load_components
from pipelines.params import GenerationParams
from pipelines.stages import (
    DecodedFrames,
    DecodeStage,
    EncodedImage,
    ImageEncodeStage,
    SampledLatents,
    SamplingStage,
    VideoEncodeStage,
)

from .config import AppConfig
from .context import JobContext
from .jobstore import make_job_store
from .storage import make_storage
from .telemetry import log_extra, metrics, set_torch_threads, setup_tracing, span_from_carrier

logger = logging.getLogger("ray.serve.svd_serve")

PROGRESS_WRITE_INTERVAL_S = 0.25


class _StageReplica:
    """Shared set-up of every stage replica: config, threads, tracing, job store."""

    stage: str  # name used in progress, timings, spans and metrics
    config_key: str  # field of StagesConfig

    def _setup(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        set_torch_threads(getattr(self.config.stages, self.config_key).resolved_torch_threads())
        setup_tracing(self.config.tracing)
        self.store = make_job_store(self.config.job_store)

    def _started(self, ctx: JobContext) -> None:
        self.store.update_progress(ctx.job_id, owner=ctx.owner, stage=self.stage)

    def _finished(self, ctx: JobContext, seconds: float) -> None:
        self.store.update_progress(ctx.job_id, owner=ctx.owner, stage=self.stage, timings={self.stage: seconds})
        recorder = metrics()
        if recorder is not None:
            recorder.stage_seconds.observe(seconds, tags={"stage": self.stage})
        logger.info("%s done in %.3fs", self.stage, seconds, extra=log_extra(ctx.job_id, stage=self.stage))

    async def _run(self, ctx: JobContext, fn, *args):
        """Run one stage call in a worker thread under its span, recording progress and timing."""
        with span_from_carrier(self.stage, ctx.trace, **{"svd.job_id": ctx.job_id, "svd.tenant": ctx.tenant}):
            await asyncio.to_thread(self._started, ctx)
            start = time.perf_counter()
            result = await asyncio.to_thread(fn, *args)
            await asyncio.to_thread(self._finished, ctx, time.perf_counter() - start)
            return result

    async def replica_info(self) -> dict[str, Any]:
        """Where this replica runs and what it holds (for operators and placement tests)."""
        import ray
        import torch

        context = ray.get_runtime_context()
        return {
            "stage": self.stage,
            "node_id": context.get_node_id(),
            "resources": context.get_assigned_resources(),
            "torch_threads": torch.get_num_threads(),
        }

    async def check_health(self) -> None:
        # The model is loaded in __init__ (a replica that cannot load never becomes healthy); what
        # can break later is the job store every stage writes progress to.
        if not await asyncio.to_thread(self.store.ping):
            raise RuntimeError(f"{self.stage} replica cannot reach the job store")


def _params(params: dict[str, Any]) -> GenerationParams:
    return GenerationParams.model_validate(params)


@serve.deployment(name="ImageEncoder", logging_config={"encoding": "JSON"})
class ImageEncoder(_StageReplica):
    """CLIP image embedding + VAE latent of the conditioning image (reads it from storage)."""

    stage, config_key = "image_encode", "image_encoder"

    def __init__(self, config: dict[str, Any]) -> None:
        self._setup(config)
        self.storage = make_storage(self.config.storage)
        parts = load_components(self.config.model, ("image_encoder", "feature_extractor", "vae"))
        self.encoder = ImageEncodeStage(**parts)

    def _encode(self, input_key: str, params: GenerationParams) -> EncodedImage:
        image = decode_image_bytes(self.storage.get(input_key), name="the stored input image")
        encoded = self.encoder(image, params)
        return EncodedImage(
            image_embeddings=encoded.image_embeddings.cpu(),
            image_latents=encoded.image_latents.cpu(),
            generator_state=encoded.generator_state,
        )

    async def encode(self, ctx: JobContext, input_key: str, params: dict[str, Any]) -> EncodedImage:
        return await self._run(ctx, self._encode, input_key, _params(params))


@serve.deployment(name="Sampler", logging_config={"encoding": "JSON"})
class Sampler(_StageReplica):
    """U-Net Euler sampling: the expensive stage, scaled on its own."""

    stage, config_key = "sampling", "sampler"

    def __init__(self, config: dict[str, Any]) -> None:
        self._setup(config)
        parts = load_components(self.config.model, ("unet", "scheduler"))
        self.sampler = SamplingStage(**parts)
        self.model_info = {
            "num_frames": int(parts["unet"].config.num_frames),
            "model": self.config.model.source,
        }

    async def info(self) -> dict[str, Any]:
        return self.model_info

    def _sample(self, ctx: JobContext, encoded: EncodedImage, params: GenerationParams) -> SampledLatents:
        last_write = 0.0

        def on_step(done: int, total: int) -> None:
            nonlocal last_write
            now = time.monotonic()
            if done == total or now - last_write >= PROGRESS_WRITE_INTERVAL_S:
                last_write = now
                self.store.update_progress(ctx.job_id, owner=ctx.owner, stage=self.stage, step=done, total_steps=total)

        def should_cancel() -> bool:
            return self.store.is_cancel_requested(ctx.job_id)

        sampled = self.sampler(encoded, params, on_step=on_step, should_cancel=should_cancel)
        return SampledLatents(latents=sampled.latents.cpu())

    async def sample(self, ctx: JobContext, encoded: EncodedImage, params: dict[str, Any]) -> SampledLatents:
        try:
            return await self._run(ctx, self._sample, ctx, encoded, _params(params))
        except JobCancelledError:
            logger.info("sampling stopped: job cancelled", extra=log_extra(ctx.job_id))
            raise


@serve.deployment(name="Decoder", logging_config={"encoding": "JSON"})
class Decoder(_StageReplica):
    """VAE temporal decoder: latents in, uint8 frames out."""

    stage, config_key = "decode", "decoder"

    def __init__(self, config: dict[str, Any]) -> None:
        self._setup(config)
        self.decoder = DecodeStage(**load_components(self.config.model, ("vae",)))

    async def decode(self, ctx: JobContext, sampled: SampledLatents, params: dict[str, Any]) -> DecodedFrames:
        return await self._run(ctx, self.decoder, sampled, _params(params))


@serve.deployment(name="VideoEncoder", logging_config={"encoding": "JSON"})
class VideoEncoder(_StageReplica):
    """ffmpeg encode (CPU), then the clip is written to output storage."""

    stage, config_key = "video_encode", "video_encoder"

    def __init__(self, config: dict[str, Any]) -> None:
        self._setup(config)
        self.storage = make_storage(self.config.storage)
        self.encoder = VideoEncodeStage()

    def _store(self, ctx: JobContext, video, output_key: str) -> dict[str, Any]:
        with span_from_carrier("store", ctx.trace, **{"svd.job_id": ctx.job_id}):
            start = time.perf_counter()
            stored = self.storage.put(output_key, video.data, content_type=video.content_type)
            self.store.update_progress(ctx.job_id, owner=ctx.owner, stage="store",
                                       timings={"store": time.perf_counter() - start})
        return {
            "key": stored.key,
            "content_type": video.content_type,
            "file_size": stored.size,
            "num_frames": video.num_frames,
            "fps": video.fps,
            "video_seconds": video.num_frames / video.fps,
        }

    async def encode(
        self, ctx: JobContext, decoded: DecodedFrames, params: dict[str, Any], output_key: str
    ) -> dict[str, Any]:
        video = await self._run(ctx, self.encoder, decoded, _params(params))
        return await asyncio.to_thread(self._store, ctx, video, output_key)
