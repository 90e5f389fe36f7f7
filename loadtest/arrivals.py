"""Arrival schedules: when each tenant submits a job (open-loop load).

Each pattern is a generator of arrival times (seconds since the start of the run). The
:class:`ArrivalQueue` merges the tenants' schedules, applies the run's bounds (window, max jobs,
per-tenant caps) and hands arrivals to whichever job client is free; a client then waits until
the arrival's time. Arrivals therefore do not slow down when the service does (no coordinated
omission): if every client is busy the arrival is *late*, and the lag is recorded.

Pure Python: no Locust, no gevent (the caller sleeps), so it is unit-tested directly.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator

from .profile import BurstArrivals, ClipSpec, ConstantArrivals, PoissonArrivals, Profile, RampArrivals, TenantSpec


def constant_times(rate: float, start: float = 0.0, offset: float = 0.0) -> Iterator[float]:
    """start + offset, then every 1/rate seconds."""
    if rate <= 0:
        return
    for k in itertools.count():
        yield start + offset + k / rate


def poisson_times(rate: float, rng: random.Random, start: float = 0.0) -> Iterator[float]:
    """A Poisson process: exponential gaps of mean 1/rate."""
    if rate <= 0:
        return
    t = start
    while True:
        t += rng.expovariate(rate)
        yield t


def burst_times(size: int, every: float, start: float = 0.0, count: int | None = None) -> Iterator[float]:
    """``size`` arrivals at start, start+every, ... (``count`` bursts, or forever)."""
    if size <= 0:
        return
    for k in (range(count) if count is not None else itertools.count()):
        t = start + k * every
        for _ in range(size):
            yield t


def ramp_times(start_rate: float, end_rate: float, over: float, rng: random.Random | None,
               start: float = 0.0) -> Iterator[float]:
    """Arrivals of a rate ramping linearly from start_rate to end_rate over ``over`` seconds, then held.

    Inverts the cumulative rate L(u) = r0*u + (r1-r0)*u^2/(2*over): arrival k happens where L
    reaches E_k, with E_k = k (evenly spaced) or a sum of unit exponentials (Poisson, rng given).
    """
    r0, r1 = start_rate, end_rate
    over = max(over, 1e-9)
    a = (r1 - r0) / (2 * over)
    ramp_mass = (r0 + r1) / 2 * over
    mass = 0.0
    while True:
        mass += rng.expovariate(1.0) if rng is not None else 1.0
        if mass <= ramp_mass:
            disc = r0 * r0 + 4 * a * mass
            u = 2 * mass / (r0 + math.sqrt(max(disc, 0.0))) if (r0 > 0 or disc > 0) else 0.0
        elif r1 > 0:
            u = over + (mass - ramp_mass) / r1
        else:
            return
        yield start + u


def pattern_times(spec, *, rng: random.Random, window: float, share: float = 1.0, index: int = 0,
                  workers: int = 1) -> Iterator[float]:
    """The times of one tenant's arrivals, for this generator's ``share`` of the load.

    With several load generators (Locust workers), each runs its ``share`` (1/workers) of every
    rate and its slice of each burst; constant-rate schedules are interleaved by ``index``.
    """
    if isinstance(spec, ConstantArrivals):
        rate = spec.rate * share
        times = constant_times(rate, spec.start, offset=index / spec.rate if workers > 1 else 0.0)
    elif isinstance(spec, PoissonArrivals):
        times = poisson_times(spec.rate * share, rng, spec.start)
    elif isinstance(spec, BurstArrivals):
        size = spec.size // workers + (1 if index < spec.size % workers else 0)
        bursts = burst_times(size, spec.every, spec.start, spec.count)
        background = poisson_times(spec.base_rate * share, rng, spec.start) if spec.base_rate > 0 else iter(())
        times = heapq.merge(bursts, background)
    elif isinstance(spec, RampArrivals):
        over = spec.over if spec.over is not None else max(window - spec.start, 1e-9)
        times = ramp_times(spec.start_rate * share, spec.end_rate * share, over,
                           rng if spec.poisson else None, spec.start)
    else:  # pragma: no cover - the profile model forbids it
        raise TypeError(f"unknown arrival pattern {spec!r}")
    for t in times:
        if t >= window:
            return
        yield t


def expected_arrivals(spec, window: float) -> float:
    """Mean number of arrivals of one tenant in the window (for summaries and sanity checks)."""
    if isinstance(spec, (ConstantArrivals, PoissonArrivals)):
        return max(0.0, window - spec.start) * spec.rate
    if isinstance(spec, BurstArrivals):
        bursts = 0 if window <= spec.start else math.ceil((window - spec.start) / spec.every)
        if spec.count is not None:
            bursts = min(bursts, spec.count)
        return bursts * spec.size + max(0.0, window - spec.start) * spec.base_rate
    if isinstance(spec, RampArrivals):
        span = max(0.0, window - spec.start)
        over = spec.over if spec.over is not None else span
        if span <= over:
            end = spec.start_rate + (spec.end_rate - spec.start_rate) * (span / over if over else 1)
            return (spec.start_rate + end) / 2 * span
        return (spec.start_rate + spec.end_rate) / 2 * over + spec.end_rate * (span - over)
    return 0.0


@dataclass
class Arrival:
    """One job to submit: whose, when (seconds since start), which clip, and whether to cancel it."""

    seq: int
    tenant: str
    at: float
    clip: ClipSpec
    cancel_after: float | None


class ArrivalQueue:
    """The merged, bounded arrival schedule of every tenant.

    ``take(now, can_start)`` returns the next :class:`Arrival` (which may lie in the future: the
    caller sleeps until ``arrival.at``), ``WAIT`` when the only pending arrivals belong to tenants
    at their ``max_in_flight`` cap, or ``None`` when the schedule is exhausted (window over or
    max jobs reached).
    """

    WAIT = "wait"

    def __init__(self, profile: Profile, *, share: float = 1.0, index: int = 0, workers: int = 1) -> None:
        self.profile = profile
        self.window = profile.duration
        self.rng = random.Random(f"{profile.seed}/{index}/choices")
        self.max_jobs = _slice(profile.max_jobs, index, workers)
        self.taken = 0
        self.taken_by: dict[str, int] = {}
        self.caps: dict[str, int | None] = {}
        self.tenant_max: dict[str, int | None] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._iters: dict[str, Iterator[float]] = {}
        self._specs: dict[str, TenantSpec] = {}
        for order, tenant in enumerate(profile.tenants):
            if tenant.arrivals is None:
                continue
            rng = random.Random(f"{profile.seed}/{index}/{tenant.name}")
            self._iters[tenant.name] = pattern_times(tenant.arrivals, rng=rng, window=self.window, share=share,
                                                     index=index, workers=workers)
            self._specs[tenant.name] = tenant
            self.taken_by[tenant.name] = 0
            self.caps[tenant.name] = tenant.max_in_flight
            self.tenant_max[tenant.name] = _slice(tenant.max_jobs, index, workers) if tenant.max_jobs else None
            self._push(tenant.name, order)

    def _push(self, name: str, order: int | None = None) -> None:
        if order is None:
            order = [t.name for t in self.profile.tenants].index(name)
        limit = self.tenant_max[name]
        if limit is not None and self.taken_by[name] >= limit:
            return
        t = next(self._iters[name], None)
        if t is not None:
            heapq.heappush(self._heap, (t, order, name))

    @property
    def exhausted(self) -> bool:
        return self.taken >= self.max_jobs or not self._heap

    def pending(self) -> int:
        return len(self._heap)

    def take(self, can_start: Callable[[str], bool] | None = None) -> Arrival | str | None:
        if self.exhausted:
            return None
        skipped = []
        chosen = None
        while self._heap:
            item = heapq.heappop(self._heap)
            if can_start is None or can_start(item[2]):
                chosen = item
                break
            skipped.append(item)
        for item in skipped:
            heapq.heappush(self._heap, item)
        if chosen is None:
            return self.WAIT
        at, order, name = chosen
        self.taken += 1
        self.taken_by[name] += 1
        self._push(name, order)
        spec = self._specs[name]
        clips = self.profile.clips_of(spec)
        clip = self.rng.choices(clips, weights=[c.weight for c in clips])[0] if len(clips) > 1 else clips[0]
        cancel_after = None
        if spec.cancel.fraction > 0 and self.rng.random() < spec.cancel.fraction:
            cancel_after = self.rng.uniform(*spec.cancel.after)
        return Arrival(seq=self.taken, tenant=name, at=at, clip=clip, cancel_after=cancel_after)


def _slice(total: int, index: int, workers: int) -> int:
    """This generator's part of ``total`` when ``workers`` generators split it."""
    return total // workers + (1 if index < total % workers else 0)
