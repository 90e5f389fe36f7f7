"""Following one job as it changes: the loop behind every server-sent-event stream and every
request that waits for a job (the native events, fal's status stream, the generations endpoint).

It wakes on the job store's change notices (never polls) and re-reads the job; a lost notice
costs at most ``recheck_s``, never a stuck stream.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from fastapi import Request

from ..jobstore import Job, JobStore

#: Yielded while nothing changes, every ``heartbeat_s``: streams send a comment to keep proxies open.
KEEPALIVE = object()

WAKE_S = 1.0  # how often the disconnect check and the keep-alive run between notices
RECHECK_S = 5.0  # re-read even without a notice
HEARTBEAT_S = 15.0


async def follow_job(store: JobStore, job: Job, *, tenant: str, request: Request | None = None,
                     deadline: float | None = None, heartbeat_s: float | None = HEARTBEAT_S,
                     recheck_s: float = RECHECK_S) -> AsyncIterator[Job | object]:
    """Yield ``job`` now and again after each change, until it is terminal (yielded last), gone,
    the client disconnected or ``deadline`` (``time.monotonic()``) passed; :data:`KEEPALIVE`
    every ``heartbeat_s`` in between (None: never). ``recheck_s`` bounds the wait without a
    notice (shorter where something the job's notices do not cover matters, e.g. queue position)."""
    beat = time.monotonic()
    with store.changes.watch(job.id) as watch:
        # Read again once the watch is open: a change just before it would otherwise be missed.
        job = await asyncio.to_thread(store.get, job.id, tenant=tenant)
        while job is not None:
            yield job
            if job.status.is_terminal:
                return
            changed, read_at = False, time.monotonic()
            while not changed:
                left = WAKE_S if deadline is None else min(WAKE_S, deadline - time.monotonic())
                if left <= 0 or (request is not None and await request.is_disconnected()):
                    return
                if heartbeat_s is not None and time.monotonic() - beat >= heartbeat_s:
                    beat = time.monotonic()
                    yield KEEPALIVE
                changed = await watch.changed(left) or time.monotonic() - read_at >= recheck_s
            job = await asyncio.to_thread(store.get, job.id, tenant=tenant)
