"""The upgrade drill, short (issue #14): a steady trickle of jobs on ``svd-serve up`` (tiny model,
real local Ray) while an operator changes the Serve config (``svd-serve deploy``: the Sampler gets
2 replicas at half the CPUs, so Serve replaces every replica) and the model (``svd-serve models
set``: new weights under the same id; every other job names it, the rest get the default model).
No accepted job may fail or be lost, every submit is eventually accepted, the job that was sampling
when its Sampler replica was replaced finishes on it (one attempt), and the model version on the
jobs changes with the model. The long run (``python scripts/upgrade_drill.py --long``) records its
figures in docs/operations.md ("Upgrades that fail no job")."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.second_lane]

ROOT = Path(__file__).resolve().parent.parent


def load_drill():
    spec = importlib.util.spec_from_file_location("upgrade_drill", ROOT / "scripts" / "upgrade_drill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_config_and_model_changes_under_load_fail_and_lose_no_job(tiny_model_dir, tmp_path):
    from pipelines.tiny import write_tiny_model

    drill = load_drill()
    other_model = Path(write_tiny_model(tmp_path / "tiny-b", seed=1))
    settings = drill.DrillSettings(rate_per_s=1.0, warmup_s=4.0, between_s=5.0, tail_s=5.0, settle_s=240.0,
                                   long_job_steps=40)
    report = drill.run_drill(tmp_path / "work", Path(tiny_model_dir), other_model, settings)
    print(json.dumps(report, indent=2))

    assert [phase["ok"] for phase in report["phases"]] == [True, True, True], report["phases"]
    assert report["accepted"] >= 10 and report["refused"] == {}, report
    assert report["failed"] == {} and report["lost"] == 0 and report["cancelled"] == 0, report
    assert report["completed"] == report["accepted"]
    long_job = report["long_job"]
    assert long_job["at_deploy"]["stage"] == "sampling", long_job  # the deploy found it mid-sampling
    assert long_job["status"] == "completed" and long_job["attempts"] == 1, long_job  # drained, not retried
    # Two versions of the registered model, one of the default model (its jobs came in between), and
    # no job submitted after the change ran on the old version.
    versions = sorted(report["versions"])
    assert [v.split("@")[0] for v in versions] == ["drill", "drill", "tiny"], report["versions"]
    assert report["old_version_after_model_change"] == [], report
