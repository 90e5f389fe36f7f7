"""Per-tenant admission limits through the HTTP API (no Ray), over SQLite and Redis job stores.

Rate limits, the queued-jobs cap, caps on frames/resolution/steps and allowed models are checked
at admission; their state lives in the job store, so two ingress "replicas" (two apps on one
store) share one bucket. The store's clock is injected, so refill timing is exact and no test
sleeps.
"""

from __future__ import annotations

import base64
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from fixtures_redis import redis_server, unique_prefix  # noqa: F401  (fixture)

from pipelines.sample_image import SAMPLE_IMAGE_PATH
from serve.api.app import create_api
from serve.api.service import VideoService
from serve.config import AppConfig
from serve.jobstore import RedisJobStore, SqliteJobStore
from serve.scheduler import pick_next
from serve.storage import make_storage
from serve.tenants import TenantRegistry, create_tenant, update_policy

PNG = Path(SAMPLE_IMAGE_PATH).read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
SMALL = {"num_frames": 4, "num_inference_steps": 2, "width": 64, "height": 64}


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", "redis"])
def env(request, tmp_path):
    """``env.client()`` opens one more ingress (its own store client, registry and app) on the same
    job store and tenants file; ``env.add(name, **policy)`` creates a tenant."""
    backend = request.param
    location = str(tmp_path / "jobs.sqlite3") if backend == "sqlite" else request.getfixturevalue("redis_server")
    prefix = unique_prefix("admission")
    clock = FakeClock()
    config = AppConfig.model_validate({
        "storage": {"local_dir": str(tmp_path / "outputs")},
        "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")},
        "max_upload_bytes": 256 * 1024,
    })
    tenants_file = tmp_path / "tenants.yaml"
    stores = []

    async def model_info(model_id=None):
        return {"num_frames": 14}

    def client() -> TestClient:
        if backend == "sqlite":
            store = SqliteJobStore(location, clock=clock)
        else:
            store = RedisJobStore(location, key_prefix=prefix, clock=clock)
        stores.append(store)
        service = VideoService(config, store=store, storage=make_storage(config.storage), model_info=model_info)
        test_client = TestClient(create_api(service, TenantRegistry(tenants_file, check_interval_s=0)))
        test_client.service = service
        return test_client

    keys: dict[str, str] = {}

    def add(name: str, **policy) -> str:
        keys[name] = create_tenant(tenants_file, name, policy=policy).api_key
        return keys[name]

    yield SimpleNamespace(backend=backend, clock=clock, config=config, tenants_file=tenants_file, client=client,
                          add=add, keys=keys)
    for store in stores:
        store.close()


def submit(client, key, idempotency_key=None, **body):
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return client.post("/v1/videos", headers=headers, json={"image_url": DATA_URL, **SMALL, **body})


