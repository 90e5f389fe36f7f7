"""The short fault suite (CI): a steady load while Redis is killed and restarted, the S3 endpoint
hangs, the Sampler replica and the runner replica are killed (webhook deliveries pending: the
receiver refuses every event's first delivery), and a worker node is removed. Nothing accepted
may be lost or fail, and every rejection a client sees is a 503 with Retry-After. The long run
(``scripts/fault_suite.py``) records its figures in docs/reliability.md."""

from __future__ import annotations

import json

import pytest

from pipelines.sample_image import SAMPLE_IMAGE_PATH

pytestmark = [pytest.mark.ray, pytest.mark.slow]

pytest.importorskip("ray")


def test_no_accepted_job_is_lost_or_failed_while_things_break(tiny_model_dir, tmp_path):
    from loadtest.faults import FaultRun
    from loadtest.faults.receiver import FlakyReceiver

    receiver = FlakyReceiver()
    try:
        with FaultRun(tiny_model_dir, workdir=tmp_path) as run:
            faults = [(6, "redis killed", lambda: run.restart_redis(4)),
                      (16, "S3 hangs", lambda: run.pause_s3(4)),
                      (26, "Sampler killed", lambda: run.kill_replicas("Sampler")),
                      (32, "runner killed", lambda: run.kill_replicas("JobRunner")),
                      (38, "worker node removed", run.remove_worker)]
            report = run.timeline(faults, rate_per_s=0.5, run_s=45, settle_s=240, image=SAMPLE_IMAGE_PATH,
                                  webhook_url=receiver.url)
    finally:
        receiver.close()
    load = report.load
    summary = {**report.as_dict(), "webhooks": receiver.summary(report.completed_ids)}
    print(json.dumps(summary, indent=2))
    assert [event.name for event in report.events] == [name for _, name, _ in faults]
    assert load.accepted >= 10 and load.lost == [] and load.failed == {}, summary
    assert load.completed + load.cancelled == load.accepted
    assert set(load.rejected) <= {503} and load.rejected_without_retry_after == 0, summary
    webhooks = summary["webhooks"]
    assert webhooks["events_with_two_ids"] == 0 and webhooks["completed_jobs_without_event"] == 0, summary
