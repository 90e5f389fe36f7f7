"""One Ray Serve deployment class for every registered pipeline stage.

``build_app`` binds :class:`StageReplica` once per entry of :data:`pipelines.registry.STAGES`, under
the stage's deployment name and options. A replica loads only the components its stage declares,
once, and runs the stage in a worker thread so health checks and new requests stay responsive.

Each replica returns a :class:`~serve.context.StageOutput` carrying its value and the timings so
far, and the driver records them. A stage that reports steps is called as a stream and yields
:class:`~serve.context.StepReport`s as the steps end, then its output; the driver writes those. The
other stages note their start (and the last one its upload) in the job store from a background
thread, so that write never delays the work. The source value (the conditioning image) arrives as a
storage key and is read here, or as the previous segment of a long clip (whose seam frame it is);
the last per-segment stage of a long clip stores its frames and returns a
:class:`~serve.context.StoredSegment`; the final value (the clip) is written to output storage
here, its first frame beside it as a JPEG (the ``thumbnail`` content variant), so the driver never
handles payloads.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from ray import serve

import numpy as np
import PIL.Image

from pipelines.images import decode_image_bytes
from pipelines.loader import load_stage_components
from pipelines.params import GenerationParams
from pipelines import registry
from pipelines.registry import FINAL_VALUE, SOURCE_VALUE, VIDEO_ENCODE
from pipelines.segments import plan_for, seam_frame
from pipelines.payloads import DecodedFrames, EncodedVideo, to_host

from .config import AppConfig
from .context import JobContext, SegmentSet, StageOutput, StepReport, StoredSegment, StoredVideo
from .jobstore import THUMBNAIL_CONTENT_TYPE, make_job_store, thumbnail_key_for
from .stage_models import LoadedModel, StageModels, default_warmup_shape
from .storage import make_storage
from .zoo import ModelCatalog, make_model_store, model_id_for
from .telemetry import (emit, log_extra, record_model_load, set_torch_threads, setup_tracing, span_from_carrier,
                        timed_replica, tracer)

logger = logging.getLogger("ray.serve.svd_serve")


@serve.deployment(logging_config={"encoding": "JSON"})
@timed_replica  # svd_replica_starts_total / svd_replica_ready_seconds: the whole constructor, loads included
class StageReplica:
    def __init__(self, config: dict[str, Any], stage: str) -> None:
        self.config = AppConfig.model_validate(config)  # imports stage_modules: the registry matches the driver's
        # Through the module: Serve pickles this class by value, and the registry (a module
        # singleton that stage_modules extend in this process) must not be copied along.
        self.spec = registry.STAGES.get(stage)
        set_torch_threads(self.config.stages.for_stage(self.spec).resolved_torch_threads())
        setup_tracing(self.config.tracing)
        self.store = make_job_store(self.config.job_store)  # cancel checks and health
        needs_storage = SOURCE_VALUE in self.spec.inputs or self.spec.output == FINAL_VALUE or self.spec.per_segment
        self.storage = make_storage(self.config.storage) if needs_storage else None
        self.catalog = ModelCatalog(self.config, make_model_store(self.config.job_store))
        self.models: StageModels | None = None
        self._preloaded: dict[str, LoadedModel] = {}
        if self.spec.multiplexed:
            self._start_multiplexed()
        else:
            model = self.config.model_for(self.spec)
            if model is None:
                raise ValueError(f"stage {self.spec.name!r} has no model configured")
            self._fixed = self._load(model)
            self._note_default(self._fixed)
        self._notes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress-notes")  # in order

    # -- calls from the driver ------------------------------------------------------------------

    async def run(self, ctx: JobContext, *inputs: Any, params: dict[str, Any]) -> StageOutput:
        """Run the stage on its inputs (earlier StageOutputs, or the stored image's key)."""
        if ctx.note_progress:
            self._note_progress(ctx, self.spec.name)
        values, timings = self._unwrap(inputs)
        with self._span(ctx):
            model = await self._model(timings)  # held: _run_timed lets go of it
            return await asyncio.to_thread(self._run_timed, ctx, model, values,
                                           GenerationParams.model_validate(params), {}, timings)

    async def run_streaming(self, ctx: JobContext, *inputs: Any, params: dict[str, Any]
                            ) -> AsyncIterator[StepReport | StageOutput]:
        """Like :meth:`run` for a stage that reports steps: yields a StepReport when it starts
        and after each step, then the StageOutput."""
        values, timings = self._unwrap(inputs)
        resolved = GenerationParams.model_validate(params)
        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[StepReport] = asyncio.Queue()

        def on_step(done: int, total: int) -> None:
            loop.call_soon_threadsafe(reports.put_nowait, StepReport(self.spec.name, done, total, time.time()))

        stopped = threading.Event()  # the driver went away (lease lost, shutdown): stop at the next step
        hooks = {"on_step": on_step,
                 "should_cancel": lambda: stopped.is_set() or self.store.is_cancel_requested(ctx.job_id)}
        with self._span(ctx):
            model = await self._model(timings)  # held: _run_timed lets go of it, or this if it never starts
            work = None
            try:
                yield StepReport(self.spec.name, 0, int(model.stage.total_steps(resolved)), time.time())
                work = asyncio.ensure_future(asyncio.to_thread(self._run_timed, ctx, model, values, resolved,
                                                               hooks, timings))
                while not work.done() or not reports.empty():
                    getter = asyncio.ensure_future(reports.get())
                    await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                output = work.result()
            finally:
                stopped.set()
                if work is None:
                    model.release()
            yield output

    async def info(self, model_id: str | None = None) -> dict[str, Any]:
        """A model's defaults (on the stage that describes the model): the default model's from its
        loaded stage; another model's frame count from its U-Net config, without loading it."""
        info = {**self._default_info, "stage": self.spec.name}
        if self.models is not None and model_id is not None and model_id != info["model"]:
            info.update(model=model_id, num_frames=await asyncio.to_thread(self.models.default_num_frames, model_id))
        return info

    async def replica_info(self) -> dict[str, Any]:
        """Where this replica runs and what it holds (for operators and placement tests)."""
        import ray
        import torch

        context = ray.get_runtime_context()
        return {"stage": self.spec.name, "node_id": context.get_node_id(),
                "resources": context.get_assigned_resources(), "torch_threads": torch.get_num_threads(),
                "load_seconds": self.load_seconds, "acceleration": self._acceleration_info(), **self._model_stats()}

    async def check_health(self) -> None:
        # The model loads in __init__ (a replica that cannot load never becomes healthy); what can
        # break later is the job store the cancel checks read.
        if not await asyncio.to_thread(self.store.ping):
            raise RuntimeError(f"{self.spec.name} replica cannot reach the job store")

    # -- models -----------------------------------------------------------------------------------

    def _note_default(self, model: LoadedModel) -> None:
        """What info() answers for the default model, and this replica's memory budget (measured
        with the default model loaded)."""
        stage = model.stage
        self.load_seconds = model.load_seconds
        self._default_info = {"model": model.model_id, "num_frames": int(getattr(stage, "default_num_frames", 0)),
                              "size_multiple": int(getattr(stage, "size_multiple", 0)) or None,
                              "negative_prompt": getattr(stage, "accepts_negative_prompt", None)}
        self._memory_budget = self._memory_budget_bytes(stage)
        self._set_memory_budget(stage)

    def _start_multiplexed(self) -> None:
        """Load the default model and the warm pool (``preload`` models), then wrap the loader in
        Serve's multiplexer with room for ``max_num_models_per_replica`` models. A warm-pool model
        that fails to load is logged and left to load on demand (one bad registry entry must not
        keep the replica from starting)."""
        options = self.config.stages.for_stage(self.spec)
        self.models = StageModels(self.spec, self.catalog, acceleration=options.acceleration,
                                  warmup_shapes=options.warmup_shapes, low_vram=options.low_vram,
                                  default_shape=lambda entry: default_warmup_shape(self.config, self.models, entry))
        self._default_key = self.catalog.version_key(self.catalog.default_id)
        default = self.models.load(self._default_key)
        self._note_default(default)
        self._default_ready = default.ready
        self._default_stage = default.stage
        capacity = options.max_num_models_per_replica or self.models.models_that_fit(
            default, gpu_share=float(options.ray_actor_options.num_gpus))
        self._preloaded[self._default_key] = default
        warm = [entry.id for entry in self.catalog.entries(fresh=True).values()
                if entry.preload and entry.kind == "image-to-video" and entry.id != self.catalog.default_id]
        for model_id in warm[:capacity - 1]:
            try:
                key = self.catalog.version_key(model_id)
                self._preloaded[key] = self.models.load(key)
            except Exception:  # noqa: BLE001 - logged; the model loads on demand (and fails there, clearly)
                logger.exception("%s could not preload model %s", self.spec.name, model_id)
        self.capacity = capacity

        async def load_model(key: str) -> LoadedModel:
            preloaded = self._preloaded.pop(key, None)
            if preloaded is not None:
                return preloaded
            self._make_room()
            model = await asyncio.to_thread(self.models.load, key)
            self._set_memory_budget(model.stage)
            return model

        self._load_model = load_model  # Serve keeps its multiplexer (and the models it holds) on it
        self._get_model = serve.multiplexed(max_num_models_per_replica=capacity)(load_model)

    def _make_room(self) -> None:
        """Preloaded models not yet handed to the multiplexer count against its capacity: the
        oldest of them goes before a new model loads, so no more than ``capacity`` stay resident."""
        wrapper = getattr(self._load_model, "__serve_multiplex_wrapper", None)
        held = len(getattr(wrapper, "models", {})) if wrapper is not None else 0
        while self._preloaded and held + len(self._preloaded) >= self.capacity:
            key = next(iter(self._preloaded))
            self._preloaded.pop(key).__del__()  # counted as an eviction

    async def _model(self, timings: dict[str, float]) -> LoadedModel:
        """The model this request names (its multiplexed model id, ``id@digest``; none: the
        default), loaded if it is not held yet, and held for this request (released when it
        ends); a load made for this request is added to its timings (``model_load``)."""
        if self.models is None:
            self._fixed.hold()
            return self._fixed
        key = serve.get_multiplexed_model_id() or self._default_key
        if "@" not in key:  # a bare id or alias (a job admitted before versioned keys)
            key = await asyncio.to_thread(self.catalog.version_key, key)
        start = time.monotonic()
        model = await self._get_model(key)
        model.hold()  # in the same turn of the loop as the hand-over: no eviction can come between
        if model.loaded_at >= start:
            timings["model_load"] = timings.get("model_load", 0.0) + model.load_seconds
        return model

    def _model_stats(self) -> dict[str, Any]:
        if self.models is None:
            return {"models": [self._fixed.model_id]}
        wrapper = getattr(self._load_model, "__serve_multiplex_wrapper", None)
        held = list(getattr(wrapper, "models", {})) if wrapper is not None else []
        return {"models": sorted({key.rsplit("@", 1)[0] for key in (*held, *self._preloaded)}),
                "capacity": self.capacity,
                "evictions": self.models.evictions, "model_load_seconds": dict(self.models.load_seconds),
                "component_loads": self.models.components.loads, "component_hits": self.models.components.hits}

    def _load(self, model) -> LoadedModel:
        """Fetch and load the stage's components and build the stage, timed: a span, a metric and a
        log line per load (a cold replica's start is mostly this)."""
        start = time.perf_counter()
        with tracer().start_as_current_span("model_load", attributes={"svd.stage": self.spec.name,
                                                                      "svd.model": model.source}):
            stage_options = {"h264_codec": self.config.stages.for_stage(self.spec).h264_codec} \
                if self.spec.name == VIDEO_ENCODE.name else {}
            stage = self.spec.build(load_stage_components(self.spec, model), **stage_options)
        seconds = time.perf_counter() - start
        model_id = model_id_for(model.source)
        record_model_load(stage=self.spec.name, model=model_id, seconds=seconds)
        logger.info("%s loaded %s in %.2fs", self.spec.name, model.source, seconds)
        return LoadedModel(model_id, stage, load_seconds=seconds)

    def _memory_budget_bytes(self, stage: Any) -> int | None:
        """A stage that sizes its work by GPU memory (the decoder's chunks) gets this replica's
        share of the GPU, less what its models hold, split over its concurrent requests: fixed for
        the replica's life, so results do not depend on what else ran."""
        import torch

        if not hasattr(stage, "memory_budget_bytes") or not torch.cuda.is_available():
            return None
        options = self.config.stages.for_stage(self.spec)
        share = min(1.0, float(options.ray_actor_options.num_gpus) or 1.0)
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        free = max(0.0, total * share - torch.cuda.memory_allocated())
        return int(free / max(1, options.max_ongoing_requests))

    def _set_memory_budget(self, stage: Any) -> None:
        if self._memory_budget is not None and hasattr(stage, "memory_budget_bytes"):
            stage.memory_budget_bytes = self._memory_budget

    # -- inside -----------------------------------------------------------------------------------

    def _note_progress(self, ctx: JobContext, stage: str) -> None:
        """Record, without waiting, that the job reached ``stage`` (a progress hint for clients)."""
        def write() -> None:
            try:
                self.store.update_progress(ctx.job_id, owner=ctx.owner, stage=stage)
            except Exception:  # noqa: BLE001 - a missed hint is not worth failing the job for
                logger.debug("could not note progress", exc_info=True, extra=log_extra(ctx.job_id))

        self._notes.submit(write)

    def _span(self, ctx: JobContext):
        return span_from_carrier(self.spec.name, ctx.trace, **{"svd.job_id": ctx.job_id, "svd.tenant": ctx.tenant})

    @staticmethod
    def _unwrap(inputs: tuple[Any, ...]) -> tuple[list[Any], dict[str, float]]:
        values, timings = [], {}
        for item in inputs:
            if isinstance(item, StageOutput):
                timings.update(item.timings)
                item = item.value
            values.append(item)
        return values, timings

    def _run_timed(self, ctx: JobContext, model: LoadedModel, values: list[Any], params: GenerationParams,
                   hooks: dict[str, Any], timings: dict[str, float]) -> StageOutput:
        """In a worker thread: the stage itself (timed), then the clip's upload if it is the last."""
        start = time.perf_counter()
        stage_name = self.spec.name
        try:
            try:
                values = [self._resolve(name, value, params) for name, value in zip(self.spec.inputs, values)]
                with model.applied() as stage:
                    value = to_host(stage(*values, params, **hooks))
            finally:
                model.release()
            if ctx.segment_key and isinstance(value, DecodedFrames):
                value = self._store_segment(ctx, value, params)
            seconds = time.perf_counter() - start
            timings = {**timings, stage_name: timings.get(stage_name, 0.0) + seconds}
            emit(lambda m: m.stage_seconds.observe(seconds, tags={"stage": stage_name, "model": model.model_id}))
            logger.info("%s done in %.3fs", stage_name, seconds, extra=log_extra(ctx.job_id, stage=stage_name))
            if self.spec.output == FINAL_VALUE and isinstance(value, EncodedVideo):
                value = self._store(ctx, value, timings)
            return StageOutput(value=value, timings=timings)
        finally:  # busy for every request, failed or cancelled ones and the clip's upload included
            busy = time.perf_counter() - start
            if busy > 0:
                emit(lambda m: m.stage_busy_seconds.inc(busy, tags={"stage": stage_name}))

    def _acceleration_info(self) -> dict[str, Any] | None:
        """The default model's warm-up report: compile seconds per shape and the cache outcome."""
        ready = getattr(self, "_default_ready", None)
        if ready is None:
            return None
        return {"compiled": ready.compiled, "cache": ready.cache,
                "warmup_s": {shape: round(seconds, 2) for shape, seconds in ready.warmup_s.items()},
                "cache_load_s": round(ready.cache_load_s, 2), "cache_bytes": ready.cache_bytes,
                "aot_build_s": round(ready.aot_build_s, 2), "aot_packages": ready.aot_packages,
                "aot_calls": self._aot_calls()}

    def _aot_calls(self) -> dict[str, int] | None:
        """Calls of the default model's ahead-of-time compiled networks: run by a package or
        eagerly (a shape nobody warmed up, a LoRA request). None under the jit engine or eager."""
        from pipelines.acceleration.aot import dispatches

        found = dispatches(self._default_stage)
        if not found:
            return None
        return {"compiled": sum(d.compiled_calls for d in found), "eager": sum(d.eager_calls for d in found)}

    def _resolve(self, name: str, value: Any, params: GenerationParams) -> Any:
        """An input as the stage takes it. The source (the conditioning image) arrives as the stored
        input's key, or as the previous segment of a long clip, whose seam frame it is; a long
        clip's frames arrive as a SegmentSet, read back as every segment's frames."""
        if name == SOURCE_VALUE and isinstance(value, str):
            return decode_image_bytes(self.storage.get(value), name="the stored input image")
        if name == SOURCE_VALUE and isinstance(value, StoredSegment):
            seam = value.seam if value.seam is not None else seam_frame(self._load_frames(value), plan_for(params))
            return PIL.Image.fromarray(seam)
        if isinstance(value, SegmentSet):
            return [DecodedFrames(frames=self._load_frames(segment)) for segment in value.segments]
        return value

    def _load_frames(self, segment: StoredSegment) -> np.ndarray:
        return np.load(io.BytesIO(self.storage.get(segment.key)), allow_pickle=False)

    def _store_segment(self, ctx: JobContext, decoded: DecodedFrames, params: GenerationParams) -> StoredSegment:
        """A long clip's segment goes to storage (kept for a resume) instead of the object store."""
        buffer = io.BytesIO()
        np.save(buffer, decoded.frames, allow_pickle=False)
        self.storage.put(ctx.segment_key, buffer.getvalue(), content_type="application/octet-stream")
        return StoredSegment(index=ctx.segment, key=ctx.segment_key, num_frames=int(decoded.frames.shape[0]),
                             seam=seam_frame(decoded.frames, plan_for(params)))

    def _store(self, ctx: JobContext, video: EncodedVideo, timings: dict[str, float]) -> StoredVideo:
        """Upload the clip, then its poster (first frame, JPEG) beside it: the ``thumbnail`` variant
        of ``GET /v1/videos/{id}/content``. A failed poster upload costs the thumbnail, never the job."""
        self._note_progress(ctx, "store")
        with span_from_carrier("store", ctx.trace, **{"svd.job_id": ctx.job_id}):
            start = time.perf_counter()
            stored = self.storage.put(ctx.output_key, video.data, content_type=video.content_type)
            try:  # beside the clip, where JobOutput.thumbnail_key finds it
                if video.poster:
                    self.storage.put(thumbnail_key_for(stored.key), video.poster, content_type=THUMBNAIL_CONTENT_TYPE)
            except Exception:  # noqa: BLE001 - the clip is what was asked for
                logger.warning("could not store the thumbnail", exc_info=True, extra=log_extra(ctx.job_id))
            timings["store"] = time.perf_counter() - start
        return StoredVideo(key=stored.key, content_type=video.content_type, file_size=stored.size,
                           num_frames=video.num_frames, fps=video.fps, width=video.width, height=video.height)

