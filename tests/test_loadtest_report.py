"""Unit tests of the load-test pieces that need no service: report statistics on known inputs, the
capacity model, profiles, arrival schedules, units and small helpers. No Locust import here
(it monkey-patches the process with gevent); the users are exercised in test_loadtest_users.py."""

from __future__ import annotations

import io
import itertools
import json
import random

from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from loadtest import capacity, report, stages as lt_stages
from loadtest.arrivals import ArrivalQueue, burst_times, constant_times, expected_arrivals, pattern_times, ramp_times
from loadtest.profile import Profile, RampArrivals, bundled_profiles, load_profile
from loadtest.records import JobRecord, gradient_png
from loadtest.units import parse_duration, parse_keys, parse_mapping, parse_rate

T0 = 1_000_000.0


def job(seq, tenant="a", *, status="completed", submit=0.0, created=None, started=None, finished=None,
        first=None, terminal=None, done=None, timings=None, submit_status=202, scheduled=None, **extra) -> JobRecord:
    """A record with times given in seconds since T0."""

    def at(value):
        return None if value is None else T0 + value

    return JobRecord(seq=seq, tenant=tenant, scheduled_at=at(scheduled if scheduled is not None else submit),
                     submitted_at=at(submit), submit_status=submit_status, status=status,
                     created_at=at(created), started_at=at(started), finished_at=at(finished),
                     first_progress_at=at(first), terminal_at=at(terminal), done_at=at(done),
                     timings=timings or {}, **extra)


# -- statistics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 10, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [random.Random(q).uniform(0, 100) for _ in range(37)]
    assert report.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_known_values():
    data = list(range(1, 11))  # 1..10
    assert report.percentile(data, 50) == 5.5
    assert report.percentile(data, 95) == pytest.approx(9.55)
    assert report.percentile(data, 99) == pytest.approx(9.91)
    assert report.percentile([4.0], 99) == 4.0
    assert report.percentile([], 50) is None
    s = report.summarize([3, 1, 2, None])
    assert (s["n"], s["min"], s["p50"], s["max"], s["mean"]) == (3, 1, 2, 3, 2)


def test_latency_definitions():
    r = job(1, submit=0, created=0.1, started=2.1, first=2.5, terminal=9.0, finished=8.6, done=9.5)
    assert report.queue_wait(r) == pytest.approx(2.0)
    assert report.first_progress(r) == pytest.approx(2.5)
    assert report.end_to_end(r) == pytest.approx(9.5)  # includes the download
    assert report.service_time(r) == pytest.approx(8.5)
    no_download = job(2, submit=1, terminal=4)
    assert report.end_to_end(no_download) == pytest.approx(3.0)


def test_latency_block_uses_completed_jobs_only():
    records = [job(i, submit=0, created=0, started=float(i), terminal=10 + i, done=10 + i) for i in range(1, 11)]
    records.append(job(99, status="failed", submit=0, created=0, started=500.0, terminal=600))
    block = report.latency_block(records)
    assert block["queue_wait_s"]["n"] == 10
    assert block["queue_wait_s"]["p50"] == 5.5
    assert block["queue_wait_s"]["max"] == 10
    assert block["end_to_end_s"]["p95"] == pytest.approx(19.55)


def test_completed_per_minute_bins():
    records = [job(i, terminal=t) for i, t in enumerate([5, 30, 59, 61, 150, 170])]
    records.append(job(50, status="failed", terminal=20))
    bins = report.completed_per_minute(records, T0, T0 + 180)
    assert [b["completed"] for b in bins] == [3, 1, 2]
    assert [b["per_minute"] for b in bins] == [3.0, 1.0, 2.0]
    # a partial last bin is scaled to a per-minute rate
    partial = report.completed_per_minute(records, T0, T0 + 150.0)
    assert partial[-1]["completed"] == 2 and partial[-1]["per_minute"] == pytest.approx(2 * 60 / 30)
    ten = report.completed_per_minute(records, T0, T0 + 60, bin_s=10)
    assert [b["completed"] for b in ten] == [1, 0, 0, 1, 0, 4]  # 59, 61, 150 and 170 clamp into the last bin


