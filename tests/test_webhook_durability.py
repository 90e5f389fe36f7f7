"""Durable webhook delivery, against both job-store backends (a SQLite file, a real redis-server):
pending deliveries live in the store, so a runner that dies loses none of them.

The "runner" here is the component that drives deliveries, :class:`serve.webhooks.WebhookOutbox`.
The crash tests run one in a child process and SIGKILL it (no cleanup of any kind, exactly like a
replica dying), then a new outbox with a new store object finishes the delivery; the receiver is a
real HTTP server on 127.0.0.1 (``tests/test_webhooks.py``). Backoffs and leases are short, so each
test takes a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_stores import backend, open_store, redis_server  # noqa: F401  (fixtures)
from test_webhooks import SECRET, Receiver

from serve.config import AppConfig
from serve.jobstore import (
    Job,
    JobError,
    JobStatus,
    JobStore,
    SqliteJobStore,
    WebhookDelivery,
    WebhookSubscription,
)
from serve.webhooks import (
    EVENT_COMPLETED,
    EVENT_PROGRESS,
    WebhookOutbox,
    WebhookSender,
    terminal_event_id,
    verify,
)

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
SENDER = dict(allow=["127.0.0.1"], timeout_s=8.0, initial_backoff_s=2.0, max_backoff_s=4.0, max_elapsed_s=60.0,
              max_attempts=5, jitter=0.0)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def make_outbox(store: JobStore, owner: str, **kwargs) -> WebhookOutbox:
    sender = WebhookSender(**{**SENDER, **kwargs.pop("sender", {})})
    return WebhookOutbox(store, sender, secret_of=lambda tenant: SECRET, owner=owner,
                         **{"lease_s": 3.0, "poll_s": 0.05, **kwargs})


def job_with_webhook(store: JobStore, url: str) -> Job:
    job, _ = store.create(Job(tenant="acme", webhook=WebhookSubscription(url=url)))
    return job


def enqueue(outbox: WebhookOutbox, job: Job, event_type: str = EVENT_COMPLETED) -> str:
    event_id = terminal_event_id(job.id, event_type)
    body = json.dumps({"id": event_id, "type": event_type, "data": {"id": job.id}}).encode()
    assert outbox.enqueue(job_id=job.id, tenant=job.tenant, url=job.webhook_url, event_type=event_type,
                          event_id=event_id, body=body)
    return event_id


def recorded(store: JobStore, job: Job) -> list[tuple]:
    deliveries = store.get(job.id, tenant=None).webhook.deliveries
    return [(a.attempt, a.status_code, a.error is not None, a.next_retry_in_s is not None) for a in deliveries]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def drive(outbox: WebhookOutbox, until, timeout_s: float) -> None:
    """Run ``outbox``'s loop in this thread's own event loop until ``until()``, then stop it cleanly."""

    async def main() -> None:
        loop_task = asyncio.create_task(outbox.run())
        try:
            deadline = time.monotonic() + timeout_s
            while not until():
                assert time.monotonic() < deadline, "the outbox did not finish in time"
                await asyncio.sleep(0.05)
        finally:
            await outbox.stop(1.0)
            await asyncio.wait_for(loop_task, 5)

    asyncio.run(main())


# -- a runner in a child process, killed with SIGKILL ---------------------------------------------

CHILD = """
import asyncio, json, sys
from serve.jobstore import RedisJobStore, SqliteJobStore
from serve.webhooks import WebhookOutbox, WebhookSender
kind, location, prefix, secret, sender, lease_s = json.loads(sys.argv[1])
store = SqliteJobStore(location) if kind == "sqlite" else RedisJobStore(location, key_prefix=prefix)
outbox = WebhookOutbox(store, WebhookSender(**sender), secret_of=lambda tenant: secret, owner="runner-doomed",
                       lease_s=lease_s, poll_s=0.05)
