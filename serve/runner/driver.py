"""The job driver: one claimed job through its route of stages, to a terminal state.

Stage calls are chained as ``DeploymentResponse``s, so payloads go from replica to replica through
Ray's object store and never through here. A stage that reports steps (the Sampler) is called as a
stream: its :class:`~serve.context.StepReport`s arrive as the steps end, and the driver writes them
to the job store at a bounded rate (the first and last step at once) and sends progress webhooks.
The other stages note their own start in the store without waiting for the write.
The last stage's :class:`~serve.context.StageOutput` carries every stage's timing and the stored
clip, which completes the job; the job's output records the model version (``id@digest``) every
model stage was called with, so a clip says which weights made it across a model change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pipelines.errors import JobCancelledError
from pipelines.params import GenerationParams
from pipelines.registry import FINAL_VALUE, SOURCE_VALUE
from pipelines.registry import STAGES as STAGE_REGISTRY
from pipelines.registry import StageSpec, split_route
from pipelines.segments import plan_for

from ..config import AppConfig
from ..context import JobContext, SegmentSet, StageOutput, StepReport, StoredSegment, StoredVideo
from ..jobstore import Job, JobOutput, JobStore, SegmentRecord, segment_file
from ..storage import job_key
from ..lifecycle import JobLifecycle
from ..telemetry import current_carrier, log_extra, span_from_carrier
from ..zoo import ModelCatalog, ModelVersionChangedError
from .failures import cause_of, classify

logger = logging.getLogger("ray.serve.svd_serve")

#: Least seconds between two progress writes of one job (the first and last step are always written).
PROGRESS_WRITE_INTERVAL_S = 0.25


class JobDriver:
    def __init__(self, config: AppConfig, *, store: JobStore, lifecycle: JobLifecycle,
                 stages: dict[str, DeploymentHandle], owner: str, catalog: ModelCatalog | None = None) -> None:
        self.config, self.store, self.lifecycle, self.stages, self.owner = config, store, lifecycle, stages, owner
        self.catalog = catalog if catalog is not None else ModelCatalog(config, None)

    async def run(self, job: Job) -> None:
        """Drive ``job`` (claimed by ``owner``) until it completes, fails, is cancelled or is handed
        back for a retry; a lost lease ends it quietly (the job runs elsewhere). Raises only
        CancelledError (the dispatcher cancelled it: lease lost or shutdown)."""
        with span_from_carrier("job", job.trace_context, **{"svd.job_id": job.id, "svd.tenant": job.tenant,
                                                            "svd.attempt": job.attempts}):
            ctx = JobContext(job_id=job.id, tenant=job.tenant, owner=self.owner, trace=current_carrier(),
                             output_key=job.output_key)
            start = time.perf_counter()
            try:
                final, model_version = await self._through_route(job, ctx)
            except asyncio.CancelledError:
                raise
            except LeaseLostError:
                logger.warning("the lease was lost; the job runs elsewhere now", extra=log_extra(job.id))
                return
            except BaseException as error:  # noqa: BLE001 - classified
                if await asyncio.to_thread(self._settle_failure, job, error):
                    await self.lifecycle.ended(job.id)
                return
            seconds = time.perf_counter() - start
            completed = await asyncio.to_thread(self.store.complete, job.id, owner=self.owner,
                                                output=_job_output(job, final.value, model_version),
                                                timings={**final.timings, "total": seconds})
        if not completed:  # settled elsewhere meanwhile (recovered, cancelled): announced there
            logger.warning("the job was settled elsewhere; this copy's result is dropped", extra=log_extra(job.id))
            return
        await self.lifecycle.ended(job.id)
        logger.info("job completed in %.2fs by model %s", seconds, model_version,
                    extra=log_extra(job.id, tenant=job.tenant))

    def route_of(self, job: Job) -> tuple[StageSpec, ...]:
        if job.route:
            return tuple(STAGE_REGISTRY.get(name) for name in job.route)
        return STAGE_REGISTRY.route(GenerationParams.model_validate(job.params))

    async def _through_route(self, job: Job, ctx: JobContext) -> tuple[StageOutput, str]:
        """The stages before the segments, each segment's stages, the stages after them; the last
        stage's output and the model version the model stages were called with. A clip made in one
        pass is one segment whose payloads never leave the object store; the segments of a long clip
        are stored as they finish, so that a retry resumes after the last one."""
        params = GenerationParams.model_validate(job.params)
        before, per_segment, after = split_route(self.route_of(job))
        plan = plan_for(params, max_segments=self.config.max_segments)
        segments = plan.num_segments if plan is not None else 1
        # The model's version now (id@digest): the multiplexed model id every model stage is called
        # with. Jobs admitted before the zoo name the default model by its source: an alias here.
        model_key = await asyncio.to_thread(self.catalog.version_key, job.model or self.catalog.default_id)
        call = _Calls(self, job, segments, model_key)
        try:
            # 1. Before the segments (text-to-image), unless a finished segment already follows them.
            finished = [StoredSegment(index=s.index, key=s.key, num_frames=s.num_frames)
                        for s in job.segments] if segments > 1 else []
            values: dict[str, Any] = {SOURCE_VALUE: job.input_key}
            if finished:
                logger.info("resuming after segment %d of %d", len(finished), segments, extra=log_extra(job.id))
                values = {SOURCE_VALUE: StageOutput(value=finished[-1], timings=dict(job.segments[-1].seconds))}
            else:
                for spec in before:
                    await call.stage(spec, ctx, values, params)

            # 2. The segments: each conditioned on the stored seam frame of the one before.
            for index in range(len(finished), segments):
                if index:
                    await self._stop_if_cancelled(job, f"before segment {index + 1} of {segments}")
                for spec in per_segment:
                    stage_ctx = ctx
                    if segments > 1:
                        last = spec is per_segment[-1]
                        stage_ctx = dataclasses.replace(
                            ctx, segment=index, segment_key=segment_key(job, index) if last else "",
                            # The progress bar does not step back between segments.
                            note_progress=index == 0 and spec is per_segment[0])
                    await call.stage(spec, stage_ctx, values, params.for_segment(index), segment=index)
                if segments > 1:
                    stored = await values[per_segment[-1].output]
                    await asyncio.to_thread(self._keep_segment, job, stored)
                    finished.append(dataclasses.replace(stored.value, seam=None))  # the encoder reads the files
                    values = {SOURCE_VALUE: stored}
            if segments > 1:
                values[per_segment[-1].output] = StageOutput(value=SegmentSet(tuple(finished)),
                                                             timings=values[SOURCE_VALUE].timings)
                await self._stop_if_cancelled(job, "before joining the segments")

            # 3. After the segments (join, retime, encode, store).
            for spec in after:
                await call.stage(spec, ctx, values, params)
            final = values[FINAL_VALUE]
            output = await final if isinstance(final, DeploymentResponse) else final
            await call.progress.flush()  # no progress write may land after the terminal one
            return output, model_key
        except (asyncio.CancelledError, LeaseLostError):
            call.cancel()
            raise
        except BaseException:
            call.progress.cancel()  # a late write cannot land anyway: the store refuses it once the job is settled
            raise

    async def _stop_if_cancelled(self, job: Job, where: str) -> None:
        if await asyncio.to_thread(self.store.is_cancel_requested, job.id):
            raise JobCancelledError(f"cancelled {where}")

    def _keep_segment(self, job: Job, stored: StageOutput) -> None:
        segment: StoredSegment = stored.value
        record = SegmentRecord(index=segment.index, key=segment.key, num_frames=segment.num_frames,
                               seconds=stored.timings)
        if not self.store.record_segment(job.id, record, owner=self.owner):
            raise LeaseLostError(f"job {job.id}: the lease was lost during segment {segment.index + 1}")

    def _settle_failure(self, job: Job, error: BaseException) -> bool:
        """Record how a job that raised ends; True if it reached a terminal state."""
        verdict = classify(error, cancel_requested=self.store.is_cancel_requested(job.id), attempts=job.attempts,
                           max_attempts=self.config.job_store.max_attempts)
        if verdict.action == "cancel":
            logger.info("job cancelled", extra=log_extra(job.id))
            return self.store.mark_cancelled(job.id, owner=self.owner)
        cause = cause_of(error)
        if isinstance(cause, ModelVersionChangedError):
            # The registry changed (the runner now reads another version than the one the job ran
            # with): a fresh start, not an attempt. Otherwise a stage replica runs another app config
            # than this runner (a roll-out in progress): counted, so max_attempts bounds it.
            changed = self.catalog.version_key(job.model or self.catalog.default_id) != cause.requested
            logger.info("the job's model changed while it ran; it starts again on the new version"
                        if changed else "a stage replica reads another version of the job's model (config "
                        "roll-out in progress); the job is retried", extra=log_extra(job.id))
            if changed or job.attempts < self.config.job_store.max_attempts:
                self.store.release(job.id, owner=self.owner, count_attempt=not changed)
                return False
        if verdict.action == "retry":
            logger.warning("stage worker lost (%s); the job goes back to the queue", type(cause_of(error)).__name__,
                           extra=log_extra(job.id))
            self.store.release(job.id, owner=self.owner, count_attempt=True)
            return False
        if verdict.internal:
            logger.error("job failed: %r", cause_of(error), extra=log_extra(job.id), exc_info=cause_of(error))
        return self.store.fail(job.id, owner=self.owner, error=verdict.error)


class _Calls:
    """The stage calls of one job: started as chained DeploymentResponses (a stage that reports
    steps as a stream, read here), all cancelled together."""

    def __init__(self, driver: JobDriver, job: Job, segments: int, model_key: str) -> None:
        self.driver, self.segments, self.model_key = driver, segments, model_key
        self.progress = ProgressReporter(driver, job)
        self.calls: list[Any] = []

    async def stage(self, spec: StageSpec, ctx: JobContext, values: dict[str, Any], params: GenerationParams,
                    *, segment: int = 0) -> None:
        args = [values[name] for name in spec.inputs]
        handle = self.driver.stages[spec.name]
        if spec.multiplexed:  # routed to a replica that holds the job's model, if one does
            handle = handle.options(multiplexed_model_id=self.model_key)
        dumped = params.model_dump(mode="json")
        if not spec.reports_steps:
            response = handle.run.remote(ctx, *args, params=dumped)
            self.calls.append(response)
            values[spec.output] = response
            return
        stream = handle.options(stream=True).run_streaming.remote(ctx, *args, params=dumped)
        self.calls.append(stream)
        async for item in stream:
            if isinstance(item, StepReport):
                if spec.per_segment and self.segments > 1:  # steps count across the segments
                    item = dataclasses.replace(item, step=segment * item.total + item.step,
                                               total=self.segments * item.total)
                self.progress.step(item)
            else:
                values[spec.output] = item

    def cancel(self) -> None:
        self.progress.cancel()
        for call in self.calls:
            call.cancel()


class ProgressReporter:
    """Writes one job's progress to the store at a bounded rate and sends its progress webhooks.

    Writes happen in a background task that always writes the newest report (older ones waiting
    behind a write are dropped), so the driver never waits for the store between a stage's last
    step and the next stage's call."""

    def __init__(self, driver: JobDriver, job: Job) -> None:
        self.driver, self.job = driver, job
        self.last_write = 0.0
        self._pending: dict[str, Any] | None = None
        self._writer: asyncio.Task | None = None

    def step(self, report: StepReport) -> None:
        now = time.monotonic()
        first_or_last = report.step <= 1 or report.step == report.total
        if not first_or_last and now - self.last_write < PROGRESS_WRITE_INTERVAL_S:
            return
        self.last_write = now
        self._submit(stage=report.stage, step=report.step, total_steps=report.total, reported_at=report.at)

    def _submit(self, **progress: Any) -> None:
        self._pending = progress
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())

    async def _write_pending(self) -> None:
        driver, job = self.driver, self.job
        while self._pending is not None:
            progress, self._pending = self._pending, None
            try:
                written = await asyncio.to_thread(driver.store.update_progress, job.id, owner=driver.owner,
                                                  **progress)
                if written and driver.lifecycle.wants_progress_event(job):
                    fresh = await asyncio.to_thread(driver.store.get, job.id, tenant=None)
                    if fresh is not None:
                        driver.lifecycle.progressed(fresh)
            except Exception:  # noqa: BLE001 - progress is advisory; the job goes on
                logger.warning("could not record progress", exc_info=True, extra=log_extra(job.id))

    async def flush(self) -> None:
        """Wait for the last write (before the job's terminal write)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    def cancel(self) -> None:
        if self._writer is not None:
            self._writer.cancel()


class LeaseLostError(Exception):
    """This runner no longer holds the job's lease: another one drives it now."""


def segment_key(job: Job, index: int) -> str:
    """Where this attempt keeps segment ``index`` of a long clip (see :func:`segment_file`)."""
    return job_key(job.tenant, job.id, segment_file(index, job.attempts))


def _job_output(job: Job, stored: StoredVideo, model_version: str) -> JobOutput:
    extension = job.output_key.rsplit(".", 1)[-1]
    return JobOutput(key=stored.key, content_type=stored.content_type, file_name=f"{job.id}.{extension}",
                     file_size=stored.file_size, num_frames=stored.num_frames, fps=stored.fps, width=stored.width,
                     height=stored.height, duration_s=stored.duration_s, model_version=model_version)
