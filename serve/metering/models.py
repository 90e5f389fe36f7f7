"""The usage record of one finished job, the charging rules, and the per-tenant summary.

Pure pydantic, no storage code and no Ray. One :class:`UsageRecord` is written per job when it
reaches a terminal state (:func:`usage_record_for` builds it from the :class:`~serve.jobstore.Job`);
a :class:`UsageSummary` adds up a tenant's records over a time window, in total and per model
(:attr:`UsageSummary.by_model`).

What is metered, per job:

* ``busy_seconds[stage]``: seconds a replica of the stage spent on the job, from ``job.timings``
  (``image_encode``, ``sampling``, ``decode``, ``video_encode``; the ``store`` upload and the
  ``total`` wall time are not stage work and are not metered).
* ``gpu_seconds[stage]``: ``busy_seconds[stage]`` x the stage's GPU share, i.e. its
  ``ray_actor_options.num_gpus`` (a replica holding half a GPU for 10 s uses 5 GPU-seconds).
* ``video_seconds``: playback length of the delivered clip (``JobOutput.duration_s``: frames / fps,
  as the final stage encoded it); 0 unless the job completed.
* ``model``: the model that served the job (``Job.model``: its registry id, or the model's source
  for jobs of a single-model service). None when the job named none (and in records written before
  the field existed); such records are counted under :data:`UNKNOWN_MODEL` in ``by_model``.

Charging rules (``charged``):

* ``completed``: charged.
* ``cancelled``: charged for the GPU time actually used: the stages that finished before the
  cancel took effect (a job cancelled while queued used none and costs nothing; the stage that was
  interrupted by the cancel records no timing and is not charged). No video seconds.
* ``failed``: charged only when the failure is the client's fault, i.e. the error code is one of
  :data:`CLIENT_ERROR_CODES` (bad input or image found while the job ran); then the GPU time used
  up to the failure is charged. A failure of the service (``internal_error``, ``worker_lost``,
  ``abandoned``, a missing error or any code not in that list) is never charged; it is counted as
  an uncharged failure so operators can see it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.registry import STAGES
from serve.jobstore.models import Job, JobStatus, to_utc, utcnow

if TYPE_CHECKING:
    from serve.config import StagesConfig


def metered_stages() -> tuple[str, ...]:
    """The metered stages: every registered stage, by the name used in ``Job.timings``, progress,
    spans and metric labels."""
    return STAGES.names()

#: Error codes of failures caused by the client's input: such a failed job is charged for the GPU
#: time it used. Every other code (``internal_error``, ``worker_lost``, ``abandoned``, unknown
#: ones) is a service fault and is not charged.
CLIENT_ERROR_CODES: frozenset[str] = frozenset(
    {"invalid_input", "invalid_image", "image_too_large", "invalid_parameter", "url_not_allowed"}
)

#: The ``by_model`` key (and ``model`` filter value) of records that name no model: jobs recorded
#: before usage carried the model, or jobs whose record has an empty ``Job.model``.
UNKNOWN_MODEL = "unknown"


class Outcome(str, Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class UsageRecord(BaseModel):
    """What one finished job used, and whether it is charged. Immutable once recorded."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(min_length=1)
    tenant: str = Field(min_length=1)
    finished_at: datetime = Field(description="When the job reached its terminal state (UTC).")
    outcome: Outcome
    charged: bool = Field(description="Whether this job's usage counts toward the tenant's bill.")
    error_code: str | None = Field(default=None, description="The failure's code (failed jobs).")
    model: str | None = Field(default=None, description="The model that served the job (Job.model); None if "
                              "unknown (records written before the field existed).")
    video_seconds: float = Field(default=0.0, ge=0, description="Playback seconds delivered (completed jobs).")
    gpu_seconds: dict[str, float] = Field(default_factory=dict, description="Per stage: busy seconds x GPU share.")
    busy_seconds: dict[str, float] = Field(default_factory=dict, description="Per stage: replica busy seconds.")

    @field_validator("finished_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return to_utc(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return value or None  # "" (a job that named no model) is unknown too

    @property
    def gpu_seconds_total(self) -> float:
        return math.fsum(self.gpu_seconds.values())

    @property
    def model_key(self) -> str:
        """The record's key in ``UsageSummary.by_model``: its model, or :data:`UNKNOWN_MODEL`."""
        return self.model or UNKNOWN_MODEL


class _ExactSum:
    """A running sum that ends exactly as ``math.fsum`` of every value added would (correctly
    rounded), in memory that does not grow with the number of values: Shewchuk's non-overlapping
    partials (the ``msum`` recipe ``math.fsum`` itself is built on). Non-finite values are kept
    aside and handed to ``math.fsum`` at the end, which gives them its own inf/nan semantics; finite
    values whose sum overflows raise ``OverflowError``, as ``math.fsum`` does."""

    __slots__ = ("_partials", "_special")

    def __init__(self) -> None:
        self._partials: list[float] = []
        self._special: list[float] = []

    def add(self, x: float) -> None:
        x = float(x)
        if not math.isfinite(x):
            self._special.append(x)
            return
        i = 0
        for y in self._partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            if not math.isfinite(hi):
                raise OverflowError("intermediate overflow in the usage sum")
            lo = y - (hi - x)
            if lo:
                self._partials[i] = lo
                i += 1
            x = hi
        self._partials[i:] = [x]

    @property
    def value(self) -> float:
        return math.fsum(self._partials + self._special)


class _Tally:
    """The counters of :class:`UsageTotals`, added up one record at a time."""

    def __init__(self) -> None:
        self.counts = {outcome: 0 for outcome in Outcome}
        self.charged = self.uncharged_failures = 0
        self.video = _ExactSum()
        self.gpu_all = _ExactSum()
        self.gpu: dict[str, _ExactSum] = {stage: _ExactSum() for stage in metered_stages()}
        self.busy: dict[str, _ExactSum] = {stage: _ExactSum() for stage in metered_stages()}

    def add(self, rec: UsageRecord) -> None:
        self.counts[rec.outcome] += 1
        if not rec.charged:
            if rec.outcome is Outcome.FAILED:
                self.uncharged_failures += 1
            return
        self.charged += 1
        self.video.add(rec.video_seconds)
        for stage, seconds in rec.gpu_seconds.items():
            self.gpu.setdefault(stage, _ExactSum()).add(seconds)
            self.gpu_all.add(seconds)
        for stage, seconds in rec.busy_seconds.items():
            self.busy.setdefault(stage, _ExactSum()).add(seconds)

    def fields(self) -> dict[str, Any]:
        return dict(
            completed=self.counts[Outcome.COMPLETED], failed=self.counts[Outcome.FAILED],
            cancelled=self.counts[Outcome.CANCELLED], charged=self.charged,
            uncharged_failures=self.uncharged_failures, video_seconds=self.video.value,
            gpu_seconds={stage: total.value for stage, total in self.gpu.items()},
            gpu_seconds_total=self.gpu_all.value,
            busy_seconds={stage: total.value for stage, total in self.busy.items()},
        )


class UsageTotals(BaseModel):
    """Counters over a set of records: ``completed``/``failed``/``cancelled`` count every record;
    ``video_seconds``, ``gpu_seconds`` and ``busy_seconds`` add up the *charged* records only."""

    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    charged: int = 0
    uncharged_failures: int = 0
    video_seconds: float = 0.0
    gpu_seconds: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(metered_stages(), 0.0))
    gpu_seconds_total: float = Field(default=0.0, description="fsum of every charged record's stage values.")
    busy_seconds: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(metered_stages(), 0.0))

    @property
    def jobs(self) -> int:
        return self.completed + self.failed + self.cancelled