print("ready", flush=True)
asyncio.run(outbox.run())
"""


def start_child_runner(backend, lease_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps([*backend, SECRET, SENDER, lease_s])],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def ids_of(receiver: Receiver) -> list[str]:
    return [r["headers"]["Webhook-Id"] for r in receiver.requests]


def test_runner_killed_during_backoff_a_new_runner_delivers(backend, open_store, receiver):
    """Attempt 1 gets a 500; the runner dies during the 2 s backoff; a new runner (new process
    state, new store object) sends attempt 2 when it falls due, with the same Webhook-Id."""
    store = open_store()
    job = job_with_webhook(store, receiver.url)
    receiver.script = [(500, {}, 0.0)]
    child = start_child_runner(backend, lease_s=3.0)
    try:
        event_id = enqueue(make_outbox(store, "ingress"), job)  # the ingress enqueues; it runs no loop
        # The child made attempt 1 and handed the delivery back, due after the backoff.
        pending = wait_for(lambda: [d for d in store.pending_webhooks() if d.attempts == 1], 20, "attempt 1")
        assert pending[0].lease_owner is None and pending[0].first_attempt_at is not None
    finally:
        kill(child)  # during the backoff: no attempt 2 from it
    assert ids_of(receiver) == [event_id]
    due_at = pending[0].due_at

    survivor = make_outbox(open_store(), "runner-survivor")
    drive(survivor, lambda: not store.pending_webhooks(), 20)
    assert ids_of(receiver) == [event_id, event_id]  # one event, one id
    assert receiver.requests[1]["at"] - receiver.requests[0]["at"] >= 1.5
    assert time.time() >= due_at
    assert recorded(store, job) == [(1, 500, False, True), (2, 200, False, False)]
    body = receiver.requests[1]["body"]
    assert verify(SECRET, receiver.requests[1]["headers"], body) and json.loads(body)["id"] == event_id


def test_runner_killed_mid_attempt_another_takes_over_after_the_lease(backend, open_store, receiver):
    """The runner dies while its request is in flight: the delivery stays claimed until the lease
    (2 s) runs out, then a new runner re-sends it with the same id (at-least-once)."""
    store = open_store()
    job = job_with_webhook(store, receiver.url)
    receiver.script = [(200, {}, 4.0)]  # holds the first request 4 s
    child = start_child_runner(backend, lease_s=2.0)
    try:
        event_id = enqueue(make_outbox(store, "ingress"), job)
        wait_for(lambda: receiver.requests, 20, "the first request")
        claimed = store.pending_webhooks()
        assert claimed[0].lease_owner == "runner-doomed"
    finally:
        kill(child)
    lease_end = claimed[0].due_at

    survivor = make_outbox(open_store(), "runner-survivor")
    assert asyncio.run(survivor.run_once()) == 0 or time.time() >= lease_end  # still leased
    drive(survivor, lambda: not store.pending_webhooks(), 20)
    assert ids_of(receiver) == [event_id, event_id]
    assert receiver.requests[1]["at"] >= receiver.requests[0]["at"] + 1.0
    assert recorded(store, job) == [(1, 200, False, False)]  # the dead runner recorded nothing


# -- the outbox in one process ---------------------------------------------------------------------


def test_outbox_retries_records_and_removes(open_store, receiver):
    store = open_store()
    job = job_with_webhook(store, receiver.url)
    receiver.script = [(503, {}, 0.0), (429, {"Retry-After": "0"}, 0.0)]
    outbox = make_outbox(store, "runner-1", sender={"initial_backoff_s": 0.05, "max_backoff_s": 0.2})
    event_id = enqueue(outbox, job)
    drive(outbox, lambda: not store.pending_webhooks(), 20)
    assert ids_of(receiver) == [event_id] * 3
    assert recorded(store, job) == [(1, 503, False, True), (2, 429, False, True), (3, 200, False, False)]


def test_outbox_gives_up_by_the_policy(open_store, receiver):
    """max_attempts, permanent 4xx and progress events (one attempt) end the delivery: it is removed."""
    store = open_store()
    job = job_with_webhook(store, receiver.url)
    receiver.script = [(500, {}, 0.0)] * 2 + [(404, {}, 0.0), (500, {}, 0.0)]

    def runner() -> WebhookOutbox:  # a stopped outbox stays stopped: one per run
        return make_outbox(store, "runner-1", sender={"initial_backoff_s": 0.05, "max_backoff_s": 0.1,
                                                      "max_attempts": 2})

    enqueue(runner(), job)
    drive(runner(), lambda: not store.pending_webhooks(), 20)
    assert recorded(store, job) == [(1, 500, False, True), (2, 500, False, False)]

    other = job_with_webhook(store, receiver.url)
    enqueue(runner(), other)  # 404: permanent
    drive(runner(), lambda: not store.pending_webhooks(), 20)
    assert runner().enqueue(job_id=other.id, tenant="acme", url=receiver.url, event_type=EVENT_PROGRESS,
                            event_id="evt_progress-1", body=b"{}")  # 500: progress gets one attempt
    drive(runner(), lambda: not store.pending_webhooks(), 20)
    assert recorded(store, other) == [(1, 404, False, False), (1, 500, False, False)]


def test_a_tenant_without_a_secret_is_recorded_and_dropped(open_store, receiver):
    store = open_store()
    job = job_with_webhook(store, receiver.url)
    outbox = WebhookOutbox(store, WebhookSender(**SENDER), secret_of=lambda tenant: None, owner="runner-1",
                           poll_s=0.05)
    enqueue(outbox, job)
    drive(outbox, lambda: not store.pending_webhooks(), 10)
    assert receiver.requests == []
    assert recorded(store, job) == [(1, None, True, False)]


def test_stop_hands_in_flight_deliveries_back(open_store, receiver):
    """A replica shutting down cleanly does not make the others wait for its leases."""
    store = open_store()
    job = job_with_webhook(store, receiver.url)
    receiver.script = [(200, {}, 3.0)]
    outbox = make_outbox(store, "runner-leaving", lease_s=60.0)
    enqueue(outbox, job)

    async def leave() -> None:
        await outbox.run_once(wait=False)
        await asyncio.to_thread(wait_for, lambda: receiver.requests, 10, "the request")
        await outbox.stop(0.1)

    asyncio.run(leave())
    [pending] = store.pending_webhooks()
    assert pending.lease_owner is None and pending.attempts == 0 and pending.due_at <= time.time()
    assert [d.event_id for d in store.claim_webhooks(owner="runner-next", lease_s=5)] == [pending.event_id]


def test_many_runners_claim_each_delivery_once(open_store):
    """Eight runners (own store objects, own threads) claiming concurrently: every delivery is
    claimed by exactly one of them while its lease runs."""
    store = open_store()
    now = time.time()
    for n in range(120):
        store.enqueue_webhook(WebhookDelivery(event_id=f"evt_{n:04d}", job_id=f"vid_{n}", tenant="acme",
                                              event_type=EVENT_COMPLETED, url="http://127.0.0.1/h", body=b"{}",
                                              created_at=now, due_at=now))
    claims: dict[str, list[str]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def runner(index: int) -> None:
        mine = open_store()
        barrier.wait()
        while batch := mine.claim_webhooks(owner=f"r{index}", lease_s=60, limit=4):
            with lock:
                for delivery in batch:
                    claims.setdefault(delivery.event_id, []).append(f"r{index}")

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(claims) == 120 and all(len(owners) == 1 for owners in claims.values())
    assert {d.event_id: d.lease_owner for d in store.pending_webhooks(limit=200)} == \
        {event_id: owners[0] for event_id, owners in claims.items()}


def test_store_queue_semantics(open_store):
    """Dedup on the event id, due order, lease expiry, fenced hand-back, removal."""
    store = open_store()
    t0 = 1_900_000_000.0

    def delivery(event_id: str, due: float, job_id: str = "vid_1") -> WebhookDelivery:
        return WebhookDelivery(event_id=event_id, job_id=job_id, tenant="acme", event_type=EVENT_COMPLETED,
                               url="https://h.example/x", body=b'{"x":"\\u00e9"}\xff', created_at=t0, due_at=due)

    assert store.enqueue_webhook(delivery("evt_b", t0))
    assert store.enqueue_webhook(delivery("evt_a", t0))
    assert store.enqueue_webhook(delivery("evt_c", t0 + 10, job_id="vid_2"))
    assert not store.enqueue_webhook(delivery("evt_a", t0 + 99))  # one record per event
    assert [d.event_id for d in store.pending_webhooks()] == ["evt_a", "evt_b", "evt_c"]
    assert [d.event_id for d in store.pending_webhooks(job_id="vid_2")] == ["evt_c"]

    first = store.claim_webhooks(owner="r1", lease_s=5, now=t0)
    assert [(d.event_id, d.lease_owner, d.due_at) for d in first] == [("evt_a", "r1", t0 + 5), ("evt_b", "r1", t0 + 5)]
    assert first[0].body == b'{"x":"\\u00e9"}\xff' and first[0].attempts == 0
    assert store.claim_webhooks(owner="r2", lease_s=5, now=t0 + 4.9) == []  # leased

    # r1 hands evt_a back for a retry; its lease on evt_b runs out and r2 takes it over.
    assert store.retry_webhook("evt_a", owner="r1", attempts=1, first_attempt_at=t0, due_at=t0 + 7)
    taken = store.claim_webhooks(owner="r2", lease_s=50, now=t0 + 5)
    assert [d.event_id for d in taken] == ["evt_b"]
    assert not store.retry_webhook("evt_b", owner="r1", attempts=1, first_attempt_at=t0, due_at=t0)  # fenced
    later = store.claim_webhooks(owner="r3", lease_s=5, now=t0 + 10)
    assert [(d.event_id, d.attempts, d.first_attempt_at) for d in later] == [("evt_a", 1, t0), ("evt_c", 0, None)]

    assert store.finish_webhook("evt_b") and not store.finish_webhook("evt_b")
    assert not store.retry_webhook("evt_b", owner="r2", attempts=1, first_attempt_at=t0, due_at=t0)
    assert [d.event_id for d in store.pending_webhooks()] == ["evt_a", "evt_c"]


# -- terminal events: enqueued by the store with the transition ---------------------------------


def test_every_way_a_job_ends_enqueues_its_terminal_event_once(open_store):
    """The terminal event is written in the same atomic step as the terminal state (whoever ends
    the job), so no crash can separate them; jobs without a webhook and non-terminal changes get
    none, and its id is the one derived from the job."""
    store = open_store()
    hooked = {name: job_with_webhook(store, f"https://hooks.example/{name}") for name in
              ("completed", "failed", "queued-cancel", "running-cancel", "abandoned")}
    plain, _ = store.create(Job(tenant="acme"))
    for name in ("completed", "failed", "running-cancel", "abandoned"):
        assert store.claim(hooked[name].id, owner="w", lease_s=0.01 if name == "abandoned" else 60)
    assert store.claim(plain.id, owner="w", lease_s=60)
    assert store.update_progress(hooked["completed"].id, owner="w", stage="sampling", step=1, total_steps=2)
    assert store.pending_webhooks() == []  # nothing ended yet

    from serve.jobstore import JobOutput

    output = JobOutput(key="acme/x.mp4", content_type="video/mp4", file_name="x.mp4", file_size=1)
    assert store.complete(hooked["completed"].id, owner="w", output=output)
    assert store.fail(hooked["failed"].id, owner="w", error=JobError(code="boom", message="x"))
    assert store.request_cancel(hooked["queued-cancel"].id, tenant="acme").status is JobStatus.CANCELLED
    assert store.request_cancel(hooked["running-cancel"].id, tenant="acme")
    assert store.mark_cancelled(hooked["running-cancel"].id, owner="w")
    time.sleep(0.05)
    assert [j.id for j in store.recover_expired(max_attempts=1)] == [hooked["abandoned"].id]
    assert store.complete(plain.id, owner="w", output=output)  # no webhook: no event
    assert not store.complete(hooked["completed"].id, owner="w", output=output)  # ended already

    expected = {(hooked["completed"].id, "video.completed"), (hooked["failed"].id, "video.failed"),
                (hooked["queued-cancel"].id, "video.cancelled"), (hooked["running-cancel"].id, "video.cancelled"),
                (hooked["abandoned"].id, "video.failed")}
    pending = store.pending_webhooks()
    assert {(d.job_id, d.event_type) for d in pending} == expected and len(pending) == 5
    for delivery in pending:
        assert delivery.event_id == terminal_event_id(delivery.job_id, delivery.event_type)
        assert delivery.body == b"" and delivery.attempts == 0 and delivery.lease_owner is None
        assert delivery.url == store.get(delivery.job_id, tenant=None).webhook_url

    # The process that ended the job fills the body in, once; a second fill changes nothing.
    completed_event = terminal_event_id(hooked["completed"].id, "video.completed")
    assert store.set_webhook_body(completed_event, b'{"filled":1}')
    assert not store.set_webhook_body(completed_event, b'{"filled":2}')
    assert not store.set_webhook_body("evt_missing", b"{}")
    assert store.pending_webhooks(job_id=hooked["completed"].id)[0].body == b'{"filled":1}'

    # A body rendered by the first attempt is kept for the retries (same bytes every time).
    [claimed] = [d for d in store.claim_webhooks(owner="r", lease_s=5, limit=10)
                 if d.job_id == hooked["failed"].id]
    assert store.retry_webhook(claimed.event_id, owner="r", attempts=1, first_attempt_at=1.0, due_at=0.0,
                               body=b'{"rendered":1}')
    [again] = store.pending_webhooks(job_id=hooked["failed"].id)
    assert again.body == b'{"rendered":1}' and again.attempts == 1


# -- the lifecycle: what the runner and ingress call ----------------------------------------------


@pytest.fixture
def lifecycle(tmp_path):
    """A runner's :class:`JobLifecycle` on a SQLite store, tenant ``acme`` with a webhook secret
    (``lifecycle.secret``)."""
    from serve.lifecycle import JobLifecycle
    from serve.metering import make_usage_ledger
    from serve.tenants import TenantRegistry, add_tenant, rotate_webhook_secret

    tenants = tmp_path / "tenants.yaml"
    add_tenant(tenants, "acme")
    secret = rotate_webhook_secret(tenants, "acme").webhook_secret
    config = AppConfig.model_validate({"job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")},
                                       "storage": {"local_dir": str(tmp_path / "out")},
                                       "url_allowlist": ["127.0.0.1"], "webhooks": {"initial_backoff_s": 0.05}})
    store = SqliteJobStore(config.job_store.sqlite_path)
    found = JobLifecycle(config, store=store, ledger=make_usage_ledger(config.job_store),
                         tenants=TenantRegistry(tenants), owner="runner-1")
    found.secret = secret
    yield found
    store.close()


def test_a_terminal_event_is_sent_once_with_a_stable_id(lifecycle, receiver):
    """The store enqueued the event when the job failed; announcing the end twice (two replicas
    racing) adds nothing; the body is the job as it ended, the same bytes on every attempt."""
    store = lifecycle.store
    job = job_with_webhook(store, receiver.url)
    assert store.claim(job.id, owner="w", lease_s=30)
    assert store.fail(job.id, owner="w", error=JobError(code="boom", message="it broke"))
    event_id = terminal_event_id(job.id, "video.failed")
    receiver.script = [(503, {}, 0.0)]

    async def announce_twice_and_deliver() -> None:
        await lifecycle.ended(job.id)
        await lifecycle.ended(job.id)
        [pending] = store.pending_webhooks()
        assert pending.event_id == event_id and json.loads(pending.body)["data"]["status"] == "failed"
        await lifecycle.outbox.run_once()  # 503: the same body is sent again
        await asyncio.sleep(0.2)
        await lifecycle.outbox.run_once()

    asyncio.run(announce_twice_and_deliver())
    first, second = receiver.requests
    assert first["body"] == second["body"]  # same bytes on the retry, though the job changed
    assert verify(lifecycle.secret, second["headers"], second["body"])
    event = json.loads(second["body"])
    assert event["id"] == second["headers"]["Webhook-Id"] == first["headers"]["Webhook-Id"] == event_id
    assert event["type"] == "video.failed" and event["data"]["id"] == job.id
    assert event["data"]["status"] == "failed" and event["data"]["error"]["message"] == "it broke"
    assert [a.status_code for a in store.get(job.id, tenant=None).webhook.deliveries] == [503, 200]
    assert store.pending_webhooks() == []


def test_a_job_cancelled_and_deleted_at_once_still_gets_its_event(lifecycle, receiver):
    """The ingress announces a cancel before answering it, so a DELETE right after cannot beat
    the rendered event: it is sent though the job is gone (its attempts have no job to go on)."""
    store = lifecycle.store
    job = job_with_webhook(store, receiver.url)
    assert store.request_cancel(job.id, tenant="acme").status is JobStatus.CANCELLED
    asyncio.run(lifecycle.ended(job.id))  # what the ingress awaits after a cancel
    assert store.delete(job.id, tenant="acme")
    assert asyncio.run(lifecycle.outbox.run_once()) == 1
    [request] = receiver.requests
    event = json.loads(request["body"])
    assert event["type"] == "video.cancelled" and event["data"]["id"] == job.id
    assert request["headers"]["Webhook-Id"] == terminal_event_id(job.id, "video.cancelled")
    assert store.pending_webhooks() == []


def test_a_job_deleted_before_its_event_was_rendered_drops_it(open_store, receiver):
    """Only if the process that ended the job died before filling the body in and the job was
    deleted before any runner got to it: there is nothing left to describe, so nothing is sent."""
    store = open_store()
    job = job_with_webhook(store, receiver.url)
    assert store.request_cancel(job.id, tenant="acme")
    assert store.delete(job.id, tenant="acme")
    outbox = make_outbox(store, "runner-1", render=lambda d: None)  # what JobLifecycle.render says then
    assert asyncio.run(outbox.run_once()) == 1
    assert store.pending_webhooks() == [] and receiver.requests == []


# -- the real service: the runner replica killed (ray.kill) during a backoff -------------------------

KILL_RUNNERS = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#JobRunner#" in a["name"]]
for actor in victims:
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
print(len(victims))
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_runner_replica_loses_no_pending_webhook(local_service, receiver):
    """``svd-serve up`` (SQLite store): the first delivery gets a 429 asking for 20 s; the JobRunner
    replica is killed during that wait; the replica Serve starts in its place sends the retry,
    with the same Webhook-Id."""
    import base64

    import httpx

    from loadtest.replicas import gcs_address_for_port
    from pipelines.sample_image import SAMPLE_IMAGE_PATH

    receiver.script = [(429, {"Retry-After": "20"}, 0.0)]
    image = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
    response = httpx.post(f"{local_service.url}/v1/videos", timeout=30,
                          headers={"Authorization": f"Bearer {local_service.keys['bob']}"},
                          json={"image_url": image, "num_frames": 6, "num_inference_steps": 2, "width": 64,
                                "height": 64, "webhook_url": receiver.url})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    event_id = terminal_event_id(job_id, EVENT_COMPLETED)
    store = SqliteJobStore(local_service.data_dir / "jobs.sqlite3")
    try:
        waiting = wait_for(lambda: [d for d in store.pending_webhooks(job_id=job_id) if d.attempts == 1], 120,
                           "the first attempt (429)")
        assert waiting[0].lease_owner is None and waiting[0].due_at > time.time() + 5  # in its backoff
        gcs = gcs_address_for_port(int(local_service.url.rsplit(":", 1)[1]))
        assert gcs, "the service's Ray cluster was not found"
        env = dict(os.environ)
        if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").exists():
            env["RAY_AUTH_MODE"] = "token"  # a local cluster uses token auth (see loadtest/replicas.py)
        killed = subprocess.run([sys.executable, "-c", KILL_RUNNERS, gcs], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert killed.returncode == 0 and int(killed.stdout.split()[-1]) >= 1, killed.stderr[-2000:]
        assert time.time() < waiting[0].due_at  # killed before the retry was due

        wait_for(lambda: len(receiver.requests) >= 2 and not store.pending_webhooks(job_id=job_id), 120,
                 "the retry from the new runner replica")
        assert ids_of(receiver) == [event_id, event_id]
        assert receiver.requests[1]["at"] - receiver.requests[0]["at"] >= 19
        assert verify(local_service.webhook_secrets["bob"], receiver.requests[1]["headers"],
                      receiver.requests[1]["body"])
        attempts = store.get(job_id, tenant=None).webhook.deliveries
        assert [(a.attempt, a.status_code) for a in attempts] == [(1, 429), (2, 200)]
    finally:
        store.close()
