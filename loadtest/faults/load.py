"""A steady stream of small jobs, and what became of each: the client's side of a fault run.

Submits go out at a fixed rate from one thread, each answered 202 (accepted) or rejected; every
rejection is recorded with its status and whether it carried ``Retry-After``. At the end every
accepted job is polled until it is terminal. A job is *lost* when it was accepted and then never
reached a terminal state (or its record vanished) within the settle time.
"""

from __future__ import annotations

import base64
import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class LoadReport:
    submitted: int = 0
    accepted: int = 0
    rejected: dict[int, int] = field(default_factory=dict)
    rejected_without_retry_after: int = 0
    transport_errors: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    lost: list[str] = field(default_factory=list)
    poll_statuses: dict[int, int] = field(default_factory=dict)

    @property
    def failed_by_the_service(self) -> int:
        """Failures that were not the request's fault (every job here is valid)."""
        return sum(self.failed.values())

    def as_dict(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "accepted": self.accepted, "completed": self.completed,
                "failed": dict(self.failed), "cancelled": self.cancelled, "lost": len(self.lost),
                "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
                "rejected_without_retry_after": self.rejected_without_retry_after,
                "transport_errors": self.transport_errors,
                "poll_statuses": {str(k): v for k, v in sorted(self.poll_statuses.items())}}


class SteadyLoad:
    """Submits one job every ``1/rate_per_s`` seconds until stopped."""

    def __init__(self, base_url: str, api_key: str, *, rate_per_s: float, params: dict[str, Any],
                 image: Path, webhook_url: str | None = None, timeout_s: float = 30.0) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout_s,
                                   headers={"Authorization": f"Bearer {api_key}"})
        self.interval = 1.0 / rate_per_s
        self.body = {"image_url": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode(),
                     **params}
        if webhook_url is not None:
            self.body["webhook_url"] = webhook_url
        self.report = LoadReport()
        self.job_ids: list[str] = []
        self.completed_ids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._submit()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _submit(self) -> None:
        report = self.report
        report.submitted += 1
        try:
            response = self.client.post("/v1/videos", json=self.body)
        except httpx.HTTPError:
            report.transport_errors += 1
            return
        if response.status_code == 202:
            report.accepted += 1
            with self._lock:
                self.job_ids.append(response.json()["id"])
            return
        report.rejected[response.status_code] = report.rejected.get(response.status_code, 0) + 1
        if not response.headers.get("Retry-After"):
            report.rejected_without_retry_after += 1

    def settle(self, timeout_s: float) -> LoadReport:  # noqa: C901 - one loop, one tally
        """Poll every accepted job until it is terminal (or the time is up) and count the outcomes."""
        report = self.report
        pending = collections.deque(self.job_ids)
        deadline = time.monotonic() + timeout_s
        outcomes: dict[str, dict[str, Any]] = {}
        while pending and time.monotonic() < deadline:
            job_id = pending.popleft()
            try:
                response = self.client.get(f"/v1/videos/{job_id}")
            except httpx.HTTPError:
                pending.append(job_id)
                time.sleep(0.2)
                continue
            report.poll_statuses[response.status_code] = report.poll_statuses.get(response.status_code, 0) + 1
            if response.status_code == 200 and response.json()["status"] in TERMINAL:
                outcomes[job_id] = response.json()
                continue
            if response.status_code == 404:
                outcomes[job_id] = {"status": "missing"}
                continue
            pending.append(job_id)
            time.sleep(0.05 if len(pending) > 1 else 0.5)
        for job_id in self.job_ids:
            job = outcomes.get(job_id)
            if job is None or job["status"] == "missing":
                report.lost.append(job_id)
            elif job["status"] == "completed":
                report.completed += 1
                self.completed_ids.add(job_id)
            elif job["status"] == "cancelled":
                report.cancelled += 1
            else:
                code = (job.get("error") or {}).get("code", "unknown")
                report.failed[code] = report.failed.get(code, 0) + 1
        self.client.close()
        return report