class ModelUsage(UsageTotals):
    """One model's share of a :class:`UsageSummary`: the same counters, over that model's records."""


class UsageSummary(UsageTotals):
    """A tenant's usage over ``[start, end)`` (by ``finished_at``), in total and per model.

    ``completed``/``failed``/``cancelled`` count every record; ``video_seconds``, ``gpu_seconds``
    and ``busy_seconds`` add up the *charged* records only. ``by_model`` holds the same counters
    per model (:attr:`UsageRecord.model_key`: records naming no model are under
    :data:`UNKNOWN_MODEL`); only models with at least one record in the window appear, and the
    per-model counts add up to the totals. Sums are exactly ``math.fsum`` of the values (correctly
    rounded, independent of order), so every backend returns the same numbers.
    """

    tenant: str
    start: datetime
    end: datetime
    by_model: dict[str, ModelUsage] = Field(default_factory=dict, description="The same counters per model id.")

    @classmethod
    def of(cls, tenant: str, start: datetime, end: datetime, records: Iterable[UsageRecord]) -> "UsageSummary":
        """Add up ``records`` (the caller has selected the tenant's records in the window, and a
        model's if it filters by one). One pass; memory does not grow with the number of records."""
        total = _Tally()
        per_model: dict[str, _Tally] = {}
        for rec in records:
            total.add(rec)
            per_model.setdefault(rec.model_key, _Tally()).add(rec)
        return cls(
            tenant=tenant, start=to_utc(start), end=to_utc(end), **total.fields(),
            by_model={model: ModelUsage(**tally.fields()) for model, tally in sorted(per_model.items())},
        )