def test_tenant_shares_against_weights():
    records = (
        [job(i, "gold", timings={"sampling": 3.0, "decode": 1.0}) for i in range(6)]      # 24 s of GPU work
        + [job(10 + i, "bronze", timings={"sampling": 3.0, "decode": 1.0, "video_encode": 5.0}) for i in range(2)]  # 8 s
        + [job(20, "bronze", status="rejected", submit_status=429)]
        + [job(30, "idle", status="not_sent", submit=None)]
    )
    shares = report.tenant_shares(records, {"gold": 3, "bronze": 1, "idle": 4})
    assert shares["gold"]["weight_share"] == pytest.approx(0.75)  # idle tenant submitted nothing: excluded
    assert shares["bronze"]["weight_share"] == pytest.approx(0.25)
    assert shares["idle"]["weight_share"] == 0.0
    assert shares["gold"]["work_s"] == pytest.approx(24.0)  # video_encode is not GPU work
    assert shares["gold"]["work_share"] == pytest.approx(0.75)
    assert shares["gold"]["share_vs_weight"] == pytest.approx(1.0)
    assert shares["gold"]["job_share"] == pytest.approx(0.75)
    assert shares["bronze"]["completed"] == 2


def test_rejections_per_tenant_and_status_counts():
    records = [
        job(1, "a", status="rejected", submit_status=429), job(2, "a", status="rejected", submit_status=429),
        job(3, "a", status="rejected", submit_status=503), job(4, "b", status="rejected", submit_status=429),
        job(5, "b"), job(6, "b", status="cancelled"), job(7, "b", status="not_sent", submit=None),
    ]
    assert report.rejections_by_tenant(records) == {"a": {"429": 2, "503": 1}, "b": {"429": 1}}
    counts = report.status_counts(records)
    assert counts["rejected"] == 4 and counts["completed"] == 1 and counts["cancelled"] == 1
    assert counts["submitted"] == 6 and counts["scheduled"] == 7


def test_http_block_counts_errors():
    http = {("POST", "POST /v1/videos", 202): 10, ("POST", "POST /v1/videos", 429): 3,
            ("GET", "GET /v1/videos/{id}", 200): 40, ("GET", "GET /v1/videos/{id}", 503): 2,
            ("GET", "GET /v1/videos/{id}", 0): 1}
    block = report.http_block(http)
    assert block["requests"] == 56
    assert block["errors_5xx"] == 2
    assert block["connection_errors"] == 1
    assert block["errors_by_status"] == {"0": 1, "429": 3, "503": 2}
    assert block["by_endpoint"]["POST /v1/videos"] == {"202": 10, "429": 3}


def test_stage_busy_and_utilisation():
    records = [job(i, timings={"sampling": 6.0, "decode": 2.0, "store": 0.5}) for i in range(10)]
    stages = report.stage_busy(records, wall_s=100.0, mean_replicas={"Sampler": 2.0})
    assert stages["sampling"]["busy_s"] == 60.0
    assert stages["sampling"]["busy_fraction"] == pytest.approx(0.6)
    assert stages["sampling"]["utilisation"] == pytest.approx(0.3)
    assert stages["decode"]["busy_fraction"] == pytest.approx(0.2) and stages["decode"]["utilisation"] is None
    assert stages["store"]["deployment"] == "VideoEncoder"
    assert "image_encode" not in stages


def test_in_flight_series_and_replica_summary():
    records = [job(1, submit=0, terminal=5), job(2, submit=2, terminal=3), job(3, submit=4, terminal=None),
               job(4, submit=1, status="rejected", submit_status=429)]
    series = dict(report.in_flight_series(records, T0, T0 + 6, step_s=1.0))
    assert [series[t] for t in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)] == [1, 1, 2, 1, 2, 1, 0]
    assert report.max_in_flight(records, T0 + 6) == 2
    short = [job(1, submit=0.2, terminal=0.4), job(2, submit=0.5, terminal=0.9), job(3, submit=0.6, terminal=0.7)]
    assert dict(report.in_flight_series(short, T0, T0 + 1, step_s=1.0))[0.0] == 3  # sub-step jobs still show
    assert report.max_in_flight(short, T0 + 1) == 2
    samples = [{"t": T0 + t, "deployments": {"Sampler": {"running": n}, "Ingress": {"running": 1}}}
               for t, n in [(0, 1), (10, 1), (20, 2), (30, 2), (40, 1)]]
    summary = report.replica_summary(samples, T0)
    assert list(summary) == ["Ingress", "Sampler"]
    sampler = summary["Sampler"]
    assert (sampler["min"], sampler["max"], sampler["first"], sampler["last"]) == (1, 2, 1, 1)
    assert sampler["changes"] == [{"t_s": 0.0, "running": 1}, {"t_s": 20.0, "running": 2}, {"t_s": 40.0, "running": 1}]
    assert sampler["mean"] == pytest.approx(1.5)  # 20 s at 1, 20 s at 2


