#!/usr/bin/env python
"""The long fault run: the application on a local multi-node Ray cluster (Redis job store, S3
storage, the tiny CPU model) under a steady load while Redis is killed for OUTAGE seconds and
restarted, the S3 endpoint hangs for OUTAGE seconds, the Sampler replica is killed mid-step twice,
the runner replica is killed with webhook deliveries pending, and a worker node is removed.

    python scripts/fault_suite.py [--rate 1.0] [--outage 20] [--json out/faults.json]

Prints one JSON report: submitted / accepted / completed / failed / lost, what clients saw
(rejections by status, whether each carried Retry-After, poll statuses), the faults as played,
and the webhook deliveries (one Webhook-Id per event, every completed job's event delivered).
docs/reliability.md records a run. Needs redis-server; builds the tiny model in a temporary
directory. Exit status 1 when a job was lost or failed, or a rejection was not a 503 with Retry-After.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1.0, help="jobs submitted per second (default 1)")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds Redis and S3 are down (default 20)")
    parser.add_argument("--settle", type=float, default=600.0, help="seconds to wait for the last jobs")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)

    from loadtest.faults import FaultRun
    from loadtest.faults.receiver import FlakyReceiver
    from pipelines.sample_image import SAMPLE_IMAGE_PATH
    from pipelines.tiny import write_tiny_model

    outage = args.outage
    with tempfile.TemporaryDirectory(prefix="svd-faults-") as tmp:
        model = write_tiny_model(Path(tmp) / "tiny")
        receiver = FlakyReceiver()
        started = time.monotonic()
        try:
            with FaultRun(model, workdir=Path(tmp) / "run") as run:
                t = 20.0
                faults = []
                for name, fault, length in (
                        ("redis killed", lambda: run.restart_redis(outage), outage),
                        ("S3 hangs", lambda: run.pause_s3(outage), outage),
                        ("Sampler killed", lambda: run.kill_replicas("Sampler"), 0),
                        ("Sampler killed again", lambda: run.kill_replicas("Sampler"), 0),
                        ("runner killed", lambda: run.kill_replicas("JobRunner"), 0),
                        ("worker node removed", run.remove_worker, 0)):
                    faults.append((t, name, fault))
                    t += length + 20
                report = run.timeline(faults, rate_per_s=args.rate, run_s=t + 10, settle_s=args.settle,
                                      image=SAMPLE_IMAGE_PATH, webhook_url=receiver.url)
        finally:
            receiver.close()
        summary = {**report.as_dict(), "webhooks": receiver.summary(report.completed_ids),
                   "rate_per_s": args.rate, "outage_s": outage, "wall_s": round(time.monotonic() - started)}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    load = report.load
    ok = (not load.lost and not load.failed and set(load.rejected) <= {503}
          and not load.rejected_without_retry_after and summary["webhooks"]["events_with_two_ids"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
