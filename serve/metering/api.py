"""``GET /v1/usage``: the calling tenant's usage over a time window, in total and per model.

Mount it next to the job routes: ``app.include_router(usage_router(ledger, tenants.authenticate))``
on an app with :func:`serve.api.errors.install_error_handlers` (``create_api`` installs them), so
its rejections use the one error schema.
"""

import asyncio
import re
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from serve.api.errors import APIError, ErrorBody
from serve.jobstore.models import to_utc, utcnow
from serve.metering.base import UsageLedger
from serve.metering.models import UNKNOWN_MODEL, UsageSummary, UsageTotals, metered_stages
from serve.tenants import Tenant

#: The longest window one request may ask for.
MAX_WINDOW = timedelta(days=366)

#: The longest ``model`` filter accepted (model ids and sources are far shorter).
MAX_MODEL_CHARS = 256

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

#: ``from`` and ``to`` as the docs show them: a date, or a date-time (RFC 3339; one without an
#: offset is read as UTC too). The route parses them itself (:func:`parse_bound`).
BOUND_SCHEMA = WithJsonSchema({"anyOf": [{"type": "string", "format": "date"},
                                         {"type": "string", "format": "date-time"}]})

REJECTIONS = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key."},
    422: {"model": ErrorBody, "description": "Invalid window (unparsable, from after to, or over 366 days) "
                                            "or invalid model filter (empty, too long, control characters)."},
    503: {"model": ErrorBody, "description": "The usage store is unavailable."},
}


class UsageJobs(BaseModel):
    completed: int = Field(description="Jobs that completed.")
    failed: int = Field(description="Jobs that failed (charged or not).")
    cancelled: int = Field(description="Jobs that were cancelled.")
    charged: int = Field(description="Jobs whose usage is charged (completed, cancelled, client-error failures).")
    uncharged_failures: int = Field(description="Failures caused by the service: not charged.")


class UsageGPUSeconds(BaseModel):
    total: float = Field(description="GPU-seconds of all stages.")
    by_stage: dict[str, float] = Field(description="GPU-seconds per stage: replica busy time x its GPU share.")


def _counters(totals: UsageTotals) -> dict:
    by_stage = {**dict.fromkeys(metered_stages(), 0.0), **totals.gpu_seconds}
    return dict(
        jobs=UsageJobs(completed=totals.completed, failed=totals.failed, cancelled=totals.cancelled,
                       charged=totals.charged, uncharged_failures=totals.uncharged_failures),
        video_seconds=totals.video_seconds,
        gpu_seconds=UsageGPUSeconds(total=totals.gpu_seconds_total, by_stage=by_stage),
    )


class UsageModel(BaseModel):
    """One model's usage: the same counters as the totals, over that model's jobs."""

    jobs: UsageJobs
    video_seconds: float = Field(description="Seconds of video delivered by this model's charged jobs.")
    gpu_seconds: UsageGPUSeconds


class UsageResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    object: str = "usage"
    tenant: str
    from_: datetime = Field(alias="from", description="Start of the window (inclusive, UTC).")
    to: datetime = Field(description="End of the window (exclusive, UTC).")
    jobs: UsageJobs
    video_seconds: float = Field(description="Seconds of video delivered by charged jobs.")
    gpu_seconds: UsageGPUSeconds
    by_model: dict[str, UsageModel] = Field(
        default_factory=dict,
        description=f"The same counters per model id (jobs that named no model: `{UNKNOWN_MODEL}`); only "
                    "models with jobs in the window appear.")

    @classmethod
    def of(cls, summary: UsageSummary) -> "UsageResponse":
        return cls(
            tenant=summary.tenant, from_=summary.start, to=summary.end, **_counters(summary),
            by_model={model: UsageModel(**_counters(usage)) for model, usage in summary.by_model.items()},
        )


def _invalid(message: str) -> APIError:
    return APIError(422, "invalid_parameter", message)