def test_cancellations_and_downloads():
    records = [
        job(1, status="cancelled", cancel_planned_after=1.0, cancel_requested_at=T0 + 2, cancel_status=200, terminal=3),
        job(2, status="completed", cancel_planned_after=1.0, cancel_requested_at=T0 + 2, cancel_status=409, terminal=1.5),
        job(3, download_status=200, download_ok=True, download_bytes=1000, download_s=0.2),
        job(4, download_status=404, download_ok=False, download_bytes=0, download_s=0.1),
    ]
    block = report.cancellation_block(records)
    assert block["requested"] == 2 and block["answered"] == {"200": 1, "409": 1}
    assert block["outcome"] == {"cancelled": 1, "completed": 1}
    assert block["cancel_to_terminal_s"]["p50"] == pytest.approx(1.0)
    downloads = report.download_block(records)
    assert (downloads["downloads"], downloads["ok"], downloads["failed"], downloads["bytes"]) == (2, 1, 1, 1000)


def test_build_and_write_report(tmp_path):
    records = [job(i, "a" if i % 3 else "b", submit=i * 5, created=i * 5 + 0.1, started=i * 5 + 1,
                   first=i * 5 + 1.2, finished=i * 5 + 3, terminal=i * 5 + 3.3, done=i * 5 + 3.5,
                   timings={"image_encode": 0.1, "sampling": 1.5, "decode": 0.3, "video_encode": 0.1, "store": 0.01})
               for i in range(12)]
    records.append(job(50, "b", status="rejected", submit_status=429, submit=20))
    samples = [{"t": T0 + t, "source": "ray", "deployments": {"Sampler": {"running": 1 + (t >= 30)}}} for t in range(0, 65, 5)]
    result = report.build_report(records, meta={"profile": "unit", "target": "http://127.0.0.1:1", "started_at": T0,
                                                "ended_at": T0 + 60, "window_s": 60},
                                 weights={"a": 2, "b": 1}, http={("POST", "POST /v1/videos", 202): 12,
                                                                 ("POST", "POST /v1/videos", 429): 1},
                                 replica_samples=samples, replica_source="ray test")
    assert result["jobs"]["completed"] == 12
    assert result["throughput"]["completed_per_minute"] == pytest.approx(12.0)
    assert result["throughput"]["videos_per_hour"] == pytest.approx(720.0)
    assert result["latency"]["overall"]["queue_wait_s"]["p50"] == pytest.approx(0.9)
    assert set(result["latency"]["per_tenant"]) == {"a", "b"}
    assert result["rejections_per_tenant"] == {"b": {"429": 1}}
    assert result["replicas"]["deployments"]["Sampler"]["max"] == 2
    assert result["stages"]["sampling"]["busy_fraction"] == pytest.approx(12 * 1.5 / 60)
    assert result["checks"]["completed_jobs"] and result["checks"]["no_5xx"]
    json.dumps(result)  # machine-readable as is
    files = report.write_report(tmp_path, result)
    for name in ("throughput", "latency", "scaling", "tenants", "stages"):
        assert files[name].exists() and files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = files["markdown"].read_text()
    assert "| a | 2 |" in markdown and "charts/scaling.png" in markdown and "Sampler" in markdown
    assert json.loads(files["json"].read_text())["jobs"]["rejected"] == 1
    assert "checks: all passed" in report.headline(result) or "FAILED" in report.headline(result)


# -- capacity model -------------------------------------------------------------------------------


