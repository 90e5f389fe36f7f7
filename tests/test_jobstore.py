"""The durable job store, every test run against both backends: SQLite (a file in tmp_path) and
Redis (a real redis-server from ``tests/fixtures_redis.py``; each test uses its own key prefix)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from fixtures_redis import redis_server, start_redis_server, unique_prefix  # noqa: F401  (fixture)

from serve.config import JobStoreConfig
from serve.jobstore import (
    AdmissionPolicy,
    Job,
    JobError,
    JobOutput,
    JobStatus,
    JobStore,
    JobStoreError,
    RedisJobStore,
    SqliteJobStore,
    WebhookSubscription,
    make_job_store,
)

BACKENDS = ["sqlite", "redis"]
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _open(backend: str, location: str, prefix: str, **kwargs) -> JobStore:
    if backend == "sqlite":
        return SqliteJobStore(location, **kwargs)
    return RedisJobStore(location, key_prefix=prefix, **kwargs)


@pytest.fixture(params=BACKENDS)
def make_store(request, tmp_path):
    """``make_store(**kwargs)`` opens a new store object on one shared backing store per test."""
    backend = request.param
    if backend == "sqlite":
        location = str(tmp_path / "jobs.sqlite3")
    else:
        location = request.getfixturevalue("redis_server")
    prefix = unique_prefix("jobs")
    opened: list[JobStore] = []

    def factory(**kwargs) -> JobStore:
        store = _open(backend, location, prefix, **kwargs)
        opened.append(store)
        return store

    factory.backend, factory.location, factory.prefix = backend, location, prefix
    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store) -> JobStore:
    return make_store()


def new_job(tenant: str = "acme", **kwargs) -> Job:
    kwargs.setdefault("params", {"num_frames": 14, "seed": 1})
    kwargs.setdefault("input_key", f"{tenant}/inputs/x.png")
    return Job(tenant=tenant, **kwargs)


OUTPUT = JobOutput(key="acme/out.mp4", content_type="video/mp4", file_name="out.mp4", file_size=123)


# ---------------------------------------------------------------------------------------------- basics


def test_create_and_get_round_trip(store):
    job = new_job(
        trace_context={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
        policy=AdmissionPolicy(weight=2.5, max_running_jobs=2, retention_s=None),
        webhook=WebhookSubscription(url="https://example.com/hook", events=["video.progress"]),
        route=["image_encode", "sampling", "decode", "video_encode"],
        output_key="acme/vid/out.mp4",
        fingerprint="f" * 64,
        model="stabilityai/stable-video-diffusion-img2vid-xt",
        prompt="a lighthouse at dusk",
    )
    stored, created = store.create(job)
    assert created
    assert stored.model == job.model and stored.prompt == "a lighthouse at dusk"
    assert stored.id.startswith("vid_") and len(stored.id) == 28
    assert stored.version == 1 and stored.status is JobStatus.QUEUED and stored.attempts == 0
    assert stored.expires_at == stored.created_at + timedelta(seconds=store.retention_s)
    got = store.get(stored.id, tenant="acme")
    assert got == stored
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    assert store.get(stored.id, tenant=None) == stored
    assert store.get("vid_missing", tenant=None) is None
    assert store.ping()
    with pytest.raises(ValueError):
        store.create(stored)


def test_tenant_isolation(store):
    job, _ = store.create(new_job("acme"))
    assert store.get(job.id, tenant="globex") is None
    assert store.request_cancel(job.id, tenant="globex") is None
    assert store.delete(job.id, tenant="globex") is None
    assert store.list("globex") == ([], None)
    assert store.queue_depth("globex") == 0
    # Untouched for its owner.
    assert store.get(job.id, tenant="acme").status is JobStatus.QUEUED
    assert [j.id for j in store.list("acme")[0]] == [job.id]


def test_delete_removes_record_and_indexes(store):
    job, _ = store.create(new_job(idempotency_key="k1"))
    deleted = store.delete(job.id, tenant="acme")
    assert deleted is not None and deleted.id == job.id
    assert store.get(job.id, tenant=None) is None
    assert store.queue_depth() == 0 and store.queued_heads() == [] and store.list("acme") == ([], None)
    assert store.delete(job.id, tenant="acme") is None
    assert store.is_cancel_requested(job.id)  # a deleted job's runner should stop
    again, created = store.create(new_job(idempotency_key="k1"))
    assert created and again.id != job.id


# ---------------------------------------------------------------------------------------------- idempotency


def test_idempotency_key_returns_existing_job(store):
    first, created = store.create(new_job(idempotency_key="req-1"))
    assert created
    second, created = store.create(new_job(idempotency_key="req-1", params={"other": True}))
    assert not created and second.id == first.id and second.params == first.params
    other_tenant, created = store.create(new_job("globex", idempotency_key="req-1"))
    assert created and other_tenant.id != first.id
    no_key, created = store.create(new_job())
    assert created
    assert len(store.list("acme")[0]) == 2


def test_idempotency_concurrent_creates_make_one_job(make_store):
    stores = [make_store() for _ in range(8)]  # separate clients, as separate replicas would be
    barrier = threading.Barrier(len(stores))
    results: list[tuple[Job, bool]] = []
    lock = threading.Lock()

    def worker(s: JobStore) -> None:
        barrier.wait()
        result = s.create(new_job(idempotency_key="same-key"))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1
    assert len(stores[0].list("acme", limit=50)[0]) == 1


def test_expired_job_releases_its_idempotency_key(make_store):
    clock = FakeClock()
    store = make_store(clock=clock, retention_s=60)
    first, _ = store.create(new_job(idempotency_key="req-1"))
    clock.advance(61)
    now = datetime.fromtimestamp(clock.now, tz=timezone.utc)
    second, created = store.create(new_job(idempotency_key="req-1", created_at=now))
    assert created and second.id != first.id
    assert [j.id for j in store.purge_expired()] == [first.id]
    third, created = store.create(new_job(idempotency_key="req-1", created_at=now))
    assert not created and third.id == second.id  # purging the old job kept the new one's key


# ---------------------------------------------------------------------------------------------- listing


def test_list_pagination_newest_first(store):
    jobs = [store.create(new_job(created_at=T0 + timedelta(seconds=i)))[0] for i in range(7)]
    same_instant = [store.create(new_job(created_at=T0 + timedelta(seconds=3)))[0] for _ in range(2)]
    store.create(new_job("globex", created_at=T0 + timedelta(seconds=5)))
    expected = sorted(jobs + same_instant, key=lambda j: (j.created_at, j.id), reverse=True)

    pages, cursor, seen = 0, None, []
    while True:
        page, cursor = store.list("acme", limit=4, cursor=cursor)
        pages += 1
        seen += page
        if cursor is None:
            break
    assert pages == 3
    assert [j.id for j in seen] == [j.id for j in expected]

    # A job created after the first page does not shift later pages (stable cursor).
    first_page, cursor = store.list("acme", limit=4)
    store.create(new_job(created_at=T0 + timedelta(seconds=100)))
    rest, _ = store.list("acme", limit=50, cursor=cursor)
    assert [j.id for j in first_page + rest] == [j.id for j in expected]

    # Status filter.
    claimed = store.claim(jobs[2].id, owner="w", lease_s=60)
    assert claimed is not None
    running, cursor = store.list("acme", status=JobStatus.IN_PROGRESS)
    assert [j.id for j in running] == [jobs[2].id] and cursor is None
    queued, cursor = store.list("acme", status=JobStatus.QUEUED, limit=3)
    assert len(queued) == 3 and cursor is not None
    assert all(j.status is JobStatus.QUEUED for j in queued)
    with pytest.raises(ValueError):
        store.list("acme", cursor="not a cursor!")


def test_list_oldest_first_with_cursor_pages(store):
    jobs = [store.create(new_job(created_at=T0 + timedelta(seconds=i)))[0] for i in range(5)]
    same_instant = [store.create(new_job(created_at=T0 + timedelta(seconds=2)))[0] for _ in range(3)]
    store.create(new_job("globex", created_at=T0 + timedelta(seconds=1)))
    expected = sorted(jobs + same_instant, key=lambda j: (j.created_at, j.id))

    seen, cursor = [], None
    while True:
        page, cursor = store.list("acme", limit=3, cursor=cursor, order="asc")
        seen += page
        if cursor is None:
            break
    assert [j.id for j in seen] == [j.id for j in expected]
    # A job created later lands at the end of an oldest-first listing, after the pages already read.
    first_page, cursor = store.list("acme", limit=3, order="asc")
    late, _ = store.create(new_job(created_at=T0 + timedelta(seconds=100)))
    rest, _ = store.list("acme", limit=50, cursor=cursor, order="asc")
    assert [j.id for j in first_page + rest] == [j.id for j in expected] + [late.id]
    queued, _ = store.list("acme", status=JobStatus.QUEUED, limit=2, order="asc")
    assert [j.id for j in queued] == [j.id for j in expected[:2]]
    with pytest.raises(ValueError):
        store.list("acme", order="sideways")


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_list_after_a_job_id(store, order):
    jobs = [store.create(new_job(created_at=T0 + timedelta(seconds=i)))[0] for i in range(4)]
    tied = [store.create(new_job(created_at=T0 + timedelta(seconds=1)))[0] for _ in range(2)]
    other, _ = store.create(new_job("globex", created_at=T0 + timedelta(seconds=2)))
    expected = sorted(jobs + tied, key=lambda j: (j.created_at, j.id), reverse=order == "desc")

    seen, after = [], None
    while True:  # OpenAI-style: the next page starts after the last id of this one
        page, cursor = store.list("acme", limit=2, after=after, order=order)
        seen += page
        if cursor is None:
            break
        after = page[-1].id
    assert [j.id for j in seen] == [j.id for j in expected]
    for position, job in enumerate(expected):
        page, _ = store.list("acme", limit=50, after=job.id, order=order)
        assert [j.id for j in page] == [j.id for j in expected[position + 1:]]
    for unknown in (other.id, "vid_missing"):  # another tenant's id is a missing one
        with pytest.raises(ValueError):
            store.list("acme", after=unknown, order=order)
    _, cursor = store.list("acme", limit=1, order=order)
    with pytest.raises(ValueError):
        store.list("acme", after=jobs[0].id, cursor=cursor)


# ---------------------------------------------------------------------------------------------- claiming


def test_claim_exactly_once_from_threads(make_store):
    stores = [make_store() for _ in range(8)]
    job_ids = [stores[0].create(new_job())[0].id for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(index: int, s: JobStore) -> None:
        barrier.wait()
        for job_id in job_ids:
            claimed = s.claim(job_id, owner=f"runner-{index}", lease_s=60)
            if claimed is not None:
                assert claimed.lease_owner == f"runner-{index}" and claimed.attempts == 1
                with lock:
                    claims.append((job_id, claimed.lease_owner))

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(job_id for job_id, _ in claims) == sorted(job_ids)
    for job_id, owner in claims:
        job = stores[0].get(job_id, tenant=None)
        assert job.status is JobStatus.IN_PROGRESS and job.lease_owner == owner and job.attempts == 1
        assert job.started_at is not None
    assert stores[0].running_count() == 4 and stores[0].queue_depth() == 0


def _claim_in_child(backend, location, prefix, job_ids, barrier, results) -> None:
    store = _open(backend, location, prefix)
    try:
        barrier.wait(timeout=30)
        owner = f"proc-{os.getpid()}"
        results.put([job_id for job_id in job_ids if store.claim(job_id, owner=owner, lease_s=60)])
    finally:
        store.close()


def test_claim_exactly_once_from_processes(make_store):
    store = make_store()
    job_ids = [store.create(new_job())[0].id for _ in range(30)]
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(
            target=_claim_in_child,
            args=(make_store.backend, make_store.location, make_store.prefix, job_ids, barrier, results),
        )
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    claimed = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(claimed[0] + claimed[1]) == sorted(job_ids)
    assert not set(claimed[0]) & set(claimed[1])
    assert store.running_count() == 30


def test_renew_only_by_owner(make_store):
    clock = FakeClock()
    store = make_store(clock=clock)
    job, _ = store.create(new_job())
    assert not store.renew(job.id, owner="w1", lease_s=30)  # not claimed yet
    claimed = store.claim(job.id, owner="w1", lease_s=30)
    assert claimed.lease_expires_at == pytest.approx(clock.now + 30)
    assert store.claim(job.id, owner="w2", lease_s=30) is None
    clock.advance(20)
    assert not store.renew(job.id, owner="w2", lease_s=30)
    assert store.renew(job.id, owner="w1", lease_s=30)
    assert store.get(job.id, tenant=None).lease_expires_at == pytest.approx(clock.now + 30)
    clock.advance(20)  # 40 s after the claim: alive only thanks to the renewal
    assert store.recover_expired(max_attempts=3) == []
    assert store.renew("vid_missing", owner="w1", lease_s=30) is False


def test_expired_lease_requeues_then_abandons(make_store):
    clock = FakeClock()
    store = make_store(clock=clock)
    older, _ = store.create(new_job(created_at=T0))
    newer, _ = store.create(new_job(created_at=T0 + timedelta(seconds=1)))
    store.claim(older.id, owner="w1", lease_s=10)
    store.update_progress(older.id, owner="w1", stage="sampler", step=3, total_steps=25)
    assert store.queue_position(newer.id) == 0

    clock.advance(11)
    (recovered,) = store.recover_expired(max_attempts=2)
    assert recovered.id == older.id and recovered.status is JobStatus.QUEUED
    assert recovered.attempts == 1 and recovered.lease_owner is None and recovered.progress.stage is None
    assert recovered.created_at == older.created_at
    assert store.queue_position(older.id) == 0 and store.queue_position(newer.id) == 1  # kept its place
    assert store.recover_expired(max_attempts=2) == []
    # The old owner lost the lease for good.
    assert not store.renew(older.id, owner="w1", lease_s=10)
    assert not store.complete(older.id, owner="w1", output=OUTPUT)

    again = store.claim(older.id, owner="w2", lease_s=10)
    assert again.attempts == 2
    clock.advance(11)
    (abandoned,) = store.recover_expired(max_attempts=2)
    assert abandoned.status is JobStatus.FAILED and abandoned.error.code == "abandoned"
    assert "gave up after 2 attempts" in abandoned.error.message
    assert "stopped responding" in abandoned.error.message
    assert abandoned.finished_at is not None and abandoned.lease_owner is None
    assert store.running_count() == 0 and store.queue_depth() == 1


def test_expired_lease_with_cancel_request_becomes_cancelled(make_store):
    clock = FakeClock()
    store = make_store(clock=clock)
    job, _ = store.create(new_job())
    store.claim(job.id, owner="w1", lease_s=10)
    store.request_cancel(job.id, tenant="acme")
    clock.advance(11)
    (recovered,) = store.recover_expired(max_attempts=3)
    assert recovered.status is JobStatus.CANCELLED and store.queue_depth() == 0


def test_release_returns_job_without_counting_an_attempt(store):
    older, _ = store.create(new_job(created_at=T0))
    newer, _ = store.create(new_job(created_at=T0 + timedelta(seconds=1)))
    claimed = store.claim(older.id, owner="w1", lease_s=60)
    assert claimed.attempts == 1
    assert not store.release(older.id, owner="w2")
    assert store.release(older.id, owner="w1")
    job = store.get(older.id, tenant=None)
    assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.started_at is None
    assert job.lease_owner is None and job.lease_expires_at is None
    assert store.queue_position(older.id) == 0 and store.queue_position(newer.id) == 1
    assert store.claim(older.id, owner="w2", lease_s=60).attempts == 1
    # A release of a job whose cancel was requested cancels it instead.
    store.request_cancel(older.id, tenant="acme")
    assert store.release(older.id, owner="w2")
    assert store.get(older.id, tenant=None).status is JobStatus.CANCELLED


def test_release_after_a_lost_worker_counts_the_attempt(store):
    job, _ = store.create(new_job())
    for attempt in (1, 2, 3):
        assert store.claim(job.id, owner="w1", lease_s=60).attempts == attempt
        assert store.release(job.id, owner="w1", count_attempt=True)
        released = store.get(job.id, tenant=None)
        assert released.status is JobStatus.QUEUED and released.attempts == attempt
        assert released.started_at is not None


# ---------------------------------------------------------------------------------------------- cancel


def test_cancel_queued_job_never_starts(store):
    job, _ = store.create(new_job())
    cancelled = store.request_cancel(job.id, tenant="acme")
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    assert cancelled.version == job.version + 1
    assert store.claim(job.id, owner="w1", lease_s=60) is None
    assert store.queue_depth() == 0 and store.queued_heads() == [] and store.queue_position(job.id) is None
    assert store.is_cancel_requested(job.id)
    again = store.request_cancel(job.id, tenant="acme")  # terminal: unchanged
    assert again.status is JobStatus.CANCELLED and again.version == cancelled.version


def test_cancel_running_job_sets_flag_then_runner_marks_cancelled(store):
    job, _ = store.create(new_job())
    store.claim(job.id, owner="w1", lease_s=60)
    assert not store.is_cancel_requested(job.id)
    requested = store.request_cancel(job.id, tenant="acme")
    assert requested.status is JobStatus.IN_PROGRESS and requested.cancel_requested
    assert store.is_cancel_requested(job.id)
    assert not store.mark_cancelled(job.id, owner="w2")
    assert store.mark_cancelled(job.id, owner="w1")
    done = store.get(job.id, tenant="acme")
    assert done.status is JobStatus.CANCELLED and done.finished_at is not None and done.lease_owner is None
    assert store.running_count() == 0
    assert store.request_cancel(job.id, tenant="acme").version == done.version


# ---------------------------------------------------------------------------------------------- transitions


def test_terminal_transitions_refuse_non_owner(make_store):
    clock = FakeClock()
    store = make_store(clock=clock)
    job, _ = store.create(new_job())
    error = JobError(code="oom", message="out of memory")
    # Not claimed: nobody owns it.
    assert not store.complete(job.id, owner="w1", output=OUTPUT)
    assert not store.fail(job.id, owner="w1", error=error)
    store.claim(job.id, owner="w1", lease_s=60)
    assert not store.complete(job.id, owner="w2", output=OUTPUT)
    assert not store.fail(job.id, owner="w2", error=error)
    assert not store.mark_cancelled(job.id, owner="w2")
    assert not store.update_progress(job.id, owner="w2", stage="sampler")
    assert store.get(job.id, tenant=None).status is JobStatus.IN_PROGRESS

    clock.advance(5)
    assert store.complete(job.id, owner="w1", output=OUTPUT, timings={"video_encoder": 0.5})
    done = store.get(job.id, tenant="acme")
    assert done.status is JobStatus.COMPLETED and done.output == OUTPUT
    assert done.lease_owner is None and done.lease_expires_at is None
    assert done.finished_at.timestamp() == pytest.approx(clock.now)
    assert done.expires_at == done.finished_at + timedelta(seconds=store.retention_s)
    assert done.timings == {"video_encoder": 0.5}
    # Terminal: even the former owner cannot change it any more.
    assert not store.fail(job.id, owner="w1", error=error)
    assert not store.mark_cancelled(job.id, owner="w1")
    assert store.get(job.id, tenant=None).status is JobStatus.COMPLETED

    failing, _ = store.create(new_job())
    store.claim(failing.id, owner="w3", lease_s=60)
    assert store.fail(failing.id, owner="w3", error=error)
    failed = store.get(failing.id, tenant=None)
    assert failed.status is JobStatus.FAILED and failed.error == error and failed.output is None


def test_progress_metadata_and_version_bumps(store):
    job, _ = store.create(new_job())
    assert job.version == 1
    claimed = store.claim(job.id, owner="w1", lease_s=60)
    assert claimed.version == 2
    assert store.update_progress(
        job.id, owner="w1", stage="image_encoder", timings={"queue": 1.25, "image_encoder": 0.2}
    )
    assert store.update_progress(job.id, owner="w1", stage="sampler", step=5, total_steps=25, timings={"x": 1})
    current = store.get(job.id, tenant=None)
    assert current.version == 4
    assert (current.progress.stage, current.progress.step, current.progress.total_steps) == ("sampler", 5, 25)
    assert current.timings == {"queue": 1.25, "image_encoder": 0.2, "x": 1.0}
    assert current.updated_at >= claimed.updated_at
    assert store.renew(job.id, owner="w1", lease_s=60)
    assert store.get(job.id, tenant=None).version == 5


def test_webhook_attempts_are_appended_and_trimmed(store):
    job, _ = store.create(new_job(webhook=WebhookSubscription(url="https://example.com/hook")))
    for attempt in range(1, 5):
        assert store.record_webhook_attempt(job.id, {"event_id": "evt_1", "type": "video.completed",
                                                     "attempt": attempt, "at": "2030-01-01T00:00:00.000Z",
                                                     "status_code": 503}, keep=3)
    current = store.get(job.id, tenant=None)
    assert [d.attempt for d in current.webhook.deliveries] == [2, 3, 4]
    assert current.version == 5
    assert not store.record_webhook_attempt("vid_missing", {"event_id": "e", "type": "t", "attempt": 1,
                                                            "at": "x"}, keep=3)
    plain, _ = store.create(new_job())  # no subscription: nothing to record on
    assert not store.record_webhook_attempt(plain.id, {"event_id": "e", "type": "t", "attempt": 1, "at": "x"}, keep=3)


def test_the_cluster_lease_has_one_holder_until_it_expires(make_store):
    clock = FakeClock()
    store = make_store(clock=clock)
    assert store.hold_lease("janitor", owner="a", ttl_s=10)
    assert not store.hold_lease("janitor", owner="b", ttl_s=10)
    assert store.hold_lease("janitor", owner="a", ttl_s=10)  # renewed by its holder
    assert store.hold_lease("other", owner="b", ttl_s=10)  # leases are independent


def test_stages_after_sampling_keep_the_step_count(store):
    job, _ = store.create(new_job())
    store.claim(job.id, owner="w1", lease_s=60)
    store.update_progress(job.id, owner="w1", stage="sampling", step=25, total_steps=25)
    store.update_progress(job.id, owner="w1", stage="decode", timings={"decode": 0.5})
    progress = store.get(job.id, tenant=None).progress
    assert (progress.stage, progress.step, progress.total_steps) == ("decode", 25, 25)


# ---------------------------------------------------------------------------------------------- queue views


def test_queued_heads_gives_each_tenants_oldest(store):
    a = [store.create(new_job("a", created_at=T0 + timedelta(seconds=i)))[0] for i in (5, 1, 3)]
    b = [store.create(new_job("b", created_at=T0 + timedelta(seconds=i)))[0] for i in (2, 4)]
    c, _ = store.create(new_job("c", created_at=T0))
    store.claim(c.id, owner="w", lease_s=60)
    heads = store.queued_heads()
    assert [(j.tenant, j.id) for j in heads] == [("a", a[1].id), ("b", b[0].id)]
    store.claim(a[1].id, owner="w", lease_s=60)
    store.claim(b[0].id, owner="w", lease_s=60)
    store.request_cancel(b[1].id, tenant="b")
    assert [(j.tenant, j.id) for j in store.queued_heads()] == [("a", a[2].id)]
    assert store.queue_depth() == 2 and store.queue_depth("a") == 2 and store.queue_depth("b") == 0
    assert store.running_count() == 3 and store.running_count("a") == 1 and store.running_count("c") == 1


def test_queue_position(store):
    jobs = [store.create(new_job(t, created_at=T0 + timedelta(seconds=i)))[0] for i, t in enumerate("abab")]
    assert [store.queue_position(j.id) for j in jobs] == [0, 1, 2, 3]
    store.claim(jobs[1].id, owner="w", lease_s=60)
    assert [store.queue_position(j.id) for j in jobs] == [0, None, 1, 2]
    assert store.queue_position("vid_missing") is None


# ---------------------------------------------------------------------------------------------- expiry


def test_purge_expired(make_store):
    clock = FakeClock()
    store = make_store(clock=clock, retention_s=100)
    old, _ = store.create(new_job())
    running, _ = store.create(new_job())
    finished, _ = store.create(new_job())
    store.claim(running.id, owner="w", lease_s=1000)
    store.claim(finished.id, owner="w", lease_s=1000)
    clock.advance(50)
    store.complete(finished.id, owner="w", output=OUTPUT)  # expires 100 s after finishing
    clock.advance(60)  # 110 s after creation
    assert store.purge_expired(now=clock.now - 20) == []  # 90 s after creation: nothing yet
    purged = store.purge_expired()  # the store's clock: 110 s after creation
    assert [j.id for j in purged] == [old.id]
    assert store.get(old.id, tenant=None) is None
    assert store.get(running.id, tenant=None) is not None  # in progress: never purged
    assert store.get(finished.id, tenant=None) is not None
    purged = store.purge_expired(now=datetime.fromtimestamp(clock.now + 50, tz=timezone.utc))
    assert [j.id for j in purged] == [finished.id] and purged[0].output == OUTPUT
    assert store.get(finished.id, tenant=None) is None
    assert [j.id for j in store.list("acme")[0]] == [running.id]
    assert store.purge_expired(now=clock.now + 50) == []


# ---------------------------------------------------------------------------------------------- durability


def test_records_survive_a_new_store_instance(make_store):
    first = make_store()
    queued, _ = first.create(new_job(idempotency_key="k", created_at=T0))
    running, _ = first.create(new_job(created_at=T0 + timedelta(seconds=1)))
    first.claim(running.id, owner="w1", lease_s=60)
    first.close()

    second = make_store()  # as after an application restart
    assert second.get(queued.id, tenant="acme") == queued
    assert second.get(running.id, tenant="acme").lease_owner == "w1"
    assert second.queue_position(queued.id) == 0 and second.running_count() == 1
    assert second.create(new_job(idempotency_key="k"))[0].id == queued.id
    assert second.complete(running.id, owner="w1", output=OUTPUT)


def test_make_job_store_from_config(make_store):
    if make_store.backend == "sqlite":
        config = JobStoreConfig(backend="sqlite", sqlite_path=make_store.location, retention_s=120)
    else:
        config = JobStoreConfig(backend="redis", redis_url=make_store.location, key_prefix=make_store.prefix)
    store = make_job_store(config)
    try:
        assert type(store).__name__ == {"sqlite": "SqliteJobStore", "redis": "RedisJobStore"}[make_store.backend]
        job, _ = store.create(new_job())
        assert make_store().get(job.id, tenant="acme") == job
        assert store.ping()
    finally:
        store.close()


def test_redis_password_comes_from_environment(tmp_path, monkeypatch):
    password = "s3cret-test-password"
    with start_redis_server(tmp_path / "redis-auth", password=password) as url:
        monkeypatch.delenv("REDIS_PASSWORD", raising=False)
        anonymous = RedisJobStore(url, key_prefix=unique_prefix())
        assert not anonymous.ping()
        anonymous.close()
        monkeypatch.setenv("REDIS_PASSWORD", password)
        store = make_job_store(JobStoreConfig(backend="redis", redis_url=url, key_prefix=unique_prefix()))
        try:
            assert store.ping()
            job, _ = store.create(new_job())
            assert store.get(job.id, tenant="acme") == job
            assert password not in repr(store)
        finally:
            store.close()


def test_backend_failure_raises_job_store_error(make_store, tmp_path):
    """An unreachable Redis or a SQLite file locked past busy_timeout surfaces as JobStoreError (503)."""
    if make_store.backend == "sqlite":
        store = make_store(busy_timeout_s=0.2)
        job, _ = store.create(new_job())
        blocker = sqlite3.connect(make_store.location, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(JobStoreError, match="locked"):
                store.claim(job.id, owner="w", lease_s=60)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert store.claim(job.id, owner="w", lease_s=60) is not None
    else:
        store = RedisJobStore("redis://127.0.0.1:1/0", key_prefix=unique_prefix(), socket_timeout_s=1)
        try:
            assert not store.ping()
            with pytest.raises(JobStoreError):
                store.get("vid_x", tenant=None)
            with pytest.raises(JobStoreError):
                store.create(new_job())
        finally:
            store.close()


# ---------------------------------------------------------------------------------------------- per-job retention


def test_the_tenant_retention_stamped_at_admission_overrides_the_store_retention(make_store):
    clock = FakeClock()
    store = make_store(clock=clock, retention_s=1000)
    now = datetime.fromtimestamp(clock.now, tz=timezone.utc)
    short, _ = store.create(new_job(created_at=now, policy=AdmissionPolicy(retention_s=10)))
    normal, _ = store.create(new_job(created_at=now))
    assert short.expires_at == short.created_at + timedelta(seconds=10)
    assert normal.expires_at == now + timedelta(seconds=1000)
    store.claim(short.id, owner="w", lease_s=60)
    clock.advance(5)
    assert store.complete(short.id, owner="w", output=OUTPUT)
    finished = store.get(short.id, tenant=None)
    assert finished.expires_at == finished.finished_at + timedelta(seconds=10)  # kept 10 s after finishing
    clock.advance(11)
    assert [j.id for j in store.purge_expired()] == [short.id]
    assert store.get(normal.id, tenant=None) is not None


# ---------------------------------------------------------------------------------------------- idempotency lookup


def test_find_by_idempotency_key(make_store):
    clock = FakeClock()
    store = make_store(clock=clock, retention_s=60)
    now = datetime.fromtimestamp(clock.now, tz=timezone.utc)
    job, _ = store.create(new_job(idempotency_key="req-1", created_at=now))
    assert store.find_by_idempotency_key("acme", "req-1") == job
    assert store.find_by_idempotency_key("globex", "req-1") is None
    assert store.find_by_idempotency_key("acme", "req-2") is None
    clock.advance(61)
    assert store.find_by_idempotency_key("acme", "req-1") is None  # expired: no longer owns the key


# ---------------------------------------------------------------------------------------------- token buckets


def test_token_bucket_burst_then_rate(store):
    take = functools.partial(store.take_token, "submit:acme", rate_per_s=0.1, burst=3)
    t = 1_000_000.0
    assert [take(now=t) for _ in range(3)] == [0.0, 0.0, 0.0]  # a new bucket starts full
    assert take(now=t) == pytest.approx(10.0)  # one token per 10 s
    assert take(now=t + 4) == pytest.approx(6.0)  # a refused take spends nothing
    assert take(now=t + 10) == 0.0
    assert take(now=t + 10) == pytest.approx(10.0)
    # Buckets are independent.
    assert store.take_token("submit:globex", rate_per_s=0.1, burst=3, now=t) == 0.0
    # A long idle period refills to burst, no further.
    later = t + 100_000
    assert [take(now=later) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert take(now=later) > 0
    # A caller whose clock is behind refills nothing (skewed replicas cannot mint tokens).
    assert take(now=later - 50) == pytest.approx(10.0)
    # Fractional progress is kept between calls.
    assert take(now=later + 2.5) == pytest.approx(7.5)


def test_token_bucket_uses_the_store_clock(make_store):
    clock = FakeClock()
    store = make_store(clock=clock)
    assert store.take_token("b", rate_per_s=1.0, burst=1) == 0.0
    assert store.take_token("b", rate_per_s=1.0, burst=1) == pytest.approx(1.0)
    clock.advance(0.25)
    assert store.take_token("b", rate_per_s=1.0, burst=1) == pytest.approx(0.75)
    clock.advance(0.75)
    assert store.take_token("b", rate_per_s=1.0, burst=1) == 0.0


def test_token_bucket_rejects_bad_arguments(store):
    for kwargs in ({"rate_per_s": 0, "burst": 1}, {"rate_per_s": -1, "burst": 1}, {"rate_per_s": 1, "burst": 0.5}):
        with pytest.raises(ValueError):
            store.take_token("b", **kwargs)
    with pytest.raises(ValueError):
        store.take_token("", rate_per_s=1, burst=1)


def test_token_bucket_is_atomic_across_store_instances(make_store):
    """Eight clients (as eight ingress replicas) race for a bucket of 5: exactly 5 tokens go out."""
    stores = [make_store() for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    waits: list[float] = []
    lock = threading.Lock()
    t = time.time()

    def worker(s: JobStore) -> None:
        barrier.wait()
        got = [s.take_token("shared", rate_per_s=0.001, burst=5, now=t) for _ in range(3)]
        with lock:
            waits.extend(got)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(waits) == 24
    assert sum(w == 0.0 for w in waits) == 5
    assert all(w > 0 for w in waits if w != 0.0)


def test_token_buckets_survive_a_new_store_instance(make_store):
    t = 2_000_000.0
    first = make_store()
    assert first.take_token("b", rate_per_s=0.5, burst=1, now=t) == 0.0
    first.close()
    assert make_store().take_token("b", rate_per_s=0.5, burst=1, now=t + 1) == pytest.approx(1.0)


def test_progress_never_moves_back_along_the_route(store):
    job, _ = store.create(new_job(route=["image_encode", "sampling", "decode", "video_encode"]))
    store.claim(job.id, owner="w1", lease_s=60)
    assert store.update_progress(job.id, owner="w1", stage="sampling", step=1, total_steps=4)
    assert not store.update_progress(job.id, owner="w1", stage="image_encode")  # a late note from an earlier stage
    assert store.update_progress(job.id, owner="w1", stage="decode")
    assert store.update_progress(job.id, owner="w1", stage="store")
    assert not store.update_progress(job.id, owner="w1", stage="video_encode")
    current = store.get(job.id, tenant=None)
    assert (current.progress.stage, current.progress.step) == ("store", 1)


def test_completed_jobs_in_order_of_expiry_and_a_gone_output_is_marked_once(make_store):
    clock = FakeClock()
    store = make_store(clock=clock, retention_s=100)
    done = []
    for _ in range(5):
        job, _ = store.create(new_job())
        store.claim(job.id, owner="w", lease_s=1000)
        clock.advance(1)
        store.complete(job.id, owner="w", output=OUTPUT)
        done.append(job.id)
    queued, _ = store.create(new_job())
    seen, after, pages = [], None, 0
    while True:
        page, after = store.completed_after(after, limit=2)
        seen += [job.id for job in page]
        pages += 1
        if after is None:
            break
    assert seen == done and pages <= 4  # in order of expiry; the queued job is not in the sweep
    assert store.mark_output_gone(done[0]) is True and store.mark_output_gone(done[0]) is False
    assert store.get(done[0], tenant=None).output.gone_at is not None
    assert store.mark_output_gone(queued.id) is False


def test_the_completed_sweep_pages_through_equal_expiries_without_skipping(make_store):
    store = make_store(clock=FakeClock(), retention_s=100)  # a frozen clock: every job expires at once
    done = set()
    for _ in range(5):
        job, _ = store.create(new_job())
        store.claim(job.id, owner="w", lease_s=1000)
        store.complete(job.id, owner="w", output=OUTPUT)
        done.add(job.id)
    seen, after = [], None
    for _ in range(5):
        page, after = store.completed_after(after, limit=2)
        seen += [job.id for job in page]
        if after is None:
            break
    assert sorted(seen) == sorted(done) and len(seen) == 5
