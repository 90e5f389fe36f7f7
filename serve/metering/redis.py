"""Redis usage ledger: the cluster backend (shares the job store's Redis).

Keys, all under ``{key_prefix}:usage:`` (the job id or tenant is always the *last* component):

=====================  ===========================================================================
``rec:{job_id}``       hash: one usage record (``job_id``, ``tenant``, ``finished_at`` ISO 8601,
                       ``finished_us``, ``outcome``, ``charged`` 0/1, ``error_code`` when failed,
                       ``model`` when the job named one (absent in records written before the
                       field existed: they read back as ``model=None``), ``video_seconds``,
                       ``gpu_seconds`` and ``busy_seconds`` as JSON objects)
``tenant:{tenant}``    zset: the tenant's records, score = finished_at (epoch microseconds)
``finished``           zset: every record, same score (purge)
=====================  ===========================================================================

Equal scores order by member (the job id), so scans order by ``(finished_at, job_id)`` exactly like
the SQLite backend.

Atomicity: :meth:`RedisUsageLedger.record` is one Lua script (check that the record's hash does
not exist, write it, add it to both zsets), so of any number of concurrent records of one job
exactly one is stored and returns True; the others change nothing. Purging a record is a script
too (delete the hash and both index entries together).

Records carry no Redis TTL: retention is enforced by :meth:`UsageLedger.purge` through the
``finished`` zset. Floats are written with ``repr`` (JSON for the per-stage maps), which round-trips
exactly. The client comes from :func:`serve.db.redis.connect_redis`: the password comes from the
``REDIS_PASSWORD`` environment variable, never from the URL in the config; it is not logged and
does not appear in ``repr``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import redis as redis_lib

from pipelines.urls import redact_url
from serve.db.redis import check_key_prefix, connect_redis, ping_redis, redis_errors, redis_key
from serve.jobstore.models import dt_to_us
from serve.metering.base import DEFAULT_USAGE_RETENTION_S, UsageLedger
from serve.metering.models import UsageRecord

#: KEYS = the record hash, the tenant's zset, the ``finished`` zset; ARGV[1] = job id,
#: ARGV[2] = finished_at (epoch microseconds), ARGV[3..] = the hash's field/value pairs.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

#: KEYS = the record hash, the tenant's zset, the ``finished`` zset; ARGV[1] = job id, ARGV[2] = the
#: tenant read beforehand (records never change, so it still holds unless the record is gone).
_PURGE_ONE = """
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if tenant and tenant ~= ARGV[2] then
    return 0
end
local removed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return removed
"""

#: Records read (HGETALL) per pipelined round trip, and purged per batch.
_BATCH = 500

_translate = redis_errors()


def _fields(rec: UsageRecord) -> list[str]:
    fields = {
        "job_id": rec.job_id,
        "tenant": rec.tenant,
        "finished_at": rec.finished_at.isoformat(),
        "finished_us": str(dt_to_us(rec.finished_at)),
        "outcome": rec.outcome.value,
        "charged": "1" if rec.charged else "0",
        "video_seconds": repr(float(rec.video_seconds)),
        "gpu_seconds": json.dumps(rec.gpu_seconds, sort_keys=True),
        "busy_seconds": json.dumps(rec.busy_seconds, sort_keys=True),
    }
    if rec.error_code is not None:
        fields["error_code"] = rec.error_code
    if rec.model is not None:
        fields["model"] = rec.model
    return [item for pair in fields.items() for item in pair]


def _from_hash(data: dict[str, str]) -> UsageRecord | None:
    if not data:
        return None
    return UsageRecord(
        job_id=data["job_id"],
        tenant=data["tenant"],
        finished_at=data["finished_at"],
        outcome=data["outcome"],
        charged=data["charged"] == "1",
        error_code=data.get("error_code"),
        model=data.get("model"),
        video_seconds=float(data["video_seconds"]),
        gpu_seconds=json.loads(data["gpu_seconds"]),
        busy_seconds=json.loads(data["busy_seconds"]),
    )


class RedisUsageLedger(UsageLedger):
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "svd",
        retention_s: float = DEFAULT_USAGE_RETENTION_S,
        clock: Callable[[], float] | None = None,
        client: redis_lib.Redis | None = None,
        socket_timeout_s: float = 10.0,
    ):
        kwargs = {"clock": clock} if clock is not None else {}
        super().__init__(retention_s=retention_s, **kwargs)
        self.prefix = redis_key(check_key_prefix(key_prefix), "usage")
        self.url = redact_url(url)
        self._r = connect_redis(url, socket_timeout_s=socket_timeout_s, client=client)
        self._record_script = self._r.register_script(_RECORD)
        self._purge_script = self._r.register_script(_PURGE_ONE)

    # ------------------------------------------------------------------ keys

    def _k(self, *parts: str) -> str:
        return redis_key(self.prefix, *parts)

    def _rec_key(self, job_id: str) -> str:
        return self._k("rec", job_id)

    # ------------------------------------------------------------------ writes

    @_translate
    def record(self, rec: UsageRecord) -> bool:
        stored = self._record_script(
            keys=[self._rec_key(rec.job_id), self._k("tenant", rec.tenant), self._k("finished")],
            args=[rec.job_id, str(dt_to_us(rec.finished_at)), *_fields(rec)],
        )
        return int(stored) == 1

    @_translate
    def _purge_before(self, cutoff_us: int) -> int:
        removed = 0
        while True:
            ids = self._r.zrangebyscore(self._k("finished"), "-inf", f"({cutoff_us}", start=0, num=_BATCH)
            if not ids:
                return removed
            pipe = self._r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(self._rec_key(job_id), "tenant")
            tenants = pipe.execute()
            pipe = self._r.pipeline(transaction=False)
            scripted: list[bool] = []  # per queued command: a purge script (True) or a stale zrem
            for job_id, tenant in zip(ids, tenants):
                if tenant is None:  # a stale index entry (or purged meanwhile): drop it
                    pipe.zrem(self._k("finished"), job_id)
                    scripted.append(False)
                    continue
                self._purge_script(keys=[self._rec_key(job_id), self._k("tenant", tenant), self._k("finished")],
                                   args=[job_id, tenant], client=pipe)
                scripted.append(True)
            results = pipe.execute()
            removed += sum(int(result) for result, is_script in zip(results, scripted) if is_script)
            if len(ids) < _BATCH:
                return removed

    # ------------------------------------------------------------------ reads

    @_translate
    def get(self, job_id: str) -> UsageRecord | None:
        return _from_hash(self._r.hgetall(self._rec_key(job_id)))

    def _scan(self, tenant: str, start_us: int, end_us: int, limit: int | None) -> Iterator[UsageRecord]:
        with redis_errors("usage ledger"):  # a generator runs outside the @_translate wrapper
            # Ids only (a few dozen bytes each); the records are then read in pipelined batches.
            paging = {"start": 0, "num": limit} if limit is not None else {}
            ids = self._r.zrangebyscore(self._k("tenant", tenant), start_us, f"({end_us}", **paging)
            for i in range(0, len(ids), _BATCH):
                pipe = self._r.pipeline(transaction=False)
                for job_id in ids[i:i + _BATCH]:
                    pipe.hgetall(self._rec_key(job_id))
                for data in pipe.execute():
                    rec = _from_hash(data)
                    if rec is not None and rec.tenant == tenant:  # purged meanwhile: skipped
                        yield rec

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> bool:
        return ping_redis(self._r)

    def close(self) -> None:
        self._r.close()

    def __repr__(self) -> str:
        return f"RedisUsageLedger(url={self.url!r}, key_prefix={self.prefix!r})"
