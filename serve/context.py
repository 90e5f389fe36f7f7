"""What travels with every stage call besides the payload: which job, whose, and its trace."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobContext:
    job_id: str
    tenant: str
    owner: str
    """Lease owner (the runner driving the job): stage progress writes are guarded by it."""
    trace: dict[str, str] = field(default_factory=dict)
    """W3C trace context (``traceparent``) of the runner's job span."""
