"""The runner's parts without Ray: the janitor's election and housekeeping, and how a failed job
is classified. (The dispatcher and driver run for real in tests/test_serve_cluster.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from pipelines.errors import InvalidImageError, JobCancelledError
from serve.config import AppConfig
from serve.jobstore import Job, JobStatus, SqliteJobStore
from serve.lifecycle import JobLifecycle
from serve.metering import make_usage_ledger
from serve.runner import Janitor, classify
from serve.storage import make_storage
from serve.tenants import TenantRegistry


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts(tmp_path):
    config = AppConfig.model_validate({
        "storage": {"local_dir": str(tmp_path / "out")},
        "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3"), "lease_s": 10, "max_attempts": 2},
    })
    clock = Clock()
    store = SqliteJobStore(config.job_store.sqlite_path, clock=clock)
    ledger = make_usage_ledger(config.job_store, retention_s=config.job_store.usage_retention_s)
    lifecycle = JobLifecycle(config, store=store, ledger=ledger, tenants=TenantRegistry(None))

    def janitor(owner: str) -> Janitor:
        return Janitor(config, store=store, storage=make_storage(config.storage), ledger=ledger,
                       lifecycle=lifecycle, owner=owner)

    yield store, clock, janitor, ledger
    store.close()


def test_one_janitor_works_until_its_lease_runs_out(parts):
    store, clock, janitor, _ = parts
    first, second = janitor("runner-a"), janitor("runner-b")
    asyncio.run(first.tick())
    asyncio.run(second.tick())
    assert (first.elected, second.elected) == (True, False)
    clock.now += 5  # within the lease: the holder keeps it, the other stays idle
    asyncio.run(first.tick())
    asyncio.run(second.tick())
    assert (first.elected, second.elected) == (True, False)
    clock.now += 11  # the holder stopped renewing (its replica died): the other takes over
    asyncio.run(second.tick())
    asyncio.run(first.tick())
    assert (first.elected, second.elected) == (False, True)


def test_the_elected_janitor_recovers_abandoned_jobs_and_meters_them(parts):
    store, clock, janitor, ledger = parts
    job, _ = store.create(Job(tenant="acme"))
    store.claim(job.id, owner="dead-runner", lease_s=10)
    clock.now += 11
    elected = janitor("runner-a")
    asyncio.run(elected.tick())
    assert store.get(job.id, tenant=None).status is JobStatus.QUEUED  # attempt 1 of 2: back in the queue
    store.claim(job.id, owner="dead-runner", lease_s=10)
    clock.now += 11
    asyncio.run(elected.tick())
    failed = store.get(job.id, tenant=None)
    assert failed.status is JobStatus.FAILED and failed.error.code == "abandoned"
    assert ledger.get(job.id) is not None  # metered once, uncharged (a service fault)


@pytest.mark.parametrize("error, expected", [
    (JobCancelledError("stop"), ("cancel", None)),
    (RayActorError(), ("retry", None)),
    (BackPressureError(num_queued_requests=1, max_queued_requests=1), ("retry", None)),
    (InvalidImageError("not an image"), ("fail", "invalid_image")),
    (RuntimeError("boom"), ("fail", "internal_error")),
])
def test_failures_are_classified(error, expected):
    verdict = classify(error, cancel_requested=False, attempts=1, max_attempts=3)
    assert (verdict.action, verdict.error.code if verdict.error else None) == expected
    assert verdict.internal == (expected[1] == "internal_error")


def test_a_requested_cancel_wins_and_retries_are_bounded():
    assert classify(RuntimeError("x"), cancel_requested=True, attempts=1, max_attempts=3).action == "cancel"
    last = classify(RayActorError(), cancel_requested=False, attempts=3, max_attempts=3)
    assert last.action == "fail" and last.error.code == "worker_lost"
    internal = classify(RuntimeError("secret detail"), cancel_requested=False, attempts=1, max_attempts=3)
    assert "secret detail" not in internal.error.message  # no internals reach the client


def test_the_janitor_marks_completed_jobs_whose_clip_is_gone(parts):
    from serve.jobstore import Job, JobOutput

    store, clock, janitor, _ = parts
    worker = janitor("runner-a")
    asyncio.run(worker.tick())
    ids = []
    for index in range(3):
        job, _ = store.create(Job(tenant="acme", params={"num_frames": 14}))
        store.claim(job.id, owner="w", lease_s=100)
        key = f"acme/{job.id}/{job.id}.mp4"
        worker.storage.put(key, b"clip", content_type="video/mp4")
        store.complete(job.id, owner="w", output=JobOutput(key=key, content_type="video/mp4",
                                                           file_name=f"{job.id}.mp4", file_size=4))
        ids.append((job.id, key))
    worker.storage.delete(ids[1][1])  # a storage lifecycle rule took one clip
    # Two pages cover the three jobs (in order of expiry, then id), then the sweep starts over.
    assert worker.sweep_outputs(page=2) + worker.sweep_outputs(page=2) == [ids[1][0]]
    assert store.get(ids[1][0], tenant=None).output.gone_at is not None
    assert store.get(ids[0][0], tenant=None).output.gone_at is None
    assert worker.sweep_outputs(page=2) == []  # marked once