def check_model(value: str | None) -> str | None:
    """The ``model`` filter, or None when absent. Raises a 422 :class:`APIError` when it is empty,
    longer than :data:`MAX_MODEL_CHARS` or holds control (non-printable) characters. Any other value
    is accepted: a model the tenant never used simply matches nothing."""
    if value is None:
        return None
    if not value.strip():
        raise _invalid("model: must not be empty (omit it for every model)")
    if len(value) > MAX_MODEL_CHARS:
        raise _invalid(f"model: at most {MAX_MODEL_CHARS} characters")
    if not value.isprintable():
        raise _invalid("model: must not contain control characters")
    return value


def parse_bound(value: str, name: str, *, end: bool) -> datetime:
    """An ISO 8601 date-time (naive = UTC) or a date. A date means that whole UTC day: as ``from``
    its start, as ``to`` the start of the next day (so ``to=2030-01-31`` includes the 31st)."""
    value = value.strip()
    try:
        if _DATE.fullmatch(value):
            day = datetime.combine(date.fromisoformat(value), time(), tzinfo=timezone.utc)
            return day + timedelta(days=1) if end else day
        return to_utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise _invalid(f"{name}: not an ISO 8601 date or date-time (e.g. 2030-01-31 or "
                       f"2030-01-31T12:00:00Z)") from None


def month_start(moment: datetime) -> datetime:
    """Midnight UTC on the first day of ``moment``'s UTC month."""
    moment = to_utc(moment)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def resolve_window(from_: str | None, to: str | None, *, now: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` of a request. Defaults: ``to`` = now; ``from`` = the start of the current UTC
    month, or with an explicit ``to``, of the month that ``to`` ends (``to=2030-01-31`` alone: all of
    January). Raises a 422 :class:`APIError` when ``from`` is after ``to`` or the window is longer
    than 366 days."""
    if to:
        end = parse_bound(to, "to", end=True)
        default_start = month_start(end - timedelta(microseconds=1))  # the month of the last instant
    else:
        end = to_utc(now)
        default_start = month_start(end)
    start = parse_bound(from_, "from", end=False) if from_ else default_start
    if start > end:
        raise _invalid("from must not be after to")
    if end - start > MAX_WINDOW:
        raise _invalid("the window is longer than 366 days: ask for at most a year at a time")
    return start, end


def usage_router(
    ledger: UsageLedger,
    authenticate: Callable[[str | None], Tenant],
    *,
    clock: Callable[[], datetime] = utcnow,
) -> APIRouter:
    """The ``GET /v1/usage`` route over ``ledger``. ``authenticate`` maps the Authorization header to
    the tenant (``TenantRegistry.authenticate``) and raises ``AuthenticationError`` (401) otherwise;
    a tenant only ever sees its own usage (the ``model`` filter narrows it to one model's records,
    never to another tenant's)."""
    router = APIRouter()

    def tenant_of(authorization: Annotated[str | None, Header()] = None) -> Tenant:
        return authenticate(authorization)

    @router.get("/v1/usage", response_model=UsageResponse, responses=REJECTIONS, tags=["usage"],
                summary="Your usage over a time window")
    async def get_usage(
        tenant: Annotated[Tenant, Depends(tenant_of)],
        from_: Annotated[str | None, Query(alias="from", description="ISO 8601 date or date-time (UTC); "
                                           "default: the start of the month of `to`."), BOUND_SCHEMA] = None,
        to: Annotated[str | None, Query(description="ISO 8601 date (that day included) or date-time "
                                        "(exclusive); default: now."), BOUND_SCHEMA] = None,
        model: Annotated[str | None, Query(description=f"Only this model's jobs (a model id; `{UNKNOWN_MODEL}`: "
                                           f"jobs that named no model). At most {MAX_MODEL_CHARS} "
                                           "characters; default: every model."),
                         WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_MODEL_CHARS})] = None,
    ) -> UsageResponse:
        start, end = resolve_window(from_, to, now=clock())
        model = check_model(model)
        summary = await asyncio.to_thread(ledger.summary, tenant.name, start=start, end=end, model=model)
        return UsageResponse.of(summary)

    return router