# ---------------------------------------------------------------------------------------- rules


def gpu_share_from_config(stages: "StagesConfig") -> dict[str, float]:
    """Each metered stage's GPU share per replica (``ray_actor_options.num_gpus``), keyed by the
    :class:`~serve.config.StagesConfig` field: ``{"image_encoder": .., "sampler": .., "decoder": ..,
    "video_encoder": ..}``."""
    return {spec.config_key: float(stages.for_stage(spec).ray_actor_options.num_gpus) for spec in STAGES.stages()}


def is_charged(outcome: Outcome | str, error_code: str | None = None) -> bool:
    """The charging rule: completed and cancelled jobs are charged; a failed job only if its error
    code is a client error (:data:`CLIENT_ERROR_CODES`)."""
    outcome = Outcome(outcome)
    if outcome is Outcome.FAILED:
        return error_code in CLIENT_ERROR_CODES
    return True


def _seconds(value: Any) -> float:
    """A non-negative finite number of seconds; anything else counts as 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    value = float(value)
    return value if math.isfinite(value) and value > 0 else 0.0


def _share(gpu_share: Mapping[str, float], stage: str) -> float:
    spec = STAGES.get(stage)
    for key in (spec.config_key, stage):
        if key in gpu_share:
            return _seconds(gpu_share[key])
    return 0.0


def _video_seconds(job: Job) -> float:
    """The delivered clip's playback length, as the final stage measured it."""
    return _seconds(job.output.duration_s) if job.output is not None else 0.0


def usage_record_for(job: Job, gpu_share: Mapping[str, float]) -> UsageRecord:
    """The usage record of a finished job.

    ``gpu_share`` maps a stage to its GPU share per replica; keys may be the config names
    (``sampler``, as :func:`gpu_share_from_config` returns) or the stage names (``sampling``). A
    stage missing from it uses no GPU (share 0). Raises ``ValueError`` for a job that is not
    terminal.
    """
    if not job.status.is_terminal:
        raise ValueError(f"job {job.id} is {job.status.value}: only finished jobs are metered")
    outcome = Outcome(job.status.value)
    error_code = job.error.code if job.error is not None and outcome is Outcome.FAILED else None
    busy = {stage: _seconds(job.timings.get(stage)) for stage in metered_stages()}
    gpu = {stage: busy[stage] * _share(gpu_share, stage) for stage in metered_stages()}
    return UsageRecord(
        job_id=job.id,
        tenant=job.tenant,
        finished_at=job.finished_at or job.updated_at or utcnow(),
        outcome=outcome,
        charged=is_charged(outcome, error_code),
        error_code=error_code,
        model=job.model or None,
        video_seconds=_video_seconds(job) if job.status is JobStatus.COMPLETED else 0.0,
        gpu_seconds=gpu,
        busy_seconds=busy,
    )
