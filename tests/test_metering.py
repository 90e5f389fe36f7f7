"""Usage metering: the charging rules, the ledger over both backends (SQLite in tmp_path and a real
redis-server from ``tests/fixtures_redis.py``, each test on its own key prefix), and ``GET /v1/usage``
over a real tenants file."""

from __future__ import annotations

import json
import math
import random
import sqlite3
import threading
from datetime import datetime, timedelta, timezone

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fixtures_redis import redis_server, start_redis_server, unique_prefix  # noqa: F401  (fixture)

from serve.api.errors import install_error_handlers
from serve.config import JobStoreConfig, StagesConfig
from serve.jobstore import Job, JobError, JobOutput, JobStatus, JobStoreError, make_job_store
import serve.metering.redis as redis_ledger_module
import serve.metering.sqlite as sqlite_ledger_module
from serve.metering import (
    DEFAULT_USAGE_RETENTION_S,
    UNKNOWN_MODEL,
    metered_stages,
    RedisUsageLedger,
    SqliteUsageLedger,
    UsageLedger,
    UsageRecord,
    UsageSummary,
    gpu_share_from_config,
    make_usage_ledger,
    usage_record_for,
)
from serve.metering.api import MAX_MODEL_CHARS, resolve_window, usage_router
from serve.metering.models import _ExactSum
from serve.tenants import TenantRegistry, add_tenant

BACKENDS = ["sqlite", "redis"]
T0 = datetime(2030, 3, 10, 12, 0, tzinfo=timezone.utc)

STAGES = StagesConfig.model_validate({
    "text_to_image": {"ray_actor_options": {"num_gpus": 1.0}},
    "image_encoder": {"ray_actor_options": {"num_gpus": 0.25}},
    "sampler": {"ray_actor_options": {"num_gpus": 1.0}},
    "decoder": {"ray_actor_options": {"num_gpus": 0.5}},
    "video_encoder": {"ray_actor_options": {"num_gpus": 0.0}},
})
SHARE = gpu_share_from_config(STAGES)
TIMINGS = {"image_encode": 0.3, "sampling": 12.7, "decode": 2.9, "video_encode": 0.4, "store": 0.2, "total": 16.9}


def make_job(tenant: str = "alice", status: JobStatus = JobStatus.COMPLETED, *, timings: dict | None = None,
             code: str | None = None, finished_at: datetime = T0, model: str = "svd-xt", **params) -> Job:
    params = {"num_frames": 14, "fps": 7, "output_fps": None, **params}
    # The clip the final stage reports: its frames at the playback rate (output_fps, else fps).
    fps = params["output_fps"] or params["fps"]
    output = JobOutput(key="k", content_type="video/mp4", file_name="v.mp4", file_size=1,
                       num_frames=params["num_frames"], fps=fps, duration_s=params["num_frames"] / fps)
    return Job(
        tenant=tenant, status=status, finished_at=finished_at, model=model,
        timings=dict(TIMINGS if timings is None else timings), params=params,
        output=output if status is JobStatus.COMPLETED else None,
        error=JobError(code=code, message="x") if code is not None else None,
    )


def record_of(*args, **kwargs) -> UsageRecord:
    return usage_record_for(make_job(*args, **kwargs), SHARE)


# ---------------------------------------------------------------------------------------- rules


def test_gpu_share_comes_from_each_stage_num_gpus():
    assert SHARE == {"text_to_image": 1.0, "image_encoder": 0.25, "sampler": 1.0, "decoder": 0.5, "video_encoder": 0.0}
    assert gpu_share_from_config(StagesConfig()) == dict.fromkeys(SHARE, 0.0)


def test_completed_job_record():
    rec = record_of()
    assert rec.outcome.value == "completed" and rec.charged and rec.error_code is None
    assert rec.finished_at == T0 and rec.tenant == "alice" and rec.model == "svd-xt"
    assert rec.busy_seconds == {"text_to_image": 0.0, "image_encode": 0.3, "sampling": 12.7, "decode": 2.9, "video_encode": 0.4}
    assert rec.gpu_seconds == {"text_to_image": 0.0, "image_encode": 0.3 * 0.25, "sampling": 12.7, "decode": 2.9 * 0.5, "video_encode": 0.0}
    assert rec.video_seconds == 2.0  # 14 frames at fps 7
    assert record_of(num_frames=25, output_fps=10).video_seconds == 2.5  # output_fps is the playback rate
    # The share may be keyed by stage name too; a stage missing from it uses no GPU.
    rec = usage_record_for(make_job(), {"sampling": 0.5})
    assert rec.gpu_seconds == {"text_to_image": 0.0, "image_encode": 0.0, "sampling": 12.7 * 0.5, "decode": 0.0, "video_encode": 0.0}


