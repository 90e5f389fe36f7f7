"""How a job that raised ends: cancelled, retried on another worker, or failed with which error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, RayServeException

from pipelines.errors import InvalidInputError, JobCancelledError

from ..jobstore import JobError

#: Failures of the machinery rather than of the job: a replica or node died, an object was lost,
#: Serve could not route the request. The job is re-queued (bounded by max_attempts).
INFRASTRUCTURE_ERRORS = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, BackPressureError,
                         RayServeException)

INTERNAL_ERROR_MESSAGE = "generation failed inside the service; it was logged and is not charged"


def cause_of(error: BaseException) -> BaseException:
    """The error raised inside a replica (Ray wraps it in a RayTaskError carrying ``cause``)."""
    return getattr(error, "cause", None) or error


def is_infrastructure_error(error: BaseException) -> bool:
    return isinstance(error, INFRASTRUCTURE_ERRORS) or isinstance(cause_of(error), INFRASTRUCTURE_ERRORS)


@dataclass(frozen=True)
class Verdict:
    """What to do with a job whose stage raised."""

    action: Literal["cancel", "retry", "fail"]
    error: JobError | None = None
    internal: bool = False
    """A fault of the service (logged with its stack trace, never shown to the client)."""


def classify(error: BaseException, *, cancel_requested: bool, attempts: int, max_attempts: int) -> Verdict:
    cause = cause_of(error)
    if isinstance(cause, JobCancelledError) or cancel_requested:
        return Verdict("cancel")
    if is_infrastructure_error(error):
        if attempts < max_attempts:
            return Verdict("retry")
        return Verdict("fail", JobError(
            code="worker_lost", message=f"a pipeline worker stopped during each of {attempts} attempts; giving up"))
    if isinstance(cause, InvalidInputError):
        return Verdict("fail", JobError(code=cause.code, message=str(cause)))
    return Verdict("fail", JobError(code="internal_error", message=INTERNAL_ERROR_MESSAGE), internal=True)
