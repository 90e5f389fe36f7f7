"""The Redis job store's per-tenant counts (a mixin of :class:`serve.jobstore.RedisJobStore`, kept
out of that module): one pipelined round trip over the tenants with queued jobs
(``queued-tenants``) and the tenants named by the caller. Redis keeps running jobs per tenant
(``running:{tenant}``) but no set of tenants with running jobs, hence the names."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis as redis_lib

from serve.jobstore.base import TenantJobCounts
from serve.jobstore.counted import counted_errors


class RedisTenantCounts:
    """Needs the store's client (``_r``) and key builder (``_k``)."""

    _r: Any
    _k: Any

    @counted_errors(redis_lib.RedisError, backend="redis")
    def tenant_job_counts(self, tenants: Iterable[str] = ()) -> dict[str, TenantJobCounts]:
        names = sorted(set(self._r.smembers(self._k("queued-tenants"))) | set(tenants))
        if not names:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.zcard(self._k("queued", name))
            pipe.scard(self._k("running", name))
        replies = pipe.execute()
        counts = {name: TenantJobCounts(int(replies[2 * i]), int(replies[2 * i + 1])) for i, name in enumerate(names)}
        return {name: count for name, count in counts.items() if count.queued or count.running}
