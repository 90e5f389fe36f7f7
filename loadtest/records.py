"""What a run records: one :class:`JobRecord` per arrival, and HTTP request counts.

Client-side instants are epoch seconds from the load generator's clock; ``created_at``,
``started_at`` and ``finished_at`` are the service's own timestamps (so queue wait is measured
on one clock). The report derives every figure from these records.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class JobRecord:
    seq: int
    tenant: str
    scheduled_at: float
    """Epoch second the arrival was due (run start + its scheduled offset)."""
    clip: dict[str, Any] = field(default_factory=dict)
    work_units: float = 1.0
    follow: str = "poll"
    worker: int = 0
    submitted_at: float | None = None
    """Epoch second the POST was sent (first attempt)."""
    accepted_at: float | None = None
    submit_status: int | None = None
    """HTTP status of the last POST attempt: 202, 429, 503, ... or 0 for a connection error."""
    submit_error: str | None = None
    submit_attempts: int = 0
    retry_after: float | None = None
    job_id: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    first_progress_at: float | None = None
    """Epoch second the client first saw the job leave the queue (status or stage changed)."""
    terminal_at: float | None = None
    """Epoch second the client first saw a terminal status."""
    status: str = "pending"
    """completed, failed, cancelled; rejected (no 202), unfinished (the run ended first), not_sent, error."""
    error_code: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cancel_planned_after: float | None = None
    cancel_requested_at: float | None = None
    cancel_status: int | None = None
    download_status: int | None = None
    download_bytes: int | None = None
    download_s: float | None = None
    download_ok: bool | None = None
    done_at: float | None = None
    """Epoch second the client was done with the job (terminal seen and clip downloaded)."""
    polls: int = 0

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def update_from_job(self, job: dict[str, Any], now: float) -> None:
        """Fold a job body (GET /v1/videos/{id} or an SSE event) into the record.

        The precise instants come from ``timestamps`` (ISO 8601, microseconds; the top-level
        ``created_at`` etc. are whole Unix seconds there); a service from before that object has
        them as ISO strings at the top level."""
        self.job_id = job.get("id") or self.job_id
        for name, value in job_instants(job).items():
            if value is not None:
                setattr(self, name, value)
        status = job.get("status")
        progress = job_progress(job)
        if self.first_progress_at is None and (status not in (None, "queued") or progress.get("stage")):
            self.first_progress_at = now
        if job.get("timings"):
            self.timings = {k: float(v) for k, v in job["timings"].items()}
        if status in TERMINAL:
            if self.terminal_at is None:
                self.terminal_at = now
            self.status = status
            error = job.get("error") or {}
            self.error_code = error.get("code")
        elif status:
            self.status = status


def job_instants(job: dict[str, Any]) -> dict[str, float | None]:
    """``created_at``, ``started_at`` and ``finished_at`` of a job body as epoch seconds, from
    ``timestamps`` when present (to the microsecond), else the old ISO top level."""
    precise = job.get("timestamps")
    source = precise if isinstance(precise, dict) else job
    return {name: _epoch(source.get(name)) for name in ("created_at", "started_at", "finished_at")}


def job_progress(job: dict[str, Any]) -> dict[str, Any]:
    """The stage/step progress object of a job body: ``progress_detail`` (``progress`` is then the
    whole percent), or the old ``progress`` object."""
    detail = job.get("progress_detail")
    if isinstance(detail, dict):
        return detail
    progress = job.get("progress")
    return progress if isinstance(progress, dict) else {}


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def write_records(path: str | Path, records: Iterable[JobRecord]) -> None:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), sort_keys=True) + "\n")


def read_records(path: str | Path) -> list[JobRecord]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(JobRecord.from_json(json.loads(line)))
    return out


def gradient_png(width: int, height: int) -> bytes:
    """A small RGB gradient PNG (no Pillow needed, so the Locust image stays lean)."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(((x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), ((x ^ y) * 7) & 255))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + chunk(b"IEND", b"")