def test_capacity_svd_xt_anchor():
    result = capacity.plan(600, {"image_encode": 0.1, "sampling": 19.1, "decode": 3.4, "video_encode": 1.0},
                           utilisation=0.7)
    stages = {s["stage"]: s for s in result["stages"]}
    # sampling: 600/h x 19.1 s = 3.183 Erlangs; / 0.7 = 4.55 -> 5 replicas of 1 GPU
    assert stages["sampling"]["offered_load"] == pytest.approx(600 * 19.1 / 3600)
    assert stages["sampling"]["replicas"] == 5 and stages["sampling"]["gpus"] == 5.0
    assert stages["sampling"]["utilisation"] == pytest.approx(3.1833 / 5, rel=1e-3)
    assert stages["decode"]["replicas"] == 1 and stages["decode"]["gpus"] == 0.5
    assert stages["image_encode"]["replicas"] == 1 and stages["video_encode"]["gpus"] == 0.0
    assert result["bottleneck"] == "sampling"
    assert result["gpu_sum"] == pytest.approx(5.75)
    assert result["gpus_packed"] == 6 and result["gpus_dedicated"] == 7


def test_capacity_eager_a100_and_current_limit():
    result = capacity.plan(600, {"sampling": 51.0}, utilisation=0.7, current={"sampling": 8})
    assert result["stages"][0]["replicas"] == 13  # 8.5 Erlangs / 0.7 = 12.1
    assert result["current"]["limited_by"] == "sampling"
    assert result["current"]["max_rate_per_hour"] == pytest.approx(8 * 3600 / 51 * 0.7)


def test_capacity_bottleneck_respects_parallelism_and_exact_fit():
    result = capacity.plan(3600, {"sampling": 2.0, "decode": 3.0}, utilisation=1.0, parallel={"decode": 4})
    stages = {s["stage"]: s for s in result["stages"]}
    assert stages["sampling"]["replicas"] == 2  # exactly 2 Erlangs at 100%: no rounding up
    assert stages["decode"]["replicas"] == 1  # 3 Erlangs over 4 parallel slots
    assert result["bottleneck"] == "sampling"
    with pytest.raises(ValueError):
        capacity.plan(100, {"sampling": 1.0}, utilisation=0)


def test_erlang_c():
    # M/M/1: Wq = rho / (1 - rho) * s
    assert capacity.erlang_c_wait(1, 0.5, 2.0) == pytest.approx(2.0)
    # M/M/2 with a = 1: P(wait) = 1/3, Wq = P * s / (c - a) = 1/3 * s
    assert capacity.erlang_c_wait(2, 1.0, 3.0) == pytest.approx(1.0)
    assert capacity.erlang_c_wait(2, 2.0, 3.0) is None


