"""Redis clients for the cluster backends (the job store and the usage ledger share one Redis).

The password comes from the ``REDIS_PASSWORD`` environment variable, never from the URL in the
config; it is not logged and does not appear in ``repr`` (keep :func:`pipelines.urls.redact_url`'s form
of the URL for display). Keys are ``:``-joined, all under a non-empty prefix, with the variable part (a
tenant, a job id) always the *last* component so it cannot collide with the fixed names.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from serve.db import translate_errors

__all__ = [
    "PASSWORD_ENV",
    "check_key_prefix",
    "connect_redis",
    "ping_redis",
    "redis_errors",
    "redis_key",
]

PASSWORD_ENV = "REDIS_PASSWORD"


def redis_errors(what: str = "job store") -> translate_errors:
    """Decorator / ``with`` block raising :class:`redis.RedisError` as ``JobStoreError``."""
    return translate_errors(redis.RedisError, what=what)


def connect_redis(url: str, *, socket_timeout_s: float = 10.0, client: redis.Redis | None = None) -> redis.Redis:
    """``client`` if given, else a client for ``url`` (decoded responses, ``socket_timeout_s`` for
    connect and reads, a health check every 30 s). The password is ``$REDIS_PASSWORD``, if set."""
    if client is not None:
        return client
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "health_check_interval": 30,
    }
    password = os.environ.get(PASSWORD_ENV)
    if password:
        options["password"] = password
    return redis.Redis.from_url(url, **options)


def ping_redis(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def check_key_prefix(key_prefix: str) -> str:
    if not key_prefix:
        raise ValueError("key_prefix must not be empty")
    return key_prefix


def redis_key(prefix: str, *parts: str) -> str:
    return ":".join((prefix, *parts))
