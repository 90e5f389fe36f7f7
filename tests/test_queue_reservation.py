"""``create(job, max_queued=N)``: a tenant's queue limit checked and reserved in one atomic step,
against both backends (a SQLite file, a real redis-server).

Why: reading ``queue_depth`` and then creating lets concurrent submits (threads of one ingress,
or several ingress replicas) all see room and overshoot. Here 200 concurrent creates against a
limit of 20 must make exactly 20 jobs, refuse the rest with :class:`QueueFullError`, and lose
none: through one store object, through several (one per "replica"), and from several processes.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading

import pytest
import redis as redis_lib
from fixtures_stores import backend, open_store, redis_server  # noqa: F401  (fixtures)
from fixtures_stores import open_job_store as _open

from serve.jobstore import Job, JobStatus, JobStore, QueueFullError, RedisJobStore

pytestmark = pytest.mark.timeout(120)

LIMIT = 20
SUBMITS = 200


def submit_concurrently(stores: list[JobStore], submits: int = SUBMITS, tenant: str = "acme") -> tuple[list, list]:
    """``submits`` threads (spread over ``stores``) each create one job with the limit at once:
    ``(created ids, refusals)``; any other outcome fails the test."""
    barrier = threading.Barrier(submits)
    created: list[str] = []
    refused: list[QueueFullError] = []
    other: list[BaseException] = []
    lock = threading.Lock()

    def submit(store: JobStore) -> None:
        barrier.wait(timeout=60)
        try:
            job, new = store.create(Job(tenant=tenant), max_queued=LIMIT)
            assert new
            with lock:
                created.append(job.id)
        except QueueFullError as exc:
            with lock:
                refused.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                other.append(exc)

    threads = [threading.Thread(target=submit, args=(stores[n % len(stores)],)) for n in range(submits)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not other, other[:3]
    assert len(created) + len(refused) == submits  # none lost
    return created, refused


def check_exactly_limit(store: JobStore, created: list[str], refused: list[QueueFullError]) -> None:
    assert len(created) == LIMIT and len(set(created)) == LIMIT
    assert len(refused) == SUBMITS - LIMIT
    assert all(exc.limit == LIMIT and exc.depth >= LIMIT for exc in refused)
    assert store.queue_depth("acme") == LIMIT
    listed, _ = store.list("acme", limit=100)
    assert sorted(job.id for job in listed) == sorted(created)


def test_concurrent_creates_through_one_store_object(backend, open_store):
    kind, location, prefix = backend
    if kind == "sqlite":
        store = open_store()
    else:
        # redis-py's default pool refuses a 101st concurrent connection (MaxConnectionsError); a
        # blocking pool makes 200 threads share 50 connections instead, as a busy replica would.
        pool = redis_lib.BlockingConnectionPool.from_url(location, max_connections=50, timeout=60,
                                                         decode_responses=True)
        store = RedisJobStore(location, key_prefix=prefix, client=redis_lib.Redis(connection_pool=pool))
    try:
        created, refused = submit_concurrently([store])
        check_exactly_limit(store, created, refused)
    finally:
        store.close()


def test_concurrent_creates_through_several_store_objects(open_store):
    """Eight store objects (own connections), as eight ingress replicas would have."""
    stores = [open_store() for _ in range(8)]
    created, refused = submit_concurrently(stores)
    check_exactly_limit(stores[0], created, refused)


def _submit_in_child(backend, count: int, barrier, results) -> None:
    store = _open(backend)
    outcome = {"created": [], "refused": 0}
    try:
        barrier.wait(timeout=60)
        for _ in range(count):
            try:
                outcome["created"].append(store.create(Job(tenant="acme"), max_queued=LIMIT)[0].id)
            except QueueFullError:
                outcome["refused"] += 1
    finally:
        results.put(outcome)
        store.close()


def test_concurrent_creates_from_processes(backend, open_store):
    store = open_store()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_submit_in_child, args=(backend, 15, barrier, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=90) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    created = [job_id for outcome in outcomes for job_id in outcome["created"]]
    assert len(created) == LIMIT and sum(outcome["refused"] for outcome in outcomes) == 60 - LIMIT
    assert store.queue_depth("acme") == LIMIT


def test_replays_are_answered_and_room_is_per_tenant_and_frees_up(open_store):
    store = open_store()
    keyed, _ = store.create(Job(tenant="acme", idempotency_key="req-1"), max_queued=2)
    store.create(Job(tenant="acme"), max_queued=2)
    with pytest.raises(QueueFullError) as refused:
        store.create(Job(tenant="acme"), max_queued=2)
    assert (refused.value.depth, refused.value.limit) == (2, 2)
    assert pickle.loads(pickle.dumps(refused.value)).limit == 2  # crosses process boundaries intact

    # An idempotent replay adds nothing, so a full queue does not refuse it.
    replay, created = store.create(Job(tenant="acme", idempotency_key="req-1"), max_queued=2)
    assert not created and replay.id == keyed.id
    # Another tenant has its own count; no limit means no check.
    assert store.create(Job(tenant="globex"), max_queued=1)[1]
    assert store.create(Job(tenant="acme"))[1]
    assert store.queue_depth("acme") == 3

    # A claimed job no longer counts as queued: room again once the queue is under the limit.
    for job in store.list("acme", limit=10, order="asc")[0][:2]:
        assert store.claim(job.id, owner="runner", lease_s=60).status is JobStatus.IN_PROGRESS
    assert store.create(Job(tenant="acme"), max_queued=2)[1]
    with pytest.raises(QueueFullError):
        store.create(Job(tenant="acme"), max_queued=2)
    # A job created in another state (not queued) is not held to the queue limit.
    assert store.create(Job(tenant="acme", status=JobStatus.CANCELLED), max_queued=2)[1]
