"""The Redis side of the webhook delivery queue (:mod:`serve.jobstore.deliveries`), under the job
store's key prefix so every runner of the cluster shares it:

===============================  ====================================================================
``webhooks``                     zset: pending event ids, score = ``due_at`` (epoch seconds)
``webhook:{event_id}``           hash: ``data`` (the fields fixed at enqueue, JSON, body base64),
                                 ``job``, ``attempts``, ``first`` (first attempt, "" = none yet),
                                 ``owner`` (the claimant, "" = unclaimed)
===============================  ====================================================================

Why Lua: a claim is "take the due members and stamp a lease on each" and a hand-back is "only if
I still hold it"; each is one script, so it runs atomically with no WATCH retries, however many
runners poll at once. The due zset orders equal scores by member, i.e. ``(due_at, event_id)``
like the SQLite backend. The claim script touches the hashes of the ids it found (not declared
in KEYS): fine on a single Redis (or a primary with replicas), as the rest of the store assumes.
"""

from __future__ import annotations

from typing import Any

import redis as redis_lib

from serve.jobstore.counted import counted_errors
from serve.jobstore.deliveries import WEBHOOK_CHANNEL, DeliveryQueue, WebhookDelivery

#: KEYS[1] = due zset, KEYS[2] = the delivery's hash; ARGV = event id, due, data, attempts, first, job id.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[2], 'data', ARGV[3], 'attempts', ARGV[4], 'first', ARGV[5], 'owner', '', 'job', ARGV[6])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

#: KEYS[1] = due zset; ARGV = now, lease end, owner, limit, hash key prefix. Returns
#: ``[[event id, data, attempts, first], ...]`` of the claimed ones, soonest due first.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(ids) do
    local key = ARGV[5] .. id
    if redis.call('EXISTS', key) == 1 then
        redis.call('HSET', key, 'owner', ARGV[3])
        redis.call('ZADD', KEYS[1], ARGV[2], id)
        local f = redis.call('HMGET', key, 'data', 'attempts', 'first')
        out[#out + 1] = {id, f[1], f[2], f[3]}
    else
        redis.call('ZREM', KEYS[1], id)
    end
end
return out
"""

#: KEYS[1] = due zset, KEYS[2] = the delivery's hash; ARGV = owner, attempts, first, due, event id,
#: data ("" = unchanged).
_RETRY = """
if redis.call('HGET', KEYS[2], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'owner', '', 'attempts', ARGV[2], 'first', ARGV[3])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'data', ARGV[6]) end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
return 1
"""

#: KEYS[1] = the delivery's hash; ARGV = the data it must still have, the new data.
_SET_DATA_IF_EQUAL = """
if redis.call('HGET', KEYS[1], 'data') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[2])
return 1
"""

_translate = counted_errors(redis_lib.RedisError, backend="redis")  # JobStoreError, counted


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _delivery(data: str, attempts: Any, first: Any, due: float, owner: str | None) -> WebhookDelivery:
    return WebhookDelivery.model_validate_json(data).model_copy(update={
        "attempts": int(attempts or 0), "first_attempt_at": float(first) if first else None,
        "due_at": float(due), "lease_owner": owner or None})


class RedisDeliveries(DeliveryQueue):
    """Mixed into :class:`serve.jobstore.redis.RedisJobStore` (uses its ``_r``, ``_k``, ``_now``,
    ``changes``)."""

    _r: Any

    def _delivery_script(self, name: str, source: str) -> Any:
        scripts = self.__dict__.setdefault("_delivery_scripts", {})
        if name not in scripts:
            scripts[name] = self._r.register_script(source)
        return scripts[name]

    def _delivery_key(self, event_id: str) -> str:
        return self._k("webhook", event_id)

    def _enqueue_args(self, delivery: WebhookDelivery) -> tuple[list[str], list[Any]]:
        keys = [self._k("webhooks"), self._delivery_key(delivery.event_id)]
        args = [delivery.event_id, _num(delivery.due_at), delivery.immutable_json(), delivery.attempts,
                _num(delivery.first_attempt_at), delivery.job_id]
        return keys, args

    def _queue_delivery(self, pipe: Any, delivery: WebhookDelivery) -> None:
        """Queue the enqueue inside the caller's MULTI (a terminal transition's)."""
        keys, args = self._enqueue_args(delivery)
        pipe.eval(_ENQUEUE, len(keys), *keys, *args)

    @_translate
    def enqueue_webhook(self, delivery: WebhookDelivery) -> bool:
        keys, args = self._enqueue_args(delivery)
        added = self._delivery_script("enqueue", _ENQUEUE)(keys=keys, args=args)
        if added:
            self.changes.publish(WEBHOOK_CHANNEL)
        return bool(added)

    @_translate
    def claim_webhooks(self, *, owner: str, lease_s: float, limit: int = 16,
                       now: float | None = None) -> list[WebhookDelivery]:
        if not owner:
            raise ValueError("owner must not be empty")
        if limit < 1:
            return []
        now = self._now() if now is None else float(now)
        until = now + lease_s
        rows = self._delivery_script("claim", _CLAIM)(
            keys=[self._k("webhooks")], args=[_num(now), _num(until), owner, int(limit), self._delivery_key("")])
        return [_delivery(data, attempts, first, until, owner) for _, data, attempts, first in rows]

    @_translate
    def retry_webhook(self, event_id: str, *, owner: str, attempts: int, first_attempt_at: float | None,
                      due_at: float, body: bytes | None = None) -> bool:
        data = ""
        if body is not None:  # the fixed fields never change, so reading them first is safe
            stored = self._r.hget(self._delivery_key(event_id), "data")
            if stored is None:
                return False
            data = WebhookDelivery.model_validate_json(stored).model_copy(update={"body": body}).immutable_json()
        return bool(self._delivery_script("retry", _RETRY)(
            keys=[self._k("webhooks"), self._delivery_key(event_id)],
            args=[owner, int(attempts), _num(first_attempt_at), _num(due_at), event_id, data]))

    @_translate
    def set_webhook_body(self, event_id: str, body: bytes) -> bool:
        key = self._delivery_key(event_id)
        stored = self._r.hget(key, "data")
        if stored is None:
            return False
        delivery = WebhookDelivery.model_validate_json(stored)
        if delivery.body:
            return False
        # Compare-and-set: of two processes filling it at once, one wins and the other sees a body.
        return bool(self._delivery_script("set-data", _SET_DATA_IF_EQUAL)(
            keys=[key], args=[stored, delivery.model_copy(update={"body": body}).immutable_json()]))

    @_translate
    def finish_webhook(self, event_id: str) -> bool:
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._delivery_key(event_id))
        pipe.zrem(self._k("webhooks"), event_id)
        deleted, _ = pipe.execute()
        return bool(deleted)

    @_translate
    def pending_webhooks(self, *, job_id: str | None = None, limit: int = 100) -> list[WebhookDelivery]:
        found: list[WebhookDelivery] = []
        start, batch = 0, 200
        while len(found) < limit:
            entries = self._r.zrange(self._k("webhooks"), start, start + batch - 1, withscores=True)
            if not entries:
                break
            start += batch
            pipe = self._r.pipeline(transaction=False)
            for event_id, _ in entries:
                pipe.hmget(self._delivery_key(event_id), "data", "attempts", "first", "owner", "job")
            for (_, due), (data, attempts, first, owner, job) in zip(entries, pipe.execute()):
                if data is not None and (job_id is None or job == job_id):
                    found.append(_delivery(data, attempts, first, due, owner))
        return found[:limit]
