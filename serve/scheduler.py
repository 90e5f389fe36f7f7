"""Which queued job runs next: weighted fair sharing between tenants.

The job store offers each tenant's oldest queued job (``queued_heads``) and how many jobs each
tenant is running. The next job comes from the tenant with the least running work per unit of
weight, ties broken by age: a tenant that floods the queue cannot starve one that submits a
few jobs, and under saturation running slots (hence completed work) split by weight.

A tenant already running its policy's ``max_running_jobs`` (stamped on each job at admission in
``job.policy``) is skipped: its jobs wait in the queue, and the slot goes to the
next tenant instead of staying idle.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .jobstore import Job

def pick_next(heads: Sequence[Job], running: Callable[[str], int]) -> Job | None:
    """The head to dispatch next, or None when nothing is queued or every tenant with queued
    work is at its running cap."""

    def at_cap(job: Job) -> bool:
        cap = job.policy.max_running_jobs
        return cap is not None and running(job.tenant) >= cap

    candidates = [job for job in heads if not at_cap(job)]
    if not candidates:
        return None

    def rank(job: Job):
        return ((running(job.tenant) + 1) / max(job.policy.weight, 1e-6), job.created_at, job.id)

    return min(candidates, key=rank)
