"""``GET /v1/usage``: the calling tenant's usage over a time window.

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
from pydantic import BaseModel, ConfigDict, Field

from serve.api.errors import APIError, ErrorBody
from serve.jobstore.models import to_utc, utcnow
from serve.metering.base import UsageLedger
from serve.metering.models import UsageSummary, metered_stages
from serve.tenants import Tenant

#: The longest window one request may ask for.
MAX_WINDOW = timedelta(days=366)

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

REJECTIONS = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key."},
    422: {"model": ErrorBody, "description": "Invalid window: unparsable, from after to, or over 366 days."},
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


class UsageResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    object: str = "usage"
    tenant: str
    from_: datetime = Field(alias="from", description="Start of the window (inclusive, UTC).")
    to: datetime = Field(description="End of the window (exclusive, UTC).")
    jobs: UsageJobs
    video_seconds: float = Field(description="Seconds of video delivered by charged jobs.")
    gpu_seconds: UsageGPUSeconds

    @classmethod
    def of(cls, summary: UsageSummary) -> "UsageResponse":
        by_stage = {**dict.fromkeys(metered_stages(), 0.0), **summary.gpu_seconds}
        return cls(
            tenant=summary.tenant, from_=summary.start, to=summary.end,
            jobs=UsageJobs(completed=summary.completed, failed=summary.failed, cancelled=summary.cancelled,
                           charged=summary.charged, uncharged_failures=summary.uncharged_failures),
            video_seconds=summary.video_seconds,
            gpu_seconds=UsageGPUSeconds(total=summary.gpu_seconds_total, by_stage=by_stage),
        )


def _invalid(message: str) -> APIError:
    return APIError(422, "invalid_parameter", message)


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
    a tenant only ever sees its own usage."""
    router = APIRouter()

    def tenant_of(authorization: Annotated[str | None, Header()] = None) -> Tenant:
        return authenticate(authorization)

    @router.get("/v1/usage", response_model=UsageResponse, responses=REJECTIONS, tags=["usage"],
                summary="Your usage over a time window")
    async def get_usage(
        tenant: Annotated[Tenant, Depends(tenant_of)],
        from_: Annotated[str | None, Query(alias="from", description="ISO 8601 date or date-time (UTC); "
                                           "default: the start of the month of `to`.")] = None,
        to: Annotated[str | None, Query(description="ISO 8601 date (that day included) or date-time "
                                        "(exclusive); default: now.")] = None,
    ) -> UsageResponse:
        start, end = resolve_window(from_, to, now=clock())
        summary = await asyncio.to_thread(ledger.summary, tenant.name, start=start, end=end)
        return UsageResponse.of(summary)

    return router