def test_text_to_video_is_charged_its_text_to_image_gpu_seconds_and_the_final_clip():
    timings = {"text_to_image": 3.5, **TIMINGS}
    # An 8 s long clip retimed to 24 fps: the final stage reports its 193 frames at 24 fps.
    job = make_job(timings=timings, num_frames=25, output_fps=24, duration_s=8)
    job.output = job.output.model_copy(update={"num_frames": 193, "fps": 24, "duration_s": 193 / 24})
    rec = usage_record_for(job, SHARE)
    assert rec.gpu_seconds["text_to_image"] == 3.5 and rec.busy_seconds["text_to_image"] == 3.5
    assert rec.video_seconds == 193 / 24  # the seconds of the clip delivered, not of one pass


@pytest.mark.parametrize("status, code, charged", [
    (JobStatus.CANCELLED, None, True),
    (JobStatus.FAILED, "invalid_input", True),
    (JobStatus.FAILED, "invalid_image", True),
    (JobStatus.FAILED, "image_too_large", True),
    (JobStatus.FAILED, "internal_error", False),
    (JobStatus.FAILED, "worker_lost", False),
    (JobStatus.FAILED, "abandoned", False),
    (JobStatus.FAILED, "some_new_code", False),
    (JobStatus.FAILED, None, False),
])
def test_charging_rules(status, code, charged):
    partial = {"image_encode": 0.3, "sampling": 5.0}  # stopped during decode: no decode timing
    rec = record_of(status=status, code=code, timings=partial)
    assert rec.outcome.value == status.value and rec.charged is charged
    assert rec.error_code == code
    assert rec.video_seconds == 0.0  # no clip delivered
    # What was used is recorded either way (so operators see the cost of uncharged failures).
    assert rec.gpu_seconds == {"text_to_image": 0.0, "image_encode": 0.3 * 0.25, "sampling": 5.0, "decode": 0.0, "video_encode": 0.0}


def test_unfinished_jobs_are_not_metered():
    for status in (JobStatus.QUEUED, JobStatus.IN_PROGRESS):
        with pytest.raises(ValueError, match="only finished jobs"):
            usage_record_for(make_job(status=status), SHARE)


# ---------------------------------------------------------------------------------------- ledger


class FakeClock:
    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=BACKENDS)
def make_ledger(request, tmp_path):
    """``make_ledger(**kwargs)`` opens a ledger on one backing store shared within the test."""
    backend = request.param
    location = str(tmp_path / "jobs.sqlite3") if backend == "sqlite" else request.getfixturevalue("redis_server")
    prefix = unique_prefix("usage")
    opened: list[UsageLedger] = []

    def factory(**kwargs) -> UsageLedger:
        if backend == "sqlite":
            ledger = SqliteUsageLedger(location, **kwargs)
        else:
            ledger = RedisUsageLedger(location, key_prefix=prefix, **kwargs)
        opened.append(ledger)
        return ledger

    factory.backend, factory.location, factory.prefix = backend, location, prefix
    yield factory
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(make_ledger):
    return make_ledger()


def summary(ledger, tenant="alice", start=T0 - timedelta(days=1), end=T0 + timedelta(days=1)):
    return ledger.summary(tenant, start=start, end=end)


def test_record_is_idempotent_per_job(ledger):
    rec = record_of()
    assert ledger.record(rec) is True
    assert ledger.record(rec) is False
    # A different record of the same job (a retried runner step) changes nothing: the first wins.
    assert ledger.record(rec.model_copy(update={"video_seconds": 99.0, "charged": False})) is False
    assert ledger.get(rec.job_id) == rec
    assert ledger.get("vid_missing") is None
    s = summary(ledger)
    assert (s.completed, s.charged, s.video_seconds) == (1, 1, 2.0)
    assert ledger.records("alice", start=T0, end=T0 + timedelta(seconds=1)) == [rec]