def assert_error(response, status, code, contains=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert contains in body["error"]["message"], body["error"]["message"]
    return body["error"]["message"]


# ---------------------------------------------------------------------------------------------- rate limit


def test_rate_limit_answers_429_with_retry_after_and_refills(env):
    key = env.add("alice", rate_limit_per_minute=6, burst=3)  # one token per 10 s
    api = env.client()
    assert [submit(api, key).status_code for _ in range(3)] == [202, 202, 202]  # the burst
    over = submit(api, key)
    message = assert_error(over, 429, "rate_limited", "6 requests per minute")
    assert "rate_limit_per_minute" in message and "bursts of up to 3" in message
    assert over.headers["retry-after"] == "10"
    env.clock.advance(9.2)
    still = submit(api, key)
    assert_error(still, 429, "rate_limited")
    assert still.headers["retry-after"] == "1"  # 0.8 s, rounded up
    env.clock.advance(0.8)
    assert submit(api, key).status_code == 202  # refilled
    assert_error(submit(api, key), 429, "rate_limited")
    # Exactly the admitted requests made jobs.
    assert len(api.get("/v1/videos?limit=50", headers={"Authorization": f"Bearer {key}"}).json()["data"]) == 4


def test_rate_limits_are_per_tenant_and_optional(env):
    alice = env.add("alice", rate_limit_per_minute=6, burst=1)
    bob = env.add("bob", rate_limit_per_minute=None)
    api = env.client()
    assert submit(api, alice).status_code == 202
    assert_error(submit(api, alice), 429, "rate_limited")
    assert all(submit(api, bob).status_code == 202 for _ in range(25))  # no limit at all (default burst is 20)


def test_two_ingress_replicas_share_one_bucket(env):
    key = env.add("alice", rate_limit_per_minute=6, burst=3)
    first, second = env.client(), env.client()
    assert submit(first, key).status_code == 202
    assert submit(second, key).status_code == 202
    assert submit(first, key).status_code == 202
    assert_error(submit(second, key), 429, "rate_limited")  # the other replica saw the same three
    assert_error(submit(first, key), 429, "rate_limited")
    env.clock.advance(10)
    assert submit(second, key).status_code == 202


def test_idempotent_replays_spend_no_tokens(env):
    key = env.add("alice", rate_limit_per_minute=6, burst=2)
    api = env.client()
    first = submit(api, key, idempotency_key="req-1")
    assert first.status_code == 202
    for _ in range(5):
        again = submit(api, key, idempotency_key="req-1")
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
    assert submit(api, key).status_code == 202  # the second token is still there
    assert_error(submit(api, key), 429, "rate_limited")
    # With the bucket empty, a retry of a submit that got through still gets its job back.
    assert submit(api, key, idempotency_key="req-1").json()["id"] == first.json()["id"]
    # A different request under the same key is still a conflict, not a rate-limit answer.
    assert_error(submit(api, key, idempotency_key="req-1", seed=5), 409, "idempotency_key_reused")


# ---------------------------------------------------------------------------------------------- queue and running caps


def test_full_queue_is_429_queue_full(env):
    key = env.add("alice", max_queued_jobs=2, rate_limit_per_minute=None)
    other = env.add("bob", max_queued_jobs=2)
    api = env.client()
    ids = [submit(api, key).json()["id"] for _ in range(2)]
    full = submit(api, key)
    message = assert_error(full, 429, "queue_full", "may have at most 2 (max_queued_jobs)")
    assert "2 queued jobs" in message
    assert int(full.headers["retry-after"]) > 0
    assert submit(api, other).status_code == 202  # another tenant's quota
    # Once a job starts, the queue has room again.
    assert api.service.store.claim(ids[0], owner="runner", lease_s=60) is not None
    assert submit(api, key).status_code == 202
    assert_error(submit(api, key), 429, "queue_full")


def test_running_cap_queues_instead_of_rejecting(env):
    key = env.add("alice", max_running_jobs=1, retention_s=600)
    env.add("bob")
    api = env.client()
    store = api.service.store
    jobs = [submit(api, key).json() for _ in range(2)]
    assert all(job["status"] == "queued" for job in jobs)
    record = store.get(jobs[0]["id"], tenant=None)
    assert record.policy.max_running_jobs == 1 and record.policy.retention_s == 600
    # The tenant's retention replaces the service's: expires_at is created_at + 600 s.
    assert record.expires_at == record.created_at + timedelta(seconds=600)
    assert store.claim(jobs[0]["id"], owner="runner", lease_s=60) is not None
    # The dispatcher skips a tenant at its cap...
    assert pick_next(store.queued_heads(), store.running_count) is None
    bob_job = submit(api, env.keys["bob"]).json()
    # ...and gives the slot to another tenant.
    assert pick_next(store.queued_heads(), store.running_count).id == bob_job["id"]


# ---------------------------------------------------------------------------------------------- caps and models


def test_caps_on_frames_resolution_and_steps_are_422(env):
    key = env.add("alice", max_num_frames=8, max_inference_steps=50, max_long_side=512, max_pixels=512 * 256,
                  rate_limit_per_minute=6, burst=1)
    api = env.client()
    assert_error(submit(api, key, num_inference_steps=80), 422, "limit_exceeded",
                 "num_inference_steps 80 exceeds this tenant's limit of 50")
    assert_error(submit(api, key, num_frames=14), 422, "limit_exceeded",
                 "num_frames 14 exceeds this tenant's limit of 8")
    assert_error(submit(api, key, num_frames=None), 422, "limit_exceeded",  # the model's default (14) counts too
                 "num_frames 14 exceeds this tenant's limit of 8")
    assert_error(submit(api, key, width=576, height=64), 422, "limit_exceeded",
                 "576x64: the long side 576 exceeds this tenant's limit of 512 pixels")
    assert_error(submit(api, key, width=512, height=512), 422, "limit_exceeded",
                 "512x512 = 262144 pixels per frame exceeds this tenant's limit of 131072")
    # A preset is resolved before the check (16:9 is 1024x576); every exceeded limit is named.
    resolved = {k: v for k, v in SMALL.items() if k not in ("width", "height")}
    message = assert_error(api.post("/v1/videos", headers={"Authorization": f"Bearer {key}"},
                                    json={"image_url": DATA_URL, **resolved, "aspect_ratio": "16:9"}),
                           422, "limit_exceeded")
    assert "long side 1024" in message and "pixels per frame" in message
    # Refused requests stored nothing and spent no rate-limit token.
    assert api.get("/v1/videos", headers={"Authorization": f"Bearer {key}"}).json()["data"] == []
    assert submit(api, key, num_frames=8, num_inference_steps=50, width=512, height=256).status_code == 202


def test_models_not_allowed_get_403(env):
    deployed = env.config.model.source
    denied = env.add("alice", allowed_models=["someone/other-model"])
    by_glob = env.add("bob", allowed_models=[deployed.split("/")[0] + "/*"])
    exact = env.add("carol", allowed_models=[deployed])
    anyone = env.add("dave")
    api = env.client()
    assert_error(submit(api, denied), 403, "model_not_allowed", "someone/other-model")
    for key in (by_glob, exact, anyone):
        assert submit(api, key).status_code == 202


def test_policy_changes_apply_without_restart(env):
    key = env.add("alice")
    api = env.client()
    assert submit(api, key, num_inference_steps=30).status_code == 202
    update_policy(env.tenants_file, "alice", {"max_inference_steps": 25, "rate_limit_per_minute": 6, "burst": 1})
    assert_error(submit(api, key, num_inference_steps=30), 422, "limit_exceeded", "limit of 25")
    assert submit(api, key, num_inference_steps=25).status_code == 202
    assert_error(submit(api, key), 429, "rate_limited", "6 requests per minute")
    update_policy(env.tenants_file, "alice", {}, reset=["max_inference_steps", "rate_limit_per_minute", "burst"])
    # Back to the defaults (150/min, burst 20). The bucket keeps its level (empty) and refills at the
    # new rate, one token per 0.4 s: raising a limit is not a free burst.
    assert_error(submit(api, key, num_inference_steps=30), 429, "rate_limited", "150 requests per minute")
    env.clock.advance(0.4)
    assert submit(api, key, num_inference_steps=30).status_code == 202


def openai_submit(client, key, **fields):
    """A submit shaped as OpenAI's SDK sends it: multipart, the image as input_reference."""
    data = {"prompt": "waves", "num_inference_steps": "2", **{k: str(v) for k, v in fields.items()}}
    return client.post("/v1/videos", headers={"Authorization": f"Bearer {key}"}, data=data,
                       files={"input_reference": ("ref.png", PNG, "image/png")})


def test_limits_hold_for_openai_requests(env):
    """OpenAI's fields map before the tenant's caps apply: a mapped size is checked like width and
    height, seconds are capped at the tenant's max_num_frames, and the 429s are the same."""
    key = env.add("alice", max_long_side=768, max_num_frames=16, rate_limit_per_minute=2, burst=2,
                  max_queued_jobs=5)
    other = env.add("bob", allowed_models=["someone/other-model"])
    api = env.client()
    assert_error(openai_submit(api, key, size="1280x720"), 422, "limit_exceeded",
                 "1024x576: the long side 1024 exceeds this tenant's limit of 768 pixels")
    capped = openai_submit(api, key, size="512x256", seconds="8")  # 56 frames asked, 16 allowed
    assert capped.status_code == 202, capped.text
    assert capped.json()["params"]["num_frames"] == 16 and capped.json()["seconds"] == "2.29"
    assert openai_submit(api, key, size="256x128", seconds="1").status_code == 202
    assert_error(openai_submit(api, key, size="256x128", seconds="1"), 429, "rate_limited", "2 requests per minute")
    assert_error(openai_submit(api, other, size="256x128"), 403, "model_not_allowed")
