"""Load-test profiles: one validated pydantic model, loaded from YAML (``loadtest/profiles/``).

A profile says who sends what and when: the tenants (key name, fair-share weight, arrival
pattern, clip sizes, how they follow and whether they cancel), an optional status-poll storm,
and the bounds every run has (load window, max jobs, max requests, drain timeout).

    python -m loadtest.profile loadtest/profiles/burst.yaml    # validate and print a summary
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .units import format_duration, parse_duration, parse_rate

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Duration = Annotated[float, BeforeValidator(parse_duration)]
Rate = Annotated[float, BeforeValidator(parse_rate)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- arrivals --------------------------------------------------------------------------------------


class ConstantArrivals(_Strict):
    """Evenly spaced submissions: one every 1/rate seconds."""

    pattern: Literal["constant"] = Field(description="Evenly spaced arrivals at `rate`.")
    rate: Rate = Field(gt=0, description="Jobs per second, or a string such as '30/min' or '600/h'.")
    start: Duration = Field(default=0.0, description="Delay before the first arrival (seconds or '10s').")


class PoissonArrivals(_Strict):
    """Memoryless arrivals: exponential gaps with mean 1/rate (what many independent users produce)."""

    pattern: Literal["poisson"] = Field(description="Poisson process at `rate` (exponential inter-arrival times).")
    rate: Rate = Field(gt=0, description="Mean jobs per second, or a string such as '30/min' or '600/h'.")
    start: Duration = Field(default=0.0, description="Delay before arrivals begin.")


class BurstArrivals(_Strict):
    """`size` jobs at once every `every` seconds, optionally over a Poisson background rate."""

    pattern: Literal["burst"] = Field(description="Bursts of `size` simultaneous jobs every `every` seconds.")
    size: int = Field(ge=1, description="Jobs submitted at the same instant in each burst.")
    every: Duration = Field(gt=0, description="Time between bursts (seconds or '30s').")
    start: Duration = Field(default=0.0, description="Time of the first burst.")
    count: int | None = Field(default=None, ge=1, description="Number of bursts; unlimited (until the window ends) if unset.")
    base_rate: Rate = Field(default=0.0, ge=0, description="Poisson background rate between bursts (0: none).")


class RampArrivals(_Strict):
    """Rate rising (or falling) linearly from `start_rate` to `end_rate` over `over`, then held."""

    pattern: Literal["ramp"] = Field(description="Linear ramp of the arrival rate.")
    start_rate: Rate = Field(ge=0, description="Rate at the start of the ramp (jobs/s or '6/min').")
    end_rate: Rate = Field(ge=0, description="Rate at the end of the ramp, held afterwards.")
    over: Duration | None = Field(default=None, description="Ramp length; default: the whole load window.")
    start: Duration = Field(default=0.0, description="Delay before the ramp begins.")
    poisson: bool = Field(default=True, description="Random (Poisson) arrivals around the ramp; false: evenly spaced.")

    @model_validator(mode="after")
    def _some_rate(self) -> "RampArrivals":
        if self.start_rate == 0 and self.end_rate == 0:
            raise ValueError("a ramp needs start_rate or end_rate above 0")
        return self


ArrivalSpec = Annotated[
    Union[ConstantArrivals, PoissonArrivals, BurstArrivals, RampArrivals], Field(discriminator="pattern")
]


# -- what is sent ----------------------------------------------------------------------------------


class ClipSpec(_Strict):
    """Generation parameters of one kind of clip (fields of the API's POST /v1/videos body)."""

    weight: float = Field(default=1.0, gt=0, description="Relative frequency of this clip among the tenant's clips.")
    num_frames: int = Field(default=14, ge=2, le=64, description="Frames per clip.")
    num_inference_steps: int = Field(default=8, ge=1, le=150, description="Sampling steps (U-Net cost is linear in it).")
    width: int = Field(default=64, ge=64, le=1536, multiple_of=8, description="Width in pixels (multiple of 8).")
    height: int = Field(default=64, ge=64, le=1536, multiple_of=8, description="Height in pixels (multiple of 8).")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other generation parameter passed through as is (seed, fps, motion_bucket_id, "
        "decode_chunk_size, output_format, ...).",
    )

    def body(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames, "num_inference_steps": self.num_inference_steps,
                "width": self.width, "height": self.height, **self.params}

    @property
    def work_units(self) -> float:
        """Relative U-Net cost: frames x steps x pixels / (14 x 8 x 64 x 64)."""
        return self.num_frames * self.num_inference_steps * self.width * self.height / (14 * 8 * 64 * 64)


class CancelSpec(_Strict):
    """Cancelling a share of the jobs some time after submission."""

    fraction: float = Field(default=0.0, ge=0, le=1, description="Share of the tenant's jobs that get cancelled.")
    after: tuple[Duration, Duration] = Field(
        default=(0.0, 5.0),
        description="[min, max] delay after the 202 before POST /cancel, drawn uniformly (0: right after submit).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "CancelSpec":
        if self.after[0] > self.after[1]:
            raise ValueError("cancel.after: min exceeds max")
        return self


class TenantSpec(_Strict):
    """One tenant: its API key (by name), fair-share weight, arrivals and clips."""

    name: str = Field(description="Tenant name: the key comes from --keys NAME=KEY; --local creates it.")
    weight: float = Field(
        default=1.0, gt=0,
        description="Fair-share weight the tenant has on the service (set when --local creates it); the report "
        "compares each tenant's share of completed work with its share of the weights.",
    )
    arrivals: ArrivalSpec | None = Field(
        default=None, description="When this tenant submits jobs; none: it submits nothing (e.g. poll-only)."
    )
    clips: list[ClipSpec] | None = Field(default=None, description="Clip mix of this tenant; default: the profile's.")
    follow: Literal["poll", "sse"] | None = Field(
        default=None, description="How jobs are followed to the end; default: the profile's `follow`."
    )
    download: bool | None = Field(default=None, description="Download the clip when done; default: the profile's.")
    cancel: CancelSpec = Field(default_factory=CancelSpec, description="Cancellation of a share of the jobs.")
    max_jobs: int | None = Field(default=None, ge=1, description="Cap on this tenant's submissions (within max_jobs).")
    max_in_flight: int | None = Field(
        default=None, ge=1, description="Cap on this tenant's unfinished jobs at once; arrivals beyond it wait."
    )

    @model_validator(mode="after")
    def _name(self) -> "TenantSpec":
        if not TENANT_NAME.match(self.name):
            raise ValueError(f"tenant name {self.name!r}: 1-64 letters, digits, '_', '.' or '-'")
        return self


class PollStormSpec(_Strict):
    """Many clients hammering the status endpoints of jobs that exist."""

    users: int = Field(ge=1, le=1000, description="Polling clients at full strength.")
    ramp: Duration = Field(default=10.0, description="Time to bring all polling clients up (linear).")
    rate_per_user: float = Field(default=2.0, gt=0, le=50, description="Requests per second of each polling client.")
    list_fraction: float = Field(default=0.1, ge=0, le=1, description="Share of requests that are GET /v1/videos (list).")
    events_fraction: float = Field(
        default=0.0, ge=0, le=1,
        description="Share of requests that open the SSE stream of a job, read its first event and close it.",
    )


class Profile(_Strict):
    """A load-test profile. Every run is bounded: it ends at the first of `duration` + `drain_timeout`,
    `max_jobs` submitted and finished, or `max_requests` HTTP requests."""

    name: str = Field(description="Short name, shown in reports.")
    description: str = Field(default="", description="What this profile exercises, for people.")
    duration: Duration = Field(gt=0, description="Load window: arrivals and polling happen within it ('2m', '90s').")
    drain_timeout: Duration = Field(
        default=120.0, ge=0,
        description="After the window, how long to wait for jobs in flight to finish before cancelling them.",
    )
    max_jobs: int = Field(ge=1, description="Most jobs submitted in the whole run (all tenants).")
    max_requests: int = Field(default=100_000, ge=1, description="Most HTTP requests in the whole run (all kinds).")
    concurrency: int = Field(
        default=8, ge=1, le=2000,
        description="Job clients: the most jobs being submitted/followed at once. Arrivals that find every client "
        "busy are late; the report shows that lag (raise this when it is large).",
    )
    seed: int = Field(default=1, description="Seed of the random arrival times, clip choices and cancellations.")
    follow: Literal["poll", "sse"] = Field(default="poll", description="Default way to follow a job: polling or SSE.")
    poll_interval: Duration = Field(default=0.5, gt=0, description="Seconds between status polls while following a job.")
    download: bool = Field(default=True, description="Download each completed clip (GET /content).")
    request_timeout: Duration = Field(default=30.0, gt=0, description="Timeout of one HTTP request (SSE: per read).")
    retry_on_429: int = Field(
        default=0, ge=0, le=10,
        description="Retries of a submission answered 429, honouring Retry-After (0: a 429 drops the arrival).",
    )
    clips: list[ClipSpec] = Field(default_factory=lambda: [ClipSpec()], min_length=1,
                                  description="Default clip mix of the tenants.")
    image: str | None = Field(
        default=None, description="Conditioning image file; default: a generated gradient PNG of the clip's size."
    )
    tenants: list[TenantSpec] = Field(min_length=1, description="The tenants and what each of them sends.")
    poll_storm: PollStormSpec | None = Field(default=None, description="Status-poll storm clients, if any.")
    replica_sample_interval: Duration = Field(
        default=5.0, gt=0, description="Seconds between samples of Serve replica counts per deployment."
    )

    @model_validator(mode="after")
    def _check(self) -> "Profile":
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique: {names}")
        if not any(t.arrivals for t in self.tenants):
            raise ValueError("at least one tenant needs arrivals (a poll storm polls jobs that were submitted)")
        return self

    # -- resolved per-tenant values ---------------------------------------------------------------

    def clips_of(self, tenant: TenantSpec) -> list[ClipSpec]:
        return tenant.clips or self.clips

    def follow_of(self, tenant: TenantSpec) -> str:
        return tenant.follow or self.follow

    def download_of(self, tenant: TenantSpec) -> bool:
        return self.download if tenant.download is None else tenant.download

    def tenant(self, name: str) -> TenantSpec:
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        raise KeyError(name)

    def summary(self) -> str:
        lines = [f"profile {self.name}: window {format_duration(self.duration)}, drain <= "
                 f"{format_duration(self.drain_timeout)}, max {self.max_jobs} jobs / {self.max_requests} requests, "
                 f"{self.concurrency} job clients"]
        for t in self.tenants:
            arrivals = t.arrivals.pattern if t.arrivals else "none"
            clips = ", ".join(f"{c.width}x{c.height}x{c.num_frames}f/{c.num_inference_steps}st" for c in self.clips_of(t))
            lines.append(f"  tenant {t.name}: weight {t.weight:g}, arrivals {arrivals}, clips [{clips}], "
                         f"follow {self.follow_of(t)}, cancel {t.cancel.fraction:.0%}")
        if self.poll_storm:
            p = self.poll_storm
            lines.append(f"  poll storm: {p.users} clients x {p.rate_per_user:g}/s, ramp {format_duration(p.ramp)}")
        return "\n".join(lines)


def resolve_profile_path(path_or_name: str | Path) -> Path:
    """A file path, or the name of a bundled profile (``smoke`` -> loadtest/profiles/smoke.yaml)."""
    path = Path(path_or_name)
    if path.exists():
        return path
    bundled = PROFILES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if bundled.exists():
        return bundled
    raise FileNotFoundError(f"no profile {str(path_or_name)!r} (bundled: {', '.join(bundled_profiles())})")


def bundled_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(path_or_name: str | Path) -> Profile:
    path = resolve_profile_path(path_or_name)
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return Profile.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m loadtest.profile PROFILE.yaml ...", file=sys.stderr)
        return 2
    status = 0
    for item in args:
        try:
            print(load_profile(item).summary())
        except (OSError, ValidationError, ValueError) as error:
            print(f"{item}: {error}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