def test_capacity_from_report_and_cli(capsys, tmp_path):
    rep = {"stages": {"sampling": {"seconds": {"mean": 2.0}}, "video_encode": {"seconds": {"mean": 0.3}},
                      "store": {"seconds": {"mean": 0.2}}}}
    assert capacity.stage_seconds_from_report(rep) == {"sampling": 2.0, "video_encode": pytest.approx(0.5)}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(rep))
    assert capacity.main(["--rate", "30/min", "--from-report", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rate_per_hour"] == pytest.approx(1800) and out["bottleneck"] == "sampling"
    assert capacity.main(["--rate", "600/h", "--stage-seconds", "sampling=19.1,decode=3.4"]) == 0
    assert "bottleneck: sampling" in capsys.readouterr().out
    assert capacity.main(["--rate", "600/h", "--stage-seconds", "sampling"]) == 2


# -- stage names: read from the registry ---------------------------------------------------------


@pytest.fixture
def extra_stages():
    """Two stages registered for one test: a GPU stage between decode and the video encoder, and a
    last stage that rewrites the video (so the upload moves to its replica)."""
    from pipelines.registry import STAGES, StageResources, StageSpec

    sharpen = StageSpec(name="sharpen", config_key="sharpener", deployment="Sharpener", factory="x:y",
                        inputs=("frames",), output="frames", components=("vae",),
                        resources=StageResources(num_gpus=0.2))
    watermark = StageSpec(name="watermark", config_key="watermarker", deployment="Watermarker", factory="x:y",
                          inputs=("video",), output="video")
    STAGES.register(sharpen, after="decode")
    STAGES.register(watermark)
    try:
        yield sharpen, watermark
    finally:
        STAGES.unregister("watermark")
        STAGES.unregister("sharpen")


def test_stage_tables_of_the_builtin_stages():
    assert lt_stages.timing_names()[-1] == "store"
    assert set(lt_stages.gpu_stages()) >= {"image_encode", "sampling", "decode"}
    assert "video_encode" not in lt_stages.gpu_stages()
    assert lt_stages.deployment_of("store") == lt_stages.deployment_of("video_encode") == "VideoEncoder"
    assert lt_stages.deployment_of("sampling") == "Sampler" and lt_stages.deployment_of("nope") is None
    order = lt_stages.deployment_order()
    assert order[:2] == ("Ingress", "JobRunner")
    assert [order.index(d) for d in ("ImageEncoder", "Sampler", "Decoder", "VideoEncoder")] == sorted(
        order.index(d) for d in ("ImageEncoder", "Sampler", "Decoder", "VideoEncoder"))


def test_report_and_capacity_follow_registered_stages(extra_stages):
    timings = {"sampling": 6.0, "sharpen": 1.0, "video_encode": 0.5, "watermark": 0.25, "store": 0.5}
    records = [job(i, timings=timings) for i in range(4)]
    busy = report.stage_busy(records, wall_s=10.0, mean_replicas={"Sharpener": 2.0})
    assert list(busy) == ["sampling", "sharpen", "video_encode", "watermark", "store"]
    assert busy["sharpen"]["deployment"] == "Sharpener" and busy["sharpen"]["utilisation"] == pytest.approx(0.2)
    assert busy["store"]["deployment"] == "Watermarker"
    assert report.gpu_seconds(records[0]) == pytest.approx(7.0)  # sampling + sharpen: stages with components

    samples = [{"t": T0, "deployments": {n: {"running": 1} for n in ("Watermarker", "Sharpener", "Decoder", "Ingress")}}]
    assert list(report.replica_summary(samples, T0)) == ["Ingress", "Decoder", "Sharpener", "Watermarker"]

    result = capacity.plan(60, {"watermark": 1.0, "sharpen": 2.0, "decode": 1.0, "custom": 1.0})
    assert [s["stage"] for s in result["stages"]] == ["decode", "sharpen", "watermark", "custom"]
    by_stage = {s["stage"]: s for s in result["stages"]}
    assert by_stage["sharpen"]["deployment"] == "Sharpener" and by_stage["sharpen"]["gpu_share"] == 0.2
    assert by_stage["custom"]["deployment"] == "custom" and by_stage["custom"]["gpu_share"] == 0.0
    rep = {"stages": {"watermark": {"seconds": {"mean": 0.3}}, "store": {"seconds": {"mean": 0.2}}}}
    assert capacity.stage_seconds_from_report(rep) == {"watermark": pytest.approx(0.5)}


def test_chart_gpu_shares_mirror_the_helm_values():
    """loadtest.stages.CHART_GPU_SHARE is the Helm chart's default GPU share of every built-in stage."""
    from pipelines.registry import RESERVED_CONFIG_KEYS, STAGES

    values = yaml.safe_load((Path(__file__).resolve().parent.parent / "helm/svd-serve/values.yaml").read_text())
    chart = {key: block["ray_actor_options"]["num_gpus"] for key, block in values["stages"].items()
             if key not in RESERVED_CONFIG_KEYS}
    assert {STAGES.get(name).config_key: share for name, share in lt_stages.CHART_GPU_SHARE.items()} == chart
    assert capacity.plan(60, {"sampling": 1.0})["stages"][0]["gpu_share"] == chart[STAGES.get("sampling").config_key]


# -- units, profiles, arrivals -------------------------------------------------------------------


def test_units():
    assert parse_duration("90") == 90 and parse_duration("2m") == 120 and parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5 and parse_duration(12) == 12
    assert parse_rate("600/h") == pytest.approx(1 / 6) and parse_rate("30/min") == 0.5 and parse_rate(2) == 2
    for bad in ("abc", "1x"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_rate("3/week")
    assert parse_keys("a=K1, b=K2") == {"a": "K1", "b": "K2"}
    assert parse_keys("svd_only") == {"*": "svd_only"}
    with pytest.raises(ValueError):
        parse_keys("a=K1,bare")
    assert parse_mapping("sampling=19.1,decode=3.4", what="x") == {"sampling": 19.1, "decode": 3.4}


REQUIRED_PROFILES = {"smoke", "constant", "poisson", "burst", "ramp", "multitenant", "cancel-heavy", "poll-storm"}


def test_bundled_profiles_validate_and_are_bounded():
    assert REQUIRED_PROFILES <= set(bundled_profiles())
    for name in bundled_profiles():
        profile = load_profile(name)
        assert profile.max_jobs >= 1 and profile.duration > 0 and profile.max_requests >= 1
        assert profile.duration + profile.drain_timeout < 3600
    smoke = load_profile("smoke")
    assert smoke.duration < 60
    assert all(c.width * c.height <= 128 * 128 for t in smoke.tenants for c in smoke.clips_of(t))


def _models(model: type[BaseModel], seen=None):
    import typing

    seen = seen if seen is not None else set()
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _models(tp, seen)
            stack.extend(typing.get_args(tp))
    return seen


def test_every_profile_field_has_a_description():
    models = _models(Profile)
    assert len(models) >= 8
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not f.description]
    assert not missing, missing


def test_profile_rejects_bad_input():
    base = {"name": "x", "duration": "1m", "max_jobs": 3, "tenants": [{"name": "a", "arrivals": {"pattern": "constant", "rate": "1/min"}}]}
    Profile.model_validate(base)
    for patch in ({"tenants": [{"name": "a b", "arrivals": {"pattern": "constant", "rate": 1}}]},
                  {"tenants": [{"name": "a"}]},
                  {"tenants": [{"name": "a", "arrivals": {"pattern": "zigzag", "rate": 1}}]},
                  {"unknown": 1},
                  {"duration": "soon"},
                  {"tenants": [{"name": "a", "arrivals": {"pattern": "constant", "rate": 1}},
                               {"name": "a", "arrivals": {"pattern": "constant", "rate": 1}}]}):
        with pytest.raises(ValidationError):
            Profile.model_validate({**base, **patch})


def test_arrival_patterns():
    assert list(itertools.islice(constant_times(2.0, start=1.0), 3)) == [1.0, 1.5, 2.0]
    times = list(pattern_times(Profile.model_validate({"name": "c", "duration": 10, "max_jobs": 99, "tenants": [
        {"name": "a", "arrivals": {"pattern": "constant", "rate": 2}}]}).tenants[0].arrivals,
        rng=random.Random(0), window=10))
    assert times == [k / 2 for k in range(20)]
    assert list(burst_times(3, 10, start=5, count=2)) == [5, 5, 5, 15, 15, 15]
    # an evenly spaced ramp from 0 to 1/s over 100 s has 50 arrivals in the ramp, the last at its end
    ramp = list(itertools.takewhile(lambda t: t <= 100.0 + 1e-9, ramp_times(0.0, 1.0, 100.0, None)))
    assert len(ramp) == 50 and ramp == sorted(ramp) and ramp[-1] == pytest.approx(100.0)
    assert ramp[0] == pytest.approx((2 * 100 * 1) ** 0.5 / 1.0 ** 0.5, rel=1e-6)  # L(u) = u^2/200 = 1 -> u = 14.14
    spec = RampArrivals(pattern="ramp", start_rate=0.1, end_rate=0.5, over=100.0, poisson=False)
    assert expected_arrivals(spec, 150.0) == pytest.approx(0.3 * 100 + 0.5 * 50)
    poisson = list(pattern_times(Profile.model_validate({"name": "p", "duration": 2000, "max_jobs": 9999, "tenants": [
        {"name": "a", "arrivals": {"pattern": "poisson", "rate": 1}}]}).tenants[0].arrivals,
        rng=random.Random(3), window=2000))
    assert 1800 < len(poisson) < 2200


def _profile(**extra):
    body = {"name": "q", "duration": 100, "max_jobs": 10, "tenants": [
        {"name": "a", "arrivals": {"pattern": "constant", "rate": 1}, "max_in_flight": 2},
        {"name": "b", "arrivals": {"pattern": "burst", "size": 5, "every": 50}, "max_jobs": 3,
         "cancel": {"fraction": 1.0, "after": ["1s", "2s"]}}]}
    body.update(extra)
    return Profile.model_validate(body)


def test_arrival_queue_bounds_and_caps():
    queue = ArrivalQueue(_profile())
    taken = []
    while (arrival := queue.take()) is not None:
        taken.append(arrival)
    assert len(taken) == 10  # max_jobs
    assert sum(1 for a in taken if a.tenant == "b") == 3  # per-tenant max_jobs
    assert [a.at for a in taken] == sorted(a.at for a in taken)
    assert all(1.0 <= a.cancel_after <= 2.0 for a in taken if a.tenant == "b")
    assert all(a.cancel_after is None for a in taken if a.tenant == "a")
    # a tenant at its cap is skipped; with only capped tenants pending the queue says WAIT
    queue = ArrivalQueue(_profile(tenants=[{"name": "a", "arrivals": {"pattern": "constant", "rate": 1}}]))
    assert queue.take(lambda tenant: False) == ArrivalQueue.WAIT
    assert queue.take(lambda tenant: True).tenant == "a"


def test_arrival_queue_split_between_workers():
    profile = _profile(max_jobs=11, tenants=[{"name": "a", "arrivals": {"pattern": "constant", "rate": 1}}])
    single = [a.at for a in iter(ArrivalQueue(profile).take, None)]
    parts = [[a.at for a in iter(ArrivalQueue(profile, share=1 / 3, index=i, workers=3).take, None)] for i in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sorted(t for p in parts for t in p) == single  # interleaved: together they are the one schedule


def test_job_record_reads_the_precise_timestamps_of_the_current_job_object():
    """Top-level instants are whole Unix seconds (OpenAI's Video); ``timestamps`` has microseconds."""
    record = JobRecord(seq=1, tenant="a", scheduled_at=T0)
    record.update_from_job({"id": "vid_1", "object": "video", "status": "queued", "progress": 0,
                            "created_at": 1767225600, "timestamps": {"created_at": "2026-01-01T00:00:00.250000Z"},
                            "progress_detail": {"stage": None, "step": 0}}, now=T0 + 1)
    assert record.first_progress_at is None and record.status == "queued"
    record.update_from_job({"id": "vid_1", "status": "in_progress", "progress": 40, "created_at": 1767225600,
                            "started_at": 1767225600,
                            "timestamps": {"created_at": "2026-01-01T00:00:00.250000+00:00",
                                           "started_at": "2026-01-01T00:00:00.750000+00:00"},
                            "progress_detail": {"stage": "sampling", "step": 1}}, now=T0 + 2)
    assert record.first_progress_at == T0 + 2
    assert record.started_at - record.created_at == pytest.approx(0.5)
    record.update_from_job({"status": "cancelled", "progress": 40, "error": {"code": "cancelled"},
                            "timestamps": {"created_at": "2026-01-01T00:00:00.250000+00:00",
                                           "started_at": "2026-01-01T00:00:00.750000+00:00",
                                           "finished_at": "2026-01-01T00:00:03.125000+00:00"}}, now=T0 + 3)
    assert record.status == "cancelled" and record.finished_at - record.created_at == pytest.approx(2.875)


def test_job_record_update_and_png():
    """The job object of a service from before ``timestamps`` (ISO instants at the top level)."""
    record = JobRecord(seq=1, tenant="a", scheduled_at=T0)
    record.update_from_job({"id": "vid_1", "status": "queued", "created_at": "2026-01-01T00:00:00Z",
                            "progress": {"stage": None}}, now=T0 + 1)
    assert record.first_progress_at is None and record.status == "queued"
    record.update_from_job({"id": "vid_1", "status": "in_progress", "started_at": "2026-01-01T00:00:02+00:00",
                            "progress": {"stage": "sampling"}}, now=T0 + 2)
    assert record.first_progress_at == T0 + 2
    assert record.started_at - record.created_at == pytest.approx(2.0)
    record.update_from_job({"status": "failed", "error": {"code": "internal_error"}, "timings": {"sampling": 1}},
                           now=T0 + 3)
    assert record.status == "failed" and record.error_code == "internal_error" and record.terminal_at == T0 + 3
    assert JobRecord.from_json(json.loads(json.dumps(record.to_json()))) == record

    from PIL import Image

    image = Image.open(io.BytesIO(gradient_png(64, 128)))
    assert image.size == (64, 128) and image.mode == "RGB"
