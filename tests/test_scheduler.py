"""``pick_next``: weighted fair sharing between tenants, and per-tenant running caps."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from serve.jobstore import AdmissionPolicy, Job
from serve.scheduler import pick_next

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def head(tenant: str, age_s: float = 0, weight: float = 1.0, max_running: int | None = None) -> Job:
    return Job(tenant=tenant, created_at=T0 - timedelta(seconds=age_s),
               policy=AdmissionPolicy(weight=weight, max_running_jobs=max_running))


def running_of(counts: dict[str, int]):
    return lambda tenant: counts.get(tenant, 0)


def test_nothing_queued():
    assert pick_next([], running_of({})) is None


def test_least_running_per_weight_wins():
    a, b = head("a", age_s=100), head("b")
    assert pick_next([a, b], running_of({"a": 2, "b": 1})) is b
    # Weight 3 with 2 running ((2+1)/3 = 1) beats weight 1 with 1 running ((1+1)/1 = 2).
    heavy = head("a", age_s=0, weight=3.0)
    assert pick_next([heavy, head("b", age_s=100)], running_of({"a": 2, "b": 1})) is heavy


def test_ties_go_to_the_oldest_head():
    old, new = head("a", age_s=10), head("b", age_s=1)
    assert pick_next([new, old], running_of({})) is old
    assert pick_next([old, new], running_of({"a": 1, "b": 1})) is old


def test_tenants_at_their_running_cap_are_skipped():
    capped = head("a", age_s=100, weight=10.0, max_running=2)
    other = head("b", weight=1.0)
    # "a" would win on rank (weight 10), but it already runs its 2 jobs.
    assert pick_next([capped, other], running_of({"a": 2, "b": 5})) is other
    # Below the cap it wins again.
    assert pick_next([capped, other], running_of({"a": 1, "b": 5})) is capped
    # Everyone at their cap: nothing to dispatch (the slot waits for a running job to end).
    assert pick_next([capped, head("c", max_running=1)], running_of({"a": 2, "c": 1})) is None


def test_caps_are_validated_when_stamped():
    # The policy stamped on a job is typed: an unreadable cap cannot reach the scheduler.
    for bad in ("three", 0, -1, [1]):
        with pytest.raises(ValidationError):
            AdmissionPolicy(max_running_jobs=bad)


def test_records_from_before_the_typed_policy_keep_their_terms():
    legacy = Job.model_validate({"tenant": "a", "weight": 2.5, "metadata": {"max_running": 3, "output_key": "k",
                                                                         "fingerprint": "f", "retention_s": 60}})
    assert legacy.policy == AdmissionPolicy(weight=2.5, max_running_jobs=3, retention_s=60)
    assert (legacy.output_key, legacy.fingerprint) == ("k", "f")