def test_concurrent_records_of_one_job_store_it_once(make_ledger):
    rec = record_of()
    ledgers = [make_ledger() for _ in range(4)]  # separate connections, as separate replicas have
    results: list[bool] = []
    barrier = threading.Barrier(len(ledgers))

    def worker(ledger):
        barrier.wait()
        results.append(ledger.record(rec))

    threads = [threading.Thread(target=worker, args=(ledger,)) for ledger in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert summary(ledgers[0]).completed == 1


def test_summary_totals_are_the_exact_sums_of_the_charged_records(ledger):
    timings = [
        {"image_encode": 0.31, "sampling": 12.71, "decode": 2.93, "video_encode": 0.47},
        {"image_encode": 0.29, "sampling": 25.3, "decode": 4.1, "video_encode": 0.61},
        {"image_encode": 0.1, "sampling": 7.77, "decode": 1.01, "video_encode": 0.2},
        {"image_encode": 0.33, "sampling": 19.05, "decode": 3.3},
    ]
    completed = [record_of(timings=t, finished_at=T0 + timedelta(minutes=i), num_frames=14 + 2 * i, output_fps=6 + i)
                 for i, t in enumerate(timings)]
    uncharged = [record_of(status=JobStatus.FAILED, code=code, timings=timings[0], finished_at=T0)
                 for code in ("internal_error", "worker_lost", "abandoned")]
    for rec in completed + uncharged:
        assert ledger.record(rec)

    s = summary(ledger)
    assert (s.completed, s.failed, s.cancelled, s.charged, s.uncharged_failures) == (4, 3, 0, 4, 3)
    assert s.video_seconds == math.fsum((14 + 2 * i) / (6 + i) for i in range(4))
    config_key = {"text_to_image": "text_to_image", "image_encode": "image_encoder", "sampling": "sampler",
                  "decode": "decoder", "video_encode": "video_encoder"}
    for stage in metered_stages():
        # Independently of the records: busy time x share, over the completed jobs only.
        expected = math.fsum(t.get(stage, 0.0) * SHARE[config_key[stage]] for t in timings)
        assert s.gpu_seconds[stage] == expected, stage
        assert s.busy_seconds[stage] == math.fsum(t.get(stage, 0.0) for t in timings), stage
    assert s.gpu_seconds_total == math.fsum(v for rec in completed for v in rec.gpu_seconds.values())
    assert s.gpu_seconds["video_encode"] == 0.0  # a CPU stage costs no GPU time


def test_cancelled_and_client_error_failures_are_charged_for_what_they_used(ledger):
    used = {"image_encode": 0.5, "sampling": 4.0}
    ledger.record(record_of(status=JobStatus.CANCELLED, timings=used))
    ledger.record(record_of(status=JobStatus.CANCELLED, timings={}))  # cancelled while queued
    ledger.record(record_of(status=JobStatus.FAILED, code="invalid_image", timings={"image_encode": 0.5}))
    ledger.record(record_of(status=JobStatus.FAILED, code="internal_error", timings=used))
    s = summary(ledger)
    assert (s.completed, s.failed, s.cancelled, s.charged, s.uncharged_failures) == (0, 2, 2, 3, 1)
    assert s.video_seconds == 0.0
    assert s.gpu_seconds == {"text_to_image": 0.0, "image_encode": 0.25, "sampling": 4.0, "decode": 0.0, "video_encode": 0.0}
    assert s.gpu_seconds_total == 4.25


def test_time_window_is_half_open_on_finished_at(ledger):
    at = {name: T0 + offset for name, offset in [
        ("before", -timedelta(microseconds=1)), ("start", timedelta(0)), ("mid", timedelta(days=3)),
        ("last", timedelta(days=7) - timedelta(microseconds=1)), ("end", timedelta(days=7))]}
    recs = {name: record_of(finished_at=when) for name, when in at.items()}
    for rec in recs.values():
        ledger.record(rec)
    end = T0 + timedelta(days=7)
    assert ledger.summary("alice", start=T0, end=end).completed == 3
    assert [r.job_id for r in ledger.records("alice", start=T0, end=end)] == [
        recs[n].job_id for n in ("start", "mid", "last")]
    assert [r.job_id for r in ledger.records("alice", start=T0, end=end, limit=2)] == [
        recs[n].job_id for n in ("start", "mid")]
    assert ledger.summary("alice", start=T0, end=T0).completed == 0
    # Naive datetimes are UTC; other offsets are converted.
    assert ledger.summary("alice", start=T0.replace(tzinfo=None), end=end.astimezone(
        timezone(timedelta(hours=-5)))).completed == 3
    with pytest.raises(ValueError):
        ledger.summary("alice", start=end, end=T0)


def test_tenants_are_isolated(ledger):
    ledger.record(record_of("alice"))
    for _ in range(3):
        ledger.record(record_of("bob", timings={"sampling": 100.0}, num_frames=70))
    ledger.record(record_of("bob", status=JobStatus.FAILED, code="internal_error"))
    alice, bob = summary(ledger, "alice"), summary(ledger, "bob")
    assert (alice.completed, alice.failed, alice.video_seconds, alice.gpu_seconds["sampling"]) == (1, 0, 2.0, 12.7)
    assert (bob.completed, bob.uncharged_failures, bob.video_seconds) == (3, 1, 30.0)
    assert bob.gpu_seconds["sampling"] == 300.0
    assert all(r.tenant == "alice" for r in ledger.records("alice", start=T0, end=T0 + timedelta(days=1)))
    assert summary(ledger, "carol").jobs == 0


# ---------------------------------------------------------------------------------------- by model

FINETUNE = "acme/my-finetune"


def test_record_carries_the_job_model():
    assert record_of(model=FINETUNE).model == FINETUNE
    # A job that named no model (Job.model defaults to "") is recorded without one: "unknown".
    rec = record_of(model="")
    assert rec.model is None and rec.model_key == UNKNOWN_MODEL == "unknown"
    assert UsageRecord.model_validate({**rec.model_dump(), "model": ""}).model is None


def test_old_record_json_without_model_loads():
    legacy = json.loads(record_of().model_dump_json())
    del legacy["model"]
    rec = UsageRecord.model_validate_json(json.dumps(legacy))
    assert rec.model is None and rec.model_key == UNKNOWN_MODEL
    summary_ = UsageSummary.of("alice", T0, T0, [rec])
    assert list(summary_.by_model) == [UNKNOWN_MODEL] and summary_.by_model[UNKNOWN_MODEL].completed == 1


def write_legacy(make_ledger, ledger, rec: UsageRecord) -> None:
    """Store ``rec`` as a ledger written before records carried a model would have."""
    assert ledger.record(rec)
    if make_ledger.backend == "sqlite":
        legacy = json.loads(rec.model_dump_json())
        del legacy["model"]
        with sqlite3.connect(make_ledger.location) as conn:
            conn.execute("UPDATE usage_records SET data = ? WHERE job_id = ?", (json.dumps(legacy), rec.job_id))
        conn.close()
    else:
        import redis

        client = redis.Redis.from_url(make_ledger.location, decode_responses=True)
        assert client.hdel(f"{make_ledger.prefix}:usage:rec:{rec.job_id}", "model") == (rec.model is not None)
        client.close()


def test_ledgers_store_the_model_and_read_old_records_without_it(make_ledger):
    ledger = make_ledger()
    new, old = record_of(model=FINETUNE), record_of(finished_at=T0 + timedelta(seconds=1))
    ledger.record(new)
    write_legacy(make_ledger, ledger, old)
    assert ledger.get(new.job_id) == new and ledger.get(new.job_id).model == FINETUNE
    assert ledger.get(old.job_id).model is None
    assert ledger.get(old.job_id) == old.model_copy(update={"model": None})
    s = summary(ledger)
    assert list(s.by_model) == [FINETUNE, UNKNOWN_MODEL]
    assert s.by_model[UNKNOWN_MODEL].completed == s.by_model[FINETUNE].completed == 1
    # The stable key selects the records with no model.
    assert [r.job_id for r in ledger.records("alice", start=T0, end=T0 + timedelta(days=1),
                                             model=UNKNOWN_MODEL)] == [old.job_id]
    assert ledger.summary("alice", start=T0, end=T0 + timedelta(days=1), model=UNKNOWN_MODEL).completed == 1


def two_models(ledger) -> dict[str, list[UsageRecord]]:
    """Alice's month: svd-xt and a fine-tune, charged and not, and one record with no model; Bob
    uses the fine-tune's id too (the same id, another tenant's jobs)."""
    recs = {
        "svd-xt": [
            record_of(finished_at=T0, timings={"image_encode": 0.31, "sampling": 12.71, "decode": 2.93}),
            record_of(finished_at=T0 + timedelta(minutes=1), num_frames=25, output_fps=6,
                      timings={"image_encode": 0.29, "sampling": 25.3, "decode": 4.1}),
            record_of(status=JobStatus.CANCELLED, finished_at=T0 + timedelta(minutes=2), timings={"sampling": 3.3}),
        ],
        FINETUNE: [
            record_of(model=FINETUNE, finished_at=T0 + timedelta(minutes=3), num_frames=21,
                      timings={"image_encode": 0.1, "sampling": 7.77, "decode": 1.01, "video_encode": 0.2}),
            record_of(model=FINETUNE, status=JobStatus.FAILED, code="internal_error",
                      finished_at=T0 + timedelta(minutes=4)),
            record_of(model=FINETUNE, status=JobStatus.FAILED, code="invalid_image",
                      finished_at=T0 + timedelta(minutes=5), timings={"image_encode": 0.4}),
        ],
        UNKNOWN_MODEL: [record_of(model="", finished_at=T0 + timedelta(minutes=6), num_frames=7)],
    }
    for rec in (r for group in recs.values() for r in group):
        assert ledger.record(rec)
    for i in range(2):
        assert ledger.record(record_of("bob", model=FINETUNE, finished_at=T0 + timedelta(minutes=i),
                                       timings={"sampling": 100.0}))
    return recs


def test_by_model_splits_a_tenants_usage(ledger):
    recs = two_models(ledger)
    s = summary(ledger)
    assert list(s.by_model) == ["acme/my-finetune", "svd-xt", "unknown"]  # sorted, stable
    assert (s.completed, s.failed, s.cancelled, s.charged, s.uncharged_failures) == (4, 2, 1, 6, 1)
    xt, ft, unknown = s.by_model["svd-xt"], s.by_model[FINETUNE], s.by_model[UNKNOWN_MODEL]
    assert (xt.completed, xt.failed, xt.cancelled, xt.charged, xt.uncharged_failures) == (2, 0, 1, 3, 0)
    assert (ft.completed, ft.failed, ft.cancelled, ft.charged, ft.uncharged_failures) == (1, 2, 0, 2, 1)
    assert (unknown.completed, unknown.jobs, unknown.charged) == (1, 1, 1)
    for model, group in recs.items():
        usage, charged = s.by_model[model], [r for r in group if r.charged]
        # Each model's counters are exactly the sums over its own charged records.
        assert usage.video_seconds == math.fsum(r.video_seconds for r in charged), model
        assert usage.gpu_seconds_total == math.fsum(v for r in charged for v in r.gpu_seconds.values()), model
        for stage in metered_stages():
            assert usage.gpu_seconds[stage] == math.fsum(r.gpu_seconds[stage] for r in charged), (model, stage)
            assert usage.busy_seconds[stage] == math.fsum(r.busy_seconds[stage] for r in charged), (model, stage)
    assert xt.video_seconds == 2.0 + 25 / 6 and ft.video_seconds == 3.0 and unknown.video_seconds == 1.0
    assert ft.gpu_seconds["image_encode"] == math.fsum([0.1 * 0.25, 0.4 * 0.25])  # the client error is charged
    assert sum(u.jobs for u in s.by_model.values()) == s.jobs
    assert summary(ledger, "carol").by_model == {}


def test_model_filter_summarises_that_models_records_only(ledger):
    recs = two_models(ledger)
    whole = summary(ledger)
    window = {"start": T0 - timedelta(days=1), "end": T0 + timedelta(days=1)}
    for model in recs:
        only = ledger.summary("alice", model=model, **window)
        assert list(only.by_model) == [model]
        # The filtered totals are that model's share of the unfiltered summary, field for field.
        expected = whole.by_model[model].model_dump()
        assert only.by_model[model].model_dump() == expected
        assert {k: v for k, v in only.model_dump().items() if k in expected} == expected
        assert [r.job_id for r in ledger.records("alice", model=model, **window)] == [r.job_id for r in recs[model]]
        assert [r.job_id for r in ledger.records("alice", model=model, limit=1, **window)] == [recs[model][0].job_id]
    nothing = ledger.summary("alice", model="svd", **window)  # ids match exactly, never by prefix
    assert nothing.jobs == 0 and nothing.by_model == {} and nothing.gpu_seconds_total == 0.0
    assert ledger.records("alice", model="svd", **window) == []


def test_model_filter_never_crosses_tenants(ledger):
    two_models(ledger)
    window = {"start": T0 - timedelta(days=1), "end": T0 + timedelta(days=1)}
    # Bob asking for svd-xt (only Alice used it) sees nothing; asking for the shared id, his own jobs.
    bob = ledger.summary("bob", model="svd-xt", **window)
    assert bob.jobs == 0 and bob.by_model == {} and bob.video_seconds == 0.0
    assert ledger.records("bob", model="svd-xt", **window) == []
    bob = ledger.summary("bob", model=FINETUNE, **window)
    assert (bob.tenant, bob.completed, bob.gpu_seconds["sampling"]) == ("bob", 2, 200.0)
    assert all(r.tenant == "bob" for r in ledger.records("bob", model=FINETUNE, **window))
    assert ledger.summary("carol", model=FINETUNE, **window).jobs == 0


def test_model_filter_streams_across_pages(ledger, monkeypatch):
    monkeypatch.setattr(sqlite_ledger_module, "_PAGE", 2)
    monkeypatch.setattr(redis_ledger_module, "_BATCH", 2)
    models = ["svd-xt", FINETUNE, "svd-xt", "svd-xt", FINETUNE, "", "svd-xt"]
    recs = [record_of(model=m, finished_at=T0 + timedelta(seconds=i), num_frames=7 * (i + 1))
            for i, m in enumerate(models)]
    for rec in recs:
        ledger.record(rec)
    s = summary(ledger)
    assert {m: u.completed for m, u in s.by_model.items()} == {"svd-xt": 4, FINETUNE: 2, UNKNOWN_MODEL: 1}
    assert s.by_model["svd-xt"].video_seconds == 1.0 + 3.0 + 4.0 + 7.0
    window = {"start": T0, "end": T0 + timedelta(days=1)}
    assert [r.job_id for r in ledger.records("alice", model="svd-xt", limit=3, **window)] == [
        recs[i].job_id for i in (0, 2, 3)]
    assert ledger.summary("alice", model=FINETUNE, **window).video_seconds == 2.0 + 5.0


def test_exact_sum_is_fsum():
    rng = random.Random(7)
    for n in (0, 1, 2, 10, 1000):
        values = [rng.choice([rng.random(), rng.uniform(0, 1e6), rng.uniform(0, 1e-6), 0.1]) for _ in range(n)]
        acc = _ExactSum()
        for v in values:
            acc.add(v)
        assert acc.value == math.fsum(values)
    for special in ([math.inf, 1.0], [math.nan, 2.0]):
        acc = _ExactSum()
        for v in special:
            acc.add(v)
        assert repr(acc.value) == repr(math.fsum(special))
    acc = _ExactSum()
    with pytest.raises(OverflowError):  # like math.fsum([1e308, 1e308, ...])
        acc.add(1e308)
        acc.add(1e308)


def test_purge_keeps_records_for_the_retention_period(make_ledger):
    clock = FakeClock((T0 + timedelta(days=400)).timestamp())
    ledger = make_ledger(clock=clock)
    assert ledger.retention_s == DEFAULT_USAGE_RETENTION_S == 400 * 86400
    old, kept = record_of(finished_at=T0 - timedelta(seconds=1)), record_of("bob", finished_at=T0)
    ledger.record(old)
    ledger.record(kept)
    assert ledger.purge() == 1  # finished more than 400 days ago
    assert ledger.get(old.job_id) is None and ledger.get(kept.job_id) == kept
    assert summary(ledger, "alice", start=T0 - timedelta(days=1)).jobs == 0
    assert ledger.purge() == 0
    assert ledger.purge(before=T0 + timedelta(microseconds=1)) == 1
    assert summary(ledger, "bob").jobs == 0
    with pytest.raises(ValueError):
        make_ledger(retention_s=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_usage_ledger_sits_next_to_the_job_store(backend, tmp_path, request):
    if backend == "sqlite":
        config = JobStoreConfig(sqlite_path=str(tmp_path / "jobs.sqlite3"))
    else:
        config = JobStoreConfig(backend="redis", redis_url=request.getfixturevalue("redis_server"),
                                key_prefix=unique_prefix("svd"))
    store, ledger = make_job_store(config), make_usage_ledger(config)
    try:
        assert isinstance(ledger, SqliteUsageLedger if backend == "sqlite" else RedisUsageLedger)
        assert ledger.retention_s == DEFAULT_USAGE_RETENTION_S
        assert make_usage_ledger(config, retention_s=60).retention_s == 60
        job, _ = store.create(Job(tenant="alice"))
        assert ledger.record(record_of()) and ledger.ping()
        assert store.get(job.id, tenant="alice") is not None  # the job store is untouched
        if backend == "redis":
            import redis

            client = redis.Redis.from_url(config.redis_url, decode_responses=True)
            keys = set(client.scan_iter(f"{config.key_prefix}:usage:*"))
            client.close()
            assert keys and all(k.split(":")[2] in {"rec", "tenant", "finished"} for k in keys)
    finally:
        store.close()
        ledger.close()


def test_redis_password_comes_from_the_environment(tmp_path, monkeypatch):
    password = "s3cret-" + unique_prefix()
    with start_redis_server(tmp_path / "redis-auth", password=password) as url:
        monkeypatch.setenv("REDIS_PASSWORD", password)
        ledger = make_usage_ledger(JobStoreConfig(backend="redis", redis_url=url))
        assert ledger.record(record_of()) and ledger.ping()
        assert password not in repr(ledger)
        ledger.close()
        monkeypatch.delenv("REDIS_PASSWORD")
        ledger = make_usage_ledger(JobStoreConfig(backend="redis", redis_url=url))
        with pytest.raises(JobStoreError):
            ledger.record(record_of())
        ledger.close()


# ---------------------------------------------------------------------------------------- GET /v1/usage

NOW = datetime(2030, 3, 20, 8, 30, tzinfo=timezone.utc)


@pytest.fixture
def usage_api(make_ledger, tmp_path):
    ledger = make_ledger()
    path = tmp_path / "tenants.yaml"
    keys = {name: add_tenant(path, name) for name in ("alice", "bob")}
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(usage_router(ledger, TenantRegistry(path).authenticate, clock=lambda: NOW))
    client = TestClient(app)
    client.keys, client.ledger = keys, ledger
    return client


def auth(client, tenant="alice"):
    return {"Authorization": f"Bearer {client.keys[tenant]}"}


def assert_error(response, status, code, contains=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code and contains in body["error"]["message"]


def test_usage_requires_a_valid_key(usage_api):
    assert_error(usage_api.get("/v1/usage"), 401, "unauthorized", "missing Authorization header")
    assert_error(usage_api.get("/v1/usage", headers={"Authorization": "Bearer svd_wrong"}), 401, "unauthorized")
    # Authentication comes first: a bad window from an anonymous caller is still a 401.
    assert_error(usage_api.get("/v1/usage?from=nonsense"), 401, "unauthorized")


@pytest.mark.parametrize("query, message", [
    ("from=yesterday", "from: not an ISO 8601"),
    ("to=2030-13-01", "to: not an ISO 8601"),
    ("from=2030-03-03&to=2030-03-01", "from must not be after to"),
    ("from=2030-03-01T00:00:01Z&to=2030-03-01T00:00:00Z", "from must not be after to"),
    ("from=2029-03-01&to=2030-03-02", "longer than 366 days"),
    ("from=2029-01-01", "longer than 366 days"),
])
def test_usage_rejects_a_bad_window(usage_api, query, message):
    assert_error(usage_api.get(f"/v1/usage?{query}", headers=auth(usage_api)), 422, "invalid_parameter", message)


def test_usage_reports_the_callers_usage_only(usage_api):
    ledger = usage_api.ledger
    ledger.record(record_of("alice", finished_at=datetime(2030, 3, 1, tzinfo=timezone.utc)))
    ledger.record(record_of("alice", finished_at=datetime(2030, 3, 15, tzinfo=timezone.utc), num_frames=21))
    ledger.record(record_of("alice", status=JobStatus.FAILED, code="worker_lost",
                            finished_at=datetime(2030, 3, 16, tzinfo=timezone.utc)))
    ledger.record(record_of("alice", finished_at=datetime(2030, 2, 28, 23, 59, tzinfo=timezone.utc)))
    ledger.record(record_of("bob", finished_at=datetime(2030, 3, 15, tzinfo=timezone.utc), num_frames=70))

    response = usage_api.get("/v1/usage", headers=auth(usage_api))  # default: this month so far
    assert response.status_code == 200, response.text
    gpu = {"text_to_image": 0.0, "image_encode": 0.3 * 0.25, "sampling": 12.7, "decode": 2.9 * 0.5, "video_encode": 0.0}
    gpu2 = {stage: math.fsum([v, v]) for stage, v in gpu.items()}
    assert response.json() == {
        "object": "usage",
        "tenant": "alice",
        "from": "2030-03-01T00:00:00Z",
        "to": "2030-03-20T08:30:00Z",
        "jobs": {"completed": 2, "failed": 1, "cancelled": 0, "charged": 2, "uncharged_failures": 1},
        "video_seconds": 5.0,  # 14/7 + 21/7; the failure is not charged
        "gpu_seconds": {"total": math.fsum(list(gpu.values()) * 2), "by_stage": gpu2},
        "by_model": {"svd-xt": {
            "jobs": {"completed": 2, "failed": 1, "cancelled": 0, "charged": 2, "uncharged_failures": 1},
            "video_seconds": 5.0,
            "gpu_seconds": {"total": math.fsum(list(gpu.values()) * 2), "by_stage": gpu2},
        }},
    }

    # A date as `to` includes that whole day; `from` may be a date-time with an offset.
    body = usage_api.get("/v1/usage?from=2030-02-28T23:00:00-01:00&to=2030-03-01", headers=auth(usage_api)).json()
    assert (body["from"], body["to"]) == ("2030-03-01T00:00:00Z", "2030-03-02T00:00:00Z")
    assert body["jobs"]["completed"] == 1 and body["video_seconds"] == 2.0

    bob = usage_api.get("/v1/usage?from=2030-01-01", headers=auth(usage_api, "bob")).json()
    assert bob["tenant"] == "bob" and bob["jobs"]["completed"] == 1 and bob["video_seconds"] == 10.0


def test_usage_by_model_and_model_filter(usage_api):
    ledger = usage_api.ledger
    march = datetime(2030, 3, 15, tzinfo=timezone.utc)
    ledger.record(record_of("alice", finished_at=march))
    ledger.record(record_of("alice", finished_at=march, model=FINETUNE, num_frames=21))
    ledger.record(record_of("alice", finished_at=march, model=FINETUNE, status=JobStatus.FAILED, code="worker_lost"))
    ledger.record(record_of("bob", finished_at=march, model="bob/private", num_frames=70))

    body = usage_api.get("/v1/usage", headers=auth(usage_api)).json()
    assert list(body["by_model"]) == [FINETUNE, "svd-xt"]
    assert body["by_model"][FINETUNE]["jobs"] == {"completed": 1, "failed": 1, "cancelled": 0, "charged": 1,
                                                  "uncharged_failures": 1}
    assert body["by_model"][FINETUNE]["video_seconds"] == 3.0 and body["by_model"]["svd-xt"]["video_seconds"] == 2.0
    assert body["jobs"]["completed"] == 2 and body["video_seconds"] == 5.0
    assert set(body["by_model"]["svd-xt"]["gpu_seconds"]["by_stage"]) == set(metered_stages())

    # The filter (URL-encoded or not): the totals and by_model are that model's only.
    for query in ("model=acme/my-finetune", "model=acme%2Fmy-finetune"):
        only = usage_api.get(f"/v1/usage?{query}", headers=auth(usage_api)).json()
        assert list(only["by_model"]) == [FINETUNE] and only["by_model"][FINETUNE] == body["by_model"][FINETUNE]
        assert (only["jobs"], only["video_seconds"], only["gpu_seconds"]) == (
            body["by_model"][FINETUNE]["jobs"], 3.0, body["by_model"][FINETUNE]["gpu_seconds"])

    # A tenant only ever sees its own usage: Bob asking for Alice's model, Alice for Bob's, see nothing.
    for tenant, model in (("bob", FINETUNE), ("bob", "svd-xt"), ("alice", "bob/private")):
        response = usage_api.get("/v1/usage", params={"model": model}, headers=auth(usage_api, tenant))
        assert response.status_code == 200, response.text
        other = response.json()
        assert other["tenant"] == tenant and other["by_model"] == {}
        assert sum(other["jobs"].values()) == 0 and other["video_seconds"] == 0.0
        assert other["gpu_seconds"]["total"] == 0.0
    bob = usage_api.get("/v1/usage", params={"model": "bob/private"}, headers=auth(usage_api, "bob")).json()
    assert list(bob["by_model"]) == ["bob/private"] and bob["video_seconds"] == 10.0


@pytest.mark.parametrize("model, message", [
    ("", "must not be empty"),
    ("   ", "must not be empty"),
    ("x" * (MAX_MODEL_CHARS + 1), f"at most {MAX_MODEL_CHARS} characters"),
    ("svd\nxt", "control characters"),
    ("svd\x00xt", "control characters"),
])
def test_usage_rejects_a_bad_model_filter(usage_api, model, message):
    response = usage_api.get("/v1/usage", params={"model": model}, headers=auth(usage_api))
    assert_error(response, 422, "invalid_parameter", message)
    assert len(response.text) < 500  # the value is not echoed back
    # Authentication still comes first.
    assert_error(usage_api.get("/v1/usage", params={"model": model}), 401, "unauthorized")


def test_usage_accepts_the_longest_model_filter(usage_api):
    response = usage_api.get("/v1/usage", params={"model": "m" * MAX_MODEL_CHARS}, headers=auth(usage_api))
    assert response.status_code == 200 and response.json()["by_model"] == {}


def test_default_window_follows_to():
    start, end = resolve_window(None, "2030-01-31", now=NOW)
    assert (start, end) == (datetime(2030, 1, 1, tzinfo=timezone.utc), datetime(2030, 2, 1, tzinfo=timezone.utc))
    start, end = resolve_window(None, None, now=datetime(2030, 4, 1, tzinfo=timezone.utc))
    assert start == end == datetime(2030, 4, 1, tzinfo=timezone.utc)  # the first instant of a month
    start, end = resolve_window("2032-01-01", "2032-12-31", now=NOW)  # a leap year: 366 days is allowed
    assert end - start == timedelta(days=366)


def test_usage_store_outage_is_a_503(tmp_path):
    path = tmp_path / "tenants.yaml"
    key = add_tenant(path, "alice")
    ledger = RedisUsageLedger("redis://127.0.0.1:1/0", key_prefix=unique_prefix(), socket_timeout_s=1)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(usage_router(ledger, TenantRegistry(path).authenticate, clock=lambda: NOW))
    response = TestClient(app).get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert_error(response, 503, "store_unavailable")
    assert "127.0.0.1" not in response.text
