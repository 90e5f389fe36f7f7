"""End to end: the smoke profile against a real local deployment (`svd-serve up` in a subprocess).

Under a minute of load with tiny clips on the tiny CPU model; the service is stopped with SIGTERM
at the end and the test checks that nothing of its Ray session is left running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.local import LocalService, prepare_data_dir
from loadtest.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_profile_against_local_deployment(tmp_path):
    profile = load_profile("smoke")
    assert profile.duration < 60
    data = tmp_path / "data"
    config, keys = prepare_data_dir(profile, data, serve_config=None)
    out = tmp_path / "report"
    service = LocalService(data, config=config, log_path=tmp_path / "service.log")
    try:
        service.start()
        assert service.gcs_address, service.log_tail()
        proc = subprocess.run(
            [sys.executable, "-m", "loadtest.run", "--target", service.url, "--profile", "smoke", "--keys",
             ",".join(f"{name}={key}" for name, key in keys.items()), "--out", str(out), "--ray-address",
             service.gcs_address, "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr + service.log_tail()
    finally:
        clean = service.stop()
    assert clean, "svd-serve up did not stop cleanly on SIGTERM (processes had to be killed)"
    assert service.proc.returncode is not None

    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["wall_s"] < 60 + profile.drain_timeout
    assert report["jobs"]["completed"] >= 1
    assert report["jobs"]["failed"] == 0 and report["jobs"]["unfinished"] == 0
    assert report["http"]["errors_5xx"] == 0 and report["http"]["connection_errors"] == 0
    assert report["throughput"]["completed_per_minute"] > 0
    per_tenant = report["latency"]["per_tenant"]
    for tenant in ("smoke-a", "smoke-b"):
        assert per_tenant[tenant]["end_to_end_s"]["n"] >= 1
        assert per_tenant[tenant]["queue_wait_s"]["p50"] is not None
        assert report["fairness"][tenant]["completed"] >= 1
    assert report["fairness"]["smoke-a"]["weight"] == 2
    assert report["stages"]["sampling"]["busy_s"] > 0
    assert report["downloads"]["failed"] == 0
    sampler = report["replicas"]["deployments"].get("Sampler")
    assert sampler is not None and sampler["min"] >= 1, report["replicas"]
    for chart in ("throughput", "latency", "scaling", "tenants", "stages"):
        assert (out / "charts" / f"{chart}.png").stat().st_size > 1000
    markdown = (out / "report.md").read_text()
    assert "## Latency" in markdown and "smoke-a" in markdown and "charts/scaling.png" in markdown
